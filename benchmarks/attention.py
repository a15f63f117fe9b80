"""Attention benchmark: our fused kernel against torch SDPA and the naive math path.

    python benchmarks/attention.py                 # default sweep, under 3 minutes on 2 cores
    python benchmarks/attention.py --quick         # seconds: a smoke test
    python benchmarks/attention.py --seqlens 2048 --heads 16 --head-dims 64 --dtypes bf16 \
        --json out.json --csv out.csv --plot out.png

For every shape it first checks correctness (output and, unless --no-backward, the three
gradients and the no-grad forward's output, against a float64 reference of every head; the
bound is DESIGN.md's: 2x PyTorch's own same-precision error plus a small floor) and then,
side by side in the same run, times forward and forward+backward for each path:

  ours  llmkernels.scaled_dot_product_attention: the fused C++ kernel on CPU; on CUDA the
        path our selection picks (named in the output, since it may be the reference)
  sdpa  torch.nn.functional.scaled_dot_product_attention, default backend (flash attention
        on CPU and, for half types, on GPU)
  math  the same under SDPBackend.MATH: the unfused baseline that materializes L x S scores

Speedups are baseline time / our time. GFLOP/s count only unmasked work, FlashAttention
style: forward 2*B*H*pairs*(D+Dv) where pairs = unmasked (query, key) pairs (half for
causal), and forward+backward 3.5x that (the backward is 2.5x the forward). Peak memory is
what a call allocates beyond its inputs (outputs, saved tensors, gradients, workspaces).
Exit status 1 if any correctness check failed, so scripts notice.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (sits next to this file)

import llmkernels  # noqa: E402

PATHS = ("ours", "sdpa", "math")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Absolute floor added to the 2x-PyTorch error bound. Outputs and gradients are O(1) for
# randn inputs: one ulp at 1.0 for the half types; for float32 the tests' 1e-5. The
# error/PyTorch-error ratio is reported besides, so a floor never hides a trend.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
MODEL_WIDTH = 1024      # default heads = MODEL_WIDTH / head_dim, as in a 1024-wide model ...
FULL_HEADS_UP_TO = 2048  # ... with heads cut by (2048/S)^2 beyond, so a case's work stays bounded
CHECK_SCORES = 1 << 24  # score elements per slice of heads of the float64 reference check
MATH_MAX_SCORES = {"cpu": 1 << 24, "cuda": 1 << 30}  # B*H*L*S above which math is skipped
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    dtype: str
    causal: bool
    batch: int
    heads: int
    seqlen: int
    head_dim: int

    def shape(self):
        return (self.batch, self.heads, self.seqlen, self.head_dim)


# ---------------------------------------------------------------- work accounting

def unmasked_pairs(L: int, S: int, causal: bool) -> int:
    """(query, key) pairs that are computed: all of them, or the top-left causal triangle."""
    if not causal:
        return L * S
    full = min(L, S)  # query i sees keys 0..i (SDPA's top-left alignment)
    return full * (full + 1) // 2 + max(0, L - S) * S


def forward_flops(case: Case) -> float:
    """Q K^T (2*D flops per pair) plus P V (2*Dv per pair); here Dv = D."""
    pairs = unmasked_pairs(case.seqlen, case.seqlen, case.causal)
    d = dv = case.head_dim
    return 2.0 * case.batch * case.heads * pairs * (d + dv)


def mode_flops(case: Case, mode: str) -> float:
    return forward_flops(case) * (3.5 if mode == "fwd+bwd" else 1.0)


def default_heads(seqlen: int, head_dim: int) -> int:
    heads = max(1, MODEL_WIDTH // head_dim)
    if seqlen > FULL_HEADS_UP_TO:
        heads = max(1, round(heads * (FULL_HEADS_UP_TO / seqlen) ** 2))
    return heads


# ---------------------------------------------------------------- the paths

def path_fn(name: str, causal: bool, ours_backend: Optional[str]) -> Callable:
    if name == "ours":
        return lambda q, k, v: llmkernels.scaled_dot_product_attention(
            q, k, v, is_causal=causal, backend=ours_backend)
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if name == "math":
        def math_sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return math_sdpa
    raise ValueError(name)


def ours_backend_for(device: str, forced: Optional[str] = None) -> Optional[str]:
    """CPU: force the fused C++ kernel (so an unsupported case errors instead of quietly
    timing the reference), unless the extension is missing: then automatic selection, and
    the output says 'ours' was the reference. CUDA: automatic selection (cuda, then triton),
    unless --ours-backend names one."""
    if forced and forced != "auto":
        return forced
    if device == "cpu" and llmkernels.backends.native_module() is not None:
        return "cpu"
    return None


def served_by(case: Case, device: str, ours_backend: Optional[str]) -> str:
    q = torch.empty(case.shape(), dtype=DTYPES[case.dtype], device=device)
    return llmkernels.explain(llmkernels.scaled_dot_product_attention, q, q, q,
                              is_causal=case.causal, backend=ours_backend).backend


# ---------------------------------------------------------------- one case

def make_inputs(case: Case, device: str):
    dtype = DTYPES[case.dtype]
    q, k, v, g = (torch.randn(case.shape(), device=device, dtype=dtype) for _ in range(4))
    return q, k, v, g


def mode_call(fn: Callable, mode: str, inputs) -> Callable[[], Any]:
    """harness.mode_call on inputs (q, k, v, grad_out)."""
    return harness.mode_call(fn, mode, inputs[:3], inputs[3])


def head_slices(case: Case) -> List[tuple]:
    """(batch element, heads) slices covering the whole call, each with at most CHECK_SCORES
    score elements (one head at least), so that the float64 reference stays small."""
    step = max(1, CHECK_SCORES // (case.seqlen * case.seqlen))
    return [(b, slice(h, h + step)) for b in range(case.batch)
            for h in range(0, case.heads, step)]


@contextlib.contextmanager
def low_precision_math():
    """SDPA's math path without its float32 upcast of half inputs: PyTorch's own unfused
    computation in the inputs' precision, the fair bar for our unfused reference path."""
    flag = getattr(torch.backends.cuda, "allow_fp16_bf16_reduction_math_sdp", None)
    if flag is None:  # older torch: math always computes in the inputs' precision
        yield
        return
    before = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    flag(True)
    try:
        yield
    finally:
        flag(before)


def check_baseline(ours_backend: Optional[str]) -> str:
    return "math-lowp" if ours_backend == "reference" else "sdpa"


def check_outputs(case: Case, mode: str, inputs, got, baseline_name: str,
                  baseline: Optional[Sequence[torch.Tensor]],
                  nograd_out: Optional[torch.Tensor] = None) -> List[harness.Check]:
    """Compare our outputs (out, and dq, dk, dv for fwd+bwd) of the full timed call, and the
    output of the no-grad forward call when given, with a float64 reference, every batch
    element and head (a bug may hit one head only), slice by slice (head_slices).

    The bound is 2x the error of `baseline` (PyTorch's same-precision result: sdpa for a
    fused kernel, low-precision math for our unfused reference path) in the same slice plus
    a floor; the baseline is computed on the slice alone when the full-shape run is not at
    hand. Each returned Check is the tightest slice's (largest error over bound).
    """
    names = ["out", "dq", "dk", "dv"][:len(got)]
    if nograd_out is not None:  # the 'fwd' rows' call: the same output, without autograd
        names, got = names + ["no-grad out"], list(got) + [nograd_out]
    atol = ATOL[DTYPES[case.dtype]]
    worst: Dict[str, harness.Check] = {}
    for b, heads in head_slices(case):
        def pick(t):
            return t.detach()[b:b + 1, heads]

        def run(name, dtype):
            sliced = [pick(t).to(dtype) for t in inputs]
            return mode_call(path_fn(name, case.causal, None), mode, sliced)()

        ref = run("math", torch.float64)
        if baseline is not None:
            base = [pick(t) for t in baseline]
        elif baseline_name == "math-lowp":
            with low_precision_math():
                base = run("math", DTYPES[case.dtype])
        else:
            base = run(baseline_name, DTYPES[case.dtype])
        ref, base = list(ref) + [ref[0]], list(base) + [base[0]]  # no-grad out's: out's
        for n, x, r, bl in zip(names, got, ref, base):
            c = harness.check_close(n, pick(x), r, atol=atol, baseline=bl)
            if n not in worst or c.error / c.bound > worst[n].error / worst[n].bound:
                worst[n] = c
    return list(worst.values())


def measure_case(case: Case, args, ours_backend: Optional[str]) -> Dict[str, Any]:
    """Check, then time, one shape.

    The first full-shape call of each path in each mode runs under the memory profiler: it
    gives that mode's peak memory, warms the path up, and its outputs are what the
    correctness check compares (ours' fwd+bwd outputs, and its no-grad forward output that
    the fwd rows time), so no extra call is spent on them.
    """
    device, started = args.device, time.perf_counter()
    inputs = make_inputs(case, device)
    modes = MODES if not args.no_backward else MODES[:1]
    check_mode = modes[-1]
    record: Dict[str, Any] = asdict(case)
    record["ours_backend"] = served_by(case, device, ours_backend) if "ours" in args.paths else None
    baseline = check_baseline(record["ours_backend"])
    scores = case.batch * case.heads * case.seqlen * case.seqlen
    results: Dict[str, Dict[str, Dict[str, Any]]] = {m: {} for m in modes}
    outputs: Dict[tuple, Sequence[torch.Tensor]] = {}  # (mode, path): the call's outputs

    def profiled(name: str, mode: str) -> None:
        call, kept = mode_call(path_fn(name, case.causal, ours_backend), mode, inputs), []
        llmkernels.empty_cache()  # the kernel's reused workspace then counts in this peak
        try:
            peak = harness.peak_memory(lambda: kept.append(call()), device)
        except Exception as exc:
            results[mode][name] = {"error": f"{type(exc).__name__}: {exc}"}
            return
        results[mode][name] = {"peak_mib": peak / 2**20}
        outputs[mode, name] = kept[0]

    for name in args.paths:
        if name == "math" and scores > args.math_max_scores:
            for mode in modes:
                results[mode][name] = {"skipped": f"B*H*L*S = {scores:,} > --math-max-scores "
                                                  f"{args.math_max_scores:,}"}
            continue
        for mode in modes:
            profiled(name, mode)

    record["checks"], record["correct"] = [], None
    if "ours" in args.paths:
        record["check_baseline"] = baseline
        try:
            for mode in modes:
                if (mode, "ours") not in outputs:
                    raise RuntimeError(results[mode]["ours"]["error"])
            nograd = outputs["fwd", "ours"][0] if check_mode != "fwd" else None
            checks = check_outputs(case, check_mode, inputs, outputs[check_mode, "ours"],
                                   baseline, outputs.get((check_mode, baseline)), nograd)
            record["checks"] = [asdict(c) for c in checks]
            record["correct"] = all(c.ok for c in checks)
            ratios = [c.error / c.baseline_error for c in checks if c.baseline_error]
            record["error_vs_pytorch"] = max(ratios) if ratios else None
        except Exception as exc:
            record["check_error"] = f"{type(exc).__name__}: {exc}"
            record["correct"] = False
    outputs.clear()
    record["check_s"] = time.perf_counter() - started

    record["modes"] = {}
    for mode in modes:
        gflop = mode_flops(case, mode) / 1e9
        for name in args.paths:
            res = results[mode][name]
            if "skipped" in res or "error" in res:
                continue
            try:
                call = mode_call(path_fn(name, case.causal, ours_backend), mode, inputs)
                t = harness.time_fn(call, device, args.min_run_time)
            except Exception as exc:
                results[mode][name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            res.update(ms=1e3 * t.median_s, iqr_ms=1e3 * t.iqr_s, runs=t.runs,
                       gflops=gflop / t.median_s)
        entry: Dict[str, Any] = {"gflop": gflop, "paths": results[mode]}
        ours_ms = results[mode].get("ours", {}).get("ms")
        for base in ("sdpa", "math"):
            base_ms = results[mode].get(base, {}).get("ms")
            entry[f"speedup_vs_{base}"] = base_ms / ours_ms if ours_ms and base_ms else None
        record["modes"][mode] = entry
    record["wall_s"] = time.perf_counter() - started
    return record


# ---------------------------------------------------------------- output

def table(records: Sequence[Dict[str, Any]], paths: Sequence[str],
          ceilings: Dict[str, float]) -> str:
    headers = ["dtype", "causal", "B", "H", "S", "D", "mode", "check", "err/pt"]
    headers += [f"{p} ms" for p in paths] + [f"{p} GF/s" for p in paths]
    if "ours" in paths:
        headers += ["ours %mm"]
        headers += [f"vs {p}" for p in paths if p != "ours"]
    headers += [f"{p} MiB" for p in paths]
    rows = []
    for r in records:
        check = {True: "ok", False: "FAIL", None: "-"}[r["correct"]]
        ratio = r.get("error_vs_pytorch")
        modes = list(r["modes"])
        for mode, entry in r["modes"].items():
            res = entry["paths"]
            # the check ran on the last mode's outputs: its error ratio goes on that row
            err = harness.fmt(ratio, ".1f") + "x" if ratio and mode == modes[-1] else ""

            def cell(p, key, spec):
                x = res.get(p, {})
                if "skipped" in x:
                    return "skip"
                if "error" in x:
                    return "ERR"
                return harness.fmt(x.get(key), spec)
            row = [r["dtype"], "yes" if r["causal"] else "no", r["batch"], r["heads"],
                   r["seqlen"], r["head_dim"], mode, check, err]
            row += [cell(p, "ms", ".4g") for p in paths]
            row += [cell(p, "gflops", ".1f") for p in paths]
            if "ours" in paths:
                gf = res.get("ours", {}).get("gflops")
                ceiling = ceilings.get(r["dtype"])
                row.append(harness.fmt(100 * gf / ceiling, ".0f") + "%" if gf and ceiling else "-")
                for p in paths:
                    if p != "ours":
                        s = entry.get(f"speedup_vs_{p}")
                        row.append(harness.fmt(s, ".2f") + "x" if s else cell(p, "speedup", ""))
            row += [cell(p, "peak_mib", ".1f") for p in paths]
            rows.append([str(c) for c in row])
    return harness.format_table(headers, rows)


def flat_rows(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One CSV line per (case, mode, path)."""
    rows = []
    for r in records:
        for mode, entry in r["modes"].items():
            for path, res in entry["paths"].items():
                speedup = entry.get(f"speedup_vs_{path}") if path != "ours" else 1.0
                rows.append({
                    "dtype": r["dtype"], "causal": r["causal"], "batch": r["batch"],
                    "heads": r["heads"], "seqlen": r["seqlen"], "head_dim": r["head_dim"],
                    "mode": mode, "path": path,
                    "backend": r["ours_backend"] if path == "ours" else path,
                    "ms": res.get("ms"), "gflops": res.get("gflops"),
                    "peak_mib": res.get("peak_mib"), "ours_speedup": speedup,
                    "correct": r["correct"], "note": res.get("skipped") or res.get("error"),
                })
    return rows


def plot(records: Sequence[Dict[str, Any]], paths: Sequence[str], filename: str) -> None:
    """GFLOP/s against seqlen: a subplot per (dtype, mode) x causal; a line per path and
    head dim (colour: path, line style: head dim)."""
    plt = harness.plt_module()
    rows_keys = sorted({(r["dtype"], m) for r in records for m in r["modes"]})
    cols = sorted({r["causal"] for r in records})
    fig, axes = plt.subplots(len(rows_keys), len(cols), squeeze=False, sharex=True,
                             figsize=(5.5 * len(cols), 3.2 * len(rows_keys)))
    styles = ["-", "--", ":", "-."]
    head_dims = sorted({r["head_dim"] for r in records})
    for i, (dtype, mode) in enumerate(rows_keys):
        for j, causal in enumerate(cols):
            ax = axes[i][j]
            for p_i, p in enumerate(paths):
                for d_i, d in enumerate(head_dims):
                    pts = sorted((r["seqlen"], r["modes"][mode]["paths"].get(p, {}).get("gflops"))
                                 for r in records if r["dtype"] == dtype and r["causal"] == causal
                                 and r["head_dim"] == d and mode in r["modes"])
                    pts = [(s, g) for s, g in pts if g]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", color=f"C{p_i}",
                                linestyle=styles[d_i % len(styles)], label=f"{p} D={d}")
            ax.set_xscale("log", base=2)
            seqlens = sorted({r["seqlen"] for r in records})
            ax.set_xticks(seqlens, [str(x) for x in seqlens])
            ax.set_title(f"{dtype} {mode} {'causal' if causal else 'non-causal'}")
            ax.set_ylabel("GFLOP/s")
            ax.grid(True, alpha=0.3)
            if i == len(rows_keys) - 1:
                ax.set_xlabel("seqlen")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
    fig.savefig(filename, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])

    ints, names = harness.positive_ints, harness.comma_names
    p.add_argument("--seqlens", type=ints, help="comma list (default 512,1024,2048,4096)")
    p.add_argument("--head-dims", type=ints, help="comma list (default 64,128; on CPU 'ours' "
                   "is the fused kernel, up to 256)")
    p.add_argument("--dtypes", type=names(tuple(DTYPES)), help="comma list of fp32,bf16,fp16 "
                   "(default fp32,bf16)")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--batch", type=int, help="batch size (default 1 on CPU, 4 on CUDA)")
    p.add_argument("--heads", type=int, help=f"heads (default {MODEL_WIDTH}/head_dim, cut by "
                   f"(2048/seqlen)^2 above 2048 to bound the time)")
    p.add_argument("--paths", type=names(PATHS), default=list(PATHS),
                   help="comma subset of ours,sdpa,math")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--min-run-time", type=float, help="seconds per timing (default 0.2)")
    p.add_argument("--math-max-scores", type=int,
                   help="skip math when B*H*L*S is larger (default 2^24 on CPU, 2^30 on CUDA)")
    p.add_argument("--cpu-tier", help="force a CPU tier of our kernel (one of "
                   "llmkernels.backends.supported_cpu_tiers(); default the best)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=harness.default_device())
    p.add_argument("--ours-backend", choices=("auto", "cpu", "cuda", "triton", "reference"),
                   default="auto", help="force the path 'ours' uses (default: the automatic "
                   "choice on CUDA, the fused kernel on CPU)")
    p.add_argument("--quick", action="store_true", help="tiny sweep for smoke tests (seconds)")
    p.add_argument("--csv", metavar="FILE")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png", type=harness.plot_file,
                   help="save a plot there (needs matplotlib)")
    args = p.parse_args(argv)

    harness.check_device(p, args.device)
    quick = args.quick
    args.seqlens = args.seqlens or ([131] if quick else [512, 1024, 2048, 4096])
    args.head_dims = args.head_dims or ([64] if quick else [64, 128])
    args.dtypes = args.dtypes or ["fp32", "bf16"]
    if args.heads is None and quick:
        args.heads = 2
    if args.batch is None:  # a GPU needs more parallel work than one sequence
        args.batch = 4 if args.device == "cuda" and not quick else 1
    if args.min_run_time is None:
        args.min_run_time = 0.01 if quick else 0.2
    if args.math_max_scores is None:
        args.math_max_scores = MATH_MAX_SCORES[args.device]
    if args.batch < 1 or (args.heads is not None and args.heads < 1):
        p.error("--batch and --heads must be >= 1")
    check_cases(p, args)
    return args


def check_cases(p, args) -> None:
    """Ask the library, before anything is timed, whether the CPU tier and the path 'ours'
    uses can serve every case: a tier this CPU lacks, a Triton path without a GPU (or
    TRITON_INTERPRET), a head dim the fused CPU kernel does not take, end the run here with
    one line, not in a traceback (or a case timed on another path) after the matmul ceiling."""
    with contextlib.ExitStack() as stack:
        if args.cpu_tier:
            with harness.usage_errors(p, f"--cpu-tier {args.cpu_tier}"):
                stack.enter_context(llmkernels.use_cpu_tier(args.cpu_tier))
        if "ours" not in args.paths:
            return
        backend = ours_backend_for(args.device, args.ours_backend)
        for case in cases(args):
            option = (f"--ours-backend {args.ours_backend}" if args.ours_backend != "auto"
                      else f"'ours' (the {backend or 'automatic'} path)")
            with harness.usage_errors(p, f"{option}, (B, H, S, D) = {case.shape()}"):
                served_by(case, args.device, backend)


def cases(args) -> List[Case]:
    causal = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    return [Case(dt, c, args.batch, args.heads or default_heads(s, d), s, d)
            for dt in args.dtypes for c in causal for d in args.head_dims for s in args.seqlens]


def main(argv=None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    torch.manual_seed(0)
    info = harness.machine_info(args.device)
    print(harness.format_machine(info))
    ours_backend = ours_backend_for(args.device, args.ours_backend)
    notes: List[str] = []
    if "ours" in args.paths and args.device == "cpu" and ours_backend is None:
        notes.append("the compiled extension is missing: 'ours' is the reference path")

    ceiling_n = 512 if args.quick else 2048
    ceilings, ceiling_notes = harness.matmul_ceilings({dt: DTYPES[dt] for dt in args.dtypes},
                                                      args.device, ceiling_n, args.min_run_time)
    notes += ceiling_notes
    print("matmul ceiling (torch.mm %d^3): %s" % (ceiling_n, ", ".join(
        f"{dt} {gf:.0f} GFLOP/s" for dt, gf in ceilings.items())))
    print(f"paths: {', '.join(args.paths)}; timing: "
          f"{'triton do_bench' if args.device == 'cuda' else 'torch.utils.benchmark'} median, "
          f"min_run_time {args.min_run_time}s\n", flush=True)

    tier = llmkernels.use_cpu_tier(args.cpu_tier) if args.cpu_tier else contextlib.nullcontext()
    records = []
    with tier:
        for case in cases(args):
            rec = measure_case(case, args, ours_backend)
            records.append(rec)
            _progress(rec)
    failed = [r for r in records if r["correct"] is False]

    print()
    print(table(records, args.paths, ceilings))
    skipped = sorted({(r["batch"], r["heads"], r["seqlen"]) for r in records
                      if any("skipped" in e["paths"].get("math", {}) for e in r["modes"].values())})
    if skipped:
        notes.append("math skipped (it materializes the B*H*L*S score matrix; raise "
                     "--math-max-scores to run it) for (B, H, S) = "
                     + ", ".join(str(s) for s in skipped))
    for r in records:
        for mode, e in r["modes"].items():
            for p, res in e["paths"].items():
                if "error" in res:
                    notes.append(f"{p} {mode} {_label(r)}: {res['error']}")
    backends_used = sorted({r["ours_backend"] for r in records if r["ours_backend"]})
    if backends_used:
        with llmkernels.use_cpu_tier(args.cpu_tier):  # says so when AMX tiles are emulated
            tier = llmkernels.backends.cpu_tier_label()
        notes.append(f"'ours' was served by: {', '.join(backends_used)}"
                     + (f" (cpu tier {tier})" if "cpu" in backends_used else ""))
    notes.append("speedup = baseline time / ours time; GF/s counts unmasked work only; "
                 "%mm = ours GF/s over the matmul ceiling; err/pt = ours' max error over "
                 "PyTorch's same-precision error (vs float64; the check allows 2x + a floor)")
    for n in notes:
        print(f"note: {n}")

    wall = time.perf_counter() - start
    result = {
        "benchmark": "attention",
        "machine": info,
        "config": {k: v for k, v in vars(args).items() if k not in ("csv", "json", "plot")},
        "matmul_ceiling_gflops": ceilings,
        "flops": "forward 2*B*H*unmasked_pairs*(D+Dv); fwd+bwd 3.5x forward",
        "cases": records,
        "notes": notes,
        "all_correct": not failed,
        "wall_s": wall,
    }
    if args.json:
        harness.write_json(args.json, result)
    if args.csv:
        harness.write_csv(args.csv, flat_rows(records))
    if args.plot:
        plot(records, args.paths, args.plot)
    if failed:
        print(f"\nCORRECTNESS FAILED for {len(failed)} case(s): "
              + "; ".join(_label(r) for r in failed), file=sys.stderr)
    print(f"\nwall time {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


def _label(r: Dict[str, Any]) -> str:
    return (f"{r['dtype']} {'causal' if r['causal'] else 'full'} "
            f"B={r['batch']} H={r['heads']} S={r['seqlen']} D={r['head_dim']}")


def _progress(r: Dict[str, Any]) -> None:
    """One line per case while the sweep runs; a failed check is shouted on stderr."""
    parts = []
    for mode, e in r["modes"].items():
        s = e.get("speedup_vs_sdpa")
        ms = e["paths"].get("ours", {}).get("ms")
        parts.append(f"{mode} ours {harness.fmt(ms, '.4g')} ms"
                     + (f" ({s:.2f}x sdpa)" if s else ""))
    status = {True: "ok", False: "FAIL", None: "unchecked"}[r["correct"]]
    print(f"  {_label(r)}: check {status}; " + "; ".join(parts)
          + f" [{r['wall_s']:.1f} s]", flush=True)
    if r["correct"] is False:
        bad = [c for c in r["checks"] if not c["ok"]]
        detail = r.get("check_error") or ", ".join(
            f"{c['name']} err {c['error']:.3g} > bound {c['bound']:.3g}" for c in bad)
        print(f"!!! CORRECTNESS FAILURE {_label(r)} (ours = {r['ours_backend']}): {detail}",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
