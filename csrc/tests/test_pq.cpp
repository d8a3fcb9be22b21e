// The pq CPU kernels against naive double-precision code written here from the math in pq.h: tables
// and encode, the k-means assignment and member sums, the 8-bit flat and IVF scans with their top-k (ties by lower id, padding, split into row
// parts + merge), and the 4-bit fast-scan block sums of every kernel this CPU has (portable, AVX2,
// AVX-512BW) against each other and against the table sums; the ISA levels of fastcore/cpu_isa.h (cap,
// environment parsing).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "fastcore/cpu_isa.h"
#include "pq/pq.h"

using namespace fastcore;
using namespace fastcore::pq;

namespace {

std::vector<float> randn(int64_t count, std::mt19937& gen) {
  std::normal_distribution<float> dist;
  std::vector<float> v(count);
  for (auto& x : v) x = dist(gen);
  return v;
}

void check_tables(int64_t n, int64_t M, int64_t dsub, int64_t ksub, std::mt19937& gen) {
  auto x = randn(n * M * dsub, gen), cb = randn(M * ksub * dsub, gen);
  std::vector<float> ct(M * dsub * ksub);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < ksub; ++j)
      for (int64_t t = 0; t < dsub; ++t) ct[(m * dsub + t) * ksub + j] = cb[(m * ksub + j) * dsub + t];
  for (int metric = 0; metric < 2; ++metric) {
    std::vector<float> lut(n * M * ksub);
    std::vector<uint8_t> codes(n * M);
    TableParams<float> p;
    p.x = x.data();
    p.x_stride = M * dsub;
    p.codebooks_t = ct.data();
    p.n = n;
    p.M = M;
    p.dsub = dsub;
    p.ksub = ksub;
    p.metric = metric ? Metric::kIP : Metric::kL2;
    p.lut = lut.data();
    p.codes = metric ? nullptr : codes.data();
    pq_tables_cpu(p, 0, n);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t m = 0; m < M; ++m) {
        int64_t best = 0;
        double best_d = 1e300;
        for (int64_t j = 0; j < ksub; ++j) {
          double s = 0;
          for (int64_t t = 0; t < dsub; ++t) {
            const double a = x[i * M * dsub + m * dsub + t], b = cb[(m * ksub + j) * dsub + t];
            s += metric ? a * b : (a - b) * (a - b);
          }
          const double got = lut[(i * M + m) * ksub + j];
          FC_EXPECT(std::fabs(got - s) <= 1e-4 * (1 + std::fabs(s)), "table (%ld, %ld, %ld): %g vs %g", (long)i,
                    (long)m, (long)j, got, s);
          if (s < best_d) best_d = s, best = j;
        }
        if (!metric) {
          // The float and double argmins may differ only on a near tie.
          const int64_t c = codes[i * M + m];
          const double dc = lut[(i * M + m) * ksub + c], db = lut[(i * M + m) * ksub + best];
          FC_EXPECT(c == best || std::fabs(dc - db) <= 1e-5 * (1 + std::fabs(db)), "code (%ld, %ld)", (long)i, (long)m);
        }
      }
  }
}

// pq_encode_cpu (GEMM form, SIMD argmin for ksub 16 / 256, portable otherwise) against the double
// argmin of the exact distances: equal except on a near tie.
void check_encode(int64_t n, int64_t M, int64_t dsub, int64_t ksub, std::mt19937& gen) {
  auto x = randn(n * M * dsub, gen), cb = randn(M * ksub * dsub, gen);
  std::vector<float> ct(M * dsub * ksub), norms(M * ksub, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < ksub; ++j)
      for (int64_t t = 0; t < dsub; ++t) {
        const float c = cb[(m * ksub + j) * dsub + t];
        ct[(m * dsub + t) * ksub + j] = -2.0f * c;  // pq_encode_cpu takes −2·Cᵀ
        norms[m * ksub + j] += c * c;
      }
  std::vector<uint8_t> codes(n * M, 255);
  TableParams<float> p;
  p.x = x.data();
  p.x_stride = M * dsub;
  p.codebooks_t = ct.data();
  p.n = n;
  p.M = M;
  p.dsub = dsub;
  p.ksub = ksub;
  p.codes = codes.data();
  pq_encode_cpu(p, norms.data(), 0, n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t m = 0; m < M; ++m) {
      std::vector<double> dist(ksub);
      int64_t best = 0;
      for (int64_t j = 0; j < ksub; ++j) {
        double s = 0;
        for (int64_t t = 0; t < dsub; ++t) {
          const double a = x[i * M * dsub + m * dsub + t], b = cb[(m * ksub + j) * dsub + t];
          s += (a - b) * (a - b);
        }
        dist[j] = s;
        if (s < dist[best]) best = j;
      }
      const int64_t c = codes[i * M + m];
      FC_EXPECT(c < ksub && (c == best || std::fabs(dist[c] - dist[best]) <= 1e-5 * (1 + dist[best])),
                "encode ksub=%ld (%ld, %ld): code %ld vs %ld", (long)ksub, (long)i, (long)m, (long)c, (long)best);
    }
}

// Naive top-k with the (key, id) order; key = dist or −dist.
void naive_topk(const std::vector<double>& dist, bool ip, int64_t k, std::vector<double>& out_d,
                std::vector<int64_t>& out_i) {
  std::vector<std::pair<double, int64_t>> items;
  for (size_t i = 0; i < dist.size(); ++i) items.push_back({ip ? -dist[i] : dist[i], (int64_t)i});
  std::sort(items.begin(), items.end());
  out_d.assign(k, ip ? -INFINITY : INFINITY);
  out_i.assign(k, -1);
  for (int64_t i = 0; i < k && i < (int64_t)items.size(); ++i) {
    out_d[i] = ip ? -items[i].first : items[i].first;
    out_i[i] = items[i].second;
  }
}

void check_scan(int64_t nq, int64_t n, int64_t M, int64_t ksub, int64_t k, bool ip, std::mt19937& gen) {
  // Tables of small integers: exact float sums, many ties (checks the lower-id rule).
  std::uniform_int_distribution<int> small(0, 3), code(0, (int)ksub - 1);
  std::vector<float> lut(nq * M * ksub);
  for (auto& v : lut) v = (float)small(gen);
  std::vector<uint8_t> codes(n * M);
  for (auto& c : codes) c = (uint8_t)code(gen);
  ScanParams p;
  p.lut = lut.data();
  p.codes = codes.data();
  p.nq = nq;
  p.n = n;
  p.M = M;
  p.ksub = ksub;
  p.k = k;
  p.metric = ip ? Metric::kIP : Metric::kL2;
  std::vector<float> d(nq * k), part_d(nq * 3 * k), merged_d(nq * k);
  std::vector<int64_t> ids(nq * k), part_i(nq * 3 * k), merged_i(nq * k);
  pq_scan_flat_cpu(p, 0, nq, 0, n, d.data(), ids.data(), k);
  // The same in three row parts, merged.
  const int64_t per = (n + 2) / 3;
  for (int64_t part = 0; part < 3; ++part) {
    const int64_t r0 = std::min(n, part * per), r1 = std::min(n, r0 + per);
    pq_scan_flat_cpu(p, 0, nq, r0, r1, part_d.data() + part * k, part_i.data() + part * k, 3 * k);
  }
  pq_merge_topk_cpu(part_d.data(), part_i.data(), 3, k, p.metric, 0, nq, merged_d.data(), merged_i.data());
  // IVF: every row in one of 3 lists, all probed (plus a skipped −1 probe), bias 0.
  std::vector<int64_t> offsets = {0, n / 3, n / 2, n}, probes(nq * 4), ivf_ids(n);
  for (int64_t q = 0; q < nq; ++q)
    probes[q * 4] = 2, probes[q * 4 + 1] = -1, probes[q * 4 + 2] = 0, probes[q * 4 + 3] = 1;
  for (int64_t i = 0; i < n; ++i) ivf_ids[i] = i;
  std::vector<float> ivf_d(nq * k);
  std::vector<int64_t> ivf_i(nq * k);
  ScanParams v = p;
  v.list_offsets = offsets.data();
  v.nlist = 3;
  v.probes = probes.data();
  v.nprobe = 4;
  v.ids = ivf_ids.data();
  v.out_dist = ivf_d.data();
  v.out_ids = ivf_i.data();
  FC_EXPECT(pq_scan_ivf_cpu(v, 0, nq) == 0, "ivf bad probes");
  // The same with per-list tables added (the L2 residual decomposition) and a per-probe bias.
  std::vector<float> terms(3 * M * ksub), bias(nq * 4);
  for (auto& t : terms) t = (float)small(gen);
  for (auto& b : bias) b = (float)small(gen);
  std::vector<float> term_d(nq * k);
  std::vector<int64_t> term_i(nq * k);
  ScanParams w = v;
  w.list_terms = terms.data();
  w.bias = bias.data();
  w.out_dist = term_d.data();
  w.out_ids = term_i.data();
  FC_EXPECT(pq_scan_ivf_cpu(w, 0, nq) == 0, "ivf (terms) bad probes");
  for (int64_t q = 0; q < nq; ++q) {
    std::vector<double> dist(n);
    for (int64_t i = 0; i < n; ++i) {
      double s = 0;
      for (int64_t m = 0; m < M; ++m) s += lut[(q * M + m) * ksub + codes[i * M + m]];
      dist[i] = s;
    }
    std::vector<double> ed;
    std::vector<int64_t> ei;
    // With list tables and bias (probe slots 0, 2, 3 hold lists 2, 0, 1).
    std::vector<double> term_dist(n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t list = i < offsets[1] ? 0 : i < offsets[2] ? 1 : 2;
      const int64_t slot = list == 2 ? 0 : list + 2;
      double s = bias[q * 4 + slot];
      for (int64_t m = 0; m < M; ++m) s += terms[(list * M + m) * ksub + codes[i * M + m]];
      term_dist[i] = dist[i] + s;
    }
    naive_topk(term_dist, ip, k, ed, ei);
    for (int64_t j = 0; j < k; ++j)
      FC_EXPECT(term_i[q * k + j] == ei[j] && term_d[q * k + j] == ed[j], "ivf terms q=%ld j=%ld: %ld/%g vs %ld/%g",
                (long)q, (long)j, (long)term_i[q * k + j], term_d[q * k + j], (long)ei[j], ed[j]);
    naive_topk(dist, ip, k, ed, ei);
    for (int64_t j = 0; j < k; ++j) {
      FC_EXPECT(ids[q * k + j] == ei[j] && d[q * k + j] == ed[j], "flat q=%ld j=%ld: %ld/%g vs %ld/%g", (long)q,
                (long)j, (long)ids[q * k + j], d[q * k + j], (long)ei[j], ed[j]);
      FC_EXPECT(merged_i[q * k + j] == ei[j] && merged_d[q * k + j] == ed[j], "merged q=%ld j=%ld", (long)q, (long)j);
      FC_EXPECT(ivf_i[q * k + j] == ei[j] && ivf_d[q * k + j] == ed[j], "ivf q=%ld j=%ld", (long)q, (long)j);
    }
  }
}

void check_fastscan(int64_t M, std::mt19937& gen) {
  const int64_t pairs = (M + 1) / 2;
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<uint8_t> block(pairs * 32), qlut(pairs * 32);
  for (auto& b : block) b = (uint8_t)byte(gen);
  for (auto& b : qlut) b = (uint8_t)byte(gen);
  // Expected sums from the layout definition.
  uint32_t expected[32] = {0};
  for (int64_t p = 0; p < pairs; ++p)
    for (int h = 0; h < 2; ++h)
      for (int t = 0; t < 16; ++t) {
        const uint8_t c = block[p * 32 + h * 16 + t];
        expected[t] += qlut[p * 32 + h * 16 + (c & 15)];
        expected[t + 16] += qlut[p * 32 + h * 16 + (c >> 4)];
      }
  for (int kernel = 1; kernel <= 3; ++kernel) {
    set_cpu_isa_cap(kernel);
    uint16_t out[32];
    pq4_block_distances(block.data(), qlut.data(), pairs, out);
    for (int v = 0; v < 32; ++v)
      FC_EXPECT(out[v] == expected[v], "fast-scan kernel %s M=%ld vector %d: %u vs %u", pq4_kernel_name(), (long)M, v,
                out[v], expected[v]);
  }
  set_cpu_isa_cap(0);
}

// pq_assign_cpu on an exact [n, k] product (the GEMM is the caller's): against the double argmin
// (l2) / argmax (ip), lower j on ties (duplicated columns), k not a multiple of 16 (masked tail).
void check_assign(int64_t n, int64_t k, bool ip, std::mt19937& gen) {
  auto g = randn(n * k, gen), cn = randn(k, gen), xn = randn(n, gen);
  for (auto& v : cn) v = std::fabs(v);
  for (auto& v : xn) v = std::fabs(v) + 10.0f;
  for (int64_t i = 0; i < n; i += 3)  // exact ties: column k − 1 repeats column k / 2
    if (k > 2) g[i * k + k - 1] = g[i * k + k / 2];
  if (k > 2) cn[k - 1] = cn[k / 2];
  std::vector<int64_t> assign(n, -1);
  std::vector<float> min_dist(n);
  AssignParams p;
  p.gram = g.data();
  p.x_norms = ip ? nullptr : xn.data();
  p.c_norms = ip ? nullptr : cn.data();
  p.n = n;
  p.k = k;
  p.metric = ip ? Metric::kIP : Metric::kL2;
  p.assign = assign.data();
  p.min_dist = min_dist.data();
  pq_assign_cpu(p, 0, n);
  for (int64_t i = 0; i < n; ++i) {
    int64_t best = 0;
    float best_key = 0;
    for (int64_t j = 0; j < k; ++j) {
      const float key = ip ? -g[i * k + j] : cn[j] - 2.0f * g[i * k + j];
      if (j == 0 || key < best_key) best_key = key, best = j;
    }
    FC_EXPECT(assign[i] == best, "assign k=%ld ip=%d row %ld: %ld vs %ld", (long)k, int(ip), (long)i, (long)assign[i],
              (long)best);
    const float want = ip ? -best_key : std::max(0.0f, xn[i] + best_key);
    FC_EXPECT(min_dist[i] == want, "assign min_dist k=%ld row %ld", (long)k, (long)i);
  }
}

// pq_assign_fused_cpu (AVX-512 tiles of 12 rows × 32 centroids) against the double argmin / argmax of
// the exact products: equal except on a near tie; exact ties (a duplicated centroid) go to the lower
// index; n not a multiple of the 12-row tile or the 48-row panel group, k not a multiple of 32.
void check_assign_fused(int64_t n, int64_t d, int64_t k, bool ip, std::mt19937& gen) {
  if (!pq_assign_fused_available()) return;
  const int64_t stride = d + 1, panels = (k + 31) / 32;
  auto x = randn(n * stride, gen), c = randn(k * d, gen);
  if (k > 3)
    for (int64_t t = 0; t < d; ++t) c[(k - 1) * d + t] = c[2 * d + t];  // centroid k − 1 repeats centroid 2
  if (k > 3)
    for (int64_t t = 0; t < d; ++t) x[t] = c[2 * d + t];  // row 0 sits on it
  std::vector<float> packed(panels * d * 32, 0.0f), base(panels * 32, std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < k; ++j) {
    float norm = 0.0f;
    for (int64_t t = 0; t < d; ++t) {
      packed[((j / 32) * d + t) * 32 + j % 32] = c[j * d + t];
      norm += c[j * d + t] * c[j * d + t];
    }
    base[j] = ip ? 0.0f : norm;
  }
  std::vector<int64_t> assign(n, -1);
  std::vector<float> min_dist(n);
  FusedAssignParams p;
  p.x = x.data();
  p.x_stride = stride;
  p.c_packed = packed.data();
  p.base = base.data();
  p.n = n;
  p.d = d;
  p.k = k;
  p.metric = ip ? Metric::kIP : Metric::kL2;
  p.assign = assign.data();
  p.min_dist = min_dist.data();
  pq_assign_fused_cpu(p, 0, 7);  // uneven parts, as threads would take them
  pq_assign_fused_cpu(p, 7, n);
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> score(k);
    int64_t best = 0;
    for (int64_t j = 0; j < k; ++j) {
      double dot = 0, dist = 0;
      for (int64_t t = 0; t < d; ++t) {
        const double a = x[i * stride + t], b = c[j * d + t];
        dot += a * b;
        dist += (a - b) * (a - b);
      }
      score[j] = ip ? -dot : dist;
      if (score[j] < score[best]) best = j;
    }
    const int64_t got = assign[i];
    FC_EXPECT(got >= 0 && got < k &&
                  (got == best || std::fabs(score[got] - score[best]) <= 1e-4 * (1 + std::fabs(score[best]))),
              "fused assign n=%ld d=%ld k=%ld ip=%d row %ld: %ld vs %ld", (long)n, (long)d, (long)k, int(ip), (long)i,
              (long)got, (long)best);
    const double want = ip ? -score[got] : score[got];
    FC_EXPECT(std::fabs(min_dist[i] - want) <= 1e-3 * (1 + std::fabs(want)), "fused min_dist row %ld: %f vs %f",
              (long)i, double(min_dist[i]), want);
  }
  if (k > 3 && !ip) FC_EXPECT(assign[0] == 2, "fused assign: the tie went to %ld, not 2", (long)assign[0]);
}

// pq_centroid_sums_cpu against double sums per (m, code), with the columns split in uneven parts
// (as threads would) and both code types.
void check_centroid_sums(int64_t n, int64_t M, int64_t dsub, int64_t ksub, bool wide, std::mt19937& gen) {
  const int64_t d = M * dsub, stride = d + 3;
  auto x = randn(n * stride, gen);
  std::vector<uint8_t> c8(n * M);
  std::vector<int64_t> c64(n * M);
  std::uniform_int_distribution<int64_t> pick(0, ksub - 1);
  for (int64_t i = 0; i < n * M; ++i) c64[i] = c8[i] = static_cast<uint8_t>(pick(gen));
  std::vector<double> sums(M * ksub * dsub, 0.0), want(M * ksub * dsub, 0.0);
  std::vector<int64_t> counts(M * ksub, 0), want_counts(M * ksub, 0);
  CentroidSumParams p;
  p.x = x.data();
  p.x_stride = stride;
  p.codes8 = wide ? nullptr : c8.data();
  p.codes64 = wide ? c64.data() : nullptr;
  p.n = n;
  p.M = M;
  p.dsub = dsub;
  p.ksub = ksub;
  p.sums = sums.data();
  p.counts = counts.data();
  for (int64_t c0 = 0; c0 < d; c0 += 5) pq_centroid_sums_cpu(p, c0, std::min(d, c0 + 5));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t m = 0; m < M; ++m) {
      const int64_t code = c64[i * M + m];
      ++want_counts[m * ksub + code];
      for (int64_t t = 0; t < dsub; ++t) want[(m * ksub + code) * dsub + t] += double(x[i * stride + m * dsub + t]);
    }
  for (int64_t e = 0; e < M * ksub * dsub; ++e)
    FC_EXPECT(sums[e] == want[e], "centroid sums M=%ld dsub=%ld entry %ld", (long)M, (long)dsub, (long)e);
  for (int64_t e = 0; e < M * ksub; ++e)
    FC_EXPECT(counts[e] == want_counts[e], "centroid counts M=%ld entry %ld", (long)M, (long)e);
  // The serial counts and the means (old centroid kept for an empty cluster), columns in uneven parts.
  std::vector<int64_t> counts2(M * ksub, 0);
  p.counts = counts2.data();
  pq_code_counts_cpu(p);
  FC_EXPECT(counts2 == want_counts, "code counts M=%ld", (long)M);
  auto old = randn(M * ksub * dsub, gen);
  std::vector<double> new64(M * ksub * dsub, -1.0);
  std::vector<float> new32(M * ksub * dsub, -1.0f);
  CentroidMeanParams q;
  q.sums = sums.data();
  q.counts = counts2.data();
  q.old = old.data();
  q.new64 = new64.data();
  q.new32 = new32.data();
  q.M = M;
  q.dsub = dsub;
  q.ksub = ksub;
  for (int64_t c0 = 0; c0 < d; c0 += 3) pq_centroid_means_cpu(q, c0, std::min(d, c0 + 3));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < ksub; ++j)
      for (int64_t t = 0; t < dsub; ++t) {
        const int64_t e = (m * ksub + j) * dsub + t, cnt = want_counts[m * ksub + j];
        const double v = cnt > 0 ? want[e] / double(cnt) : double(old[e]);
        FC_EXPECT(new64[e] == v && new32[e] == float(v), "centroid means M=%ld entry %ld", (long)M, (long)e);
      }
}

}  // namespace

// active_cpu_isa() = min(detected, caps); the cap only lowers, and lifting it restores the level; the
// environment parser (called directly: the process's own value was read at the first active_cpu_isa();
// the two unknown values print its warning).
void check_cpu_isa() {
  const CpuIsa detected = detected_cpu_isa();
  set_cpu_isa_cap(0);
  const CpuIsa uncapped = active_cpu_isa();
  FC_EXPECT(uncapped <= detected, "active %s above detected %s", cpu_isa_name(uncapped), cpu_isa_name(detected));
  for (int cap = 1; cap <= 4; ++cap) {
    set_cpu_isa_cap(cap);
    const CpuIsa expected = static_cast<int>(uncapped) < cap ? uncapped : static_cast<CpuIsa>(cap);
    FC_EXPECT(active_cpu_isa() == expected, "cap %d: %s, expected %s", cap, cpu_isa_name(active_cpu_isa()),
              cpu_isa_name(expected));
  }
  set_cpu_isa_cap(1);
  FC_EXPECT(std::strcmp(pq4_kernel_name(), "portable") == 0, "cap 1: pq4_kernel_name %s", pq4_kernel_name());
  set_cpu_isa_cap(0);
  FC_EXPECT(active_cpu_isa() == uncapped, "cap lifted: %s", cpu_isa_name(active_cpu_isa()));
  const char* names[] = {"FASTCORE_AI_CPU_ISA", "FASTCORE_AI_ATTENTION_CPU_GENERIC"};
  std::string saved[2];
  bool was_set[2];
  for (int v = 0; v < 2; ++v) {
    const char* value = std::getenv(names[v]);
    was_set[v] = value != nullptr;
    saved[v] = value ? value : "";
  }
  unsetenv(names[1]);
  const struct {
    const char* value;
    int cap;
  } cases[] = {{"portable", 1}, {"AVX2", 2}, {"avx512", 3}, {"auto", 0}, {"", 0}, {"avx512bw", 0}, {"sse", 0}};
  for (const auto& c : cases) {
    setenv(names[0], c.value, 1);
    FC_EXPECT(cpu_isa_detail::environment_cap() == c.cap, "FASTCORE_AI_CPU_ISA=%s: cap %d, expected %d", c.value,
              cpu_isa_detail::environment_cap(), c.cap);
  }
  setenv(names[0], "avx2", 1);
  setenv(names[1], "1", 1);  // the deprecated attention switch means portable
  FC_EXPECT(cpu_isa_detail::environment_cap() == 1, "FASTCORE_AI_ATTENTION_CPU_GENERIC=1: cap %d",
            cpu_isa_detail::environment_cap());
  setenv(names[1], "0", 1);
  FC_EXPECT(cpu_isa_detail::environment_cap() == 2, "FASTCORE_AI_ATTENTION_CPU_GENERIC=0: cap %d",
            cpu_isa_detail::environment_cap());
  for (int v = 0; v < 2; ++v) {
    if (was_set[v])
      setenv(names[v], saved[v].c_str(), 1);
    else
      unsetenv(names[v]);
  }
}

int main() {
  check_cpu_isa();
  std::mt19937 gen(7);
  for (int64_t ksub : {16, 256}) {
    check_tables(5, 3, 4, ksub, gen);
    check_tables(3, 2, 17, ksub, gen);
  }
  // Encode and the 8-bit scan with the portable loops (kernel 1) and with this CPU's SIMD kernels.
  for (int kernel : {1, 0}) {
    set_cpu_isa_cap(kernel);
    for (int64_t ksub : {16, 256, 100, 1}) {
      check_encode(300, 3, 4, ksub, gen);
      check_encode(130, 2, 17, ksub, gen);
    }
    for (bool ip : {false, true}) {
      for (int64_t k : {1, 5, 16, 33, 100}) check_assign(37, k, ip, gen);
      check_assign_fused(101, 20, 70, ip, gen);
      check_assign_fused(13, 3, 1, ip, gen);
      check_assign_fused(60, 64, 32, ip, gen);
    }
    for (bool ip : {false, true}) {
      check_scan(9, 1000, 5, 256, 10, ip, gen);
      check_scan(21, 333, 3, 256, 7, ip, gen);  // more queries than one 16-query pass, odd row count
      check_scan(3, 7, 4, 16, 12, ip, gen);     // k > n: padding
      check_scan(2, 300, 1, 16, 1, ip, gen);
    }
  }
  set_cpu_isa_cap(0);
  for (bool wide : {false, true}) {
    check_centroid_sums(50, 3, 4, 16, wide, gen);
    check_centroid_sums(40, 1, 23, 7, wide, gen);  // a plain k-means: one sub-space split across parts
    check_centroid_sums(9, 2, 5, 64, wide, gen);   // most clusters empty
  }
  for (int64_t M : {1, 2, 7, 16, 33, 64, 256}) check_fastscan(M, gen);
  std::printf("test_pq (fast-scan kernel %s): %d failure(s)\n", pq4_kernel_name(), fc_failures());
  return fc_failures() == 0 ? 0 : 1;
}
