"""Capturable steps (capturable=True): the numbers that change from one step to the next (step
counts, bias corrections, a tensor learning rate, GradScaler's scale and inf flag, a pending
clipping factor) stay tensors on the parameters' device and the kernels read them there, so a
step reads nothing back to the host and can be captured in a CUDA graph.

Per param group, the steps are views of one float32 tensor on the device (one add advances
them all); each step computes, with a few tensor ops on that tensor, the float table the
Triton and CUDA kernels read per tensor (kernels/optim.py: Adam's ADAM_FLOATS columns,
AdamW8bit's ADAM8_FLOATS; csrc/cuda/optim.h, the same), in float64 before rounding to float32,
as the host path computes them in Python floats. A step skipped for inf/NaN gradients
(found_inf) writes nothing and takes its step count back, as torch's fused optimizers do.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from . import _fused
from .._hash import fmix32
from ._fused import Scalar

_MASK = 0xFFFFFFFF


def may_take_device_path(params) -> bool:
    """False when the host path surely serves a capturable group (read before any per-tensor
    work): CPU tensors, unless Triton is forced on them (its interpreter, in tests)."""
    return params[0].device.type != "cpu" or backends.forced_backend() == "triton"


def device_path(params, rows, sr: bool, f32_state: bool = False) -> Optional[str]:
    """The path of a capturable group's step if it takes device-resident scalars ("triton",
    "cuda", or "reference" for tensors off the CPU); None when the host floats' path serves
    it: the C++ kernel and the reference on the CPU (where reading a tensor is no device
    sync), FSDP2's DTensor shards and groups spread over several devices (not supported
    here: their steps read the host)."""
    if _fused.has_dtensor(params) or len({p.device for p in params}) > 1:
        return None
    views = _fused.kernel_views(rows, f32_state, build=False)
    path = _fused.choose_path(params, views is not None, sr)
    if path in ("triton", "cuda") or (path == "reference" and params[0].device.type != "cpu"):
        return path
    return None


def advance(optimizer, group, states, device: torch.device) -> torch.Tensor:
    """Adds 1 to every state's "step", kept on device (torch's capturable layout), and returns
    the steps as one float32 tensor there (_fused.step_buffer)."""
    steps = _fused.step_buffer(optimizer, group, states, device)[0]
    steps.add_(1.0)
    return steps


def finish(steps: torch.Tensor, found: Optional[torch.Tensor]) -> None:
    """A skipped step (found_inf) takes its step count back."""
    if found is not None:
        steps.sub_(found)


def corrections(steps: torch.Tensor, group, beta1: float, beta2: float):
    """(lr, step_size, bc2) on the steps' device in float64: the group's learning rate,
    lr / (1 - beta1^step) and sqrt(1 - beta2^step) per tensor (the tables' inputs)."""
    lr = _lr_on(group, steps.device)
    s = steps.double()
    lr = lr.double() if isinstance(lr, torch.Tensor) else lr
    step_size = lr / (1.0 - torch.pow(beta1, s))
    bc2 = torch.sqrt(1.0 - torch.pow(beta2, s))
    return lr, step_size, bc2


def _lr_on(group, device: torch.device) -> Scalar:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a scalar, got shape {tuple(lr.shape)}")
        return _fused.scalar_on(lr, device)
    return float(lr)


def adam_table(steps: torch.Tensor, corr, *, weight_decay: float, inv: Scalar,
               found: Optional[torch.Tensor], seed: Optional[int]) -> torch.Tensor:
    """float32 [n, ADAM_FLOATS] on the steps' device: per tensor step_size, bias correction 2's
    square root, the stochastic rounding key's bits (seed given), decay = 1 - lr * wd, the
    gradients' multiplier, skip. corr: corrections(steps, ...)."""
    lr, step_size, bc2 = corr
    table = torch.zeros(steps.numel(), 6, dtype=torch.float32, device=steps.device)
    table[:, 0] = step_size
    table[:, 1] = bc2
    if seed is not None:
        table.view(torch.int32)[:, 2] = _sr_key_bits(seed, steps)
    table[:, 3] = 1.0 - lr * weight_decay
    table[:, 4] = inv
    if found is not None:
        table[:, 5] = found
    return table


def adam8bit_table(steps: torch.Tensor, corr, *, weight_decay: float, inv: Scalar,
                   found: Optional[torch.Tensor], maximize: bool) -> torch.Tensor:
    """float32 [n, ADAM8_FLOATS]: step_size, bias correction 2's square root, decay, the
    gradients' multiplier with maximize's sign, skip. corr: corrections(steps, ...)."""
    lr, step_size, bc2 = corr
    table = torch.zeros(steps.numel(), 5, dtype=torch.float32, device=steps.device)
    table[:, 0] = step_size
    table[:, 1] = bc2
    table[:, 2] = 1.0 - lr * weight_decay
    table[:, 3] = -inv if maximize else inv
    if found is not None:
        table[:, 4] = found
    return table


def _sr_key_bits(seed: int, steps: torch.Tensor) -> torch.Tensor:
    """_fused.sr_key(seed, step, index) of each tensor (index: its position in the group's
    parameters with gradients), as int32 bit patterns, computed on the device."""
    index = torch.arange(steps.numel(), dtype=torch.int64, device=steps.device)
    first = fmix32((index + ((seed * 0x9E3779B1) & _MASK)) & _MASK)
    second = fmix32((steps.to(torch.int64) * 0x85EBCA77 + 0x632BE5AB) & _MASK)
    key = fmix32(first ^ second)
    return torch.where(key >= 1 << 31, key - (1 << 32), key).to(torch.int32)
