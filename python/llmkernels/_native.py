"""Loads the compiled extension once; records why it is missing instead of failing import."""
from __future__ import annotations

try:
    from . import _C as native  # type: ignore[attr-defined]
    import_error = None
except ImportError as exc:  # the package still works on its reference paths
    native = None
    import_error = f"{type(exc).__name__}: {exc}"
