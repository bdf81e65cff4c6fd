// What the emulator's fibers (a block's threads) run on: their stacks, the
// switch from one to another, and under ThreadSanitizer (TESLOSS_EMULATOR_CFLAGS=-fsanitize=thread) each fiber
// a TSan fiber, the barriers' release and acquire, and the scheduler's own
// bookkeeping left unchecked; without TSan, those are no-ops.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <cstddef>
#include <cstdint>
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

// A fiber's saved state, and the switch between two. glibc's swapcontext also
// saves and restores the signal mask, a system call on every switch; a block's
// threads switch at every barrier and every warp shuffle, so on x86-64 the
// switch is the few instructions below: the callee-saved registers go on the
// stack left, and only its stack pointer is kept. Elsewhere, ucontext.
#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};

// Not global (no .globl): each object file that includes this has its own.
extern "C" void tesloss_emulator_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .type tesloss_emulator_switch, @function
tesloss_emulator_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size tesloss_emulator_switch, . - tesloss_emulator_switch
)");

inline void switch_context(Context& save, Context& load) {
  tesloss_emulator_switch(&save.sp, load.sp);
}

// The first switch to `c` enters `entry` at the top of the stack, as if called
// there (the stack pointer 8 past a multiple of 16); `entry` never returns.
inline void start_context(Context& c, void* stack, size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(static_cast<char*>(stack) + bytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                          // entry's return address
  *--sp = reinterpret_cast<void*>(entry);   // where the switch's ret goes
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12 to r15
  c.sp = sp;
}
#else
struct Context {
  ucontext_t context;
};

inline void switch_context(Context& save, Context& load) {
  swapcontext(&save.context, &load.context);
}

inline void start_context(Context& c, void* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.context);
  c.context.uc_stack.ss_sp = stack;
  c.context.uc_stack.ss_size = bytes;
  c.context.uc_link = nullptr;
  makecontext(&c.context, entry, 0);
}
#endif

}  // namespace tesloss_emulator
