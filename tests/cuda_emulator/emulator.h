// A host emulator of the CUDA execution model, for exactly what csrc/cuda
// uses, so that tests/test_cuda_emulated.py runs the CUDA kernels whole where
// there is no GPU. emulated_kernels.cpp includes this header, then
// csrc/cuda/tes_loss_cuda.cu itself, and g++ compiles both as host C++.
//
// Each block's threads run as fibers (emulator.cpp), one at a time, switching
// only where a GPU thread may wait for others: __syncthreads and the warp
// shuffles. Blocks run one after another. What the kernels' CUDA names become:
//   threadIdx, blockIdx, blockDim, gridDim  the running fiber's
//   __syncthreads()                         a barrier over the block's threads
//   __shfl_xor_sync(mask, v, lane_mask, w)  an exchange through the warp's
//                                           slots, and a barrier over the warp
//   __shared__                              static: one copy, which the block
//                                           running at the time has to itself
//   __global__, __device__, __host__,       nothing (inline for
//   __launch_bounds__, __forceinline__      __forceinline__)
//   CUDA_KERNEL_ASSERT                      a failed one ends the launch with
//                                           "device-side assert triggered"
// ex2.approx is the host exp2 device_exp.cuh already has for host code. A
// barrier that some of its threads never reach (they exited or wait at
// another) is reported as a deadlock instead of hanging.
#pragma once

#include <c10/macros/Macros.h>  // defines CUDA_KERNEL_ASSERT, which is redefined below

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#ifndef TESLOSS_CUDA_EMULATOR
#define TESLOSS_CUDA_EMULATOR 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
using cudaStream_t = struct CUstream_st*;
struct cudaDeviceProp {
  int multiProcessorCount;
  int maxThreadsPerMultiProcessor;
};

namespace tesloss_emulator {

struct ThreadIndex {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
};

// Memory whose writes a launch counts per element (tesloss_emulator_configure's
// count_writes): each thread's stretch of work runs on it filled with 0xff
// bytes, and an element whose bytes are not all 0xff afterwards was written.
struct WatchedMemory {
  void* data;
  int64_t elements;
  int64_t element_bytes;
};

struct Launch {
  std::string kernel;  // e.g. "tes_forward_kernel<0, float, float, 32, 8>"
  int blocks;
  int threads;
  std::vector<WatchedMemory> watched;
};

// Runs `thread` as every thread of every block of the launch; a device-side
// assert, an exception in a thread or a deadlock throws std::runtime_error.
void run(const Launch& launch, const std::function<void()>& thread);

const ThreadIndex& current();
void syncthreads();
// Lane ^ lane_mask's `bytes` bytes at `value`, in the segments of `width` lanes
// that shfl.sync.bfly uses.
void shuffle_xor(unsigned mask, const void* value, void* out, size_t bytes, int lane_mask,
                 int width);
[[noreturn]] void device_assert_failed(const char* condition, const char* file, int line);
const cudaDeviceProp& device_properties();

// The kernel's name from __PRETTY_FUNCTION__ of launch<kKernel, ...>.
std::string kernel_name(const char* pretty_function);

}  // namespace tesloss_emulator

#define threadIdx (::tesloss_emulator::current().thread_idx)
#define blockIdx (::tesloss_emulator::current().block_idx)
#define blockDim (::tesloss_emulator::current().block_dim)
#define gridDim (::tesloss_emulator::current().grid_dim)
#define __syncthreads() ::tesloss_emulator::syncthreads()

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "a register's worth");
  T out;
  ::tesloss_emulator::shuffle_xor(mask, &var, &out, sizeof(T), lane_mask, width);
  return out;
}

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  if (!(cond)) ::tesloss_emulator::device_assert_failed(#cond, __FILE__, __LINE__)
