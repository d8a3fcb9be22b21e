// CPU kernels of the s4 family (math in s4.h). The Cauchy and Vandermonde loops run 8 lanes of l at
// once in GCC vector types (lowered to AVX-512 / AVX2 / SSE by the target clones), calling the same
// term bodies as the CUDA kernels; a scalar tail handles the last l % 8 nodes. Every sum has a fixed
// order (lane partial sums, then lanes 0..7), so results do not depend on the thread count.
#include <cstring>
#include <type_traits>
#include <vector>

#include "fastcore/cpu_vector.h"
#include "s4/s4.h"

namespace fastcore {
namespace s4 {
namespace {

constexpr int kLanes = 8;

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Lanes<double> {
  typedef double type __attribute__((vector_size(64)));
};

template <typename T>
inline typename Lanes<T>::type load_lanes(const T* p) {
  typename Lanes<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline T sum_lanes(typename Lanes<T>::type v) {
  T total = T(0);
  for (int i = 0; i < kLanes; ++i) total += v[i];
  return total;
}

template <typename T>
FC_CPU_CLONES void cauchy_forward_impl(const CauchyParams<T>& p, const T* zr, const T* zi, int64_t begin,
                                       int64_t end) {
  using V = typename Lanes<T>::type;
  const int64_t L = p.nodes, N = p.states;
  const int64_t tiles = (L + kCauchyTile - 1) / kCauchyTile;
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / tiles;
    const int64_t l_begin = (unit % tiles) * kCauchyTile;
    const int64_t l_end = l_begin + kCauchyTile < L ? l_begin + kCauchyTile : L;
    const T* v = p.v + 2 * b * N;
    const T* w = p.w + 2 * b * N;
    T* out = p.out + 2 * b * L;
    int64_t l = l_begin;
    for (; l + kLanes <= l_end; l += kLanes) {
      const V zr_l = load_lanes(zr + l), zi_l = load_lanes(zi + l);
      V acc_re = V{} , acc_im = V{};
      for (int64_t n = 0; n < N; ++n)
        cauchy_forward_term<V, T>(zr_l, zi_l, v[2 * n], v[2 * n + 1], w[2 * n], w[2 * n + 1], p.conj_symmetric,
                                  acc_re, acc_im);
      for (int i = 0; i < kLanes; ++i) {
        out[2 * (l + i)] = acc_re[i];
        out[2 * (l + i) + 1] = acc_im[i];
      }
    }
    for (; l < l_end; ++l) {
      T acc_re = T(0), acc_im = T(0);
      for (int64_t n = 0; n < N; ++n)
        cauchy_forward_term<T, T>(zr[l], zi[l], v[2 * n], v[2 * n + 1], w[2 * n], w[2 * n + 1], p.conj_symmetric,
                                  acc_re, acc_im);
      out[2 * l] = acc_re;
      out[2 * l + 1] = acc_im;
    }
  }
}

template <typename T>
FC_CPU_CLONES void cauchy_backward_impl(const CauchyParams<T>& p, const T* zr, const T* zi, const T* gr_all,
                                        const T* gi_all, int64_t begin, int64_t end) {
  using V = typename Lanes<T>::type;
  const int64_t L = p.nodes, N = p.states;
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / N, n = unit % N;
    const T vr = p.v[2 * unit], vi = p.v[2 * unit + 1];
    const T wr = p.w[2 * unit], wi = p.w[2 * unit + 1];
    const T* gr = gr_all + b * L;
    const T* gi = gi_all + b * L;
    V sv_re = V{}, sv_im = V{}, sw_re = V{}, sw_im = V{};
    int64_t l = 0;
    for (; l + kLanes <= L; l += kLanes)
      cauchy_backward_term<V, T>(load_lanes(zr + l), load_lanes(zi + l), load_lanes(gr + l), load_lanes(gi + l), wr,
                                 wi, p.conj_symmetric, sv_re, sv_im, sw_re, sw_im);
    T s_vr = sum_lanes<T>(sv_re), s_vi = sum_lanes<T>(sv_im), s_wr = sum_lanes<T>(sw_re), s_wi = sum_lanes<T>(sw_im);
    for (; l < L; ++l)
      cauchy_backward_term<T, T>(zr[l], zi[l], gr[l], gi[l], wr, wi, p.conj_symmetric, s_vr, s_vi, s_wr, s_wi);
    (void)n;
    cauchy_backward_finish<T>(vr, vi, s_vr, s_vi, s_wr, s_wi, p.grad_v + 2 * unit, p.grad_w + 2 * unit);
  }
}

// Per-row tables of the Vandermonde kernel: p_n[j] = exp(x_n j), j < TB, deinterleaved [N][TB].
template <typename T>
void vandermonde_tables(const T* x, int64_t N, T* table_re, T* table_im) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < kVandBlock; ++j)
      exp_times<T>(x[2 * n], x[2 * n + 1], j, table_re[n * kVandBlock + j], table_im[n * kVandBlock + j]);
}

template <typename T>
FC_CPU_CLONES void vandermonde_forward_impl(const VandermondeParams<T>& p, int64_t begin, int64_t end) {
  using V = typename Lanes<T>::type;
  constexpr int kVecs = kVandBlock / kLanes;
  const int64_t N = p.states, L = p.length;
  std::vector<T> table_re(N * kVandBlock), table_im(N * kVandBlock), c_re(N), c_im(N);
  for (int64_t b = begin; b < end; ++b) {
    const T* v = p.v + 2 * b * N;
    const T* x = p.x + 2 * b * N;
    vandermonde_tables<T>(x, N, table_re.data(), table_im.data());
    T* out = p.out + b * L;
    for (int64_t l0 = 0; l0 < L; l0 += kVandBlock) {
      // c_n = v_n · s_k with the block start s_k = exp(x_n l0) evaluated directly.
      for (int64_t n = 0; n < N; ++n) {
        T sr, si;
        exp_times<T>(x[2 * n], x[2 * n + 1], l0, sr, si);
        c_re[n] = v[2 * n] * sr - v[2 * n + 1] * si;
        c_im[n] = v[2 * n] * si + v[2 * n + 1] * sr;
      }
      V acc[kVecs];
      for (int q = 0; q < kVecs; ++q) acc[q] = V{};
      for (int64_t n = 0; n < N; ++n) {
        const T cr = c_re[n], ci = c_im[n];
        const T* tr = table_re.data() + n * kVandBlock;
        const T* ti = table_im.data() + n * kVandBlock;
        for (int q = 0; q < kVecs; ++q) acc[q] += cr * load_lanes(tr + q * kLanes) - ci * load_lanes(ti + q * kLanes);
      }
      const int64_t count = L - l0 < kVandBlock ? L - l0 : kVandBlock;
      for (int64_t j = 0; j < count; ++j) out[l0 + j] = T(2) * acc[j / kLanes][j % kLanes];
    }
  }
}

template <typename T>
FC_CPU_CLONES void vandermonde_backward_impl(const VandermondeParams<T>& p, int64_t begin, int64_t end) {
  using V = typename Lanes<T>::type;
  constexpr int kVecs = kVandBlock / kLanes;
  const int64_t N = p.states, L = p.length;
  alignas(64) T table_re[kVandBlock], table_im[kVandBlock], weight[kVandBlock], g_block[kVandBlock];
  for (int64_t j = 0; j < kVandBlock; ++j) weight[j] = T(j);
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / N;
    const T xr = p.x[2 * unit], xi = p.x[2 * unit + 1];
    for (int64_t j = 0; j < kVandBlock; ++j) exp_times<T>(xr, xi, j, table_re[j], table_im[j]);
    const T* g = p.grad_out + b * L;
    T s0r = T(0), s0i = T(0), s1r = T(0), s1i = T(0);
    for (int64_t l0 = 0; l0 < L; l0 += kVandBlock) {
      const T* gb = g + l0;
      if (L - l0 < kVandBlock) {  // last partial block: zero-padded copy
        for (int64_t j = 0; j < kVandBlock; ++j) g_block[j] = l0 + j < L ? g[l0 + j] : T(0);
        gb = g_block;
      }
      // A = Σ_j g conj(p_j), B = Σ_j j g conj(p_j)
      V ar = V{}, ai = V{}, br = V{}, bi = V{};
      for (int q = 0; q < kVecs; ++q) {
        const V gq = load_lanes(gb + q * kLanes);
        const V pr = gq * load_lanes(table_re + q * kLanes), pi = gq * load_lanes(table_im + q * kLanes);
        const V jw = load_lanes(weight + q * kLanes);
        ar += pr;
        ai -= pi;
        br += jw * pr;
        bi -= jw * pi;
      }
      const T Ar = sum_lanes<T>(ar), Ai = sum_lanes<T>(ai), Br = sum_lanes<T>(br), Bi = sum_lanes<T>(bi);
      T sr, si;
      exp_times<T>(xr, xi, l0, sr, si);
      si = -si;  // conj(s_k)
      const T l0t = T(l0);
      s0r += sr * Ar - si * Ai;
      s0i += sr * Ai + si * Ar;
      const T Cr = l0t * Ar + Br, Ci = l0t * Ai + Bi;
      s1r += sr * Cr - si * Ci;
      s1i += sr * Ci + si * Cr;
    }
    const T vr = p.v[2 * unit], vi = p.v[2 * unit + 1];
    p.grad_v[2 * unit] = T(2) * s0r;
    p.grad_v[2 * unit + 1] = T(2) * s0i;
    p.grad_x[2 * unit] = T(2) * (vr * s1r + vi * s1i);  // 2 conj(v) S1
    p.grad_x[2 * unit + 1] = T(2) * (vr * s1i - vi * s1r);
  }
}

// The float step, 4 complex states per 8-lane vector on the interleaved layout:
//   dA·s = dup_re(dA)·s + dup_im(dA)·swap(s)·(−1, 1, …), s' = dA·s + dB·u, Re(C s') = Σ (C ∘ s')·(1, −1, …).
// In place is allowed (new_state == state): each vector is loaded before it is stored.
FC_CPU_CLONES void ssm_step_float_rows(const StepParams<float>& p, int64_t begin, int64_t end) {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  const I dup_re = {0, 0, 2, 2, 4, 4, 6, 6}, dup_im = {1, 1, 3, 3, 5, 5, 7, 7}, swap = {1, 0, 3, 2, 5, 4, 7, 6};
  const V sign = {-1.f, 1.f, -1.f, 1.f, -1.f, 1.f, -1.f, 1.f}, re_sign = {1.f, -1.f, 1.f, -1.f, 1.f, -1.f, 1.f, -1.f};
  const int64_t N = p.states;
  int64_t h = begin % p.heads;  // advanced with the row: no division per row
  for (int64_t row = begin; row < end; ++row, h = (h + 1 == p.heads) ? 0 : h + 1) {
    const float u = p.u_kind == ScalarKind::kFloat32 ? static_cast<const float*>(p.u)[row]
                                                     : load_as<float>(p.u, p.u_kind, row);
    const float* s = p.state + 2 * row * N;
    float* s_new = p.new_state + 2 * row * N;
    const float* a = p.dA + 2 * h * N;
    const float* bb = p.dB + 2 * h * N;
    const float* c = p.C + 2 * h * N;
    const V uv = V{} + u;
    // two independent accumulators (N = 32 is 8 vectors: halves the add-latency chain)
    V acc0 = V{}, acc1 = V{};
    int64_t i = 0;
    for (; i + 16 <= 2 * N; i += 16) {
      const V sv0 = load_lanes(s + i), av0 = load_lanes(a + i), bv0 = load_lanes(bb + i), cv0 = load_lanes(c + i);
      const V sv1 = load_lanes(s + i + 8), av1 = load_lanes(a + i + 8), bv1 = load_lanes(bb + i + 8),
              cv1 = load_lanes(c + i + 8);
      const V next0 = __builtin_shuffle(av0, dup_re) * sv0 +
                      __builtin_shuffle(av0, dup_im) * __builtin_shuffle(sv0, swap) * sign + bv0 * uv;
      const V next1 = __builtin_shuffle(av1, dup_re) * sv1 +
                      __builtin_shuffle(av1, dup_im) * __builtin_shuffle(sv1, swap) * sign + bv1 * uv;
      std::memcpy(s_new + i, &next0, sizeof(next0));
      std::memcpy(s_new + i + 8, &next1, sizeof(next1));
      acc0 += cv0 * next0;
      acc1 += cv1 * next1;
    }
    for (; i + 8 <= 2 * N; i += 8) {
      const V sv = load_lanes(s + i), av = load_lanes(a + i), bv = load_lanes(bb + i), cv = load_lanes(c + i);
      const V next = __builtin_shuffle(av, dup_re) * sv + __builtin_shuffle(av, dup_im) * __builtin_shuffle(sv, swap) * sign +
                     bv * uv;
      std::memcpy(s_new + i, &next, sizeof(next));
      acc0 += cv * next;
    }
    const V acc = (acc0 + acc1) * re_sign;  // Re(C s') = c_re s_re − c_im s_im: the sign once per row
    float tail = 0.f;
    for (int64_t n = i / 2; n < N; ++n) {
      const float sr = s[2 * n], si = s[2 * n + 1];
      const float nr = a[2 * n] * sr - a[2 * n + 1] * si + bb[2 * n] * u;
      const float ni = a[2 * n] * si + a[2 * n + 1] * sr + bb[2 * n + 1] * u;
      s_new[2 * n] = nr;
      s_new[2 * n + 1] = ni;
      tail += c[2 * n] * nr - c[2 * n + 1] * ni;
    }
    float y = 2.f * (sum_lanes<float>(acc) + tail);
    if (p.D != nullptr) y += p.D[h] * u;
    store_as<float>(p.y, p.u_kind, row, y);
  }
}

}  // namespace

template <typename T>
void cauchy_forward_cpu(const CauchyParams<T>& p, const T* zr, const T* zi, int64_t begin, int64_t end) {
  cauchy_forward_impl<T>(p, zr, zi, begin, end);
}
template <typename T>
void cauchy_backward_cpu(const CauchyParams<T>& p, const T* zr, const T* zi, const T* gr, const T* gi, int64_t begin,
                         int64_t end) {
  cauchy_backward_impl<T>(p, zr, zi, gr, gi, begin, end);
}
template <typename T>
void vandermonde_forward_cpu(const VandermondeParams<T>& p, int64_t begin, int64_t end) {
  vandermonde_forward_impl<T>(p, begin, end);
}
template <typename T>
void vandermonde_backward_cpu(const VandermondeParams<T>& p, int64_t begin, int64_t end) {
  vandermonde_backward_impl<T>(p, begin, end);
}

template <typename Acc>
void fftconv_pad_cast_cpu(const FFTConvParams<Acc>& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    Acc* dst = p.real_buf + r * p.fft_size;
    const int64_t src = (p.row_begin + r) * p.length;
    if (p.in_kind == ScalarKind::kFloat32 && sizeof(Acc) == 4) {
      std::memcpy(dst, static_cast<const float*>(p.in) + src, sizeof(float) * p.length);
    } else if (p.in_kind == ScalarKind::kFloat64 && sizeof(Acc) == 8) {
      std::memcpy(dst, static_cast<const double*>(p.in) + src, sizeof(double) * p.length);
    } else {
      for (int64_t l = 0; l < p.length; ++l) dst[l] = load_as<Acc>(p.in, p.in_kind, src + l);
    }
    std::memset(static_cast<void*>(dst + p.length), 0, sizeof(Acc) * (p.fft_size - p.length));
  }
}

template <typename Acc>
void fftconv_cmul_cpu(const FFTConvParams<Acc>& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r)
    for (int64_t f = 0; f < p.freqs; ++f) cmul_element<Acc>(p, r, f);
}

template <typename Acc>
void fftconv_crop_skip_cpu(const FFTConvParams<Acc>& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t base = (p.row_begin + r) * p.length;
    if (p.out_kind == ScalarKind::kFloat32 && p.skip_D == nullptr && sizeof(Acc) == 4) {
      std::memcpy(static_cast<float*>(p.out) + base, p.real_buf + r * p.fft_size, sizeof(float) * p.length);
      continue;
    }
    for (int64_t l = 0; l < p.length; ++l) store_as<Acc>(p.out, p.out_kind, base + l, crop_skip_value<Acc>(p, r, l));
  }
}

template <typename Acc>
void fftconv_grad_spectra_cpu(const FFTConvParams<Acc>& p, int64_t begin, int64_t end) {
  for (int64_t unit = begin; unit < end; ++unit) grad_spectra_element<Acc>(p, unit / p.freqs, unit % p.freqs);
}

template <typename Acc>
void fftconv_row_dot_cpu(const FFTConvParams<Acc>& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    Acc acc = Acc(0);
    for (int64_t l = 0; l < p.length; ++l)
      acc += load_as<Acc>(p.in, p.in_kind, r * p.length + l) * load_as<Acc>(p.in2, p.in2_kind, r * p.length + l);
    p.dot[r] = acc;
  }
}

template <typename T>
void ssm_step_cpu(const StepParams<T>& p, int64_t begin, int64_t end) {
  if constexpr (std::is_same<T, float>::value) {
    ssm_step_float_rows(p, begin, end);
  } else {
    for (int64_t row = begin; row < end; ++row) ssm_step_row<T>(p, row);
  }
}

template <typename T>
void ssm_step_backward_cpu(const StepParams<T>& p, int64_t begin, int64_t end) {
  for (int64_t h = begin; h < end; ++h) ssm_step_backward_head<T>(p, h);
}

#define FC_S4_INSTANTIATE(T)                                                                                      \
  template void cauchy_forward_cpu<T>(const CauchyParams<T>&, const T*, const T*, int64_t, int64_t);             \
  template void cauchy_backward_cpu<T>(const CauchyParams<T>&, const T*, const T*, const T*, const T*, int64_t,  \
                                       int64_t);                                                                  \
  template void vandermonde_forward_cpu<T>(const VandermondeParams<T>&, int64_t, int64_t);                       \
  template void vandermonde_backward_cpu<T>(const VandermondeParams<T>&, int64_t, int64_t);                      \
  template void fftconv_pad_cast_cpu<T>(const FFTConvParams<T>&, int64_t, int64_t);                              \
  template void fftconv_cmul_cpu<T>(const FFTConvParams<T>&, int64_t, int64_t);                                  \
  template void fftconv_crop_skip_cpu<T>(const FFTConvParams<T>&, int64_t, int64_t);                             \
  template void fftconv_grad_spectra_cpu<T>(const FFTConvParams<T>&, int64_t, int64_t);                          \
  template void fftconv_row_dot_cpu<T>(const FFTConvParams<T>&, int64_t, int64_t);                               \
  template void ssm_step_cpu<T>(const StepParams<T>&, int64_t, int64_t);                                         \
  template void ssm_step_backward_cpu<T>(const StepParams<T>&, int64_t, int64_t);

FC_S4_INSTANTIATE(float)
FC_S4_INSTANTIATE(double)
#undef FC_S4_INSTANTIATE

}  // namespace s4
}  // namespace fastcore
