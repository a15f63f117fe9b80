"""What the extension's CUDA kernels need from torch at every launch: the handle of the current
stream of the tensors' device, and that device made current.

Eager decoding calls a kernel per layer, so these are on its critical path: a
`torch.cuda.device` context and a `torch.cuda.Stream` object are built and dropped in each
call otherwise. The guard is a no-op when the device is already current (the usual case); the
handle comes from torch's raw-stream query where this torch has it (what Triton's launcher and
torch.compile's generated code use), else from the Stream object.
"""
from __future__ import annotations

import contextlib

import torch

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_NO_GUARD = contextlib.nullcontext()


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def stream_handle(device: torch.device) -> int:
    """The cudaStream_t (as an int) that work on device must be queued on now; 0 off CUDA."""
    if device.type != "cuda":
        return 0
    if _raw_stream is not None:
        return int(_raw_stream(_index(device)))
    return torch.cuda.current_stream(device).cuda_stream


def device_guard(device: torch.device):
    """A context in which device is the current CUDA device (the extension launches there)."""
    if device.type != "cuda" or _index(device) == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)
