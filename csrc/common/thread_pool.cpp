#include "thread_pool.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace llmk {

namespace {

class Pool {
 public:
  void run(int64_t n, int nthreads, ItemFn fn, void* ctx) {
    std::lock_guard<std::mutex> one_call(call_mu_);
    while (int(workers_.size()) < nthreads - 1) {
      const int index = int(workers_.size()) + 1;
      workers_.emplace_back([this, index] { worker_loop(index); });
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = fn; ctx_ = ctx; n_ = n;
      next_.store(0);
      participants_ = nthreads - 1;
      pending_ = participants_;
      error_ = nullptr;
      ++generation_;
    }
    work_cv_.notify_all();
    run_items(0);
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return pending_ == 0; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void run_items(int index) {
    for (;;) {
      const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_) return;
      try {
        fn_(ctx_, i, index);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!error_) error_ = std::current_exception();
        next_.store(n_);  // stop handing out items
        return;
      }
    }
  }

  void worker_loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> lk(mu_);
      work_cv_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (index > participants_) continue;
      lk.unlock();
      run_items(index);
      lk.lock();
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex call_mu_, mu_;
  std::condition_variable work_cv_, done_cv_;
  std::vector<std::thread> workers_;
  uint64_t generation_ = 0;
  ItemFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  int participants_ = 0, pending_ = 0;
  std::exception_ptr error_;
};

// Never destroyed: joining at interpreter exit could hang, and a forked child (DataLoader
// workers) inherits none of the threads, so it starts a fresh pool and leaks the old one.
std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork_once;

Pool& pool() {
  std::call_once(g_atfork_once, [] {
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); });
  });
  Pool* p = g_pool.load();
  if (p) return *p;
  Pool* fresh = new Pool();
  if (g_pool.compare_exchange_strong(p, fresh)) return *fresh;
  delete fresh;  // another thread won the race; no workers started yet
  return *p;
}

}  // namespace

void parallel_for(int64_t n_items, int nthreads, ItemFn fn, void* ctx) {
  if (n_items <= 0) return;
  if (nthreads > kMaxThreads) nthreads = kMaxThreads;
  if (nthreads > n_items) nthreads = int(n_items);
  if (nthreads <= 1) {
    for (int64_t i = 0; i < n_items; ++i) fn(ctx, i, 0);
    return;
  }
  pool().run(n_items, nthreads, fn, ctx);
}

}  // namespace llmk
