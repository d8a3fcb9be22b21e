// The CUDA grouped-GEMM helpers of the MoE glue (defined in moe_grouped_mlp.cpp, used by moe_experts.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace fastcore {
namespace moe {

#ifdef FASTCORE_WITH_CUDA
// h [S, I] (x's dtype) = act(A[row(r)] W_gate[e]ᵀ) ⊙ (A[row(r)] W_up[e]ᵀ) per expert segment of
// expert_offsets (int64 [E + 1] on the device), row(r) = a_rows[r] or r; gate_up_out [S, N1] float32 or nullptr.
void cuda_gate_up(const at::Tensor& a, const int64_t* a_rows, const at::Tensor& expert_offsets,
                  const at::Tensor& w_gate_up, int64_t inner, bool gated, int64_t activation, float* gate_up_out,
                  at::Tensor& h, const char* op);
// y [S, H] (row stride y.stride(0)) = row_scale[r] · h[r] W_down[e]ᵀ per expert segment (row_scale may be null).
void cuda_down(const at::Tensor& h, const at::Tensor& expert_offsets, const at::Tensor& w_down, const float* row_scale,
               at::Tensor& y, const char* op);
#endif

// moe_dispatch.cpp: the plan (and, with gather, x_sorted) of moe_dispatch.
std::vector<at::Tensor> dispatch_impl(const at::Tensor& x, const at::Tensor& expert_ids,
                                      const std::optional<at::Tensor>& kept, int64_t num_experts, bool gather);
at::Tensor combine(const at::Tensor& y_sorted, const at::Tensor& token_slot, const std::optional<at::Tensor>& weights);

}  // namespace moe
}  // namespace fastcore
