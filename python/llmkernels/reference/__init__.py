"""Pure-PyTorch reference paths: the specification every kernel is tested against."""
from .attention import attention_reference, attention_mask_tensor

__all__ = ["attention_reference", "attention_mask_tensor"]
