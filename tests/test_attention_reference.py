"""The PyTorch reference path of scaled_dot_product_attention, which serves calls the fused
kernel does not take (dropout, float64, a float mask that requires grad, head dims over 256),
against torch's SDPA: rows masked with huge finite values, 16-bit inputs."""
import pytest
import torch
import torch.nn.functional as F

import llmkernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fill", ["finfo_min", -1e9])
def test_rows_masked_with_huge_finite_values(dtype, fill):
    """A padded query row masked with finfo.min or -1e9 on every key: torch's result (the mean
    of v). exp(s - logsumexp(s)) lost logsumexp's log(S) to rounding: weights summing to S."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, dtype=dtype) for _ in range(3))
    mask = torch.zeros(5, 5, dtype=dtype)
    mask[0] = torch.finfo(dtype).min if fill == "finfo_min" else fill
    mask[3, :2] = -1e9
    ours = llmkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="reference")
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_inputs_are_computed_in_float32(dtype):
    """Scores of 16-bit inputs in their own precision overflowed (an fp16 dropout call raised
    "NaN or Inf") and lost 3-4x torch's accuracy."""
    torch.manual_seed(0)
    q = (torch.randn(1, 2, 5, 64) * 100).to(dtype)
    k = (torch.randn(1, 2, 7, 64) * 100).to(dtype)
    v = torch.randn(1, 2, 7, 64).to(dtype)
    out = llmkernels.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    assert out.dtype == dtype and torch.isfinite(out).all()
    q, k = torch.randn(1, 2, 33, 64).to(dtype), torch.randn(1, 2, 40, 64).to(dtype)
    v = torch.randn(1, 2, 40, 64).to(dtype)
    bias = torch.randn(33, 40, dtype=dtype)
    ours = llmkernels.scaled_dot_product_attention(q, k, v, attn_mask=bias, backend="reference")
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                           attn_mask=bias.double())
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    err = (ours.double() - exact).abs().max().item()
    assert err <= 2 * (theirs.double() - exact).abs().max().item() + 1e-3


def test_autocast_casts_like_torch():
    """SDPA is on autocast's lower-precision list: float32 inputs (a float mask too) run, and
    come back, in the autocast dtype. Their values are judged as every 16-bit result is: error
    against float64 at most twice torch's (on an AVX2-only Zen 3 the two differed by one bf16
    ulp in 2 of 160 values, past assert_close's bf16 tolerance)."""
    q = torch.randn(1, 2, 5, 16)
    mask = torch.randn(5, 5)
    with torch.autocast("cpu", torch.bfloat16):
        ours = llmkernels.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        theirs = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    q16 = q.bfloat16().double()
    exact = F.scaled_dot_product_attention(q16, q16, q16, attn_mask=mask.double())
    err = (ours.double() - exact).abs().max().item()
    assert err <= 2 * (theirs.double() - exact).abs().max().item() + 1e-3


def test_value_head_dim_zero_and_meta_inputs():
    q = torch.randn(1, 2, 5, 16)
    empty = llmkernels.scaled_dot_product_attention(q, q, torch.randn(1, 2, 5, 0))
    assert empty.shape == (1, 2, 5, 0)
    m = q.to("meta")
    assert llmkernels.scaled_dot_product_attention(m, m, m).shape == (1, 2, 5, 16)


def test_lazily_negated_views_as_inputs():
    """conj().imag of a complex tensor is a view whose memory holds the values before its
    negation: the kernels read memory, so such inputs are resolved first."""
    a, b = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    q = torch.complex(a, b).conj().imag
    assert q.is_neg()
    torch.testing.assert_close(llmkernels.scaled_dot_product_attention(q, a, a),
                               F.scaled_dot_product_attention(q, a, a))
    qw = llmkernels.quantize_weight(torch.randn(8, 16), "int8")
    x = torch.complex(torch.randn(1, 16), torch.randn(1, 16)).conj().imag
    torch.testing.assert_close(llmkernels.quant_matmul(x, qw), x @ qw.dequantize().T,
                               rtol=1e-5, atol=1e-5)
