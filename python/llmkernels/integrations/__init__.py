"""Integrations with other libraries (imported lazily: none of them is a dependency)."""
from . import transformers

__all__ = ["transformers"]
