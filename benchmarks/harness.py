"""Shared benchmark harness: machine description, timing, peak memory, correctness, output.

Every benchmark in this folder (attention.py, quant_matmul.py, optim.py) follows DESIGN.md
"Performance": paths are compared side by side in one run, as ratios against the PyTorch
baseline, timed with torch.utils.benchmark on CPU and triton.testing.do_bench (median) on
GPU, and every case is checked for correctness before it is timed. This module holds the
pieces they share, so that numbers from different benchmarks are measured the same way.

Only torch (and llmkernels, for build_info) is imported at module level; triton is
imported when a CUDA timing is asked for and matplotlib only when a plot is.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Tuple)

import torch

# CPU flags that decide which kernels (ours and PyTorch's oneDNN/AMX ones) can run.
CPU_FLAGS_OF_INTEREST = {
    "x86": ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
            "amx_tile", "amx_bf16", "amx_int8"),
    "arm": ("asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm"),
}


# ---------------------------------------------------------------- machine description

def _cpuinfo() -> Dict[str, str]:
    """First processor's fields of /proc/cpuinfo (empty off Linux)."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_info(device: Optional[str] = None) -> Dict[str, Any]:
    """What the numbers were measured on: enough to tell two runs' machines apart."""
    device = device or default_device()
    cpu = _cpuinfo()
    flags = set((cpu.get("flags") or cpu.get("Features") or "").split())
    family = "arm" if platform.machine().lower() in ("aarch64", "arm64") else "x86"
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cores = os.cpu_count()
    info: Dict[str, Any] = {
        "device": device,
        "cpu_model": cpu.get("model name") or platform.processor() or platform.machine(),
        # present and absent ones alike, so that "no AMX" is visible in the record
        "cpu_flags": {f: f in flags for f in CPU_FLAGS_OF_INTEREST[family]},
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": _triton_version(),
        # other processes' load: timings on a busy machine are noisy, ratios less so
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        # the same, measured now (the load average still counts a benchmark run just before)
        "others_busy_cores": _others_busy_cores(),
    }
    # Other processes on more cores than torch's threads leave free: they take turns with ours,
    # and a thread descheduled inside a parallel region stalls the whole op (here: ms-long
    # stalls of 10-us calls, some calls and not others), so ratios are as unreliable as times.
    # Half a core of slack: daemons and this process' own start.
    busy = info["others_busy_cores"]
    info["busy"] = busy is not None and busy > usable_cores - info["torch_threads"] + 0.5
    info["llmkernels"] = _llmkernels_summary()
    return info


def _others_busy_cores(seconds: float = 0.5) -> Optional[float]:
    """How many of this process's usable cores were busy (including time stolen by the
    hypervisor) over `seconds` while this process slept: other processes' load, from
    /proc/stat. None where there is no /proc/stat."""
    try:
        cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}

        def busy_total():
            busy = total = 0
            with open("/proc/stat") as f:
                for line in f:
                    name, *ticks = line.split()
                    if name in cpus:  # user nice system idle iowait irq softirq steal
                        t = [int(x) for x in ticks[:8]]
                        busy, total = busy + sum(t) - t[3] - t[4], total + sum(t)
            return busy, total
        import time
        b0, t0 = busy_total()
        time.sleep(seconds)
        b1, t1 = busy_total()
    except (OSError, AttributeError, ValueError):
        return None
    return len(cpus) * (b1 - b0) / max(t1 - t0, 1)


def _triton_version() -> Optional[str]:
    try:
        import triton
        return getattr(triton, "__version__", "unknown")
    except Exception:  # missing, or broken on this machine: either way not used
        return None


def _llmkernels_summary() -> Dict[str, Any]:
    try:
        import llmkernels
        info = llmkernels.build_info()
    except Exception as exc:  # the benchmark still describes the machine
        return {"error": f"{type(exc).__name__}: {exc}"}
    out = {"version": info.get("version"), "paths": info.get("paths")}
    if "cpu" in info:
        out["cpu_brand"] = info["cpu"]["brand"]
        out["cpu_tier_in_use"] = info["cpu"]["tier_in_use"]
        out["cpu_tiers_supported"] = info["cpu"]["tiers_supported"]
        out["cpu_amx"] = info["cpu"].get("amx")  # hardware, emulated, or why unavailable
    if "cuda" in info:
        out["cuda_archs"] = info["cuda"]["archs"]
    if "native_error" in info:
        out["native_error"] = info["native_error"]
    out["triton"] = (info.get("triton") or {}).get("available")
    return out


def format_machine(info: Mapping[str, Any]) -> str:
    """A few human-readable lines for the top of a benchmark's output."""
    flags = info.get("cpu_flags", {})
    have = [f for f, on in flags.items() if on]
    lacks = [f for f, on in flags.items() if not on]
    lk = info.get("llmkernels", {})
    lines = [
        f"cpu: {info['cpu_model']} ({info['arch']}), {info['usable_cores']} usable cores, "
        f"torch threads {info['torch_threads']}"
        + (f", load average {info['loadavg_1min']:.2f}" if info.get("loadavg_1min") is not None
           else ""),
        f"cpu flags: {' '.join(have) or '-'}" + (f"  (no {' '.join(lacks)})" if lacks else ""),
        f"torch {info['torch']}" + (f", CUDA {info['torch_cuda']}" if info.get("torch_cuda") else "")
        + f", triton {info['triton'] or 'not installed'}, python {info['python']}",
        f"gpu: {info['gpu'] or 'none visible'}",
    ]
    if info.get("busy"):
        lines.append(f"WARNING: busy machine: other processes kept "
                     f"{info['others_busy_cores']:.1f} of the {info['usable_cores']} usable "
                     f"cores busy, {info['torch_threads']} torch threads need them: timings and "
                     "ratios are unreliable")
    if "error" in lk:
        lines.append(f"llmkernels: not importable: {lk['error']}")
    else:
        paths = ",".join(k for k, v in (lk.get("paths") or {}).items() if v)
        line = f"llmkernels {lk.get('version')}: paths built {paths}"
        if "cpu_tier_in_use" in lk:
            line += (f"; cpu tier {lk['cpu_tier_in_use']} "
                     f"(supported: {','.join(lk['cpu_tiers_supported'])}; "
                     f"amx: {lk.get('cpu_amx')})")
        if lk.get("cuda_archs"):
            line += f"; cuda archs {','.join(lk['cuda_archs'])}"
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------- timing

@dataclass
class Timing:
    median_s: float
    iqr_s: float     # spread of the measured runs; large when the machine is busy
    runs: int        # how many timed replicates the median is taken over (-1: do_bench's own)
    method: str


def comma_ints(text: str) -> List[int]:
    """argparse type: a comma list of integers."""
    import argparse
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers; got {text!r}")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 must not quietly mean "the default")."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}")
    return value


def positive_ints(text: str) -> List[int]:
    """argparse type: a non-empty comma list of integers >= 1 (an empty list would time
    nothing, a 0 an empty tensor)."""
    import argparse
    try:
        out = [positive_int(x) for x in text.split(",") if x]
    except argparse.ArgumentTypeError:
        out = []
    if not out:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers >= 1; got {text!r}")
    return out


def comma_floats(text: str) -> List[float]:
    """argparse type: a non-empty comma list of finite numbers."""
    import argparse
    try:
        out = [float(x) for x in text.split(",") if x]
    except ValueError:
        out = []
    if not out or not all(math.isfinite(x) for x in out):
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers; got {text!r}")
    return out


def comma_shapes(text: str) -> List[tuple]:
    """argparse type: a non-empty comma list of AxB shapes of integers >= 1 ("4096x11008")."""
    import argparse
    out = []
    for item in (x for x in text.split(",") if x):
        dims = item.split("x")
        try:
            shape = tuple(positive_int(d) for d in dims)
        except argparse.ArgumentTypeError:
            shape = ()
        if len(shape) != 2:
            raise argparse.ArgumentTypeError(f"expected a comma list of KxN shapes (integers "
                                             f">= 1, e.g. 4096x4096); got {item!r}")
        out.append(shape)
    if not out:
        raise argparse.ArgumentTypeError(f"expected a comma list of KxN shapes; got {text!r}")
    return out


def comma_names(allowed: Sequence[str]) -> Callable[[str], List[str]]:
    """argparse type: a non-empty comma list of names from allowed (a typo is an error, not a
    case silently skipped or run as another)."""
    import argparse

    def parse(text: str) -> List[str]:
        out = [x for x in text.split(",") if x]
        bad = [x for x in out if x not in allowed]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}; got {text!r}")
        return out
    return parse


def check_device(parser, device: str) -> None:
    """--device cuda refused at argument time when torch sees no GPU (a CPU-only torch
    would fail later with an AssertionError traceback from its first CUDA tensor)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device is visible")


@contextlib.contextmanager
def usage_errors(parser, option: Optional[str] = None) -> Iterator[None]:
    """llmkernels' refusals inside the block as parser.error (one line, exit status 2).

    Scripts ask the library (explain, use_cpu_tier, quantize_weight) about every case before
    timing starts: a forced path or CPU tier this machine cannot serve (BackendError), or a
    name or shape the library does not take (ValueError, TypeError), then ends the run at
    once, not in a traceback minutes into it."""
    from llmkernels.backends import BackendError
    try:
        yield
    except (BackendError, ValueError, TypeError) as exc:
        message = " ".join(str(exc).split())  # one line
        parser.error(f"{option}: {message}" if option else message)


def run_timed(main: Callable[[], int]) -> None:
    """A benchmark script's entry point: main(), its wall time, its exit status."""
    import time
    start = time.perf_counter()
    rc = main()
    print(f"wall time {time.perf_counter() - start:.1f} s")
    sys.exit(rc)


def time_fn(fn: Callable[[], Any], device: str = "cpu", min_run_time: float = 0.2) -> Timing:
    """Median run time of fn().

    CPU: torch.utils.benchmark's blocked_autorange, with torch's current thread count (its
    Timer defaults to one thread, which would not be the speed users see). CUDA:
    triton.testing.do_bench's median (it flushes L2 between runs), or CUDA events around
    single calls when triton is missing.
    """
    if torch.device(device).type == "cuda":
        return _time_cuda(fn, min_run_time)
    from torch.utils import benchmark
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing(m.median, m.iqr, len(m.times), "torch.utils.benchmark.blocked_autorange")


def mode_call(fn: Callable[..., Any], mode: str, inputs: Sequence[Any],
              grad_out: Any) -> Callable[[], Any]:
    """The timed statement of an attention-like fn(*inputs): "fwd" under no_grad (inference),
    or "fwd+bwd": forward, then torch.autograd.grad of every input (so nothing accumulates
    into .grad between runs; an input fn leaves unused gets None)."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return (fn(*inputs),)
        return call
    leaves = [t.detach().requires_grad_() for t in inputs]

    def call():
        out = fn(*leaves)
        return (out.detach(),) + torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return call


def time_interleaved(fns: Mapping[str, Callable[[], Any]], device: str = "cpu",
                     min_run_time: float = 0.2, block_s: float = 20e-3,
                     min_rounds: int = 7) -> Dict[str, Timing]:
    """Median run time of each fn, measured in alternation.

    CPU: round after round, one block of calls of each function (as many calls as take about
    block_s; the order rotates every round), until each has had min_run_time and at least
    min_rounds rounds. On a shared machine whose memory bandwidth drifts from one minute to
    the next (this project's VMs: 23-33 GB/s within an hour), timing one path after the other
    puts the drift into their ratio; in alternation both see the same machine. CUDA: time_fn
    of each (the GPU does not drift so).

    Blocks of 20 ms, not 2: the first call after another function's block pays for the
    interpreter's and torch's state that the other one's memory stream pushed out of the
    caches (after a 256 MiB read, any eager op took 100-250 us longer once, a quant_matmul of
    64 channels 278 us against 24; Zen 4 VM, 2026-11-27). In 2 ms blocks that was a tenth of
    a one-token GEMV's time (int4 4096x4096: 49-68% of the read bandwidth with 2 ms blocks,
    75-94% with 20 ms, alternated runs).
    """
    import time
    if torch.device(device).type == "cuda":
        return {k: time_fn(f, device, min_run_time) for k, f in fns.items()}
    names = list(fns)
    calls = {}
    for k in names:  # calls per block, from one warm call
        fns[k]()
        t0 = time.perf_counter()
        fns[k]()
        calls[k] = max(1, int(block_s / max(time.perf_counter() - t0, 1e-9)))
    times: Dict[str, List[float]] = {k: [] for k in names}
    spent = {k: 0.0 for k in names}
    rounds = 0
    while rounds < min_rounds or min(spent.values()) < min_run_time:
        order = names[rounds % len(names):] + names[:rounds % len(names)]
        for k in order:
            f, n = fns[k], calls[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            dt = time.perf_counter() - t0
            times[k].append(dt / n)
            spent[k] += dt
        rounds += 1
    out = {}
    for k, ts in times.items():
        ts = sorted(ts)
        q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
        out[k] = Timing(q(0.5), q(0.75) - q(0.25), len(ts),
                        f"interleaved blocks of {calls[k]} call(s), median of {len(ts)}")
    return out


def _time_cuda(fn: Callable[[], Any], min_run_time: float) -> Timing:
    rep_ms = max(1.0, 1000.0 * min_run_time)
    try:
        from triton.testing import do_bench
    except Exception:
        do_bench = None
    if do_bench is not None:
        # quantiles (rather than return_mode="median") works across triton versions and
        # gives the spread too
        median, q25, q75 = do_bench(fn, rep=rep_ms, quantiles=[0.5, 0.25, 0.75])
        return Timing(median / 1e3, (q75 - q25) / 1e3, -1, "triton.testing.do_bench median")
    # Fallback: CUDA events around each call, after a short warm-up.
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times: List[float] = []
    spent = 0.0
    while spent < min_run_time or len(times) < 5:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
        spent += times[-1]
    t = torch.tensor(times)
    iqr = (t.quantile(0.75) - t.quantile(0.25)).item()
    return Timing(t.median().item(), iqr, len(times), "cuda events median")


def graphed(fn: Callable[[], Any], calls: int = 1) -> Callable[[], None]:
    """The replay of a CUDA graph of `calls` calls of fn() (warmed up on a side stream first,
    which also lets Triton compile and autotune outside the capture). Timing a replay shows the
    kernels' own time, without the host's launch costs; divide it by `calls`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


READ_BYTES = 256 << 20


def read_sum(device: str) -> Callable[[], Any]:
    """A large float32 reduction (reads only): the memory-bound ceiling, READ_BYTES a call.
    Time it in alternation with a memory-bound case (time_interleaved), so that the case's
    GB/s is read against the bandwidth of the same minutes."""
    x = torch.randn(READ_BYTES // 4, device=device)
    return lambda: x.sum()


def matmul_ceiling(dtype: torch.dtype, device: str = "cpu", n: int = 2048,
                   min_run_time: float = 0.2) -> float:
    """GFLOP/s of a square torch.mm: the machine's practical ceiling for matmul-bound kernels
    (PyTorch's own oneDNN/MKL/cuBLAS GEMM), so achieved GFLOP/s can be read as a fraction."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_fn(lambda: torch.mm(a, b), device, min_run_time)
    return 2.0 * n ** 3 / t.median_s / 1e9


def matmul_ceilings(dtypes: Dict[str, torch.dtype], device: str = "cpu", n: int = 2048,
                    min_run_time: float = 0.2) -> Tuple[Dict[str, float], List[str]]:
    """matmul_ceiling per dtype name, and notes. On the CPU a 16-bit dtype's ceiling is the
    better of its own GEMM and float32's: kernels compute 16-bit inputs in float32 where the
    CPU lacks 16-bit dot products, and torch's bf16 GEMM there can be ~100x slower than its
    float32 one (1.3 GFLOP/s on an AVX2-only Zen 3: the ceiling read 0 and "%mm" 48000%).
    A quick 256^3 probe decides whether the 16-bit GEMM is worth timing at n (at 1 GFLOP/s a
    2048^3 product takes 13 s a call)."""
    on_cpu = device == "cpu"
    fp32 = (matmul_ceiling(torch.float32, device, n, min_run_time)
            if on_cpu or torch.float32 in dtypes.values() else None)
    ceilings: Dict[str, float] = {}
    notes: List[str] = []
    for name, dtype in dtypes.items():
        if dtype == torch.float32:
            ceilings[name] = fp32
            continue
        own, size = None, n
        if on_cpu:
            probe = matmul_ceiling(dtype, device, min(n, 256), min_run_time)
            if probe < 0.1 * fp32:
                own, size = probe, min(n, 256)
        if own is None:
            own = matmul_ceiling(dtype, device, n, min_run_time)
        ceilings[name] = own
        if on_cpu and own < fp32:
            ceilings[name] = fp32
            notes.append(f"torch's {name} GEMM reaches {own:.1f} GFLOP/s here ({size}^3), "
                         f"float32's {fp32:.0f} ({n}^3): the {name} ceiling is float32's")
    return ceilings, notes


# ---------------------------------------------------------------- memory

def peak_memory(fn: Callable[[], Any], device: str = "cpu") -> int:
    """Peak bytes torch allocated during fn() over what was live before the call.

    What fn returns counts too (it is alive at the end of the call). CUDA: the caching
    allocator's peak statistic. CPU: torch keeps no such statistic, so fn runs under
    torch.profiler with profile_memory=True and the allocation (+) and free (-) events are
    summed in time order; the running maximum is the peak. Exact for memory allocated
    through torch's CPU allocator; memory that native code mallocs itself is not seen.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del result
        return max(0, int(peak))
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr():  # kineto logs two lines per profile on stderr
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
            del result
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # frees of blocks allocated before profiling report 0 bytes
        peak = max(peak, live)
    return peak


def optimizer_state_bytes(opt) -> int:
    """Bytes of the tensors an optimizer keeps in opt.state (moments, their scales, steps)."""
    return sum(t.numel() * t.element_size() for s in opt.state.values()
               for t in s.values() if isinstance(t, torch.Tensor))


class _quiet_stderr:
    """Silence file descriptor 2 (C++ logging) for a block; Python exceptions still show,
    since they are printed after the block has restored it."""

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        return False


# ---------------------------------------------------------------- correctness

@dataclass
class Check:
    """One tensor's comparison against the float64 reference."""
    name: str
    error: float                      # max |got - reference|
    bound: float                      # what error may be
    ok: bool
    baseline_error: Optional[float]   # PyTorch's same-precision error, when given


def max_abs_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| in float64; inf when either holds NaN/Inf where the other doesn't."""
    if got.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(got.shape)} vs reference {tuple(ref.shape)}")
    if got.numel() == 0:
        return 0.0
    diff = (got.detach().double() - ref.detach().double().to(got.device)).abs().max().item()
    return diff if math.isfinite(diff) else float("inf")


def check_close(name: str, got: torch.Tensor, ref: torch.Tensor, *, atol: float,
                baseline: Optional[torch.Tensor] = None, factor: float = 2.0) -> Check:
    """Compare got with a float64 reference.

    With `baseline` (PyTorch's own result in the same precision) the bound is DESIGN.md's:
    factor x the baseline's error, plus the absolute floor atol. Without it, just atol.
    """
    err = max_abs_error(got, ref)
    base = max_abs_error(baseline, ref) if baseline is not None else None
    bound = atol + (factor * base if base is not None and math.isfinite(base) else 0.0)
    return Check(name, err, bound, err <= bound, base)


# ---------------------------------------------------------------- output

def fmt(value: Any, spec: str = ".3g") -> str:
    """Table cell text: numbers formatted with spec, None as '-', others as str."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return format(value, spec)
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns aligned by width: text left, numbers (cells that parse as numbers) right."""
    text = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def numeric(cell: str) -> bool:
        try:
            float(cell.rstrip("x%"))
            return True
        except ValueError:
            return cell == "-"

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if numeric(c) else c.ljust(w)
                         for c, w in zip(cells, widths)).rstrip()

    out = [line(list(headers)), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in text]
    return "\n".join(out)


def _parent(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """One line per row; columns are the union of the rows' keys, in first-seen order."""
    _parent(path)
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in columns})


def write_json(path: str, obj: Any) -> None:
    _parent(path)
    with open(path, "w") as f:
        json.dump(_jsonable(obj), f, indent=2)
        f.write("\n")


def _jsonable(obj: Any) -> Any:
    """Dataclasses, dtypes and non-finite floats made JSON-safe (NaN/Inf become null)."""
    if hasattr(obj, "__dataclass_fields__"):
        return _jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


PLOT_NEEDS = ("plotting needs matplotlib, which is not installed: pip install matplotlib "
              "(or pip install .[bench])")


def plt_module():
    """matplotlib.pyplot with a file-only backend, imported only when a plot is asked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # an optional dependency (the [bench] extra): say how to get it
        raise SystemExit(PLOT_NEEDS) from None
    return plt


def plot_file(text: str) -> str:
    """argparse type of --plot FILE.png ('' for none): matplotlib is imported here, so that
    its absence ends the run at argument time, not after minutes of timing."""
    import argparse
    if text:
        try:
            plt_module()
        except SystemExit as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return text
