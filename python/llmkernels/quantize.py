"""quantize_(model, scheme): swap a model's nn.Linear layers for QuantLinear, in place."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from torch import nn

from ._modules import set_submodule
from .nn.quant_linear import QuantLinear, scheme_fits
from .reference.quant_matmul import SCHEMES


@dataclass
class QuantizeReport:
    """What quantize_ did: replaced (name, bytes before, bytes after) and skipped (name, why)."""
    scheme: str
    group_size: int
    replaced: List[Tuple[str, int, int]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

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
        for name, why in self.skipped:
            lines.append(f"  {name}: kept in float: {why}")
        return "\n".join(lines)


def _weight_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in layer.state_dict().values()
               if hasattr(t, "numel"))


def quantize_(model: nn.Module, scheme: str, group_size: int = 128,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> QuantizeReport:
    """Replace every nn.Linear of `model` (where filter_fn(module, name) is true, if given)
    with a QuantLinear holding its weight in `scheme` ("int8", "int4", "w8a8"). In place;
    returns a QuantizeReport. Layers a scheme cannot store (e.g. in_features not a multiple of
    the int4 group) and subclasses of nn.Linear (their owners may read .weight, as
    nn.MultiheadAttention does) stay in float and are listed in report.skipped."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize_: scheme must be one of {SCHEMES}, got {scheme!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_: model must be an nn.Module, got {type(model).__name__}")
    report = QuantizeReport(scheme, group_size if scheme == "int4" else 0)
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, QuantLinear):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if type(module) is not nn.Linear:
            report.skipped.append((name, f"{type(module).__name__} is a subclass of nn.Linear "
                                         "(its owner may read .weight)"))
            continue
        why = scheme_fits(scheme, module.in_features, group_size)
        if why is not None:
            report.skipped.append((name, why))
            continue
        targets.append((name, module))
    for name, module in targets:
        if not name:  # the model itself is a Linear
            raise ValueError("quantize_: model is itself an nn.Linear; use "
                             "QuantLinear.from_linear(model, scheme)")
        new = QuantLinear.from_linear(module, scheme, group_size)
        before = _weight_bytes(module)
        set_submodule(model, name, new)
        report.replaced.append((name, before, _weight_bytes(new)))
    return report
