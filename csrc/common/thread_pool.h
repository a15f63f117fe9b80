// A small persistent thread pool. We do not link a second OpenMP runtime next to torch's:
// two pools would fight over the same cores. Python passes torch.get_num_threads().
#pragma once
#include <cstdint>

namespace llmk {

// fn(ctx, item, thread_index) for every item in [0, n_items), items handed out one at a
// time (dynamic scheduling: causal tiles differ in cost). thread_index < nthreads, so the
// caller can give each thread its own scratch. The first exception thrown is rethrown.
using ItemFn = void (*)(void* ctx, int64_t item, int thread_index);
void parallel_for(int64_t n_items, int nthreads, ItemFn fn, void* ctx);

// Largest number of threads parallel_for accepts.
constexpr int kMaxThreads = 1024;

// How many of max_threads a call with this much work should wake: each one after the first
// costs a wake-up and a join (~40 us on a 2-core VM, 2026-11-26), about the time one thread
// takes for work_per_thread, so small calls (a decoding step's small matrices) run on the
// calling thread alone.
inline int threads_for(int64_t work, int max_threads, int64_t work_per_thread) {
  const int64_t useful = work_per_thread > 0 ? work / work_per_thread : max_threads;
  return int(useful < 1 ? 1 : (useful < max_threads ? useful : max_threads));
}

}  // namespace llmk
