#include "thread_pool.h"

#include <dlfcn.h>
#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
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

struct OpenMp;  // below: the OpenMP runtime's entry points
std::atomic<const OpenMp*> g_openmp{nullptr};

// A forked child (DataLoader workers) starts a fresh pool of ours, and does not use the
// parent's OpenMP runtime: libgomp is not fork-safe once the parent ran parallel regions
// from several threads (torch's own ops were seen hanging in such children).
void reset_after_fork() {
  std::call_once(g_atfork_once, [] {
    pthread_atfork(nullptr, nullptr, [] {
      g_pool.store(nullptr);
      g_openmp.store(nullptr);
    });
  });
}

Pool& pool() {
  reset_after_fork();
  Pool* p = g_pool.load();
  if (p) return *p;
  Pool* fresh = new Pool();
  if (g_pool.compare_exchange_strong(p, fresh)) return *fresh;
  delete fresh;  // another thread won the race; no workers started yet
  return *p;
}

// The OpenMP runtime's entry points (libgomp's ABI), or null: our pool serves.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpThreadNum = int (*)();
struct OpenMp {
  GompParallel parallel;
  OmpThreadNum thread_num;
  std::string name;  // "openmp:<path>"
};
// One parallel_for on the OpenMP team: the same dynamic hand-out of items as the pool's.
struct OmpJob {
  ItemFn fn;
  void* ctx;
  int64_t n;
  OmpThreadNum thread_num;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::exception_ptr error;
};

void omp_body(void* data) {
  auto& j = *static_cast<OmpJob*>(data);
  const int index = j.thread_num();
  for (;;) {
    const int64_t i = j.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= j.n) return;
    try {
      j.fn(j.ctx, i, index);
    } catch (...) {  // exceptions must not leave an OpenMP region
      std::lock_guard<std::mutex> lk(j.mu);
      if (!j.error) j.error = std::current_exception();
      j.next.store(j.n);
      return;
    }
  }
}

}  // namespace

bool use_openmp_runtime(const char* path) {
  if (path == nullptr || *path == 0) {
    g_openmp.store(nullptr);
    return false;
  }
  // RTLD_NOLOAD: only a runtime the process has already loaded (torch's), never a new one.
  void* lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
  if (lib == nullptr) return false;
  auto parallel = reinterpret_cast<GompParallel>(dlsym(lib, "GOMP_parallel"));
  auto thread_num = reinterpret_cast<OmpThreadNum>(dlsym(lib, "omp_get_thread_num"));
  if (parallel == nullptr || thread_num == nullptr) {
    dlclose(lib);
    return false;
  }
  // Kept for the life of the process (as is the handle: the library stays loaded anyway).
  reset_after_fork();
  g_openmp.store(new OpenMp{parallel, thread_num, std::string("openmp:") + path});
  return true;
}

std::vector<int64_t> parallel_for_selftest(int64_t n, int nthreads, int64_t throw_at) {
  struct Ctx {
    std::vector<std::atomic<int64_t>> runs;
    std::vector<std::atomic<int>> thread;
    int64_t throw_at;
  } ctx{std::vector<std::atomic<int64_t>>(size_t(n)), std::vector<std::atomic<int>>(size_t(n)),
        throw_at};
  parallel_for(n, nthreads, [](void* c, int64_t i, int t) {
    auto& x = *static_cast<Ctx*>(c);
    if (i == x.throw_at) throw std::runtime_error("parallel_for_selftest: item " + std::to_string(i));
    x.runs[size_t(i)].fetch_add(1);
    x.thread[size_t(i)].store(t);
  }, &ctx);
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[size_t(i)] = ctx.runs[size_t(i)].load() * 1024 + ctx.thread[size_t(i)].load();
  return out;
}

bool threads_wake_fast() { return g_openmp.load() != nullptr; }

const char* threading_runtime() {
  const OpenMp* omp = g_openmp.load();
  return omp ? omp->name.c_str() : "pool";
}

void parallel_for(int64_t n_items, int nthreads, ItemFn fn, void* ctx) {
  if (n_items <= 0) return;
  if (nthreads > kMaxThreads) nthreads = kMaxThreads;
  if (nthreads > n_items) nthreads = int(n_items);
  if (nthreads <= 1) {
    for (int64_t i = 0; i < n_items; ++i) fn(ctx, i, 0);
    return;
  }
  if (const OpenMp* omp = g_openmp.load()) {
    // The team may be smaller than asked (e.g. inside another OpenMP region): thread indices
    // stay below nthreads either way.
    OmpJob job{fn, ctx, n_items, omp->thread_num};
    omp->parallel(omp_body, &job, unsigned(nthreads), 0);
    if (job.error) std::rethrow_exception(job.error);
    return;
  }
  pool().run(n_items, nthreads, fn, ctx);
}

}  // namespace llmk
