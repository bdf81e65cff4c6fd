// The emulator's stand-in for ATen's CUDA context: the current stream is no
// stream, and the device's properties are the emulated device's
// (tesloss_emulator_configure).
#pragma once

#include "emulator.h"

namespace at::cuda {

inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
inline const cudaDeviceProp* getCurrentDeviceProperties() {
  return &::tesloss_emulator::device_properties();
}

}  // namespace at::cuda
