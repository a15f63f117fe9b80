"""attn_mask on the Triton path (the CUDA path refuses masks; selection sends them to Triton):
bool and additive masks against the float64 reference, forward and backward, and the key
blocks a mask hides from a whole block of queries skipped (never loaded). Without a GPU,
Triton runs in its interpreter at small shapes."""
import pytest
import torch

import llmkernels
from attention_utils import judge_call, make_qkv
from gpu_paths import DEVICE, ON_GPU, skip_unless_runs, force_splits  # noqa: F401

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def left_padded_causal(B, L, S, pads):
    """A left-padded batch's mask: entry b hides its first pads[b] keys; query i sees keys up
    to i + S - L."""
    mask = torch.ones(B, 1, L, S, dtype=torch.bool, device=DEVICE).tril(S - L)
    for b, pad in enumerate(pads):
        mask[b, ..., :pad] = False
    return mask


def packed_causal(lens):
    n = sum(lens)
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).to(DEVICE)
    causal = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril()
    return (seq[:, None] == seq[None, :]) & causal


def additive(mask, dtype):
    values = (torch.randn(mask.shape, device=DEVICE) * 0.5).to(dtype)
    return values.masked_fill(~mask, float("-inf"))


def check(q, k, v, mask, dtype, backward=True, **kw):
    skip_unless_runs("triton", q, k, v)
    kw = dict(kw, attn_mask=mask)
    if q.shape[1] != k.shape[1]:
        kw["enable_gqa"] = True
    decision = llmkernels.explain(llmkernels.scaled_dot_product_attention, q, k, v, **kw)
    assert decision.backend == "triton" or not ON_GPU, str(decision)
    out = llmkernels.scaled_dot_product_attention(q, k, v, backend="triton", **kw)
    judge_call(out, q, k, v, dtype, backward, same_precision="sdpa" if ON_GPU else "math", **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("causal", [False, True])
def test_random_masks(dtype, kind, causal):
    q, k, v = make_qkv(2, 2, 2, 37, 45, 32, 32, dtype, requires_grad=True, device=DEVICE)
    torch.manual_seed(0)
    if kind == "bool":
        mask = torch.rand(37, 45, device=DEVICE) > 0.3
        mask[:, 0] = True  # no row empty: SDPA's baseline gives NaN there
    else:
        mask = (torch.randn(2, 1, 37, 45, device=DEVICE) * 2).to(dtype)
    check(q, k, v, mask, dtype, is_causal=causal)


def test_strided_masks():
    """A mask stored keys-first (its last dim strided) and a float16 mask with bfloat16 inputs."""
    q, k, v = make_qkv(2, 2, 1, 30, 41, 32, 32, torch.bfloat16, requires_grad=True, device=DEVICE)
    torch.manual_seed(2)
    keep = torch.rand(2, 1, 41, 30, device=DEVICE) > 0.4
    keep[..., 0, :] = True
    keep = keep.transpose(-1, -2)  # (2, 1, 30, 41), stride 1 along the queries
    check(q, k, v, keep, torch.bfloat16)
    check(q, k, v, additive(keep, torch.float16), torch.bfloat16)


@pytest.mark.parametrize("name", ["left_padded", "packed", "per_head", "keys_only"])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks_hiding_whole_blocks(name, kind):
    dtype = torch.bfloat16
    if name == "left_padded":
        q, k, v = make_qkv(2, 4, 2, 40, 90, 32, 32, dtype, requires_grad=True, device=DEVICE)
        mask = left_padded_causal(2, 40, 90, [0, 45])
    elif name == "packed":
        q, k, v = make_qkv(1, 2, 2, 70, 70, 32, 32, dtype, requires_grad=True, device=DEVICE)
        mask = packed_causal([30, 3, 37])
    elif name == "per_head":
        q, k, v = make_qkv(2, 3, 3, 20, 80, 32, 32, dtype, requires_grad=True, device=DEVICE)
        mask = torch.ones(2, 3, 20, 80, dtype=torch.bool, device=DEVICE)
        for h in range(3):
            mask[:, h, :, :25 * h] = False
    else:  # a key padding mask broadcast over the queries
        q, k, v = make_qkv(2, 2, 2, 33, 70, 32, 32, dtype, requires_grad=True, device=DEVICE)
        mask = (torch.arange(70, device=DEVICE) >= 36).expand(2, 1, 1, 70)
    if kind == "additive":
        mask = additive(mask, dtype)
    check(q, k, v, mask, dtype)


@pytest.mark.parametrize("splits", [None, 3])
def test_decode_shaped_calls_with_masks(force_splits, splits):
    """One query a sequence, GQA heads packed in a tile, keys split across programs."""
    force_splits(splits)
    q, k, v = make_qkv(3, 8, 2, 1, 150, 64, 64, torch.bfloat16, device=DEVICE)
    mask = left_padded_causal(3, 1, 150, [0, 70, 149])
    check(q, k, v, mask, torch.bfloat16, backward=False)
    check(q, k, v, additive(mask, torch.float32), torch.bfloat16, backward=False)


def test_rows_that_see_nothing_and_hidden_blocks_not_read():
    """Rows the mask hides from every key give zeros and zero gradients; keys it hides from
    whole blocks are never loaded (NaN there stays out, where 0 x NaN would spread it)."""
    q, k, v = make_qkv(2, 2, 2, 40, 300, 32, 32, torch.float32, device=DEVICE)
    skip_unless_runs("triton", q, k, v)
    mask = torch.ones(2, 1, 40, 300, dtype=torch.bool, device=DEVICE)
    mask[0, :, :10] = False        # entry 0: its first 10 queries see nothing
    mask[1, :, :, :150] = False    # entry 1: keys 0..149 hidden from every query
    clean_k, clean_v = k.clone(), v.clone()
    clean_k[1, :, :128] = 0
    clean_v[1, :, :128] = 0
    k[1, :, :128] = float("nan")   # whole blocks for any BLOCK_N up to 128
    v[1, :, :128] = float("nan")
    grad_out = torch.randn(2, 2, 40, 32, device=DEVICE)
    for m in (mask, additive(mask, torch.float32)):
        results = []
        for kk, vv in ((k, v), (clean_k, clean_v)):
            leaves = [t.detach().requires_grad_() for t in (q, kk, vv)]
            out = llmkernels.scaled_dot_product_attention(*leaves, attn_mask=m, backend="triton")
            results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
        (out, dq, dk, dv), clean = results
        assert (out[0, :, :10] == 0).all() and (dq[0, :, :10] == 0).all()
        assert torch.isfinite(out).all() and torch.isfinite(dq).all()
        assert (dk[1, :, :128] == 0).all() and (dv[1, :, :128] == 0).all()
        torch.testing.assert_close(out, clean[0], rtol=0, atol=0)
        torch.testing.assert_close(dq, clean[1], rtol=0, atol=0)


def test_visible_key_ranges():
    kernels = pytest.importorskip("llmkernels.kernels.attention")
    mask = torch.zeros(2, 3, 5, 9, dtype=torch.bool)
    mask[0, 1, 2, 3] = mask[0, 1, 2, 7] = True
    mask[1, 2, 4, :] = True
    ranges = kernels.visible_key_ranges(mask)
    assert ranges.shape == (2, 3, 5, 2) and ranges.dtype == torch.int32
    assert ranges[0, 1, 2].tolist() == [3, 7] and ranges[1, 2, 4].tolist() == [0, 8]
    assert ranges[0, 0, 0].tolist() == [9, -1]  # nothing visible
    floats = torch.full((1, 1, 2, 4), float("-inf"))
    floats[0, 0, 1, 1] = torch.finfo(torch.float32).min  # hidden too (scaled: -inf)
    floats[0, 0, 1, 2] = -1e30
    assert kernels.visible_key_ranges(floats)[0, 0].tolist() == [[4, -1], [2, 2]]
    # broadcast dims (stride 0) count once
    wide = torch.ones(1, 1, 1, 6, dtype=torch.bool).expand(4, 8, 7, 6)
    assert kernels.visible_key_ranges(wide).shape == (1, 1, 1, 2)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.bfloat16])
def test_visible_key_ranges_kernel_matches_torch(dtype):
    """The GPU's one-launch ranges kernel against the torch ops, on random and structured
    masks, broadcast dims and strided views included."""
    kernels = pytest.importorskip("llmkernels.kernels.attention")
    torch.manual_seed(3)
    keep = torch.rand(2, 3, 6, 37, device=DEVICE) > 0.9
    keep[0, 0, 0] = False
    keep[1, 2, 5] = True
    keep[1, 1, 1, -1] = True
    cases = [keep, keep.transpose(2, 3).contiguous().transpose(2, 3),
             keep[:, :1].expand(2, 5, 6, 37), keep[:1, :, :1].expand(4, 3, 9, 37)]
    for m in cases:
        if dtype != torch.bool:
            m = torch.zeros(m.shape, device=DEVICE, dtype=dtype).masked_fill(~m, float("-inf"))
        torch.testing.assert_close(kernels.visible_key_ranges(m, use_kernel=True),
                                   kernels.visible_key_ranges(m, use_kernel=False))
