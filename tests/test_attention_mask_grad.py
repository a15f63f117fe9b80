"""The gradient of a float attn_mask (a learned attention bias: relative position biases,
ALiBi with learned slopes, pair biases) from the CPU kernel's backward: against float64
autograd of the math, broadcast masks summed over what they broadcast, with the band,
softcap, grouped heads and dropout; hidden pairs get 0."""
import math

import pytest
import torch

import llmkernels
from llmkernels.ops.attention_dropout import draw_seed, keep_mask
from attention_utils import GRAD_FLOOR, exact_attention, grad_scale, max_err

sdpa = llmkernels.scaled_dot_product_attention


CASES = {
    "per_head_broadcast_batch": dict(bias_shape=(1, 4, 70, 90)),
    "shared_by_heads_and_batch": dict(bias_shape=(70, 90)),
    "full": dict(bias_shape=(2, 4, 70, 90)),
    "causal_window_gqa": dict(bias_shape=(4, 70, 90), Hk=2, causal=True, window=30),
    "softcap": dict(bias_shape=(1, 4, 70, 90), softcap=15.0),
    "dropout": dict(bias_shape=(4, 70, 90), dropout=0.25),
    "one_query": dict(bias_shape=(4, 1, 90), L=1),
    "long_keys": dict(bias_shape=(4, 70, 300), S=300, causal=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_bias_gradient_against_float64(cpu_tier, case, dtype):
    c = dict(B=2, Hq=4, Hk=4, L=70, S=90, E=32, causal=False, window=None, softcap=None,
             dropout=0.0)
    c.update(CASES[case])
    torch.manual_seed(2)
    q = torch.randn(c["B"], c["Hq"], c["L"], c["E"]).to(dtype).requires_grad_()
    k = torch.randn(c["B"], c["Hk"], c["S"], c["E"]).to(dtype).requires_grad_()
    v = torch.randn(c["B"], c["Hk"], c["S"], c["E"]).to(dtype).requires_grad_()
    bias = (torch.randn(c["bias_shape"]) * 2).to(dtype).requires_grad_()
    kw = dict(attn_mask=bias, is_causal=c["causal"], enable_gqa=c["Hq"] != c["Hk"],
              softcap=c["softcap"], dropout_p=c["dropout"],
              window_size=(c["window"], None) if c["window"] is not None else None)
    d = llmkernels.explain(sdpa, q, k, v, **kw)
    assert d.backend == "cpu", str(d)
    torch.manual_seed(9)
    out = sdpa(q, k, v, **kw)
    keep = None
    if c["dropout"]:
        torch.manual_seed(9)
        keep = keep_mask(int(draw_seed()), (c["B"], c["Hq"], c["L"], c["S"]), c["dropout"])
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    exact = exact_attention(*leaves, causal=c["causal"], window=c["window"],
                            softcap=c["softcap"], keep=keep, p=c["dropout"])
    grad = torch.randn_like(exact)
    exact_grads = torch.autograd.grad(exact, leaves, grad)
    grads = torch.autograd.grad(out, (q, k, v, bias), grad.to(dtype))
    assert grads[3].shape == bias.shape and grads[3].dtype == dtype
    size = max(exact.abs().max().item(), 1.0)
    out_tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    assert max_err(out, exact) <= out_tol * size
    gscale = grad_scale(exact_grads)
    tol = {torch.float32: 4 * GRAD_FLOOR[torch.float32], torch.bfloat16: 0.03}[dtype]
    for name, g, ge in zip(("dq", "dk", "dv", "dbias"), grads, exact_grads):
        # a bias broadcast over n (batch x heads) sums n terms of the gradient's size
        n = ge.numel() and (exact.numel() // exact.shape[-1] * c["S"]) // ge.numel()
        assert max_err(g, ge) <= tol * gscale * max(1, math.sqrt(n)), (name, max_err(g, ge))


def test_hidden_pairs_get_zero_and_sdpa_agrees():
    """A bias with -inf entries (and the causal triangle): their gradient is 0, as torch's;
    the rest matches torch's SDPA in float64."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 130, 16) for _ in range(3))
    bias = torch.randn(2, 130, 130)
    bias[:, :, 100:] = float("-inf")  # keys 100.. hidden from everyone: whole tiles skipped
    bias[0, 5, :] = float("-inf")     # a row that sees nothing
    bias.requires_grad_()
    out = sdpa(q, k, v, attn_mask=bias, is_causal=True)
    (got,) = torch.autograd.grad(out.square().sum(), bias)
    b64 = bias.detach().double().requires_grad_()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=b64.masked_fill(
            torch.ones(130, 130, dtype=torch.bool).triu(1), float("-inf")))
    (want,) = torch.autograd.grad(ref.nan_to_num(0.0).square().sum(), b64)
    assert (got[:, :, 100:] == 0).all() and (got[0, 5] == 0).all()
    assert (got.triu(1) == 0).all()
    want = want.nan_to_num(0.0)
    assert max_err(got, want) < 1e-5 * max(want.abs().max().item(), 1.0)


def test_learned_bias_trains():
    """A relative-position bias table learned through the kernel: the loss goes down as with
    the reference path, step for step (float32)."""
    torch.manual_seed(0)
    L, H = 48, 2
    x = torch.randn(4, H, L, 16)
    target = torch.randn(4, H, L, 16)
    rel = (torch.arange(L)[None, :] - torch.arange(L)[:, None]) + L - 1
    losses = {}
    for backend in ("cpu", "reference"):
        table = torch.zeros(H, 2 * L - 1, requires_grad=True)
        opt = torch.optim.SGD([table], lr=0.5)
        history = []
        for _ in range(5):
            out = sdpa(x, x, x, attn_mask=table[:, rel], backend=backend)
            loss = (out - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(loss.item())
        losses[backend] = history
    assert losses["cpu"][-1] < losses["cpu"][0]
    assert max(abs(a - b) for a, b in zip(losses["cpu"], losses["reference"])) < 1e-5


def test_compile_with_a_learned_bias():
    torch._dynamo.reset()

    def block(q, k, v, bias):
        return sdpa(q, k, v, attn_mask=bias, is_causal=True).square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [torch.randn(1, 2, 40, 16) for _ in range(3)] + [torch.randn(2, 40, 40)]
    results = []
    for fn in (compiled, block):
        xs = [t.clone().requires_grad_() for t in leaves]
        results.append(torch.autograd.grad(fn(*xs), xs))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_no_mask_gradient_without_requires_grad():
    """A float mask that needs no gradient costs no gradient buffer (and gets none)."""
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    mask = torch.randn(20, 20)
    out = sdpa(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert mask.grad is None and q.grad is not None


def test_gpu_paths_still_refuse_a_mask_gradient():
    from llmkernels.ops.attention import _mask_support
    mask = torch.zeros(4, 4, requires_grad=True)
    assert "CPU kernel and the reference path" in _mask_support(mask)
    assert _mask_support(mask, grad_fused=True) is None
