// 16-byte packs, the unit the CUDA kernels load and store rows in, and how a
// row's columns fall into a scalar head, whole packs and a scalar rest. Plain
// host-and-device code, like the schedules that use it (schedules.cuh).
#pragma once

#include <cstdint>
#include <stdexcept>

#include "params.h"
#include "tes_loss.h"

namespace tesloss {

constexpr int kPackBytes = 16;  // one 128-bit load or store
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

template <typename scalar_t>
using PackOf = Pack<scalar_t, kPackBytes / sizeof(scalar_t)>;

// A probability target is read in the accumulation type: the columns of one
// pack of logits are kTargetPacks packs of it (2 for half types, else 1).
template <typename scalar_t>
constexpr int kTargetPacks = sizeof(acc_t_of<scalar_t>) / sizeof(scalar_t);

template <typename T>
TESLOSS_HD uintptr_t address(const T* ptr) {
  return reinterpret_cast<uintptr_t>(ptr);
}

// Packs must start on a 16-byte boundary. The GPU faults on one that does not;
// on the host (tests/test_cuda_schedules.py) this throws instead.
TESLOSS_HD void expect_pack_aligned(const void* packs) {
#if !defined(__CUDA_ARCH__)
  if (address(packs) % kPackBytes != 0) {
    throw std::logic_error("tesloss: a 16-byte pack access is not 16-byte aligned");
  }
#endif
}

template <typename scalar_t>
TESLOSS_HD const PackOf<scalar_t>* as_packs(const scalar_t* row) {
  expect_pack_aligned(row);
  return reinterpret_cast<const PackOf<scalar_t>*>(row);
}

template <typename scalar_t>
TESLOSS_HD PackOf<scalar_t>* as_packs(scalar_t* row) {
  expect_pack_aligned(row);
  return reinterpret_cast<PackOf<scalar_t>*>(row);
}

// How a row's columns fall into a scalar head (before the first 16-byte
// boundary), whole packs, and a scalar rest. When the row pointers of a pass
// sit at different offsets from a 16-byte boundary no column can be read as a
// pack of every array at once, and the whole row is the scalar rest.
struct RowSplit {
  int head;
  int num_packs;
  int rest_begin;
};

template <typename scalar_t>
TESLOSS_HD RowSplit split_row(int C, uintptr_t first_address, bool same_offset) {
  constexpr int kPack = kPackBytes / sizeof(scalar_t);
  const int offset = static_cast<int>(first_address % kPackBytes);
  if (!same_offset || offset % sizeof(scalar_t) != 0) return RowSplit{0, 0, 0};
  const int to_boundary = (kPackBytes - offset) % kPackBytes / static_cast<int>(sizeof(scalar_t));
  const int head = to_boundary < C ? to_boundary : C;
  const int num_packs = (C - head) / kPack;
  return RowSplit{head, num_packs, head + num_packs * kPack};
}

// The split of a row whose pass also reads a probability target (`probs`, in
// the accumulation type; null for class indices): its packs must start on a
// 16-byte boundary where the logits' do, or the whole row is the scalar rest.
template <typename scalar_t, typename acc_t>
TESLOSS_HD RowSplit split_row_with(int C, uintptr_t first_address, bool same_offset,
                                   const acc_t* probs) {
  const RowSplit split = split_row<scalar_t>(C, first_address, same_offset);
  if (probs == nullptr || split.num_packs == 0 || address(probs + split.head) % kPackBytes == 0) {
    return split;
  }
  return RowSplit{0, 0, 0};
}

}  // namespace tesloss
