// CPU kernels of MoE dispatch / combine (math, plan and determinism contract in dispatch.h).
//
// The plan is a three-phase counting sort: per-chunk histograms (parallel over chunks), a serial
// scan over (expert, chunk) that gives each chunk its first position per expert, and a per-chunk
// scatter that walks its slots in order (parallel over chunks). Positions depend only on the input,
// never on the chunking or the thread count. Row copies and combine sums are parallel over rows.
#include <cstring>
#include <limits>

#include "moe/dispatch.h"

namespace fastcore {
namespace moe {

void dispatch_count_cpu(const DispatchParams& p, int64_t chunk_begin, int64_t chunk_end) {
  const int64_t N = p.num_tokens * p.k, E = p.num_experts;
  for (int64_t c = chunk_begin; c < chunk_end; ++c) {
    int64_t* counts = p.chunk_counts + c * E;
    for (int64_t e = 0; e < E; ++e) counts[e] = 0;
    int64_t bad = 0;
    const int64_t begin = c * p.slots_per_chunk;
    const int64_t end = begin + p.slots_per_chunk < N ? begin + p.slots_per_chunk : N;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = p.expert_ids[i];
      if (e < 0 || e >= E) {
        ++bad;
        continue;
      }
      if (p.kept == nullptr || p.kept[i]) ++counts[e];
    }
    p.num_bad_ids[c] = bad;
  }
}

int64_t dispatch_scan_cpu(const DispatchParams& p) {
  const int64_t E = p.num_experts;
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    p.expert_offsets[e] = total;
    int64_t within = 0;  // kept slots of expert e in earlier chunks
    for (int64_t c = 0; c < p.num_chunks; ++c) {
      const int64_t count = p.chunk_counts[c * E + e];
      p.chunk_counts[c * E + e] = within;
      within += count;
    }
    total += within;
  }
  p.expert_offsets[E] = total;
  return total;
}

void dispatch_scatter_cpu(const DispatchParams& p, int64_t chunk_begin, int64_t chunk_end) {
  const int64_t N = p.num_tokens * p.k, E = p.num_experts;
  for (int64_t c = chunk_begin; c < chunk_end; ++c) {
    int64_t* cursor = p.chunk_counts + c * E;  // this chunk's own row: no other worker touches it
    const int64_t begin = c * p.slots_per_chunk;
    const int64_t end = begin + p.slots_per_chunk < N ? begin + p.slots_per_chunk : N;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = p.expert_ids[i];
      if (e < 0 || e >= E || (p.kept != nullptr && !p.kept[i])) {  // bad ids were refused before; guard anyway
        p.token_slot[i] = -1;
        continue;
      }
      const int64_t position = p.expert_offsets[e] + cursor[e]++;
      p.token_slot[i] = position;
      p.slot_to_token[position] = i / p.k;
    }
  }
}

int64_t gather_rows_cpu(const GatherRowsParams& p, int64_t row_begin, int64_t row_end) {
  int64_t bad = 0;
  const int64_t H = p.cols;
  for (int64_t s = row_begin; s < row_end; ++s) {
    const int64_t src = p.src_row[s];
    char* out = static_cast<char*>(p.out) + s * H * p.element_size;
    if (src < 0 || src >= p.in_rows) {
      ++bad;
      continue;
    }
    const char* in = static_cast<const char*>(p.in) + src * p.in_row_stride * p.element_size;
    if (p.in_col_stride == 1) {
      std::memcpy(out, in, static_cast<size_t>(H * p.element_size));
    } else {
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(out + h * p.element_size, in + h * p.in_col_stride * p.element_size,
                    static_cast<size_t>(p.element_size));
    }
  }
  return bad;
}

namespace {

// Combine one row at a time: the output row itself is the accumulator and the slots are added in
// j order, so every element sees exactly combine_element's operations (0 + w_0·y_0 + w_1·y_1 + …) and
// the result is bitwise the same; the inner loop over h is a plain vectorisable axpy.
template <typename Acc>
int64_t combine_rows(const CombineParams& p, int64_t token_begin, int64_t token_end) {
  int64_t bad = 0;
  const int64_t H = p.hidden;
  const bool y_is_acc = (sizeof(Acc) == sizeof(float) && p.y_kind == ScalarKind::kFloat32) ||
                        (sizeof(Acc) == sizeof(double) && p.y_kind == ScalarKind::kFloat64);
  for (int64_t t = token_begin; t < token_end; ++t) {
    Acc* out = static_cast<Acc*>(p.out) + t * H;
    for (int64_t h = 0; h < H; ++h) out[h] = Acc(0);
    bool row_bad = false;
    for (int64_t j = 0; j < p.k; ++j) {
      const int64_t s = p.token_slot[t * p.k + j];
      if (s == -1) continue;
      if (s < 0 || s >= p.num_rows) {
        row_bad = true;
        continue;
      }
      const Acc w = p.weights ? load_as<Acc>(p.weights, p.weights_kind, t * p.k + j) : Acc(1);
      if (y_is_acc) {
        const Acc* y = static_cast<const Acc*>(p.y) + s * H;
        for (int64_t h = 0; h < H; ++h) out[h] += w * y[h];
      } else {
        for (int64_t h = 0; h < H; ++h) out[h] += w * load_as<Acc>(p.y, p.y_kind, s * H + h);
      }
    }
    bad += row_bad ? 1 : 0;
  }
  return bad;
}

template <typename Acc>
int64_t backward_y_rows(const CombineParams& p, int64_t row_begin, int64_t row_end) {
  int64_t bad = 0;
  Acc* grad_y = static_cast<Acc*>(p.grad_y);
  for (int64_t s = row_begin; s < row_end; ++s) {
    const int64_t t = p.slot_to_token[s];
    if (t < 0 || t >= p.num_tokens) {
      ++bad;
      continue;
    }
    const Acc scale = combine_slot_scale<Acc>(p, s, t);
    for (int64_t h = 0; h < p.hidden; ++h)
      grad_y[s * p.hidden + h] = scale * load_as<Acc>(p.grad_out, p.grad_kind, t * p.hidden + h);
  }
  return bad;
}

template <typename Acc>
int64_t backward_weight_rows(const CombineParams& p, int64_t token_begin, int64_t token_end) {
  int64_t bad = 0;
  Acc* grad_w = static_cast<Acc*>(p.grad_weights);
  for (int64_t t = token_begin; t < token_end; ++t) {
    for (int64_t j = 0; j < p.k; ++j) {
      const int64_t s = p.token_slot[t * p.k + j];
      Acc dot = Acc(0);
      if (s >= 0 && s < p.num_rows) {
        for (int64_t h = 0; h < p.hidden; ++h)
          dot +=
              load_as<Acc>(p.grad_out, p.grad_kind, t * p.hidden + h) * load_as<Acc>(p.y, p.y_kind, s * p.hidden + h);
      } else if (s != -1) {
        ++bad;
      }
      grad_w[t * p.k + j] = dot;
    }
  }
  return bad;
}

bool double_math(const CombineParams& p) { return p.y_kind == ScalarKind::kFloat64; }

}  // namespace

int64_t combine_cpu(const CombineParams& p, int64_t token_begin, int64_t token_end) {
  return double_math(p) ? combine_rows<double>(p, token_begin, token_end)
                        : combine_rows<float>(p, token_begin, token_end);
}

int64_t combine_backward_y_cpu(const CombineParams& p, int64_t row_begin, int64_t row_end) {
  return double_math(p) ? backward_y_rows<double>(p, row_begin, row_end)
                        : backward_y_rows<float>(p, row_begin, row_end);
}

int64_t combine_backward_weights_cpu(const CombineParams& p, int64_t token_begin, int64_t token_end) {
  return double_math(p) ? backward_weight_rows<double>(p, token_begin, token_end)
                        : backward_weight_rows<float>(p, token_begin, token_end);
}

}  // namespace moe
}  // namespace fastcore
