"""Optimizer benchmark: llmkernels.optim against torch.optim on models of realistic layer shapes.

    python benchmarks/optim.py                    # 10M and 50M parameters, fp32 and bf16
    python benchmarks/optim.py --quick            # seconds: a smoke test
    python benchmarks/optim.py --params 200 --json out.json
    python benchmarks/optim.py --device cuda      # GPU: ours are the Triton multi-tensor steps

For each model size it checks a few steps of ours against torch (max relative difference of
the parameters), then times one optimizer step (gradients already in place) side by side:
  ours         llmkernels.optim.AdamW / AdamW8bit / SGD (the fused multi-tensor step)
  torch-fused  torch.optim.AdamW(fused=True) / SGD(fused=True)
  torch        torch.optim.AdamW / SGD with their default (foreach or single-tensor) code
  bnb-8bit, torchao-8bit   (AdamW8bit rows, where installed) bitsandbytes' and torchao's AdamW8bit
GB/s = bytes an AdamW step must move (read param, grad, exp_avg, exp_avg_sq; write param,
exp_avg, exp_avg_sq) / time, against the machine's copy rate measured in the same run.
"""
from __future__ import annotations

import argparse
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


def copy_bandwidth(device: str, min_run_time: float) -> float:
    x = torch.randn((256 << 20) // 4, device=device)
    y = torch.empty_like(x)
    t = harness.time_fn(lambda: y.copy_(x), device, min_run_time).median_s
    return 2 * x.numel() * 4 / t / 1e9


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
    bw = copy_bandwidth(dev, mrt)
    print(f"copy bandwidth (256 MiB, read + write): {bw:.1f} GB/s\n", flush=True)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    rows, records, failed = [], [], 0
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
                base = [torch.randn(s, device=dev).to(dtype) for s in shapes]
                grads = [torch.randn(s, device=dev).to(dtype) * 1e-2 for s in shapes]
                times: Dict[str, float] = {}
                finals, steps = {}, {}
                for label, make in makers.items():
                    ps = [b.clone().requires_grad_() for b in base]
                    for q, g in zip(ps, grads):
                        q.grad = g.clone()
                    if label.endswith("-graph"):
                        replay = graphed(make, ps, dev)
                        finals[label] = [q.detach().clone() for q in ps[:4]]
                        steps[label] = replay
                        del ps
                        continue
                    opt = make(ps)
                    for _ in range(3):
                        opt.step()
                    if label == "ours":
                        path = step_path(ps)
                    finals[label] = [q.detach().clone() for q in ps[:4]]
                    if label in ("ours", "torch-fused", "torch"):
                        steps[label] = opt.step  # timed below, in alternation
                    else:  # the other 8-bit AdamWs (~30x slower): alone
                        times[label] = harness.time_fn(opt.step, dev, mrt).median_s
                    del opt, ps
                # ours and torch's in alternation: their ratio does not take the machine's
                # drift between two timings (see harness.time_interleaved)
                times.update({k: v.median_s for k, v in
                              harness.time_interleaved(steps, dev, mrt).items()})
                del steps
                err = max((a.float() - b.float()).abs().max().item() /
                          (b.float().abs().max().item() + 1e-12)
                          for a, b in zip(finals["ours"], finals["torch-fused"]))
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                if name == "adamw8bit":  # 8-bit moments: close to AdamW, not equal
                    tol = 2e-2
                ok = err <= tol
                if "ours-graph" in finals:  # the replayed step is the eager one's
                    graph_err = max((a.float() - b.float()).abs().max().item() /
                                    (b.float().abs().max().item() + 1e-12)
                                    for a, b in zip(finals["ours-graph"], finals["ours"]))
                    ok = ok and graph_err <= (1e-6 if dtype == torch.float32 else 1e-2)
                failed += not ok
                t = times["ours"]
                gbs = n * bytes_per / t / 1e9
                rec = dict(device=dev, path=path, params_m=n / 1e6, tensors=len(shapes), dtype=dt, optimizer=name,
                           correct=ok, rel_err=err, gbs=gbs, pct_copy_bw=100 * gbs / bw,
                           **{f"{k}_ms": v * 1e3 for k, v in times.items()},
                           **{f"vs_{k}": v / t for k, v in times.items() if k != "ours"})
                if "ours-graph" in times:
                    rec["graph_vs_torch_fused_graph"] = (times["torch-fused-graph"]
                                                         / times["ours-graph"])
                records.append(rec)
                rows.append([f"{n / 1e6:.1f}M", str(len(shapes)), dt, name, path, "ok" if ok else "FAIL",
                             f"{t * 1e3:.2f}", f"{times['torch-fused'] * 1e3:.2f}",
                             f"{times['torch'] * 1e3:.2f}", f"{times['torch-fused'] / t:.2f}x",
                             f"{times['torch'] / t:.2f}x", f"{gbs:.1f}", f"{100 * gbs / bw:.0f}%",
                             " ".join(f"{times[k] / t:.1f}x {k}" for k in times
                                      if k.endswith("-8bit")) or "-",
                             (f"{times['ours-graph'] * 1e3:.2f} ms, "
                              f"{times['torch-fused-graph'] / times['ours-graph']:.2f}x fused-graph"
                              if "ours-graph" in times else "-")])
                print(" ".join(rows[-1]), flush=True)
    print()
    print(harness.format_table(["params", "tensors", "dtype", "optimizer", "path", "check", "ours ms",
                                "torch-fused ms", "torch ms", "vs fused", "vs torch", "GB/s",
                                "% copy bw", "vs other 8-bit AdamW", "CUDA graph"], rows))
    if args.json:
        harness.write_json(args.json, {"benchmark": "optim", "machine": info,
                                       "copy_bandwidth_gbs": bw, "cases": records})
    if failed:
        print(f"CORRECTNESS FAILED for {failed} case(s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    harness.run_timed(main)
