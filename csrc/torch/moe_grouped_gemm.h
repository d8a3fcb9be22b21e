// Helpers shared by the MoE glue files: expert-segment iteration for the CPU paths (here), the CUDA
// grouped-GEMM launchers (defined in moe_grouped_mlp.cpp) and the dispatch plan / combine (moe_dispatch.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <vector>

#include "tensor_params.h"

namespace fastcore {
namespace moe {

// expert_offsets [E + 1] (int64, CPU) as a vector, checked: starts at 0, ends at S = rows, non-decreasing.
inline std::vector<int64_t> segment_bounds(const at::Tensor& expert_offsets, int64_t rows, const char* op) {
  FC_CHECK(expert_offsets.device().is_cpu() && expert_offsets.scalar_type() == at::kLong && expert_offsets.dim() == 1,
           op, "expert_offsets must be an int64 CPU tensor [E + 1]");
  at::Tensor offsets = expert_offsets.contiguous();
  std::vector<int64_t> bounds(offsets.data_ptr<int64_t>(), offsets.data_ptr<int64_t>() + offsets.numel());
  FC_CHECK(!bounds.empty() && bounds.front() == 0 && bounds.back() == rows, op,
           "expert_offsets must start at 0 and end at S = ", rows);
  for (size_t e = 1; e < bounds.size(); ++e)
    FC_CHECK(bounds[e] >= bounds[e - 1], op, "expert_offsets must be non-decreasing (entry ", e, ")");
  return bounds;
}

// Calls fn(e, begin, rows) for every expert segment that holds rows, in expert order.
template <typename Fn>
void for_each_segment(const std::vector<int64_t>& bounds, Fn&& fn) {
  for (size_t e = 0; e + 1 < bounds.size(); ++e)
    if (bounds[e + 1] > bounds[e]) fn(static_cast<int64_t>(e), bounds[e], bounds[e + 1] - bounds[e]);
}

// Parallel over expert segments from this many non-empty ones on: a function of the shapes only (never
// of the thread count), so the same GEMM calls run whatever torch.get_num_threads() says.
constexpr int64_t kMinParallelSegments = 8;

// Calls fn(e, begin, rows, threaded) for every non-empty expert segment. With many segments they run in
// parallel (at::parallel_for; BLAS and fn's row loops single-threaded inside: small expert GEMMs scale
// better that way); with few, one after another with threaded = true (fn's loops and BLAS use every thread).
template <typename Fn>
void for_each_segment_work(const std::vector<int64_t>& bounds, Fn&& fn) {
  std::vector<int64_t> active;
  for (size_t e = 0; e + 1 < bounds.size(); ++e)
    if (bounds[e + 1] > bounds[e]) active.push_back(static_cast<int64_t>(e));
  const int64_t n = static_cast<int64_t>(active.size());
  if (n >= kMinParallelSegments) {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t end) {
      // Worker threads do not inherit the caller's dispatch state: skip autograd explicitly (weights may
      // be parameters that require grad; this is a kernel, not a graph).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t i = b; i < end; ++i) {
        const int64_t e = active[i];
        fn(e, bounds[e], bounds[e + 1] - bounds[e], false);
      }
    });
  } else {
    for (const int64_t e : active) fn(e, bounds[e], bounds[e + 1] - bounds[e], true);
  }
}

// Runs body(b, end) over rows [begin, begin + rows), split across threads when `threaded`.
template <typename Body>
void rows_loop(int64_t begin, int64_t rows, bool threaded, Body&& body) {
  if (threaded) {
    at::parallel_for(begin, begin + rows, 64, body);
  } else {
    body(begin, begin + rows);
  }
}

// The CUDA grouped-GEMM launchers (a build without CUDA raises the no-CUDA error at the launch).
// h [S, I] (x's dtype) = act(A[row(r)] W_gate[e]ᵀ) ⊙ (A[row(r)] W_up[e]ᵀ) per expert segment of
// expert_offsets (int64 [E + 1] on the device), row(r) = a_rows[r] or r; gate_up_out [S, N1] float32 or nullptr.
void cuda_gate_up(const at::Tensor& a, const int64_t* a_rows, const at::Tensor& expert_offsets,
                  const at::Tensor& w_gate_up, int64_t inner, bool gated, int64_t activation, float* gate_up_out,
                  at::Tensor& h, const char* op);
// y [S, H] (row stride y.stride(0)) = row_scale[r] · h[r] W_down[e]ᵀ per expert segment (row_scale may be null).
void cuda_down(const at::Tensor& h, const at::Tensor& expert_offsets, const at::Tensor& w_down, const float* row_scale,
               at::Tensor& y, const char* op);

// moe_dispatch.cpp: the plan (and, with gather, x_sorted) of moe_dispatch.
std::vector<at::Tensor> dispatch_impl(const at::Tensor& x, const at::Tensor& expert_ids,
                                      const std::optional<at::Tensor>& kept, int64_t num_experts, bool gather);
at::Tensor combine(const at::Tensor& y_sorted, const at::Tensor& token_slot, const std::optional<at::Tensor>& weights);

}  // namespace moe
}  // namespace fastcore
