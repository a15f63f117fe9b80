import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter (set before they are imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import llmkernels
from llmkernels import backends

# Every CPU tier this machine can run: each one is exercised, not only the best.
CPU_TIERS = backends.supported_cpu_tiers()


@pytest.fixture(params=CPU_TIERS or ["none"])
def cpu_tier(request):
    if request.param == "none":
        pytest.skip("compiled extension not available")
    with llmkernels.use_cpu_tier(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
