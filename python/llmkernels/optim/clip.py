"""clip_grad_norm_: torch.nn.utils.clip_grad_norm_'s result, with the scaling optionally folded
into the next step of an llmkernels optimizer (saving a read and a write of every gradient)."""
from __future__ import annotations

from functools import partial
from itertools import chain
from operator import attrgetter, is_not
from typing import Iterable, Optional, Union
import warnings
import weakref

import torch

_PENDING = "_llmk_pending_grad_multiplier"
_PENDING_FOR = "_llmk_pending_grads"  # the gradients the factor was measured on
_grad_of = attrgetter("grad")


def clip_grad_norm_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: Optional[bool] = None, *,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> torch.Tensor:
    """Clip the gradients' global norm to max_norm; returns the total norm (before clipping),
    computed as torch.nn.utils.clip_grad_norm_ computes it.

    optimizer: an llmkernels.optim optimizer whose next step() should apply the clipping
    factor inside its fused update instead of rescaling the gradients now. The gradients are
    then left as they are until that step (code that reads them in between sees them
    unclipped). The factor is dropped with them by the optimizer's zero_grad() (a step skipped
    after a non-finite norm), and by any change to them: gradients replaced or set to None
    (model.zero_grad()), or changed in place (zeroed; accumulated into: those are then stepped
    as they are, with a warning, where torch's function would have scaled the part it
    measured). It applies to every gradient the optimizer steps, so it is folded only when
    `parameters` are those (the ones with gradients), none is a view (DDP's bucket views share
    one change counter) and no step pre-hook would see them before the step; otherwise,
    inside torch.compile, and without optimizer, the gradients are scaled in place, as torch
    does. A second call before the step measures the gradients as the first call's factor
    left them. foreach: as torch's (its implementation of the norm and the scaling).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = list(parameters)
    max_norm, norm_type = float(max_norm), float(norm_type)
    if max_norm < 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be >= 0, got {max_norm}")
    grads = [p.grad for p in params if p.grad is not None]
    if optimizer is not None and not hasattr(type(optimizer), "_llmk_fused"):
        raise TypeError("clip_grad_norm_: optimizer must be an llmkernels.optim optimizer "
                        f"(got {type(optimizer).__name__}); call it without optimizer= instead")
    if optimizer is not None and torch.compiler.is_compiling():
        # a compiled region drops attribute writes on optimizers (the factor would be lost,
        # the step unclipped): the gradients are scaled now, inside the graph
        optimizer = None
    if optimizer is not None and _has_step_pre_hooks(optimizer):
        optimizer = None  # a pre-hook must see (and add to) the gradients clipped, as torch's
    if not grads:
        return torch.tensor(0.0)
    measured = None if optimizer is None else {
        id(g): (weakref.ref(g), _versions(g)) for g in grads}
    if optimizer is not None and measured.keys() != _gradient_ids(optimizer):
        optimizer = None  # its factor would reach other gradients: these are scaled now
    if optimizer is not None and any(map(torch.Tensor._is_view, grads)):
        # views of one buffer (DDP's gradient_as_bucket_view) share a version counter: a
        # change to any of them would read as a change to these, and drop the factor
        optimizer = None
    if optimizer is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite,
                                              foreach)
    total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, foreach) \
        if hasattr(torch.nn.utils, "get_total_norm") else _total_norm(grads, norm_type,
                                                                       error_if_nonfinite)
    pending = take_pending_multiplier(optimizer, warn=False)  # 1 unless for these gradients
    if isinstance(pending, torch.Tensor) or pending != 1.0:
        total = total * pending  # the norm of the gradients as the pending factor leaves them
    # torch's factor: max_norm / (total + 1e-6), clamped to at most 1.
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if any(group.get("capturable", False) for group in optimizer.param_groups):
        setattr(optimizer, _PENDING, coef * pending)  # kept on the device: no host read
    else:
        setattr(optimizer, _PENDING, float(coef) * pending)
    setattr(optimizer, _PENDING_FOR, measured)
    return total


def _total_norm(grads, norm_type, error_if_nonfinite):
    norms = [torch.linalg.vector_norm(g, norm_type) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients is non-finite")
    return total


def _gradient_ids(optimizer) -> set:
    """The ids of the gradients optimizer steps (compared with the clipped ones). C-level
    loops: this runs every step over every parameter."""
    theirs = map(_grad_of, chain.from_iterable(g["params"] for g in optimizer.param_groups))
    return set(map(id, filter(partial(is_not, None), theirs)))


def _has_step_pre_hooks(optimizer) -> bool:
    from torch.optim.optimizer import _global_optimizer_pre_hooks
    return bool(getattr(optimizer, "_optimizer_step_pre_hooks", None)
                or _global_optimizer_pre_hooks)


def drop_pending_multiplier(optimizer) -> None:
    setattr(optimizer, _PENDING, 1.0)
    setattr(optimizer, _PENDING_FOR, None)


def _versions(grad: torch.Tensor) -> tuple:
    """Its in-place change counters: a DTensor's own and its local shard's (FSDP2 accumulates
    into the shard, which leaves the DTensor's as it was)."""
    return grad._version, getattr(grad, "_local_tensor", grad)._version


def _still_measured(optimizer) -> bool:
    """Whether the optimizer's gradients are the ones the pending factor was measured on: the
    same tensors (not replaced or set to None, as model.zero_grad() does), unchanged in place
    (not zeroed, not accumulated into)."""
    measured = getattr(optimizer, _PENDING_FOR, None)
    if measured is None:
        return False
    now = {id(p.grad): p.grad for g in optimizer.param_groups for p in g["params"]
           if p.grad is not None}  # (a parameter listed twice has one gradient)
    return now.keys() == measured.keys() and all(
        measured[key][0]() is grad and measured[key][1] == _versions(grad)
        for key, grad in now.items())


def take_pending_multiplier(optimizer, warn: bool = True):
    """The clipping factor clip_grad_norm_(..., optimizer=) left for this step (1 if none; a
    0-d tensor for capturable optimizers). A factor measured on other gradients than those
    now there is dropped: it is not theirs. Between two clip calls that is a skipped batch
    whose gradients were cleared without optimizer.zero_grad(); at a step (warn) it means the
    gradients changed after the clip call, and the step goes unclipped: a warning says so."""
    m = getattr(optimizer, _PENDING, 1.0)
    if isinstance(m, torch.Tensor) or m != 1.0:
        fresh = _still_measured(optimizer)
        drop_pending_multiplier(optimizer)
        if not fresh and warn:
            warnings.warn("clip_grad_norm_(..., optimizer=): the gradients changed after the "
                          "call (replaced, or modified in place), so its clipping factor is "
                          "not theirs and this step is not clipped; clip after the last "
                          "change, or without optimizer=", stacklevel=3)
        return m if fresh else 1.0
    return m
