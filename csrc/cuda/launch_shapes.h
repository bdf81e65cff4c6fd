// The CUDA kernels' launch shapes: threads per row, rows per block and blocks
// per pass. Each is a function of the problem's shape and the device's size
// only, so the order of every sum in the kernels is too. Host code without
// CUDA types.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace tesloss {

template <int N>
using Int = std::integral_constant<int, N>;

// Threads per row: by C, from 8 for tiny rows to a warp (C <= 1024), four warps
// (C <= 8192) and a block of 512 beyond, so each thread reads a few chunks. A
// batch too small to fill the device gets four times more threads per row, while
// each thread still has columns to read: a grid of a few dozen blocks would leave
// most multiprocessors idle (256 rows of 1000 classes give 32 blocks of 8 rows).
inline int threads_per_row(int64_t B, int64_t C, int64_t device_threads) {
  int tpr = C <= 128 ? 8 : C <= 1024 ? 32 : C <= 8192 ? 128 : 512;
  while (tpr < 512 && B * tpr * 4 <= device_threads && C >= int64_t(tpr) * 16) tpr *= 4;
  return tpr;
}

// Calls launch(Int<TPR>, Int<RPB>) for TPR threads per row and RPB rows per
// block: blocks of 256 threads, or one row of 512.
template <typename Launch>
void with_row_shape(int tpr, Launch&& launch) {
  switch (tpr) {
    case 8:
      launch(Int<8>{}, Int<32>{});
      break;
    case 32:
      launch(Int<32>{}, Int<8>{});
      break;
    case 128:
      launch(Int<128>{}, Int<2>{});
      break;
    default:
      launch(Int<512>{}, Int<1>{});
      break;
  }
}

struct DeviceSize {
  int64_t sm_count;
  int64_t threads_per_sm;
};

// Enough blocks to fill the device, no more: the forward writes one partial
// per block, and the finish kernel reads them all.
inline int row_blocks(int64_t B, int rows_per_block, int threads_per_block, const DeviceSize& device) {
  const int64_t resident =
      device.sm_count * std::max<int64_t>(1, device.threads_per_sm / threads_per_block);
  const int64_t needed = (B + rows_per_block - 1) / rows_per_block;
  return static_cast<int>(std::min(needed, resident));
}

}  // namespace tesloss
