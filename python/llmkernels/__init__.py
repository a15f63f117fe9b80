"""llmkernels: fused attention (and, later, quantized matmul and optimizer) kernels for PyTorch.

    import llmkernels
    out = llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True)
    print(llmkernels.explain(llmkernels.scaled_dot_product_attention, q, k, v))
    print(llmkernels.build_info())
"""
from ._version import __version__
from ._build_info import build_info
from .backends import BackendError, explain, use_backend, use_cpu_tier
from .ops import attention_varlen, attention_with_kvcache, scaled_dot_product_attention
from .ops.attention import empty_cache
from . import nn

__all__ = [
    "__version__", "build_info", "explain", "use_backend", "use_cpu_tier", "BackendError",
    "scaled_dot_product_attention", "attention_varlen", "attention_with_kvcache", "empty_cache",
    "nn",
]
