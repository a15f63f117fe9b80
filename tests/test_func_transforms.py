"""torch.func transforms (vmap, grad, jacrev, jvp) and forward-mode AD (dual tensors): the
kernels' custom ops have no rules for them, so such calls take the reference path (PyTorch's
own ops), and explain says why. Results are checked against the kernels' own forward and
backward: values within float tolerance, gradients and tangents through the same
derivative (for w8a8: straight through the activation rounding)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import llmkernels

SCHEMES = ["int8", "int4", "w8a8"]
TOL = dict(rtol=2e-5, atol=2e-5)


def sdpa(q, k, v, **kw):
    return llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)


def qkv(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 2, 6, 16, generator=g) for _ in range(3))


def weight(scheme, seed=0):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(seed))
    return llmkernels.quantize_weight(w, scheme, 32)


def test_vmap_sdpa_matches_the_kernel():
    q, k, v = qkv()
    torch.testing.assert_close(torch.vmap(sdpa)(q, k, v), sdpa(q, k, v), **TOL)


def test_grad_and_jacrev_of_sdpa_match_the_kernels_backward():
    q, k, v = qkv(batch=1)
    u = torch.randn(1, 2, 6, 16)
    got = torch.func.grad(lambda a: (sdpa(a, k, v) * u).sum())(q)
    q_ = q.clone().requires_grad_()
    (sdpa(q_, k, v) * u).sum().backward()
    torch.testing.assert_close(got, q_.grad, **TOL)
    jac = torch.func.jacrev(lambda a: sdpa(a, k, v))(q)
    torch.testing.assert_close((jac * u[..., None, None, None, None]).sum((0, 1, 2, 3)),
                               q_.grad, **TOL)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vmap_quant_matmul_matches_the_kernel(scheme, dtype):
    from llmkernels.ops.quant_matmul import cpu_int8_activations
    qw = weight(scheme)
    x = torch.randn(4, 3, 64).to(dtype)
    # (vmap takes the reference path; where the kernel quantizes bf16 x to int8 per 32 values,
    # ~0.5% RMS from the float products, the unbatched call is compared on that path too)
    ref = "reference" if cpu_int8_activations(x.reshape(-1, 64), qw) else None
    want = llmkernels.quant_matmul(x, qw, backend=ref)
    tol = TOL if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(torch.vmap(lambda a: llmkernels.quant_matmul(a, qw))(x), want, **tol)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_per_sample_gradients_of_a_quant_linear(scheme):
    """vmap(grad(...)) with functional_call, as per-sample gradient code does: each sample's
    gradients of x and of the bias are the kernels' backward of that sample alone."""
    torch.manual_seed(0)
    layer = llmkernels.nn.QuantLinear.from_linear(torch.nn.Linear(64, 24), scheme,
                                                  group_size=32)
    params = {"bias": layer.bias.detach()}
    x, u = torch.randn(5, 64), torch.randn(5, 24)

    def loss(p, xi, ui):
        return (torch.func.functional_call(layer, p, (xi[None],))[0] * ui).sum()
    gp, gx = torch.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, 0, 0))(params, x, u)
    for i in range(5):
        xi = x[i:i + 1].clone().requires_grad_()
        layer.zero_grad()
        (layer(xi) * u[i]).sum().backward()
        torch.testing.assert_close(gx[i], xi.grad[0], **TOL)
        torch.testing.assert_close(gp["bias"][i], layer.bias.grad, **TOL)


def dot_test(f, x, t, u):
    """<u, J t> from forward mode (reference path) against <J^T u, t> from the kernels'
    reverse mode: the same derivative both ways."""
    _, jt = torch.func.jvp(f, (x,), (t,))
    x_ = x.clone().requires_grad_()
    (f(x_) * u).sum().backward()
    torch.testing.assert_close((jt * u).sum(), (x_.grad * t).sum(), rtol=1e-4, atol=1e-4)
    with fwAD.dual_level():  # dual tensors of torch.autograd.forward_ad: the same tangent
        dual = f(fwAD.make_dual(x, t))
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, jt, **TOL)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_forward_mode_quant_matmul_is_the_backwards_transpose(scheme):
    qw = weight(scheme)
    bias = torch.randn(24)
    x, t, u = torch.randn(3, 64), torch.randn(3, 64), torch.randn(3, 24)
    dot_test(lambda a: llmkernels.quant_matmul(a, qw, bias), x, t, u)


def test_forward_mode_sdpa_is_the_backwards_transpose():
    q, k, v = qkv(batch=1)
    dot_test(lambda a: sdpa(a, k, v), q, torch.randn_like(q), torch.randn_like(q))


def test_forward_mode_varlen_and_kvcache_match_sdpa():
    q, k, v = qkv(batch=1)
    t = torch.randn_like(q)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with fwAD.dual_level():
        dq = fwAD.make_dual(q, t)
        want = fwAD.unpack_dual(sdpa(dq, k, v))
        varlen = fwAD.unpack_dual(llmkernels.attention_varlen(
            dq[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, 6, 6,
            is_causal=True))
        last = fwAD.unpack_dual(llmkernels.attention_with_kvcache(
            dq.transpose(1, 2)[:, -1:], k.transpose(1, 2), v.transpose(1, 2), 6))
    torch.testing.assert_close(varlen.primal, want.primal[0].transpose(0, 1), **TOL)
    torch.testing.assert_close(varlen.tangent, want.tangent[0].transpose(0, 1), **TOL)
    torch.testing.assert_close(last.tangent, want.tangent.transpose(1, 2)[:, -1:], **TOL)


def test_explain_says_why_and_forced_kernels_raise():
    q, k, v = qkv(batch=1)
    qw = weight("int8")
    x = torch.randn(2, 64)
    seen = {}

    def f(a, xa):
        seen["sdpa"] = llmkernels.explain(llmkernels.scaled_dot_product_attention, a, k, v)
        seen["quant"] = llmkernels.explain(llmkernels.quant_matmul, xa, qw)
        return sdpa(a, k, v).sum() + llmkernels.quant_matmul(xa, qw).sum()
    torch.func.grad(f, argnums=(0, 1))(q, x)
    for decision in seen.values():
        assert decision.backend == "reference"
        assert "torch.func transform" in decision.rejected["cpu"]
    with pytest.raises(llmkernels.BackendError, match="torch.func transform"):
        torch.vmap(lambda a: sdpa(a, k[0], v[0], backend="cpu"))(q)
    with pytest.raises(llmkernels.BackendError, match="forward-mode AD"):
        with fwAD.dual_level():
            llmkernels.quant_matmul(fwAD.make_dual(x, x), qw, backend="cpu")
    # outside the transforms, and for plain tensors inside a dual level, the kernels serve
    assert llmkernels.explain(llmkernels.quant_matmul, x, qw).backend == "cpu"
    with fwAD.dual_level():
        assert llmkernels.explain(llmkernels.quant_matmul, x, qw).backend == "cpu"
        inside = llmkernels.quant_matmul(x, qw)
    torch.testing.assert_close(inside, llmkernels.quant_matmul(x, qw), rtol=0, atol=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_vmap_over_an_ensemble_of_quantized_layers(scheme):
    """torch.func.stack_module_state + vmap(functional_call): the weights themselves batched."""
    torch.manual_seed(0)
    layers = [llmkernels.nn.QuantLinear.from_linear(torch.nn.Linear(64, 24), scheme,
                                                    group_size=32) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(layers)
    x = torch.randn(2, 64)

    def run(p, b, xi):
        return torch.func.functional_call(layers[0], (p, b), (xi,))
    got = torch.vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    for i, layer in enumerate(layers):
        torch.testing.assert_close(got[i], layer(x).detach(), **TOL)


def test_lengths_read_on_the_host_cannot_be_vmapped_over():
    q, k, v = qkv(batch=2)
    lengths = torch.tensor([[4, 6], [5, 6]], dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_seqlens is read on the host"):
        torch.vmap(lambda n: llmkernels.attention_with_kvcache(
            q.transpose(1, 2)[:, :1], k.transpose(1, 2), v.transpose(1, 2), n))(lengths)
    cu = torch.tensor([[0, 2, 6], [0, 3, 6]], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q is read on the host"):
        torch.vmap(lambda c: llmkernels.attention_varlen(
            q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), c, c, 6, 6))(cu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/gpu_check.sh)")
def test_gpu_paths_under_transforms():
    """On a GPU too, vmap and grad take the reference path: the kernels' values and gradients."""
    q, k, v = (t.cuda().half() for t in qkv())
    torch.testing.assert_close(torch.vmap(sdpa)(q, k, v), sdpa(q, k, v), rtol=2e-3, atol=2e-3)
    for scheme in SCHEMES:
        qw = weight(scheme).to("cuda")
        x = torch.randn(3, 64, device="cuda", dtype=torch.bfloat16)
        u = torch.randn(3, 24, device="cuda", dtype=torch.bfloat16)
        got = torch.func.grad(lambda a: (llmkernels.quant_matmul(a, qw) * u).float().sum())(x)
        x_ = x.clone().requires_grad_()
        (llmkernels.quant_matmul(x_, qw) * u).float().sum().backward()
        torch.testing.assert_close(got, x_.grad, rtol=2e-2, atol=2e-2)
