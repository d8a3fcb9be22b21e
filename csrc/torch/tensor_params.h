// The torch side of the params structs: dtype -> ScalarKind, messaged checks. Only csrc/torch/
// includes torch (DESIGN rule 1).
#pragma once

#include <ATen/ATen.h>

#include "fastcore/common.h"

namespace fastcore {

// Raises c10::Error (RuntimeError in Python) whose text names the op and the argument.
#define FC_CHECK(cond, op, ...) TORCH_CHECK(cond, "fastcore_ai.ops.", op, ": ", __VA_ARGS__)

inline ScalarKind scalar_kind_of(const at::Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kDouble: return ScalarKind::kFloat64;
    default: FC_CHECK(false, op, arg, " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  }
  return ScalarKind::kFloat32;
}

// float32 math for every input dtype except float64, which keeps float64 (used by gradcheck).
inline at::ScalarType accumulate_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fastcore
