"""AdamW8bit: AdamW whose moment estimates live in 8 bits, block-wise (the C++ kernel,
csrc/cpu/optim_impl.h, on the CPU; the Triton kernel, kernels/optim.py, bit for bit the same
update, on CUDA GPUs; PyTorch ops otherwise).

Each parameter of at least min_8bit_size elements keeps, per block of 256 values, a float32
scale (the block's absmax) and one byte per value for each moment: exp_avg m ~ scale * (c/127)^2
with c's sign (c int8), exp_avg_sq v ~ scale * (u/255)^4 (u uint8). The power maps put their
fine steps near zero, where most of a block's values are (v spans decades within a block); a
code is the integer nearest the scaled root (a square root for m, for v the square root of
sqrt(v)); m's codes are computed exactly from any square root estimate, which lets the CPU
kernel use its cheapest one, v's from the correctly rounded square root: every kernel agrees
bit for bit (the reference path's float32 update rounds in its own order; its codes are
theirs, exactly). Smaller tensors keep float32 moments. State: ~2.03 bytes per parameter against
AdamW's 8 (25%).

Checkpoints of llmkernels 0.1.0 before this format (m ~ scale * (c/127)^3: param groups without
"codes_version") are converted when loaded.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from . import _capturable, _fused, _plan
from .adam import adam_native, adam_reference, adam_triton_planned, adam_update

BLOCK = 256


CODES_VERSION = 2  # param_groups' "codes_version": 1 (absent) m ~ (c/127)^3, 2 m ~ (c/127)^2


def dequantize_moments(state) -> tuple:
    """(exp_avg, exp_avg_sq) as float32 tensors of the parameter's size, from 8-bit state:
    m = c|c| * scale / 127^2, v = (u^2)^2 * scale / 255^4, in the kernels' float32 operations."""
    n = state["exp_avg_codes"].numel()
    m_unit = (state["exp_avg_scales"] * (1.0 / 16129.0)).repeat_interleave(BLOCK)[:n]
    v_unit = ((state["exp_avg_sq_scales"] * (1.0 / 65025.0)) * (1.0 / 65025.0))
    v_unit = v_unit.repeat_interleave(BLOCK)[:n]
    c = state["exp_avg_codes"].float()
    u = state["exp_avg_sq_codes"].float()
    return (c * c.abs()) * m_unit, ((u * u) * (u * u)) * v_unit


def sqrt_codes(y: torch.Tensor, max_code: int) -> torch.Tensor:
    """The integer nearest sqrt(y), halves up, exactly (float32 y; 0 below 1/4 and for NaN),
    as int32: the kernels' sqrt_code."""
    f = torch.floor(torch.sqrt(y.clamp(min=0)))
    t = f + 0.5
    c = (f + (y >= t * t).float()).clamp(max=max_code)
    return torch.where(y >= 0.25, c, torch.zeros_like(c)).to(torch.int32)


def rounded_sqrt_codes(y: torch.Tensor) -> torch.Tensor:
    """int(sqrt(y) + 1/2) of the correctly rounded float32 square root, at most 255 (0 for NaN
    and infinity), as int32: the kernels' rounded_sqrt_code (exp_avg_sq's codes)."""
    ok = (y >= 0) & (y < 65536.0)
    c = torch.floor(torch.sqrt(torch.where(ok, y, torch.zeros_like(y))) + 0.5).clamp(max=255)
    return torch.where(ok, c, torch.zeros_like(c)).to(torch.int32)


def _quantize_moments(state, m: torch.Tensor, v: torch.Tensor) -> None:
    n = m.numel()
    nb = state["exp_avg_scales"].numel()
    pad = nb * BLOCK - n
    mb = torch.nn.functional.pad(m, (0, pad)).view(nb, BLOCK)
    vb = torch.nn.functional.pad(v, (0, pad)).view(nb, BLOCK)
    m_max, v_max = mb.abs().amax(1), vb.amax(1)
    zero = torch.zeros_like(m_max)
    # blocks under 2^-64 scaled by 2^64 first, or 1 / m_max * 127^2 overflows (optim_impl.h)
    m_pre = torch.where(m_max < 2.0 ** -64, torch.full_like(m_max, 2.0 ** 64),
                        torch.ones_like(m_max))
    m_k = torch.where(m_max > 0, (1.0 / (m_max * m_pre)) * 16129.0, zero)
    v_k = torch.where(v_max > 0, (1.0 / v_max.sqrt()) * 65025.0, zero)
    cm = sqrt_codes((mb.abs() * m_pre[:, None]) * m_k[:, None], 127)
    cm = torch.where(mb < 0, -cm, cm)
    cv = rounded_sqrt_codes(vb.sqrt() * v_k[:, None])
    state["exp_avg_codes"].copy_(cm.reshape(-1)[:n].to(torch.int8))
    state["exp_avg_sq_codes"].copy_(cv.reshape(-1)[:n].to(torch.uint8))
    state["exp_avg_scales"].copy_(m_max)
    state["exp_avg_sq_scales"].copy_(v_max)


def _convert_version1_codes(codes: torch.Tensor) -> None:
    """exp_avg codes of the cube map (m = scale * (c/127)^3) rewritten, in place, in the square
    map with the same block scales (the largest value keeps code 127); exp_avg_sq's map did
    not change."""
    q = torch.arange(-128, 128, dtype=torch.float32)
    a = (q.abs() * (1.0 / 127.0)) ** 3  # |m| / scale
    table = sqrt_codes(a * 16129.0, 127)
    table = torch.where(q < 0, -table, table).to(torch.int8).to(codes.device)
    local = _fused.local(codes)
    local.copy_(table[local.long() + 128])


def _eight_bit_state(p: torch.Tensor) -> dict:
    """Zeroed 8-bit moments of p: codes (one byte per value) and per-256-block scales.

    A DTensor p (FSDP2) gets DTensor state, so that torch.distributed.checkpoint saves each
    rank's part: blocks cover each rank's local shard, the codes are shaped and sharded like
    p, and the scales of every rank are one row, padded to the longest shard's block count, of
    a (ranks, blocks) tensor sharded by rows. Such a checkpoint resumes on the same mesh."""
    lp = _fused.local(p)
    n = lp.numel()
    if lp is p:
        nb = -(-n // BLOCK)
        return {"exp_avg_codes": torch.zeros(n, dtype=torch.int8, device=p.device),
                "exp_avg_scales": torch.zeros(nb, dtype=torch.float32, device=p.device),
                "exp_avg_sq_codes": torch.zeros(n, dtype=torch.uint8, device=p.device),
                "exp_avg_sq_scales": torch.zeros(nb, dtype=torch.float32, device=p.device)}
    from torch.distributed.tensor import DTensor, Shard
    mesh, placements = p.device_mesh, p.placements
    _, (rows, nb_max) = _eight_bit_shapes(p)
    row_placements = [Shard(0) if isinstance(pl, Shard) else pl for pl in placements]

    def codes(dtype):
        return DTensor.from_local(torch.zeros(lp.shape, dtype=dtype, device=lp.device), mesh,
                                  placements, run_check=False, shape=p.shape, stride=p.stride())

    def scales():
        return DTensor.from_local(torch.zeros(1, nb_max, dtype=torch.float32, device=lp.device),
                                  mesh, row_placements, run_check=False, shape=(rows, nb_max),
                                  stride=(nb_max, 1))
    return {"exp_avg_codes": codes(torch.int8), "exp_avg_scales": scales(),
            "exp_avg_sq_codes": codes(torch.uint8), "exp_avg_sq_scales": scales()}


def _eight_bit_shapes(p: torch.Tensor) -> tuple:
    """(codes, scales) shapes of p's 8-bit state as _eight_bit_state makes it (a DTensor p:
    the DTensors' global shapes)."""
    lp = _fused.local(p)
    if lp is p:
        return (p.numel(),), (-(-p.numel() // BLOCK),)
    from torch.distributed.tensor import Shard
    longest, rows = list(p.shape), 1
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            size = p.device_mesh.size(mesh_dim)
            longest[placement.dim] = -(-longest[placement.dim] // size)
            rows *= size
    return tuple(p.shape), (rows, -(-max(1, torch.Size(longest).numel()) // BLOCK))


def _check_eight_bit_layout(p: torch.Tensor, state: dict, index: int) -> None:
    """Loaded 8-bit state must have the layout this parameter's would: scales of the same
    number of values but another shape (a gathered full state dict of several ranks, state
    resharded to another number of ranks) put block boundaries where they were not, and the
    moments came out silently wrong."""
    codes, scales = _eight_bit_shapes(p)
    sharded = _fused.local(p) is not p
    for key, want in (("exp_avg_codes", codes), ("exp_avg_sq_codes", codes),
                      ("exp_avg_scales", scales), ("exp_avg_sq_scales", scales)):
        value = state.get(key)
        shape = None if value is None else tuple(value.shape)
        ok = shape == want or (key.endswith("codes") and not sharded and value.numel() == want[0])
        if not ok or sharded != (_fused.local(value) is not value):
            raise ValueError(
                f"AdamW8bit: the loaded {key} of parameter {index} of its group has shape "
                f"{shape}{' (sharded)' if value is not None and _fused.local(value) is not value else ''}; "
                f"this parameter's needs {want}{' (sharded)' if sharded else ''}. 8-bit state "
                "does not move between shardings (another number of ranks, a gathered full "
                "state dict): its 256-value blocks follow the shards it was saved from. Resume "
                "on the mesh it was saved on, or from a torch.optim.AdamW-style checkpoint")


def _check_eight_bit_state(group: dict, p: torch.Tensor, state: dict) -> None:
    """p's 8-bit state as the kernels read it, checked before a step changes anything: codes
    or scales of another size (a checkpoint of another model; torch's load_state_dict does
    not compare shapes) were written past their end by the Triton kernels, and a
    non-contiguous tensor was read as if it were contiguous."""
    lp = _fused.local(p)
    n = lp.numel()
    for key, dtype, size in (("exp_avg_codes", torch.int8, n), ("exp_avg_sq_codes", torch.uint8, n),
                             ("exp_avg_scales", torch.float32, -(-n // BLOCK)),
                             ("exp_avg_sq_scales", torch.float32, -(-n // BLOCK))):
        t = state.get(key)
        local = None if t is None else _fused.local(t)
        # (a shard's scales: its row of the longest shard's blocks)
        fits = local is not None and (local.numel() == size or (
            local is not t and key.endswith("scales") and local.numel() >= size))
        if (not fits or local.dtype != dtype or local.device != lp.device
                or not local.is_contiguous()):
            index = next(i for i, q in enumerate(group["params"]) if q is p)
            got = ("missing" if local is None else
                   f"{local.numel()} {local.dtype} values on {local.device}"
                   f"{'' if local.is_contiguous() else ', not contiguous'}")
            raise ValueError(f"AdamW8bit: {key} of parameter {index} of its group must be a "
                             f"contiguous tensor of {size} {dtype} values on {lp.device} (its "
                             f"parameter holds {n}); got {got}")


def _local_eight_bit(p: torch.Tensor, state: dict) -> tuple:
    """(parameter, gradient, state) on this rank: flat codes and the local shard's scales."""
    lp = _fused.local(p)
    if lp is p:
        return p, p.grad, state
    nb = -(-lp.numel() // BLOCK)
    local = {key: _fused.local(state[key]).view(-1) for key in _EIGHT_BIT_KEYS}
    for key in ("exp_avg_scales", "exp_avg_sq_scales"):
        local[key] = local[key][:nb]
    return lp, _fused.local(_fused.placed_grads([p], [p.grad])[0]), local


_EIGHT_BIT_KEYS = ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales")
_SMALL_KEYS = ("exp_avg", "exp_avg_sq")  # float32 moments of tensors under min_8bit_size


def _eight_bit_native(path, device, items, *, lr, beta1, beta2, eps, weight_decay, maximize,
                      inv_scale, table=None, rows=()) -> None:
    """The C++ ("cpu") or CUDA kernel's 8-bit step over items (per tensor: parameter and
    gradient views, the four state views in _EIGHT_BIT_KEYS' order, step size, bias
    correction). table, rows: as adam_native's (_capturable.adam8bit_table)."""
    wd = weight_decay
    native = backends.native_module()
    if path == "cpu":
        native.adam8bit_step(backends.cpu_tier_code(), items, eps, wd, beta2, True, maximize,
                             inv_scale, backends.cpu_threads(), 1.0 - lr * wd, 1.0 - beta1,
                             1.0 - beta2)
    else:
        _fused.on_cuda(device, native.adam8bit_step_cuda, items, eps, wd, beta2, maximize,
                       inv_scale, 1.0 - lr * wd, 1.0 - beta1, 1.0 - beta2,
                       after=(0 if table is None else table.data_ptr(), list(rows)))


def _eight_bit_triton_planned(plan, idx, grad_views, corrections, *, lr, beta1, beta2, eps,
                              weight_decay, maximize, inv_scale) -> None:
    """The Triton 8-bit step of a plan's parameters idx (tables kept in the plan)."""
    kernels = _fused.triton_optim()
    prepared = plan.triton.get("eight")
    if prepared is None:
        params = [plan.params[i] for i in idx]
        states = [plan.states[i] for i in idx]
        prepared = plan.triton["eight"] = kernels.adam8bit_prepare(
            params, [p.grad for p in params], *([s[key] for s in states] for key in (
                "exp_avg_codes", "exp_avg_sq_codes", "exp_avg_scales", "exp_avg_sq_scales")),
            check=False)
    kernels.adam8bit_launch(
        prepared, [grad_views[i][0] for i in idx], [corrections[i][0] for i in idx],
        [corrections[i][1] for i in idx], beta2=beta2, eps=eps, maximize=maximize,
        inv_grad_scale=inv_scale, decay=1.0 - lr * weight_decay, one_minus_beta1=1.0 - beta1,
        one_minus_beta2=1.0 - beta2)


def _eight_bit_reference(p, state, row, *, beta1, beta2, eps, skip) -> None:
    """One 8-bit tensor's capturable update in PyTorch ops: row, its float32 table row on the
    device (adam8bit_table); skip: None, or a 0-d tensor, nonzero to keep the old state."""
    m, v = dequantize_moments(state)
    flat_p = p.detach().view(-1) if p.is_contiguous() else p.detach().reshape(-1)
    work = flat_p.clone()
    adam_reference(work, p.grad.reshape(-1), m, v, None, lr=0.0, beta1=beta1, beta2=beta2,
                   eps=eps, weight_decay=0.0, decoupled=True, amsgrad=False, maximize=False,
                   step_size=row[0], bias_correction2_sqrt=row[1], inv_grad_scale=row[3],
                   decay=row[2])
    new = state if skip is None else {key: state[key].clone() for key in _EIGHT_BIT_KEYS}
    _quantize_moments(new, m, v)
    if skip is not None:
        keep = skip != 0
        work = torch.where(keep, flat_p, work)
        for key in _EIGHT_BIT_KEYS:
            state[key].copy_(torch.where(keep, state[key], new[key]))
    p.copy_(work.view_as(p))


# torch.optim.AdamW's group keys that AdamW8bit's arguments do not set (as AdamW's defaults)
_TORCH_ADAMW_KEYS = dict(amsgrad=False, foreach=None, differentiable=False, fused=None,
                         decoupled_weight_decay=True)


class AdamW8bit(_fused.FusedOptimizer):
    """torch.optim.AdamW's arguments and update, with 8-bit block-wise moments."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, min_8bit_size: int = 4096,
                 foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None):
        _fused.check_adam_hyperparameters("AdamW8bit", lr, betas, eps, weight_decay)
        # torch.optim.AdamW's arguments, for code written for it (see check_torch_flags)
        _fused.check_torch_flags("AdamW8bit", differentiable, foreach, fused)
        if amsgrad:
            raise ValueError("AdamW8bit: amsgrad=True is not supported (the 8-bit state keeps "
                             "no max of exp_avg_sq); use llmkernels.optim.AdamW")
        if int(min_8bit_size) < 1:
            raise ValueError(f"AdamW8bit: min_8bit_size must be >= 1, got {min_8bit_size}")
        # torch.optim.AdamW's group keys (code reads them, e.g. group["foreach"]), and ours
        defaults = dict(_TORCH_ADAMW_KEYS, lr=lr, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, maximize=bool(maximize), foreach=foreach,
                        capturable=bool(capturable), fused=fused,
                        min_8bit_size=int(min_8bit_size), codes_version=CODES_VERSION)
        super().__init__(params, defaults)

    def _state_of(self, p, min_size: int, capturable: bool = False):
        state = self.state[p]
        if len(state) == 0:
            # torch's layout: capturable steps on the parameter's device, others on the CPU
            state["step"] = torch.zeros((), dtype=torch.float32,
                                        device=p.device if capturable else None)
            if p.numel() >= min_size:  # the global size: every rank makes the same choice
                state.update(_eight_bit_state(p))
            else:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # e.g. the groups of a torch.optim.AdamW checkpoint
            group.setdefault("maximize", False)
            group.setdefault("capturable", False)
            group.setdefault("min_8bit_size", self.defaults["min_8bit_size"])
            for key, value in _TORCH_ADAMW_KEYS.items():  # checkpoints made before them
                group.setdefault(key, value)

    def load_state_dict(self, state_dict) -> None:
        """torch's, except that 8-bit codes, scales and float32 moments keep their dtypes
        (torch casts every state tensor to its parameter's dtype: bf16 scales would lose bits),
        and codes of an older format are converted. A torch.optim.AdamW checkpoint loads too:
        its moments become 8-bit state (float32 for tensors under min_8bit_size). 8-bit state
        saved with another sharding (another number of ranks, a gathered full state dict) is
        refused: its blocks follow the shards it was saved from. The load-state-dict hooks see
        and change what they do with torch's optimizers: the pre-hooks run before the state
        is read here, the post-hooks after it is in place."""
        kept = {}

        def read(optimizer, loaded):  # registered last: after the user's pre-hooks
            for group in loaded["param_groups"]:
                if group.get("amsgrad"):
                    raise ValueError("AdamW8bit: this checkpoint's param groups use "
                                     "amsgrad=True, whose max of exp_avg_sq AdamW8bit does not "
                                     "keep; load it into llmkernels.optim.AdamW")
            params = _fused.saved_params(self, loaded)
            state = {}
            for key, st in loaded["state"].items():
                if key in params:
                    kept[params[key]] = {k: v for k, v in st.items()
                                         if isinstance(v, torch.Tensor) and k != "step"}
                    # torch would cast these to the parameter's dtype, all at once (uint8
                    # codes as float32: 4x the 8-bit state), only for place to drop them
                    st = {k: v for k, v in st.items() if k not in kept[params[key]]}
                state[key] = st
            return {**loaded, "state": state}

        def place(optimizer):  # registered first: before the user's post-hooks
            for p, tensors in kept.items():
                for name, value in tensors.items():  # (the kernels read them as flat arrays)
                    self.state[p][name] = value.to(device=p.device, copy=True,
                                                   memory_format=torch.contiguous_format)
            for group in self.param_groups:
                if group.get("codes_version", 1) == 1:
                    for p in group["params"]:
                        if "exp_avg_codes" in self.state.get(p, {}):
                            _convert_version1_codes(self.state[p]["exp_avg_codes"])
                elif group["codes_version"] != CODES_VERSION or type(
                        group["codes_version"]) is not int:
                    raise ValueError(f"AdamW8bit: this checkpoint's codes_version "
                                     f"{group['codes_version']!r} is not one this llmkernels "
                                     f"reads (1 or {CODES_VERSION}; a newer release wrote it?)")
                group["codes_version"] = CODES_VERSION
                for i, p in enumerate(group["params"]):
                    state = self.state.get(p, {})
                    if "exp_avg" in state:
                        self._from_float_moments(p, state, group["min_8bit_size"])
                    elif "exp_avg_codes" in state:
                        _check_eight_bit_layout(p, state, i)

        pre = self.register_load_state_dict_pre_hook(read)
        post = self.register_load_state_dict_post_hook(place, prepend=True)
        # torch puts new state and param group objects in place before the post-hooks check
        # them: a refused checkpoint must leave the optimizer as it was, not half loaded.
        before = (self.state, self.param_groups)
        try:
            super().load_state_dict(state_dict)
        except BaseException:
            self.state, self.param_groups = before
            raise
        finally:
            pre.remove()
            post.remove()

    @staticmethod
    def _from_float_moments(p, state: dict, min_size: int) -> None:
        """Moments of a torch.optim.AdamW checkpoint (the parameter's dtype) as this
        optimizer's state for p: 8-bit codes from min_size elements, else float32."""
        for key in _SMALL_KEYS:
            if state[key].numel() != p.numel():
                raise ValueError(f"AdamW8bit: the checkpoint's {key} holds "
                                 f"{state[key].numel()} values, its parameter {p.numel()} "
                                 "(state from another model?)")
        if p.numel() < min_size:
            for key in _SMALL_KEYS:
                state[key] = state[key].float()
            return
        if _fused.has_dtensor([p]):
            raise ValueError("AdamW8bit: converting float moments of sharded (DTensor) "
                             "parameters is not supported; load the torch.optim.AdamW "
                             "checkpoint unsharded first")
        m, v = (state.pop(key).detach().float().reshape(-1) for key in _SMALL_KEYS)
        state.update(_eight_bit_state(p))
        _quantize_moments(state, m, v)

    def state_bytes(self) -> int:
        """Bytes of optimizer state (moments, scales, steps)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    def _llmk_explain_step(self) -> "backends.Decisions":
        """llmkernels.explain(optimizer.step): the small tensors (float32 moments) and the
        8-bit ones of each group apart, in the order step() routes them."""
        def rows_of(group, params, grads):
            def has_float_state(p):  # as step() decides: by the state's keys once it has one
                state = self.state.get(p)
                if state:
                    return "exp_avg_codes" not in state
                return p.numel() < group["min_8bit_size"]
            small = [has_float_state(p) for p in params]
            big = [(p, g) for p, g, s in zip(params, grads, small) if not s]
            few = [(p, g, self.state.get(p, {})) for p, g, s in zip(params, grads, small) if s]
            return [(" (float32 state: tensors under min_8bit_size, or loaded so)", [p for p, _, _ in few],
                     [[p, g, s.get("exp_avg"), s.get("exp_avg_sq")] for p, g, s in few],
                     False, True),
                    (" (8-bit state)", [p for p, _ in big], [[p, g] for p, g in big], False,
                     False)]
        return _fused.explain_step(self, rows_of)

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: Optional[torch.Tensor] = None,
             found_inf: Optional[torch.Tensor] = None):
        loss, amp = _fused.begin_step(self, closure, grad_scale, found_inf)
        for group in self.param_groups:
            params = _fused.grads_of(group, "AdamW8bit")
            if not params:
                continue
            if group.get("capturable", False) and self._capturable_step(group, params, amp):
                continue
            _fused.refuse_capture("AdamW8bit", params,
                                  "construct the optimizer with capturable=True")
            inv_scale = amp.host()
            if inv_scale is None:  # GradScaler found inf/NaN gradients: no update
                continue
            lr = _fused.as_float(group["lr"], "lr", "AdamW8bit")
            beta1, beta2 = _fused.as_betas(group["betas"], "AdamW8bit")
            eps = _fused.as_float(group["eps"], "eps", "AdamW8bit")
            wd = _fused.as_float(group["weight_decay"], "weight_decay", "AdamW8bit")
            hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd,
                         maximize=group["maximize"], inv_scale=inv_scale)
            if self._planned_step(group, params, hyper):
                continue
            states = [self._state_of(p, group["min_8bit_size"]) for p in params]
            for p, st in zip(params, states):
                if "exp_avg_codes" in st:
                    _check_eight_bit_state(group, p, st)
            with _fused.counted_step(self, group, states) as step_values:
                corr = _fused.bias_corrections(step_values, lr, beta1, beta2)
                rows = list(zip(params, states, corr))
                eight = [(p, s, c) for p, s, c in rows if "exp_avg_codes" in s]
                small = [(p, s, c) for p, s, c in rows if "exp_avg_codes" not in s]
                paths = set()
                if small:  # float32 moments: an AdamW step on whichever path can take them
                    paths.add(adam_update(
                        [p for p, _, _ in small], [p.grad for p, _, _ in small],
                        [s["exp_avg"] for _, s, _ in small],
                        [s["exp_avg_sq"] for _, s, _ in small],
                        [None] * len(small), [c for _, _, c in small], [0] * len(small),
                        decoupled=True, amsgrad=False, sr=False, **hyper))
                if eight:
                    paths.add(self._eight_bit_update(group, eight, hyper))
                _plan.after_full_step(self, group, params, [
                    _EIGHT_BIT_KEYS if "exp_avg_codes" in s else _SMALL_KEYS for s in states],
                    paths)
        return loss

    def _capturable_step(self, group, params, amp: _fused.Amp) -> bool:
        """A capturable group's step with its scalars on the device (_capturable.py), on the
        Triton or CUDA kernels or the reference; False (nothing done) when the host path
        serves it."""
        if not _capturable.may_take_device_path(params):
            return False
        served = _plan.serve(self, group, params, (_SMALL_KEYS, _EIGHT_BIT_KEYS))
        if served is not None:
            path, plan = served[0], served[1]
            states = plan.states
        else:
            states = [self._state_of(p, group["min_8bit_size"], capturable=True)
                      for p in params]
            path = _capturable.device_path(params, [[p, p.grad] for p in params], False)
            if path is None:
                return False
            for p, st in zip(params, states):
                if "exp_avg_codes" in st:
                    _check_eight_bit_state(group, p, st)
        device = params[0].device
        beta1, beta2 = _fused.as_betas(group["betas"], "AdamW8bit")
        eps = _fused.as_float(group["eps"], "eps", "AdamW8bit")
        wd = _fused.as_float(group["weight_decay"], "weight_decay", "AdamW8bit")
        maximize = group["maximize"]
        inv, found = amp.device(device)
        steps = _capturable.advance(self, group, states, device)
        eight = [i for i, s in enumerate(states) if "exp_avg_codes" in s]
        small = [i for i, s in enumerate(states) if "exp_avg_codes" not in s]
        scalars = dict(weight_decay=wd, inv=inv, found=found)
        corr = _capturable.corrections(steps, group, beta1, beta2)  # once for both tables
        small_table = (_capturable.adam_table(steps, corr, seed=None, **scalars)
                       if small else None)
        eight_table = (_capturable.adam8bit_table(steps, corr, maximize=maximize, **scalars)
                       if eight else None)
        if path == "triton":
            self._capturable_triton(served, params, states, small, eight, small_table,
                                    eight_table, beta1=beta1, beta2=beta2, eps=eps,
                                    weight_decay=wd, maximize=maximize)
        elif path == "cuda":  # the tables' rows by parameter index
            if served is not None:
                pg = list(zip(served[2], served[3]))
                state_views = plan.state_views
            else:
                pg = _fused.kernel_views([[p, p.grad] for p in params])
                keys = {i: _SMALL_KEYS for i in small} | {i: _EIGHT_BIT_KEYS for i in eight}
                state_views = [tuple(_fused.flat(states[i][k]) for k in keys[i])
                               for i in range(len(params))]
            hyper = dict(lr=0.0, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd,
                         maximize=maximize, inv_scale=1.0)
            if small:
                adam_native("cuda", device, [(*pg[i], *state_views[i], None) for i in small],
                            [(0.0, 1.0)] * len(small), [0] * len(small), decoupled=True,
                            amsgrad=False, sr=False, table=small_table, rows=small, **hyper)
            if eight:
                _eight_bit_native("cuda", device,
                                  [(*pg[i], *state_views[i], 0.0, 1.0) for i in eight],
                                  table=eight_table, rows=eight, **hyper)
        else:
            for i in small:
                s = states[i]
                adam_reference(params[i], params[i].grad, s["exp_avg"], s["exp_avg_sq"], None,
                               lr=0.0, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd,
                               decoupled=True, amsgrad=False, maximize=maximize,
                               step_size=small_table[i, 0],
                               bias_correction2_sqrt=small_table[i, 1],
                               inv_grad_scale=small_table[i, 4], decay=small_table[i, 3],
                               skip=found)
            for i in eight:
                _eight_bit_reference(params[i], states[i], eight_table[i], beta1=beta1,
                                     beta2=beta2, eps=eps, skip=found)
        if served is None and path in _plan.KERNEL_PATHS:  # a plan for the next steps
            _plan.after_full_step(self, group, params, [
                _EIGHT_BIT_KEYS if "exp_avg_codes" in s else _SMALL_KEYS for s in states],
                {path})
        _capturable.finish(steps, found)
        return True

    def _capturable_triton(self, served, params, states, small, eight, small_table,
                           eight_table, *, beta1, beta2, eps, weight_decay, maximize) -> None:
        """The Triton launches of a capturable step: the plan's kept tables when it serves
        (the pointer tables then stay on the device), else new ones."""
        kernels = _fused.triton_optim()
        kept = served[1].triton if served is not None else {}
        grad_ptrs = [v[0] for v in served[3]] if served is not None else None
        consts = dict(beta2=beta2, eps=eps, one_minus_beta1=1.0 - beta1,
                      one_minus_beta2=1.0 - beta2)
        if small:
            prepared = kept.get("small_table")
            if prepared is None:
                prepared = kernels.adam_prepare(
                    [params[i] for i in small], [params[i].grad for i in small],
                    [states[i]["exp_avg"] for i in small],
                    [states[i]["exp_avg_sq"] for i in small], [None] * len(small),
                    amsgrad=False, check=False, table_rows=small)
                if served is not None:
                    kept["small_table"] = prepared
            kernels.adam_launch_table(
                prepared, grad_ptrs and [grad_ptrs[i] for i in small], small_table,
                weight_decay=weight_decay, decoupled=True, amsgrad=False, maximize=maximize,
                sr=False, **consts)
        if eight:
            prepared = kept.get("eight_table")
            if prepared is None:
                prepared = kernels.adam8bit_prepare(
                    [params[i] for i in eight], [params[i].grad for i in eight],
                    *([states[i][key] for i in eight] for key in (
                        "exp_avg_codes", "exp_avg_sq_codes", "exp_avg_scales",
                        "exp_avg_sq_scales")), check=False, table_rows=eight)
                if served is not None:
                    kept["eight_table"] = prepared
            kernels.adam8bit_launch_table(
                prepared, grad_ptrs and [grad_ptrs[i] for i in eight], eight_table, **consts)

    def _planned_step(self, group, params, hyper) -> bool:
        """The step of a group whose tensors are those of its plan (_plan.py), on the C++, CUDA
        or Triton kernels; False (nothing done) when the plan does not serve."""
        served = _plan.serve(self, group, params, (_SMALL_KEYS, _EIGHT_BIT_KEYS))
        if served is None:
            return False
        path, plan, param_views, grad_views = served
        with _fused.counted_step(self, group, plan.states) as step_values:
            self._planned_update(path, plan, params, param_views, grad_views, step_values,
                                 hyper)
        return True

    @staticmethod
    def _planned_update(path, plan, params, param_views, grad_views, step_values,
                        hyper) -> None:
        state_views = plan.state_views
        corr = _fused.bias_corrections(step_values, hyper["lr"], hyper["beta1"], hyper["beta2"])
        device = params[0].device
        small = plan.kinds.get(_SMALL_KEYS)
        eight = plan.kinds.get(_EIGHT_BIT_KEYS)
        if path == "triton":
            if small:
                adam_triton_planned(plan, "small", small, grad_views, corr, [0] * len(corr),
                                    decoupled=True, amsgrad=False, sr=False, **hyper)
            if eight:
                _eight_bit_triton_planned(plan, eight, grad_views, corr, **hyper)
            return
        if small:
            adam_native(path, device,
                        [(param_views[i], grad_views[i], *state_views[i], None) for i in small],
                        [corr[i] for i in small], [0] * len(small), decoupled=True,
                        amsgrad=False, sr=False, **hyper)
        if eight:
            _eight_bit_native(path, device, [(param_views[i], grad_views[i], *state_views[i],
                                              *corr[i]) for i in eight], **hyper)

    def _eight_bit_update(self, group, eight, hyper) -> str:
        """The step of the parameters with 8-bit state ((parameter, state, corrections) each)
        on the path backends.py's rules choose; returns the path."""
        lr, beta1, beta2 = hyper["lr"], hyper["beta1"], hyper["beta2"]
        eps, wd, inv_scale = hyper["eps"], hyper["weight_decay"], hyper["inv_scale"]
        # (local parameter, its gradient, local state, corrections): FSDP2's DTensors as
        # each rank's shards; anything else as it is.
        eight = [(*_local_eight_bit(p, s), c) for p, s, c in eight]
        ps8 = [p for p, _, _, _ in eight]
        pg_rows = [[p, g] for p, g, _, _ in eight]
        path, pg_views = _fused.route(ps8, pg_rows, False)
        if path == "triton":
            _fused.triton_optim().adam8bit_step(
                ps8, [g for _, g, _, _ in eight], [s["exp_avg_codes"] for _, _, s, _ in eight],
                [s["exp_avg_sq_codes"] for _, _, s, _ in eight],
                [s["exp_avg_scales"] for _, _, s, _ in eight],
                [s["exp_avg_sq_scales"] for _, _, s, _ in eight],
                [c[0] for _, _, _, c in eight], [c[1] for _, _, _, c in eight], beta2=beta2,
                eps=eps, maximize=hyper["maximize"], inv_grad_scale=inv_scale,
                decay=1.0 - lr * wd, one_minus_beta1=1.0 - beta1,
                one_minus_beta2=1.0 - beta2, check=False)
        elif path in ("cpu", "cuda"):
            flat = _fused.flat
            items = [(vp, vg, *(flat(s[key]) for key in _EIGHT_BIT_KEYS), step_size, bc2)
                     for (vp, vg), (_, _, s, (step_size, bc2)) in zip(pg_views, eight)]
            _eight_bit_native(path, ps8[0].device, items, **hyper)
        else:
            for p, g, s, (step_size, bc2) in eight:
                m, v = dequantize_moments(s)
                flat_p = p.detach().view(-1) if p.is_contiguous() else p.detach().reshape(-1)
                work = flat_p.clone()
                adam_reference(work, g.reshape(-1), m, v, None, lr=lr, beta1=beta1,
                               beta2=beta2, eps=eps, weight_decay=wd, decoupled=True,
                               amsgrad=False, maximize=hyper["maximize"],
                               step_size=step_size, bias_correction2_sqrt=bc2,
                               inv_grad_scale=inv_scale)
                p.copy_(work.view_as(p))
                _quantize_moments(s, m, v)
        return path
