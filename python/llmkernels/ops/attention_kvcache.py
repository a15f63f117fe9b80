"""attention_with_kvcache: decoding attention over per-sequence KV caches, with in-place append.

Layout (that of flash-attn's flash_attn_with_kvcache): q (B, Lq, Hq, D), k_cache (B, S, Hk, D),
v_cache (B, S, Hk, Dv), new keys/values (B, Lnew, Hk, D/Dv). Sequence b holds cache_seqlens[b]
tokens; k_new/v_new are written at positions cache_seqlens[b] .. + Lnew - 1 (in place), and its
queries attend to the first cache_seqlens[b] + Lnew keys. Bands align bottom-right: the last
query is the newest token and sees the last key, as decoding needs (is_causal=True for a chunk
of several new tokens).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import backends
from .._cview import DTYPE_CODES, cview
from ..reference.attention import attention_kvcache_reference
from . import attention_gpu
from .attention import (_KERNEL_DTYPES, INT32_MAX, MAX_CPU_HEAD_DIM, _check_tensor,
                        _forward_cpu, _forward_cpu_views, _needs_dispatcher, _recorded,
                        _scale_softcap, _window, cpu_forward, cpu_kernel_support, errors_named,
                        host_ints, kernels_blocked, resolved, select_path)

OP_NAME = "attention_with_kvcache"


def _check_seqlens(cache_seqlens, batch: int, device: torch.device) -> None:
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        return
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"{OP_NAME}: cache_seqlens must be an int or an int32 tensor of shape "
                        f"(batch,), got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{OP_NAME}: cache_seqlens must be int32 (or int64), got "
                        f"{cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"{OP_NAME}: cache_seqlens must have shape ({batch},), got "
                         f"{tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"{OP_NAME}: cache_seqlens is on {cache_seqlens.device}, the caches on "
                         f"{device}")


def _host_lengths(cache_seqlens, batch: int) -> List[int]:
    if isinstance(cache_seqlens, int):
        return [int(cache_seqlens)] * batch
    return host_ints(cache_seqlens, "cache_seqlens", OP_NAME)  # a device sync on the GPU


class _KVCall:
    def __init__(self, q, k_cache, v_cache, cache_seqlens, k_new, v_new, is_causal, scale,
                 window_size, softcap, check_lengths=True):
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
            _check_tensor(name, t, OP_NAME, 4)
            if t.dim() != 4:
                raise ValueError(f"{OP_NAME}: {name} must be (batch, seq, heads, head_dim), got "
                                 f"shape {tuple(t.shape)}")
        if not (q.dtype == k_cache.dtype == v_cache.dtype):
            raise TypeError(f"{OP_NAME}: q, k_cache and v_cache must share a dtype, got "
                            f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
        if not (q.device == k_cache.device == v_cache.device):
            raise ValueError(f"{OP_NAME}: q, k_cache and v_cache must be on one device")
        B, Lq, Hq, D = q.shape
        S, Hk = k_cache.shape[1], k_cache.shape[2]
        if k_cache.shape[0] != B or v_cache.shape[0] != B:
            raise ValueError(f"{OP_NAME}: caches have batch {k_cache.shape[0]}/{v_cache.shape[0]}, "
                             f"q has {B}")
        if k_cache.shape[3] != D:
            raise ValueError(f"{OP_NAME}: k_cache head dim {k_cache.shape[3]} != q head dim {D}")
        if v_cache.shape[1:3] != k_cache.shape[1:3]:
            raise ValueError(f"{OP_NAME}: v_cache (seq, heads) {tuple(v_cache.shape[1:3])} != "
                             f"k_cache's {tuple(k_cache.shape[1:3])}")
        if Hk == 0 or Hq % Hk != 0:
            raise ValueError(f"{OP_NAME}: q heads ({Hq}) must be a multiple of cache heads ({Hk})")
        if D == 0:
            raise ValueError(f"{OP_NAME}: head dim must be > 0")
        if S > INT32_MAX:  # lengths and append positions are int32 on the kernels' side
            raise ValueError(f"{OP_NAME}: the caches hold {S} slots per sequence; at most "
                             f"{INT32_MAX} are supported")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache, k_new,
                                                                     v_new) if t is not None):
            raise ValueError(f"{OP_NAME}: is for inference and has no backward; call it under "
                             "torch.no_grad() (use attention_varlen or scaled_dot_product_attention "
                             "to train)")
        n_new = 0
        if (k_new is None) != (v_new is None):
            raise ValueError(f"{OP_NAME}: give both k_new and v_new, or neither")
        if k_new is not None:
            for name, t, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
                _check_tensor(name, t, OP_NAME, 4)
                if t.dim() != 4 or t.shape[0] != B or t.shape[2:] != cache.shape[2:]:
                    raise ValueError(f"{OP_NAME}: {name} must be (batch={B}, new_tokens, "
                                     f"{cache.shape[2]}, {cache.shape[3]}), got {tuple(t.shape)}")
                if t.dtype != cache.dtype or t.device != cache.device:
                    raise TypeError(f"{OP_NAME}: {name} must match the cache's dtype and device")
            if k_new.shape[1] != v_new.shape[1]:
                raise ValueError(f"{OP_NAME}: k_new has {k_new.shape[1]} tokens, v_new "
                                 f"{v_new.shape[1]}")
            n_new = k_new.shape[1]
        _check_seqlens(cache_seqlens, B, q.device)
        self.cache_seqlens = cache_seqlens
        self.cached = None  # host copies of the lengths, when read
        self.n_new, self.slots, self.batch = n_new, S, B
        if check_lengths:
            self._read_lengths()
        self.scale, self.softcap = _scale_softcap(scale, softcap, D, OP_NAME)
        self.left, self.right = _window(window_size, bool(is_causal), OP_NAME)
        self.q, self.k_cache, self.v_cache = q, k_cache, v_cache
        self.k_new, self.v_new, self.n_new = k_new, v_new, n_new
        self.is_causal, self.window_size = bool(is_causal), window_size
        # (B, H, seq, D) views for the kernels.
        self.q4, self.k4, self.v4 = (t.transpose(1, 2) for t in (q, k_cache, v_cache))

    def _read_lengths(self) -> None:
        cached = _host_lengths(self.cache_seqlens, self.batch)
        for b, n in enumerate(cached):
            if n < 0 or n + self.n_new > self.slots:
                raise ValueError(f"{OP_NAME}: sequence {b} holds {n} cached tokens; with "
                                 f"{self.n_new} new ones that is outside the cache's "
                                 f"{self.slots} slots")
        self.cached = cached

    @property
    def lengths(self) -> List[int]:
        """Keys per sequence after the append (read from the device if not yet known)."""
        if self.cached is None:
            self._read_lengths()
        return [n + self.n_new for n in self.cached]

    def _device_lengths(self) -> torch.Tensor:
        B, dev = self.q.shape[0], self.q.device
        if self.cached is not None:
            return torch.tensor(self.cached, dtype=torch.int32).to(dev, non_blocking=True)
        if isinstance(self.cache_seqlens, int):
            return torch.full((B,), self.cache_seqlens, dtype=torch.int32, device=dev)
        return self.cache_seqlens.to(torch.int32)

    def append(self) -> None:
        if self.n_new == 0:
            return
        if self.cached and min(self.cached) == max(self.cached):
            # One length for every sequence (batch 1, or a batch generating in step): two slice
            # copies, where the indexed writes below cost ~8x their host time (batch 1, Zen 3:
            # 47-91 us against 6-10).
            n = self.cached[0]
            self.k_cache[:, n:n + self.n_new] = self.k_new
            self.v_cache[:, n:n + self.n_new] = self.v_new
            return
        B = self.q.shape[0]
        dev = self.q.device
        pos = (self._device_lengths().long()[:, None]
               + torch.arange(self.n_new, device=dev)[None, :])
        if self.cached is None:  # unchecked lengths: stay inside the cache whatever they are
            pos = pos.clamp(0, self.k_cache.shape[1] - 1)
        rows = torch.arange(B, device=dev)[:, None].expand_as(pos)
        self.k_cache[rows, pos] = self.k_new
        self.v_cache[rows, pos] = self.v_new

    def decide(self, backend: Optional[str]) -> backends.Decision:
        def cpu() -> Optional[str]:
            return cpu_kernel_support(self.q, self.q.shape[3], self.v_cache.shape[3])
        detail = {"cpu": "fused C++ kernel (decode-shaped calls stream the cache once, every "
                         "sequence in one call; longer query chunks: one call a sequence)",
                  "cuda": "CUDA kernels over per-sequence cache lengths",
                  "triton": "Triton kernels; few-token queries split the keys (flash-decoding)",
                  "reference": "PyTorch ops, one sequence at a time"}
        return select_path(OP_NAME, self.q4, self.k4, self.v4, cpu, backend, detail,
                           (self.k_new, self.v_new))

    def run_cpu(self) -> torch.Tensor:
        B, Lq, Hq, _ = self.q.shape
        lengths = self.lengths
        if len(set(lengths)) <= 1:  # one call when every sequence has the same length
            n = lengths[0] if lengths else 0
            out = cpu_forward(self.q4, self.k4[:, :, :n], self.v4[:, :, :n], None, self.scale,
                              self.softcap, self.left, self.right, n - Lq)
            return out.transpose(1, 2)
        n = max(lengths)
        q4, k4, v4 = self.q4, self.k4[:, :, :n], self.v4[:, :, :n]
        if (backends.native_module().attention_decode_shaped(Lq, Hq // self.k_cache.shape[2])
                and not _needs_dispatcher(q4, k4, v4)):
            # Ragged lengths in one call: the kernel stops each sequence at its own length.
            out = q4.new_empty((B, Hq, Lq, self.v_cache.shape[3]))
            lse = q4.new_empty((B, Hq, Lq), dtype=torch.float32)
            _forward_cpu_views((cview(q4), cview(k4), cview(v4), None), out, lse, None,
                               self.scale, self.softcap or 0.0, self.left, self.right, n - Lq,
                               lengths)
            return out.transpose(1, 2)
        # Many queries a head (a chunk of a prompt), or a call torch must see op by op: one
        # call a sequence.
        out = self.q.new_empty((*self.q.shape[:3], self.v_cache.shape[3]))
        for b, n in enumerate(lengths):
            ob = cpu_forward(self.q4[b:b + 1], self.k4[b:b + 1, :, :n], self.v4[b:b + 1, :, :n],
                             None, self.scale, self.softcap, self.left, self.right, n - Lq)
            out[b] = ob[0].transpose(0, 1)
        return out

    def run_gpu(self, path: str) -> torch.Tensor:
        # Unchecked lengths are clamped to [0, cache size] by the kernels (memory safety).
        used = self._device_lengths() + self.n_new
        max_k = self.k_cache.shape[1] if self.cached is None else max(self.lengths, default=0)
        out = attention_gpu.run_forward(path, self.q4, self.k4, self.v4, seqused_k=used,
                                        max_seqlen_q=self.q.shape[1], max_seqlen_k=max_k,
                                        scale=self.scale, softcap=self.softcap,
                                        window_left=self.left, window_right=self.right,
                                        bottom_right=True)
        return out.transpose(1, 2)

    def run_reference(self) -> torch.Tensor:
        return attention_kvcache_reference(self.q, self.k_cache, self.v_cache, self.lengths,
                                           is_causal=self.is_causal, scale=self.scale,
                                           window_size=self.window_size, softcap=self.softcap)


def attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cache_seqlens, *, k_new: Optional[torch.Tensor] = None,
                           v_new: Optional[torch.Tensor] = None, is_causal: bool = False,
                           scale: Optional[float] = None,
                           window_size: Optional[Sequence[Optional[int]]] = None,
                           softcap: Optional[float] = None, check_lengths: bool = True,
                           backend: Optional[str] = None) -> torch.Tensor:
    """Attention of new tokens over each sequence's KV cache, for batched generation.

    q (B, Lq, Hq, D); k_cache (B, S, Hk, D) and v_cache (B, S, Hk, Dv), updated in place when
    k_new/v_new (B, Lnew, Hk, D/Dv) are given; cache_seqlens: int32 (B,) tokens already cached
    per sequence (or one int for all; not updated, add Lnew yourself). Returns (B, Lq, Hq, Dv).
    Bands (is_causal, window_size) align bottom-right. Inference only (no backward).

    check_lengths=True reads cache_seqlens to raise a clear error for lengths outside the
    cache: on a GPU that is a device sync per call. False skips it (no sync, so the call can
    be captured in a CUDA graph): the GPU kernels then clamp lengths into [0, cache size]
    and the append clamps positions, so bad lengths give wrong numbers, never bad memory
    accesses. The CPU and reference paths read the lengths anyway, so there bad lengths
    raise before the append whatever check_lengths says.
    """
    if (torch.compiler.is_compiling() and isinstance(cache_seqlens, torch.Tensor)
            and (check_lengths or not q.is_cuda)):
        return _kvcache_outside_graphs(q, k_cache, v_cache, cache_seqlens, k_new=k_new,
                                       v_new=v_new, is_causal=is_causal, scale=scale,
                                       window_size=window_size, softcap=softcap,
                                       check_lengths=check_lengths, backend=backend)
    if backend is None:
        out = _cpu_eager(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, window_size,
                         softcap, check_lengths)
        if out is not None:
            return out
    q, k_new, v_new = resolved(q, k_new, v_new)  # (the caches are written in place: as given)
    call = _KVCall(q, k_cache, v_cache, cache_seqlens, k_new, v_new, is_causal, scale,
                   window_size, softcap, check_lengths)
    path = call.decide(backend).backend  # chosen before the cache changes: errors leave it intact
    if path in ("cpu", "reference") and call.cached is None:
        call._read_lengths()  # they read them anyway: bad ones raise before the cache changes
    call.append()
    if path in ("cuda", "triton"):
        return call.run_gpu(path)
    with errors_named(OP_NAME):  # (the CPU and reference paths raise for NaN/Inf outputs)
        return call.run_cpu() if path == "cpu" else call.run_reference()


def _plain_cpu_call(tensors) -> bool:
    """Whether a call with these tensors may go to the CPU kernel straight from here: a plain
    eager CPU call, or False where the general path must take it (another device or path,
    autograd, torch.compile, torch.func transforms, forward-mode AD, tensor subclasses or
    modes, a negated view, a sparse layout, fewer or more than 4 dims)."""
    if torch.compiler.is_compiling() or backends.forced_backend() is not None:
        return False
    for t in tensors:
        if (type(t) is not torch.Tensor or not t.is_cpu or t.dim() != 4 or t.is_neg()
                or t.layout != torch.strided):
            return False
    if kernels_blocked(*tensors) is not None:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return not (torch.overrides.has_torch_function(tensors) or _recorded())


def _decode_shapes_ok(dtype, B, Hq, L, D, Hk, S, Dv) -> bool:
    """L query tokens of B sequences' Hq heads over S keys of Hk heads (head dims D, Dv): what
    the direct CPU calls take (one token, the kernel's dtypes and head dims)."""
    return not (L != 1 or dtype not in _KERNEL_DTYPES or Hk == 0 or Hq % Hk
                or min(D, Dv) == 0 or max(D, Dv) > MAX_CPU_HEAD_DIM or B * Hq == 0 or S == 0
                or S > INT32_MAX or backends.native_module() is None)


def decode_step_cpu(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, scale=None,
                    softcap=None) -> Optional[torch.Tensor]:
    """One query token of each (batch, head) over the whole of its cache, on the CPU kernel
    straight away: q4 (B, Hq, 1, D), k4 / v4 (B, Hk, S, D / Dv), as transformers' attention
    functions get them; returns (B, 1, Hq, Dv). What attention_with_kvcache(q4.transpose(1, 2),
    k4.transpose(1, 2), v4.transpose(1, 2), S, scale=scale, softcap=softcap) returns, or None
    where that call must be made (_plain_cpu_call, shapes or dtypes its checks look at; they
    raise there).

    In a 125M model's decoding loop (Zen 3; the model's Python between calls empties the
    caches) the call through attention_with_kvcache took ~154 us a layer, this one 89-95 us,
    of which the kernel ~20."""
    if not _plain_cpu_call((q4, k4, v4)):
        return None
    B, Hq, L, D = q4.shape
    Hk, S, Dv = k4.shape[1], k4.shape[2], v4.shape[3]
    if (not (q4.dtype == k4.dtype == v4.dtype) or k4.shape[0] != B or v4.shape[0] != B
            or k4.shape[3] != D or v4.shape[1] != Hk or v4.shape[2] != S
            or not _decode_shapes_ok(q4.dtype, B, Hq, L, D, Hk, S, Dv)):
        return None
    scale, softcap = _scale_softcap(scale, softcap, D, OP_NAME)
    with errors_named(OP_NAME):
        out, _, _ = _forward_cpu(q4, k4, v4, None, scale, softcap or 0.0, -1, -1, S - 1, False)
    return out.transpose(1, 2)


def _heads_first(t: torch.Tensor, seq: int):
    """The cview of t, a (B, S, H, E) tensor, as (B, H, seq, E) over its first seq positions:
    what the kernel reads, without the transpose and slice tensor views (~2.5 us each)."""
    size, stride = t.shape, t.stride()
    return (t.data_ptr(), DTYPE_CODES[t.dtype], (size[0], size[2], seq, size[3]),
            (stride[0], stride[2], stride[1], stride[3]))


def _cpu_eager(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, window_size, softcap,
               check_lengths) -> Optional[torch.Tensor]:
    """attention_with_kvcache's decoding step (one query token a sequence, no window) on the
    CPU kernel straight from here, after the append; None where the general path must take
    the call, the caches untouched (it raises there for what it refuses). The general path's
    checks and views cost ~70 us a call, three times the kernel's time over a small model's
    cache (B = 1, 12 / 4 heads of 64, 64 keys, Zen 3: 92 us against SDPA's 27)."""
    if window_size is not None or not check_lengths or (k_new is None) != (v_new is None):
        return None
    if not _plain_cpu_call((q, k_cache, v_cache) if k_new is None
                           else (q, k_cache, v_cache, k_new, v_new)):
        return None
    B, L, Hq, D = q.shape
    S, Hk, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    if (not (q.dtype == k_cache.dtype == v_cache.dtype) or k_cache.shape[0] != B
            or v_cache.shape[0] != B or k_cache.shape[3] != D or v_cache.shape[1] != S
            or v_cache.shape[2] != Hk or not _decode_shapes_ok(q.dtype, B, Hq, L, D, Hk, S, Dv)):
        return None
    n_new = 0
    if k_new is not None:
        n_new = k_new.shape[1]
        if (k_new.shape != (B, n_new, Hk, D) or v_new.shape != (B, n_new, Hk, Dv)
                or k_new.dtype != q.dtype or v_new.dtype != q.dtype):
            return None
    key_lens = None  # one length for all
    if type(cache_seqlens) is int:
        n = lo = cache_seqlens
    elif (type(cache_seqlens) is torch.Tensor and cache_seqlens.is_cpu
          and cache_seqlens.dtype in (torch.int32, torch.int64) and cache_seqlens.shape == (B,)
          and not cache_seqlens.is_neg() and cache_seqlens.layout == torch.strided):
        lengths = cache_seqlens.tolist()
        n, lo = max(lengths), min(lengths)
        if lo != n:  # ragged: the kernel stops each sequence at its own length
            if not backends.native_module().attention_decode_shaped(1, Hq // Hk):
                return None
            key_lens = [m + n_new for m in lengths]
    else:
        return None
    if lo < 0 or n + n_new > S or n + n_new == 0:
        return None
    scale, softcap = _scale_softcap(scale, softcap, D, OP_NAME)
    native = backends.native_module()
    if n_new:  # (in place, as the general path; one length or each its own)
        starts = [n] * B if key_lens is None else lengths
        native.kvcache_append(cview(k_cache), cview(k_new), starts)
        native.kvcache_append(cview(v_cache), cview(v_new), starts)
    n += n_new
    out = q.new_empty((B, Hq, 1, Dv))
    lse = q.new_empty((B, Hq, 1), dtype=torch.float32)
    views = (_heads_first(q, 1), _heads_first(k_cache, n), _heads_first(v_cache, n), None)
    with errors_named(OP_NAME):
        _forward_cpu_views(views, out, lse, None, scale, softcap or 0.0, -1, -1, n - 1, key_lens)
    return out.transpose(1, 2)


# A tensor of lengths is read on the host (checked; the CPU kernel needs them there): under
# torch.compile the call runs eagerly between graphs, and fullgraph=True says why. (Int
# lengths, or a GPU call with check_lengths=False, which reads nothing, trace as they are.)
_kvcache_outside_graphs = backends.outside_graphs(
    attention_with_kvcache, reason="attention_with_kvcache reads a cache_seqlens tensor on "
    "the host: it runs between graphs, not inside fullgraph=True (pass an int, or on a GPU "
    "check_lengths=False)")


def _explain(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None, is_causal=False,
             scale=None, window_size=None, softcap=None, check_lengths=True, backend=None):
    return _KVCall(q, k_cache, v_cache, cache_seqlens, k_new, v_new, is_causal, scale,
                   window_size, softcap, check_lengths).decide(backend)


attention_with_kvcache.__llmk_explain__ = _explain
