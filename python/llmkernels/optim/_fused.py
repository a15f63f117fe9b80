"""What the fused optimizers share: argument checks, per-group tensor collection, the choice
between the fused CPU kernel and the reference path, and GradScaler's (grad_scale, found_inf)."""
from __future__ import annotations

import contextlib
import math
import operator
from typing import Iterator, List, Optional, Tuple, Union

import torch

from .. import backends
from .clip import drop_pending_multiplier, take_pending_multiplier
from .._cuda_launch import device_guard, stream_handle
from .._cview import DTYPE_CODES
from .._hash import MASK32, fmix32

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Scalar = Union[float, torch.Tensor]
_step_of = operator.itemgetter("step")
grad_of = operator.attrgetter("grad")
is_sparse = operator.attrgetter("is_sparse")


def as_float(value, name: str, owner: str) -> float:
    """A hyperparameter (float or 0-d tensor) as a finite Python float."""
    if isinstance(value, (str, bytes)):  # float("0.1") would take it; torch's checks refuse it
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{owner}: {name} must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    return value


def as_betas(betas, owner: str) -> tuple:
    """A param group's betas as two finite floats in [0, 1) (a group edited after
    construction: beta1 = 1 divided by zero in the bias correction, after the step counts
    had moved)."""
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}") from None
    beta1, beta2 = as_float(beta1, "betas[0]", owner), as_float(beta2, "betas[1]", owner)
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"{owner}: betas must be in [0, 1), got ({beta1}, {beta2})")
    return beta1, beta2


def check_params(params: List[torch.Tensor], owner: str) -> None:
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{owner}: parameters must be tensors, got {type(p).__name__}")
        if p.is_complex():
            raise ValueError(f"{owner}: complex parameters are not supported (view them with "
                             "torch.view_as_real first)")
        if not p.dtype.is_floating_point:
            raise ValueError(f"{owner}: parameters must be floating point, got {p.dtype}")
    if len(set(map(id, params))) != len(params):
        # torch.optim warns (deprecated) and steps such a parameter twice; the fused step
        # would update it once per listing on one memory, not as torch's two steps
        raise ValueError(f"{owner}: a parameter appears more than once in a param group")


def check_torch_flags(owner: str, differentiable, foreach=None, fused=None) -> None:
    """torch.optim's foreach / fused / differentiable arguments are accepted, so that code
    written for torch's optimizers runs unchanged: foreach and fused only choose among torch's
    own implementations (ours is always one fused multi-tensor step; their values are kept in
    the param groups, as torch keeps them), and both True is refused as torch refuses it; a
    differentiable step is not what ours can do, and says so. (capturable is taken:
    _capturable.py.)"""
    if foreach and fused:
        raise RuntimeError(f"{owner}: `fused` and `foreach` cannot be `True` together.")
    if differentiable:
        raise ValueError(f"{owner}: differentiable=True is not supported (the fused step runs "
                         "outside autograd)")


def grads_of(group, owner: str) -> List[torch.Tensor]:
    """The parameters of a group that have a gradient; sparse gradients are refused."""
    params = group["params"]
    grads = list(map(grad_of, params))  # C-level loops: this runs every step
    out = [p for p, g in zip(params, grads) if g is not None]
    if any(map(is_sparse, grads if len(out) == len(grads) else [p.grad for p in out])):
        raise RuntimeError(f"{owner} does not support sparse gradients")
    return out


def kernel_views(rows, f32_state: bool = False, build: bool = True,
                 why: Optional[list] = None):
    """Per row ([parameter, gradient, state...], None for an absent tensor) its tensors' flat()
    views, in one pass; None if the kernels cannot take the rows: a parameter dtype outside
    KERNEL_DTYPES, a gradient or state of another dtype than its parameter (with f32_state,
    float32 states are fine too when every row has them), tensors on several devices, a
    non-contiguous one. This runs every step over every tensor (hundreds of tensors, a few
    attribute reads each: most of a small model's step), so it reads each attribute once.
    build=False: the check alone (empty rows), for paths that take tensors (Triton).
    why: a list that receives the reason when the answer is None (explain).
    A gradient or state tensor of another size than its parameter (a checkpoint of another
    model) is an error on every path: ValueError (Triton's kernels would write past its end,
    the reference path would update the parameter first)."""
    if not rows:
        return []
    device = rows[0][0].get_device()
    f32 = torch.float32
    own = f32_state  # every state so far in its parameter's dtype / float32 (if allowed)
    same = True
    codes = DTYPE_CODES
    out = []
    for i, row in enumerate(rows):
        _check_sizes(row, i)
        dtype = row[0].dtype
        if dtype not in KERNEL_DTYPES:
            if why is not None:
                why.append(f"parameter {i} is {dtype} (the kernels take float32, bfloat16 and "
                           "float16)")
            return _refused(rows, i)
        views = []
        for j, t in enumerate(row):
            if t is None:
                views.append(None)
                continue
            tdt = t.dtype
            if tdt is not dtype:
                if j < 2 or tdt is not f32:
                    if why is not None:
                        why.append(f"{_ROLES[min(j, 2)]} {i} is {tdt}, the parameter {dtype}")
                    return _refused(rows, i)
                same = False
            elif j >= 2 and tdt is not f32:
                own = False
            if (not (same or own) or t.get_device() != device or not t.is_contiguous()
                    or t.is_neg()):
                if why is not None:
                    why.append(
                        "16-bit parameters' states are neither all float32 nor all in their "
                        "parameters' dtypes" if not (same or own) else
                        "the tensors are on several devices" if t.get_device() != device else
                        f"{_ROLES[min(j, 2)]} {i} is not contiguous" if not t.is_contiguous()
                        else f"{_ROLES[min(j, 2)]} {i} is a lazily negated view (its memory "
                        "holds the negated values)")
                return _refused(rows, i)
            if build:
                views.append((t.data_ptr(), codes[tdt], (t.numel(),), (1,)))
        out.append(views)
    return out


_ROLES = ("parameter", "the gradient of parameter", "a state tensor of parameter")


def _check_sizes(row, i: int) -> None:
    n = row[0].numel()
    for j, t in enumerate(row):
        if j and t is not None and t.numel() != n:
            raise ValueError(f"optimizer step: {_ROLES[min(j, 2)]} {i} holds {t.numel()} "
                             f"values, the parameter {n} (state from another model?)")


def _refused(rows, i: int) -> None:
    """kernel_views' None once row i is refused: the later rows' sizes are still checked (the
    reference path would update parameters before it met a wrong-sized state)."""
    for k in range(i + 1, len(rows)):
        _check_sizes(rows[k], k)
    return None


def _triton_optim():
    return backends.triton_kernels_or_error("optim")[0]


def route(params: List[torch.Tensor], rows, stochastic_rounding: bool,
          f32_state: bool = False):
    """(path, views) of one fused step over rows ([parameter, gradient, state...] per
    parameter): the path choose_path picks, and for the C++ paths the rows' kernel_views.
    CUDA tensors build no views unless the CUDA kernels serve (Triton takes tensors).
    f32_state: float32 state of 16-bit parameters is fine too (Adam's kernels take it on
    every path)."""
    on_cpu = params[0].device.type == "cpu"
    views = kernel_views(rows, f32_state, build=on_cpu)
    path = choose_path(params, views is not None, stochastic_rounding)
    if path == "cuda":
        views = kernel_views(rows, f32_state)
    return path, views


def explain_step(optimizer: torch.optim.Optimizer, rows_of) -> "backends.Decisions":
    """explain(optimizer.step): per param group, route()'s choice for each kind of rows that
    rows_of(group, params, grads) gives ((label, params, rows, stochastic_rounding, f32_state)
    tuples). params: the group's parameters with gradients; before any has one, all of them,
    each standing in for its own gradient (said in the detail)."""
    name = type(optimizer).__name__
    out = []
    for index, group in enumerate(optimizer.param_groups):
        params = [p for p in group["params"] if p.grad is not None]
        no_grads = not params
        if no_grads:
            params = list(group["params"])
        grads = params if no_grads else [p.grad for p in params]
        for label, ps, rows, sr, f32 in rows_of(group, params, grads):
            if not ps:
                continue
            decision = explain_route(f"{name}.step, param group {index}{label}", ps, rows, sr,
                                     f32)
            if no_grads:
                decision.detail = "no gradients yet: judged on the parameters and their state"
            out.append(decision)
    return backends.Decisions(out)


def explain_route(op: str, params: List[torch.Tensor], rows, stochastic_rounding: bool,
                  f32_state: bool = False) -> "backends.Decision":
    """route()'s choice for these rows (choose_path itself decides) and why each other path
    would not serve them (llmkernels.explain of an optimizer's step)."""
    why: list = []
    ready = kernel_views(rows, f32_state, build=False, why=why) is not None
    path = choose_path(params, ready, stochastic_rounding)
    forced = backends.forced_backend()
    device = params[0].device.type
    refusals = path_refusals(params, None if ready else why[0], stochastic_rounding)
    rejected = {}
    for name, reason in refusals.items():
        if name == path or (name == "cuda" and device != "cuda"):
            continue
        rejected[name] = reason or (  # could serve: another path was forced or comes first
            "another path was forced" if forced else
            "Triton serves CUDA tensors first (the CUDA kernels when forced)" if name == "cuda"
            else "another path comes first")
    if path != "reference":
        rejected["reference"] = ("another path was forced" if forced else
                                 "a kernel path serves (the reference path is PyTorch ops)")
    return backends.Decision(op, device, path, forced if path == forced else None, rejected)


def path_refusals(params: List[torch.Tensor], unready: Optional[str],
                  stochastic_rounding: bool) -> dict:
    """Why each kernel path ("cpu", "triton", "cuda") cannot serve a step over params, None
    where it can. unready: None if the kernels can take the tensors (kernel_views), else why
    not."""
    from ..ops.attention_gpu import triton_interpreting
    device = params[0].device.type
    native = backends.native_module()
    no_triton = None if _triton_optim() is not None else backends.triton_unavailable("optim")
    return {
        "cpu": (f"the parameters are {device} tensors" if device != "cpu" else
                "the compiled extension is not available" if native is None else unready),
        "triton": (no_triton if no_triton else
                   "CPU tensors (Triton serves CUDA tensors, and CPU ones only when forced "
                   "under TRITON_INTERPRET=1)" if device != "cuda" and not triton_interpreting()
                   else unready),
        "cuda": (f"the parameters are {device} tensors" if device != "cuda" else
                 "stochastic rounding is not in the CUDA kernels" if stochastic_rounding else
                 "the extension was built without CUDA" if not hasattr(native, "adam_step_cuda")
                 else unready),
    }


def choose_path(params: List[torch.Tensor], ready: bool, stochastic_rounding: bool) -> str:
    """"cpu" (the C++ kernel), "triton" (CUDA tensors, or any under TRITON_INTERPRET=1 when
    forced), "cuda" or "reference" (PyTorch ops), by backends.py's rules; a forced path that
    cannot serve raises BackendError. ready: whether the kernels can take the tensors
    (kernel_views)."""
    forced = backends.forced_backend()
    if forced == "reference":
        return "reference"
    refusals = path_refusals(params, None if ready else "the kernels cannot take the tensors",
                             stochastic_rounding)
    if forced in refusals:
        if refusals[forced] is None:
            return forced
        device = params[0].device.type
        raise backends.BackendError(
            f"optimizer step: forced backend {forced!r} cannot serve these tensors ({device}, "
            f"{params[0].dtype}{', stochastic rounding' if stochastic_rounding else ''}): "
            f"{refusals[forced]}")
    if refusals["cpu"] is None:
        return "cpu"
    # CUDA tensors: Triton first; the CUDA kernels (the same update) serve only when forced or
    # when Triton is missing (H100, 10M parameters: 0.46x torch fused against Triton's 0.89x).
    if refusals["triton"] is None and params[0].device.type == "cuda":
        return "triton"
    if refusals["cuda"] is None:
        return "cuda"
    return "reference"


def on_cuda(device: torch.device, kernel, *args, after=()) -> None:
    """kernel(*args, stream, *after) on device's current CUDA stream (the extension's CUDA
    steps)."""
    with device_guard(device):
        kernel(*args, stream_handle(device), *after)


def triton_optim():
    return _triton_optim()


def flat(t: Optional[torch.Tensor]):
    """A contiguous tensor's 1-D view for the extension, without making a torch view (a
    step builds one per tensor and state: thousands per call)."""
    if t is None:
        return None
    return (t.data_ptr(), DTYPE_CODES[t.dtype], (t.numel(),), (1,))


_DTENSOR_TYPE = None


def _dtensor_type():
    global _DTENSOR_TYPE
    if _DTENSOR_TYPE is None:
        try:
            from torch.distributed.tensor import DTensor
            _DTENSOR_TYPE = DTensor
        except Exception:  # torch.distributed not built in
            _DTENSOR_TYPE = ()
    return _DTENSOR_TYPE


def has_dtensor(tensors) -> bool:
    """Whether any of the tensors is a DTensor (FSDP2's fully_shard parameters)."""
    kind = _dtensor_type()
    return bool(kind) and any(isinstance(t, kind) for t in tensors)


def local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A DTensor's shard on this rank, a view of its storage (an update in place lands in the
    DTensor); any other tensor, or None, as it is. The steps update each rank's shards of
    parameters, gradients and state alike, as torch's optimizers do under FSDP2."""
    kind = _dtensor_type()
    return t.to_local() if kind and isinstance(t, kind) else t


def placed_grads(params, grads) -> list:
    """The gradients placed as their parameters: a DTensor gradient with other placements
    (tensor parallelism leaves Partial sums; a Replicate parameter can get a Shard gradient)
    is redistributed first, as torch's optimizers' DTensor arithmetic does, so that each rank
    steps its shard with the reduced gradient (stepping the unreduced local part let replicas
    drift apart). A collective where it happens: every rank steps the same tensors."""
    kind = _dtensor_type()
    return [g.redistribute(p.device_mesh, p.placements)
            if isinstance(g, kind) and isinstance(p, kind) and g.placements != p.placements
            else g for p, g in zip(params, grads)]


def locals_of(params, grads, *states):
    """The step's lists on this rank: the gradients placed as their parameters (placed_grads),
    then local() of every tensor; the lists as they are when no parameter is a DTensor."""
    if not has_dtensor(params):
        return (params, grads) + states
    grads = placed_grads(params, grads)
    return tuple([local(t) for t in ts] for ts in (params, grads) + states)


def saved_params(optimizer, loaded: dict) -> dict:
    """A loaded optimizer state_dict's keys mapped to this optimizer's parameters by position,
    as torch's load_state_dict maps them (ints from state_dict(), parameter names from
    torch.distributed.checkpoint). Keys past the optimizer's parameters are left out: torch's
    own checks (group sizes) raise for those next."""
    saved = [key for g in loaded["param_groups"] for key in g["params"]]
    return dict(zip(saved, (p for g in optimizer.param_groups for p in g["params"])))


def step_buffer(optimizer, group, states, device: torch.device, numpy: bool = False):
    """(buf, counts): the states' "step" entries as views of one float32 tensor buf on device,
    and with numpy (a CPU buf) counts, buf's numpy view, else None.

    torch.optim keeps one float32 0-d step tensor per parameter (its state_dict layout, kept
    here; on the parameters' device for capturable steps); incrementing them costs ~2 us each
    even with torch._foreach_add_ (0.3 ms a step for 156 parameters). So a group's steps are
    kept as views of one tensor, cached on the optimizer, and a step is one add. Steps that
    are not those views (new states, a load_state_dict, another subset of parameters with
    gradients, another device) are first moved into a new shared tensor, values kept, without
    reading them on the host."""
    cache = optimizer.__dict__.setdefault("_llmk_step_views", {})
    buf, views, counts = cache.get(id(group), (None, (), None))
    try:
        current = list(map(_step_of, states))
    except KeyError:
        current = None
    if (current is None or buf is None or buf.device != device or len(views) != len(states)
            or not all(map(operator.is_, current, views))):
        buf = torch.stack([torch.as_tensor(s["step"], dtype=torch.float32).reshape(()).to(device)
                           for s in states]) if states else torch.zeros(0, device=device)
        views = buf.unbind()
        for s, v in zip(states, views):
            s["step"] = v
        counts = None
    if numpy and counts is None:
        # The host path's add goes through numpy's view of the same memory: a torch op right
        # after a step that streamed the model through the caches took ~80 us (cold
        # dispatcher), numpy's ~5.
        counts = buf.numpy()
    cache[id(group)] = (buf, views, counts)
    return buf, counts


_CPU = torch.device("cpu")


@contextlib.contextmanager
def counted_step(optimizer, group, states) -> Iterator[List[float]]:
    """Adds 1 to the "step" of each state (kept on the CPU: step_buffer) and yields the new
    values for the block's update; if the block raises, the counts go back (the paths check
    before they write: a failed step must not move every later bias correction)."""
    counts = step_buffer(optimizer, group, states, _CPU, numpy=True)[1]
    counts += 1
    try:
        yield counts.tolist()
    except BaseException:
        step_buffer(optimizer, group, states, _CPU, numpy=True)[1][:] -= 1
        raise


def bias_corrections(step_values: List[float], lr: float, beta1: float, beta2: float):
    """Per tensor (lr / (1 - beta1^step), sqrt(1 - beta2^step)), computed once per distinct
    step (a group's tensors usually share theirs)."""
    if step_values and step_values.count(step_values[0]) == len(step_values):  # the usual case
        step = step_values[0]
        return [(lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step))] * len(step_values)
    memo = {}
    out = []
    for step in step_values:
        c = memo.get(step)
        if c is None:
            c = memo[step] = (lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step))
        out.append(c)
    return out


def amp_scale(grad_scale, found_inf) -> Optional[float]:
    """GradScaler support: None if this step must be skipped (found_inf), else 1 / scale."""
    if found_inf is not None and float(found_inf) != 0.0:
        return None
    return 1.0 if grad_scale is None else 1.0 / float(grad_scale)


# ---------------------------------------------------------------- stochastic rounding

_MASK = MASK32


def sr_key(seed: int, step: int, index: int) -> int:
    """The 32-bit key of one tensor's random stream at one step (see sr_bits in
    csrc/cpu/optim_impl.h)."""
    return fmix32(fmix32(seed * 0x9E3779B1 + index) ^ fmix32(step * 0x85EBCA77 + 0x632BE5AB))


SR_INDEX_MULTIPLIER = 0x9E3779B1  # an element's index enters its random bits times this


def shard_offset(t) -> int:
    """Where a DTensor's local shard starts in the whole tensor, as a row-major flat index (0
    for any other tensor, or where torch lacks the helper that finds it)."""
    kind = _dtensor_type()
    if not (kind and isinstance(t, kind)):
        return 0
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:
        return 0
    _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    flat, stride = 0, 1
    for size, off in reversed(list(zip(t.shape, offsets))):
        flat += int(off) * stride
        stride *= int(size)
    return flat


def sr_keys(seed: int, steps, params) -> list:
    """Each tensor's sr_key, with a DTensor shard's offset in its whole tensor folded in: its
    element i then draws the bits of element offset + i of the unsharded tensor (the bits
    are linear in the index before hashing), so FSDP2's Shard(0) shards (runs of whole rows)
    round bit for bit as one process does, and no two shards share a stream (they did: every
    rank drew from index 0). A shard that is not one run of the whole tensor (Shard(1)) gets
    a stream of its own, though not the unsharded one's."""
    keys = [sr_key(seed, int(step), index) for index, step in enumerate(steps)]
    if has_dtensor(params):
        keys = [(key + shard_offset(p) * SR_INDEX_MULTIPLIER) & _MASK
                for key, p in zip(keys, params)]
    return keys


def sr_round_bf16(x: torch.Tensor, key: int) -> torch.Tensor:
    """float32 -> bfloat16 with stochastic rounding, bit for bit as the fused kernel: 16 bits
    of murmur3(index * 0x9E3779B1 + key) added below the kept bits, then truncated."""
    flat = x.reshape(-1).float()
    h = fmix32(torch.arange(flat.numel(), dtype=torch.int64, device=x.device)
               * SR_INDEX_MULTIPLIER + key)
    u = flat.view(torch.int32).to(torch.int64) & _MASK
    noisy = (u + (h & 0xFFFF)) & _MASK
    quiet = u | 0x400000
    out = torch.where((u & 0x7FFFFFFF) > 0x7F800000, quiet, noisy) >> 16
    out = torch.where(out >= 0x8000, out - 0x10000, out).to(torch.int16)
    return out.view(torch.bfloat16).reshape(x.shape)


def check_stochastic_rounding(groups, owner: str) -> None:
    for group in groups:
        if group.get("stochastic_rounding"):
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise ValueError(f"{owner}: stochastic_rounding needs bfloat16 parameters, "
                                     f"got {p.dtype}")


class FusedOptimizer(torch.optim.Optimizer):
    """The torch.optim.Optimizer behaviour the fused optimizers share."""
    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf to step()
    _llmk_fused = True  # clip_grad_norm_(..., optimizer=) may fold its factor into step()

    def add_param_group(self, param_group) -> None:
        """torch's, with the constructor's checks on the new group's parameters (a group
        added later is refused as one given at construction would be, and not kept)."""
        super().add_param_group(param_group)
        owner = type(self).__name__
        try:
            check_params(self.param_groups[-1]["params"], owner)
            check_stochastic_rounding(self.param_groups[-1:], owner)
        except Exception:
            self.param_groups.pop()
            raise

    def zero_grad(self, set_to_none: bool = True) -> None:
        # A clipping factor left by clip_grad_norm_(..., optimizer=) was for these gradients
        # (a step skipped after a non-finite norm must not pass it to the next one).
        drop_pending_multiplier(self)
        super().zero_grad(set_to_none)


# ---------------------------------------------------------------- what every step() does

def check_adam_hyperparameters(name: str, lr, betas, eps, weight_decay) -> None:
    """torch.optim.Adam's argument checks, with its messages."""
    if as_float(lr, "lr", name) < 0.0:
        raise ValueError(f"{name}: invalid learning rate {lr} (must be >= 0)")
    if as_float(eps, "eps", name) < 0.0:
        raise ValueError(f"{name}: invalid eps {eps} (must be >= 0)")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name}: betas must be a pair, got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= as_float(b, f"betas[{i}]", name) < 1.0:
            raise ValueError(f"{name}: invalid beta parameter at index {i}: {b} "
                             "(must be in [0, 1))")
    if as_float(weight_decay, "weight_decay", name) < 0.0:
        raise ValueError(f"{name}: invalid weight_decay {weight_decay} (must be >= 0)")


def refuse_capture(owner: str, params, hint: str) -> None:
    """A step that reads values on the host cannot be captured in a CUDA graph: this error
    instead of CUDA's, before any such read."""
    if params and params[0].is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{owner}: this step reads values on the host, which a CUDA graph "
                           f"capture does not allow; {hint}")


class Amp:
    """A step's gradient multiplier inputs: GradScaler's scale and inf flag (tensors or None)
    and the factor clip_grad_norm_(..., optimizer=) left (a float, or a tensor when the
    optimizer is capturable). host(): the multiplier as a float, None if the step is skipped
    (reads the tensors: a device sync). device(device): (multiplier, found_inf) as tensors
    on device where they were tensors (no sync)."""

    def __init__(self, grad_scale, found_inf, clip):
        self.grad_scale, self.found_inf, self.clip = grad_scale, found_inf, clip
        self._host = False  # not computed yet

    def host(self) -> Optional[float]:
        if self._host is False:
            inv = amp_scale(self.grad_scale, self.found_inf)
            self._host = None if inv is None else inv * float(self.clip)
        return self._host

    def device(self, device: torch.device) -> Tuple[Scalar, Optional[torch.Tensor]]:
        inv: Scalar = 1.0
        if self.grad_scale is not None:
            inv = torch.reciprocal(scalar_on(self.grad_scale, device).double())
        if isinstance(self.clip, torch.Tensor):
            inv = scalar_on(self.clip, device).double() * inv
        elif self.clip != 1.0:
            inv = inv * float(self.clip)
        found = None if self.found_inf is None else scalar_on(self.found_inf, device).float()
        return inv, found


def scalar_on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A one-element tensor as a 0-d tensor on device (no host read)."""
    return t.reshape(()).to(device=device, non_blocking=True)


def begin_step(opt, closure, grad_scale, found_inf) -> Tuple[object, Amp]:
    """(loss, Amp) for a step. Runs the closure; takes GradScaler's scale and inf flag (given,
    or set as attributes around step() for optimizers that declare
    _step_supports_amp_scaling, as torch's fused ones do) and the factor
    clip_grad_norm_(..., optimizer=opt) left for this step, without reading them."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    if grad_scale is None:
        grad_scale = getattr(opt, "grad_scale", None)
    if found_inf is None:
        found_inf = getattr(opt, "found_inf", None)
    return loss, Amp(grad_scale, found_inf, take_pending_multiplier(opt))
