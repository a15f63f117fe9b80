"""Optimizer benchmark: llmkernels.optim against torch.optim on models of realistic layer shapes.

    python benchmarks/optim.py                    # 10M and 50M parameters, fp32 and bf16
    python benchmarks/optim.py --quick            # seconds: a smoke test
    python benchmarks/optim.py --params 200 --json out.json
    python benchmarks/optim.py --device cuda      # GPU: ours are the Triton multi-tensor steps

For each model size it first checks three steps of every optimizer against a float64
reference (torch's single-tensor optimizer on float64 copies of the same parameters and
gradients): per tensor, the relative L2 error of the update (final - initial parameters); ours
may err at most 2x the better of torch's two same-precision variants plus a floor (larger for
8-bit moments). Then it times one optimizer step (gradients already in place) side by side:
  ours         llmkernels.optim.AdamW / AdamW8bit / SGD (the fused multi-tensor step)
  torch-fused  torch.optim.AdamW(fused=True) / SGD(fused=True)
  torch        torch.optim.AdamW / SGD with their default (foreach or single-tensor) code
  bnb-8bit, torchao-8bit   (AdamW8bit rows, where installed) bitsandbytes' and torchao's AdamW8bit
GB/s = bytes an AdamW step must move (read param, grad, exp_avg, exp_avg_sq; write param,
exp_avg, exp_avg_sq) / time, against the machine's in-place read + write rate measured in the
same run. State MiB = the tensors each optimizer keeps in opt.state.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import llmkernels  # noqa: E402


# The smallest model model_shapes builds: one layer of width 256 (0.79M parameters). A smaller
# --params would be rounded up to it, so it is refused instead.
MIN_MILLIONS = (12 * 256 * 256 + 13 * 256) / 1e6


def model_shapes(millions: float) -> List[tuple]:
    """Parameter shapes of a decoder-only transformer with about `millions` M parameters:
    per layer qkv, out, up, down projections, their biases and two layer norms."""
    d = 256
    while True:
        per_layer = 12 * d * d + 13 * d
        layers = max(1, round(millions * 1e6 / (per_layer + 0.0)))
        if layers <= 24:
            break
        d *= 2
    shapes = []
    for _ in range(layers):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,),
                   (d,), (d,), (d,), (d,)]
    return shapes


def inplace_bandwidth(device: str, min_run_time: float) -> float:
    """GB/s of x.mul_(c) over 256 MiB, counted as read + write: an optimizer step updates its
    tensors in place, as this does. (y.copy_(x) would move ~3x, not 2x, on a CPU: writing
    lines it has not read first reads them too, write-allocate.) c > 1 by one ulp-ish: x
    grows by e^1 in 10^7 calls, never to Inf, and never into slow denormals."""
    x = torch.randn((256 << 20) // 4, device=device)
    t = harness.time_fn(lambda: x.mul_(1.0000001), device, min_run_time).median_s
    return 2 * x.numel() * 4 / t / 1e9


STEPS = 3  # steps each optimizer takes before the check (and before timing)
# The float64 references: torch's plain single-tensor optimizers, same hyperparameters.
REFERENCE = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
             "adamw8bit": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
             "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=False)}
# Floors of the bound on update_error. Measured for correct kernels (0.8M and 10M models,
# CPU): fp32 ~1e-6; bf16 ~2e-2 (rounding of the parameters), fp16 AdamW 0.1 (its second
# moments underflow), as much as torch's; 8-bit moments ~1.2e-2 (torch's 32-bit ones ~1e-6
# in fp32). A wrong step (none, lr off by 50%, tensors skipped) errs by 0.5 to 1.
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
FLOOR_8BIT = 0.1


def stepped(make, base, grads) -> tuple:
    """Parameters (copies of base, gradients grads) after STEPS steps of make(params), and the
    optimizer, which holds them."""
    ps = [b.clone().requires_grad_() for b in base]
    for q, g in zip(ps, grads):
        q.grad = g.clone()
    opt = make(ps)
    for _ in range(STEPS):
        opt.step()
    return ps, opt


def reference_updates(make, base, grads) -> List[torch.Tensor]:
    """The float64 updates of STEPS steps of make(params) from base with gradients grads
    (the optimizer, its state and the float64 parameters freed on return)."""
    ps, _ = stepped(make, [b.double() for b in base], [g.double() for g in grads])
    return [q.detach() - b.double() for q, b in zip(ps, base)]


def update_error(ps, base, ref_updates) -> float:
    """The largest over tensors of |update - reference update| / |reference update| (L2
    norms; update = parameters now - base). Per tensor, so that a tensor left out counts 1
    however small it is; norms, not the largest element, since 8-bit moments move single
    elements' updates by up to their whole size, and one rounding of a large 16-bit weight
    (bf16 ulp at 0.08: 5e-4) is a sixth of a 3e-3 update."""
    return max(((q.detach().double() - b.double() - r).norm() / r.norm().clamp(min=1e-30)).item()
               for q, b, r in zip(ps, base, ref_updates))


def other_8bit_adamw() -> Dict[str, object]:
    """The 8-bit AdamW of bitsandbytes and of torchao, where they are installed (optional
    baselines: `pip install bitsandbytes torchao`)."""
    makers = {}
    try:
        import bitsandbytes as bnb
        makers["bnb-8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
    except Exception:
        pass
    try:
        from torchao.optim import AdamW8bit as AoAdamW8bit
        makers["torchao-8bit"] = lambda ps: AoAdamW8bit(ps, lr=1e-3)
    except Exception:
        pass
    return makers


def step_path(params: List[torch.Tensor]) -> str:
    """The path our optimizer's step takes (the optimizers pick it per group, as here)."""
    from llmkernels.optim import _fused
    return _fused.route(params, [[q, q.grad] for q in params], False)[0]


def graphed(make, params, device: str):
    """A capturable optimizer of params made by make(params, lr_tensor), stepped twice eagerly
    (warm-up, on a side stream as torch's CUDA graph guide does), then its step captured in a
    CUDA graph and replayed once (three steps in all, as the eager optimizers take): the
    replay, to time."""
    opt = make(params, torch.tensor(1e-3, device=device))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    graph.replay()
    graph.opt = opt  # the graph's tensors stay alive with it
    return graph.replay


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", type=harness.comma_floats, default=None,
                   help=f"comma list of model sizes in millions, each >= {MIN_MILLIONS:.2f} "
                   "(default 10,50; with --quick the smallest model, unless --params is given: "
                   "--params wins)")
    p.add_argument("--dtypes", type=harness.comma_names(("fp32", "bf16", "fp16")),
                   default=["fp32", "bf16"], help="comma list (default fp32,bf16)")
    p.add_argument("--optimizers", type=harness.comma_names(("adamw", "adamw8bit", "sgd")),
                   default=["adamw", "adamw8bit", "sgd"],
                   help="comma list (default adamw,adamw8bit,sgd)")
    p.add_argument("--min-run-time", type=float, default=None)
    p.add_argument("--quick", action="store_true",
                   help="short timings of the smallest model (--params, if given, sets the sizes)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default) or cuda")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time AdamW / AdamW8bit steps with capturable=True replayed from a "
                        "CUDA graph, against torch's fused capturable AdamW replayed the same way")
    args = p.parse_args(argv)
    dev = args.device
    harness.check_device(p, dev)
    if args.cuda_graphs and dev != "cuda":
        p.error("--cuda-graphs needs --device cuda")
    small = [m for m in args.params or () if m < MIN_MILLIONS]
    if small:
        p.error(f"--params {','.join(f'{m:g}' for m in small)}: the smallest model is "
                f"{MIN_MILLIONS:.2f}M parameters (one layer of width 256)")
    sizes = args.params or ([MIN_MILLIONS] if args.quick else [10.0, 50.0])
    mrt = args.min_run_time or (0.05 if args.quick else 0.5)
    info = harness.machine_info(dev)
    print(harness.format_machine(info))
    bw = inplace_bandwidth(dev, mrt)
    print(f"in-place bandwidth (x.mul_(c) of 256 MiB, read + write): {bw:.1f} GB/s\n",
          flush=True)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    rows, records, notes, failed = [], [], [], 0
    for millions in sizes:
        shapes = model_shapes(millions)
        n = sum(int(torch.tensor(s).prod()) for s in shapes)
        for dt in args.dtypes:
            dtype = dtypes[dt]
            for name in args.optimizers:
                if name == "adamw":
                    makers = {"ours": lambda ps: llmkernels.optim.AdamW(ps, lr=1e-3),
                              "torch-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
                              "torch": lambda ps: torch.optim.AdamW(ps, lr=1e-3)}
                    bytes_per = 7 * torch.tensor([], dtype=dtype).element_size()
                    if args.cuda_graphs:
                        makers["ours-graph"] = lambda ps, lr: llmkernels.optim.AdamW(
                            ps, lr=lr, capturable=True)
                        makers["torch-fused-graph"] = lambda ps, lr: torch.optim.AdamW(
                            ps, lr=lr, fused=True, capturable=True)
                elif name == "adamw8bit":
                    makers = {"ours": lambda ps: llmkernels.optim.AdamW8bit(ps, lr=1e-3),
                              "torch-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
                              "torch": lambda ps: torch.optim.AdamW(ps, lr=1e-3)}
                    makers.update(other_8bit_adamw())
                    if args.cuda_graphs:
                        makers["ours-graph"] = lambda ps, lr: llmkernels.optim.AdamW8bit(
                            ps, lr=lr, capturable=True)
                        makers["torch-fused-graph"] = lambda ps, lr: torch.optim.AdamW(
                            ps, lr=lr, fused=True, capturable=True)
                    # param read + write, grad read, two 1-byte moments read + written
                    bytes_per = 3 * torch.tensor([], dtype=dtype).element_size() + 4
                else:  # sgd
                    makers = {"ours": lambda ps: llmkernels.optim.SGD(ps, lr=1e-2, momentum=0.9),
                              "torch-fused": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9,
                                                                        fused=True),
                              "torch": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9)}
                    bytes_per = 5 * torch.tensor([], dtype=dtype).element_size()
                torch.manual_seed(0)
                # Weights of a trained model's scale (~0.02: bf16's ulp there is ~1e-4, below
                # a 1e-3 step), gradients large enough that SGD's lr * grad shows in them too.
                base = [(torch.randn(s, device=dev) * 0.02).to(dtype) for s in shapes]
                grads = [(torch.randn(s, device=dev) * 0.1).to(dtype) for s in shapes]
                ref = reference_updates(REFERENCE[name], base, grads)
                times: Dict[str, float] = {}
                errs, states, steps = {}, {}, {}
                for label, make in makers.items():
                    if label.endswith("-graph"):
                        ps = [b.clone().requires_grad_() for b in base]
                        for q, g in zip(ps, grads):
                            q.grad = g.clone()
                        steps[label] = graphed(make, ps, dev)  # STEPS steps taken
                        errs[label] = update_error(ps, base, ref)
                        del ps
                        continue
                    ps, opt = stepped(make, base, grads)
                    if label == "ours":
                        path = step_path(ps)
                    errs[label] = update_error(ps, base, ref)
                    states[label] = harness.optimizer_state_bytes(opt)
                    if label in ("ours", "torch-fused", "torch"):
                        steps[label] = opt.step  # timed below, in alternation
                    else:  # the other 8-bit AdamWs (~30x slower): alone
                        times[label] = harness.time_fn(opt.step, dev, mrt).median_s
                    del opt, ps
                del ref
                # ours and torch's in alternation: their ratio does not take the machine's
                # drift between two timings (see harness.time_interleaved)
                times.update({k: v.median_s for k, v in
                              harness.time_interleaved(steps, dev, mrt).items()})
                del steps
                # DESIGN.md's bound: 2x torch's same-precision error (the better of its two
                # variants: its fused SGD leaves 16-bit weights unchanged on the CPU, torch
                # 2.13) plus a floor; 8-bit moments have no torch counterpart, hence theirs
                err = errs["ours"]
                err_torch = min((e for k, e in errs.items() if k in ("torch-fused", "torch")
                                 and math.isfinite(e)), default=math.inf)
                bound = 2 * err_torch + (FLOOR_8BIT if name == "adamw8bit" else FLOOR[dtype])
                ok = err <= bound and errs.get("ours-graph", 0.0) <= bound
                notes += [f"{n / 1e6:.1f}M {dt} {name}: {k}'s own update fails the bound "
                          f"(err {errs[k]:.2g}): its time is that of a wrong step"
                          for k in ("torch-fused", "torch") if not errs[k] <= bound]
                failed += not ok
                t = times["ours"]
                gbs = n * bytes_per / t / 1e9
                rec = dict(device=dev, path=path, params_m=n / 1e6, tensors=len(shapes), dtype=dt, optimizer=name,
                           correct=ok, rel_err=err, bound=bound,
                           **{f"err_{k.replace('-', '_')}": v for k, v in errs.items()
                              if k != "ours"},
                           state_mib_ours=states["ours"] / 2**20,
                           state_mib_torch_fused=states["torch-fused"] / 2**20,
                           gbs=gbs, pct_inplace_bw=100 * gbs / bw,
                           **{f"{k}_ms": v * 1e3 for k, v in times.items()},
                           **{f"vs_{k}": v / t for k, v in times.items() if k != "ours"})
                if "ours-graph" in times:
                    rec["graph_vs_torch_fused_graph"] = (times["torch-fused-graph"]
                                                         / times["ours-graph"])
                records.append(rec)
                rows.append([f"{n / 1e6:.1f}M", str(len(shapes)), dt, name, path, "ok" if ok else "FAIL",
                             f"{err:.1e}", f"{err_torch:.1e}", f"{t * 1e3:.2f}",
                             f"{times['torch-fused'] * 1e3:.2f}",
                             f"{times['torch'] * 1e3:.2f}", f"{times['torch-fused'] / t:.2f}x",
                             f"{times['torch'] / t:.2f}x", f"{gbs:.1f}", f"{100 * gbs / bw:.0f}%",
                             f"{states['ours'] / 2**20:.1f}",
                             f"{states['torch-fused'] / 2**20:.1f}",
                             " ".join(f"{times[k] / t:.1f}x {k}" for k in times
                                      if k.endswith("-8bit")) or "-",
                             (f"{times['ours-graph'] * 1e3:.2f} ms, "
                              f"{times['torch-fused-graph'] / times['ours-graph']:.2f}x fused-graph"
                              if "ours-graph" in times else "-")])
                print(" ".join(rows[-1]), flush=True)
    print()
    print(harness.format_table(["params", "tensors", "dtype", "optimizer", "path", "check",
                                "err", "torch err", "ours ms", "torch-fused ms", "torch ms",
                                "vs fused", "vs torch", "GB/s", "% in-place bw",
                                "ours state MiB", "torch state MiB", "vs other 8-bit AdamW",
                                "CUDA graph"], rows))
    print(f"\nerr: per tensor, the largest relative L2 error of the {STEPS} steps' update "
          "against a float64 reference; torch err: the better of torch-fused's and torch's "
          "(the check allows 2x it + a floor)")
    for note in notes:
        print(f"note: {note}")
    if args.json:
        harness.write_json(args.json, {"benchmark": "optim", "machine": info,
                                       "inplace_bandwidth_gbs": bw, "cases": records})
    if failed:
        print(f"CORRECTNESS FAILED for {failed} case(s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    harness.run_timed(main)
