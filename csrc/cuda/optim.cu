// CUDA fused optimizer steps: Adam / AdamW, SGD and 8-bit AdamW over lists of tensors (see
// optim.h). Each element's arithmetic is csrc/cpu/optim_impl.h's in the same order: this file
// is compiled with -fmad=false (no multiply-add is fused unless fmaf says so), and '/' and
// sqrtf are the IEEE-rounded ones (nvcc's defaults without --use_fast_math).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "common/checks.h"
#include "cuda/optim.h"

namespace llmk {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 2048;  // a block's step: 8 values per thread; 8 blocks of 8-bit state
constexpr int kPer = int(kChunk) / kThreads;
// A block takes up to kSpan consecutive chunks of one tensor, one after the other: with one
// chunk a block, a launch (kMaxBlocks blocks, all its tables fit in) covered 0.33M values, and
// a 200M-parameter step took ~600 launches (4x the time of the same step in Triton, H200,
// 2026-11-27). With 16, a launch covers up to 10.5M values.
constexpr int kSpan = 16;
constexpr int kMaxTensors = 24;   // per launch: the tables below stay under 4 KiB
constexpr int kMaxBlocks = 320;
static_assert(kChunk == 8 * kBlock8 && kThreads == 8 * 32, "8-bit: one warp per state block");

// ------------------------------------------------------------------ launch plan (host)

// Which tensors each launch holds (slot order) and which (slot, first chunk) each of its blocks
// takes: chunks first .. first + kSpan - 1, those inside the tensor.
struct Plan {
  std::vector<std::vector<int>> tensors;
  std::vector<std::vector<std::pair<int, int64_t>>> blocks;
};

Plan plan_launches(const std::vector<int64_t>& numels) {
  Plan plan;
  std::vector<int> ts;
  std::vector<std::pair<int, int64_t>> bs;
  auto flush = [&]() {
    if (!bs.empty()) {
      plan.tensors.push_back(ts);
      plan.blocks.push_back(bs);
    }
    ts.clear();
    bs.clear();
  };
  for (int i = 0; i < int(numels.size()); ++i) {
    const int64_t chunks = (numels[i] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; c += kSpan) {
      if (ts.empty() || ts.back() != i) {  // a new tensor, or one carried into a new launch
        if (int(ts.size()) == kMaxTensors) flush();
        ts.push_back(i);
      }
      bs.emplace_back(int(ts.size()) - 1, c);
      if (int(bs.size()) == kMaxBlocks) flush();
    }
  }
  flush();
  return plan;
}

// Kernel parameters: K pointers per tensor, its length, two floats (Adam: step_size and
// bias_correction2_sqrt), its row in a device table of floats (capturable steps), a flag (SGD:
// first step), and each block's tensor slot and first chunk.
template <int K>
struct Tables {
  void* ptr[K][kMaxTensors];
  int64_t numel[kMaxTensors];
  float f0[kMaxTensors];
  float f1[kMaxTensors];
  int32_t row[kMaxTensors];
  uint8_t flag[kMaxTensors];
  uint8_t slot[kMaxBlocks];
  int32_t chunk[kMaxBlocks];
};
static_assert(sizeof(Tables<6>) < 4096, "kernel parameters must stay under 4 KiB");

// ------------------------------------------------------------------ element access

template <class T> __device__ __forceinline__ float ld(const T* p, int64_t i);
template <> __device__ __forceinline__ float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float ld<__half>(const __half* p, int64_t i) {
  return __half2float(p[i]);
}
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <class T> __device__ __forceinline__ void st(T* p, int64_t i, float v);
template <> __device__ __forceinline__ void st<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> __device__ __forceinline__ void st<__half>(__half* p, int64_t i, float v) {
  p[i] = __float2half_rn(v);
}
template <> __device__ __forceinline__ void st<__nv_bfloat16>(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

// ------------------------------------------------------------------ kernels

// The chunks of a block's span that lie inside its tensor of n values: f(begin, end) for each,
// in order. Host code too: optim_cuda_host_selftest runs it over the launch plan.
#pragma nv_exec_check_disable
template <class F>
__host__ __device__ __forceinline__ void for_each_chunk(int first_chunk, int64_t n, F f) {
  for (int64_t c = first_chunk; c < int64_t(first_chunk) + kSpan; ++c) {
    const int64_t begin = c * kChunk;
    if (begin >= n) break;
    f(begin, begin + kChunk < n ? begin + kChunk : n);
  }
}

// In the kernels below each thread first loads all of its kPer values of a chunk, then computes
// and stores: loads interleaved with stores could not move past them (the pointers may alias as
// far as the compiler knows), one memory round trip per value.

struct AdamArgs {
  float wd, b2, eps, one_m_b1, one_m_b2, decay, sign, inv_scale;
  const float* table;  // capturable steps: per-step floats by row (optim.h), else null
};

// T: the parameter's (and gradient's) type; S: the moments' (T, or float for 16-bit T).
template <class T, class S, bool kDecoupled, bool kAmsgrad>
__global__ void __launch_bounds__(kThreads) adam_kernel(Tables<5> tb, AdamArgs a) {
  const int s = tb.slot[blockIdx.x];
  T* p = static_cast<T*>(tb.ptr[0][s]);
  const T* g = static_cast<const T*>(tb.ptr[1][s]);
  S* m = static_cast<S*>(tb.ptr[2][s]);
  S* v = static_cast<S*>(tb.ptr[3][s]);
  S* vmax = static_cast<S*>(tb.ptr[4][s]);
  float step_size = tb.f0[s], bc2 = tb.f1[s], decay = a.decay, inv_scale = a.inv_scale;
  if (a.table != nullptr) {
    const float* r = a.table + int64_t(tb.row[s]) * kAdamFloats;
    if (r[5] != 0.f) return;  // skipped step (inf/NaN gradients): the whole block
    step_size = r[0];
    bc2 = r[1];
    decay = r[3];
    inv_scale = r[4];
  }
  for_each_chunk(tb.chunk[blockIdx.x], tb.numel[s], [&](int64_t begin, int64_t end) {
    float pr[kPer], gr[kPer], mr[kPer], vr[kPer], xr[kPer];
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int64_t i = begin + threadIdx.x + r * kThreads;
      pr[r] = gr[r] = mr[r] = vr[r] = xr[r] = 0.f;
      if (i >= end) continue;
      pr[r] = ld(p, i);
      gr[r] = ld(g, i);
      mr[r] = ld(m, i);
      vr[r] = ld(v, i);
      if (kAmsgrad) xr[r] = ld(vmax, i);
    }
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int64_t i = begin + threadIdx.x + r * kThreads;
      if (i >= end) continue;
      float pi = pr[r];
      float gi = gr[r] * inv_scale * a.sign;
      if (kDecoupled) pi *= decay;
      else if (a.wd != 0.f) gi = fmaf(pi, a.wd, gi);  // grad.add(param, alpha=wd), as torch
      const float mi = fmaf(a.one_m_b1, gi - mr[r], mr[r]);  // torch's lerp
      float vi = vr[r] * a.b2;
      vi = vi + (a.one_m_b2 * gi) * gi;  // addcmul
      float vd = vi;
      if (kAmsgrad) {
        vd = xr[r] < vi ? vi : xr[r];  // std::max(old, vi)
        st(vmax, i, vd);
      }
      const float denom = sqrtf(vd) / bc2 + a.eps;
      st(p, i, pi + (-step_size) * (mi / denom));  // addcdiv
      st(m, i, mi);
      st(v, i, vi);
    }
  });
}

struct SgdArgs {
  float lr, wd, mom, damp, sign, inv_scale;
};

template <class T, bool kMomentum, bool kNesterov>
__global__ void __launch_bounds__(kThreads) sgd_kernel(Tables<3> tb, SgdArgs a) {
  const int s = tb.slot[blockIdx.x];
  T* p = static_cast<T*>(tb.ptr[0][s]);
  const T* g = static_cast<const T*>(tb.ptr[1][s]);
  T* buf = static_cast<T*>(tb.ptr[2][s]);
  const bool first = tb.flag[s] != 0;
  for_each_chunk(tb.chunk[blockIdx.x], tb.numel[s], [&](int64_t begin, int64_t end) {
    float pr[kPer], gr[kPer], br[kPer];
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int64_t i = begin + threadIdx.x + r * kThreads;
      pr[r] = gr[r] = br[r] = 0.f;
      if (i >= end) continue;
      pr[r] = ld(p, i);
      gr[r] = ld(g, i);
      if (kMomentum && !first) br[r] = ld(buf, i);
    }
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int64_t i = begin + threadIdx.x + r * kThreads;
      if (i >= end) continue;
      float d = gr[r] * a.inv_scale * a.sign;
      if (a.wd != 0.f) d = fmaf(pr[r], a.wd, d);  // grad.add(param, alpha=wd), as torch
      if (kMomentum) {
        const float bi = first ? d : fmaf(d, a.damp, br[r] * a.mom);
        st(buf, i, bi);
        d = kNesterov ? fmaf(bi, a.mom, d) : bi;
      }
      st(p, i, fmaf(d, -a.lr, pr[r]));  // param.add_(grad, alpha=-lr)
    }
  });
}

struct Adam8Args {
  float b2, eps, one_m_b1, one_m_b2, decay, signed_inv_scale;  // inv_scale, negated to maximize
  const float* table;  // capturable steps: per-step floats by row (optim.h), else null
};

// optim_impl.h's sqrt_code: the integer nearest sqrt(y), halves up, exactly (floor of any
// estimate within 1/2, then one exact comparison with the squared half-way point).
__device__ __forceinline__ int sqrt_code(float y, int max_code) {
  if (!(y >= 0.25f)) return 0;
  const float f = floorf(__fsqrt_rn(y)), t = __fadd_rn(f, 0.5f);
  return min(int(f) + (y >= __fmul_rn(t, t) ? 1 : 0), max_code);
}

// optim_impl.h's rounded_sqrt_code: int(sqrt(y) + 1/2) of the correctly rounded square root.
__device__ __forceinline__ int rounded_sqrt_code(float y) {
  if (!(y >= 0.f && y < 65536.f)) return 0;
  return min(int(__fadd_rn(__fsqrt_rn(y), 0.5f)), 255);
}

// AdamW (decoupled weight decay) with 8-bit moments: each warp owns one block of kBlock8
// values (8 per lane, strided by 32: coalesced), its absmax reduced with warp shuffles.
template <class T>
__global__ void __launch_bounds__(kThreads) adam8bit_kernel(Tables<6> tb, Adam8Args a) {
  constexpr int kLane = int(kBlock8) / 32;  // values per lane
  const int s = tb.slot[blockIdx.x];
  const int lane = threadIdx.x % 32;
  T* p = static_cast<T*>(tb.ptr[0][s]);
  const T* g = static_cast<const T*>(tb.ptr[1][s]);
  int8_t* mq = static_cast<int8_t*>(tb.ptr[2][s]);
  uint8_t* vq = static_cast<uint8_t*>(tb.ptr[3][s]);
  float* ms = static_cast<float*>(tb.ptr[4][s]);
  float* vs = static_cast<float*>(tb.ptr[5][s]);
  float step_size = tb.f0[s], bc2 = tb.f1[s], decay = a.decay, sis = a.signed_inv_scale;
  if (a.table != nullptr) {
    const float* r = a.table + int64_t(tb.row[s]) * kAdam8Floats;
    if (r[4] != 0.f) return;  // skipped step: every warp of the block
    step_size = r[0];
    bc2 = r[1];
    decay = r[2];
    sis = r[3];
  }
  const float inv_bc2 = 1.f / bc2;
  for_each_chunk(tb.chunk[blockIdx.x], tb.numel[s], [&](int64_t begin, int64_t end) {
    const int64_t base = begin + int64_t(threadIdx.x / 32) * kBlock8;
    if (base >= end) return;  // the whole warp: its block is past the tensor's end
    const int64_t blk = base / kBlock8;
    const int64_t len = min(kBlock8, end - base);
    float c[kLane], u[kLane], pr[kLane], gr[kLane];
    const float m_scale = ms[blk], v_scale = vs[blk];
#pragma unroll
    for (int r = 0; r < kLane; ++r) {
      const int64_t k = lane + 32 * r, i = base + k;
      c[r] = u[r] = pr[r] = gr[r] = 0.f;
      if (k >= len) continue;
      c[r] = float(mq[i]);
      u[r] = float(vq[i]);
      pr[r] = ld(p, i);
      gr[r] = ld(g, i);
    }
    // m = c|c| * scale / 127^2, v = (u^2)^2 * scale / 255^4, as optim_impl.h decodes them
    const float m_unit = m_scale * (1.f / 16129.f);
    const float v_unit_b2 = ((v_scale * (1.f / 65025.f)) * (1.f / 65025.f)) * a.b2;  // beta2 v
    float m[kLane], root_v[kLane];
    // Block maxima of |m| and v on their bit patterns, as the CPU kernel takes them: a NaN
    // (above every finite pattern) makes the block's scale NaN there, which fmaxf would drop.
    uint32_t m_bits = 0, v_bits = 0;
#pragma unroll
    for (int r = 0; r < kLane; ++r) {
      const int64_t k = lane + 32 * r;
      m[r] = 0.f;
      root_v[r] = 0.f;
      if (k >= len) continue;
      float mi = (c[r] * fabsf(c[r])) * m_unit, vi = ((u[r] * u[r]) * (u[r] * u[r])) * v_unit_b2;
      const float pi = pr[r] * decay;
      const float gi = gr[r] * sis;
      mi = fmaf(a.one_m_b1, gi - mi, mi);
      vi = vi + (a.one_m_b2 * gi) * gi;
      const float rv = sqrtf(vi);
      st(p, base + k, pi + (-step_size) * (mi / (rv * inv_bc2 + a.eps)));
      m[r] = mi;
      root_v[r] = rv;
      m_bits = max(m_bits, __float_as_uint(mi) & 0x7fffffffu);
      v_bits = max(v_bits, __float_as_uint(vi) & 0x7fffffffu);
    }
    for (int o = 16; o > 0; o >>= 1) {
      m_bits = max(m_bits, __shfl_xor_sync(0xffffffffu, m_bits, o));
      v_bits = max(v_bits, __shfl_xor_sync(0xffffffffu, v_bits, o));
    }
    const float m_max = __uint_as_float(m_bits), v_max = __uint_as_float(v_bits);
    // optim_impl.h's kTinyMax / kTinyPre: no overflow of m_k for tiny blocks
    const float m_pre = m_max < 0x1p-64f ? 0x1p64f : 1.f;
    const float m_k = m_max > 0.f ? (1.f / (m_max * m_pre)) * 16129.f : 0.f;
    const float v_k = v_max > 0.f ? (1.f / sqrtf(v_max)) * 65025.f : 0.f;
#pragma unroll
    for (int r = 0; r < kLane; ++r) {
      const int64_t k = lane + 32 * r;
      if (k >= len) continue;
      const int code = sqrt_code((fabsf(m[r]) * m_pre) * m_k, 127);
      mq[base + k] = int8_t(m[r] < 0.f ? -code : code);
      vq[base + k] = uint8_t(rounded_sqrt_code(root_v[r] * v_k));
    }
    if (lane == 0) {
      ms[blk] = m_max;
      vs[blk] = v_max;
    }
  });
}

// ------------------------------------------------------------------ host side

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  LLMK_CHECK(e == cudaSuccess, std::string(what) + ": " + cudaGetErrorString(e));
}

void check_flat(const TensorView& t, DType dtype, int64_t n, const char* name) {
  LLMK_CHECK((t.data != nullptr || n == 0) && t.dtype == dtype && t.numel() == n &&
                 (t.ndim <= 1 || t.numel() <= 1) && (t.ndim == 0 || t.strides[0] == 1),
             std::string(name) + ": expected a contiguous 1-D " + dtype_name(dtype) +
                 " tensor of " + std::to_string(n) + " elements");
}

// Runs launch(tables, blocks) for each launch of the plan over the tensors' lengths; fill(tables,
// slot, tensor index) writes one tensor's pointers and floats into the tables.
template <int K, class Fill, class Launch>
void for_each_launch(const std::vector<int64_t>& numels, Fill fill, Launch launch) {
  const Plan plan = plan_launches(numels);
  for (size_t l = 0; l < plan.blocks.size(); ++l) {
    Tables<K> tb{};
    for (int slot = 0; slot < int(plan.tensors[l].size()); ++slot) {
      const int i = plan.tensors[l][slot];
      tb.numel[slot] = numels[i];
      fill(tb, slot, i);
    }
    for (int b = 0; b < int(plan.blocks[l].size()); ++b) {
      tb.slot[b] = uint8_t(plan.blocks[l][b].first);
      tb.chunk[b] = int32_t(plan.blocks[l][b].second);
    }
    launch(tb, int(plan.blocks[l].size()));
  }
}

template <class F>
void by_dtype(DType t, F f) {
  switch (t) {
    case DType::f32: f(float{}); break;
    case DType::f16: f(__half{}); break;
    case DType::bf16: f(__nv_bfloat16{}); break;
    default: LLMK_CHECK(false, "optimizer step: parameters must be float32, float16 or bfloat16");
  }
}

// Calls f(dtype tag, indices) for each parameter dtype present, with the tensors of that dtype
// (one kernel instantiation per dtype: a param group may mix them).
template <class Tensor, class F>
void by_dtype_groups(const std::vector<Tensor>& ts, F f) {
  for (const Tensor& t : ts)  // before any launch: a refused call changes nothing
    LLMK_CHECK(t.param.dtype == DType::f32 || t.param.dtype == DType::f16 ||
                   t.param.dtype == DType::bf16,
               "optimizer step: parameters must be float32, float16 or bfloat16");
  for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
    std::vector<int> idx;
    for (int i = 0; i < int(ts.size()); ++i)
      if (ts[i].param.dtype == dt) idx.push_back(i);
    if (!idx.empty()) by_dtype(dt, [&](auto tag) { f(tag, idx); });
  }
}

constexpr int64_t kMaxChunks = int64_t(INT32_MAX);

// The Adam launches of the tensors idx, parameters of type T and moments of type S.
template <class T, class S>
void launch_adam(const AdamHyper& h, const AdamArgs& a, cudaStream_t st,
                 const std::vector<AdamTensor>& ts, const std::vector<int>& idx,
                 const std::vector<int32_t>& rows) {
  auto kernel = h.decoupled
                    ? (h.amsgrad ? adam_kernel<T, S, true, true> : adam_kernel<T, S, true, false>)
                    : (h.amsgrad ? adam_kernel<T, S, false, true> : adam_kernel<T, S, false, false>);
  std::vector<int64_t> numels;
  for (int i : idx) numels.push_back(ts[i].param.numel());
  for_each_launch<5>(
      numels,
      [&](Tables<5>& tb, int slot, int j) {
        const AdamTensor& t = ts[idx[j]];
        tb.ptr[0][slot] = t.param.data;
        tb.ptr[1][slot] = t.grad.data;
        tb.ptr[2][slot] = t.exp_avg.data;
        tb.ptr[3][slot] = t.exp_avg_sq.data;
        tb.ptr[4][slot] = h.amsgrad ? t.max_exp_avg_sq.data : nullptr;
        tb.f0[slot] = t.step_size;
        tb.f1[slot] = t.bias_correction2_sqrt;
        tb.row[slot] = rows.empty() ? idx[j] : rows[idx[j]];
      },
      [&](const Tables<5>& tb, int blocks) {
        kernel<<<blocks, kThreads, 0, st>>>(tb, a);
        check_launch("adam_step_cuda");
      });
}

bool float_moments_of_16bit(const AdamTensor& t) {
  return t.param.dtype != DType::f32 && t.exp_avg.dtype == DType::f32;
}

void check_rows(const std::vector<int32_t>& rows, size_t n, const float* table, const char* what) {
  LLMK_CHECK(rows.empty() || rows.size() == n,
             std::string(what) + ": rows must be empty or give one row per tensor");
  for (int32_t r : rows) LLMK_CHECK(r >= 0, std::string(what) + ": rows must be >= 0");
  LLMK_CHECK(table != nullptr || rows.empty(), std::string(what) + ": rows without a table");
}

}  // namespace

void adam_step_cuda(const AdamHyper& h, const std::vector<AdamTensor>& ts, uintptr_t stream,
                    const float* device_floats, const std::vector<int32_t>& rows) {
  LLMK_CHECK(!h.stochastic_rounding, "adam_step_cuda: stochastic rounding is not supported");
  check_rows(rows, ts.size(), device_floats, "adam_step_cuda");
  for (const AdamTensor& t : ts) {
    const int64_t n = t.param.numel();
    LLMK_CHECK(n / kChunk < kMaxChunks, "adam_step_cuda: tensor too large");
    check_flat(t.param, t.param.dtype, n, "param");
    check_flat(t.grad, t.param.dtype, n, "grad");
    // Moments in the parameter's dtype, or float32 for 16-bit parameters (all alike), as the
    // C++ kernel takes them (AdamW8bit's small tensors).
    const DType sd = t.exp_avg.dtype == DType::f32 ? DType::f32 : t.param.dtype;
    check_flat(t.exp_avg, sd, n, "exp_avg");
    check_flat(t.exp_avg_sq, sd, n, "exp_avg_sq");
    if (h.amsgrad) check_flat(t.max_exp_avg_sq, sd, n, "max_exp_avg_sq");
  }
  const AdamArgs a{h.weight_decay, h.beta2, h.eps, h.one_minus_beta1, h.one_minus_beta2,
                   h.decay, h.maximize ? -1.f : 1.f, h.inv_grad_scale, device_floats};
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  by_dtype_groups(ts, [&](auto tag, const std::vector<int>& idx) {
    using T = decltype(tag);
    std::vector<int> same, f32;  // moments in T / in float (16-bit T only)
    for (int i : idx) (float_moments_of_16bit(ts[i]) ? f32 : same).push_back(i);
    if (!same.empty()) launch_adam<T, T>(h, a, st, ts, same, rows);
    if (!f32.empty()) launch_adam<T, float>(h, a, st, ts, f32, rows);
  });
}

void sgd_step_cuda(const SgdHyper& h, const std::vector<SgdTensor>& ts, uintptr_t stream) {
  LLMK_CHECK(!h.stochastic_rounding, "sgd_step_cuda: stochastic rounding is not supported");
  const bool momentum = h.momentum != 0.f;
  for (const SgdTensor& t : ts) {
    const int64_t n = t.param.numel();
    LLMK_CHECK(n / kChunk < kMaxChunks, "sgd_step_cuda: tensor too large");
    check_flat(t.param, t.param.dtype, n, "param");
    check_flat(t.grad, t.param.dtype, n, "grad");
    if (momentum) check_flat(t.momentum_buffer, t.param.dtype, n, "momentum_buffer");
  }
  const SgdArgs a{h.lr, h.weight_decay, h.momentum, h.one_minus_dampening,
                  h.maximize ? -1.f : 1.f, h.inv_grad_scale};
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  by_dtype_groups(ts, [&](auto tag, const std::vector<int>& idx) {
    using T = decltype(tag);
    auto kernel = !momentum ? sgd_kernel<T, false, false>
                            : (h.nesterov ? sgd_kernel<T, true, true> : sgd_kernel<T, true, false>);
    std::vector<int64_t> numels;
    for (int i : idx) numels.push_back(ts[i].param.numel());
    for_each_launch<3>(
        numels,
        [&](Tables<3>& tb, int slot, int j) {
          const SgdTensor& t = ts[idx[j]];
          tb.ptr[0][slot] = t.param.data;
          tb.ptr[1][slot] = t.grad.data;
          tb.ptr[2][slot] = momentum ? t.momentum_buffer.data : nullptr;
          tb.flag[slot] = t.first_step ? 1 : 0;
        },
        [&](const Tables<3>& tb, int blocks) {
          kernel<<<blocks, kThreads, 0, st>>>(tb, a);
          check_launch("sgd_step_cuda");
        });
  });
}

void adam8bit_step_cuda(const AdamHyper& h, const std::vector<Adam8bitTensor>& ts,
                        uintptr_t stream, const float* device_floats,
                        const std::vector<int32_t>& rows) {
  LLMK_CHECK(h.decoupled, "adam8bit_step_cuda: AdamW only (decoupled weight decay)");
  check_rows(rows, ts.size(), device_floats, "adam8bit_step_cuda");
  for (const Adam8bitTensor& t : ts) {
    const int64_t n = t.param.numel(), nb = (n + kBlock8 - 1) / kBlock8;
    LLMK_CHECK(n / kChunk < kMaxChunks, "adam8bit_step_cuda: tensor too large");
    check_flat(t.param, t.param.dtype, n, "param");
    check_flat(t.grad, t.param.dtype, n, "grad");
    check_flat(t.m_codes, DType::i8, n, "m_codes");
    check_flat(t.v_codes, DType::u8, n, "v_codes");
    check_flat(t.m_scales, DType::f32, nb, "m_scales");
    check_flat(t.v_scales, DType::f32, nb, "v_scales");
  }
  const Adam8Args a{h.beta2, h.eps, h.one_minus_beta1, h.one_minus_beta2, h.decay,
                    h.maximize ? -h.inv_grad_scale : h.inv_grad_scale, device_floats};
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  by_dtype_groups(ts, [&](auto tag, const std::vector<int>& idx) {
    using T = decltype(tag);
    std::vector<int64_t> numels;
    for (int i : idx) numels.push_back(ts[i].param.numel());
    for_each_launch<6>(
        numels,
        [&](Tables<6>& tb, int slot, int j) {
          const Adam8bitTensor& t = ts[idx[j]];
          tb.ptr[0][slot] = t.param.data;
          tb.ptr[1][slot] = t.grad.data;
          tb.ptr[2][slot] = t.m_codes.data;
          tb.ptr[3][slot] = t.v_codes.data;
          tb.ptr[4][slot] = t.m_scales.data;
          tb.ptr[5][slot] = t.v_scales.data;
          tb.f0[slot] = t.step_size;
          tb.f1[slot] = t.bias_correction2_sqrt;
          tb.row[slot] = rows.empty() ? idx[j] : rows[idx[j]];
        },
        [&](const Tables<6>& tb, int blocks) {
          adam8bit_kernel<T><<<blocks, kThreads, 0, st>>>(tb, a);
          check_launch("adam8bit_step_cuda");
        });
  });
}

std::string optim_cuda_host_selftest() {
  // Lengths around the chunk and span sizes, empty tensors, one spanning several launches, and
  // more tensors than one launch holds.
  std::vector<int64_t> numels = {0, 1, kChunk - 1, kChunk, kChunk + 1, 0,
                                 kChunk * kSpan - 1, kChunk * kSpan, kChunk * kSpan + 1,
                                 kChunk * kSpan * (kMaxBlocks + 3) + 5};
  for (int i = 0; i < 3 * kMaxTensors; ++i) numels.push_back(1 + (i * 977) % (3 * kChunk));
  const Plan plan = plan_launches(numels);
  // The ranges the kernels' blocks update, per tensor, as for_each_chunk gives them.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> seen(numels.size());
  std::ostringstream err;
  for (size_t l = 0; l < plan.blocks.size(); ++l) {
    const auto& ts = plan.tensors[l];
    const auto& bs = plan.blocks[l];
    if (bs.empty() || int(bs.size()) > kMaxBlocks || ts.empty() || int(ts.size()) > kMaxTensors) {
      err << "launch " << l << " has " << bs.size() << " blocks and " << ts.size() << " tensors";
      return err.str();
    }
    for (const auto& b : bs) {
      if (b.first < 0 || b.first >= int(ts.size()) || b.second > INT32_MAX) {
        err << "launch " << l << ": slot " << b.first << " or chunk " << b.second
            << " out of range";
        return err.str();
      }
      const int i = ts[b.first];
      for_each_chunk(int(b.second), numels[i], [&](int64_t begin, int64_t end) {
        seen[i].emplace_back(begin, end);
      });
    }
  }
  for (size_t i = 0; i < numels.size(); ++i) {
    // every value of the tensor exactly once, in ranges of at most one chunk
    std::vector<std::pair<int64_t, int64_t>> r = seen[i];
    std::sort(r.begin(), r.end());
    int64_t at = 0;
    bool ok = true;
    for (const auto& e : r) {
      ok = ok && e.first == at && e.second > e.first && e.second - e.first <= kChunk;
      at = e.second;
    }
    if (!ok || at != numels[i]) {
      err << "tensor " << i << " (" << numels[i] << " elements): " << r.size()
          << " ranges do not tile it";
      return err.str();
    }
  }
  return "";
}

}  // namespace cuda
}  // namespace llmk
