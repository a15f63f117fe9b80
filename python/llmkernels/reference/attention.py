"""Reference attention: plain PyTorch math, the specification of the fused kernels.

Semantics (shared by every path):
  u  = scale * q @ k^T                       (scale defaults to 1/sqrt(E))
  s  = softcap * tanh(u / softcap)           (only when softcap is given)
  s  = s + attn_mask                         (additive float mask)
  s  = -inf where a bool mask is False, or where key j is outside the band of
       query i: i + diag_offset - left <= j <= i + diag_offset + right
       (is_causal sets right = 0; a window side of None or -1 is unbounded)
  out = softmax(s) @ v, with rows whose every key is masked giving zeros.

diag_offset = 0 is the top-left alignment of torch's SDPA (`torch.tril(ones(L, S))`);
S - L is the bottom-right alignment that KV-cache decoding uses.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def _band(L: int, S: int, left: int, right: int, diag_offset: int, device) -> Optional[torch.Tensor]:
    """Bool (L, S) tensor, True where key j is inside query i's band, or None if all are."""
    if left < 0 and right < 0:
        return None
    i = torch.arange(L, device=device).unsqueeze(-1) + diag_offset
    j = torch.arange(S, device=device).unsqueeze(0)
    keep = torch.ones(L, S, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def attention_mask_tensor(L: int, S: int, *, is_causal: bool = False, window_size=None,
                          diag_offset: int = 0, device=None) -> Optional[torch.Tensor]:
    """The bool (L, S) mask that `is_causal` and `window_size` describe (None if no key is hidden)."""
    left, right = _window_sides(window_size, is_causal)
    return _band(L, S, left, right, diag_offset, device)


# A window side past this is unbounded for any sequence; clamped to it, i + offset + side stays
# far from int64's end (as csrc/common/attention_band.h's kBandLimit, which the kernels use).
WINDOW_LIMIT = 1 << 42


def _window_sides(window_size, is_causal: bool) -> Tuple[int, int]:
    left, right = -1, -1
    if window_size is not None:
        left = -1 if window_size[0] is None else min(int(window_size[0]), WINDOW_LIMIT)
        right = -1 if window_size[1] is None else min(int(window_size[1]), WINDOW_LIMIT)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                        is_causal: bool = False, scale: Optional[float] = None,
                        enable_gqa: bool = False, *, window_size=None, softcap: Optional[float] = None,
                        diag_offset: int = 0, return_lse: bool = False,
                        work_dtype: Optional[torch.dtype] = None,
                        probs_dtype: Optional[torch.dtype] = None):
    """Attention computed with unfused PyTorch ops: in float32 for 16-bit inputs (as the
    fused kernels and torch's math backend on the CPU compute them: scores in half precision
    lost 3-4x the accuracy and overflowed), else in the inputs' dtype; out in the inputs'
    dtype. work_dtype overrides that (the inputs' own 16-bit dtype: the unfused math as a GPU
    computes it); probs_dtype rounds the probabilities to it before their product with v, as
    every GPU flash kernel (torch's own included) does: baselines the tests hold the GPU
    kernels to.

    Differentiable with respect to query, key, value and a float attn_mask.
    Returns out, or (out, lse) with lse = logsumexp of the scores per query row
    (-inf for fully masked rows; float32 for 16-bit inputs) when return_lse is True.
    """
    out_dtype = query.dtype
    work = torch.promote_types(out_dtype, torch.float32) if work_dtype is None else work_dtype
    query, key, value = query.to(work), key.to(work), value.to(work)
    L, S = query.shape[-2], key.shape[-2]
    E = query.shape[-1]
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)

    scores = (query @ key.transpose(-2, -1)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap

    keep = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask
        else:
            scores = scores + attn_mask.to(scores.dtype)
    left, right = _window_sides(window_size, is_causal)
    band = _band(L, S, left, right, diag_offset, query.device)
    if band is not None:
        keep = band if keep is None else keep & band
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))

    # Rows with no visible key (or only -inf scores) give zeros, never NaN.
    if scores.shape[-1] == 0:  # no keys at all
        row_max = scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    else:
        row_max = scores.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(row_max)
    scores = scores.masked_fill(dead, 0.0)
    # softmax subtracts the row max: exp(s - logsumexp(s)) lost logsumexp's log(S) to rounding
    # when the row's scores were huge and negative (a -1e9 padding mask: weights summing to S)
    probs = torch.softmax(scores, dim=-1).masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    if probs_dtype is not None:
        probs = probs.to(probs_dtype).to(work)
    out = (probs @ value).to(out_dtype)
    if not return_lse:
        return out
    lse = torch.logsumexp(scores, dim=-1).masked_fill(dead.squeeze(-1), float("-inf"))
    return out, lse


def attention_varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens_q, cu_seqlens_k, *, is_causal: bool = False,
                               scale: Optional[float] = None, window_size=None,
                               softcap: Optional[float] = None,
                               work_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Packed variable-length attention, one sequence at a time: q (total_q, Hq, D), k and v
    (total_k, Hk, D/Dv); sequence b owns rows cu_seqlens[b] .. cu_seqlens[b+1]-1. Causal and
    window bands are aligned top-left per sequence, as SDPA's is_causal. work_dtype: as
    attention_reference's."""
    cu_q = [int(x) for x in cu_seqlens_q.tolist()]
    cu_k = [int(x) for x in cu_seqlens_k.tolist()]
    outs = []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)
        kb = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1)
        vb = v[cu_k[b]:cu_k[b + 1]].transpose(0, 1)
        ob = attention_reference(qb, kb, vb, None, 0.0, is_causal, scale, True,
                                 window_size=window_size, softcap=softcap,
                                 work_dtype=work_dtype)
        outs.append(ob.transpose(0, 1))
    if not outs:
        return q.new_empty((0, q.shape[1], v.shape[-1]))
    return torch.cat(outs, dim=0)


def attention_kvcache_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                cache_seqlens, *, is_causal: bool = False,
                                scale: Optional[float] = None, window_size=None,
                                softcap: Optional[float] = None,
                                work_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Decoding attention over a cache (no update): q (B, Lq, Hq, D), caches (B, S, Hk, D/Dv);
    sequence b attends to its first cache_seqlens[b] keys, the band aligned bottom-right
    (query Lq-1 is the newest token and sees key cache_seqlens[b]-1). work_dtype: as
    attention_reference's."""
    lens = [int(x) for x in torch.as_tensor(cache_seqlens).reshape(-1).tolist()]
    Lq = q.shape[1]
    outs = []
    for b, n in enumerate(lens):
        qb = q[b].transpose(0, 1)
        kb = k_cache[b, :n].transpose(0, 1)
        vb = v_cache[b, :n].transpose(0, 1)
        ob = attention_reference(qb, kb, vb, None, 0.0, is_causal, scale, True,
                                 window_size=window_size, softcap=softcap, diag_offset=n - Lq,
                                 work_dtype=work_dtype)
        outs.append(ob.transpose(0, 1))
    if not outs:
        return q.new_empty((0, Lq, q.shape[2], v_cache.shape[-1]))
    return torch.stack(outs, dim=0)
