"""The Triton quantized-matmul kernels (kernels/quant_matmul.py) against the reference
(llmkernels.reference.quant_matmul), called through their launchers directly: int8, int4 and
w8a8, tiled and decode (with and without K splits) variants, float32 and bfloat16 activations,
bias, strided rows, odd M/N/K. Without a GPU they run in Triton's interpreter (small shapes)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from llmkernels.kernels import quant_matmul as qm  # noqa: E402
from llmkernels.reference.quant_matmul import (  # noqa: E402
    dequantize_reference, quant_matmul_reference, quantize_activations_reference,
    quantize_int4_reference, quantize_int8_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# "split": the decode variant with its K range split over 3 programs (+ the combine kernel);
# "gemv", "gemv_split": the GEMV variant (one row of x, weight-only schemes), likewise.
VARIANTS = ["tiled", "decode", "split", "gemv", "gemv_split"]
G = qm._K_GRANULE  # split boundaries are multiples of it


@pytest.fixture(autouse=True)
def _reset_knobs():
    yield
    qm.FORCE_VARIANT = None
    qm.FORCE_SPLITS = None


def _set_variant(variant, M, scheme="int8"):
    if variant != "tiled" and M > qm.DECODE_MAX_M:
        pytest.skip("the decode variant serves M <= 16")
    if variant.startswith("gemv") and (M != 1 or scheme == "w8a8"):
        pytest.skip("the GEMV variant serves one row of a weight-only scheme")
    qm.FORCE_VARIANT = "tiled" if variant == "tiled" else "gemv" if variant.startswith("gemv") \
        else "decode"
    qm.FORCE_SPLITS = 3 if variant.endswith("split") else None if variant == "tiled" else 1


def _inputs(M, N, K, dtype, with_bias, contiguous=False):
    """x (M, K) with a row stride of K + 7 (unless contiguous), weights, bias, and a NaN-filled
    out (M, N) with a row stride of N + 3."""
    big = torch.randn(M, K + (0 if contiguous else 7), device=DEVICE).to(dtype)
    x = big[:, :K]
    w = torch.randn(N, K, device=DEVICE) * 0.5
    bias = torch.randn(N, device=DEVICE).to(dtype) if with_bias else None
    out_big = torch.full((M, N + (0 if contiguous else 3)), float("nan"), device=DEVICE, dtype=dtype)
    return x, w, bias, out_big[:, :N]


def _run(scheme, x, w, bias, out, group_size=64):
    if scheme == "int4":
        q, s, z = quantize_int4_reference(w, group_size)
        qm.int4_matmul(x, q, s, z, group_size, bias, out)
    else:
        q, s = quantize_int8_reference(w)
        z = None
        getattr(qm, scheme + "_matmul")(x, q, s, bias, out)
    assert not torch.isnan(out).any(), "some outputs were not written"
    return q, s, z


def _check_weight_only(scheme, x, out, q, s, z, group_size, bias):
    """float32 x: the reference to ~1e-4 of the output scale. bfloat16 x: the products run in
    bfloat16, so the reference uses the dequantized weight rounded to bfloat16 too; then the
    bfloat16 rounding of the output (~1e-2 of the output scale)."""
    ref = quant_matmul_reference(x, scheme, q, s, z, group_size, bias).float()
    if x.dtype == torch.float32:
        scale = ref.abs().max().clamp_min(1.0)
        err = (out.float() - ref).abs().max()
        assert err <= 1e-4 * scale, f"max error {err} vs output scale {scale}"
        return
    wd = dequantize_reference(scheme, q, s, z, group_size).to(x.dtype).float()
    ref16 = x.float() @ wd.t()
    if bias is not None:
        ref16 = ref16 + bias.float()
    scale = ref16.abs().max().clamp_min(1.0)
    err = (out.float() - ref16).abs().max()
    assert err <= 1e-2 * scale, f"max error {err} vs output scale {scale}"
    # and against the exact (float32-weight) reference: within bfloat16 product rounding
    assert (out.float() - ref).abs().max() <= 2e-2 * scale


SHAPES = [(1, 33, 2 * G + 40), (3, 257, 72), (16, 1, 40), (40, 33, 130)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8(variant, M, N, K, dtype, with_bias):
    _set_variant(variant, M)
    x, w, bias, out = _inputs(M, N, K, dtype, with_bias)
    q, s, z = _run("int8", x, w, bias, out)
    _check_weight_only("int8", x, out, q, s, z, 0, bias)


INT4_SHAPES = [(1, 33, 4 * G, 32), (3, 65, 128, 64), (16, 1, 256, 128), (40, 33, 128, 64)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("M,N,K,group_size", INT4_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int4(variant, M, N, K, group_size, dtype, with_bias):
    _set_variant(variant, M)
    x, w, bias, out = _inputs(M, N, K, dtype, with_bias)
    q, s, z = _run("int4", x, w, bias, out, group_size)
    _check_weight_only("int4", x, out, q, s, z, group_size, bias)


@pytest.mark.parametrize("scheme,group_size", [("int8", 0), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_splits_hold_whole_groups(scheme, group_size, dtype):
    """The GEMV variant split over K: boundaries at multiples of its tile (int4: of whole
    groups), the last split ragged, partials combined in order. K from the granule, which
    differs between the interpreter (one 128-deep config) and a GPU (tiles up to 512: a
    fixed K = 704 made two splits there, not three)."""
    qm.FORCE_VARIANT, qm.FORCE_SPLITS = "gemv", 3
    granule = max(qm._GEMV_GRANULE, group_size)
    K = 4 * granule + max(group_size, 64)  # splits of 2 granules, then a ragged one
    k_split = -(-(-(-K // 3)) // granule) * granule
    assert -(-K // k_split) == 3 and K % k_split  # three splits, a ragged last one
    x, w, bias, out = _inputs(1, 33, K, dtype, True)
    q, s, z = _run(scheme, x, w, bias, out, group_size or 64)
    _check_weight_only(scheme, x, out, q, s, z, group_size, bias)


def _check_w8a8(x, out, q, s, bias):
    """The int32 accumulation is exact and the epilogue is the reference's own float32 ops:
    without bias the outputs agree exactly; with it, to the rounding of one fused add."""
    ref = quant_matmul_reference(x, "w8a8", q, s, None, 0, bias)
    if bias is None:
        assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()
        return
    eps = torch.finfo(out.dtype).eps
    tol = eps * (ref.float().abs() + bias.float().abs()[None, :]) + 1e-30
    assert ((out.float() - ref.float()).abs() <= tol).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_w8a8(variant, M, N, K, dtype, with_bias):
    _set_variant(variant, M, "w8a8")
    x, w, bias, out = _inputs(M, N, K, dtype, with_bias)
    q, s, _ = _run("w8a8", x, w, bias, out)
    _check_w8a8(x, out, q, s, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_rows_exact(dtype):
    """The activation quantizer matches the reference bit for bit: ties round to even (rows
    whose max is 127 have scale 1, so k + 0.5 values are exact ties), all-zero rows get
    scale 1, strided rows."""
    K = 300
    big = torch.randn(64, K + 4, device=DEVICE) * 3
    big[1] = 0.0
    ties = torch.arange(K, device=DEVICE, dtype=torch.float32) % 254 - 126.5  # -126.5 .. 126.5
    big[2, :K] = ties
    big[2, 7] = 127.0
    big[3, :K] = -ties
    big[3, 11] = -127.0
    x = big.to(dtype)[:, :K]
    xq, xs = qm.quantize_rows(x)
    rq, rs = quantize_activations_reference(x)
    assert torch.equal(xs, rs)
    assert torch.equal(xq, rq)


def test_w8a8_int32_accumulation_exact():
    """|acc| past 2^24: a float32 accumulator would round; int32 must not (K long enough for
    many K tiles and all three variants' paths)."""
    K = 4 * G + 64
    for variant, M in (("tiled", 20), ("decode", 2), ("split", 2)):
        _set_variant(variant, M)
        x = torch.ones(M, K, device=DEVICE)
        x[:, 5] = 1.0 / 127.0  # xq = 1 there: odd sums
        x[1, 9] = -1.0
        w = torch.ones(3, K, device=DEVICE)
        w[1, ::2] = -1.0
        w[2, 5] = -1.0
        out = torch.full((M, 3), float("nan"), device=DEVICE)
        q, s, _ = _run("w8a8", x, w, None, out)
        _check_w8a8(x, out, q, s, None)


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_prefill_many_rows_contiguous(scheme):
    """M = 300 (many row tiles and launch groups), contiguous rows, automatic variant."""
    M, N, K = 300, 20, 64
    x, w, bias, out = _inputs(M, N, K, torch.bfloat16, True, contiguous=True)
    q, s, z = _run(scheme, x, w, bias, out, group_size=32)
    if scheme == "w8a8":
        _check_w8a8(x, out, q, s, bias)
    else:
        _check_weight_only(scheme, x, out, q, s, z, 32, bias)


@pytest.mark.parametrize("M", [1, 17])
def test_float16(M):
    x, w, bias, out = _inputs(M, 24, 96, torch.float16, True)
    for scheme in ("int8", "int4"):
        out.fill_(float("nan"))
        q, s, z = _run(scheme, x, w, bias, out, group_size=32)
        ref = quant_matmul_reference(x, scheme, q, s, z, 32, bias).float()
        assert (out.float() - ref).abs().max() <= 5e-3 * ref.abs().max().clamp_min(1.0)


def test_automatic_variant_and_splits():
    """Without the knobs, small M takes the decode variant and never splits off-GPU."""
    assert qm._use_decode(1) and qm._use_decode(16) and not qm._use_decode(17)
    x = torch.zeros(2, 4096, device=DEVICE)
    if DEVICE == "cpu":
        assert qm.decode_splits(x, 64, 4096) == 1
    qm.FORCE_SPLITS = 5
    assert qm.decode_splits(x, 64, G) == 1  # never more splits than K granules
    # the GEMV variant only when forced, and then for one row of a weight-only scheme
    assert not qm._use_gemv(1, qm.SCHEME_INT4)
    qm.FORCE_VARIANT = "gemv"
    assert qm._use_gemv(1, qm.SCHEME_INT8) and qm._use_gemv(1, qm.SCHEME_INT4)
    assert not qm._use_gemv(2, qm.SCHEME_INT8) and not qm._use_gemv(1, qm.SCHEME_W8A8)
    assert qm._use_decode(2) and not qm._use_decode(17)
    qm.FORCE_VARIANT = "fast"
    with pytest.raises(ValueError, match="FORCE_VARIANT"):
        qm._use_decode(1)


def test_empty_and_zero_k():
    for M, N, K in ((0, 5, 32), (3, 0, 32)):
        x = torch.randn(M, K, device=DEVICE)
        q, s = quantize_int8_reference(torch.randn(N, K, device=DEVICE))
        out = torch.empty(M, N, device=DEVICE)
        qm.int8_matmul(x, q, s, None, out)
        qm.w8a8_matmul(x, q, s, None, out)
    x = torch.randn(3, 0, device=DEVICE)
    q = torch.zeros(4, 0, dtype=torch.int8, device=DEVICE)
    s = torch.ones(4, device=DEVICE)
    bias = torch.randn(4, device=DEVICE)
    out = torch.full((3, 4), float("nan"), device=DEVICE)
    qm.int8_matmul(x, q, s, bias, out)
    assert torch.equal(out, bias.expand(3, 4))
    qm.w8a8_matmul(x, q, s, None, out)
    assert torch.equal(out, torch.zeros(3, 4, device=DEVICE))
