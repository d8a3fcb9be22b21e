// pybind11 bindings of the pq family (product-quantization search): `fastcore_ai._C.pq_*`.
#include <torch/extension.h>

namespace fastcore {
namespace pq {
std::vector<at::Tensor> tables(const at::Tensor& x, const at::Tensor& codebooks, int64_t metric, bool want_lut,
                               bool want_codes);
std::vector<at::Tensor> kmeans_assign(const at::Tensor& x, const at::Tensor& centroids, int64_t metric);
at::Tensor top_columns(const at::Tensor& scores, int64_t count);
std::vector<at::Tensor> centroid_sums(const at::Tensor& x, const at::Tensor& codes, int64_t ksub);
std::vector<at::Tensor> centroid_update(const at::Tensor& x, const at::Tensor& codes, int64_t ksub,
                                        const at::Tensor& old);
std::vector<at::Tensor> search_flat(const at::Tensor& lut, const at::Tensor& codes, int64_t k, int64_t metric);
std::vector<at::Tensor> search_ivf(const at::Tensor& lut, const at::Tensor& codes, const at::Tensor& list_offsets,
                                   const at::Tensor& probes, const std::optional<at::Tensor>& bias,
                                   const at::Tensor& ids, int64_t k, int64_t metric,
                                   const std::optional<at::Tensor>& list_terms);
std::vector<at::Tensor> search_pq4(const at::Tensor& lut, const at::Tensor& packed, int64_t n, int64_t k, int64_t metric);
std::vector<at::Tensor> search_pq4_ivf(const at::Tensor& lut, const at::Tensor& packed, const at::Tensor& list_blocks,
                                       const at::Tensor& list_sizes, const at::Tensor& row_ids,
                                       const at::Tensor& probes, int64_t k, int64_t metric);
std::string fastscan_kernel(int64_t force);
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
  m.def("pq_search_ivf", &pq::search_ivf, "IVF ADC top-k over probed lists (list_terms: per-list tables of the L2 residual decomposition or None): "
        "(dist [nq, k], ids [nq, k])");
  m.def("pq4_search", &pq::search_pq4, "4-bit fast-scan top-k: (dist [nq, k], ids [nq, k])");
  m.def("pq4_search_ivf", &pq::search_pq4_ivf, "IVF 4-bit fast-scan top-k (non-residual): (dist [nq, k], ids)");
  m.def("pq4_kernel", &pq::fastscan_kernel,
        "the fast-scan kernel in use ('avx512bw', 'avx2', 'portable'); force >= 0 selects one (0 auto, 1 portable, "
        "2 avx2, 3 avx512bw)");
}
}  // namespace fastcore
