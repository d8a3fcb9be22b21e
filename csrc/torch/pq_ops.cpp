// Torch glue of the pq family: checks of what the kernels rely on (the user-facing validation with
// full messages lives in fastcore_ai.ops.pq), allocation, params filling and at::parallel_for.
//
// Work split of the scans: with enough queries every thread takes whole query blocks over all codes;
// with few queries (a single query included) the code rows are split into parts scanned in parallel,
// each keeping its own top-k, then merged. The top-k is unique under (key, id) order, so the result
// is the same for any split and thread count.
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <limits>
#include <optional>

#include "cuda_call.h"
#include "pq/pq.h"
#include "tensor_params.h"

namespace fastcore {
namespace pq {
namespace {

Metric metric_of(int64_t metric, const char* op) {
  FC_CHECK(metric == 0 || metric == 1, op, "metric must be 0 (l2) or 1 (ip), got ", metric);
  return metric == 0 ? Metric::kL2 : Metric::kIP;
}

void check_cpu(const at::Tensor& t, const char* op, const char* arg) {
  FC_CHECK(t.device().is_cpu(), op, arg, " must be a CPU tensor, got ", t.device());
}

// Row parts for a scan of n rows by nq queries (1 = split by queries only).
int64_t scan_parts(int64_t nq, int64_t n, int64_t query_block, int64_t min_rows) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || nq >= threads * query_block) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(threads * 2, n / min_rows));
}

// fn(begin, end) over the row blocks [b·rows, min(n, (b + 1)·rows)) of n rows, handed to at most `workers`
// threads one block at a time from a shared counter: on a shared machine an even split up front waits for
// its slowest thread. Each block's result must not depend on which thread ran it.
template <typename Fn>
void for_each_row_block(int64_t n, int64_t rows, int64_t workers, const Fn& fn) {
  const int64_t blocks = (n + rows - 1) / rows;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(1, std::min(workers, blocks)), 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1)) fn(b * rows, std::min(n, (b + 1) * rows));
  });
}

}  // namespace

// (lut [n, M, ksub] or empty, codes [n, M] uint8 or empty). x [n, M·dsub] float32/float64, unit column
// stride; codebooks [M, ksub, dsub] of x's dtype.
std::vector<at::Tensor> tables(const at::Tensor& x, const at::Tensor& codebooks, int64_t metric, bool want_lut,
                               bool want_codes) {
  const char* op = want_codes ? "pq_encode" : "pq_lut";
  FC_CHECK(x.device() == codebooks.device(), op, "x and codebooks must be on the same device");
  FC_CHECK(!x.is_cuda() || (want_lut && !want_codes && x.scalar_type() == at::kFloat), op,
           "on CUDA only float32 tables are computed here");
  if (!x.is_cuda()) check_cpu(x, op, "x");
  FC_CHECK(x.dim() == 2 && codebooks.dim() == 3, op, "x must be [n, d] and codebooks [M, ksub, dsub]");
  FC_CHECK(
      x.scalar_type() == codebooks.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
      op, "x and codebooks must both be float32 or both float64, got ", x.scalar_type(), " and ",
      codebooks.scalar_type());
  const int64_t n = x.size(0), M = codebooks.size(0), ksub = codebooks.size(1), dsub = codebooks.size(2);
  FC_CHECK(x.size(1) == M * dsub, op, "x must have d = M·dsub = ", M * dsub, " columns, got ", x.size(1));
  FC_CHECK(ksub >= 1 && ksub <= 256, op, "codebooks must have 1 <= ksub <= 256, got ", ksub);
  const Metric m = metric_of(metric, op);
  FC_CHECK(!want_codes || m == Metric::kL2, op, "encoding uses the l2 metric");
  at::Tensor xc = (x.size(1) > 0 && x.stride(1) != 1) ? x.contiguous() : x;
  at::Tensor ct = codebooks.permute({0, 2, 1}).contiguous();  // [M, dsub, ksub]
  at::Tensor lut = want_lut ? at::empty({n, M, ksub}, x.options()) : at::Tensor();
  // The fields every launch below shares (the CUDA tables, the float32 encode, the dispatched CPU path);
  // each caller then sets lut and/or codes.
  auto table_params = [&](auto scalar_tag) {
    using T = decltype(scalar_tag);
    TableParams<T> p;
    p.x = xc.data_ptr<T>();
    p.x_stride = xc.stride(0);
    p.codebooks_t = ct.data_ptr<T>();
    p.n = n;
    p.M = M;
    p.dsub = dsub;
    p.ksub = ksub;
    p.metric = m;
    return p;
  };
  at::Tensor codes = want_codes ? at::empty({n, M}, x.options().dtype(at::kByte)) : at::Tensor();
  if (n == 0 || M == 0) return {lut, codes};
  if (x.is_cuda()) {
    TableParams<float> p = table_params(float{});
    p.lut = lut.data_ptr<float>();
    FC_CUDA_CALL(op, "table kernel launch", x.device(), pq_lut_cuda(p, current_stream()));
    return {lut, codes};
  }
  // At least ~2^20 multiply-adds per thread: smaller jobs (a search's query tables) run on the calling
  // thread, since waking the pool costs more than the work (and much more on a loaded machine).
  const int64_t grain =
      std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(M * ksub * std::max<int64_t>(dsub, 1), 1));
  if (want_codes && !want_lut && x.scalar_type() == at::kFloat) {
    // float32 encode: the GEMM form with the centroid norms precomputed once per call.
    at::Tensor c_norms = (codebooks * codebooks).sum(2).contiguous();  // [M, ksub]
    TableParams<float> p = table_params(float{});
    at::Tensor ct_m2 = ct * -2.0f;  // the kernels take −2·Cᵀ (exact scaling)
    p.codebooks_t = ct_m2.data_ptr<float>();
    p.codes = codes.data_ptr<uint8_t>();
    // Blocks of rows: at least `grain`, a multiple of the kernel's 128-row block.
    const float* norms = c_norms.data_ptr<float>();
    for_each_row_block(n, std::max<int64_t>(128, (grain + 127) / 128 * 128), at::get_num_threads(),
                       [&](int64_t b, int64_t e) { pq_encode_cpu(p, norms, b, e); });
    return {lut, codes};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pq_tables", [&] {
    TableParams<scalar_t> p = table_params(scalar_t{});
    p.lut = want_lut ? lut.data_ptr<scalar_t>() : nullptr;
    p.codes = want_codes ? codes.data_ptr<uint8_t>() : nullptr;
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { pq_tables_cpu(p, b, e); });
  });
  return {lut, codes};
}

// (assign [n] int64, min_dist [n] float32): nearest centroid (metric 0: l2, by ‖x‖² − 2x·c + ‖c‖²) or
// largest inner product (metric 1). With AVX-512: the fused tile kernel (pq_assign_fused_cpu), blocks
// of rows handed to the threads one at a time; the [n, k] product is never written (the old path's
// 4096-row chunk for k = 1024 wrote 16 MiB, out of cache, and its argmin pass cost a quarter of the
// GEMM), and no BLAS call runs nested in a parallel region (MKL there starts its own threads).
std::vector<at::Tensor> kmeans_assign(const at::Tensor& x, const at::Tensor& centroids, int64_t metric) {
  const char* op = "kmeans";
  check_cpu(x, op, "x");
  check_cpu(centroids, op, "centroids");
  FC_CHECK(x.dim() == 2 && centroids.dim() == 2 && x.size(1) == centroids.size(1) && x.scalar_type() == at::kFloat &&
               centroids.scalar_type() == at::kFloat,
           op, "x [n, d] and centroids [k, d] must be float32 with the same d");
  const Metric m = metric_of(metric, op);
  const int64_t n = x.size(0), k = centroids.size(0);
  FC_CHECK(k >= 1, op, "centroids must have k >= 1 rows");
  at::Tensor xc = x.contiguous(), cc = centroids.contiguous();
  at::Tensor assign = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor min_dist = at::empty({n}, x.options());
  if (n == 0) return {assign, min_dist};
  const bool l2 = m == Metric::kL2;
  if (pq_assign_fused_available() && k <= (int64_t(1) << 30)) {
    // AVX-512: the fused tile kernel (no GEMM library call, no product in memory, and so no BLAS
    // threads nested inside this parallel region). Centroids packed in panels of 32.
    const int64_t d = xc.size(1), panels = (k + 31) / 32;
    at::Tensor padded = at::zeros({panels * 32, d}, cc.options());
    padded.narrow(0, 0, k).copy_(cc);
    at::Tensor packed = padded.view({panels, 32, d}).transpose(1, 2).contiguous();  // [panels, d, 32]
    at::Tensor base = at::full({panels * 32}, std::numeric_limits<float>::infinity(), cc.options());
    base.narrow(0, 0, k).copy_(l2 ? (cc * cc).sum(1) : at::zeros({k}, cc.options()));
    FusedAssignParams p;
    p.x = xc.data_ptr<float>();
    p.x_stride = xc.stride(0);
    p.c_packed = packed.data_ptr<float>();
    p.base = base.data_ptr<float>();
    p.n = n;
    p.d = d;
    p.k = k;
    p.metric = m;
    p.assign = assign.data_ptr<int64_t>();
    p.min_dist = min_dist.data_ptr<float>();
    // Blocks of 192 rows; small jobs stay on the calling thread.
    for_each_row_block(n, 192, n * k * d < (int64_t(1) << 22) ? 1 : at::get_num_threads(),
                       [&](int64_t b, int64_t e) { pq_assign_fused_cpu(p, b, e); });
    return {assign, min_dist};
  }
  // Otherwise: the GEMM of a row block (threaded by the BLAS library, so called outside any parallel
  // region) into a [block, k] buffer of at most 4 MiB, then the argmin pass over the block in parallel.
  at::Tensor x_norms = l2 ? (xc * xc).sum(1) : at::Tensor(), c_norms = l2 ? (cc * cc).sum(1) : at::Tensor();
  const int64_t block = std::max<int64_t>(64, (int64_t(1) << 20) / k);
  at::Tensor ct = cc.t();
  at::Tensor gram = at::empty({std::min(block, n), k}, x.options());
  for (int64_t r0 = 0; r0 < n; r0 += block) {
    const int64_t rows = std::min(block, n - r0);
    at::Tensor g = gram.narrow(0, 0, rows);
    at::mm_out(g, xc.narrow(0, r0, rows), ct);
    AssignParams p;
    p.gram = g.data_ptr<float>();
    p.x_norms = l2 ? x_norms.data_ptr<float>() + r0 : nullptr;
    p.c_norms = l2 ? c_norms.data_ptr<float>() : nullptr;
    p.n = rows;
    p.k = k;
    p.metric = m;
    p.assign = assign.data_ptr<int64_t>() + r0;
    p.min_dist = min_dist.data_ptr<float>() + r0;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / k), [&](int64_t b, int64_t e) { pq_assign_cpu(p, b, e); });
  }
  return {assign, min_dist};
}

// out [n, count] int64: the count largest columns of each row of scores [n, L] float32, largest first,
// the lower column on ties (pq_top_columns_cpu): the IVF search's probe lists from its coarse scores.
at::Tensor top_columns(const at::Tensor& scores, int64_t count) {
  const char* op = "ivfpq_search";
  check_cpu(scores, op, "scores");
  FC_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat, op, "scores must be float32 [n, L]");
  FC_CHECK(count >= 1 && count <= scores.size(1), op, "count must satisfy 1 <= count <= L = ", scores.size(1), ", got ",
           count);
  at::Tensor sc = scores.contiguous();
  at::Tensor out = at::empty({sc.size(0), count}, sc.options().dtype(at::kLong));
  TopColumnsParams p;
  p.scores = sc.data_ptr<float>();
  p.ld = p.L = sc.size(1);
  p.count = count;
  p.out = out.data_ptr<int64_t>();
  at::parallel_for(0, sc.size(0), std::max<int64_t>(1, 65536 / p.L),
                   [&](int64_t b, int64_t e) { pq_top_columns_cpu(p, b, e); });
  return out;
}

namespace {
// The member-sum pass both k-means entries share: x [n, M·dsub] float32 grouped by codes [n, M] (uint8 or
// int64, values < ksub), checked, and the zeroed sums [M, ksub, dsub] float64 / counts [M, ksub] int64 it
// fills. `p` points into the tensors held here.
struct MemberSums {
  at::Tensor x, codes, sums, counts;
  CentroidSumParams p;
  int64_t units = 0, grain = 1;  // column blocks of 8 (a 64-byte line of sums) and the parallel grain
};

MemberSums member_sums(const at::Tensor& x, const at::Tensor& codes, int64_t ksub, const char* op) {
  check_cpu(x, op, "x");
  check_cpu(codes, op, "codes");
  FC_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op, "x must be float32 [n, d]");
  FC_CHECK(codes.dim() == 2 && (codes.scalar_type() == at::kByte || codes.scalar_type() == at::kLong) &&
               codes.size(0) == x.size(0) && codes.size(1) >= 1,
           op, "codes must be uint8 or int64 [n, M] with x's n rows");
  const int64_t n = x.size(0), d = x.size(1), M = codes.size(1);
  FC_CHECK(d % M == 0 && d >= M, op, "x's d = ", d, " must be a positive multiple of M = ", M);
  FC_CHECK(ksub >= 1, op, "ksub must be >= 1, got ", ksub);
  MemberSums m;
  m.x = x.stride(1) == 1 ? x : x.contiguous();
  m.codes = codes.contiguous();
  if (n > 0) {
    const int64_t top = m.codes.max().item<int64_t>(), low = m.codes.min().item<int64_t>();
    FC_CHECK(low >= 0 && top < ksub, op, "codes must lie in [0, ksub) = [0, ", ksub, "), got [", low, ", ", top, "]");
  }
  const int64_t dsub = d / M;
  m.sums = at::zeros({M, ksub, dsub}, x.options().dtype(at::kDouble));
  m.counts = at::zeros({M, ksub}, x.options().dtype(at::kLong));
  CentroidSumParams& p = m.p;
  p.x = m.x.data_ptr<float>();
  p.x_stride = m.x.stride(0);
  p.codes8 = m.codes.scalar_type() == at::kByte ? m.codes.data_ptr<uint8_t>() : nullptr;
  p.codes64 = m.codes.scalar_type() == at::kLong ? m.codes.data_ptr<int64_t>() : nullptr;
  p.n = n;
  p.M = M;
  p.dsub = dsub;
  p.ksub = ksub;
  p.sums = m.sums.data_ptr<double>();
  p.counts = m.counts.data_ptr<int64_t>();
  // Columns in multiples of 8 so threads never share a line of sums; at least 2^20 additions per thread
  // (about 1 ms): a PQ training sample (4096 rows × 128) stays on the calling thread, since on a loaded
  // machine waking a second one for each of 25 iterations cost more.
  m.units = (d + 7) / 8;
  m.grain = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(n * 8, 1));
  return m;
}
}  // namespace

// (sums [M, ksub, dsub] float64, counts [M, ksub] int64) of the rows of x [n, M·dsub] float32 grouped by
// codes [n, M] (uint8 or int64, values < ksub): the k-means update's member sums of all M sub-spaces in
// one pass (M = 1: a plain k-means). Threads split the columns of x.
std::vector<at::Tensor> centroid_sums(const at::Tensor& x, const at::Tensor& codes, int64_t ksub) {
  MemberSums m = member_sums(x, codes, ksub, "kmeans");
  const int64_t d = m.x.size(1);
  at::parallel_for(0, m.units, m.grain,
                   [&](int64_t u0, int64_t u1) { pq_centroid_sums_cpu(m.p, u0 * 8, std::min(d, u1 * 8)); });
  return {m.sums, m.counts};
}

// The k-means update of all M sub-spaces in one parallel region: (new32 [M, ksub, dsub] float32, new64
// float64, counts [M, ksub] int64) from x [n, M·dsub] float32, codes [n, M] (uint8 or int64, < ksub) and
// the old centroids [M, ksub, dsub] float32. new64 = member mean (float64 sums in row order), or the old
// centroid for an empty cluster: the reference kmeans_update before its empty-cluster split, same bits.
// Counts first (one serial pass over the codes), then each thread sums and averages its own columns:
// one wake-up of the pool per Lloyd iteration instead of one per torch op of the update.
std::vector<at::Tensor> centroid_update(const at::Tensor& x, const at::Tensor& codes, int64_t ksub,
                                        const at::Tensor& old) {
  const char* op = "kmeans";
  check_cpu(old, op, "old");
  MemberSums m = member_sums(x, codes, ksub, op);
  const int64_t d = m.x.size(1), M = m.p.M, dsub = m.p.dsub;
  FC_CHECK(old.dim() == 3 && old.scalar_type() == at::kFloat && old.size(0) == M && old.size(1) == ksub &&
               old.size(2) == dsub,
           op, "old must be float32 [M, ksub, dsub] = [", M, ", ", ksub, ", ", dsub, "]");
  const at::Tensor oc = old.contiguous();
  at::Tensor new64 = at::empty({M, ksub, dsub}, x.options().dtype(at::kDouble));
  at::Tensor new32 = at::empty({M, ksub, dsub}, x.options());
  pq_code_counts_cpu(m.p);
  m.p.counts = nullptr;  // counted above; the column owners only sum
  CentroidMeanParams q;
  q.sums = m.sums.data_ptr<double>();
  q.counts = m.counts.data_ptr<int64_t>();
  q.old = oc.data_ptr<float>();
  q.new64 = new64.data_ptr<double>();
  q.new32 = new32.data_ptr<float>();
  q.M = M;
  q.dsub = dsub;
  q.ksub = ksub;
  at::parallel_for(0, m.units, m.grain, [&](int64_t u0, int64_t u1) {
    pq_centroid_sums_cpu(m.p, u0 * 8, std::min(d, u1 * 8));
    pq_centroid_means_cpu(q, u0 * 8, std::min(d, u1 * 8));
  });
  return {new32, new64, m.counts};
}

// CUDA flat ADC top-k (see pq.cu): per-chunk block-wide top-k of packed (ordered key, row) uint64
// values, merged here by one sort over the nchunks·k candidates per query, then unpacked.
std::vector<at::Tensor> search_flat_cuda(const at::Tensor& lut, const at::Tensor& codes, int64_t k, int64_t metric) {
  const char* op = "pq_search";
  FC_CHECK(lut.dim() == 3 && lut.scalar_type() == at::kFloat, op, "lut must be float32 [nq, M, ksub]");
  FC_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.size(1) == lut.size(1), op,
           "codes must be uint8 [n, M] with lut's M");
  FC_CHECK(k >= 1 && k <= 4096, op, "the cuda backend supports 1 <= k <= 4096, got ", k);
  const int64_t nq = lut.size(0), M = lut.size(1), ksub = lut.size(2), n = codes.size(0);
  (void)M;
  (void)ksub;
  FC_CHECK(n < (int64_t(1) << 32), op, "the cuda backend takes n < 2^32 codes");
  const Metric m = metric_of(metric, op);
  const bool ip = m == Metric::kIP;
  const float pad = ip ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  if (nq == 0 || n == 0)
    return {at::full({nq, k}, pad, lut.options()), at::full({nq, k}, -1, lut.options().dtype(at::kLong))};
  require_cuda(op);
  at::Tensor lc = lut.contiguous(), cc = codes.contiguous();
  if (ksub < 256)
    TORCH_CHECK_VALUE(cc.max().item<uint8_t>() < ksub, "fastcore_ai.ops.", op, ": codes must lie in [0, ksub)");
  AdcCudaParams p;
  p.lut = lc.data_ptr<float>();
  p.codes = cc.data_ptr<uint8_t>();
  p.nq = nq;
  p.n = n;
  p.M = M;
  p.ksub = ksub;
  p.k = k;
  p.metric = m;
  int64_t chunk = 1024;
  while (chunk < k) chunk <<= 1;
  p.chunk = chunk;
  p.nchunks = (n + chunk - 1) / chunk;
  at::Tensor partial = at::empty({nq, p.nchunks, k}, lut.options().dtype(at::kLong));
  p.partial = reinterpret_cast<unsigned long long*>(partial.data_ptr<int64_t>());
  for (int64_t q0 = 0; q0 < nq; q0 += 65535) {  // grid.y limit
    AdcCudaParams slice = p;
    slice.nq = std::min<int64_t>(65535, nq - q0);
    slice.lut = p.lut + q0 * M * ksub;
    slice.partial = p.partial + q0 * p.nchunks * k;
    FC_CUDA_CALL(op, "ADC scan launch (shared memory for the table + chunk keys may exceed the device's opt-in limit)",
                 lut.device(), adc_topk_cuda(slice, current_stream()));
  }
  // Unsigned order = signed order after flipping the top bit.
  const int64_t flip = std::numeric_limits<int64_t>::min();
  at::Tensor merged = std::get<0>(at::sort(partial.reshape({nq, p.nchunks * k}).bitwise_xor(flip), 1)).narrow(1, 0, k);
  at::Tensor u = merged.bitwise_xor(flip);
  at::Tensor rows = u.bitwise_and(0xffffffffLL);
  at::Tensor ukey = u.bitwise_right_shift(32).bitwise_and(0xffffffffLL);
  // inverse of ordered_bits: top bit set -> clear it; else -> complement (32-bit)
  at::Tensor bits = at::where(ukey.ge(0x80000000LL), ukey - 0x80000000LL, ukey.bitwise_xor(0xffffffffLL));
  bits = at::where(bits.ge(0x80000000LL), bits - 0x100000000LL, bits).to(at::kInt);
  at::Tensor key = bits.view(at::kFloat);
  at::Tensor valid = rows.lt(n);
  at::Tensor dist = at::where(valid, ip ? key.neg() : key, at::full_like(key, pad));
  at::Tensor ids = at::where(valid, rows, at::full_like(rows, -1));
  return {dist, ids};
}

// Flat ADC top-k: lut [nq, M, ksub] float32, codes [n, M] uint8 -> (dist [nq, k] float32, ids [nq, k]).
std::vector<at::Tensor> search_flat(const at::Tensor& lut, const at::Tensor& codes, int64_t k, int64_t metric) {
  const char* op = "pq_search";
  FC_CHECK(lut.device() == codes.device(), op, "lut and codes must be on the same device");
  if (lut.is_cuda()) return search_flat_cuda(lut, codes, k, metric);
  check_cpu(lut, op, "lut");
  FC_CHECK(lut.dim() == 3 && lut.scalar_type() == at::kFloat, op, "lut must be float32 [nq, M, ksub]");
  FC_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.size(1) == lut.size(1), op,
           "codes must be uint8 [n, M] with lut's M");
  FC_CHECK(k >= 1, op, "k must be >= 1, got ", k);
  const int64_t nq = lut.size(0), M = lut.size(1), ksub = lut.size(2), n = codes.size(0);
  FC_CHECK(ksub <= 256, op, "ksub must be <= 256");
  ScanParams p;
  at::Tensor lc = lut.contiguous(), cc = codes.contiguous();
  // A code indexes its table row: one >= ksub would read past it (uint8 codes are always < 256).
  if (ksub < 256 && cc.numel() > 0)
    TORCH_CHECK_VALUE(cc.max().item<uint8_t>() < ksub, "fastcore_ai.ops.", op, ": codes must lie in [0, ksub) = [0, ",
                      ksub, ")");
  p.lut = lc.data_ptr<float>();
  p.codes = cc.data_ptr<uint8_t>();
  p.nq = nq;
  p.n = n;
  p.M = M;
  p.ksub = ksub;
  p.k = k;
  p.metric = metric_of(metric, op);
  at::Tensor dist = at::empty({nq, k}, lut.options());
  at::Tensor ids = at::empty({nq, k}, lut.options().dtype(at::kLong));
  if (nq == 0) return {dist, ids};
  const int64_t parts = scan_parts(nq, n, 8, 16384);
  if (parts == 1) {
    at::parallel_for(0, nq, 8, [&](int64_t b, int64_t e) {
      pq_scan_flat_cpu(p, b, e, 0, n, dist.data_ptr<float>(), ids.data_ptr<int64_t>(), k);
    });
    return {dist, ids};
  }
  at::Tensor part_dist = at::empty({nq, parts, k}, dist.options());
  at::Tensor part_ids = at::empty({nq, parts, k}, ids.options());
  const int64_t rows_per_part = (n + parts - 1) / parts;
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t part = b; part < e; ++part) {
      const int64_t r0 = std::min(n, part * rows_per_part), r1 = std::min(n, r0 + rows_per_part);
      pq_scan_flat_cpu(p, 0, nq, r0, r1, part_dist.data_ptr<float>() + part * k,
                       part_ids.data_ptr<int64_t>() + part * k, parts * k);
    }
  });
  at::parallel_for(0, nq, 16, [&](int64_t b, int64_t e) {
    pq_merge_topk_cpu(part_dist.data_ptr<float>(), part_ids.data_ptr<int64_t>(), parts, k, p.metric, b, e,
                      dist.data_ptr<float>(), ids.data_ptr<int64_t>());
  });
  return {dist, ids};
}

// IVF ADC top-k over probed lists. lut [nq, L, M, ksub] float32 (L = nprobe: per probe; L = 1: shared),
// codes [n, M] grouped by list, list_offsets [nlist + 1], probes [nq, nprobe] int64 (−1 = none),
// bias [nq, nprobe] float32 or empty, ids [n] int64; list_terms [nlist, M, ksub] float32 or None: the
// per-list tables of the L2 residual decomposition (then L must be 1; see ScanParams::list_terms).
std::vector<at::Tensor> search_ivf(const at::Tensor& lut, const at::Tensor& codes, const at::Tensor& list_offsets,
                                   const at::Tensor& probes, const std::optional<at::Tensor>& bias,
                                   const at::Tensor& ids, int64_t k, int64_t metric,
                                   const std::optional<at::Tensor>& list_terms) {
  const char* op = "ivfpq_search";
  FC_CHECK(lut.dim() == 4 && lut.scalar_type() == at::kFloat && lut.device().is_cpu(), op,
           "lut must be a CPU float32 [nq, L, M, ksub]");
  const int64_t nq = lut.size(0), L = lut.size(1), M = lut.size(2), ksub = lut.size(3);
  FC_CHECK(probes.dim() == 2 && probes.size(0) == nq && probes.scalar_type() == at::kLong, op,
           "probes must be int64 [nq, nprobe]");
  const int64_t nprobe = probes.size(1);
  FC_CHECK(L == 1 || L == nprobe, op, "lut must have L = 1 or nprobe tables per query");
  FC_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.size(1) == M, op,
           "codes must be uint8 [n, M]");
  const int64_t n = codes.size(0);
  FC_CHECK(list_offsets.dim() == 1 && list_offsets.size(0) >= 1 && list_offsets.scalar_type() == at::kLong, op,
           "list_offsets must be int64 [nlist + 1]");
  FC_CHECK(ids.dim() == 1 && ids.size(0) == n && ids.scalar_type() == at::kLong, op, "ids must be int64 [n]");
  FC_CHECK(k >= 1 && ksub <= 256, op, "k must be >= 1 and ksub <= 256");
  at::Tensor offsets = list_offsets.contiguous();
  const int64_t nlist = offsets.size(0) - 1;
  {
    const int64_t* o = offsets.data_ptr<int64_t>();
    bool ok = o[0] == 0 && o[nlist] == n;
    for (int64_t l = 0; l < nlist && ok; ++l) ok = o[l] <= o[l + 1];
    FC_CHECK(ok, op, "list_offsets must rise from 0 to n = ", n);
  }
  at::Tensor lc = lut.contiguous(), cc = codes.contiguous(), pc = probes.contiguous(), ic = ids.contiguous();
  if (ksub < 256 && cc.numel() > 0)
    TORCH_CHECK_VALUE(cc.max().item<uint8_t>() < ksub, "fastcore_ai.ops.", op, ": codes must lie in [0, ksub) = [0, ",
                      ksub, ")");
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    FC_CHECK(bias->dim() == 2 && bias->size(0) == nq && bias->size(1) == nprobe && bias->scalar_type() == at::kFloat,
             op, "bias must be float32 [nq, nprobe]");
    bc = bias->contiguous();
  }
  at::Tensor tc;
  if (list_terms.has_value() && list_terms->defined()) {
    FC_CHECK(L == 1 && list_terms->dim() == 3 && list_terms->size(0) == nlist && list_terms->size(1) == M &&
                 list_terms->size(2) == ksub && list_terms->scalar_type() == at::kFloat &&
                 list_terms->device().is_cpu(),
             op, "list_terms must be a CPU float32 [nlist, M, ksub] used with one table per query (L = 1)");
    tc = list_terms->contiguous();
  }
  ScanParams p;
  p.lut = lc.data_ptr<float>();
  p.list_terms = tc.defined() ? tc.data_ptr<float>() : nullptr;
  p.lut_per_probe = L == nprobe && nprobe > 1 ? 1 : (L == 1 ? 0 : 1);
  p.codes = cc.data_ptr<uint8_t>();
  p.nq = nq;
  p.n = n;
  p.M = M;
  p.ksub = ksub;
  p.k = k;
  p.metric = metric_of(metric, op);
  p.list_offsets = offsets.data_ptr<int64_t>();
  p.nlist = nlist;
  p.probes = pc.data_ptr<int64_t>();
  p.nprobe = nprobe;
  p.bias = bc.defined() ? bc.data_ptr<float>() : nullptr;
  p.ids = ic.data_ptr<int64_t>();
  at::Tensor dist = at::empty({nq, k}, lut.options());
  at::Tensor out_ids = at::empty({nq, k}, lut.options().dtype(at::kLong));
  p.out_dist = dist.data_ptr<float>();
  p.out_ids = out_ids.data_ptr<int64_t>();
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, nq, 1, [&](int64_t b, int64_t e) { bad += pq_scan_ivf_cpu(p, b, e); });
  TORCH_CHECK_VALUE(bad.load() == 0, "fastcore_ai.ops.", op, ": probes must lie in [-1, nlist) = [-1, ", nlist, ")");
  return {dist, out_ids};
}

// 4-bit fast-scan top-k: lut [nq, M, 16] float32 (the float tables), packed [nblocks, pairs, 32] uint8
// holding n vectors. Returns (dist [nq, k] float32 dequantized, ids [nq, k]).
std::vector<at::Tensor> search_pq4(const at::Tensor& lut, const at::Tensor& packed, int64_t n, int64_t k,
                                   int64_t metric) {
  const char* op = "pq4_search";
  check_cpu(lut, op, "lut");
  check_cpu(packed, op, "packed");
  FC_CHECK(lut.dim() == 3 && lut.scalar_type() == at::kFloat && lut.size(2) == 16, op,
           "lut must be float32 [nq, M, 16]");
  const int64_t nq = lut.size(0), M = lut.size(1), pairs = (M + 1) / 2;
  FC_CHECK(M >= 1 && M <= 256, op, "M must satisfy 1 <= M <= 256 (uint16 sums), got ", M);
  FC_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(1) == pairs && packed.size(2) == 32,
           op, "packed must be uint8 [nblocks, ceil(M/2), 32]");
  FC_CHECK(n >= 0 && (n + 31) / 32 == packed.size(0), op, "packed must hold ceil(n/32) blocks for n = ", n);
  FC_CHECK(k >= 1, op, "k must be >= 1");
  const Metric m = metric_of(metric, op);
  at::Tensor lc = lut.contiguous(), pc = packed.contiguous();
  at::Tensor qlut = at::empty({nq, pairs, 32}, packed.options());
  at::Tensor scale = at::empty({nq}, lut.options()), offset = at::empty({nq}, lut.options());
  at::Tensor dist = at::empty({nq, k}, lut.options());
  at::Tensor ids = at::empty({nq, k}, lut.options().dtype(at::kLong));
  if (nq == 0) return {dist, ids};
  auto quantize = [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q)
      pq4_quantize_lut(lc.data_ptr<float>() + q * M * 16, M, m, qlut.data_ptr<uint8_t>() + q * pairs * 32,
                       scale.data_ptr<float>() + q, offset.data_ptr<float>() + q);
  };
  FastScanParams p;
  p.packed = pc.data_ptr<uint8_t>();
  p.n = n;
  p.nblocks = pc.size(0);
  p.pairs = pairs;
  p.qlut = qlut.data_ptr<uint8_t>();
  p.scale = scale.data_ptr<float>();
  p.offset = offset.data_ptr<float>();
  p.nq = nq;
  p.k = k;
  p.metric = m;
  const int64_t parts = std::min<int64_t>(scan_parts(nq, n, 4, 32768), std::max<int64_t>(p.nblocks, 1));
  if (parts == 1) {
    at::parallel_for(0, nq, 4, [&](int64_t b, int64_t e) {  // one region: quantize own queries, then scan
      quantize(b, e);
      pq4_scan_cpu(p, b, e, 0, p.nblocks, dist.data_ptr<float>(), ids.data_ptr<int64_t>(), k);
    });
  } else {
    quantize(0, nq);  // few queries (parts > 1): cheap on the calling thread
    at::Tensor part_dist = at::empty({nq, parts, k}, dist.options());
    at::Tensor part_ids = at::empty({nq, parts, k}, ids.options());
    const int64_t blocks_per_part = (p.nblocks + parts - 1) / parts;
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
      for (int64_t part = b; part < e; ++part) {
        const int64_t b0 = std::min(p.nblocks, part * blocks_per_part), b1 = std::min(p.nblocks, b0 + blocks_per_part);
        pq4_scan_cpu(p, 0, nq, b0, b1, part_dist.data_ptr<float>() + part * k, part_ids.data_ptr<int64_t>() + part * k,
                     parts * k);
      }
    });
    at::parallel_for(0, nq, 16, [&](int64_t b, int64_t e) {
      // Raw quantized sums: merged in the l2 (ascending) order whatever the metric.
      pq_merge_topk_cpu(part_dist.data_ptr<float>(), part_ids.data_ptr<int64_t>(), parts, k, Metric::kL2, b, e,
                        dist.data_ptr<float>(), ids.data_ptr<int64_t>());
    });
  }
  // Dequantize: key = D / a + b (padding stays +inf); ip scores are −key.
  dist.div_(scale.unsqueeze(1)).add_(offset.unsqueeze(1));
  if (m == Metric::kIP) dist.neg_();
  return {dist, ids};
}

// IVF 4-bit fast-scan (non-residual): lut [nq, M, 16] float32; packed [total_blocks, pairs, 32] with the
// lists one after another, list l in blocks list_blocks[l] .. list_blocks[l + 1] holding list_sizes[l]
// vectors; row_ids [total_blocks·32]; probes [nq, nprobe]. Returns (dist [nq, k] dequantized, ids).
std::vector<at::Tensor> search_pq4_ivf(const at::Tensor& lut, const at::Tensor& packed, const at::Tensor& list_blocks,
                                       const at::Tensor& list_sizes, const at::Tensor& row_ids,
                                       const at::Tensor& probes, int64_t k, int64_t metric) {
  const char* op = "ivfpq_search";
  check_cpu(lut, op, "lut");
  check_cpu(packed, op, "packed");
  FC_CHECK(lut.dim() == 3 && lut.scalar_type() == at::kFloat && lut.size(2) == 16, op,
           "lut must be float32 [nq, M, 16]");
  const int64_t nq = lut.size(0), M = lut.size(1), pairs = (M + 1) / 2;
  FC_CHECK(M >= 1 && M <= 256, op, "M must satisfy 1 <= M <= 256, got ", M);
  FC_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(1) == pairs && packed.size(2) == 32,
           op, "packed must be uint8 [blocks, ceil(M/2), 32]");
  const int64_t total_blocks = packed.size(0);
  FC_CHECK(list_blocks.dim() == 1 && list_blocks.scalar_type() == at::kLong && list_blocks.size(0) >= 1, op,
           "list_blocks must be int64 [nlist + 1]");
  const int64_t nlist = list_blocks.size(0) - 1;
  FC_CHECK(list_sizes.dim() == 1 && list_sizes.size(0) == nlist && list_sizes.scalar_type() == at::kLong, op,
           "list_sizes must be int64 [nlist]");
  FC_CHECK(row_ids.dim() == 1 && row_ids.size(0) == total_blocks * 32 && row_ids.scalar_type() == at::kLong, op,
           "row_ids must be int64 [blocks·32]");
  FC_CHECK(probes.dim() == 2 && probes.size(0) == nq && probes.scalar_type() == at::kLong, op,
           "probes must be int64 [nq, nprobe]");
  FC_CHECK(k >= 1, op, "k must be >= 1");
  at::Tensor lb = list_blocks.contiguous(), ls = list_sizes.contiguous();
  {
    const int64_t* o = lb.data_ptr<int64_t>();
    const int64_t* sz = ls.data_ptr<int64_t>();
    bool ok = o[0] == 0 && o[nlist] == total_blocks;
    for (int64_t l = 0; l < nlist && ok; ++l) ok = o[l] <= o[l + 1] && sz[l] >= 0 && sz[l] <= (o[l + 1] - o[l]) * 32;
    FC_CHECK(ok, op, "list_blocks must rise from 0 to the number of blocks and hold each list's size");
  }
  const Metric m = metric_of(metric, op);
  at::Tensor lc = lut.contiguous(), pc = packed.contiguous(), rc = row_ids.contiguous(), prc = probes.contiguous();
  at::Tensor qlut = at::empty({nq, pairs, 32}, packed.options());
  at::Tensor scale = at::empty({nq}, lut.options()), offset = at::empty({nq}, lut.options());
  at::Tensor dist = at::empty({nq, k}, lut.options());
  at::Tensor ids = at::empty({nq, k}, lut.options().dtype(at::kLong));
  if (nq == 0) return {dist, ids};
  FastScanIvfParams p;
  p.base.packed = pc.data_ptr<uint8_t>();
  p.base.pairs = pairs;
  p.base.qlut = qlut.data_ptr<uint8_t>();
  p.base.nq = nq;
  p.base.k = k;
  p.base.metric = m;
  p.list_blocks = lb.data_ptr<int64_t>();
  p.list_sizes = ls.data_ptr<int64_t>();
  p.row_ids = rc.data_ptr<int64_t>();
  p.nlist = nlist;
  p.probes = prc.data_ptr<int64_t>();
  p.nprobe = probes.size(1);
  p.out_dist = dist.data_ptr<float>();
  p.out_ids = ids.data_ptr<int64_t>();
  std::atomic<int64_t> bad{0};
  // One parallel region per search: each thread quantizes the tables of its own queries, then scans.
  at::parallel_for(0, nq, 1, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q)
      pq4_quantize_lut(lc.data_ptr<float>() + q * M * 16, M, m, qlut.data_ptr<uint8_t>() + q * pairs * 32,
                       scale.data_ptr<float>() + q, offset.data_ptr<float>() + q);
    bad += pq4_scan_ivf_cpu(p, b, e);
  });
  TORCH_CHECK_VALUE(bad.load() == 0, "fastcore_ai.ops.", op, ": probes must lie in [-1, nlist) = [-1, ", nlist, ")");
  dist.div_(scale.unsqueeze(1)).add_(offset.unsqueeze(1));
  if (m == Metric::kIP) dist.neg_();
  return {dist, ids};
}

}  // namespace pq

void bind_pq(pybind11::module_& m) {
  m.def("pq_tables", &pq::tables, "PQ distance tables [n, M, ksub] and/or codes [n, M] (metric 0 l2, 1 ip)");
  m.def("pq_kmeans_assign", &pq::kmeans_assign,
        "nearest centroid (metric 0 l2, GEMM form) or largest inner product (metric 1): (assign [n] int64, "
        "min_dist [n]: l2 the squared distance, ip the inner product)");
  m.def("pq_top_columns", &pq::top_columns,
        "the count largest columns of each row of scores [n, L] float32, largest first, the lower column on ties "
        "(a NaN ranks last): [n, count] int64");
  m.def("pq_centroid_sums", &pq::centroid_sums,
        "k-means member sums of x [n, M*dsub] grouped by codes [n, M]: (sums [M, ksub, dsub] float64, counts "
        "[M, ksub] int64)");
  m.def("pq_centroid_update", &pq::centroid_update,
        "k-means update of x [n, M*dsub] grouped by codes [n, M] from old [M, ksub, dsub] float32: (new32, new64 "
        "[M, ksub, dsub]: member means, the old centroid for an empty cluster; counts [M, ksub] int64)");
  m.def("pq_search_flat", &pq::search_flat, "flat ADC top-k from tables: (dist [nq, k], ids [nq, k])");
  m.def("pq_search_ivf", &pq::search_ivf,
        "IVF ADC top-k over probed lists (list_terms: per-list tables of the L2 residual decomposition or None): "
        "(dist [nq, k], ids [nq, k])");
  m.def("pq4_search", &pq::search_pq4, "4-bit fast-scan top-k: (dist [nq, k], ids [nq, k])");
  m.def("pq4_search_ivf", &pq::search_pq4_ivf, "IVF 4-bit fast-scan top-k (non-residual): (dist [nq, k], ids)");
}
}  // namespace fastcore
