import torch

import llmkernels
from llmkernels.reference import attention_reference


def test_cpu_kernel_matches_reference(cpu_tier):
    q, k, v = (torch.randn(2, 3, 37, 16) for _ in range(3))
    out = llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
    ref = attention_reference(q.double(), k.double(), v.double(), is_causal=True)
    assert (out.double() - ref).abs().max() < 1e-5
