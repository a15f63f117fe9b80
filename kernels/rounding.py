"""What the Triton kernels share about the interpreter: whether it runs them, and float32 ->
16-bit conversions that round as a GPU's do (the interpreter, triton 3.6 and 3.9, truncates
float32 -> bfloat16, even with fp_downcast_rounding="rtne")."""
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERP = tl.constexpr(INTERPRET)


@triton.jit
def cast(v, DTYPE: tl.constexpr):
    """v.to(DTYPE), rounding to nearest even (NaN stays a quiet NaN). On a GPU this is
    v.to(DTYPE) (cvt.rn); under the interpreter bfloat16 is rounded from the bits (truncation
    doubled the error of attention's bf16 outputs: always toward zero, up to a whole ulp)."""
    if _INTERP and DTYPE == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        quiet = bits | 0x400000
        bits = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, quiet, rounded)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)
