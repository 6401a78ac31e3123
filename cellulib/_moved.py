"""Old import paths of names that moved when the library was laid out by job (issue 13).

``from cellulib.data import weak_mask`` and the like keep working: the module's ``__getattr__``
returns the object from its new home with a `DeprecationWarning` that names it. The new home is
imported only then, so an old path never adds an import between layers.
"""
from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved_names(module: str, moves: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names that moved: ``moves`` maps name -> new module."""

    def __getattr__(name: str) -> Any:
        if name in moves:
            warnings.warn(f"{module}.{name} moved to {moves[name]}.{name}; import it from there",
                          DeprecationWarning, stacklevel=2)
            return getattr(importlib.import_module(moves[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    __getattr__.moves = dict(moves)  # read by the test that the library itself uses new homes
    return __getattr__
