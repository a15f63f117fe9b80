"""Which GPU attention paths the tests can run here: Triton on a GPU, or in Triton's
interpreter on the CPU (conftest sets TRITON_INTERPRET=1 without a GPU); CUDA on a GPU only."""
import pytest
import torch

from llmkernels.ops import attention_gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def skip_unless_runs(path: str, q, k, v) -> None:
    why = (attention_gpu.cuda_support if path == "cuda" else attention_gpu.triton_support)(q, k, v)
    if why is not None:
        pytest.skip(f"{path}: {why}")


@pytest.fixture(params=["triton", "cuda"])
def gpu_path(request):
    if request.param == "cuda" and not ON_GPU:
        pytest.skip("CUDA kernels need a GPU")
    return request.param


@pytest.fixture
def force_splits():
    """Runs the flash-decoding split path even where the heuristic would not."""
    kernels = attention_gpu.triton_kernels()
    def set_splits(n):
        kernels.FORCE_SPLITS = n
    yield set_splits
    kernels.FORCE_SPLITS = None
