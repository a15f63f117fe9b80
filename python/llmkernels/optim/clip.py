"""clip_grad_norm_: torch.nn.utils.clip_grad_norm_'s result, with the scaling optionally folded
into the next step of an llmkernels optimizer (saving a read and a write of every gradient)."""
from __future__ import annotations

from functools import partial
from itertools import chain
from operator import attrgetter, is_not
from typing import Iterable, Optional, Union

import torch

_PENDING = "_llmk_pending_grad_multiplier"
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
    unclipped); the optimizer's zero_grad() drops the factor with them (a step skipped after
    a non-finite norm). The factor applies to every gradient the optimizer steps, so it is
    folded only when `parameters` are those (the ones with gradients); otherwise, inside
    torch.compile, and without optimizer, the gradients are scaled in place, as torch does. A second call before the
    step measures the gradients as the first call's factor left them. foreach: as torch's
    (its implementation of the norm and the scaling).
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
    if not grads:
        return torch.tensor(0.0)
    if optimizer is not None and not _steps_exactly(optimizer, grads):
        optimizer = None  # its factor would reach other gradients: these are scaled now
    if optimizer is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite,
                                              foreach)
    total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, foreach) \
        if hasattr(torch.nn.utils, "get_total_norm") else _total_norm(grads, norm_type,
                                                                       error_if_nonfinite)
    pending = getattr(optimizer, _PENDING, 1.0)
    if isinstance(pending, torch.Tensor) or pending != 1.0:
        total = total * pending  # the norm of the gradients as the pending factor leaves them
    # torch's factor: max_norm / (total + 1e-6), clamped to at most 1.
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if any(group.get("capturable", False) for group in optimizer.param_groups):
        setattr(optimizer, _PENDING, coef * pending)  # kept on the device: no host read
    else:
        setattr(optimizer, _PENDING, float(coef) * pending)
    return total


def _total_norm(grads, norm_type, error_if_nonfinite):
    norms = [torch.linalg.vector_norm(g, norm_type) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients is non-finite")
    return total


def _steps_exactly(optimizer, grads) -> bool:
    """Whether grads (of the clipped parameters that have one) are those of the parameters
    optimizer steps. C-level loops: this runs every step over every parameter."""
    theirs = map(_grad_of, chain.from_iterable(g["params"] for g in optimizer.param_groups))
    return set(map(id, grads)) == set(map(id, filter(partial(is_not, None), theirs)))


def drop_pending_multiplier(optimizer) -> None:
    setattr(optimizer, _PENDING, 1.0)


def take_pending_multiplier(optimizer):
    """The clipping factor clip_grad_norm_(..., optimizer=) left for this step (1 if none; a
    0-d tensor for capturable optimizers)."""
    m = getattr(optimizer, _PENDING, 1.0)
    if isinstance(m, torch.Tensor) or m != 1.0:
        setattr(optimizer, _PENDING, 1.0)
    return m
