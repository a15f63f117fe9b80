"""llmkernels: fused attention and quantized matmul kernels (optimizers next) for PyTorch.

    import llmkernels
    out = llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True)
    report = llmkernels.quantize_(model, "int4", group_size=128)   # nn.Linear -> QuantLinear
    report = llmkernels.patch(hf_model, quantize="int8")  # our attention + int8 linears
    print(llmkernels.explain(llmkernels.scaled_dot_product_attention, q, k, v))
    print(llmkernels.build_info())
"""
from ._version import __version__
from ._build_info import build_info
from .backends import BackendError, explain, use_backend, use_cpu_tier
from .ops import (attention_varlen, attention_with_kvcache, quant_matmul,
                  scaled_dot_product_attention)
from .ops.workspace import empty_cache
from .quantized_weight import QuantizedWeight, quantize_weight
from .quantize import QuantizeReport, quantize_
from .patching import PatchReport, patch, unpatch
from . import integrations, nn, optim

__all__ = [
    "__version__", "build_info", "explain", "use_backend", "use_cpu_tier", "BackendError",
    "scaled_dot_product_attention", "attention_varlen", "attention_with_kvcache", "empty_cache",
    "quant_matmul", "quantize_weight", "QuantizedWeight", "quantize_", "QuantizeReport", "nn",
    "optim", "patch", "unpatch", "PatchReport", "integrations",
]
