"""Adam and AdamW with a fused multi-tensor step: torch.optim.Adam / AdamW's math, arguments,
param groups and state_dict layout (a checkpoint moves between the two both ways)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from . import _capturable, _fused, _plan


class _FusedAdam(_fused.FusedOptimizer):
    _decoupled: bool = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 decoupled_weight_decay: Optional[bool] = None,
                 stochastic_rounding: bool = False, seed: int = 0):
        name = type(self).__name__
        _fused.check_adam_hyperparameters(name, lr, betas, eps, weight_decay)
        _fused.check_torch_flags(name, differentiable, foreach, fused)
        decoupled = self._decoupled if decoupled_weight_decay is None else bool(
            decoupled_weight_decay)
        # The keys of torch's Adam/AdamW defaults, so that state_dicts match theirs.
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=bool(amsgrad), maximize=bool(maximize), foreach=foreach,
                        capturable=bool(capturable), differentiable=False, fused=fused,
                        decoupled_weight_decay=decoupled,
                        stochastic_rounding=bool(stochastic_rounding), seed=int(seed))
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints of older torch versions lack some keys
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", self._decoupled)
            group.setdefault("stochastic_rounding", False)
            group.setdefault("seed", 0)
            group.setdefault("capturable", False)

    def load_state_dict(self, state_dict) -> None:
        """torch's; an AdamW8bit checkpoint loads too (its 8-bit moments dequantized to the
        parameters' dtype: the same values as the 8-bit step reads), so training can go on
        with full moments. The conversion runs after the user's load-state-dict pre-hooks."""
        def from_eight_bit(optimizer, loaded):
            if not any("exp_avg_codes" in st for st in loaded["state"].values()):
                return None
            return _from_eight_bit_checkpoint(self, loaded)
        hook = self.register_load_state_dict_pre_hook(from_eight_bit)
        try:
            super().load_state_dict(state_dict)
        finally:
            hook.remove()

    def _state_of(self, p, amsgrad: bool, capturable: bool = False):
        state = self.state[p]
        if len(state) == 0:
            # torch's layout: capturable steps on the parameter's device, others on the CPU
            state["step"] = torch.zeros((), dtype=torch.float32,
                                        device=p.device if capturable else None)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: Optional[torch.Tensor] = None,
             found_inf: Optional[torch.Tensor] = None):
        """One update of every parameter that has a gradient. grad_scale / found_inf come from
        torch.amp.GradScaler (gradients are still scaled; a step with inf/NaN is skipped)."""
        loss, amp = _fused.begin_step(self, closure, grad_scale, found_inf)
        name = type(self).__name__
        for group in self.param_groups:
            params = _fused.grads_of(group, name)
            if not params:
                continue
            if group["capturable"] and self._capturable_step(group, params, amp):
                continue
            _fused.refuse_capture(name, params, "construct the optimizer with capturable=True")
            inv_scale = amp.host()
            if inv_scale is None:  # GradScaler found inf/NaN gradients: no update
                continue
            amsgrad = group["amsgrad"]
            decoupled = group.get("decoupled_weight_decay", self._decoupled)
            lr = _fused.as_float(group["lr"], "lr", name)
            beta1, beta2 = _fused.as_betas(group["betas"], name)
            eps = _fused.as_float(group["eps"], "eps", name)
            wd = _fused.as_float(group["weight_decay"], "weight_decay", name)
            sr = bool(group.get("stochastic_rounding", False))
            hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd,
                         decoupled=decoupled, amsgrad=amsgrad, maximize=group["maximize"],
                         inv_scale=inv_scale, sr=sr)
            state_keys = _STATE_KEYS[amsgrad]
            # the tensors of the last step: their views kept (_plan.py)
            served = _plan.serve(self, group, params, (state_keys,), sr)
            if served is not None:
                path, plan, param_views, grad_views = served
                states = plan.states
            else:
                states = [self._state_of(p, amsgrad) for p in params]
            with _fused.counted_step(self, group, states) as step_values:
                corrections = _fused.bias_corrections(step_values, lr, beta1, beta2)
                seed = group.get("seed", 0)
                keys = (_fused.sr_keys(seed, step_values, params) if sr
                        else [0] * len(states))
                if served is not None and path == "triton":
                    adam_triton_planned(plan, "adam", list(range(len(params))), grad_views,
                                        corrections, keys, **hyper)
                    continue
                if served is not None:
                    views = [(pv, gv, *sv) + (() if amsgrad else (None,)) for pv, gv, sv
                             in zip(param_views, grad_views, plan.state_views)]
                    adam_native(path, params[0].device, views, corrections, keys, **hyper)
                    continue
                path = adam_update(params, [p.grad for p in params],
                                   [s["exp_avg"] for s in states],
                                   [s["exp_avg_sq"] for s in states],
                                   [s.get("max_exp_avg_sq") if amsgrad else None for s in states],
                                   corrections, keys, **hyper)
                _plan.after_full_step(self, group, params, [state_keys] * len(params), {path})
        return loss

    def _llmk_explain_step(self) -> "backends.Decisions":
        """llmkernels.explain(optimizer.step)."""
        def rows_of(group, params, grads):
            amsgrad = group["amsgrad"]
            states = [self.state.get(p, {}) for p in params]
            rows = [[p, g, s.get("exp_avg"), s.get("exp_avg_sq"),
                     s.get("max_exp_avg_sq") if amsgrad else None]
                    for p, g, s in zip(params, grads, states)]
            return [("", params, rows, bool(group.get("stochastic_rounding", False)), True)]
        return _fused.explain_step(self, rows_of)

    def _capturable_step(self, group, params, amp: _fused.Amp) -> bool:
        """A capturable group's step with its scalars on the device (_capturable.py), on the
        Triton or CUDA kernel or the reference; False (nothing done) when the host path
        serves it."""
        name = type(self).__name__
        amsgrad = group["amsgrad"]
        sr = bool(group.get("stochastic_rounding", False))
        state_keys = _STATE_KEYS[amsgrad]
        if not _capturable.may_take_device_path(params):
            return False
        served = _plan.serve(self, group, params, (state_keys,), sr)  # its checks: cheaper
        if served is not None:
            path, plan = served[0], served[1]
            states = plan.states
        else:
            states = [self._state_of(p, amsgrad, capturable=True) for p in params]
            rows = [[p, p.grad, *(s[k] for k in state_keys)] for p, s in zip(params, states)]
            path = _capturable.device_path(params, rows, sr, f32_state=True)
            if path is None:
                return False
        device = params[0].device
        beta1, beta2 = _fused.as_betas(group["betas"], name)
        eps = _fused.as_float(group["eps"], "eps", name)
        wd = _fused.as_float(group["weight_decay"], "weight_decay", name)
        decoupled = group.get("decoupled_weight_decay", self._decoupled)
        inv, found = amp.device(device)
        steps = _capturable.advance(self, group, states, device)
        table = _capturable.adam_table(steps, _capturable.corrections(steps, group, beta1, beta2),
                                       weight_decay=wd if decoupled else 0.0, inv=inv,
                                       found=found, seed=group.get("seed", 0) if sr else None)
        hyper = dict(beta2=beta2, eps=eps, weight_decay=wd, decoupled=decoupled,
                     amsgrad=amsgrad, maximize=group["maximize"],
                     one_minus_beta1=1.0 - beta1, one_minus_beta2=1.0 - beta2, sr=sr)
        if path == "triton":
            if served is not None:
                prepared = plan.triton.get("adam_table")
                if prepared is None:
                    prepared = plan.triton["adam_table"] = _adam_table_prepare(
                        plan.params, states, amsgrad, sr)
                _fused.triton_optim().adam_launch_table(
                    prepared, [v[0] for v in served[3]], table, **hyper)
            else:
                _fused.triton_optim().adam_launch_table(
                    _adam_table_prepare(params, states, amsgrad, sr), None, table, **hyper)
        elif path == "cuda":  # the table's row i for parameter i
            if served is not None:
                views = [(pv, gv, *sv) + (() if amsgrad else (None,)) for pv, gv, sv
                         in zip(served[2], served[3], plan.state_views)]
            else:
                views = [(*v, None) if not amsgrad else tuple(v)
                         for v in _fused.kernel_views(rows, f32_state=True)]
            adam_native("cuda", device, views, [(0.0, 1.0)] * len(params), [0] * len(params),
                        lr=0.0, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd,
                        decoupled=decoupled, amsgrad=amsgrad, maximize=group["maximize"],
                        inv_scale=1.0, sr=False, table=table)
        else:
            for i, (p, s) in enumerate(zip(params, states)):
                adam_reference(p, p.grad, s["exp_avg"], s["exp_avg_sq"], s.get("max_exp_avg_sq"),
                               lr=0.0, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd,
                               decoupled=decoupled, amsgrad=amsgrad, maximize=group["maximize"],
                               step_size=table[i, 0], bias_correction2_sqrt=table[i, 1],
                               inv_grad_scale=table[i, 4], decay=table[i, 3], skip=found,
                               sr_key=table.view(torch.int32)[i, 2] if sr else None)
        if served is None and path in _plan.KERNEL_PATHS:  # a plan for the next steps
            _plan.after_full_step(self, group, params, [state_keys] * len(params), {path})
        _capturable.finish(steps, found)
        return True


def _adam_table_prepare(params, states, amsgrad: bool, sr: bool):
    """kernels.optim's launches of a capturable Adam step over params: row i of the device
    table for parameter i."""
    return _fused.triton_optim().adam_prepare(
        params, [p.grad for p in params], [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states], [s.get("max_exp_avg_sq") for s in states],
        amsgrad=amsgrad, check=False, sr_keys=[0] * len(params) if sr else None,
        table_rows=range(len(params)))


# The state tensors the kernels take, by amsgrad.
_STATE_KEYS = {False: ("exp_avg", "exp_avg_sq"), True: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


def adam_update(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, corrections, keys, *,
                lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, inv_scale, sr):
    """One Adam/AdamW update of these tensors (in place) on the path backends.py's rules choose:
    the C++ kernel, Triton, the CUDA kernels or adam_reference tensor by tensor. corrections:
    per tensor (lr / (1 - beta1^step), sqrt(1 - beta2^step)); keys: stochastic rounding streams.
    The moments may be float32 for 16-bit parameters (AdamW8bit's small tensors): every path
    takes those. Returns the path."""
    wd = weight_decay
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = _fused.locals_of(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
    rows = [[p, g, m, v, vm] for p, g, m, v, vm
            in zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)]
    path, views = _fused.route(params, rows, sr, f32_state=True)
    if path == "triton":
        _fused.triton_optim().adam_step(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
            [c[0] for c in corrections], [c[1] for c in corrections], lr=lr, beta1=beta1,
            beta2=beta2, eps=eps, weight_decay=wd, decoupled=decoupled, amsgrad=amsgrad,
            maximize=maximize, inv_grad_scale=inv_scale, decay=1.0 - lr * wd,
            one_minus_beta1=1.0 - beta1, one_minus_beta2=1.0 - beta2,
            check=False, sr_keys=keys if sr else None)  # choose_path checked the tensors
    elif path in ("cpu", "cuda"):
        adam_native(path, params[0].device, views, corrections, keys, lr=lr, beta1=beta1,
                    beta2=beta2, eps=eps, weight_decay=wd, decoupled=decoupled, amsgrad=amsgrad,
                    maximize=maximize, inv_scale=inv_scale, sr=sr)
    else:
        for (p, g, m, v, vm), (step_size, bc2), key in zip(rows, corrections, keys):
            adam_reference(p, g, m, v, vm, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                           weight_decay=wd, decoupled=decoupled, amsgrad=amsgrad,
                           maximize=maximize, step_size=step_size, bias_correction2_sqrt=bc2,
                           inv_grad_scale=inv_scale, sr_key=key if sr else None)
    return path


def adam_triton_planned(plan, name, idx, grad_views, corrections, keys, *, lr, beta1, beta2,
                        eps, weight_decay, decoupled, amsgrad, maximize, inv_scale, sr):
    """The Triton Adam step of a plan's parameters idx (their tables kept in the plan under
    name: only the gradients' pointers and the floats are written)."""
    kernels = _fused.triton_optim()
    prepared = plan.triton.get(name)
    if prepared is None:
        states = [plan.states[i] for i in idx]
        prepared = plan.triton[name] = kernels.adam_prepare(
            [plan.params[i] for i in idx], [plan.params[i].grad for i in idx],
            [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s.get("max_exp_avg_sq") for s in states], amsgrad=amsgrad, check=False,
            sr_keys=[keys[i] for i in idx] if sr else None)
    kernels.adam_launch(
        prepared, [grad_views[i][0] for i in idx], [corrections[i][0] for i in idx],
        [corrections[i][1] for i in idx], beta2=beta2, eps=eps, weight_decay=weight_decay,
        decoupled=decoupled, amsgrad=amsgrad, maximize=maximize, inv_grad_scale=inv_scale,
        decay=1.0 - lr * weight_decay, one_minus_beta1=1.0 - beta1,
        one_minus_beta2=1.0 - beta2, sr_keys=[keys[i] for i in idx] if sr else None)


def adam_native(path, device, views, corrections, keys, *, lr, beta1, beta2, eps, weight_decay,
                decoupled, amsgrad, maximize, inv_scale, sr, table=None, rows=()):
    """The C++ ("cpu") or CUDA kernel's Adam step over kernel views (per tensor: parameter,
    gradient, exp_avg, exp_avg_sq, max_exp_avg_sq or None). table (CUDA, capturable steps):
    the device table of _capturable.adam_table, read at rows[i] (or i) for tensor i instead
    of the corrections, lr, inv_scale."""
    wd = weight_decay
    items = [(*views_of, step_size, bc2, key)
             for views_of, (step_size, bc2), key in zip(views, corrections, keys)]
    native = backends.native_module()
    if path == "cpu":
        native.adam_step(backends.cpu_tier_code(), items, lr, beta1, beta2, eps, wd,
                         decoupled, amsgrad, maximize, inv_scale, backends.cpu_threads(),
                         1.0 - lr * wd, 1.0 - beta1, 1.0 - beta2, sr)
    else:
        _fused.on_cuda(device, native.adam_step_cuda, items, lr, beta1, beta2, eps, wd,
                       decoupled, amsgrad, maximize, inv_scale, 1.0 - lr * wd,
                       1.0 - beta1, 1.0 - beta2,
                       after=(0 if table is None else table.data_ptr(), list(rows)))


def adam_reference(p, g, m, v, vmax, *, lr, beta1, beta2, eps, weight_decay, decoupled,
                   amsgrad, maximize, step_size, bias_correction2_sqrt, inv_grad_scale=1.0,
                   sr_key=None, decay=None, skip=None):
    """One tensor's update in float32 (float64 for float64 parameters, which no kernel takes),
    stored back in the tensors' dtypes (the specification the fused kernel follows;
    torch.optim's single-tensor Adam/AdamW math). Capturable steps
    give step_size, bias_correction2_sqrt, inv_grad_scale, decay (else 1 - lr * wd) and
    sr_key as 0-d tensors, and skip: a 0-d tensor, nonzero to leave every tensor as it is."""
    work = torch.promote_types(p.dtype, torch.float32)
    pf, gf = p.to(work), g.to(work) * inv_grad_scale
    if maximize:
        gf = -gf
    if decoupled:
        pf = pf * ((1.0 - lr * weight_decay) if decay is None else decay)
    elif weight_decay != 0.0:
        gf = gf + weight_decay * pf
    # torch's operations and their order (lerp; addcmul's value * t1 * t2), as the kernels:
    # (g * g) first underflowed differently for denormal second moments
    mf = torch.lerp(m.to(work), gf, 1.0 - beta1)
    vf = v.to(work) * beta2 + ((1.0 - beta2) * gf) * gf
    vd = torch.maximum(vmax.to(work), vf) if amsgrad else vf
    denom = vd.sqrt() / bias_correction2_sqrt + eps
    pf = pf - step_size * (mf / denom)
    pf = pf if sr_key is None else _fused.sr_round_bf16(pf, sr_key)
    outs = [(p, pf), (m, mf), (v, vf)] + ([(vmax, vd)] if amsgrad else [])
    if skip is not None:  # the old values kept where skip is set (no host read)
        outs = [(old, torch.where(skip != 0, old, new)) for old, new in outs]
    for old, new in outs:
        old.copy_(new)


def _from_eight_bit_checkpoint(optimizer, loaded: dict) -> dict:
    """A copy of an AdamW8bit state_dict with float moments (the parameters' dtypes and shapes)
    in place of its 8-bit codes and scales, and without its own group keys."""
    from .adam8bit import CODES_VERSION, _convert_version1_codes, dequantize_moments
    params = _fused.saved_params(optimizer, loaded)
    versions = {key: g.get("codes_version", 1) for g in loaded["param_groups"] for key in g["params"]}
    state = {}
    for key, st in loaded["state"].items():
        st = dict(st)
        if "exp_avg_codes" in st and key in params:  # (else torch's checks raise next)
            p = params[key]
            if _fused.has_dtensor([p, *st.values()]):
                raise ValueError(f"{type(optimizer).__name__}: converting the 8-bit state of "
                                 "sharded (DTensor) parameters is not supported; load the "
                                 "AdamW8bit checkpoint into AdamW8bit")
            if versions[key] not in (1, CODES_VERSION):
                raise ValueError(f"{type(optimizer).__name__}: this checkpoint's codes_version "
                                 f"{versions[key]} is newer than this llmkernels reads "
                                 f"({CODES_VERSION})")
            codes = {k: st.pop(k).detach().reshape(-1).cpu().clone()
                     for k in ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes",
                               "exp_avg_sq_scales")}
            if codes["exp_avg_codes"].numel() != p.numel():
                raise ValueError(f"{type(optimizer).__name__}: the checkpoint's 8-bit state of "
                                 f"parameter {key} holds {codes['exp_avg_codes'].numel()} "
                                 f"values, the parameter {p.numel()}")
            if versions[key] == 1:
                _convert_version1_codes(codes["exp_avg_codes"])
            m, v = dequantize_moments(codes)
            st["exp_avg"], st["exp_avg_sq"] = (t.view(p.shape).to(p.dtype) for t in (m, v))
        state[key] = st
    groups = [{k: v for k, v in g.items() if k not in ("codes_version", "min_8bit_size")}
              for g in loaded["param_groups"]]
    return {"state": state, "param_groups": groups}


class AdamW(_FusedAdam):
    """torch.optim.AdamW with a fused multi-tensor step (decoupled weight decay)."""
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 stochastic_rounding: bool = False, seed: int = 0):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused, stochastic_rounding=stochastic_rounding, seed=seed)


class Adam(_FusedAdam):
    """torch.optim.Adam with a fused multi-tensor step (L2 weight decay on the gradient)."""
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad: bool = False, *, foreach: Optional[bool] = None,
                 maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 decoupled_weight_decay: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0):
        # decoupled_weight_decay=True: AdamW's update (torch.optim.Adam's own option)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=decoupled_weight_decay,
                         stochastic_rounding=stochastic_rounding, seed=seed)
