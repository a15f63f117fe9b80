"""Shared helpers for the attention tests: inputs and the numerics rule of DESIGN.md."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from llmkernels.reference import attention_mask_tensor, attention_reference

# Absolute floors added to "2x PyTorch's own error", relative to the size of the values
# involved: they only matter where torch happens to be exact, e.g. a gradient that cancels to
# exactly 0 in torch's formula (one key: dS = P (dP - delta) is 0 by algebra, while the
# FlashAttention form delta = rowsum(dO * O) leaves rounding noise of the other gradients'
# size). So gradients are scaled by the largest of the three exact gradients.
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float16: 5e-4}
GRAD_FLOOR = {dt: 2.5 * f for dt, f in FLOOR.items()}


def make_qkv(B, Hq, Hk, L, S, E, Ev, dtype, layout="bhsd", requires_grad=False, device="cpu"):
    """Random q, k, v of shape (B, H, seq, dim); layout "bshd" gives transposed views of
    (B, seq, H, dim) storage, the strides a user gets from a fused projection."""
    def one(H, n, d):
        if layout == "bshd":
            t = torch.randn(B, n, H, d, dtype=dtype, device=device).transpose(1, 2)
        else:
            t = torch.randn(B, H, n, d, dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)
    return one(Hq, L, E), one(Hk, S, E), one(Hk, S, Ev)


def exact_attention(q, k, v, mask=None, scale=None, causal=False, window=None, softcap=None,
                    keep=None, p=0.0):
    """The kernels' math on (B, H, L, E) inputs in their dtype (float64 for an exact result):
    grouped kv heads repeated, softcap, then a float mask added (a bool one hides), the causal
    / window band, rows that see nothing 0, and the weights `keep` keeps scaled 1 / (1 - p)."""
    group = q.shape[-3] // k.shape[-3]
    kk, vv = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    s = q @ kk.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    L, S = s.shape[-2:]
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    hidden = torch.zeros(L, S, dtype=torch.bool)
    if causal:
        hidden = hidden | (j > i)
    if window is not None:
        hidden = hidden | (j < i - window)
    if mask is not None:
        if mask.dtype == torch.bool:
            hidden = hidden | ~mask
        else:
            s = s + mask.to(s.dtype)
    w = torch.softmax(s.masked_fill(hidden, float("-inf")), -1).nan_to_num(0.0)
    if keep is not None:
        w = w * keep.to(w.dtype) / (1 - p)
    return w @ vv


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def grad_scale(exact_grads) -> float:
    """The size of gradient terms: the largest entry of any of the exact gradients."""
    return max([g.abs().max().item() for g in exact_grads if g.numel()] + [1.0])


def judge(name: str, ours: torch.Tensor, torch_same_precision: torch.Tensor, exact: torch.Tensor,
          dtype, floor=None, scale=None) -> None:
    """DESIGN.md: our error against the float64 result is at most 2x PyTorch's own
    same-precision error against it, plus a small absolute floor."""
    assert ours.shape == exact.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    e_ours = max_err(ours, exact)
    e_torch = max_err(torch_same_precision, exact)
    if scale is None:
        scale = max(exact.abs().max().item(), 1.0) if exact.numel() else 1.0
    floor = (GRAD_FLOOR if name.startswith("d") else FLOOR) if floor is None else floor
    bound = 2.0 * e_torch + floor[dtype] * scale
    assert e_ours <= bound, f"{name}: error {e_ours:.3e} > bound {bound:.3e} (torch's own {e_torch:.3e})"


def _torch_same_precision(q, k, v, attn_mask=None, is_causal=False, scale=None,
                          enable_gqa=False, window_size=None, softcap=None):
    """What a PyTorch user gets at the inputs' precision: SDPA itself where it can express
    the call (windows become a bool mask), else the unfused reference in that dtype."""
    if softcap is not None:
        return attention_reference(q, k, v, attn_mask, 0.0, is_causal, scale, enable_gqa,
                                   window_size=window_size, softcap=softcap, work_dtype=q.dtype)
    band = attention_mask_tensor(q.shape[-2], k.shape[-2], is_causal=is_causal,
                                 window_size=window_size, device=q.device)
    if band is not None:
        if attn_mask is None:
            attn_mask = band
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & band
        else:
            attn_mask = attn_mask.masked_fill(~band, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale,
                                          enable_gqa=enable_gqa)


def reference_pair(q, k, v, grad_out=None, same_precision="sdpa", **kw):
    """(float64 reference, PyTorch at the inputs' precision), each as (out, input grads or None).

    same_precision="sdpa": torch's fused SDPA on the inputs' device. "math": the unfused math
    in float32 with the probabilities rounded to the inputs' dtype before their product with v,
    as a GPU flash kernel computes it; the baseline for GPU kernels run in Triton's interpreter
    on the CPU, where torch's fused CPU kernel keeps the probabilities in float32 while every
    GPU flash kernel (torch's own included) rounds them to 16 bits."""
    results = []
    for exact in (True, False):
        cast = torch.float64 if exact else q.dtype
        leaves = [t.detach().to(cast).requires_grad_(grad_out is not None) for t in (q, k, v)]
        kw2 = dict(kw)
        mask = kw.get("attn_mask")
        if mask is not None and mask.dtype != torch.bool:
            kw2["attn_mask"] = mask.to(cast)
        fn = (attention_reference if exact
              else functools.partial(attention_reference, probs_dtype=cast)
              if same_precision == "math" else _torch_same_precision)
        out = fn(*leaves, **kw2)
        grads = None
        if grad_out is not None:
            grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
        results.append((out.detach(), grads))
    return results


def judge_call(out, q, k, v, dtype, backward=True, same_precision="sdpa", **kw):
    """out, computed from q, k, v with the call's keyword arguments kw, against the float64
    reference and PyTorch at the inputs' precision (judge); with backward, the three input
    gradients too (q, k, v require grad)."""
    grad_out = torch.randn_like(out) if backward else None
    (exact, exact_g), (same, same_g) = reference_pair(q, k, v, grad_out,
                                                      same_precision=same_precision, **kw)
    judge("out", out, same, exact, dtype)
    if backward:
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        for name, g, gs, ge in zip(("dq", "dk", "dv"), grads, same_g, exact_g):
            assert g.shape == ge.shape, name
            judge(name, g, gs, ge, dtype, scale=grad_scale(exact_g))
