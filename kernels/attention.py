"""Fused attention in Triton: FlashAttention-2 forward and backward, varlen, KV-cache decoding.

Every launcher takes 4-D views and the same sequence metadata as the CUDA path:
  q (B, Hq, Lq, D), k and v (Bk, Hk, Sk, D / Dv), any strides except a unit last one.
  cu_seqlens_q / cu_seqlens_k (int32, nseq + 1): packed variable-length batches; then the view's
    batch dim is 1 and sequence b owns rows cu[b] .. cu[b+1]-1 of dim 2.
  seqused_k (int32, nseq): sequence b attends to its first seqused_k[b] keys (KV caches).
  Per sequence, off = diag_offset + (bottom_right ? len_k - len_q : 0), and key j is visible to
  query i iff j < len_k, j >= i + off - window_left (if window_left >= 0) and
  j <= i + off + window_right (if window_right >= 0). Causal is window_right = 0.
  Scores are scale * q.k, softcapped to softcap * tanh(score / softcap) when softcap > 0.
  mask (forward / backward, not with varlen): an attn_mask (B, Hq, Lq, Sk) view, bool (False
  hides a key) or float (added to the scores); key blocks it hides from every row of a query
  block (visible_key_ranges: each row's first and last visible key) are skipped.
  Rows with no visible key give out = 0 and lse = -inf; NaN scores make the row and its lse NaN.

Design:
  - Forward: online softmax in base 2 over the key blocks the band allows; masks are built only
    for the blocks that need them (sequence end, band edges). lse is saved in natural log.
  - Decoding (few query rows per kv head): the query heads of one kv head are packed as rows of
    one tile, so K/V are read once per kv head, and the keys are split across programs
    (flash-decoding); a small kernel merges the splits by their log-sum-exp.
  - Backward: a dK/dV kernel per (sequence, kv head, key block) that loops over the query heads
    of its group and the query blocks that see it, and a dQ kernel per (sequence, q head, query
    block). Recomputing the scores twice costs ~25% more FLOPs than FA2's atomic dQ, but needs
    no fp32 dQ buffer, no atomics, and gives bit-identical gradients run to run.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

from .rounding import INTERPRET, cast as _cast
FORCE_SPLITS = None  # tests set it to run flash-decoding splits at small sizes
# CUDA's limit on a grid's y dimension, which holds (sequence, head) pairs: more of them (e.g.
# 4096 sequences x 16 heads) go in several launches, bh0 the first pair of each. Tests lower it.
MAX_GRID_Y = 65535


# LLMKERNELS_TRITON_AUTOTUNE=0: one config per kernel, no tuning (GPU test runs compile
# dozens of specializations; tuning each would take minutes).
AUTOTUNE = os.environ.get("LLMKERNELS_TRITON_AUTOTUNE", "1") != "0"


def _configs(pairs):
    if INTERPRET:  # the interpreter runs every config it is given: one small one is enough
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in pairs]


def _prune(configs, named_args, **kwargs):
    """Tiles that fit: rows of more than 256 bytes (bf16 head dims over 128, float32 from 128)
    need small tiles and shallow pipelines (a 64x64, 3-stage backward at bf16 D=256 asks for
    257 KiB of shared memory, over the H100's 227). Without autotuning, one config."""
    def get(name, default):
        return kwargs.get(name, named_args.get(name, default))
    q = named_args.get("Q")
    elem = q.element_size() if hasattr(q, "element_size") else 2
    row_bytes = elem * max(get("BLOCK_D", 64), get("BLOCK_DV", 64))
    kept = configs
    if row_bytes > 256:
        kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 64
                and c.num_stages <= 2] or configs[-1:]
    if not AUTOTUNE:
        square = [c for c in kept if c.kwargs["BLOCK_M"] == c.kwargs["BLOCK_N"] == 64]
        return (square or kept)[:1]
    return kept


_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 64, 4, 3),
                         (64, 64, 4, 3), (64, 32, 4, 2)])
# Decode-shaped calls: BLOCK_M is set by the caller (query heads per kv head x queries).
_DECODE_CONFIGS = ([triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)] if INTERPRET else
                   [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st)
                    for n, w, st in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3), (32, 4, 2))])
_BWD_CONFIGS = _configs([(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 2),
                         (32, 32, 4, 2)])
_DQ_CONFIGS = _configs([(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2),
                        (32, 32, 4, 2)])


# ------------------------------------------------------------------------------ shared pieces

@triton.jit
def _sequence(b, CU_Q, CU_K, SEQUSED_K, Lq, Sk,
              VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SEQUSED: tl.constexpr):
    """(first query row, query count, first key row, key count) of sequence b."""
    zero = b * 0  # tensors, not literals: callers take .to() of them
    q_start = zero
    len_q = zero + Lq
    if VARLEN_Q:
        q_start = tl.load(CU_Q + b)
        len_q = tl.load(CU_Q + b + 1) - q_start
    k_start = zero
    len_k = zero + Sk
    if VARLEN_K:
        k_start = tl.load(CU_K + b)
        len_k = tl.load(CU_K + b + 1) - k_start
    if HAS_SEQUSED:
        len_k = tl.maximum(tl.minimum(len_k, tl.load(SEQUSED_K + b)), 0)
    return q_start, len_q, k_start, len_k


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, acc=None):
    """a @ b (+ acc, accumulated inside the matrix instruction)."""
    if PRECISION == "upcast":
        # The interpreter (triton 3.9) multiplies bfloat16 tiles wrongly; products of 16-bit
        # values are exact in float32, so upcasting computes what the tensor cores compute.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _scores(qk, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Scores in base 2 (times log2 e) from raw dot products; also the tanh of the softcap."""
    if HAS_SOFTCAP:
        u = qk * (scale / softcap)
        # tanh(u) = 1 - 2 / (exp(2u) + 1): exact at both tails (exp overflow gives 1); below
        # |u| = 0.625, where that form cancels (an absolute error ~1e-7, which softcap then
        # multiplies), Cephes' tanhf polynomial u + u^3 P(u^2), as the CPU kernel's vtanh.
        t = 1.0 - 2.0 / (tl.exp2(u * (2.0 * 1.4426950408889634)) + 1.0)
        z = u * u
        p = (((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
             + 1.33314422036e-1) * z - 3.33332819422e-1
        t = tl.where(tl.abs(u) < 0.625, p * z * u + u, t)
        return t * (softcap * 1.4426950408889634), t
    return qk * (scale * 1.4426950408889634), qk


@triton.jit
def _visible(rows_i, cols_j, len_k, off, window_left, window_right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    keep = cols_j[None, :] < len_k
    if HAS_LEFT:
        keep = keep & (cols_j[None, :] >= rows_i[:, None] + off - window_left)
    if HAS_RIGHT:
        keep = keep & (cols_j[None, :] <= rows_i[:, None] + off + window_right)
    return keep


@triton.jit
def _visible_t(keys_j, rows_i, len_k, off, window_left, window_right,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """_visible transposed: (keys, queries)."""
    keep = keys_j[:, None] < len_k
    if HAS_LEFT:
        keep = keep & (keys_j[:, None] >= rows_i[None, :] + off - window_left)
    if HAS_RIGHT:
        keep = keep & (keys_j[:, None] <= rows_i[None, :] + off + window_right)
    return keep


@triton.jit
def _key_range(i_lo, i_hi, len_k, off, window_left, window_right,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) that queries i_lo..i_hi can see; lo rounded down to a block start."""
    lo = 0
    hi = len_k
    if HAS_LEFT:
        lo = tl.maximum(i_lo + off - window_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(hi, i_hi + off + window_right + 1)
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _block_needs_mask(start_n, i_lo, i_hi, len_k, off, window_left, window_right,
                      HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    needs = start_n + BLOCK_N > len_k
    if HAS_LEFT:
        needs = needs | (start_n < i_hi + off - window_left)
    if HAS_RIGHT:
        needs = needs | (start_n + BLOCK_N - 1 > i_lo + off + window_right)
    return needs


@triton.jit
def _mask_scores(s, MASK, m_rows, cols, s_mn, ok, MASK_BOOL: tl.constexpr):
    """attn_mask applied to base-2 scores s (rows x cols; m_rows: each row's mask offset):
    bool hides (-inf), float adds (in nats, so times log2 e; at or below about -2.36e38 that
    is -inf, as on the CPU kernel)."""
    mt = tl.load(MASK + m_rows[:, None] + cols[None, :].to(tl.int64) * s_mn, mask=ok, other=0)
    if MASK_BOOL:
        return tl.where(mt != 0, s, float("-inf"))
    return s + mt.to(tl.float32) * 1.4426950408889634


@triton.jit
def _mask_scores_t(st, MASK, m_rows, keys, s_mn, ok, MASK_BOOL: tl.constexpr):
    """_mask_scores on transposed scores st (keys x rows)."""
    mt = tl.load(MASK + m_rows[None, :] + keys[:, None].to(tl.int64) * s_mn, mask=ok, other=0)
    if MASK_BOOL:
        return tl.where(mt != 0, st, float("-inf"))
    return st + mt.to(tl.float32) * 1.4426950408889634


@triton.jit
def _mask_keys(RANGES, r_rows, row_ok, lo, hi, BLOCK_N: tl.constexpr):
    """[lo, hi) narrowed to the keys the mask leaves visible to some row (RANGES holds each
    row's first and last visible key, int32 pairs): key blocks the mask hides are skipped."""
    first = tl.load(RANGES + 2 * r_rows, mask=row_ok, other=2147483647)
    last = tl.load(RANGES + 2 * r_rows + 1, mask=row_ok, other=-1)
    lo = tl.maximum(lo, (tl.min(first, axis=0) // BLOCK_N) * BLOCK_N)
    hi = tl.minimum(hi, tl.max(last, axis=0) + 1)
    return lo, hi


# ------------------------------------------------------------------------------ forward

@triton.jit
def _dead_or_nan(l):
    """The lse of a row whose sum of probabilities l is not positive: -inf where no key was
    visible (l = 0), NaN where l is NaN (NaN scores): -inf would tell the backward the row saw
    no key, and its NaN would become zero gradients."""
    return tl.where(l == 0.0, float("-inf"), float("nan"))


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, O_PART, LSE_PART,
                s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                s_ob, s_oh, s_om, s_lb, s_lh, s_lm,
                CU_Q, CU_K, SEQUSED_K,
                Hq, Hk, Lq, Sk, D, DV,
                scale, softcap, window_left, window_right, diag_offset, bh0,
                MASK, RANGES, s_mb, s_mh, s_mm, s_mn, s_rb, s_rh, s_rm,
                VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SEQUSED: tl.constexpr,
                BOTTOM_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                PACK_GQA: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1) + bh0
    split = tl.program_id(2)
    group = Hq // Hk
    if PACK_GQA:  # rows are (query head of this kv head, query): K/V read once per kv head
        b = pid_bh // Hk
        hk = pid_bh % Hk
    else:
        b = pid_bh // Hq
        hk = (pid_bh % Hq) // group
    q_start, len_q, k_start, len_k = _sequence(b, CU_Q, CU_K, SEQUSED_K, Lq, Sk,
                                               VARLEN_Q, VARLEN_K, HAS_SEQUSED)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PACK_GQA:
        n_rows = group * len_q
        h = hk * group + rows // tl.maximum(len_q, 1)
        i = rows % tl.maximum(len_q, 1)
    else:
        n_rows = len_q
        h = pid_bh % Hq + rows * 0
        i = rows
    if pid_m * BLOCK_M >= n_rows:
        return
    row_ok = rows < n_rows
    off = diag_offset
    if BOTTOM_RIGHT:
        off += len_k - len_q
    bq = b.to(tl.int64)  # packed (varlen) tensors have one batch entry
    if VARLEN_Q:
        bq = bq * 0
    bk = b.to(tl.int64)
    if VARLEN_K:
        bk = bk * 0

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    q_rows = bq * s_qb + h.to(tl.int64) * s_qh + (q_start + i).to(tl.int64) * s_qm
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + bk * s_kb + hk.to(tl.int64) * s_kh + k_start.to(tl.int64) * s_kn
    v_base = V + bk * s_vb + hk.to(tl.int64) * s_vh + k_start.to(tl.int64) * s_vn

    i_lo = tl.min(tl.where(row_ok, i, Lq + Sk), axis=0)
    i_hi = tl.max(tl.where(row_ok, i, -1), axis=0)
    lo, hi = _key_range(i_lo, i_hi, len_k, off, window_left, window_right,
                        HAS_LEFT, HAS_RIGHT, BLOCK_N)
    if HAS_MASK:  # (masks come without varlen: b, h, i index them)
        m_rows = b.to(tl.int64) * s_mb + h.to(tl.int64) * s_mh + i.to(tl.int64) * s_mm
        r_rows = b.to(tl.int64) * s_rb + h.to(tl.int64) * s_rh + i.to(tl.int64) * s_rm
        lo, hi = _mask_keys(RANGES, r_rows, row_ok, lo, hi, BLOCK_N)
    if NUM_SPLITS > 1:  # flash-decoding: this program takes one share of the key blocks
        blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
        per_split = tl.cdiv(blocks, NUM_SPLITS)
        hi = tl.minimum(hi, lo + (split + 1) * per_split * BLOCK_N)
        lo = lo + split * per_split * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = tl.load(k_base + cols[None, :].to(tl.int64) * s_kn + offs_d[:, None],
                     mask=(cols[None, :] < len_k) & (offs_d[:, None] < D), other=0.0)
        s, _ = _scores(_dot(q, kt, PRECISION), scale, softcap, HAS_SOFTCAP)
        if HAS_MASK:
            s = _mask_scores(s, MASK, m_rows, cols, s_mn,
                             row_ok[:, None] & (cols[None, :] < len_k), MASK_BOOL)
        if _block_needs_mask(start_n, i_lo, i_hi, len_k, off, window_left, window_right,
                             HAS_LEFT, HAS_RIGHT, BLOCK_N):
            keep = _visible(i, cols, len_k, off, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * s_vn + offs_dv[None, :],
                    mask=(cols[:, None] < len_k) & (offs_dv[None, :] < DV), other=0.0)
        acc = _dot(_cast(p, v.dtype), v, PRECISION, acc * alpha[:, None])
        m_i = m_new

    alive = l_i > 0.0
    out = acc / tl.where(alive, l_i, 1.0)[:, None]  # a NaN row's acc is NaN already
    lse = tl.where(alive, (m_i + tl.log2(tl.where(alive, l_i, 1.0))) * 0.6931471805599453,
                   _dead_or_nan(l_i))
    if NUM_SPLITS > 1:
        # partials: (NUM_SPLITS, B, Hq, Lq, DV) and (NUM_SPLITS, B, Hq, Lq), contiguous
        prow = ((split * (tl.num_programs(1) // Hk) + b) * Hq + h) * Lq + i  # splits imply PACK_GQA
        prow = prow.to(tl.int64)
        tl.store(O_PART + prow[:, None] * DV + offs_dv[None, :], out,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV))
        tl.store(LSE_PART + prow, lse, mask=row_ok)
    else:
        o_rows = bq * s_ob + h.to(tl.int64) * s_oh + (q_start + i).to(tl.int64) * s_om
        tl.store(O + o_rows[:, None] + offs_dv[None, :], _cast(out, O.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV))
        l_rows = bq * s_lb + h.to(tl.int64) * s_lh + (q_start + i).to(tl.int64) * s_lm
        tl.store(LSE + l_rows, lse, mask=row_ok)


def _prune_decode(configs, named_args, **kwargs):
    """_prune for the decode kernel's BLOCK_N-only configs."""
    q = named_args.get("Q")
    elem = q.element_size() if hasattr(q, "element_size") else 2
    wide = elem * max(kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_DV", 64)) > 256
    kept = [c for c in configs if not wide or c.kwargs["BLOCK_N"] <= 32] or configs[-1:]
    return kept if AUTOTUNE else kept[:1]


_decode_tuned = triton.autotune(configs=_DECODE_CONFIGS,
                                key=["BLOCK_M", "BLOCK_D", "BLOCK_DV", "PRECISION", "NUM_SPLITS",
                                     "HAS_LEFT", "HAS_RIGHT", "HAS_MASK"],
                                prune_configs_by={"early_config_prune": _prune_decode})(_fwd_kernel)
_fwd_tuned = triton.autotune(configs=_FWD_CONFIGS, key=["BLOCK_D", "BLOCK_DV", "PRECISION",
                                                       "HAS_LEFT", "HAS_RIGHT", "VARLEN_Q",
                                                       "HAS_MASK"],
                             prune_configs_by={"early_config_prune": _prune})(_fwd_kernel)


@triton.jit
def _combine_kernel(O_PART, LSE_PART, O, LSE, s_ob, s_oh, s_om, s_lb, s_lh, s_lm,
                    Hq, Lq, n_rows, DV,
                    NUM_SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Merges flash-decoding splits: out = sum_s exp(lse_s - lse) out_s, lse = logsumexp lse_s."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    offs_dv = tl.arange(0, BLOCK_DV)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(NUM_SPLITS):
        m = tl.maximum(m, tl.load(LSE_PART + s * n_rows + rows, mask=row_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for s in range(NUM_SPLITS):
        ls = tl.load(LSE_PART + s * n_rows + rows, mask=row_ok, other=float("-inf"))
        w = tl.exp(ls - m_safe)
        part = tl.load(O_PART + (s * n_rows + rows.to(tl.int64))[:, None] * DV + offs_dv[None, :],
                       mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc += w[:, None] * part
        total += w
    alive = total > 0.0
    out = acc / tl.where(alive, total, 1.0)[:, None]
    lse = tl.where(alive, m_safe + tl.log(tl.where(alive, total, 1.0)), _dead_or_nan(total))
    b = rows // (Hq * Lq)
    h = (rows // Lq) % Hq
    i = rows % Lq
    o_rows = b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + i.to(tl.int64) * s_om
    tl.store(O + o_rows[:, None] + offs_dv[None, :], _cast(out, O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + b.to(tl.int64) * s_lb + h.to(tl.int64) * s_lh + i.to(tl.int64) * s_lm, lse,
             mask=row_ok)


# ------------------------------------------------------------------------------ backward

@triton.jit
def _delta_kernel(O, DO, DELTA, s_ob, s_oh, s_om, s_db, s_dh, s_dm, s_lb, s_lh, s_lm,
                  Hq, Lq, DV, bh0, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta_i = rowsum(dO_i * O_i) in float32 (B, Hq, Lq): the softmax backward's row term."""
    pid_bh = tl.program_id(1) + bh0
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.arange(0, BLOCK_DV)
    mask = (rows[:, None] < Lq) & (offs[None, :] < DV)
    r64 = rows.to(tl.int64)
    o = tl.load(O + b * s_ob + h * s_oh + r64[:, None] * s_om + offs[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + r64[:, None] * s_dm + offs[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + b * s_lb + h * s_lh + r64 * s_lm, delta, mask=rows < Lq)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_,
                     s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                     s_dob, s_doh, s_dom, s_lb, s_lh, s_lm,
                     s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn,
                     CU_Q, CU_K, SEQUSED_K,
                     Hq, Hk, Lq, Sk, D, DV,
                     scale, softcap, window_left, window_right, diag_offset, bh0,
                     MASK, RANGES, s_mb, s_mh, s_mm, s_mn, s_rb, s_rh, s_rm,
                     VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SEQUSED: tl.constexpr,
                     BOTTOM_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                     HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1) + bh0
    b = pid_bh // Hk
    hk = pid_bh % Hk
    group = Hq // Hk
    q_start, len_q, k_start, len_k = _sequence(b, CU_Q, CU_K, SEQUSED_K, Lq, Sk,
                                               VARLEN_Q, VARLEN_K, HAS_SEQUSED)
    full_k = Sk
    if VARLEN_K:
        full_k = tl.load(CU_K + b + 1) - k_start  # rows this sequence owns in dK/dV
    start_n = pid_n * BLOCK_N
    if start_n >= full_k:
        return
    off = diag_offset
    if BOTTOM_RIGHT:
        off += len_k - len_q
    bq = b.to(tl.int64)  # packed (varlen) tensors have one batch entry
    if VARLEN_Q:
        bq = bq * 0
    bk = b.to(tl.int64)
    if VARLEN_K:
        bk = bk * 0
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n64 = (k_start + offs_n).to(tl.int64)
    key_ok = offs_n < len_k
    k = tl.load(K + bk * s_kb + hk.to(tl.int64) * s_kh + n64[:, None] * s_kn + offs_d[None, :],
                mask=key_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + bk * s_vb + hk.to(tl.int64) * s_vh + n64[:, None] * s_vn + offs_dv[None, :],
                mask=key_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    # Queries that can see keys start_n .. start_n + BLOCK_N - 1.
    m_lo = 0
    m_hi = len_q
    if HAS_RIGHT:
        m_lo = tl.maximum(start_n - off - window_right, 0)
    if HAS_LEFT:
        m_hi = tl.minimum(m_hi, start_n + BLOCK_N - 1 - off + window_left + 1)
    m_lo = (m_lo // BLOCK_M) * BLOCK_M
    if start_n >= len_k:
        m_hi = m_lo  # keys beyond seqused_k: their gradients are zero
    for g in range(group):
        h = (hk * group + g).to(tl.int64)
        q_base = Q + bq * s_qb + h * s_qh
        do_base = DO + bq * s_dob + h * s_doh
        l_base = bq * s_lb + h * s_lh
        for start_m in range(m_lo, m_hi, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < len_q
            r64 = (q_start + rows).to(tl.int64)
            seen = True
            if HAS_MASK:  # does the mask leave any of these keys to any of these rows?
                r_rows = b.to(tl.int64) * s_rb + h * s_rh + rows.to(tl.int64) * s_rm
                k_lo, k_hi = _mask_keys(RANGES, r_rows, row_ok, start_n, start_n + BLOCK_N,
                                        BLOCK_N)
                seen = k_lo < k_hi
            if seen:
                qt = tl.load(q_base + r64[None, :] * s_qm + offs_d[:, None],
                             mask=row_ok[None, :] & (offs_d[:, None] < D), other=0.0)
                do = tl.load(do_base + r64[:, None] * s_dom + offs_dv[None, :],
                             mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
                lse = tl.load(LSE + l_base + r64 * s_lm, mask=row_ok, other=float("-inf"))
                delta = tl.load(DELTA + l_base + r64 * s_lm, mask=row_ok, other=0.0)
                # lse = -inf marks a dead row: +inf there makes its probabilities exp2(-inf) = 0.
                lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
                st, tt = _scores(_dot(k, qt, PRECISION), scale, softcap,
                                 HAS_SOFTCAP)
                keep = _visible_t(offs_n, rows, len_k, off, window_left, window_right,
                                  HAS_LEFT, HAS_RIGHT) & row_ok[None, :]
                if HAS_MASK:
                    m_rows = b.to(tl.int64) * s_mb + h * s_mh + rows.to(tl.int64) * s_mm
                    st = _mask_scores_t(st, MASK, m_rows, offs_n, s_mn, keep, MASK_BOOL)
                pt = tl.where(keep, tl.exp2(st - lse2[None, :]), 0.0)
                dv = _dot(_cast(pt, do.dtype), do, PRECISION, dv)
                dpt = _dot(v, tl.trans(do), PRECISION)
                dst = pt * (dpt - delta[None, :])
                if HAS_SOFTCAP:
                    dst = dst * (1.0 - tt * tt)
                dk = _dot(_cast(dst, qt.dtype), tl.trans(qt), PRECISION, dk)
    dk = dk * scale
    mk = (offs_n[:, None] < full_k)
    tl.store(DK + bk * s_dkb + hk.to(tl.int64) * s_dkh + n64[:, None] * s_dkn + offs_d[None, :],
             _cast(dk, DK.dtype.element_ty), mask=mk & (offs_d[None, :] < D))
    tl.store(DV_ + bk * s_dvb + hk.to(tl.int64) * s_dvh + n64[:, None] * s_dvn + offs_dv[None, :],
             _cast(dv, DV_.dtype.element_ty), mask=mk & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                   s_dob, s_doh, s_dom, s_lb, s_lh, s_lm, s_dqb, s_dqh, s_dqm,
                   CU_Q, CU_K, SEQUSED_K,
                   Hq, Hk, Lq, Sk, D, DV,
                   scale, softcap, window_left, window_right, diag_offset, bh0,
                   MASK, RANGES, s_mb, s_mh, s_mm, s_mn, s_rb, s_rh, s_rm,
                   VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SEQUSED: tl.constexpr,
                   BOTTOM_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                   HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1) + bh0
    b = pid_bh // Hq
    h = (pid_bh % Hq).to(tl.int64)
    hk = (pid_bh % Hq) // (Hq // Hk)
    q_start, len_q, k_start, len_k = _sequence(b, CU_Q, CU_K, SEQUSED_K, Lq, Sk,
                                               VARLEN_Q, VARLEN_K, HAS_SEQUSED)
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:
        return
    off = diag_offset
    if BOTTOM_RIGHT:
        off += len_k - len_q
    bq = b.to(tl.int64)  # packed (varlen) tensors have one batch entry
    if VARLEN_Q:
        bq = bq * 0
    bk = b.to(tl.int64)
    if VARLEN_K:
        bk = bk * 0
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    r64 = (q_start + rows).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + bq * s_qb + h * s_qh + r64[:, None] * s_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + bq * s_dob + h * s_doh + r64[:, None] * s_dom + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    l_rows = bq * s_lb + h * s_lh + r64 * s_lm
    lse = tl.load(LSE + l_rows, mask=row_ok, other=float("-inf"))
    delta = tl.load(DELTA + l_rows, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    k_base = K + bk * s_kb + hk.to(tl.int64) * s_kh + k_start.to(tl.int64) * s_kn
    v_base = V + bk * s_vb + hk.to(tl.int64) * s_vh + k_start.to(tl.int64) * s_vn
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    i_hi = tl.minimum(start_m + BLOCK_M, len_q) - 1
    lo, hi = _key_range(start_m, i_hi, len_k, off, window_left, window_right,
                        HAS_LEFT, HAS_RIGHT, BLOCK_N)
    if HAS_MASK:
        m_rows = b.to(tl.int64) * s_mb + h * s_mh + rows.to(tl.int64) * s_mm
        r_rows = b.to(tl.int64) * s_rb + h * s_rh + rows.to(tl.int64) * s_rm
        lo, hi = _mask_keys(RANGES, r_rows, row_ok, lo, hi, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        c64 = cols.to(tl.int64)
        col_ok = cols < len_k
        kt = tl.load(k_base + c64[None, :] * s_kn + offs_d[:, None],
                     mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        vt = tl.load(v_base + c64[None, :] * s_vn + offs_dv[:, None],
                     mask=col_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
        s, t = _scores(_dot(q, kt, PRECISION), scale, softcap, HAS_SOFTCAP)
        keep = _visible(rows, cols, len_k, off, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        if HAS_MASK:
            s = _mask_scores(s, MASK, m_rows, cols, s_mn, keep & row_ok[:, None], MASK_BOOL)
        p = tl.where(keep & row_ok[:, None], tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, vt, PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _dot(_cast(ds, kt.dtype), tl.trans(kt), PRECISION, dq)
    dq = dq * scale
    tl.store(DQ + bq * s_dqb + h * s_dqh + r64[:, None] * s_dqm + offs_d[None, :],
             _cast(dq, DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


_dkdv_tuned = triton.autotune(configs=_BWD_CONFIGS, key=["BLOCK_D", "BLOCK_DV", "PRECISION",
                                                         "HAS_LEFT", "HAS_RIGHT", "HAS_MASK"],
                              prune_configs_by={"early_config_prune": _prune})(
                                  _bwd_dkdv_kernel)
_dq_tuned = triton.autotune(configs=_DQ_CONFIGS, key=["BLOCK_D", "BLOCK_DV", "PRECISION",
                                                      "HAS_LEFT", "HAS_RIGHT", "HAS_MASK"],
                            prune_configs_by={"early_config_prune": _prune})(
                                _bwd_dq_kernel)


# ------------------------------------------------------------------------------ launchers

def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get true float32 products: tf32 would be ~1e-3 off, far from SDPA's fp32.
    if INTERPRET:
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def _meta(q, v, cu_seqlens_q, cu_seqlens_k, seqused_k, softcap, window_left, window_right,
          bottom_right):
    dummy = q
    # One padded width for both head dims: on an H100 (triton 3.6) a value tile narrower than
    # the query tile (D=40, Dv=24: 64 and 32 wide) gave wrong rows and illegal addresses.
    block = _block(max(q.shape[-1], v.shape[-1]))
    return dict(
        CU_Q=cu_seqlens_q if cu_seqlens_q is not None else dummy,
        CU_K=cu_seqlens_k if cu_seqlens_k is not None else dummy,
        SEQUSED_K=seqused_k if seqused_k is not None else dummy,
        VARLEN_Q=cu_seqlens_q is not None, VARLEN_K=cu_seqlens_k is not None,
        HAS_SEQUSED=seqused_k is not None, BOTTOM_RIGHT=bool(bottom_right),
        HAS_SOFTCAP=softcap > 0.0, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
        PRECISION=_precision(q.dtype), BLOCK_D=block, BLOCK_DV=block,
    )


# Rows of a mask turned into key ranges at a time (bounds the temporaries to ~64 MiB).
_RANGE_CHUNK_BYTES = 64 << 20


@triton.jit
def _ranges_kernel(MASK, OUT, s_b, s_h, s_m, s_n, H, L, S,
                   MASK_BOOL: tl.constexpr, BLOCK: tl.constexpr):
    """visible_key_ranges on the GPU: one program a mask row, one launch a call (a decoding
    step's few rows would otherwise take a dozen small torch launches)."""
    row = tl.program_id(0)
    b = row // (H * L)
    h = (row // L) % H
    i = row % L
    base = MASK + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h + i.to(tl.int64) * s_m
    first = S + row * 0
    last = -1 + row * 0
    for start in range(0, S, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols.to(tl.int64) * s_n, mask=cols < S, other=0)
        if MASK_BOOL:
            seen = x != 0
        else:
            seen = x.to(tl.float32) * 1.4426950408889634 != float("-inf")
        seen = seen & (cols < S)
        first = tl.minimum(first, tl.min(tl.where(seen, cols, S), axis=0))
        last = tl.maximum(last, tl.max(tl.where(seen, cols, -1), axis=0))
    tl.store(OUT + 2 * row, first)
    tl.store(OUT + 2 * row + 1, last)


def visible_key_ranges(mask: torch.Tensor, use_kernel=None) -> torch.Tensor:
    """Each mask row's first and last visible key, int32 (B', H', L', 2) ((S, -1): none), where
    the dims the mask broadcasts (stride 0) have size 1. Visible: True, or a float whose
    scaling to base 2 stays above -inf (as the kernels apply it). On a GPU (use_kernel None)
    or when asked, _ranges_kernel computes it; else torch ops (its test oracle)."""
    idx = tuple(slice(0, 1) if mask.stride(d) == 0 else slice(None) for d in range(3))
    m = mask[idx]
    S = m.shape[-1]
    if use_kernel if use_kernel is not None else mask.is_cuda:
        out = torch.empty((*m.shape[:3], 2), dtype=torch.int32, device=mask.device)
        rows = out.numel() // 2
        if rows:
            view = m.view(torch.uint8) if m.dtype == torch.bool else m
            _ranges_kernel[(rows,)](view, out, *m.stride(), m.shape[1], m.shape[2], S,
                                    MASK_BOOL=m.dtype == torch.bool, BLOCK=256 if not INTERPRET else 16)
        return out
    if S == 0:  # no key at all: (S, -1) = (0, -1)
        return torch.tensor([0, -1], dtype=torch.int32, device=mask.device).expand(
            *m.shape[:3], 2).contiguous()
    rows = m.reshape(-1, S)
    out = torch.empty((rows.shape[0], 2), dtype=torch.int32, device=mask.device)
    step = max(1, _RANGE_CHUNK_BYTES // (4 * S))
    for r0 in range(0, rows.shape[0], step):
        part = rows[r0:r0 + step]
        if part.dtype == torch.bool:
            visible = part
        else:
            visible = part.float() * LOG2E != float("-inf")
        seen = visible.any(-1)
        as_u8 = visible.to(torch.uint8)
        first = as_u8.argmax(-1)
        last = (S - 1) - as_u8.flip(-1).argmax(-1)
        out[r0:r0 + step, 0] = torch.where(seen, first, S)
        out[r0:r0 + step, 1] = torch.where(seen, last, -1)
    return out.reshape(*m.shape[:3], 2)


def _mask_args(mask, like):
    """The kernels' mask arguments (MASK, RANGES, mask strides b h m n, range strides b h m) and
    flags. mask: (B, Hq, Lq, Sk) bool or float view (stride 0 where broadcast), or None."""
    if mask is None:
        return (like, like, 0, 0, 0, 0, 0, 0, 0), dict(HAS_MASK=False, MASK_BOOL=False)
    ranges = visible_key_ranges(mask)
    r_strides = tuple(ranges.stride(d) // 2 if ranges.shape[d] > 1 else 0 for d in range(3))
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return ((m, ranges, *mask.stride(), *r_strides),
            dict(HAS_MASK=True, MASK_BOOL=mask.dtype == torch.bool))


def _num_sequences(q, cu_seqlens_q):
    return q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_splits(q, k, cu_seqlens_q, max_seqlen_k: int, num_splits=None) -> int:
    """How many key splits a decode-shaped call gets (1: the ordinary forward)."""
    if cu_seqlens_q is not None:  # the partial results are indexed by (batch, head, query)
        return 1
    if _num_sequences(q, cu_seqlens_q) * k.shape[1] > MAX_GRID_Y:
        return 1  # the kernel finds its partials' rows from grid y: one launch must hold them all
    if num_splits is None:
        num_splits = FORCE_SPLITS
    if num_splits is not None:
        return max(1, int(num_splits))
    nseq, Hk = _num_sequences(q, cu_seqlens_q), k.shape[1]
    group, Lq = q.shape[1] // Hk, q.shape[2]
    if group * Lq > 64 or INTERPRET or not q.is_cuda:
        return 1
    sms = _multiprocessors(q.device.index if q.device.index is not None else
                           torch.cuda.current_device())
    want = triton.cdiv(2 * sms, max(nseq * Hk, 1))
    return int(max(1, min(want, triton.cdiv(max_seqlen_k, 256), 64)))


def _unbounded_past_reach(window_left: int, window_right: int, diag_offset: int, Lq: int,
                          Sk: int):
    """The window sides as the kernels take them: a side reaching past every key (each
    sequence's offset is within Lq + Sk, or diag_offset) is no window (-1). The kernels' band
    arithmetic is int32 for sides under 2^31: a "no window" sentinel such as 2^31 - 1 wrapped
    (zero outputs, or wrong dK/dV)."""
    reach = Lq + Sk + abs(int(diag_offset))
    return tuple(-1 if side >= reach else int(side) for side in (window_left, window_right))


def _bh_launches(pairs: int):
    """(bh0, count) for each launch over `pairs` (sequence, head) programs in grid y."""
    return [(bh0, min(MAX_GRID_Y, pairs - bh0)) for bh0 in range(0, pairs, MAX_GRID_Y)]


def forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q: int,
            max_seqlen_k: int, scale: float, softcap: float, window_left: int,
            window_right: int, diag_offset: int, bottom_right: bool, num_splits=None,
            mask=None) -> None:
    """Writes out (B, Hq, Lq, Dv) and lse (B, Hq, Lq) float32; see the module docstring.
    mask: an attn_mask (B, Hq, Lq, Sk) view, bool or float (not with varlen)."""
    B, Hq, Lq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    DV = v.shape[-1]
    nseq = _num_sequences(q, cu_seqlens_q)
    # a generous varlen bound would size the grid (2^40: past its x limit); no sequence is longer
    max_seqlen_q, max_seqlen_k = min(max_seqlen_q, Lq), min(max_seqlen_k, Sk)
    window_left, window_right = _unbounded_past_reach(window_left, window_right, diag_offset,
                                                      Lq, Sk)
    meta = _meta(q, v, cu_seqlens_q, cu_seqlens_k, seqused_k, softcap, window_left,
                 window_right, bottom_right)
    margs, mflags = _mask_args(mask, q)
    meta.update(mflags)
    args = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2))
    scalars = (Hq, Hk, Lq, Sk, D, DV, float(scale), float(softcap) if softcap > 0 else 1.0,
               int(window_left), int(window_right), int(diag_offset))
    splits = decode_splits(q, k, cu_seqlens_q, max_seqlen_k, num_splits)
    group = Hq // Hk
    if group * max_seqlen_q <= 64 and cu_seqlens_q is None or splits > 1:
        # Decode-shaped: one tile holds every query head of a kv head.
        block_m = max(16, triton.next_power_of_2(group * max_seqlen_q))
        block_m = min(block_m, 64)
        rows = group * max_seqlen_q
        if splits > 1:
            o_part = torch.empty((splits, B, Hq, Lq, DV), device=q.device, dtype=torch.float32)
            lse_part = torch.empty((splits, B, Hq, Lq), device=q.device, dtype=torch.float32)
        else:
            o_part = lse_part = lse
        for bh0, count in _bh_launches(nseq * Hk):
            _decode_tuned[(triton.cdiv(rows, block_m), count, splits)](
                q, k, v, out, lse, o_part, lse_part, *args,
                out.stride(0), out.stride(1), out.stride(2),
                lse.stride(0), lse.stride(1), lse.stride(2), *_seq_ptrs(meta),
                *scalars, bh0, *margs, **_flags(meta), PACK_GQA=True, NUM_SPLITS=splits,
                BLOCK_M=block_m)
        if splits > 1:
            n_rows = B * Hq * Lq
            block_r = 16
            _combine_kernel[(triton.cdiv(n_rows, block_r),)](
                o_part, lse_part, out, lse, out.stride(0), out.stride(1), out.stride(2),
                lse.stride(0), lse.stride(1), lse.stride(2), Hq, Lq, n_rows, DV,
                NUM_SPLITS=splits, BLOCK_R=block_r, BLOCK_DV=meta["BLOCK_DV"], num_warps=4)
        return

    for bh0, count in _bh_launches(nseq * Hq):
        def grid(m, count=count):
            return (triton.cdiv(max_seqlen_q, m["BLOCK_M"]), count, 1)
        _fwd_tuned[grid](q, k, v, out, lse, lse, lse, *args,
                         out.stride(0), out.stride(1), out.stride(2),
                         lse.stride(0), lse.stride(1), lse.stride(2), *_seq_ptrs(meta),
                         *scalars, bh0, *margs, **_flags(meta), PACK_GQA=False, NUM_SPLITS=1)


def _seq_ptrs(meta):
    return meta["CU_Q"], meta["CU_K"], meta["SEQUSED_K"]


def _flags(meta):
    return {k: v for k, v in meta.items() if k not in ("CU_Q", "CU_K", "SEQUSED_K")}


def backward(q, k, v, out, dout, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, seqused_k,
             max_seqlen_q: int, max_seqlen_k: int, scale: float, softcap: float,
             window_left: int, window_right: int, diag_offset: int, bottom_right: bool,
             mask=None) -> None:
    """Writes dq, dk, dv (shaped like q, k, v) from dout and the forward's out and lse."""
    B, Hq, Lq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    DV = v.shape[-1]
    nseq = _num_sequences(q, cu_seqlens_q)
    # a generous varlen bound would size the grid (2^40: past its x limit); no sequence is longer
    max_seqlen_q, max_seqlen_k = min(max_seqlen_q, Lq), min(max_seqlen_k, Sk)
    window_left, window_right = _unbounded_past_reach(window_left, window_right, diag_offset,
                                                      Lq, Sk)
    meta = _meta(q, v, cu_seqlens_q, cu_seqlens_k, seqused_k, softcap, window_left,
                 window_right, bottom_right)
    margs, mflags = _mask_args(mask, q)
    meta.update(mflags)
    delta = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32)
    block = 16 if INTERPRET else 64
    for bh0, count in _bh_launches(B * Hq):
        _delta_kernel[(triton.cdiv(Lq, block), count)](
            out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            delta.stride(0), delta.stride(1), delta.stride(2), Hq, Lq, DV, bh0,
            BLOCK_M=block, BLOCK_DV=meta["BLOCK_DV"])
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1),
               dout.stride(2), lse.stride(0), lse.stride(1), lse.stride(2))
    scalars = (Hq, Hk, Lq, Sk, D, DV, float(scale), float(softcap) if softcap > 0 else 1.0,
               int(window_left), int(window_right), int(diag_offset))
    flags = _flags(meta)

    for bh0, count in _bh_launches(nseq * Hk):
        def grid_kv(m, count=count):
            return (triton.cdiv(max(max_seqlen_k, 1), m["BLOCK_N"]), count)
        _dkdv_tuned[grid_kv](q, k, v, dout, lse, delta, dk, dv, *strides,
                             dk.stride(0), dk.stride(1), dk.stride(2),
                             dv.stride(0), dv.stride(1), dv.stride(2), *_seq_ptrs(meta),
                             *scalars, bh0, *margs, **flags)

    for bh0, count in _bh_launches(nseq * Hq):
        def grid_q(m, count=count):
            return (triton.cdiv(max(max_seqlen_q, 1), m["BLOCK_M"]), count)
        _dq_tuned[grid_q](q, k, v, dout, lse, delta, dq, *strides,
                          dq.stride(0), dq.stride(1), dq.stride(2), *_seq_ptrs(meta),
                          *scalars, bh0, *margs, **flags)
