"""murmur3's 32-bit finalizer (csrc/common/hash32.h) on Python ints or int64 tensors: the
random streams of stochastic rounding and attention dropout, computed as the kernels do."""
from __future__ import annotations

MASK32 = 0xFFFFFFFF


def fmix32(h):
    """fmix32 of h's low 32 bits (an int, or an int64 tensor: its products wrap, and their
    low 32 bits are still right)."""
    h = h & MASK32
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)
