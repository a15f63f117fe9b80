"""QuantizedWeight: a linear layer's weight stored in 8 or 4 bits (formats:
llmkernels/reference/quant_matmul.py), and quantize_weight(), which makes one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .reference.quant_matmul import (INT4_GROUP_SIZES, SCHEMES, dequantize_reference,
                                     is_int4_group_size, quantize_int4_reference,
                                     quantize_int8_reference)

SCHEME_CODES = {"int8": 0, "int4": 1, "w8a8": 2}


@dataclass
class QuantizedWeight:
    """Packed data, scales, zero points and what they stand for.

    scheme "int8" / "w8a8": qdata int8 (N, K), scales float32 (N,), zeros None.
    scheme "int4": qdata uint8 (N, K // 2), scales float32 (N, K // group_size),
    zeros uint8 (N, K // group_size). shape = (N, K) of the float weight; dtype its dtype.
    Saveable with torch.save (and loadable with torch.load(weights_only=True)).
    """
    scheme: str
    shape: Tuple[int, int]
    group_size: int
    qdata: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    dtype: torch.dtype

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def nbytes(self) -> int:
        """Bytes of packed data, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scales, self.zeros)
                   if t is not None)

    def dequantize(self) -> torch.Tensor:
        """The float weight these values stand for, in the original dtype."""
        self.validate()
        return dequantize_reference(self.scheme, self.qdata, self.scales, self.zeros,
                                    self.group_size).to(self.dtype)

    def to(self, device) -> "QuantizedWeight":
        """The same weight on another device (its dtypes are the format's, fixed)."""
        if isinstance(device, torch.dtype):
            raise TypeError("QuantizedWeight.to takes a device; the packed data, scales and "
                            "zero points keep the format's dtypes (dequantize() returns "
                            f"the weight in {self.dtype}), got dtype {device}")
        move = (lambda t: None if t is None else t.to(device))
        return QuantizedWeight(self.scheme, self.shape, self.group_size, move(self.qdata),
                               move(self.scales), move(self.zeros), self.dtype)

    def validate(self, where: str = "QuantizedWeight") -> None:
        """Raises ValueError/TypeError if the tensors do not match the scheme and shape (e.g.
        a corrupted or hand-edited checkpoint): never let a kernel read out of bounds.

        Remembers the last fields it passed (the tensors by identity, with their shapes and
        dtypes: `t.data = other` keeps the object, and the Triton kernels have no bounds
        checks of their own): a decoding step calls it once per layer, and the checks cost
        ~2.5 us."""
        # (torch.jit.trace checks its trace by tracing again: both traces must run the checks,
        # or their graphs differ in the checks' dead size reads)
        passed = None if torch.jit.is_tracing() else self.__dict__.get("_validated")
        qdata, scales, zeros = self.qdata, self.scales, self.zeros
        # Straight-line comparisons (a zip over the fields took ~1.5 us of a ~20 us call).
        if (passed is not None and passed[3] is qdata and passed[4] is scales
                and passed[5] is zeros and passed[6] == qdata.dtype
                and passed[0] == self.scheme and passed[1] == self.shape
                and passed[2] == self.group_size and passed[7] == qdata.shape
                and passed[8] == scales.shape and passed[9] == scales.dtype
                and (zeros is None or (passed[10] == zeros.shape
                                       and passed[11] == zeros.dtype))):
            return
        self._check(where)
        self.__dict__["_validated"] = (
            self.scheme, self.shape, self.group_size, qdata, scales, zeros, qdata.dtype,
            qdata.shape, scales.shape, scales.dtype, None if zeros is None else zeros.shape,
            None if zeros is None else zeros.dtype)

    # Records kept in __dict__ for the calls: never saved, never taken from a file (a crafted
    # record of a pass skipped every check; a crafted kernel plan held pointers).
    _RUNTIME_RECORDS = ("_validated", "_cpu_plan")

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in self._RUNTIME_RECORDS:
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update({k: v for k, v in state.items() if k not in self._RUNTIME_RECORDS})

    def _check(self, where: str) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"{where}: unknown scheme {self.scheme!r}; expected one of {SCHEMES}")
        if len(self.shape) != 2 or min(self.shape) < 0:
            raise ValueError(f"{where}: shape must be (out_features, in_features), got {self.shape}")
        N, K = (int(s) for s in self.shape)

        def expect(name, t, dtype, shape):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise TypeError(f"{where}: {name} must be {dtype}, got {t.dtype}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{where}: {name} must have shape {shape} for scheme "
                                 f"{self.scheme!r} and weight shape {(N, K)}, got {tuple(t.shape)}")
            if t.device != self.qdata.device:
                raise ValueError(f"{where}: {name} is on {t.device}, qdata on {self.qdata.device}")

        if self.scheme in ("int8", "w8a8"):
            expect("qdata", self.qdata, torch.int8, (N, K))
            expect("scales", self.scales, torch.float32, (N,))
            if self.zeros is not None:
                raise ValueError(f"{where}: scheme {self.scheme!r} has no zero points")
        else:
            g = self.group_size
            if not is_int4_group_size(g) or K % g:
                raise ValueError(f"{where}: int4 needs group_size in {INT4_GROUP_SIZES} dividing "
                                 f"in_features={K}, got {g}")
            expect("qdata", self.qdata, torch.uint8, (N, K // 2))
            expect("scales", self.scales, torch.float32, (N, K // g))
            expect("zeros", self.zeros, torch.uint8, (N, K // g))


def quantize_weight(weight: torch.Tensor, scheme: str, group_size: int = 128) -> QuantizedWeight:
    """Round-to-nearest quantization of a (out_features, in_features) float weight.

    scheme: "int8" (weight-only, per-channel symmetric), "int4" (weight-only, groups of
    group_size in {32, 64, 128} along in_features, asymmetric), or "w8a8" (int8 weights;
    activations quantized per token at run time).
    """
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        raise TypeError("quantize_weight: weight must be a floating-point tensor")
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight: weight must be 2-D (out_features, in_features), got "
                         f"shape {tuple(weight.shape)}")
    if scheme not in SCHEMES:
        raise ValueError(f"quantize_weight: scheme must be one of {SCHEMES}, got {scheme!r}")
    if not torch.isfinite(weight).all():
        raise ValueError("quantize_weight: weight holds NaN or Inf")
    N, K = weight.shape
    if K == 0 or N == 0:
        raise ValueError(f"quantize_weight: weight of shape {tuple(weight.shape)} is empty")
    w = weight.detach()
    if scheme == "int4":
        if not is_int4_group_size(group_size):
            raise ValueError(f"quantize_weight: int4 group_size must be one of "
                             f"{INT4_GROUP_SIZES} (an int), got {group_size!r}")
        group_size = int(group_size)
        if K % group_size:
            raise ValueError(f"quantize_weight: in_features={K} is not a multiple of "
                             f"group_size={group_size}")
        qdata, scales, zeros = quantize_int4_reference(w, group_size)
        if not bool(torch.isfinite(scales).all()):  # max - min overflowed (|w| near 3.4e38)
            raise ValueError("quantize_weight: int4 needs each group's max - min within "
                             "float32's range; this weight's values span more")
        return QuantizedWeight(scheme, (N, K), group_size, qdata, scales, zeros, weight.dtype)
    qdata, scales = quantize_int8_reference(w)
    return QuantizedWeight(scheme, (N, K), 0, qdata, scales, None, weight.dtype)


# torch.load(weights_only=True), the default since torch 2.6, unpickles only allowlisted types.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([QuantizedWeight])
