"""scaled_dot_product_attention: the drop-in for torch.nn.functional's, plus sliding windows
and softcapping. Validates input, picks a path (backends.py), and registers the fused CPU
kernel as torch custom ops (forward, backward) so torch.compile and opcheck see through it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch.autograd import forward_ad as _forward_ad

from .. import backends
from .._cview import cview
from .._transforms import functorch_active
from ..reference.attention import WINDOW_LIMIT, attention_reference
from . import attention_gpu
from .attention_dropout import draw_seed
from .workspace import workspace as _workspace

OP_NAME = "scaled_dot_product_attention"
MAX_CPU_HEAD_DIM = 256  # the fused CPU kernel's limit; larger heads use the reference path
INT32_MAX = 2**31 - 1  # varlen offsets, cache lengths and positions are int32 in the kernels
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- the CPU kernel as custom ops

def _residual_like(out: torch.Tensor, with_residual: bool) -> torch.Tensor:
    # Only 16-bit outputs lose enough in rounding for the backward to care.
    wanted = with_residual and out.dtype in (torch.bfloat16, torch.float16)
    return torch.empty_like(out) if wanted else out.new_empty((0,))


def _forward_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: Optional[torch.Tensor], scale: float, softcap: float,
                 window_left: int, window_right: int, diag_offset: int,
                 with_residual: bool, dropout_p: float = 0.0,
                 seed: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward on 4-D (B, H, L, E) views; returns (out, lse float32, residual).

    residual (with_residual and a 16-bit dtype; else empty): float32 out minus out, in out's
    dtype, so that the backward's rowsum(dO * O) sees O to ~16 bits, not bf16's 8.
    dropout_p > 0: attention dropout, its pattern set by seed (an int64 scalar tensor, see
    attention_dropout.keep_mask); lse stays that of the weights before dropout.
    """
    B, Hq, L, _ = q.shape
    out = q.new_empty((B, Hq, L, v.shape[-1]))
    lse = q.new_empty((B, Hq, L), dtype=torch.float32)
    residual = _residual_like(out, with_residual)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse, residual
    _forward_cpu_views((cview(q), cview(k), cview(v), cview(mask)), out, lse,
                       residual if residual.numel() else None, scale, softcap, window_left,
                       window_right, diag_offset, dropout=_dropout_args(dropout_p, seed))
    return out, lse, residual


def _dropout_args(dropout_p: float, seed: Optional[torch.Tensor]) -> Tuple[float, int]:
    if dropout_p == 0.0:
        return 0.0, 0
    if not 0.0 < dropout_p < 1.0:
        raise ValueError(f"{OP_NAME}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if seed is None:
        raise ValueError(f"{OP_NAME}: dropout needs a seed")
    return float(dropout_p), int(seed)


def _forward_cpu_views(views, out, lse, residual, scale: float, softcap: float,
                       window_left: int, window_right: int, diag_offset: int,
                       key_lens: Optional[Sequence[int]] = None,
                       dropout: Tuple[float, int] = (0.0, 0)) -> None:
    """_forward_cpu's kernel call on cviews of q, k, v and the mask (B, H, L, E), into out /
    lse / residual (fresh tensors of _forward_cpu's shapes; residual None: none wanted).
    key_lens (decode-shaped calls, native.attention_decode_shaped): keys each batch entry
    sees, from the first; its band ends where its keys do. dropout: (p, seed)."""
    native = backends.native_module()
    tier, threads = backends.cpu_tier_code(), backends.cpu_threads()
    nbytes = native.attention_forward_workspace_bytes(tier, *views, threads, dropout[0])
    ws = _workspace(nbytes)
    bad = native.attention_forward(tier, *views, cview(out), cview(lse), ws.data_ptr(), nbytes,
                                   scale, softcap, window_left, window_right, diag_offset, threads,
                                   cview(residual), key_lens, *dropout)
    if bad:
        raise ValueError(f"{OP_NAME}: {bad} output row(s) are NaN or Inf: query, key, value or "
                         "attn_mask holds NaN/Inf (or values too large for the dtype)")


attention_forward_cpu = torch.library.custom_op(
    "llmkernels::attention_forward_cpu", mutates_args=(), device_types="cpu")(_forward_cpu)


def _needs_dispatcher(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call must go through the custom op (autograd, torch.compile, tensor
    subclasses, torch function/dispatch modes) rather than straight to the kernel. The
    dispatcher costs ~25 us a call, as much as the whole kernel for one decoding token."""
    if torch.compiler.is_compiling():
        return True
    grad = torch.is_grad_enabled()
    present = []
    for t in tensors:  # one loop, no generators: this runs at every decoding call
        if t is None:
            continue
        # nn.Parameter (a layer's bias) behaves as a plain tensor here (its
        # __torch_function__ is the default one); other subclasses may override anything.
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return True
        if grad and t.requires_grad:
            return True
        present.append(t)
    if torch.overrides.has_torch_function(present):  # also true inside a TorchFunctionMode
        return True
    return _recorded()


try:  # imported once: an import statement in the function cost ~1 us a call
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover - be safe on other torch versions
    _get_current_dispatch_mode = None


def _dispatch_mode_active() -> bool:
    if _get_current_dispatch_mode is None:  # pragma: no cover
        return True
    return _get_current_dispatch_mode() is not None


def _recorded() -> bool:
    """Whether something records this call's ops: a dispatch mode (fake tensors, export,
    FlopCounter-style tools) or torch.jit.trace. Both see only what reaches the dispatcher:
    a kernel called straight from here, writing into a fresh tensor, was traced as that empty
    tensor (its replays returned uninitialized memory)."""
    # (torch.jit.is_tracing takes 3x as long; callers ask is_compiling first: dynamo cannot
    # trace this one)
    return torch._C._is_tracing() or _dispatch_mode_active()


@attention_forward_cpu.register_fake
def _(q, k, v, mask, scale, softcap, window_left, window_right, diag_offset, with_residual,
      dropout_p=0.0, seed=None):
    B, Hq, L, _ = q.shape
    out = q.new_empty((B, Hq, L, v.shape[-1]))
    return out, q.new_empty((B, Hq, L), dtype=torch.float32), _residual_like(out, with_residual)


@torch.library.custom_op("llmkernels::attention_backward_cpu", mutates_args=(), device_types="cpu")
def attention_backward_cpu(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, mask: Optional[torch.Tensor], out: torch.Tensor,
                           lse: torch.Tensor, out_residual: Optional[torch.Tensor], scale: float,
                           softcap: float, window_left: int, window_right: int,
                           diag_offset: int, dropout_p: float = 0.0,
                           seed: Optional[torch.Tensor] = None, mask_grad: bool = False
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward; returns (dq, dk, dv, dmask): dq, dk, dv shaped like q, k, v
    (contiguous); with mask_grad (a float mask), dmask float32 shaped like the 4-D mask
    (B, Hq, L, S), dense (the caller sums its broadcast dims); else an empty tensor."""
    native = backends.native_module()
    dq = torch.empty(q.shape, dtype=q.dtype)
    dk = torch.empty(k.shape, dtype=k.dtype)
    dv = torch.empty(v.shape, dtype=v.dtype)
    dmask = _dmask_like(mask, mask_grad)
    if dq.numel() + dk.numel() + dv.numel() == 0:
        return dq, dk, dv, dmask
    tier, threads = backends.cpu_tier_code(), backends.cpu_threads()
    views = (cview(q), cview(k), cview(v), cview(mask))
    nbytes = native.attention_backward_workspace_bytes(tier, *views, threads)
    ws = _workspace(nbytes)
    native.attention_backward(tier, *views, cview(grad_out), cview(out), cview(lse), cview(dq),
                              cview(dk), cview(dv), ws.data_ptr(), nbytes, scale, softcap,
                              window_left, window_right, diag_offset, threads,
                              cview(out_residual) if out_residual is not None else None,
                              *_dropout_args(dropout_p, seed),
                              cview(dmask) if dmask.numel() else None)
    return dq, dk, dv, dmask


def _dmask_like(mask: Optional[torch.Tensor], wanted: bool) -> torch.Tensor:
    """The float mask's gradient buffer, zeroed: the kernel writes only the pairs it visits."""
    if not wanted:
        return torch.empty((0,), dtype=torch.float32)
    if mask is None or mask.dtype == torch.bool:
        raise ValueError(f"{OP_NAME}: mask_grad needs a float attn_mask")
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)


@attention_backward_cpu.register_fake
def _(grad_out, q, k, v, mask, out, lse, out_residual, scale, softcap, window_left, window_right,
      diag_offset, dropout_p=0.0, seed=None, mask_grad=False):
    dmask = (mask.new_empty(mask.shape, dtype=torch.float32) if mask_grad and mask is not None
             else q.new_empty((0,), dtype=torch.float32))
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device), dmask)


def _forward_setup(ctx, inputs, output):
    q, k, v, mask, scale, softcap, wl, wr, off, _, dropout_p, seed = inputs
    out, lse, residual = output
    ctx.save_for_backward(q, k, v, mask, out, lse, residual, seed)
    ctx.params = (scale, softcap, wl, wr, off, dropout_p)
    ctx.mark_non_differentiable(lse, residual)


def _forward_backward(ctx, grad_out, grad_lse, grad_residual):
    q, k, v, mask, out, lse, residual, seed = ctx.saved_tensors
    residual = residual if residual.numel() else None
    mask_grad = bool(ctx.needs_input_grad[3]) and mask is not None and mask.dtype != torch.bool
    dq, dk, dv, dmask = attention_backward_cpu(grad_out, q, k, v, mask, out, lse, residual,
                                               *ctx.params, seed, mask_grad)
    dmask = dmask.to(mask.dtype) if mask_grad else None
    return dq, dk, dv, dmask, None, None, None, None, None, None, None, None


attention_forward_cpu.register_autograd(_forward_backward, setup_context=_forward_setup)


# ---------------------------------------------------------------- validation and shapes

@dataclass
class _Call:
    q: torch.Tensor           # original arguments (for the reference path)
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]
    batch: Tuple[int, ...]    # broadcast leading dims of the output (heads included)
    q4: torch.Tensor          # 4-D (B, Hq, L, E) views, broadcast, for the kernels
    k4: torch.Tensor
    v4: torch.Tensor
    mask4: Optional[torch.Tensor]
    scale: float
    softcap: Optional[float]
    window_left: int
    window_right: int
    dropout_p: float
    is_causal: bool
    enable_gqa: bool
    window_size: Optional[Tuple[Optional[int], Optional[int]]]


def _broadcast(*shapes) -> Tuple[int, ...]:
    # torch.broadcast_shapes costs ~15 us; equal shapes (the usual call) need none of it.
    if all(s == shapes[0] for s in shapes[1:]):
        return tuple(shapes[0])
    return tuple(torch.broadcast_shapes(*shapes))


def _expand(t: torch.Tensor, shape) -> torch.Tensor:
    # Only a real broadcast makes a view: views cost the custom op ~20 us more per call.
    return t if t.shape == shape else t.expand(shape)


def _to4d(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4:
        return t
    if t.dim() < 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))  # a view: only adds size-1 dims
    return t.flatten(0, t.dim() - 4)


def _check_tensor(name: str, t, op: str = OP_NAME, min_dim: int = 2) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, "
                        f"got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dims, got shape "
                         f"{tuple(t.shape)}")


def _window(window_size, is_causal: bool, op: str = OP_NAME) -> Tuple[int, int]:
    left = right = -1
    if window_size is not None:
        if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
            raise ValueError(f"{op}: window_size must be a (left, right) pair, got {window_size!r}")
        sides = []
        for side in window_size:
            if side is None:
                side = -1
            if isinstance(side, bool) or not isinstance(side, int) or side < -1:
                raise ValueError(f"{op}: window_size entries must be ints >= 0 "
                                 f"(or -1/None for unbounded), got {window_size!r}")
            sides.append(min(int(side), WINDOW_LIMIT))  # as the reference: no overflow
        left, right = sides
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _scale_softcap(scale, softcap, head_dim: int, op: str = OP_NAME):
    """(scale as float, defaulting to 1/sqrt(head_dim); softcap as float or None), validated."""
    # comparisons, not math.isfinite: under torch.compile a changing scale is a SymFloat
    # The kernels take both as float32 and multiply them by log2(e): a softcap under float32's
    # smallest normal became 0 there ("no softcap"), and one or a scale past ~2.4e38
    # overflowed (reported as NaN/Inf inputs).
    if scale is None:
        scale_f = 1.0 / math.sqrt(head_dim)
    else:
        scale_f = _number(scale, "scale", op)
        # NaN first, against infinities: dynamo compares a NaN SymFloat with those, and
        # raises its own error comparing it with any other number
        if not -math.inf < scale_f < math.inf or not -_FLOAT32_SAFE < scale_f < _FLOAT32_SAFE:
            raise ValueError(f"{op}: scale must be finite and within +-{_FLOAT32_SAFE:g} (the "
                             f"kernels compute in float32), got {scale!r}")
    if softcap is not None:
        softcap = _number(softcap, "softcap", op)
        if not 0.0 < softcap < math.inf or not _FLOAT32_TINY < softcap < _FLOAT32_SAFE:
            raise ValueError(f"{op}: softcap must be a positive number from {_FLOAT32_TINY:g} to "
                             f"{_FLOAT32_SAFE:g} (the kernels compute in float32), got "
                             f"{softcap!r}")
    return scale_f, softcap


_FLOAT32_SAFE = 1e38
_FLOAT32_TINY = 1.2e-38  # about float32's smallest normal number


def _number(value, name: str, op: str) -> float:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}") from None


def _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
             window_size, softcap) -> _Call:
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"{OP_NAME}: query, key and value must share a dtype, got "
                        f"{query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"{OP_NAME}: query, key and value must be on one device, got "
                         f"{query.device}, {key.device}, {value.device}")
    L, E = query.shape[-2:]
    S, Ek = key.shape[-2:]
    Sv = value.shape[-2]
    if Ek != E:
        raise ValueError(f"{OP_NAME}: key head dim {Ek} != query head dim {E}")
    if Sv != S:
        raise ValueError(f"{OP_NAME}: value sequence length {Sv} != key sequence length {S}")
    if E == 0:
        raise ValueError(f"{OP_NAME}: query head dim must be > 0")

    if enable_gqa:
        if query.dim() < 3 or key.dim() < 3 or value.dim() < 3:
            raise ValueError(f"{OP_NAME}: enable_gqa needs (..., heads, seq, head_dim) inputs")
        Hq, Hk, Hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if Hk != Hv:
            raise ValueError(f"{OP_NAME}: key has {Hk} heads but value has {Hv}")
        if Hk == 0 or Hq % Hk != 0:
            raise ValueError(f"{OP_NAME}: with enable_gqa, query heads ({Hq}) must be a multiple "
                             f"of key/value heads ({Hk})")
        try:
            outer = _broadcast(query.shape[:-3], key.shape[:-3], value.shape[:-3])
        except RuntimeError:
            raise ValueError(f"{OP_NAME}: batch dims of query {tuple(query.shape)}, key "
                             f"{tuple(key.shape)} and value {tuple(value.shape)} do not broadcast") from None
        batch = tuple(outer) + (Hq,)
        q_b = _expand(query, (*outer, Hq, L, E))
        k_b = _expand(key, (*outer, Hk, S, E))
        v_b = _expand(value, (*outer, Hk, S, value.shape[-1]))
    else:
        try:
            batch = _broadcast(query.shape[:-2], key.shape[:-2], value.shape[:-2])
        except RuntimeError:
            hint = (" (different head counts need enable_gqa=True)"
                    if query.dim() >= 3 and key.dim() >= 3 and query.shape[-3] != key.shape[-3] else "")
            raise ValueError(f"{OP_NAME}: batch dims of query {tuple(query.shape)}, key "
                             f"{tuple(key.shape)} and value {tuple(value.shape)} do not broadcast"
                             f"{hint}") from None
        q_b = _expand(query, (*batch, L, E))
        k_b = _expand(key, (*batch, S, E))
        v_b = _expand(value, (*batch, S, value.shape[-1]))

    mask4 = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"{OP_NAME}: attn_mask must be a torch.Tensor or None")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(f"{OP_NAME}: attn_mask must be bool or floating point, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"{OP_NAME}: attn_mask is on {attn_mask.device}, query on {query.device}")
        try:
            m = _expand(attn_mask, (*batch, L, S))
        except RuntimeError:
            raise ValueError(f"{OP_NAME}: attn_mask of shape {tuple(attn_mask.shape)} does not "
                             f"broadcast to {(*batch, L, S)}") from None
        mask4 = _to4d(m)

    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{OP_NAME}: dropout_p must be in [0, 1), got {dropout_p!r}")
    scale_f, softcap = _scale_softcap(scale, softcap, E)
    left, right = _window(window_size, bool(is_causal))
    return _Call(query, key, value, attn_mask, batch, _to4d(q_b), _to4d(k_b), _to4d(v_b), mask4,
                 scale_f, softcap, left, right, float(dropout_p), bool(is_causal), bool(enable_gqa),
                 window_size)


# ---------------------------------------------------------------- path selection

def cpu_kernel_support(q: torch.Tensor, head_dim: int, value_head_dim: int) -> Optional[str]:
    """None if the fused CPU kernel can take these inputs, else why not (every attention op)."""
    if backends.native_module() is None:
        return f"the compiled extension is not available ({backends.native_import_error()})"
    if q.device.type != "cpu":
        return f"tensors are on {q.device.type}"
    if q.dtype not in _KERNEL_DTYPES:
        return f"{q.dtype} is not a kernel dtype (float32, bfloat16, float16)"
    if max(head_dim, value_head_dim) > MAX_CPU_HEAD_DIM:
        return f"head dim {max(head_dim, value_head_dim)} > {MAX_CPU_HEAD_DIM}"
    if min(head_dim, value_head_dim) == 0:
        return "a head dim of 0 (an empty output)"
    return None


def select_path(op: str, q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, cpu_check,
                backend: Optional[str], detail, others=()) -> backends.Decision:
    """The path for an attention op over 4-D views without masks or dropout (varlen,
    KV cache): the CPU kernel by cpu_check, the GPU paths by what they support. others: the
    call's other tensor inputs (new keys and values), looked at for dual tensors."""
    checks = {"cpu": cpu_check,
              "cuda": attention_gpu.cuda_check(q4, k4, v4, backend),
              "triton": lambda: attention_gpu.triton_support(q4, k4, v4)}
    return backends.select(op, q4.device.type, checks, backend, detail,
                           kernels_blocked(q4, k4, v4, *others))


def _cpu_support(call: _Call):
    def check() -> Optional[str]:
        why = cpu_kernel_support(call.q, call.q.shape[-1], call.v.shape[-1])
        if why is not None:
            return why
        return _mask_support(call.mask, grad_fused=True)
    return check


def _mask_support(mask: Optional[torch.Tensor], grad_fused: bool = False) -> Optional[str]:
    if mask is None:
        return None
    if mask.dtype not in (torch.bool,) + _KERNEL_DTYPES:
        return f"attn_mask dtype {mask.dtype} is not bool, float32, bfloat16 or float16"
    if mask.requires_grad and torch.is_grad_enabled() and not grad_fused:
        return ("the gradient with respect to attn_mask is computed by the CPU kernel and the "
                "reference path only")
    return None


def _gpu_support(call: _Call, path: str, backend: Optional[str]):
    def check() -> Optional[str]:
        if call.dropout_p > 0.0:
            return "dropout is fused on the CPU only; the reference path applies it"
        if call.mask is not None:
            if path == "cuda":
                return ("attn_mask is not fused on the CUDA path (Triton's kernels take it; "
                        "is_causal / window_size are fused on both)")
            why = _mask_support(call.mask)
            if why is not None:
                return why
        if path == "cuda":
            return attention_gpu.cuda_check(call.q4, call.k4, call.v4, backend)()
        return attention_gpu.triton_support(call.q4, call.k4, call.v4)
    return check


def _decide(call: _Call, backend: Optional[str]) -> backends.Decision:
    checks = {"cpu": _cpu_support(call), "cuda": _gpu_support(call, "cuda", backend),
              "triton": _gpu_support(call, "triton", backend)}
    detail = {"cuda": "CUDA kernels (tensor cores, csrc/cuda/attention.cu)",
              "triton": "Triton kernels (kernels/attention.py)"}
    if backends.native_module() is not None:
        detail["cpu"] = f"fused C++ kernel, CPU tier {backends.cpu_tier_label()}"
        if call.dropout_p > 0.0:
            detail["cpu"] += (" (dropout fused: its pattern is a hash of a seed drawn from "
                              "torch's generator, not the reference path's F.dropout)")
    return backends.select(OP_NAME, call.q.device.type, checks, backend, detail,
                           kernels_blocked(call.q, call.k, call.v, call.mask))


def _serving_path(call: _Call, backend: Optional[str]) -> str:
    """The path for a call; the usual automatic CPU choice without building an explanation."""
    if (backend is None and call.q.device.type == "cpu" and backends.forced_backend() is None
            and _cpu_support(call)() is None
            and kernels_blocked(call.q, call.k, call.v, call.mask) is None):
        return "cpu"
    return _decide(call, backend).backend


@contextlib.contextmanager
def errors_named(op: str):
    """Within the block, the shared kernels' errors (which name scaled_dot_product_attention)
    name op instead: attention_varlen and attention_with_kvcache run them."""
    try:
        yield
    except ValueError as exc:
        text = str(exc)
        if not text.startswith(OP_NAME + ":"):
            raise
        raise ValueError(op + text[len(OP_NAME):]) from None


def _reference(call: _Call) -> torch.Tensor:
    out = attention_reference(call.q, call.k, call.v, call.mask, call.dropout_p, call.is_causal,
                              call.scale, call.enable_gqa, window_size=call.window_size,
                              softcap=call.softcap)
    # (under vmap a value cannot steer Python: NaN outputs stay NaN there, as torch's)
    if (not torch.compiler.is_compiling() and not out.is_meta and not functorch_active()
            and not torch.isfinite(out).all()):
        raise ValueError(f"{OP_NAME}: the output holds NaN or Inf: query, key, value or attn_mask "
                         "holds NaN/Inf (or values too large for the dtype)")
    return out


def cpu_forward(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor,
                mask4: Optional[torch.Tensor], scale: float, softcap: Optional[float],
                window_left: int, window_right: int, diag_offset: int = 0,
                dropout_p: float = 0.0) -> torch.Tensor:
    """The fused CPU kernel on 4-D views, differentiable; plain calls skip the dispatcher."""
    args = (q4, k4, v4, mask4)
    # (a learned mask's gradient needs the residual too: its rowsum(dO * O) term)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    fn = attention_forward_cpu if _needs_dispatcher(*args) else _forward_cpu
    if dropout_p > 0.0:
        out, _, _ = fn(*args, scale, softcap or 0.0, window_left, window_right, diag_offset, grad,
                       dropout_p, draw_seed())
    else:
        out, _, _ = fn(*args, scale, softcap or 0.0, window_left, window_right, diag_offset, grad)
    return out


def _cpu(call: _Call) -> torch.Tensor:
    out = cpu_forward(call.q4, call.k4, call.v4, call.mask4, call.scale, call.softcap,
                      call.window_left, call.window_right, dropout_p=call.dropout_p)
    return out.reshape(*call.batch, out.shape[-2], out.shape[-1])


def _gpu(call: _Call, path: str) -> torch.Tensor:
    L, S = call.q4.shape[-2], call.k4.shape[-2]
    out = attention_gpu.run_forward(path, call.q4, call.k4, call.v4, max_seqlen_q=L,
                                    max_seqlen_k=S, scale=call.scale, softcap=call.softcap,
                                    window_left=call.window_left,
                                    window_right=call.window_right, mask=call.mask4)
    return out.reshape(*call.batch, L, out.shape[-1])


def host_ints(t: torch.Tensor, name: str, op: str) -> list:
    """A tensor's values read on the host (sequence lengths): a clear error under vmap, where
    a batched tensor has none to read."""
    if functorch_active() and torch._C._functorch.is_batchedtensor(t):
        raise ValueError(f"{op}: {name} is read on the host and cannot be vmapped over (pass "
                         "it unbatched, or call the op once per batch element)")
    return [int(x) for x in t.tolist()]


def kernels_blocked(*tensors) -> Optional[str]:
    """Why no kernel path may serve a call with these inputs (the reference path, PyTorch's
    own ops, serves it), or None. The kernels have no rules for torch.func's transforms (vmap
    handed them a batched tensor without storage; grad met torch's "autograd.Function ...
    setup_context" error) nor a forward-mode one (the output of a dual tensor came back
    without its tangent)."""
    if functorch_active():
        return ("a torch.func transform (vmap, grad, jacrev, jvp, ...) is active: the kernels' "
                "custom ops have no rules for it")
    if _forward_ad._current_level < 0:  # no dual level entered: nothing to look at
        return None
    for t in tensors:
        if isinstance(t, torch.Tensor) and _forward_ad.unpack_dual(t).tangent is not None:
            return "forward-mode AD (a dual tensor): the kernels have no forward-mode rule"
    return None


def resolved(*tensors):
    """The tensors with a lazy negation applied (conj().imag of a complex tensor is such a
    view): the kernels read memory, which holds the values before it. (Compiled graphs hand
    the ops functionalized tensors: nothing to resolve there.)"""
    if torch.compiler.is_compiling():
        return tensors
    return tuple(t.resolve_neg() if isinstance(t, torch.Tensor) and t.is_neg() else t
                 for t in tensors)


def _autocast(query, key, value, attn_mask):
    """Under torch.autocast, SDPA's inputs as autocast gives them to torch's (SDPA is on its
    lower-precision list: float32 tensors, a float mask included, in the autocast dtype)."""
    kind = query.device.type if isinstance(query, torch.Tensor) else "cpu"
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        return query, key, value, attn_mask
    dt = torch.get_autocast_dtype(kind)
    cast = (lambda t: t.to(dt) if isinstance(t, torch.Tensor) and t.dtype == torch.float32
            else t)
    return cast(query), cast(key), cast(value), cast(attn_mask)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *,
                                 window_size: Optional[Sequence[Optional[int]]] = None,
                                 softcap: Optional[float] = None,
                                 backend: Optional[str] = None) -> torch.Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention.

    Same arguments, shapes (query (..., L, E), key (..., S, E), value (..., S, Ev)), result
    and autograd. Extras:
      window_size=(left, right): query i sees keys i-left .. i+right (None or -1: unbounded),
        the sliding-window attention of Mistral; combined with is_causal, right is 0.
      softcap: scores become softcap * tanh(scores / softcap) before masking (Gemma 2).
      backend: force "cpu", "cuda", "triton" or "reference" (see llmkernels.explain).
    is_causal aligns the diagonal top-left, as SDPA does: query i sees keys j <= i.
    Rows whose every key is masked give zeros, never NaN. NaN/Inf inputs raise ValueError.
    On the CPU kernel, dropout and a float mask's gradient are fused; its dropout pattern is
    drawn from torch's generator (ops.attention_dropout.keep_mask gives it), not F.dropout's.
    """
    query, key, value, attn_mask = _autocast(*resolved(query, key, value, attn_mask))
    call = _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                    window_size, softcap)
    path = _serving_path(call, backend)
    if path == "cpu":
        return _cpu(call)
    if path in ("cuda", "triton"):
        return _gpu(call, path)
    return _reference(call)


def _explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False, *, window_size=None, softcap=None, backend=None):
    call = _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                    window_size, softcap)
    return _decide(call, backend)


scaled_dot_product_attention.__llmk_explain__ = _explain
