// Parallel loops: on torch's own OpenMP threads when Python hands us the runtime torch loaded
// (use_openmp_runtime), else on a small persistent pool of our own. We do not link a second
// OpenMP runtime next to torch's: two pools would fight over the same cores. Even without
// one, ours did: after each parallel torch op, libgomp's threads spin for a few ms waiting
// for the next one, and a kernel of ours started then (an optimizer step right after the
// backward) shared a core with a spinner: AdamW's step in a training loop took 6.3-6.5 ms
// on our pool, 5.4-5.9 ms on torch's threads (torch's fused step: 5.5-5.9 ms; 8.4M
// parameters, Zen 4, 2 cores, 2026-11-27).
// Python passes torch.get_num_threads().
#pragma once
#include <cstdint>
#include <vector>

namespace llmk {

// fn(ctx, item, thread_index) for every item in [0, n_items), items handed out one at a
// time (dynamic scheduling: causal tiles differ in cost). thread_index < nthreads, so the
// caller can give each thread its own scratch. The first exception thrown is rethrown.
using ItemFn = void (*)(void* ctx, int64_t item, int thread_index);
void parallel_for(int64_t n_items, int nthreads, ItemFn fn, void* ctx);

// Run parallel loops on the OpenMP runtime already loaded from `path` (never loads one: its
// GOMP_parallel and omp_get_thread_num entry points, libgomp's ABI, which Intel's and LLVM's
// runtimes also export); an empty path, or one not loaded, goes back to our pool. Returns
// whether the runtime is in use.
bool use_openmp_runtime(const char* path);
// "openmp:<path>" or "pool": what parallel_for runs on.
const char* threading_runtime();

// For tests: parallel_for over n items on nthreads; returns each item's run count * 1024 +
// the thread index that ran it; item throw_at (if in range) throws std::runtime_error.
std::vector<int64_t> parallel_for_selftest(int64_t n, int nthreads, int64_t throw_at);

// Largest number of threads parallel_for accepts.
constexpr int kMaxThreads = 1024;

// How many of max_threads a call with this much work should wake: each one after the first
// costs a wake-up and a join (on our pool ~40 us on a 2-core VM, 2026-11-26), about the time
// one thread takes for work_per_thread, so small calls run on the calling thread alone.
inline int threads_for(int64_t work, int max_threads, int64_t work_per_thread) {
  const int64_t useful = work_per_thread > 0 ? work / work_per_thread : max_threads;
  return int(useful < 1 ? 1 : (useful < max_threads ? useful : max_threads));
}

// Whether parallel_for runs on torch's OpenMP threads (use_openmp_runtime): they spin a while
// after each parallel region, so a call in a loop of calls (a decoding step's layers) wakes
// and joins them in ~1-2 us instead of our pool's ~40 us.
bool threads_wake_fast();

// Weight bytes (times rows) per thread for the quantized matmuls: about what one thread
// streams while another wakes and joins. On our pool 512 KiB (int4 / int8 GEMVs of 0.1-0.9 MB:
// 1 thread 9-51 us, 2 threads 39-48 us; Zen 4 VM, 2026-11-26). On torch's OpenMP threads
// 32 KiB: in a loop of calls a second thread saved time from 64 KiB up (256 x 256 int8:
// 4.7 -> 4.4 us; 768 x 256, 192 KiB: 8.3 -> 6.3 us), and the GEMVs of a 768-wide model
// (0.1-1.6 MB) took 12-38% less time from memory (Zen 3, 2026-11-29).
inline int64_t quant_bytes_per_thread() {
  return threads_wake_fast() ? int64_t(32) << 10 : int64_t(512) << 10;
}

}  // namespace llmk
