"""The CPU kernel as torch custom ops: opcheck (schema, fake tensors, autograd registration)
and torch.compile(fullgraph=True) without graph breaks."""
import pytest
import torch

import llmkernels
from llmkernels.ops.attention import attention_backward_cpu, attention_forward_cpu


def _inputs(requires_grad, dtype=torch.float32, mask=None):  # last arg: keep a residual
    q = torch.randn(2, 4, 33, 16, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(2, 2, 40, 16, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(2, 2, 40, 8, dtype=dtype, requires_grad=requires_grad)
    return (q, k, v, mask, 0.25, 0.0, -1, 0, 0, requires_grad)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_forward(requires_grad, mask_kind, dtype):
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(2, 4, 33, 40) > 0.2)
    elif mask_kind == "float":
        mask = torch.randn(2, 4, 33, 40)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    torch.library.opcheck(attention_forward_cpu, _inputs(requires_grad, dtype, mask=mask))


def test_opcheck_backward():
    q, k, v, mask, *params, _ = _inputs(False, dtype=torch.bfloat16)
    out, lse, residual = attention_forward_cpu(q, k, v, mask, *params, True)
    assert residual.shape == out.shape
    torch.library.opcheck(attention_backward_cpu,
                          (torch.randn_like(out), q, k, v, mask, out, lse, residual, *params))


def test_opcheck_with_dropout():
    q, k, v, mask, *params, grad = _inputs(True)
    seed = torch.tensor(7)
    torch.library.opcheck(attention_forward_cpu, (q, k, v, mask, *params, grad, 0.2, seed))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse, residual = attention_forward_cpu(q, k, v, mask, *params, False, 0.2, seed)
    torch.library.opcheck(attention_backward_cpu, (torch.randn_like(out), q, k, v, mask, out, lse,
                                                   None, *params, 0.2, seed))


def test_opcheck_backward_with_mask_gradient():
    q, k, v, _, *params, _ = _inputs(False)
    mask = torch.randn(2, 4, 33, 40)
    out, lse, _ = attention_forward_cpu(q, k, v, mask, *params, False)
    torch.library.opcheck(attention_backward_cpu, (torch.randn_like(out), q, k, v, mask, out, lse,
                                                   None, *params, 0.0, None, True))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(attention_forward_cpu, (q, k, v, mask.requires_grad_(), *params, True))


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    def block(q, k, v):
        return llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                       window_size=(16, None)).sum(-1)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    q, k, v = (torch.randn(1, 2, 50, 32, requires_grad=True) for _ in range(3))
    out_c = compiled(q, k, v)
    out_e = block(q, k, v)
    torch.testing.assert_close(out_c, out_e)
    gc = torch.autograd.grad(out_c.sum(), (q, k, v))
    ge = torch.autograd.grad(out_e.sum(), (q, k, v))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_compile_inductor_fullgraph():
    torch._dynamo.reset()

    def block(x, w):
        q, k, v = (x @ w).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (2, 16)).transpose(1, 2) for t in (q, k, v))
        return llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True)

    x, w = torch.randn(2, 40, 32), torch.randn(32, 96)
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x, w), block(x, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["scale", "softcap"])
def test_compile_fullgraph_with_a_changing_scale_or_softcap(name):
    """A second value makes it a SymFloat (dynamic=True: from the first call), which
    math.isfinite could not take: fullgraph raised where torch's SDPA compiles."""
    torch._dynamo.reset()

    def block(q, k, v, value):
        return llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                       **{name: value})

    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend="aot_eager")
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    for value in (5.0, 7.5):
        torch.testing.assert_close(compiled(q, k, v, value), block(q, k, v, value))
    with pytest.raises(Exception, match=f"{name} must be"):
        compiled(q, k, v, float("nan"))


def test_dispatch_modes_see_the_custom_op():
    """Plain eager calls skip the dispatcher for speed; a dispatch mode (as used by fake
    tensors, export or FlopCounter-style tools) must still see the custom op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    plain = llmkernels.scaled_dot_product_attention(q, k, v, backend="cpu")
    with Record():
        recorded = llmkernels.scaled_dot_product_attention(q, k, v, backend="cpu")
    assert any("llmkernels.attention_forward_cpu" in s for s in seen), seen
    torch.testing.assert_close(plain, recorded, atol=0, rtol=0)


def test_fast_path_and_autograd_path_agree():
    q, k, v = (torch.randn(2, 3, 40, 32) for _ in range(3))
    with torch.no_grad():
        fast = llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True)
    slow = llmkernels.scaled_dot_product_attention(q.requires_grad_(), k, v, is_causal=True)
    torch.testing.assert_close(fast, slow.detach(), atol=0, rtol=0)


def test_varlen_under_compile_runs_between_graphs():
    """attention_varlen reads its lengths on the host: traced, a recompile for a batch with
    an empty sequence failed inside torch (a value-range assertion). It runs eagerly between
    graphs now, with eager's results; fullgraph=True names the reason."""
    torch._dynamo.reset()
    T = 10

    def f(q, cu):
        return llmkernels.attention_varlen(q * 2, q, q, cu, cu, T, T, is_causal=True) + 1

    compiled = torch.compile(f, backend="aot_eager")
    for lengths in ([0, 4, 10], [0, 10, 10], [0, 3, 7, 10], [0, 10, 10, 10], [0, 0, 10, 10]):
        q = torch.randn(T, 2, 8)
        cu = torch.tensor(lengths, dtype=torch.int32)
        torch.testing.assert_close(compiled(q, cu), f(q, cu), rtol=0, atol=0)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="reads cu_seqlens on the host"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(q, cu)


def test_kvcache_with_tensor_lengths_under_compile_says_why_not_fullgraph():
    torch._dynamo.reset()
    q, cache = torch.randn(2, 1, 2, 8), torch.randn(2, 16, 2, 8)
    lengths = torch.tensor([5, 16], dtype=torch.int32)

    def f(q, lengths):
        return llmkernels.attention_with_kvcache(q, cache, cache, lengths)

    torch.testing.assert_close(torch.compile(f, backend="aot_eager")(q, lengths), f(q, lengths))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="reads a cache_seqlens tensor on the host"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(q, lengths)
    torch._dynamo.reset()
    g = torch.compile(lambda q: llmkernels.attention_with_kvcache(q, cache, cache, 7),
                      fullgraph=True, backend="aot_eager")  # int lengths trace
    torch.testing.assert_close(g(q), llmkernels.attention_with_kvcache(q, cache, cache, 7))
