"""Hugging Face transformers: our attention as an attention implementation named "llmkernels".

register() adds attention_forward to transformers' AttentionInterface and gives it SDPA's
mask function in AttentionMaskInterface, so a model built or switched with
attn_implementation="llmkernels" calls it in every attention layer without any model code
being copied or edited:

    llmkernels.integrations.transformers.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="llmkernels")
    # or, for a model already built: llmkernels.patch(model)

The masks transformers builds for it are SDPA's (None where SDPA would rely on is_causal), so
attention_forward reads them exactly as transformers' own sdpa_attention_forward does; only
the kernels differ. Decoding steps (one query token, no mask) go through
attention_with_kvcache over the cache transformers passes in.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch

NAME = "llmkernels"


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                      dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, sliding_window: Optional[int] = None,
                      softcap: Optional[float] = None, **kwargs):
    """transformers' attention-function signature: query (B, Hq, L, D), key / value
    (B, Hkv, S, D) with the cache already appended, attention_mask from SDPA's mask function
    (bool, True = attend; or None). Returns ((B, L, Hq, Dv), None); attention weights are
    never materialized.

    sliding_window needs no handling here: transformers puts the window into the mask
    whenever it can cut anything (SDPA's mask is None only when the keys fit in it)."""
    from .. import attention_with_kvcache, scaled_dot_product_attention
    from ..ops.attention_kvcache import decode_step_cpu

    _check_inputs(kwargs)
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As sdpa_attention_forward: without a mask, L > 1 is causal (top-left, which is also
    # bottom-right when L == S) and one query token sees every key.
    causal = bool(q_len > 1 and attention_mask is None and causal)
    gqa = query.shape[1] != key.shape[1]
    # (torch.jit.trace: the general call below, whose trace follows the cache's length; the
    # KV-cache op's length would be a constant of the trace)
    if (q_len == 1 and attention_mask is None and dropout == 0.0
            and not _needs_grad(query, key, value) and not torch.jit.is_tracing()):
        # One decoding step: (B, 1, Hq, D) over the whole (B, S, Hkv, D) cache, in the layout
        # transformers expects back (straight to the CPU kernel where nothing else is needed).
        out = decode_step_cpu(query, key, value, scaling, softcap)
        if out is None:
            out = attention_with_kvcache(query.transpose(1, 2), key.transpose(1, 2),
                                         value.transpose(1, 2), key.shape[2], scale=scaling,
                                         softcap=softcap)
        return out, None
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                       dropout_p=dropout, is_causal=causal, scale=scaling,
                                       enable_gqa=gqa, softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


# Tensors transformers passes every attention function that do not change what it computes:
# positions (the mask already holds what they imply: packed sequences, the cache offset) and
# the loss's token count.
_IGNORED_TENSORS = frozenset({"position_ids", "cache_position", "cu_seq_lens_q",
                              "cu_seq_lens_k", "seq_idx", "num_items_in_batch",
                              "token_type_ids"})
_INPUT_NAMES = {"position_bias": "T5-style relative attention bias",
                "s_aux": "attention sinks", "sinks": "attention sinks",
                "indices": "sparse attention indices (the keys an indexer picked)",
                "block_indices": "block-sparse attention indices"}


def _check_inputs(kwargs: dict) -> None:
    """Refuse any tensor input this function would not read: a model passes one (sinks, the
    top-k keys of sparse attention) where its attention is not plain SDPA, and dropping it
    would give dense attention's output without a word."""
    for key, value in kwargs.items():
        if key in _IGNORED_TENSORS or value is None:
            continue
        if key in _INPUT_NAMES or isinstance(value, torch.Tensor):
            raise NotImplementedError(
                f"attn_implementation={NAME!r} does not take {key!r} "
                f"({_INPUT_NAMES.get(key, 'a tensor input it would not read')}); use 'sdpa' "
                "or 'eager' for this model")
    if kwargs.get("output_attentions"):
        warnings.warn(f"attn_implementation={NAME!r} does not return attention weights "
                      "(output_attentions=True gives None for them); use 'eager' for those",
                      stacklevel=3)


def unsupported_attention(model: torch.nn.Module) -> Optional[str]:
    """Why the model's attention is not what attention_forward computes (None if it is): the
    attention functions of these models get inputs it refuses at every call."""
    for module in model.modules():
        if isinstance(getattr(module, "sinks", None), torch.Tensor):
            return f"its attention has learned sinks ({type(module).__name__}.sinks)"
        config = getattr(module, "config", None)
        if any(getattr(config, name, None) is not None
               for name in ("index_topk", "index_topk_blocks")):
            return ("its attention is sparse: each query attends to the top-k keys an indexer "
                    "picks (config.index_topk)")
    return None


def register() -> str:
    """Register attention_forward (and SDPA's mask function) under NAME; returns NAME.
    Idempotent. Raises ImportError naming the need if transformers is missing or too old."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:
        raise ImportError("llmkernels' transformers integration needs the transformers "
                          "package with its attention and mask registries (transformers >= "
                          f"4.54): {exc}") from exc
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def is_transformers_model(model: torch.nn.Module) -> bool:
    """Whether model is a transformers PreTrainedModel (without importing transformers when
    the program has not)."""
    import sys
    module = sys.modules.get("transformers")
    if module is None:
        return False
    return isinstance(model, module.PreTrainedModel)


def uses_attention_registry(model: torch.nn.Module) -> bool:
    """Whether the model's attention layers call the function registered for its
    attn_implementation (transformers marks those models _supports_attention_backend)."""
    return bool(getattr(model, "_supports_attention_backend", False))


def attn_implementation(model: torch.nn.Module) -> Optional[str]:
    return getattr(model.config, "_attn_implementation", None)


def attn_implementations(model: torch.nn.Module) -> Union[str, dict, None]:
    """The model's attention implementation: its config's name, or for a composite model (a
    vision tower and a language model, each with its own sub-config) a dict in the form
    set_attn_implementation takes back: {"": the top config's, sub-config key: its own, ...}."""
    def walk(config):
        subs = {key: walk(getattr(config, key)) for key in getattr(config, "sub_configs", {})
                if getattr(config, key, None) is not None}
        own = getattr(config, "_attn_implementation", None)
        return {"": own, **subs} if subs else own
    return walk(model.config)


def implementation_names(implementation: Union[str, dict, None]) -> set:
    """The names in attn_implementations' answer."""
    if isinstance(implementation, dict):
        return set().union(*(implementation_names(v) for v in implementation.values()))
    return {implementation}


def set_attn_implementation(model: torch.nn.Module, name: Union[str, dict]) -> None:
    """name: one implementation for every sub-model, or attn_implementations' dict."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers before set_attn_implementation: the config field is what layers read
        model.config._attn_implementation = name[""] if isinstance(name, dict) else name
