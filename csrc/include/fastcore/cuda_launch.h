// Host-side launch helpers of the .cu files: grid sizes and the status of a launch. Included only by
// .cu files (it needs <cuda_runtime.h>); torch-free like everything under csrc/include.
//
// Grid sizes are computed in int64. A dimension sized one block per `per_block` items is
// ⌈count / per_block⌉; a grid-stride kernel may get fewer blocks (its loop covers the rest), so its
// grid is clamped. A launch reports its configuration errors and earlier asynchronous errors through
// cudaGetLastError, which launch_status returns as the int the kernels' C entry points return
// (0 = cudaSuccess).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastcore {

// The hardware limits of a grid dimension (every compute capability the library builds for).
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridYZ = 65535;

// ⌈count / per_block⌉ for count >= 0, per_block >= 1.
constexpr int64_t ceil_div(int64_t count, int64_t per_block) { return (count + per_block - 1) / per_block; }

// Blocks of one grid dimension where block i covers items [i · per_block, (i + 1) · per_block).
// Saturates at 2^32 - 1 (beyond every dimension's limit) so an oversized grid fails the launch with
// cudaErrorInvalidConfiguration instead of wrapping around to a smaller grid.
inline unsigned grid_blocks(int64_t count, int64_t per_block) {
  const int64_t blocks = ceil_div(count, per_block);
  return blocks < 0xffffffffLL ? static_cast<unsigned>(blocks) : 0xffffffffu;
}

// Blocks of a grid-stride loop over `count` items, `per_block` per block per pass: ⌈count / per_block⌉
// clamped to [1, max_blocks] (at least one block, so an empty loop is still a valid launch).
inline unsigned grid_stride_blocks(int64_t count, int64_t per_block, int64_t max_blocks) {
  const int64_t blocks = ceil_div(count, per_block);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < max_blocks ? blocks : max_blocks));
}

// The status of the launches queued since the last check on this host thread (and clears it).
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace fastcore
