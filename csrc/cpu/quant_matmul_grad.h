// The input gradient of the CPU quantized matmul, compiled once per tier (included at the end
// of quant_matmul_impl.h, inside its tier namespace, for the weight panel fillers):
// grad_x (M, K) float32 = grad_out (M, N) (float32 or bfloat16) @ dequantize(W) (N, K).
//
// Work items are (rows chunk, K chunk) blocks of grad_x. An item walks N a block of weight
// rows at a time: it dequantizes those rows' slice of its K chunk into a float panel (in L2),
// one pass over the packed weight, and multiplies the grad_out block against it with the
// register-tiled float32 FMA of micro_gemm.h. The float weight is never formed whole: the
// Python backward did that a 16 MiB slice at a time, three or four passes over float memory
// per weight value before the matmul started.
//  - int8 / w8a8 (straight through w8a8's activation rounding): q * scale, in K's order.
//  - int4: (q - zero) * scale in fill_int4's order (each 32 values as their 16 even then 16
//    odd elements, the low and high nibbles); the item's output columns come out in that
//    order too, and are put back in place when written.
//  - bfloat16 grad_out on CPUs with AVX512-BF16: the panel is rounded to bf16 pairs and the
//    products are vdpbf16ps (twice the float32 FMA rate; each weight rounded to bf16 as in
//    torch's bf16 matmul, sums in float32); elsewhere a block of grad_out is widened to float.
#pragma once
#include "micro_gemm.h"

namespace llmk {
namespace LLMK_ISA_NS {

namespace {

constexpr int64_t kGradRows = 96;    // grad_out rows per item (16 register tiles of 6)
constexpr int64_t kGradK = 256;      // columns of grad_x per item: a multiple of every group
constexpr int64_t kGradN = 256;      // weight rows per panel: 256 x 256 floats, 256 KiB

// Per thread: the float panel, the item's output block, a block of grad_out (float, or bf16
// pairs), the panel as bf16 pairs.
int64_t grad_scratch_floats() {
  return kGradN * kGradK + kGradRows * kGradK + kGradRows * kGradN + kGradN / 2 * kGradK;
}

struct GradCtx {
  const QuantMatmulParams* p;  // x: grad_out (M, N); out: grad_x (M, K), float32
  Ctx c;                       // what fill_int4 reads: p, K, groups
  int64_t M, N, K, chunks_k;
  float* scratch;              // per thread: the panel, then the item's output block
};

// Weight rows [n0, n0 + nb) times scale over [k0, k0 + len), zero-padded to ld floats.
void grad_fill_int8(const GradCtx& g, int64_t n0, int64_t nb, int64_t k0, int64_t len,
                    float* panel, int64_t ld) {
  for (int64_t j = 0; j < nb; ++j) {
    const int8_t* w = g.p->qdata.ptr<int8_t>() + (n0 + j) * g.K + k0;
    const float scale = g.p->scales.ptr<float>()[n0 + j];
    const vf s = splat(scale);
    float* dst = panel + j * ld;
    int64_t k = 0;
    for (; k + W <= len; k += W) storeu(dst + k, widen_i8(w + k) * s);
    for (; k < len; ++k) dst[k] = float(w[k]) * scale;
    for (; k < ld; ++k) dst[k] = 0.f;
  }
}

void grad_item(void* ctx, int64_t item, int thread) {
  const GradCtx& g = *static_cast<const GradCtx*>(ctx);
  const QuantMatmulParams& p = *g.p;
  const int64_t m0 = (item / g.chunks_k) * kGradRows, mb = std::min(kGradRows, g.M - m0);
  const int64_t k0 = (item % g.chunks_k) * kGradK, len = std::min(kGradK, g.K - k0);
  const int64_t ld = round_up(len, W);  // gemm's columns: whole vectors
  float* panel = g.scratch + thread * grad_scratch_floats();
  float* block = panel + kGradN * kGradK;  // (mb, ld)
  float* a_buf = block + kGradRows * kGradK;
  uint32_t* pairs = reinterpret_cast<uint32_t*>(a_buf + kGradRows * kGradN);
  const bool int4 = p.scheme == QuantScheme::int4, bf16 = p.x.dtype == DType::bf16;
  const int64_t sm = p.x.strides[0], sn = p.x.strides[1];
  for (int64_t n0 = 0; n0 < g.N; n0 += kGradN) {
    const int64_t nb = std::min(kGradN, g.N - n0), nb2 = (nb + 1) / 2;
    if (int4) {
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t n = n0 + j;
        fill_int4<1>(g.c, &n, k0, k0 + len, panel + j * ld, ld);
      }
    } else {
      grad_fill_int8(g, n0, nb, k0, len, panel, ld);
    }
    if (!bf16) {
      gemm(mb, ld, nb, p.x.ptr<float>() + m0 * sm + n0 * sn, sm, sn, panel, ld, block, ld,
           n0 > 0);
      continue;
    }
    const uint16_t* gb = p.x.ptr<uint16_t>() + m0 * sm + n0 * sn;
    if constexpr (kBf16Dot) {  // grad_out as pairs along N (an odd last one padded with zero)
      uint32_t* a2 = reinterpret_cast<uint32_t*>(a_buf);
      for (int64_t i = 0; i < mb; ++i)
        for (int64_t j2 = 0; j2 < nb2; ++j2) {
          const uint16_t lo = gb[i * sm + 2 * j2 * sn];
          const uint16_t hi = 2 * j2 + 1 < nb ? gb[i * sm + (2 * j2 + 1) * sn] : uint16_t(0);
          a2[i * nb2 + j2] = pair(lo, hi);
        }
      rows_to_bf16_pairs(panel, ld, nb, ld, pairs, ld);
      gemm_bf16_dot(mb, ld, nb2, a2, nb2, 1, pairs, ld, block, ld, n0 > 0);
    } else {
      for (int64_t i = 0; i < mb; ++i)
        for (int64_t j = 0; j < nb; ++j) a_buf[i * nb + j] = bf16_to_f32(gb[i * sm + j * sn]);
      gemm(mb, ld, nb, a_buf, nb, 1, panel, ld, block, ld, n0 > 0);
    }
  }
  float* out = p.out.ptr<float>();
  const int64_t so = p.out.strides[0], sk = p.out.strides[1];
  for (int64_t i = 0; i < mb; ++i) {
    const float* src = block + i * ld;
    float* dst = out + (m0 + i) * so + k0 * sk;
    if (!int4) {
      for (int64_t k = 0; k < len; ++k) dst[k * sk] = src[k];
      continue;
    }
    for (int64_t kb = 0; kb < len; kb += 32)  // 16 even, then 16 odd elements
      for (int64_t e = 0; e < 16; ++e) {
        dst[(kb + 2 * e) * sk] = src[kb + e];
        dst[(kb + 2 * e + 1) * sk] = src[kb + 16 + e];
      }
  }
}

GradCtx grad_ctx(const QuantMatmulParams& p) {
  GradCtx g{};
  g.p = &p;
  g.M = p.x.sizes[0];
  g.N = p.x.sizes[1];
  g.K = p.out.sizes[1];
  g.chunks_k = (g.K + kGradK - 1) / kGradK;
  g.c.p = &p;
  g.c.K = g.K;
  g.c.groups = p.scheme == QuantScheme::int4 ? g.K / p.group_size : 0;
  return g;
}

int64_t grad_items(const GradCtx& g) { return (g.M + kGradRows - 1) / kGradRows * g.chunks_k; }

// Weight bytes times rows stands for the work, as in run().
int grad_threads(const GradCtx& g) {
  const int threads =
      threads_for(g.p->qdata.numel() * g.M, g.p->num_threads, quant_bytes_per_thread());
  return int(std::min<int64_t>(threads, grad_items(g)));
}

}  // namespace

int64_t grad_x_workspace_bytes(const QuantMatmulParams& p) {
  const GradCtx g = grad_ctx(p);
  return g.M == 0 || g.K == 0 ? 0 : grad_threads(g) * grad_scratch_floats() * 4 + 64;
}

void run_grad_x(const QuantMatmulParams& p, void* workspace) {
  GradCtx g = grad_ctx(p);
  if (g.M == 0 || g.K == 0) return;
  if (g.N == 0) {  // an empty sum
    float* out = p.out.ptr<float>();
    for (int64_t i = 0; i < g.M; ++i)
      for (int64_t k = 0; k < g.K; ++k) out[i * p.out.strides[0] + k * p.out.strides[1]] = 0.f;
    return;
  }
  g.scratch = reinterpret_cast<float*>(round_up(reinterpret_cast<int64_t>(workspace), 64));
  parallel_for(grad_items(g), grad_threads(g), grad_item, &g);
}

}  // namespace LLMK_ISA_NS
}  // namespace llmk
