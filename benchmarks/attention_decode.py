"""Decode benchmark: one new token per sequence attending over a KV cache.

    python benchmarks/attention_decode.py                       # default cases on this device
    python benchmarks/attention_decode.py --cache-lens 8192 --batch 1,8 --json out.json

ours      llmkernels.attention_with_kvcache over (batch, seq, heads, dim) caches (no append,
          so only attention is timed; its cache_seqlens check is included, as users pay it)
sdpa      torch SDPA over contiguous (batch, heads, seq, dim) caches, in its fastest layout:
          with GQA the Hq/Hk query heads sharing a KV head folded into the query-length axis,
          q (B, Hk, Hq/Hk, D) against K, V (B, Hk, S, D). One new token attends to the whole
          cache (no mask), so the result is the same as enable_gqa's, and it is one call per
          KV head with no repeated K/V (on the CPU enable_gqa took up to several times as long)
sdpa-gqa  (GQA only) the same with enable_gqa=True over (B, Hq, 1, D) queries: the call
          models make, for reference

--ragged: sequence b holds S - b * S // (2B) keys (S down to about S / 2), as a batch of
requests at different points of their generation. ours gets those lengths; sdpa is one
folded call a sequence over its own keys (the fastest way to the same result here);
sdpa-gqa is the models' call: enable_gqa over the padded caches with a boolean key mask.

Each reads the keys it attends to once: GB/s = (K + V bytes of those keys) / time, against
the device's read bandwidth (harness.read_sum: a float32 sum of 256 MiB, timed in alternation
with each case, as quant_matmul.py does). Each case is checked against the float64 reference
before it is timed (error at most 2x SDPA's plus ATOL x max|output|); exit status 1 if a check
fails. On CUDA ours and sdpa are also timed as CUDA-graph replays (ours with
check_lengths=False, which needs no device sync), the way decode loops run in serving engines:
that measures the kernels without Python overhead.
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
from llmkernels.reference import attention_kvcache_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Floor of the error bound, as a fraction of max|output|: an output here averages the whole
# cache, far below the O(1) values attention.py's absolute floors are for (2^-7 absolute let a
# cache read one token short pass). fp32: the tests' 1e-5; half types: half an ulp of bf16, an
# ulp of fp16. A one-token-short read at S = 8192 still errs 2x this bound (bf16, CPU).
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}


def heads_pair(text: str) -> tuple:
    """argparse type of --heads: "Hq/Hk", query heads a multiple of the cache's (GQA)."""
    parts = text.split("/")
    try:
        hq, hk = (harness.positive_int(x) for x in parts)
    except (argparse.ArgumentTypeError, ValueError):  # not two integers >= 1
        raise argparse.ArgumentTypeError(f"expected Hq/Hk, query and kv heads (e.g. 32/8); "
                                         f"got {text!r}")
    if hq % hk:
        raise argparse.ArgumentTypeError(f"query heads must be a multiple of kv heads; got {text!r}")
    return hq, hk


def check_cases(p, args, hq: int, hk: int) -> None:
    """Ask the library which path serves each case before anything is timed: a --ours-backend
    that cannot serve it here (triton without a GPU, cuda on the CPU, a name it does not know)
    ends the run with one line, not a traceback. Empty (unwritten) caches of the real shapes."""
    for dt_name in args.dtypes:
        for B in args.batch:
            for S in args.cache_lens:
                def empty(L, H):
                    return torch.empty(B, L, H, args.head_dim, dtype=DTYPES[dt_name],
                                       device=args.device)
                lens = torch.full((B,), S, dtype=torch.int32, device=args.device)
                with harness.usage_errors(p, f"--ours-backend {args.ours_backend}"
                                          if args.ours_backend else None):
                    llmkernels.explain(llmkernels.attention_with_kvcache, empty(1, hq),
                                       empty(S, hk), empty(S, hk), lens,
                                       backend=args.ours_backend)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=harness.default_device())
    p.add_argument("--batch", type=harness.positive_ints, default=[1, 8])
    p.add_argument("--cache-lens", type=harness.positive_ints, default=[2048, 8192])
    p.add_argument("--heads", type=heads_pair, default=(32, 8),
                   help="query/kv heads, query a multiple of kv (default 32/8)")
    p.add_argument("--head-dim", type=harness.positive_int, default=128)
    p.add_argument("--dtypes", type=harness.comma_names(tuple(DTYPES)), default=["bf16"],
                   help="comma list of fp32,bf16,fp16 (default bf16)")
    p.add_argument("--ours-backend", default=None, help="force cpu, cuda, triton or reference")
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--ragged", action="store_true",
                   help="sequences of different lengths (S down to about S / 2)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    hq, hk = args.heads
    dev = args.device
    harness.check_device(p, dev)
    check_cases(p, args, hq, hk)
    info = harness.machine_info(dev)
    print(harness.format_machine(info))
    reader = harness.read_sum(dev)
    bw = harness.READ_BYTES / harness.time_fn(reader, dev, args.min_run_time).median_s / 1e9
    print(f"read bandwidth (float32 sum of 256 MiB): {bw:.3g} GB/s; each case's '% read bw' "
          "uses the sum timed in alternation with it\n", flush=True)
    rows, records, failed = [], [], 0
    torch.manual_seed(0)
    for dt_name in args.dtypes:
        dtype = DTYPES[dt_name]
        for B in args.batch:
            for S in args.cache_lens:
                q = torch.randn(B, 1, hq, args.head_dim, dtype=dtype, device=dev)
                kc = torch.randn(B, S, hk, args.head_dim, dtype=dtype, device=dev)
                vc = torch.randn(B, S, hk, args.head_dim, dtype=dtype, device=dev)
                used = [S - b * S // (2 * B) if args.ragged else S for b in range(B)]
                lens = torch.tensor(used, dtype=torch.int32, device=dev)
                # (B, 1, 1, S): the keys each sequence attends to (ragged only)
                key_mask = (torch.arange(S, device=dev)[None, :] < lens[:, None])[:, None, None]
                k_sdpa, v_sdpa = kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
                q_gqa = q.transpose(1, 2)  # (B, Hq, 1, D)
                # query head h reads KV head h // (Hq/Hk): consecutive heads share one
                q_fold = q.reshape(B, hk, hq // hk, args.head_dim)
                served = llmkernels.explain(llmkernels.attention_with_kvcache, q, kc, vc, lens,
                                            backend=args.ours_backend).backend

                def ours():
                    return llmkernels.attention_with_kvcache(q, kc, vc, lens,
                                                             backend=args.ours_backend)

                def sdpa():  # (B, Hk, G, D): as ours' (B, 1, Hq, D) once reshaped
                    if not args.ragged:
                        return F.scaled_dot_product_attention(q_fold, k_sdpa, v_sdpa)
                    return torch.cat([F.scaled_dot_product_attention(
                        q_fold[b:b + 1], k_sdpa[b:b + 1, :, :n], v_sdpa[b:b + 1, :, :n])
                        for b, n in enumerate(used)])

                def sdpa_gqa():  # (B, Hq, 1, D)
                    return F.scaled_dot_product_attention(
                        q_gqa, k_sdpa, v_sdpa, enable_gqa=True,
                        attn_mask=key_mask if args.ragged else None)
                fns = {"ours": ours, "sdpa": sdpa}
                if hq != hk:
                    fns["sdpa-gqa"] = sdpa_gqa
                with torch.no_grad():
                    exact = attention_kvcache_reference(q.double(), kc.double(), vc.double(),
                                                        used)
                    check = harness.check_close(
                        "out", ours(), exact, baseline=sdpa().reshape(exact.shape),
                        atol=ATOL[dtype] * exact.abs().max().item())
                    e_ours, e_base, ok = check.error, check.baseline_error, check.ok
                    failed += not ok
                    # in alternation with the read-bandwidth sum: the machine's memory speed
                    # drifts, and the GB/s are read against the same minutes' bandwidth
                    timed = harness.time_interleaved(dict(fns, _read=reader), dev,
                                                     args.min_run_time)
                    t_ours, t_sdpa = timed["ours"].median_s, timed["sdpa"].median_s
                    t_gqa = timed["sdpa-gqa"].median_s if hq != hk else None
                    case_bw = harness.READ_BYTES / timed["_read"].median_s / 1e9
                    g_ours = g_sdpa = None
                    if dev == "cuda":
                        def ours_unchecked():
                            return llmkernels.attention_with_kvcache(
                                q, kc, vc, lens, check_lengths=False, backend=args.ours_backend)
                        g_ours = harness.time_fn(harness.graphed(ours_unchecked), dev,
                                                 args.min_run_time).median_s
                        g_sdpa = harness.time_fn(harness.graphed(sdpa), dev, args.min_run_time).median_s
                gbytes = 2 * sum(used) * hk * args.head_dim * kc.element_size() / 1e9
                rec = dict(dtype=dt_name, batch=B, cache_len=S, ragged=args.ragged,
                           keys_used=sum(used), heads_q=hq, heads_kv=hk,
                           head_dim=args.head_dim, served_by=served, correct=ok,
                           err_ours=e_ours, err_sdpa=e_base, bound=check.bound,
                           ours_us=t_ours * 1e6, sdpa_us=t_sdpa * 1e6, ours_gbs=gbytes / t_ours,
                           sdpa_gbs=gbytes / t_sdpa, speedup=t_sdpa / t_ours,
                           read_bandwidth_gbs=case_bw,
                           pct_bandwidth=100 * gbytes / t_ours / case_bw)
                if t_gqa:
                    rec.update(sdpa_gqa_us=t_gqa * 1e6, speedup_vs_sdpa_gqa=t_gqa / t_ours)
                if g_ours:
                    rec.update(graph_ours_us=g_ours * 1e6, graph_sdpa_us=g_sdpa * 1e6,
                               graph_ours_gbs=gbytes / g_ours, graph_speedup=g_sdpa / g_ours)
                records.append(rec)
                graph_cells = ([f"{g_ours * 1e6:.1f}", f"{g_sdpa * 1e6:.1f}",
                                f"{gbytes / g_ours:.3g}", f"{g_sdpa / g_ours:.2f}x"]
                               if g_ours else ["-"] * 4)
                cache = f"{min(used)}-{S}" if min(used) < S else str(S)
                rows.append([dt_name, B, cache, f"{hq}/{hk}", args.head_dim, served,
                             "ok" if ok else "FAIL", f"{t_ours * 1e6:.1f}", f"{t_sdpa * 1e6:.1f}",
                             # 3 significant digits: a CPU's few GB/s would show as 0 or 1
                             f"{gbytes / t_ours:.3g}", f"{gbytes / t_sdpa:.3g}",
                             f"{100 * gbytes / t_ours / case_bw:.0f}%",
                             f"{t_sdpa / t_ours:.2f}x",
                             f"{t_gqa / t_ours:.2f}x" if t_gqa else "-",
                             f"{e_ours / e_base:.2f}x" if e_base else "-"] + graph_cells)
                print(" ".join(str(c) for c in rows[-1]), flush=True)
    print()
    print(harness.format_table(["dtype", "B", "cache", "Hq/Hk", "D", "ours path", "check",
                                "ours us", "sdpa us", "ours GB/s", "sdpa GB/s", "% read bw",
                                "vs sdpa", "vs sdpa-gqa", "err/sdpa",
                                "graph ours us", "graph sdpa us", "graph ours GB/s",
                                "graph vs sdpa"], rows))
    print("\nerr/sdpa: ours' max error over SDPA's same-precision error (vs float64; the check "
          "allows 2x + ATOL x max|output|)")
    if any(r["served_by"] == "reference" for r in records):
        print("note: 'ours' was the library's reference path, the function the float64 result "
              "comes from: the check compares it with itself, and tests its precision only")
    if args.json:
        harness.write_json(args.json, {"benchmark": "attention_decode", "machine": info,
                                       "read_bandwidth_gbs": bw, "cases": records})
    if failed:
        print(f"CORRECTNESS FAILED for {failed} case(s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
