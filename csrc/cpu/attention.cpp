// Tier dispatch and argument checks for the CPU attention kernel.
#include "attention.h"

#include <atomic>
#include <cstring>

#include "../common/checks.h"

namespace llmk {

namespace {

bool is_float(DType t) { return t == DType::f32 || t == DType::bf16 || t == DType::f16; }

void check_view(const TensorView& t, const char* name, int ndim) {
  LLMK_CHECK(t.ndim == ndim, name << " must be a " << ndim << "-D view, got " << t.ndim << "-D");
  for (int i = 0; i < ndim; ++i) {
    LLMK_CHECK(t.sizes[i] >= 0, name << " has a negative size");
    LLMK_CHECK(t.strides[i] >= 0, name << " has a negative stride");
  }
  LLMK_CHECK(t.data != nullptr || t.numel() == 0, name << " has no data");
}

void check_same_shape(const TensorView& a, const TensorView& b, const char* an, const char* bn) {
  LLMK_CHECK(a.ndim == b.ndim, an << " and " << bn << " differ in rank");
  for (int i = 0; i < a.ndim; ++i)
    LLMK_CHECK(a.sizes[i] == b.sizes[i], an << " and " << bn << " differ in size at dim " << i);
}

void check_params(const AttentionParams& p) {
  check_view(p.q, "query", 4);
  check_view(p.k, "key", 4);
  check_view(p.v, "value", 4);
  LLMK_CHECK(is_float(p.q.dtype), "query must be float32, bfloat16 or float16");
  LLMK_CHECK(p.k.dtype == p.q.dtype && p.v.dtype == p.q.dtype,
             "key and value must have query's dtype");
  const int64_t B = p.q.sizes[0], Hq = p.q.sizes[1], L = p.q.sizes[2], D = p.q.sizes[3];
  LLMK_CHECK(p.k.sizes[0] == B && p.v.sizes[0] == B, "batch sizes of query, key, value differ");
  const int64_t Hk = p.k.sizes[1];
  LLMK_CHECK(Hk > 0 || Hq == 0, "key has no heads");
  LLMK_CHECK(p.v.sizes[1] == Hk, "key and value head counts differ");
  LLMK_CHECK(Hk == 0 || Hq % Hk == 0, "query heads must be a multiple of key heads");
  LLMK_CHECK(p.k.sizes[3] == D, "query and key head dims differ");
  LLMK_CHECK(p.v.sizes[2] == p.k.sizes[2], "key and value sequence lengths differ");
  LLMK_CHECK(D >= 1 && D <= 1024 && p.v.sizes[3] >= 1 && p.v.sizes[3] <= 1024,
             "head dims must be in [1, 1024]");
  if (p.mask.data || p.mask.ndim) {
    check_view(p.mask, "attn_mask", 4);
    LLMK_CHECK(p.mask.sizes[0] == B && p.mask.sizes[1] == Hq && p.mask.sizes[2] == L &&
                   p.mask.sizes[3] == p.k.sizes[2],
               "attn_mask must be broadcast to (B, Hq, L, S)");
    LLMK_CHECK(p.mask.dtype == DType::boolean || is_float(p.mask.dtype),
               "attn_mask must be bool or float");
  }
  LLMK_CHECK(p.num_threads >= 1, "num_threads must be >= 1");
  LLMK_CHECK(p.dropout_p >= 0.0 && p.dropout_p < 1.0,
             "dropout_p must be in [0, 1), got " << p.dropout_p);
  LLMK_CHECK(!(p.key_lens && p.dropout_p > 0.0), "key_lens takes no dropout");
  if (p.key_lens) {
    LLMK_CHECK(attention_decode_shaped(L, Hk ? Hq / Hk : 1),
               "key_lens needs a decode-shaped call (" << kDecodeMaxL << " queries a head at "
               "most, and at most " << kDecodeMaxRows << " query rows a kv head), got " << L
               << " queries and " << (Hk ? Hq / Hk : 0) << " query heads a kv head");
    for (int64_t b = 0; b < B; ++b)
      LLMK_CHECK(p.key_lens[b] >= 0 && p.key_lens[b] <= p.k.sizes[2],
                 "key_lens[" << b << "] = " << p.key_lens[b] << " is outside [0, "
                 << p.k.sizes[2] << "] (the keys given)");
  }
}

std::atomic<int64_t> g_round_bytes{0};

AttentionParams with_round(const AttentionParams& p) {
  AttentionParams q = p;
  if (q.round_bytes <= 0) q.round_bytes = g_round_bytes.load();
  return q;
}

void check_residual(const TensorView& residual, const TensorView& out) {
  if (!residual.data && residual.ndim == 0) return;
  check_view(residual, "out_residual", 4);
  check_same_shape(residual, out, "out_residual", "out");
  LLMK_CHECK(residual.dtype == out.dtype, "out_residual must have out's dtype");
}

CpuTier checked(CpuTier tier) {
  LLMK_CHECK(tier_supported(tier), "CPU tier " << tier_name(tier) << " is not supported by this CPU");
  return tier;
}

}  // namespace

void check_attention_forward(const AttentionParams& p, const ForwardIO& io) {
  check_params(p);
  check_view(io.out, "out", 4);
  check_view(io.lse, "lse", 3);
  const TensorView& q = p.q;
  LLMK_CHECK(io.out.dtype == q.dtype, "out must have query's dtype");
  LLMK_CHECK(io.out.sizes[0] == q.sizes[0] && io.out.sizes[1] == q.sizes[1] &&
                 io.out.sizes[2] == q.sizes[2] && io.out.sizes[3] == p.v.sizes[3],
             "out must be (B, Hq, L, Dv)");
  LLMK_CHECK(io.lse.dtype == DType::f32, "lse must be float32");
  LLMK_CHECK(io.lse.sizes[0] == q.sizes[0] && io.lse.sizes[1] == q.sizes[1] &&
                 io.lse.sizes[2] == q.sizes[2],
             "lse must be (B, Hq, L)");
  check_residual(io.out_residual, io.out);
}

void check_attention_backward(const AttentionParams& p, const BackwardIO& io) {
  LLMK_CHECK(!p.key_lens, "the backward takes no key_lens");
  check_params(p);
  check_view(io.dout, "grad_out", 4);
  check_view(io.out, "out", 4);
  check_view(io.lse, "lse", 3);
  check_view(io.dq, "dq", 4);
  check_view(io.dk, "dk", 4);
  check_view(io.dv, "dv", 4);
  check_same_shape(io.out, io.dout, "out", "grad_out");
  LLMK_CHECK(io.out.sizes[0] == p.q.sizes[0] && io.out.sizes[1] == p.q.sizes[1] &&
                 io.out.sizes[2] == p.q.sizes[2] && io.out.sizes[3] == p.v.sizes[3],
             "out must be (B, Hq, L, Dv)");
  LLMK_CHECK(io.lse.dtype == DType::f32, "lse must be float32");
  LLMK_CHECK(io.lse.sizes[0] == p.q.sizes[0] && io.lse.sizes[1] == p.q.sizes[1] &&
                 io.lse.sizes[2] == p.q.sizes[2],
             "lse must be (B, Hq, L)");
  check_residual(io.out_residual, io.out);
  check_same_shape(io.dq, p.q, "dq", "query");
  check_same_shape(io.dk, p.k, "dk", "key");
  check_same_shape(io.dv, p.v, "dv", "value");
  for (const TensorView* t : {&io.dout, &io.out, &io.dq, &io.dk, &io.dv})
    LLMK_CHECK(t->dtype == p.q.dtype, "gradients and out must have query's dtype");
  if (io.dmask.data || io.dmask.ndim) {
    check_view(io.dmask, "dmask", 4);
    LLMK_CHECK(p.mask.data && p.mask.dtype != DType::boolean,
               "dmask needs a float attn_mask");
    check_same_shape(io.dmask, p.mask, "dmask", "attn_mask");
    LLMK_CHECK(io.dmask.dtype == DType::f32, "dmask must be float32");
    const int64_t* n = io.dmask.sizes;
    const int64_t* st = io.dmask.strides;
    LLMK_CHECK((n[3] <= 1 || st[3] == 1) && (n[2] <= 1 || st[2] == n[3]) &&
                   (n[1] <= 1 || st[1] == n[2] * n[3]) && (n[0] <= 1 || st[0] == n[1] * n[2] * n[3]),
               "dmask must be contiguous");
  }
}

void kvcache_append(const TensorView& dst, const TensorView& src, const int64_t* starts,
                    int64_t num_starts) {
  check_view(dst, "cache", 4);
  check_view(src, "new", 4);
  LLMK_CHECK(dst.dtype == src.dtype, "the cache and the new tokens must share a dtype");
  const int64_t B = dst.sizes[0], S = dst.sizes[1], n = src.sizes[1];
  LLMK_CHECK(src.sizes[0] == B && src.sizes[2] == dst.sizes[2] && src.sizes[3] == dst.sizes[3],
             "new tokens must be (B, n, H, E) of a (B, S, H, E) cache");
  LLMK_CHECK(num_starts == B, "starts has " << num_starts << " entries, the batch " << B);
  for (int64_t b = 0; b < B; ++b)
    LLMK_CHECK(starts[b] >= 0 && starts[b] + n <= S,
               "sequence " << b << " holds " << starts[b] << " cached tokens; with " << n
               << " new ones that is outside the cache's " << S << " slots");
  const int64_t H = dst.sizes[2], E = dst.sizes[3], bytes = dtype_bytes(dst.dtype);
  char* d0 = static_cast<char*>(dst.data);
  const char* s0 = static_cast<const char*>(src.data);
  const bool rows = dst.strides[3] == 1 && src.strides[3] == 1;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < H; ++h) {
        char* d = d0 + (b * dst.strides[0] + (starts[b] + t) * dst.strides[1] +
                        h * dst.strides[2]) * bytes;
        const char* s = s0 + (b * src.strides[0] + t * src.strides[1] + h * src.strides[2]) *
                                 bytes;
        if (rows) {
          std::memmove(d, s, size_t(E * bytes));  // (memmove: a view of the cache itself)
        } else {
          for (int64_t e = 0; e < E; ++e)
            std::memmove(d + e * dst.strides[3] * bytes, s + e * src.strides[3] * bytes,
                         size_t(bytes));
        }
      }
}

void set_attention_round_bytes(int64_t bytes) { g_round_bytes.store(bytes > 0 ? bytes : 0); }

int64_t attention_forward_workspace_bytes(CpuTier tier, const AttentionParams& p0) {
  const AttentionParams p = with_round(p0);
  switch (checked(tier)) {
    case CpuTier::amx: return attn_amx::forward_workspace_bytes(p);
    case CpuTier::avx512_bf16: return attn_avx512bf16::forward_workspace_bytes(p);
    case CpuTier::avx512: return attn_avx512::forward_workspace_bytes(p);
    case CpuTier::avx2: return attn_avx2::forward_workspace_bytes(p);
    default: return attn_generic::forward_workspace_bytes(p);
  }
}

int64_t attention_backward_workspace_bytes(CpuTier tier, const AttentionParams& p0) {
  const AttentionParams p = with_round(p0);
  switch (checked(tier)) {
    case CpuTier::amx: return attn_amx::backward_workspace_bytes(p);
    case CpuTier::avx512_bf16: return attn_avx512bf16::backward_workspace_bytes(p);
    case CpuTier::avx512: return attn_avx512::backward_workspace_bytes(p);
    case CpuTier::avx2: return attn_avx2::backward_workspace_bytes(p);
    default: return attn_generic::backward_workspace_bytes(p);
  }
}

int64_t attention_forward(CpuTier tier, const AttentionParams& p0, const ForwardIO& io) {
  const AttentionParams p = with_round(p0);
  check_attention_forward(p, io);
  switch (checked(tier)) {
    case CpuTier::amx: return attn_amx::forward(p, io);
    case CpuTier::avx512_bf16: return attn_avx512bf16::forward(p, io);
    case CpuTier::avx512: return attn_avx512::forward(p, io);
    case CpuTier::avx2: return attn_avx2::forward(p, io);
    default: return attn_generic::forward(p, io);
  }
}

void attention_backward(CpuTier tier, const AttentionParams& p0, const BackwardIO& io) {
  const AttentionParams p = with_round(p0);
  check_attention_backward(p, io);
  switch (checked(tier)) {
    case CpuTier::amx: attn_amx::backward(p, io); break;
    case CpuTier::avx512_bf16: attn_avx512bf16::backward(p, io); break;
    case CpuTier::avx512: attn_avx512::backward(p, io); break;
    case CpuTier::avx2: attn_avx2::backward(p, io); break;
    default: attn_generic::backward(p, io); break;
  }
}

}  // namespace llmk
