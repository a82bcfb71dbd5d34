"""The API password of `surfdiff serve` (Prefect's basic auth): `SURFDIFF_PREFECT_AUTH`, else a secret generated on
first start into PREFECT_HOME/api-auth (mode 0600). It is never printed or logged."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from surfdiff_core.errors import ConfigError

AUTH_ENV = "SURFDIFF_PREFECT_AUTH"  # the API password ('user:password'); wins over the generated file
AUTH_FILE = "api-auth"  # under PREFECT_HOME, mode 0600


def resolve_auth(home: Path) -> str:
    """The API password: $SURFDIFF_PREFECT_AUTH, else PREFECT_HOME/api-auth (generated on first start, 0600)."""
    if given := os.environ.get(AUTH_ENV, "").strip():
        return given
    path = home / AUTH_FILE
    home.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: never follow or reuse a file someone else planted; 0600 from the first byte.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_auth_file(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"surfdiff:{secrets.token_urlsafe(32)}\n")
    return _read_auth_file(path)


def _read_auth_file(path: Path) -> str:
    st = path.lstat()
    if not path.is_file() or path.is_symlink() or st.st_uid != os.getuid():
        raise ConfigError(f"{path} must be a regular file owned by you: remove it (a new one is generated)")
    if st.st_mode & 0o077:
        path.chmod(0o600)  # readable by others: the password is not secret any more, but tighten it at least
    secret = path.read_text().strip()
    if not secret:
        raise ConfigError(f"{path} is empty: remove it (a new one is generated) or set {AUTH_ENV}")
    return secret
