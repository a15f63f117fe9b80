// Quantized matmul on NVIDIA GPUs (sm_80+): out = x @ dequantize(W)^T (+ bias) for the int8
// (W8A16), int4 (W4A16) and w8a8 schemes of python/llmkernels/reference/quant_matmul.py.
//
// Written to be right by construction over the last bit of speed: every global access is
// bounds-checked or provably in bounds, 16-byte accesses are used only where the host proved
// alignment, and no code depends on the unspecified layout of WMMA fragments.
//
// Kernels (T = half or bf16; M, N, K and the group size are run-time values):
//   gemv_wa16_kernel<T, S, MR>  M <= MR (1, 2, 4 or 8), S = int8 or int4. Block of 4 warps;
//                           each warp owns 4 output channels (16 per block). x rows are
//                           staged in shared memory as float in K-slices (padded against bank
//                           conflicts); every lane streams
//                           16-byte weight chunks (32 int4 or 16 int8 values), one chunk ahead,
//                           dequantizes in registers, FMAs against all M rows; warp-shuffle sums.
//   gemm_wa16_kernel<T, S>  M > 8. 64x64 output tile per block of 4 warps (32x32 each, 2x2
//                           WMMA 16x16x16 tiles, fp32 accumulate), K-step 32, double-buffered
//                           shared tiles with the next K-step prefetched into registers. The
//                           weight tile is dequantized into shared memory as T: int8 as the raw
//                           q (exact in fp16/bf16; the channel scale multiplies the fp32 sum at
//                           the end), int4 as (q - zero) * scale rounded to T.
//   quantize_rows_kernel<T> w8a8, one block per row: x_scale = max|x| * float(1/127) (1 for an
//                           all-zero row; see the kernel for why not / 127), xq =
//                           clamp(rint(x / x_scale), -127, 127) into the workspace.
//   gemv_w8a8_kernel<T, MR> M <= MR: as gemv_wa16 but dp4a against the quantized rows (int32).
//   gemm_w8a8_kernel<T>     M > 8: 64x64 tile, int8 WMMA 16x16x16 with int32 accumulate, K-step 64.
// w8a8 epilogue: out = float(acc) * x_scale[m] * scale[n] (+ bias), each step rounded like the
// reference (no FMA contraction), so the result matches it exactly.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>

#include "common/checks.h"
#include "cuda/quant_matmul.h"

namespace llmk {
namespace cuda {
namespace {

using namespace nvcuda;

// ------------------------------------------------------------------ helpers shared with the host

#define LLMK_QM_HD __host__ __device__ __forceinline__

LLMK_QM_HD float qm_bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// Small integers become floats without an int->float conversion: the float whose bits are
// 0x4B000000 | v (v < 2^23) is exactly 2^23 + v, and subtracting 2^23 (+ an offset) is exact.
constexpr uint32_t kMagicBits = 0x4B000000u;
constexpr float kMagic = 8388608.f;          // 2^23
constexpr float kInt8Bias = 8388608.f + 128.f;

// Element i (0..7) of a 32-bit word of packed int4 data, as 2^23 + q. Byte b holds element 2b in
// its low nibble and 2b+1 in its high one, so element i sits at bits [4i, 4i + 4).
LLMK_QM_HD float int4_biased(uint32_t word, int i) {
  return qm_bits_to_float(kMagicBits | ((word >> (4 * i)) & 0xFu));
}
// Byte i (0..3) of a word of int8 data, as 2^23 + 128 + q (q ^ 0x80 is q + 128 as a byte).
LLMK_QM_HD float int8_biased(uint32_t word, int i) {
  return qm_bits_to_float(kMagicBits | (((word >> (8 * i)) & 0xFFu) ^ 0x80u));
}

// Float offset of local column k in the GEMV's shared x rows: 4 floats of padding after every 32,
// so the lanes' 16-byte reads (lane L at column 32L or 16L, plus a common offset) hit distinct banks.
LLMK_QM_HD int xpad(int k) { return k + (k >> 5) * 4; }

LLMK_QM_HD int64_t w8a8_kpad(int64_t K) { return (K + 15) / 16 * 16; }
LLMK_QM_HD int64_t w8a8_scale_offset(int64_t M, int64_t K) { return (M * w8a8_kpad(K) + 15) / 16 * 16; }

// ------------------------------------------------------------------ configuration

constexpr int kGemvMaxM = 8;
constexpr int kGemvWarps = 4, kGemvThreads = 32 * kGemvWarps;
constexpr int kGemvCpw = 4;                          // output channels per warp
constexpr int kGemvChannels = kGemvWarps * kGemvCpw;  // per block
constexpr int kGemvSmemFloats = 9216;                // 36 KiB: M * xpad(kc) <= this

// kc: the K-slice of x staged at once (a multiple of 32): M=1 -> 8192, M=8 -> 1024.
int gemv_kc(int64_t M) { return 32 * int(kGemvSmemFloats / (M * 36)); }

constexpr int kBM = 64, kBN = 64, kGemmThreads = 128;  // 4 warps, 2 x 2, 32 x 32 each
constexpr int kLDC = kBN + 4;                          // fp32/int32 epilogue stage
constexpr int kBKh = 32, kLDh = kBKh + 8;              // T tiles: [64][40] (80-byte rows)
constexpr int kBK8 = 64;                               // int8 tiles: [4 k-slices][64 rows][16]
constexpr size_t kTileH = size_t(kBM) * kLDh * 2;      // bytes of one T tile
constexpr size_t kTile8 = size_t(kBM) * kBK8;          // bytes of one int8 tile
constexpr size_t kStage = size_t(kBM) * kLDC * 4;
constexpr size_t kSmemWa16 = std::max(4 * kTileH, kStage);
constexpr size_t kSmemW8a8 = std::max(4 * kTile8, kStage);
static_assert(kSmemWa16 <= 48 * 1024 && kSmemW8a8 <= 48 * 1024, "static shared memory limit");

constexpr int kQuantThreads = 256;
constexpr float kInv127 = 1.0f / 127.0f;  // correctly rounded (constant folding is exact)

struct Params {
  const void* x;
  int64_t sx;           // x row stride (elements)
  const uint8_t* q;     // qdata bytes
  int64_t q_row_bytes;  // K (int8/w8a8) or K / 2 (int4)
  const float* scales;
  const uint8_t* zeros;  // int4 only
  int64_t groups;        // int4: K / group_size
  int group_shift;       // int4: log2(group_size)
  const void* bias;      // nullptr: none
  void* out;
  int64_t so;            // out row stride (elements)
  int8_t* xq;            // w8a8 workspace: (M, kp) int8
  float* xscale;         // w8a8 workspace: (M,) float
  int64_t kp;            // w8a8: round_up(K, 16)
  int64_t M, N, K;
  int kc;                // GEMV: K-slice staged in shared memory
  bool xvec;             // x: 16-byte aligned pointer and row stride: 16-byte loads (bounds-checked)
  bool qvec;             // qdata: 16-byte aligned pointer and row bytes: 16/8-byte loads
};

// ------------------------------------------------------------------ device helpers

__device__ __forceinline__ float to_float(half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ half from_float<half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
// Float from the 16 bits of a T.
template <class T> __device__ __forceinline__ float bits_to_float(uint32_t b);
template <> __device__ __forceinline__ float bits_to_float<half>(uint32_t b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
}
template <> __device__ __forceinline__ float bits_to_float<__nv_bfloat16>(uint32_t b) {
  return __uint_as_float(b << 16);
}
// Two floats rounded to T, packed low first.
template <class T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<half>(float a, float b) {
  return uint32_t(__half_as_ushort(__float2half_rn(a))) |
         (uint32_t(__half_as_ushort(__float2half_rn(b))) << 16);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(a))) |
         (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(b))) << 16);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// 16 bytes of a row of row_bytes bytes from byte offset off (a multiple of 16); bytes past the
// row read as 0. The 16-byte load needs vec (aligned row start and row length).
__device__ __forceinline__ uint4 load16(const uint8_t* row, int64_t off, int64_t row_bytes, bool vec) {
  if (vec && off + 16 <= row_bytes) return __ldg(reinterpret_cast<const uint4*>(row + off));
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int e = 0; e < 16; ++e)
    if (off + e < row_bytes) w[e / 4] |= uint32_t(__ldg(row + off + e)) << (8 * (e % 4));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// 8 bytes from byte offset off (a multiple of 8), same rules.
__device__ __forceinline__ uint2 load8(const uint8_t* row, int64_t off, int64_t row_bytes, bool vec) {
  if (vec && off + 8 <= row_bytes) return __ldg(reinterpret_cast<const uint2*>(row + off));
  uint32_t w[2] = {0u, 0u};
#pragma unroll
  for (int e = 0; e < 8; ++e)
    if (off + e < row_bytes) w[e / 4] |= uint32_t(__ldg(row + off + e)) << (8 * (e % 4));
  return make_uint2(w[0], w[1]);
}

// Elements [k, k + 8) of a row of K elements of T (k a multiple of 8) as raw bits; past K: 0.
template <class T>
__device__ __forceinline__ uint4 load_x8(const T* row, int64_t k, int64_t K, bool vec) {
  if (vec && k + 8 <= K) return __ldg(reinterpret_cast<const uint4*>(row + k));
  const unsigned short* r = reinterpret_cast<const unsigned short*>(row);
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int e = 0; e < 8; ++e)
    if (k + e < K) w[e / 2] |= uint32_t(__ldg(r + k + e)) << (16 * (e % 2));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// max that propagates NaN like torch.amax (a NaN row then gets scale 1, as in the reference).
__device__ __forceinline__ float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

// Stores one output element of the A16 schemes: v (the fp32 sum) times the channel scale (int8),
// plus bias.
template <class T, int S>
__device__ __forceinline__ void store_wa16(const Params& p, int64_t m, int64_t n, float v) {
  if (S == kQuantInt8) v *= __ldg(p.scales + n);
  if (p.bias) v += to_float(static_cast<const T*>(p.bias)[n]);
  static_cast<T*>(p.out)[m * p.so + n] = from_float<T>(v);
}

// The w8a8 epilogue, rounded step by step as in the reference: ((acc * xs) * ws) + bias.
template <class T>
__device__ __forceinline__ void store_w8a8(const Params& p, int64_t m, int64_t n, int acc) {
  float v = __fmul_rn(__fmul_rn(__int2float_rn(acc), __ldg(p.xscale + m)), __ldg(p.scales + n));
  if (p.bias) v = __fadd_rn(v, to_float(static_cast<const T*>(p.bias)[n]));
  static_cast<T*>(p.out)[m * p.so + n] = from_float<T>(v);
}

// ------------------------------------------------------------------ GEMV, A16 (M <= 8)

// Loads the 16-byte weight chunk starting at column kg of each of the warp's channels (zeros for
// channels past N) and, for int4, the chunk's group scale and 2^23 + zero point.
template <int S>
__device__ __forceinline__ void gemv_load_chunk(const Params& p, const uint8_t* const (&qrow)[kGemvCpw],
                                                const int64_t (&n)[kGemvCpw], const bool (&valid)[kGemvCpw],
                                                int64_t kg, uint4 (&w)[kGemvCpw], float (&sc)[kGemvCpw],
                                                float (&zf)[kGemvCpw]) {
#pragma unroll
  for (int ch = 0; ch < kGemvCpw; ++ch) {
    w[ch] = valid[ch] ? load16(qrow[ch], S == kQuantInt4 ? kg / 2 : kg, p.q_row_bytes, p.qvec)
                      : make_uint4(0u, 0u, 0u, 0u);
    if (S == kQuantInt4) {
      // A chunk (32 values, 32-aligned) lies in one group: groups are 32, 64 or 128 wide.
      const int64_t gi = n[ch] * p.groups + (kg >> p.group_shift);
      sc[ch] = valid[ch] ? __ldg(p.scales + gi) : 0.f;
      zf[ch] = kMagic + (valid[ch] ? float(__ldg(p.zeros + gi)) : 0.f);
    } else {
      sc[ch] = 0.f;
      zf[ch] = 0.f;
    }
  }
}

// Blocks per multiprocessor the A16 GEMV is compiled for: 6 at one row (sm_90: the 36 KiB of
// staged x allow 6, and ptxas then fits the registers in 80: int4 128 -> 80, int8 -> 79), so
// that a 7B layer's 11008 channels (688 blocks) run in one wave of 132 x 6, not two of 4 or 5
// a multiprocessor; 0 (unstated, ptxas's own choice) for more rows. Not yet timed on a GPU.
constexpr int gemv_min_blocks(int mr) { return mr == 1 ? 6 : 0; }

template <class T, int S, int MR>
__global__ void __launch_bounds__(kGemvThreads, gemv_min_blocks(MR)) gemv_wa16_kernel(const Params p) {
  constexpr int VPC = S == kQuantInt4 ? 32 : 16;  // values per 16-byte chunk
  constexpr int VPW = VPC / 4;                    // values per 32-bit word
  __shared__ __align__(16) float xs[kGemvSmemFloats];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int M = int(p.M), kc = p.kc, ldx = kc + kc / 8;  // ldx = xpad(kc)
  const int64_t K = p.K;
  const T* x = static_cast<const T*>(p.x);

  int64_t n[kGemvCpw];
  bool valid[kGemvCpw];
  const uint8_t* qrow[kGemvCpw];
#pragma unroll
  for (int ch = 0; ch < kGemvCpw; ++ch) {
    n[ch] = (int64_t(blockIdx.x) * kGemvWarps + warp) * kGemvCpw + ch;
    valid[ch] = n[ch] < p.N;
    if (!valid[ch]) n[ch] = 0;
    qrow[ch] = p.q + n[ch] * p.q_row_bytes;
  }
  float acc[kGemvCpw][MR];
#pragma unroll
  for (int ch = 0; ch < kGemvCpw; ++ch)
#pragma unroll
    for (int m = 0; m < MR; ++m) acc[ch][m] = 0.f;

  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int klen = int(K - k0 < kc ? K - k0 : kc);
    const int kfill = min(kc, (klen + 31) & ~31);  // staged columns: whole 32-column blocks
    const int groups8 = kfill / 8;
    __syncthreads();  // everyone is done with the previous slice
    for (int idx = tid; idx < M * groups8; idx += kGemvThreads) {
      const int m = idx / groups8, kk = (idx - m * groups8) * 8;
      const uint4 v = load_x8(x + m * p.sx, k0 + kk, K, p.xvec);
      float* dst = xs + m * ldx + xpad(kk);  // 8 columns never straddle a padding gap
      *reinterpret_cast<float4*>(dst) =
          make_float4(bits_to_float<T>(v.x & 0xFFFFu), bits_to_float<T>(v.x >> 16),
                      bits_to_float<T>(v.y & 0xFFFFu), bits_to_float<T>(v.y >> 16));
      *reinterpret_cast<float4*>(dst + 4) =
          make_float4(bits_to_float<T>(v.z & 0xFFFFu), bits_to_float<T>(v.z >> 16),
                      bits_to_float<T>(v.w & 0xFFFFu), bits_to_float<T>(v.w >> 16));
    }
    __syncthreads();

    const int nchunks = (klen + VPC - 1) / VPC;
    uint4 w[kGemvCpw];
    float sc[kGemvCpw], zf[kGemvCpw];
    if (lane < nchunks) gemv_load_chunk<S>(p, qrow, n, valid, k0 + int64_t(lane) * VPC, w, sc, zf);
    for (int c = lane; c < nchunks; c += 32) {
      uint4 cw[kGemvCpw];
      float csc[kGemvCpw], czf[kGemvCpw];
#pragma unroll
      for (int ch = 0; ch < kGemvCpw; ++ch) {
        cw[ch] = w[ch];
        csc[ch] = sc[ch];
        czf[ch] = zf[ch];
      }
      if (c + 32 < nchunks) gemv_load_chunk<S>(p, qrow, n, valid, k0 + int64_t(c + 32) * VPC, w, sc, zf);
#pragma unroll
      for (int wd = 0; wd < 4; ++wd) {
#pragma unroll
        for (int h = 0; h < VPW / 4; ++h) {
          const int kk = c * VPC + wd * VPW + h * 4;  // local column of this quad
          float wv[kGemvCpw][4];                      // the quad's weights of each channel
#pragma unroll
          for (int ch = 0; ch < kGemvCpw; ++ch) {
            const uint32_t word = word_of(cw[ch], wd);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              if (S == kQuantInt4)
                wv[ch][e] = (int4_biased(word, h * 4 + e) - czf[ch]) * csc[ch];  // (q - z) * s exactly
              else
                wv[ch][e] = int8_biased(word, e) - kInt8Bias;  // q (scale at the end)
            }
          }
#pragma unroll
          for (int m = 0; m < MR; ++m) {
            if (m < M) {
              const float4 xv = *reinterpret_cast<const float4*>(xs + m * ldx + xpad(kk));
#pragma unroll
              for (int ch = 0; ch < kGemvCpw; ++ch) {
                float a = acc[ch][m];
                a = fmaf(wv[ch][0], xv.x, a);
                a = fmaf(wv[ch][1], xv.y, a);
                a = fmaf(wv[ch][2], xv.z, a);
                a = fmaf(wv[ch][3], xv.w, a);
                acc[ch][m] = a;
              }
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int ch = 0; ch < kGemvCpw; ++ch)
#pragma unroll
    for (int m = 0; m < MR; ++m)
      if (m < M) {
        const float v = warp_sum(acc[ch][m]);
        if (valid[ch] && lane == ch * kGemvMaxM + m) store_wa16<T, S>(p, m, n[ch], v);
      }
}

// ------------------------------------------------------------------ w8a8: activation quantization

template <class T>
__global__ void __launch_bounds__(kQuantThreads) quantize_rows_kernel(const Params p) {
  __shared__ float red[kQuantThreads / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t m = blockIdx.x;
  const T* row = static_cast<const T*>(p.x) + m * p.sx;
  float amax = 0.f;
  for (int64_t k = tid; k < p.K; k += kQuantThreads) amax = max_nan(amax, fabsf(to_float(row[k])));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (lane == 0) red[warp] = amax;
  __syncthreads();
  amax = red[0];
#pragma unroll
  for (int i = 1; i < kQuantThreads / 32; ++i) amax = max_nan(amax, red[i]);
  // amax / 127 as PyTorch computes it on CUDA tensors: a tensor divided by a Python number is
  // multiplied by the float reciprocal (BinaryDivTrueKernel.cu), which differs from true division
  // in the last bit for ~4% of values (PyTorch's CPU kernel divides). x / s below is a true
  // division on both devices.
  float s = __fmul_rn(amax, kInv127);
  if (s == 0.f) s = 1.f;  // all-zero row, as torch.where(s > 0, s, 1)
  if (!(amax <= 3.402823466e38f)) s = __int_as_float(0x7fc00000);  // NaN or inf: NaN outputs
  if (tid == 0) p.xscale[m] = s;
  int8_t* qrow = p.xq + m * p.kp;
  for (int64_t k = tid; k < p.kp; k += kQuantThreads) {
    float v = 0.f;
    if (k < p.K) v = fminf(fmaxf(rintf(__fdiv_rn(to_float(row[k]), s)), -127.f), 127.f);
    qrow[k] = static_cast<int8_t>(static_cast<int>(v));
  }
}

// ------------------------------------------------------------------ GEMV, w8a8 (M <= 8)

template <class T, int MR>
__global__ void __launch_bounds__(kGemvThreads) gemv_w8a8_kernel(const Params p) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int M = int(p.M);
  int64_t n[kGemvCpw];
  bool valid[kGemvCpw];
  const uint8_t* qrow[kGemvCpw];
#pragma unroll
  for (int ch = 0; ch < kGemvCpw; ++ch) {
    n[ch] = (int64_t(blockIdx.x) * kGemvWarps + warp) * kGemvCpw + ch;
    valid[ch] = n[ch] < p.N;
    if (!valid[ch]) n[ch] = 0;
    qrow[ch] = p.q + n[ch] * p.q_row_bytes;
  }
  int acc[kGemvCpw][MR];
#pragma unroll
  for (int ch = 0; ch < kGemvCpw; ++ch)
#pragma unroll
    for (int m = 0; m < MR; ++m) acc[ch][m] = 0;

  const int64_t nchunks = p.kp / 16;  // the quantized rows are zero-padded to kp, weights read 0 past K
  uint4 w[kGemvCpw];
#pragma unroll
  for (int ch = 0; ch < kGemvCpw; ++ch)
    w[ch] = (valid[ch] && lane < nchunks) ? load16(qrow[ch], int64_t(lane) * 16, p.q_row_bytes, p.qvec)
                                          : make_uint4(0u, 0u, 0u, 0u);
  for (int64_t c = lane; c < nchunks; c += 32) {
    uint4 cw[kGemvCpw];
#pragma unroll
    for (int ch = 0; ch < kGemvCpw; ++ch) cw[ch] = w[ch];
    if (c + 32 < nchunks) {
#pragma unroll
      for (int ch = 0; ch < kGemvCpw; ++ch)
        w[ch] = valid[ch] ? load16(qrow[ch], (c + 32) * 16, p.q_row_bytes, p.qvec)
                          : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      if (m < M) {
        const uint4 a = __ldg(reinterpret_cast<const uint4*>(p.xq + m * p.kp + c * 16));
#pragma unroll
        for (int ch = 0; ch < kGemvCpw; ++ch) {
          int s = acc[ch][m];
          s = __dp4a(int(cw[ch].x), int(a.x), s);
          s = __dp4a(int(cw[ch].y), int(a.y), s);
          s = __dp4a(int(cw[ch].z), int(a.z), s);
          s = __dp4a(int(cw[ch].w), int(a.w), s);
          acc[ch][m] = s;
        }
      }
    }
  }

#pragma unroll
  for (int ch = 0; ch < kGemvCpw; ++ch)
#pragma unroll
    for (int m = 0; m < MR; ++m)
      if (m < M) {
        const int v = warp_sum(acc[ch][m]);
        if (valid[ch] && lane == ch * kGemvMaxM + m) store_w8a8<T>(p, m, n[ch], v);
      }
}

// ------------------------------------------------------------------ GEMM, A16 (M > 8)

template <class T> using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <class T> using FragBt = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
using FragA8 = wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major>;
using FragBt8 = wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major>;
using FragC32 = wmma::fragment<wmma::accumulator, 16, 16, 16, int>;

// Thread roles in the 64 x 64 tile loads (128 threads):
//   x / int8 activation tiles: 256 chunks of 16 bytes, chunk i = tid + 128 j (j = 0, 1) is row
//   i / 4, 16-byte column i % 4 (T tiles: 8 elements; int8 tiles: the k-slice).
//   A16 weight tile: row tid / 2, 16 values from column (tid % 2) * 16.
template <class T, int S>
__global__ void __launch_bounds__(kGemmThreads) gemm_wa16_kernel(const Params p) {
  __shared__ __align__(128) unsigned char smem[kSmemWa16];
  T* sA = reinterpret_cast<T*>(smem);           // [2][64][kLDh]: x tiles
  T* sB = sA + 2 * kBM * kLDh;                  // [2][64][kLDh]: weight tiles (row n, column k)
  float* sC = reinterpret_cast<float*>(smem);   // [64][kLDC] after the main loop
  const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
  const int64_t m0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;
  const int64_t K = p.K;
  const T* x = static_cast<const T*>(p.x);

  const T* arow[2];
  bool avalid[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int64_t m = m0 + ((tid + kGemmThreads * j) >> 2);
    avalid[j] = m < p.M;
    arow[j] = x + (avalid[j] ? m : 0) * p.sx;
  }
  const int br = tid >> 1, bc = (tid & 1) * 16;
  const bool bvalid = n0 + br < p.N;
  const int64_t bn = bvalid ? n0 + br : 0;
  const uint8_t* brow = p.q + bn * p.q_row_bytes;

  uint4 ra[2];
  uint4 rb8 = make_uint4(0u, 0u, 0u, 0u);
  uint2 rb4 = make_uint2(0u, 0u);
  float rs = 0.f, rz = kMagic;
  auto load_global = [&](int64_t k0) {
#pragma unroll
    for (int j = 0; j < 2; ++j)
      ra[j] = avalid[j] ? load_x8(arow[j], k0 + ((tid + kGemmThreads * j) & 3) * 8, K, p.xvec)
                        : make_uint4(0u, 0u, 0u, 0u);
    const int64_t kb = k0 + bc;
    if (S == kQuantInt4) {
      // K is a multiple of the group (>= 32), so kb < K and the 16 values share one group.
      rb4 = bvalid ? load8(brow, kb / 2, p.q_row_bytes, p.qvec) : make_uint2(0u, 0u);
      const int64_t gi = bn * p.groups + (kb >> p.group_shift);
      rs = (bvalid && kb < K) ? __ldg(p.scales + gi) : 0.f;
      rz = kMagic + ((bvalid && kb < K) ? float(__ldg(p.zeros + gi)) : 0.f);
    } else {
      rb8 = bvalid ? load16(brow, kb, p.q_row_bytes, p.qvec) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  auto store_shared = [&](int buf) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int i = tid + kGemmThreads * j;
      *reinterpret_cast<uint4*>(sA + buf * kBM * kLDh + (i >> 2) * kLDh + (i & 3) * 8) = ra[j];
    }
    uint32_t packed[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float v0, v1;
      if (S == kQuantInt4) {
        const uint32_t word = e < 4 ? rb4.x : rb4.y;
        v0 = (int4_biased(word, (2 * e) % 8) - rz) * rs;
        v1 = (int4_biased(word, (2 * e + 1) % 8) - rz) * rs;
      } else {
        const uint32_t word = word_of(rb8, e / 2);
        v0 = int8_biased(word, (2 * e) % 4) - kInt8Bias;
        v1 = int8_biased(word, (2 * e + 1) % 4) - kInt8Bias;
      }
      packed[e] = pack2<T>(v0, v1);
    }
    T* dst = sB + buf * kBN * kLDh + br * kLDh + bc;
    reinterpret_cast<uint4*>(dst)[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    reinterpret_cast<uint4*>(dst)[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
  };

  FragC acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  const int64_t nk = (K + kBKh - 1) / kBKh;
  if (nk > 0) {
    load_global(0);
    store_shared(0);
  }
  __syncthreads();
  for (int64_t kt = 0; kt < nk; ++kt) {
    const int buf = int(kt & 1);
    if (kt + 1 < nk) load_global((kt + 1) * kBKh);  // in flight during the MMAs
    const T* a = sA + buf * kBM * kLDh;
    const T* b = sB + buf * kBN * kLDh;
#pragma unroll
    for (int kk = 0; kk < kBKh / 16; ++kk) {
      FragA<T> fa[2];
      FragBt<T> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], a + (wm * 32 + i * 16) * kLDh + kk * 16, kLDh);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], b + (wn * 32 + j * 16) * kLDh + kk * 16, kLDh);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    // The other buffer was last read in iteration kt - 1, which every warp finished before the
    // barrier that ended it.
    if (kt + 1 < nk) store_shared(buf ^ 1);
    __syncthreads();
  }

  // The barrier above (or the one before the loop) ends every read of the tiles sC overwrites.
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(sC + (wm * 32 + i * 16) * kLDC + wn * 32 + j * 16, acc[i][j], kLDC,
                              wmma::mem_row_major);
  __syncthreads();
  for (int idx = tid; idx < kBM * kBN; idx += kGemmThreads) {
    const int r = idx / kBN, c = idx % kBN;
    if (m0 + r < p.M && n0 + c < p.N) store_wa16<T, S>(p, m0 + r, n0 + c, sC[r * kLDC + c]);
  }
}

// ------------------------------------------------------------------ GEMM, w8a8 (M > 8)

template <class T>
__global__ void __launch_bounds__(kGemmThreads) gemm_w8a8_kernel(const Params p) {
  constexpr int kSlices = kBK8 / 16;
  __shared__ __align__(128) unsigned char smem[kSmemW8a8];
  int8_t* sA = reinterpret_cast<int8_t*>(smem);  // [2][kSlices][64][16]: quantized x
  int8_t* sB = sA + 2 * kTile8;                  // [2][kSlices][64][16]: weights (row n)
  int* sC = reinterpret_cast<int*>(smem);        // [64][kLDC] after the main loop
  const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
  const int64_t m0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;

  const int8_t* arow[2];
  const uint8_t* brow[2];
  bool avalid[2], bvalid[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int r = (tid + kGemmThreads * j) >> 2;
    avalid[j] = m0 + r < p.M;
    arow[j] = p.xq + (avalid[j] ? m0 + r : 0) * p.kp;
    bvalid[j] = n0 + r < p.N;
    brow[j] = p.q + (bvalid[j] ? n0 + r : 0) * p.q_row_bytes;
  }
  uint4 ra[2], rb[2];
  auto load_global = [&](int64_t k0) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t k = k0 + ((tid + kGemmThreads * j) & 3) * 16;
      // kp is a multiple of 16 and the workspace rows are 16-byte aligned (checked on the host).
      ra[j] = (avalid[j] && k < p.kp) ? __ldg(reinterpret_cast<const uint4*>(arow[j] + k))
                                      : make_uint4(0u, 0u, 0u, 0u);
      rb[j] = bvalid[j] ? load16(brow[j], k, p.q_row_bytes, p.qvec) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  auto store_shared = [&](int buf) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int i = tid + kGemmThreads * j;
      const int off = buf * int(kTile8) + (i & 3) * kBM * 16 + (i >> 2) * 16;
      *reinterpret_cast<uint4*>(sA + off) = ra[j];
      *reinterpret_cast<uint4*>(sB + off) = rb[j];
    }
  };

  FragC32 acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0);

  const int64_t nk = (p.kp + kBK8 - 1) / kBK8;
  if (nk > 0) {
    load_global(0);
    store_shared(0);
  }
  __syncthreads();
  for (int64_t kt = 0; kt < nk; ++kt) {
    const int buf = int(kt & 1);
    if (kt + 1 < nk) load_global((kt + 1) * kBK8);
    const int8_t* a = sA + buf * kTile8;
    const int8_t* b = sB + buf * kTile8;
#pragma unroll
    for (int s = 0; s < kSlices; ++s) {
      // Each k-slice is a (64 x 16) block with 16-byte rows, so every fragment pointer is
      // 256-bit aligned (WMMA's requirement) and 16 consecutive rows are 256 contiguous bytes.
      FragA8 fa[2];
      FragBt8 fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const signed char*>(a + s * kBM * 16 + (wm * 32 + i * 16) * 16), 16);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(fb[j], reinterpret_cast<const signed char*>(b + s * kBN * 16 + (wn * 32 + j * 16) * 16), 16);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    if (kt + 1 < nk) store_shared(buf ^ 1);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(sC + (wm * 32 + i * 16) * kLDC + wn * 32 + j * 16, acc[i][j], kLDC,
                              wmma::mem_row_major);
  __syncthreads();
  for (int idx = tid; idx < kBM * kBN; idx += kGemmThreads) {
    const int r = idx / kBN, c = idx % kBN;
    if (m0 + r < p.M && n0 + c < p.N) store_w8a8<T>(p, m0 + r, n0 + c, sC[r * kLDC + c]);
  }
}

// ------------------------------------------------------------------ host side

void cuda_check(cudaError_t e, const char* what) {
  LLMK_CHECK(e == cudaSuccess, "CUDA quant_matmul: " << what << " failed: " << cudaGetErrorString(e));
}

const char* scheme_name(int s) {
  return s == kQuantInt8 ? "int8" : s == kQuantInt4 ? "int4" : s == kQuantW8A8 ? "w8a8" : "?";
}

bool aligned(const void* ptr, size_t a) { return reinterpret_cast<uintptr_t>(ptr) % a == 0; }

// A view with the given rank and dtype, non-negative sizes/strides, and (when not empty) a
// non-null pointer aligned to its element size.
void check_view(const TensorView& t, const char* name, int ndim, DType dtype) {
  LLMK_CHECK(t.defined(), "quant_matmul_cuda: " << name << " is required");
  LLMK_CHECK(t.ndim == ndim, "quant_matmul_cuda: " << name << " must be " << ndim << "-D, got "
                                                   << t.ndim << "-D");
  LLMK_CHECK(t.dtype == dtype, "quant_matmul_cuda: " << name << " must have dtype " << dtype_name(dtype)
                                                     << ", got " << dtype_name(t.dtype));
  for (int d = 0; d < ndim; ++d)
    LLMK_CHECK(t.sizes[d] >= 0 && t.strides[d] >= 0, "quant_matmul_cuda: " << name << ": bad sizes/strides");
  LLMK_CHECK(t.numel() == 0 || (t.data != nullptr && aligned(t.data, size_t(dtype_bytes(dtype)))),
             "quant_matmul_cuda: " << name << ": null or misaligned data pointer");
}

void check_shape(const TensorView& t, const char* name, int64_t d0, int64_t d1 = -1) {
  const bool ok = t.sizes[0] == d0 && (t.ndim < 2 || t.sizes[1] == d1);
  LLMK_CHECK(ok, "quant_matmul_cuda: " << name << " must have shape (" << d0
                                       << (t.ndim < 2 ? std::string(",)") : ", " + std::to_string(d1) + ")")
                                       << ", got (" << t.sizes[0]
                                       << (t.ndim < 2 ? std::string(",)") : ", " + std::to_string(t.sizes[1]) + ")"));
}

// Row-major contiguous (strides of size-1 dims do not matter).
void check_contiguous(const TensorView& t, const char* name) {
  int64_t expect = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    LLMK_CHECK(t.sizes[d] <= 1 || t.strides[d] == expect, "quant_matmul_cuda: " << name << " must be contiguous");
    expect *= t.sizes[d];
  }
}

// The GEMV with room for MR rows of x (M <= MR): its sums and loops sized at compile time, so
// that decoding's one row does not hold eight rows' registers nor test seven empty ones per
// quad (ptxas -v, sm_90, bf16, one row: w8a8 103 -> 72 registers; the A16 kernels see
// gemv_min_blocks). Not yet timed on a GPU.
template <class T, int MR>
void launch_gemv(int scheme, const Params& p, dim3 grid, cudaStream_t stream) {
  if (scheme == kQuantInt8) gemv_wa16_kernel<T, kQuantInt8, MR><<<grid, kGemvThreads, 0, stream>>>(p);
  else if (scheme == kQuantInt4) gemv_wa16_kernel<T, kQuantInt4, MR><<<grid, kGemvThreads, 0, stream>>>(p);
  else gemv_w8a8_kernel<T, MR><<<grid, kGemvThreads, 0, stream>>>(p);
}

template <class T>
void launch_all(int scheme, Params& p, cudaStream_t stream) {
  const bool gemv = p.M <= kGemvMaxM;
  if (scheme == kQuantW8A8) {
    quantize_rows_kernel<T><<<dim3(unsigned(p.M)), dim3(kQuantThreads), 0, stream>>>(p);
    cuda_check(cudaGetLastError(), "w8a8 activation quantization kernel launch");
  }
  if (gemv) {
    const dim3 grid(unsigned((p.N + kGemvChannels - 1) / kGemvChannels));
    if (p.M == 1) launch_gemv<T, 1>(scheme, p, grid, stream);
    else if (p.M == 2) launch_gemv<T, 2>(scheme, p, grid, stream);
    else if (p.M <= 4) launch_gemv<T, 4>(scheme, p, grid, stream);
    else launch_gemv<T, kGemvMaxM>(scheme, p, grid, stream);
    cuda_check(cudaGetLastError(), "quant_matmul GEMV kernel launch");
  } else {
    const dim3 grid(unsigned((p.M + kBM - 1) / kBM), unsigned((p.N + kBN - 1) / kBN));
    if (scheme == kQuantInt8) gemm_wa16_kernel<T, kQuantInt8><<<grid, kGemmThreads, 0, stream>>>(p);
    else if (scheme == kQuantInt4) gemm_wa16_kernel<T, kQuantInt4><<<grid, kGemmThreads, 0, stream>>>(p);
    else gemm_w8a8_kernel<T><<<grid, kGemmThreads, 0, stream>>>(p);
    cuda_check(cudaGetLastError(), "quant_matmul GEMM kernel launch");
  }
}

}  // namespace

int64_t quant_matmul_cuda_workspace_bytes(int scheme, int64_t M, int64_t K) {
  LLMK_CHECK(scheme == kQuantInt8 || scheme == kQuantInt4 || scheme == kQuantW8A8,
             "quant_matmul_cuda_workspace_bytes: unknown scheme " << scheme << " (0 int8, 1 int4, 2 w8a8)");
  LLMK_CHECK(M >= 0 && K >= 0 && M <= INT32_MAX && K <= INT32_MAX,
             "quant_matmul_cuda_workspace_bytes: M and K must be in [0, 2^31), got " << M << ", " << K);
  if (scheme != kQuantW8A8 || M == 0) return 0;
  return w8a8_scale_offset(M, K) + 4 * M;
}

void quant_matmul_cuda(int scheme, const TensorView& x, const TensorView& qdata,
                       const TensorView& scales, const TensorView& zeros, const TensorView& bias,
                       const TensorView& out, uintptr_t workspace, int64_t group_size,
                       uintptr_t stream) {
  LLMK_CHECK(scheme == kQuantInt8 || scheme == kQuantInt4 || scheme == kQuantW8A8,
             "quant_matmul_cuda: unknown scheme " << scheme << " (0 int8, 1 int4, 2 w8a8)");
  const bool int4 = scheme == kQuantInt4;

  // x: (M, K) float16/bfloat16, unit last stride.
  LLMK_CHECK(x.defined(), "quant_matmul_cuda: x is required");
  LLMK_CHECK(x.dtype == DType::f16 || x.dtype == DType::bf16,
             "quant_matmul_cuda: x must be float16 or bfloat16, got " << dtype_name(x.dtype));
  check_view(x, "x", 2, x.dtype);
  const int64_t M = x.sizes[0], K = x.sizes[1];
  LLMK_CHECK(x.strides[1] == 1 || K <= 1, "quant_matmul_cuda: x must have unit stride along K");
  LLMK_CHECK(M <= INT32_MAX && K <= INT32_MAX, "quant_matmul_cuda: x is too large (M, K < 2^31)");

  // qdata: contiguous int8 (N, K) or uint8 (N, K / 2).
  check_view(qdata, "qdata", 2, int4 ? DType::u8 : DType::i8);
  const int64_t N = qdata.sizes[0];
  // the GEMM's grid has N / kBN blocks in y (at most 65535); the GEMV's are in x
  LLMK_CHECK(M <= kGemvMaxM || N <= int64_t(kBN) * 65535,
             "quant_matmul_cuda: N = " << N << " is too large for more than " << kGemvMaxM
                                      << " rows (at most " << int64_t(kBN) * 65535 << ")");
  int64_t groups = 0;
  int group_shift = 0;
  if (int4) {
    LLMK_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
               "quant_matmul_cuda: int4 group_size must be 32, 64 or 128, got " << group_size);
    LLMK_CHECK(K % 2 == 0, "quant_matmul_cuda: int4 needs an even K, got " << K);
    LLMK_CHECK(K % group_size == 0,
               "quant_matmul_cuda: K = " << K << " is not a multiple of group_size = " << group_size);
    groups = K / group_size;
    group_shift = group_size == 32 ? 5 : group_size == 64 ? 6 : 7;
    check_shape(qdata, "qdata", N, K / 2);
  } else {
    check_shape(qdata, "qdata", N, K);
  }
  check_contiguous(qdata, "qdata");

  // scales, zeros.
  if (int4) {
    check_view(scales, "scales", 2, DType::f32);
    check_shape(scales, "scales", N, groups);
    check_contiguous(scales, "scales");
    check_view(zeros, "zeros", 2, DType::u8);
    check_shape(zeros, "zeros", N, groups);
    check_contiguous(zeros, "zeros");
  } else {
    check_view(scales, "scales", 1, DType::f32);
    check_shape(scales, "scales", N);
    check_contiguous(scales, "scales");
    LLMK_CHECK(!zeros.defined(), "quant_matmul_cuda: zeros must be None for the " << scheme_name(scheme)
                                                                                   << " scheme");
  }
  if (bias.defined()) {
    check_view(bias, "bias", 1, x.dtype);
    check_shape(bias, "bias", N);
    check_contiguous(bias, "bias");
  }

  // out: (M, N) in x's dtype, unit last stride, rows that do not overlap.
  check_view(out, "out", 2, x.dtype);
  check_shape(out, "out", M, N);
  LLMK_CHECK(out.strides[1] == 1 || N <= 1, "quant_matmul_cuda: out must have unit stride along N");
  LLMK_CHECK(out.strides[0] >= N || M <= 1, "quant_matmul_cuda: out rows overlap (row stride "
                                                << out.strides[0] << " < N = " << N << ")");

  const int64_t ws_bytes = quant_matmul_cuda_workspace_bytes(scheme, M, K);
  if (scheme == kQuantW8A8) {
    LLMK_CHECK(K <= kW8A8MaxK, "quant_matmul_cuda: w8a8 supports K <= " << kW8A8MaxK
                                                                        << " (exact int32 sums), got " << K);
    LLMK_CHECK(ws_bytes == 0 || (workspace != 0 && workspace % 16 == 0),
               "quant_matmul_cuda: w8a8 needs a 16-byte aligned workspace of " << ws_bytes << " bytes");
  }
  if (M == 0 || N == 0) return;

  Params p{};
  p.x = x.data;
  p.sx = M > 1 ? x.strides[0] : 0;
  p.q = static_cast<const uint8_t*>(qdata.data);
  p.q_row_bytes = int4 ? K / 2 : K;
  p.scales = static_cast<const float*>(scales.data);
  p.zeros = int4 ? static_cast<const uint8_t*>(zeros.data) : nullptr;
  p.groups = groups;
  p.group_shift = group_shift;
  p.bias = bias.defined() ? bias.data : nullptr;
  p.out = out.data;
  p.so = M > 1 ? out.strides[0] : 0;
  if (scheme == kQuantW8A8) {
    p.xq = reinterpret_cast<int8_t*>(workspace);
    p.xscale = reinterpret_cast<float*>(workspace + uintptr_t(w8a8_scale_offset(M, K)));
    p.kp = w8a8_kpad(K);
  }
  p.M = M;
  p.N = N;
  p.K = K;
  p.kc = gemv_kc(std::min<int64_t>(M, kGemvMaxM));
  p.xvec = aligned(x.data, 16) && p.sx % 8 == 0;
  p.qvec = aligned(qdata.data, 16) && p.q_row_bytes % 16 == 0;

  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (x.dtype == DType::f16) launch_all<half>(scheme, p, s);
  else launch_all<__nv_bfloat16>(scheme, p, s);
}

std::string quant_matmul_cuda_host_selftest() {
  std::ostringstream err;
  // int4: element i of a little-endian word is byte i/2's low (even i) or high (odd i) nibble,
  // the packing of quantize_int4_reference; every nibble value round-trips exactly.
  for (uint32_t b0 = 0; b0 < 256; ++b0)
    for (int i = 0; i < 8; ++i) {
      const uint8_t bytes[4] = {uint8_t(b0), uint8_t(255 - b0), uint8_t(b0 * 7), uint8_t(b0 ^ 0x5A)};
      uint32_t word;
      std::memcpy(&word, bytes, 4);
      const int expect = (i % 2 == 0) ? (bytes[i / 2] & 0xF) : (bytes[i / 2] >> 4);
      for (int z = 0; z < 16; ++z) {
        const float got = int4_biased(word, i) - (kMagic + float(z));
        if (got != float(expect - z)) {
          err << "int4 element " << i << " of word " << word << " minus zero " << z << ": " << got
              << " != " << expect - z;
          return err.str();
        }
      }
    }
  // int8: byte i of a word as the signed value.
  for (int v = -128; v < 128; ++v)
    for (int i = 0; i < 4; ++i) {
      const uint32_t word = (uint32_t(uint8_t(int8_t(v))) << (8 * i)) | (i == 0 ? 0x7F000000u : 0x80u);
      const float got = int8_biased(word, i) - kInt8Bias;
      if (got != float(v)) {
        err << "int8 byte " << i << " value " << v << ": " << got;
        return err.str();
      }
    }
  // Shared-memory padding: 8-column groups stay contiguous; a quarter-warp's 16-byte reads of
  // the GEMV (lane L at column 32L for int4, 16L for int8, plus a common offset) hit 8 distinct
  // 16-byte bank groups.
  for (int k = 0; k < 4096; k += 8)
    if (xpad(k + 7) != xpad(k) + 7 || xpad(k) % 4 != 0) {
      err << "xpad breaks the 8-column group at " << k;
      return err.str();
    }
  for (int vpc : {16, 32})
    for (int base = 0; base < 32; base += 8)
      for (int off = 0; off < vpc; off += 4) {
        bool seen[8] = {};
        for (int l = base; l < base + 8; ++l) {
          const int slot = (xpad(l * vpc + off) / 4) % 8;
          if (seen[slot]) {
            err << "bank conflict: chunk " << vpc << " lanes " << base << ".. offset " << off;
            return err.str();
          }
          seen[slot] = true;
        }
      }
  // Slices fit the shared buffer for every M of the GEMV.
  for (int64_t m = 1; m <= kGemvMaxM; ++m) {
    const int kc = gemv_kc(m);
    if (kc < 32 || kc % 32 != 0 || m * xpad(kc) > kGemvSmemFloats) {
      err << "gemv slice " << kc << " for M = " << m;
      return err.str();
    }
  }
  // The reciprocal PyTorch multiplies by for "tensor / 127.0" on CUDA: float(1.0) / float(127.0).
  {
    volatile float one = 1.0f, d = 127.0f;  // computed at run time, IEEE division
    if (kInv127 != one / d || kInv127 != float(1.0 / 127.0)) {
      err << "1/127 constant " << kInv127;
      return err.str();
    }
  }
  // Workspace: the int8 rows, then 16-byte aligned float scales.
  for (int64_t m : {1, 3, 9, 100})
    for (int64_t k : {0, 1, 15, 16, 17, 4096}) {
      const int64_t kp = w8a8_kpad(k), off = w8a8_scale_offset(m, k);
      const int64_t bytes = quant_matmul_cuda_workspace_bytes(kQuantW8A8, m, k);
      if (kp % 16 != 0 || kp < k || kp >= k + 16 || off < m * kp || off % 16 != 0 || bytes != off + 4 * m) {
        err << "w8a8 workspace layout for M = " << m << ", K = " << k;
        return err.str();
      }
    }
  return std::string();
}

}  // namespace cuda
}  // namespace llmk
