// herd_kernels::parallel_claim (claim_pool.h): workers that spin a while between calls, then sleep.
#include "claim_pool.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace herd_kernels {
namespace {

// How long an idle worker polls for the next call before it sleeps: a decode step's calls come a few to tens of
// microseconds apart, the next step's after the engine's Python (~0.2-0.5 ms), and a sleeping worker takes a futex
// call and tens of microseconds to wake (tiny's batch-1 step: 1.75 ms at a 50 us poll, 1.51 at 200, 1.46 at 2 ms).
// It polls with sched_yield, which gives its core to any other thread that wants it (1.42 against 1.47 ms with a
// pause loop).
constexpr auto kSpin = std::chrono::milliseconds(2);

// Bumped by rest(): a polling worker that sees it change sleeps at once (until the next call wakes it).
std::atomic<uint32_t> rests{0};

class Pool {
 public:
  Pool() : owner_(getpid()) {}

  void run(int64_t tasks, const std::function<void(int64_t)>& task, int workers) {
    grow(workers);
    task_ = &task;
    tasks_.store(tasks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    active_.store(workers, std::memory_order_relaxed);
    const uint32_t call = call_.load(std::memory_order_relaxed) + 1;
    // The ticket carries the call's number beside the next task: a worker still looking at an earlier call fails
    // its claim instead of taking a task of this one.
    ticket_.store(static_cast<uint64_t>(call) << 32, std::memory_order_release);
    call_.store(call, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    work(call);
    while (done_.load(std::memory_order_acquire) < tasks) _mm_pause();
  }

  bool owned_here() const { return owner_ == getpid(); }
  std::mutex& caller() { return caller_; }

 private:
  void grow(int workers) {
    while (static_cast<int>(threads_) < workers) {
      const int index = static_cast<int>(threads_++);
      // Detached: the pool lives as long as the process, and a forked child gets a pool of its own.
      std::thread([this, index] { loop(index); }).detach();
    }
  }

  // Claims and runs tasks of call `call` until none is left (at once if the pool has moved on to another call).
  void work(uint32_t call) {
    uint64_t ticket = ticket_.load(std::memory_order_acquire);
    while (static_cast<uint32_t>(ticket >> 32) == call) {
      const auto index = static_cast<int64_t>(ticket & 0xFFFFFFFFu);
      if (index >= tasks_.load(std::memory_order_relaxed)) return;
      if (ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel)) {
        (*task_)(index);
        done_.fetch_add(1, std::memory_order_release);
        ticket = ticket_.load(std::memory_order_acquire);
      }
    }
  }

  void loop(int index) {
    uint32_t seen = call_.load(std::memory_order_acquire);
    while (true) {
      uint32_t call = seen;
      const auto until = std::chrono::steady_clock::now() + kSpin;
      const uint32_t rest = rests.load(std::memory_order_relaxed);
      for (int i = 0; call == seen; ++i) {
        std::this_thread::yield();
        call = call_.load(std::memory_order_acquire);
        if (call != seen) break;
        if (rests.load(std::memory_order_relaxed) != rest) break;
        if ((i & 15) == 15 && std::chrono::steady_clock::now() > until) break;
      }
      if (call == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        wake_.wait(lock, [&] { return call_.load(std::memory_order_seq_cst) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        call = call_.load(std::memory_order_acquire);
      }
      seen = call;
      if (index < active_.load(std::memory_order_relaxed)) work(call);
    }
  }

  const pid_t owner_;
  std::mutex caller_;  // one calling thread at a time
  std::atomic<uint64_t> ticket_{0};
  std::atomic<uint32_t> call_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> active_{0};
  std::atomic<int> sleepers_{0};
  const std::function<void(int64_t)>* task_ = nullptr;
  std::atomic<int64_t> tasks_{0};  // read by a worker still looking at the last call: its claim then fails
  unsigned threads_ = 0;
  std::mutex mutex_;
  std::condition_variable wake_;
};

thread_local bool in_task = false;

Pool& pool() {
  // Never destroyed (detached workers use it until the process ends); replaced in a forked child, whose copy has
  // no workers and may hold locks that a thread of the parent held.
  static std::atomic<Pool*> current{new Pool()};
  Pool* p = current.load();
  if (!p->owned_here()) {
    p = new Pool();
    current.store(p);
  }
  return *p;
}

}  // namespace

void parallel_claim(int64_t tasks, const std::function<void(int64_t)>& task) {
  const int workers = at::get_num_threads() - 1;
  if (tasks <= 0) return;
  if (tasks == 1 || workers < 1 || in_task || at::in_parallel_region()) {
    for (int64_t i = 0; i < tasks; ++i) task(i);
    return;
  }
  Pool& p = pool();
  std::unique_lock<std::mutex> lock(p.caller(), std::try_to_lock);
  if (!lock.owns_lock()) {
    for (int64_t i = 0; i < tasks; ++i) task(i);
    return;
  }
  in_task = true;  // the calling thread's own tasks: a nested call runs inline
  p.run(tasks, [&](int64_t i) {
    in_task = true;
    task(i);
  }, workers);
  in_task = false;
}

void rest() { rests.fetch_add(1, std::memory_order_relaxed); }

}  // namespace herd_kernels

TORCH_LIBRARY_FRAGMENT(herd_cpu, m) {
  m.def("rest_pool() -> ()", &herd_kernels::rest);  // a catch-all: no tensor
}
