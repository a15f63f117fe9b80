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


def _keep_submodule_calls(module, args):
    """A no-op forward pre-hook; its presence is what matters (see keep_submodule_calls)."""
    return None


def keep_submodule_calls(module: nn.Module) -> None:
    """Give module a no-op forward pre-hook (once). torch.nn.TransformerEncoderLayer, in eval
    mode without autograd, may run a fused C++ layer (torch._transformer_encoder_layer_fwd)
    that reads its submodules' weights and never calls their forward; it skips that shortcut
    when any of its submodules has forward (pre-)hooks, so the hook keeps our layers' forward
    in use inside it. (Costs ~1 us a call: Module.__call__ takes its hook path.)"""
    if _keep_submodule_calls not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_keep_submodule_calls)
