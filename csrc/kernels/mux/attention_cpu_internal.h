// Private header of the CPU fused attention (attention_cpu.cpp: the generic path and the dispatch;
// attention_avx512_cpu.cpp: the AVX-512 float32 path): the row loads/stores, mask terms, packing and
// per-thread forward scratch both paths use, and the AVX-512 bodies' declarations. The dispatch calls
// them only inside `if constexpr (kAttentionAvx512)` when active_cpu_isa() (fastcore/cpu_isa.h) is
// AVX-512; the declarations carry the definitions' target attribute (FC_TARGET).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "fastcore/cpu_isa.h"
#include "mux/attention.h"
#include "fastcore/common.h"

#define FC_ALWAYS_INLINE inline __attribute__((always_inline))

// The AVX-512 path is built by GCC (as before the split; clang builds take the generic path).
#if FC_CPU_X86 && !defined(__clang__)
#define FC_ATTENTION_AVX512 1
#else
#define FC_ATTENTION_AVX512 0
#endif

namespace fastcore {
namespace mux {
namespace detail {

inline constexpr bool kAttentionAvx512 = FC_ATTENTION_AVX512 != 0;

// The free helpers below are static (a private copy per file, as when both paths lived in one file):
// shared vague-linkage copies, although always inlined, changed the callers' register allocation.

static inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Row loads in the input dtype, widened to T (one dtype switch per row, not per element).
template <typename T>
static FC_ALWAYS_INLINE void load_row(const void* base, ScalarKind kind, int64_t offset, int64_t stride, int64_t n,
                                      T scale, T* dst) {
  switch (kind) {
    case ScalarKind::kFloat32: {
      const float* src = static_cast<const float*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(src[c * stride]) * scale;
      break;
    }
    case ScalarKind::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(float16_bits_to_float(src[c * stride])) * scale;
      break;
    }
    case ScalarKind::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(bfloat16_bits_to_float(src[c * stride])) * scale;
      break;
    }
    case ScalarKind::kFloat64:
    default: {
      const double* src = static_cast<const double*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(src[c * stride]) * scale;
      break;
    }
  }
}

template <typename T>
static FC_ALWAYS_INLINE void store_row(void* base, ScalarKind kind, int64_t offset, int64_t n, T scale, const T* src) {
  if (kind == ScalarKind::kFloat32) {
    float* dst = static_cast<float*>(base) + offset;
    for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<float>(src[c] * scale);
  } else if (kind == ScalarKind::kFloat64) {
    double* dst = static_cast<double*>(base) + offset;
    for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<double>(src[c] * scale);
  } else {
    for (int64_t c = 0; c < n; ++c) store_as<T>(base, kind, offset + c, src[c] * scale);
  }
}

static inline bool has_bias(const AttentionParams& p) {
  return p.mask_kind != MaskKind::kNone || p.key_padding != nullptr || p.causal;
}

// Adds the mask terms of query row `qi` to scores s[0, n) of keys j0 .. j0 + n − 1 (−inf where masked).
template <typename T>
static FC_ALWAYS_INLINE void add_bias(const AttentionParams& p, int64_t b, int64_t h, int64_t qi, int64_t j0, int64_t n,
                                      T* s) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  if (p.mask_kind != MaskKind::kNone) {
    const int64_t base = b * p.mask_stride[0] + h * p.mask_stride[1] + qi * p.mask_stride[2];
    const int64_t stride = p.mask_stride[3];
    if (p.mask_kind == MaskKind::kBool) {
      const bool* mask = static_cast<const bool*>(p.mask) + base;
      for (int64_t j = 0; j < n; ++j)
        if (!mask[(j0 + j) * stride]) s[j] = neg_inf;
    } else {
      for (int64_t j = 0; j < n; ++j) s[j] += load_as<T>(p.mask, p.mask_scalar, base + (j0 + j) * stride);
    }
  }
  if (p.key_padding != nullptr) {
    const bool* pad = p.key_padding + b * p.key_padding_stride[0];
    for (int64_t j = 0; j < n; ++j)
      if (pad[(j0 + j) * p.key_padding_stride[1]]) s[j] = neg_inf;
  }
  if (p.causal)
    for (int64_t j = std::max<int64_t>(0, qi + 1 - j0); j < n; ++j) s[j] = neg_inf;
}

// Stacked query rows (attention.h): the G query heads of kv head hk form G·Lq rows, row r = g·Lq + i
// being query i of head hk·G + g. Calls f(h, i0, count, at) for each run of rows [at, at + count) of
// the range [r0, r0 + rows) that belongs to one query head h (its queries i0 .. i0 + count − 1).
template <typename F>
static FC_ALWAYS_INLINE void for_each_head_run(const AttentionParams& p, int64_t hk, int64_t r0, int64_t rows, F&& f) {
  const int64_t G = attention_group(p), Lq = p.len_q;
  for (int64_t r = r0; r < r0 + rows;) {
    const int64_t i0 = r % Lq, count = std::min(r0 + rows - r, Lq - i0);
    f(hk * G + r / Lq, i0, count, r - r0);
    r += count;
  }
}

// The largest query index among stacked rows [r0, r0 + rows) (how far right the causal rule reaches).
static inline int64_t last_query(const AttentionParams& p, int64_t r0, int64_t rows) {
  const int64_t last = r0 + rows - 1;
  return r0 / p.len_q == last / p.len_q ? last % p.len_q : p.len_q - 1;
}

// Packs keys j0 .. j0 + n − 1 of head (b, h): Kt [D, n_pad] (transposed, zero-padded columns) when kt
// is given, Krow [n, D_pad] (zero-padded) when krow is given; likewise any [L, D] input.
template <typename T>
static FC_ALWAYS_INLINE void pack_rows(const void* base, ScalarKind kind, const int64_t* stride, int64_t b, int64_t h,
                                       int64_t j0, int64_t n, int64_t D, int64_t d_pad, T scale, T* rows) {
  const int64_t offset = b * stride[0] + h * stride[1];
  for (int64_t j = 0; j < n; ++j) {
    load_row<T>(base, kind, offset + (j0 + j) * stride[2], stride[3], D, scale, rows + j * d_pad);
    for (int64_t c = D; c < d_pad; ++c) rows[j * d_pad + c] = T(0);
  }
}

// The forward's scratch panels, cached per thread between calls and grown on demand (bounded by the tile
// sizes: q_tile ≤ 192, kv_block ≤ 512, D ≤ 256 give at most ≈ 2.3 MB per thread in float): a call then
// allocates only its outputs, and the panels are not zero-filled again on every call. Nothing relies on
// their initial contents: packing writes every element a product reads, padding included.
template <typename T>
struct ForwardScratch {
  std::vector<T> q_panel, q_cols, k_rows, k_cols, v_rows, scores, o_acc, row_max, row_sum;
  static ForwardScratch& of_this_thread() {
    static thread_local ForwardScratch scratch;
    return scratch;
  }
};

template <typename T>
static T* at_least(std::vector<T>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(static_cast<size_t>(size));
  return buffer.data();
}

// attention_avx512_cpu.cpp: attention_forward_cpu / attention_backward_cpu for float32, float16 and
// bfloat16 inputs.
FC_TARGET("avx512f")
void forward_float_avx512(const AttentionParams& p, int64_t task_begin, int64_t task_end, int64_t prefetch_task);
FC_TARGET("avx512f")
void backward_float_avx512(const AttentionParams& p, int64_t task_begin, int64_t task_end, int64_t prefetch_task);

}  // namespace detail
}  // namespace mux
}  // namespace fastcore
