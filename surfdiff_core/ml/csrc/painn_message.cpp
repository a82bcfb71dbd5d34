// PaiNN message passing over undirected pairs as PyTorch operators (CPU):
//
//   surfdiff::painn_messages(phi, weight, direction, x, v, pair_a, pair_b) -> (ds, dv)
//   surfdiff::painn_messages_backward(grad_ds, grad_dv, phi, weight, direction, x, v, pair_a, pair_b,
//                                     weight_grad) -> (grad_phi, grad_weight, grad_direction, grad_x, grad_v)
//
// Pair u = (a, b), d_u the unit vector a -> b. Its filter w_u = phi_u weight (phi [P, K], weight [K, 3F])
// is built once, in registers, and used for both messages a <- b and b <- a (t <- s, sign +1 / -1):
//   ds_t   += w^s x^s_s
//   dv_t,c += sign w^r x^r_s d_c + w^v x^v_s v_s,c
// x [N, 3F] = (x^s, x^r, x^v), v [N, 3, F] or None (zeros: first interaction). Nothing of size [P, 3F]
// is stored; the backward recomputes the filter. Autograd (including double backward) is registered in
// Python (surfdiff_core/ml/message_op.py) in terms of these two operators.
//
// Threads: the pairs are cut into one contiguous chunk per intra-op thread (at::parallel_for). Each
// chunk scatters into its own buffer covering only the atoms it touches (pairs come sorted by structure,
// so these windows hardly overlap), and a second parallel pass adds the windows up: no atomics, and the
// extra memory and reduction work stay O(N), not O(threads x N).

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace surfdiff {
namespace {

// Vectors as wide as the widest registers of the instruction set built for. A GCC vector type wider than
// the hardware's is lowered piecewise through memory: 64-byte vectors ran 6x slower on AVX2-only CPUs
// (AMD EPYC Zen 2/3) than 32-byte ones.
#if defined(__AVX512F__)
#define SURFDIFF_VECTOR_BYTES 64
#elif defined(__AVX__)
#define SURFDIFF_VECTOR_BYTES 32
#else
#define SURFDIFF_VECTOR_BYTES 16
#endif
constexpr int64_t kVectorBytes = SURFDIFF_VECTOR_BYTES;
constexpr int kVectorRegisters = kVectorBytes == 64 ? 32 : 16;  // architectural registers (x86-64)

template <typename T>
struct Simd;
// element alignment only: loads from any row offset are allowed
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(SURFDIFF_VECTOR_BYTES), aligned(4)));
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(SURFDIFF_VECTOR_BYTES), aligned(8)));
};
template <typename T>
constexpr int64_t kLanes = kVectorBytes / sizeof(T);

// Gaussian radial features far from their centre are tiny (float32: down to 1e-45). Their products with
// the weights are subnormal, which x86 computes at a small fraction of normal speed, and they cannot
// change a sum of normal-sized terms: skip features below sqrt(smallest normal) (float32 1e-19, float64
// 1e-154; a skipped term is at most that times a weight). NaN is never skipped.
template <typename T>
inline bool negligible(T c) {
  static const T threshold = std::sqrt(std::numeric_limits<T>::min());
  return std::abs(c) < threshold;
}

// w = phi weight for one pair: blocks of four vectors accumulated in registers over K
template <typename T>
inline void build_filter(int64_t K, int64_t F3, const T* __restrict__ phi, const T* __restrict__ weight,
                         T* __restrict__ w) {
  using V = typename Simd<T>::type;
  constexpr int64_t L = kLanes<T>;
  int64_t f0 = 0;
  for (; f0 + 4 * L <= F3; f0 += 4 * L) {
    V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (int64_t k = 0; k < K; ++k) {
      const T c = phi[k];
      if (negligible(c)) continue;
      const V* wk = reinterpret_cast<const V*>(weight + k * F3 + f0);
      a0 += c * wk[0];
      a1 += c * wk[1];
      a2 += c * wk[2];
      a3 += c * wk[3];
    }
    V* out = reinterpret_cast<V*>(w + f0);
    out[0] = a0;
    out[1] = a1;
    out[2] = a2;
    out[3] = a3;
  }
  for (int64_t f = f0; f < F3; ++f) w[f] = 0;
  for (int64_t k = 0; k < K; ++k)
    if (!negligible(phi[k]))
      for (int64_t f = f0; f < F3; ++f) w[f] += phi[k] * weight[k * F3 + f];
}

// gphi = weight gw for one pair from weight_t [F3, NV * L] (transposed, K zero-padded): broadcasts of
// gw[f] against rows, Q interleaved partial sums, no horizontal reductions. Q x NV accumulators take at
// most half the vector registers, so that nothing spills to the stack in the inner loop.
template <typename T, int NV>
inline void filter_grad_fixed(int64_t F3, const T* __restrict__ weight_t, const T* __restrict__ gw,
                              T* __restrict__ gphi) {
  using V = typename Simd<T>::type;
  constexpr int64_t L = kLanes<T>;
  constexpr int Q = std::max(1, std::min(4, kVectorRegisters / 2 / NV));
  V acc[Q][NV];
  for (int q = 0; q < Q; ++q)
    for (int r = 0; r < NV; ++r) acc[q][r] = V{0};
  int64_t f = 0;
  for (; f + Q <= F3; f += Q)
    for (int q = 0; q < Q; ++q) {
      const T g = gw[f + q];
      const V* row = reinterpret_cast<const V*>(weight_t + (f + q) * NV * L);
      for (int r = 0; r < NV; ++r) acc[q][r] += g * row[r];
    }
  for (; f < F3; ++f) {
    const T g = gw[f];
    const V* row = reinterpret_cast<const V*>(weight_t + f * NV * L);
    for (int r = 0; r < NV; ++r) acc[0][r] += g * row[r];
  }
  for (int q = 1; q < Q; ++q)
    for (int r = 0; r < NV; ++r) acc[0][r] += acc[q][r];
  V* out = reinterpret_cast<V*>(gphi);
  for (int r = 0; r < NV; ++r) out[r] = acc[0][r];
}

template <typename T>
inline void filter_grad(int64_t F3, int64_t Kp, const T* __restrict__ weight_t, const T* __restrict__ gw,
                        T* __restrict__ gphi) {
  switch (Kp / kLanes<T>) {
    case 1: return filter_grad_fixed<T, 1>(F3, weight_t, gw, gphi);
    case 2: return filter_grad_fixed<T, 2>(F3, weight_t, gw, gphi);
    case 3: return filter_grad_fixed<T, 3>(F3, weight_t, gw, gphi);
    case 4: return filter_grad_fixed<T, 4>(F3, weight_t, gw, gphi);
    case 5: return filter_grad_fixed<T, 5>(F3, weight_t, gw, gphi);
    case 6: return filter_grad_fixed<T, 6>(F3, weight_t, gw, gphi);
    case 7: return filter_grad_fixed<T, 7>(F3, weight_t, gw, gphi);
    case 8: return filter_grad_fixed<T, 8>(F3, weight_t, gw, gphi);
    default:
      for (int64_t k = 0; k < Kp; ++k) gphi[k] = 0;
      for (int64_t f = 0; f < F3; ++f) {
        const T g = gw[f];
#pragma omp simd
        for (int64_t k = 0; k < Kp; ++k) gphi[k] += g * weight_t[f * Kp + k];
      }
  }
}

// message t <- s
template <typename T>
inline void send(int64_t F, const T* __restrict__ w, const T* __restrict__ xs, const T* __restrict__ vs,
                 T d0, T d1, T d2, T* __restrict__ st, T* __restrict__ vt) {
  T* __restrict__ t0 = vt;
  T* __restrict__ t1 = vt + F;
  T* __restrict__ t2 = vt + 2 * F;
  if (vs) {
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      st[f] += w[f] * xs[f];
      const T r = w[F + f] * xs[F + f];
      const T q = w[2 * F + f] * xs[2 * F + f];
      t0[f] += r * d0 + q * vs[f];
      t1[f] += r * d1 + q * vs[F + f];
      t2[f] += r * d2 + q * vs[2 * F + f];
    }
  } else {
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      st[f] += w[f] * xs[f];
      const T r = w[F + f] * xs[F + f];
      t0[f] += r * d0;
      t1[f] += r * d1;
      t2[f] += r * d2;
    }
  }
}

// backward of message t <- s: accumulates gw and the source's gx / gv, returns the direction gradient
template <typename T>
inline void send_grad(int64_t F, const T* __restrict__ w, const T* __restrict__ xs, const T* __restrict__ vs,
                      T d0, T d1, T d2, const T* __restrict__ gst, const T* __restrict__ gvt, T* __restrict__ gw,
                      T* __restrict__ gxs, T* __restrict__ gvs, T* gd) {
  const T* __restrict__ g0 = gvt;
  const T* __restrict__ g1 = gvt + F;
  const T* __restrict__ g2 = gvt + 2 * F;
  T s0 = 0, s1 = 0, s2 = 0;
  if (vs) {
#pragma omp simd reduction(+ : s0, s1, s2)
    for (int64_t f = 0; f < F; ++f) {
      gw[f] += gst[f] * xs[f];
      gxs[f] += w[f] * gst[f];
      const T t = g0[f] * d0 + g1[f] * d1 + g2[f] * d2;
      gw[F + f] += t * xs[F + f];
      gxs[F + f] += w[F + f] * t;
      const T r = w[F + f] * xs[F + f];
      s0 += r * g0[f];
      s1 += r * g1[f];
      s2 += r * g2[f];
      const T q = g0[f] * vs[f] + g1[f] * vs[F + f] + g2[f] * vs[2 * F + f];
      gw[2 * F + f] += q * xs[2 * F + f];
      gxs[2 * F + f] += w[2 * F + f] * q;
      const T b = w[2 * F + f] * xs[2 * F + f];
      gvs[f] += b * g0[f];
      gvs[F + f] += b * g1[f];
      gvs[2 * F + f] += b * g2[f];
    }
  } else {
#pragma omp simd reduction(+ : s0, s1, s2)
    for (int64_t f = 0; f < F; ++f) {
      gw[f] += gst[f] * xs[f];
      gxs[f] += w[f] * gst[f];
      const T t = g0[f] * d0 + g1[f] * d1 + g2[f] * d2;
      gw[F + f] += t * xs[F + f];
      gxs[F + f] += w[F + f] * t;
      const T r = w[F + f] * xs[F + f];
      s0 += r * g0[f];
      s1 += r * g1[f];
      s2 += r * g2[f];
    }
  }
  gd[0] = s0;
  gd[1] = s1;
  gd[2] = s2;
}

// g_weight += phi_u (outer) gw: the weight gradient of one pair
template <typename T>
inline void add_outer(int64_t K, int64_t F3, const T* __restrict__ phi, const T* __restrict__ gw,
                      T* __restrict__ g_weight) {
  for (int64_t k = 0; k < K; ++k) {
    T* __restrict__ row = g_weight + k * F3;
    const T coef = phi[k];
    if (negligible(coef)) continue;
#pragma omp simd
    for (int64_t f = 0; f < F3; ++f) row[f] += coef * gw[f];
  }
}

// Pairs [begin[c], begin[c + 1]) form chunk c; it touches atoms [lo[c], hi[c]) and owns the buffer rows
// [row[c], row[c + 1]) (hi - lo rows).
struct Chunks {
  std::vector<int64_t> begin, lo, hi, row;
  int64_t size() const { return static_cast<int64_t>(lo.size()); }
};

Chunks split_pairs(const int64_t* a, const int64_t* b, int64_t P, int64_t N) {
  constexpr int64_t kMinPairs = 64;  // below this a chunk costs more to reduce than it saves
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P / kMinPairs));
  Chunks c;
  c.begin.resize(n + 1);
  c.lo.assign(n, 0);
  c.hi.assign(n, 0);
  for (int64_t i = 0; i <= n; ++i) c.begin[i] = P * i / n;
  // one serial pass (a few loads per pair): cheaper than another parallel region
  bool out_of_range = false;
  for (int64_t k = 0; k < n; ++k) {
    int64_t lo = N, hi = 0;
    for (int64_t u = c.begin[k]; u < c.begin[k + 1]; ++u) {
      lo = std::min({lo, a[u], b[u]});
      hi = std::max({hi, a[u] + 1, b[u] + 1});
    }
    out_of_range = out_of_range || lo < 0 || hi > N;
    c.lo[k] = std::min(lo, hi);
    c.hi[k] = hi;
  }
  TORCH_CHECK(!out_of_range, "painn_messages: pair_a / pair_b hold atom indices outside [0, ", N, ")");
  c.row.assign(n + 1, 0);
  for (int64_t k = 0; k < n; ++k) c.row[k + 1] = c.row[k] + (c.hi[k] - c.lo[k]);
  return c;
}

template <typename T>
inline void accumulate(const T* __restrict__ src, T* __restrict__ dst, int64_t width) {
#pragma omp simd
  for (int64_t f = 0; f < width; ++f) dst[f] += src[f];
}

// Buffer rows hold (out1 [width1], out2 [width2]) side by side: out[atom] = sum over the chunks whose
// window holds the atom of their row (out2 may be null). One parallel pass over atoms.
template <typename T>
void add_windows(const Chunks& c, const T* buf, int64_t N, T* out1, int64_t width1, T* out2, int64_t width2) {
  const int64_t stride = width1 + (out2 ? width2 : 0);
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    std::fill(out1 + n0 * width1, out1 + n1 * width1, T(0));
    if (out2) std::fill(out2 + n0 * width2, out2 + n1 * width2, T(0));
    for (int64_t k = 0; k < c.size(); ++k) {
      const int64_t start = std::max(n0, c.lo[k]), stop = std::min(n1, c.hi[k]);
      for (int64_t n = start; n < stop; ++n) {
        const T* src = buf + (c.row[k] + n - c.lo[k]) * stride;
        accumulate(src, out1 + n * width1, width1);
        if (out2) accumulate(src + width1, out2 + n * width2, width2);
      }
    }
  });
}

int64_t padded(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

void check_inputs(const char* op, const at::Tensor& phi, const at::Tensor& weight, const at::Tensor& direction,
                  const at::Tensor& x, const c10::optional<at::Tensor>& v, const at::Tensor& pair_a,
                  const at::Tensor& pair_b) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": x must be float32 or float64, got ", dtype);
  std::vector<std::pair<const char*, const at::Tensor*>> reals = {
      {"phi", &phi}, {"weight", &weight}, {"direction", &direction}, {"x", &x}};
  if (v) reals.emplace_back("v", &*v);
  for (const auto& [name, t] : reals) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->scalar_type() == dtype, op, ": ", name, " has dtype ", t->scalar_type(), ", x has ", dtype);
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous())");
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"pair_a", &pair_a}, {"pair_b", &pair_b}}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous())");
  }
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 3 == 0, op, ": x must be [N, 3F], got ", x.sizes());
  const int64_t N = x.size(0), F = x.size(1) / 3, P = phi.size(0);
  TORCH_CHECK(phi.dim() == 2, op, ": phi must be [P, K], got ", phi.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == phi.size(1) && weight.size(1) == 3 * F, op,
              ": weight must be [K, 3F] = [", phi.size(1), ", ", 3 * F, "], got ", weight.sizes());
  TORCH_CHECK(direction.dim() == 2 && direction.size(0) == P && direction.size(1) == 3, op,
              ": direction must be [P, 3] = [", P, ", 3], got ", direction.sizes());
  TORCH_CHECK(!v || (v->dim() == 3 && v->size(0) == N && v->size(1) == 3 && v->size(2) == F), op,
              ": v must be [N, 3, F] = [", N, ", 3, ", F, "], got ", v ? v->sizes() : x.sizes());
  TORCH_CHECK(pair_a.dim() == 1 && pair_a.size(0) == P && pair_b.dim() == 1 && pair_b.size(0) == P, op,
              ": pair_a and pair_b must be [P] = [", P, "], got ", pair_a.sizes(), " and ", pair_b.sizes());
}

std::tuple<at::Tensor, at::Tensor> painn_messages(const at::Tensor& phi, const at::Tensor& weight,
                                                  const at::Tensor& direction, const at::Tensor& x,
                                                  const c10::optional<at::Tensor>& v, const at::Tensor& pair_a,
                                                  const at::Tensor& pair_b) {
  check_inputs("painn_messages", phi, weight, direction, x, v, pair_a, pair_b);
  const int64_t N = x.size(0), F = x.size(1) / 3, F3 = 3 * F, K = phi.size(1), P = phi.size(0);
  auto ds = at::empty({N, F}, x.options());
  auto dv = at::empty({N, 3, F}, x.options());
  const int64_t* a = pair_a.data_ptr<int64_t>();
  const int64_t* b = pair_b.data_ptr<int64_t>();
  const Chunks chunks = split_pairs(a, b, P, N);
  const int64_t stride = 4 * F;  // buffer row: (ds, dv)
  auto buf = at::zeros({chunks.row.back(), stride}, x.options());
  auto scratch = at::empty({chunks.size(), padded(F3, 16)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "painn_messages", [&] {
    using T = scalar_t;
    const T* phi_p = phi.data_ptr<T>();
    const T* wt_p = weight.data_ptr<T>();
    const T* dir_p = direction.data_ptr<T>();
    const T* x_p = x.data_ptr<T>();
    const T* v_p = v ? v->data_ptr<T>() : nullptr;
    T* buf_p = buf.data_ptr<T>();
    at::parallel_for(0, chunks.size(), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        T* w = scratch.data_ptr<T>() + c * scratch.size(1);
        T* rows = buf_p + (chunks.row[c] - chunks.lo[c]) * stride;  // indexed by atom
        for (int64_t u = chunks.begin[c]; u < chunks.begin[c + 1]; ++u) {
          const int64_t ia = a[u], ib = b[u];
          build_filter<T>(K, F3, phi_p + u * K, wt_p, w);
          const T d0 = dir_p[3 * u], d1 = dir_p[3 * u + 1], d2 = dir_p[3 * u + 2];
          send<T>(F, w, x_p + ib * F3, v_p ? v_p + ib * F3 : nullptr, d0, d1, d2, rows + ia * stride,
                  rows + ia * stride + F);
          send<T>(F, w, x_p + ia * F3, v_p ? v_p + ia * F3 : nullptr, -d0, -d1, -d2, rows + ib * stride,
                  rows + ib * stride + F);
        }
      }
    });
    add_windows<T>(chunks, buf_p, N, ds.data_ptr<T>(), F, dv.data_ptr<T>(), F3);
  });
  return {ds, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> painn_messages_backward(
    const at::Tensor& grad_ds, const at::Tensor& grad_dv, const at::Tensor& phi, const at::Tensor& weight,
    const at::Tensor& direction, const at::Tensor& x, const c10::optional<at::Tensor>& v, const at::Tensor& pair_a,
    const at::Tensor& pair_b, bool weight_grad) {
  const char* op = "painn_messages_backward";
  check_inputs(op, phi, weight, direction, x, v, pair_a, pair_b);
  const int64_t N = x.size(0), F = x.size(1) / 3, F3 = 3 * F, K = phi.size(1), P = phi.size(0);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_ds", &grad_ds}, {"grad_dv", &grad_dv}}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x.scalar_type() && t->is_contiguous(), op, ": ", name,
                " must be a contiguous CPU tensor of dtype ", x.scalar_type());
  }
  TORCH_CHECK(grad_ds.numel() == N * F && grad_dv.numel() == N * F3, op, ": grad_ds / grad_dv must be [N, F] / [N, 3, F]",
              " with N = ", N, ", F = ", F);
  const int64_t Kp = padded(K, kVectorBytes / static_cast<int64_t>(x.element_size()));
  // transposed weights, K zero-padded to whole vectors, for the per-pair filter gradient
  auto weight_t = at::zeros({F3, Kp}, x.options());
  weight_t.narrow(1, 0, K).copy_(weight.t());
  auto g_phi = at::empty({P, K}, x.options());
  auto g_dir = at::empty({P, 3}, x.options());
  auto g_x = at::empty({N, F3}, x.options());
  auto g_v = v ? at::empty({N, 3, F}, x.options()) : at::empty({0}, x.options());
  const int64_t* a = pair_a.data_ptr<int64_t>();
  const int64_t* b = pair_b.data_ptr<int64_t>();
  const Chunks chunks = split_pairs(a, b, P, N);
  const int64_t stride = v ? 2 * F3 : F3;  // buffer row: (gx, gv)
  auto buf = at::zeros({chunks.row.back(), stride}, x.options());
  auto g_weight_chunks = at::zeros({weight_grad ? chunks.size() : 0, K, F3}, x.options());
  const int64_t scratch_width = 2 * padded(F3, 16) + Kp;  // w, gw, gphi
  auto scratch = at::empty({chunks.size(), scratch_width}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "painn_messages_backward", [&] {
    using T = scalar_t;
    const T* phi_p = phi.data_ptr<T>();
    const T* wt_p = weight.data_ptr<T>();
    const T* wtt_p = weight_t.data_ptr<T>();
    const T* dir_p = direction.data_ptr<T>();
    const T* x_p = x.data_ptr<T>();
    const T* v_p = v ? v->data_ptr<T>() : nullptr;
    const T* gs_p = grad_ds.data_ptr<T>();
    const T* gv_in = grad_dv.data_ptr<T>();
    T* gphi_p = g_phi.data_ptr<T>();
    T* gdir_p = g_dir.data_ptr<T>();
    T* buf_p = buf.data_ptr<T>();
    at::parallel_for(0, chunks.size(), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        T* w = scratch.data_ptr<T>() + c * scratch_width;
        T* gw = w + padded(F3, 16);
        T* gph = gw + padded(F3, 16);
        T* rows = buf_p + (chunks.row[c] - chunks.lo[c]) * stride;
        T* gwt = weight_grad ? g_weight_chunks.data_ptr<T>() + c * K * F3 : nullptr;
        for (int64_t u = chunks.begin[c]; u < chunks.begin[c + 1]; ++u) {
          const int64_t ia = a[u], ib = b[u];
          const T* phi_u = phi_p + u * K;
          build_filter<T>(K, F3, phi_u, wt_p, w);
          std::fill(gw, gw + F3, T(0));
          const T d0 = dir_p[3 * u], d1 = dir_p[3 * u + 1], d2 = dir_p[3 * u + 2];
          T ga[3], gb[3];
          send_grad<T>(F, w, x_p + ib * F3, v_p ? v_p + ib * F3 : nullptr, d0, d1, d2, gs_p + ia * F,
                       gv_in + ia * F3, gw, rows + ib * stride, v_p ? rows + ib * stride + F3 : nullptr, ga);
          send_grad<T>(F, w, x_p + ia * F3, v_p ? v_p + ia * F3 : nullptr, -d0, -d1, -d2, gs_p + ib * F,
                       gv_in + ib * F3, gw, rows + ia * stride, v_p ? rows + ia * stride + F3 : nullptr, gb);
          for (int q = 0; q < 3; ++q) gdir_p[3 * u + q] = ga[q] - gb[q];
          filter_grad<T>(F3, Kp, wtt_p, gw, gph);
          std::copy(gph, gph + K, gphi_p + u * K);
          if (gwt) add_outer<T>(K, F3, phi_u, gw, gwt);
        }
      }
    });
    add_windows<T>(chunks, buf_p, N, g_x.data_ptr<T>(), F3, v ? g_v.data_ptr<T>() : nullptr, F3);
  });
  auto g_weight = weight_grad ? g_weight_chunks.sum(0) : at::zeros({K, F3}, x.options());
  return {g_phi, g_weight, g_dir, g_x, g_v};
}

// Instruction-set extensions this build was compiled for (-march): Python checks them against the CPU
// before it uses the operators, so an environment copied to an older CPU falls back instead of crashing.
std::string compiled_isa() {
  std::string isa;
#ifdef __AVX__
  isa += "avx ";
#endif
#ifdef __AVX2__
  isa += "avx2 ";
#endif
#ifdef __FMA__
  isa += "fma ";
#endif
#ifdef __AVX512F__
  isa += "avx512f ";
#endif
  return isa;
}

// Bytes per vector register the kernels are written for (SURFDIFF_VECTOR_BYTES above).
int64_t vector_bytes() { return kVectorBytes; }

// How many threads one at::parallel_for region of this build really runs on. at::parallel_for is an
// OpenMP region compiled into the extension: built without -fopenmp it quietly runs on one thread.
int64_t parallel_team_size() {
  std::vector<int64_t> seen(std::max(1, at::get_num_threads()), 0);
  at::parallel_for(0, static_cast<int64_t>(seen.size()), 1, [&](int64_t, int64_t) {
    const int64_t id = at::get_thread_num();
    if (id >= 0 && id < static_cast<int64_t>(seen.size())) seen[id] = 1;
  });
  int64_t team = 0;
  for (int64_t s : seen) team += s;
  return team;
}

}  // namespace

TORCH_LIBRARY(surfdiff, m) {
  m.def(
      "painn_messages(Tensor phi, Tensor weight, Tensor direction, Tensor x, Tensor? v, Tensor pair_a, "
      "Tensor pair_b) -> (Tensor, Tensor)");
  m.def(
      "painn_messages_backward(Tensor grad_ds, Tensor grad_dv, Tensor phi, Tensor weight, Tensor direction, "
      "Tensor x, Tensor? v, Tensor pair_a, Tensor pair_b, bool weight_grad) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
}

TORCH_LIBRARY_IMPL(surfdiff, CPU, m) {
  m.impl("painn_messages", &painn_messages);
  m.impl("painn_messages_backward", &painn_messages_backward);
}

}  // namespace surfdiff

// A Python module so that `import surfdiff_core.ml._painn_ops` loads the library (and runs the
// registrations above); it also reports the instruction set the build assumes and its real thread count.
static PyObject* py_compiled_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(surfdiff::compiled_isa().c_str());
}
static PyObject* py_parallel_team_size(PyObject*, PyObject*) {
  return PyLong_FromLongLong(surfdiff::parallel_team_size());
}
static PyObject* py_vector_bytes(PyObject*, PyObject*) { return PyLong_FromLongLong(surfdiff::vector_bytes()); }
static PyMethodDef kMethods[] = {
    {"compiled_isa", py_compiled_isa, METH_NOARGS, "CPU extensions the build was compiled for."},
    {"parallel_team_size", py_parallel_team_size, METH_NOARGS, "Threads one at::parallel_for region runs on."},
    {"vector_bytes", py_vector_bytes, METH_NOARGS, "Bytes per vector the kernels are written for."},
    {nullptr, nullptr, 0, nullptr}};
static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_painn_ops", nullptr, -1, kMethods};
PyMODINIT_FUNC PyInit__painn_ops(void) { return PyModule_Create(&kModule); }
