"""quant_matmul on the GPU paths (Triton; CUDA where a GPU exists) against the reference on the
same quantized weights. Without a GPU, Triton runs in its interpreter at small shapes."""
import importlib

import pytest
import torch

import llmkernels
from gpu_paths import DEVICE, ON_GPU, gpu_path  # noqa: F401
from test_quant_matmul import check_against_reference

SHAPES = [(1, 128, 48), (3, 100, 33), (17, 64, 1), (40, 192, 70)]
if ON_GPU:
    SHAPES += [(8, 4096, 4096), (9, 4096, 1000), (300, 1024, 515), (2, 8320, 64)]


def _skip_unsupported(path, x, qw):
    d = llmkernels.explain(llmkernels.quant_matmul, x, qw)
    why = d.rejected.get(path)
    try:
        llmkernels.explain(llmkernels.quant_matmul, x, qw, backend=path)
    except llmkernels.BackendError as exc:
        pytest.skip(f"{path}: {exc} ({why})")


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_paths_match_reference(gpu_path, scheme, M, K, N, dtype):
    group = 32 if K % 64 else 64
    if scheme == "int4" and K % group:
        K = (K // group + 1) * group
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    qw = llmkernels.quantize_weight(torch.randn(N, K, device=DEVICE), scheme, group)
    bias = torch.randn(N, dtype=dtype, device=DEVICE) if M % 2 else None
    _skip_unsupported(gpu_path, x, qw)
    out = llmkernels.quant_matmul(x, qw, bias, backend=gpu_path)
    check_against_reference(x, qw, bias, out, loose=4.0)


def test_noncontiguous_batched_input(gpu_path):
    big = torch.randn(2, 3, 400, dtype=torch.bfloat16, device=DEVICE)
    x = big[..., 10:138]
    for scheme in ("int8", "int4", "w8a8"):
        qw = llmkernels.quantize_weight(torch.randn(40, 128, device=DEVICE), scheme, 64)
        _skip_unsupported(gpu_path, x, qw)
        out = llmkernels.quant_matmul(x, qw, backend=gpu_path)
        assert out.shape == (2, 3, 40)
        check_against_reference(x, qw, None, out, loose=4.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_w8a8_non_finite_rows_give_non_finite_outputs(gpu_path, bad):
    """A NaN or infinity in a row of x: that row's outputs are non-finite (the reference's),
    the other rows' are not; never finite numbers made of the other values."""
    qw = llmkernels.quantize_weight(torch.randn(24, 128, device=DEVICE), "w8a8")
    x = torch.randn(3, 128, dtype=torch.bfloat16, device=DEVICE)
    x[1, 17] = bad
    _skip_unsupported(gpu_path, x, qw)
    out = llmkernels.quant_matmul(x, qw, backend=gpu_path)
    assert not torch.isfinite(out[1]).any()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_launches_go_to_the_current_stream():
    """The extension's CUDA kernels are queued on the caller's current stream (its handle read
    without building a Stream), and a side stream's work is ordered by it: a matmul on a side
    stream gives the same result as on the default one."""
    from llmkernels._cuda_launch import device_guard, stream_handle
    dev = torch.device("cuda", torch.cuda.current_device())
    assert stream_handle(dev) == torch.cuda.current_stream(dev).cuda_stream
    side = torch.cuda.Stream(dev)
    with torch.cuda.stream(side):
        assert stream_handle(dev) == side.cuda_stream
    with device_guard(dev):
        assert torch.cuda.current_device() == dev.index
    x = torch.randn(1, 512, dtype=torch.bfloat16, device=dev)
    qw = llmkernels.quantize_weight(torch.randn(256, 512, device=dev), "int4", 128)
    want = llmkernels.quant_matmul(x, qw, backend="cuda")
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        got = llmkernels.quant_matmul(x, qw, backend="cuda")
    torch.cuda.current_stream(dev).wait_stream(side)
    assert torch.equal(got, want)


@pytest.mark.parametrize("M", [1, 8, 9])
def test_cuda_check_limits_n_only_where_the_gemm_serves(M):
    """The CUDA GEMM (more than 8 rows) has N / 64 blocks in its grid's y, at most 65535; its
    GEMV (up to 8 rows, a 1-D grid) has no such limit. The selection check for CUDA tensors
    (faked here: no GPU needed) refuses exactly the GEMM's case, so automatic selection falls
    to Triton there instead of the C++ entry raising."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    qmo = importlib.import_module("llmkernels.ops.quant_matmul")  # the package exports the op
    from llmkernels.quantized_weight import QuantizedWeight
    N = qmo.CUDA_GEMM_MAX_N + 1
    qw = QuantizedWeight("int8", (N, 32), 0, torch.empty(N, 32, dtype=torch.int8, device="meta"),
                         torch.empty(N, device="meta"), None, torch.bfloat16)
    with FakeTensorMode():
        x = torch.empty(M, 32, dtype=torch.bfloat16, device="cuda")
        why = qmo._checks(x, qw, "cuda")["cuda"]()
    if why is not None and "no CUDA kernels" in why:
        pytest.skip(why)
    if M > 8:
        assert why is not None and "grid" in why, why
    else:
        assert why is None, why
