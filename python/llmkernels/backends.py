"""Which paths exist here, which one serves a call, and how users force one.

Candidates per device, in order (DESIGN.md): CUDA tensors: cuda -> triton -> reference;
CPU tensors: cpu -> reference. A candidate serves a call only if it is built or importable
here and supports the call; otherwise the next one is tried. Forcing a path (the `backend=`
keyword, `use_backend(...)`, or the LLMKERNELS_BACKEND environment variable, in that order
of precedence) that cannot serve the call raises BackendError: never a silent fallback.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from ._native import import_error as _native_error
from ._native import native as _native

BACKENDS = ("cuda", "triton", "cpu", "reference")
CANDIDATES: Mapping[str, Sequence[str]] = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}
CPU_TIERS = ("amx", "avx512_bf16", "avx512", "avx2", "generic")


def _environ_reader() -> Callable[[str, str], str]:
    """A reader of os.environ for the per-call settings: os.environ.get costs ~1 us (a key
    that is not set raises and catches a KeyError inside it), twice in every call of a
    one-token GEMV; the mapping's own dict of encoded keys answers in ~0.05 us. Read at every
    call all the same, so that a change takes effect at once."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    encode = getattr(environ, "encodekey", None)
    decode = getattr(environ, "decodevalue", None)
    if not isinstance(data, dict) or encode is None or decode is None:
        return lambda name, default="": os.environ.get(name, default)
    keys: Dict[str, object] = {}

    def get(name: str, default: str = "") -> str:
        if os.environ is not environ:  # replaced wholesale: read the new one
            return os.environ.get(name, default)
        key = keys.get(name)
        if key is None:
            key = keys[name] = encode(name)
        value = data.get(key)
        return default if value is None else decode(value)
    return get


env = _environ_reader()

# What use_backend / use_cpu_tier forced. Plain module state rather than a ContextVar:
# torch.compile traces (and guards on) reads of module globals, not ContextVar.get. So the
# setting is process-wide: blocks in concurrent threads or asyncio tasks see each other's
# (README says so). _AUTO: use_backend(None), automatic even where LLMKERNELS_BACKEND is set.
_forced = {"backend": None, "tier": None}
_AUTO = "auto"


def _openmp_runtime_of_torch() -> Optional[str]:
    """Path of the OpenMP runtime torch loaded (its wheels ship torch/lib/libgomp.so.1), from
    this process's memory map; None if there is none or LLMKERNELS_OPENMP=0."""
    if os.environ.get("LLMKERNELS_OPENMP", "1").strip() == "0":
        return None
    import torch
    try:
        with open("/proc/self/maps") as f:
            mapped = {line.split()[-1] for line in f
                      if line.rstrip().endswith((".so", ".so.1", ".so.5"))}
    except OSError:  # no /proc (not Linux): our pool
        return None
    names = ("libgomp", "libiomp5", "libomp")
    found = sorted(p for p in mapped if os.path.basename(p).startswith(names))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    torchs = [p for p in found if p.startswith(torch_dir)]  # torch's own, if several
    return (torchs or found or [None])[0]


def _use_torchs_threads() -> None:
    # The C++ parallel loops run on torch's OpenMP threads when torch has them (see
    # csrc/common/thread_pool.h: a pool of our own shared cores with their spinning).
    if _native is not None:
        path = _openmp_runtime_of_torch()
        if path:
            _native.use_openmp_runtime(path)


_use_torchs_threads()

# Read once: build facts do not change while the process runs, and calling into the
# extension while torch.compile traces would break the graph.
_BUILD = _native.build_info() if _native is not None else None
_TIERS_SUPPORTED: List[str] = list(_BUILD["cpu_tiers_supported"]) if _BUILD else []
_TIER_BEST: str = _BUILD["cpu_tier_best"] if _BUILD else "none"
_AMX_EMULATED: bool = bool(_BUILD and _BUILD["amx_emulated"])
_TIER_CODES = {name: i for i, name in enumerate(("generic", "avx2", "avx512", "avx512_bf16", "amx"))}


# The Triton kernel modules by name: (module, None), or (None, why they cannot be used).
_TRITON_KERNELS: Dict[str, tuple] = {}


def triton_kernels_or_error(name: str) -> tuple:
    """llmkernels.kernels.<name> as (module, None), or (None, why it cannot be imported).

    Tried once per process: a missing or broken triton must not break the other paths. The
    result is a plain dict entry so that torch.compile reads it as a constant once it exists
    (tracing importlib, or an lru_cache wrapper, breaks or warns inside a compiled graph)."""
    found = _TRITON_KERNELS.get(name)
    if found is None:
        found = _TRITON_KERNELS[name] = _import_triton_kernels(name)
    return found


def _import_triton_kernels(name: str) -> tuple:
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed"
    try:
        return importlib.import_module(f"{__package__}.kernels.{name}"), None
    except Exception as exc:  # a broken triton install must not break the other paths
        return None, f"the Triton kernels failed to import ({type(exc).__name__}: {exc})"


def triton_unavailable(name: str) -> Optional[str]:
    """None if llmkernels.kernels.<name> imports here, else why not (for support checks)."""
    return triton_kernels_or_error(name)[1]


def outside_graphs(fn, reason: str):
    """fn run eagerly between graphs under torch.compile (torch.compiler.disable), with the
    reason fullgraph=True's error gives where torch takes one (2.8 and later)."""
    import torch
    try:
        return torch.compiler.disable(fn, reason=reason)
    except TypeError:  # torch before 2.8: no reason
        return torch.compiler.disable(fn)


def _compile_constant(fn):
    # Under torch.compile the answer is computed once while tracing and kept as a constant.
    try:
        import torch
        return torch.compiler.assume_constant_result(fn)
    except (ImportError, AttributeError):  # pragma: no cover - torch without torch.compiler
        return fn


triton_unavailable = _compile_constant(triton_unavailable)


class BackendError(RuntimeError):
    """A forced path cannot serve the call, or a requested path/tier does not exist here."""


def _check_backend_name(name: str, where: str) -> str:
    """The path's name in lower case (names are case-insensitive everywhere)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return key


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a path for the llmkernels ops called inside the block (None: automatic, whatever
    LLMKERNELS_BACKEND says). Process-wide while the block runs (not per thread or task)."""
    if name is not None:
        name = _check_backend_name(name, "use_backend")
    previous = _forced["backend"]
    _forced["backend"] = _AUTO if name is None else name
    try:
        yield
    finally:
        _forced["backend"] = previous


def forced_backend(backend: Optional[str] = None) -> Optional[str]:
    """The path forced for a call: the keyword, else use_backend(), else LLMKERNELS_BACKEND."""
    if backend is not None:
        return _check_backend_name(backend, "backend")
    ctx = _forced["backend"]
    if ctx is not None:
        return None if ctx == _AUTO else ctx
    name = env("LLMKERNELS_BACKEND").strip().lower()
    if name and name not in ("auto", "none"):
        return _check_backend_name(name, "LLMKERNELS_BACKEND")
    return None


# ---------------------------------------------------------------- CPU tiers

def native_module():
    """The compiled extension, or None if it could not be imported (see native_import_error)."""
    return _native


def native_import_error() -> Optional[str]:
    return _native_error


def supported_cpu_tiers() -> List[str]:
    return list(_TIERS_SUPPORTED)


@contextlib.contextmanager
def use_cpu_tier(name: Optional[str]) -> Iterator[None]:
    """Run the CPU kernels with a lower instruction-set tier (tests force each one; None: the
    best, or LLMKERNELS_CPU_TIER's). Process-wide while the block runs, as use_backend."""
    if name is not None:
        name = _check_tier(name, "use_cpu_tier")
    previous = _forced["tier"]
    _forced["tier"] = name
    try:
        yield
    finally:
        _forced["tier"] = previous


def _check_tier(name: str, where: str) -> str:
    """The tier's name in lower case, if this CPU and build can run it."""
    original, name = name, name.lower() if isinstance(name, str) else name
    if name not in CPU_TIERS:
        raise ValueError(f"{where}: unknown CPU tier {original!r}; expected one of {', '.join(CPU_TIERS)}")
    if _native is None:
        raise BackendError(f"{where}: the compiled extension is not available ({_native_error})")
    if name not in _TIERS_SUPPORTED:
        raise BackendError(f"{where}: this CPU cannot run tier {name!r}; "
                           f"supported: {', '.join(_TIERS_SUPPORTED)}")
    return name


def cpu_tier() -> str:
    """The CPU tier the kernels use now: forced by use_cpu_tier / LLMKERNELS_CPU_TIER, else the best."""
    forced = _forced["tier"]
    if forced is not None:
        return forced
    name = env("LLMKERNELS_CPU_TIER").strip().lower()
    if name and name not in ("auto", "none"):
        return _check_tier(name, "LLMKERNELS_CPU_TIER")
    return _TIER_BEST


def cpu_tier_label() -> str:
    """cpu_tier() for explain(): says when the amx tier's tiles run on their software model."""
    tier = cpu_tier()
    if tier == "amx":
        return ("amx (AMX tiles emulated in software, LLMKERNELS_AMX_EMULATE=1)" if _AMX_EMULATED
                else "amx (bf16 products on AMX tiles)")
    return tier


def cpu_tier_code() -> int:
    """The tier's code for the extension (llmk::CpuTier)."""
    return _TIER_CODES[cpu_tier()]


MAX_CPU_THREADS = 1024  # the extension's parallel loops take at most this many (kMaxThreads)


def cpu_threads() -> int:
    """Threads for a CPU kernel call: torch's count (torch.set_num_threads), at most
    MAX_CPU_THREADS (a larger count made every kernel call raise)."""
    import torch
    return min(max(1, torch.get_num_threads()), MAX_CPU_THREADS)


# ---------------------------------------------------------------- selection

@dataclass
class Decision:
    """Which path serves a call, and why each other candidate does not."""
    op: str
    device: str
    backend: str
    forced: Optional[str]
    rejected: Dict[str, str] = field(default_factory=dict)
    detail: str = ""

    def __str__(self) -> str:
        how = f"forced by {self.forced!r}" if self.forced else "automatic"
        lines = [f"{self.op} on {self.device}: served by '{self.backend}' ({how})"]
        if self.detail:
            lines.append(f"  {self.backend}: {self.detail}")
        for name, why in self.rejected.items():
            lines.append(f"  {name}: not used: {why}")
        return "\n".join(lines)


class Decisions(tuple):
    """Several Decisions (an optimizer step: one per param group and kind of state)."""

    def __str__(self) -> str:
        return "\n".join(map(str, self)) if self else "no parameters: nothing to serve"


# A support check returns None when the path can serve the call, else the reason it cannot.
SupportCheck = Callable[[], Optional[str]]


def select(op: str, device_type: str, checks: Mapping[str, SupportCheck],
           backend: Optional[str] = None, detail: Optional[Mapping[str, str]] = None,
           blocked: Optional[str] = None) -> Decision:
    """blocked: why no kernel path may serve the call whatever its inputs (a torch.func
    transform, forward-mode AD: ops.attention.kernels_blocked), or None."""
    forced = forced_backend(backend)
    candidates = CANDIDATES.get(device_type, ("reference",))
    rejected: Dict[str, str] = {}
    if blocked is not None:
        checks = {name: (lambda: blocked) for name in checks}
    if forced is not None:
        # Triton may be forced on CPU tensors: under TRITON_INTERPRET=1 it runs there (tests).
        forcible = candidates + (("triton",) if device_type == "cpu" else ())
        if forced != "reference" and forced not in forcible:
            raise BackendError(f"{op}: backend {forced!r} cannot serve {device_type} tensors; "
                               f"paths for {device_type}: {', '.join(candidates)}")
        why = checks[forced]() if forced != "reference" else None
        if why is not None:
            raise BackendError(f"{op}: forced backend {forced!r} cannot serve this call: {why}")
        for name in candidates:
            if name != forced:
                rejected[name] = "another path was forced"
        return Decision(op, device_type, forced, forced, rejected, (detail or {}).get(forced, ""))
    for name in candidates:
        why = None if name == "reference" else checks[name]()
        if why is None:
            return Decision(op, device_type, name, None, rejected, (detail or {}).get(name, ""))
        rejected[name] = why
    raise AssertionError("the reference path always serves")  # pragma: no cover


def _routes_hf_attention(module) -> bool:
    """Whether a transformers model, or an attention layer of one, runs with
    attn_implementation "llmkernels"."""
    from .integrations.transformers import NAME, is_transformers_model
    config = getattr(module, "config", None)
    return (getattr(config, "_attn_implementation", None) == NAME
            and (is_transformers_model(module) or "attention" in type(module).__name__.lower()))


def explain(op: Callable, *args, **kwargs) -> Decision:
    """Which path would serve `op(*args, **kwargs)` and why the others would not.

    Example: print(llmkernels.explain(llmkernels.scaled_dot_product_attention, q, k, v))
    An llmkernels optimizer's step (explain(opt.step)) gives Decisions: one per param group
    (AdamW8bit: per kind of state), for the tensors as they are now. A layer of
    llmkernels.nn with its forward's arguments (explain(layer, x)) gives its op's Decision.
    A forced path that cannot serve the call raises BackendError, as the call would.
    """
    import torch
    if isinstance(op, torch.nn.Module):
        explainer = getattr(op, "_llmk_explain", None)
        if explainer is None and _routes_hf_attention(op):
            raise TypeError(f"explain: a {type(op).__name__} calls llmkernels' attention "
                            "inside its forward (transformers' attn_implementation "
                            "'llmkernels'), on query/key/value it builds there; explain the "
                            "op with those: explain(llmkernels.scaled_dot_product_attention, "
                            "q, k, v, attn_mask=..., is_causal=...), or for one decoding step "
                            "explain(llmkernels.attention_with_kvcache, ...). Its QuantLinear "
                            "layers take explain(layer, x)")
        if explainer is None:
            raise TypeError(f"explain: a {type(op).__name__} layer does not run llmkernels ops "
                            "(explain takes an llmkernels op, an optimizer's step, or a "
                            "llmkernels.nn layer such as QuantLinear or MultiheadAttention)")
        return explainer(*args, **kwargs)
    owner = getattr(op, "__self__", None)
    if getattr(op, "__name__", None) == "step" and hasattr(owner, "_llmk_explain_step"):
        return owner._llmk_explain_step()  # a closure or amp arguments do not change the path
    explainer = getattr(op, "__llmk_explain__", None)
    if explainer is None:
        raise TypeError(f"explain: {getattr(op, '__name__', op)!r} is not an llmkernels op")
    return explainer(*args, **kwargs)
