"""The fused CPU attention kernel's dropout pattern, in torch (csrc/cpu/attention_dropout.h).

The kernel keeps weight P[row, key] when a hash of (seed, row, key) clears a threshold, so
its backward regenerates the forward's pattern without storing it. keep_mask gives the same
bits: tests check the kernel against it, and it shows which weights a call dropped.
"""
from __future__ import annotations

import math

import torch

from .._hash import MASK32, fmix32

_GOLDEN = 0x9E3779B1  # the key counter's multiplier (as stochastic rounding's index one)


def threshold(p: float) -> int:
    """Weights whose 24-bit hash is below this are dropped: p of them, to 2^-25 (halves
    rounded up, as the kernel's llround)."""
    return math.floor(p * 16777216.0 + 0.5)


def draw_seed(generator=None) -> torch.Tensor:
    """A kernel seed (int64 scalar) from torch's generator: torch.manual_seed repeats it."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, generator=generator)


def keep_mask(seed: int, shape, p: float) -> torch.Tensor:
    """Bool (B, H, L, S): the weights a kernel call over (B, H, L, S) scores kept."""
    B, H, L, S = shape
    seed = int(seed) & ((1 << 64) - 1)
    rows = torch.arange(B * H * L, dtype=torch.int64)
    h = fmix32((rows & MASK32) ^ (seed & MASK32))
    key = fmix32(h ^ (rows >> 32) ^ (seed >> 32))
    keys = torch.arange(S, dtype=torch.int64)
    return ((fmix32(key[:, None] + keys[None, :] * _GOLDEN) >> 8) >= threshold(p)).reshape(
        B, H, L, S)
