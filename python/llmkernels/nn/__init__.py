"""Drop-in layers that route through llmkernels' kernels."""
from .attention import MultiheadAttention, restore_attention, swap_attention
from .quant_linear import QuantLinear

__all__ = ["MultiheadAttention", "swap_attention", "restore_attention", "QuantLinear"]
