// Checks, chunking and tier dispatch of the fused optimizer steps.
#include "optim.h"

#include <algorithm>

#include "../common/checks.h"
#include "../common/thread_pool.h"

namespace llmk {

namespace {

// Elements per work item: at least kMinItem (big enough to amortize), at most kMaxItem, and
// otherwise about a sixteenth of a thread's share, so that dynamic handout still balances
// the threads. Long items keep each thread on one stretch of memory per tensor: every switch
// restarts the hardware prefetchers' streams (bf16 SGD, 192 tensors of 262K values, two Zen 4
// threads: 0.185 ns a value with items of 32K values, 0.170 with whole tensors).
constexpr int64_t kMinItem = 1 << 15, kMaxItem = 1 << 20;

int64_t item_values(int64_t total, int threads, int64_t min_values) {
  const int64_t want = total / (int64_t(std::max(threads, 1)) * 16);
  int64_t values = min_values;
  while (values * 2 <= want && values * 2 <= kMaxItem) values *= 2;
  return values;
}
// A thread is woken only for at least this many bytes moved: waking and joining one costs
// ~40 us here, and one AdamW tensor steps as fast on 1 thread as on 2 up to ~3.5 MiB moved
// (128K float32 values: 71 vs 75 us; 256K: 138 vs 106 us; Zen 4, 2026-11-26). A group of
// small tensors (biases, norms) is stepped on the calling thread.
constexpr int64_t kBytesPerThread = 2 << 20;

void check_vec(const TensorView& t, const TensorView& like, const char* name, int64_t i) {
  LLMK_CHECK(t.ndim == 1, name << " of tensor " << i << " must be a 1-D view");
  LLMK_CHECK(t.sizes[0] == like.sizes[0], name << " of tensor " << i << " has "
                                              << t.sizes[0] << " elements, the parameter "
                                              << like.sizes[0]);
  LLMK_CHECK(t.sizes[0] <= 1 || t.strides[0] == 1, name << " of tensor " << i
                                                         << " must be contiguous");
  LLMK_CHECK(t.dtype == like.dtype, name << " of tensor " << i << " must have the parameter's dtype");
  LLMK_CHECK(t.data != nullptr || t.sizes[0] == 0, name << " of tensor " << i << " has no data");
}

void check_param(const TensorView& p, int64_t i) {
  LLMK_CHECK(p.ndim == 1, "parameter " << i << " must be a 1-D view");
  LLMK_CHECK(p.dtype == DType::f32 || p.dtype == DType::bf16 || p.dtype == DType::f16,
             "parameter " << i << " must be float32, bfloat16 or float16");
  LLMK_CHECK(p.sizes[0] <= 1 || p.strides[0] == 1, "parameter " << i << " must be contiguous");
  LLMK_CHECK(p.data != nullptr || p.sizes[0] == 0, "parameter " << i << " has no data");
}

// Bytes a step moves, about: accesses per value (reads and writes) times the parameter's size.
template <class T>
int64_t bytes_moved(const std::vector<T>& ts, int accesses) {
  int64_t bytes = 0;
  for (const auto& t : ts) bytes += t.param.sizes[0] * int64_t(dtype_bytes(t.param.dtype));
  return bytes * accesses;
}

struct Items {
  std::vector<int64_t> tensor, begin;  // one entry per item
  int64_t len = kMinItem;              // values per item (the last of a tensor: the rest)
};

template <class T>
Items chunk(const std::vector<T>& ts, int threads) {
  Items it;
  int64_t total = 0;
  for (const auto& t : ts) total += t.param.sizes[0];
  it.len = item_values(total, threads, kMinItem);
  for (size_t i = 0; i < ts.size(); ++i) {
    const int64_t n = ts[i].param.sizes[0];
    for (int64_t b = 0; b < n; b += it.len) {
      it.tensor.push_back(int64_t(i));
      it.begin.push_back(b);
    }
  }
  return it;
}

template <class Hyper, class Tensor>
struct Job {
  CpuTier tier;
  const Hyper* h;
  const std::vector<Tensor>* ts;
  Items items;
};

void adam_item(void* ctx, int64_t item, int) {
  auto& j = *static_cast<Job<AdamHyper, AdamTensor>*>(ctx);
  const AdamTensor& t = (*j.ts)[j.items.tensor[item]];
  const int64_t b = j.items.begin[item], e = std::min(t.param.sizes[0], b + j.items.len);
  switch (j.tier) {
    case CpuTier::amx:  // memory-bound: no tile products to make
    case CpuTier::avx512_bf16: return optim_avx512bf16::adam_range(*j.h, t, b, e);
    case CpuTier::avx512: return optim_avx512::adam_range(*j.h, t, b, e);
    case CpuTier::avx2: return optim_avx2::adam_range(*j.h, t, b, e);
    default: return optim_generic::adam_range(*j.h, t, b, e);
  }
}

void sgd_item(void* ctx, int64_t item, int) {
  auto& j = *static_cast<Job<SgdHyper, SgdTensor>*>(ctx);
  const SgdTensor& t = (*j.ts)[j.items.tensor[item]];
  const int64_t b = j.items.begin[item], e = std::min(t.param.sizes[0], b + j.items.len);
  switch (j.tier) {
    case CpuTier::amx:  // memory-bound: no tile products to make
    case CpuTier::avx512_bf16: return optim_avx512bf16::sgd_range(*j.h, t, b, e);
    case CpuTier::avx512: return optim_avx512::sgd_range(*j.h, t, b, e);
    case CpuTier::avx2: return optim_avx2::sgd_range(*j.h, t, b, e);
    default: return optim_generic::sgd_range(*j.h, t, b, e);
  }
}

struct Job8 {
  CpuTier tier;
  const AdamHyper* h;
  const std::vector<Adam8bitTensor>* ts;
  std::vector<int64_t> tensor, block;
  int64_t blocks_per_item;
};

void adam8bit_item(void* ctx, int64_t item, int) {
  auto& j = *static_cast<Job8*>(ctx);
  const Adam8bitTensor& t = (*j.ts)[j.tensor[item]];
  const int64_t nblocks = (t.param.sizes[0] + kBlock8 - 1) / kBlock8;
  const int64_t b0 = j.block[item], b1 = std::min(nblocks, b0 + j.blocks_per_item);
  switch (j.tier) {
    case CpuTier::amx:  // memory-bound: no tile products to make
    case CpuTier::avx512_bf16: return optim_avx512bf16::adam8bit_blocks(*j.h, t, b0, b1);
    case CpuTier::avx512: return optim_avx512::adam8bit_blocks(*j.h, t, b0, b1);
    case CpuTier::avx2: return optim_avx2::adam8bit_blocks(*j.h, t, b0, b1);
    default: return optim_generic::adam8bit_blocks(*j.h, t, b0, b1);
  }
}

void check_codes(const TensorView& t, DType dtype, int64_t n, const char* name, int64_t i) {
  LLMK_CHECK(t.ndim == 1 && t.sizes[0] == n && t.dtype == dtype &&
                 (n <= 1 || t.strides[0] == 1) && (t.data != nullptr || n == 0),
             name << " of tensor " << i << " must be a contiguous 1-D view of " << n << " "
                  << dtype_name(dtype) << " values");
}

}  // namespace

void adam8bit_step(CpuTier tier, const AdamHyper& h, const std::vector<Adam8bitTensor>& ts) {
  LLMK_CHECK(tier_supported(tier), "CPU tier " << tier_name(tier) << " is not supported here");
  LLMK_CHECK(h.num_threads >= 1, "num_threads must be >= 1");
  LLMK_CHECK(!h.amsgrad, "8-bit Adam has no amsgrad");
  int64_t total = 0;
  for (const auto& t : ts) total += t.param.sizes[0];
  // 64 blocks (16K values) at least: the 8-bit update computes more per byte
  Job8 job{tier, &h, &ts, {}, {}, item_values(total, h.num_threads, 64 * kBlock8) / kBlock8};
  for (size_t i = 0; i < ts.size(); ++i) {
    const int64_t n = ts[i].param.sizes[0], nb = (n + kBlock8 - 1) / kBlock8;
    check_param(ts[i].param, int64_t(i));
    check_vec(ts[i].grad, ts[i].param, "grad", int64_t(i));
    check_codes(ts[i].m_codes, DType::i8, n, "exp_avg codes", int64_t(i));
    check_codes(ts[i].v_codes, DType::u8, n, "exp_avg_sq codes", int64_t(i));
    check_codes(ts[i].m_scales, DType::f32, nb, "exp_avg scales", int64_t(i));
    check_codes(ts[i].v_scales, DType::f32, nb, "exp_avg_sq scales", int64_t(i));
    for (int64_t b = 0; b < nb; b += job.blocks_per_item) {
      job.tensor.push_back(int64_t(i));
      job.block.push_back(b);
    }
  }
  const int64_t n = int64_t(job.tensor.size());
  // parameter read and written, gradient read; two 1-byte codes read and written
  const int threads = threads_for(bytes_moved(ts, 3) + 4 * total,
                                  int(std::min<int64_t>(h.num_threads, n)), kBytesPerThread);
  if (n) parallel_for(n, threads, adam8bit_item, &job);
}

void adam_step(CpuTier tier, const AdamHyper& h, const std::vector<AdamTensor>& ts) {
  LLMK_CHECK(tier_supported(tier), "CPU tier " << tier_name(tier) << " is not supported here");
  LLMK_CHECK(h.num_threads >= 1, "num_threads must be >= 1");
  for (size_t i = 0; i < ts.size(); ++i) {
    check_param(ts[i].param, int64_t(i));
    check_vec(ts[i].grad, ts[i].param, "grad", int64_t(i));
    // Moments in the parameter's dtype, or float32 for 16-bit parameters (all alike).
    const DType sd = ts[i].exp_avg.dtype == DType::f32 ? DType::f32 : ts[i].param.dtype;
    TensorView like = ts[i].param;
    like.dtype = sd;
    check_vec(ts[i].exp_avg, like, "exp_avg", int64_t(i));
    check_vec(ts[i].exp_avg_sq, like, "exp_avg_sq", int64_t(i));
    if (h.amsgrad) check_vec(ts[i].max_exp_avg_sq, like, "max_exp_avg_sq", int64_t(i));
  }
  Job<AdamHyper, AdamTensor> job{tier, &h, &ts, chunk(ts, h.num_threads)};
  const int64_t n = int64_t(job.items.tensor.size());
  if (n) parallel_for(n, threads_for(bytes_moved(ts, 7), int(std::min<int64_t>(h.num_threads, n)),
                                     kBytesPerThread), adam_item, &job);
}

void sgd_step(CpuTier tier, const SgdHyper& h, const std::vector<SgdTensor>& ts) {
  LLMK_CHECK(tier_supported(tier), "CPU tier " << tier_name(tier) << " is not supported here");
  LLMK_CHECK(h.num_threads >= 1, "num_threads must be >= 1");
  for (size_t i = 0; i < ts.size(); ++i) {
    check_param(ts[i].param, int64_t(i));
    check_vec(ts[i].grad, ts[i].param, "grad", int64_t(i));
    if (h.momentum != 0.f) check_vec(ts[i].momentum_buffer, ts[i].param, "momentum_buffer", int64_t(i));
  }
  Job<SgdHyper, SgdTensor> job{tier, &h, &ts, chunk(ts, h.num_threads)};
  const int64_t n = int64_t(job.items.tensor.size());
  if (n) parallel_for(n, threads_for(bytes_moved(ts, 5), int(std::min<int64_t>(h.num_threads, n)),
                                     kBytesPerThread), sgd_item, &job);
}

}  // namespace llmk
