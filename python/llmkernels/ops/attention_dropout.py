"""The fused CPU attention kernel's dropout pattern, in torch (csrc/cpu/attention_dropout.h).

The kernel keeps weight P[row, key] when a hash of (seed, row, key) clears a threshold, so
its backward regenerates the forward's pattern without storing it. keep_mask gives the same
bits: tests check the kernel against it, and it shows which weights a call dropped.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic, cut to 32 bits after each product (as uint32 wraps in C++)
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def threshold(p: float) -> int:
    """Weights whose 24-bit hash is below this are dropped: p of them, to 2^-25."""
    return int(round(p * 16777216.0))


def draw_seed(generator=None) -> torch.Tensor:
    """A kernel seed (int64 scalar) from torch's generator: torch.manual_seed repeats it."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, generator=generator)


def keep_mask(seed: int, shape, p: float) -> torch.Tensor:
    """Bool (B, H, L, S): the weights a kernel call over (B, H, L, S) scores kept."""
    B, H, L, S = shape
    seed = int(seed) & ((1 << 64) - 1)
    rows = torch.arange(B * H * L, dtype=torch.int64)
    h = _mix32((rows & _M32) ^ (seed & _M32))
    key = _mix32(h ^ (rows >> 32) ^ (seed >> 32))
    keys = torch.arange(S, dtype=torch.int64)
    x = (key[:, None] + keys[None, :] * _GOLDEN) & _M32
    return ((_mix32(x) >> 8) >= threshold(p)).reshape(B, H, L, S)
