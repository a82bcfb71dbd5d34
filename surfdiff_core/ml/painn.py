"""PaiNN representation (Schütt, Unke, Gastegger, ICML 2021) in the schnetpack style.

Small modules (radial basis, cutoff, interaction, mixing) composed by `PaiNN`; the radial basis and
cutoff function are injected. All interaction filters come from one `filter_net` Linear over
[rbf * fcut, fcut]: the extra fcut column plays the role of the bias, so every filter vanishes
smoothly at the cutoff.

Where the time goes: with a 6 Å cutoff a slab atom has ~40 neighbours, so the cost is the pair-level
work, chiefly the filters (n_rbf x 3F multiply-adds per pair and interaction). Two implementations
of the same messages:

* eager PyTorch (any device, any autograd order: used on CUDA and for force training, which needs
  double backward): full pair list, one `index_select` gather of the node quantities, `index_add_`
  aggregation, x^v_j * v_j formed per atom before the gather, the v = 0 term skipped in layer one;
* fused CPU kernels (`_FusedMessages`: a small C file compiled on first use with the system C
  compiler, cached, called through ctypes): each *undirected* pair builds its filter once, in
  registers, and sends both messages; nothing of size [pairs, 3F] is ever stored, and the
  hand-written backward recomputes the filter and scatters into per-thread buffers. Built with
  OpenMP so it runs in the OpenMP pool PyTorch itself uses. First-order autograd only (sampling
  forces, MLFF relaxations, score and energy training). Eager fallback when no compiler is found
  or SURFDIFF_NO_KERNELS=1.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "CosineCutoff",
    "GaussianRBF",
    "PaiNN",
    "PaiNNInteraction",
    "PaiNNMixing",
    "full_to_half",
    "fused_kernels_available",
    "half_to_full",
]


class GaussianRBF(nn.Module):
    """n_rbf Gaussians with centres evenly spaced on [start, cutoff] and width = spacing."""

    def __init__(self, n_rbf: int, cutoff: float, start: float = 0.0, trainable: bool = False) -> None:
        super().__init__()
        self.n_rbf = n_rbf
        offsets = torch.linspace(start, cutoff, n_rbf)
        widths = torch.full_like(offsets, float(offsets[1] - offsets[0]) if n_rbf > 1 else cutoff)
        if trainable:
            self.offsets = nn.Parameter(offsets)
            self.widths = nn.Parameter(widths)
        else:
            self.register_buffer("offsets", offsets)
            self.register_buffer("widths", widths)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        coeff = -0.5 / self.widths.square()
        return torch.exp(coeff * (d[..., None] - self.offsets).square())


class CosineCutoff(nn.Module):
    """0.5 (cos(pi d / rc) + 1) for d < rc, else 0 (Behler)."""

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.register_buffer("cutoff", torch.tensor(float(cutoff)))

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        fc = 0.5 * (torch.cos(d * (math.pi / self.cutoff)) + 1.0)
        return fc * (d < self.cutoff).to(d.dtype)


# ----------------------------------------------------------------------------------------------
# Fused CPU message kernels
# ----------------------------------------------------------------------------------------------

# One interaction over undirected pairs u = (a, b) in [u0, u1), dir_u the unit vector a -> b. The
# filter w_u = phi_u Wf (phi [P, K] = (rbf * fcut, fcut), Wf [K, 3F] this interaction's weights) is
# built on the fly, once per undirected pair, and used for both messages a <- b and b <- a:
#   ds_t   += w^s x^s_s
#   dv_t,c += sign * w^r x^r_s dir_c + w^v x^v_s v_s,c      (t <- s, sign +1 for a <- b, -1 for b <- a)
# Node features x [N, 3F] = (x^s, x^r, x^v), v [N, 3, F] (NULL: zeros, first interaction).
# Outputs (forward ds, dv; backward gx, gv, gWf) go to the calling thread's own buffers, so the
# scatter to both ends needs no atomics; gphi [P, Kp] and gdir [P, 3] are written per pair. The
# backward reads the weights transposed and zero-padded to Kp (a multiple of the 64-byte vector).
_KERNEL_TEMPLATE = r"""
typedef REAL vec_SUF __attribute__((vector_size(64), aligned(sizeof(REAL))));
#define VL_SUF ((int64_t)(64 / sizeof(REAL)))

/* w = phi Wf for one pair: blocks of 4 vectors held in registers over the K basis functions */
static inline void filter_SUF(int64_t K, int64_t F3, const REAL* restrict phi,
                              const REAL* restrict Wf, REAL* restrict w)
{
    int64_t f0 = 0;
    for (; f0 + 4 * VL_SUF <= F3; f0 += 4 * VL_SUF) {
        vec_SUF a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t k = 0; k < K; ++k) {
            const REAL c = phi[k];
            const vec_SUF* wk = (const vec_SUF*)(Wf + k * F3 + f0);
            a0 += c * wk[0];
            a1 += c * wk[1];
            a2 += c * wk[2];
            a3 += c * wk[3];
        }
        vec_SUF* out = (vec_SUF*)(w + f0);
        out[0] = a0;
        out[1] = a1;
        out[2] = a2;
        out[3] = a3;
    }
    for (int64_t f = f0; f < F3; ++f) w[f] = 0;
    for (int64_t k = 0; k < K; ++k) {
        for (int64_t f = f0; f < F3; ++f) w[f] += phi[k] * Wf[k * F3 + f];
    }
}

/* gphi = Wf gw for one pair, from the transposed weights WfT [F3, NVK * VL] (K zero-padded):
   broadcast gw[f] against rows of WfT, four interleaved partial sums, no horizontal reductions */
#define FILTER_BWD_SUF(NVK)                                                                  \
static inline void filter_bwd_SUF_##NVK(int64_t F3, const REAL* restrict WfT,                \
                                        const REAL* restrict gw, REAL* restrict gph)         \
{                                                                                            \
    vec_SUF acc[4][NVK];                                                                     \
    for (int q = 0; q < 4; ++q)                                                              \
        for (int r = 0; r < NVK; ++r) acc[q][r] = (vec_SUF){0};                              \
    int64_t f = 0;                                                                           \
    for (; f + 4 <= F3; f += 4)                                                              \
        for (int q = 0; q < 4; ++q) {                                                        \
            const REAL g = gw[f + q];                                                        \
            const vec_SUF* wt = (const vec_SUF*)(WfT + (f + q) * NVK * VL_SUF);              \
            for (int r = 0; r < NVK; ++r) acc[q][r] += g * wt[r];                            \
        }                                                                                    \
    for (; f < F3; ++f) {                                                                    \
        const REAL g = gw[f];                                                                \
        const vec_SUF* wt = (const vec_SUF*)(WfT + f * NVK * VL_SUF);                        \
        for (int r = 0; r < NVK; ++r) acc[0][r] += g * wt[r];                                \
    }                                                                                        \
    vec_SUF* out = (vec_SUF*)gph;                                                            \
    for (int r = 0; r < NVK; ++r) out[r] = (acc[0][r] + acc[1][r]) + (acc[2][r] + acc[3][r]); \
}
FILTER_BWD_SUF(1)
FILTER_BWD_SUF(2)
FILTER_BWD_SUF(3)
FILTER_BWD_SUF(4)

/* any padded width: plain loops */
static inline void filter_bwd_SUF_n(int64_t F3, int64_t Kp, const REAL* restrict WfT,
                                    const REAL* restrict gw, REAL* restrict gph)
{
    for (int64_t k = 0; k < Kp; ++k) gph[k] = 0;
    for (int64_t f = 0; f < F3; ++f) {
        const REAL g = gw[f];
        #pragma omp simd
        for (int64_t k = 0; k < Kp; ++k) gph[k] += g * WfT[f * Kp + k];
    }
}

static inline void filter_bwd_SUF(int64_t F3, int64_t Kp, const REAL* restrict WfT,
                                  const REAL* restrict gw, REAL* restrict gph)
{
    switch (Kp / VL_SUF) {
        case 1: filter_bwd_SUF_1(F3, WfT, gw, gph); break;
        case 2: filter_bwd_SUF_2(F3, WfT, gw, gph); break;
        case 3: filter_bwd_SUF_3(F3, WfT, gw, gph); break;
        case 4: filter_bwd_SUF_4(F3, WfT, gw, gph); break;
        default: filter_bwd_SUF_n(F3, Kp, WfT, gw, gph);
    }
}

/* message t <- s */
static inline void message_SUF(int64_t F, const REAL* restrict w, const REAL* restrict xs,
                               const REAL* restrict vs, REAL d0, REAL d1, REAL d2,
                               REAL* restrict st, REAL* restrict vt)
{
    REAL* restrict t0 = vt;
    REAL* restrict t1 = vt + F;
    REAL* restrict t2 = vt + 2 * F;
    if (vs) {
        const REAL* restrict v0 = vs;
        const REAL* restrict v1 = vs + F;
        const REAL* restrict v2 = vs + 2 * F;
        #pragma omp simd
        for (int64_t f = 0; f < F; ++f) {
            st[f] += w[f] * xs[f];
            const REAL r = w[F + f] * xs[F + f];
            const REAL q = w[2 * F + f] * xs[2 * F + f];
            t0[f] += r * d0 + q * v0[f];
            t1[f] += r * d1 + q * v1[f];
            t2[f] += r * d2 + q * v2[f];
        }
    } else {
        #pragma omp simd
        for (int64_t f = 0; f < F; ++f) {
            st[f] += w[f] * xs[f];
            const REAL r = w[F + f] * xs[F + f];
            t0[f] += r * d0;
            t1[f] += r * d1;
            t2[f] += r * d2;
        }
    }
}

static void fwd_range_SUF(int64_t u0, int64_t u1, const int64_t* A, const int64_t* B, int64_t F, int64_t K,
                   const REAL* phi, const REAL* Wf, const REAL* dir, const REAL* x, const REAL* v,
                   REAL* ds, REAL* dv)
{
    const int64_t F3 = 3 * F;
    REAL w[F3] __attribute__((aligned(64)));
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t a = A[u], b = B[u];
        filter_SUF(K, F3, phi + u * K, Wf, w);
        const REAL d0 = dir[3 * u], d1 = dir[3 * u + 1], d2 = dir[3 * u + 2];
        message_SUF(F, w, x + b * F3, v ? v + b * F3 : 0, d0, d1, d2, ds + a * F, dv + a * F3);
        message_SUF(F, w, x + a * F3, v ? v + a * F3 : 0, -d0, -d1, -d2, ds + b * F, dv + b * F3);
    }
}

/* backward of message t <- s: accumulates gw, the source's gx/gv, returns the dir gradient */
static inline void message_bwd_SUF(int64_t F, const REAL* restrict w, const REAL* restrict xs,
                                   const REAL* restrict vs, REAL d0, REAL d1, REAL d2,
                                   const REAL* restrict gst, const REAL* restrict gvt,
                                   REAL* restrict gw, REAL* restrict gxs, REAL* restrict gvs,
                                   REAL* restrict gd)
{
    const REAL* restrict g0 = gvt;
    const REAL* restrict g1 = gvt + F;
    const REAL* restrict g2 = gvt + 2 * F;
    REAL s0 = 0, s1 = 0, s2 = 0;
    if (vs) {
        const REAL* restrict v0 = vs;
        const REAL* restrict v1 = vs + F;
        const REAL* restrict v2 = vs + 2 * F;
        REAL* restrict h0 = gvs;
        REAL* restrict h1 = gvs + F;
        REAL* restrict h2 = gvs + 2 * F;
        #pragma omp simd reduction(+:s0, s1, s2)
        for (int64_t f = 0; f < F; ++f) {
            gw[f] += gst[f] * xs[f];
            gxs[f] += w[f] * gst[f];
            const REAL t = g0[f] * d0 + g1[f] * d1 + g2[f] * d2;
            gw[F + f] += t * xs[F + f];
            gxs[F + f] += w[F + f] * t;
            const REAL r = w[F + f] * xs[F + f];
            s0 += r * g0[f];
            s1 += r * g1[f];
            s2 += r * g2[f];
            const REAL q = g0[f] * v0[f] + g1[f] * v1[f] + g2[f] * v2[f];
            gw[2 * F + f] += q * xs[2 * F + f];
            gxs[2 * F + f] += w[2 * F + f] * q;
            const REAL b = w[2 * F + f] * xs[2 * F + f];
            h0[f] += b * g0[f];
            h1[f] += b * g1[f];
            h2[f] += b * g2[f];
        }
    } else {
        #pragma omp simd reduction(+:s0, s1, s2)
        for (int64_t f = 0; f < F; ++f) {
            gw[f] += gst[f] * xs[f];
            gxs[f] += w[f] * gst[f];
            const REAL t = g0[f] * d0 + g1[f] * d1 + g2[f] * d2;
            gw[F + f] += t * xs[F + f];
            gxs[F + f] += w[F + f] * t;
            const REAL r = w[F + f] * xs[F + f];
            s0 += r * g0[f];
            s1 += r * g1[f];
            s2 += r * g2[f];
        }
    }
    gd[0] = s0;
    gd[1] = s1;
    gd[2] = s2;
}

static void bwd_range_SUF(int64_t u0, int64_t u1, const int64_t* A, const int64_t* B, int64_t F, int64_t K,
                   int64_t Kp, const REAL* phi, const REAL* Wf, const REAL* WfT,
                   const REAL* dir, const REAL* x, const REAL* v,
                   const REAL* gds, const REAL* gdv,
                   REAL* gphi, REAL* gdir, REAL* gx, REAL* gv, REAL* gWf)
{
    const int64_t F3 = 3 * F;
    REAL w[F3] __attribute__((aligned(64)));
    REAL gw[F3] __attribute__((aligned(64)));
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t a = A[u], b = B[u];
        const REAL* restrict phiu = phi + u * K;
        filter_SUF(K, F3, phiu, Wf, w);
        for (int64_t f = 0; f < F3; ++f) gw[f] = 0;
        const REAL d0 = dir[3 * u], d1 = dir[3 * u + 1], d2 = dir[3 * u + 2];
        REAL ga[3], gb[3];
        message_bwd_SUF(F, w, x + b * F3, v ? v + b * F3 : 0, d0, d1, d2, gds + a * F, gdv + a * F3,
                        gw, gx + b * F3, v ? gv + b * F3 : 0, ga);
        message_bwd_SUF(F, w, x + a * F3, v ? v + a * F3 : 0, -d0, -d1, -d2, gds + b * F, gdv + b * F3,
                        gw, gx + a * F3, v ? gv + a * F3 : 0, gb);
        gdir[3 * u] = ga[0] - gb[0];
        gdir[3 * u + 1] = ga[1] - gb[1];
        gdir[3 * u + 2] = ga[2] - gb[2];
        filter_bwd_SUF(F3, Kp, WfT, gw, gphi + u * Kp);
        if (gWf) {
            for (int64_t kk = 0; kk < K; ++kk) {
                REAL* restrict gwk = gWf + kk * F3;
                const REAL c = phiu[kk];
                #pragma omp simd
                for (int64_t f = 0; f < F3; ++f) gwk[f] += c * gw[f];
            }
        }
    }
}

/* Drivers: pairs split into equal contiguous ranges, one per thread; thread t writes its own slice
   of the [T, ...] output buffers. With OpenMP this runs in the process's OpenMP pool (the one
   PyTorch uses when it ships libgomp), without it the caller passes T = 1 per call. */
void painn_fwd_SUF(int64_t P, int64_t T, int64_t N, const int64_t* A, const int64_t* B, int64_t F,
                   int64_t K, const REAL* phi, const REAL* Wf, const REAL* dir, const REAL* x,
                   const REAL* v, REAL* ds, REAL* dv)
{
    #pragma omp parallel num_threads(T)
    {
        int64_t t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        fwd_range_SUF(P * t / nt, P * (t + 1) / nt, A, B, F, K, phi, Wf, dir, x, v,
                      ds + t * N * F, dv + t * N * 3 * F);
    }
}

void painn_bwd_SUF(int64_t P, int64_t T, int64_t N, const int64_t* A, const int64_t* B, int64_t F,
                   int64_t K, int64_t Kp, const REAL* phi, const REAL* Wf, const REAL* WfT,
                   const REAL* dir, const REAL* x, const REAL* v, const REAL* gds, const REAL* gdv,
                   REAL* gphi, REAL* gdir, REAL* gx, REAL* gv, REAL* gWf)
{
    #pragma omp parallel num_threads(T)
    {
        int64_t t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        bwd_range_SUF(P * t / nt, P * (t + 1) / nt, A, B, F, K, Kp, phi, Wf, WfT, dir, x, v, gds, gdv,
                      gphi, gdir, gx + t * N * 3 * F, v ? gv + t * N * 3 * F : 0,
                      gWf ? gWf + t * K * 3 * F : 0);
    }
}
"""


def _kernel_source() -> str:
    body = [_KERNEL_TEMPLATE.replace("SUF", suf).replace("REAL", c) for suf, c in (("f32", "float"), ("f64", "double"))]
    return "#include <stdint.h>\n#ifdef _OPENMP\n#include <omp.h>\n#endif\n" + "\n".join(body)


class _Kernels:
    """The compiled fused kernels (float32 and float64 entry points)."""

    _I, _P = ctypes.c_int64, ctypes.c_void_p
    _SIG_FWD = [_I, _I, _I, _P, _P, _I, _I] + [_P] * 7
    _SIG_BWD = [_I, _I, _I, _P, _P, _I, _I, _I] + [_P] * 13

    def __init__(self, lib: ctypes.CDLL, openmp: bool) -> None:
        self.lib = lib
        self.openmp = openmp  # False: compiled without OpenMP, kernels run on the calling thread
        self.fwd = {}
        self.bwd = {}
        for dtype, suf in ((torch.float32, "f32"), (torch.float64, "f64")):
            f = getattr(lib, f"painn_fwd_{suf}")
            f.argtypes, f.restype = self._SIG_FWD, None
            b = getattr(lib, f"painn_bwd_{suf}")
            b.argtypes, b.restype = self._SIG_BWD, None
            self.fwd[dtype], self.bwd[dtype] = f, b

    def n_threads(self) -> int:
        if not self.openmp:
            return 1
        env = os.environ.get("SURFDIFF_KERNEL_THREADS")
        return max(1, int(env) if env else torch.get_num_threads())


_KERNELS: _Kernels | None = None
_KERNELS_TRIED = False
_KERNELS_LOCK = threading.Lock()


def _build(cc: str, flags: list[str], src: str, lib_path: Path) -> None:
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
        c_file = Path(tmp) / "painn.c"
        c_file.write_text(src)
        out = Path(tmp) / "painn.so"
        subprocess.run([cc, *flags, str(c_file), "-o", str(out)], check=True, capture_output=True)
        os.replace(out, lib_path)  # atomic: concurrent processes never load a partial file


def _compile_kernels() -> _Kernels | None:
    if os.environ.get("SURFDIFF_NO_KERNELS", "") not in ("", "0"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    src = _kernel_source()
    base_flags = ["-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-std=gnu11"]
    # -march=native: the cache key includes the machine so a shared cache never serves foreign code
    try:  # stable identity of the CPU (not "cpu MHz" and the like, which change between runs)
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
        cpu = "\n".join(ln for ln in first if ln.split(":")[0].strip() in ("vendor_id", "model name", "flags"))
    except OSError:
        cpu = ""
    # $SURFDIFF_KERNEL_DIR, else <$SURFDIFF_CACHE_DIR or ~/.cache/surfdiff>/kernels
    base = Path(os.environ.get("SURFDIFF_CACHE_DIR") or Path.home() / ".cache" / "surfdiff")
    cache = Path(os.environ.get("SURFDIFF_KERNEL_DIR") or base / "kernels")
    # OpenMP first: the library then binds to the libgomp PyTorch already loaded (same soname), so
    # kernels and torch ops share one thread pool instead of oversubscribing the cores
    for openmp in (True, False):
        flags = [*base_flags, "-fopenmp"] if openmp else base_flags
        key = hashlib.sha1("\n".join([src, cc, *flags, platform.machine(), cpu]).encode()).hexdigest()[:16]
        lib_path = cache / f"painn_{key}.so"
        try:
            if not lib_path.exists():
                _build(cc, flags, src, lib_path)
            return _Kernels(ctypes.CDLL(str(lib_path)), openmp)
        except (OSError, subprocess.CalledProcessError):
            continue
    return None


def _get_kernels() -> _Kernels | None:
    global _KERNELS, _KERNELS_TRIED
    if not _KERNELS_TRIED:
        with _KERNELS_LOCK:
            if not _KERNELS_TRIED:
                _KERNELS = _compile_kernels()
                _KERNELS_TRIED = True
    return _KERNELS


def fused_kernels_available() -> bool:
    """True when the fused CPU message kernels compiled (they are built on first use)."""
    return _get_kernels() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _Pairs:
    """Undirected pairs (a, b) for the kernels and the number of threads (output buffers) to use."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, n_threads: int) -> None:
        self.a = a.contiguous()
        self.b = b.contiguous()
        self.n = int(a.shape[0])
        self.n_threads = n_threads


class _FusedMessages(torch.autograd.Function):
    """(phi [P,K], Wf [K,3F], dir [P,3], x [N,3F], v [N,3,F] | None) -> (ds [N,F], dv [N,3,F])

    over undirected pairs, each pair sending messages both ways."""

    @staticmethod
    def forward(ctx, phi, weight, dir_ij, x, v, pairs, kernels):  # type: ignore[override]
        phi, weight, dir_ij, x = phi.contiguous(), weight.contiguous(), dir_ij.contiguous(), x.contiguous()
        v = None if v is None else v.contiguous()
        n, f3 = x.shape
        nf, n_k, n_t = f3 // 3, phi.shape[1], pairs.n_threads
        ds = x.new_zeros(n_t, n, nf)
        dv = x.new_zeros(n_t, n, 3, nf)
        kernels.fwd[x.dtype](
            pairs.n, n_t, n, pairs.a.data_ptr(), pairs.b.data_ptr(), nf, n_k, phi.data_ptr(), weight.data_ptr(),
            dir_ij.data_ptr(), x.data_ptr(), _ptr(v), ds.data_ptr(), dv.data_ptr(),
        )  # fmt: skip
        ctx.save_for_backward(phi, weight, dir_ij, x, v)
        ctx.pairs, ctx.kernels = pairs, kernels
        return (ds.sum(0), dv.sum(0)) if n_t > 1 else (ds[0], dv[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, g_ds, g_dv):  # type: ignore[override]
        phi, weight, dir_ij, x, v = ctx.saved_tensors
        pairs, kernels = ctx.pairs, ctx.kernels
        g_ds, g_dv = g_ds.contiguous(), g_dv.contiguous()
        n, f3 = x.shape
        n_pairs, n_k = phi.shape
        n_t = pairs.n_threads
        vl = 64 // x.element_size()
        n_kp = -(-n_k // vl) * vl
        weight_t = torch.nn.functional.pad(weight.t(), (0, n_kp - n_k)).contiguous()  # [3F, Kp]
        g_phi = x.new_empty(n_pairs, n_kp)
        g_dir = x.new_empty(n_pairs, 3)
        g_x = x.new_zeros(n_t, n, f3)
        g_v = x.new_zeros(n_t, n, f3) if v is not None else None
        # the weight gradient costs as much as the filter itself: only when someone wants it
        g_wf = x.new_zeros(n_t, n_k, f3) if ctx.needs_input_grad[1] else None
        kernels.bwd[x.dtype](
            pairs.n, n_t, n, pairs.a.data_ptr(), pairs.b.data_ptr(), f3 // 3, n_k, n_kp, phi.data_ptr(),
            weight.data_ptr(), weight_t.data_ptr(), dir_ij.data_ptr(), x.data_ptr(), _ptr(v), g_ds.data_ptr(),
            g_dv.data_ptr(), g_phi.data_ptr(), g_dir.data_ptr(), g_x.data_ptr(), _ptr(g_v), _ptr(g_wf),
        )  # fmt: skip

        def reduce(buf: torch.Tensor | None) -> torch.Tensor | None:
            return None if buf is None else (buf.sum(0) if n_t > 1 else buf[0])

        g_v_out = reduce(g_v)
        g_v_out = None if g_v_out is None else g_v_out.view(n, 3, f3 // 3)
        return g_phi[:, :n_k], reduce(g_wf), g_dir, reduce(g_x), g_v_out, None, None


def full_to_half(
    i: torch.Tensor, j: torch.Tensor, vectors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep one direction of every pair of a full list: i < j, and for an atom paired with its own
    periodic image, the image whose vector is lexicographically positive."""
    vec = vectors.detach()
    positive = (vec[:, 0] > 0) | ((vec[:, 0] == 0) & ((vec[:, 1] > 0) | ((vec[:, 1] == 0) & (vec[:, 2] > 0))))
    keep = (i < j) | ((i == j) & positive)
    return i[keep], j[keep], vectors[keep]


def half_to_full(
    i: torch.Tensor, j: torch.Tensor, vectors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both directions of every pair of a half list."""
    return torch.cat([i, j]), torch.cat([j, i]), torch.cat([vectors, -vectors])


# ----------------------------------------------------------------------------------------------
# PaiNN modules
# ----------------------------------------------------------------------------------------------


class PaiNNInteraction(nn.Module):
    """Equivariant message passing (PaiNN eqs. 7-8): atom-wise context net x_j = phi(s_j) and

    ds_i = sum_j W^s_ij * x^s_j
    dv_i = sum_j W^r_ij * x^r_j * r_hat_ij  +  W^v_ij * x^v_j * v_j
    """

    def __init__(self, n_features: int, activation: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.n_features = n_features
        self.context = nn.Sequential(
            nn.Linear(n_features, n_features), activation(), nn.Linear(n_features, 3 * n_features)
        )

    def forward(
        self,
        s: torch.Tensor,  # [N, F]
        v: torch.Tensor | None,  # [N, 3, F]; None stands for zeros (first interaction)
        filters: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        dir_ij: torch.Tensor,  # [P, 3] unit vectors i -> j
        i: torch.Tensor,
        j: torch.Tensor,
        pairs: _Pairs | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager path: full pair list (i, j) and filters [P, 3F] (already cut off). Fused CPU path
        (`pairs` given): undirected pairs, filters = (phi [P, K], Wf [K, 3F]) from which the kernel
        builds them on the fly."""
        x = self.context(s)  # [N, 3F] = (x^s, x^r, x^v)
        if pairs is not None:
            kernels = _get_kernels()
            assert kernels is not None and isinstance(filters, tuple)
            phi, weight = filters
            ds, dv = _FusedMessages.apply(phi, weight, dir_ij, x, v, pairs, kernels)
        else:
            assert isinstance(filters, torch.Tensor)
            ds, dv = self._messages(s.shape[0], x, v, filters, dir_ij, i, j)
        return s + ds, (dv if v is None else v + dv)

    def _messages(self, n_atoms, x, v, filters, dir_ij, i, j):  # eager reference implementation
        nf = self.n_features
        # split() rather than slicing: a slice's backward allocates and zero-fills the whole input
        x_sr, x_v = x.split([2 * nf, nf], dim=1)
        w_sr, w_v = filters.split([2 * nf, nf], dim=1)
        if v is None:
            m_s, m_r = (w_sr * x_sr.index_select(0, j)).split(nf, dim=1)
            m_vec = m_r[:, None, :] * dir_ij[:, :, None]  # [P, 3, F]
        else:
            # x^v_j * v_j per atom before the gather: the gathered tensor has the same size either way
            node = torch.cat([x_sr, (x_v[:, None, :] * v).reshape(n_atoms, 3 * nf)], dim=1)
            g_sr, g_v = node.index_select(0, j).split([2 * nf, 3 * nf], dim=1)
            m_s, m_r = (w_sr * g_sr).split(nf, dim=1)
            m_vec = torch.addcmul(w_v[:, None, :] * g_v.view(-1, 3, nf), m_r[:, None, :], dir_ij[:, :, None])
        ds = x.new_zeros(n_atoms, nf).index_add_(0, i, m_s)
        dv = x.new_zeros(n_atoms, 3, nf).index_add_(0, i, m_vec)
        return ds, dv


class PaiNNMixing(nn.Module):
    """Atom-wise update (PaiNN eqs. 9-11) coupling scalars and vector norms / inner products."""

    def __init__(self, n_features: int, activation: type[nn.Module] = nn.SiLU, epsilon: float = 1e-8) -> None:
        super().__init__()
        self.n_features = n_features
        self.epsilon = epsilon
        self.vector_mix = nn.Linear(n_features, 2 * n_features, bias=False)
        self.update = nn.Sequential(
            nn.Linear(2 * n_features, n_features), activation(), nn.Linear(n_features, 3 * n_features)
        )

    def forward(self, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nf = self.n_features
        u, w = self.vector_mix(v).split(nf, dim=-1)  # [N, 3, F] each
        u_norm = torch.sqrt(u.square().sum(dim=1) + self.epsilon)  # eps: smooth gradient at u = 0
        a_vv, a_sv, a_ss = self.update(torch.cat([s, u_norm], dim=-1)).split(nf, dim=-1)
        v = v + a_vv[:, None, :] * w
        s = s + a_ss + a_sv * (u * w).sum(dim=1)
        return s, v


class PaiNN(nn.Module):
    """PaiNN representation: (numbers, pair vectors, pair indices) -> scalar s [N, F], vector v [N, 3, F].

    `radial_basis` (needs an `n_rbf` attribute) and `cutoff_fn` are injected, schnetpack style;
    `numbers` are atomic numbers (embedding rows up to `max_z`). The pair list must be a full list
    (i->j and j->i) or, with `half_list=True`, one entry per pair.
    """

    def __init__(
        self,
        n_features: int = 64,
        n_interactions: int = 4,
        radial_basis: nn.Module | None = None,
        cutoff_fn: nn.Module | None = None,
        max_z: int = 100,
        activation: type[nn.Module] = nn.SiLU,
        shared_interactions: bool = False,
        epsilon: float = 1e-8,
    ) -> None:
        super().__init__()
        self.radial_basis = radial_basis if radial_basis is not None else GaussianRBF(30, 6.0)
        self.cutoff_fn = cutoff_fn if cutoff_fn is not None else CosineCutoff(6.0)
        self.n_features = n_features
        self.n_interactions = n_interactions
        self.shared_interactions = shared_interactions
        self.n_blocks = 1 if shared_interactions else n_interactions
        self.embedding = nn.Embedding(max_z + 1, n_features, padding_idx=0)
        n_rbf = int(self.radial_basis.n_rbf)
        # one Linear holds every interaction's filter weights; the last input column (fcut) acts as
        # the bias, zero-initialised like schnetpack's Dense bias
        self.filter_net = nn.Linear(n_rbf + 1, self.n_blocks * 3 * n_features, bias=False)
        with torch.no_grad():
            self.filter_net.weight[:, -1].zero_()
        self.interactions = nn.ModuleList(PaiNNInteraction(n_features, activation) for _ in range(self.n_blocks))
        self.mixing = nn.ModuleList(PaiNNMixing(n_features, activation, epsilon) for _ in range(self.n_blocks))
        self.fused: bool = True  # allow the fused CPU kernels where they apply

    def forward(
        self,
        numbers: torch.Tensor,
        vectors: torch.Tensor,
        i: torch.Tensor,
        j: torch.Tensor,
        n_atoms: int,
        *,
        half_list: bool = False,
        fused: bool | None = None,
        param_grads: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs: a full list (i->j and j->i, r_ij = vectors), or with half_list=True each pair once
        (messages then go both ways; `neighbor_list(..., half=True)`), which halves the filter work.

        fused: None = use the fused CPU kernels when possible (CPU, float32/64, compiler present,
        `self.fused`); False = eager PyTorch (required for double backward, e.g. training on forces).
        param_grads=False: the caller only differentiates with respect to positions (sampling forces,
        relaxations), so the fused backward skips the filter-weight gradient.
        """
        if numbers.shape[0] != n_atoms:
            raise ValueError(f"numbers has {numbers.shape[0]} atoms, expected {n_atoms}")
        use_fused = bool(
            (self.fused if fused is None else fused)
            and vectors.device.type == "cpu"
            and vectors.dtype in (torch.float32, torch.float64)
        )
        kernels = _get_kernels() if use_fused else None
        pairs = None
        if kernels is not None:
            if not half_list:
                i, j, vectors = full_to_half(i, j, vectors)
            pairs = _Pairs(i, j, kernels.n_threads())
        elif half_list:
            i, j, vectors = half_to_full(i, j, vectors)

        d = torch.linalg.vector_norm(vectors, dim=-1)
        dir_ij = vectors / d.clamp_min(1e-9)[:, None]
        fcut = self.cutoff_fn(d)[:, None]
        phi = torch.cat([self.radial_basis(d) * fcut, fcut], dim=-1)  # [P, K]
        nf3 = 3 * self.n_features
        filters: list
        if pairs is None:
            filters = list(self.filter_net(phi).split(nf3, dim=1))
        else:
            weight = self.filter_net.weight if param_grads else self.filter_net.weight.detach()
            filters = [(phi, weight[b * nf3 : (b + 1) * nf3].t().contiguous()) for b in range(self.n_blocks)]

        s = self.embedding(numbers)
        v: torch.Tensor | None = None
        for k in range(self.n_interactions):
            b = 0 if self.shared_interactions else k
            s, v = self.interactions[b](s, v, filters[b], dir_ij, i, j, pairs)
            s, v = self.mixing[b](s, v)
        if v is None:  # n_interactions == 0
            v = s.new_zeros(n_atoms, 3, self.n_features)
        return s, v
