// S4 / S4D state-space kernels, torch-free: the Cauchy kernel, the log-Vandermonde kernel, the
// pointwise pieces of the long FFT convolution, and the diagonal SSM recurrent step.
//
// Complex numbers are interleaved (re, im) pairs of T = float or double (torch's view_as_real),
// contiguous. Gradients follow PyTorch's complex convention: for y = f(x) and upstream g = grad_y,
//   grad_x = conj(∂y/∂x) · g + (∂y/∂conj(x)) · conj(g).
//
// Cauchy (v, w: [B, N]; z: [L]):
//   out[b, l] = Σ_n v_n / (z_l − w_n)  [+ conj(v_n) / (z_l − conj(w_n)) when conj_symmetric]
//   with r1 = conj(1 / (z − w)), r2 = 1 / (z − conj(w)):
//   grad_v[b, n] = Σ_l g_l r1 [+ conj(g_l) r2],   grad_w[b, n] = conj(v_n) · Σ_l (g_l r1² [+ conj(g_l) r2²])
//   Memory O(B·(N + L)): the [B, N, L] terms are never stored. Sums are in a fixed order.
//
// Vandermonde (v, x: [B, N]):  K[b, l] = 2 Re Σ_n v_n exp(x_n l), real [B, L].
//   Accuracy for long L: l = k·TB + j (TB = kVandBlock). exp(x l) = s_k · p_j with the block start
//   s_k = exp(x·kTB) and the in-block power p_j = exp(x·j) BOTH evaluated directly, their phases
//   Im(x)·l formed in double (exact for float x and l < 2^29) and reduced mod 2π before sin/cos.
//   Each exp(x l) thus carries ≤ ~3 roundings of T whatever l is (no drift; repeated
//   multiplication would accumulate l roundings). Error bound, per element:
//     |K − K_exact| ≤ (N + 6) · u · 2 Σ_n |v_n| |exp(x_n l)|,  u = 2^-24 (float) / 2^-53 (double),
//   relative to the exact kernel of the given (rounded) inputs.
//   Backward (g real): grad_v_n = 2 Σ_l g_l conj(e_nl), grad_x_n = 2 conj(v_n) Σ_l l g_l conj(e_nl),
//   accumulated per block: Σ_k conj(s_k) (A_k, kTB·A_k + B_k), A_k = Σ_j g conj(p_j), B_k = Σ_j j g conj(p_j).
//
// FFT convolution pointwise kernels (the transforms are torch's rfft/irfft); rows r = b·H + h:
//   pad_cast:    buf[r, 0:L] = (Acc) u[r, :],  buf[r, L:n] = 0
//   cmul:        X[r, f] *= K[h, f]   (or conj(K[h, f]))
//   crop_skip:   out[r, l] = (kind) (y[r, l] + D[h] · u[r, l])  for l < L
//   grad_spectra: grad_kf[h, f] += Σ_{rows of h, in row order} G[r, f] · conj(U[r, f]);  G[r, f] *= conj(K[h, f])
//   row_dot:     dot[r] = Σ_l a[r, l] · b[r, l]
//
// SSM step (state [B, H, N] complex, u [B, H] real, dA, dB, C [H, N] complex, D [H] real):
//   s' = dA ∘ s + dB · u,   y = 2 Re Σ_n C_n s'_n + D u.
//   Backward with G = grad_s' + 2 g_y conj(C):  grad_s = conj(dA) G,  grad_u = Σ_n Re(conj(dB) G) + D g_y,
//   grad_dA = Σ_b G conj(s), grad_dB = Σ_b G u, grad_C = Σ_b 2 g_y conj(s'), grad_D = Σ_b g_y u
//   (the sums over b in increasing b, one worker per h: deterministic).
#pragma once

#include <cmath>
#include <cstdint>

#include "fastcore/common.h"

namespace fastcore {
namespace s4 {

constexpr int64_t kVandBlock = 64;  // TB: in-block powers table length (see the accuracy note above)
constexpr int64_t kMaxStates = 4096;

// ---- Cauchy

template <typename T>
struct CauchyParams {
  const T* v = nullptr;                      // [B, N, 2]
  const T* w = nullptr;                      // [B, N, 2]
  const T* z = nullptr;                      // [L, 2]
  const T* grad_out = nullptr;               // [B, L, 2] (backward)
  T* out = nullptr;                          // [B, L, 2] (forward)
  T* grad_v = nullptr;                       // [B, N, 2] (backward)
  T* grad_w = nullptr;                       // [B, N, 2] (backward)
  int64_t batch = 0, states = 0, nodes = 0;  // B, N, L
  bool conj_symmetric = true;
};

// Adds the n-th state's term(s) at node(s) z to (acc_re, acc_im). V is T (scalar, CUDA) or a vector
// of T lanes over l (CPU); S is the scalar type. The complex divisions are written out:
// v / d = v · conj(d) / |d|². The two conjugate terms are kept separate (combining them over a common
// denominator loses accuracy when z is close to w).
template <typename V, typename S>
FC_HOST_DEVICE void cauchy_forward_term(V zr, V zi, S vr, S vi, S wr, S wi, bool conj_symmetric, V& acc_re, V& acc_im) {
  const V dr = zr - wr, di = zi - wi;
  const V inv = S(1) / (dr * dr + di * di);
  acc_re += (vr * dr + vi * di) * inv;
  acc_im += (vi * dr - vr * di) * inv;
  if (conj_symmetric) {
    const V di2 = zi + wi;  // z − conj(w)
    const V inv2 = S(1) / (dr * dr + di2 * di2);
    acc_re += (vr * dr - vi * di2) * inv2;  // conj(v) · conj(d2) / |d2|²
    acc_im += (-vi * dr - vr * di2) * inv2;
  }
}

// Adds node l's contribution to the (grad_v, Σ for grad_w) sums of state n (see the header math).
template <typename V, typename S>
FC_HOST_DEVICE void cauchy_backward_term(V zr, V zi, V gr, V gi, S wr, S wi, bool conj_symmetric, V& sv_re, V& sv_im,
                                         V& sw_re, V& sw_im) {
  const V dr = zr - wr, di = zi - wi;
  const V inv = S(1) / (dr * dr + di * di);
  const V r1r = dr * inv, r1i = di * inv;                        // conj(1 / d) = d / |d|²
  const V t1r = gr * r1r - gi * r1i, t1i = gr * r1i + gi * r1r;  // g · r1
  sv_re += t1r;
  sv_im += t1i;
  sw_re += t1r * r1r - t1i * r1i;  // g · r1²
  sw_im += t1r * r1i + t1i * r1r;
  if (conj_symmetric) {
    const V di2 = zi + wi;
    const V inv2 = S(1) / (dr * dr + di2 * di2);
    const V r2r = dr * inv2, r2i = -di2 * inv2;                    // 1 / d2 = conj(d2) / |d2|²
    const V t2r = gr * r2r + gi * r2i, t2i = gr * r2i - gi * r2r;  // conj(g) · r2
    sv_re += t2r;
    sv_im += t2i;
    sw_re += t2r * r2r - t2i * r2i;
    sw_im += t2r * r2i + t2i * r2r;
  }
}

// grad_w = conj(v) · Σ
template <typename S>
FC_HOST_DEVICE void cauchy_backward_finish(S vr, S vi, S sv_re, S sv_im, S sw_re, S sw_im, S* grad_v, S* grad_w) {
  grad_v[0] = sv_re;
  grad_v[1] = sv_im;
  grad_w[0] = vr * sw_re + vi * sw_im;
  grad_w[1] = vr * sw_im - vi * sw_re;
}

// ---- Vandermonde

template <typename T>
struct VandermondeParams {
  const T* v = nullptr;                       // [B, N, 2]
  const T* x = nullptr;                       // [B, N, 2]
  const T* grad_out = nullptr;                // [B, L] real (backward)
  T* out = nullptr;                           // [B, L] real (forward)
  T* grad_v = nullptr;                        // [B, N, 2]
  T* grad_x = nullptr;                        // [B, N, 2]
  int64_t batch = 0, states = 0, length = 0;  // B, N, L
};

// exp(x · l) for an integer l ≥ 0, with the phase Im(x)·l formed in double and reduced modulo 2π
// before sin/cos (exact product for float x and l < 2^29), the magnitude exp(Re(x)·l) from the
// double product. Result rounded to T: ≤ 1 rounding of T plus ~1e-16·|Im(x)·l| in double.
template <typename T>
FC_HOST_DEVICE void exp_times(T xr, T xi, int64_t l, T& out_re, T& out_im) {
  const double dl = static_cast<double>(l);
  const double magnitude = exp(static_cast<double>(xr) * dl);
  double phase = static_cast<double>(xi) * dl;
  const double two_pi = 6.283185307179586476925286766559;
  phase = phase - two_pi * nearbyint(phase / two_pi);  // |phase| ≤ π: sin/cos at full accuracy
  out_re = static_cast<T>(magnitude * cos(phase));
  out_im = static_cast<T>(magnitude * sin(phase));
}

// ---- FFT convolution pointwise kernels

template <typename Acc>
struct FFTConvParams {
  int64_t rows = 0;       // B·H
  int64_t heads = 1;      // H (row r uses h = r % H)
  int64_t length = 0;     // L
  int64_t fft_size = 0;   // n
  int64_t freqs = 0;      // F = n / 2 + 1
  int64_t row_begin = 0;  // first global row of the chunk (buffers hold rows [row_begin, row_begin + rows))
  // pad_cast / crop_skip / row_dot
  const void* in = nullptr;  // [total rows, L] of in_kind (global row index)
  ScalarKind in_kind = ScalarKind::kFloat32;
  const void* in2 = nullptr;  // row_dot second operand, or crop_skip's skip input u [total rows, L]
  ScalarKind in2_kind = ScalarKind::kFloat32;
  Acc* real_buf = nullptr;      // [rows, n] (chunk-local)
  const Acc* skip_D = nullptr;  // [H] or nullptr
  void* out = nullptr;          // crop_skip: [total rows, L] of out_kind
  ScalarKind out_kind = ScalarKind::kFloat32;
  Acc* dot = nullptr;  // row_dot: [total rows]
  // spectra (interleaved complex)
  Acc* spec = nullptr;               // [rows, F, 2] (chunk-local)
  const Acc* spec2 = nullptr;        // [rows, F, 2] U spectra (grad_spectra)
  const Acc* kernel_spec = nullptr;  // [H, F, 2]
  Acc* grad_kernel_spec = nullptr;   // [H, F, 2] accumulated
  bool conj_kernel = false;
};

// One element of crop + skip: y + D[h] · u.
template <typename Acc>
FC_HOST_DEVICE Acc crop_skip_value(const FFTConvParams<Acc>& p, int64_t local_row, int64_t l) {
  const int64_t row = p.row_begin + local_row;
  Acc y = p.real_buf[local_row * p.fft_size + l];
  if (p.skip_D != nullptr) y += p.skip_D[row % p.heads] * load_as<Acc>(p.in2, p.in2_kind, row * p.length + l);
  return y;
}

// X *= K (or conj(K)) for one frequency of one chunk row.
template <typename Acc>
FC_HOST_DEVICE void cmul_element(const FFTConvParams<Acc>& p, int64_t local_row, int64_t f) {
  const int64_t h = (p.row_begin + local_row) % p.heads;
  Acc* x = p.spec + 2 * (local_row * p.freqs + f);
  const Acc* k = p.kernel_spec + 2 * (h * p.freqs + f);
  const Acc kr = k[0], ki = p.conj_kernel ? -k[1] : k[1];
  const Acc xr = x[0], xi = x[1];
  x[0] = xr * kr - xi * ki;
  x[1] = xr * ki + xi * kr;
}

// For head h and frequency f of a chunk: grad_kf[h, f] += Σ_{rows of h in order} G conj(U); G *= conj(K).
template <typename Acc>
FC_HOST_DEVICE void grad_spectra_element(const FFTConvParams<Acc>& p, int64_t h, int64_t f) {
  const Acc* k = p.kernel_spec + 2 * (h * p.freqs + f);
  const Acc kr = k[0], ki = -k[1];
  Acc* gk = p.grad_kernel_spec ? p.grad_kernel_spec + 2 * (h * p.freqs + f) : nullptr;
  Acc ar = gk ? gk[0] : Acc(0), ai = gk ? gk[1] : Acc(0);
  // the first chunk row with head h
  int64_t first = (h - p.row_begin % p.heads + p.heads) % p.heads;
  for (int64_t r = first; r < p.rows; r += p.heads) {
    Acc* g = p.spec + 2 * (r * p.freqs + f);
    const Acc gr = g[0], gi = g[1];
    if (gk != nullptr) {
      const Acc* u = p.spec2 + 2 * (r * p.freqs + f);
      ar += gr * u[0] + gi * u[1];  // g · conj(u)
      ai += gi * u[0] - gr * u[1];
    }
    g[0] = gr * kr - gi * ki;
    g[1] = gr * ki + gi * kr;
  }
  if (gk != nullptr) {
    gk[0] = ar;
    gk[1] = ai;
  }
}

// ---- SSM step

template <typename T>
struct StepParams {
  const T* state = nullptr;  // [B, H, N, 2]
  const void* u = nullptr;   // [B, H] u_kind
  ScalarKind u_kind = ScalarKind::kFloat32;
  const T* dA = nullptr;   // [H, N, 2]
  const T* dB = nullptr;   // [H, N, 2]
  const T* C = nullptr;    // [H, N, 2]
  const T* D = nullptr;    // [H] real or nullptr
  void* y = nullptr;       // [B, H] u_kind
  T* new_state = nullptr;  // [B, H, N, 2]
  // backward
  const T* grad_y = nullptr;          // [B, H] (T)
  const T* grad_new_state = nullptr;  // [B, H, N, 2] or nullptr (zero)
  T* grad_state = nullptr;            // [B, H, N, 2]
  T* grad_u = nullptr;                // [B, H] (T)
  T* grad_dA = nullptr;               // [H, N, 2]
  T* grad_dB = nullptr;
  T* grad_C = nullptr;
  T* grad_D = nullptr;  // [H] or nullptr
  int64_t batch = 0, heads = 0, states = 0;
};

// One (b, h) row of the forward step.
template <typename T>
FC_HOST_DEVICE void ssm_step_row(const StepParams<T>& p, int64_t row) {
  const int64_t h = row % p.heads, N = p.states;
  const T u = load_as<T>(p.u, p.u_kind, row);
  const T* s = p.state + 2 * row * N;
  T* s_new = p.new_state + 2 * row * N;
  const T* a = p.dA + 2 * h * N;
  const T* bb = p.dB + 2 * h * N;
  const T* c = p.C + 2 * h * N;
  T acc = T(0);
  for (int64_t n = 0; n < N; ++n) {
    const T sr = s[2 * n], si = s[2 * n + 1];
    const T nr = a[2 * n] * sr - a[2 * n + 1] * si + bb[2 * n] * u;
    const T ni = a[2 * n] * si + a[2 * n + 1] * sr + bb[2 * n + 1] * u;
    s_new[2 * n] = nr;
    s_new[2 * n + 1] = ni;
    acc += c[2 * n] * nr - c[2 * n + 1] * ni;  // Re(C s')
  }
  T y = T(2) * acc;
  if (p.D != nullptr) y += p.D[h] * u;
  store_as<T>(p.y, p.u_kind, row, y);
}

// The backward of head h: every b in increasing order (one worker per h).
template <typename T>
FC_HOST_DEVICE void ssm_step_backward_head(const StepParams<T>& p, int64_t h) {
  const int64_t N = p.states;
  const T* a = p.dA + 2 * h * N;
  const T* bb = p.dB + 2 * h * N;
  const T* c = p.C + 2 * h * N;
  T* gA = p.grad_dA + 2 * h * N;
  T* gB = p.grad_dB + 2 * h * N;
  T* gC = p.grad_C + 2 * h * N;
  for (int64_t n = 0; n < 2 * N; ++n) gA[n] = gB[n] = gC[n] = T(0);
  T gD = T(0);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t row = b * p.heads + h;
    const T u = load_as<T>(p.u, p.u_kind, row);
    const T gy = p.grad_y[row];
    const T* s = p.state + 2 * row * N;
    const T* gs_new = p.grad_new_state ? p.grad_new_state + 2 * row * N : nullptr;
    T* gs = p.grad_state + 2 * row * N;
    T gu = T(0);
    for (int64_t n = 0; n < N; ++n) {
      const T sr = s[2 * n], si = s[2 * n + 1];
      const T ar = a[2 * n], ai = a[2 * n + 1];
      const T nr = ar * sr - ai * si + bb[2 * n] * u;  // s' recomputed (not saved)
      const T ni = ar * si + ai * sr + bb[2 * n + 1] * u;
      // G = grad_s' + 2 gy conj(C)
      T Gr = T(2) * gy * c[2 * n], Gi = -T(2) * gy * c[2 * n + 1];
      if (gs_new != nullptr) {
        Gr += gs_new[2 * n];
        Gi += gs_new[2 * n + 1];
      }
      gs[2 * n] = ar * Gr + ai * Gi;  // conj(dA) G
      gs[2 * n + 1] = ar * Gi - ai * Gr;
      gu += bb[2 * n] * Gr + bb[2 * n + 1] * Gi;  // Re(conj(dB) G)
      gA[2 * n] += Gr * sr + Gi * si;             // G conj(s)
      gA[2 * n + 1] += Gi * sr - Gr * si;
      gB[2 * n] += Gr * u;
      gB[2 * n + 1] += Gi * u;
      gC[2 * n] += T(2) * gy * nr;  // 2 gy conj(s')
      gC[2 * n + 1] -= T(2) * gy * ni;
    }
    if (p.D != nullptr) gu += p.D[h] * gy;
    p.grad_u[row] = gu;
    gD += gy * u;
  }
  if (p.grad_D != nullptr) p.grad_D[h] = gD;
}

// ---- CPU entry points (s4_cpu.cpp), each over a [begin, end) range of work units (DESIGN rule 3).

constexpr int64_t kCauchyTile = 256;  // nodes per CPU work unit (forward)

// Units u in [begin, end): row b = u / tiles, node tile u % tiles, tiles = ceil(L / kCauchyTile).
// zr, zi: z deinterleaved, length ≥ L.
template <typename T>
void cauchy_forward_cpu(const CauchyParams<T>& p, const T* zr, const T* zi, int64_t begin, int64_t end);
// Units (b, n) flattened b·N + n in [begin, end); gr, gi: grad_out deinterleaved [B, L].
template <typename T>
void cauchy_backward_cpu(const CauchyParams<T>& p, const T* zr, const T* zi, const T* gr, const T* gi, int64_t begin,
                         int64_t end);
// Units = rows b in [begin, end).
template <typename T>
void vandermonde_forward_cpu(const VandermondeParams<T>& p, int64_t begin, int64_t end);
// Units (b, n) in [begin, end).
template <typename T>
void vandermonde_backward_cpu(const VandermondeParams<T>& p, int64_t begin, int64_t end);

template <typename Acc>
void fftconv_pad_cast_cpu(const FFTConvParams<Acc>& p, int64_t begin, int64_t end);  // chunk rows
template <typename Acc>
void fftconv_cmul_cpu(const FFTConvParams<Acc>& p, int64_t begin, int64_t end);  // chunk rows
template <typename Acc>
void fftconv_crop_skip_cpu(const FFTConvParams<Acc>& p, int64_t begin, int64_t end);  // chunk rows
template <typename Acc>
void fftconv_grad_spectra_cpu(const FFTConvParams<Acc>& p, int64_t begin, int64_t end);  // units h·F + f
template <typename Acc>
void fftconv_row_dot_cpu(const FFTConvParams<Acc>& p, int64_t begin, int64_t end);  // global rows

template <typename T>
void ssm_step_cpu(const StepParams<T>& p, int64_t begin, int64_t end);  // heads [begin, end), all B rows of each
template <typename T>
void ssm_step_backward_cpu(const StepParams<T>& p, int64_t begin, int64_t end);  // heads

// ---- CUDA entry points (s4.cu); return a cudaError_t as int (0 = success). float only.
int cauchy_forward_cuda(const CauchyParams<float>& p, void* stream);
int cauchy_backward_cuda(const CauchyParams<float>& p, void* stream);
int vandermonde_forward_cuda(const VandermondeParams<float>& p, void* stream);
int vandermonde_backward_cuda(const VandermondeParams<float>& p, void* stream);
int fftconv_pad_cast_cuda(const FFTConvParams<float>& p, void* stream);
int fftconv_cmul_cuda(const FFTConvParams<float>& p, void* stream);
int fftconv_crop_skip_cuda(const FFTConvParams<float>& p, void* stream);
int fftconv_grad_spectra_cuda(const FFTConvParams<float>& p, void* stream);
int fftconv_row_dot_cuda(const FFTConvParams<float>& p, void* stream);
int ssm_step_cuda(const StepParams<float>& p, void* stream);
int ssm_step_backward_cuda(const StepParams<float>& p, void* stream);

}  // namespace s4
}  // namespace fastcore
