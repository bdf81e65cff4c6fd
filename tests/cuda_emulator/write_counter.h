// The emulator's count of writes per element (emulator.h's WatchedMemory),
// for tests/test_cuda_emulated.py's write-once test: which gradient elements a
// launch writes, and how many of its threads' stretches write each.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "emulator.h"

namespace tesloss_emulator {

inline constexpr unsigned char kUnwritten = 0xff;
inline constexpr int64_t kChunkBytes = 4096;
inline const std::array<unsigned char, kChunkBytes> kUnwrittenChunk = [] {
  std::array<unsigned char, kChunkBytes> chunk;
  chunk.fill(kUnwritten);
  return chunk;
}();

// Counts the writes of each stretch a thread runs to watched memory, which
// holds kUnwritten bytes at the start of every stretch: an element with other
// bytes after it was written. Its value goes to the results, and the element
// back to kUnwritten; the results are the memory's at the launch's end.
class WriteCounter {
 public:
  // `counts` gets a count per element of all watched memory, in order.
  WriteCounter(std::vector<WatchedMemory> watched, std::vector<int32_t>& counts)
      : watched_(std::move(watched)), counts_(counts) {
    if (watched_.empty()) return;  // a launch that writes no watched memory keeps the counts
    int64_t elements = 0;
    for (const WatchedMemory& m : watched_) {
      elements += m.elements;
      results_.emplace_back(m.elements * m.element_bytes, kUnwritten);
      std::memset(m.data, kUnwritten, m.elements * m.element_bytes);
    }
    counts_.assign(elements, 0);
  }
  void after_stretch() {
    int32_t* counts = counts_.data();
    for (size_t k = 0; k < watched_.size(); ++k) {
      const WatchedMemory& m = watched_[k];
      auto* bytes = static_cast<unsigned char*>(m.data);
      const int64_t size = m.elements * m.element_bytes;
      // Every stretch scans all watched memory, so untouched chunks are skipped
      // by memcmp (vectorized); only a chunk that differs is read per element.
      // An element across two chunks is looked at twice: the first look
      // counts it and sets it back to kUnwritten.
      for (int64_t start = 0; start < size; start += kChunkBytes) {
        const int64_t length = std::min(kChunkBytes, size - start);
        if (std::memcmp(bytes + start, kUnwrittenChunk.data(), length) == 0) continue;
        for (int64_t i = start / m.element_bytes; i * m.element_bytes < start + length; ++i) {
          unsigned char* element = bytes + i * m.element_bytes;
          if (std::any_of(element, element + m.element_bytes,
                          [](unsigned char c) { return c != kUnwritten; })) {
            counts[i] += 1;
            std::memcpy(&results_[k][i * m.element_bytes], element, m.element_bytes);
            std::memset(element, kUnwritten, m.element_bytes);
          }
        }
      }
      counts += m.elements;
    }
  }
  void finish() {
    for (size_t k = 0; k < watched_.size(); ++k) {
      std::memcpy(watched_[k].data, results_[k].data(), results_[k].size());
    }
  }

 private:
  const std::vector<WatchedMemory> watched_;
  std::vector<std::vector<unsigned char>> results_;
  std::vector<int32_t>& counts_;
};

}  // namespace tesloss_emulator
