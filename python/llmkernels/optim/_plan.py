"""A group's tensors as the kernels take them (flat views for the C++ and CUDA kernels, launch
tables for Triton's), kept from one step to the next.

A fused step's host work is reading tensor attributes: ~4 us a parameter in Python loops
(pointer, dtype, size, contiguity and device of the parameter, its gradient and each state
tensor), and two to three times that right after the previous step has streamed the whole
model through the caches. For a 10M-parameter model of 156 tensors that was 1.4-2.7 ms of an
8 ms AdamW8bit step on a Zen 4 (torch's fused AdamW: ~1 ms). A plan keeps the views of the
parameters and of their state tensors; each step re-checks them with C-level loops (map over
tensor methods: no Python bytecode per tensor) and checks every gradient in full, so a step
whose tensors changed in any way the kernels depend on (another parameter set, a parameter
given new storage, dtype, size or layout, a state tensor replaced or given new storage, a
load_state_dict) falls back to the full path, which builds a new plan. The path itself is
chosen every step (backends.py's rules: a forced backend is followed).
"""
from __future__ import annotations

import operator
from itertools import repeat
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .._cview import DTYPE_CODES
from . import _fused

_T = torch.Tensor
_dtype_of = operator.attrgetter("dtype")
_ONE = (1,)


def _same_objects(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


class Plan:
    """Views of a group's parameters (with gradients) and of the state tensors under
    state_keys[i] for parameter i, as of one step. views(optimizer, group) gives them for a
    later step, with the gradients' views, or None if anything changed."""

    def __init__(self, optimizer: torch.optim.Optimizer, group: dict,
                 params: Sequence[torch.Tensor], state_keys: Sequence[Tuple[str, ...]]):
        self.group = group
        self.state_map = optimizer.state
        self.params = tuple(params)
        self.dtypes = list(map(_dtype_of, params))
        self.numels = list(map(_T.numel, params))
        self.ptrs = list(map(_T.data_ptr, params))
        self.devices = list(map(_T.get_device, params))
        self.codes = [DTYPE_CODES[dt] for dt in self.dtypes]
        self.sizes = [(n,) for n in self.numels]
        self.param_views = list(zip(self.ptrs, self.codes, self.sizes, repeat(_ONE)))
        # (a parameter without state, as SGD's without momentum, gets no entry made for it)
        self.states = [optimizer.state[p] if p in optimizer.state else {} for p in params]
        # The whole state map's keys and values as of now, compared by identity each step:
        # a state dict replaced or an entry removed shows there without hashing parameters
        # (Tensor.__hash__ is Python code: ~0.2 us a call).
        self.state_map_keys = list(optimizer.state)
        self.state_map_values = list(optimizer.state.values())
        self.state_keys = [tuple(k) for k in state_keys]
        # Per key, the parameters that have it and their state tensors, checked together.
        self.by_key: Dict[str, Tuple[List[int], list, List[int], list]] = {}
        for i, keys in enumerate(self.state_keys):
            for key in keys:
                self.by_key.setdefault(key, ([], [], [], []))[0].append(i)
        for key, (idx, tensors, ptrs, dicts) in self.by_key.items():
            dicts.extend(self.states[i] for i in idx)
            tensors.extend(d[key] for d in dicts)
            ptrs.extend(map(_T.data_ptr, tensors))
        self.state_numels = {key: list(map(_T.numel, tensors))
                             for key, (_, tensors, _, _) in self.by_key.items()}
        self.state_views = [tuple(_flat(self.states[i][key]) for key in keys)
                            for i, keys in enumerate(self.state_keys)]
        self.kinds: Dict[Tuple[str, ...], List[int]] = {}  # parameters by their state keys
        for i, keys in enumerate(self.state_keys):
            self.kinds.setdefault(keys, []).append(i)
        self.triton = {}  # kernels.optim Prepared launches, by the optimizer's name for them
        self.hits = 0  # steps served
        self.misses = 0  # steps since it stopped serving (see worth_building)

    def views(self, optimizer: torch.optim.Optimizer, group: dict,
              params: List[torch.Tensor]) -> Optional[Tuple[list, list]]:
        """(parameter views, gradient views) of params (the group's parameters with gradients,
        in order, as _fused.grads_of returns them: no gradient None or sparse) if this plan
        still describes them, else None. State views: state_views."""
        if group is not self.group or optimizer.state is not self.state_map:
            return None
        if not _same_objects(params, self.params):
            return None
        # A parameter's device is not read again: one whose storage moved has another
        # data_ptr (host and devices share one address space under CUDA's unified addressing).
        if (list(map(_T.data_ptr, params)) != self.ptrs
                or list(map(_dtype_of, params)) != self.dtypes
                or list(map(_T.numel, params)) != self.numels
                or not all(map(_T.is_contiguous, params))):
            return None
        state_map = self.state_map
        if not (_same_objects(list(state_map.values()), self.state_map_values)
                and _same_objects(list(state_map), self.state_map_keys)):
            return None
        for key, (_, tensors, ptrs, dicts) in self.by_key.items():
            try:
                now = list(map(operator.itemgetter(key), dicts))
            except KeyError:
                return None
            if (not _same_objects(now, tensors) or list(map(_T.data_ptr, now)) != ptrs
                    or list(map(_T.numel, now)) != self.state_numels[key]):  # resize_ in place
                return None
        # Gradients: new tensors every step, checked in full (C-level loops again; grads_of
        # refused sparse ones). A lazily negated one (autograd leaves conj().real's gradient
        # of a one-element parameter so) holds -g in memory.
        grads = list(map(_fused.grad_of, params))
        if (list(map(_dtype_of, grads)) != self.dtypes
                or list(map(_T.numel, grads)) != self.numels
                or list(map(_T.get_device, grads)) != self.devices
                or not all(map(_T.is_contiguous, grads)) or any(map(_T.is_neg, grads))):
            return None
        out = list(zip(map(_T.data_ptr, grads), self.codes, self.sizes, repeat(_ONE)))
        return self.param_views, out


def _flat(t: torch.Tensor):
    return (t.data_ptr(), DTYPE_CODES[t.dtype], (t.numel(),), _ONE)


KERNEL_PATHS = {"cpu", "cuda", "triton"}


def serve(optimizer: torch.optim.Optimizer, group: dict, params: List[torch.Tensor],
          kinds: Sequence[Tuple[str, ...]], stochastic_rounding: bool = False
          ) -> Optional[Tuple[str, Plan, list, list]]:
    """(path, plan, parameter views, gradient views) for this step if the group's plan
    describes params, the state keys of its parameters are among kinds (the keys this step's
    settings use) and backends.py's rules pick a kernel path (counted as a hit), else None:
    the caller takes its full path."""
    plans = optimizer.__dict__.get("_llmk_plans")
    if plans and len(plans) > len(optimizer.param_groups):
        _forget_removed_groups(optimizer, plans)
    plan = cached(optimizer, group)
    if plan is None or not set(plan.kinds) <= set(kinds):
        return None
    views = plan.views(optimizer, group, params)
    if views is None:
        return None
    path = _fused.choose_path(params, True, stochastic_rounding)
    if path not in KERNEL_PATHS:
        return None
    plan.hits += 1
    return (path, plan, *views)


def after_full_step(optimizer: torch.optim.Optimizer, group: dict, params: List[torch.Tensor],
                    state_keys: Sequence[Tuple[str, ...]], paths: set) -> None:
    """After a full step over params on paths (every kernel call's path): a plan for the next
    steps if one kernel path, C++, CUDA or Triton, took every tensor (plans hold no DTensor
    shards: those are new objects every step)."""
    if (len(paths) == 1 and paths <= KERNEL_PATHS and not _fused.has_dtensor(params)
            and worth_building(optimizer, group)):
        old = cached(optimizer, group)
        plan = Plan(optimizer, group, params, state_keys)
        if old is not None and old.hits == 0:
            plan.misses = old.misses  # the back-off goes on
        remember(optimizer, group, plan)


def cached(optimizer: torch.optim.Optimizer, group: dict) -> Optional[Plan]:
    return optimizer.__dict__.get("_llmk_plans", {}).get(id(group))


def worth_building(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """Whether a full step should build a new plan: always if the group's last plan served a
    step (or there is none); for plans that never served, twice more (a plan made at the
    first step of the first of several groups sees a state map that the other groups' first
    steps then extend), then once in 64 steps (a group whose tensors change every step would
    pay for a plan it never uses)."""
    old = cached(optimizer, group)
    if old is None or old.hits > 0:
        return True
    old.misses += 1
    return old.misses <= 2 or old.misses % 64 == 0


def remember(optimizer: torch.optim.Optimizer, group: dict, plan: Plan) -> None:
    plans = optimizer.__dict__.get("_llmk_plans")
    if plans is None:
        plans = optimizer.__dict__["_llmk_plans"] = {}
        # Plans hold the tensors they describe: after a load_state_dict the old state would
        # stay alive until the next step. The hook goes with the plans (neither is pickled).
        optimizer.register_load_state_dict_pre_hook(_forget_all)
    plans[id(group)] = plan


def _forget_removed_groups(optimizer: torch.optim.Optimizer, plans: dict) -> None:
    """Drops the plans of groups no longer in param_groups (they hold the groups' parameters
    and state: a removed group's memory would never be freed)."""
    live = set(map(id, optimizer.param_groups))
    for key in [k for k in plans if k not in live]:
        del plans[key]


def _forget_all(optimizer: torch.optim.Optimizer, state_dict) -> None:
    optimizer.__dict__.get("_llmk_plans", {}).clear()
