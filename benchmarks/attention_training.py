"""Attention features of training, ours against torch SDPA given the same call:

    python benchmarks/attention_training.py                          # both features
    python benchmarks/attention_training.py --features bias --seqlens 197 --batch 32

Features (--features):
  dropout  attention dropout (--dropout, default 0.1: BERT's and GPT-2's configs)
  bias     a learned attention bias: a float mask (1, H, S, S) that requires grad, broadcast
           over the batch (relative position biases), its gradient computed too

Paths: ours = llmkernels.scaled_dot_product_attention with the feature; sdpa = torch's SDPA
with it (on the CPU its fused kernels take neither: it runs its unfused math); ours-plain and
sdpa-plain = both without it (what the feature costs). Forward (no_grad) and forward+backward
are timed in alternation (harness.time_interleaved). Each case is first checked: our output
and gradients (the bias's included) against the float64 math (with dropout, the weights our
call kept: llmkernels.ops.attention_dropout.keep_mask, the seed replayed from torch's
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
FEATURES = ("dropout", "bias")
MODES = ("fwd", "fwd+bwd")
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -6, torch.float16: 2.0 ** -9}
SEED = 1234


def check(ours, inputs, grad_out, causal, dropout_p, dtype):
    """ours (out and the inputs' gradients) of a call made right after torch.manual_seed(SEED),
    against the float64 math: every batch entry, head 0 (the bias: its head 0)."""
    q, k, v = (t[:, :1].double().requires_grad_() for t in inputs[:3])
    leaves = [q, k, v]
    B, _, L, _ = q.shape
    S = k.shape[-2]
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if len(inputs) > 3:
        bias = inputs[3][:, :1].double().requires_grad_()
        leaves.append(bias)
        s = s + bias
    if causal:
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
    w = torch.softmax(s, -1)
    if dropout_p:
        torch.manual_seed(SEED)
        keep = keep_mask(int(draw_seed()), (B, inputs[0].shape[1], L, S), dropout_p)
        w = w * keep[:, :1].double() / (1 - dropout_p)
    out = w @ v
    exact = (out,) + torch.autograd.grad(out, leaves, grad_out[:, :1].double())
    checks = []
    for name, got, ref in zip(("out", "dq", "dk", "dv", "dbias"), ours, exact):
        atol = ATOL[dtype] * max(ref.abs().max().item(), 1.0)
        if name == "dbias":  # sums the batch's terms
            atol *= B
        checks.append(harness.check_close(name, got[:, :1], ref, atol=atol))
    return max(checks, key=lambda c: c.error / c.bound)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", type=harness.comma_names(FEATURES), default=list(FEATURES))
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
    rows, records, failed = [], [], 0
    for feature in args.features:
        drop = args.dropout if feature == "dropout" else 0.0
        for dt_name in args.dtypes:
            dtype = DTYPES[dt_name]
            for S in args.seqlens:
                for causal in causals:
                    B, H, D = args.batch, args.heads, args.head_dim
                    torch.manual_seed(0)
                    inputs = [torch.randn(B, H, S, D, dtype=dtype) for _ in range(3)]
                    if feature == "bias":
                        inputs.append(torch.randn(1, H, S, S, dtype=dtype))
                    grad_out = torch.randn_like(inputs[0])

                    future = torch.ones(S, S, dtype=torch.bool).triu(1)

                    def call(fn, plain=False):
                        def run(q, k, v, bias=None):
                            bias = None if plain else bias
                            is_causal = causal
                            if bias is not None and causal and fn is F.scaled_dot_product_attention:
                                # SDPA takes no mask with is_causal: the triangle in the bias
                                bias, is_causal = bias.masked_fill(future, float("-inf")), False
                            return fn(q, k, v, attn_mask=bias, dropout_p=0.0 if plain else drop,
                                      is_causal=is_causal)
                        return run
                    ours_fn = llmkernels.scaled_dot_product_attention
                    fns = {"ours": call(ours_fn), "sdpa": call(F.scaled_dot_product_attention),
                           "ours-plain": call(ours_fn, True),
                           "sdpa-plain": call(F.scaled_dot_product_attention, True)}
                    bias = inputs[3].requires_grad_() if feature == "bias" else None
                    served = llmkernels.explain(ours_fn, *inputs[:3], attn_mask=bias,
                                                dropout_p=drop, is_causal=causal).backend
                    torch.manual_seed(SEED)
                    got = harness.mode_call(fns["ours"], modes[-1], inputs, grad_out)()
                    c = check(got, inputs, grad_out, causal, drop, dtype)
                    failed += not c.ok
                    rec = dict(feature=feature, dtype=dt_name, causal=causal, batch=B, seqlen=S,
                               heads=H, head_dim=D, dropout_p=drop, served_by=served,
                               correct=c.ok, check=c.name, err=c.error, bound=c.bound, modes={})
                    for mode in modes:
                        calls = {name: harness.mode_call(fn, mode, inputs, grad_out)
                                 for name, fn in fns.items()}
                        timed = harness.time_interleaved(calls, "cpu", args.min_run_time)
                        ms = {name: t.median_s * 1e3 for name, t in timed.items()}
                        rec["modes"][mode] = dict(ms=ms, speedup_vs_sdpa=ms["sdpa"] / ms["ours"],
                                                  feature_cost=ms["ours"] / ms["ours-plain"])
                        rows.append([feature, dt_name, "yes" if causal else "no", str(B), str(S),
                                     str(H), str(D), mode, served, "ok" if c.ok else "FAIL",
                                     f"{ms['ours']:.4g}", f"{ms['sdpa']:.4g}",
                                     f"{ms['ours-plain']:.4g}", f"{ms['sdpa-plain']:.4g}",
                                     f"{ms['sdpa'] / ms['ours']:.2f}x",
                                     f"{ms['ours'] / ms['ours-plain']:.2f}x"])
                        print(" ".join(rows[-1]), flush=True)
                    records.append(rec)
    print()
    print(harness.format_table(["feature", "dtype", "causal", "B", "S", "H", "D", "mode",
                                "ours path", "check", "ours ms", "sdpa ms", "ours-plain ms",
                                "sdpa-plain ms", "vs sdpa", "feature cost"], rows))
    print(f"\ndropout_p={args.dropout}; bias: (1, H, S, S), requires grad; -plain: without the "
          "feature; feature cost: ours over ours-plain")
    if args.json:
        harness.write_json(args.json, {"benchmark": "attention_training", "machine": info,
                                       "cases": records})
    if failed:
        print(f"CORRECTNESS FAILED for {failed} case(s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    harness.run_timed(main)
