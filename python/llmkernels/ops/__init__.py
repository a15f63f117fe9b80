"""Public functional ops: validation, path selection, torch.library registration."""
from .attention import scaled_dot_product_attention

__all__ = ["scaled_dot_product_attention"]
