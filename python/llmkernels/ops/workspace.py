"""Scratch memory for the CPU kernels, shared by every op: one buffer per calling thread."""
from __future__ import annotations

import threading

import torch

# Workspaces up to this size are kept per thread and reused: a fresh allocation of a few MiB
# costs page faults on every call, as much as the whole kernel when decoding one token (an
# attention step, a GEMV). Larger ones come and go with their call, whose work dwarfs them.
KEPT_BYTES = 16 << 20
_local = threading.local()


def empty_cache() -> None:
    """Free the calling thread's reusable kernel workspace (at most 16 MiB)."""
    _local.workspace = None


def workspace(nbytes: int) -> torch.Tensor:
    """A CPU uint8 tensor of at least nbytes, for one kernel call on this thread."""
    if nbytes > KEPT_BYTES:
        return torch.empty(nbytes, dtype=torch.uint8)
    ws = getattr(_local, "workspace", None)
    if ws is None or ws.numel() < nbytes:
        ws = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8)
        _local.workspace = ws
    return ws
