"""attention_varlen: attention over packed variable-length batches (padding-free training).

q (total_q, Hq, D), k (total_k, Hk, D), v (total_k, Hk, Dv): the sequences of a batch laid end
to end; sequence b owns rows cu_seqlens[b] .. cu_seqlens[b+1]-1. Hq may be a multiple of Hk
(grouped-query attention). Causal and window bands align top-left in each sequence, as SDPA's
is_causal does (identical to bottom-right when a sequence has as many queries as keys).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .. import backends
from ..reference.attention import attention_varlen_reference
from . import attention_gpu
from .attention import (INT32_MAX, _check_tensor, _scale_softcap, _window, cpu_forward,
                        cpu_kernel_support, errors_named, host_ints, resolved,
                        select_path)

OP_NAME = "attention_varlen"
def check_cu_seqlens(name: str, cu, total: int, device: torch.device,
                     op: str = OP_NAME) -> Tuple[torch.Tensor, List[int]]:
    """Validates cumulative sequence lengths; returns them as int32 and the lengths on the host.
    Reading them costs a device sync on the GPU: the price of a clear error instead of rows
    silently skipped or read out of bounds."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of int32, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {name} must be int32 (or int64), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{op}: {name} must be 1-D with (sequences + 1) entries, got shape "
                         f"{tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{op}: {name} is on {cu.device}, the tensors on {device}")
    if total > INT32_MAX:  # offsets are int32 (as flash-attention's): larger ones would wrap
        raise ValueError(f"{op}: the tensor {name} indexes has {total} rows; at most "
                         f"{INT32_MAX} are supported")
    host = host_ints(cu, name, op)
    if host[0] != 0:
        raise ValueError(f"{op}: {name} must start at 0, got {host[0]}")
    lengths = [b - a for a, b in zip(host[:-1], host[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{op}: {name} must be non-decreasing, got {host}")
    if host[-1] != total:
        raise ValueError(f"{op}: {name} ends at {host[-1]} but the packed tensor has {total} rows")
    return cu.to(torch.int32), lengths


def _check_max(name: str, given, lengths: Sequence[int], op: str = OP_NAME) -> int:
    if isinstance(given, bool) or not isinstance(given, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(given).__name__}")
    actual = max(lengths, default=0)
    if given < actual:
        raise ValueError(f"{op}: {name}={given} but a sequence has {actual} tokens")
    return int(given)


class _Varlen:
    def __init__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 is_causal, scale, window_size, softcap):
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_tensor(name, t, OP_NAME, 3)
            if t.dim() != 3:
                raise ValueError(f"{OP_NAME}: {name} must be (total_tokens, heads, head_dim), got "
                                 f"shape {tuple(t.shape)}")
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"{OP_NAME}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, "
                            f"{v.dtype}")
        if not (q.device == k.device == v.device):
            raise ValueError(f"{OP_NAME}: q, k and v must be on one device, got {q.device}, "
                             f"{k.device}, {v.device}")
        if k.shape[2] != q.shape[2]:
            raise ValueError(f"{OP_NAME}: k head dim {k.shape[2]} != q head dim {q.shape[2]}")
        if v.shape[:2] != k.shape[:2]:
            raise ValueError(f"{OP_NAME}: v (tokens, heads) {tuple(v.shape[:2])} != k's "
                             f"{tuple(k.shape[:2])}")
        Hq, Hk = q.shape[1], k.shape[1]
        if Hk == 0 or Hq % Hk != 0:
            raise ValueError(f"{OP_NAME}: q heads ({Hq}) must be a multiple of k/v heads ({Hk})")
        if q.shape[2] == 0:
            raise ValueError(f"{OP_NAME}: head dim must be > 0")
        self.cu_q, self.len_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
        self.cu_k, self.len_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
        if len(self.len_q) != len(self.len_k):
            raise ValueError(f"{OP_NAME}: cu_seqlens_q has {len(self.len_q) + 1} entries but "
                             f"cu_seqlens_k has {len(self.len_k) + 1}")
        self.max_q = _check_max("max_seqlen_q", max_seqlen_q, self.len_q)
        self.max_k = _check_max("max_seqlen_k", max_seqlen_k, self.len_k)
        self.scale, self.softcap = _scale_softcap(scale, softcap, q.shape[2], OP_NAME)
        self.left, self.right = _window(window_size, bool(is_causal), OP_NAME)
        self.q, self.k, self.v = q, k, v
        self.is_causal, self.window_size = bool(is_causal), window_size
        # (1, H, total, D) views: the packed layout the kernels read.
        self.q4, self.k4, self.v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))

    def decide(self, backend: Optional[str]) -> backends.Decision:
        def cpu() -> Optional[str]:
            return cpu_kernel_support(self.q, self.q.shape[2], self.v.shape[2])
        detail = {"cpu": "fused C++ kernel, one call per sequence",
                  "cuda": "CUDA kernels over the packed batch",
                  "triton": "Triton kernels over the packed batch",
                  "reference": "PyTorch ops, one sequence at a time"}
        return select_path(OP_NAME, self.q4, self.k4, self.v4, cpu, backend, detail)

    def run_cpu(self) -> torch.Tensor:
        outs = []
        cq, ck = 0, 0
        for lq, lk in zip(self.len_q, self.len_k):
            q4 = self.q4[:, :, cq:cq + lq]
            k4, v4 = self.k4[:, :, ck:ck + lk], self.v4[:, :, ck:ck + lk]
            out = cpu_forward(q4, k4, v4, None, self.scale, self.softcap, self.left, self.right)
            outs.append(out[0].transpose(0, 1))
            cq, ck = cq + lq, ck + lk
        if not outs:
            return self.q.new_empty((0, self.q.shape[1], self.v.shape[2]))
        return torch.cat(outs, dim=0)

    def run_gpu(self, path: str) -> torch.Tensor:
        out = attention_gpu.run_forward(path, self.q4, self.k4, self.v4, cu_seqlens_q=self.cu_q,
                                        cu_seqlens_k=self.cu_k, max_seqlen_q=self.max_q,
                                        max_seqlen_k=self.max_k, scale=self.scale,
                                        softcap=self.softcap, window_left=self.left,
                                        window_right=self.right)
        return out[0].transpose(0, 1)

    def run_reference(self) -> torch.Tensor:
        return attention_varlen_reference(self.q, self.k, self.v, self.cu_q, self.cu_k,
                                          is_causal=self.is_causal, scale=self.scale,
                                          window_size=self.window_size, softcap=self.softcap)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, *, is_causal: bool = False, scale: Optional[float] = None,
                     window_size: Optional[Sequence[Optional[int]]] = None,
                     softcap: Optional[float] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Attention over a packed batch of sequences of different lengths (no padding).

    q (total_q, Hq, D), k (total_k, Hk, D), v (total_k, Hk, Dv); cu_seqlens_q/k: int32
    (nseq + 1,) cumulative lengths starting at 0; max_seqlen_q/k: the longest sequence (at
    least). Returns (total_q, Hq, Dv). Differentiable. is_causal / window_size / softcap as in
    scaled_dot_product_attention, the band aligned top-left in each sequence.
    """
    if torch.compiler.is_compiling():
        return _varlen_outside_graphs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, is_causal=is_causal, scale=scale,
                                      window_size=window_size, softcap=softcap, backend=backend)
    q, k, v = resolved(q, k, v)
    call = _Varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
                   scale, window_size, softcap)
    path = call.decide(backend).backend
    if path in ("cuda", "triton"):
        return call.run_gpu(path)
    with errors_named(OP_NAME):  # (the CPU and reference paths raise for NaN/Inf outputs)
        return call.run_cpu() if path == "cpu" else call.run_reference()


# The sequence lengths are read from cu_seqlens on the host (to check them, and to cut the
# packed batch per sequence on the CPU): values a graph cannot hold (traced, a recompile with
# an empty sequence failed inside torch). Under torch.compile the call runs eagerly between
# graphs, and fullgraph=True says why.
_varlen_outside_graphs = backends.outside_graphs(
    attention_varlen, reason="attention_varlen reads cu_seqlens on the host (data-dependent "
    "sequence lengths): it runs between graphs, not inside fullgraph=True")


def _explain(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, is_causal=False,
             scale=None, window_size=None, softcap=None, backend=None):
    return _Varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
                   scale, window_size, softcap).decide(backend)


attention_varlen.__llmk_explain__ = _explain
