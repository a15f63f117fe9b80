import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter (set before they are imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The amx tier runs on the tiles' software model where the CPU has no AMX (slow, but every
# tile product the kernels make is checked the same way); read when llmkernels loads.
os.environ.setdefault("LLMKERNELS_AMX_EMULATE", "1")

import llmkernels
from llmkernels import backends

# Every CPU tier this machine can run: each one is exercised, not only the best.
CPU_TIERS = backends.supported_cpu_tiers()
# Test modules whose kernels have amx-tier code of their own; elsewhere the amx tier runs
# the avx512_bf16 kernels, which their own parametrization tests.
AMX_KERNEL_MODULES = {"test_attention", "test_quant_matmul", "test_quant_matmul_many_rows"}


def pytest_generate_tests(metafunc):
    if "cpu_tier" in metafunc.fixturenames:
        module = metafunc.module.__name__.split(".")[-1]
        tiers = [t for t in CPU_TIERS if t != "amx" or module in AMX_KERNEL_MODULES]
        metafunc.parametrize("cpu_tier", tiers or ["none"], indirect=True)


@pytest.fixture
def cpu_tier(request):
    if request.param == "none":
        pytest.skip("compiled extension not available")
    with llmkernels.use_cpu_tier(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
