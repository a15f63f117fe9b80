"""The CPU kernels for many rows of x (prefill-sized batches): on AVX2 / AVX-512 tiers x packed
8 or 16 rows to a vector (csrc/cpu/quant_matmul_packed_x.h: bf16 or int8 dot products where
the CPU has them, float FMA otherwise); on the portable tier the K-in-lanes panels. Every tier
against the reference, on shapes that leave partial row vectors, partial channel blocks,
partial K chunks and every int4 group size; on the amx tier, slabs of rows past 512."""
import importlib

import pytest
import torch

import llmkernels
from llmkernels.reference.quant_matmul import quant_matmul_reference
from test_quant_matmul import check_against_reference

SCHEMES = ["int8", "int4", "w8a8"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("M", [6, 7, 8, 11, 16, 33, 64, 65, 130])
@pytest.mark.parametrize("K,N", [(1152, 37), (2048, 16), (1001, 70)])
def test_many_rows_match_reference(cpu_tier, scheme, M, K, N, dtype):
    # 6-8 rows with bf16 x (w8a8: any x) on VNNI tiers: the paired layout, whose halves of K
    # are here shorter than a chunk (1152), one chunk (2048) and partly past K (1001).
    groups = (32, 64, 128) if scheme == "int4" else (128,)
    for group in groups:
        if scheme == "int4" and K % group:
            continue
        big = torch.randn(M, K + 40, dtype=dtype)
        x = big[:, 5:5 + K]  # rows K + 40 apart
        qw = llmkernels.quantize_weight(torch.randn(N, K), scheme, group)
        bias = torch.randn(N, dtype=dtype) if M % 2 else None
        out = llmkernels.quant_matmul(x, qw, bias, backend="cpu")
        check_against_reference(x, qw, bias, out)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_workspace_stays_bounded_for_many_rows(monkeypatch, cpu_tier, scheme, dtype):
    """The workspace grew with the rows (8 bytes a value of x: 16 GiB for 524k rows of 4096):
    calls past CPU_SLAB_BYTES (here lowered to a third of the whole call's workspace) run in
    equal slabs of at least CPU_SLAB_MIN_ROWS rows, each into its own rows of out."""
    qm = importlib.import_module("llmkernels.ops.quant_matmul")
    K, N, M = 256, 24, 3000
    x = torch.randn(M, K, dtype=dtype)
    qw = llmkernels.quantize_weight(torch.randn(N, K), scheme, 64)
    native = llmkernels.backends.native_module()
    asked, calls = [], []
    workspace, kernel = qm._workspace, native.quant_matmul
    monkeypatch.setattr(qm, "_workspace", lambda n, d: asked.append(n) or workspace(n, d))
    monkeypatch.setattr(native, "quant_matmul",
                        lambda *a: calls.append(a[2][2][0]) or kernel(*a))
    whole = llmkernels.quant_matmul(x, qw, backend="cpu")
    assert calls == [M]
    monkeypatch.setattr(qm, "CPU_SLAB_BYTES", asked[0] // 3)
    monkeypatch.setattr(qm, "CPU_SLAB_MIN_ROWS", 100)
    asked.clear(), calls.clear()
    out = llmkernels.quant_matmul(x, qw, backend="cpu")
    check_against_reference(x, qw, None, out)
    torch.testing.assert_close(out, whole, rtol=0, atol=0)
    assert len(calls) >= 3 and sum(calls) == M and len(set(calls[:-1])) == 1, calls
    assert min(calls) >= qm.CPU_SLAB_MIN_ROWS
    if cpu_tier != "amx":  # (amx packs x in slabs of 512 rows itself: little grows with M)
        assert asked[0] <= 1.5 * qm.CPU_SLAB_BYTES  # (slabs of at least the rows that fit)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("M", [513, 1100])
def test_many_rows_in_slabs(cpu_tier, scheme, M):
    # The amx tier runs more than 512 rows in slabs of equal size (513: 257 + 256; 1100: three
    # of 367 and a last of 366), each with its own packed x, into its own rows of out.
    K, N = 320, 40
    big = torch.randn(M, K + 8, dtype=torch.bfloat16)
    x = big[:, 3:3 + K]
    qw = llmkernels.quantize_weight(torch.randn(N, K), scheme, 64)
    bias = torch.randn(N, dtype=torch.bfloat16)
    check_against_reference(x, qw, bias, llmkernels.quant_matmul(x, qw, bias, backend="cpu"))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("M", [16, 24, 40])
def test_many_rows_long_k(cpu_tier, scheme, M):
    # K long enough for several staged chunks on every path (the amx tier stages 128 words of K
    # at a time with out^T in the tiles, 512 otherwise; w8a8 words are 4 bytes), the last one
    # partial, and int4 groups that straddle no chunk.
    K, N = 4224, 35
    x = torch.randn(M, K, dtype=torch.bfloat16)
    qw = llmkernels.quantize_weight(torch.randn(N, K), scheme, 64)
    bias = torch.randn(N, dtype=torch.bfloat16)
    check_against_reference(x, qw, bias, llmkernels.quant_matmul(x, qw, bias, backend="cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("M", [7, 40])
def test_w8a8_many_rows_exact(cpu_tier, dtype, layout, M):
    """w8a8 sums integers: the result is the reference's up to float32 rounding of the two scale
    products, whether x's rows are contiguous (quantized 16 at a time) or not; 7 rows: the
    paired layout on VNNI tiers (two lanes' integer sums per row)."""
    K, N = 777, 50
    x = torch.randn(M, K, dtype=dtype) * 3
    x[3] = 0.0  # an all-zero row: scale 1
    x[min(7, M - 1), ::5] *= 100.0  # one row with large values
    if layout == "columns":
        x = x.t().contiguous().t()
    qw = llmkernels.quantize_weight(torch.randn(N, K), "w8a8")
    out = llmkernels.quant_matmul(x, qw, backend="cpu")
    ref = quant_matmul_reference(x, "w8a8", qw.qdata, qw.scales, None, 0)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7 if dtype != torch.float32
                               else 1e-6, atol=1e-6)


@pytest.mark.parametrize("scheme", ["w8a8", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_many_rows_non_finite_x_stays_in_its_row(cpu_tier, scheme, dtype):
    """A NaN in one row makes that row's outputs NaN (w8a8: its scale) and leaves the others."""
    x = torch.randn(32, 256, dtype=dtype)
    x[5, 17] = float("nan")
    qw = llmkernels.quantize_weight(torch.randn(24, 256), scheme, 64)
    out = llmkernels.quant_matmul(x, qw, backend="cpu")
    assert torch.isnan(out[5]).all()
    keep = torch.ones(32, dtype=torch.bool)
    keep[5] = False
    assert torch.isfinite(out[keep]).all()
    check_against_reference(x[keep], qw, None, out[keep])


def test_int8_weights_of_minus_128(cpu_tier):
    """-128 is outside the quantizer's range but a valid int8: every path multiplies it as is."""
    K, N = 512, 20
    qw = llmkernels.quantize_weight(torch.randn(N, K), "int8")
    qw.qdata[:, ::3] = -128
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(16, K, dtype=dtype)
        out = llmkernels.quant_matmul(x, qw, backend="cpu")
        check_against_reference(x, qw, None, out)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_explain_names_the_cpu_kernel(cpu_tier, scheme):
    """explain() reports the layout the C++ kernel runs (its own rule, from the extension), and
    that rule agrees with the int8-activation rule the tests use."""
    from llmkernels.ops.quant_matmul import cpu_int8_activations
    qw = llmkernels.quantize_weight(torch.randn(32, 256), scheme, 64)
    vnni = cpu_tier in ("avx512_bf16", "amx")  # (amx: below 8 rows, avx512_bf16's kernels)
    for M in (1, 2, 3, 5, 6, 7, 8, 11, 12, 31, 32, 40):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(M, 256, dtype=dtype)
            text = str(llmkernels.explain(llmkernels.quant_matmul, x, qw))
            packed = "x packed" in text
            bf16 = dtype == torch.bfloat16
            tiles = cpu_tier == "amx" and M >= 8 and (
                scheme == "w8a8" or bf16)  # int8, int4 (group 64)
            # int8 x: int4's and int8's row blocks (decoding), and on VNNI tiers x packed as
            # int8 from 6 rows (int8 weights; int4 too where each half of K holds whole groups,
            # as 256 does groups of 64) or 9 (int4); AVX2's int4 blocks go on to 31 rows
            int4_blocks = scheme == "int4" and bf16 and M < (
                6 if vnni else (32 if cpu_tier == "avx2" else 12))
            int8_blocks = scheme == "int8" and bf16 and M < (6 if vnni else 12)
            packed_int8_x = not tiles and vnni and bf16 and scheme != "w8a8" and M >= 6
            # w8a8 (any x) packs from 6 rows on VNNI tiers, the paired layout up to 8
            paired_w8a8 = not tiles and vnni and scheme == "w8a8" and 6 <= M <= 8
            assert ("AMX bf16 tiles:" in text or "AMX int8 tiles:" in text) == tiles, text
            if tiles:
                assert ("AMX int8 tiles" if scheme == "w8a8" else "AMX bf16 tiles") in text
            elif paired_w8a8:
                assert packed and "8 rows to a vector (two halves of K" in text, text
            elif packed_int8_x:
                # int8 with at most 8 rows: two halves of each row's K in a vector's 16 lanes
                lanes = "8 rows to a vector (two halves of K" if M <= 8 else "16 rows to a vector"
                assert packed and lanes in text, text
            elif (cpu_tier == "generic" or M < 8 or int4_blocks or int8_blocks
                  or (scheme == "w8a8" and cpu_tier not in ("avx512_bf16", "amx"))):
                assert not packed, text
            else:
                assert packed, text
                lanes = 8 if cpu_tier == "avx2" else 16
                assert f"{lanes} rows to a vector" in text
            assert ("quantized to int8 per 32" in text) == cpu_int8_activations(x, qw), text
            int8_x = cpu_tier != "generic" and not tiles and (
                int4_blocks or packed_int8_x or int8_blocks)
            assert cpu_int8_activations(x, qw) == int8_x, text


def test_stale_panel_bytes_never_reach_the_output(cpu_tier):
    """The per-thread scratch is reused across calls: a w8a8 panel of bytes that read as float32
    NaNs, then a float-x int8 call whose last K chunk is partial (its panel's zero padding must
    be written, not left over)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        K, N = 1024, 64
        nan_bytes = torch.tensor([-1, -1, -1, 127], dtype=torch.int8).repeat(N, K // 4)
        poison = llmkernels.QuantizedWeight("w8a8", (N, K), 0, nan_bytes, torch.ones(N), None,
                                            torch.float32)
        llmkernels.quant_matmul(torch.randn(16, K, dtype=torch.bfloat16), poison, backend="cpu")
        llmkernels.quant_matmul(torch.randn(16, K), poison, backend="cpu")
        qw = llmkernels.quantize_weight(torch.randn(N, 233), "int8")  # one chunk, partial
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(16, 233, dtype=dtype)
            out = llmkernels.quant_matmul(x, qw, backend="cpu")
            check_against_reference(x, qw, None, out)
    finally:
        torch.set_num_threads(before)
