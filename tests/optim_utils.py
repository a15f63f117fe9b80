"""Helpers shared by the optimizer kernel tests."""
import functools

import torch

import llmkernels


def run_steps(make, kw, params, grads_per_step, device, backend):
    """Copies of params on device, optimized by make(copies, **kw) over the given gradients
    (one list per step) with backend forced: (the copies, the optimizer)."""
    ps = [p.detach().clone().to(device).requires_grad_() for p in params]
    opt = make(ps, **kw)
    with llmkernels.use_backend(backend):
        for grads in grads_per_step:
            for p, g in zip(ps, grads):
                p.grad = g.to(device)
            opt.step()
    return ps, opt


@functools.lru_cache(maxsize=None)
def triton_fma_rounds_once() -> bool:
    """Whether tl.fma rounds once here, as the C++ kernels' fma does: compiled, yes; triton
    3.9's interpreter too; older interpreters (3.8, which torch 2.14 brings) multiply and add
    in float32, so the Triton kernels can then only match the C++ ones to an ulp or so."""
    from llmkernels.kernels import optim as ko
    if not ko.INTERPRET:
        return True
    import triton
    import triton.language as tl

    @triton.jit
    def probe(X):
        tl.store(X, tl.fma(tl.load(X), tl.load(X + 1), tl.load(X + 2)))

    x = torch.tensor([1 + 2.0 ** -23, 1 - 2.0 ** -23, -1.0])
    probe[(1,)](x)
    return x[0].item() == -(2.0 ** -46)


def non_finite_8bit_run(device, backend):
    """AdamW8bit over two steps whose gradients hold a NaN in one 256-value block and an
    infinity in another (no GradScaler to skip them): (parameters, optimizer). On every path a
    block's scale is the bit-pattern maximum of its |m| and v (optim_impl.h), so NaN wins and
    the block's codes become 0, as the CPU kernel and the reference make them."""
    torch.manual_seed(4)
    params = [torch.randn(3 * 256 + 40)]
    steps = [[torch.randn(3 * 256 + 40)] for _ in range(2)]
    steps[0][0][300] = float("nan")
    steps[0][0][600] = float("inf")
    return run_steps(llmkernels.optim.AdamW8bit, dict(lr=1e-2, min_8bit_size=256), params,
                     steps, device, backend)


def assert_same_but_nan_payloads(a, b):
    """a == b, NaN where NaN: NaN payloads differ between x86 and GPUs (canonical NaN)."""
    b = b.cpu()
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a[~a.isnan()], b[~b.isnan()])
