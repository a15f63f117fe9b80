"""Masked attention benchmark: the masks models pass for batches of sequences of different
lengths, our kernel against torch SDPA given the same mask.

    python benchmarks/attention_masked.py                     # default cases on this device
    python benchmarks/attention_masked.py --masks padded --seqlens 1024 --json out.json

Masks (--masks), boolean, (B, 1, S, S), hiding keys from queries:
  padded  a left-padded batch of prompts (transformers' batched generation or a padded
          training batch): entry b's first b * S // (2B) positions are padding, the rest
          causal; padding queries see only themselves (as transformers unmasks such rows,
          so that no row is empty)
  packed  sequences packed end to end (--packed-len tokens each, the last one shorter),
          each causal within itself: block-diagonal, as for padding-free batches that a
          model sees through position ids
  window  causal with a sliding window of --window keys, as transformers passes a Mistral
          style model's window in the mask

Paths: ours = llmkernels.scaled_dot_product_attention with the mask; sdpa = torch's SDPA
with the same mask; ours-causal = ours with is_causal=True and no mask, the causal triangle
of the same shape (a yardstick: a mask that hides more than the triangle may run faster).
Forward (no_grad: prefill) and forward+backward (training) are timed in alternation
(harness.time_interleaved). Each case is first checked against a float64 reference, output
and gradients, every batch entry, the first query head: error at most 2x SDPA's plus ATOL;
exit status 1 if a check fails. GFLOP/s count the (query, key) pairs the mask leaves visible
(FlashAttention style: forward 2 (D + Dv) a pair, forward+backward 3.5x that).
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

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MASKS = ("padded", "packed", "window")
MODES = ("fwd", "fwd+bwd")
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def build_mask(kind: str, B: int, S: int, args, device: str) -> torch.Tensor:
    i = torch.arange(S, device=device)
    causal = i[None, :] <= i[:, None]
    if kind == "padded":
        mask = causal.expand(B, 1, S, S).clone()
        for b in range(B):
            pad = b * S // (2 * B)
            mask[b, :, :, :pad] = False
            mask[b, :, i[:pad], i[:pad]] = True  # a padding query sees itself
        return mask
    if kind == "packed":
        seq = i // args.packed_len
        return (causal & (seq[None, :] == seq[:, None])).expand(B, 1, S, S)
    if kind == "window":
        return (causal & (i[None, :] > i[:, None] - args.window)).expand(B, 1, S, S)
    raise ValueError(kind)


def check(ours_outputs, sdpa_outputs, inputs, mask, grad_out, dtype, hq, hk):
    """ours and sdpa (out, dq, dk, dv) against float64, every batch entry, query head 0 and
    the kv head it reads. The worst of the four (error / bound) decides."""
    q, k, v = (t[:, :1].double() for t in inputs)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, attn_mask=mask)
    exact = (out,) + torch.autograd.grad(out, leaves, grad_out[:, :1].double())
    checks = []
    for name, got, base, ref in zip(("out", "dq", "dk", "dv"), ours_outputs, sdpa_outputs, exact):
        if name in ("dk", "dv") and hq != hk:
            continue  # a kv head's gradient sums its group's query heads: compared via dq
        atol = ATOL[dtype] * max(ref.abs().max().item(), 1.0)
        checks.append(harness.check_close(name, got[:, :1], ref, atol=atol, baseline=base[:, :1]))
    return max(checks, key=lambda c: c.error / c.bound)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=harness.default_device())
    p.add_argument("--masks", type=harness.comma_names(MASKS), default=list(MASKS))
    p.add_argument("--batch", type=harness.positive_int, default=4)
    p.add_argument("--seqlens", type=harness.positive_ints, default=[512, 1024])
    p.add_argument("--heads", type=harness.positive_int, default=16,
                   help="query heads (with --kv-heads: grouped-query attention)")
    p.add_argument("--kv-heads", type=harness.positive_int)
    p.add_argument("--head-dim", type=harness.positive_int, default=64)
    p.add_argument("--dtypes", type=harness.comma_names(tuple(DTYPES)), default=["bf16"])
    p.add_argument("--packed-len", type=harness.positive_int, default=128)
    p.add_argument("--window", type=harness.positive_int, default=256)
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--min-run-time", type=float, default=0.3)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    hq, hk = args.heads, args.kv_heads or args.heads
    if hq % hk:
        p.error(f"--heads must be a multiple of --kv-heads; got {hq} and {hk}")
    dev = args.device
    harness.check_device(p, dev)
    info = harness.machine_info(dev)
    print(harness.format_machine(info), flush=True)
    modes = MODES[:1] if args.no_backward else MODES
    rows, records, failed = [], [], 0
    torch.manual_seed(0)
    for dt_name in args.dtypes:
        dtype = DTYPES[dt_name]
        for S in args.seqlens:
            for kind in args.masks:
                B, D = args.batch, args.head_dim
                mask = build_mask(kind, B, S, args, dev)
                q = torch.randn(B, hq, S, D, dtype=dtype, device=dev)
                k, v = (torch.randn(B, hk, S, D, dtype=dtype, device=dev) for _ in range(2))
                grad_out = torch.randn_like(q)
                gqa = hq != hk
                fns = {
                    "ours": lambda q, k, v: llmkernels.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask, enable_gqa=gqa),
                    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask, enable_gqa=gqa),
                    "ours-causal": lambda q, k, v: llmkernels.scaled_dot_product_attention(
                        q, k, v, is_causal=True, enable_gqa=gqa),
                }
                served = llmkernels.explain(llmkernels.scaled_dot_product_attention, q, k, v,
                                            attn_mask=mask, enable_gqa=gqa).backend
                last = modes[-1]
                got = harness.mode_call(fns["ours"], last, (q, k, v), grad_out)()
                base = harness.mode_call(fns["sdpa"], last, (q, k, v), grad_out)()
                c = check(got, base, (q, k, v), mask, grad_out, dtype, hq, hk)
                failed += not c.ok
                pairs = int(mask.sum().item()) * hq
                rec = dict(dtype=dt_name, mask=kind, batch=B, seqlen=S, heads_q=hq, heads_kv=hk,
                           head_dim=D, served_by=served, correct=c.ok, check=c.name,
                           err=c.error, bound=c.bound, err_sdpa=c.baseline_error,
                           visible_fraction=pairs / (B * hq * S * S), modes={})
                for mode in modes:
                    calls = {name: harness.mode_call(fn, mode, (q, k, v), grad_out)
                             for name, fn in fns.items()}
                    timed = harness.time_interleaved(calls, dev, args.min_run_time)
                    ms = {name: t.median_s * 1e3 for name, t in timed.items()}
                    gflop = 2.0 * pairs * 2 * D * (3.5 if mode == "fwd+bwd" else 1.0) / 1e9
                    rec["modes"][mode] = dict(ms=ms, ours_gflops=gflop / ms["ours"] * 1e3,
                                              speedup_vs_sdpa=ms["sdpa"] / ms["ours"],
                                              vs_ours_causal=ms["ours-causal"] / ms["ours"])
                    rows.append([dt_name, kind, str(B), str(S), f"{hq}/{hk}", str(D), mode, served,
                                 "ok" if c.ok else "FAIL",
                                 f"{100 * rec['visible_fraction']:.0f}%",
                                 f"{ms['ours']:.4g}", f"{ms['sdpa']:.4g}",
                                 f"{ms['ours-causal']:.4g}",
                                 f"{gflop / ms['ours'] * 1e3:.1f}",
                                 f"{ms['sdpa'] / ms['ours']:.2f}x",
                                 f"{ms['ours-causal'] / ms['ours']:.2f}x"])
                    print(" ".join(str(x) for x in rows[-1]), flush=True)
                records.append(rec)
    print()
    print(harness.format_table(["dtype", "mask", "B", "S", "Hq/Hk", "D", "mode", "ours path",
                                "check", "visible", "ours ms", "sdpa ms", "ours-causal ms",
                                "ours GF/s", "vs sdpa", "vs ours-causal"], rows))
    print("\nvisible: the (query, key) pairs the mask leaves; vs ours-causal: the same shape's "
          "causal call without a mask over ours masked (above 1: the mask's skipped tiles "
          "saved more than the triangle's)")
    if args.json:
        harness.write_json(args.json, {"benchmark": "attention_masked", "machine": info,
                                       "cases": records})
    if failed:
        print(f"CORRECTNESS FAILED for {failed} case(s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    harness.run_timed(main)
