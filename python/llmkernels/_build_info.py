"""build_info(): what this installation can run, for bug reports and for explain()."""
from __future__ import annotations

import importlib.util
from typing import Any, Dict

import torch

from . import backends
from ._version import __version__


def _triton_status() -> Dict[str, Any]:
    if importlib.util.find_spec("triton") is None:
        return {"available": False, "version": None}
    try:
        import triton
        return {"available": True, "version": getattr(triton, "__version__", "unknown")}
    except Exception as exc:  # a broken triton install must not break import llmkernels
        return {"available": False, "version": None, "error": f"{type(exc).__name__}: {exc}"}


def build_info() -> Dict[str, Any]:
    """Version, compiled paths (cpu; cuda with archs), CPU features and tier, Triton."""
    native = backends.native_module()
    info: Dict[str, Any] = {"version": __version__, "torch": torch.__version__}
    if native is None:
        info["paths"] = {"cpu": False, "cuda": False, "reference": True}
        info["native_error"] = backends.native_import_error()
        info["triton"] = _triton_status()
        return info
    raw = dict(native.build_info())
    info["paths"] = {"cpu": True, "cuda": bool(raw["cuda_built"]), "reference": True}
    info["cuda"] = {
        "built": bool(raw["cuda_built"]),
        "archs": [a for a in raw.get("cuda_archs", "").split(",") if a],
        "runtime_version": raw.get("cuda_runtime_version"),
        "driver_version": raw.get("cuda_driver_version"),
        "devices": raw.get("cuda_devices", []),
    }
    info["cpu"] = {
        "brand": raw["cpu_brand"],
        "vendor": raw["cpu_vendor"],
        "features": {k: v for k, v in raw["cpu_features"].items() if v},
        "tiers_built": raw["cpu_tiers_built"],
        "tiers_supported": raw["cpu_tiers_supported"],
        "tier_in_use": _tier_in_use(),
        # the amx tier: AMX tiles in hardware, or their software model (forced tiers only)
        "amx": ("hardware" if raw["amx_hardware"] else
                "emulated (LLMKERNELS_AMX_EMULATE=1)" if raw["amx_emulated"] else
                f"unavailable: {raw['amx_hardware_why_not']}"),
        # parallel loops: "openmp:<torch's runtime>" or "pool" (our own threads)
        "threading": native.threading_runtime(),
    }
    info["compiler"] = raw["compiler"]
    info["triton"] = _triton_status()
    return info


def _tier_in_use() -> str:
    # build_info() is what a bug report quotes: a bad LLMKERNELS_CPU_TIER is reported, not raised
    try:
        return backends.cpu_tier()
    except (ValueError, backends.BackendError) as exc:
        return f"error: {exc}"
