"""Input-gradient benchmark of the quantized matmul (training through frozen quantized layers,
QLoRA style): d loss / d x through QuantLinear against nn.Linear with a frozen weight.

    python benchmarks/quant_matmul_backward.py                 # K = N = 4096, M = 1..256
    python benchmarks/quant_matmul_backward.py --ms 16 --dtype fp32 --json out.json

ours    torch.autograd.grad through a QuantLinear: on the CPU its gradient kernel
        (csrc/cpu/quant_matmul_grad.h), on the GPU paths the sliced dequantization
sliced  the same call through the sliced dequantization (BACKWARD_SLICE_BYTES of float32
        weight rows at a time, then torch matmul): what every path ran before the kernel
linear  the same gradient through nn.Linear(K, N) with requires_grad=False on its weight (the
        dense layer the quantized one replaces; torch's fastest matmul for the dtype)

Only the backward is timed (the forward's graph is kept with retain_graph). Each case is
checked against grad_out @ dequantize(W) in float64 before it is timed; exit status 1 if a
check fails. Times are medians of interleaved blocks (harness.time_interleaved).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import llmkernels  # noqa: E402

quant_ops = sys.modules["llmkernels.ops.quant_matmul"]  # (the package exports the function too)
SCHEMES = ("int8", "int4", "w8a8")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class sliced_backward:
    """Within the block, the CPU path's backward takes the sliced dequantization."""

    def __enter__(self):
        self.kernel = quant_ops._grad_x_cpu
        quant_ops._grad_x_cpu = quant_ops._grad_x_sliced

    def __exit__(self, *exc):
        quant_ops._grad_x_cpu = self.kernel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=harness.default_device())
    p.add_argument("--ms", type=harness.positive_ints, default=[1, 16, 64, 256],
                   help="rows of x (tokens), comma list")
    p.add_argument("--shape", type=harness.comma_shapes, default=[(4096, 4096)],
                   help="K x N (one), e.g. 4096x11008")
    p.add_argument("--schemes", type=harness.comma_names(SCHEMES), default=["int8", "int4"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--min-run-time", type=float, default=0.3)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    harness.check_device(p, args.device)
    if len(args.shape) != 1:
        p.error("--shape takes one K x N")
    (K, N), = args.shape
    dev, dtype = args.device, DTYPES[args.dtype]
    info = harness.machine_info(dev)
    print(harness.format_machine(info))
    torch.manual_seed(0)
    linear = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dtype).requires_grad_(False)
    rows, cases, all_ok = [], [], True
    for scheme in args.schemes:
        layer = llmkernels.nn.QuantLinear.from_linear(linear, scheme, args.group_size)
        w = layer.dequantize().double()
        for M in args.ms:
            x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
            g = torch.randn(M, N, device=dev, dtype=dtype)
            out, out_dense = layer(x), linear(x)

            def ours():
                return torch.autograd.grad(out, (x,), g, retain_graph=True)[0]

            def sliced():
                with sliced_backward():
                    return ours()

            def dense():
                return torch.autograd.grad(out_dense, (x,), g, retain_graph=True)[0]

            ref = g.double() @ w
            # bound: twice the error of torch's matmul in x's dtype with the dequantized weight
            check = harness.check_close("grad_x", ours(), ref, atol=1e-6 * ref.abs().max().item(),
                                        baseline=g @ w.to(dtype), factor=2.0)
            all_ok &= check.ok
            t = harness.time_interleaved({"ours": ours, "sliced": sliced, "linear": dense},
                                         dev, args.min_run_time)
            ms = {k: v.median_s * 1e3 for k, v in t.items()}
            rows.append([M, scheme, "ok" if check.ok else "FAIL", ms["ours"], ms["sliced"],
                         ms["linear"], f"{ms['sliced'] / ms['ours']:.2f}x",
                         f"{ms['linear'] / ms['ours']:.2f}x"])
            cases.append({"m": M, "k": K, "n": N, "scheme": scheme, "dtype": args.dtype,
                          "correct": check.ok, "error": check.error, "bound": check.bound,
                          "ms": ms,
                          "vs_sliced": ms["sliced"] / ms["ours"],
                          "vs_linear": ms["linear"] / ms["ours"]})
            print(" ".join(harness.fmt(c) for c in rows[-1]), flush=True)
    print(f"\nK x N = {K} x {N}, {args.dtype}, d loss / d x only (speedups: their time / ours)")
    print(harness.format_table(["M", "scheme", "check", "ours ms", "sliced ms", "linear ms",
                                "vs sliced", "vs linear"], rows))
    if args.json:
        harness.write_json(args.json, {"benchmark": "quant_matmul_backward", "machine": info,
                                       "all_correct": all_ok, "cases": cases})
    return 0 if all_ok else 1


if __name__ == "__main__":
    harness.run_timed(main)
