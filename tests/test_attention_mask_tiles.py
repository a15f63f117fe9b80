"""Masks that hide whole key tiles (the padding of a batch, packed sequences, sliding windows
and causal masks given as masks, as transformers passes them): the CPU kernel skips the
tiles a mask hides from every query row of a tile (and, decoding, the keys it hides from
every row of an item). Skipping must change no result: against the float64 reference, and
bit for bit against the same mask with a huge finite value in place of -inf, which the
kernel multiplies through instead of skipping."""
import pytest
import torch

import llmkernels
from attention_utils import judge_call, make_qkv

HUGE = -1e30  # finite: never skipped, and 2^(score - 1e30) is exactly 0 next to a visible key


def left_padded_causal(B, L, S, pads):
    """HF's mask for a left-padded batch: entry b hides its first pads[b] keys, and query i
    sees keys up to i + S - L (a prompt's queries against its cache)."""
    mask = torch.ones(B, 1, L, S, dtype=torch.bool).tril(S - L)
    for b, pad in enumerate(pads):
        mask[b, ..., :pad] = False
    return mask


def packed_causal(lens):
    """Sequences packed end to end, each causal within itself: block-diagonal."""
    n = sum(lens)
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    return (seq[:, None] == seq[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()


def band(L, S, left):
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    return (j <= i) & (j >= i - left)


def per_head_padding(B, H, L, S):
    """Each head hides its own leading keys (a mask with a head dimension)."""
    mask = torch.ones(B, H, L, S, dtype=torch.bool)
    for h in range(H):
        mask[:, h, :, : 70 * h] = False
    return mask


def as_float(mask, dtype, hidden=float("-inf")):
    """Additive form: 0 or small values where visible, `hidden` where not."""
    values = (torch.randn(mask.shape) * 0.5).to(dtype)
    return values.masked_fill(~mask, hidden)


MASKS = {
    # name: (B, Hq, Hk, L, S, mask builder)
    "left_padded_prompt": (3, 4, 2, 130, 300, lambda: left_padded_causal(3, 130, 300, [0, 150, 70])),
    "packed": (1, 2, 2, 200, 200, lambda: packed_causal([70, 5, 100, 25])),
    "sliding_window": (2, 2, 1, 200, 200, lambda: band(200, 200, 40)),
    "per_head": (2, 3, 3, 140, 260, lambda: per_head_padding(2, 3, 140, 260)),
    "keys_only": (2, 2, 2, 130, 330, lambda: torch.arange(330).ge(200).expand(2, 1, 1, 330)),
    # stored keys-first: the mask's last dim strided
    "strided": (2, 2, 2, 130, 200, lambda: left_padded_causal(2, 130, 200, [70, 0])
                .transpose(-1, -2).contiguous().transpose(-1, -2)),
}


def masked_case(name, dtype, kind):
    B, Hq, Hk, L, S, build = MASKS[name]
    torch.manual_seed(0)
    mask = build()
    if kind == "float":
        mask = as_float(mask, dtype)
    return make_qkv(B, Hq, Hk, L, S, 32, 24, dtype, requires_grad=True), mask, Hq != Hk


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tile_hiding_masks_against_the_reference(cpu_tier, name, kind, dtype):
    (q, k, v), mask, gqa = masked_case(name, dtype, kind)
    kw = dict(attn_mask=mask, enable_gqa=gqa)
    out = llmkernels.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)
    judge_call(out, q, k, v, dtype, **kw)


def outputs_and_grads(q, k, v, mask, gqa, grad_out):
    out = llmkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa,
                                                  backend="cpu")
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


# What the kernel skips: -inf, and values whose scaling to base 2 overflows to -inf as the
# forward applies them (finfo.min, models' padding value for float masks).
SKIPPED = [float("-inf"), torch.finfo(torch.float32).min, -2.4e38]


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("fill", SKIPPED)
def test_skipping_changes_no_bit(cpu_tier, name, fill):
    (q, k, v), mask, gqa = masked_case(name, torch.float32, "bool")
    skipped = as_float(mask, torch.float32, hidden=fill)
    multiplied = skipped.masked_fill(~mask, HUGE)
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],))
    a = outputs_and_grads(q, k, v, skipped, gqa, grad_out)
    b = outputs_and_grads(q, k, v, multiplied, gqa, grad_out)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("L", [1, 2, 4])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_decoding_a_left_padded_batch(cpu_tier, L, kind):
    """Decode-shaped calls (few queries a kv head) skip the keys their mask hides from every
    row of an item: here whole key chunks (600 of 1100 keys for one entry)."""
    B, Hq, Hk, S = 3, 8, 2, 1100
    torch.manual_seed(1)
    q, k, v = make_qkv(B, Hq, Hk, L, S, 64, 64, torch.float32)
    mask = left_padded_causal(B, L, S, [0, 600, 37])
    if kind == "float":
        mask = as_float(mask, torch.float32)
    kw = dict(attn_mask=mask, enable_gqa=True)
    out = llmkernels.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)
    judge_call(out, q, k, v, torch.float32, False, **kw)
    hidden = mask if kind == "bool" else mask != float("-inf")
    skipped = as_float(hidden, torch.float32)
    multiplied = skipped.masked_fill(~hidden, HUGE)
    a, b = (llmkernels.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True,
                                                    backend="cpu") for m in (skipped, multiplied))
    assert torch.equal(a, b)


def test_rows_and_tiles_that_see_nothing(cpu_tier):
    """Query tiles whose rows the mask hides from every key give zeros (forward) and zero
    gradients, never NaN; tiles beside them are unaffected."""
    q, k, v = make_qkv(2, 2, 2, 150, 200, 16, 16, torch.float32, requires_grad=True)
    mask = torch.ones(2, 1, 150, 200, dtype=torch.bool)
    mask[0, :, :70] = False     # the whole first query tile and part of the second of entry 0
    mask[1, :, :, :130] = False  # entry 1 sees the last 70 keys only
    for m in (mask, as_float(mask, torch.float32)):
        out = llmkernels.scaled_dot_product_attention(q, k, v, attn_mask=m, backend="cpu")
        assert torch.isfinite(out).all() and (out[0, :, :70] == 0).all()
        ref = llmkernels.scaled_dot_product_attention(q, k, v, attn_mask=m, backend="reference")
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        assert (dq[0, :, :70] == 0).all() and (dk[1, :, :130] == 0).all()
        assert (dv[1, :, :130] == 0).all()
        ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
        for g, r in zip((dq, dk, dv), ref_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_hidden_tiles_are_not_read(cpu_tier):
    """Keys a mask hides from whole tiles are skipped, not multiplied by zero: NaN there (an
    unwritten cache slot, say) stays out of the output and the gradients, where 0 x NaN
    would have spread it."""
    B, H, L, S = 2, 2, 130, 300
    q, k, v = make_qkv(B, H, H, L, S, 32, 32, torch.float32)
    mask = left_padded_causal(B, L, S, [0, 150])
    clean_k, clean_v = k.clone(), v.clone()
    clean_k[1, :, :128] = 0
    clean_v[1, :, :128] = 0
    k[1, :, :128] = float("nan")  # two whole key tiles entry 1 hides from every query
    v[1, :, :128] = float("nan")
    grad_out = torch.randn(B, H, L, 32)
    for m in (mask, *(as_float(mask, torch.float32, hidden=fill) for fill in SKIPPED)):
        got = outputs_and_grads(*(t.requires_grad_() for t in (q, k, v)), m, False, grad_out)
        want = outputs_and_grads(*(t.detach().requires_grad_() for t in (q, clean_k, clean_v)),
                                 m, False, grad_out)
        for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
            assert torch.equal(x[:, :, 128:] if name in ("dk", "dv") else x,
                               y[:, :, 128:] if name in ("dk", "dv") else y), name
        q, k, v = (t.detach() for t in (q, k, v))

    # decoding: whole blocks of keys before the first visible one (600; blocks of 64)
    q1, k1, v1 = make_qkv(B, 8, 2, 1, 1100, 64, 64, torch.float32)
    mask = left_padded_causal(B, 1, 1100, [0, 600])
    k1[1, :, :512] = float("nan")
    v1[1, :, :512] = float("nan")
    out = llmkernels.scaled_dot_product_attention(q1, k1, v1, attn_mask=mask, enable_gqa=True,
                                                  backend="cpu")
    assert torch.isfinite(out).all()
