"""The compiled PaiNN message operator `surfdiff::painn_messages` (CPU): loading, fake kernels, autograd.

The C++ source (`csrc/painn_message.cpp`) is built when the package is installed (setup.py,
`torch.utils.cpp_extension`). It computes, over undirected pairs u = (a, b) with unit vector d_u = a -> b and
filter w_u = phi_u W built on the fly (never stored as a [pairs, 3F] tensor),

    ds_t   += w^s x^s_s                                   (t <- s: a <- b with sign +1, b <- a with -1)
    dv_t,c += sign w^r x^r_s d_c + w^v x^v_s v_s,c

Autograd: the forward's backward is `surfdiff::painn_messages_backward`, and that operator's own backward is
written with the two operators again, so any order of differentiation works (force training needs two).
ds is linear in each of phi, W and x, and dv in each of phi, W, x and the group (d, v) (ds has no (d, v)
factor). So for the backward B(g, theta) = J(theta)^T g and a cotangent h of its outputs, writing
theta[k -> h_k] for theta with group k replaced by its cotangent:

    d<h, B>/dg       = J h = sum_k f(theta[k -> h_k])           (for k = (d, v) only the dv part counts)
    d<h, B>/dtheta_j = sum_{k != j} [B(g, theta[k -> h_k])]_j   (for k = (d, v) with g_ds = 0)

`message_op_available()` says whether the operator can be used; when it cannot (not built, CPU lacks the
instructions it was built for, or SURFDIFF_NO_KERNELS=1) the caller takes the eager path and a one-line
warning is issued once per process.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

__all__ = ["message_op_available", "message_op_unavailable_reason", "painn_messages"]

_LOAD_ERROR: str | None = None
try:
    from surfdiff_core.ml import _painn_ops  # registers torch.ops.surfdiff.*
except ImportError as err:  # not built: no compiler or torch at install time
    _painn_ops = None
    _LOAD_ERROR = f"extension not built ({err})"

_WARNED = False


def _missing_cpu_features() -> list[str]:
    """Instruction-set extensions the build assumes (-march=native) that this CPU lacks."""
    if _painn_ops is None:
        return []
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((ln.split(":", 1)[1].split() for ln in fh if ln.startswith("flags")), None)
    except OSError:
        return []
    if flags is None:
        return []
    return [f for f in _painn_ops.compiled_isa().split() if f not in flags]


_MISSING_FEATURES = _missing_cpu_features()
if _MISSING_FEATURES:
    _LOAD_ERROR = f"built for CPU features this CPU lacks: {' '.join(_MISSING_FEATURES)}"


def message_op_unavailable_reason() -> str | None:
    """Why the compiled operator cannot be used here (None: it can)."""
    if os.environ.get("SURFDIFF_NO_KERNELS", "") not in ("", "0"):
        return "disabled by SURFDIFF_NO_KERNELS"
    return _LOAD_ERROR


def message_op_available(*, warn: bool = False) -> bool:
    """True when `surfdiff::painn_messages` can be used; warn=True warns (once) when it cannot."""
    global _WARNED
    reason = message_op_unavailable_reason()
    if warn and not _WARNED:
        _WARNED = True
        if reason is not None:
            warnings.warn(f"surfdiff: compiled PaiNN message op unavailable ({reason}); using eager PyTorch "
                          "(slower)", RuntimeWarning, stacklevel=3)  # fmt: skip
        else:  # built, but perhaps not for this host
            from surfdiff_core.ml.kernel_report import kernel_report, slow_path_reasons

            for slow in slow_path_reasons(kernel_report()):
                warnings.warn(f"surfdiff: {slow}", RuntimeWarning, stacklevel=3)
    return reason is None


def painn_messages(
    phi: torch.Tensor,  # [P, K]
    weight: torch.Tensor,  # [K, 3F]
    direction: torch.Tensor,  # [P, 3], unit vectors a -> b
    x: torch.Tensor,  # [N, 3F]
    v: torch.Tensor | None,  # [N, 3, F]; None: zeros
    pair_a: torch.Tensor,  # [P] int64
    pair_b: torch.Tensor,  # [P] int64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ds [N, F], dv [N, 3, F]) from undirected pairs, each sending messages both ways."""
    return torch.ops.surfdiff.painn_messages(*_contiguous(phi, weight, direction, x, v, pair_a, pair_b))


def _contiguous(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.contiguous() for t in tensors]


def _backward_op(g_ds, g_dv, phi, weight, direction, x, v, pair_a, pair_b, weight_grad: bool):
    args = _contiguous(g_ds, g_dv, phi, weight, direction, x, v, pair_a, pair_b)
    return torch.ops.surfdiff.painn_messages_backward(*args, weight_grad)


# -- fake kernels (shapes only) for torch.compile / meta tensors ------------------------------------------


def _register_fake() -> None:
    def same_device(x: torch.Tensor, *others: torch.Tensor | None) -> None:
        devices = {str(t.device) for t in others if t is not None} | {str(x.device)}
        torch._check(len(devices) == 1, lambda: f"painn_messages: inputs on several devices: {sorted(devices)}")

    @torch.library.register_fake("surfdiff::painn_messages")
    def _(phi, weight, direction, x, v, pair_a, pair_b):
        same_device(x, phi, weight, direction, v, pair_a, pair_b)
        n, f = x.shape[0], x.shape[1] // 3
        return x.new_empty(n, f), x.new_empty(n, 3, f)

    @torch.library.register_fake("surfdiff::painn_messages_backward")
    def _(g_ds, g_dv, phi, weight, direction, x, v, pair_a, pair_b, weight_grad):
        same_device(x, g_ds, g_dv, phi, weight, direction, v, pair_a, pair_b)
        g_v = x.new_empty(0) if v is None else torch.empty_like(v)
        return torch.empty_like(phi), torch.empty_like(weight), torch.empty_like(direction), torch.empty_like(x), g_v


# -- autograd -------------------------------------------------------------------------------------------------


def _save_inputs(ctx: Any, inputs: tuple, output: Any) -> None:
    ctx.save_for_backward(*(t for t in inputs[:9] if isinstance(t, torch.Tensor)))
    ctx.has_v = inputs[6 if len(inputs) == 10 else 4] is not None


def _saved(ctx: Any, n_leading: int) -> list[torch.Tensor | None]:
    saved = list(ctx.saved_tensors)
    if not ctx.has_v:  # v sits after x in both schemas
        saved.insert(n_leading + 4, None)
    return saved


def _messages_backward(ctx: Any, g_ds: torch.Tensor | None, g_dv: torch.Tensor | None):
    phi, weight, direction, x, v, pair_a, pair_b = _saved(ctx, 0)
    g_ds = torch.zeros(x.shape[0], x.shape[1] // 3, dtype=x.dtype) if g_ds is None else g_ds
    g_dv = torch.zeros(x.shape[0], 3, x.shape[1] // 3, dtype=x.dtype) if g_dv is None else g_dv
    # the weight gradient costs as much as the filter itself: only when someone wants it
    g_phi, g_w, g_dir, g_x, g_v = _backward_op(g_ds, g_dv, phi, weight, direction, x, v, pair_a, pair_b,
                                               bool(ctx.needs_input_grad[1]))  # fmt: skip
    return g_phi, g_w, g_dir, g_x, (g_v if v is not None else None), None, None


def _backward_backward(ctx: Any, *h: torch.Tensor | None):
    """Gradients of <h, B(g, theta)> for the backward operator B, by multilinearity (see module doc)."""
    g_ds, g_dv, phi, weight, direction, x, v, pair_a, pair_b = _saved(ctx, 2)
    h_phi, h_w, h_dir, h_x, h_v = h
    if not ctx.weight_grad:
        h_w = None  # that output was constant zeros
    if v is None or (h_v is not None and h_v.numel() == 0):
        h_v = None
    if h_dir is None and h_v is not None:
        h_dir = torch.zeros_like(direction)
    # group k replaced by its cotangent: (phi, weight, direction, x, v)
    swaps = {
        "phi": None if h_phi is None else (h_phi, weight, direction, x, v),
        "weight": None if h_w is None else (phi, h_w, direction, x, v),
        "x": None if h_x is None else (phi, weight, direction, h_x, v),
        "dv": None if h_dir is None else (phi, weight, h_dir, x, h_v),
    }
    need = dict(zip(["g_ds", "g_dv", "phi", "weight", "direction", "x", "v"], ctx.needs_input_grad[:7], strict=True))
    grads: dict[str, torch.Tensor | None] = dict.fromkeys(need)
    if need["g_ds"] or need["g_dv"]:
        for swapped, args in swaps.items():
            if args is not None:
                ds, dv = painn_messages(*args, pair_a, pair_b)
                if swapped != "dv":  # ds does not depend on (d, v): that call's ds is no tangent
                    grads["g_ds"] = ds if grads["g_ds"] is None else grads["g_ds"] + ds
                grads["g_dv"] = dv if grads["g_dv"] is None else grads["g_dv"] + dv
    receives = {"phi": ("phi",), "weight": ("weight",), "x": ("x",), "dv": ("direction", "v")}
    for swapped, args in swaps.items():
        wanted = [name for group, names in receives.items() if group != swapped for name in names if need[name]]
        if args is None or not wanted:
            continue
        # <g, f> with (d, v) swapped only involves dv: the ds part of f does not contain that group
        g_s = torch.zeros_like(g_ds) if swapped == "dv" else g_ds
        out = _backward_op(g_s, g_dv, *args, pair_a, pair_b, need["weight"] and swapped != "weight")
        by_name = dict(zip(["phi", "weight", "direction", "x", "v"], out, strict=True))
        for name in wanted:
            if name == "v" and args[4] is None:
                continue
            grads[name] = by_name[name] if grads[name] is None else grads[name] + by_name[name]
    return (*(grads[k] for k in need), None, None, None)


def _save_backward_inputs(ctx: Any, inputs: tuple, output: Any) -> None:
    _save_inputs(ctx, inputs, output)
    ctx.weight_grad = bool(inputs[9])


if _painn_ops is not None:
    _register_fake()
    torch.library.register_autograd("surfdiff::painn_messages", _messages_backward, setup_context=_save_inputs)
    torch.library.register_autograd(
        "surfdiff::painn_messages_backward", _backward_backward, setup_context=_save_backward_inputs
    )
