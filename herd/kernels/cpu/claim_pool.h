// A thread pool whose calls never wait for a thread that is not running.
//
// A decode step on a small machine is hundreds of short parallel calls, and the server's HTTP process and its
// clients take a core now and then. With OpenMP's fork/join (ATen's parallel_for) every call waits at its barrier for
// each thread of the team; one that lost its core holds the step up until the scheduler gives it back (tiny at one
// stream over HTTP: 1.7-1.8 ms a token against 1.3 for the engine alone). Here the caller and the workers claim the
// call's tasks one at a time, and the caller waits only for tasks a worker has claimed and not finished: a worker
// that is not running claims none, and the caller does its share. Alternated over HTTP (tiny, one stream, 8 requests
// of 128 tokens): 1.66-1.73 ms a token against 1.72-1.89 on OpenMP; the engine alone and scout-mini level.
//
// Only calls with a few rows of activations take it (parallel_rows): a decode step of up to kClaimRows sequences runs
// every heavy op in herd's kernels, while larger batches also run oneDNN's OpenMP matmuls, whose threads and the
// pool's would then take turns on the cores (tiny at 64 sequences: 15% slower with every call on the pool).
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <functional>

namespace herd_kernels {

constexpr int64_t kClaimRows = 8;

// Runs task(i) for every i in [0, tasks) on the calling thread and up to at::get_num_threads() - 1 workers, each
// task once; returns when all are done. A call from a worker, from a second thread while one runs, or of a single
// task, runs inline. Tasks must not throw.
void parallel_claim(int64_t tasks, const std::function<void(int64_t)>& task);

// Idle workers stop polling for the next call and sleep now (the op herd_cpu::rest_pool): the caller knows that no
// call will come for a while, and another process wants the cores meanwhile.
void rest();

// ATen's parallel_for shape: fn(begin, end) over [begin, end) in tasks of `grain` (the last may be shorter).
template <typename Fn>
void parallel_ranges(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  grain = grain < 1 ? 1 : grain;
  const int64_t tasks = (n + grain - 1) / grain;
  parallel_claim(tasks, [&](int64_t t) {
    const int64_t b = begin + t * grain;
    fn(b, b + grain < end ? b + grain : end);
  });
}

// parallel_ranges for a call on `rows` rows of activations of at most kClaimRows, ATen's parallel_for for more.
template <typename Fn>
void parallel_rows(int64_t rows, int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  if (rows <= kClaimRows)
    parallel_ranges(begin, end, grain, fn);
  else
    at::parallel_for(begin, end, grain, fn);
}

}  // namespace herd_kernels
