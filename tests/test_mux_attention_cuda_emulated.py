"""The tensor-core (WMMA) forward and backward of the CUDA attention (csrc/kernels/mux/attention.cu,
attention_forward_wmma_cuda, attention_backward_wmma_cuda) checked against the float64 reference on the CPU CUDA emulator of
tests/test_cuda_build.py (kernel source unchanged, launches rewritten), with a functional WMMA stand-in
where each emulated thread holds whole 16×16 fragments: the staging, zero padding of D to a multiple of
16, masked tails, the online softmax, the mask/causal/fully-masked-row rules and the output/LSE stores
are checked, not the hardware fragment layout (the GPU parity tests in tests/test_mux_attention.py do that).

Bounds are those of tests/test_mux_attention.py for 16-bit inputs: relative error vs float64 no worse than
2× torch's SDPA math path in that dtype + 1e-3 (outputs and dQ, dK, dV); LSE (float32) within 1e-2 absolute.
"""

import ctypes
import importlib

import pytest
import torch

from test_cuda_build import WMMA_EMULATION, build_emulated_kernels

ref = importlib.import_module("fastcore_ai.reference.mux")


DRIVER = r"""
#include "attention_emulated.inc"
using namespace fastcore;
using namespace fastcore::mux;
extern "C" int emu_attention_forward_wmma(int kind, const void* q, const void* k, const void* v, const int64_t* qs,
                                          const int64_t* ks, const int64_t* vs, int64_t B, int64_t H, int64_t Lq,
                                          int64_t Lk, int64_t D, const bool* mask, const int64_t* ms, int causal,
                                          double scale, void* out, float* lse) {
  AttentionParams p;
  p.q = q; p.k = k; p.v = v; p.kind = ScalarKind(kind);
  for (int i = 0; i < 4; ++i) { p.q_stride[i] = qs[i]; p.k_stride[i] = ks[i]; p.v_stride[i] = vs[i]; }
  p.batch = B; p.heads = H; p.len_q = Lq; p.len_k = Lk; p.head_dim = D;
  if (mask != nullptr) {
    p.mask = mask; p.mask_kind = MaskKind::kBool;
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = ms[i];
  }
  p.causal = causal != 0; p.scale = scale; p.out = out; p.lse = lse;
  return attention_forward_wmma_cuda(p, nullptr);
}
// out, lse: what the forward returned; grad_out, out contiguous; delta: float32 [B·H·Lq] workspace.
extern "C" int emu_attention_backward_wmma(int kind, const void* q, const void* k, const void* v, const int64_t* qs,
                                           const int64_t* ks, const int64_t* vs, int64_t B, int64_t H, int64_t Lq,
                                           int64_t Lk, int64_t D, const bool* mask, const int64_t* ms, int causal,
                                           double scale, const void* grad_out, const void* out, const float* lse,
                                           void* grad_q, void* grad_k, void* grad_v, float* delta) {
  AttentionParams p;
  p.q = q; p.k = k; p.v = v; p.kind = ScalarKind(kind);
  for (int i = 0; i < 4; ++i) { p.q_stride[i] = qs[i]; p.k_stride[i] = ks[i]; p.v_stride[i] = vs[i]; }
  p.batch = B; p.heads = H; p.len_q = Lq; p.len_k = Lk; p.head_dim = D;
  if (mask != nullptr) {
    p.mask = mask; p.mask_kind = MaskKind::kBool;
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = ms[i];
  }
  p.causal = causal != 0; p.scale = scale; p.out = const_cast<void*>(out); p.lse = const_cast<float*>(lse);
  p.grad_out = grad_out; p.grad_q = grad_q; p.grad_k = grad_k; p.grad_v = grad_v;
  return attention_backward_wmma_cuda(p, delta, nullptr);
}
"""

KIND = {torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def emulated_attention(tmp_path_factory):
    return build_emulated_kernels(
        tmp_path_factory.mktemp("mux_attention_emulator"),
        "mux/attention.cu",
        DRIVER,
        "attention",
        extra_runtime=WMMA_EMULATION,
    )


def _strides(t):
    return (ctypes.c_int64 * 4)(*t.stride())


def run_emulated(lib, q, k, v, mask=None, causal=False):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.full((B, H, Lq, D), float("nan"), dtype=q.dtype)
    lse = torch.full((B, H, Lq), float("nan"), dtype=torch.float32)
    mask_e = mask.expand(B, H, Lq, Lk) if mask is not None else None
    status = lib.emu_attention_forward_wmma(
        KIND[q.dtype],
        ctypes.c_void_p(q.data_ptr()),
        ctypes.c_void_p(k.data_ptr()),
        ctypes.c_void_p(v.data_ptr()),
        _strides(q),
        _strides(k),
        _strides(v),
        *(ctypes.c_int64(x) for x in (B, H, Lq, Lk, D)),
        ctypes.c_void_p(mask_e.data_ptr()) if mask is not None else None,
        _strides(mask_e) if mask is not None else None,
        int(causal),
        ctypes.c_double(D**-0.5),
        ctypes.c_void_p(out.data_ptr()),
        ctypes.c_void_p(lse.data_ptr()),
    )
    assert status == 0, f"emulated attention_forward_wmma_cuda returned cudaError {status}"
    return out, lse


def relative_error(a, e):
    a, e = a.double(), e.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def reference(q, k, v, mask=None, causal=False):
    q64, k64, v64 = (t.double() for t in (q, k, v))
    return ref.attention_with_lse(q64, k64, v64, attn_mask=mask, causal=causal)


def torch_in_dtype(q, k, v, mask=None, causal=False):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


CASES = [  # (B, H, Lq, Lk, D, causal, masked_row)
    (1, 2, 7, 23, 13, False, False),
    (2, 1, 33, 19, 64, False, True),
    (1, 1, 21, 21, 200, True, False),
    (1, 2, 18, 37, 64, True, True),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,H,Lq,Lk,D,causal,masked_row", CASES)
def test_wmma_forward_on_emulator(emulated_attention, dtype, B, H, Lq, Lk, D, causal, masked_row):
    g = torch.Generator().manual_seed(Lq * 31 + D)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(dtype) for L in (Lq, Lk, Lk))
    mask = None
    if masked_row:
        mask = torch.ones(Lq, Lk, dtype=torch.bool)
        mask[3] = False  # row 3 sees no key
        mask[5, ::2] = False
    out, lse = run_emulated(emulated_attention, q, k, v, mask, causal)
    expected, expected_lse = reference(q, k, v, mask, causal)
    if masked_row:
        assert torch.all(out[:, :, 3] == 0) and torch.all(torch.isneginf(lse[:, :, 3]))
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    rows = [i for i in range(Lq) if not (masked_row and i == 3)]
    tmask = mask[rows] if mask is not None else None
    if causal:  # the in-dtype comparison uses an explicit causal mask for Lq != Lk (top-left aligned)
        cm = torch.ones(Lq, Lk, dtype=torch.bool).tril()[rows]
        tmask = cm if tmask is None else (tmask & cm)
    torch_out = torch_in_dtype(q[:, :, rows], k, v, tmask)
    bound = 2 * relative_error(torch_out, expected[:, :, rows]) + 1e-3
    assert out.dtype == dtype
    assert relative_error(out[:, :, rows], expected[:, :, rows]) <= bound
    assert torch.allclose(lse[:, :, rows].double(), expected_lse[:, :, rows], atol=1e-2, rtol=0)


def run_emulated_backward(lib, q, k, v, grad_out, out, lse, mask=None, causal=False):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    grads = [torch.full(t.shape, float("nan"), dtype=q.dtype) for t in (q, k, v)]
    delta = torch.full((B * H * Lq,), float("nan"), dtype=torch.float32)
    mask_e = mask.expand(B, H, Lq, Lk) if mask is not None else None
    grad_out, out = grad_out.contiguous(), out.contiguous()
    status = lib.emu_attention_backward_wmma(
        KIND[q.dtype],
        *(ctypes.c_void_p(t.data_ptr()) for t in (q, k, v)),
        _strides(q),
        _strides(k),
        _strides(v),
        *(ctypes.c_int64(x) for x in (B, H, Lq, Lk, D)),
        ctypes.c_void_p(mask_e.data_ptr()) if mask is not None else None,
        _strides(mask_e) if mask is not None else None,
        int(causal),
        ctypes.c_double(D**-0.5),
        *(ctypes.c_void_p(t.data_ptr()) for t in (grad_out, out, lse, *grads, delta)),
    )
    assert status == 0, f"emulated attention_backward_wmma_cuda returned cudaError {status}"
    return grads


def torch_grads_in_dtype(q, k, v, grad_out, mask=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = torch_in_dtype(*leaves, mask)
    return torch.autograd.grad(out, leaves, grad_out)


BACKWARD_CASES = [  # (B, H, Lq, Lk, D, causal, masked_row): D padded to 16, row/key tails, Lq ≠ Lk
    (1, 2, 7, 23, 13, False, False),
    (1, 1, 33, 19, 64, False, True),
    (1, 1, 21, 21, 200, True, False),
    (1, 1, 18, 37, 40, True, True),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,H,Lq,Lk,D,causal,masked_row", BACKWARD_CASES)
def test_wmma_backward_on_emulator(emulated_attention, dtype, B, H, Lq, Lk, D, causal, masked_row):
    """dQ, dK, dV of the tensor-core backward (P recomputed per tile from the forward's float32 lse, δ =
    rowsum(dO ∘ O)) within 2× torch's in-dtype SDPA math error + 1e-3 of the float64 reference; a fully
    masked query row gets dQ = 0; nothing is left unwritten (NaN-poisoned outputs)."""
    g = torch.Generator().manual_seed(Lk * 17 + D)
    # q, k, v as strided views ([B, L, H, D] storage) to exercise the strided staging
    q, k, v = (
        torch.randn(B, L, H, D, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2) for L in (Lq, Lk, Lk)
    )
    grad_out = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64).to(dtype)
    mask = None
    if masked_row:
        mask = torch.ones(Lq, Lk, dtype=torch.bool)
        mask[3] = False  # row 3 sees no key
        mask[5, ::2] = False
    if causal:  # explicit top-left causal mask for the references (Lq != Lk)
        causal_mask = torch.ones(Lq, Lk, dtype=torch.bool).tril()
        ref_mask = causal_mask if mask is None else mask & causal_mask
    else:
        ref_mask = mask
    out, lse = run_emulated(emulated_attention, q, k, v, mask, causal)
    grads = run_emulated_backward(emulated_attention, q, k, v, grad_out, out, lse, mask, causal)
    q64, k64, v64, go64 = (t.double() for t in (q, k, v, grad_out))
    expected = ref.attention_backward(go64, q64, k64, v64, ref_mask, None, False, None)
    for t in grads:
        assert t.dtype == dtype and not torch.isnan(t).any()
    if masked_row:
        assert torch.all(grads[0][:, :, 3] == 0)
    rows = [i for i in range(Lq) if not (masked_row and i == 3)]
    # torch's in-dtype error, on the rows it defines (SDPA gives NaN for a fully masked row)
    torch_grads = torch_grads_in_dtype(
        q[:, :, rows], k, v, grad_out[:, :, rows], ref_mask[rows] if ref_mask is not None else None
    )
    torch_expected = ref.attention_backward(
        go64[:, :, rows], q64[:, :, rows], k64, v64, ref_mask[rows] if ref_mask is not None else None, None, False, None
    )
    for name, got, want, t, t_want in zip("qkv", grads, expected, torch_grads, torch_expected):
        bound = 2 * relative_error(t, t_want) + 1e-3
        assert relative_error(got, want) <= bound, name
