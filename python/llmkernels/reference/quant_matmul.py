"""Reference quantization and quantized matmul: plain PyTorch, the specification of the kernels.

Formats of a linear weight W (N out-features x K in-features):
  int8  (W8A16): qdata int8 (N, K); scales float32 (N,); symmetric per output channel:
        scale = max|W[n]| * (1/127), q = clamp(round(W / scale), -127, 127), W ~ q * scale.
  int4  (W4A16): groups of `group_size` along K; qdata uint8 (N, K // 2), two values per byte,
        element 2j in the low nibble and 2j+1 in the high one; scales float32 (N, K // group);
        zeros uint8 (N, K // group), integer zero points in 0..15; asymmetric with zero inside
        the range: lo = min(min W_g, 0), hi = max(max W_g, 0), scale = (hi - lo) * (1/15),
        zero = clamp(round(-lo / scale), 0, 15), q = clamp(round(W / scale) + zero, 0, 15),
        W ~ (q - zero) * scale.
  w8a8: weights as int8; activations quantized per row (token) on the fly:
        x_scale = max|x[m]| * (1/127), xq = clamp(round(x / x_scale), -127, 127);
        out = (xq @ q^T as exact int32) * x_scale[m] * scale[n].
A group or row that is all zeros gets scale 1 (q = zero point). torch.round rounds half to even.
Scales multiply by the float32 reciprocal (1/127, 1/15) rather than divide: torch divides by a
scalar that way on CUDA but truly on the CPU, so a division would make the reference (and the
quantized values) differ in the last bit between devices.

quant_matmul_reference(x, ...): out = x @ dequantize(W)^T (+ bias) computed in float32 and
returned in x's dtype (int8, int4); w8a8 as above.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from .._transforms import functorch_active

SCHEMES = ("int8", "int4", "w8a8")
INT4_GROUP_SIZES = (32, 64, 128)


def is_int4_group_size(group_size) -> bool:
    """group_size is one of INT4_GROUP_SIZES as an integer (32.0 would pass `in` and then
    break every shape computed from it)."""
    return (isinstance(group_size, numbers.Integral) and not isinstance(group_size, bool)
            and int(group_size) in INT4_GROUP_SIZES)


def quantize_int8_reference(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    scales = w.abs().amax(dim=1) * (1.0 / 127.0)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.clamp(torch.round(w / scales[:, None]), -127, 127).to(torch.int8)
    return q, scales


def quantize_int4_reference(w: torch.Tensor, group_size: int
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)
    lo = torch.clamp(g.amin(dim=-1), max=0.0)
    hi = torch.clamp(g.amax(dim=-1), min=0.0)
    scales = (hi - lo) * (1.0 / 15.0)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.clamp(torch.round(-lo / scales), 0, 15)
    q = torch.clamp(torch.round(g / scales[..., None]) + zeros[..., None], 0, 15)
    q = q.to(torch.uint8).reshape(N, K)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scales, zeros.to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 values 0..15 (low nibble first)."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def dequantize_reference(scheme: str, qdata: torch.Tensor, scales: torch.Tensor,
                         zeros: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    """The float32 (N, K) weight the quantized data stands for. (One float32 buffer, computed
    in place: the backward dequantizes slices of it under a memory budget. Under torch.func
    transforms out of place: vmap over an ensemble's weights cannot write them into a fresh
    buffer.)"""
    if functorch_active():
        if scheme in ("int8", "w8a8"):
            return qdata.float() * scales[:, None]
        N, K = qdata.shape[0], qdata.shape[1] * 2
        w = unpack_int4(qdata).float().view(N, K // group_size, group_size)
        return ((w - zeros.float()[..., None]) * scales[..., None]).view(N, K)
    if scheme in ("int8", "w8a8"):
        return qdata.float().mul_(scales[:, None])
    N, K = qdata.shape[0], qdata.shape[1] * 2
    w = torch.empty((N, K // 2, 2), dtype=torch.float32, device=qdata.device)
    w[..., 0] = qdata & 0x0F  # low nibble first, as unpack_int4
    w[..., 1] = qdata >> 4
    w = w.view(N, K // group_size, group_size)
    w.sub_(zeros.float()[..., None]).mul_(scales[..., None])
    return w.view(N, K)


def quantize_activations_reference(x2d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization of (M, K) activations: (xq int8, x_scale float32).
    A row holding a NaN or an infinity gets a NaN scale, so that its outputs are NaN."""
    x = x2d.float()
    s = x.abs().amax(dim=1) * (1.0 / 127.0)
    s = torch.where(s > 0, s, torch.ones_like(s))
    s = torch.where(torch.isfinite(x).all(dim=1), s, torch.full_like(s, float("nan")))
    xq = torch.clamp(torch.round(x / s[:, None]), -127, 127).to(torch.int8)
    return xq, s


def quant_matmul_reference(x: torch.Tensor, scheme: str, qdata: torch.Tensor,
                           scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int,
                           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (..., K) times the quantized weight's transpose: (..., N) in x's dtype."""
    K = x.shape[-1]
    x2d = x.reshape(-1, K)
    if scheme == "w8a8":
        xq, xs = quantize_activations_reference(x2d)
        # exact: |products| <= 127^2 and K < 2^37 keeps the float64 sum an integer
        acc = xq.double() @ qdata.double().t()
        out = acc.float() * xs[:, None] * scales[None, :]
    else:
        out = x2d.float() @ dequantize_reference(scheme, qdata, scales, zeros, group_size).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], qdata.shape[0])
