// Torch glue of the s4 family: checks of what the kernels rely on (the user-facing validation with
// full messages is in fastcore_ai.ops.s4), complex tensors -> interleaved (view_as_real) params,
// at::parallel_for over the CPU work units or the CUDA launches, and the FFT-convolution driver
// (torch's rfft/irfft around the fused pointwise kernels, chunked over rows to bound memory).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <new>
#include <optional>
#include <type_traits>
#include <tuple>
#include <vector>

#include "cuda_call.h"
#include "s4/s4.h"
#include "tensor_params.h"

// MKL's DFTI entry points, from the MKL that torch's CPU library links and exports (torch's own CPU FFTs are
// these calls, see fft_conv details in docs/s4.md). Weak: with a torch built without MKL they stay null and the
// CPU FFTs go through at::fft. The enum arguments are ints and the values MKL_LONG (long on LP64 Linux); the
// functions are variadic in mkl_dfti.h, so a value is passed as exactly the type MKL reads back.
extern "C" {
struct DFTI_DESCRIPTOR;
long DftiCreateDescriptor_s_1d(DFTI_DESCRIPTOR** handle, int domain, ...) __attribute__((weak));
long DftiCreateDescriptor_d_1d(DFTI_DESCRIPTOR** handle, int domain, ...) __attribute__((weak));
long DftiSetValue(DFTI_DESCRIPTOR* handle, int param, ...) __attribute__((weak));
long DftiCommitDescriptor(DFTI_DESCRIPTOR* handle) __attribute__((weak));
long DftiComputeForward(DFTI_DESCRIPTOR* handle, void* in, ...) __attribute__((weak));
long DftiComputeBackward(DFTI_DESCRIPTOR* handle, void* in, ...) __attribute__((weak));
long DftiFreeDescriptor(DFTI_DESCRIPTOR** handle) __attribute__((weak));
}

namespace fastcore {
namespace s4 {
namespace {

// A complex tensor as contiguous interleaved real storage [..., 2] (resolving a lazy conjugate).
at::Tensor interleaved(const at::Tensor& t) { return at::view_as_real(t.resolve_conj().contiguous()); }

// The same storage without the real view: the tensor itself when it is already contiguous and resolved.
at::Tensor resolved(const at::Tensor& t) {
  return t.is_contiguous() && !t.is_conj() ? t : t.resolve_conj().contiguous();
}

void check_complex(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  FC_CHECK(t.is_complex() && (t.scalar_type() == at::kComplexFloat || t.scalar_type() == at::kComplexDouble), op, name,
           " must be complex64 or complex128, got ", t.scalar_type());
  FC_CHECK(t.dim() == dim, op, name, " must have ", dim, " dims, got ", t.dim());
}

int64_t parallel_grain(int64_t cost_per_unit) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(cost_per_unit, 1));
}

}  // namespace

// ---- Cauchy ------------------------------------------------------------------------------------

// The fields every Cauchy / Vandermonde call fills the same way (inputs interleaved re, im; sizes); each
// call adds its outputs or gradients.
template <typename T>
CauchyParams<T> cauchy_params(const at::Tensor& vr, const at::Tensor& wr, const at::Tensor& zr, int64_t B, int64_t N,
                              int64_t L, bool conj_symmetric) {
  CauchyParams<T> p;
  p.v = vr.data_ptr<T>();
  p.w = wr.data_ptr<T>();
  p.z = zr.data_ptr<T>();
  p.batch = B;
  p.states = N;
  p.nodes = L;
  p.conj_symmetric = conj_symmetric;
  return p;
}

template <typename T>
VandermondeParams<T> vandermonde_params(const at::Tensor& vr, const at::Tensor& xr, int64_t B, int64_t N, int64_t L) {
  VandermondeParams<T> p;
  p.v = vr.data_ptr<T>();
  p.x = xr.data_ptr<T>();
  p.batch = B;
  p.states = N;
  p.length = L;
  return p;
}

at::Tensor cauchy(const at::Tensor& v, const at::Tensor& z, const at::Tensor& w, bool conj_symmetric) {
  constexpr const char* op = "cauchy";
  check_complex(op, "v", v, 2);
  check_complex(op, "w", w, 2);
  check_complex(op, "z", z, 1);
  FC_CHECK(v.sizes() == w.sizes() && v.scalar_type() == w.scalar_type() && z.scalar_type() == v.scalar_type(), op,
           "v, w must have the same shape [B, N] and v, w, z one dtype");
  FC_CHECK(v.device() == w.device() && v.device() == z.device(), op, "v, z, w must be on one device");
  const int64_t B = v.size(0), N = v.size(1), L = z.size(0);
  at::Tensor out = at::empty({B, L}, v.options());
  if (B == 0 || L == 0) return out;
  if (N == 0) return out.zero_();
  const at::Tensor vr = interleaved(v), wr = interleaved(w), zr = interleaved(z);
  at::Tensor out_r = at::view_as_real(out);
  if (v.is_cuda()) {
    require_cuda(op);
    FC_CHECK(v.scalar_type() == at::kComplexFloat, op, "the cuda backend takes complex64, got ", v.scalar_type());
    CauchyParams<float> p = cauchy_params<float>(vr, wr, zr, B, N, L, conj_symmetric);
    p.out = out_r.data_ptr<float>();
    FC_CUDA_CALL(op, "forward launch", v.device(), cauchy_forward_cuda(p, current_stream()));
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(vr.scalar_type(), "s4_cauchy", [&] {
    using T = scalar_t;
    // z deinterleaved once (shared by every row): the vector loops load 8 contiguous re / im values.
    const at::Tensor z_re = zr.select(1, 0).contiguous(), z_im = zr.select(1, 1).contiguous();
    CauchyParams<T> p = cauchy_params<T>(vr, wr, zr, B, N, L, conj_symmetric);
    p.out = out_r.data_ptr<T>();
    const int64_t tiles = (L + kCauchyTile - 1) / kCauchyTile;
    const T* zre = z_re.data_ptr<T>();
    const T* zim = z_im.data_ptr<T>();
    at::parallel_for(0, B * tiles, parallel_grain(N * kCauchyTile),
                     [&](int64_t b, int64_t e) { cauchy_forward_cpu<T>(p, zre, zim, b, e); });
  });
  return out;
}

std::vector<at::Tensor> cauchy_backward(const at::Tensor& grad, const at::Tensor& v, const at::Tensor& z,
                                        const at::Tensor& w, bool conj_symmetric) {
  constexpr const char* op = "cauchy";
  check_complex(op, "v", v, 2);
  check_complex(op, "w", w, 2);
  check_complex(op, "z", z, 1);
  check_complex(op, "grad_out", grad, 2);
  const int64_t B = v.size(0), N = v.size(1), L = z.size(0);
  FC_CHECK(grad.size(0) == B && grad.size(1) == L && grad.scalar_type() == v.scalar_type(), op,
           "grad_out must be [B, L] in v's dtype");
  at::Tensor grad_v = at::empty({B, N}, v.options()), grad_w = at::empty({B, N}, v.options());
  if (B == 0 || N == 0) return {grad_v, grad_w};
  if (L == 0) return {grad_v.zero_(), grad_w.zero_()};
  const at::Tensor vr = interleaved(v), wr = interleaved(w), zr = interleaved(z), gr = interleaved(grad);
  at::Tensor gv = at::view_as_real(grad_v), gw = at::view_as_real(grad_w);
  if (v.is_cuda()) {
    require_cuda(op);
    FC_CHECK(v.scalar_type() == at::kComplexFloat, op, "the cuda backend takes complex64, got ", v.scalar_type());
    CauchyParams<float> p = cauchy_params<float>(vr, wr, zr, B, N, L, conj_symmetric);
    p.grad_out = gr.data_ptr<float>();
    p.grad_v = gv.data_ptr<float>();
    p.grad_w = gw.data_ptr<float>();
    FC_CUDA_CALL(op, "backward launch", v.device(), cauchy_backward_cuda(p, current_stream()));
    return {grad_v, grad_w};
  }
  AT_DISPATCH_FLOATING_TYPES(vr.scalar_type(), "s4_cauchy_backward", [&] {
    using T = scalar_t;
    const at::Tensor z_re = zr.select(1, 0).contiguous(), z_im = zr.select(1, 1).contiguous();
    const at::Tensor g_re = gr.select(2, 0).contiguous(), g_im = gr.select(2, 1).contiguous();
    CauchyParams<T> p = cauchy_params<T>(vr, wr, zr, B, N, L, conj_symmetric);
    p.grad_v = gv.data_ptr<T>();
    p.grad_w = gw.data_ptr<T>();
    const T *zre = z_re.data_ptr<T>(), *zim = z_im.data_ptr<T>(), *gre = g_re.data_ptr<T>(), *gim = g_im.data_ptr<T>();
    at::parallel_for(0, B * N, parallel_grain(L),
                     [&](int64_t b, int64_t e) { cauchy_backward_cpu<T>(p, zre, zim, gre, gim, b, e); });
  });
  return {grad_v, grad_w};
}

// ---- Vandermonde -------------------------------------------------------------------------------

at::Tensor vandermonde(const at::Tensor& v, const at::Tensor& x, int64_t L) {
  constexpr const char* op = "vandermonde";
  check_complex(op, "v", v, 2);
  check_complex(op, "x", x, 2);
  FC_CHECK(v.sizes() == x.sizes() && v.scalar_type() == x.scalar_type() && v.device() == x.device(), op,
           "v and x must have one shape [B, N], dtype and device");
  FC_CHECK(L >= 0 && L < (int64_t(1) << 29), op, "L must satisfy 0 <= L < 2^29, got ", L);
  const int64_t B = v.size(0), N = v.size(1);
  const auto real_type = v.scalar_type() == at::kComplexFloat ? at::kFloat : at::kDouble;
  at::Tensor out = at::empty({B, L}, v.options().dtype(real_type));
  if (B == 0 || L == 0) return out;
  if (N == 0) return out.zero_();
  const at::Tensor vr = interleaved(v), xr = interleaved(x);
  if (v.is_cuda()) {
    require_cuda(op);
    FC_CHECK(v.scalar_type() == at::kComplexFloat, op, "the cuda backend takes complex64, got ", v.scalar_type());
    VandermondeParams<float> p = vandermonde_params<float>(vr, xr, B, N, L);
    p.out = out.data_ptr<float>();
    FC_CUDA_CALL(op, "forward launch", v.device(), vandermonde_forward_cuda(p, current_stream()));
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(vr.scalar_type(), "s4_vandermonde", [&] {
    using T = scalar_t;
    VandermondeParams<T> p = vandermonde_params<T>(vr, xr, B, N, L);
    p.out = out.data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t b, int64_t e) { vandermonde_forward_cpu<T>(p, b, e); });
  });
  return out;
}

std::vector<at::Tensor> vandermonde_backward(const at::Tensor& grad, const at::Tensor& v, const at::Tensor& x) {
  constexpr const char* op = "vandermonde";
  check_complex(op, "v", v, 2);
  check_complex(op, "x", x, 2);
  const int64_t B = v.size(0), N = v.size(1);
  FC_CHECK(grad.dim() == 2 && grad.size(0) == B && !grad.is_complex(), op, "grad_out must be real [B, L]");
  const int64_t L = grad.size(1);
  at::Tensor grad_v = at::empty({B, N}, v.options()), grad_x = at::empty({B, N}, v.options());
  if (B == 0 || N == 0) return {grad_v, grad_x};
  if (L == 0) return {grad_v.zero_(), grad_x.zero_()};
  const auto real_type = v.scalar_type() == at::kComplexFloat ? at::kFloat : at::kDouble;
  const at::Tensor g = grad.to(real_type).contiguous();
  const at::Tensor vr = interleaved(v), xr = interleaved(x);
  at::Tensor gv = at::view_as_real(grad_v), gx = at::view_as_real(grad_x);
  if (v.is_cuda()) {
    require_cuda(op);
    FC_CHECK(v.scalar_type() == at::kComplexFloat, op, "the cuda backend takes complex64, got ", v.scalar_type());
    VandermondeParams<float> p = vandermonde_params<float>(vr, xr, B, N, L);
    p.grad_out = g.data_ptr<float>();
    p.grad_v = gv.data_ptr<float>();
    p.grad_x = gx.data_ptr<float>();
    FC_CUDA_CALL(op, "backward launch", v.device(), vandermonde_backward_cuda(p, current_stream()));
    return {grad_v, grad_x};
  }
  AT_DISPATCH_FLOATING_TYPES(vr.scalar_type(), "s4_vandermonde_backward", [&] {
    using T = scalar_t;
    VandermondeParams<T> p = vandermonde_params<T>(vr, xr, B, N, L);
    p.grad_out = g.data_ptr<T>();
    p.grad_v = gv.data_ptr<T>();
    p.grad_x = gx.data_ptr<T>();
    at::parallel_for(0, B * N, parallel_grain(L), [&](int64_t b, int64_t e) { vandermonde_backward_cpu<T>(p, b, e); });
  });
  return {grad_v, grad_x};
}

// ---- FFT convolution ---------------------------------------------------------------------------

namespace {

constexpr const char* kFFT = "fft_conv";

// Rows per chunk: about 2^23 (CPU, 32 MB per fp32 buffer) or 2^26 (CUDA) elements per workspace. The
// workspaces (real rows + spectra) are the only full-length temporaries, so the peak extra memory is
// the output plus ~2 chunk buffers; larger chunks mean fewer FFT calls (each has a fixed setup cost).
int64_t chunk_rows_for(int64_t rows, int64_t n, bool cuda, int64_t requested) {
  if (requested > 0) return std::min(requested, std::max<int64_t>(rows, 1));
  const int64_t budget = cuda ? (int64_t(1) << 26) : (int64_t(1) << 23);
  return std::max<int64_t>(1, std::min(rows, budget / std::max<int64_t>(n, 1)));
}

enum class FFTKernel { kPad, kMul, kCrop, kGradSpectra, kRowDot };

// The CUDA launcher of one pointwise kernel (float only: check_fft_args refuses float64 on CUDA); inline,
// so a build without CUDA never emits it (see cuda_call.h).
inline int fft_kernel_cuda(FFTKernel kind, const FFTConvParams<float>& p, void* stream) {
  switch (kind) {
    case FFTKernel::kPad: return fftconv_pad_cast_cuda(p, stream);
    case FFTKernel::kMul: return fftconv_cmul_cuda(p, stream);
    case FFTKernel::kCrop: return fftconv_crop_skip_cuda(p, stream);
    case FFTKernel::kGradSpectra: return fftconv_grad_spectra_cuda(p, stream);
    case FFTKernel::kRowDot: return fftconv_row_dot_cuda(p, stream);
  }
  return 0;
}

// One pointwise kernel over `units` work units: CPU at::parallel_for, or the CUDA launch on `device`.
template <typename Acc>
void run(FFTKernel kind, const FFTConvParams<Acc>& p, const at::Device& device, int64_t units, int64_t cost) {
  if (units == 0) return;
  if (device.is_cuda()) {
    require_cuda(kFFT);
    if constexpr (std::is_same<Acc, float>::value) {
      FC_CUDA_CALL(kFFT, "pointwise kernel launch", device, fft_kernel_cuda(kind, p, current_stream()));
      return;
    }
    FC_CHECK(false, kFFT, "the cuda backend takes float32, float16 or bfloat16, got float64");
  }
  at::parallel_for(0, units, parallel_grain(cost), [&](int64_t b, int64_t e) {
    switch (kind) {
      case FFTKernel::kPad: fftconv_pad_cast_cpu<Acc>(p, b, e); break;
      case FFTKernel::kMul: fftconv_cmul_cpu<Acc>(p, b, e); break;
      case FFTKernel::kCrop: fftconv_crop_skip_cpu<Acc>(p, b, e); break;
      case FFTKernel::kGradSpectra: fftconv_grad_spectra_cpu<Acc>(p, b, e); break;
      case FFTKernel::kRowDot: fftconv_row_dot_cpu<Acc>(p, b, e); break;
    }
  });
}

at::ScalarType acc_type_of(const at::Tensor& u) { return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }
at::ScalarType complex_of(at::ScalarType acc) { return acc == at::kDouble ? at::kComplexDouble : at::kComplexFloat; }

void check_fft_args(const at::Tensor& u, const at::Tensor& k, const std::optional<at::Tensor>& D, int64_t n) {
  FC_CHECK(u.dim() == 3 && k.dim() == 2 && k.size(0) == u.size(1) && k.size(1) >= 1 && k.size(1) <= u.size(2), kFFT,
           "u must be [B, H, L] and k [H, Lk] with 1 <= Lk <= L");
  scalar_kind_of(u, kFFT, "u");
  scalar_kind_of(k, kFFT, "k");
  FC_CHECK(n >= u.size(2) + k.size(1) - 1, kFFT, "fft size n must be >= L + Lk - 1, got ", n);
  FC_CHECK(k.device() == u.device(), kFFT, "k must be on u's device");
  if (D.has_value())
    FC_CHECK(D->dim() == 1 && D->size(0) == u.size(1) && D->device() == u.device(), kFFT,
             "D must be [H] on u's device");
  FC_CHECK(!(u.is_cuda() && u.scalar_type() == at::kDouble), kFFT,
           "the cuda backend takes float32, float16 or bfloat16, got float64");
}

template <typename Acc>
FFTConvParams<Acc> fft_params(int64_t count, int64_t H, int64_t L, int64_t n, int64_t r0, at::Tensor& rb,
                              at::Tensor& sp, const at::Tensor& Kf_r) {
  FFTConvParams<Acc> p;
  p.rows = count;
  p.heads = H;
  p.length = L;
  p.fft_size = n;
  p.freqs = n / 2 + 1;
  p.row_begin = r0;
  p.real_buf = rb.data_ptr<Acc>();
  p.spec = static_cast<Acc*>(sp.data_ptr());
  p.kernel_spec = Kf_r.data_ptr<Acc>();
  return p;
}

// ---- CPU FFTs of row blocks --------------------------------------------------------------------------------
// Every at::fft call plans its transform afresh: MKL's descriptor set-up (twiddle tables) is ~10 µs at n = 2000,
// ~30 µs at n = 8192 and 110-330 µs at n = 32768, up to 10x the transform of one row. The CPU driver therefore
// calls MKL's DFTI itself with committed descriptors kept across calls (the configuration torch's MKL path sets:
// out of place, CCE storage, unit strides, row distance n / F; but the inverse unnormalised, its 1/n folded into
// the kernel spectra) and falls back to at::fft when torch has no MKL (or MKL refuses a descriptor).

// mkl_dfti.h's enum values (unchanged since MKL 10).
enum : int {
  kDftiNumberOfTransforms = 7,
  kDftiConjugateEvenStorage = 10,
  kDftiPlacement = 11,
  kDftiInputDistance = 14,
  kDftiOutputDistance = 15,
  kDftiThreadLimit = 27,
  kDftiReal = 33,
  kDftiComplexComplex = 39,
  kDftiNotInplace = 44,
};

bool dfti_linked() {
  return DftiCreateDescriptor_s_1d != nullptr && DftiCreateDescriptor_d_1d != nullptr && DftiSetValue != nullptr &&
         DftiCommitDescriptor != nullptr && DftiComputeForward != nullptr && DftiComputeBackward != nullptr &&
         DftiFreeDescriptor != nullptr;
}

std::atomic<bool> g_direct_dfti{true};  // cleared by s4_fft_direct_mkl(False) or by a descriptor MKL refuses

bool direct_dfti() { return g_direct_dfti.load(std::memory_order_relaxed) && dfti_linked(); }

// `batch` real rows of length n <-> their n/2 + 1 spectra; single-threaded (each worker transforms its own rows).
struct PlanKey {
  int64_t n, batch;
  bool is_double, forward;
  bool operator==(const PlanKey& o) const {
    return n == o.n && batch == o.batch && is_double == o.is_double && forward == o.forward;
  }
};

// Committed descriptors not in use, most recently returned last; a worker takes one for a call and gives it back
// (a descriptor is never used by two threads at once). The least recently returned are freed beyond the bounds
// below. Never destroyed (a static destructor could run after MKL's own).
class PlanPool {
 public:
  static PlanPool& get() {
    static PlanPool* pool = new PlanPool;
    return *pool;
  }

  DFTI_DESCRIPTOR* take(const PlanKey& key) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = idle_.size(); i-- > 0;) {
        if (idle_[i].key == key) {
          DFTI_DESCRIPTOR* handle = idle_[i].handle;
          idle_.erase(idle_.begin() + static_cast<std::ptrdiff_t>(i));
          return handle;
        }
      }
    }
    return create(key);  // outside the lock: committing takes up to ~0.3 ms
  }

  void give(const PlanKey& key, DFTI_DESCRIPTOR* handle) {
    std::vector<DFTI_DESCRIPTOR*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle_.push_back({key, handle});
      idle_bytes_ += bytes_of(key);
      while (idle_.size() > 1 && (idle_.size() > kMaxIdle || idle_bytes_ > kMaxIdleBytes)) {
        evicted.push_back(idle_.front().handle);
        idle_bytes_ -= bytes_of(idle_.front().key);
        idle_.erase(idle_.begin());
      }
    }
    for (DFTI_DESCRIPTOR* old : evicted) DftiFreeDescriptor(&old);
  }

 private:
  // At most 32 idle descriptors and ~64 MiB of them (measured: ~0.28 MB for a committed real descriptor at
  // n = 32768, ~2.1 MB at 262144 in single precision, i.e. about 8·n bytes; 16·n assumed for double).
  static constexpr size_t kMaxIdle = 32;
  static constexpr int64_t kMaxIdleBytes = int64_t(64) << 20;
  static int64_t bytes_of(const PlanKey& key) { return (key.is_double ? 16 : 8) * key.n; }
  struct Entry {
    PlanKey key;
    DFTI_DESCRIPTOR* handle;
  };

  static DFTI_DESCRIPTOR* create(const PlanKey& key) {
    DFTI_DESCRIPTOR* handle = nullptr;
    const long n = static_cast<long>(key.n), freqs = n / 2 + 1;
    const long status = key.is_double ? DftiCreateDescriptor_d_1d(&handle, kDftiReal, n)
                                      : DftiCreateDescriptor_s_1d(&handle, kDftiReal, n);
    if (status != 0 || handle == nullptr) return nullptr;
    const bool ok = DftiSetValue(handle, kDftiPlacement, static_cast<long>(kDftiNotInplace)) == 0 &&
                    DftiSetValue(handle, kDftiConjugateEvenStorage, static_cast<long>(kDftiComplexComplex)) == 0 &&
                    DftiSetValue(handle, kDftiNumberOfTransforms, static_cast<long>(key.batch)) == 0 &&
                    DftiSetValue(handle, kDftiInputDistance, key.forward ? n : freqs) == 0 &&
                    DftiSetValue(handle, kDftiOutputDistance, key.forward ? freqs : n) == 0 &&
                    DftiSetValue(handle, kDftiThreadLimit, 1L) == 0 && DftiCommitDescriptor(handle) == 0;
    if (!ok) {
      DftiFreeDescriptor(&handle);
      return nullptr;
    }
    return handle;
  }

  std::mutex mutex_;
  std::vector<Entry> idle_;
  int64_t idle_bytes_ = 0;
};

// rfft (forward) of `count` rows real [count, n] -> spec [count, n/2 + 1] (interleaved complex), or the irfft
// (unnormalised: n times the inverse) back into real. Rows are transformed independently: a row's result does not
// depend on `count`, on the thread or on the path (DFTI or at::fft; tested bit for bit).
template <typename Acc>
void block_fft(bool forward, Acc* real, Acc* spec, int64_t count, int64_t n) {
  if (direct_dfti()) {
    const PlanKey key{n, count, sizeof(Acc) == 8, forward};
    PlanPool& pool = PlanPool::get();
    DFTI_DESCRIPTOR* handle = pool.take(key);
    if (handle != nullptr) {
      const long status = forward ? DftiComputeForward(handle, static_cast<void*>(real), static_cast<void*>(spec))
                                  : DftiComputeBackward(handle, static_cast<void*>(spec), static_cast<void*>(real));
      pool.give(key, handle);
      if (status == 0) return;
    }
    g_direct_dfti.store(false, std::memory_order_relaxed);  // this MKL refuses: at::fft from now on
  }
  const at::ScalarType real_type = sizeof(Acc) == 8 ? at::kDouble : at::kFloat;
  at::Tensor r = at::from_blob(real, {count, n}, at::TensorOptions().dtype(real_type));
  at::Tensor s = at::from_blob(spec, {count, n / 2 + 1}, at::TensorOptions().dtype(complex_of(real_type)));
  if (forward)
    at::fft_rfft_out(s, r, n, -1, std::nullopt);
  else
    at::fft_irfft_out(r, s, n, -1, "forward");  // unnormalised, as the DFTI inverse
}

// A worker's block workspace, kept across calls in a thread-local buffer (a fresh allocation per call would fault
// its pages in again whenever glibc has returned them), 64-byte aligned, grown as needed up to kCachedBytes
// (a larger one, only from an explicit block_rows, is allocated for the call).
class BlockWorkspace {
 public:
  ~BlockWorkspace() { std::free(data_); }
  void* reserve(size_t bytes, at::Tensor& temporary) {
    bytes = (bytes + 63) / 64 * 64;
    if (bytes > kCachedBytes) {
      temporary = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
      return temporary.data_ptr();
    }
    if (bytes > capacity_) {
      std::free(data_);
      data_ = std::aligned_alloc(64, bytes);
      capacity_ = data_ != nullptr ? bytes : 0;
      if (data_ == nullptr) throw std::bad_alloc();
    }
    return data_;
  }

 private:
  static constexpr size_t kCachedBytes = size_t(16) << 20;
  void* data_ = nullptr;
  size_t capacity_ = 0;
};

// Rows per block of the CPU pipeline: a block's padded rows and spectra (2·n values per row) fit in ~1 MiB, one
// core's L2 here, so the five passes over a block hit cache instead of memory (measured: a 256-row batched rfft at
// n = 32768 costs several times more per row than 8-row batches; with cached descriptors 4-row blocks at n = 32768
// ran 263 ms vs 298 ms for 8-row ones, B = 8, H = 256, one thread, while the block size made no difference at
// n <= 8192). The blocks are then split further so that every worker gets the same number of blocks: with 16 rows
// at n = 2048 (one cache block) two threads get 8 rows each instead of one thread taking all 16.
int64_t cpu_block_rows_for(int64_t rows, int64_t n, int64_t value_bytes, int64_t threads, int64_t requested) {
  if (requested > 0) return std::max<int64_t>(1, std::min(requested, rows));
  const int64_t cache_rows = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(2 * n * value_bytes, 1));
  const int64_t per_worker = ((rows + cache_rows - 1) / cache_rows + threads - 1) / threads;
  const int64_t blocks = std::max<int64_t>(1, std::min(rows, per_worker * threads));
  return (rows + blocks - 1) / blocks;
}

// Runs body(r0, count, real, spec) over the blocks of `rows` rows: every worker takes the next block from an atomic
// counter (on a busy machine a descheduled thread then leaves its blocks to the other instead of making it wait at
// the join) and runs it with its own workspace (real [block, n] and spec [block, n/2 + 1] complex). Which thread
// transforms a row does not change its result.
template <typename Acc, typename Body>
void for_each_block(int64_t rows, int64_t block, int64_t n, const Body& body) {
  const int64_t F = n / 2 + 1, blocks = (rows + block - 1) / block;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    thread_local BlockWorkspace workspace;
    at::Tensor temporary;
    const int64_t spec_offset = (block * n + 15) / 16 * 16;  // the spectra 64-byte aligned too
    Acc* real =
        static_cast<Acc*>(workspace.reserve(sizeof(Acc) * static_cast<size_t>(spec_offset + 2 * block * F), temporary));
    Acc* spec = real + spec_offset;
    for (int64_t index = next_block.fetch_add(1); index < blocks; index = next_block.fetch_add(1)) {
      const int64_t r0 = index * block;
      body(r0, std::min(block, rows - r0), real, spec);
    }
  });
}

// The CPU forward: the kernel spectra K = rfft(k, n) [H, F] in one parallel pass over blocks of heads, then every
// worker runs the whole pipeline (pad + cast, rfft, ·K, irfft, crop + skip + cast) on blocks of rows, so the
// threads meet twice per call instead of once per pass and a block stays in cache across its passes. Row results
// do not depend on the blocking or the thread count (each row is transformed on its own).
void fft_conv_cpu_blocks(const at::Tensor& uc, ScalarKind u_kind, const at::Tensor& k, const at::Tensor& Dc,
                         at::Tensor& out, int64_t n, int64_t block_rows_requested) {
  const int64_t H = uc.size(1), L = uc.size(2), rows = uc.size(0) * H, F = n / 2 + 1;
  const at::ScalarType acc = acc_type_of(uc);
  const at::Tensor kc = k.contiguous();
  const ScalarKind k_kind = scalar_kind_of(kc, kFFT, "k");
  at::Tensor Kf = at::empty({H, F}, uc.options().dtype(complex_of(acc)));
  AT_DISPATCH_FLOATING_TYPES(acc, "s4_fft_conv_cpu", [&] {
    using Acc = scalar_t;
    const int64_t threads = at::get_num_threads();
    Acc* const kernel_spec = static_cast<Acc*>(Kf.data_ptr());
    for_each_block<Acc>(H, cpu_block_rows_for(H, n, sizeof(Acc), threads, block_rows_requested), n,
                        [&](int64_t h0, int64_t count, Acc* real, Acc* /*spec*/) {
                          FFTConvParams<Acc> p;
                          p.rows = count;
                          p.heads = H;
                          p.length = kc.size(1);
                          p.fft_size = n;
                          p.freqs = F;
                          p.row_begin = h0;
                          p.real_buf = real;
                          p.in = kc.data_ptr();
                          p.in_kind = k_kind;
                          fftconv_pad_cast_cpu<Acc>(p, 0, count);
                          Acc* K = kernel_spec + 2 * h0 * F;
                          block_fft<Acc>(true, real, K, count, n);
                          // the irfft's 1/n, folded into K (exact for a power-of-two n): one pass over K in
                          // cache instead of MKL's scaling pass over every row's inverse
                          const Acc scale = Acc(1) / static_cast<Acc>(n);
                          for (int64_t e = 0; e < 2 * count * F; ++e) K[e] *= scale;
                        });
    // Rows in head-major order j = h·B + b (row b·H + h): a block holds consecutive batches of a head, so each
    // kernel spectrum is read from memory once and then from cache (in (b, h) order every block read its heads'
    // spectra anew: B times 33.5 MB at H = 256, n = 32768, more than the L3).
    const int64_t B = uc.size(0);
    for_each_block<Acc>(rows, cpu_block_rows_for(rows, n, sizeof(Acc), threads, block_rows_requested), n,
                        [&](int64_t j0, int64_t count, Acc* real, Acc* spec) {
                          FFTConvParams<Acc> p;
                          p.rows = 1;
                          p.heads = H;
                          p.length = L;
                          p.fft_size = n;
                          p.freqs = F;
                          p.kernel_spec = kernel_spec;
                          p.in = uc.data_ptr();
                          p.in_kind = u_kind;
                          p.in2 = uc.data_ptr();
                          p.in2_kind = u_kind;
                          p.skip_D = Dc.defined() ? Dc.data_ptr<Acc>() : nullptr;
                          p.out = out.data_ptr();
                          p.out_kind = u_kind;
                          auto each_row = [&](auto pass) {
                            for (int64_t i = 0; i < count; ++i) {
                              const int64_t j = j0 + i;
                              p.row_begin = (j % B) * H + j / B;
                              p.real_buf = real + i * n;
                              p.spec = spec + 2 * i * F;
                              pass(p);
                            }
                          };
                          each_row([](const FFTConvParams<Acc>& q) { fftconv_pad_cast_cpu<Acc>(q, 0, 1); });
                          block_fft<Acc>(true, real, spec, count, n);
                          each_row([](const FFTConvParams<Acc>& q) { fftconv_cmul_cpu<Acc>(q, 0, 1); });
                          block_fft<Acc>(false, real, spec, count, n);
                          each_row([](const FFTConvParams<Acc>& q) { fftconv_crop_skip_cpu<Acc>(q, 0, 1); });
                        });
  });
}

}  // namespace

// y = irfft(rfft(u, n) · rfft(k, n))[..., :L] + D·u, in u's dtype (fp32 math; fp64 for fp64 u).
at::Tensor fft_conv(const at::Tensor& u, const at::Tensor& k, const std::optional<at::Tensor>& D, int64_t n,
                    int64_t chunk_rows) {
  check_fft_args(u, k, D, n);
  const ScalarKind u_kind = scalar_kind_of(u, kFFT, "u");
  const int64_t B = u.size(0), H = u.size(1), L = u.size(2);
  at::Tensor out = at::empty({B, H, L}, u.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t rows = B * H;
  if (rows == 0 || L == 0) return out;
  const bool cuda = u.is_cuda();
  const at::ScalarType acc = acc_type_of(u);
  const at::Tensor uc = u.contiguous();
  const at::Tensor Dc = D.has_value() ? D->to(acc).contiguous() : at::Tensor();
  if (!cuda) {
    fft_conv_cpu_blocks(uc, u_kind, k, Dc, out, n, chunk_rows);
    return out;
  }
  const at::Tensor Kf = at::fft_rfft(k.to(acc), n, -1, std::nullopt).contiguous();
  const int64_t F = n / 2 + 1;
  const int64_t chunk = chunk_rows_for(rows, n, cuda, chunk_rows);
  // Two reused chunk workspaces: the zero-padded real rows (also the irfft output) and their spectra.
  at::Tensor real_buf = at::empty({chunk, n}, u.options().dtype(acc));
  at::Tensor spec = at::empty({chunk, F}, u.options().dtype(complex_of(acc)));
  AT_DISPATCH_FLOATING_TYPES(acc, "s4_fft_conv", [&] {
    using Acc = scalar_t;
    const at::Tensor Kf_r = at::view_as_real(Kf);
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
      const int64_t count = std::min(chunk, rows - r0);
      at::Tensor rb = real_buf.narrow(0, 0, count), sp = spec.narrow(0, 0, count);
      FFTConvParams<Acc> p = fft_params<Acc>(count, H, L, n, r0, rb, sp, Kf_r);
      p.in = uc.data_ptr();
      p.in_kind = u_kind;
      p.in2 = uc.data_ptr();
      p.in2_kind = u_kind;
      p.skip_D = Dc.defined() ? Dc.data_ptr<Acc>() : nullptr;
      p.out = out.data_ptr();
      p.out_kind = u_kind;
      run<Acc>(FFTKernel::kPad, p, u.device(), count, n);
      at::fft_rfft_out(sp, rb, n, -1, std::nullopt);
      run<Acc>(FFTKernel::kMul, p, u.device(), count, F);
      at::fft_irfft_out(rb, sp, n, -1, std::nullopt);
      run<Acc>(FFTKernel::kCrop, p, u.device(), count, L);
    }
  });
  return out;
}

// Whether the CPU forward calls MKL's DFTI itself (else at::fft); `enable` switches it (tests compare both paths).
bool fft_direct_mkl(std::optional<bool> enable) {
  if (enable.has_value()) g_direct_dfti.store(*enable, std::memory_order_relaxed);
  return direct_dfti();
}

// (grad_u [B, H, L] in u's dtype, grad_k [H, Lk] in k's dtype, grad_D [H] in D's dtype); an output
// not needed is an empty [0] tensor.
//   grad_u = irfft(rfft(G, n) · conj(K))[..., :L] + D·G,  grad_k = irfft(Σ_b rfft(G, n) · conj(rfft(u, n)))[:, :Lk],
//   grad_D = Σ_{b, l} G·u.
std::vector<at::Tensor> fft_conv_backward(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& k,
                                          const std::optional<at::Tensor>& D, int64_t n, bool need_u, bool need_k,
                                          bool need_D, int64_t chunk_rows) {
  check_fft_args(u, k, D, n);
  FC_CHECK(grad.sizes() == u.sizes() && grad.device() == u.device(), kFFT, "grad_out must have u's shape and device");
  const ScalarKind u_kind = scalar_kind_of(u, kFFT, "u");
  const int64_t B = u.size(0), H = u.size(1), L = u.size(2), Lk = k.size(1);
  const int64_t rows = B * H, F = n / 2 + 1;
  const bool cuda = u.is_cuda();
  const at::ScalarType acc = acc_type_of(u);
  const at::Tensor G = grad.to(u.scalar_type()).contiguous();
  const ScalarKind g_kind = scalar_kind_of(G, kFFT, "grad_out");
  const at::Tensor uc = u.contiguous();
  at::Tensor grad_u = need_u ? at::empty({B, H, L}, u.options().memory_format(at::MemoryFormat::Contiguous))
                             : at::empty({0}, u.options());
  at::Tensor grad_kf = need_k ? at::zeros({H, F}, u.options().dtype(complex_of(acc))) : at::Tensor();
  at::Tensor grad_D = at::empty({0}, u.options());
  if (need_D && D.has_value()) {
    at::Tensor dots = at::empty({rows}, u.options().dtype(acc));
    if (rows > 0) {
      AT_DISPATCH_FLOATING_TYPES(acc, "s4_fft_conv_dot", [&] {
        using Acc = scalar_t;
        FFTConvParams<Acc> p;
        p.rows = rows;
        p.heads = H;
        p.length = L;
        p.in = G.data_ptr();
        p.in_kind = g_kind;
        p.in2 = uc.data_ptr();
        p.in2_kind = u_kind;
        p.dot = dots.data_ptr<Acc>();
        run<Acc>(FFTKernel::kRowDot, p, u.device(), rows, L);
      });
    }
    grad_D = dots.view({B, H}).sum(0).to(D->scalar_type());
  }
  if ((need_u || need_k) && rows > 0 && L > 0) {
    const at::Tensor Kf = at::fft_rfft(k.to(acc), n, -1, std::nullopt).contiguous();
    const at::Tensor Dc = D.has_value() ? D->to(acc).contiguous() : at::Tensor();
    // Whole b's per chunk is not needed: grad_kf[h] accumulates rows in increasing b in any chunking.
    const int64_t chunk = chunk_rows_for(rows, n, cuda, chunk_rows);
    at::Tensor real_buf = at::empty({chunk, n}, u.options().dtype(acc));
    at::Tensor spec = at::empty({chunk, F}, u.options().dtype(complex_of(acc)));
    at::Tensor spec_u = need_k ? at::empty({chunk, F}, u.options().dtype(complex_of(acc))) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(acc, "s4_fft_conv_backward", [&] {
      using Acc = scalar_t;
      const at::Tensor Kf_r = at::view_as_real(Kf);
      for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        const int64_t count = std::min(chunk, rows - r0);
        at::Tensor rb = real_buf.narrow(0, 0, count), sp = spec.narrow(0, 0, count);
        FFTConvParams<Acc> p = fft_params<Acc>(count, H, L, n, r0, rb, sp, Kf_r);
        if (need_k) {  // U spectra of the chunk first (the real buffer is then reused for G)
          at::Tensor su = spec_u.narrow(0, 0, count);
          p.in = uc.data_ptr();
          p.in_kind = u_kind;
          run<Acc>(FFTKernel::kPad, p, u.device(), count, n);
          at::fft_rfft_out(su, rb, n, -1, std::nullopt);
          p.spec2 = static_cast<const Acc*>(su.data_ptr());
          p.grad_kernel_spec = static_cast<Acc*>(grad_kf.data_ptr());
        }
        p.in = G.data_ptr();
        p.in_kind = g_kind;
        run<Acc>(FFTKernel::kPad, p, u.device(), count, n);
        at::fft_rfft_out(sp, rb, n, -1, std::nullopt);
        // grad_kf += G conj(U) per head (fixed order) and G *= conj(K), in one pass.
        run<Acc>(FFTKernel::kGradSpectra, p, u.device(), H * F, count / H + 1);
        if (need_u) {
          at::fft_irfft_out(rb, sp, n, -1, std::nullopt);
          p.in2 = G.data_ptr();
          p.in2_kind = g_kind;
          p.skip_D = Dc.defined() ? Dc.data_ptr<Acc>() : nullptr;
          p.out = grad_u.data_ptr();
          p.out_kind = u_kind;
          run<Acc>(FFTKernel::kCrop, p, u.device(), count, L);
        }
      }
    });
  } else if (need_u) {
    grad_u.zero_();
  }
  at::Tensor grad_k = at::empty({0}, k.options());
  if (need_k) {
    grad_k = rows > 0 && L > 0
                 ? at::fft_irfft(grad_kf, n, -1, std::nullopt).narrow(1, 0, Lk).to(k.scalar_type()).contiguous()
                 : at::zeros({H, Lk}, k.options());
  }
  return {grad_u, grad_k, grad_D};
}

// ---- SSM step ----------------------------------------------------------------------------------

namespace {
constexpr const char* kStep = "ssm_step";

// The inputs both step directions read (complex storage as interleaved (re, im) pairs of T; D in T or absent).
template <typename T>
StepParams<T> step_inputs(const at::Tensor& state, const at::Tensor& u, const at::Tensor& dA, const at::Tensor& dB,
                          const at::Tensor& C, const at::Tensor& D, int64_t B, int64_t H, int64_t N) {
  StepParams<T> p;
  p.state = static_cast<const T*>(state.data_ptr());
  p.u = u.data_ptr();
  p.u_kind = scalar_kind_of(u, kStep, "u");
  p.dA = static_cast<const T*>(dA.data_ptr());
  p.dB = static_cast<const T*>(dB.data_ptr());
  p.C = static_cast<const T*>(C.data_ptr());
  p.D = D.defined() ? D.data_ptr<T>() : nullptr;
  p.batch = B;
  p.heads = H;
  p.states = N;
  return p;
}

// Launches the step (forward or backward) when `state` is on a GPU: true when it ran there, false for the CPU.
template <typename T>
bool step_on_cuda(const StepParams<T>& p, const at::Tensor& state, bool backward) {
  if (!state.is_cuda()) return false;
  require_cuda(kStep);
  FC_CHECK((std::is_same<T, float>::value), kStep, "the cuda backend takes complex64 state, got complex128");
  if constexpr (std::is_same<T, float>::value) {  // the CUDA step kernels are float only
    FC_CUDA_CALL(kStep, backward ? "backward launch" : "launch", state.device(),
                 backward ? ssm_step_backward_cuda(p, current_stream()) : ssm_step_cuda(p, current_stream()));
  }
  return true;
}

// Blocks for the functional step's new state on the CPU. A generation loop `y, state = ssm_step(state, ...)`
// frees the old state just after receiving the new one; glibc serves blocks of this size (~1 MiB) by mmap, or
// from the heap top and then trims it, and which one it does depends on its heap's history; in the second case
// the whole new state faults in at every step (several times slower: docs/s4.md, "Functional step
// allocation"). The step therefore takes its new state from a small cache of the blocks its earlier results
// released: a loop then alternates between two blocks that stay mapped. At most
// kCachedBlocks blocks and kCachedBytes bytes are kept (a block is reused only at its exact size); the cache
// is never destroyed, because tensors may release blocks during static destruction.
class StepBlockCache {
 public:
  static StepBlockCache& instance() {
    static StepBlockCache* cache = new StepBlockCache();
    return *cache;
  }
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = 0; i < blocks_.size(); ++i) {
        if (blocks_[i].first != bytes) continue;
        void* block = blocks_[i].second;
        cached_bytes_ -= bytes;
        blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(i));
        return block;
      }
    }
    void* block = std::aligned_alloc(64, bytes);  // bytes is a multiple of 64
    if (block == nullptr) throw std::bad_alloc();
    return block;
  }
  void give(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (blocks_.size() < kCachedBlocks && cached_bytes_ + bytes <= kCachedBytes) {
        blocks_.emplace_back(bytes, block);
        cached_bytes_ += bytes;
        return;
      }
    }
    std::free(block);
  }

 private:
  static constexpr size_t kCachedBlocks = 4;
  static constexpr size_t kCachedBytes = size_t(64) << 20;
  std::mutex mutex_;
  std::vector<std::pair<size_t, void*>> blocks_;
  size_t cached_bytes_ = 0;
};

// The functional step's new state: on the CPU, for states of 64 KiB and more, a block of the cache above,
// placed so that its address differs from the input state's by about 2 KiB modulo 4 KiB: the kernel stores each
// new row while it loads the next ones, and a load whose address bits 0-11 match a pending store waits for it
// ("4K aliasing", see ssm_step_float_head_pairs in s4_cpu.cpp); blocks of one size from one allocator tend to
// share their offset within a page (the measured cost: docs/s4.md, "Functional step allocation"). The
// result is an ordinary contiguous tensor (its storage is not resizable, as any from_blob tensor's).
at::Tensor new_state_like(const at::Tensor& state) {
  const int64_t elements = state.numel(), element_bytes = static_cast<int64_t>(state.element_size());
  if (!state.device().is_cpu() || elements * element_bytes < (int64_t(1) << 16))
    return at::empty(state.sizes(), state.options().memory_format(at::MemoryFormat::Contiguous));
  constexpr int64_t kPage = 4096;
  const size_t bytes = static_cast<size_t>((elements * element_bytes + kPage + 63) / 64 * 64);
  char* const block = static_cast<char*>(StepBlockCache::instance().take(bytes));
  const int64_t input = static_cast<int64_t>(reinterpret_cast<uintptr_t>(state.data_ptr()) % kPage);
  const int64_t base = static_cast<int64_t>(reinterpret_cast<uintptr_t>(block) % kPage);
  const int64_t shift = ((input + kPage / 2 - base) % kPage + kPage) % kPage / element_bytes * element_bytes;
  try {
    return at::from_blob(
        block + shift, state.sizes(), [block, bytes](void*) { StepBlockCache::instance().give(block, bytes); },
        state.options().memory_format(at::MemoryFormat::Contiguous));
  } catch (...) {
    StepBlockCache::instance().give(block, bytes);
    throw;
  }
}

void check_step_args(const at::Tensor& state, const at::Tensor& u, const at::Tensor& dA, const at::Tensor& dB,
                     const at::Tensor& C, const std::optional<at::Tensor>& D) {
  check_complex(kStep, "state", state, 3);
  const int64_t B = state.size(0), H = state.size(1), N = state.size(2);
  for (const at::Tensor* t : {&dA, &dB, &C}) {
    check_complex(kStep, "dA/dB/C", *t, 2);
    FC_CHECK(
        t->size(0) == H && t->size(1) == N && t->scalar_type() == state.scalar_type() && t->device() == state.device(),
        kStep, "dA, dB, C must be [H, N] in state's dtype and device");
  }
  FC_CHECK(u.dim() == 2 && u.size(0) == B && u.size(1) == H && u.device() == state.device(), kStep,
           "u must be [B, H] on state's device");
  scalar_kind_of(u, kStep, "u");
  if (D.has_value())
    FC_CHECK(D->dim() == 1 && D->size(0) == H && D->device() == state.device(), kStep, "D must be [H]");
}
}  // namespace

// (y [B, H] in u's dtype, new_state [B, H, N]); state is not modified unless `inplace` (then the
// returned new_state is `state` itself, which must be contiguous and not conjugated).
std::vector<at::Tensor> ssm_step(const at::Tensor& state, const at::Tensor& u, const at::Tensor& dA,
                                 const at::Tensor& dB, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                 bool inplace) {
  check_step_args(state, u, dA, dB, C, D);
  const int64_t B = state.size(0), H = state.size(1), N = state.size(2);
  FC_CHECK(!inplace || (state.is_contiguous() && !state.is_conj()), kStep,
           "an in-place step needs a contiguous, non-conjugated state");
  at::Tensor new_state = inplace ? state : new_state_like(state);
  at::Tensor y = at::empty({B, H}, u.options().memory_format(at::MemoryFormat::Contiguous));
  if (B * H == 0) return {y, new_state};
  const at::ScalarType real = state.scalar_type() == at::kComplexFloat ? at::kFloat : at::kDouble;
  // Inputs already in the layout the kernels read are used as they are, without the view objects of
  // interleaved() (this runs once per generated sample; each view is a dispatcher call).
  const at::Tensor s = resolved(state), a = resolved(dA), bb = resolved(dB), c = resolved(C);
  const at::Tensor uc = u.is_contiguous() ? u : u.contiguous();
  const at::Tensor Dc = !D.has_value()                                     ? at::Tensor()
                        : (D->scalar_type() == real && D->is_contiguous()) ? *D
                                                                           : D->to(real).contiguous();
  AT_DISPATCH_FLOATING_TYPES(real, "s4_ssm_step", [&] {
    using T = scalar_t;
    StepParams<T> p = step_inputs<T>(s, uc, a, bb, c, Dc, B, H, N);
    p.y = y.data_ptr();
    p.new_state = static_cast<T*>(new_state.data_ptr());
    if (step_on_cuda(p, state, false)) return;
    // Work units are heads (the kernel prepares dA, dB, C once per tile of heads for all B rows). A step is
    // tiny, so a thread gets at least ~2^15 states: below that waking a second thread costs more than it saves.
    at::parallel_for(0, H, std::max<int64_t>(1, (int64_t(1) << 15) / (B * N)),
                     [&](int64_t b, int64_t e) { ssm_step_cpu<T>(p, b, e); });
  });
  return {y, new_state};
}

namespace {
bool is_real_float(const at::Tensor& t) {
  const at::ScalarType k = t.scalar_type();
  return k == at::kFloat || k == at::kDouble || k == at::kBFloat16 || k == at::kHalf;
}
}  // namespace

// The lean entry of ops.ssm_step's per-step fast path: every check of the Python validation
// (fastcore_ai.ops.s4._step_validate) that depends on the tensors, as plain comparisons, and the step when
// all pass. When any fails it returns an empty list and computes nothing: the caller then takes the
// validating path, which raises the documented error (the checks here may only be as strict or stricter).
// What the Python side keeps: tensor types and autograd/mode eligibility, and the backend selection.
std::vector<at::Tensor> ssm_step_if_valid(const at::Tensor& state, const at::Tensor& u, const at::Tensor& dA,
                                          const at::Tensor& dB, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                          bool inplace, int64_t max_states) {
  const at::ScalarType st = state.scalar_type();
  if (state.dim() != 3 || (st != at::kComplexFloat && st != at::kComplexDouble)) return {};
  const int64_t B = state.size(0), H = state.size(1), N = state.size(2);
  if (N < 1 || N > max_states) return {};
  const at::Device device = state.device();
  if (u.dim() != 2 || !is_real_float(u) || u.size(0) != B || u.size(1) != H || u.device() != device) return {};
  for (const at::Tensor* t : {&dA, &dB, &C})
    if (t->dim() != 2 || t->scalar_type() != st || t->size(0) != H || t->size(1) != N || t->device() != device)
      return {};
  if (D.has_value() && (D->dim() != 1 || !is_real_float(*D) || D->size(0) != H || D->device() != device)) return {};
  if (inplace && (!state.is_contiguous() || state.is_conj())) return {};
  return ssm_step(state, u, dA, dB, C, D, inplace);
}

// (grad_state, grad_u [B, H] in u's dtype, grad_dA, grad_dB, grad_C, grad_D [H] or [0]).
std::vector<at::Tensor> ssm_step_backward(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_new_state,
                                          const at::Tensor& state, const at::Tensor& u, const at::Tensor& dA,
                                          const at::Tensor& dB, const at::Tensor& C,
                                          const std::optional<at::Tensor>& D) {
  check_step_args(state, u, dA, dB, C, D);
  const int64_t B = state.size(0), H = state.size(1), N = state.size(2);
  const at::ScalarType real = state.scalar_type() == at::kComplexFloat ? at::kFloat : at::kDouble;
  FC_CHECK(grad_y.dim() == 2 && grad_y.size(0) == B && grad_y.size(1) == H, kStep, "grad_y must be [B, H]");
  at::Tensor grad_state = at::empty({B, H, N}, state.options());
  at::Tensor grad_u = at::empty({B, H}, u.options().dtype(real));
  at::Tensor grad_dA = at::empty({H, N}, dA.options()), grad_dB = at::empty({H, N}, dA.options()),
             grad_C = at::empty({H, N}, dA.options());
  at::Tensor grad_D = at::empty({D.has_value() ? H : 0}, u.options().dtype(real));
  if (H * N == 0 || B == 0) {
    grad_dA.zero_();
    grad_dB.zero_();
    grad_C.zero_();
    grad_D.zero_();
    if (B * H == 0 || N == 0) {
      grad_state.zero_();
      if (D.has_value() && B * H > 0)
        grad_u.copy_(grad_y.to(real) * D->to(real));
      else
        grad_u.zero_();
      if (D.has_value() && B * H > 0) grad_D.copy_((grad_y.to(real) * u.to(real)).sum(0));
      return {grad_state, grad_u.to(u.scalar_type()),
              grad_dA,    grad_dB,
              grad_C,     grad_D.to(D.has_value() ? D->scalar_type() : real)};
    }
  }
  const at::Tensor s = interleaved(state), a = interleaved(dA), bb = interleaved(dB), c = interleaved(C);
  const at::Tensor uc = u.contiguous(), gy = grad_y.to(real).contiguous();
  const at::Tensor gns = grad_new_state.has_value() ? interleaved(*grad_new_state) : at::Tensor();
  if (gns.defined()) FC_CHECK(grad_new_state->sizes() == state.sizes(), kStep, "grad_new_state must be [B, H, N]");
  const at::Tensor Dc = D.has_value() ? D->to(real).contiguous() : at::Tensor();
  at::Tensor gs = at::view_as_real(grad_state), gA = at::view_as_real(grad_dA), gB = at::view_as_real(grad_dB),
             gC = at::view_as_real(grad_C);
  AT_DISPATCH_FLOATING_TYPES(real, "s4_ssm_step_backward", [&] {
    using T = scalar_t;
    StepParams<T> p = step_inputs<T>(s, uc, a, bb, c, Dc, B, H, N);
    p.grad_y = gy.data_ptr<T>();
    p.grad_new_state = gns.defined() ? gns.data_ptr<T>() : nullptr;
    p.grad_state = gs.data_ptr<T>();
    p.grad_u = grad_u.data_ptr<T>();
    p.grad_dA = gA.data_ptr<T>();
    p.grad_dB = gB.data_ptr<T>();
    p.grad_C = gC.data_ptr<T>();
    p.grad_D = D.has_value() ? grad_D.data_ptr<T>() : nullptr;
    if (step_on_cuda(p, state, true)) return;
    at::parallel_for(0, H, parallel_grain(B * N * 16),
                     [&](int64_t b, int64_t e) { ssm_step_backward_cpu<T>(p, b, e); });
  });
  return {grad_state, grad_u.to(u.scalar_type()),
          grad_dA,    grad_dB,
          grad_C,     D.has_value() ? grad_D.to(D->scalar_type()) : grad_D};
}

}  // namespace s4

void bind_s4(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("s4_cauchy", &s4::cauchy, "S4 Cauchy kernel out[b,l] = sum_n v/(z-w) (+ conj term)", py::arg("v"), py::arg("z"),
        py::arg("w"), py::arg("conj_symmetric"));
  m.def("s4_cauchy_backward", &s4::cauchy_backward, "Cauchy kernel backward (grad_v, grad_w)", py::arg("grad"),
        py::arg("v"), py::arg("z"), py::arg("w"), py::arg("conj_symmetric"));
  m.def("s4_vandermonde", &s4::vandermonde, "S4D kernel K[b,l] = 2 Re sum_n v exp(x l)", py::arg("v"), py::arg("x"),
        py::arg("L"));
  m.def("s4_vandermonde_backward", &s4::vandermonde_backward, "Vandermonde backward (grad_v, grad_x)", py::arg("grad"),
        py::arg("v"), py::arg("x"));
  m.def("s4_fft_conv", &s4::fft_conv, "causal FFT convolution + D skip", py::arg("u"), py::arg("k"), py::arg("D"),
        py::arg("n"), py::arg("chunk_rows") = 0);
  m.def("s4_fft_direct_mkl", &s4::fft_direct_mkl,
        "whether the CPU fft_conv forward calls MKL's DFTI with cached descriptors (else at::fft); enable sets it",
        py::arg("enable") = std::nullopt);
  m.def("s4_fft_conv_backward", &s4::fft_conv_backward, "FFT convolution backward (grad_u, grad_k, grad_D)",
        py::arg("grad"), py::arg("u"), py::arg("k"), py::arg("D"), py::arg("n"), py::arg("need_u"), py::arg("need_k"),
        py::arg("need_D"), py::arg("chunk_rows") = 0);
  m.def("s4_ssm_step", &s4::ssm_step, "diagonal SSM recurrent step (y, new_state)", py::arg("state"), py::arg("u"),
        py::arg("dA"), py::arg("dB"), py::arg("C"), py::arg("D"), py::arg("inplace") = false);
  m.def("s4_ssm_step_if_valid", &s4::ssm_step_if_valid,
        "ssm_step when every argument check of ops.ssm_step passes, else [] (nothing computed)", py::arg("state"),
        py::arg("u"), py::arg("dA"), py::arg("dB"), py::arg("C"), py::arg("D"), py::arg("inplace"),
        py::arg("max_states"));
  m.def("s4_ssm_step_backward", &s4::ssm_step_backward, "SSM step backward", py::arg("grad_y"),
        py::arg("grad_new_state"), py::arg("state"), py::arg("u"), py::arg("dA"), py::arg("dB"), py::arg("C"),
        py::arg("D"));
}
}  // namespace fastcore
