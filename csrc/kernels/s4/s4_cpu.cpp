// CPU kernels of the s4 family (math in s4.h). The Cauchy and Vandermonde loops run 8 lanes of l at
// once in GCC vector types (lowered to AVX-512 / AVX2 / SSE by the target clones), calling the same
// term bodies as the CUDA kernels; a scalar tail handles the last l % 8 nodes. Every sum has a fixed
// order (lane partial sums, then lanes 0..7), so results do not depend on the thread count.
#include <algorithm>
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

// always_inline: vectors passed by value between a target clone and a default-ISA function would cross ABIs.
template <typename V, typename T>
__attribute__((always_inline)) inline V load_lanes_as(const T* p) {
  V v;
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
FC_CPU_CLONES void cauchy_forward_impl(const CauchyParams<T>& p, const T* zr, const T* zi, int64_t begin, int64_t end) {
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
      V acc_re = V{}, acc_im = V{};
      for (int64_t n = 0; n < N; ++n)
        cauchy_forward_term<V, T>(zr_l, zi_l, v[2 * n], v[2 * n + 1], w[2 * n], w[2 * n + 1], p.conj_symmetric, acc_re,
                                  acc_im);
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
      cauchy_backward_term<V, T>(load_lanes(zr + l), load_lanes(zi + l), load_lanes(gr + l), load_lanes(gi + l), wr, wi,
                                 p.conj_symmetric, sv_re, sv_im, sw_re, sw_im);
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

// The float step, two loops over the same formulas. dA, dB, C are shared by the B rows of a head, so their
// coefficients are rearranged into the form the 16-lane loop wants (no per-row shuffles of them):
//   s' = dA·s + dB·u = (a_re, a_re)·s + (−a_im, a_im)·swap(s) + (b_re, b_im)·u       (per complex pair)
//   Re(C s') = Σ (c_re, −c_im)·s'                                                     (lane sum)
// Per 8 states: one state load, one in-pair swap, four multiply(-add)s, one store.
// In place is allowed (new_state == state): each vector is loaded before it is stored. The order of y's sum
// is fixed by N alone (see each loop), whatever the threading.
constexpr int kStepLanes = 16;
constexpr int64_t kStepTileHeads = 8;
typedef float StepVector __attribute__((vector_size(64)));
typedef int32_t StepIndex __attribute__((vector_size(64)));
typedef float StepHalf __attribute__((vector_size(32)));
typedef float StepQuarter __attribute__((vector_size(16)));

// Σ of the 16 lanes in a fixed pairwise order: (lanes i + i+8), then (i + i+4), then ((0 + 2) + (1 + 3)).
__attribute__((always_inline)) inline float step_lane_sum(StepVector v) {
  StepHalf lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  const StepHalf eight = lo + hi;
  StepQuarter a, b;
  std::memcpy(&a, &eight, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&eight) + sizeof(a), sizeof(b));
  const StepQuarter four = a + b;
  return (four[0] + four[2]) + (four[1] + four[3]);
}

// The four coefficient vectors of one 16-lane group (8 states) of a head, from float offset `at` of dA, dB, C:
// re = (a_re, a_re) and im = (−a_im, a_im) per state pair, b, c = (c_re, −c_im) (the formulas above).
struct StepCoefficients {
  StepVector re, im, b, c;
};
__attribute__((always_inline)) inline StepCoefficients step_coefficients(const StepParams<float>& p, int64_t at) {
  const StepIndex dup_re = {0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14};
  const StepIndex dup_im = {1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15};
  const StepVector im_sign = {-1.f, 1.f, -1.f, 1.f, -1.f, 1.f, -1.f, 1.f, -1.f, 1.f, -1.f, 1.f, -1.f, 1.f, -1.f, 1.f};
  const StepVector re_sign = {1.f, -1.f, 1.f, -1.f, 1.f, -1.f, 1.f, -1.f, 1.f, -1.f, 1.f, -1.f, 1.f, -1.f, 1.f, -1.f};
  const StepVector a = load_lanes_as<StepVector>(p.dA + at);
  return {__builtin_shuffle(a, dup_re), __builtin_shuffle(a, dup_im) * im_sign, load_lanes_as<StepVector>(p.dB + at),
          load_lanes_as<StepVector>(p.C + at) * re_sign};
}
// s' = a ∘ s + b·u for 8 states: re·s + im·(s with re/im swapped) + b·u.
__attribute__((always_inline)) inline StepVector step_update(StepVector re, StepVector im, StepVector b, StepVector s,
                                                             float u) {
  const StepIndex swap = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
  return re * s + im * __builtin_shuffle(s, swap) + b * u;
}

// Any N (the loop for N > 32 or N not a multiple of 8): for a tile of kStepTileHeads heads the coefficients
// are rearranged once, and the tile's rows walked batch by batch (the tile's rows of one batch are contiguous,
// so the state streams through the prefetchers while the coefficients stay in L1). y's sum per row: the full
// vectors in order into one 16-lane accumulator, step_lane_sum, then the N % 8 scalar states.
__attribute__((always_inline)) inline void ssm_step_float_tiles(const StepParams<float>& p, int64_t begin,
                                                                int64_t end) {
  const int64_t N = p.states, H = p.heads;
  const int64_t vectors = (2 * N) / kStepLanes;  // full 16-lane vectors; N % 8 states scalar
  // per tile head: [a_re | a_im | b | c] × vectors × 16 floats (plain floats: a std::vector of 64-byte
  // vector types is not reliably 64-byte aligned, and unaligned loads cost nothing extra here)
  const int64_t head_floats = 4 * vectors * kStepLanes;
  std::vector<float> coef(static_cast<size_t>(kStepTileHeads * std::max<int64_t>(head_floats, 1)));
  auto put = [&](float* dst, StepVector v) { std::memcpy(dst, &v, sizeof(v)); };
  for (int64_t h0 = begin; h0 < end; h0 += kStepTileHeads) {
    const int64_t tile = std::min(kStepTileHeads, end - h0);
    for (int64_t g = 0; g < tile; ++g) {
      float* k = coef.data() + g * head_floats;
      for (int64_t q = 0; q < vectors; ++q) {
        const int64_t to = q * kStepLanes, part = vectors * kStepLanes;
        const StepCoefficients c = step_coefficients(p, 2 * (h0 + g) * N + q * kStepLanes);
        put(k + to, c.re);
        put(k + part + to, c.im);
        put(k + 2 * part + to, c.b);
        put(k + 3 * part + to, c.c);
      }
    }
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t g = 0; g < tile; ++g) {
        const int64_t h = h0 + g, row = b * H + h;
        const float u =
            p.u_kind == ScalarKind::kFloat32 ? static_cast<const float*>(p.u)[row] : load_as<float>(p.u, p.u_kind, row);
        const float* s = p.state + 2 * row * N;
        float* s_new = p.new_state + 2 * row * N;
        const float* k = coef.data() + g * head_floats;
        const int64_t part = vectors * kStepLanes;
        StepVector acc = StepVector{};
        for (int64_t i = 0; i < part; i += kStepLanes) {
          const StepVector sv = load_lanes_as<StepVector>(s + i);
          const StepVector next = step_update(load_lanes_as<StepVector>(k + i), load_lanes_as<StepVector>(k + part + i),
                                              load_lanes_as<StepVector>(k + 2 * part + i), sv, u);
          std::memcpy(s_new + i, &next, sizeof(next));
          acc += load_lanes_as<StepVector>(k + 3 * part + i) * next;
        }
        float y = step_lane_sum(acc);
        const float* a = p.dA + 2 * h * N;
        const float* bb = p.dB + 2 * h * N;
        const float* c = p.C + 2 * h * N;
        for (int64_t n = vectors * kStepLanes / 2; n < N; ++n) {
          const float sr = s[2 * n], si = s[2 * n + 1];
          const float nr = a[2 * n] * sr - a[2 * n + 1] * si + bb[2 * n] * u;
          const float ni = a[2 * n] * si + a[2 * n + 1] * sr + bb[2 * n + 1] * u;
          s_new[2 * n] = nr;
          s_new[2 * n + 1] = ni;
          y += c[2 * n] * nr - c[2 * n + 1] * ni;
        }
        y *= 2.f;
        if (p.D != nullptr) y += p.D[h] * u;
        store_as<float>(p.y, p.u_kind, row, y);
      }
    }
  }
}

// One level of the 16-row transpose-and-add tree. With the lanes in groups of W (W = 1, 2, 4, 8), lane group g
// of `a` and of `b` holds partial g of two row sets; the result's even groups are a's group pairs summed
// (2h, 2h + 1 -> h), its odd groups b's: lane 2W·h + j (j < 2W) holds partial h of row j of the combined set.
// Levels W = 1, 2, 4, 8 take 16 rows' 16-lane vectors to one vector of their 16 sums (lane j: row j).
template <int W>
__attribute__((always_inline)) inline StepVector step_tree_level(StepVector a, StepVector b) {
  StepIndex first, second;
  for (int i = 0; i < kStepLanes; ++i) {  // unrolled and folded: two constant two-source shuffles
    const bool from_b = (i / W) % 2 == 1;
    first[i] = from_b ? kStepLanes + i - W : i;
    second[i] = from_b ? kStepLanes + i : i + W;
  }
  return __builtin_shuffle(a, b, first) + __builtin_shuffle(a, b, second);
}

// The 16 sums of rows 0..15 as one vector (lane j: row j's 16-lane accumulator summed), by the four tree levels;
// row_sum(r) gives row r's accumulator (rows in the order the tree takes them, so every row's sum has the same
// addition order whichever walk supplies it).
template <typename RowSum>
__attribute__((always_inline)) inline StepVector step_tree_sums(RowSum&& row_sum) {
  auto four_rows = [&](int r) __attribute__((always_inline)) {
    const StepVector pairs0 = step_tree_level<1>(row_sum(r), row_sum(r + 1));
    return step_tree_level<2>(pairs0, step_tree_level<1>(row_sum(r + 2), row_sum(r + 3)));
  };
  const StepVector eights0 = step_tree_level<4>(four_rows(0), four_rows(4));
  return step_tree_level<8>(eights0, step_tree_level<4>(four_rows(8), four_rows(12)));
}

// N = 8, 16, 24, 32 (kVectors = N / 8 vectors a row; S4D's d_state = 64 stores N = 32). The tile loop above
// is bound by its loads, not by memory: per state vector it loads four coefficient vectors besides the state
// (Zen 4 retires one 512-bit load a cycle), and every four-vector row ends in a 16-lane sum (a chain of ~10
// dependent shuffles and adds). Here a head's 4·kVectors coefficient vectors are loaded into registers once
// and its B rows walked (one load per state vector), and the sums of 16 rows are formed together by a
// transpose-and-add tree (15 adds and 30 two-source shuffles for 16 sums). A head's rows lie H·N apart: the
// walk is 16 sequential streams. It beats the tile loop at S4's generation shape (docs/s4.md, "Why the
// step kernel walks heads").
// y's sum per row: the vectors in order into one 16-lane accumulator, then the tree (step_lane_sum for the
// B % 16 rows of a last, partial group).
template <int kVectors>
__attribute__((always_inline)) inline void ssm_step_float_head_rows(const StepParams<float>& p, int64_t begin,
                                                                    int64_t end) {
  const int64_t N = p.states, H = p.heads, B = p.batch;
  const bool float_io = p.u_kind == ScalarKind::kFloat32;
  for (int64_t h = begin; h < end; ++h) {
    StepVector k_re[kVectors], k_im[kVectors], k_b[kVectors], k_c[kVectors];
    for (int q = 0; q < kVectors; ++q) {
      const StepCoefficients c = step_coefficients(p, 2 * h * N + q * kStepLanes);
      k_re[q] = c.re;
      k_im[q] = c.im;
      k_b[q] = c.b;
      k_c[q] = c.c;
    }
    const float d = p.D != nullptr ? p.D[h] : 0.f;
    for (int64_t b0 = 0; b0 < B; b0 += kStepLanes) {
      const int64_t rows = std::min<int64_t>(kStepLanes, B - b0);
      float u[kStepLanes];
      for (int64_t j = 0; j < rows; ++j) {
        const int64_t row = (b0 + j) * H + h;
        u[j] = float_io ? static_cast<const float*>(p.u)[row] : load_as<float>(p.u, p.u_kind, row);
      }
      // Re(C s') of row b0 + j as a 16-lane accumulator (the lambdas are inlined: an out-of-line copy would be
      // compiled for the default target, passing vectors in memory, while this target clone expects them in
      // registers)
      auto row_sum = [&](int64_t j) __attribute__((always_inline)) {
        const int64_t offset = 2 * ((b0 + j) * H + h) * N;
        const float* s = p.state + offset;
        float* s_new = p.new_state + offset;
        StepVector acc = StepVector{};
        for (int q = 0; q < kVectors; ++q) {
          const StepVector sv = load_lanes_as<StepVector>(s + q * kStepLanes);
          const StepVector next = step_update(k_re[q], k_im[q], k_b[q], sv, u[j]);
          std::memcpy(s_new + q * kStepLanes, &next, sizeof(next));
          acc += k_c[q] * next;
        }
        return acc;
      };
      float sums[kStepLanes];
      if (rows == kStepLanes) {
        const StepVector all = step_tree_sums(row_sum);
        std::memcpy(sums, &all, sizeof(all));
      } else {  // the batch's last rows (B % 16): one lane sum per row
        for (int64_t j = 0; j < rows; ++j) sums[j] = step_lane_sum(row_sum(j));
      }
      for (int64_t j = 0; j < rows; ++j) {
        const int64_t row = (b0 + j) * H + h;
        const float y = 2.f * sums[j] + d * u[j];
        if (float_io)
          static_cast<float*>(p.y)[row] = y;
        else
          store_as<float>(p.y, p.u_kind, row, y);
      }
    }
  }
}

// The walk above takes one head's B rows at a time, and they lie H·N complex apart: a multiple of 4 KiB whenever
// H·N is a multiple of 512 (S4's H = 256, N = 32: 64 KiB). Then every load shares its address bits 0–11 with
// the stores of the row just written, and the core holds such loads back as possibly dependent on them ("4K
// aliasing"). This walk takes two adjacent heads at once: a 16-row tree group is 8 batches × 2 heads, walked
// batch by batch, so consecutive rows are 256 bytes apart. The two heads' a-coefficients (re, im) stay in
// registers; their b and c vectors (which do not fit as well) are read from a 64-byte aligned stack table as
// memory operands, two loads per state vector besides the state's (measurements: docs/s4.md, "Why the
// step kernel walks heads"). Taken for float32 u (the
// generation case) and B a multiple of 16, where the one-head walk sums every row by the tree too: each row's
// sum then has the same order on both walks, so the result does not depend on which heads a thread's range
// pairs (a range's last odd head goes through the one-head walk).
template <int kVectors>
__attribute__((always_inline)) inline void ssm_step_float_head_pairs(const StepParams<float>& p, int64_t begin,
                                                                     int64_t end) {
  constexpr int kBatches = kStepLanes / 2;  // batches per 16-row group
  const int64_t N = p.states, H = p.heads, B = p.batch;
  const float* const state = p.state;
  float* const new_state = p.new_state;
  const float* const u_in = static_cast<const float*>(p.u);
  float* const y_out = static_cast<float*>(p.y);
  alignas(64) float bc[2][2][kVectors][kStepLanes];  // [head][b, c][vector][lane]
  int64_t h = begin;
  for (; h + 1 < end; h += 2) {
    StepVector k_re[2][kVectors], k_im[2][kVectors];
    for (int g = 0; g < 2; ++g) {
      for (int q = 0; q < kVectors; ++q) {
        const StepCoefficients c = step_coefficients(p, 2 * (h + g) * N + q * kStepLanes);
        k_re[g][q] = c.re;
        k_im[g][q] = c.im;
        std::memcpy(bc[g][0][q], &c.b, sizeof(c.b));
        std::memcpy(bc[g][1][q], &c.c, sizeof(c.c));
      }
    }
    const float d[2] = {p.D != nullptr ? p.D[h] : 0.f, p.D != nullptr ? p.D[h + 1] : 0.f};
    for (int64_t b0 = 0; b0 < B; b0 += kBatches) {
      // row r of the group: batch b0 + r / 2, head h + r % 2 (r is a constant wherever this is inlined)
      auto row_of = [&](int r) __attribute__((always_inline)) { return (b0 + (r >> 1)) * H + h + (r & 1); };
      auto row_sum = [&](int r) __attribute__((always_inline)) {
        const int g = r & 1;
        const int64_t row = row_of(r), offset = 2 * row * N;
        const float* s = state + offset;
        float* s_new = new_state + offset;
        const float u = u_in[row];
        StepVector acc = StepVector{};
        for (int q = 0; q < kVectors; ++q) {
          const StepVector sv = load_lanes_as<StepVector>(s + q * kStepLanes);
          const StepVector next = step_update(k_re[g][q], k_im[g][q], load_lanes_as<StepVector>(bc[g][0][q]), sv, u);
          std::memcpy(s_new + q * kStepLanes, &next, sizeof(next));
          acc += load_lanes_as<StepVector>(bc[g][1][q]) * next;
        }
        return acc;
      };
      const StepVector all = step_tree_sums(row_sum);
      for (int r = 0; r < kStepLanes; ++r) {
        const int64_t row = row_of(r);
        y_out[row] = 2.f * all[r] + d[r & 1] * u_in[row];
      }
    }
  }
  if (h < end) ssm_step_float_head_rows<kVectors>(p, h, end);
}

template <int kVectors>
__attribute__((always_inline)) inline void ssm_step_float_small_n(const StepParams<float>& p, int64_t begin,
                                                                  int64_t end) {
  if (p.u_kind == ScalarKind::kFloat32 && p.batch % kStepLanes == 0)
    ssm_step_float_head_pairs<kVectors>(p, begin, end);
  else
    ssm_step_float_head_rows<kVectors>(p, begin, end);
}

FC_CPU_CLONES void ssm_step_float_heads(const StepParams<float>& p, int64_t begin, int64_t end) {
  switch (p.states) {
    case 8: ssm_step_float_small_n<1>(p, begin, end); break;
    case 16: ssm_step_float_small_n<2>(p, begin, end); break;
    case 24: ssm_step_float_small_n<3>(p, begin, end); break;
    case 32: ssm_step_float_small_n<4>(p, begin, end); break;
    default: ssm_step_float_tiles(p, begin, end); break;
  }
}

// ---- FFT convolution pointwise passes: one row at a time, the row's head and the element kinds resolved once
// per row (not per element), so each inner loop is a plain vectorisable loop over l or f.

// Calls f with a null pointer of the C++ element type of `kind` (uint16_t for both 16-bit kinds, told apart by
// the kind again where they are widened / rounded).
template <typename F>
__attribute__((always_inline)) inline void with_element_type(ScalarKind kind, F&& f) {
  switch (kind) {
    case ScalarKind::kFloat32: f(static_cast<float*>(nullptr)); break;
    case ScalarKind::kFloat64: f(static_cast<double*>(nullptr)); break;
    default: f(static_cast<uint16_t*>(nullptr)); break;
  }
}

template <typename Acc>
FC_CPU_CLONES void fftconv_pad_rows(const FFTConvParams<Acc>& p, int64_t begin, int64_t end) {
  const int64_t L = p.length, n = p.fft_size;
  for (int64_t r = begin; r < end; ++r) {
    Acc* dst = p.real_buf + r * n;
    const int64_t src = (p.row_begin + r) * L;
    if (p.in_kind == ScalarKind::kFloat32) {
      const float* in = static_cast<const float*>(p.in) + src;
      if constexpr (sizeof(Acc) == 4) {
        std::memcpy(dst, in, sizeof(float) * L);
      } else {
        for (int64_t l = 0; l < L; ++l) dst[l] = static_cast<Acc>(in[l]);
      }
    } else if (p.in_kind == ScalarKind::kFloat64) {
      const double* in = static_cast<const double*>(p.in) + src;
      if constexpr (sizeof(Acc) == 8) {
        std::memcpy(dst, in, sizeof(double) * L);
      } else {
        for (int64_t l = 0; l < L; ++l) dst[l] = static_cast<Acc>(in[l]);
      }
    } else if (p.in_kind == ScalarKind::kBFloat16) {
      const uint16_t* in = static_cast<const uint16_t*>(p.in) + src;
      for (int64_t l = 0; l < L; ++l) dst[l] = static_cast<Acc>(bfloat16_bits_to_float(in[l]));
    } else {
      const uint16_t* in = static_cast<const uint16_t*>(p.in) + src;
      for (int64_t l = 0; l < L; ++l) dst[l] = static_cast<Acc>(float16_bits_to_float(in[l]));
    }
    std::memset(static_cast<void*>(dst + L), 0, sizeof(Acc) * (n - L));
  }
}

// X *= K (or conj K), interleaved complex, the same two products and one sum per component as cmul_element.
template <typename Acc>
FC_CPU_CLONES void fftconv_cmul_rows(const FFTConvParams<Acc>& p, int64_t begin, int64_t end) {
  const int64_t F = p.freqs;
  const Acc sign = p.conj_kernel ? Acc(-1) : Acc(1);
  for (int64_t r = begin; r < end; ++r) {
    Acc* __restrict__ x = p.spec + 2 * r * F;
    const Acc* __restrict__ k = p.kernel_spec + 2 * ((p.row_begin + r) % p.heads) * F;
    for (int64_t f = 0; f < F; ++f) {
      const Acc kr = k[2 * f], ki = sign * k[2 * f + 1];
      const Acc xr = x[2 * f], xi = x[2 * f + 1];
      x[2 * f] = xr * kr - xi * ki;
      x[2 * f + 1] = xr * ki + xi * kr;
    }
  }
}

// out[row, l] = y[l] + D[h] u[row, l] (crop_skip_value), stored in the output's kind.
template <typename Acc, typename Out, typename In>
__attribute__((always_inline)) inline void fftconv_crop_row(const FFTConvParams<Acc>& p, const Acc* __restrict__ y,
                                                            Out* __restrict__ out, const In* __restrict__ u, Acc d) {
  auto widen = [&](In v) __attribute__((always_inline)) {
    if constexpr (std::is_same<In, uint16_t>::value)
      return static_cast<Acc>(p.in2_kind == ScalarKind::kBFloat16 ? bfloat16_bits_to_float(v)
                                                                  : float16_bits_to_float(v));
    else
      return static_cast<Acc>(v);
  };
  const int64_t L = p.length;
  if constexpr (std::is_same<Out, uint16_t>::value) {
    const bool bf16 = p.out_kind == ScalarKind::kBFloat16;
    for (int64_t l = 0; l < L; ++l) {
      const float v = static_cast<float>(u != nullptr ? y[l] + d * widen(u[l]) : y[l]);
      out[l] = bf16 ? float_to_bfloat16_bits(v) : float_to_float16_bits(v);
    }
  } else if (u != nullptr) {
    for (int64_t l = 0; l < L; ++l) out[l] = static_cast<Out>(y[l] + d * widen(u[l]));
  } else {
    for (int64_t l = 0; l < L; ++l) out[l] = static_cast<Out>(y[l]);
  }
}

template <typename Acc>
FC_CPU_CLONES void fftconv_crop_rows(const FFTConvParams<Acc>& p, int64_t begin, int64_t end) {
  with_element_type(p.out_kind, [&](auto out_tag) __attribute__((always_inline)) {
    using Out = std::remove_pointer_t<decltype(out_tag)>;
    with_element_type(p.in2_kind, [&](auto in_tag) __attribute__((always_inline)) {
      using In = std::remove_pointer_t<decltype(in_tag)>;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t row = p.row_begin + r, base = row * p.length;
        const Acc* y = p.real_buf + r * p.fft_size;
        Out* out = static_cast<Out*>(p.out) + base;
        if (p.skip_D != nullptr)
          fftconv_crop_row<Acc, Out, In>(p, y, out, static_cast<const In*>(p.in2) + base, p.skip_D[row % p.heads]);
        else
          fftconv_crop_row<Acc, Out, In>(p, y, out, nullptr, Acc(0));
      }
    });
  });
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
  fftconv_pad_rows(p, begin, end);
}

template <typename Acc>
void fftconv_cmul_cpu(const FFTConvParams<Acc>& p, int64_t begin, int64_t end) {
  fftconv_cmul_rows(p, begin, end);
}

template <typename Acc>
void fftconv_crop_skip_cpu(const FFTConvParams<Acc>& p, int64_t begin, int64_t end) {
  fftconv_crop_rows(p, begin, end);
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
    ssm_step_float_heads(p, begin, end);
  } else {
    for (int64_t h = begin; h < end; ++h)
      for (int64_t b = 0; b < p.batch; ++b) ssm_step_row<T>(p, b * p.heads + h);
  }
}

template <typename T>
void ssm_step_backward_cpu(const StepParams<T>& p, int64_t begin, int64_t end) {
  for (int64_t h = begin; h < end; ++h) ssm_step_backward_head<T>(p, h);
}

#define FC_S4_INSTANTIATE(T)                                                                                    \
  template void cauchy_forward_cpu<T>(const CauchyParams<T>&, const T*, const T*, int64_t, int64_t);            \
  template void cauchy_backward_cpu<T>(const CauchyParams<T>&, const T*, const T*, const T*, const T*, int64_t, \
                                       int64_t);                                                                \
  template void vandermonde_forward_cpu<T>(const VandermondeParams<T>&, int64_t, int64_t);                      \
  template void vandermonde_backward_cpu<T>(const VandermondeParams<T>&, int64_t, int64_t);                     \
  template void fftconv_pad_cast_cpu<T>(const FFTConvParams<T>&, int64_t, int64_t);                             \
  template void fftconv_cmul_cpu<T>(const FFTConvParams<T>&, int64_t, int64_t);                                 \
  template void fftconv_crop_skip_cpu<T>(const FFTConvParams<T>&, int64_t, int64_t);                            \
  template void fftconv_grad_spectra_cpu<T>(const FFTConvParams<T>&, int64_t, int64_t);                         \
  template void fftconv_row_dot_cpu<T>(const FFTConvParams<T>&, int64_t, int64_t);                              \
  template void ssm_step_cpu<T>(const StepParams<T>&, int64_t, int64_t);                                        \
  template void ssm_step_backward_cpu<T>(const StepParams<T>&, int64_t, int64_t);

FC_S4_INSTANTIATE(float)
FC_S4_INSTANTIATE(double)
#undef FC_S4_INSTANTIATE

}  // namespace s4
}  // namespace fastcore
