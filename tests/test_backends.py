"""Path selection: automatic choice, forcing (keyword, context manager, environment),
explain(), build_info(), CPU tiers."""
import json
import os
import sys

import pytest
import torch

import llmkernels
from llmkernels import BackendError, backends

sdpa = llmkernels.scaled_dot_product_attention


def qkv():
    return (torch.randn(1, 2, 9, 16) for _ in range(3))


def test_automatic_choice_on_cpu_is_the_fused_kernel():
    q, k, v = qkv()
    d = llmkernels.explain(sdpa, q, k, v, is_causal=True)
    assert d.backend == "cpu" and d.forced is None
    assert "cpu" in str(d) and backends.cpu_tier() in str(d)


def test_float64_falls_back_to_reference_and_explains():
    q, k, v = (t.double() for t in qkv())
    d = llmkernels.explain(sdpa, q, k, v)
    assert d.backend == "reference"
    assert "float64" in d.rejected["cpu"]


@pytest.mark.parametrize("how", ["keyword", "context", "env"])
def test_forcing_reference(how, monkeypatch):
    q, k, v = qkv()
    if how == "keyword":
        d = llmkernels.explain(sdpa, q, k, v, backend="reference")
    elif how == "context":
        with llmkernels.use_backend("reference"):
            d = llmkernels.explain(sdpa, q, k, v)
    else:
        monkeypatch.setenv("LLMKERNELS_BACKEND", "reference")
        d = llmkernels.explain(sdpa, q, k, v)
    assert d.backend == "reference" and d.forced == "reference"


def test_keyword_beats_context_beats_env(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv("LLMKERNELS_BACKEND", "reference")
    with llmkernels.use_backend("cpu"):
        assert llmkernels.explain(sdpa, q, k, v).backend == "cpu"
        assert llmkernels.explain(sdpa, q, k, v, backend="reference").backend == "reference"


def test_settings_are_read_from_the_environment_at_every_call(monkeypatch):
    """backends.env reads os.environ's own dict: a variable set, changed or removed after
    import takes effect at the next call, also when os.environ is replaced wholesale."""
    monkeypatch.delenv("LLMKERNELS_BACKEND", raising=False)
    assert backends.env("LLMKERNELS_BACKEND") == "" and backends.forced_backend() is None
    assert backends.env("LLMKERNELS_BACKEND", "x") == "x"
    monkeypatch.setenv("LLMKERNELS_BACKEND", "reference")
    assert backends.forced_backend() == "reference"
    monkeypatch.setenv("LLMKERNELS_BACKEND", "cpu")
    assert backends.forced_backend() == "cpu"
    monkeypatch.delenv("LLMKERNELS_BACKEND")
    assert backends.forced_backend() is None
    monkeypatch.setattr(os, "environ", {"LLMKERNELS_BACKEND": "reference"})
    assert backends.forced_backend() == "reference"


def test_forcing_a_path_that_cannot_serve_is_an_error():
    q, k, v = qkv()
    with llmkernels.use_backend("cuda"):
        with pytest.raises(BackendError, match="cannot serve cpu tensors"):
            sdpa(q, k, v)
    with pytest.raises(ValueError, match="unknown backend"):
        with llmkernels.use_backend("tpu"):
            pass


def test_paths_give_the_same_answer():
    q, k, v = qkv()
    a = sdpa(q, k, v, is_causal=True, backend="cpu")
    b = sdpa(q, k, v, is_causal=True, backend="reference")
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_every_supported_tier_runs(monkeypatch):
    q, k, v = qkv()
    ref = sdpa(q, k, v, backend="reference")
    for tier in backends.supported_cpu_tiers():
        with llmkernels.use_cpu_tier(tier):
            assert backends.cpu_tier() == tier
            assert tier in str(llmkernels.explain(sdpa, q, k, v))
            torch.testing.assert_close(sdpa(q, k, v, backend="cpu"), ref, atol=2e-6, rtol=1e-5)
        monkeypatch.setenv("LLMKERNELS_CPU_TIER", tier)
        assert backends.cpu_tier() == tier
    assert "generic" in backends.supported_cpu_tiers()


def test_build_info_is_complete_and_serializable():
    info = llmkernels.build_info()
    json.dumps(info)
    assert info["version"] == llmkernels.__version__
    assert info["paths"]["cpu"] is True and info["paths"]["reference"] is True
    assert set(info["cpu"]["tiers_built"]) == {"amx", "avx512_bf16", "avx512", "avx2", "generic"}
    assert info["cpu"]["tier_in_use"] in info["cpu"]["tiers_supported"]
    assert "available" in info["triton"]
    if info["paths"]["cuda"]:
        assert info["cuda"]["archs"], "a CUDA build names its architectures"


def test_explain_rejects_non_ops():
    with pytest.raises(TypeError, match="not an llmkernels op"):
        llmkernels.explain(torch.matmul, torch.ones(1), torch.ones(1))


def test_empty_cache_frees_and_kernel_still_runs():
    q, k, v = qkv()
    a = sdpa(q, k, v, backend="cpu")
    llmkernels.empty_cache()
    torch.testing.assert_close(sdpa(q, k, v, backend="cpu"), a, atol=0, rtol=0)


@pytest.mark.skipif(backends.native_module() is None, reason="no compiled extension")
def test_quant_matmul_workspace_is_the_one_empty_cache_frees(monkeypatch):
    """The quantized matmul kept its own workspace (up to 64 MiB) that empty_cache missed."""
    from llmkernels.ops import workspace
    x = torch.randn(40, 256)
    qw = llmkernels.quantize_weight(torch.randn(64, 256), "int8")
    llmkernels.empty_cache()
    expected = llmkernels.quant_matmul(x, qw, backend="reference")
    torch.testing.assert_close(llmkernels.quant_matmul(x, qw, backend="cpu"), expected,
                               rtol=1e-4, atol=1e-4)
    assert workspace._local.workspace is not None
    llmkernels.empty_cache()
    assert workspace._local.workspace is None
    monkeypatch.setattr(workspace, "KEPT_BYTES", 0)  # every workspace now counts as large
    torch.testing.assert_close(llmkernels.quant_matmul(x, qw, backend="cpu"), expected,
                               rtol=1e-4, atol=1e-4)
    assert workspace._local.workspace is None


def test_amx_tier_is_hardware_where_the_cpu_has_it_and_never_best_when_emulated():
    info = llmkernels.build_info()["cpu"]
    feats = info["features"]
    if feats.get("amx_tile") and feats.get("amx_bf16") and sys.platform == "linux":
        # The hardware passed the self-check (a tile product against the software model).
        assert info["amx"] == "hardware"
        assert backends.supported_cpu_tiers()[0] == "amx"
    elif "amx" in info["tiers_supported"]:
        assert info["amx"].startswith("emulated")
        assert backends.cpu_tier() != "amx"  # the software model is never chosen by default
        with llmkernels.use_cpu_tier("amx"):
            q, k, v = qkv()
            assert "emulated" in str(llmkernels.explain(sdpa, q, k, v))
    else:
        assert info["amx"].startswith("unavailable")


@pytest.mark.skipif(sys.platform != "linux" or backends.native_module() is None,
                    reason="the self-check forks on Linux only")
def test_amx_self_check_survives_a_cpu_that_faults():
    """The tile instructions first run in a forked child: where they fault (no AMX), the child
    dies of SIGILL and the caller gets the reason instead of crashing."""
    import signal
    feats = llmkernels.build_info()["cpu"]["features"]
    passed, why = backends.native_module().amx_forked_self_check()
    if feats.get("amx_tile") and feats.get("amx_bf16"):
        # Tiles need the permission first; without it Linux faults them like a missing unit.
        assert passed or f"signal {int(signal.SIGILL)}" in why, why
    else:
        assert not passed and f"signal {int(signal.SIGILL)}" in why, why


@pytest.mark.skipif(backends.native_module() is None, reason="compiled extension not available")
def test_amx_kernels_put_back_the_threads_tile_configuration():
    """Our kernels share threads with torch's AMX code, which may keep its tile configuration
    loaded between calls: a kernel's tile scope must restore it (checked on the software
    model, where the configuration can be read back)."""
    assert backends.native_module().amx_scope_selftest() == ""


def test_use_backend_none_is_automatic_over_the_environment(monkeypatch):
    monkeypatch.setenv("LLMKERNELS_BACKEND", "Reference")  # names are case-insensitive
    q = torch.randn(1, 2, 4, 16)
    assert llmkernels.explain(llmkernels.scaled_dot_product_attention, q, q, q).backend == \
        "reference"
    with llmkernels.use_backend(None):
        assert llmkernels.backends.forced_backend() is None
    assert llmkernels.backends.forced_backend() == "reference"


def test_build_info_reports_a_bad_tier_setting(monkeypatch):
    monkeypatch.setenv("LLMKERNELS_CPU_TIER", "garbage")
    assert llmkernels.build_info()["cpu"]["tier_in_use"].startswith("error: ")
    monkeypatch.setenv("LLMKERNELS_CPU_TIER", "AVX2")
    if "avx2" in llmkernels.backends.supported_cpu_tiers():
        assert llmkernels.backends.cpu_tier() == "avx2"


def test_explain_of_a_step_takes_its_closure():
    p = torch.zeros(3, requires_grad=True)
    opt = llmkernels.optim.AdamW([p])
    assert llmkernels.explain(opt.step, lambda: 0.0) == llmkernels.explain(opt.step)


def test_names_are_case_insensitive_in_every_spelling():
    q = torch.randn(1, 2, 4, 16)
    out = llmkernels.scaled_dot_product_attention(q, q, q, backend="Reference")
    torch.testing.assert_close(out, llmkernels.scaled_dot_product_attention(q, q, q,
                                                                           backend="reference"))
    with llmkernels.use_backend("REFERENCE"):
        assert llmkernels.backends.forced_backend() == "reference"
        assert llmkernels.explain(llmkernels.scaled_dot_product_attention, q, q, q).backend == \
            "reference"
    tiers = llmkernels.backends.supported_cpu_tiers()
    if tiers:
        with llmkernels.use_cpu_tier(tiers[-1].upper()):
            assert llmkernels.backends.cpu_tier() == tiers[-1]
    with pytest.raises(ValueError, match="unknown backend 'Refrence'"):
        llmkernels.scaled_dot_product_attention(q, q, q, backend="Refrence")


def test_explain_takes_llmkernels_layers_with_their_forward_arguments():
    layer = llmkernels.nn.QuantLinear.from_linear(torch.nn.Linear(64, 32), "int8")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    d = llmkernels.explain(layer, x)
    op = llmkernels.explain(llmkernels.quant_matmul, x, layer.qweight, layer.bias.bfloat16())
    assert (d.op, d.backend, d.detail) == (op.op, op.backend, op.detail)
    with llmkernels.use_backend("reference"):
        assert llmkernels.explain(layer, x).backend == "reference"

    mha = llmkernels.nn.MultiheadAttention(64, 4, dropout=0.5, batch_first=True)
    x = torch.randn(2, 5, 64)
    d = llmkernels.explain(mha, x, x, x)  # need_weights=True, torch's default
    assert d.backend == "torch" and "need_weights" in str(d)
    mha.eval()
    d = llmkernels.explain(mha, x, x, x, need_weights=False)
    assert (d.op, d.backend) == ("scaled_dot_product_attention", "cpu"), str(d)
    mha.train()  # dropout: fused on the CPU
    d = llmkernels.explain(mha, x, x, x, need_weights=False)
    assert d.backend == "cpu" and "dropout fused" in str(d), str(d)
    with pytest.raises(TypeError, match="a Linear layer does not run llmkernels ops"):
        llmkernels.explain(torch.nn.Linear(3, 3), x)
