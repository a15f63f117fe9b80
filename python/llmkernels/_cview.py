"""Plain views of torch tensors for the torch-free extension (csrc/common/tensor_view.h)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# Must match llmk::DType in csrc/common/tensor_view.h.
DTYPE_CODES = {
    torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3,
    torch.bool: 4, torch.uint8: 5, torch.int8: 6, torch.int32: 7, torch.int64: 8,
}

View = Tuple[int, int, Tuple[int, ...], Tuple[int, ...]]


def cview(t: Optional[torch.Tensor]) -> Optional[View]:
    """(data_ptr, dtype code, sizes, strides) of a tensor, or None."""
    if t is None:
        return None
    # torch.Size is a tuple (the extension reads tuples, subclasses included); stride() is one.
    return (t.data_ptr(), DTYPE_CODES[t.dtype], t.shape, t.stride())
