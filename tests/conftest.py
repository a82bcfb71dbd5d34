from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture
def lattice_cache(tmp_path_factory, monkeypatch):
    """Keep the relaxed-lattice cache out of the user's home directory."""
    d = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SURFDIFF_CACHE_DIR", str(d))
    return d
