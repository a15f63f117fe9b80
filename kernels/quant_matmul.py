"""Quantized matmul in Triton: int8 and int4 weight-only (W8A16, W4A16) and w8a8.

Formats and numerics are those of llmkernels.reference.quant_matmul (the specification):
  int8: qdata int8 (N, K), scales float32 (N,): out = (x @ q^T) * scale[n] (+ bias)
  int4: qdata uint8 (N, K // 2), low nibble = even k; scales float32 and zeros uint8 (N, K // g):
        out = x @ ((q - zero) * scale)^T (+ bias)
  w8a8: xq, x_scale = per-row int8 quantization of x (round half to even, as torch.round);
        out = (xq @ q^T as exact int32) * x_scale[m] * scale[n] (+ bias)
Every launcher takes x2d (M, K) with a unit last stride and any row stride, and writes the
preallocated out (M, N) (x's dtype, unit last stride). Accumulation is float32 (int32 for w8a8).

Design:
  - One GEMM kernel for the three schemes (SCHEME constexpr). The weight tile is dequantized in
    registers: int8 weights are cast to x's dtype (exact: |q| <= 127) and the per-channel scale
    is applied once after the K loop; int4 nibbles become (q - zero) * scale in float32, then
    x's dtype, with the scale and zero of the tile's group (BLOCK_K <= group size, so a K tile
    never straddles two groups). 16-bit x multiplies on the tensor cores with float32
    accumulation; float32 x uses input_precision "ieee" (true float32 products); w8a8 is an
    int8 x int8 -> int32 tl.dot, exact.
  - Tiled variant (M > 16): BLOCK_M x BLOCK_N output tiles, grouped launch order for L2 reuse,
    autotuned block sizes.
  - Decode variant (M <= 16): one 16-row tile holds every row of x, so each weight element is
    read exactly once; narrow BLOCK_N and long BLOCK_K tiles make wide, streaming weight loads.
    When N alone gives too few programs to fill the GPU, K is split across programs, each writes
    a float32 (int32 for w8a8) partial, and a small kernel sums the splits in order and applies
    the epilogue (deterministic: no atomics).
  - GEMV variant (one row of x, int8 / int4; opt-in with FORCE_VARIANT = "gemv" until a GPU
    has timed it against the decode variant): no tensor-core tile (M = 1 fills one of its 16
    rows, and the dequantized weight must be converted to bf16 and to the MMA layout first);
    BLOCK_N weight rows are multiplied elementwise with x in float32 and summed along K. int4
    factors each group: scale * (sum q * x - zero * sum x), so a nibble costs an and/shift, a
    conversion and one FMA. K splits and their combine are the decode variant's.
  - w8a8 activations are quantized by a per-row kernel (two passes over the row: max|x|, then
    round half to even with floor arithmetic, exact in the interpreter and compiled alike;
    x_scale = max|x| * float32(1/127) as the spec; x / x_scale is an IEEE division via
    tl.math.div_rn, since '/' on float32 is approximate when compiled). Bit-exact with
    quantize_activations_reference.
  - Row and weight offsets are 64-bit.
  - int32 accumulation of w8a8 is exact while 127 * 127 * K < 2^31, i.e. K <= 133143.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .rounding import INTERPRET, cast as _cast

# LLMKERNELS_TRITON_AUTOTUNE=0: the first config of each list, no tuning.
AUTOTUNE = os.environ.get("LLMKERNELS_TRITON_AUTOTUNE", "1") != "0"

# Test knobs: "tiled" / "decode" forces a variant; an int forces the decode variant's K splits.
FORCE_VARIANT = None
FORCE_SPLITS = None

DECODE_MAX_M = 16  # the decode variant's single row tile

SCHEME_INT8, SCHEME_INT4, SCHEME_W8A8 = 0, 1, 2


def _cfg(m, n, k, w, s):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)


if INTERPRET:  # the interpreter runs every config it is given: one small one is enough
    _TILED_CONFIGS = [_cfg(16, 16, 32, 4, 1)]
    _DECODE_CONFIGS = [_cfg(16, 16, 32, 4, 1)]
else:
    _TILED_CONFIGS = [_cfg(*c) for c in (
        (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4), (128, 256, 64, 8, 3), (64, 64, 128, 4, 3), (128, 128, 128, 8, 3))]
    _DECODE_CONFIGS = [_cfg(*c) for c in (
        (16, 64, 128, 4, 4), (16, 32, 256, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 3),
        (16, 32, 128, 4, 4), (16, 16, 256, 2, 4), (16, 64, 512, 8, 3))]
# Split boundaries are multiples of every decode BLOCK_K (so only the last split is ragged).
_K_GRANULE = max(c.kwargs["BLOCK_K"] for c in _DECODE_CONFIGS)


def _gemv_cfg(n, k, w, s):
    return triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)


if INTERPRET:
    _GEMV_CONFIGS = [_gemv_cfg(16, 128, 4, 1)]
else:
    _GEMV_CONFIGS = [_gemv_cfg(*c) for c in (
        (32, 256, 4, 2), (16, 512, 4, 2), (32, 512, 4, 2), (64, 256, 8, 2), (64, 128, 4, 3),
        (128, 128, 8, 2), (8, 512, 2, 3))]
# The GEMV's split boundaries: multiples of every BLOCK_K it may take (powers of two; int4's
# raised to the group size), so that its tiles hold whole groups.
_GEMV_GRANULE = max(c.kwargs["BLOCK_K"] for c in _GEMV_CONFIGS)


def _prune(configs, named_args, **kwargs):
    """int4: BLOCK_K at most the group size (one scale/zero per column per K tile); float32 x:
    no 256-wide tiles, 128 x 128 or 512-deep float32 stages (a 16x64x512 3-stage decode tile
    asks for 256 KiB of shared memory). Without autotuning, one."""
    scheme = kwargs.get("SCHEME", named_args.get("SCHEME"))
    group = kwargs.get("GROUP", named_args.get("GROUP", 1))
    x = named_args.get("X")
    elem = x.element_size() if hasattr(x, "element_size") else 2
    kept = []
    for c in configs:
        kw = dict(c.kwargs)
        if scheme == SCHEME_INT4 and kw["BLOCK_K"] > group:
            kw["BLOCK_K"] = group
        if elem == 4 and (kw["BLOCK_N"] > 128 or kw["BLOCK_K"] > 256
                          or kw["BLOCK_M"] * kw["BLOCK_K"] > 128 * 64):
            continue
        if scheme != SCHEME_W8A8 and elem == 2 and kw["BLOCK_N"] > 128:
            continue
        kept.append((kw, c))
    return _distinct(kept) or configs[-1:]


def _prune_gemv(configs, named_args, **kwargs):
    """int4: BLOCK_K at least the group size (whole groups per tile). Without autotuning, one."""
    scheme = kwargs.get("SCHEME", named_args.get("SCHEME"))
    group = kwargs.get("GROUP", named_args.get("GROUP", 1))
    kept = []
    for c in configs:
        kw = dict(c.kwargs)
        if scheme == SCHEME_INT4 and kw["BLOCK_K"] < group:
            kw["BLOCK_K"] = group
        kept.append((kw, c))
    return _distinct(kept)


def _distinct(adjusted):
    """Configs from (block sizes, original config) pairs, duplicates dropped (the prunes'
    adjustments make some equal); without autotuning, the first."""
    kept, seen = [], set()
    for kw, c in adjusted:
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            kept.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return kept if AUTOTUNE else kept[:1]


# ------------------------------------------------------------------------------ kernels



@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b. "int": int8 operands, exact int32 accumulation. "upcast": the interpreter
    (triton 3.9) multiplies bfloat16 tiles wrongly; 16-bit products are exact in float32."""
    if PRECISION == "int":
        return tl.dot(a, b, acc, out_dtype=tl.int32)
    elif PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, S, XS, BIAS, OUT, stride_om,
              SCHEME: tl.constexpr, HAS_BIAS: tl.constexpr):
    m_ok = offs_m < M
    n_ok = offs_n < N
    if SCHEME == 0:  # int8: the per-channel scale, once
        s = tl.load(S + offs_n, mask=n_ok, other=0.0)
        out = acc * s[None, :]
    elif SCHEME == 2:  # w8a8: exact int32 -> float, then (acc * x_scale) * scale as the spec
        xs = tl.load(XS + offs_m, mask=m_ok, other=0.0)
        s = tl.load(S + offs_n, mask=n_ok, other=0.0)
        out = acc.to(tl.float32) * xs[:, None] * s[None, :]
    else:
        out = acc
    if HAS_BIAS:
        b = tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        out = out + b[None, :]
    ptrs = OUT + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, _cast(out, OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemm_kernel(X, W, S, Z, BIAS, XS, OUT, PART,
                 M, N, K, stride_xm, stride_om, K_SPLIT, M_BUCKET,
                 SCHEME: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                 GROUP_M: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] = sum_k x[m, k] * w[n, k] over K range [pid_k * K_SPLIT, +K_SPLIT), with the
    weight dequantized in registers. SPLIT: raw accumulators to PART (splits, M, N)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles sweep the column tiles together (weight reuse in L2).
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_in_group
    pid_n = (pid % width) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_kb = tl.arange(0, BLOCK_K)
    offs_kh = tl.arange(0, BLOCK_K // 2)
    x_rows = X + offs_m.to(tl.int64) * stride_xm
    n64 = offs_n.to(tl.int64)
    if SCHEME == 1:
        w_cols = W + n64 * (K // 2)
        n_groups = K // GROUP
        sz_cols = n64 * n_groups
    else:
        w_cols = W + n64 * K

    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    if SCHEME == 2:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + offs_kb
        if EVEN_K:
            x = tl.load(x_rows[:, None] + offs_k[None, :], mask=m_ok[:, None], other=0)
        else:
            k_ok = offs_k < k_hi
            x = tl.load(x_rows[:, None] + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0)
        if SCHEME == 1:
            # Packed bytes (BLOCK_K / 2, BLOCK_N), contiguous along K (wide loads): the low
            # nibbles are the even k, the high ones the odd k; x's tile splits the same way, so
            # the products pair up without interleaving the weight. K is a multiple of the group
            # and the group of BLOCK_K: no K mask; one scale and zero per column per tile.
            packed = tl.load(w_cols[None, :] + (k0 // 2 + offs_kh)[:, None], mask=n_ok[None, :],
                             other=0)
            g = k0 // GROUP
            s = tl.load(S + sz_cols + g, mask=n_ok, other=0.0)
            z = tl.load(Z + sz_cols + g, mask=n_ok, other=0).to(tl.float32)
            w_even = _cast(((packed & 0xF).to(tl.float32) - z[None, :]) * s[None, :],
                           X.dtype.element_ty)
            w_odd = _cast(((packed >> 4).to(tl.float32) - z[None, :]) * s[None, :],
                          X.dtype.element_ty)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            acc = _dot(x_even, w_even, acc, PRECISION)
            acc = _dot(x_odd, w_odd, acc, PRECISION)
        else:
            if EVEN_K:
                wq = tl.load(w_cols[None, :] + offs_k[:, None], mask=n_ok[None, :], other=0)
            else:
                wq = tl.load(w_cols[None, :] + offs_k[:, None],
                             mask=n_ok[None, :] & k_ok[:, None], other=0)
            if SCHEME == 2:
                w = wq
            elif PRECISION == "upcast":  # the interpreter's int8 -> bfloat16 cast gives NaNs
                w = wq.to(tl.float32)
            else:
                w = wq.to(X.dtype.element_ty)
            acc = _dot(x, w, acc, PRECISION)

    if SPLIT:
        ptrs = (PART + (pid_k * M + offs_m).to(tl.int64)[:, None] * N + offs_n[None, :])
        tl.store(ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])
    else:
        _epilogue(acc, offs_m, offs_n, M, N, S, XS, BIAS, OUT, stride_om, SCHEME, HAS_BIAS)


@triton.jit
def _combine_kernel(PART, S, XS, BIAS, OUT, M, N, stride_om, SPLITS,
                    SCHEME: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sums the K splits' partials (in split order: deterministic), then the epilogue."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SCHEME == 2:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for sp in range(0, SPLITS):
        ptrs = PART + (sp * M + offs_m).to(tl.int64)[:, None] * N + offs_n[None, :]
        acc += tl.load(ptrs, mask=mask, other=0)
    _epilogue(acc, offs_m, offs_n, M, N, S, XS, BIAS, OUT, stride_om, SCHEME, HAS_BIAS)


@triton.jit
def _gemv_kernel(X, W, S, Z, BIAS, OUT, PART, N, K, K_SPLIT, stride_om,
                 SCHEME: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row of x: out[n] = sum_k x[k] * w[n, k] over [pid_k * K_SPLIT, +K_SPLIT), products
    in float32 (see the module's design notes). int4 tiles hold BLOCK_K // GROUP whole groups
    (K, and so every split boundary, is a multiple of the group). SPLIT: the sums to PART
    (splits, 1, N), int4's already scaled, int8's not (the combine applies its scale)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    n64 = offs_n.to(tl.int64)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    if SCHEME == 1:
        GPT: tl.constexpr = BLOCK_K // GROUP  # groups per tile
        HG: tl.constexpr = GROUP // 2  # packed bytes per group
        offs_g = tl.arange(0, GPT)
        offs_j = tl.arange(0, HG)
        n_groups = K // GROUP
        w_rows = W + n64 * (K // 2)
        sz_rows = n64 * n_groups
        acc = tl.zeros((BLOCK_N, GPT), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            g_idx = k0 // GROUP + offs_g
            g_ok = g_idx * GROUP < k_hi
            byte = k0 // 2 + offs_g[:, None] * HG + offs_j[None, :]  # (GPT, HG) in the row
            packed = tl.load(w_rows[:, None, None] + byte[None, :, :],
                             mask=n_ok[:, None, None] & g_ok[None, :, None], other=0)
            # byte b holds k = 2b (low nibble) and 2b + 1 (high)
            x_even = tl.load(X + 2 * byte, mask=g_ok[:, None], other=0.0).to(tl.float32)
            x_odd = tl.load(X + 2 * byte + 1, mask=g_ok[:, None], other=0.0).to(tl.float32)
            qx = ((packed & 0xF).to(tl.float32) * x_even[None, :, :]
                  + (packed >> 4).to(tl.float32) * x_odd[None, :, :])
            dot = tl.sum(qx, axis=2)  # (BLOCK_N, GPT): sum of q * x per group
            x_sum = tl.sum(x_even + x_odd, axis=1)  # (GPT,)
            sz_ok = n_ok[:, None] & g_ok[None, :]
            s = tl.load(S + sz_rows[:, None] + g_idx[None, :], mask=sz_ok, other=0.0)
            z = tl.load(Z + sz_rows[:, None] + g_idx[None, :], mask=sz_ok, other=0).to(tl.float32)
            acc += s * (dot - z * x_sum[None, :])
        total = tl.sum(acc, axis=1)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        w_rows = W + n64 * K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < k_hi
            wq = tl.load(w_rows[:, None] + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                         other=0)
            xv = tl.load(X + k, mask=k_ok, other=0.0).to(tl.float32)
            acc += wq.to(tl.float32) * xv[None, :]
        total = tl.sum(acc, axis=1)
    if SPLIT:
        tl.store(PART + pid_k.to(tl.int64) * N + offs_n, total, mask=n_ok)
    else:
        _epilogue(total[None, :], tl.arange(0, 1), offs_n, 1, N, S, S, BIAS, OUT, stride_om,
                  SCHEME, HAS_BIAS)


@triton.jit
def _round_half_even(v):
    """torch.round on float32 (|v| < 2^23): v - floor(v) is exact, ties go to the even side."""
    r = tl.floor(v)
    d = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _quantize_rows_kernel(X, XQ, XS, K, stride_xm, BLOCK_K: tl.constexpr):
    """Per row m: x_scale = max|x| * float32(1/127) (1 for an all-zero row, NaN for a row with
    a NaN or an infinity),
    xq = clamp(round(x / x_scale), -127, 127) into XQ (M, K) int8 contiguous; the division is
    IEEE (div_rn), like torch's tensor-by-tensor division on the CPU and on CUDA."""
    m = tl.program_id(0).to(tl.int64)
    row = X + m * stride_xm
    qrow = XQ + m * K
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    finite = tl.full((BLOCK_K,), 1, dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
        finite = finite & (tl.abs(v) <= 3.4028234663852886e38).to(tl.int32)  # NaN: false
    s = tl.max(amax, axis=0) * (1.0 / 127.0)  # the spec's float32 reciprocal, not a division
    s = tl.where(s > 0.0, s, 1.0)
    s = tl.where(tl.min(finite, axis=0) > 0, s, float("nan"))  # a NaN or inf: NaN outputs
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        v = tl.load(row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = _round_half_even(tl.math.div_rn(v, s))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(qrow + k0 + offs, q.to(tl.int8), mask=mask)
    tl.store(XS + m, s)


_KEY = ["M_BUCKET", "N", "K", "SCHEME", "GROUP", "HAS_BIAS", "SPLIT", "PRECISION"]
_HEURISTICS = {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0}
_tiled = triton.autotune(configs=_TILED_CONFIGS, key=_KEY,
                         prune_configs_by={"early_config_prune": _prune})(
                             triton.heuristics(_HEURISTICS)(_gemm_kernel))
_decode = triton.autotune(configs=_DECODE_CONFIGS, key=_KEY + ["K_SPLIT"],
                          prune_configs_by={"early_config_prune": _prune})(
                              triton.heuristics(_HEURISTICS)(_gemm_kernel))


_gemv = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "SCHEME", "GROUP", "HAS_BIAS",
                                                    "SPLIT", "K_SPLIT"],
                        prune_configs_by={"early_config_prune": _prune_gemv})(_gemv_kernel)


# ------------------------------------------------------------------------------ launchers

@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _precision(dtype: torch.dtype, scheme: int) -> str:
    if scheme == SCHEME_W8A8:
        return "int"
    if INTERPRET:
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


VARIANTS = ("tiled", "decode", "gemv")


def _check_variant() -> None:
    if FORCE_VARIANT is not None and FORCE_VARIANT not in VARIANTS:
        raise ValueError(f"FORCE_VARIANT must be one of {VARIANTS}, got {FORCE_VARIANT!r}")


def _use_decode(M: int) -> bool:
    _check_variant()
    if FORCE_VARIANT is not None:
        return FORCE_VARIANT in ("decode", "gemv") and M <= DECODE_MAX_M
    return M <= DECODE_MAX_M


def _use_gemv(M: int, scheme: int) -> bool:
    """The GEMV variant: forced only (FORCE_VARIANT = "gemv"), for one row of a weight-only
    scheme; other calls take the variant they would take anyway (decode for M <= 16)."""
    _check_variant()
    return FORCE_VARIANT == "gemv" and M == 1 and scheme != SCHEME_W8A8


def decode_splits(x2d: torch.Tensor, N: int, K: int) -> int:
    """How many K splits the decode variant uses: enough programs for ~2 waves on the GPU,
    each split at least 1024 deep (the partials' traffic stays small next to the weight's)."""
    if FORCE_SPLITS is not None:
        return max(1, min(int(FORCE_SPLITS), triton.cdiv(max(K, 1), _K_GRANULE)))
    if INTERPRET or not x2d.is_cuda:
        return 1
    dev = x2d.device.index if x2d.device.index is not None else torch.cuda.current_device()
    want = triton.cdiv(2 * _multiprocessors(dev), triton.cdiv(N, 64))
    return int(max(1, min(want, K // 1024, 32)))


def _split_k(K: int, splits: int, granule: int):
    """(split length, number of splits) for about `splits` K ranges whose boundaries are
    multiples of granule (only the last one is ragged)."""
    k_split = triton.cdiv(triton.cdiv(K, splits), granule) * granule
    return k_split, triton.cdiv(K, k_split)


def _launch(scheme: int, x2d, qdata, scales, zeros, group: int, bias, out, xs=None) -> None:
    M, K = x2d.shape
    N = qdata.shape[0]
    if M == 0 or N == 0:
        return
    if K == 0:
        if bias is None:
            out.zero_()
        else:
            out.copy_(bias.to(out.dtype).expand(M, N))
        return
    has_bias = bias is not None
    dummy = scales
    bias_ = bias if has_bias else dummy
    zeros_ = zeros if zeros is not None else dummy
    xs_ = xs if xs is not None else dummy
    prec = _precision(out.dtype, scheme)
    flags = dict(SCHEME=scheme, GROUP=group, HAS_BIAS=has_bias, PRECISION=prec, GROUP_M=8)
    m_bucket = min(triton.next_power_of_2(M), 4096)
    if not _use_decode(M):
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), 1)
        _tiled[grid](x2d, qdata, scales, zeros_, bias_, xs_, out, out,
                     M, N, K, x2d.stride(0), out.stride(0), K, m_bucket, SPLIT=False, **flags)
        return
    gemv = _use_gemv(M, scheme)
    k_split, splits = _split_k(K, decode_splits(x2d, N, K),
                               max(_GEMV_GRANULE, group) if gemv else _K_GRANULE)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), splits)
    if gemv:
        part = out if splits == 1 else torch.empty((splits, 1, N), device=x2d.device,
                                                   dtype=torch.float32)
        _gemv[grid](x2d, qdata, scales, zeros_, bias_, out, part, N, K,
                    K if splits == 1 else k_split, out.stride(0), SCHEME=scheme, GROUP=group,
                    HAS_BIAS=has_bias, SPLIT=splits > 1)
        if splits > 1:
            _combine(part, scales, xs_, bias_, out, M, N, splits, scheme, has_bias)
        return
    if splits == 1:
        _decode[grid](x2d, qdata, scales, zeros_, bias_, xs_, out, out,
                      M, N, K, x2d.stride(0), out.stride(0), K, m_bucket, SPLIT=False, **flags)
        return
    part = torch.empty((splits, M, N), device=x2d.device,
                       dtype=torch.int32 if scheme == SCHEME_W8A8 else torch.float32)
    _decode[grid](x2d, qdata, scales, zeros_, bias_, xs_, out, part,
                  M, N, K, x2d.stride(0), out.stride(0), k_split, m_bucket, SPLIT=True, **flags)
    _combine(part, scales, xs_, bias_, out, M, N, splits, scheme, has_bias)


def _combine(part, scales, xs, bias, out, M: int, N: int, splits: int, scheme: int,
             has_bias: bool) -> None:
    """The K splits' partials (splits, M, N) summed in order, then the epilogue, into out."""
    block_n = 64 if INTERPRET else 128
    _combine_kernel[(triton.cdiv(N, block_n),)](
        part, scales, xs, bias, out, M, N, out.stride(0), splits,
        SCHEME=scheme, HAS_BIAS=has_bias, BLOCK_M=DECODE_MAX_M, BLOCK_N=block_n, num_warps=4)


def int8_matmul(x2d, qdata, scales, bias, out) -> None:
    """out = x2d @ (qdata * scales[:, None])^T (+ bias); qdata int8 (N, K), scales float32 (N,)."""
    _launch(SCHEME_INT8, x2d, qdata, scales, None, 1, bias, out)


def int4_matmul(x2d, qdata, scales, zeros, group_size, bias, out) -> None:
    """out = x2d @ ((q - zeros) * scales)^T (+ bias), groups of group_size (32, 64 or 128)
    along K; qdata uint8 (N, K // 2), low nibble = even k; scales float32, zeros uint8 (N, K // g)."""
    group_size = int(group_size)
    if group_size not in (32, 64, 128) or x2d.shape[1] % group_size:
        raise ValueError(f"int4_matmul: group_size {group_size} must be 32, 64 or 128 and "
                         f"divide K = {x2d.shape[1]}")
    _launch(SCHEME_INT4, x2d, qdata, scales, zeros, group_size, bias, out)


def quantize_rows(x2d):
    """Per-row int8 quantization of x2d (M, K), bit-exact with quantize_activations_reference:
    (xq int8 (M, K) contiguous, x_scale float32 (M,))."""
    M, K = x2d.shape
    xq = torch.empty((M, K), device=x2d.device, dtype=torch.int8)
    xs = torch.empty((M,), device=x2d.device, dtype=torch.float32)
    if M > 0:
        block = 256 if INTERPRET else min(4096, max(128, triton.next_power_of_2(K)))
        _quantize_rows_kernel[(M,)](x2d, xq, xs, K, x2d.stride(0), BLOCK_K=block,
                                    num_warps=4 if block <= 1024 else 8)
    return xq, xs


def w8a8_matmul(x2d, qdata, scales, bias, out) -> None:
    """out = (xq @ qdata^T as int32) * x_scale[:, None] * scales[None, :] (+ bias), xq and x_scale
    the per-row int8 quantization of x2d (see quantize_rows); qdata int8 (N, K)."""
    xq, xs = quantize_rows(x2d)
    _launch(SCHEME_W8A8, xq, qdata, scales, None, 1, bias, out, xs=xs)
