"""llmkernels.patch(model) / unpatch(model): route a whole model through our kernels, in place.

- transformers models (PreTrainedModel whose layers use transformers' attention registry):
  attn_implementation becomes "llmkernels" (integrations/transformers.py); model code is not
  touched, and unpatch sets the previous implementation back.
- other PyTorch models: every torch.nn.MultiheadAttention becomes llmkernels.nn's drop-in
  (swap_attention); unpatch turns them back into torch's class.
- quantize="int8" | "int4" | "w8a8": quantize_ on the model's linears (not one whose weight
  another module holds, such as an output embedding tied to the input embedding). unpatch
  replaces each QuantLinear with an nn.Linear holding its dequantized weight (the float
  weights are gone once quantized).

Replaced modules get new parameters: build optimizers after patching.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import nn

from ._modules import replace_layers
from .integrations import transformers as hf
from .nn.attention import MultiheadAttention, swap_attention
from .nn.quant_linear import QuantLinear
from .quantize import QuantizeReport, quantize_
from .reference.quant_matmul import SCHEMES

_STATE = "_llmkernels_patch"  # attribute on a patched model: what unpatch must undo
_MADE = "_llmkernels_made_by_patch"  # attribute on the modules patch made: unpatch's to undo


class _PatchState(dict):
    """What unpatch must undo, kept on the model. Unpickled with the model (torch.save of a
    whole patched transformers model), it registers llmkernels' attention with transformers
    again, which a new process has not: its forward would not find "llmkernels"."""

    def __reduce__(self):
        return _patch_state, (dict(self),)


def _patch_state(state: dict) -> _PatchState:
    if "attn_implementation" in state:
        hf.register()
    return _PatchState(state)


def _mark(model: nn.Module, names) -> None:
    for name in names:
        object.__setattr__(model.get_submodule(name), _MADE, True)


def _made_by_patch(state: dict, kind: type):
    """Which modules of `kind` unpatch turns back: those patch made (a user's own llmkernels
    layers stay), or, for a model patched before patch marked them, every one."""
    if state.get("marked"):
        return lambda m: isinstance(m, kind) and getattr(m, _MADE, False)
    return lambda m: isinstance(m, kind)


@dataclass
class PatchReport:
    """What patch (or unpatch) changed."""
    attention: List[str] = field(default_factory=list)  # one line per change
    quantize: Optional[QuantizeReport] = None
    restored_linears: List[str] = field(default_factory=list)  # unpatch: dequantized layers

    def __str__(self) -> str:
        lines = [f"attention: {line}" for line in self.attention] or ["attention: unchanged"]
        if self.quantize is not None:
            lines.append(str(self.quantize))
        if self.restored_linears:
            lines.append(f"{len(self.restored_linears)} QuantLinear layer(s) back to nn.Linear "
                         "(dequantized weights)")
        return "\n".join(lines)


def patch(model: nn.Module, attention: bool = True, quantize: Optional[str] = None,
          group_size: int = 128,
          filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> PatchReport:
    """Route `model` through llmkernels in place; returns a PatchReport.

    attention: swap the attention (see the module docstring); quantize: None or a scheme of
    quantize_ ("int8", "int4", "w8a8"), with group_size (int4) and filter_fn(module, name)
    choosing the linears, transformers Conv1D layers included (default: all that quantize_
    can take; it keeps tied ones in float). Raises ValueError for a scheme quantize_ does not
    know and for a model whose attention llmkernels cannot route (nothing is changed then)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be an nn.Module, got {type(model).__name__}")
    if quantize is not None and quantize not in SCHEMES:
        raise ValueError(f"patch: quantize must be None or one of {SCHEMES}, got {quantize!r}")
    is_hf = hf.is_transformers_model(model)
    if attention:
        if is_hf and not hf.uses_attention_registry(model):
            raise ValueError(f"patch: {type(model).__name__} does not route its attention "
                             "through transformers' attention registry (its attention code is "
                             "its own), so llmkernels cannot swap it; pass attention=False to "
                             "quantize only")
        why = hf.unsupported_attention(model) if is_hf else None
        if why is not None:
            raise ValueError(f"patch: llmkernels' attention cannot serve "
                             f"{type(model).__name__}: {why}; pass attention=False to "
                             "quantize only")
        if not is_hf and not any(type(m) in (nn.MultiheadAttention, MultiheadAttention)
                                 for m in model.modules()):
            raise ValueError(f"patch: found no attention to swap in {type(model).__name__} "
                             "(supported: transformers models and torch.nn.MultiheadAttention "
                             "layers); pass attention=False to quantize only")
    report = PatchReport()
    # "marked": patch marks what it makes (a model patched by an earlier version has no marks)
    state = _PatchState(getattr(model, _STATE, None) or {"marked": True})
    if attention:
        if is_hf:
            previous = hf.attn_implementations(model)  # a dict for a composite model
            if hf.implementation_names(previous) != {hf.NAME}:
                hf.set_attn_implementation(model, hf.register())
                state.setdefault("attn_implementation", previous)
            report.attention.append(f"attn_implementation {previous!r} -> {hf.NAME!r}")
        else:
            names = swap_attention(model)
            _mark(model, names)
            report.attention.extend(f"{name}: torch.nn.MultiheadAttention -> "
                                    "llmkernels.nn.MultiheadAttention" for name in names)
            state["swapped_attention"] = True
    object.__setattr__(model, _STATE, state)  # a plain attribute: not a submodule or buffer
    if quantize is not None:
        try:
            report.quantize = quantize_(model, quantize, group_size=group_size,
                                        filter_fn=filter_fn)
        except Exception as exc:
            if attention and hasattr(exc, "add_note"):  # (python >= 3.11)
                exc.add_note("patch: the attention was swapped before quantize_ raised (and "
                             "recorded): llmkernels.unpatch(model) restores it")
            raise
        _mark(model, [name for name, _, _ in report.quantize.replaced])
    return report


def _dequantized_linear(q: QuantLinear) -> nn.Module:
    """The float layer a QuantLinear was made from: an nn.Linear, or a transformers Conv1D
    (GPT-2's projections: weight stored (in, out), as its state_dict and code expect)."""
    weight = q.dequantize().to(q.weight_dtype)
    if q.transposed_from is not None:
        new = q.transposed_from(q.out_features, q.in_features).to(weight.device, weight.dtype)
        weight = weight.t()
    else:
        new = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None,
                        device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if q.bias is not None:
            new.bias.copy_(q.bias)
    new.train(q.training)
    return new


def unpatch(model: nn.Module) -> PatchReport:
    """Undo patch(model) in place: the previous attn_implementation (transformers) or torch's
    MultiheadAttention, and nn.Linear layers (dequantized weights) for QuantLinear ones, each
    only where patch made it (llmkernels layers the model held before stay).
    Returns a PatchReport of what changed; raises ValueError if the model was not patched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch: model must be an nn.Module, got {type(model).__name__}")
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError("unpatch: this model was not patched by llmkernels.patch")
    report = PatchReport()
    if "attn_implementation" in state:
        previous = state["attn_implementation"]
        hf.set_attn_implementation(model, previous)
        report.attention.append(f"attn_implementation {hf.NAME!r} -> {previous!r}")
    if state.get("swapped_attention"):
        restored = replace_layers(model, _made_by_patch(state, MultiheadAttention),
                                  MultiheadAttention.to_torch)
        report.attention.extend(f"{name}: llmkernels.nn.MultiheadAttention -> "
                                "torch.nn.MultiheadAttention" for name in restored)
    report.restored_linears = replace_layers(model, _made_by_patch(state, QuantLinear),
                                             _dequantized_linear)
    object.__delattr__(model, _STATE)
    return report
