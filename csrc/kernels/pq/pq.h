// Product quantization kernels (torch-free): distance tables / encoding, k-means assignment, the
// 8-bit ADC scan with top-k, and the 4-bit fast-scan.
//
// Notation: M sub-spaces of dsub dims, ksub centroids each; codebooks C [M, ksub, dsub] are passed
// transposed, CT [M, dsub, ksub], so the inner loops run over ksub contiguous floats (vectorisable).
//   l2 table:  T[m, j] = Σ_t (x[m·dsub + t] − CT[m, t, j])²        (exact differences, not the GEMM form)
//   ip table:  T[m, j] = Σ_t  x[m·dsub + t] · CT[m, t, j]
//   encode:    code[m] = argmin_j T_l2[m, j]                          (lower j on ties)
//   ADC:       dist(q, i) = bias + Σ_{m = 0..M−1} lut[q, m, code[i, m]]   (summed in m order)
// Top-k: the k best (key, id) pairs under the total order  key ascending, then id ascending, where
// key = dist for l2 and −dist for ip (exact negation), so the result set is unique and does not
// depend on how the codes are split between threads. Missing results: id −1, key +inf.
#pragma once

#include <cstdint>
#include <limits>

#include "fastcore/common.h"

namespace fastcore {
namespace pq {

enum class Metric : int32_t { kL2 = 0, kIP = 1 };

// ---- distance tables and encoding ----------------------------------------------------------------
template <typename T>
struct TableParams {
  const T* x = nullptr;  // [n, M·dsub] rows, row stride x_stride (elements), unit column stride
  int64_t x_stride = 0;
  const T* codebooks_t = nullptr;  // [M, dsub, ksub] contiguous
  int64_t n = 0, M = 0, dsub = 0, ksub = 0;
  Metric metric = Metric::kL2;
  T* lut = nullptr;          // [n, M, ksub] (tables), or nullptr
  uint8_t* codes = nullptr;  // [n, M] (encode), or nullptr
};

// Rows [begin, end): tables into p.lut, and/or argmin codes into p.codes (l2 only).
void pq_tables_cpu(const TableParams<float>& p, int64_t begin, int64_t end);
void pq_tables_cpu(const TableParams<double>& p, int64_t begin, int64_t end);

// float32 encode in the GEMM form: code[i, m] = argmin_j (‖c_mj‖² − 2⟨x_im, c_mj⟩) (‖x_im‖² is the same
// for every j, so it is left out; lower j on ties), p.codes only. c_norms [M, ksub] = ‖c_mj‖². Per
// sub-space the ksub dot products are one row of the GEMM x_m·C_mᵀ, accumulated in SIMD registers
// (AVX-512: ksub/16 registers, one FMA per dimension each) and reduced by a SIMD argmin, so the
// [n, ksub] product never goes to memory. Rows [begin, end). p.codebooks_t holds −2·Cᵀ [M, dsub, ksub]
// (not Cᵀ): x·(−2c) is bit-for-bit (−2x)·c, and the x values are then broadcast straight from memory.
void pq_encode_cpu(const TableParams<float>& p, const float* c_norms, int64_t begin, int64_t end);

// ---- k-means assignment from a GEMM ----------------------------------------------------------------
// l2: dist(i, j) = ‖x_i‖² − 2 G[i, j] + ‖c_j‖² with G = x·cᵀ computed by a GEMM; assign[i] = argmin_j
// (lower j on ties), min_dist[i] = max(0, that minimum). ip: assign[i] = argmax_j G[i, j] (lower j on
// ties), min_dist[i] = that maximum. The key minimised is ‖c_j‖² − 2 G[i, j] (l2; one rounding, as
// 2G is exact) or −G[i, j] (ip; exact), scanned 16 columns at a time with a per-lane running minimum
// (AVX-512) and reduced to the lowest j holding the minimum, which is the scalar loop's answer.
struct AssignParams {
  const float* gram = nullptr;     // [n, k] contiguous (rows begin..end of the current chunk)
  const float* x_norms = nullptr;  // [n] (l2 with min_dist only)
  const float* c_norms = nullptr;  // [k] (l2 only)
  int64_t n = 0, k = 0;
  Metric metric = Metric::kL2;
  int64_t* assign = nullptr;  // [n]
  float* min_dist = nullptr;  // [n] or nullptr
};
void pq_assign_cpu(const AssignParams& p, int64_t begin, int64_t end);

// ---- fused k-means / IVF assignment (AVX-512) -------------------------------------------------------
// The same assignment as pq_assign_cpu without a GEMM library or a product in memory: tiles of 12 rows
// × 32 centroids accumulate the dot products over t = 0..d−1 in 24 registers (one FMA chain per pair,
// in t order), then the keys ‖c‖² − 2g (l2) / −g (ip) update a per-row, per-lane running minimum
// (lane l: columns ≡ l mod 16, increasing j, strict <), reduced at the end to the lowest column
// holding the minimum. Centroids come packed: panels of 32, c_packed[p, t, 0..31] = c[32p + lane, t],
// zero past k; base[j] = ‖c_j‖² (l2) / 0 (ip) for j < k and +inf for the padding, so padding never
// wins. min_dist as pq_assign_cpu (‖x‖² summed here for l2). Rows [begin, end). Returns false (and
// does nothing) when this CPU or build has no AVX-512 (or a lower kernel is forced): the caller then
// takes the GEMM + pq_assign_cpu path.
struct FusedAssignParams {
  const float* x = nullptr;  // [n, d], row stride x_stride, unit column stride
  int64_t x_stride = 0;
  const float* c_packed = nullptr;  // [ceil(k/32), d, 32]
  const float* base = nullptr;      // [ceil(k/32)·32]
  int64_t n = 0, d = 0, k = 0;
  Metric metric = Metric::kL2;
  int64_t* assign = nullptr;  // [n]
  float* min_dist = nullptr;  // [n] or nullptr
};
bool pq_assign_fused_available();
void pq_assign_fused_cpu(const FusedAssignParams& p, int64_t begin, int64_t end);

// ---- top columns per row (IVF probe lists) ---------------------------------------------------------
// out[i, 0..count−1] = the count columns of scores[i, 0..L−1] with the largest values, largest first,
// the lower column first among equal values; a NaN ranks below every number. 1 <= count <= L. The
// IVF search's probe lists from the coarse scores, in place of torch.topk (a fraction of its cost per row,
// docs/pq.md): after the first count columns, 16 columns per compare against the current last value.
// Rows [begin, end).
struct TopColumnsParams {
  const float* scores = nullptr;  // [n, L], row stride ld
  int64_t ld = 0, L = 0, count = 1;
  int64_t* out = nullptr;  // [n, count]
};
void pq_top_columns_cpu(const TopColumnsParams& p, int64_t begin, int64_t end);

// ---- k-means centroid sums ---------------------------------------------------------------------------
// sums[m, j, t] = Σ_{i : code[i, m] = j} x[i, m·dsub + t] in float64, added in row order (the same
// sequence of additions as torch's index_add_ over the rows, so the same bits), counts[m, j] = |{i :
// code[i, m] = j}|. k-means update of all M sub-spaces (M = 1, dsub = d: a plain k-means) in one pass
// over x. codes [n, M] uint8 (codes8) or int64 (codes64), values < ksub. Columns [col_begin, col_end)
// of x (threads split the columns: no two touch the same sum); counts (when p.counts is set) are
// written by the thread holding column m·dsub. sums and counts must be zeroed by the caller.
struct CentroidSumParams {
  const float* x = nullptr;  // [n, M·dsub], row stride x_stride, unit column stride
  int64_t x_stride = 0;
  const uint8_t* codes8 = nullptr;   // [n, M] contiguous, or nullptr
  const int64_t* codes64 = nullptr;  // [n, M] contiguous, or nullptr
  int64_t n = 0, M = 0, dsub = 0, ksub = 0;
  double* sums = nullptr;     // [M, ksub, dsub]
  int64_t* counts = nullptr;  // [M, ksub], or nullptr
};
void pq_centroid_sums_cpu(const CentroidSumParams& p, int64_t col_begin, int64_t col_end);
// counts[m, j] = |{i : code[i, m] = j}| into p.counts (zeroed by the caller), one serial pass over the codes.
void pq_code_counts_cpu(const CentroidSumParams& p);

// The k-means update from the sums: new64[m, j, t] = sums[m, j, t] / counts[m, j] when counts[m, j] > 0,
// else old[m, j, t] (float64: the reference kmeans_update's member mean, the old centroid kept for an
// empty cluster, same bits), new32 = float(new64). Columns [col_begin, col_end) of the M·dsub.
struct CentroidMeanParams {
  const double* sums = nullptr;     // [M, ksub, dsub]
  const int64_t* counts = nullptr;  // [M, ksub]
  const float* old = nullptr;       // [M, ksub, dsub]
  double* new64 = nullptr;          // [M, ksub, dsub]
  float* new32 = nullptr;           // [M, ksub, dsub]
  int64_t M = 0, dsub = 0, ksub = 0;
};
void pq_centroid_means_cpu(const CentroidMeanParams& p, int64_t col_begin, int64_t col_end);

// ---- 8-bit (any ksub ≤ 256) ADC scan with top-k -----------------------------------------------------
struct ScanParams {
  const float* lut = nullptr;      // [nq, L, M, ksub]; L = 1 (flat / shared) or nprobe (per-probe tables)
  int64_t lut_per_probe = 0;       // 1: one table per (query, probe); 0: one per query
  const uint8_t* codes = nullptr;  // [n, M] contiguous
  int64_t nq = 0, n = 0, M = 0, ksub = 256, k = 1;
  Metric metric = Metric::kL2;
  // IVF: codes grouped by list; list l holds rows list_offsets[l] .. list_offsets[l + 1]. Query q scans
  // the lists probes[q, 0..nprobe−1] (−1 = skip) with the constant bias[q, j] added. nullptr: flat scan.
  const int64_t* list_offsets = nullptr;  // [nlist + 1]
  int64_t nlist = 0;
  const int64_t* probes = nullptr;  // [nq, nprobe]
  int64_t nprobe = 0;
  const float* bias = nullptr;  // [nq, nprobe] or nullptr (0)
  // L2 residual decomposition (FAISS's precomputed table): with list_terms, the table of (q, list l)
  // is lut[q] + list_terms[l] entry by entry (lut = −2⟨q_m, y_mj⟩, list_terms = ‖y_mj‖² + 2⟨c_l,m, y_mj⟩,
  // bias = ‖q − c_l‖²), so no table per (query, probe) is built. Needs lut_per_probe = 0.
  const float* list_terms = nullptr;  // [nlist, M, ksub] or nullptr
  const int64_t* ids = nullptr;       // [n] row -> id, or nullptr (id = row)
  float* out_dist = nullptr;          // [nq, k]
  int64_t* out_ids = nullptr;         // [nq, k]
};

// Flat scan of code rows [row_begin, row_end) for queries [q_begin, q_end), several queries per block
// of codes (each code byte is loaded once per block for all of them); writes the sorted top-k of that
// range to out_dist/out_ids + (q · k) with leading dimension `ld` (= k·parts when partial results of
// several ranges are stacked; see merge). Distances in the user's sign (ip: larger is better).
void pq_scan_flat_cpu(const ScanParams& p, int64_t q_begin, int64_t q_end, int64_t row_begin, int64_t row_end,
                      float* out_dist, int64_t* out_ids, int64_t ld);
// IVF scan of queries [q_begin, q_end) over their probed lists into p.out_dist / p.out_ids:
// dist = bias + Σ_m table[m, code_m] (sum in m order from 0). With AVX-512 and one table per query,
// the probes are inverted and each list is read once per 16 of the queries that probe it.
// Returns the number of probes outside [−1, nlist) (skipped; the caller raises).
int64_t pq_scan_ivf_cpu(const ScanParams& p, int64_t q_begin, int64_t q_end);
// Merge `parts` sorted top-k lists per query (stacked [nq, parts, k]) into the final [nq, k].
void pq_merge_topk_cpu(const float* part_dist, const int64_t* part_ids, int64_t parts, int64_t k, Metric metric,
                       int64_t q_begin, int64_t q_end, float* out_dist, int64_t* out_ids);

// ---- 4-bit fast-scan ----------------------------------------------------------------------------
// Layout (see fastcore_ai.reference.pq.pq4_pack): blocks of 32 vectors, sub-quantizers in pairs;
// block b, pair p = 32 bytes: byte 16h + t = code[32b + t, 2p + h] | code[32b + t + 16, 2p + h] << 4.
// Quantized tables per query: qlut [pairs, 32] uint8 with byte 16h + c = round(a·(key_lut[2p + h, c] −
// min_{2p+h})) where key_lut = lut (l2) or −lut (ip), a = 255 / max_m span_m; the pad sub-quantizer
// of an odd M has an all-zero table. Quantized distance D(i) = Σ_m qlut[m, code] (exact uint16, M ≤
// 256), and key ≈ D / a + Σ_m min_m.
struct FastScanParams {
  const uint8_t* packed = nullptr;  // [nblocks, pairs, 32]
  int64_t n = 0, nblocks = 0, pairs = 0;
  const uint8_t* qlut = nullptr;  // [nq, pairs, 32]
  const float* scale = nullptr;   // [nq]: a
  const float* offset = nullptr;  // [nq]: Σ_m min_m (in key sign)
  int64_t nq = 0, k = 1;
  Metric metric = Metric::kL2;
};

// Quantize the float tables lut [M, 16] of one query into qlut [pairs, 32]; returns (a, b) by pointer.
void pq4_quantize_lut(const float* lut, int64_t M, Metric metric, uint8_t* qlut, float* scale, float* offset);
// Scan blocks [block_begin, block_end) for queries [q_begin, q_end), 4 queries per pass over a block
// (AVX-512BW: their sums stay in registers and are compared with the top-k collectors' limits there); sorted top-k
// (by quantized distance, then id) into out + q·ld. out_dist holds the exact quantized sums D (integers as float,
// +inf for padding), so partial results merge exactly; the caller dequantizes (D / a + b, ip: negated).
void pq4_scan_cpu(const FastScanParams& p, int64_t q_begin, int64_t q_end, int64_t block_begin, int64_t block_end,
                  float* out_dist, int64_t* out_ids, int64_t ld);
// IVF fast-scan (non-residual tables, one per query): lists are packed one after another, each padded
// to whole blocks; list l holds list_sizes[l] vectors in blocks list_blocks[l] .. list_blocks[l + 1],
// row r of the packed layout has id row_ids[r] (−1 for padding). Query q scans its probed lists
// probes[q, 0..nprobe−1] (−1 = skip); the probes are inverted so the queries sharing a list are
// scanned together (best list of every query first). out_dist holds raw quantized sums as in pq4_scan_cpu.
// Returns the number of probes outside [−1, nlist).
struct FastScanIvfParams {
  FastScanParams base;                   // packed, pairs, qlut, nq, k, metric (n, nblocks unused)
  const int64_t* list_blocks = nullptr;  // [nlist + 1]
  const int64_t* list_sizes = nullptr;   // [nlist]
  const int64_t* row_ids = nullptr;      // [total_blocks · 32]
  int64_t nlist = 0;
  const int64_t* probes = nullptr;  // [nq, nprobe]
  int64_t nprobe = 0;
  float* out_dist = nullptr;   // [nq, k]
  int64_t* out_ids = nullptr;  // [nq, k]
};
int64_t pq4_scan_ivf_cpu(const FastScanIvfParams& p, int64_t q_begin, int64_t q_end);
// Which SIMD family the CPU kernels use, active_cpu_isa() of fastcore/cpu_isa.h: "avx512bw" (AVX-512
// fast-scan, encode and 8-bit scans), "avx2" (AVX2 fast-scan, portable loops elsewhere) or "portable".
// set_cpu_isa_cap lowers it (for every family, not only pq).
const char* pq4_kernel_name();
// The quantized distances of all 32 vectors of one block for one query (used by the native tests to
// compare the SIMD and portable kernels): out[32].
void pq4_block_distances(const uint8_t* block, const uint8_t* qlut, int64_t pairs, uint16_t* out);

// ---- CUDA (pq.cu); entry points return a cudaError_t as int (0 = success) --------------------------
// Tables: p.x, p.codebooks_t, p.lut on the device (float32; p.codes unused).
int pq_lut_cuda(const TableParams<float>& p, void* stream);

// Flat ADC scan with a block-wide top-k per chunk of rows: partial[q, c, 0..k) = the k smallest
// packed keys (ordered key bits << 32 | row) of rows [c·chunk, (c+1)·chunk), ascending; padding
// entries are ~0. chunk: a power of two ≥ k, ≤ 8192. n < 2^32.
struct AdcCudaParams {
  const float* lut = nullptr;      // [nq, M, ksub]
  const uint8_t* codes = nullptr;  // [n, M]
  int64_t nq = 0, n = 0, M = 0, ksub = 256, k = 1;
  int64_t chunk = 1024, nchunks = 0;
  Metric metric = Metric::kL2;
  unsigned long long* partial = nullptr;  // [nq, nchunks, k]
};
int64_t adc_cuda_smem_bytes(const AdcCudaParams& p);
int adc_topk_cuda(const AdcCudaParams& p, void* stream);

}  // namespace pq
}  // namespace fastcore
