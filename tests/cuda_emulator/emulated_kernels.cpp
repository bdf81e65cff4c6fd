// csrc/cuda/tes_loss_cuda.cu compiled as host C++ for the emulator: the
// kernels and their launches exactly as the working tree has them, with the
// CUDA names of emulator.h. tes_loss_cuda.cu starts every kernel through
// launch<kernel>(blocks, threads, stream, args...); here that runs the kernel
// on the emulator with the launch shape the .cu chose.
#include "emulator.h"

namespace tesloss {
namespace {
template <auto kKernel, typename... Args>
void launch(int blocks, int threads, cudaStream_t stream, const Args&... args);
}  // namespace
}  // namespace tesloss

#include "cuda/tes_loss_cuda.cu"

namespace tesloss {
namespace {

// The memory a kernel's arguments write and nothing else reads: the backward's
// and the single pass's gradients, [B, C] each.
template <typename T>
void add_watched(std::vector<tesloss_emulator::WatchedMemory>&, const T&) {}

template <typename scalar_t, typename acc_t>
void add_watched(std::vector<tesloss_emulator::WatchedMemory>& watched,
                 const BackwardArgs<scalar_t, acc_t>& a) {
  for (scalar_t* grad : {a.grad_vis, a.grad_txt}) {
    watched.push_back({grad, a.B * a.C, int64_t(sizeof(scalar_t))});
  }
}

// The single pass's gradients (the forward's launch passes none).
template <typename scalar_t, typename acc_t>
void add_watched(std::vector<tesloss_emulator::WatchedMemory>& watched,
                 const StepArgs<scalar_t, acc_t>& a) {
  if (a.grad_vis == nullptr) return;
  for (scalar_t* grad : {a.grad_vis, a.grad_txt}) {
    watched.push_back({grad, a.B * a.C, int64_t(sizeof(scalar_t))});
  }
}

template <auto kKernel, typename... Args>
void launch(int blocks, int threads, cudaStream_t, const Args&... args) {
  tesloss_emulator::Launch launch{tesloss_emulator::kernel_name(__PRETTY_FUNCTION__), blocks,
                                  threads, {}};
  (add_watched(launch.watched, args), ...);
  tesloss_emulator::run(launch, [&] { kKernel(args...); });
}

}  // namespace
}  // namespace tesloss
