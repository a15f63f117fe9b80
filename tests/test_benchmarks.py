"""Smoke tests of the benchmarks: they run, check correctness, and write what they promise.

Timings are never asserted (DESIGN.md "Performance"): a busy machine must not fail the
suite. What is asserted is the shape of the output and that the correctness checks the
benchmark performs before timing passed.
"""
import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)
import harness  # noqa: E402


def test_attention_quick(tmp_path):
    """One --quick run (a few seconds) exercising every output: table, JSON, CSV, plot."""
    out_json, out_csv, png = tmp_path / "a.json", tmp_path / "a.csv", tmp_path / "a.png"
    cmd = [sys.executable, os.path.join(BENCH, "attention.py"), "--quick", "--device", "cpu",
           "--json", str(out_json), "--csv", str(out_csv)]
    plotting = importlib.util.find_spec("matplotlib") is not None
    if plotting:
        cmd += ["--plot", str(png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ours ms" in proc.stdout and "vs sdpa" in proc.stdout  # the table was printed

    result = json.loads(out_json.read_text())
    assert result["benchmark"] == "attention"
    assert result["all_correct"] is True
    assert result["machine"]["cpu_model"] and result["machine"]["torch"] == torch.__version__
    assert set(result["matmul_ceiling_gflops"]) == {"fp32", "bf16"}
    cases = result["cases"]
    assert {(c["dtype"], c["causal"]) for c in cases} == {
        ("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)}
    for case in cases:
        assert case["correct"] is True
        assert {c["name"] for c in case["checks"]} == {"out", "dq", "dk", "dv"}
        assert all(c["ok"] and c["error"] <= c["bound"] for c in case["checks"])
        assert set(case["modes"]) == {"fwd", "fwd+bwd"}
        for entry in case["modes"].values():
            assert entry["gflop"] > 0
            assert set(entry["paths"]) == {"ours", "sdpa", "math"}
            for res in entry["paths"].values():
                assert res["ms"] > 0 and res["gflops"] > 0 and res["peak_mib"] >= 0
            assert entry["speedup_vs_sdpa"] > 0 and entry["speedup_vs_math"] > 0

    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(cases) * 2 * 3  # (case, mode, path)
    assert {"dtype", "seqlen", "mode", "path", "ms", "gflops", "peak_mib"} <= set(rows[0])
    if plotting:
        assert png.stat().st_size > 0


def test_flop_accounting():
    spec = importlib.util.spec_from_file_location("bench_attention", os.path.join(BENCH, "attention.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    assert mod.unmasked_pairs(4, 4, causal=False) == 16
    assert mod.unmasked_pairs(4, 4, causal=True) == 10   # 1 + 2 + 3 + 4
    case = mod.Case("fp32", False, 1, 16, 2048, 64)
    assert mod.forward_flops(case) == 4 * 16 * 2048 * 2048 * 64
    assert mod.mode_flops(case, "fwd+bwd") == 3.5 * mod.forward_flops(case)
    assert mod.default_heads(2048, 64) == 16  # the target shape (1, 16, 2048, 64)


def test_peak_memory_counts_transient_allocations():
    def fn():
        a = torch.empty(4 << 20, dtype=torch.uint8)   # 4 MiB, freed before returning
        b = torch.empty(1 << 20, dtype=torch.uint8)   # 1 MiB, returned
        del a
        return b
    peak = harness.peak_memory(fn, "cpu")
    assert 5 << 20 <= peak < (5 << 20) + (64 << 10)


def test_check_close_bound():
    ref = torch.zeros(3, dtype=torch.float64)
    base = torch.tensor([0.0, 1e-3, 0.0])
    ok = harness.check_close("x", torch.tensor([0.0, 2e-3, 0.0]), ref, atol=1e-6, baseline=base)
    bad = harness.check_close("x", torch.tensor([0.0, 3e-3, 0.0]), ref, atol=1e-6, baseline=base)
    nan = harness.check_close("x", torch.tensor([float("nan"), 0.0, 0.0]), ref, atol=1.0)
    assert ok.ok and not bad.ok and not nan.ok


def test_time_interleaved_alternates_and_times_each():
    import time
    calls = []

    def short():
        calls.append("s")
        time.sleep(0.001)

    def long():
        calls.append("l")
        time.sleep(0.002)

    t = harness.time_interleaved({"short": short, "long": long}, "cpu", min_run_time=0.02,
                                 block_s=0.004, min_rounds=5)
    assert set(t) == {"short", "long"} and all(v.runs >= 5 for v in t.values())
    assert 1.4 <= t["long"].median_s / t["short"].median_s <= 2.6
    # blocks alternate: the calls do not come as all of one, then all of the other
    firsts = "".join(c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c)
    assert firsts.count("sl") + firsts.count("ls") >= 8


def test_format_table_aligns():
    text = harness.format_table(["name", "ms"], [["a", "1.5"], ["longer", "12.25"]])
    lines = text.splitlines()
    assert len({len(l) for l in lines[2:]}) == 1  # right-aligned numbers end together
    assert lines[3].startswith("longer")


def _run_quick(script, tmp_path, extra=()):
    out_json = tmp_path / f"{script}.json"
    cmd = [sys.executable, os.path.join(BENCH, script), "--json", str(out_json), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out_json.read_text()), proc.stdout


def test_quant_matmul_quick(tmp_path):
    result, out = _run_quick("quant_matmul.py", tmp_path, ["--quick", "--device", "cpu"])
    assert result["benchmark"] == "quant_matmul" and result["read_bandwidth_gbs"] > 0
    assert {c["scheme"] for c in result["cases"]} == {"int8", "int4", "w8a8"}
    assert all(c["correct"] for c in result["cases"])
    assert "vs baselines" in out or "speedup vs baselines" in out


def test_optim_quick(tmp_path):
    result, _ = _run_quick("optim.py", tmp_path, ["--quick"])
    assert result["benchmark"] == "optim"
    assert {(c["dtype"], c["optimizer"]) for c in result["cases"]} == {
        (dt, opt) for dt in ("fp32", "bf16") for opt in ("adamw", "adamw8bit", "sgd")}
    assert all(c["correct"] for c in result["cases"])


def test_attention_decode_quick(tmp_path):
    result, _ = _run_quick("attention_decode.py", tmp_path,
                           ["--device", "cpu", "--batch", "1", "--cache-lens", "256",
                            "--head-dim", "64", "--min-run-time", "0.01"])
    assert result["benchmark"] == "attention_decode"
    assert all(c["correct"] for c in result["cases"])


def test_model_quick(tmp_path):
    pytest.importorskip("transformers")
    plotting = importlib.util.find_spec("matplotlib") is not None
    plot = str(tmp_path / "model.png") if plotting else ""
    result, out = _run_quick("model.py", tmp_path, ["--quick", "--device", "cpu", "--plot", plot])
    assert result["benchmark"] == "model"
    assert {(r["family"], r["variant"]) for r in result["training"]} == {
        (f, v) for f in ("llama", "mistral") for v in ("baseline", "ours")}
    assert all(r["check"] == "ok" for r in result["training"])
    assert [r["variant"] for r in result["generation"]] == [
        "float32", "bf16", "int8 (bf16 x)", "int4 (bf16 x)"]
    assert not plotting or (tmp_path / "model.png").stat().st_size > 0
    assert "greedy tokens = float32" in out


def test_comma_lists_reject_unknown_names():
    """A typo in a benchmark's list is an argparse error, not a case skipped or run as another
    (optim.py ran every unknown optimizer name as SGD)."""
    import argparse
    parse = harness.comma_names(("adamw", "sgd"))
    assert parse("sgd,adamw,") == ["sgd", "adamw"]
    for bad in ("adam", "sgd,adam", ",", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="choose from adamw,sgd"):
            parse(bad)
    assert harness.comma_ints("1,16,") == [1, 16]
    with pytest.raises(argparse.ArgumentTypeError, match="integers"):
        harness.comma_ints("1,x")


@pytest.mark.parametrize("script,args", [("optim.py", ["--optimizers", "adam"]),
                                         ("optim.py", ["--dtypes", "bfloat16"]),
                                         ("quant_matmul.py", ["--schemes", "int3"])])
def test_benchmarks_refuse_unknown_names(script, args):
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "choose from" in proc.stderr, proc.stderr[-2000:]
