"""Attention dropout in the fused CPU kernel: the weights it keeps are a hash of (seed, row,
key) (attention_dropout.keep_mask gives the same bits), so forward and backward are checked
against the float64 math with that pattern; the pattern itself against what dropout must be
(keep rate, no structure); the seed comes from torch's generator."""
import math

import pytest
import torch

import llmkernels
from llmkernels.backends import native_module
from llmkernels.ops.attention import attention_forward_cpu
from llmkernels.ops.attention_dropout import draw_seed, keep_mask
from attention_utils import GRAD_FLOOR, exact_attention, grad_scale, max_err

sdpa = llmkernels.scaled_dot_product_attention


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_pattern_keeps_one_minus_p_without_structure(p):
    shape = (2, 4, 96, 200)
    keep = keep_mask(987654321, shape, p).double()
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    # rows and keys: their keep rates spread as independent draws would (no row or key
    # column kept or dropped together)
    for dim, count in ((-1, shape[-1]), (-2, shape[-2])):
        rates = keep.mean(dim)
        sd = math.sqrt(p * (1 - p) / count)
        assert rates.std().item() < 1.3 * sd and rates.std().item() > 0.7 * sd
    # neighbours (next key, next row, next head) uncorrelated
    centred = keep - keep.mean()
    var = centred.pow(2).mean().item()
    for a, b in ((centred[..., 1:], centred[..., :-1]), (centred[..., 1:, :], centred[..., :-1, :]),
                 (centred[:, 1:], centred[:, :-1])):
        assert abs((a * b).mean().item() / var) < 0.02
    # another seed: another pattern
    other = keep_mask(987654322, shape, p).double()
    assert abs(((keep - keep.mean()) * (other - other.mean())).mean().item() / var) < 0.02


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "gqa_window": dict(Hq=4, Hk=2, causal=True, window=19),
    "bool_mask": dict(mask="bool"),
    "float_mask_softcap": dict(mask="float", softcap=20.0),
    "few_queries": dict(L=3, S=150, Hq=4, Hk=1),  # decode-shaped: dropout takes the tiles
    "one_query": dict(L=1, S=70),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_against_the_pattern(cpu_tier, case, dtype):
    c = dict(B=2, Hq=2, Hk=2, L=77, S=130, E=24, causal=False, window=None, mask=None,
             softcap=None)
    c.update(CASES[case])
    torch.manual_seed(3)
    p = 0.3
    q = torch.randn(c["B"], c["Hq"], c["L"], c["E"]).to(dtype).requires_grad_()
    k = torch.randn(c["B"], c["Hk"], c["S"], c["E"]).to(dtype).requires_grad_()
    v = torch.randn(c["B"], c["Hk"], c["S"], c["E"]).to(dtype).requires_grad_()
    mask = None
    if c["mask"] == "bool":
        mask = torch.rand(c["B"], c["Hq"], c["L"], c["S"]) > 0.3
    elif c["mask"] == "float":
        mask = torch.randn(c["L"], c["S"]).to(dtype).expand(c["B"], c["Hq"], -1, -1)
    scale = 1 / math.sqrt(c["E"])
    right = 0 if c["causal"] else -1
    left = c["window"] if c["window"] is not None else -1
    seed = draw_seed()
    out, _, _ = attention_forward_cpu(q, k, v, mask, scale, c["softcap"] or 0.0, left, right, 0,
                                      True, p, seed)
    keep = keep_mask(int(seed), out.shape[:-1] + (c["S"],), p)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = exact_attention(*leaves, mask, scale=scale, causal=c["causal"], window=c["window"],
                            softcap=c["softcap"], keep=keep, p=p)
    # the inputs are exact in float64: the error is float32 sums and the output's rounding
    # (bf16 weights on the bf16-dot tiers)
    size = max(exact.abs().max().item(), 1.0)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    assert max_err(out, exact) <= tol * size, max_err(out, exact)
    grad = torch.randn_like(exact)
    exact_grads = torch.autograd.grad(exact, leaves, grad)
    grads = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    gscale = grad_scale(exact_grads)
    tol = {torch.float32: 4 * GRAD_FLOOR[torch.float32], torch.bfloat16: 0.03,
           torch.float16: 0.004}[dtype]
    for name, g, ge in zip(("dq", "dk", "dv"), grads, exact_grads):
        assert max_err(g, ge) <= tol * gscale, (name, max_err(g, ge), gscale)


def test_pattern_independent_of_threads_and_rounds():
    """The pattern depends on the seed alone: not on the thread count, nor on how the work
    is cut into rounds of heads and segments of keys (which change the float32 sums' order
    only: a weight dropped in one and kept in another would differ by ~0.1)."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 70, 32, requires_grad=True)
    k = torch.randn(2, 4, 300, 32, requires_grad=True)
    v = torch.randn(2, 4, 300, 32, requires_grad=True)
    seed = torch.tensor(42)
    results = []
    before = torch.get_num_threads()
    try:
        for threads, round_bytes in ((1, 0), (2, 0), (2, 64 << 10)):
            torch.set_num_threads(threads)
            native_module().attention_set_round_bytes(round_bytes)
            out, _, _ = attention_forward_cpu(q, k, v, None, 0.2, 0.0, -1, -1, 0, True, 0.25, seed)
            results.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    finally:
        torch.set_num_threads(before)
        native_module().attention_set_round_bytes(0)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_public_call_draws_its_seed_from_torch():
    q, k, v = (torch.randn(1, 2, 50, 16) for _ in range(3))
    torch.manual_seed(5)
    out = sdpa(q, k, v, dropout_p=0.4)
    torch.manual_seed(5)
    seed = draw_seed()
    keep = keep_mask(int(seed), (1, 2, 50, 50), 0.4)
    exact = exact_attention(q.double(), k.double(), v.double(), keep=keep, p=0.4)
    assert max_err(out, exact) < 1e-5
    assert not torch.allclose(sdpa(q, k, v, dropout_p=0.4), out)  # the next draw differs
    # dropout 0 is the plain kernel, bit for bit
    assert torch.equal(sdpa(q, k, v, dropout_p=0.0), sdpa(q, k, v))


def test_activation_checkpointing_recomputes_the_same_pattern():
    """torch.utils.checkpoint replays the forward with torch's RNG state restored: the seed,
    and so the dropped weights, are those of the first forward (gradients as without it)."""
    from torch.utils.checkpoint import checkpoint

    def block(q, k, v):
        return sdpa(q, k, v, dropout_p=0.3, is_causal=True).square().sum()

    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 3, 70, 16, requires_grad=True) for _ in range(3))
        torch.manual_seed(11)
        loss = checkpoint(block, q, k, v, use_reentrant=False) if use_checkpoint else block(q, k, v)
        loss.backward()
        grads.append((loss.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_expected_output_is_the_undropped_one():
    """Averaged over many calls, dropout leaves the output unbiased (weights scaled by
    1 / (1 - p)): the mean of 400 calls is within a few standard errors of no dropout."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 8, 16) for _ in range(3))
    plain = sdpa(q, k, v)
    runs = torch.stack([sdpa(q, k, v, dropout_p=0.5) for _ in range(400)])
    stderr = runs.std(0) / math.sqrt(len(runs))
    assert ((runs.mean(0) - plain).abs() <= 5 * stderr + 1e-6).all()


def test_nn_multihead_attention_trains_on_the_kernel():
    mha = llmkernels.nn.MultiheadAttention(32, 4, dropout=0.2, batch_first=True)
    x = torch.randn(2, 40, 32, requires_grad=True)
    d = llmkernels.explain(mha, x, x, x, need_weights=False)
    assert d.backend == "cpu" and "dropout fused" in d.detail
    out, _ = mha(x, x, x, need_weights=False)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_compile_with_dropout():
    torch._dynamo.reset()

    def block(q, k, v):
        return sdpa(q, k, v, dropout_p=0.3, is_causal=True)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    q, k, v = (torch.randn(1, 2, 50, 32, requires_grad=True) for _ in range(3))
    out = compiled(q, k, v)
    out.sum().backward()
    assert out.shape == (1, 2, 50, 32) and torch.isfinite(q.grad).all()
    # some weights dropped: not the plain output
    assert not torch.allclose(out, sdpa(q, k, v, is_causal=True))


def test_bad_dropout_seed_or_rate():
    q, k, v = (torch.randn(1, 1, 8, 16) for _ in range(3))
    with pytest.raises(ValueError, match="dropout needs a seed"):
        attention_forward_cpu(q, k, v, None, 0.25, 0.0, -1, -1, 0, False, 0.5, None)
    with pytest.raises(ValueError, match="dropout_p"):
        attention_forward_cpu(q, k, v, None, 0.25, 0.0, -1, -1, 0, False, 1.5, torch.tensor(1))
