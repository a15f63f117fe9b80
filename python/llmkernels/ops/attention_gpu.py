"""The GPU attention paths (Triton: kernels/attention.py; CUDA: csrc/cuda/attention.cu) as torch
custom ops, with what each path supports.

Both paths take the same arguments: 4-D views q (B, Hq, Lq, D), k and v (Bk, Hk, Sk, D/Dv) and
the sequence metadata of kernels/attention.py (cu_seqlens_q/k for packed variable-length
batches, seqused_k for KV caches, diag_offset and bottom_right for the causal/window band).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import backends
from .._cuda_launch import device_guard, stream_handle
from .._cview import cview

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CUDA_DTYPES = (torch.float16, torch.bfloat16)
MAX_TRITON_HEAD_DIM = 256
MIN_TRITON_HEAD_DIM = 1


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on the CPU (how the tests check them)."""
    return backends.env("TRITON_INTERPRET", "0") == "1"


def triton_kernels():
    kernels, error = backends.triton_kernels_or_error("attention")
    if kernels is None:
        raise backends.BackendError(f"Triton attention is unavailable: {error}")
    return kernels


def triton_support(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """None if the Triton path can serve attention over these tensors, else why not."""
    error = backends.triton_unavailable("attention")
    if error is not None:
        return error
    if q.device.type != "cuda" and not triton_interpreting():
        return (f"tensors are on {q.device.type} (Triton runs on CUDA GPUs, or on the CPU under "
                "TRITON_INTERPRET=1)")
    if q.dtype not in TRITON_DTYPES:
        return f"{q.dtype} is not float16, bfloat16 or float32"
    big = max(q.shape[-1], v.shape[-1])
    if big > MAX_TRITON_HEAD_DIM:
        return f"head dim {big} > {MAX_TRITON_HEAD_DIM}"
    if v.shape[-1] == 0:
        return "value head dim 0 (an empty output)"
    return None


def cuda_support(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """None if the CUDA kernels can serve attention over these tensors, else why not."""
    native = backends.native_module()
    if native is None:
        return f"the compiled extension is not available ({backends.native_import_error()})"
    if not hasattr(native, "attention_forward_cuda"):
        return "this build has no CUDA kernels (nvcc was not found when it was built)"
    if q.device.type != "cuda":
        return f"tensors are on {q.device.type}"
    if q.dtype not in CUDA_DTYPES:
        return f"{q.dtype} is not float16 or bfloat16 (the Triton path takes float32)"
    if v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} != query head dim {q.shape[-1]}"
    if not native.attention_cuda_supports(cview(q)[1], q.shape[-1]):
        return f"head dim {q.shape[-1]} is not compiled (64 and 128 are; Triton takes the rest)"
    return None


def cuda_check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Optional[str]):
    """The CUDA path's support check for selection. Until the CUDA kernels are tuned they only
    serve when forced or when Triton cannot: on an H100 they ran at 0.07-0.11x SDPA and decode
    at 0.01-0.05x, against Triton's 0.7-0.8x (benchmarks/results/attention_gpu_h100.md)."""
    def check() -> Optional[str]:
        why = cuda_support(q, k, v)
        if why is None and backends.forced_backend(backend) != "cuda" \
                and triton_support(q, k, v) is None:
            return ("slower than the Triton kernels until tuned (0.1x SDPA on an H100); "
                    "backend='cuda' forces it")
        return why
    return check


# ---------------------------------------------------------------- custom ops

def _empty_in_layout(like: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """A new (B, H, L, E) tensor stored like `like`: token-major ((B, L, H, E) storage) when
    `like` is, so that results of packed or (batch, seq, heads, dim) inputs stay dense."""
    B, H, L, E = shape
    dtype = like.dtype if dtype is None else dtype
    if H > 1 and L > 1 and like.stride(1) < like.stride(2):
        return torch.empty((B, L, H, E), dtype=dtype, device=like.device).transpose(1, 2)
    return torch.empty((B, H, L, E), dtype=dtype, device=like.device)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _i32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.int32).contiguous()


@torch.library.custom_op("llmkernels::attention_forward_gpu", mutates_args=())
def attention_forward_gpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                          seqused_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                          scale: float, softcap: float, window_left: int, window_right: int,
                          diag_offset: int, bottom_right: bool,
                          impl: str, mask: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward on the GPU (impl "triton" or "cuda"); returns (out, lse float32). mask: an
    attn_mask view (B, Hq, Lq, Sk), bool or float (Triton only, not with varlen)."""
    B, Hq, Lq, _ = q.shape
    out = _empty_in_layout(q, (B, Hq, Lq, v.shape[-1]))
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    cu_q, cu_k, used = _i32(cu_seqlens_q), _i32(cu_seqlens_k), _i32(seqused_k)
    with device_guard(q.device):
        _launch_forward(impl, q, k, v, out, lse, cu_q, cu_k, used, max_seqlen_q, max_seqlen_k, scale,
                 softcap, window_left, window_right, diag_offset, bottom_right, mask)
    return out, lse


def _launch_forward(impl, q, k, v, out, lse, cu_q, cu_k, used, max_seqlen_q, max_seqlen_k, scale,
             softcap, window_left, window_right, diag_offset, bottom_right, mask) -> None:
    if impl == "cuda":
        _no_mask_on_cuda(mask)
        backends.native_module().attention_forward_cuda(
            cview(q), cview(k), cview(v), cview(out), cview(lse), cview(cu_q), cview(cu_k),
            cview(used), max_seqlen_q, scale, softcap, window_left, window_right, diag_offset,
            bottom_right, stream_handle(q.device))
    else:
        triton_kernels().forward(q, k, v, out, lse, cu_q, cu_k, used, max_seqlen_q, max_seqlen_k,
                                 scale, softcap, window_left, window_right, diag_offset,
                                 bottom_right, mask=mask)


def _no_mask_on_cuda(mask) -> None:
    if mask is not None:  # selection never sends one: a direct call of the op
        raise ValueError("attention on the CUDA path: attn_mask is not fused there (Triton's "
                         "kernels take it)")


@attention_forward_gpu.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, scale,
      softcap, window_left, window_right, diag_offset, bottom_right, impl, mask=None):
    B, Hq, Lq, _ = q.shape
    return (_empty_in_layout(q, (B, Hq, Lq, v.shape[-1])),
            q.new_empty((B, Hq, Lq), dtype=torch.float32))


@torch.library.custom_op("llmkernels::attention_backward_gpu", mutates_args=())
def attention_backward_gpu(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           cu_seqlens_q: Optional[torch.Tensor],
                           cu_seqlens_k: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor],
                           max_seqlen_q: int, max_seqlen_k: int, scale: float, softcap: float,
                           window_left: int, window_right: int, diag_offset: int,
                           bottom_right: bool, impl: str, mask: Optional[torch.Tensor] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward on the GPU; returns (dq, dk, dv) shaped like q, k, v."""
    dq = _empty_in_layout(q, q.shape)
    dk = _empty_in_layout(k, k.shape)
    dv = _empty_in_layout(v, v.shape)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q, k, v, out = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(out)
    grad_out = _unit_last(grad_out)
    cu_q, cu_k, used = _i32(cu_seqlens_q), _i32(cu_seqlens_k), _i32(seqused_k)
    with device_guard(q.device):
        _launch_backward(impl, grad_out, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, used, max_seqlen_q,
                  max_seqlen_k, scale, softcap, window_left, window_right, diag_offset,
                  bottom_right, mask)
    return dq, dk, dv


def _launch_backward(impl, grad_out, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, used, max_seqlen_q,
              max_seqlen_k, scale, softcap, window_left, window_right, diag_offset,
              bottom_right, mask) -> None:
    if impl == "cuda":
        _no_mask_on_cuda(mask)
        delta = torch.empty_like(lse)
        backends.native_module().attention_backward_cuda(
            cview(q), cview(k), cview(v), cview(out), cview(grad_out), cview(lse), cview(delta),
            cview(dq), cview(dk), cview(dv), cview(cu_q), cview(cu_k), cview(used),
            max_seqlen_q, max_seqlen_k, scale, softcap, window_left, window_right, diag_offset,
            bottom_right, stream_handle(q.device))
    else:
        triton_kernels().backward(q, k, v, out, grad_out, lse, dq, dk, dv, cu_q, cu_k, used,
                                  max_seqlen_q, max_seqlen_k, scale, softcap, window_left,
                                  window_right, diag_offset, bottom_right, mask=mask)


@attention_backward_gpu.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
      max_seqlen_k, scale, softcap, window_left, window_right, diag_offset, bottom_right, impl,
      mask=None):
    return (_empty_in_layout(q, q.shape), _empty_in_layout(k, k.shape),
            _empty_in_layout(v, v.shape))


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, used = inputs[:6]
    mask = inputs[15] if len(inputs) > 15 else None
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, used, mask)
    ctx.params = inputs[6:15]
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k, used, mask = ctx.saved_tensors
    dq, dk, dv = attention_backward_gpu(grad_out, q, k, v, out, lse, cu_q, cu_k, used,
                                        *ctx.params, mask)
    return (dq, dk, dv) + (None,) * 13


attention_forward_gpu.register_autograd(_backward, setup_context=_setup)


def run_forward(impl: str, q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
                max_seqlen_q: int, max_seqlen_k: int, scale: float, softcap: Optional[float],
                window_left: int, window_right: int, diag_offset: int = 0,
                bottom_right: bool = False, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The forward of one GPU path (differentiable through the custom ops); returns out."""
    out, _ = attention_forward_gpu(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                   int(max_seqlen_q), int(max_seqlen_k), float(scale),
                                   float(softcap or 0.0), int(window_left), int(window_right),
                                   int(diag_offset), bool(bottom_right), impl, mask)
    return out
