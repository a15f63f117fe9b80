"""Drop-in layers that route through llmkernels' kernels."""
from .attention import MultiheadAttention, swap_attention

__all__ = ["MultiheadAttention", "swap_attention"]
