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

}  // namespace llmk
