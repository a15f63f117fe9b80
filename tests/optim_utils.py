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
