"""One call of each one-row (decoding) quantized-matmul kernel on a GPU, for a profiler.

    ncu --clock-control none --kernel-name regex:gemv --section SpeedOfLight \
        --section Occupancy --section WarpStateStats python benchmarks/quant_gemv_profile.py

The CUDA GEMV and the Triton decode and GEMV variants, int8 and int4 (group 128), bf16 x of one
row against a K x N weight (default a 7B layer's 4096 x 11008). Each case runs once after one
warm-up call (Triton compiles there; set LLMKERNELS_TRITON_AUTOTUNE=0 so that a profiler sees
one configuration, not the autotuner's sweep), then checks the result against the reference.
"""
from __future__ import annotations

import argparse
import sys

import torch

import llmkernels
from llmkernels.kernels import quant_matmul as triton_qmm
from llmkernels.reference.quant_matmul import quant_matmul_reference

CASES = (("cuda", None), ("triton", "decode"), ("triton", "gemv"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="4096x11008", help="KxN")
    p.add_argument("--schemes", default="int8,int4")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("quant_gemv_profile: no CUDA device is visible", file=sys.stderr)
        return 2
    K, N = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda") * 0.02
    x = torch.randn(1, K, device="cuda").to(torch.bfloat16)
    failed = 0
    for scheme in args.schemes.split(","):
        qw = llmkernels.quantize_weight(w, scheme, 128)
        ref = quant_matmul_reference(x, scheme, qw.qdata, qw.scales, qw.zeros, qw.group_size)
        for backend, variant in CASES:
            triton_qmm.FORCE_VARIANT = variant
            with torch.no_grad():
                llmkernels.quant_matmul(x, qw, backend=backend)  # warm-up (Triton compiles)
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_push(f"{scheme} {backend} {variant or ''}")
                got = llmkernels.quant_matmul(x, qw, backend=backend)
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_pop()
            err = ((got.float() - ref.float()).abs().max() /
                   ref.float().abs().max().clamp_min(1e-6)).item()
            ok = err <= 2 ** -7
            failed += not ok
            print(f"{scheme} {backend} {variant or '-'}: rel err {err:.2e} {'ok' if ok else 'FAIL'}",
                  flush=True)
    triton_qmm.FORCE_VARIANT = None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
