"""Helpers shared by the optimizer kernel tests."""
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
