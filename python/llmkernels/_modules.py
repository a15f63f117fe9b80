"""Replacing a model's submodules in place (torch's Module.set_submodule needs torch >= 2.5)."""
from __future__ import annotations

from typing import Callable, Dict, List

from torch import nn


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """model's submodule at the dotted name (not "") becomes module."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def replace_layers(model: nn.Module, matches: Callable[[nn.Module], bool],
                   convert: Callable[[nn.Module], nn.Module]) -> List[str]:
    """Replace every submodule m of model (not model itself) with matches(m) by convert(m), in
    place; a module reachable under several names is converted once, and every name is
    returned."""
    converted: Dict[int, nn.Module] = {}
    names: List[str] = []
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if not name or not matches(m):
            continue
        if id(m) not in converted:
            converted[id(m)] = convert(m)
        set_submodule(model, name, converted[id(m)])
        names.append(name)
    return names
