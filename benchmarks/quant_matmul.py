"""Quantized matmul benchmark: our int8 / int4 / W8A8 kernels against PyTorch's, one run.

    python benchmarks/quant_matmul.py                  # K = N = 4096 and a 7B model's layers
    python benchmarks/quant_matmul.py --quick          # seconds: a smoke test
    python benchmarks/quant_matmul.py --ms 1,16 --shapes 4096x4096 --json out.json

For every (M, K, N) and scheme it first checks our output against the float64 result on the
same quantized weights (and, for w8a8, activations): the error may be 2x that of PyTorch's
F.linear in the same dtype on the dequantized weight plus a floor (int8 / int4), or the
output's rounding (w8a8: exact int8 products); and again with float32 x wherever the same
path takes it: float products, so a bound of ~1e-5 for every scheme, where bf16 x may have
been quantized to int8. Then it times, side by side:
  ours       llmkernels.quant_matmul (the path selection picks; named in the output)
  f32        F.linear in float32 (the unquantized layer)
  bf16       F.linear in bfloat16
  int8pack   torch.ops.aten._weight_int8pack_mm with bf16 activations (int8 rows; its fastest
             variant on the CPU)
  int4pack   torch.ops.aten._weight_int4pack_mm_for_cpu (int4 rows; CPU only)
GB/s counts the weight bytes a call must read (packed data + scales), against the machine's
read bandwidth measured in the same run (a large float32 sum). Every path cycles through copies
of its weight totalling at least --rotate-mib (256 MiB), so memory-bound cases read DRAM, not
cache (ours' total is printed: "MiB cycled").
Exit status 1 if a check fails.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import llmkernels  # noqa: E402
from llmkernels.backends import BackendError  # noqa: E402
from llmkernels.ops.quant_matmul import cpu_int8_activations  # noqa: E402
from llmkernels.reference.quant_matmul import (  # noqa: E402
    dequantize_reference, quantize_activations_reference)

# (K, N) of a 7B (LLaMA-2) decoder layer: q/k/v/o, gate/up, down.
MODEL_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
SCHEMES = ("int8", "int4", "w8a8")


class Rotating:
    """Calls fn(copy) over several copies of a weight (a tuple of tensors, made into fn's
    argument by assemble), in turn, so that together they take at least rotate_bytes, beyond
    the last-level cache: a memory-bound kernel timed on one small weight would read it from
    cache (a 16 MiB int8 weight fits the 32 MiB L3 of a Zen 4) and look faster than DRAM
    allows. self.mib: the total cycled."""

    def __init__(self, tensors, fn, rotate_bytes: int, assemble=lambda ws: ws):
        nbytes = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        n = max(1, -(-rotate_bytes // max(nbytes, 1))) if rotate_bytes else 1
        columns = [_copies(t, n) if t is not None else [None] * n for t in tensors]
        self.weights = [assemble(ws) for ws in zip(*columns)]
        self.fn, self.i, self.mib = fn, 0, n * nbytes / 2**20

    def __call__(self):
        self.i = (self.i + 1) % len(self.weights)
        return self.fn(self.weights[self.i])


def _copies(t: torch.Tensor, n: int) -> List[torch.Tensor]:
    """n copies of t, views of one allocation, each 64-byte aligned as a tensor of its own
    would be: thousands of separate small clones (a small weight's 256 MiB) took a minute on
    a busy 2-core VM, in page faults."""
    row = -(-t.numel() * t.element_size() // 64) * 64 // t.element_size()
    buf = torch.empty(n, row, dtype=t.dtype, device=t.device)
    buf[:, :t.numel()] = t.reshape(1, -1)
    return [r[:t.numel()].view(t.shape) for r in buf]


# torch's aten._weight_int8pack_mm crashes the process (SIGSEGV; torch 2.13 CPU build) for
# more than one row when K is not a multiple of this (K = 100, 104, 120 at M = 4, 5, 8; one
# row ran): that baseline is left out for such K, every M alike, rather than lose the run.
INT8PACK_K_MULTIPLE = 16


def check_cases(p, args, ms, shapes, xdtype) -> None:
    """Ask the library about every (shape, scheme, M) before timing: a weight it cannot
    quantize (int4: --group-size, K) or a --backend that cannot serve the call is a usage
    error now, not a traceback after the bandwidth measurement. The weights have the real K
    and a few rows (N does not decide a path here)."""
    for K, N in shapes:
        for scheme in args.schemes:
            with harness.usage_errors(p, f"{scheme} {K}x{N}"):
                qw = llmkernels.quantize_weight(torch.randn(8, K, device=args.device) * 0.02,
                                                scheme, args.group_size)
            for M in ms:
                x = torch.empty(M, K, dtype=xdtype, device=args.device)
                with harness.usage_errors(p, f"--backend {args.backend}" if args.backend
                                          else f"{scheme} {K}x{N}"):
                    llmkernels.explain(llmkernels.quant_matmul, x, qw, backend=args.backend)


def torch_int4pack(w: torch.Tensor, group: int, x: torch.Tensor, rotate_bytes: int):
    """torch's CPU int4 path for the same scheme (its own packing): (a callable, None), or
    (None, why not) when torch cannot run it here."""
    try:
        N, K = w.shape
        g = w.float().reshape(N, K // group, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.clamp(torch.round((g - lo[..., None]) / scale[..., None]), 0, 15)
        q = q.reshape(N, K).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # torch's zero point is the float value at q = 8: w = (q - 8) * scale + zero
        zero = lo + 8 * scale
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(x.dtype)
        fn = Rotating((packed, sz),
                      lambda ws: torch.ops.aten._weight_int4pack_mm_for_cpu(x, ws[0], group, ws[1]),
                      rotate_bytes)
        fn()
        return fn, None
    except Exception as exc:  # e.g. a torch build without the op: say so, leave it out
        return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


# Floors of the bound on our error relative to max|exact| (check_call): products of float
# (or int8) values summed in float32, or bf16 x quantized to int8 per 32 values by the CPU
# kernels: up to 2.9x F.linear's bf16 error, 8.4e-3 (a flat 2^-7 = 7.8e-3 had correct kernels
# within 2% of failing); with this floor at most 0.75 of the bound (K, N up to 11008, M up to
# 256, 3 seeds; Zen 4, avx512_bf16 tier).
FLOOR, FLOOR_INT8_X = 1e-5, 2.0 ** -8


def check_call(x, qw, deq, backend, served: str) -> harness.Check:
    """Our output for x against the float64 result on the same quantized weight (deq: its
    float32 dequantization), relative to max|exact|. int8 / int4: DESIGN.md's bound, 2x the
    error of F.linear in x's dtype on deq plus a floor. w8a8: the int8 products are exact,
    so only the float32 scaling and the output's rounding to x's dtype (half its eps) err."""
    if qw.scheme == "w8a8":
        xq, xs = quantize_activations_reference(x)
        exact = (xq.double() @ qw.qdata.double().t()) * xs.double()[:, None] * qw.scales.double()
        base, atol = None, torch.finfo(x.dtype).eps / 2 + FLOOR
    else:
        exact = x.double() @ deq.double().t()
        base = F.linear(x, deq.to(x.dtype)).double()
        atol = (FLOOR_INT8_X if served == "cpu" and cpu_int8_activations(x, qw) else FLOOR)
    scale = exact.abs().max().item() or 1.0
    got = llmkernels.quant_matmul(x, qw, backend=backend).double()
    return harness.check_close(qw.scheme, got / scale, exact / scale, atol=atol,
                               baseline=None if base is None else base / scale)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=harness.default_device())
    p.add_argument("--ms", type=harness.positive_ints, default=None,
                   help="comma list of M (default 1,16,64; +4096 on CUDA)")
    p.add_argument("--shapes", type=harness.comma_shapes, default=None,
                   help="comma list of KxN (default 4096x4096 and a 7B layer's shapes)")
    p.add_argument("--schemes", type=harness.comma_names(SCHEMES), default=list(SCHEMES),
                   help="comma list (default int8,int4,w8a8)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group (32, 64 or 128, "
                   "dividing every K; default 128)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="activation dtype for ours (default bf16)")
    p.add_argument("--backend", default=None, help="force our path (cpu, triton, cuda, reference)")
    p.add_argument("--min-run-time", type=float, default=None)
    p.add_argument("--rotate-mib", type=int, default=256,
                   help="cycle through copies of each weight totalling this much, so that "
                   "timings read memory, not cache (0: one copy)")
    p.add_argument("--no-graph", dest="graph", action="store_false",
                   help="CUDA: skip the CUDA-graph timings of M <= 16 (kernels without host "
                   "launch costs)")
    p.add_argument("--triton-variant", choices=("auto", "tiled", "decode", "gemv"),
                   default="auto", help="the Triton kernel variant (with --backend triton): "
                   "gemv is the one-row kernel, opt-in until a GPU has timed it")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    dev = args.device
    if args.triton_variant != "auto":
        if (args.backend or "").lower() != "triton":
            p.error("--triton-variant needs --backend triton")
        from llmkernels.kernels import quant_matmul as triton_qmm
        triton_qmm.FORCE_VARIANT = args.triton_variant
    harness.check_device(p, dev)
    if args.quick:
        ms, shapes, mrt = [1, 5], [(256, 384)], args.min_run_time or 0.01
    else:
        ms = [1, 16, 64] + ([4096] if dev == "cuda" else [])
        shapes = [(4096, 4096)] + MODEL_SHAPES[1:]
        mrt = args.min_run_time or 0.2
    ms = args.ms or ms
    shapes = args.shapes or shapes
    xdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    schemes = args.schemes
    check_cases(p, args, ms, shapes, xdtype)

    info = harness.machine_info(dev)
    print(harness.format_machine(info))
    reader = harness.read_sum(dev)
    bw = harness.READ_BYTES / harness.time_fn(reader, dev, mrt).median_s / 1e9
    print(f"read bandwidth (float32 sum of 256 MiB): {bw:.1f} GB/s; each case's '% read bw' "
          "uses the sum timed in alternation with it\n", flush=True)
    torch.manual_seed(0)
    records: List[Dict] = []
    rows = []
    failed = 0
    int8pack_left_out = set()  # the K for which it is
    int4pack_left_out: Dict[str, List[str]] = {}  # why: the MxKxN cases
    for K, N in shapes:
        w = torch.randn(N, K, device=dev) * 0.02
        w_bf16 = w.to(torch.bfloat16)
        qws = {s: llmkernels.quantize_weight(w, s, args.group_size) for s in schemes}
        deqs = {s: dequantize_reference(s, q.qdata, q.scales, q.zeros, q.group_size)
                for s, q in qws.items()}
        w_i8 = qws.get("int8") or llmkernels.quantize_weight(w, "int8")
        for M in ms:
            x32 = torch.randn(M, K, device=dev)
            x = x32.to(xdtype)
            xb = x32.to(torch.bfloat16)
            rot = args.rotate_mib << 20
            base = {"f32": Rotating((w,), lambda ws: F.linear(x32, ws[0]), rot),
                    "bf16": Rotating((w_bf16,), lambda ws: F.linear(xb, ws[0]), rot)}
            if dev == "cpu" and K % INT8PACK_K_MULTIPLE:
                int8pack_left_out.add(K)
            elif dev == "cpu":
                s_bf = w_i8.scales.to(torch.bfloat16)
                base["int8pack"] = Rotating(
                    (w_i8.qdata,), lambda ws: torch.ops.aten._weight_int8pack_mm(xb, ws[0], s_bf),
                    rot)
                fn4, why = (torch_int4pack(w, args.group_size, xb, rot) if "int4" in schemes
                            else (None, None))
                if fn4 is not None:
                    base["int4pack"] = fn4
                elif why:
                    int4pack_left_out.setdefault(why, []).append(f"{M}x{K}x{N}")
            with torch.no_grad():
                checked = []
                for scheme in schemes:
                    qw = qws[scheme]
                    served = llmkernels.explain(llmkernels.quant_matmul, x, qw,
                                                backend=args.backend).backend
                    check = check_call(x, qw, deqs[scheme], args.backend, served)
                    # float32 x too, on the same path: its products are float, so the bound is
                    # tight where bf16 x may be quantized (a scale 0.5% off passed that)
                    check32 = None
                    if xdtype != torch.float32:
                        try:
                            same = llmkernels.explain(llmkernels.quant_matmul, x32, qw,
                                                      backend=args.backend).backend == served
                        except BackendError:  # e.g. the CUDA kernels take no float32 x
                            same = False
                        if same:
                            check32 = check_call(x32, qw, deqs[scheme], args.backend, served)
                    ok = check.ok and (check32 is None or check32.ok)
                    failed += not ok
                    ours = Rotating((qw.qdata, qw.scales, qw.zeros),
                                    lambda q: llmkernels.quant_matmul(x, q, backend=args.backend),
                                    rot, lambda ws, qw=qw: llmkernels.QuantizedWeight(
                                        qw.scheme, qw.shape, qw.group_size, *ws, qw.dtype))
                    checked.append((scheme, qw, served, ok, check, check32, ours))
                # One timing of the baselines, every scheme and the read-bandwidth sum, in
                # alternation on the CPU: this machine's memory speed drifts from one minute
                # to the next, and timed one after the other the drift went into the ratios.
                fns = dict(base, _read=reader)
                fns.update({f"ours:{c[0]}": c[-1] for c in checked})
                timed = harness.time_interleaved(fns, dev, mrt)
                times = {name: timed[name].median_s for name in base}
                case_bw = harness.READ_BYTES / timed["_read"].median_s / 1e9
                for scheme, qw, served, ok, check, check32, ours in checked:
                    t = timed[f"ours:{scheme}"].median_s
                    graph_cells = []
                    if dev == "cuda" and args.graph and M <= 16:
                        # kernels alone: every weight copy once per replay (no host costs;
                        # they matter for decoding-sized calls only)
                        def replayed(fn):
                            n = len(fn.weights)
                            return harness.time_fn(harness.graphed(fn, n), dev, mrt).median_s / n
                        g_ours = replayed(ours)
                        g_base = {k: replayed(v) for k, v in base.items()}
                        graph_cells = [f"{g_ours * 1e6:.1f}", f"{qw.nbytes / g_ours / 1e9:.1f}",
                                       f"{g_base['bf16'] / g_ours:.2f}x"]
                    gbs = qw.nbytes / t / 1e9
                    rec = dict(M=M, K=K, N=N, scheme=scheme, path=served, correct=ok,
                               rel_err=check.error, rel_err_torch=check.baseline_error,
                               rel_bound=check.bound,
                               rel_err_f32_x=check32.error if check32 else None,
                               rel_bound_f32_x=check32.bound if check32 else None,
                               rotated_mib=ours.mib, ours_us=t * 1e6, weight_gbs=gbs,
                               read_bandwidth_gbs=case_bw, pct_bandwidth=100 * gbs / case_bw,
                               **{f"{k}_us": v * 1e6 for k, v in times.items()},
                               **{f"vs_{k}": v / t for k, v in times.items()})
                    if graph_cells:
                        rec.update(graph_ours_us=g_ours * 1e6, graph_weight_gbs=qw.nbytes / g_ours / 1e9,
                                   **{f"graph_{k}_us": v * 1e6 for k, v in g_base.items()},
                                   **{f"graph_vs_{k}": v / g_ours for k, v in g_base.items()})
                    records.append(rec)
                    ratios = " ".join(f"{v / t:5.2f}x {k}" for k, v in times.items())
                    if dev == "cpu" and "int8pack" not in times:  # absent, see the note
                        ratios += f" {'-':>6} int8pack*"
                    rows.append([f"{M}", f"{K}x{N}", scheme, served, "ok" if ok else "FAIL",
                                 f"{check.error:.1e}", harness.fmt(check.baseline_error, ".1e"),
                                 harness.fmt(check32.error if check32 else None, ".1e"),
                                 harness.fmt(ours.mib, ".3g"), f"{t * 1e6:.1f}", f"{gbs:.1f}",
                                 f"{100 * gbs / case_bw:.0f}%", ratios]
                                + graph_cells)
                    print(" ".join(rows[-1]), flush=True)
    print()
    width = max((len(r) for r in rows), default=0)
    print(harness.format_table(["M", "KxN", "scheme", "ours path", "check", "err",
                                "torch err", "f32-x err", "MiB cycled", "ours us",
                                "weight GB/s", "% read bw", "speedup vs baselines"]
                                + (["graph ours us", "graph GB/s", "graph vs bf16"]
                                   if dev == "cuda" and args.graph else []),
                                [r + ["-"] * (width - len(r)) for r in rows]))
    print(f"\nactivations {args.dtype}; int4 group {args.group_size}; baselines: f32/bf16 "
          "F.linear, int8pack = aten._weight_int8pack_mm (bf16 x), int4pack = "
          "aten._weight_int4pack_mm_for_cpu (bf16 x)")
    print("err: ours' max error over max|output| against float64 on the same quantized weight; "
          "torch err: F.linear's in the same dtype on the dequantized weight (the check allows "
          "2x + a floor; w8a8: the output's rounding); f32-x err: ours with float32 x (bound "
          "~1e-5); MiB cycled: ours' weight copies (--rotate-mib)")
    if any(r["path"] == "reference" for r in records):
        print("note: 'ours' was the library's reference path, whose dequantization (and w8a8 "
              "activation quantization) the float64 result reuses: the check tests its "
              "precision only")
    for why, where in int4pack_left_out.items():
        print(f"note: int4pack left out for MxKxN = {', '.join(where)}: torch raised {why}")
    if int8pack_left_out:
        print(f"* int8pack left out for K = {', '.join(map(str, sorted(int8pack_left_out)))}: "
              "aten._weight_int8pack_mm crashes the process (segfault) on this CPU build when "
              f"K % {INT8PACK_K_MULTIPLE} != 0")
    if args.json:
        harness.write_json(args.json, {"benchmark": "quant_matmul", "machine": info,
                                       "read_bandwidth_gbs": bw, "activation_dtype": args.dtype,
                                       "group_size": args.group_size,
                                       "triton_variant": args.triton_variant,
                                       "int8pack_left_out_k": sorted(int8pack_left_out),
                                       "int4pack_left_out": int4pack_left_out, "cases": records})
    if failed:
        print(f"CORRECTNESS FAILED for {failed} case(s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    harness.run_timed(main)
