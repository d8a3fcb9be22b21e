// Torch glue of the fused attention: checks what the kernels rely on, allocation, params filling, and
// the CPU (at::parallel_for) or CUDA launches. User-facing validation with full messages lives in
// fastcore_ai.ops.mux; these checks guard the kernels when _C is called directly.
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <optional>

#include "cuda_call.h"
#include "mux/attention.h"
#include "tensor_params.h"

namespace fastcore {
namespace mux {
namespace {

constexpr const char* kOp = "attention";

void fill_strides(int64_t* dst, const at::Tensor& t) {
  for (int64_t d = 0; d < t.dim(); ++d) dst[d] = t.stride(d);
}

// Validates q, k, v, the masks, and fills everything but the outputs.
AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding,
                            bool causal, double scale, at::Tensor& mask_holder) {
  FC_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, kOp, "q, k, v must be 4-D [B, H, L, D]");
  const ScalarKind kind = scalar_kind_of(q, kOp, "q");
  FC_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), kOp,
           "q, k, v must have one dtype");
  FC_CHECK(k.device() == q.device() && v.device() == q.device(), kOp, "q, k, v must be on one device");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2), Hk = k.size(1);
  FC_CHECK(k.size(0) == B && Hk >= 1 && H % Hk == 0 && k.size(3) == D && v.sizes() == k.sizes(), kOp,
           "k and v must have shape [B, H_kv, Lk, D] matching q [B, H, Lq, D], H_kv dividing H");
  FC_CHECK(D >= 1 && D <= kMaxHeadDim, kOp, "head size D must satisfy 1 <= D <= ", kMaxHeadDim, ", got ", D);
  AttentionParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.kind = kind;
  fill_strides(p.q_stride, q);
  fill_strides(p.k_stride, k);
  fill_strides(p.v_stride, v);
  p.batch = B;
  p.heads = H;
  p.kv_heads = Hk;
  p.len_q = Lq;
  p.len_k = Lk;
  p.head_dim = D;
  p.causal = causal;
  p.scale = scale;
  if (attn_mask.has_value()) {
    at::Tensor m = *attn_mask;
    FC_CHECK(m.dim() <= 4 && m.device() == q.device(), kOp,
             "attn_mask must be broadcastable to [B, H, Lq, Lk] on q's device");
    while (m.dim() < 4) m = m.unsqueeze(0);
    mask_holder = m.expand({B, H, Lq, Lk});
    fill_strides(p.mask_stride, mask_holder);
    p.mask = mask_holder.data_ptr();
    if (m.scalar_type() == at::kBool) {
      p.mask_kind = MaskKind::kBool;
    } else {
      p.mask_kind = MaskKind::kAdditive;
      p.mask_scalar = scalar_kind_of(m, kOp, "attn_mask");
    }
  }
  if (key_padding.has_value()) {
    const at::Tensor& kp = *key_padding;
    FC_CHECK(kp.dim() == 2 && kp.size(0) == B && kp.size(1) == Lk && kp.scalar_type() == at::kBool &&
                 kp.device() == q.device(),
             kOp, "key_padding_mask must be bool [B, Lk]");
    p.key_padding = kp.data_ptr<bool>();
    p.key_padding_stride[0] = kp.stride(0);
    p.key_padding_stride[1] = kp.stride(1);
  }
  return p;
}

// The tensor-core (WMMA) kernels take float16 / bfloat16 on sm_80+ devices.
bool uses_tensor_cores(const at::Tensor& q) {
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) return false;
  return cuda_capability_major(q.device(), kOp) >= 8;
}

// Stacked query rows per forward task (rows = G·Lq per kv head, attention.h): a short sequence's whole
// query block (K/V of the kv head are packed once per task, so bigger tiles amortise the packing), halved
// until there are ≥ 4 tasks per thread.
int64_t choose_q_tile(int64_t B, int64_t Hk, int64_t rows) {
  int64_t tile = rows <= 192 ? std::max<int64_t>(rows, 1) : 128;
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  while (tile > 16 && B * Hk * ((rows + tile - 1) / tile) < want) tile = (tile + 1) / 2;
  return tile;
}

// Threads worth waking for `flops` multiply-adds: each must get at least kMinWork of them, since waking a
// pool thread and joining it costs about as much as that much work (tiny and decode calls run inline).
int64_t useful_threads(double flops) {
  constexpr double kMinWork = 1 << 17;
  return std::max<int64_t>(1, static_cast<int64_t>(flops / kMinWork));
}

// Runs kernel(p, task, task + 1, next) over the tasks [0, tasks) on the at::parallel_for threads, one
// task at a time from a shared counter instead of one fixed slice per thread: on a machine where another
// process holds a core for a while, the thread that keeps running takes the remaining tasks instead of
// the call waiting for the slowed thread's slice. A thread claims its next task before running the
// current one and passes it along, so the kernel can prefetch that task's inputs. Every task writes only
// its own outputs in a fixed order, so the results do not depend on which thread ran it (or on the
// thread count).
template <typename Kernel>
void run_tasks(const AttentionParams& p, int64_t tasks, Kernel kernel, double flops) {
  const int64_t workers = std::min<int64_t>({tasks, at::get_num_threads(), useful_threads(flops)});
  if (workers <= 1) {  // on the calling thread, no pool wake-up
    for (int64_t task = 0; task < tasks; ++task) kernel(p, task, task + 1, task + 1 < tasks ? task + 1 : -1);
    return;
  }
  std::atomic<int64_t> counter{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      int64_t task = counter.fetch_add(1);
      while (task < tasks) {
        const int64_t next = counter.fetch_add(1);
        kernel(p, task, task + 1, next < tasks ? next : -1);
        task = next;
      }
    }
  });
}

}  // namespace

// (out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] float32 (float64 for float64 q)).
std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& attn_mask,
                                          const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                          double scale) {
  at::Tensor mask_holder;
  AttentionParams p = make_params(q, k, v, attn_mask, key_padding_mask, causal, scale, mask_holder);
  at::Tensor out = at::empty({p.batch, p.heads, p.len_q, p.head_dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.len_q}, q.options().dtype(accumulate_type_of(q)));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  if (p.batch * p.heads * p.len_q == 0) return {out, lse};
  if (q.is_cuda()) {
    require_cuda(kOp);
    FC_CHECK(q.scalar_type() != at::kDouble, kOp, "the cuda backend takes float32, float16 or bfloat16, got float64");
    // float16 / bfloat16 on sm_80+: the tensor-core (WMMA) forward; float32 (and older GPUs): SIMT.
    const bool tensor_cores = uses_tensor_cores(q);
    FC_CUDA_CALL(
        kOp, "forward launch", q.device(),
        tensor_cores ? attention_forward_wmma_cuda(p, current_stream()) : attention_forward_cuda(p, current_stream()));
  } else {
    p.q_tile = choose_q_tile(p.batch, attention_kv_heads(p), attention_group(p) * p.len_q);
    p.kv_block = 512;
    const int64_t tasks = attention_forward_tasks(p);
    run_tasks(p, tasks, attention_forward_cpu, 2.0 * p.batch * p.heads * p.len_q * p.len_k * p.head_dim);
  }
  return {out, lse};
}

// (grad_q, grad_k, grad_v) in q's dtype, and the additive attn_mask's gradient in its shape and dtype
// (need_mask_grad; CPU only) or an empty tensor; out and lse are what attention_forward returned.
std::vector<at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                           const std::optional<at::Tensor>& attn_mask,
                                           const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
                                           bool need_mask_grad) {
  at::Tensor mask_holder;
  AttentionParams p = make_params(q, k, v, attn_mask, key_padding_mask, causal, scale, mask_holder);
  FC_CHECK(!need_mask_grad || (attn_mask.has_value() && p.mask_kind == MaskKind::kAdditive), kOp,
           "the attn_mask gradient needs an additive (float) attn_mask");
  FC_CHECK(!need_mask_grad || q.device().is_cpu(), kOp,
           "the additive attn_mask gradient is computed by the cpu and reference backends only");
  FC_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type() &&
               out.scalar_type() == q.scalar_type(),
           kOp, "grad_out and out must have q's shape and dtype");
  FC_CHECK(lse.dim() == 3 && lse.size(0) == p.batch && lse.size(1) == p.heads && lse.size(2) == p.len_q &&
               lse.scalar_type() == accumulate_type_of(q),
           kOp, "lse must be [B, H, Lq] in the accumulate dtype");
  at::Tensor go = grad_out.contiguous(), o = out.contiguous(), l = lse.contiguous();
  at::Tensor gq = at::empty(q.sizes(), q.options()), gk = at::empty(k.sizes(), k.options()),
             gv = at::empty(v.sizes(), v.options());
  p.grad_out = go.data_ptr();
  p.out = o.data_ptr();
  p.lse = l.data_ptr();
  p.grad_q = gq.data_ptr();
  p.grad_k = gk.data_ptr();
  p.grad_v = gv.data_ptr();
  // ds [B, H, Lq, Lk] in the accumulate dtype, zero where the kernel skips (causal tiles) or nothing flows
  at::Tensor grad_scores =
      need_mask_grad ? at::zeros({p.batch, p.heads, p.len_q, p.len_k}, q.options().dtype(accumulate_type_of(q)))
                     : at::Tensor();
  p.grad_scores = need_mask_grad ? grad_scores.data_ptr() : nullptr;
  // an additive mask broadcast to [B, H, Lq, Lk] gets ds summed over its broadcast dimensions
  auto mask_grad = [&]() {
    if (!need_mask_grad) return at::empty({0}, q.options());
    return grad_scores.sum_to_size(attn_mask->sizes()).to(attn_mask->scalar_type());
  };
  if (p.batch * p.heads == 0 || (p.len_q == 0 && p.len_k == 0)) return {gq, gk, gv, mask_grad()};
  if (p.len_q == 0 || p.len_k == 0) return {gq.zero_(), gk.zero_(), gv.zero_(), mask_grad()};
  if (q.is_cuda()) {
    require_cuda(kOp);
    FC_CHECK(q.scalar_type() != at::kDouble, kOp, "the cuda backend takes float32, float16 or bfloat16, got float64");
    // float32 δ_i = dO_i · O_i per query row
    at::Tensor workspace = at::empty({p.batch * p.heads * p.len_q}, q.options().dtype(at::kFloat));
    // The CUDA kernels write dK, dV per query head ([B, H, Lk, D]); with grouped kv heads each group's G
    // slices are summed here (float32, a fixed-order reduction).
    const int64_t G = attention_group(p);
    at::Tensor gk_heads = gk, gv_heads = gv;
    if (G > 1) {
      gk_heads = at::empty({p.batch, p.heads, p.len_k, p.head_dim}, k.options());
      gv_heads = at::empty({p.batch, p.heads, p.len_k, p.head_dim}, v.options());
      p.grad_k = gk_heads.data_ptr();
      p.grad_v = gv_heads.data_ptr();
    }
    // float16 / bfloat16 on sm_80+: the tensor-core (WMMA) backward; float32 (and older GPUs): SIMT.
    const bool tensor_cores = uses_tensor_cores(q);
    FC_CUDA_CALL(kOp, "backward launch", q.device(),
                 tensor_cores ? attention_backward_wmma_cuda(p, workspace.data_ptr(), current_stream())
                              : attention_backward_cuda(p, workspace.data_ptr(), current_stream()));
    if (G > 1) {
      const std::vector<int64_t> grouped = {p.batch, attention_kv_heads(p), G, p.len_k, p.head_dim};
      gk = gk_heads.view(grouped).sum(2, false, at::kFloat).to(k.scalar_type());
      gv = gv_heads.view(grouped).sum(2, false, at::kFloat).to(v.scalar_type());
    }
  } else {
    p.kv_block = 512;
    run_tasks(p, p.batch * attention_kv_heads(p), attention_backward_cpu,
              5.0 * p.batch * p.heads * p.len_q * p.len_k * p.head_dim);
  }
  return {gq, gk, gv, mask_grad()};
}

}  // namespace mux

void bind_mux_attention(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("mux_attention", &mux::attention_forward, "fused attention forward: (out, lse)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("attn_mask"), py::arg("key_padding_mask"), py::arg("causal"), py::arg("scale"));
  m.def("mux_attention_backward", &mux::attention_backward,
        "fused attention backward: (dq, dk, dv, d attn_mask (empty unless need_mask_grad))");
}

}  // namespace fastcore
