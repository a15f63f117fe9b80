"""The CPU int4 path for bfloat16 x with few rows (decoding): x is quantized to int8 per
32-element block and multiplied with integer dot products (csrc/cpu/quant_matmul_impl.h).

Checked two ways on every CPU tier: tightly against the reference applied to the same
int8-quantized x (so the kernel does exactly that arithmetic), and against the reference on
x itself within bfloat16's tolerance (so the quantization stays a bfloat16-sized error)."""
import pytest
import torch

import llmkernels
from llmkernels.ops.quant_matmul import cpu_int4_int8_activations
from llmkernels.reference.quant_matmul import quant_matmul_reference
from test_quant_matmul import int8_activation_error_bound


def quantize_blocks(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) with K % 32 == 0 -> the dequantized per-32-block int8 x, in float64:
    scale = max|x| / 127 (float32), q = round-half-even(x / scale) (an all-zero block stays 0)."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    scale = xb.abs().amax(-1, keepdim=True) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale > 0, torch.round(xb / safe).clamp(-127, 127), torch.zeros_like(xb))
    return (q.double() * scale.double()).reshape(x.shape)


def reference64(x64: torch.Tensor, qw) -> torch.Tensor:
    return quant_matmul_reference(x64, "int4", qw.qdata, qw.scales, qw.zeros, qw.group_size)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("M,K,N", [(1, 128, 9), (2, 384, 33), (1, 4096, 70), (2, 1024, 1)])
@pytest.mark.parametrize("kind", ["gaussian", "outliers", "zero_blocks"])
def test_int4_int8x_path(cpu_tier, group, M, K, N, kind):
    if K % group:
        pytest.skip("K must be a multiple of the group")
    torch.manual_seed(M * 1000 + K + N + group)
    x = torch.randn(M, K)
    if kind == "outliers":  # one large value per block: the others keep few bits
        x[:, ::32] *= 50.0
    elif kind == "zero_blocks":
        x[:, 32:96] = 0.0
    x = x.to(torch.bfloat16)
    qw = llmkernels.quantize_weight(torch.randn(N, K), "int4", group)
    out = llmkernels.quant_matmul(x, qw, backend="cpu")
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)

    # Whichever path served (float products on tiers or group sizes without the int8-x
    # path), the output is within bfloat16's tolerance of the reference on x itself, plus at
    # most the worst case of the activations' rounding to int8.
    ref = reference64(x.double(), qw)
    scale = ref.abs().max().item() + 1e-6
    bound = 2 ** -7 * scale + int8_activation_error_bound(x, qw).double()
    assert ((out.double() - ref).abs() <= bound).all()

    # Where the int8-x path serves, it computes the reference on the quantized x (up to float32
    # sums and the bfloat16 output); the float path does not (for the gaussian and outlier x,
    # the two differ by far more than this bound).
    ref_q = reference64(quantize_blocks(x), qw)
    err_q = (out.double() - ref_q).abs().max().item()
    if cpu_int4_int8_activations(x, qw):  # (explain's rule; a wrong one fails here)
        assert err_q <= 2 ** -8 * ref_q.abs().max().item() + 1e-6, err_q


def test_int8_activations_typical_error_is_small():
    """On Gaussian x the activations' rounding costs about 0.5% of the output's RMS: small next
    to int4's own weight error (SQNR 19.5 dB, ~10%)."""
    torch.manual_seed(1)
    x = torch.randn(1, 4096).to(torch.bfloat16)
    qw = llmkernels.quantize_weight(torch.randn(512, 4096), "int4", 128)
    ref = reference64(x.double(), qw)
    out = llmkernels.quant_matmul(x, qw, backend="cpu").double()
    rel_rms = ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert rel_rms <= 0.01, rel_rms


@pytest.mark.parametrize("scheme", ["int4", "w8a8"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_give_non_finite_outputs(cpu_tier, bad, scheme):
    """Activations quantized to int8 (int4 decoding, w8a8): a NaN or infinity in a row makes
    its outputs non-finite, as the reference's, never finite numbers made of the rest."""
    qw = llmkernels.quantize_weight(torch.randn(16, 256), scheme, 128)
    x = torch.randn(2, 256).to(torch.bfloat16)
    x[0, 37] = bad
    out = llmkernels.quant_matmul(x, qw, backend="cpu")
    assert not torch.isfinite(out[0]).any()
    assert torch.isfinite(out[1]).all()


def test_float16_and_float32_x_keep_float_products(cpu_tier):
    torch.manual_seed(0)
    qw = llmkernels.quantize_weight(torch.randn(16, 256), "int4", 128)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2 ** -10)):
        x = torch.randn(1, 256).to(dtype)
        x[:, ::32] *= 50.0  # int8 blocks would lose the small values here
        ref = reference64(x.double(), qw)
        out = llmkernels.quant_matmul(x, qw, backend="cpu")
        assert (out.double() - ref).abs().max().item() <= tol * ref.abs().max().item()
