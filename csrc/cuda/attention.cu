// Fused attention on NVIDIA GPUs (sm_80+): FlashAttention-2 style forward and backward with
// tensor cores through WMMA (16x16x16, fp16/bf16 in, fp32 accumulate).
//
// Written for readability over the last bit of speed: score tiles, probabilities and the
// forward's output accumulator live in shared memory, and the online softmax is done there
// (a lane pair per row), so no code depends on the unspecified layout of WMMA fragments.
//
// Kernels (T = half or bf16, D = head dim 64 or 128; everything else is a run-time argument):
//   attn_fwd_kernel        one program per (query block of 64, query head, sequence); loops over
//                          the key blocks of 64 that the band lets the block see.
//   attn_bwd_delta_kernel  delta_i = sum_d dO_id O_id (one warp per row).
//   attn_bwd_dkv_kernel    one program per (key block of 64, kv head, sequence); loops over the
//                          query heads of the GQA group and the query blocks of 32 that see the
//                          block, so dK/dV are summed without atomics (deterministic).
//   attn_bwd_dq_kernel     one program per (query block of 64, query head, sequence); loops over
//                          key blocks of 32.
// The band and block-range math is csrc/common/attention_band.h (tested on the CPU).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/attention_band.h"
#include "common/checks.h"
#include "cuda/attention.h"

namespace llmk {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------ kernel arguments

struct Mat4 {  // a 4-D tensor whose last dim has stride 1; strides in elements
  void* p;
  int64_t s0, s1, s2;
};
struct Mat3f {  // a 3-D float32 tensor (lse, delta)
  float* p;
  int64_t s0, s1, s2;
};

struct Params {
  Mat4 q, k, v, out, dout, dq, dk, dv;
  Mat3f lse, delta;
  const int32_t* cu_q;    // nullptr when absent
  const int32_t* cu_k;
  const int32_t* used_k;
  int64_t Lq, Sk;         // rows of dim 2 of q and of k
  int group;              // query heads per kv head
  float scale, softcap;   // softcap <= 0: none
  int64_t left, right, diag;
  bool bottom_right;
  bool vec;  // all pointers 16-byte aligned and all row strides multiples of 8: 16-byte accesses
};

// Where one sequence lives. Indices from cu_seqlens are clamped to the tensor so that bad
// device-side lengths can give wrong numbers but never out-of-bounds accesses.
struct Seq {
  int64_t q_batch, q_row0, len_q;
  int64_t k_batch, k_row0;
  int64_t k_rows;  // key rows the sequence owns (all written by the dK/dV kernel)
  int64_t len_k;   // visible keys, <= k_rows (seqused_k)
  int64_t off;     // diagonal offset of the band
};

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

__device__ Seq seq_info(const Params& p, int b) {
  Seq s;
  if (p.cu_q) {
    const int64_t start = clamp64(p.cu_q[b], 0, p.Lq);
    s.q_batch = 0;
    s.q_row0 = start;
    s.len_q = clamp64(p.cu_q[b + 1], start, p.Lq) - start;
  } else {
    s.q_batch = b;
    s.q_row0 = 0;
    s.len_q = p.Lq;
  }
  if (p.cu_k) {
    const int64_t start = clamp64(p.cu_k[b], 0, p.Sk);
    s.k_batch = 0;
    s.k_row0 = start;
    s.k_rows = clamp64(p.cu_k[b + 1], start, p.Sk) - start;
  } else {
    s.k_batch = b;
    s.k_row0 = 0;
    s.k_rows = p.Sk;
  }
  s.len_k = p.used_k ? clamp64(p.used_k[b], 0, s.k_rows) : s.k_rows;
  s.off = band::clamp_offset(p.diag + (p.bottom_right ? s.len_k - s.len_q : 0));
  return s;
}

// ------------------------------------------------------------------ small helpers

__device__ __forceinline__ float to_float(half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ half from_float<half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

template <class T> using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <class T> using FragAt = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major>;
template <class T> using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <class T> using FragBt = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Copies rows [0, valid) of a (rows x D) tile from global memory (row stride gstride) into
// shared memory (row stride lds); rows [valid, rows) are zero-filled, never read.
template <class T, int D>
__device__ void load_tile(T* s, int lds, const T* g, int64_t gstride, int rows, int valid,
                          bool vec, int tid, int nthreads) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int idx = tid; idx < rows * kChunks; idx += nthreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    T* dst = s + r * lds + c;
    if (r < valid) {
      const T* src = g + r * gstride + c;
      if (vec) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = src[e];
      }
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
}

// Writes 8 floats (times mult) as T to global memory.
template <class T>
__device__ __forceinline__ void store8(T* dst, const float* src, float mult, bool vec) {
  alignas(16) T tmp[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) tmp[e] = from_float<T>(src[e] * mult);
  if (vec) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(tmp);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[e] = tmp[e];
  }
}

// Stores one 16x16 fp32 accumulator (times mult) to rows [0, valid_rows) of a global tile,
// through a 16x16 float staging area private to the warp.
template <class T>
__device__ void store_frag(const FragC& f, float mult, float* stage, T* g, int64_t gstride,
                           int valid_rows, bool vec, int lane) {
  wmma::store_matrix_sync(stage, f, 16, wmma::mem_row_major);
  __syncwarp();
  const int r = lane >> 1, c = (lane & 1) * 8;
  if (r < valid_rows) store8(g + r * gstride + c, stage + r * 16 + c, mult, vec);
  __syncwarp();  // the stage is reused by the next call
}

__host__ __device__ constexpr size_t round_up(size_t x) { return (x + 127) / 128 * 128; }

// Score transform shared by forward and backward: u = scale * q.k, then optional softcap.
// Returns the score; *dscore = d score / d u (1 without softcap).
__device__ __forceinline__ float score_of(float qk, float scale, float softcap, float* dscore) {
  const float u = qk * scale;
  if (softcap > 0.f) {
    const float t = tanhf(u / softcap);
    *dscore = 1.f - t * t;
    return softcap * t;
  }
  *dscore = 1.f;
  return u;
}

// ------------------------------------------------------------------ forward

template <class T, int D>
struct FwdCfg {
  static constexpr int BM = 64, BN = 64, kWarps = 4, kThreads = 32 * kWarps;  // a warp per 16 rows
  static constexpr int LDT = D + 8;   // T tiles (Q, K, V); +8 keeps rows off the same banks
  static constexpr int LDS = BN + 4;  // float scores
  static constexpr int LDP = BN + 8;  // T probabilities
  static constexpr int LDO = D + 4;   // float output accumulator
  // Q is only read once (into fragments), so the score tile reuses its bytes.
  static constexpr size_t kQS = round_up(std::max(BM * LDT * sizeof(T), BM * LDS * sizeof(float)));
  static constexpr size_t kK = kQS, kV = kK + round_up(BN * LDT * sizeof(T));
  static constexpr size_t kP = kV + round_up(BN * LDT * sizeof(T));
  static constexpr size_t kO = kP + round_up(BM * LDP * sizeof(T));
  static constexpr size_t kSmem = kO + round_up(BM * LDO * sizeof(float));
};

template <class T, int D>
__global__ void __launch_bounds__(FwdCfg<T, D>::kThreads, 1)
attn_fwd_kernel(const Params p) {
  using C = FwdCfg<T, D>;
  constexpr int BM = C::BM, BN = C::BN, LDT = C::LDT, LDS = C::LDS, LDP = C::LDP, LDO = C::LDO;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  float* sS = reinterpret_cast<float*>(smem);  // aliases sQ (see FwdCfg)
  T* sK = reinterpret_cast<T*>(smem + C::kK);
  T* sV = reinterpret_cast<T*>(smem + C::kV);
  T* sP = reinterpret_cast<T*>(smem + C::kP);
  float* sO = reinterpret_cast<float*>(smem + C::kO);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int h = blockIdx.y, b = blockIdx.z;
  const Seq sq = seq_info(p, b);
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  if (m0 >= sq.len_q) return;
  const int rows_q = int(min64(BM, sq.len_q - m0));
  const int hk = h / p.group;

  const T* gQ = static_cast<const T*>(p.q.p) + sq.q_batch * p.q.s0 + h * p.q.s1 +
                (sq.q_row0 + m0) * p.q.s2;
  const T* gK = static_cast<const T*>(p.k.p) + sq.k_batch * p.k.s0 + hk * p.k.s1 + sq.k_row0 * p.k.s2;
  const T* gV = static_cast<const T*>(p.v.p) + sq.k_batch * p.v.s0 + hk * p.v.s1 + sq.k_row0 * p.v.s2;

  load_tile<T, D>(sQ, LDT, gQ, p.q.s2, BM, rows_q, p.vec, tid, C::kThreads);
  for (int idx = tid; idx < BM * LDO; idx += C::kThreads) sO[idx] = 0.f;
  __syncthreads();
  FragA<T> qf[D / 16];  // this warp's 16 query rows, kept in registers for the whole loop
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) wmma::load_matrix_sync(qf[kk], sQ + warp * 16 * LDT + kk * 16, LDT);

  // Softmax bookkeeping: lanes l and l+16 share row (l & 15) of the warp, half the columns each.
  const int row = warp * 16 + (lane & 15), half_idx = lane >> 4;
  const int64_t i = m0 + row;
  float m_run = -INFINITY;  // running max, base-2 units
  float l_run = 0.f;        // running sum of exp2(s - m_run)

  const band::Range kb =
      band::key_block_range(m0, m0 + BM, sq.len_q, sq.len_k, p.left, p.right, sq.off, BN);
  for (int64_t nb = kb.first; nb < kb.end; ++nb) {
    const int64_t n0 = nb * BN;
    const int rows_k = int(min64(BN, sq.len_k - n0));
    // Everyone is done with the previous sK/sV, and (first pass) with sQ, which sS overwrites.
    __syncthreads();
    load_tile<T, D>(sK, LDT, gK + n0 * p.k.s2, p.k.s2, BN, rows_k, p.vec, tid, C::kThreads);
    load_tile<T, D>(sV, LDT, gV + n0 * p.v.s2, p.v.s2, BN, rows_k, p.vec, tid, C::kThreads);
    __syncthreads();

    // S = Q K^T for the warp's 16 rows (K is row-major [key][d], i.e. K^T column-major).
#pragma unroll
    for (int nt = 0; nt < BN / 16; ++nt) {
      FragC acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        FragBt<T> kf;
        wmma::load_matrix_sync(kf, sK + nt * 16 * LDT + kk * 16, LDT);
        wmma::mma_sync(acc, qf[kk], kf, acc);
      }
      wmma::store_matrix_sync(sS + warp * 16 * LDS + nt * 16, acc, LDS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax on the warp's own rows (base 2). A row that has seen no visible key keeps
    // m_run = -inf and contributes nothing (no -inf - -inf).
    float* srow = sS + row * LDS + half_idx * (BN / 2);
    float mx = -INFINITY;
    for (int c = 0; c < BN / 2; ++c) {
      const int64_t j = n0 + half_idx * (BN / 2) + c;
      float ds;
      const float s = band::visible(i, j, sq.len_k, p.left, p.right, sq.off)
                          ? score_of(srow[c], p.scale, p.softcap, &ds) * kLog2e
                          : -INFINITY;
      srow[c] = s;
      mx = fmaxf(mx, s);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
    const float m_new = fmaxf(m_run, mx);
    // fmaxf skips NaN: a block whose visible scores are all NaN leaves m_new = -inf. Subtract
    // 0 then (as the CPU and Triton kernels do), so those NaN reach P and the row, where a
    // "P = 0 while m_new = -inf" rule turned them into zeros.
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m_run - m_use);  // 0 while m_run = -inf
    T* prow = sP + row * LDP + half_idx * (BN / 2);
    float sum = 0.f;
    for (int c = 0; c < BN / 2; ++c) {
      const float pr = exp2f(srow[c] - m_use);  // masked: exp2(-inf) = 0
      prow[c] = from_float<T>(pr);
      sum += pr;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 16);
    l_run = l_run * alpha + sum;
    m_run = m_new;
    float* orow = sO + row * LDO + half_idx * (D / 2);
    for (int c = 0; c < D / 2; ++c) orow[c] *= alpha;
    __syncwarp();

    // O += P V on the warp's rows, accumulating through shared memory.
    FragA<T> pf[BN / 16];
#pragma unroll
    for (int kt = 0; kt < BN / 16; ++kt) wmma::load_matrix_sync(pf[kt], sP + warp * 16 * LDP + kt * 16, LDP);
#pragma unroll
    for (int dt = 0; dt < D / 16; ++dt) {
      FragC acc;
      float* o_tile = sO + warp * 16 * LDO + dt * 16;
      wmma::load_matrix_sync(acc, o_tile, LDO, wmma::mem_row_major);
#pragma unroll
      for (int kt = 0; kt < BN / 16; ++kt) {
        FragB<T> vf;
        wmma::load_matrix_sync(vf, sV + kt * 16 * LDT + dt * 16, LDT);
        wmma::mma_sync(acc, pf[kt], vf, acc);
      }
      wmma::store_matrix_sync(o_tile, acc, LDO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  // Normalize; dead rows (l = 0) give out = 0 and lse = -inf; NaN rows stay NaN (lse too,
  // so the backward's "no visible key" rule does not zero their gradients).
  const float inv_l = l_run > 0.f ? 1.f / l_run : (l_run == 0.f ? 0.f : NAN);
  float* orow = sO + row * LDO + half_idx * (D / 2);
  for (int c = 0; c < D / 2; ++c) orow[c] *= inv_l;
  if (half_idx == 0 && row < rows_q) {
    float* lse = p.lse.p + sq.q_batch * p.lse.s0 + h * p.lse.s1 + (sq.q_row0 + i) * p.lse.s2;
    *lse = l_run > 0.f ? (m_run + log2f(l_run)) * kLn2 : (l_run == 0.f ? -INFINITY : NAN);
  }
  __syncthreads();
  T* gO = static_cast<T*>(p.out.p) + sq.q_batch * p.out.s0 + h * p.out.s1 + (sq.q_row0 + m0) * p.out.s2;
  constexpr int kChunks = D / 8;
  for (int idx = tid; idx < rows_q * kChunks; idx += C::kThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    store8(gO + r * p.out.s2 + c, sO + r * LDO + c, 1.f, p.vec);
  }
}

// ------------------------------------------------------------------ backward

// delta[b, h, i] = sum_d dout * out over every row of the (B, Hq, Lq) layout (rows outside any
// sequence of a packed layout are computed too, harmlessly: they are inside the tensors).
template <class T>
__global__ void __launch_bounds__(256) attn_bwd_delta_kernel(const Params p, int64_t B, int64_t H, int D) {
  const int64_t rowid = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (rowid >= B * H * p.Lq) return;
  const int64_t b = rowid / (H * p.Lq), rem = rowid % (H * p.Lq), h = rem / p.Lq, i = rem % p.Lq;
  const T* o = static_cast<const T*>(p.out.p) + b * p.out.s0 + h * p.out.s1 + i * p.out.s2;
  const T* d = static_cast<const T*>(p.dout.p) + b * p.dout.s0 + h * p.dout.s1 + i * p.dout.s2;
  float acc = 0.f;
  for (int c = lane; c < D; c += 32) acc += to_float(o[c]) * to_float(d[c]);
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) p.delta.p[b * p.delta.s0 + h * p.delta.s1 + i * p.delta.s2] = acc;
}

// P and dU of one (query, key) pair from the recomputed q.k, dP = dO.v, lse (base 2) and delta.
__device__ __forceinline__ void grad_pair(float qk, float dp, float lse2, float delta, bool vis,
                                          const Params& p, float* pr, float* du) {
  if (!vis || lse2 == -INFINITY) {
    *pr = 0.f;
    *du = 0.f;
    return;
  }
  float dscore;
  const float s = score_of(qk, p.scale, p.softcap, &dscore);
  *pr = exp2f(s * kLog2e - lse2);
  *du = *pr * (dp - delta) * dscore;  // dS, through the softcap's tanh
}

// Loads lse (base 2) and delta for query rows [m0, m0 + rows) of a sequence; -inf / 0 past the end.
__device__ void load_row_stats(float* s_lse, float* s_delta, const Params& p, const Seq& sq, int h,
                               int64_t m0, int rows, int valid, int tid, int nthreads) {
  for (int r = tid; r < rows; r += nthreads) {
    if (r < valid) {
      const int64_t row = sq.q_row0 + m0 + r;
      s_lse[r] = p.lse.p[sq.q_batch * p.lse.s0 + h * p.lse.s1 + row * p.lse.s2] * kLog2e;
      s_delta[r] = p.delta.p[sq.q_batch * p.delta.s0 + h * p.delta.s1 + row * p.delta.s2];
    } else {
      s_lse[r] = -INFINITY;
      s_delta[r] = 0.f;
    }
  }
}

template <class T, int D>
struct DkvCfg {
  static constexpr int BM = 32, BN = 64, kWarps = 8, kThreads = 32 * kWarps;
  static constexpr int LDT = D + 8, LDS = BN + 4, LDP = BN + 8;
  static constexpr size_t kK = 0, kV = round_up(BN * LDT * sizeof(T));
  static constexpr size_t kQ = kV + round_up(BN * LDT * sizeof(T));
  static constexpr size_t kDO = kQ + round_up(BM * LDT * sizeof(T));
  static constexpr size_t kS = kDO + round_up(BM * LDT * sizeof(T));
  static constexpr size_t kDP = kS + round_up(BM * LDS * sizeof(float));
  static constexpr size_t kP = kDP + round_up(BM * LDS * sizeof(float));
  static constexpr size_t kDS = kP + round_up(BM * LDP * sizeof(T));
  static constexpr size_t kLse = kDS + round_up(BM * LDP * sizeof(T));
  static constexpr size_t kDelta = kLse + round_up(BM * sizeof(float));
  static constexpr size_t kSmem = kDelta + round_up(BM * sizeof(float));
  static_assert(BM * LDS >= kWarps * 256, "the output stage reuses the score tile");
};

template <class T, int D>
__global__ void __launch_bounds__(DkvCfg<T, D>::kThreads)
attn_bwd_dkv_kernel(const Params p) {
  using C = DkvCfg<T, D>;
  constexpr int BM = C::BM, BN = C::BN, LDT = C::LDT, LDS = C::LDS, LDP = C::LDP;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem + C::kK);
  T* sV = reinterpret_cast<T*>(smem + C::kV);
  T* sQ = reinterpret_cast<T*>(smem + C::kQ);
  T* sdO = reinterpret_cast<T*>(smem + C::kDO);
  float* sS = reinterpret_cast<float*>(smem + C::kS);
  float* sdP = reinterpret_cast<float*>(smem + C::kDP);
  T* sP = reinterpret_cast<T*>(smem + C::kP);
  T* sdS = reinterpret_cast<T*>(smem + C::kDS);
  float* sLse = reinterpret_cast<float*>(smem + C::kLse);
  float* sDelta = reinterpret_cast<float*>(smem + C::kDelta);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int hk = blockIdx.y, b = blockIdx.z;
  const Seq sq = seq_info(p, b);
  const int64_t n0 = int64_t(blockIdx.x) * BN;
  if (n0 >= sq.k_rows) return;
  const int rows_out = int(min64(BN, sq.k_rows - n0));           // rows written
  const int rows_k = int(clamp64(sq.len_k - n0, 0, BN));                    // rows visible
  const int64_t krow = sq.k_row0 + n0;
  load_tile<T, D>(sK, LDT, static_cast<const T*>(p.k.p) + sq.k_batch * p.k.s0 + hk * p.k.s1 + krow * p.k.s2,
                  p.k.s2, BN, rows_k, p.vec, tid, C::kThreads);
  load_tile<T, D>(sV, LDT, static_cast<const T*>(p.v.p) + sq.k_batch * p.v.s0 + hk * p.v.s1 + krow * p.v.s2,
                  p.v.s2, BN, rows_k, p.vec, tid, C::kThreads);

  // Warp roles: for the (BM x BN) score tiles, warp -> tile (st_m, st_n); for the accumulators,
  // warp -> key rows kt*16.. and the half ch of the head dim (D/32 fragments each of dK, dV).
  const int st_m = warp / 4, st_n = warp % 4;
  const int kt = warp % 4, ch = warp / 4;
  constexpr int kAcc = D / 32;
  FragC dk_acc[kAcc], dv_acc[kAcc];
#pragma unroll
  for (int t = 0; t < kAcc; ++t) {
    wmma::fill_fragment(dk_acc[t], 0.f);
    wmma::fill_fragment(dv_acc[t], 0.f);
  }

  const band::Range qb =
      band::query_block_range(n0, n0 + BN, sq.len_q, sq.len_k, p.left, p.right, sq.off, BM);
  for (int g = 0; g < p.group; ++g) {
    const int h = hk * p.group + g;
    const T* gQ = static_cast<const T*>(p.q.p) + sq.q_batch * p.q.s0 + h * p.q.s1 + sq.q_row0 * p.q.s2;
    const T* gdO = static_cast<const T*>(p.dout.p) + sq.q_batch * p.dout.s0 + h * p.dout.s1 +
                   sq.q_row0 * p.dout.s2;
    for (int64_t mb = qb.first; mb < qb.end; ++mb) {
      const int64_t m0 = mb * BM;
      const int rows_q = int(min64(BM, sq.len_q - m0));
      __syncthreads();  // the previous pass is done reading sQ, sdO, sP, sdS
      load_tile<T, D>(sQ, LDT, gQ + m0 * p.q.s2, p.q.s2, BM, rows_q, p.vec, tid, C::kThreads);
      load_tile<T, D>(sdO, LDT, gdO + m0 * p.dout.s2, p.dout.s2, BM, rows_q, p.vec, tid, C::kThreads);
      load_row_stats(sLse, sDelta, p, sq, h, m0, BM, rows_q, tid, C::kThreads);
      __syncthreads();

      {  // S = Q K^T and dP = dO V^T, one 16x16 tile of each per warp
        FragC s_acc, dp_acc;
        wmma::fill_fragment(s_acc, 0.f);
        wmma::fill_fragment(dp_acc, 0.f);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          FragA<T> a;
          FragBt<T> bt;
          wmma::load_matrix_sync(a, sQ + st_m * 16 * LDT + kk * 16, LDT);
          wmma::load_matrix_sync(bt, sK + st_n * 16 * LDT + kk * 16, LDT);
          wmma::mma_sync(s_acc, a, bt, s_acc);
          wmma::load_matrix_sync(a, sdO + st_m * 16 * LDT + kk * 16, LDT);
          wmma::load_matrix_sync(bt, sV + st_n * 16 * LDT + kk * 16, LDT);
          wmma::mma_sync(dp_acc, a, bt, dp_acc);
        }
        wmma::store_matrix_sync(sS + st_m * 16 * LDS + st_n * 16, s_acc, LDS, wmma::mem_row_major);
        wmma::store_matrix_sync(sdP + st_m * 16 * LDS + st_n * 16, dp_acc, LDS, wmma::mem_row_major);
      }
      __syncthreads();

      for (int idx = tid; idx < BM * BN; idx += C::kThreads) {
        const int r = idx / BN, c = idx % BN;
        const int64_t i = m0 + r, j = n0 + c;
        const bool vis = r < rows_q && band::visible(i, j, sq.len_k, p.left, p.right, sq.off);
        float pr, du;
        grad_pair(sS[r * LDS + c], sdP[r * LDS + c], sLse[r], sDelta[r], vis, p, &pr, &du);
        sP[r * LDP + c] = from_float<T>(pr);
        sdS[r * LDP + c] = from_float<T>(du);
      }
      __syncthreads();

      // dV += P^T dO and dK += dU^T Q (scale applied at the end): P and dU are stored
      // [query][key], so their transposes load as column-major A operands.
#pragma unroll
      for (int mt = 0; mt < BM / 16; ++mt) {
        FragAt<T> pt, dst;
        wmma::load_matrix_sync(pt, sP + mt * 16 * LDP + kt * 16, LDP);
        wmma::load_matrix_sync(dst, sdS + mt * 16 * LDP + kt * 16, LDP);
#pragma unroll
        for (int t = 0; t < kAcc; ++t) {
          const int col = ch * (D / 2) + t * 16;
          FragB<T> bf;
          wmma::load_matrix_sync(bf, sdO + mt * 16 * LDT + col, LDT);
          wmma::mma_sync(dv_acc[t], pt, bf, dv_acc[t]);
          wmma::load_matrix_sync(bf, sQ + mt * 16 * LDT + col, LDT);
          wmma::mma_sync(dk_acc[t], dst, bf, dk_acc[t]);
        }
      }
    }
  }

  // Rows past len_k (seqused_k) hold exact zeros: their keys were zero-filled and masked.
  __syncthreads();  // the stage below reuses sS
  float* stage = sS + warp * 256;
  const int valid = rows_out - kt * 16;
  T* gdK = static_cast<T*>(p.dk.p) + sq.k_batch * p.dk.s0 + hk * p.dk.s1 + (krow + kt * 16) * p.dk.s2;
  T* gdV = static_cast<T*>(p.dv.p) + sq.k_batch * p.dv.s0 + hk * p.dv.s1 + (krow + kt * 16) * p.dv.s2;
#pragma unroll
  for (int t = 0; t < kAcc; ++t) {
    const int col = ch * (D / 2) + t * 16;
    store_frag<T>(dk_acc[t], p.scale, stage, gdK + col, p.dk.s2, valid, p.vec, lane);
    store_frag<T>(dv_acc[t], 1.f, stage, gdV + col, p.dv.s2, valid, p.vec, lane);
  }
}

template <class T, int D>
struct DqCfg {
  static constexpr int BM = 64, BN = 32, kWarps = 8, kThreads = 32 * kWarps;
  static constexpr int LDT = D + 8, LDS = BN + 4, LDP = BN + 8;
  static constexpr size_t kQ = 0, kDO = round_up(BM * LDT * sizeof(T));
  static constexpr size_t kK = kDO + round_up(BM * LDT * sizeof(T));
  static constexpr size_t kV = kK + round_up(BN * LDT * sizeof(T));
  static constexpr size_t kS = kV + round_up(BN * LDT * sizeof(T));
  static constexpr size_t kDP = kS + round_up(BM * LDS * sizeof(float));
  static constexpr size_t kDS = kDP + round_up(BM * LDS * sizeof(float));
  static constexpr size_t kLse = kDS + round_up(BM * LDP * sizeof(T));
  static constexpr size_t kDelta = kLse + round_up(BM * sizeof(float));
  static constexpr size_t kSmem = kDelta + round_up(BM * sizeof(float));
  static_assert(BM * LDS >= kWarps * 256, "the output stage reuses the score tile");
};

template <class T, int D>
__global__ void __launch_bounds__(DqCfg<T, D>::kThreads)
attn_bwd_dq_kernel(const Params p) {
  using C = DqCfg<T, D>;
  constexpr int BM = C::BM, BN = C::BN, LDT = C::LDT, LDS = C::LDS, LDP = C::LDP;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + C::kQ);
  T* sdO = reinterpret_cast<T*>(smem + C::kDO);
  T* sK = reinterpret_cast<T*>(smem + C::kK);
  T* sV = reinterpret_cast<T*>(smem + C::kV);
  float* sS = reinterpret_cast<float*>(smem + C::kS);
  float* sdP = reinterpret_cast<float*>(smem + C::kDP);
  T* sdS = reinterpret_cast<T*>(smem + C::kDS);
  float* sLse = reinterpret_cast<float*>(smem + C::kLse);
  float* sDelta = reinterpret_cast<float*>(smem + C::kDelta);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int h = blockIdx.y, b = blockIdx.z;
  const Seq sq = seq_info(p, b);
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  if (m0 >= sq.len_q) return;
  const int rows_q = int(min64(BM, sq.len_q - m0));
  const int hk = h / p.group;
  const int64_t qrow = sq.q_row0 + m0;
  load_tile<T, D>(sQ, LDT, static_cast<const T*>(p.q.p) + sq.q_batch * p.q.s0 + h * p.q.s1 + qrow * p.q.s2,
                  p.q.s2, BM, rows_q, p.vec, tid, C::kThreads);
  load_tile<T, D>(sdO, LDT,
                  static_cast<const T*>(p.dout.p) + sq.q_batch * p.dout.s0 + h * p.dout.s1 + qrow * p.dout.s2,
                  p.dout.s2, BM, rows_q, p.vec, tid, C::kThreads);
  load_row_stats(sLse, sDelta, p, sq, h, m0, BM, rows_q, tid, C::kThreads);
  const T* gK = static_cast<const T*>(p.k.p) + sq.k_batch * p.k.s0 + hk * p.k.s1 + sq.k_row0 * p.k.s2;
  const T* gV = static_cast<const T*>(p.v.p) + sq.k_batch * p.v.s0 + hk * p.v.s1 + sq.k_row0 * p.v.s2;

  // Warp roles: score tile (st_m, st_n) of the (BM x BN) block; dQ rows mt*16.., head-dim half ch.
  const int st_m = warp / 2, st_n = warp % 2;
  const int mt = warp % 4, ch = warp / 4;
  constexpr int kAcc = D / 32;
  FragC dq_acc[kAcc];
#pragma unroll
  for (int t = 0; t < kAcc; ++t) wmma::fill_fragment(dq_acc[t], 0.f);

  const band::Range kb =
      band::key_block_range(m0, m0 + BM, sq.len_q, sq.len_k, p.left, p.right, sq.off, BN);
  for (int64_t nb = kb.first; nb < kb.end; ++nb) {
    const int64_t n0 = nb * BN;
    const int rows_k = int(min64(BN, sq.len_k - n0));
    __syncthreads();  // the previous pass is done reading sK, sdS (first pass: sQ etc. are loaded)
    load_tile<T, D>(sK, LDT, gK + n0 * p.k.s2, p.k.s2, BN, rows_k, p.vec, tid, C::kThreads);
    load_tile<T, D>(sV, LDT, gV + n0 * p.v.s2, p.v.s2, BN, rows_k, p.vec, tid, C::kThreads);
    __syncthreads();

    {  // S = Q K^T and dP = dO V^T, one 16x16 tile of each per warp
      FragC s_acc, dp_acc;
      wmma::fill_fragment(s_acc, 0.f);
      wmma::fill_fragment(dp_acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        FragA<T> a;
        FragBt<T> bt;
        wmma::load_matrix_sync(a, sQ + st_m * 16 * LDT + kk * 16, LDT);
        wmma::load_matrix_sync(bt, sK + st_n * 16 * LDT + kk * 16, LDT);
        wmma::mma_sync(s_acc, a, bt, s_acc);
        wmma::load_matrix_sync(a, sdO + st_m * 16 * LDT + kk * 16, LDT);
        wmma::load_matrix_sync(bt, sV + st_n * 16 * LDT + kk * 16, LDT);
        wmma::mma_sync(dp_acc, a, bt, dp_acc);
      }
      wmma::store_matrix_sync(sS + st_m * 16 * LDS + st_n * 16, s_acc, LDS, wmma::mem_row_major);
      wmma::store_matrix_sync(sdP + st_m * 16 * LDS + st_n * 16, dp_acc, LDS, wmma::mem_row_major);
    }
    __syncthreads();

    for (int idx = tid; idx < BM * BN; idx += C::kThreads) {
      const int r = idx / BN, c = idx % BN;
      const int64_t i = m0 + r, j = n0 + c;
      const bool vis = r < rows_q && band::visible(i, j, sq.len_k, p.left, p.right, sq.off);
      float pr, du;
      grad_pair(sS[r * LDS + c], sdP[r * LDS + c], sLse[r], sDelta[r], vis, p, &pr, &du);
      sdS[r * LDP + c] = from_float<T>(du);
    }
    __syncthreads();

    // dQ += dU K (scale applied at the end).
#pragma unroll
    for (int nt = 0; nt < BN / 16; ++nt) {
      FragA<T> a;
      wmma::load_matrix_sync(a, sdS + mt * 16 * LDP + nt * 16, LDP);
#pragma unroll
      for (int t = 0; t < kAcc; ++t) {
        FragB<T> kf;
        wmma::load_matrix_sync(kf, sK + nt * 16 * LDT + ch * (D / 2) + t * 16, LDT);
        wmma::mma_sync(dq_acc[t], a, kf, dq_acc[t]);
      }
    }
  }

  __syncthreads();  // the stage below reuses sS
  float* stage = sS + warp * 256;
  T* gdQ = static_cast<T*>(p.dq.p) + sq.q_batch * p.dq.s0 + h * p.dq.s1 + (qrow + mt * 16) * p.dq.s2;
#pragma unroll
  for (int t = 0; t < kAcc; ++t)
    store_frag<T>(dq_acc[t], p.scale, stage, gdQ + ch * (D / 2) + t * 16, p.dq.s2, rows_q - mt * 16,
                  p.vec, lane);
}

// ------------------------------------------------------------------ host side

void cuda_check(cudaError_t e, const char* what) {
  LLMK_CHECK(e == cudaSuccess, "CUDA attention: " << what << " failed: " << cudaGetErrorString(e));
}

// Launches a kernel with `smem` bytes of dynamic shared memory on `stream`, checking the device
// can give that much and that the launch succeeded.
template <class Kernel>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            const Params& p, const char* name) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  int dev = 0, optin = 0;
  cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
  cuda_check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "cudaDeviceGetAttribute");
  LLMK_CHECK(size_t(optin) >= smem, "CUDA attention: " << name << " needs " << smem
                                                       << " bytes of shared memory per block, the device allows "
                                                       << optin);
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
             "cudaFuncSetAttribute");
  kernel<<<grid, block, smem, stream>>>(p);
  cuda_check(cudaGetLastError(), name);
}

bool supported_dtype(DType t) { return t == DType::f16 || t == DType::bf16; }

// Checks a (d0, d1, d2, D) view: dtype, rank, last stride 1, non-negative strides, element
// alignment of the pointer.
void check_4d(const TensorView& t, const char* name, DType dtype) {
  LLMK_CHECK(t.defined(), name << " is required");
  LLMK_CHECK(t.ndim == 4, name << " must be 4-D, got " << t.ndim << "-D");
  LLMK_CHECK(t.dtype == dtype, name << " must have dtype " << dtype_name(dtype) << ", got " << dtype_name(t.dtype));
  for (int d = 0; d < 4; ++d) LLMK_CHECK(t.sizes[d] >= 0 && t.strides[d] >= 0, name << ": bad sizes/strides");
  LLMK_CHECK(t.strides[3] == 1 || t.sizes[3] <= 1, name << ": the last dim must have stride 1");
  LLMK_CHECK(t.numel() == 0 || (t.data != nullptr && reinterpret_cast<uintptr_t>(t.data) % 2 == 0),
             name << ": null or misaligned data pointer");
}

void check_same_sizes(const TensorView& a, const TensorView& b, const char* an, const char* bn) {
  LLMK_CHECK(a.ndim == b.ndim, bn << " must have the shape of " << an);
  for (int d = 0; d < a.ndim; ++d)
    LLMK_CHECK(a.sizes[d] == b.sizes[d], bn << " must have the shape of " << an << " (dim " << d << ": "
                                            << b.sizes[d] << " vs " << a.sizes[d] << ")");
}

void check_f32_3d(const TensorView& t, const TensorView& q, const char* name) {
  LLMK_CHECK(t.defined(), name << " is required");
  LLMK_CHECK(t.ndim == 3 && t.dtype == DType::f32, name << " must be a 3-D float32 tensor");
  for (int d = 0; d < 3; ++d) {
    LLMK_CHECK(t.sizes[d] == q.sizes[d], name << " must have shape (B, Hq, Lq) of the query");
    LLMK_CHECK(t.strides[d] >= 0, name << ": negative stride");
  }
  LLMK_CHECK(t.numel() == 0 || (t.data != nullptr && reinterpret_cast<uintptr_t>(t.data) % 4 == 0),
             name << ": null or misaligned data pointer");
}

void check_i32_1d(const TensorView& t, int64_t n, const char* name) {
  LLMK_CHECK(t.ndim == 1 && t.dtype == DType::i32, name << " must be a 1-D int32 tensor");
  LLMK_CHECK(t.sizes[0] == n, name << " must have " << n << " elements, got " << t.sizes[0]);
  LLMK_CHECK(t.strides[0] == 1 || n <= 1, name << " must be contiguous");
  LLMK_CHECK(n == 0 || (t.data != nullptr && reinterpret_cast<uintptr_t>(t.data) % 4 == 0),
             name << ": null or misaligned data pointer");
}

Mat4 mat4(const TensorView& t) { return {t.data, t.strides[0], t.strides[1], t.strides[2]}; }
Mat3f mat3f(const TensorView& t) { return {static_cast<float*>(t.data), t.strides[0], t.strides[1], t.strides[2]}; }

// 16-byte accesses are safe when the pointer and every row offset are 16-byte aligned.
bool vec_ok(const TensorView& t) {
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (t.sizes[d] > 1 && t.strides[d] % 8 != 0) return false;
  return true;
}

struct Geometry {
  Params p{};
  int64_t B = 0, Hq = 0, Hk = 0, D = 0, nseq = 0;
  int64_t rows_q = 0, rows_k = 0;  // per-sequence grid bounds
};

// Validates the inputs shared by forward and backward and fills the kernel parameters.
Geometry make_geometry(const AttentionCudaArgs& a) {
  Geometry g;
  check_4d(a.q, "query", a.q.dtype);
  LLMK_CHECK(supported_dtype(a.q.dtype), "CUDA attention supports float16 and bfloat16, got "
                                             << dtype_name(a.q.dtype));
  check_4d(a.k, "key", a.q.dtype);
  check_4d(a.v, "value", a.q.dtype);
  check_same_sizes(a.k, a.v, "key", "value");
  g.B = a.q.sizes[0];
  g.Hq = a.q.sizes[1];
  g.Hk = a.k.sizes[1];
  g.D = a.q.sizes[3];
  LLMK_CHECK(g.D == 64 || g.D == 128, "CUDA attention supports head dim 64 or 128, got " << g.D);
  LLMK_CHECK(a.k.sizes[3] == g.D, "key/value head dim " << a.k.sizes[3] << " != query head dim " << g.D);
  LLMK_CHECK(g.Hk > 0 || g.Hq == 0, "key has no heads");
  LLMK_CHECK(g.Hk == 0 || g.Hq % g.Hk == 0,
             "query heads (" << g.Hq << ") must be a multiple of key heads (" << g.Hk << ")");
  LLMK_CHECK(g.Hq <= 65535 && g.Hk <= 65535, "too many heads for the CUDA grid");

  const int64_t Lq = a.q.sizes[2], Sk = a.k.sizes[2], Bk = a.k.sizes[0];
  if (a.cu_seqlens_q.defined()) {
    LLMK_CHECK(g.B == 1, "query must have batch 1 with cu_seqlens_q (packed layout)");
    LLMK_CHECK(a.cu_seqlens_q.ndim == 1 && a.cu_seqlens_q.sizes[0] >= 1, "cu_seqlens_q must be 1-D, non-empty");
    g.nseq = a.cu_seqlens_q.sizes[0] - 1;
    check_i32_1d(a.cu_seqlens_q, g.nseq + 1, "cu_seqlens_q");
    LLMK_CHECK(a.max_seqlen_q >= 0, "max_seqlen_q must be >= 0");
    g.rows_q = std::min(a.max_seqlen_q, Lq);
  } else {
    g.nseq = g.B;
    g.rows_q = Lq;
  }
  LLMK_CHECK(g.nseq <= 65535, "too many sequences for the CUDA grid");
  if (a.cu_seqlens_k.defined()) {
    LLMK_CHECK(Bk == 1, "key must have batch 1 with cu_seqlens_k (packed layout)");
    check_i32_1d(a.cu_seqlens_k, g.nseq + 1, "cu_seqlens_k");
    LLMK_CHECK(a.max_seqlen_k >= 0, "max_seqlen_k must be >= 0");
    g.rows_k = std::min(a.max_seqlen_k, Sk);
  } else {
    LLMK_CHECK(Bk == g.nseq, "key batch (" << Bk << ") must equal the number of sequences (" << g.nseq << ")");
    g.rows_k = Sk;
  }
  if (a.seqused_k.defined()) check_i32_1d(a.seqused_k, g.nseq, "seqused_k");

  Params& p = g.p;
  p.q = mat4(a.q);
  p.k = mat4(a.k);
  p.v = mat4(a.v);
  p.cu_q = a.cu_seqlens_q.defined() ? static_cast<const int32_t*>(a.cu_seqlens_q.data) : nullptr;
  p.cu_k = a.cu_seqlens_k.defined() ? static_cast<const int32_t*>(a.cu_seqlens_k.data) : nullptr;
  p.used_k = a.seqused_k.defined() ? static_cast<const int32_t*>(a.seqused_k.data) : nullptr;
  p.Lq = Lq;
  p.Sk = Sk;
  p.group = g.Hk > 0 ? int(g.Hq / g.Hk) : 0;
  p.scale = a.scale;
  p.softcap = a.softcap;
  p.left = band::clamp_window(a.window_left);
  p.right = band::clamp_window(a.window_right);
  p.diag = band::clamp_offset(a.diag_offset);
  p.bottom_right = a.bottom_right;
  p.vec = vec_ok(a.q) && vec_ok(a.k) && vec_ok(a.v);
  return g;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

dim3 grid_of(int64_t rows, int64_t block, int64_t heads, int64_t nseq) {
  const int64_t x = cdiv(rows, block);
  LLMK_CHECK(x < (int64_t(1) << 31), "sequence too long for the CUDA grid");
  return dim3(unsigned(x), unsigned(heads), unsigned(nseq));
}

template <class T, int D>
void forward_impl(Geometry& g, cudaStream_t stream) {
  using C = FwdCfg<T, D>;
  launch(attn_fwd_kernel<T, D>, grid_of(g.rows_q, C::BM, g.Hq, g.nseq), dim3(C::kThreads), C::kSmem,
         stream, g.p, "attention forward kernel");
}

template <class T, int D>
void backward_impl(Geometry& g, cudaStream_t stream) {
  const int64_t rows = g.B * g.Hq * g.p.Lq;
  if (rows > 0) {
    const int64_t blocks = cdiv(rows, 8);  // 8 warps of 256 threads, a warp per row
    LLMK_CHECK(blocks < (int64_t(1) << 31), "too many rows for the CUDA grid");
    attn_bwd_delta_kernel<T><<<dim3(unsigned(blocks)), dim3(256), 0, stream>>>(g.p, g.B, g.Hq, int(g.D));
    cuda_check(cudaGetLastError(), "attention backward delta kernel");
  }
  using K = DkvCfg<T, D>;
  launch(attn_bwd_dkv_kernel<T, D>, grid_of(g.rows_k, K::BN, g.Hk, g.nseq), dim3(K::kThreads), K::kSmem,
         stream, g.p, "attention backward dK/dV kernel");
  using Q = DqCfg<T, D>;
  launch(attn_bwd_dq_kernel<T, D>, grid_of(g.rows_q, Q::BM, g.Hq, g.nseq), dim3(Q::kThreads), Q::kSmem,
         stream, g.p, "attention backward dQ kernel");
}

// Calls impl<T, D> for the (dtype, head dim) of the geometry.
#define LLMK_ATTN_DISPATCH(IMPL, dtype, g, stream)                                          \
  do {                                                                                      \
    if ((dtype) == DType::f16 && (g).D == 64) IMPL<half, 64>(g, stream);                    \
    else if ((dtype) == DType::f16 && (g).D == 128) IMPL<half, 128>(g, stream);             \
    else if ((dtype) == DType::bf16 && (g).D == 64) IMPL<__nv_bfloat16, 64>(g, stream);     \
    else if ((dtype) == DType::bf16 && (g).D == 128) IMPL<__nv_bfloat16, 128>(g, stream);   \
    else LLMK_CHECK(false, "CUDA attention: unsupported dtype/head dim");                   \
  } while (0)

}  // namespace

bool attention_cuda_supports(int dtype_code, int64_t head_dim) {
  return (dtype_code == int(DType::f16) || dtype_code == int(DType::bf16)) &&
         (head_dim == 64 || head_dim == 128);
}

void attention_forward_cuda(const AttentionCudaArgs& a, const TensorView& out, const TensorView& lse) {
  Geometry g = make_geometry(a);
  check_4d(out, "out", a.q.dtype);
  check_same_sizes(a.q, out, "query", "out");
  check_f32_3d(lse, a.q, "lse");
  g.p.out = mat4(out);
  g.p.lse = mat3f(lse);
  g.p.vec = g.p.vec && vec_ok(out);
  LLMK_ATTN_DISPATCH(forward_impl, a.q.dtype, g, reinterpret_cast<cudaStream_t>(a.stream));
}

void attention_backward_cuda(const AttentionCudaArgs& a, const TensorView& out, const TensorView& dout,
                             const TensorView& lse, const TensorView& delta, const TensorView& dq,
                             const TensorView& dk, const TensorView& dv) {
  Geometry g = make_geometry(a);
  check_4d(out, "out", a.q.dtype);
  check_same_sizes(a.q, out, "query", "out");
  check_4d(dout, "grad_out", a.q.dtype);
  check_same_sizes(a.q, dout, "query", "grad_out");
  check_4d(dq, "dq", a.q.dtype);
  check_same_sizes(a.q, dq, "query", "dq");
  check_4d(dk, "dk", a.q.dtype);
  check_same_sizes(a.k, dk, "key", "dk");
  check_4d(dv, "dv", a.q.dtype);
  check_same_sizes(a.k, dv, "key", "dv");
  check_f32_3d(lse, a.q, "lse");
  check_f32_3d(delta, a.q, "delta");
  g.p.out = mat4(out);
  g.p.dout = mat4(dout);
  g.p.dq = mat4(dq);
  g.p.dk = mat4(dk);
  g.p.dv = mat4(dv);
  g.p.lse = mat3f(lse);
  g.p.delta = mat3f(delta);
  g.p.vec = g.p.vec && vec_ok(out) && vec_ok(dout) && vec_ok(dq) && vec_ok(dk) && vec_ok(dv);
  LLMK_ATTN_DISPATCH(backward_impl, a.q.dtype, g, reinterpret_cast<cudaStream_t>(a.stream));
}

}  // namespace cuda
}  // namespace llmk
