// The emulator's scheduler (emulator.h): a block's threads as fibers (fibers.h)
// on one OS thread, run one at a time in an Order, each until it waits at a
// barrier or returns. A barrier releases when all of its threads have arrived;
// a block in which no thread can run, but some have not returned, deadlocks.
//
// Under ThreadSanitizer each fiber is a TSan thread, switched to without
// synchronizing, so the only happens-before edges between a block's threads
// are the barriers' (a release on arrival, an acquire on leaving): an access
// to memory that two threads reach without a barrier between them is reported
// as the race it is on a GPU. Blocks run one after another, and TSan sees them
// so (a block's end happens before the next one's threads start), for the
// next block reuses the stacks and the static __shared__ arrays; so races
// between blocks are not TSan's to find here (the write counts catch two
// blocks writing one gradient element).
#include "emulator.h"
#include "fibers.h"
#include "write_counter.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <utility>

namespace tesloss_emulator {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;

// Which runnable thread runs next. kRoundRobin: passes over the block's
// threads in ascending order, each thread running until it waits, so warps
// move in step. kHighFirst and kShuffled: always the first runnable thread by
// descending index, or by a random priority drawn per block, so one warp runs
// as far ahead of the others as its barriers let it. A race that a missing
// barrier lets through shows in the results under one or another (blocks run
// in ascending, descending or shuffled order alike).
enum Order : int { kRoundRobin = 0, kHighFirst = 1, kShuffled = 2 };

struct Settings {
  cudaDeviceProp device{132, 2048};  // an H100's or H200's multiprocessors
  int order = kRoundRobin;
  uint64_t seed = 0;
  bool count_writes = false;
};


struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
  char sync[2] = {};  // TSan's addresses for a generation's release and acquire, by parity
};

struct Fiber {
  Context context;
  void* stack = nullptr;
  ThreadIndex index;
  Barrier* waiting = nullptr;  // and the generation it waits to see end
  uint64_t wait_generation = 0;
  bool done = false;
  void* tsan = nullptr;
};

// A warp's shuffle slots, two sets used in turn: a lane writes a shuffle's
// value into set g % 2, g the warp barrier's generation, so that the next
// shuffle's writes cannot reach a slot before every lane has read it.
struct Warp {
  Barrier barrier;
  unsigned char slots[2][kWarpSize][8];
};

struct Block {
  const Launch* launch = nullptr;
  const std::function<void()>* thread = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier barrier;
  Context scheduler;
  void* scheduler_tsan = nullptr;
  std::string error;
  bool aborting = false;  // after an error: the threads left unwind their stacks
};

Settings g_settings;
std::mutex g_mutex;  // one launch at a time: __shared__ memory is static
std::vector<std::string> g_launches;
std::vector<int32_t> g_write_counts;
Block* g_block = nullptr;
Fiber* g_fiber = nullptr;
char g_done_sync;  // every thread's exit releases here; its block's end acquires

Fiber& running() {
  if (g_fiber == nullptr) {
    throw std::logic_error("tesloss emulator: a CUDA name used outside an emulated kernel");
  }
  return *g_fiber;
}

std::string where(const Block& b, const Fiber& f) {
  std::ostringstream out;
  out << "block " << f.index.block_idx.x << ", thread " << f.index.thread_idx.x << " of "
      << b.launch->kernel;
  return out.str();
}

void to_scheduler(Fiber& f, Block& b) {
  tsan_switch(b.scheduler_tsan);
  switch_context(f.context, b.scheduler);
}

void to_fiber(Block& b, Fiber& f) {
  g_fiber = &f;
  f.waiting = nullptr;
  tsan_switch(f.tsan);
  switch_context(b.scheduler, f.context);
  g_fiber = nullptr;
}

bool runnable(const Fiber& f) {
  return !f.done && (f.waiting == nullptr || f.waiting->generation != f.wait_generation);
}

class DeviceAssert : public std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Thrown into a waiting thread of a block that has failed, to unwind it.
struct Aborted {};

void arrive_and_wait(Barrier& b) {
  Fiber& f = running();
  const uint64_t generation = b.generation;
  tsan_release(&b.sync[generation % 2]);
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
  } else {
    f.waiting = &b;
    f.wait_generation = generation;
    to_scheduler(f, *g_block);
    if (g_block->aborting) throw Aborted{};
  }
  tsan_acquire(&b.sync[generation % 2]);
}

void fiber_main() {
  Block& b = *g_block;
  Fiber& f = running();
  std::string error;
  try {
    if (!b.aborting) (*b.thread)();
  } catch (const Aborted&) {
  } catch (const DeviceAssert& e) {
    error = std::string("device-side assert triggered: ") + e.what() + ", in " + where(b, f);
  } catch (const std::exception& e) {
    error = where(b, f) + " threw: " + e.what();
  }
  // Ended before the thread is: TSan reports a thread that ends ignoring. So the
  // release comes last but the switch, which reads nothing of the scheduler's.
  void* scheduler_tsan = nullptr;
  Context* scheduler = nullptr;
  {
    Unchecked unchecked;
    if (!error.empty() && b.error.empty()) b.error = error;
    f.done = true;
    scheduler_tsan = b.scheduler_tsan;
    scheduler = &b.scheduler;
  }
  tsan_release(&g_done_sync);
  tsan_switch(scheduler_tsan);
  switch_context(f.context, *scheduler);  // never resumed
}

std::string deadlock(const Block& b) {
  int at_block = 0, exited = 0;
  std::vector<int> at_warp(b.warps.size(), 0);
  for (const Fiber& f : b.fibers) {
    if (f.done) {
      ++exited;
    } else if (f.waiting == &b.barrier) {
      ++at_block;
    } else {
      ++at_warp[f.index.thread_idx.x / kWarpSize];
    }
  }
  std::ostringstream out;
  out << "deadlock in block " << b.fibers[0].index.block_idx.x << " of " << b.launch->kernel
      << ": " << at_block << " threads wait at __syncthreads, " << exited << " have exited";
  for (size_t w = 0; w < at_warp.size(); ++w) {
    if (at_warp[w] != 0) out << ", " << at_warp[w] << " of warp " << w << " wait at a shuffle";
  }
  return out.str();
}

std::vector<int> visit_order(int n, std::mt19937_64& random) {
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (g_settings.order == kHighFirst) std::reverse(order.begin(), order.end());
  if (g_settings.order == kShuffled) std::shuffle(order.begin(), order.end(), random);
  return order;
}

void run_block(Block& b, unsigned block_index, WriteCounter* writes, std::mt19937_64& random) {
  const int threads = b.launch->threads;
  b.error.clear();
  b.aborting = false;
  b.barrier = Barrier{};
  b.barrier.expected = threads;
  for (Warp& w : b.warps) {
    w.barrier = Barrier{};
    w.barrier.expected = kWarpSize;
  }
  for (int t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f = Fiber{};
    f.index.thread_idx.x = t;
    f.index.block_idx.x = block_index;
    f.index.block_dim.x = threads;
    f.index.grid_dim.x = b.launch->blocks;
    f.stack = fiber_stack(t);
    f.tsan = tsan_create();
    start_context(f.context, static_cast<char*>(f.stack) + kGuardBytes,
                  kStackBytes - kGuardBytes, &fiber_main);
  }
  const std::vector<int> priority = visit_order(threads, random);
  int left = threads;
  while (left > 0 && b.error.empty()) {
    bool ran = false;
    for (int t : priority) {
      Fiber& f = b.fibers[t];
      if (!runnable(f)) continue;
      to_fiber(b, f);
      if (writes != nullptr) writes->after_stretch();
      ran = true;
      if (f.done) --left;
      // Round robin goes on to the next thread; the others start again from the top.
      if (!b.error.empty() || g_settings.order != kRoundRobin) break;
    }
    if (!ran) b.error = deadlock(b);
  }
  if (!b.error.empty()) {  // a GPU would stop every thread; here the ones left unwind
    b.aborting = true;
    for (Fiber& f : b.fibers) {
      if (!f.done) to_fiber(b, f);
    }
  }
  for (Fiber& f : b.fibers) tsan_destroy(f.tsan);
  tsan_acquire(&g_done_sync);  // the next block's threads are created after this block's end
}

}  // namespace

const ThreadIndex& current() { return running().index; }

const cudaDeviceProp& device_properties() { return g_settings.device; }

void syncthreads() {
  Unchecked unchecked;
  arrive_and_wait(g_block->barrier);
}

void shuffle_xor(unsigned mask, const void* value, void* out, size_t bytes, int lane_mask,
                 int width) {
  Unchecked unchecked;
  Fiber& f = running();
  if (mask != 0xffffffffu || width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    throw std::logic_error("tesloss emulator: only full-warp shuffles of a width that is a "
                           "power of 2 up to 32 are emulated");
  }
  const int lane = int(f.index.thread_idx.x) % kWarpSize;
  Warp& w = g_block->warps[f.index.thread_idx.x / kWarpSize];
  const int set = int(w.barrier.generation % 2);
  std::memcpy(w.slots[set][lane], value, bytes);
  arrive_and_wait(w.barrier);
  // shfl.sync.bfly with CUDA's clamp for __shfl_xor_sync, ((32 - width) << 8) | 0x1f:
  // a source past the end of the lane's segment reads the lane's own value.
  const int segment_bits = kWarpSize - width;
  const int last_in_segment = (lane & segment_bits) | (0x1f & ~segment_bits);
  int source = lane ^ (lane_mask & 0x1f);
  if (source > last_in_segment) source = lane;
  std::memcpy(out, w.slots[set][source], bytes);
}

void device_assert_failed(const char* condition, const char* file, int line) {
  std::ostringstream out;
  out << "`" << condition << "` (" << file << ":" << line << ")";
  throw DeviceAssert(out.str());
}

std::string kernel_name(const char* pretty_function) {
  const std::string text(pretty_function);
  const std::string key = "kKernel = ";
  size_t begin = text.find(key);
  if (begin == std::string::npos) return text;
  begin += key.size();
  std::string name = text.substr(begin, text.find(';', begin) - begin);
  for (const std::string prefix : {"tesloss::", "{anonymous}::", "&"}) {
    for (size_t at; (at = name.find(prefix)) != std::string::npos;) name.erase(at, prefix.size());
  }
  return name;
}

void run(const Launch& launch, const std::function<void()>& thread) {
  const std::lock_guard<std::mutex> lock(g_mutex);
  Unchecked unchecked;
  if (launch.blocks < 1 || launch.threads < 1 || launch.threads > kMaxThreadsPerBlock ||
      launch.threads % kWarpSize != 0) {
    throw std::runtime_error("tesloss emulator: " + launch.kernel + " launched on " +
                             std::to_string(launch.blocks) + " blocks of " +
                             std::to_string(launch.threads) +
                             " threads: CUDA's invalid configuration (the emulator also "
                             "asks for whole warps)");
  }
  std::ostringstream record;
  record << launch.kernel << " " << launch.blocks << " " << launch.threads;
  g_launches.push_back(record.str());

  Block block;
  block.launch = &launch;
  block.thread = &thread;
  block.fibers.resize(launch.threads);
  block.warps.resize(launch.threads / kWarpSize);
  block.scheduler_tsan = tsan_current();
  const bool counting = g_settings.count_writes && !launch.watched.empty();
  WriteCounter writes(counting ? launch.watched : std::vector<WatchedMemory>{}, g_write_counts);
  std::mt19937_64 random(g_settings.seed);
  g_block = &block;
  for (int b : visit_order(launch.blocks, random)) {
    run_block(block, unsigned(b), counting ? &writes : nullptr, random);
    if (!block.error.empty()) break;
  }
  g_block = nullptr;
  if (!block.error.empty()) throw std::runtime_error(block.error);
  if (counting) writes.finish();
}

}  // namespace tesloss_emulator

// The emulator's controls, for tests/test_cuda_emulated.py through ctypes.
extern "C" {

// The emulated device's size (the launch shapes depend on it), the order
// threads and blocks run in (Order: 0 round robin, 1 high first, 2 shuffled by
// `seed`), and whether launches that write gradients count each element's
// writes. Clears the launch log.
void tesloss_emulator_configure(int64_t sm_count, int64_t threads_per_sm, int32_t order,
                                uint64_t seed, int32_t count_writes) {
  using namespace tesloss_emulator;
  const std::lock_guard<std::mutex> lock(g_mutex);
  g_settings.device = cudaDeviceProp{int(sm_count), int(threads_per_sm)};
  g_settings.order = order;
  g_settings.seed = seed;
  g_settings.count_writes = count_writes != 0;
  g_launches.clear();
  g_write_counts.clear();
}

// The launches since tesloss_emulator_configure, a line each: "kernel blocks
// threads". Returns the bytes the whole log needs; copies what fits.
int64_t tesloss_emulator_launches(char* out, int64_t capacity) {
  using namespace tesloss_emulator;
  const std::lock_guard<std::mutex> lock(g_mutex);
  std::string log;
  for (const std::string& line : g_launches) log += line + "\n";
  if (out != nullptr) std::memcpy(out, log.data(), std::min<int64_t>(capacity, log.size()));
  return int64_t(log.size());
}

// How many times each element of the last counted launch's watched memory was
// written, in the order it was watched. Returns the element count; copies
// what fits.
int64_t tesloss_emulator_write_counts(int32_t* out, int64_t capacity) {
  using namespace tesloss_emulator;
  const std::lock_guard<std::mutex> lock(g_mutex);
  const int64_t n = int64_t(g_write_counts.size());
  if (out != nullptr) {
    std::memcpy(out, g_write_counts.data(), sizeof(int32_t) * std::min(capacity, n));
  }
  return n;
}
}
