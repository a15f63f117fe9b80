"""Quantized matmul: the reference quantizers' accuracy (SQNR), every CPU tier's kernel against
the reference on the same quantized weights, the API, QuantLinear, quantize_, bad input."""
import copy
import importlib
import io

import pytest
import torch

import llmkernels
from llmkernels._cview import cview
from llmkernels.ops.quant_matmul import cpu_int8_activations, quant_matmul_op
from llmkernels.quantized_weight import SCHEME_CODES
from llmkernels.reference.quant_matmul import quant_matmul_reference

needs_native = pytest.mark.skipif(llmkernels.backends.native_module() is None,
                                  reason="needs the compiled CPU kernels")

SCHEMES = ["int8", "int4", "w8a8"]


def sqnr_db(approx: torch.Tensor, exact: torch.Tensor) -> float:
    exact, approx = exact.double(), approx.double()
    return 10 * torch.log10(exact.pow(2).sum() / (approx - exact).pow(2).sum()).item()


@pytest.mark.parametrize("scheme,group,bound", [("int8", 0, 40.0), ("int4", 128, 19.5),
                                                ("int4", 32, 21.0), ("w8a8", 0, 37.0)])
def test_reference_sqnr_on_gaussian_weights(scheme, group, bound):
    w, x = torch.randn(256, 4096), torch.randn(16, 4096)
    qw = llmkernels.quantize_weight(w, scheme, group or 128)
    out = quant_matmul_reference(x, scheme, qw.qdata, qw.scales, qw.zeros, qw.group_size)
    assert sqnr_db(out, x @ w.t()) >= bound


def check_against_reference(x, qw, bias, out, loose=1.0):
    """loose > 1: GPU kernels that round dequantized weights to x's dtype for tensor cores."""
    ref = quant_matmul_reference(x, qw.scheme, qw.qdata, qw.scales, qw.zeros, qw.group_size, bias)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    scale = ref.float().abs().max().item() + 1e-6
    if x.dtype == torch.float32:
        tol = 1e-5 if qw.scheme != "w8a8" else 1e-6  # w8a8 sums integers: exact but the scales
    else:
        tol = 2 ** -7 if x.dtype == torch.bfloat16 else 2 ** -10  # one ulp of the output
    err = (out.float() - ref.float()).abs().max().item()
    bound = loose * tol * scale
    if x.device.type == "cpu" and cpu_int8_activations(x, qw):
        bound += int8_activation_error_bound(x, qw).max().item()
    assert err <= bound, f"error {err:.3e} > {bound:.3e}"


def int8_activation_error_bound(x, qw):
    """(..., N) worst-case error from quantizing bfloat16 x to int8 per 32 values (the CPU
    int8-x paths: cpu_int8_activations): sum over k of (block max|x| / 127 / 2) * |w[n, k]|."""
    K = x.shape[-1]
    x2 = torch.nn.functional.pad(x.reshape(-1, K).float(), (0, -K % 32))
    half_step = (x2.reshape(x2.shape[0], -1, 32).abs().amax(-1) / 254).repeat_interleave(32, -1)
    half_step = half_step[:, :K]
    w = qw.dequantize().float().abs()
    return (half_step @ w.t()) * (1 + 2 ** -8)


SHAPES = [(1, 256, 64), (3, 100, 33), (17, 96, 257), (300, 1024, 20), (2, 64, 1),
          (5, 256, 9), (6, 320, 37), (7, 2112, 19)]  # 5-7: a block of 4 rows and the rest


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_kernel_matches_reference(cpu_tier, scheme, M, K, N, dtype):
    group = 32
    if scheme == "int4" and K % group:
        K = (K // group + 1) * group
    x = torch.randn(M, K, dtype=dtype)
    qw = llmkernels.quantize_weight(torch.randn(N, K), scheme, group)
    bias = torch.randn(N, dtype=dtype) if M % 2 else None
    out = llmkernels.quant_matmul(x, qw, bias, backend="cpu")
    check_against_reference(x, qw, bias, out)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_int4_group_sizes_and_batched_noncontiguous_input(cpu_tier, scheme):
    for group in (32, 64, 128):
        big = torch.randn(2, 5, 3 * 256, dtype=torch.bfloat16)
        x = big[..., 7:7 + 256]  # (2, 5, 256) with a row stride of 768
        qw = llmkernels.quantize_weight(torch.randn(48, 256), scheme, group)
        out = llmkernels.quant_matmul(x, qw, backend="cpu")
        assert out.shape == (2, 5, 48)
        check_against_reference(x, qw, None, out)


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("K,group", [(192, 32), (768, 128), (2112, 64), (640, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_rows_of_groups_that_are_not_whole_vectors(cpu_tier, M, K, group, dtype):
    # The zero points' term takes W groups at a time; the groups left over (all of a 768-wide
    # layer's 6) take a last vector whose lanes past the row are dropped, except in the last
    # channel's row, at the end of the zeros and scales, which sums them one by one.
    torch.manual_seed(K + M)
    x = torch.randn(M, K, dtype=dtype)
    qw = llmkernels.quantize_weight(torch.randn(9, K) + torch.linspace(-2, 2, K), "int4", group)
    assert len(qw.zeros.unique()) > 3  # zero points that differ between groups and channels
    check_against_reference(x, qw, None, llmkernels.quant_matmul(x, qw, backend="cpu"))


@pytest.mark.parametrize("M", [3, 5, 7, 8, 11])
def test_int4_few_rows_with_int8_activations(cpu_tier, M):
    # Batched decoding (up to 11 rows) takes the int8-activation int4 kernel on AVX2 / AVX-512
    # tiers: blocks of 2 rows and one left over, whole weight rows per block (the amx tier's
    # tiles take 8 rows and more).
    for group in (64, 128):
        x = torch.randn(M, 1024, dtype=torch.bfloat16)
        qw = llmkernels.quantize_weight(torch.randn(37, 1024), "int4", group)
        bias = torch.randn(37, dtype=torch.bfloat16)
        int8_x = cpu_tier not in ("generic", "none") and not (cpu_tier == "amx" and M >= 8)
        assert cpu_int8_activations(x, qw) == int8_x
        check_against_reference(x, qw, bias, llmkernels.quant_matmul(x, qw, bias, backend="cpu"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_empty_batch(scheme):
    qw = llmkernels.quantize_weight(torch.randn(8, 64), scheme, 32)
    out = llmkernels.quant_matmul(torch.randn(0, 3, 64), qw)
    assert out.shape == (0, 3, 8)


def test_non_contiguous_packed_weights():
    qw = llmkernels.quantize_weight(torch.randn(64, 32), "int8")
    t = qw.qdata.t().contiguous().t()  # same values, column-major storage
    odd = llmkernels.QuantizedWeight("int8", qw.shape, 0, t, qw.scales, None, qw.dtype)
    x = torch.randn(3, 32, requires_grad=True)
    torch.testing.assert_close(llmkernels.quant_matmul(x, odd), llmkernels.quant_matmul(x, qw))
    # and the backward (the CPU gradient kernel raised "qdata must be contiguous")
    (gx,) = torch.autograd.grad(llmkernels.quant_matmul(x, odd).sum(), (x,))
    torch.testing.assert_close(gx, torch.ones(3, 64) @ qw.dequantize())


def test_a_tensor_swapped_under_a_validated_weight_is_checked_again():
    """validate() remembers a pass by tensor identity; `t.data = other` keeps the object (the
    Triton kernels, which have no bounds checks of their own, then read past the new
    tensor), and a file's own record of a pass skipped every check."""
    x = torch.randn(3, 128)
    qw = llmkernels.quantize_weight(torch.randn(64, 128), "int8")
    llmkernels.quant_matmul(x, qw, backend="reference")
    qw.scales.data = torch.ones(1)
    with pytest.raises(ValueError, match="scales must have shape"):
        llmkernels.quant_matmul(x, qw, backend="reference")
    bad = llmkernels.QuantizedWeight("int8", (64, 128), 0, torch.zeros(1, 1, dtype=torch.int8),
                                     torch.ones(64), None, torch.float32)
    bad.__dict__["_validated"] = ("int8", (64, 128), 0, bad.qdata, bad.scales, None, torch.int8)
    buf = io.BytesIO()
    torch.save(dict(bad.__dict__), buf)  # a file made with the record kept
    loaded = llmkernels.QuantizedWeight.__new__(llmkernels.QuantizedWeight)
    loaded.__setstate__(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    with pytest.raises(ValueError, match="qdata must have shape"):
        loaded.validate()


def test_w8a8_rounding_matches_reference_exactly():
    # Values at exact .5 multiples of the scale: round half to even, as torch.round.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5] + [0.0] * 58])
    qw = llmkernels.quantize_weight(torch.randn(8, 64), "w8a8")
    out = llmkernels.quant_matmul(x, qw, backend="cpu")
    ref = quant_matmul_reference(x, "w8a8", qw.qdata, qw.scales, None, 0)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gradient_wrt_input_and_bias(scheme, backend):
    """Every path's gradient is the dequantized weight's (w8a8: straight through the activation
    rounding; the reference path's own ops reached x only through its per-row absmax)."""
    x = torch.randn(4, 64, requires_grad=True)
    qw = llmkernels.quantize_weight(torch.randn(16, 64), scheme, 32)
    bias = torch.randn(16, requires_grad=True)
    out = llmkernels.quant_matmul(x, qw, bias, backend=backend)
    g = torch.randn_like(out)
    gx, gb = torch.autograd.grad(out, (x, bias), g)
    torch.testing.assert_close(gx, g @ qw.dequantize())
    torch.testing.assert_close(gb, g.sum(0))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gradient_never_forms_the_whole_float_weight(scheme, monkeypatch):
    """Off the CPU kernel's path, the backward dequantizes slices of output rows (it formed the
    whole float32 weight: 512-778 MiB for an 8192x8192 layer stored in 34-64 MiB); the
    gradient is the same."""
    import sys
    ops = sys.modules["llmkernels.ops.quant_matmul"]  # (the package exports the function too)
    sizes = []
    real = ops.dequantize_reference
    monkeypatch.setattr(ops, "dequantize_reference",
                        lambda *a: sizes.append(a[1].shape[0]) or real(*a))
    monkeypatch.setattr(ops, "BACKWARD_SLICE_BYTES", 4 * 64 * 7)  # 7 rows of K = 64
    x = torch.randn(3, 2, 64, requires_grad=True)
    qw = llmkernels.quantize_weight(torch.randn(30, 64), scheme, 32)
    out = llmkernels.quant_matmul(x, qw, backend="reference")
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, (x,), g)
    assert sizes == [7, 7, 7, 7, 2]
    torch.testing.assert_close(gx, g @ qw.dequantize(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gradient_keeps_one_slice_of_the_weight_alive(scheme, monkeypatch):
    """The previous slice stayed alive while the next was made (and the int4 dequantization
    made 2-3 float temporaries a slice): 73 MiB extra for a 4096 x 4096 int4 layer's backward
    against the 16 MiB slices promised."""
    import sys
    import weakref
    ops = sys.modules["llmkernels.ops.quant_matmul"]
    made = []
    real = ops.dequantize_reference

    def dequantize(*a):
        assert all(ref() is None for ref in made), "an earlier slice is still alive"
        w = real(*a)
        made.append(weakref.ref(w))
        return w
    monkeypatch.setattr(ops, "dequantize_reference", dequantize)
    monkeypatch.setattr(ops, "BACKWARD_SLICE_BYTES", 4 * 64 * 7)
    x = torch.randn(5, 64, requires_grad=True)
    qw = llmkernels.quantize_weight(torch.randn(30, 64), scheme, 32)
    out = llmkernels.quant_matmul(x, qw, backend="reference")
    (gx,) = torch.autograd.grad(out, (x,), torch.ones(5, 30))
    assert len(made) == 5
    torch.testing.assert_close(gx, torch.ones(5, 30) @ qw.dequantize(), rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cpu_gradient_kernel_on_every_tier(scheme, dtype, monkeypatch):
    """The CPU path's input gradient is a kernel (dequantized panels in cache, float32 FMA: the
    Python slices took 4-10x its time); shapes across its blocks of 96 rows, 256 columns and
    256 weight rows, K not a multiple of a vector (int8), grad_out expanded (a sum's)."""
    import sys
    ops = sys.modules["llmkernels.ops.quant_matmul"]
    monkeypatch.setattr(ops, "dequantize_reference", lambda *a: pytest.fail("sliced path"))
    shapes = [(1, 1, 32), (3, 17, 96), (200, 300, 640)] + ([(5, 9, 70)] if scheme != "int4" else [])
    for tier in llmkernels.backends.supported_cpu_tiers():
        for M, N, K in shapes:
            qw = llmkernels.quantize_weight(torch.randn(N, K), scheme, 32)
            w = qw.dequantize().double()
            x = torch.randn(M, K, dtype=dtype, requires_grad=True)
            with llmkernels.backends.use_cpu_tier(tier):
                out = llmkernels.quant_matmul(x, qw)
                g = torch.randn_like(out)
                (gx,) = torch.autograd.grad(out, (x,), g)
                (gx_sum,) = torch.autograd.grad(llmkernels.quant_matmul(x, qw).sum(), (x,))
            assert gx.dtype == dtype
            for got, grad in ((gx, g), (gx_sum, torch.ones_like(g))):
                want = grad.double() @ w
                # DESIGN.md's rule: at most 2x torch's own error in x's dtype (+ a floor)
                torch_err = (grad @ w.to(dtype) - want).abs().max().item()
                tol = 2 * torch_err + 1e-5 * want.abs().max().item() + 1e-6
                err = (got.double() - want).abs().max().item()
                assert err <= tol, (tier, M, N, K, err, tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_sliced_gradient_in_16_bit_products(scheme, dtype, monkeypatch):
    """The GPU paths' backward multiplies 16-bit gradients in their dtype (float32 products
    were 17x nn.Linear's time on an H200), slices summed in float32: within 2x of torch's
    own 16-bit error. (Run here on the CPU through the same code.)"""
    import sys
    ops = sys.modules["llmkernels.ops.quant_matmul"]
    monkeypatch.setattr(ops, "LOW_PRECISION_PRODUCTS", ("cpu",))
    monkeypatch.setattr(ops, "BACKWARD_SLICE_BYTES", 4 * 256 * 40)  # 40 rows a slice
    qw = llmkernels.quantize_weight(torch.randn(300, 256), scheme, 32)
    x = torch.randn(37, 256, dtype=dtype, requires_grad=True)
    out = llmkernels.quant_matmul(x, qw, backend="reference")
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, (x,), g)
    w = qw.dequantize().double()
    want = g.double() @ w
    torch_err = (g @ w.to(dtype) - want).abs().max().item()
    assert gx.dtype == dtype
    assert (gx.double() - want).abs().max().item() <= 2 * torch_err + 1e-6


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_second_order_gradients(scheme, backend):
    """Gradient penalties / Hessian-vector products through a quantized layer: the CPU
    kernel's gradient op had no autograd formula of its own (the sliced path, plain torch ops,
    had). y = x W^T: d/dx sum((d sum(y^2)/dx)^2) = 8 x (W^T W)^2 (w8a8: straight through)."""
    qw = llmkernels.quantize_weight(torch.randn(24, 64), scheme, 32)
    x = torch.randn(4, 64, dtype=torch.float64).float().requires_grad_()
    y = llmkernels.quant_matmul(x, qw, backend=backend)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.pow(2).sum(), x)
    w = qw.dequantize().double()
    a = w.t() @ w
    if scheme != "w8a8":  # (w8a8's first gradient uses the rounded activations' output)
        want = 8 * x.detach().double() @ a @ a  # (float32 sums: ~1e-5 of the largest value)
        assert (ggx.double() - want).abs().max() <= 1e-4 * want.abs().max()
    assert torch.isfinite(ggx).all() and ggx.abs().sum() > 0


@needs_native
def test_cpu_gradient_kernel_checks_its_arguments():
    native = llmkernels.backends.native_module()
    tier = llmkernels.backends.cpu_tier_code()
    qw = llmkernels.quantize_weight(torch.randn(8, 64), "int4", 32)
    code = 1
    views = [cview(t) for t in (qw.qdata, qw.scales, qw.zeros)]
    for g, gx, why in ((torch.ones(3, 8), torch.empty(3, 32), "grad_x must be"),
                       (torch.ones(3, 7), torch.empty(3, 64), "grad_out must be"),
                       (torch.ones(3, 8, dtype=torch.float16), torch.empty(3, 64),
                        "grad_out must be float32 or bfloat16"),
                       (torch.ones(3, 8), torch.empty(3, 64, dtype=torch.bfloat16),
                        "grad_x must be float32")):
        with pytest.raises(RuntimeError, match=why):
            native.quant_matmul_grad_x_workspace_bytes(tier, code, cview(g), *views, cview(gx),
                                                       32, 1)
    with pytest.raises(RuntimeError, match="workspace too small"):
        native.quant_matmul_grad_x(tier, code, cview(torch.ones(3, 8)), *views,
                                   cview(torch.empty(3, 64)), 32, 1, 0, 0)


@needs_native
@pytest.mark.parametrize("scheme", ["int8", "w8a8"])
def test_full_range_int8_codes_on_every_tier(scheme):
    """-128 codes (int8 checkpoints of other quantizers; ours stop at -127): the avx2 and
    avx512 tiers' w8a8 products moved x's sign onto w, and -(-128) wraps to -128, so -128
    times a negative x came out positive (4-20x relative error, no error raised)."""
    torch.manual_seed(0)
    base = llmkernels.quantize_weight(torch.randn(40, 96), scheme)
    qdata = base.qdata.clone()
    qdata[:, ::3] = -128
    qw = llmkernels.QuantizedWeight(scheme, (40, 96), 0, qdata, base.scales, None, torch.float32)
    for M in (1, 3, 17, 300):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(M, 96, dtype=dtype)
            ref = quant_matmul_reference(x.float(), scheme, qdata, base.scales, None, 0)
            for tier in llmkernels.backends.supported_cpu_tiers():
                with llmkernels.backends.use_cpu_tier(tier):
                    out = llmkernels.quant_matmul(x, qw).float()
                err = ((out - ref).norm() / ref.norm()).item()
                assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5), (tier, M, dtype, err)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_trained_bias_alone_needs_no_weight(scheme, monkeypatch):
    """A frozen input with a trained bias (bias tuning) ran the whole dequantizing backward."""
    import sys
    ops = sys.modules["llmkernels.ops.quant_matmul"]
    monkeypatch.setattr(ops, "dequantize_reference", lambda *a: pytest.fail("dequantized"))
    qw = llmkernels.quantize_weight(torch.randn(30, 64), scheme, 32)
    bias = torch.randn(30, requires_grad=True)
    out = llmkernels.quant_matmul(torch.randn(4, 64), qw, bias)
    (gb,) = torch.autograd.grad(out, (bias,), torch.ones(4, 30))
    torch.testing.assert_close(gb, torch.full((30,), 4.0))


def _paths_here():
    paths = ["reference"]
    if llmkernels.backends.native_module() is not None:
        paths.append("cpu")
    if llmkernels.backends.triton_unavailable("quant_matmul") is None:
        paths.append("triton")  # the interpreter (conftest) without a GPU
    return paths


@pytest.mark.parametrize("path", _paths_here())
@pytest.mark.parametrize("scheme", SCHEMES)
def test_strided_bias(scheme, path):
    """A bias that is a strided view: Triton's launcher read it as dense (wrong outputs)."""
    qw = llmkernels.quantize_weight(torch.randn(5, 64), scheme, 32)
    x, wide = torch.randn(3, 64), torch.randn(10)
    out = llmkernels.quant_matmul(x, qw, wide[::2], backend=path)
    expected = quant_matmul_reference(x, scheme, qw.qdata, qw.scales, qw.zeros, qw.group_size,
                                      wide[::2].contiguous())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_opcheck(scheme):
    qw = llmkernels.quantize_weight(torch.randn(24, 64), scheme, 32)
    for requires_grad in (False, True):
        x = torch.randn(5, 64, requires_grad=requires_grad)
        torch.library.opcheck(quant_matmul_op, (x, qw.qdata, qw.scales, qw.zeros, torch.randn(24),
                                                SCHEME_CODES[scheme], qw.group_size, "cpu"))
    if llmkernels.backends.native_module() is not None:  # the CPU path's input gradient
        for dtype in (torch.float32, torch.bfloat16):
            torch.library.opcheck(torch.ops.llmkernels.quant_matmul_grad_x.default,
                                  (torch.randn(5, 24, dtype=dtype), qw.qdata, qw.scales, qw.zeros,
                                   SCHEME_CODES[scheme], qw.group_size, 64))


def test_compile_fullgraph_quantlinear():
    torch._dynamo.reset()
    layer = llmkernels.nn.QuantLinear.from_linear(torch.nn.Linear(64, 32), "int4", 32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 64)
    torch.testing.assert_close(compiled(x), layer(x))


def test_w8a8_beyond_int32_range_uses_the_reference():
    qw = llmkernels.quantize_weight(torch.randn(2, 140000), "w8a8")
    x = torch.randn(1, 140000)
    d = llmkernels.explain(llmkernels.quant_matmul, x, qw)
    assert d.backend == "reference" and "int32" in str(d)


def test_quantized_weight_save_load():
    qw = llmkernels.quantize_weight(torch.randn(16, 64, dtype=torch.bfloat16), "int4", 32)
    buf = io.BytesIO()
    torch.save(qw, buf)
    buf.seek(0)
    back = torch.load(buf)  # weights_only=True by default in recent torch
    assert back.scheme == "int4" and back.dtype == torch.bfloat16 and back.shape == (16, 64)
    torch.testing.assert_close(back.dequantize(), qw.dequantize())


def _model():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(),
                               torch.nn.Linear(128, 100), torch.nn.GELU(),
                               torch.nn.Linear(100, 10))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_report_and_state_dict_round_trip(scheme):
    torch.manual_seed(1)
    model = _model()
    report = llmkernels.quantize_(model, scheme, group_size=32)
    names = [n for n, _, _ in report.replaced]
    if scheme == "int4":  # 100 in-features is not a multiple of 32: kept in float, listed
        assert names == ["0", "2"] and report.skipped[0][0] == "4"
        assert isinstance(model[4], torch.nn.Linear)
    else:
        assert names == ["0", "2", "4"] and not report.skipped
    assert report.bytes_after < report.bytes_before
    assert "replaced" in str(report)
    x = torch.randn(7, 64)
    expected = model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = _model()
    llmkernels.quantize_(fresh, scheme, group_size=32)
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x), expected)


def test_state_dict_of_another_scheme_is_refused():
    a, b = _model(), _model()
    llmkernels.quantize_(a, "int8")
    llmkernels.quantize_(b, "w8a8")
    with pytest.raises(ValueError, match="quantize the model the same way"):
        b.load_state_dict(a.state_dict())


def test_quantize_skips_linear_subclasses_and_honours_filter():
    mha = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    report = llmkernels.quantize_(mha, "int8", filter_fn=lambda m, name: name != "linear2")
    replaced = [n for n, _, _ in report.replaced]
    assert replaced == ["linear1"]
    assert any(n == "self_attn.out_proj" for n, _ in report.skipped)
    out = mha(torch.randn(2, 5, 64))
    assert out.shape == (2, 5, 64)


def test_next_token_agreement_of_a_small_quantized_model():
    """A small random LM-like stack keeps (most of) its argmax predictions after quantize_."""
    torch.manual_seed(0)
    V, D = 512, 256
    emb = torch.nn.Embedding(V, D)
    blocks = [torch.nn.Sequential(torch.nn.LayerNorm(D), torch.nn.Linear(D, 4 * D),
                                  torch.nn.GELU(), torch.nn.Linear(4 * D, D)) for _ in range(3)]
    head = torch.nn.Linear(D, V)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.blocks, self.head = emb, torch.nn.ModuleList(blocks), head

        def forward(self, tokens):
            h = self.emb(tokens)
            for b in self.blocks:
                h = h + b(h)
            return self.head(h)

    tokens = torch.randint(0, V, (8, 64))
    model = LM()
    with torch.no_grad():
        ref = model(tokens).argmax(-1)
    agreement = {}
    for scheme, bound in (("int8", 0.97), ("w8a8", 0.95), ("int4", 0.80)):
        q = LM()
        q.load_state_dict(model.state_dict())
        llmkernels.quantize_(q, scheme, group_size=128)
        with torch.no_grad():
            agreement[scheme] = (q(tokens).argmax(-1) == ref).float().mean().item()
        assert agreement[scheme] >= bound, agreement


BAD = [
    (lambda qw: llmkernels.quant_matmul(torch.randint(0, 3, (2, 64)), qw), TypeError, "float32"),
    (lambda qw: llmkernels.quant_matmul(torch.randn(2, 63), qw), ValueError, "in_features=64"),
    (lambda qw: llmkernels.quant_matmul(torch.randn(2, 64), qw.qdata), TypeError, "QuantizedWeight"),
    (lambda qw: llmkernels.quant_matmul(torch.randn(2, 64), qw, torch.randn(5)), ValueError, "bias"),
    (lambda qw: llmkernels.quant_matmul(torch.randn(2, 64), qw, torch.randn(16).double()),
     TypeError, "bias dtype"),
    (lambda qw: llmkernels.quant_matmul(torch.randn(2, 64), llmkernels.QuantizedWeight(
        "int4", (16, 64), 32, qw.qdata[:, :10], qw.scales, qw.zeros, torch.float32)),
     ValueError, "qdata must have shape"),
    (lambda qw: llmkernels.quant_matmul(torch.randn(2, 64), llmkernels.QuantizedWeight(
        "int4", (16, 64), 32, qw.qdata.to(torch.int8), qw.scales, qw.zeros, torch.float32)),
     TypeError, "qdata must be torch.uint8"),
    (lambda qw: llmkernels.quantize_weight(torch.randn(16, 48), "int4", 32), ValueError,
     "multiple of group_size"),
    (lambda qw: llmkernels.quantize_weight(torch.randn(16, 64), "int4", 48), ValueError,
     "group_size"),
    (lambda qw: llmkernels.quantize_weight(torch.randn(16, 64), "int3"), ValueError, "scheme"),
    (lambda qw: llmkernels.quantize_weight(torch.randn(4, 16, 64), "int8"), ValueError, "2-D"),
    (lambda qw: llmkernels.quantize_weight(torch.randn(4, 0), "int8"), ValueError, "empty"),
    (lambda qw: llmkernels.quantize_(torch.nn.Linear(4, 4), "nf4"), ValueError, "scheme"),
    (lambda qw: llmkernels.quant_matmul(torch.randn(2, 64), qw, backend="cuda"),
     llmkernels.BackendError, "cuda"),
]


@pytest.mark.parametrize("call,err,match", BAD)
def test_bad_input(call, err, match):
    qw = llmkernels.quantize_weight(torch.randn(16, 64), "int4", 32)
    with pytest.raises(err, match=match):
        call(qw)


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
@pytest.mark.parametrize("M,K,N", [(1, 1024, 4096), (64, 512, 512)])
def test_cpu_result_does_not_depend_on_thread_count(scheme, M, K, N):
    """Shapes big enough to wake several pool threads (small calls run on one: see
    threads_for in csrc/common/thread_pool.h) give the one-thread result, bit for bit."""
    if llmkernels.backends.native_module() is None:
        pytest.skip("compiled extension not available")
    qw = llmkernels.quantize_weight(torch.randn(N, K), scheme, 128)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = llmkernels.quant_matmul(x, qw, backend="cpu")
        torch.set_num_threads(4)
        many = llmkernels.quant_matmul(x, qw, backend="cpu")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_validation_is_remembered_only_for_the_same_tensors():
    """QuantizedWeight.validate remembers its last pass by tensor identity: a replaced tensor
    of the wrong shape is still refused, and the memo is not saved with the weight."""
    qw = llmkernels.quantize_weight(torch.randn(16, 64), "int4", 32)
    x = torch.randn(2, 64)
    llmkernels.quant_matmul(x, qw)
    good = qw.scales
    qw.scales = torch.ones(16, 3)
    with pytest.raises(ValueError, match="scales must have shape"):
        llmkernels.quant_matmul(x, qw)
    qw.scales = good
    llmkernels.quant_matmul(x, qw)
    buf = io.BytesIO()
    torch.save(qw, buf)
    buf.seek(0)
    back = torch.load(buf)
    assert "_validated" not in back.__dict__
    torch.testing.assert_close(llmkernels.quant_matmul(x, back), llmkernels.quant_matmul(x, qw))


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_eager_calls_follow_the_weights_tensors(scheme):
    """Plain eager CPU calls reuse the kernel's views of the weight (_cpu_plan) only while
    they still describe its tensors: values changed in place, tensors replaced or swapped
    under the same object (`t.data = other`, same shape: another address, or strided), all give what the general path (backend="cpu": fresh
    views) gives on the weight as it is now; and the plan is never saved with the weight."""
    torch.manual_seed(3)
    qw = llmkernels.quantize_weight(torch.randn(48, 64), scheme, 32)
    x = torch.randn(3, 64).bfloat16()

    def check():
        with torch.no_grad():
            torch.testing.assert_close(llmkernels.quant_matmul(x, qw),
                                       llmkernels.quant_matmul(x, qw, backend="cpu"),
                                       rtol=0, atol=0)
    check()
    assert "_cpu_plan" in qw.__dict__
    other = llmkernels.quantize_weight(torch.randn(48, 64), scheme, 32)
    qw.qdata.copy_(other.qdata)  # in place: same tensors, same addresses
    check()
    qw.scales = other.scales.clone() * 2  # replaced
    check()
    third = llmkernels.quantize_weight(torch.randn(48, 64), scheme, 32)
    qw.qdata.data = third.qdata.clone()  # same object, another address
    check()
    qw.scales.data = torch.flip(third.scales, [0]).clone()
    check()
    if qw.zeros is not None:
        qw.zeros.data = torch.flip(third.zeros, [0]).clone()
        check()
    t = qw.qdata.data  # the same address and shape, strided (the general path takes it)
    qw.qdata.data = t.as_strided(t.shape, (1, t.shape[0]))
    check()
    plan = qw.__dict__.get("_cpu_plan")
    copied = copy.deepcopy(qw)
    back = io.BytesIO()
    torch.save(qw, back)
    back.seek(0)
    for q in (copied, torch.load(back)):
        assert "_cpu_plan" not in q.__dict__
        with torch.no_grad():
            torch.testing.assert_close(llmkernels.quant_matmul(x, q), llmkernels.quant_matmul(x, qw))
    state = dict(qw.__dict__, _cpu_plan=plan)
    crafted = llmkernels.QuantizedWeight.__new__(llmkernels.QuantizedWeight)
    crafted.__setstate__(state)
    assert "_cpu_plan" not in crafted.__dict__


def test_quantlinear_weight_says_how_to_get_one():
    """Code written for nn.Linear read .weight and got a bare AttributeError."""
    layer = llmkernels.nn.QuantLinear.from_linear(torch.nn.Linear(64, 8), "int4", 32)
    assert not hasattr(layer, "weight")
    with pytest.raises(AttributeError, match="dequantize"):
        layer.weight
    torch.compile(layer, fullgraph=True)(torch.randn(2, 64))


def test_quantlinear_follows_replaced_buffers_and_parameter_bias():
    """QuantLinear keeps one QuantizedWeight while its buffers stay the same tensors and builds
    a new one when they are replaced (.to, a new weight); a Parameter bias takes the direct path
    under no_grad and autograd otherwise, with the same result."""
    lin = torch.nn.Linear(64, 24)
    q = llmkernels.nn.QuantLinear.from_linear(lin, "int8")
    assert q.qweight is q.qweight
    x = torch.randn(3, 64)
    with torch.no_grad():
        fast = q(x)
    slow = q(x)
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach())
    (g,) = torch.autograd.grad(slow.sum(), q.bias)
    torch.testing.assert_close(g, torch.full((24,), 3.0))
    before = q.qweight
    q.set_weight(llmkernels.quantize_weight(2 * lin.weight.detach(), "int8"))
    assert q.qweight is not before
    with torch.no_grad():
        torch.testing.assert_close(q(x), F_linear_of(q, x))
    q.to(torch.float64)
    assert q.qweight.qdata is q.qdata


def F_linear_of(q, x):
    return torch.nn.functional.linear(x, q.qweight.dequantize().to(x.dtype), q.bias)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantlinear_cast_keeps_float32_scales(scheme):
    """model.to(torch.bfloat16) after quantize_: the bias and the layer's float dtype follow
    the cast, the scales stay float32 and exact, and bf16 activations run."""
    model = _model()
    llmkernels.quantize_(model, scheme, group_size=32)
    q = model[0]
    scales = q.scales.clone()
    model.to(torch.bfloat16)
    assert q.scales.dtype == torch.float32 and torch.equal(q.scales, scales)
    assert q.bias.dtype == torch.bfloat16 and q.weight_dtype == torch.bfloat16
    assert q.dequantize().dtype == torch.bfloat16
    out = model(torch.randn(3, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compiled", [False, True])
def test_autocast_casts_x_as_for_linear(dtype, compiled):
    """Under torch.autocast an nn.Linear gives the autocast dtype; its QuantLinear gave float32."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = llmkernels.nn.QuantLinear.from_linear(linear, "int8")
    run = torch.compile(layer, fullgraph=True, backend="aot_eager") if compiled else layer
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=dtype):
        expected_dtype = linear(x).dtype
        out = run(x)
    assert out.dtype == expected_dtype == dtype
    torch.testing.assert_close(out, layer(x.to(dtype)), rtol=0, atol=0)
    assert layer(x).dtype == torch.float32  # outside autocast, x's dtype


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64,), (3, 64), (2, 1, 64), (2, 3, 64)])
def test_eager_cpu_calls_skip_the_general_path(monkeypatch, scheme, dtype, shape):
    """Plain eager CPU calls (decoding) go to the kernel from _cpu_eager, with x and the output
    as (M, K) / (M, N) views: the same numbers as the general path, which every other call
    still takes."""
    qm = importlib.import_module("llmkernels.ops.quant_matmul")
    torch.manual_seed(0)
    qw = llmkernels.quantize_weight(torch.randn(40, 64), scheme, 32)
    x = torch.randn(shape, dtype=dtype)
    bias = torch.randn(40, dtype=dtype)
    expected = [llmkernels.quant_matmul(x, qw, b, backend="cpu") for b in (None, bias)]

    def general_path(*args):
        raise AssertionError("the general path ran")
    monkeypatch.setattr(qm, "_quant_matmul_kernel", general_path)
    for b, want in zip((None, bias), expected):
        with torch.no_grad():
            out = llmkernels.quant_matmul(x, qw, b)
        assert out.shape == (*shape[:-1], 40) and out.dtype == dtype
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(llmkernels.quant_matmul(x, qw, b), want, rtol=0, atol=0)
    layer = llmkernels.nn.QuantLinear(64, 40, True, scheme, 32, dtype=dtype)
    layer.set_weight(qw)
    with torch.no_grad():
        layer.bias.copy_(bias)
    torch.testing.assert_close(layer(x), expected[1], rtol=0, atol=0)  # (a Parameter bias)


def test_eager_cpu_fast_path_leaves_other_calls_to_the_general_path(monkeypatch):
    qm = importlib.import_module("llmkernels.ops.quant_matmul")
    torch.manual_seed(0)
    qw = llmkernels.quantize_weight(torch.randn(40, 64), "int8")
    x = torch.randn(3, 64)
    taken = []
    kernel = qm._quant_matmul_kernel
    monkeypatch.setattr(qm, "_quant_matmul_kernel", lambda *a: taken.append(1) or kernel(*a))
    strided = torch.randn(3, 128)[:, ::2]
    # autograd goes through the custom op (which holds the kernel function itself)
    assert llmkernels.quant_matmul(x.clone().requires_grad_(), qw).grad_fn is not None
    cases = {
        "strided x": lambda: llmkernels.quant_matmul(strided, qw),
        "negated x": lambda: llmkernels.quant_matmul(torch._neg_view(x), qw),
        "strided bias": lambda: llmkernels.quant_matmul(x, qw, torch.randn(80)[::2]),
        "forced": lambda: llmkernels.quant_matmul(x, qw, backend="cpu"),
        "empty": lambda: llmkernels.quant_matmul(torch.randn(0, 64), qw),
        "many rows": lambda: llmkernels.quant_matmul(torch.randn(600, 64), qw),
    }
    for name, call in cases.items():
        taken.clear()
        with torch.no_grad():
            out = call()
        assert taken, f"{name}: the fast path took a call it must leave"
        assert torch.isfinite(out).all()
    torch.testing.assert_close(llmkernels.quant_matmul(torch._neg_view(x), qw),
                               -llmkernels.quant_matmul(x, qw), rtol=0, atol=0)
    # under autocast the general path casts x (test_autocast_casts_x_as_for_linear)
    taken.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert llmkernels.quant_matmul(x, qw).dtype == torch.bfloat16
    assert taken
    # the general path's errors, unchanged
    with pytest.raises(ValueError, match="in_features=64"):
        llmkernels.quant_matmul(torch.randn(3, 65), qw)
    with pytest.raises(TypeError, match="bias dtype"):
        llmkernels.quant_matmul(x, qw, torch.randn(40, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        llmkernels.quant_matmul(x.double(), qw)


@pytest.mark.parametrize("backend", [None, "cpu", "reference"])
def test_negated_views_of_bias_and_weight_are_read_as_their_values(backend):
    """bias.contiguous() kept a negated view's flag: the kernel read its memory, +bias."""
    torch.manual_seed(0)
    qw = llmkernels.quantize_weight(torch.randn(8, 64), "int8")
    x, b = torch.randn(2, 64), torch.randn(8)
    want = llmkernels.quant_matmul(x, qw, -b, backend=backend)
    torch.testing.assert_close(llmkernels.quant_matmul(x, qw, torch._neg_view(b), backend=backend),
                               want, rtol=0, atol=0)
    neg_scales = llmkernels.QuantizedWeight("int8", qw.shape, 0, qw.qdata,
                                            torch._neg_view(-qw.scales), None, qw.dtype)
    torch.testing.assert_close(llmkernels.quant_matmul(x, neg_scales, backend=backend),
                               llmkernels.quant_matmul(x, qw, backend=backend), rtol=0, atol=0)
