// What the emulator's fibers (a block's threads) run on: their stacks, and
// under ThreadSanitizer (TESLOSS_EMULATOR_CFLAGS=-fsanitize=thread) each fiber
// a TSan fiber, the barriers' release and acquire, and the scheduler's own
// bookkeeping left unchecked; without TSan, those are no-ops.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <stdexcept>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" void AnnotateIgnoreReadsBegin(const char* file, int line);
extern "C" void AnnotateIgnoreReadsEnd(const char* file, int line);
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
#endif

namespace tesloss_emulator {

inline constexpr size_t kStackBytes = size_t(256) << 10;
inline constexpr size_t kGuardBytes = size_t(4) << 10;  // a fault, not a silent overwrite

// Thread i's stack, mapped at first use and kept: the next block's thread i
// runs on it.
inline void* fiber_stack(size_t i) {
  static std::vector<void*> stacks;
  while (stacks.size() <= i) {
    void* memory = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED) throw std::runtime_error("tesloss emulator: no memory for a stack");
    mprotect(memory, kGuardBytes, PROT_NONE);
    stacks.push_back(memory);
  }
  return stacks[i];
}

#if defined(__SANITIZE_THREAD__)
// The emulator's own bookkeeping is shared by all fibers and ordered by the
// scheduler, which TSan cannot see: it is not checked.
struct Unchecked {
  Unchecked() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Unchecked() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
};
inline void tsan_release(void* address) { __tsan_release(address); }
inline void tsan_acquire(void* address) { __tsan_acquire(address); }
inline void* tsan_current() { return __tsan_get_current_fiber(); }
inline void* tsan_create() { return __tsan_create_fiber(0); }
inline void tsan_destroy(void* fiber) { __tsan_destroy_fiber(fiber); }
inline void tsan_switch(void* fiber) {
  __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync);
}
#else
struct Unchecked {};
inline void tsan_release(void*) {}
inline void tsan_acquire(void*) {}
inline void* tsan_current() { return nullptr; }
inline void* tsan_create() { return nullptr; }
inline void tsan_destroy(void*) {}
inline void tsan_switch(void*) {}
#endif

}  // namespace tesloss_emulator
