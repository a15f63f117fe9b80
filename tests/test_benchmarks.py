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


def test_matmul_ceilings_take_float32s_where_a_16bit_gemm_is_slower(monkeypatch):
    """On a CPU whose bf16 GEMM crawls (1.3 GFLOP/s on an AVX2-only Zen 3, float32 169), the
    bf16 ceiling is float32's, said in a note, and the slow GEMM is timed only at 256^3;
    where the 16-bit GEMM is the faster, it is its own ceiling; CUDA keeps each dtype's."""
    rates = {torch.float32: 100.0, torch.bfloat16: 1.0, torch.float16: 400.0}
    sizes = []

    def fake(dtype, device="cpu", n=2048, min_run_time=0.2):
        sizes.append((dtype, n))
        return rates[dtype]
    monkeypatch.setattr(harness, "matmul_ceiling", fake)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    ceilings, notes = harness.matmul_ceilings(dtypes, "cpu", 2048)
    assert ceilings == {"fp32": 100.0, "bf16": 100.0, "fp16": 400.0}
    assert (torch.bfloat16, 2048) not in sizes and (torch.float16, 2048) in sizes
    assert len(notes) == 1 and "bf16" in notes[0] and "float32" in notes[0]
    sizes.clear()
    ceilings, notes = harness.matmul_ceilings({"bf16": torch.bfloat16}, "cuda", 2048)
    assert ceilings == {"bf16": 1.0} and not notes and sizes == [(torch.bfloat16, 2048)]


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
        # the no-grad forward (the fwd rows' call) is checked too
        assert {c["name"] for c in case["checks"]} == {"out", "dq", "dk", "dv", "no-grad out"}
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
    for c in result["cases"]:
        assert c["rel_err"] <= c["rel_bound"]
        # on the CPU float32 x is checked too, near-exact; every path cycles >= --rotate-mib
        assert c["rel_err_f32_x"] <= c["rel_bound_f32_x"] <= 2e-5
        assert c["rotated_mib"] >= 256


def test_quant_matmul_backward_quick(tmp_path):
    result, out = _run_quick("quant_matmul_backward.py", tmp_path,
                             ["--device", "cpu", "--ms", "1,3", "--shape", "256x96",
                              "--schemes", "int8,int4,w8a8", "--min-run-time", "0.01"])
    assert result["benchmark"] == "quant_matmul_backward" and result["all_correct"] is True
    assert {(c["scheme"], c["m"]) for c in result["cases"]} == {
        (s, m) for s in ("int8", "int4", "w8a8") for m in (1, 3)}
    assert all(c["error"] <= c["bound"] and c["vs_sliced"] > 0 for c in result["cases"])
    assert "vs sliced" in out


def test_optim_quick(tmp_path):
    result, _ = _run_quick("optim.py", tmp_path, ["--quick"])
    assert result["benchmark"] == "optim"
    assert {(c["dtype"], c["optimizer"]) for c in result["cases"]} == {
        (dt, opt) for dt in ("fp32", "bf16") for opt in ("adamw", "adamw8bit", "sgd")}
    assert all(c["correct"] for c in result["cases"])
    assert result["inplace_bandwidth_gbs"] > 0
    for c in result["cases"]:
        assert c["rel_err"] <= c["bound"] and c["err_torch_fused"] is not None
        assert 0 < c["state_mib_ours"] <= c["state_mib_torch_fused"]  # 8-bit: a quarter


def test_optim_check_catches_a_step_that_does_nothing(monkeypatch, capsys):
    """bf16 parameters after a no-op 'optimizer' passed the old check (parameters within 2e-2
    of torch's): the updates are what is compared now."""
    import llmkernels
    mod = _script("optim.py")

    class Noop(llmkernels.optim.AdamW):
        def step(self, closure=None):
            return None
    monkeypatch.setattr(mod.llmkernels.optim, "AdamW", Noop)
    rc = mod.main(["--quick", "--optimizers", "adamw", "--dtypes", "bf16",
                   "--min-run-time", "0.001"])
    assert rc == 1 and "CORRECTNESS FAILED for 1 case(s)" in capsys.readouterr().err


def test_attention_decode_quick(tmp_path):
    result, out = _run_quick("attention_decode.py", tmp_path,
                             ["--device", "cpu", "--batch", "1", "--cache-lens", "256",
                              "--head-dim", "64", "--min-run-time", "0.01"])
    assert result["benchmark"] == "attention_decode"
    assert all(c["correct"] for c in result["cases"])
    # the read bandwidth the docstring compares with is measured, per case too
    assert result["read_bandwidth_gbs"] > 0
    assert all(c["read_bandwidth_gbs"] > 0 and c["pct_bandwidth"] > 0 for c in result["cases"])
    # GB/s with significant digits: a CPU's few GB/s (sdpa's small fraction of one) must not
    # print as 0 (the progress line: dtype B S Hq/Hk D path check us us GB/s GB/s ...)
    line = next(l for l in out.splitlines() if l.startswith("bf16 1 256 "))
    cells = line.split()
    assert float(cells[9]) > 0 and float(cells[10]) > 0, line
    for c in result["cases"]:  # default 32/8 heads: the enable_gqa call is timed besides
        assert c["err_ours"] <= c["bound"] and c["speedup_vs_sdpa_gqa"] > 0


def test_attention_decode_ragged_quick(tmp_path):
    """--ragged: each sequence its own length, checked against the reference over those
    lengths (an output over the whole cache fails the check), GB/s of the keys used."""
    result, out = _run_quick("attention_decode.py", tmp_path,
                             ["--device", "cpu", "--batch", "3", "--cache-lens", "256",
                              "--heads", "8/2", "--head-dim", "64", "--min-run-time", "0.01",
                              "--ragged"])
    (case,) = result["cases"]
    assert case["correct"] and case["ragged"]
    assert case["keys_used"] == 256 + 214 + 171
    assert abs(case["ours_gbs"] * case["ours_us"] * 1e3 - 2 * 641 * 2 * 64 * 2) < 1
    assert any(line.startswith("bf16 3 171-256 ") for line in out.splitlines()), out


def test_attention_masked_quick(tmp_path):
    """Each mask checked (output and gradients against float64) before it is timed; the
    visible fraction is the mask's (padded: 2 entries, the second padded by a quarter)."""
    result, out = _run_quick("attention_masked.py", tmp_path,
                             ["--device", "cpu", "--batch", "2", "--seqlens", "96",
                              "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
                              "--packed-len", "40", "--window", "24", "--min-run-time", "0.01"])
    assert result["benchmark"] == "attention_masked"
    cases = {c["mask"]: c for c in result["cases"]}
    assert set(cases) == {"padded", "packed", "window"}
    assert all(c["correct"] and c["err"] <= c["bound"] for c in cases.values())
    causal = 96 * 97 / 2
    padded = (causal + (causal - 24 * 25 / 2 - 24 * 72 + 24)) / (2 * 96 * 96)
    assert abs(cases["padded"]["visible_fraction"] - padded) < 1e-9
    for c in cases.values():
        assert set(c["modes"]) == {"fwd", "fwd+bwd"}
        assert all(m["speedup_vs_sdpa"] > 0 for m in c["modes"].values())
    assert "vs ours-causal" in out


def test_attention_training_quick(tmp_path):
    """Each case checked (output and gradients, the bias's included, against float64; with
    dropout the weights our call kept) before it is timed; ours served by the CPU kernel."""
    result, out = _run_quick("attention_training.py", tmp_path,
                             ["--batch", "2", "--seqlens", "80", "--heads", "3", "--head-dim",
                              "32", "--dtypes", "fp32,bf16", "--min-run-time", "0.01"])
    assert result["benchmark"] == "attention_training"
    assert sorted((c["feature"], c["dtype"], c["causal"]) for c in result["cases"]) == sorted(
        (f, d, c) for f in ("dropout", "bias") for d in ("fp32", "bf16") for c in (False, True))
    for c in result["cases"]:
        assert c["correct"] and c["err"] <= c["bound"] and c["served_by"] == "cpu"
        assert set(c["modes"]) == {"fwd", "fwd+bwd"}
        assert all(m["speedup_vs_sdpa"] > 0 for m in c["modes"].values())
    assert "feature cost" in out


def test_model_quick(tmp_path):
    pytest.importorskip("transformers")
    plotting = importlib.util.find_spec("matplotlib") is not None
    plot = ["--plot", str(tmp_path / "model.png")] if plotting else []
    result, out = _run_quick("model.py", tmp_path, ["--quick", "--device", "cpu", *plot])
    assert plotting or "plot:" not in out  # plots are opt-in (matplotlib is an extra)
    assert result["benchmark"] == "model"
    assert {(r["family"], r["variant"]) for r in result["training"]} == {
        (f, v) for f in ("llama", "mistral") for v in ("baseline", "ours")}
    assert all(r["check"] == "ok" for r in result["training"])
    # the loss after optimizer steps is compared too, not only the first one
    assert all(r["loss_drop_err"] <= 0.05 for r in result["training"] if r["variant"] == "ours")
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


# ---------------------------------------------------------------- argument errors
# Bad arguments end in argparse's one-line error (exit status 2, no traceback) before the run
# starts (no machine description printed, nothing timed), not in a traceback or a benchmark of
# something else. In-process (the scripts' main(argv) / parse_args(argv)): a subprocess would
# spend seconds importing torch for each.

_SCRIPTS = {}


def _script(name):
    if name not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"bench_args_{name[:-3]}",
                                                      os.path.join(BENCH, name))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        _SCRIPTS[name] = mod
    return _SCRIPTS[name]


def _usage_error(script, args, capsys, monkeypatch):
    """The last stderr line of script's argument error (attention.py checks in parse_args)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton then cannot serve the CPU
    mod = _script(script)
    with pytest.raises(SystemExit) as info:
        getattr(mod, "parse_args", mod.main)(args)
    out, err = capsys.readouterr()
    assert info.value.code == 2 and "error:" in err, err[-2000:]
    assert "cpu flags" not in out, "the run started before the error"
    return err.strip().splitlines()[-1]


def _usage_error_or_run(script, args):
    """Arguments whose fate depends on the library (names case-insensitive or not): a clean
    run or a clean usage error, never a traceback (a short run, in a subprocess)."""
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def _needs_no_gpu(args):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is visible")


def test_harness_argument_types():
    import argparse
    assert harness.positive_int("3") == 3
    assert harness.positive_ints("1,16,") == [1, 16]
    assert harness.comma_floats("10,0.5") == [10.0, 0.5]
    assert harness.comma_shapes("4096x11008,64x32") == [(4096, 11008), (64, 32)]
    for parse, bad in [(harness.positive_int, "0"), (harness.positive_int, "-2"),
                       (harness.positive_int, "1.5"), (harness.positive_ints, "1,0"),
                       (harness.positive_ints, ","), (harness.comma_floats, "abc"),
                       (harness.comma_floats, "nan"), (harness.comma_floats, ""),
                       (harness.comma_shapes, "4096"), (harness.comma_shapes, "4096x0"),
                       (harness.comma_shapes, "1x2x3"), (harness.comma_shapes, "axb")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_usage_errors_turn_library_refusals_into_parser_errors(capsys):
    import argparse
    from llmkernels.backends import BackendError
    parser = argparse.ArgumentParser(prog="bench")
    for exc in (BackendError("cannot\nserve"), ValueError("unknown name")):
        with pytest.raises(SystemExit) as info:
            with harness.usage_errors(parser, "--opt x"):
                raise exc
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "bench: error: --opt x: cannot serve" in err and "--opt x: unknown name" in err
    with pytest.raises(KeyError):  # anything else is a bug, not a usage error
        with harness.usage_errors(parser):
            raise KeyError("x")


def test_plt_module_without_matplotlib_names_pip_install(monkeypatch):
    import argparse
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with pytest.raises(SystemExit, match=r"pip install matplotlib"):
        harness.plt_module()
    with pytest.raises(argparse.ArgumentTypeError, match=r"pip install \.\[bench\]"):
        harness.plot_file("out.png")
    assert harness.plot_file("") == ""  # '' is no plot: nothing to import


@pytest.mark.parametrize("script", ["model.py", "attention.py"])
def test_plot_without_matplotlib_fails_before_the_run(script, tmp_path, capsys, monkeypatch):
    # hidden whether or not it is installed (model.py wrote a plot by default: no more)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    last = _usage_error(script, ["--quick", "--device", "cpu", "--plot", str(tmp_path / "x.png")],
                        capsys, monkeypatch)
    assert "pip install matplotlib" in last


def test_quant_matmul_leaves_out_int8pack_where_it_crashes(tmp_path):
    """aten._weight_int8pack_mm segfaults on torch's CPU build for K % 16 != 0 with M > 1:
    that baseline is left out (and said so), the run completes."""
    result, out = _run_quick("quant_matmul.py", tmp_path,
                             ["--quick", "--device", "cpu", "--shapes", "100x384", "--schemes",
                              "int8", "--rotate-mib", "0"])
    assert result["int8pack_left_out_k"] == [100]
    assert [c["M"] for c in result["cases"]] == [1, 5] and all(c["correct"] for c in result["cases"])
    assert not any("int8pack_us" in c for c in result["cases"])
    assert "- int8pack*" in out and "crashes the process" in out


_DECODE = ["--batch", "1", "--cache-lens", "256", "--device", "cpu"]


@pytest.mark.parametrize("script,args,expect", [
    ("quant_matmul.py", ["--quick", "--backend", "triton"], "--backend triton"),
    ("quant_matmul.py", ["--quick", "--backend", "bogus"], "unknown backend"),
    ("quant_matmul.py", ["--quick", "--shapes", "100x384", "--schemes", "int4"],
     "not a multiple of group_size"),
    ("quant_matmul.py", ["--quick", "--group-size", "100"], "group_size"),
    ("quant_matmul.py", ["--quick", "--shapes", "4096"], "KxN"),
    ("quant_matmul.py", ["--quick", "--ms", "0"], "--ms"),
    ("quant_matmul.py", ["--quick", "--device", "cuda"], "--device cuda"),
    ("model.py", ["--quick", "--families", "gpt2"], "choose from llama,mistral"),
    ("model.py", ["--quick", "--schemes", "int2"], "choose from int8,int4,w8a8"),
    ("model.py", ["--quick", "--seq", "0"], "--seq"),
    ("model.py", ["--quick", "--runs", "0"], "--runs"),
    ("model.py", ["--quick", "--batch", "0"], "--batch"),
    ("model.py", ["--quick", "--device", "cuda"], "--device cuda"),
    ("optim.py", ["--params", "0"], "smallest model"),
    ("optim.py", ["--params", "0.3"], "smallest model"),
    ("optim.py", ["--quick", "--params", "10,0.3"], "smallest model"),
    ("optim.py", ["--params", "abc"], "--params"),
    ("optim.py", ["--device", "tpu"], "invalid choice"),
    ("optim.py", ["--device", "cuda"], "--device cuda"),
    ("attention_decode.py", [*_DECODE, "--heads", "32"], "Hq/Hk"),
    ("attention_decode.py", [*_DECODE, "--heads", "32/5"], "multiple of kv heads"),
    ("attention_decode.py", [*_DECODE, "--ours-backend", "triton"], "--ours-backend triton"),
    ("attention_decode.py", [*_DECODE, "--ours-backend", "bogus"], "unknown backend"),
    ("attention_decode.py", [*_DECODE, "--head-dim", "0"], "--head-dim"),
    ("attention_decode.py", ["--batch", "1", "--cache-lens", "256", "--device", "cuda"],
     "--device cuda"),
    ("attention_masked.py", ["--heads", "6", "--kv-heads", "4"], "multiple of --kv-heads"),
    ("attention_masked.py", ["--masks", "causal"], "choose from padded,packed,window"),
    ("attention_masked.py", ["--seqlens", "0"], "--seqlens"),
    ("attention_masked.py", ["--device", "cuda"], "--device cuda"),
    ("attention_training.py", ["--dropout", "1.0"], "--dropout must be in"),
    ("attention_training.py", ["--features", "alibi"], "choose from dropout,bias"),
])
def test_bad_arguments(script, args, expect, capsys, monkeypatch):
    """A usage error naming the argument, before any work."""
    _needs_no_gpu(args)
    last = _usage_error(script, args, capsys, monkeypatch)
    assert expect in last, last


def test_quant_matmul_backend_name_case():
    _usage_error_or_run("quant_matmul.py", ["--quick", "--device", "cpu", "--backend", "CPU",
                                            "--ms", "1", "--schemes", "int8",
                                            "--rotate-mib", "0"])


def test_optim_params_win_over_quick(tmp_path):
    result, _ = _run_quick("optim.py", tmp_path, ["--quick", "--params", "2", "--dtypes", "fp32",
                                                   "--optimizers", "sgd"])
    assert [round(c["params_m"], 2) for c in result["cases"]] == [2.37]  # 3 layers, not 1


@pytest.mark.parametrize("args,expect", [
    (["--ours-backend", "triton"], "--ours-backend triton"),
    (["--cpu-tier", "bogus"], "unknown CPU tier"),
    (["--cpu-tier", "amx"], "cannot run tier 'amx'"),
    (["--head-dims", "300"], "head dim 300"),
    (["--head-dims", "0"], "--head-dims"),
    (["--device", "cuda"], "--device cuda"),
])
def test_attention_bad_arguments(args, expect, capsys, monkeypatch):
    import llmkernels
    _needs_no_gpu(args)
    if "amx" in args:  # a tier this CPU lacks (conftest emulates AMX tiles where it has none)
        monkeypatch.setattr(llmkernels.backends, "_TIERS_SUPPORTED",
                            [t for t in llmkernels.backends.supported_cpu_tiers() if t != "amx"])
    if "300" in args and llmkernels.backends.native_module() is None:
        pytest.skip("no compiled extension: 'ours' is the reference, which takes any head dim")
    device = [] if "--device" in args else ["--device", "cpu"]
    last = _usage_error("attention.py", ["--quick", *device, *args], capsys, monkeypatch)
    assert expect in last, last


def test_attention_cpu_tier_name_case():
    _usage_error_or_run("attention.py", ["--quick", "--device", "cpu", "--cpu-tier", "AVX2",
                                         "--paths", "ours", "--no-backward", "--dtypes", "fp32",
                                         "--causal", "no"])


def test_attention_decode_backend_name_case():
    _usage_error_or_run("attention_decode.py", ["--device", "cpu", "--batch", "1", "--cache-lens",
                                                "64", "--head-dim", "64", "--min-run-time",
                                                "0.01", "--ours-backend", "Reference"])


def test_attention_decode_says_correctness_failed(monkeypatch, capsys):
    """A failed check exits 1 with the message the other benchmarks print."""
    import llmkernels
    mod = _script("attention_decode.py")
    real = llmkernels.attention_with_kvcache

    def wrong(q, *args, **kwargs):
        return real(q, *args, **kwargs) + 1.0
    wrong.__llmk_explain__ = real.__llmk_explain__
    monkeypatch.setattr(mod.llmkernels, "attention_with_kvcache", wrong)
    monkeypatch.setattr(mod.harness, "READ_BYTES", 1 << 20)  # a small bandwidth sum: fast
    rc = mod.main(["--device", "cpu", "--batch", "1", "--cache-lens", "64", "--head-dim", "64",
                   "--min-run-time", "0.001"])
    assert rc == 1 and "CORRECTNESS FAILED for 1 case(s)" in capsys.readouterr().err


def test_attention_decode_catches_a_cache_one_token_short(monkeypatch, capsys):
    """An off-by-one cache length passed the old absolute floor (2^-7) of the bound."""
    import llmkernels
    mod = _script("attention_decode.py")
    real = llmkernels.attention_with_kvcache

    def short(q, k, v, cache_seqlens, *args, **kwargs):
        return real(q, k, v, cache_seqlens - 1, *args, **kwargs)
    short.__llmk_explain__ = real.__llmk_explain__
    monkeypatch.setattr(mod.llmkernels, "attention_with_kvcache", short)
    monkeypatch.setattr(mod.harness, "READ_BYTES", 1 << 20)
    rc = mod.main(["--device", "cpu", "--batch", "1", "--cache-lens", "2048", "--head-dim",
                   "128", "--min-run-time", "0.001"])
    assert rc == 1 and "CORRECTNESS FAILED for 1 case(s)" in capsys.readouterr().err


def test_busy_machine_warning():
    info = harness.machine_info("cpu")
    assert info["others_busy_cores"] is None or info["others_busy_cores"] >= 0
    busy = dict(info, busy=True, others_busy_cores=1.5)
    assert "WARNING: busy machine" in harness.format_machine(busy)
    assert "WARNING" not in harness.format_machine(dict(info, busy=False))
