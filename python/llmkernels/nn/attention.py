"""MultiheadAttention: torch.nn.MultiheadAttention with its attention core on llmkernels' kernel.

The layer subclasses torch's, so the constructor, the parameters, the state_dict keys and
isinstance checks are unchanged; only the need_weights=False path is ours. `swap_attention`
converts an existing model in place.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _modules
from ..backends import Decision, explain
from .._modules import keep_submodule_calls, replace_layers
# Called through this module's global so tests (and users) can patch it in one place.
from ..ops import scaled_dot_product_attention

__all__ = ["MultiheadAttention", "swap_attention"]

_NAME = "MultiheadAttention"
# Layers pickled whole before the hook moved to _modules name it here.
_keep_submodule_calls = _modules._keep_submodule_calls


def _check_mask(name: str, mask: Optional[Tensor], shapes: Tuple[tuple, ...], device) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{_NAME}: {name} must be a torch.Tensor or None, "
                        f"got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{_NAME}: {name} must be bool or floating point, got {mask.dtype}")
    if tuple(mask.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{_NAME}: {name} has shape {tuple(mask.shape)}, expected {want}")
    if mask.device != device:
        raise ValueError(f"{_NAME}: {name} is on {mask.device}, query on {device}")


def _to_sdpa(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch's MHA mask (bool True = hidden, or additive float) in SDPA's convention
    (bool True = attend, or additive float). A float32 mask stays float32 with 16-bit
    queries, as torch's layer keeps it (rounded to bf16, -1e9 or float32's min became -inf and
    hid whole rows); other float dtypes are cast to the query's."""
    if mask.dtype == torch.bool:
        return ~mask
    return mask if mask.dtype in (dtype, torch.float32) else mask.to(dtype)


def _as_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An SDPA-convention mask as an additive float mask (bool keep -> 0 / -inf)."""
    if mask.dtype != torch.bool:
        return mask
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask, float("-inf"))


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for torch.nn.MultiheadAttention whose need_weights=False path runs
    llmkernels.scaled_dot_product_attention (the fused CPU kernel where it applies).

    Same constructor, parameters and state_dict keys as torch's layer, so checkpoints load
    either way and `isinstance(m, torch.nn.MultiheadAttention)` still holds.

    forward(..., need_weights=False) returns (attn_output, None), computed by our projections
    and kernel, with torch's semantics: torch's bool masks mean True = NOT allowed (we invert
    them for SDPA), float masks are added, key_padding_mask and attn_mask are merged (bool
    masks stay bool; if either is float, both become additive, in the query dtype),
    bias_k/bias_v and add_zero_attn append a key that every query may see, and dropout
    applies only in training mode. `is_causal=True` is a hint that attn_mask is the causal
    mask: as in torch, without a key_padding_mask the mask is then replaced by the kernel's
    causal flag; unlike torch, is_causal=True without any attn_mask is accepted (torch
    raises) and means the causal (L, S) mask, i.e. query i sees keys j <= i (plus any
    bias_k / zero-attention key).

    Differences from torch on that path: a query row whose every key is masked always gives
    zeros before the out projection (torch 2.13's CPU SDPA does too; its need_weights=True
    path and older releases give NaN); NaN/Inf in the attention result raise ValueError; the
    output is contiguous in the layout batch_first asks for (torch returns a transposed view
    for batch_first=True).

    forward(..., need_weights=True) is torch's own implementation (super().forward): the
    fused kernel never materializes the (L, S) attention weights, so when they are asked for
    torch computes them and the output. NestedTensor inputs also go to torch's implementation.

    The layer carries a no-op forward pre-hook. torch.nn.TransformerEncoderLayer, in eval
    mode without autograd, may run a fused C++ layer (torch._transformer_encoder_layer_fwd)
    that reads self_attn's weights and never calls self_attn.forward; it skips that shortcut
    when any of its submodules has forward (pre-)hooks, so the hook keeps our forward in use
    inside it (removing the hook brings torch's shortcut back). nn.TransformerEncoder's own
    NestedTensor packing (eval mode with src_key_padding_mask) does not look at hooks; see
    swap_attention, which turns it off.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False,
                 kdim: Optional[int] = None, vdim: Optional[int] = None,
                 batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias,
                         add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, kdim=kdim,
                         vdim=vdim, batch_first=batch_first, device=device, dtype=dtype)
        keep_submodule_calls(self)

    # ------------------------------------------------------------ conversion

    @classmethod
    def from_module(cls, m: torch.nn.MultiheadAttention) -> "MultiheadAttention":
        """A new layer with m's configuration, device, dtype, training flags, requires_grad
        flags and a copy of its parameters (no storage is shared: m stays usable and
        independent). Hooks registered on m are not carried over."""
        if not isinstance(m, torch.nn.MultiheadAttention):
            raise TypeError(f"{cls.__name__}.from_module expects a torch.nn.MultiheadAttention, "
                            f"got {type(m).__name__}")
        return _copy_layer(cls, m)

    def to_torch(self) -> torch.nn.MultiheadAttention:
        """The inverse of from_module: torch's layer with this one's configuration, flags and
        a copy of its parameters."""
        return _copy_layer(torch.nn.MultiheadAttention, self)

    # ------------------------------------------------------------ forward

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """Shapes and arguments as torch.nn.MultiheadAttention.forward.

        need_weights=True (torch's default) runs torch's implementation, since only it
        returns the weights; pass need_weights=False to use llmkernels' kernel.
        """
        if need_weights or any(isinstance(t, Tensor) and t.is_nested for t in (query, key, value)):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        return self._fused_forward(query, key, value, key_padding_mask, attn_mask,
                                   bool(is_causal)), None

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Validate shapes/dtypes with clear errors; returns whether the input is batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{_NAME}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"{_NAME}: {name} must be floating point, got {t.dtype}")
        if query.dim() not in (2, 3):
            raise ValueError(f"{_NAME}: query must be 2-D (L, E) unbatched or 3-D batched, got "
                             f"shape {tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"{_NAME}: query, key and value must have the same number of dims, "
                             f"got {query.dim()}, {key.dim()}, {value.dim()}")
        for name, t, want in (("query", query, self.embed_dim), ("key", key, self.kdim),
                              ("value", value, self.vdim)):
            if t.shape[-1] != want:
                raise ValueError(f"{_NAME}: {name} has embedding dim {t.shape[-1]}, expected "
                                 f"{want} (shape {tuple(t.shape)})")
        batched = query.dim() == 3
        seq, bat = (1, 0) if (batched and self.batch_first) else (0, 1)
        if batched and not query.shape[bat] == key.shape[bat] == value.shape[bat]:
            raise ValueError(f"{_NAME}: query, key and value batch sizes differ: "
                             f"{query.shape[bat]}, {key.shape[bat]}, {value.shape[bat]} "
                             f"(batch_first={self.batch_first})")
        if key.shape[seq] != value.shape[seq]:
            raise ValueError(f"{_NAME}: key has {key.shape[seq]} positions but value has "
                             f"{value.shape[seq]}")
        if not query.dtype == key.dtype == value.dtype:
            raise TypeError(f"{_NAME}: query, key and value must share a dtype, got "
                            f"{query.dtype}, {key.dtype}, {value.dtype}")
        w = self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight
        if query.dtype != w.dtype and not torch.is_autocast_enabled(query.device.type):
            raise TypeError(f"{_NAME}: inputs are {query.dtype} but the layer's weights are "
                            f"{w.dtype}; convert one of them (e.g. module.to({query.dtype}))")
        if not query.device == key.device == value.device:
            raise ValueError(f"{_NAME}: query, key and value must be on one device, got "
                             f"{query.device}, {key.device}, {value.device}")
        L, S = query.shape[seq], key.shape[seq]
        N = query.shape[bat] if batched else None
        _check_mask("key_padding_mask", key_padding_mask, ((N, S),) if batched else ((S,),),
                    query.device)
        heads = N * self.num_heads if batched else self.num_heads
        _check_mask("attn_mask", attn_mask, ((L, S), (heads, L, S)), query.device)
        return batched

    def _heads(self, x: Tensor, batched: bool) -> Tensor:
        """A projected (N, L, E) / (L, N, E) / (L, E) tensor as a (N, H, L, head_dim) view."""
        x = x.unflatten(-1, (self.num_heads, self.head_dim))
        if not batched:
            return x.permute(1, 0, 2).unsqueeze(0)
        return x.permute(0, 2, 1, 3) if self.batch_first else x.permute(1, 2, 0, 3)

    def _project(self, query: Tensor, key: Tensor, value: Tensor):
        """The q, k, v input projections (one matmul for self-attention with packed weights)."""
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if self._qkv_same_embed_dim:
            if query is key and key is value:
                return F.linear(query, self.in_proj_weight, b).chunk(3, dim=-1)
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _merged_mask(self, key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
                     batched: bool, N: int, L: int, S: int, extra: int,
                     dtype: torch.dtype) -> Optional[Tensor]:
        """Both torch-convention masks as one SDPA mask broadcastable to (N, H, L, S + extra);
        the `extra` appended keys (bias_k, zero attention) are visible to every query."""
        parts = []
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                m = attn_mask.view(1, 1, L, S)
            else:  # (N * H, L, S), or (H, L, S) unbatched
                m = attn_mask.view(-1, self.num_heads, L, S)
            parts.append(_to_sdpa(m, dtype))
        if key_padding_mask is not None:
            m = key_padding_mask.view(N if batched else 1, 1, 1, S)
            parts.append(_to_sdpa(m, dtype))
        if not parts:
            return None
        if len(parts) == 2:
            if all(p.dtype == torch.bool for p in parts):
                mask = parts[0] & parts[1]
            else:  # (a float32 part makes the sum float32)
                mask = _as_bias(parts[0], dtype) + _as_bias(parts[1], dtype)
        else:
            mask = parts[0]
        if extra:
            # True (attend) for bool, 0.0 for float: F.pad's value is cast to the dtype.
            mask = F.pad(mask, (0, extra), value=True if mask.dtype == torch.bool else 0.0)
        return mask

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule first: a clear error in place of
        # TorchScript's "'Tensor' object has no attribute or method 'forward'"
        raise RuntimeError("torch.jit.script: llmkernels.nn.MultiheadAttention cannot be "
                           "scripted (its forward calls llmkernels ops from Python); script "
                           "the model after llmkernels.unpatch(model), or use torch.compile "
                           "or torch.export")

    def _fused_forward(self, query: Tensor, key: Tensor, value: Tensor,
                       key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
                       is_causal: bool) -> Tensor:
        q, k, v, sdpa_kwargs, batched = self._attention_inputs(query, key, value,
                                                               key_padding_mask, attn_mask,
                                                               is_causal)
        N, _, L, _ = q.shape
        if sdpa_kwargs["dropout_p"] >= 1.0:  # torch's layer takes it: every weight dropped
            out = v.new_zeros((N, self.num_heads, L, v.shape[-1]))
        else:
            out = scaled_dot_product_attention(q, k, v, **sdpa_kwargs)
        # (N, H, L, D) -> the caller's layout, made contiguous once, before the out projection.
        if not batched:
            out = out[0].transpose(0, 1).reshape(L, self.embed_dim)
        elif self.batch_first:
            out = out.transpose(1, 2).reshape(N, L, self.embed_dim)
        else:
            out = out.permute(2, 0, 1, 3).reshape(L, N, self.embed_dim)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias)

    def _llmk_explain(self, query: Tensor, key: Tensor, value: Tensor,
                      key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                      attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                      is_causal: bool = False):
        """explain(layer, query, key, value, ...): the path forward would take (it runs the
        input projections to have the kernel's q, k, v)."""
        if need_weights or any(isinstance(t, Tensor) and t.is_nested for t in (query, key, value)):
            why = ("need_weights=True: only torch's implementation returns the weights (pass "
                   "need_weights=False)" if need_weights else "NestedTensor inputs")
            return Decision(_NAME, query.device.type, "torch", None,
                            {"llmkernels": why})
        with torch.no_grad():
            q, k, v, sdpa_kwargs, _ = self._attention_inputs(query, key, value,
                                                             key_padding_mask, attn_mask,
                                                             bool(is_causal))
        if sdpa_kwargs["dropout_p"] >= 1.0:
            return Decision(_NAME, query.device.type, "reference", None, {},
                            "dropout=1.0 in training: every weight is dropped, the attention "
                            "output is zeros (no kernel runs)")
        mask = sdpa_kwargs["attn_mask"]
        if (torch.is_grad_enabled() and mask is not None and mask.is_floating_point()
                and any(isinstance(m, Tensor) and m.requires_grad
                        for m in (attn_mask, key_padding_mask))):
            # forward's merged mask would require grad (made under no_grad here, it does not)
            sdpa_kwargs["attn_mask"] = mask.detach().requires_grad_()
        return explain(scaled_dot_product_attention, q, k, v, **sdpa_kwargs)

    def _attention_inputs(self, query: Tensor, key: Tensor, value: Tensor,
                          key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
                          is_causal: bool):
        """The kernel's (N, H, L, D) q, k, v and its keyword arguments, and whether the input
        is batched."""
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        q, k, v = (self._heads(t, batched) for t in self._project(query, key, value))
        N, H, L, D = q.shape
        S = k.shape[2]

        extra = 0
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.view(1, H, 1, D).expand(N, H, 1, D)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, H, 1, D).expand(N, H, 1, D)], dim=2)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, D)], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, D)], dim=2)
            extra += 1

        # is_causal hints that attn_mask is the causal mask. As in torch: with no padding mask
        # to merge, the kernel's causal flag replaces attn_mask (note: the flag then also hides
        # the appended bias_k / zero keys from queries i < S, torch's quirk); with one,
        # attn_mask itself is used. Without attn_mask (torch raises) it is taken as the causal
        # (L, S) mask over the real keys, the appended keys staying visible.
        use_causal = False
        if is_causal and attn_mask is None:
            if extra:
                attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu_(1)
            else:
                use_causal = True
        elif is_causal and key_padding_mask is None:
            use_causal, attn_mask = True, None
        mask = self._merged_mask(key_padding_mask, attn_mask, batched, N, L, S, extra, q.dtype)
        return q, k, v, dict(attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                             is_causal=use_causal), batched


def _is_torch_mha(m: torch.nn.Module) -> bool:
    # Exactly torch's class: subclasses (e.g. torch.ao.nn.quantizable.MultiheadAttention, or a
    # user's with its own forward) have other parameters or semantics that a swap would drop.
    return type(m) is torch.nn.MultiheadAttention


def _copy_layer(cls, m: torch.nn.MultiheadAttention):
    """A new cls layer with m's configuration, device, dtype, training flags, requires_grad
    flags and a copy of its parameters (no storage shared)."""
    ref = m.out_proj.weight
    # Built on the meta device: no throwaway initialization, no draw from the global RNG.
    new = cls(m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
              add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn,
              kdim=m.kdim, vdim=m.vdim, batch_first=m.batch_first,
              device="meta", dtype=ref.dtype)
    new = new.to_empty(device=ref.device)
    new.load_state_dict(m.state_dict(), strict=True)
    ours = dict(new.named_parameters())
    for name, p in m.named_parameters():
        ours[name].requires_grad_(p.requires_grad)
    for mine, theirs in zip(new.modules(), m.modules()):
        mine.training = theirs.training
    return new


def swap_attention(model: torch.nn.Module) -> List[str]:
    """Replace, in place, every torch.nn.MultiheadAttention inside `model` (including the
    self_attn / multihead_attn of nn.Transformer* layers) with MultiheadAttention.from_module,
    and return the qualified names replaced (a module reachable under several names is
    converted once, and every name is reported).

    Only modules whose class is exactly torch.nn.MultiheadAttention are replaced; subclasses
    are left alone because they may carry other parameters or semantics.

    Every nn.TransformerEncoder whose first layer's self_attn is then ours gets
    use_nested_tensor = False: otherwise, in eval mode with a src_key_padding_mask, it would
    pack the batch into a NestedTensor, which our kernel does not take (the layer would fall
    back to torch's attention). Side effect: outputs at padded positions are computed values
    rather than the zeros the nested path writes there; unpadded positions are unchanged.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"swap_attention expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.nn.MultiheadAttention):
        raise ValueError("swap_attention replaces submodules in place and cannot replace the "
                         "model itself; use llmkernels.nn.MultiheadAttention.from_module(model)")
    names = replace_layers(model, _is_torch_mha, MultiheadAttention.from_module)
    for m in model.modules():
        if (isinstance(m, torch.nn.TransformerEncoder) and len(m.layers) > 0
                and isinstance(getattr(m.layers[0], "self_attn", None), MultiheadAttention)):
            m.use_nested_tensor = False
    return names


def restore_attention(model: torch.nn.Module) -> List[str]:
    """The inverse of swap_attention: every llmkernels MultiheadAttention inside `model`
    becomes torch's (MultiheadAttention.to_torch), in place; returns the names replaced.
    (nn.TransformerEncoder's use_nested_tensor, which swap_attention turned off, stays off.)"""
    return replace_layers(model, lambda m: type(m) is MultiheadAttention,
                          MultiheadAttention.to_torch)
