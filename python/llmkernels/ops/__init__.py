"""Public functional ops: validation, path selection, torch.library registration."""
from .attention import scaled_dot_product_attention
from .attention_kvcache import attention_with_kvcache
from .attention_varlen import attention_varlen
from .quant_matmul import quant_matmul

__all__ = ["scaled_dot_product_attention", "attention_varlen", "attention_with_kvcache",
           "quant_matmul"]
