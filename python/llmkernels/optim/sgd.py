"""SGD with a fused multi-tensor step: torch.optim.SGD's math, arguments and state_dict."""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from . import _fused, _plan


class SGD(_fused.FusedOptimizer):
    """torch.optim.SGD (momentum, dampening, Nesterov, weight decay, maximize), fused."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False,
                 fused: Optional[bool] = None,
                 stochastic_rounding: bool = False, seed: int = 0):
        if _fused.as_float(lr, "lr", "SGD") < 0.0:
            raise ValueError(f"SGD: invalid learning rate {lr} (must be >= 0)")
        if _fused.as_float(momentum, "momentum", "SGD") < 0.0:
            raise ValueError(f"SGD: invalid momentum {momentum} (must be >= 0)")
        if _fused.as_float(weight_decay, "weight_decay", "SGD") < 0.0:
            raise ValueError(f"SGD: invalid weight_decay {weight_decay} (must be >= 0)")
        _fused.as_float(dampening, "dampening", "SGD")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum requires a momentum and zero dampening")
        _fused.check_torch_flags("SGD", differentiable, foreach, fused)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=bool(nesterov),
                        maximize=bool(maximize), foreach=foreach, differentiable=False,
                        fused=fused,
                        stochastic_rounding=bool(stochastic_rounding), seed=int(seed))
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("stochastic_rounding", False)
            group.setdefault("seed", 0)

    def _llmk_explain_step(self) -> "backends.Decisions":
        """llmkernels.explain(optimizer.step)."""
        def rows_of(group, params, grads):
            momentum = group["momentum"] != 0.0
            rows = [[p, g, self.state.get(p, {}).get("momentum_buffer") if momentum else None]
                    for p, g in zip(params, grads)]
            return [("", params, rows, bool(group.get("stochastic_rounding", False)), False)]
        return _fused.explain_step(self, rows_of)

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: Optional[torch.Tensor] = None,
             found_inf: Optional[torch.Tensor] = None):
        loss, amp = _fused.begin_step(self, closure, grad_scale, found_inf)
        _fused.refuse_capture("SGD", self.param_groups[0]["params"],
                              "SGD has no capturable mode (nor has torch.optim.SGD)")
        inv_scale = amp.host()
        if inv_scale is None:
            return loss
        for group in self.param_groups:
            params = _fused.grads_of(group, "SGD")
            if not params:
                continue
            lr = _fused.as_float(group["lr"], "lr", "SGD")
            momentum = _fused.as_float(group["momentum"], "momentum", "SGD")
            dampening = _fused.as_float(group["dampening"], "dampening", "SGD")
            wd = _fused.as_float(group["weight_decay"], "weight_decay", "SGD")
            sr = bool(group.get("stochastic_rounding", False))
            hyper = (lr, momentum, dampening, wd, group["nesterov"], group["maximize"], inv_scale)
            # The tensors of the last step: views kept (_plan.py). Not with stochastic rounding,
            # whose per-tensor step counts are state entries updated in Python anyway.
            state_keys = ("momentum_buffer",) if momentum else ()
            served = None if sr else _plan.serve(self, group, params, (state_keys,))
            if served is not None:
                path, plan, param_views, grad_views = served
                if path == "triton":
                    _sgd_triton_planned(plan, grad_views, *hyper)
                    continue
                buf_views = ([sv[0] for sv in plan.state_views] if momentum
                             else [None] * len(params))
                items = [(pv, gv, bv, False, 0)
                         for pv, gv, bv in zip(param_views, grad_views, buf_views)]
                _sgd_native(path, params[0].device, items, *hyper, sr=False)
                continue
            bufs, firsts, keys = [], [], []
            keeps_state = sr or momentum != 0.0  # else no entry at all, as torch's SGD
            for p in params:
                state = self.state[p] if keeps_state else {}
                if sr:  # SGD keeps no step count; rounding needs one for a fresh stream
                    state["sr_step"] = state.get("sr_step", 0) + 1
                    keys.append(state["sr_step"])  # made keys below
                else:
                    keys.append(0)
                buf = state.get("momentum_buffer")
                first = momentum != 0.0 and buf is None
                if first:  # torch clones the first gradient; the kernel writes it in place
                    buf = torch.empty_like(p, memory_format=torch.preserve_format)
                    state["momentum_buffer"] = buf
                bufs.append(buf if momentum != 0.0 else None)
                firsts.append(first)
            if sr:
                keys = _fused.sr_keys(group.get("seed", 0), keys, params)
            group_params = params
            params, grads, bufs = _fused.locals_of(
                params, [p.grad for p in params], bufs)
            rows = [[p, g, b] for p, g, b in zip(params, grads, bufs)]
            path, views = _fused.route(params, rows, sr)
            if path == "triton":
                _fused.triton_optim().sgd_step(
                    params, grads, bufs, firsts, lr=lr, momentum=momentum,
                    dampening=dampening, weight_decay=wd, nesterov=group["nesterov"],
                    maximize=group["maximize"], inv_grad_scale=inv_scale,
                    one_minus_dampening=1.0 - dampening, check=False,  # choose_path checked them
                    sr_keys=keys if sr else None)
            elif path in ("cpu", "cuda"):
                items = [(*views_of, f, key) for views_of, f, key in zip(views, firsts, keys)]
                _sgd_native(path, params[0].device, items, *hyper, sr=sr)
            else:
                for p, g, b, f, key in zip(params, grads, bufs, firsts, keys):
                    sgd_reference(p, g, b, f, lr=lr, momentum=momentum,
                                  dampening=dampening, weight_decay=wd,
                                  nesterov=group["nesterov"], maximize=group["maximize"],
                                  inv_grad_scale=inv_scale, sr_key=key if sr else None)
            if not sr:
                _plan.after_full_step(self, group, group_params,
                                      [state_keys] * len(params), {path})
        return loss


def _sgd_triton_planned(plan, grad_views, lr, momentum, dampening, wd, nesterov, maximize,
                        inv_scale) -> None:
    """The Triton SGD step of a plan's parameters (tables kept in the plan; every momentum
    buffer exists, so no first step)."""
    kernels = _fused.triton_optim()
    prepared = plan.triton.get("sgd")
    if prepared is None:
        params = plan.params
        bufs = [s["momentum_buffer"] for s in plan.states] if momentum else [None] * len(params)
        prepared = plan.triton["sgd"] = kernels.sgd_prepare(
            list(params), [p.grad for p in params], bufs, [False] * len(params),
            momentum=momentum, check=False)
    kernels.sgd_launch(prepared, [view[0] for view in grad_views], lr=lr, momentum=momentum,
                       weight_decay=wd, nesterov=nesterov, maximize=maximize,
                       inv_grad_scale=inv_scale, one_minus_dampening=1.0 - dampening)


def _sgd_native(path, device, items, lr, momentum, dampening, wd, nesterov, maximize,
                inv_scale, *, sr) -> None:
    """The C++ ("cpu") or CUDA kernel's SGD step over items (per tensor: parameter, gradient
    and momentum buffer views, whether the buffer is new, stochastic rounding key)."""
    native = backends.native_module()
    if path == "cpu":
        native.sgd_step(backends.cpu_tier_code(), items, lr, momentum, dampening, wd, nesterov,
                        maximize, inv_scale, backends.cpu_threads(), 1.0 - dampening, sr)
    else:
        _fused.on_cuda(device, native.sgd_step_cuda, items, lr, momentum, dampening, wd,
                       nesterov, maximize, inv_scale, 1.0 - dampening)


def sgd_reference(p, g, buf, first, *, lr, momentum, dampening, weight_decay, nesterov,
                  maximize, inv_grad_scale=1.0, sr_key=None):
    """One tensor's SGD update in float32 (float64 for float64 parameters, which no kernel
    takes; torch.optim.SGD's single-tensor math)."""
    work = torch.promote_types(p.dtype, torch.float32)
    pf = p.to(work)
    d = g.to(work) * inv_grad_scale
    if maximize:
        d = -d
    if weight_decay != 0.0:
        d = d + weight_decay * pf
    if momentum != 0.0:
        bf = d.clone() if first else momentum * buf.to(work) + (1.0 - dampening) * d
        buf.copy_(bf)
        d = d + momentum * bf if nesterov else bf
    pf = pf + (-lr) * d
    p.copy_(pf if sr_key is None else _fused.sr_round_bf16(pf, sr_key))
