"""quantize_(model, scheme): swap a model's nn.Linear layers for QuantLinear, in place."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._modules import keep_submodule_calls, set_submodule
from .nn.quant_linear import QuantLinear, is_transformers_conv1d, scheme_fits
from .reference.quant_matmul import INT4_GROUP_SIZES, SCHEMES, is_int4_group_size


@dataclass
class QuantizeReport:
    """What quantize_ did: replaced (name, bytes before, bytes after), skipped (name, why) and
    shared (name, first name) for a replaced layer reachable under another name too."""
    scheme: str
    group_size: int
    replaced: List[Tuple[str, int, int]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    shared: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(b for _, b, _ in self.replaced)

    @property
    def bytes_after(self) -> int:
        return sum(a for _, _, a in self.replaced)

    def __str__(self) -> str:
        lines = [f"quantize_({self.scheme}"
                 + (f", group_size={self.group_size}" if self.scheme == "int4" else "")
                 + f"): {len(self.replaced)} layer(s) replaced, "
                 f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB of weights"]
        for name, before, after in self.replaced:
            lines.append(f"  {name}: {before} -> {after} bytes")
        for name, first in self.shared:
            lines.append(f"  {name}: the same layer as {first}")
        for name, why in self.skipped:
            lines.append(f"  {name}: not quantized: {why}")
        return "\n".join(lines)


def _weight_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in chain(layer.parameters(), layer.buffers()))


def _weight_holders(model: nn.Module) -> Dict[int, List[str]]:
    """id(parameter) -> the names of the modules holding it (a module reachable under several
    names counts once)."""
    holders: Dict[int, List[str]] = {}
    for name, module in model.named_modules():
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append(name)
    return holders


def _kept_in_float32(model: nn.Module) -> Tuple[str, ...]:
    """transformers' names of modules and weights a model keeps in float32 (T5's "wo", MoE
    routers' "gate.weight"): its code reads them (T5 casts its input to wo.weight's dtype),
    and transformers' own quantizers leave them in float."""
    names = set()
    for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
        names.update(getattr(model, attr, None) or ())
    return tuple(sorted(str(n) for n in names))


def _matches(name: str, patterns: Tuple[str, ...]) -> Optional[str]:
    """The first pattern naming a whole run of name's (or its weight's) dotted parts."""
    dotted = f".{name}.weight."
    return next((p for p in patterns if f".{p}." in dotted), None)


def _other_weight_matrix(module: nn.Module) -> Optional[str]:
    """Why a module quantize_ does not take still holds a linear layer's weights, so that the
    report names it rather than leave it out: a Conv1D quantize_ does not know (transformers'
    own is taken) and stacked expert weights of mixture-of-experts layers."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return None
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return ("a Conv1D that is not transformers' (or has no bias): its forward is not known "
                "to be x @ weight + bias")
    if "expert" not in type(module).__name__.lower():
        return None
    stacked = [n for n, p in module.named_parameters(recurse=False)
               if p.dim() == 3 and min(p.shape) > 1]
    if stacked:
        return (f"{type(module).__name__}'s stacked weights ({', '.join(stacked)}: one matrix "
                "per expert) are not nn.Linear layers")
    return None


def _keep_transformer_layers_off_fused_paths(model: nn.Module) -> None:
    """nn.TransformerEncoderLayer's eval-mode fused path reads linear1.weight / linear2.weight
    (a QuantLinear has none): the no-op hook keeps it on the path that calls them; and an
    nn.TransformerEncoder whose first layer holds one stops packing padded batches into
    NestedTensors (its check reads those weights, hooks or not)."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            for child in (module.linear1, module.linear2):
                if isinstance(child, QuantLinear):
                    keep_submodule_calls(child)
        if isinstance(module, nn.TransformerEncoder) and len(module.layers) > 0:
            first = module.layers[0]
            if any(isinstance(getattr(first, n, None), QuantLinear) for n in ("linear1", "linear2")):
                module.use_nested_tensor = False


def quantize_(model: nn.Module, scheme: str, group_size: int = 128,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> QuantizeReport:
    """Replace every nn.Linear of `model`, and every transformers Conv1D (GPT-2's projections),
    where filter_fn(module, name) is true if given, with a QuantLinear holding its weight in
    `scheme` ("int8", "int4", "w8a8"). In place; returns a QuantizeReport. filter_fn sees
    Conv1D layers too: they have nx / nf, not in_features / out_features, and store their
    weight as (in, out). Kept in float and listed in report.skipped: layers a scheme cannot
    store (e.g. in_features not a multiple of the int4 group, empty weights), subclasses of
    nn.Linear (their owners may read .weight, as nn.MultiheadAttention does), layers whose
    weight another module also holds (a tied output embedding: quantizing it would untie them
    and keep the float copy) and those a transformers model keeps in float32
    (_keep_in_fp32_modules). Listed there too: QuantLinear layers already there, and weight
    matrices of other modules (stacked expert weights), which stay in float. A layer
    reachable under several names is quantized once and replaced under each. A weight holding
    NaN or Inf raises ValueError naming the layer before anything is replaced. Layers on the
    meta device become QuantLinear frames without values (for load_state_dict(...,
    assign=True) of a quantized checkpoint)."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize_: scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "int4" and not is_int4_group_size(group_size):
        raise ValueError(f"quantize_: int4 group_size must be one of {INT4_GROUP_SIZES} (an int), "
                         f"got {group_size!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_: model must be an nn.Module, got {type(model).__name__}")
    report = QuantizeReport(scheme, int(group_size) if scheme == "int4" else 0)
    holders = _weight_holders(model)
    decided: Dict[int, bool] = {}  # id(module) -> quantized (decided at its first name)
    targets: List[Tuple[str, nn.Module]] = []  # nn.Linear or Conv1D layers
    aliases: Dict[int, List[str]] = {}
    kept_float32 = _kept_in_float32(model)
    for name, module in model.named_modules(remove_duplicate=False):
        conv1d = is_transformers_conv1d(module)
        if not (isinstance(module, nn.Linear) or conv1d):
            # (filter_fn is for linear layers: it may read their attributes)
            if id(module) not in decided:
                why = (f"already a QuantLinear ({module.scheme})"
                       if isinstance(module, QuantLinear) else _other_weight_matrix(module))
                if why is not None:
                    report.skipped.append((name, why))
            decided.setdefault(id(module), False)
            continue
        if id(module) in decided:
            if decided[id(module)]:
                aliases[id(module)].append(name)
            continue
        decided[id(module)] = False
        if filter_fn is not None and not filter_fn(module, name):
            continue
        pattern = _matches(name, kept_float32)
        if pattern is not None:
            report.skipped.append((name, f"the model keeps {pattern!r} in float32 "
                                         "(transformers' _keep_in_fp32_modules: its code reads "
                                         "the weight)"))
            continue
        if type(module) is not nn.Linear and not conv1d:
            report.skipped.append((name, f"{type(module).__name__} is a subclass of nn.Linear "
                                         "(its owner may read .weight)"))
            continue
        in_features, out_features = ((module.nx, module.nf) if conv1d
                                     else (module.in_features, module.out_features))
        why = scheme_fits(scheme, in_features, group_size, out_features)
        if why is not None:
            report.skipped.append((name, why))
            continue
        others = [h for h in holders.get(id(module.weight), ()) if h != name]
        if others:
            report.skipped.append((name, f"its weight is also {others[0]}'s (tied): quantizing "
                                         "it would untie them and keep the float copy"))
            continue
        if not name:  # the model itself is a Linear
            raise ValueError("quantize_: model is itself an nn.Linear; use "
                             "QuantLinear.from_linear(model, scheme)")
        decided[id(module)] = True
        targets.append((name, module))
        aliases[id(module)] = []
    for name, module in targets:  # before any layer is replaced
        w = module.weight
        if not w.is_meta and not bool(torch.isfinite(w).all()):
            raise ValueError(f"quantize_: {name}.weight holds NaN or Inf (no layer was replaced)")
    for name, module in targets:
        new = QuantLinear.from_linear(module, scheme, group_size)
        set_submodule(model, name, new)
        report.replaced.append((name, _weight_bytes(module), _weight_bytes(new)))
        for alias in aliases[id(module)]:
            set_submodule(model, alias, new)
            report.shared.append((alias, name))
    _keep_transformer_layers_off_fused_paths(model)
    return report
