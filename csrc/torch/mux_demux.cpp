// Torch glue of the DataMUX mux / demux ops (CPU). The Hadamard mux and the demux epilogue run in the
// torch-free kernels of csrc/kernels/mux/mux_demux_cpu.cpp; the orthogonal mux and the two small demux
// GEMMs (A = p W_Lᵀ + bias, once per index; C = h W_Rᵀ, once per token) are ATen GEMMs.
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <optional>

#include "mux/mux_demux.h"
#include "tensor_params.h"

namespace fastcore {
namespace mux {
namespace {

constexpr const char* kMux = "mux";
constexpr const char* kDemux = "demux";

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  FC_CHECK(t.device().is_cpu(), op, name, " must be a CPU tensor for the cpu backend, got ", t.device());
}

// Φ [N, e, c] -> W [N·c, e] with W[(i, c), e] = Φ[i, e, c], so that mux = X' W with X'[(b, l), (i, c)].
at::Tensor ortho_weight(const at::Tensor& keys) {
  const int64_t N = keys.size(0), d = keys.size(1);
  return keys.permute({0, 2, 1}).reshape({N * d, d});
}

at::Tensor ortho_rows(const at::Tensor& x) {  // [B, N, L, d] -> [B·L, N·d]
  const int64_t B = x.size(0), N = x.size(1), L = x.size(2), d = x.size(3);
  return x.permute({0, 2, 1, 3}).reshape({B * L, N * d});
}

}  // namespace

// x [B, N, L, d], keys [N, d] (mode 0, Hadamard) or [N, d, d] (mode 1, orthogonal) -> [B, L, d].
at::Tensor mux_forward(const at::Tensor& x, const at::Tensor& keys, int64_t mode) {
  FC_CHECK(x.dim() == 4, kMux, "x must be [B, N, L, d]");
  check_cpu(x, kMux, "x");
  scalar_kind_of(x, kMux, "x");
  FC_CHECK(keys.scalar_type() == x.scalar_type() && keys.device() == x.device(), kMux,
           "keys must match x's dtype and device");
  const int64_t B = x.size(0), N = x.size(1), L = x.size(2), d = x.size(3);
  FC_CHECK(N >= 1, kMux, "x must have N >= 1 instances");
  if (mode == 1) {
    FC_CHECK(keys.dim() == 3 && keys.size(0) == N && keys.size(1) == d && keys.size(2) == d, kMux,
             "keys must be [N, d, d]");
    return at::matmul(ortho_rows(x), ortho_weight(keys)).div_(std::sqrt(static_cast<double>(N))).reshape({B, L, d});
  }
  FC_CHECK(keys.dim() == 2 && keys.size(0) == N && keys.size(1) == d, kMux, "keys must be [N, d]");
  at::Tensor xc = x.contiguous(), kc = keys.contiguous();
  at::Tensor out = at::empty({B, L, d}, x.options());
  if (B * L * d == 0) return out;
  HadamardMuxParams p;
  p.x = xc.data_ptr();
  p.x_kind = scalar_kind_of(x, kMux, "x");
  p.keys = kc.data_ptr();
  p.batch = B;
  p.instances = N;
  p.length = L;
  p.dim = d;
  p.out = out.data_ptr();
  at::parallel_for(0, B * L, std::max<int64_t>(1, 8192 / std::max<int64_t>(N * d, 1)),
                   [&](int64_t b, int64_t e) { hadamard_mux_forward_cpu(p, b, e); });
  return out;
}

// (grad_x [B, N, L, d], grad_keys (keys' shape, or an empty tensor when not need_keys)).
std::vector<at::Tensor> mux_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& keys,
                                     int64_t mode, bool need_keys) {
  FC_CHECK(x.dim() == 4 && grad_out.dim() == 3, kMux, "x must be [B, N, L, d] and grad_out [B, L, d]");
  check_cpu(x, kMux, "x");
  const int64_t B = x.size(0), N = x.size(1), L = x.size(2), d = x.size(3);
  FC_CHECK(grad_out.size(0) == B && grad_out.size(1) == L && grad_out.size(2) == d &&
               grad_out.scalar_type() == x.scalar_type(),
           kMux, "grad_out must be [B, L, d] in x's dtype");
  if (mode == 1) {
    const double inv = 1.0 / std::sqrt(static_cast<double>(N));
    at::Tensor g = grad_out.reshape({B * L, d});
    at::Tensor gx =
        at::matmul(g, ortho_weight(keys).t()).mul_(inv).reshape({B, L, N, d}).permute({0, 2, 1, 3}).contiguous();
    at::Tensor gk = need_keys
                        ? at::matmul(ortho_rows(x).t(), g).mul_(inv).reshape({N, d, d}).permute({0, 2, 1}).contiguous()
                        : at::empty({0}, keys.options());
    return {gx, gk};
  }
  const auto acc = accumulate_type_of(x);
  at::Tensor xc = x.contiguous(), kc = keys.contiguous(), gc = grad_out.contiguous();
  at::Tensor gx = at::empty({B, N, L, d}, x.options());
  at::Tensor partial = need_keys ? at::empty({B, N, d}, x.options().dtype(acc)) : at::Tensor();
  HadamardMuxParams p;
  p.x = xc.data_ptr();
  p.x_kind = scalar_kind_of(x, kMux, "x");
  p.keys = kc.data_ptr();
  p.batch = B;
  p.instances = N;
  p.length = L;
  p.dim = d;
  p.grad_out = gc.data_ptr();
  p.grad_x = gx.data_ptr();
  p.grad_keys_partial = need_keys ? partial.data_ptr() : nullptr;
  if (B * N * d > 0) at::parallel_for(0, B * N, 1, [&](int64_t b, int64_t e) { hadamard_mux_backward_cpu(p, b, e); });
  at::Tensor gk = need_keys ? (B > 0 ? partial.sum(0) : at::zeros({N, d}, partial.options())).to(keys.scalar_type())
                            : at::empty({0}, keys.options());
  return {gx, gk};
}

namespace {

struct DemuxInputs {
  at::Tensor a, c, gamma, beta;  // Acc; c is undefined when the forward computes it per chunk
  at::Tensor h_rows, w_right_t;  // h [B·L, d] and W_Rᵀ [d, e] in Acc, for C = h W_Rᵀ
  int64_t B, N, L, d, e;
  bool shared_keys;
};

DemuxInputs demux_prepare(const at::Tensor& h, const at::Tensor& keys, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& norm_weight, const at::Tensor& norm_bias, bool compute_c = true) {
  FC_CHECK(h.dim() == 3, kDemux, "h must be [B, L, d]");
  check_cpu(h, kDemux, "h");
  scalar_kind_of(h, kDemux, "h");
  const int64_t B = h.size(0), L = h.size(1), d = h.size(2);
  FC_CHECK((keys.dim() == 2 && keys.size(1) == d) || (keys.dim() == 3 && keys.size(0) == B && keys.size(2) == d),
           kDemux, "index_keys must be [N, d] or [B, N, d]");
  FC_CHECK(weight.dim() == 2 && weight.size(1) == 2 * d, kDemux, "weight must be [e, 2d]");
  const int64_t e = weight.size(0);
  FC_CHECK(e >= 1 && bias.numel() == e && norm_weight.numel() == e && norm_bias.numel() == e, kDemux,
           "bias, norm_weight, norm_bias must be [e]");
  const auto acc = accumulate_type_of(h);
  DemuxInputs in;
  in.B = B;
  in.L = L;
  in.d = d;
  in.e = e;
  in.shared_keys = keys.dim() == 2;
  in.N = keys.size(keys.dim() - 2);
  at::Tensor w = weight.to(acc);
  // A = p W_Lᵀ + bias: once per index (per (b, i), or per i when the keys are shared)
  in.a = at::addmm(bias.to(acc), keys.to(acc).reshape({-1, d}), w.narrow(1, 0, d).t()).contiguous();
  // C = h W_Rᵀ: once per token
  in.h_rows = h.to(acc).reshape({B * L, d});
  in.w_right_t = w.narrow(1, d, d).t();
  if (compute_c) in.c = at::matmul(in.h_rows, in.w_right_t).contiguous();
  in.gamma = norm_weight.to(acc).contiguous();
  in.beta = norm_bias.to(acc).contiguous();
  return in;
}

DemuxParams demux_params(const DemuxInputs& in, const at::Tensor& h, double eps) {
  DemuxParams p;
  p.a = in.a.data_ptr();
  p.a_batch_stride = in.shared_keys ? 0 : in.N * in.e;
  p.c = in.c.defined() ? in.c.data_ptr() : nullptr;
  p.gamma = in.gamma.data_ptr();
  p.beta = in.beta.data_ptr();
  p.is_double = h.scalar_type() == at::kDouble;
  p.batch = in.B;
  p.instances = in.N;
  p.length = in.L;
  p.dim = in.e;
  p.eps = eps;
  p.out_kind = scalar_kind_of(h, kDemux, "h");
  return p;
}

}  // namespace

// out [B·N, L, e] = LayerNorm(GELU(W [p_i ; h_t] + b)) in h's dtype.
// A task is a chunk of up to kTokenChunk tokens of one sequence b: it computes its rows of the token
// term C = h W_Rᵀ into a per-thread buffer (an ATen GEMM, [chunk, d] × [d, e]) and at once runs the
// epilogue for the N instances of those tokens while C is cache-hot, so C [B, L, e] is never allocated.
at::Tensor demux_forward(const at::Tensor& h, const at::Tensor& keys, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps) {
  // detached: the per-chunk GEMMs write into a buffer (out= ops refuse inputs that require grad); the
  // registered op's autograd formula is the backward below
  DemuxInputs in = demux_prepare(h.detach(), keys.detach(), weight.detach(), bias.detach(), norm_weight.detach(),
                                 norm_bias.detach(), /*compute_c=*/false);
  at::Tensor out = at::empty({in.B * in.N, in.L, in.e}, h.options());
  const DemuxParams p = demux_params(in, h, eps);
  const int64_t B = in.B, N = in.N, L = in.L, e = in.e;
  if (B * N * L == 0) return out;
  constexpr int64_t kTokenChunk = 128;
  const int64_t chunks = (L + kTokenChunk - 1) / kTokenChunk, chunk = (L + chunks - 1) / chunks;
  const int64_t out_row_bytes = e * out.element_size(), a_row_bytes = e * in.a.element_size();
  char* const out_base = static_cast<char*>(out.data_ptr());
  const char* const a_base = static_cast<const char*>(in.a.data_ptr());
  at::parallel_for(0, B * chunks, 1, [&](int64_t task_begin, int64_t task_end) {
    at::Tensor c_rows = at::empty({chunk, e}, in.a.options());
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t b = task / chunks, t0 = (task % chunks) * chunk, n = std::min(chunk, L - t0);
      at::Tensor c = c_rows.narrow(0, 0, n);
      at::mm_out(c, in.h_rows.narrow(0, b * L + t0, n), in.w_right_t);
      // the epilogue of rows (b·N + i, t0 … t0 + n − 1) for each i: a one-index, n-token sub-problem
      DemuxParams sub = p;
      sub.batch = 1;
      sub.instances = 1;
      sub.length = n;
      sub.c = c.data_ptr();
      for (int64_t i = 0; i < N; ++i) {
        const int64_t a_row = (in.shared_keys ? 0 : b * N) + i;  // A is [N, e] (shared keys) or [B·N, e]
        sub.a = a_base + a_row * a_row_bytes;
        sub.out = out_base + ((b * N + i) * L + t0) * out_row_bytes;
        demux_forward_cpu(sub, 0, n);
      }
    }
  });
  return out;
}

// Gradients for (h, index_keys, weight, bias, norm_weight, norm_bias), each in its input's dtype.
std::vector<at::Tensor> demux_backward(const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& keys,
                                       const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& norm_weight,
                                       const at::Tensor& norm_bias, double eps) {
  DemuxInputs in = demux_prepare(h, keys, weight, bias, norm_weight, norm_bias);
  FC_CHECK(grad_out.dim() == 3 && grad_out.size(0) == in.B * in.N && grad_out.size(1) == in.L &&
               grad_out.size(2) == in.e && grad_out.scalar_type() == h.scalar_type(),
           kDemux, "grad_out must be [B·N, L, e] in h's dtype");
  const auto acc = accumulate_type_of(h);
  const int64_t B = in.B, N = in.N, L = in.L, d = in.d, e = in.e;
  at::Tensor go = grad_out.contiguous();
  at::Tensor dA = at::empty({B, N, e}, h.options().dtype(acc)), dC = at::empty({B, L, e}, h.options().dtype(acc));
  at::Tensor dgamma = at::empty({B, e}, h.options().dtype(acc)), dbeta = at::empty({B, e}, h.options().dtype(acc));
  DemuxParams p = demux_params(in, h, eps);
  p.grad_out = go.data_ptr();
  p.grad_a = dA.data_ptr();
  p.grad_c = dC.data_ptr();
  p.grad_gamma_partial = dgamma.data_ptr();
  p.grad_beta_partial = dbeta.data_ptr();
  if (B > 0) at::parallel_for(0, B, 1, [&](int64_t b, int64_t end) { demux_backward_cpu(p, b, end); });
  at::Tensor w = weight.to(acc);
  at::Tensor wl = w.narrow(1, 0, d), wr = w.narrow(1, d, d);
  at::Tensor keys_acc = keys.to(acc);
  at::Tensor dA_keys = in.shared_keys ? dA.sum(0) : dA;  // [N, e] or [B, N, e]
  at::Tensor g_keys = at::matmul(dA_keys, wl);           // dp = dA W_L
  at::Tensor g_wl = at::matmul(dA_keys.reshape({-1, e}).t(), keys_acc.reshape({-1, d}));
  at::Tensor g_bias = dA.sum({0, 1});
  at::Tensor g_h = at::matmul(dC, wr);  // dh = dC W_R
  at::Tensor g_wr = at::matmul(dC.reshape({B * L, e}).t(), h.to(acc).reshape({B * L, d}));
  at::Tensor g_w = at::cat({g_wl, g_wr}, 1);
  return {g_h.to(h.scalar_type()),
          g_keys.to(keys.scalar_type()),
          g_w.to(weight.scalar_type()),
          g_bias.to(bias.scalar_type()).reshape(bias.sizes()),
          dgamma.sum(0).to(norm_weight.scalar_type()).reshape(norm_weight.sizes()),
          dbeta.sum(0).to(norm_bias.scalar_type()).reshape(norm_bias.sizes())};
}

}  // namespace mux

void bind_mux_demux(pybind11::module_& m) {
  m.def("mux_mux", &mux::mux_forward, "DataMUX mux (mode 0 Hadamard, 1 orthogonal), CPU");
  m.def("mux_mux_backward", &mux::mux_backward, "DataMUX mux backward: (grad_x, grad_keys), CPU");
  m.def("mux_demux", &mux::demux_forward, "DataMUX index demux (separable GEMMs + fused GELU/LayerNorm), CPU");
  m.def("mux_demux_backward", &mux::demux_backward, "DataMUX index demux backward (6 gradients), CPU");
}

}  // namespace fastcore
