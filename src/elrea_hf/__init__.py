"""Ensembles of Low-Rank Expert Adapters (ELREA) for Hugging Face transformers, PEFT and TRL.

Public names are imported lazily, so that ``import elrea_hf`` stays cheap (no torch/transformers
import until a name that needs them is used).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY_EXPORTS = {
    "default_backbone": "backbone",
}

__all__ = ["__version__", *_LAZY_EXPORTS]

if TYPE_CHECKING:
    from .backbone import default_backbone


def __getattr__(name: str):
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
