"""Pure-PyTorch reference paths: the specification every kernel is tested against."""
from .attention import (attention_kvcache_reference, attention_mask_tensor, attention_reference,
                        attention_varlen_reference)

__all__ = ["attention_reference", "attention_mask_tensor", "attention_varlen_reference",
           "attention_kvcache_reference"]
