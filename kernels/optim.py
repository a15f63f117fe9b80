"""Fused multi-tensor optimizer steps in Triton: Adam / AdamW, SGD and AdamW with 8-bit
block-wise moments (the math of optim_impl.h's adam8bit_loop, bit for bit).

The math is that of csrc/cpu/optim_impl.h (and so of llmkernels.optim.adam.adam_reference /
llmkernels.optim.sgd.sgd_reference, the specification): per element in float32, stored back in
the tensors' dtype (float32, bfloat16 or float16, round to nearest even). The operations that
the CPU kernel fuses are tl.fma here; every other multiply and add rounds on its own (the
kernels are compiled with enable_fp_fusion=False, so the compiler contracts nothing else), and
division and square root are the IEEE ones (tl.math.div_rn / sqrt_rn: '/' and tl.sqrt are
approximate when compiled). A GPU run therefore matches the CPU kernel bit for bit.

Launches (one per group, not one per tensor):
  - The tensors of a call are grouped by dtype (SGD: also by first step, and pointer
    alignment), up to MAX_TENSORS tensors per group; each group is one launch.
  - Each program updates one BLOCK of one tensor. A group's tables travel in one int64
    buffer copied to the device once per launch (no sync: the grid is computed on the host
    from the numels):
        cum    [P]          first global block of tensor t (P = next power of two >= n;
                            padding entries = INT64_MAX)
        numel  [n]
        ptrs   [n, K + 1]   data_ptr() of the tensors of parameter t (K = 2..6), then the
                            index of t's row in the float table
        floats [n, F] f32   read through a float32 view: Adam step_size, bias_correction2_sqrt,
                            the stochastic rounding key's bits, decay, the gradients'
                            multiplier and skip (F = 6); SGD with stochastic rounding the
                            key's bits (F = 1); AdamW8bit F = 5 (see its kernel)
    Capturable steps keep the int64 table on the device between launches and give each launch
    a float table computed on the device (Prepared's table_rows): nothing is copied from the
    host while the tensors stay the same, so the step can be captured in a CUDA graph.
    A program finds its tensor by a log2(P)-step binary search over cum (static loop).
  - Full blocks take an unmasked path (so loads and stores vectorize: the table pointers are
    declared 16-byte aligned when all of the group's are); the tail block of each tensor is
    masked.
  - Offsets are 64-bit.
  - adam_prepare / sgd_prepare / adam8bit_prepare build a call's tables once (Prepared);
    adam_launch / sgd_launch / adam8bit_launch run them, writing only the gradients' pointers
    and the per-tensor floats: llmkernels.optim's step plans keep a Prepared between steps
    (the *_step functions are prepare + launch).

Interpreter (TRITON_INTERPRET=1, how the tests run without a GPU): float32 -> bfloat16 casts
truncate there, so _cast rounds the bits (as in quant_matmul.py, NaNs kept quiet as
optim_impl.h does). triton 3.9's interpreter computes tl.fma with one rounding (3.6's rounds
twice: its results may differ by an ulp from the CPU kernel's).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

# device_guard: a device context only when another device is current (llmkernels.kernels is a
# subpackage of llmkernels)
from .._cuda_launch import device_guard

from .rounding import INTERPRET, cast as _cast

# Elements per program. The interpreter runs programs one by one in Python: smaller blocks
# there exercise multi-block tensors with small test sizes. On the GPU, 2048 with 8 warps
# (8 elements per thread and tensor): ptxas gives the sm_90 Adam kernel 64 registers, so
# 4 programs share an SM. 4096 took 168 registers, one program per SM with nothing to
# overlap its loads with: 45% of the copy rate on an H100 (2026-11-26), where SGD (102
# registers, 2 programs per SM) reached 100%.
BLOCK = 1024 if INTERPRET else 2048
NUM_WARPS = 8
MAX_TENSORS = 1024  # per launch (binary search depth <= 10)
ALIGN = 16  # bytes

# Floats per tensor in the Adam and 8-bit AdamW kernels' tables (see the kernels).
ADAM_FLOATS = tl.constexpr(6)
ADAM8_FLOATS = tl.constexpr(5)
_INT64_MAX = np.iinfo(np.int64).max


# ------------------------------------------------------------------------------ helpers

@triton.jit
def _sr_bf16(v, idx, key):
    """optim_impl.h's sr_bf16(v, sr_bits(idx, key)): v (float32) to bfloat16 with 16 random
    bits added below the kept ones (murmur3's finalizer of idx * golden ratio + key, uint32
    arithmetic), then truncated; NaN stays a quiet NaN."""
    h = idx.to(tl.uint32) * tl.full([], 0x9E3779B1, tl.uint32) + key
    h ^= h >> 16
    h *= tl.full([], 0x85EBCA6B, tl.uint32)
    h ^= h >> 13
    h *= tl.full([], 0xC2B2AE35, tl.uint32)
    h ^= h >> 16
    u = v.to(tl.uint32, bitcast=True)
    bits = tl.where((u & 0x7FFFFFFF) > 0x7F800000, u | 0x400000, u + (h & 0xFFFF))
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _st_param(ptr, offs, v, mask, key, MASKED: tl.constexpr, SR: tl.constexpr):
    """The parameter's store: rounded to nearest even, or stochastically (bfloat16, SR)."""
    if SR:
        if MASKED:
            tl.store(ptr + offs, _sr_bf16(v, offs, key), mask=mask)
        else:
            tl.store(ptr + offs, _sr_bf16(v, offs, key))
    else:
        _st(ptr, offs, v, mask, MASKED)


@triton.jit
def _find_tensor(CUM, blk, LOG_P: tl.constexpr):
    """The t with cum[t] <= blk < cum[t + 1] (cum padded to 2**LOG_P entries with INT64_MAX)."""
    t = blk * 0
    for i in tl.static_range(LOG_P):
        cand = t + (1 << (LOG_P - 1 - i))
        c = tl.load(CUM + cand)
        t = tl.where(c <= blk, cand, t)
    return t


@triton.jit
def _locate(META, n_tensors, LOG_P: tl.constexpr, K: tl.constexpr):
    """This program's tensor's row of K pointers in META, its numel, the index of its row of
    floats in FMETA (the column after the pointers), and the program's index among the
    tensor's programs."""
    blk = tl.program_id(0).to(tl.int64)
    t = _find_tensor(META, blk, LOG_P)
    numel = tl.load(META + (1 << LOG_P) + t)
    rows = META + (1 << LOG_P) + n_tensors + t * (K + 1)
    return rows, numel, tl.load(rows + K), blk - tl.load(META + t)


@triton.jit
def _ptr(PTRS, idx, ELEM: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(PTRS + idx).to(tl.pointer_type(ELEM))
    if ALIGNED:  # the hint goes on the pointer: it does not survive int_to_ptr from the int
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _ld(ptr, offs, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.load(ptr + offs).to(tl.float32)


@triton.jit
def _st(ptr, offs, v, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, _cast(v, ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + offs, _cast(v, ptr.dtype.element_ty))


# ------------------------------------------------------------------------------ Adam

@triton.jit
def _adam_block(P, G, M, V, VMAX, offs, mask, step_size, bc2, key, beta2, eps, wd, decay,
                one_m_b1, one_m_b2, inv_scale, sign,
                DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MASKED: tl.constexpr,
                SR: tl.constexpr):
    p = _ld(P, offs, mask, MASKED)
    g = _ld(G, offs, mask, MASKED) * inv_scale * sign
    if DECOUPLED:
        p = p * decay
    else:
        # grad.add(param, alpha=wd), only for wd != 0 as torch (p * 0: NaN for infinite p)
        g = tl.where(wd != 0.0, tl.fma(p, wd, g), g)
    m = _ld(M, offs, mask, MASKED)
    m = tl.fma(one_m_b1, g - m, m)  # torch's lerp
    v = _ld(V, offs, mask, MASKED) * beta2
    v = v + (one_m_b2 * g) * g  # addcmul
    vd = v
    if AMSGRAD:
        vmax = _ld(VMAX, offs, mask, MASKED)
        vd = tl.where(vmax < v, v, vmax)  # std::max(vmax, v)
        _st(VMAX, offs, vd, mask, MASKED)
    denom = tl.math.div_rn(tl.math.sqrt_rn(vd), bc2) + eps
    p = p + (-step_size) * tl.math.div_rn(m, denom)  # addcdiv
    _st_param(P, offs, p, mask, key, MASKED, SR)
    _st(M, offs, m, mask, MASKED)
    _st(V, offs, v, mask, MASKED)


@triton.jit
def _adam_kernel(META, FMETA, TYPED, STATE_TYPED, n_tensors,
                 beta2, eps, wd, one_m_b1, one_m_b2, sign,
                 LOG_P: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
                 ALIGNED: tl.constexpr, BLOCK: tl.constexpr, SR: tl.constexpr):
    """One BLOCK of one tensor. META: cum [2**LOG_P], numel [n], ptrs [n, 4 or 5] and the
    float row (int64); FMETA: float32 [n, ADAM_FLOATS] (step_size, bc2, the stochastic
    rounding key's bits, decay = 1 - lr * wd, the gradients' multiplier, skip: nonzero leaves
    the tensor as it is).
    TYPED / STATE_TYPED: any pointer of the group's parameter / moment dtype (type only; the
    moments may be float32 for 16-bit parameters). SR: bfloat16 parameters stochastically
    rounded."""
    ELEM: tl.constexpr = TYPED.dtype.element_ty
    SELEM: tl.constexpr = STATE_TYPED.dtype.element_ty
    rows, numel, frow, local = _locate(META, n_tensors, LOG_P, 5 if AMSGRAD else 4)
    P = _ptr(rows, 0, ELEM, ALIGNED)
    G = _ptr(rows, 1, ELEM, ALIGNED)
    M = _ptr(rows, 2, SELEM, ALIGNED)
    V = _ptr(rows, 3, SELEM, ALIGNED)
    VMAX = M
    if AMSGRAD:
        VMAX = _ptr(rows, 4, SELEM, ALIGNED)
    row = FMETA + ADAM_FLOATS * frow
    step_size = tl.load(row)
    bc2 = tl.load(row + 1)
    key = tl.load(row + 2).to(tl.uint32, bitcast=True)
    decay = tl.load(row + 3)
    inv_scale = tl.load(row + 4)
    start = local * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if tl.load(row + 5) == 0.0:
        if start + BLOCK <= numel:
            offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
            _adam_block(P, G, M, V, VMAX, offs, None, step_size, bc2, key, beta2, eps, wd,
                        decay, one_m_b1, one_m_b2, inv_scale, sign, DECOUPLED, AMSGRAD, False,
                        SR)
        else:
            _adam_block(P, G, M, V, VMAX, offs, offs < numel, step_size, bc2, key, beta2, eps,
                        wd, decay, one_m_b1, one_m_b2, inv_scale, sign, DECOUPLED, AMSGRAD,
                        True, SR)


# ------------------------------------------------------------------------------ SGD

@triton.jit
def _sgd_block(P, G, B, offs, mask, key, lr, wd, mom, damp, inv_scale, sign,
               MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
               MASKED: tl.constexpr, SR: tl.constexpr):
    p = _ld(P, offs, mask, MASKED)
    d = _ld(G, offs, mask, MASKED) * inv_scale * sign
    d = tl.where(wd != 0.0, tl.fma(p, wd, d), d)  # grad.add(param, alpha=wd) if wd != 0
    if MOMENTUM:
        if FIRST:
            b = d
        else:
            b = tl.fma(d, damp, _ld(B, offs, mask, MASKED) * mom)
        _st(B, offs, b, mask, MASKED)
        if NESTEROV:
            d = tl.fma(b, mom, d)
        else:
            d = b
    _st_param(P, offs, tl.fma(d, -lr, p), mask, key, MASKED, SR)  # param.add_(grad, alpha=-lr)


@triton.jit
def _sgd_kernel(META, FMETA, TYPED, n_tensors, lr, wd, mom, damp, inv_scale, sign,
                LOG_P: tl.constexpr, MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
                NESTEROV: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                SR: tl.constexpr):
    """One BLOCK of one tensor. META: cum [2**LOG_P], numel [n], ptrs [n, 2 or 3] and the
    float row (int64); FMETA (SR only): float32 [n, 1], the stochastic rounding key's bits."""
    ELEM: tl.constexpr = TYPED.dtype.element_ty
    rows, numel, frow, local = _locate(META, n_tensors, LOG_P, 3 if MOMENTUM else 2)
    P = _ptr(rows, 0, ELEM, ALIGNED)
    G = _ptr(rows, 1, ELEM, ALIGNED)
    B = P
    if MOMENTUM:
        B = _ptr(rows, 2, ELEM, ALIGNED)
    key = 0
    if SR:
        key = tl.load(FMETA + frow).to(tl.uint32, bitcast=True)
    start = local * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        _sgd_block(P, G, B, offs, None, key, lr, wd, mom, damp, inv_scale, sign,
                   MOMENTUM, FIRST, NESTEROV, False, SR)
    else:
        _sgd_block(P, G, B, offs, offs < numel, key, lr, wd, mom, damp, inv_scale, sign,
                   MOMENTUM, FIRST, NESTEROV, True, SR)


# ------------------------------------------------------------------------------ 8-bit AdamW

BLOCK8 = 256  # elements per 8-bit block (one scale each): csrc/cpu/optim.h's kBlock8
# 8-bit blocks per program, and warps: ptxas gives the sm_90 kernel 76 registers with 4 blocks
# and 8 warps (3 programs per SM), 180 with 8 blocks and 4 warps (1 program). Not yet timed.
ROWS8 = 2 if INTERPRET else 4
NUM_WARPS8 = 8


@triton.jit
def _rounded_sqrt_code(y):
    """optim_impl.h's rounded_sqrt_code: int(sqrt(y) + 1/2) of the correctly rounded square
    root, at most 255; 0 for NaN and infinity."""
    c = tl.minimum((tl.math.sqrt_rn(tl.where(y < 65536.0, y, 0.0)) + 0.5).to(tl.int32), 255)
    return tl.where((y >= 0.0) & (y < 65536.0), c, 0)


@triton.jit
def _sqrt_code(y, MAX_CODE: tl.constexpr):
    """optim_impl.h's sqrt_code: the integer nearest sqrt(y), halves up, exactly (floor of any
    estimate within 1/2, then one exact comparison with the squared half-way point); 0 for
    y < 1/4 and NaN."""
    f = tl.floor(tl.sqrt(tl.maximum(y, 0.0)))
    t = f + 0.5
    c = f.to(tl.int32) + tl.where(y >= t * t, 1, 0)
    return tl.where(y >= 0.25, tl.minimum(c, MAX_CODE), 0)


@triton.jit
def _adam8bit_rows(P, G, MQ, VQ, MS, VS, block, offs, mask, has_block, step_size, inv_bc2,
                   beta2, eps, decay, one_m_b1, one_m_b2, signed_inv_scale,
                   ELEM: tl.constexpr, MASKED: tl.constexpr):
    """_adam8bit_kernel's blocks [ROWS, 1] at offs [ROWS, BLOCK8]; MASKED: some lie past the
    tensor's end (mask, has_block), else every load and store is whole (vectorized)."""
    # m = c|c| * scale / 127^2, beta2 v = (u^2)^2 * (scale / 255^4 * beta2), as optim_impl.h
    # decodes them
    ms = _ld(MS, block, has_block, MASKED)
    vs = _ld(VS, block, has_block, MASKED)
    c = _ld(MQ, offs, mask, MASKED)
    u = _ld(VQ, offs, mask, MASKED)
    m_unit = ms * (1.0 / 16129.0)
    v_unit_b2 = ((vs * (1.0 / 65025.0)) * (1.0 / 65025.0)) * beta2
    m = (c * tl.abs(c)) * m_unit
    v = ((u * u) * (u * u)) * v_unit_b2
    p = _ld(P, offs, mask, MASKED) * decay
    g = _ld(G, offs, mask, MASKED) * signed_inv_scale
    m = tl.fma(one_m_b1, g - m, m)
    v = v + (one_m_b2 * g) * g
    root_v = tl.math.sqrt_rn(v)
    p = p + (-step_size) * tl.math.div_rn(m, root_v * inv_bc2 + eps)
    _st(P, offs, p, mask, MASKED)
    # Requantize against the blocks' new absmax (masked lanes hold 0), taken on the bit
    # patterns as optim_impl.h takes it: a NaN makes the block's scale NaN there, where a
    # float max (the GPU's max.f32) would drop it.
    m_abs = tl.abs(m)
    m_bits = m.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    m_max = tl.max(m_bits, axis=1)[:, None].to(tl.float32, bitcast=True)
    v_bits = v.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    v_max = tl.max(v_bits, axis=1)[:, None].to(tl.float32, bitcast=True)
    # optim_impl.h's kTinyMax / kTinyPre: blocks under 2^-64 scaled by 2^64 (no overflow)
    m_pre = tl.where(m_max < 5.421010862427522e-20, 18446744073709551616.0, 1.0)
    m_k = tl.where(m_max > 0.0,
                   tl.math.div_rn(1.0, tl.where(m_max > 0.0, m_max * m_pre, 1.0)) * 16129.0,
                   0.0)
    v_k = tl.where(v_max > 0.0,
                   tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.where(v_max > 0.0, v_max, 1.0)))
                   * 65025.0, 0.0)
    code_m = _sqrt_code((m_abs * m_pre) * m_k, 127)
    code_m = tl.where(m < 0.0, -code_m, code_m).to(tl.int8)
    code_v = _rounded_sqrt_code(root_v * v_k).to(tl.uint8)
    _st(MQ, offs, code_m, mask, MASKED)
    _st(VQ, offs, code_v, mask, MASKED)
    _st(MS, block, m_max, has_block, MASKED)
    _st(VS, block, v_max, has_block, MASKED)


@triton.jit
def _adam8bit_kernel(META, FMETA, TYPED, n_tensors, beta2, eps, one_m_b1, one_m_b2,
                     LOG_P: tl.constexpr, ROWS: tl.constexpr, BLOCK8: tl.constexpr,
                     ALIGNED: tl.constexpr):
    """ROWS 8-bit blocks of one tensor (AdamW: decoupled weight decay). META: cum [2**LOG_P]
    (in programs), numel [n], ptrs [n, 6] (param, grad, exp_avg codes int8, exp_avg_sq codes
    uint8, their float32 block scales) and the float row; FMETA: float32 [n, ADAM8_FLOATS]
    (step_size, bc2, decay = 1 - lr * wd, the gradients' multiplier with maximize's sign,
    skip). As the Adam kernel: programs wholly inside their tensor load and store without
    masks, and ALIGNED (every pointer 16-byte aligned) lets those be vector accesses; the last
    program of a ragged tensor is masked."""
    ELEM: tl.constexpr = TYPED.dtype.element_ty
    rows, numel, frow, local = _locate(META, n_tensors, LOG_P, 6)
    P = _ptr(rows, 0, ELEM, ALIGNED)
    G = _ptr(rows, 1, ELEM, ALIGNED)
    MQ = _ptr(rows, 2, tl.int8, ALIGNED)
    VQ = _ptr(rows, 3, tl.uint8, ALIGNED)
    MS = _ptr(rows, 4, tl.float32, ALIGNED)
    VS = _ptr(rows, 5, tl.float32, ALIGNED)
    row = FMETA + ADAM8_FLOATS * frow
    step_size = tl.load(row)
    inv_bc2 = tl.math.div_rn(1.0, tl.load(row + 1))
    decay = tl.load(row + 2)
    signed_inv_scale = tl.load(row + 3)
    block = local * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
    offs = block * BLOCK8 + tl.arange(0, BLOCK8)[None, :]  # [ROWS, BLOCK8]
    if tl.load(row + 4) == 0.0:
        if (local + 1) * (ROWS * BLOCK8) <= numel:
            _adam8bit_rows(P, G, MQ, VQ, MS, VS, block, offs, None, None, step_size, inv_bc2,
                           beta2, eps, decay, one_m_b1, one_m_b2, signed_inv_scale, ELEM, False)
        else:
            _adam8bit_rows(P, G, MQ, VQ, MS, VS, block, offs, offs < numel,
                           block * BLOCK8 < numel, step_size, inv_bc2, beta2, eps, decay,
                           one_m_b1, one_m_b2, signed_inv_scale, ELEM, True)


# ------------------------------------------------------------------------------ launchers

def _log2_ceil(n: int) -> int:
    return max(0, (n - 1).bit_length())


def _groups(keys: Sequence, numels: Sequence[int]):
    """Indices of the non-empty tensors, grouped by key (first-seen order), at most MAX_TENSORS
    per group."""
    by_key = {}
    for i, (k, n) in enumerate(zip(keys, numels)):
        if n > 0:
            by_key.setdefault(k, []).append(i)
    for k, idx in by_key.items():
        for s in range(0, len(idx), MAX_TENSORS):
            yield k, idx[s:s + MAX_TENSORS]


class _Group:
    """One launch: the tensors idx of a call, their table buffer (see the module docstring)
    with ptrs [n, K] (and each tensor's row of floats after them) and floats [n, F] as views
    into it, the grid, LOG_P, whether every pointer but the gradients' is ALIGN-byte aligned,
    and tensors that carry the group's dtypes. table_rows: the rows of a float table on the
    device (capturable steps; the buffer then holds no floats), else row t of its own."""

    def __init__(self, key, idx, rows, numels, n_floats: int, block: int, table_rows=None):
        n, k = len(idx), len(rows[0])
        self.key, self.idx = key, idx
        self.log_p = _log2_ceil(n)
        p2 = 1 << self.log_p
        own_floats = n_floats if table_rows is None else 0
        nf = (n * own_floats + 1) // 2  # two float32 per int64 word
        self.buf = np.empty(p2 + n + n * (k + 1) + nf, dtype=np.int64)
        cum = np.cumsum([0] + [(x + block - 1) // block for x in numels], dtype=np.int64)
        self.buf[:n] = cum[:n]
        self.buf[n:p2] = _INT64_MAX
        self.buf[p2:p2 + n] = numels
        columns = self.buf[p2 + n:p2 + n + n * (k + 1)].reshape(n, k + 1)
        self.ptrs = columns[:, :k]
        self.ptrs[:] = [[t.data_ptr() for t in row] for row in rows]
        columns[:, k] = np.arange(n) if table_rows is None else [table_rows[i] for i in idx]
        others = np.delete(self.ptrs, 1, axis=1)
        self.static_aligned = not (others % ALIGN).any()
        self.float_start = p2 + n + n * (k + 1)
        self.floats = (self.buf[self.float_start:].view(np.float32)[:n * own_floats]
                       .reshape(n, own_floats) if own_floats else None)
        self.grid = int(cum[n])
        self.device = rows[0][0].device
        # dtype carriers for the kernels (parameter, first state), not the gradient: a kept
        # Prepared would keep that step's gradient alive
        self.typed = [t for j, t in enumerate(rows[0]) if j != 1]
        self.resident = None  # the table on the device, and the gradient pointers it holds
        self.staging = None  # a pinned copy of buf made ready for a capture
        self.captured = []  # (staging, table) of captured copies: graphs replay them

    def upload(self) -> torch.Tensor:
        """The table on the group's device, copied for this launch (the host buffer is reused
        by the next call) through pinned memory: for a copy from pageable memory the driver
        may make the host wait for the stream (CUDA's API synchronization notes), for one from
        the caching host allocator's pinned blocks it does not (a block is reused only once
        its copy is done). Not yet timed on a GPU against the pageable copy."""
        meta = torch.from_numpy(self.buf)
        if self.device.type == "cpu":
            return meta
        staging = torch.empty(self.buf.shape, dtype=torch.int64, pin_memory=True)
        staging.copy_(meta)
        return staging.to(self.device, non_blocking=True)

    def resident_table(self) -> torch.Tensor:
        """The table kept on the device between launches (capturable steps), copied again only
        when the gradients' pointers changed, from pinned memory (a pageable copy may wait for
        the stream; the caching host allocator keeps a pinned buffer until its copy is
        done). Inside a CUDA graph capture the copy comes from a pinned buffer allocated at an
        eager launch before and never written again, so that every replay copies the
        pointers the capture saw."""
        if self.device.type != "cuda":  # the interpreter reads host memory
            return torch.from_numpy(self.buf)
        grads = self.ptrs[:, 1].copy()
        if self.resident is not None and np.array_equal(self.resident[1], grads):
            return self.resident[0]
        if torch.cuda.is_current_stream_capturing():
            if self.staging is None:
                raise RuntimeError(
                    "capturable optimizer step: the gradients are new tensors inside this CUDA "
                    "graph capture and no eager step has run since the last capture; run one "
                    "eager step (warm-up) before each capture")
            staging, self.staging = self.staging, None
            staging.copy_(torch.from_numpy(self.buf))
            table = torch.empty(self.buf.shape, dtype=torch.int64, device=self.device)
            table.copy_(staging, non_blocking=True)
            self.captured.append((staging, table))  # replays read both
        else:
            table = self.upload()
            if self.staging is None:
                self.staging = torch.empty(self.buf.shape, dtype=torch.int64, pin_memory=True)
        self.resident = (table, grads)
        return table


class Prepared:
    """The launches of one call over rows of tensors ([parameter, gradient, state...] per
    parameter; launch groups by key), their tables filled but for the per-tensor floats. A
    later call over the same tensors with other gradients (llmkernels.optim's step plans)
    only writes the gradients' pointers and the floats: no tensor is read again.

    table_rows (capturable steps): per tensor, its row in a float32 table on the device that
    each launch is given (computed there from device-resident steps and learning rates: no
    host value changes between steps); the pointer tables then stay on the device too."""

    def __init__(self, rows: List[list], keys: Sequence, n_floats: int, block: int = BLOCK,
                 table_rows: Optional[Sequence[int]] = None):
        numels = [row[0].numel() for row in rows]
        self.n_floats = n_floats
        self.size = len(rows)
        self.device_table = table_rows is not None
        self.groups = [_Group(key, idx, [rows[i] for i in idx], [numels[i] for i in idx],
                              n_floats, block, table_rows)
                       for key, idx in _groups(keys, numels)]

    def launches(self, grad_ptrs: Optional[Sequence[int]] = None, floats=None):
        """Per group (group, meta, fmeta, aligned): the tables on the group's device, with
        these gradients' pointers (None: as prepared) and floats ([size, F] float32 rows, bit
        patterns kept; with table_rows, the device table itself)."""
        if self.device_table:
            if not isinstance(floats, torch.Tensor) or floats.dtype != torch.float32 \
                    or floats.dim() != 2 or floats.shape[1] != self.n_floats \
                    or not floats.is_contiguous() \
                    or any(floats.device != g.device for g in self.groups):
                raise ValueError(f"optimizer launch: floats must be a contiguous float32 table "
                                 f"of {self.n_floats} columns on the tensors' device")
        elif floats is not None:
            floats = np.asarray(floats, dtype=np.float32).reshape(self.size, self.n_floats)
        for g in self.groups:
            if grad_ptrs is not None:
                g.ptrs[:, 1] = [grad_ptrs[i] for i in g.idx]
            aligned = g.static_aligned and not (g.ptrs[:, 1] % ALIGN).any()
            if self.device_table:
                yield g, g.resident_table(), floats, aligned
                continue
            if floats is not None:
                g.floats[:] = floats[g.idx]
            meta = g.upload()
            fmeta = meta[g.float_start:].view(torch.float32) if self.n_floats else None
            yield g, meta, fmeta, aligned


def _check(name, rows, f32_state_from=None):
    """Every tensor of a row contiguous, with the parameter's device and dtype; from column
    f32_state_from on (the moments), float32 is also allowed if the whole row's are."""
    note = "; the moments may be float32" if f32_state_from is not None else ""
    for row in rows:
        p = row[0]
        dtype, device = p.dtype, p.get_device()
        state = dtype
        if f32_state_from is not None and row[f32_state_from].dtype == torch.float32:
            state = torch.float32
        for j, t in enumerate(row):
            want = state if f32_state_from is not None and j >= f32_state_from else dtype
            if t.dtype != want or t.get_device() != device or not t.is_contiguous():
                raise ValueError(f"{name}: every tensor of a parameter must be contiguous and "
                                 f"share its dtype and device ({p.dtype}, {p.device}{note})")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name}: unsupported dtype {p.dtype}")


def _key_bits(keys) -> np.ndarray:
    """32-bit stochastic rounding keys as float32 bit patterns (for a kernel's float table)."""
    return np.asarray([int(k) & 0xFFFFFFFF for k in keys], dtype=np.uint32).view(np.float32)


def _check_sr(name, params, sr_keys):
    if sr_keys is None:
        return
    if len(sr_keys) != len(params):
        raise ValueError(f"{name}: sr_keys must have one key per tensor")
    if any(p.dtype != torch.bfloat16 for p in params):
        raise ValueError(f"{name}: stochastic rounding needs bfloat16 parameters")


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_sizes,
              bias_correction2_sqrts, *, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
              maximize, inv_grad_scale, decay, one_minus_beta1, one_minus_beta2,
              check=True, sr_keys=None) -> None:
    """One Adam/AdamW step over lists of contiguous tensors (updated in place). step_sizes /
    bias_correction2_sqrts: per tensor, lr / (1 - beta1**step) and sqrt(1 - beta2**step);
    decay = 1 - lr * weight_decay, one_minus_beta1/2 computed in double by the caller.
    check=False: the caller has checked dtypes, devices and contiguity (the optimizers do,
    to choose this path) and the per-tensor checks are not repeated. sr_keys: per tensor,
    the 32-bit key of its stochastic rounding stream (bfloat16 parameters; None: round to
    nearest even)."""
    prepared = adam_prepare(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                            amsgrad=amsgrad, check=check, sr_keys=sr_keys)
    adam_launch(prepared, None, step_sizes, bias_correction2_sqrts, beta2=beta2, eps=eps,
                weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad,
                maximize=maximize, inv_grad_scale=inv_grad_scale, decay=decay,
                one_minus_beta1=one_minus_beta1, one_minus_beta2=one_minus_beta2,
                sr_keys=sr_keys)


def adam_prepare(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, amsgrad,
                 check=True, sr_keys=None, table_rows=None) -> Prepared:
    """adam_step's launches over these tensors (adam_launch runs them, with these or later
    gradients; with table_rows, adam_launch_table: see Prepared)."""
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n) or (
            amsgrad and len(max_exp_avg_sqs) != n):
        raise ValueError("adam_step: the tensor lists must have the same length")
    _check_sr("adam_step", params, sr_keys)
    rows = [[params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]]
            + ([max_exp_avg_sqs[i]] if amsgrad else []) for i in range(n)]
    if check:
        _check("adam_step", rows, f32_state_from=2)
    keys = [(p.dtype, m.dtype, p.get_device()) for p, m in zip(params, exp_avgs)]
    return Prepared(rows, keys, ADAM_FLOATS.value, table_rows=table_rows)


def adam_launch(prepared: Prepared, grad_ptrs, step_sizes, bias_correction2_sqrts, *, beta2,
                eps, weight_decay, decoupled, amsgrad, maximize, inv_grad_scale, decay,
                one_minus_beta1, one_minus_beta2, sr_keys=None) -> None:
    """The launches of adam_prepare's tensors, with the gradients at grad_ptrs (None: those
    it was prepared with). Other arguments as adam_step's."""
    if len(step_sizes) != prepared.size or len(bias_correction2_sqrts) != prepared.size:
        raise ValueError("adam_step: the tensor lists must have the same length")
    floats = np.zeros((prepared.size, ADAM_FLOATS.value), dtype=np.float32)
    floats[:, 0] = step_sizes
    floats[:, 1] = bias_correction2_sqrts
    if sr_keys is not None:
        floats[:, 2] = _key_bits(sr_keys)
    floats[:, 3] = decay
    floats[:, 4] = inv_grad_scale  # column 5, skip: 0
    _adam_launches(prepared, grad_ptrs, floats, beta2=beta2, eps=eps, weight_decay=weight_decay,
                   decoupled=decoupled, amsgrad=amsgrad, maximize=maximize,
                   one_minus_beta1=one_minus_beta1, one_minus_beta2=one_minus_beta2,
                   sr=sr_keys is not None)


def adam_launch_table(prepared: Prepared, grad_ptrs, table: torch.Tensor, *, beta2, eps,
                      weight_decay, decoupled, amsgrad, maximize, one_minus_beta1,
                      one_minus_beta2, sr) -> None:
    """The launches of adam_prepare(..., table_rows=)'s tensors with their floats read from
    table (float32 [rows, ADAM_FLOATS] on the device: step_size, bias_correction2_sqrt, the
    stochastic rounding key's bits, decay, the gradients' multiplier, skip)."""
    _adam_launches(prepared, grad_ptrs, table, beta2=beta2, eps=eps, weight_decay=weight_decay,
                   decoupled=decoupled, amsgrad=amsgrad, maximize=maximize,
                   one_minus_beta1=one_minus_beta1, one_minus_beta2=one_minus_beta2, sr=sr)


def _adam_launches(prepared, grad_ptrs, floats, *, beta2, eps, weight_decay, decoupled,
                   amsgrad, maximize, one_minus_beta1, one_minus_beta2, sr):
    for g, meta, fmeta, aligned in prepared.launches(grad_ptrs, floats):
        with device_guard(g.device):
            _adam_kernel[(g.grid,)](
                meta, fmeta, g.typed[0], g.typed[1], len(g.idx),
                float(beta2), float(eps), float(weight_decay), float(one_minus_beta1),
                float(one_minus_beta2), -1.0 if maximize else 1.0,
                LOG_P=g.log_p, DECOUPLED=bool(decoupled), AMSGRAD=bool(amsgrad),
                ALIGNED=aligned, BLOCK=BLOCK, SR=bool(sr), num_warps=NUM_WARPS,
                enable_fp_fusion=False)


def sgd_step(params, grads, momentum_buffers, first_steps, *, lr, momentum, dampening,
             weight_decay, nesterov, maximize, inv_grad_scale, one_minus_dampening,
             check=True, sr_keys=None) -> None:
    """One SGD step over lists of contiguous tensors (updated in place). momentum_buffers:
    None entries when momentum == 0; first_steps[i]: the buffer is written from the gradient
    (its contents are not read). check, sr_keys: as adam_step's."""
    prepared = sgd_prepare(params, grads, momentum_buffers, first_steps, momentum=momentum,
                           check=check, sr_keys=sr_keys)
    sgd_launch(prepared, None, lr=lr, momentum=momentum, weight_decay=weight_decay,
               nesterov=nesterov, maximize=maximize, inv_grad_scale=inv_grad_scale,
               one_minus_dampening=one_minus_dampening, sr_keys=sr_keys)


def sgd_prepare(params, grads, momentum_buffers, first_steps, *, momentum, check=True,
                sr_keys=None) -> Prepared:
    """sgd_step's launches over these tensors (sgd_launch runs them)."""
    n = len(params)
    use_mom = float(momentum) != 0.0
    if not (len(grads) == len(first_steps) == n) or (use_mom and len(momentum_buffers) != n):
        raise ValueError("sgd_step: the tensor lists must have the same length")
    _check_sr("sgd_step", params, sr_keys)
    rows = [[params[i], grads[i]] + ([momentum_buffers[i]] if use_mom else []) for i in range(n)]
    if check:
        _check("sgd_step", rows)
    keys = [(p.dtype, p.get_device(), bool(f) and use_mom) for p, f in zip(params, first_steps)]
    return Prepared(rows, keys, 1 if sr_keys is not None else 0)


def sgd_launch(prepared: Prepared, grad_ptrs, *, lr, momentum, weight_decay, nesterov,
               maximize, inv_grad_scale, one_minus_dampening, sr_keys=None) -> None:
    """The launches of sgd_prepare's tensors, with the gradients at grad_ptrs (None: those it
    was prepared with). Other arguments as sgd_step's."""
    use_mom = float(momentum) != 0.0
    floats = _key_bits(sr_keys)[:, None] if sr_keys is not None else None
    for g, meta, fmeta, aligned in prepared.launches(grad_ptrs, floats):
        first = g.key[2]
        with device_guard(g.device):
            _sgd_kernel[(g.grid,)](
                meta, fmeta if fmeta is not None else meta, g.typed[0], len(g.idx), float(lr),
                float(weight_decay), float(momentum), float(one_minus_dampening),
                float(inv_grad_scale), -1.0 if maximize else 1.0,
                LOG_P=g.log_p, MOMENTUM=use_mom, FIRST=first, NESTEROV=bool(nesterov),
                ALIGNED=aligned, BLOCK=BLOCK, SR=sr_keys is not None, num_warps=NUM_WARPS,
                enable_fp_fusion=False)


def adam8bit_step(params, grads, exp_avg_codes, exp_avg_sq_codes, exp_avg_scales,
                  exp_avg_sq_scales, step_sizes, bias_correction2_sqrts, *, beta2, eps,
                  maximize, inv_grad_scale, decay, one_minus_beta1, one_minus_beta2,
                  check=True) -> None:
    """One AdamW step with 8-bit moments (llmkernels.optim.AdamW8bit's state: int8 / uint8
    codes and float32 per-256 block scales, all contiguous) over lists of tensors, updated in
    place. Other arguments as adam_step's; weight decay enters through decay = 1 - lr * wd."""
    prepared = adam8bit_prepare(params, grads, exp_avg_codes, exp_avg_sq_codes, exp_avg_scales,
                                exp_avg_sq_scales, check=check)
    adam8bit_launch(prepared, None, step_sizes, bias_correction2_sqrts, beta2=beta2, eps=eps,
                    maximize=maximize, inv_grad_scale=inv_grad_scale, decay=decay,
                    one_minus_beta1=one_minus_beta1, one_minus_beta2=one_minus_beta2)


def adam8bit_prepare(params, grads, exp_avg_codes, exp_avg_sq_codes, exp_avg_scales,
                     exp_avg_sq_scales, *, check=True, table_rows=None) -> Prepared:
    """adam8bit_step's launches over these tensors (adam8bit_launch runs them; with
    table_rows, adam8bit_launch_table: see Prepared)."""
    n = len(params)
    lists = (grads, exp_avg_codes, exp_avg_sq_codes, exp_avg_scales, exp_avg_sq_scales)
    if any(len(x) != n for x in lists):
        raise ValueError("adam8bit_step: the tensor lists must have the same length")
    if check:
        _check("adam8bit_step", [[params[i], grads[i]] for i in range(n)])
        for i in range(n):
            nb = (params[i].numel() + BLOCK8 - 1) // BLOCK8
            for t, dtype, size in ((exp_avg_codes[i], torch.int8, params[i].numel()),
                                   (exp_avg_sq_codes[i], torch.uint8, params[i].numel()),
                                   (exp_avg_scales[i], torch.float32, nb),
                                   (exp_avg_sq_scales[i], torch.float32, nb)):
                if (t.dtype != dtype or t.numel() != size or not t.is_contiguous()
                        or t.get_device() != params[i].get_device()):
                    raise ValueError(f"adam8bit_step: state tensor {i} must be a contiguous "
                                     f"{dtype} of {size} elements on the parameter's device")
    rows = [[params[i], grads[i], exp_avg_codes[i], exp_avg_sq_codes[i], exp_avg_scales[i],
             exp_avg_sq_scales[i]] for i in range(n)]
    keys = [(p.dtype, p.get_device()) for p in params]
    return Prepared(rows, keys, ADAM8_FLOATS.value, block=ROWS8 * BLOCK8, table_rows=table_rows)


def adam8bit_launch(prepared: Prepared, grad_ptrs, step_sizes, bias_correction2_sqrts, *,
                    beta2, eps, maximize, inv_grad_scale, decay, one_minus_beta1,
                    one_minus_beta2) -> None:
    """The launches of adam8bit_prepare's tensors, with the gradients at grad_ptrs (None:
    those it was prepared with). Other arguments as adam8bit_step's."""
    if len(step_sizes) != prepared.size or len(bias_correction2_sqrts) != prepared.size:
        raise ValueError("adam8bit_step: the tensor lists must have the same length")
    floats = np.zeros((prepared.size, ADAM8_FLOATS.value), dtype=np.float32)
    floats[:, 0] = step_sizes
    floats[:, 1] = bias_correction2_sqrts
    floats[:, 2] = decay
    floats[:, 3] = -float(inv_grad_scale) if maximize else float(inv_grad_scale)  # 4: skip
    adam8bit_launch_table(prepared, grad_ptrs, floats, beta2=beta2, eps=eps,
                          one_minus_beta1=one_minus_beta1, one_minus_beta2=one_minus_beta2)


def adam8bit_launch_table(prepared: Prepared, grad_ptrs, table, *, beta2, eps, one_minus_beta1,
                          one_minus_beta2) -> None:
    """The launches of adam8bit_prepare's tensors with their floats from table ([size,
    ADAM8_FLOATS] float32 rows: step_size, bias_correction2_sqrt, decay, the gradients'
    multiplier with maximize's sign, skip; with table_rows, the device table itself)."""
    for g, meta, fmeta, aligned in prepared.launches(grad_ptrs, table):
        with device_guard(g.device):
            _adam8bit_kernel[(g.grid,)](
                meta, fmeta, g.typed[0], len(g.idx), float(beta2), float(eps),
                float(one_minus_beta1), float(one_minus_beta2), LOG_P=g.log_p,
                ROWS=ROWS8, BLOCK8=BLOCK8, ALIGNED=aligned,
                num_warps=NUM_WARPS8, enable_fp_fusion=False)
