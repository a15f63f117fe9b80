"""Attention dropout benchmark (training BERT / GPT-2 style models, attention dropout 0.1):
ours against torch SDPA, both with the same dropout_p.

    python benchmarks/attention_dropout.py                    # default cases
    python benchmarks/attention_dropout.py --seqlens 1024 --dtypes fp32 --json out.json

Paths: ours = llmkernels.scaled_dot_product_attention(dropout_p=p) (the CPU kernel fuses
dropout); sdpa = torch's SDPA with dropout_p=p (on the CPU its fused kernels take no dropout:
it runs the unfused math); ours-p0 and sdpa-p0 = both without dropout (what the dropout costs).
Forward and forward+backward are timed in alternation (harness.time_interleaved). Each case
is first checked: our output and gradients against the float64 math with the weights our
call kept (llmkernels.ops.attention_dropout.keep_mask, the seed replayed from torch's
generator), every batch entry, the first head; exit status 1 if a check fails.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import llmkernels  # noqa: E402
from llmkernels.ops.attention_dropout import draw_seed, keep_mask  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "fwd+bwd")
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -6, torch.float16: 2.0 ** -9}
SEED = 1234


def mode_call(fn, mode, inputs, grad_out):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return (fn(*inputs),)
        return call
    leaves = [t.detach().requires_grad_() for t in inputs]

    def call():
        out = fn(*leaves)
        return (out.detach(),) + torch.autograd.grad(out, leaves, grad_out)
    return call


def check(ours, inputs, grad_out, p, causal, dtype):
    """ours (out, dq, dk, dv) of a call made right after torch.manual_seed(SEED), against the
    float64 math with the weights that call kept: batch entries all, head 0."""
    torch.manual_seed(SEED)
    seed = int(draw_seed())
    B, H, L, _ = inputs[0].shape
    S = inputs[1].shape[-2]
    keep = keep_mask(seed, (B, H, L, S), p)[:, :1].double() / (1 - p)
    q, k, v = (t[:, :1].double().requires_grad_() for t in inputs)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
    out = (torch.softmax(s, -1) * keep) @ v
    exact = (out,) + torch.autograd.grad(out, (q, k, v), grad_out[:, :1].double())
    checks = []
    for name, got, ref in zip(("out", "dq", "dk", "dv"), ours, exact):
        atol = ATOL[dtype] * max(ref.abs().max().item(), 1.0)
        checks.append(harness.check_close(name, got[:, :1], ref, atol=atol))
    return max(checks, key=lambda c: c.error / c.bound)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=harness.positive_int, default=8)
    p.add_argument("--seqlens", type=harness.positive_ints, default=[512])
    p.add_argument("--heads", type=harness.positive_int, default=12)
    p.add_argument("--head-dim", type=harness.positive_int, default=64)
    p.add_argument("--dtypes", type=harness.comma_names(tuple(DTYPES)), default=["fp32", "bf16"])
    p.add_argument("--dropout", type=float, default=0.1, help="dropout_p (default 0.1)")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--min-run-time", type=float, default=0.3)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if not 0.0 < args.dropout < 1.0:
        p.error(f"--dropout must be in (0, 1), got {args.dropout}")
    info = harness.machine_info("cpu")
    print(harness.format_machine(info), flush=True)
    modes = MODES[:1] if args.no_backward else MODES
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    drop = args.dropout
    rows, records, failed = [], [], 0
    for dt_name in args.dtypes:
        dtype = DTYPES[dt_name]
        for S in args.seqlens:
            for causal in causals:
                B, H, D = args.batch, args.heads, args.head_dim
                torch.manual_seed(0)
                q, k, v = (torch.randn(B, H, S, D, dtype=dtype) for _ in range(3))
                grad_out = torch.randn_like(q)
                fns = {
                    "ours": lambda q, k, v: llmkernels.scaled_dot_product_attention(
                        q, k, v, dropout_p=drop, is_causal=causal),
                    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(
                        q, k, v, dropout_p=drop, is_causal=causal),
                    "ours-p0": lambda q, k, v: llmkernels.scaled_dot_product_attention(
                        q, k, v, is_causal=causal),
                    "sdpa-p0": lambda q, k, v: F.scaled_dot_product_attention(
                        q, k, v, is_causal=causal),
                }
                served = llmkernels.explain(llmkernels.scaled_dot_product_attention, q, k, v,
                                            dropout_p=drop, is_causal=causal).backend
                torch.manual_seed(SEED)
                got = mode_call(fns["ours"], modes[-1], (q, k, v), grad_out)()
                c = check(got, (q, k, v), grad_out, drop, causal, dtype)
                failed += not c.ok
                rec = dict(dtype=dt_name, causal=causal, batch=B, seqlen=S, heads=H, head_dim=D,
                           dropout_p=drop, served_by=served, correct=c.ok, check=c.name,
                           err=c.error, bound=c.bound, modes={})
                for mode in modes:
                    calls = {name: mode_call(fn, mode, (q, k, v), grad_out)
                             for name, fn in fns.items()}
                    timed = harness.time_interleaved(calls, "cpu", args.min_run_time)
                    ms = {name: t.median_s * 1e3 for name, t in timed.items()}
                    rec["modes"][mode] = dict(ms=ms, speedup_vs_sdpa=ms["sdpa"] / ms["ours"],
                                              dropout_cost=ms["ours"] / ms["ours-p0"])
                    rows.append([dt_name, "yes" if causal else "no", str(B), str(S), str(H),
                                 str(D), mode, served, "ok" if c.ok else "FAIL",
                                 f"{ms['ours']:.4g}", f"{ms['sdpa']:.4g}", f"{ms['ours-p0']:.4g}",
                                 f"{ms['sdpa-p0']:.4g}", f"{ms['sdpa'] / ms['ours']:.2f}x",
                                 f"{ms['ours'] / ms['ours-p0']:.2f}x"])
                    print(" ".join(rows[-1]), flush=True)
                records.append(rec)
    print()
    print(harness.format_table(["dtype", "causal", "B", "S", "H", "D", "mode", "ours path",
                                "check", "ours ms", "sdpa ms", "ours-p0 ms", "sdpa-p0 ms",
                                "vs sdpa", "dropout cost"], rows))
    print(f"\nall with dropout_p={drop} except the -p0 columns; dropout cost: ours over ours-p0")
    if args.json:
        harness.write_json(args.json, {"benchmark": "attention_dropout", "machine": info,
                                       "cases": records})
    if failed:
        print(f"CORRECTNESS FAILED for {failed} case(s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    harness.run_timed(main)
