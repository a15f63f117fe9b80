"""The CPU paths that quantize bfloat16 x to int8 per 32-element block and multiply with
integer dot products (csrc/cpu/quant_matmul_impl.h): int4 weights with few rows (decoding, row
blocks), and on AVX512-VNNI CPUs int8 weights with 6 rows or more and int4 weights with more
rows than the row blocks take (x packed 16 rows to a vector; 6-8 rows: 8 rows, two halves of K
each, int4 where each half holds whole groups).

Checked two ways on every CPU tier: tightly against the reference applied to the same
int8-quantized x (so the kernel does exactly that arithmetic), and against the reference on
x itself within bfloat16's tolerance (so the quantization stays a bfloat16-sized error)."""
import pytest
import torch

import llmkernels
from llmkernels.ops.quant_matmul import cpu_int8_activations
from llmkernels.reference.quant_matmul import quant_matmul_reference
from test_quant_matmul import int8_activation_error_bound


def quantize_blocks(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> the dequantized per-32-block int8 x, in float64 (a last partial block as if
    zero-padded): scale = max|x| / 127 (float32), q = round-half-even(x / scale) (an all-zero
    block stays 0)."""
    K = x.shape[1]
    padded = torch.nn.functional.pad(x.float(), (0, -K % 32))
    xb = padded.reshape(x.shape[0], -1, 32)
    scale = xb.abs().amax(-1, keepdim=True) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale > 0, torch.round(xb / safe).clamp(-127, 127), torch.zeros_like(xb))
    return (q.double() * scale.double()).reshape(padded.shape)[:, :K]


def reference64(x64: torch.Tensor, qw) -> torch.Tensor:
    return quant_matmul_reference(x64, qw.scheme, qw.qdata, qw.scales, qw.zeros, qw.group_size)


def make_x(M, K, kind):
    x = torch.randn(M, K)
    if kind == "outliers":  # one large value per block: the others keep few bits
        x[:, ::32] *= 50.0
    elif kind == "zero_blocks":
        x[:, 32:96] = 0.0
    return x.to(torch.bfloat16)


def check_both_ways(x, qw, out):
    """Within bfloat16's tolerance plus the activations' worst-case int8 rounding of the
    reference on x itself, whichever path served; and where an int8-x path served (explain's
    rule: a wrong one fails here), the reference on the block-quantized x up to float32 sums
    and the bfloat16 output (for the gaussian and outlier x, the float paths miss this bound
    by far)."""
    ref = reference64(x.double(), qw)
    scale = ref.abs().max().item() + 1e-6
    bound = 2 ** -7 * scale + int8_activation_error_bound(x, qw).double()
    assert ((out.double() - ref).abs() <= bound).all()
    ref_q = reference64(quantize_blocks(x), qw)
    err_q = (out.double() - ref_q).abs().max().item()
    if cpu_int8_activations(x, qw):
        assert err_q <= 2 ** -8 * ref_q.abs().max().item() + 1e-6, err_q


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("M,K,N", [(1, 128, 9), (2, 384, 33), (1, 4096, 70), (2, 1024, 1),
                                   (4, 128, 9), (5, 384, 33), (6, 256, 9), (7, 384, 70), (8, 4096, 33), (8, 2304, 1),
                                   (7, 320, 33),  # groups of 32: halves of 160, a lone block
                                   (9, 128, 9), (16, 4096, 70), (17, 384, 33), (31, 128, 9),
                                   (64, 1024, 130),
                                   (300, 256, 1)])
@pytest.mark.parametrize("kind", ["gaussian", "outliers", "zero_blocks"])
def test_int4_int8x_paths(cpu_tier, group, M, K, N, kind):
    """int4 weights: row blocks (decoding; AVX2 4 rows a block from 4 rows, 4 + 1-3 left over),
    and on VNNI CPUs x packed: 6-8 rows as two halves of
    K each where each half holds whole groups (else row blocks), from 9 rows 16 rows to a
    vector (1, 2 and 4 vectors per register block), each group's sums scaled and its zero
    points applied."""
    if K % group:
        pytest.skip("K must be a multiple of the group")
    torch.manual_seed(M * 1000 + K + N + group)
    x = make_x(M, K, kind)
    qw = llmkernels.quantize_weight(torch.randn(N, K), "int4", group)
    out = llmkernels.quant_matmul(x, qw, backend="cpu")
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    check_both_ways(x, qw, out)
    # row blocks: whole vectors of 4W; paired: whole groups in each half of K
    if cpu_tier == "avx512_bf16" and (M >= 9 or group >= 64 or (M >= 6 and K % (2 * group) == 0)):
        assert cpu_int8_activations(x, qw)


@pytest.mark.parametrize("M,K,N", [(1, 100, 9), (2, 4096, 70), (3, 96, 33), (5, 200, 130),
                                   (6, 128, 9), (7, 100, 2), (8, 128, 9), (6, 4160, 70),
                                   (8, 2100, 33), (7, 40, 5), (16, 4096, 70),
                                   (17, 100, 33), (33, 1024, 1), (64, 352, 130), (300, 96, 20)])
@pytest.mark.parametrize("kind", ["gaussian", "outliers", "zero_blocks"])
def test_int8_int8x_path(cpu_tier, M, K, N, kind):
    """int8 weights: row blocks (decoding; 4W values a step, K not a multiple of it) and from 6
    rows on VNNI CPUs x packed to vectors: 6-8 rows as two halves of K each (halves of several
    1024-value chunks, a second half partly or mostly past K), more rows 16 to a vector (1, 2
    and 4 vectors of 16 rows per register block, rows past M in the last vector); K not a
    multiple of 32 (a partial last block), one channel, channels not a multiple of 8."""
    torch.manual_seed(M * 1000 + K + N)
    x = make_x(M, K, kind)
    qw = llmkernels.quantize_weight(torch.randn(N, K), "int8")
    out = llmkernels.quant_matmul(x, qw, backend="cpu")
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    check_both_ways(x, qw, out)
    if cpu_tier == "avx512_bf16":  # the tier that takes this path (amx: its bf16 tiles)
        assert cpu_int8_activations(x, qw)


@pytest.mark.parametrize("M", [1, 2, 7, 16])
def test_int8_int8x_paths_take_weights_of_minus_128(cpu_tier, M):
    """-128 fits int8 though the quantizer never makes it: |w| = 128 in maddubs' unsigned
    operand, w + 128 = 0 in vpdpbusd's."""
    torch.manual_seed(M)
    qw = llmkernels.quantize_weight(torch.randn(24, 320), "int8")
    qw.qdata[:, ::3] = -128
    x = make_x(M, 320, "gaussian")
    check_both_ways(x, qw, llmkernels.quant_matmul(x, qw, backend="cpu"))


@pytest.mark.parametrize("M", [1, 3, 5, 6, 8, 16, 17, 64])
@pytest.mark.parametrize("K", [4096, 4000])
def test_int8_int8x_paths_give_zero_weight_rows_exact_zeros(cpu_tier, M, K):
    """A pruned (all-zero) weight row multiplies to exactly 0, and its output is exactly the
    bias: on VNNI the products are of w + 128, and taking 128 * sum(x) back out in float after
    the block scales left ~1e-3 (M = 300: 1e-2) there and as much error on every output."""
    torch.manual_seed(M + K)
    w = torch.randn(40, K) * 0.02
    w[[0, 7, 39]] = 0.0
    qw = llmkernels.quantize_weight(w, "int8")
    x = make_x(M, K, "gaussian")
    bias = torch.randn(40).to(torch.bfloat16)
    out = llmkernels.quant_matmul(x, qw, bias=bias, backend="cpu")
    assert torch.equal(out[:, [0, 7, 39]], bias[[0, 7, 39]].expand(M, 3))
    check_both_ways(x, qw, llmkernels.quant_matmul(x, qw, backend="cpu"))


@pytest.mark.parametrize("M", [2, 24])
def test_int8_int8x_path_non_contiguous_x(cpu_tier, M):
    torch.manual_seed(3)
    x = make_x(M, 200, "gaussian").t().contiguous().t()  # column-major: strided rows
    qw = llmkernels.quantize_weight(torch.randn(40, 200), "int8")
    out = llmkernels.quant_matmul(x, qw, backend="cpu")
    check_both_ways(x, qw, out)
    torch.testing.assert_close(out, llmkernels.quant_matmul(x.contiguous(), qw, backend="cpu"),
                               rtol=0, atol=0)


@pytest.mark.parametrize("scheme,M,bound", [("int4", 1, 0.01), ("int4", 16, 0.01),
                                            ("int8", 16, 0.01)])
def test_int8_activations_typical_error_is_small(scheme, M, bound):
    """On Gaussian x the activations' rounding costs about 0.5% of the output's RMS: small next
    to int4's own weight error (SQNR 19.5 dB, ~10%) and below int8's (40 dB, ~1%); bfloat16's
    own rounding of the output is ~0.2%."""
    torch.manual_seed(1)
    x = torch.randn(M, 4096).to(torch.bfloat16)
    qw = llmkernels.quantize_weight(torch.randn(512, 4096), scheme, 128)
    ref = reference64(x.double(), qw)
    out = llmkernels.quant_matmul(x, qw, backend="cpu").double()
    rel_rms = ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert rel_rms <= bound, rel_rms


@pytest.mark.parametrize("scheme,M", [("int4", 2), ("int4", 18), ("w8a8", 2), ("int8", 18)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_give_non_finite_outputs(cpu_tier, bad, scheme, M):
    """Activations quantized to int8 (int4 decoding, int8 with many rows, w8a8): a NaN or
    infinity in a row makes its outputs non-finite, as the reference's, never finite numbers
    made of the rest."""
    qw = llmkernels.quantize_weight(torch.randn(16, 256), scheme, 128)
    x = torch.randn(M, 256).to(torch.bfloat16)
    x[0, 37] = bad
    out = llmkernels.quant_matmul(x, qw, backend="cpu")
    assert not torch.isfinite(out[0]).any()
    assert torch.isfinite(out[1]).all()


@pytest.mark.parametrize("scheme,M", [("int4", 1), ("int4", 16), ("int8", 16)])
def test_float16_and_float32_x_keep_float_products(cpu_tier, scheme, M):
    torch.manual_seed(0)
    qw = llmkernels.quantize_weight(torch.randn(16, 256), scheme, 128)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2 ** -10)):
        x = torch.randn(M, 256).to(dtype)
        x[:, ::32] *= 50.0  # int8 blocks would lose the small values here
        ref = reference64(x.double(), qw)
        out = llmkernels.quant_matmul(x, qw, backend="cpu")
        assert (out.double() - ref).abs().max().item() <= tol * ref.abs().max().item()


@pytest.mark.parametrize("K,paired", [(96, False), (160, False), (128, True)])
def test_explain_names_int4s_paired_layout_only_where_halves_hold_whole_groups(K, paired):
    """7 rows of bf16 x, int4 group 32: the paired layout (x quantized to int8) serves only
    where each half of K holds whole groups; explain's rule was read without K and named it
    (and cpu_int8_activations said True) for K = 96 and 160 too, where x stays bf16."""
    if llmkernels.backends.cpu_tier() != "avx512_bf16":
        pytest.skip("the paired layout is the avx512_bf16 tier's")
    torch.manual_seed(K)
    x = make_x(7, K, "gaussian")
    qw = llmkernels.quantize_weight(torch.randn(24, K), "int4", group_size=32)
    detail = llmkernels.explain(llmkernels.quant_matmul, x, qw).detail
    assert ("two halves of K" in detail) == paired, detail
    assert cpu_int8_activations(x, qw) == paired
    out = llmkernels.quant_matmul(x, qw, backend="cpu")
    check_both_ways(x, qw, out)  # the tight check applies where int8 x is claimed
