"""The chapters' papermill parameters checked against the types their ``parameters`` cell
annotates, so a wrong ``-p`` fails with a sentence rather than deep in a run. Used in every chapter.
"""

from __future__ import annotations

from typing import Any

from cellulib.data.profiles import PROFILES


class ParameterError(TypeError):
    """A chapter parameter (papermill ``-p``) of the wrong type."""


_PARAMETER_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _expected_types(annotation: Any) -> tuple[tuple[type, ...], bool, str]:
    """(accepted types, None allowed, readable name) of a parameter annotation."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = text.replace(" ", "")
    optional = text.startswith("Optional[") and text.endswith("]")
    if optional:
        text = text[len("Optional["):-1]
    if text.endswith("|None"):
        optional, text = True, text[: -len("|None")]
    if text not in _PARAMETER_TYPES:
        raise ParameterError(f"parameter annotation {annotation!r} is not one of "
                             f"{sorted(_PARAMETER_TYPES)} (optionally Optional[...])")
    return _PARAMETER_TYPES[text], optional, text + (" or None" if optional else "")


def check_parameters(namespace: dict[str, Any]) -> None:
    """Check the chapter's parameters (its annotated globals) against their annotations.

    A chapter's ``parameters`` cell declares ``seed: int = 0``; papermill's injected cell may then
    set ``seed = "abc"``. Called right after the imports of every chapter, this stops the chapter
    with a message naming the parameter instead of an error from deep inside a library.

    Examples
    --------
    >>> check_parameters({"__annotations__": {"seed": int}, "seed": "abc"})
    Traceback (most recent call last):
    ...
    cellulib.reporting.parameters.ParameterError: parameter 'seed' must be int, got 'abc' (str); e.g. papermill -p seed 0
    """
    for name, annotation in namespace.get("__annotations__", {}).items():
        if name not in namespace:
            continue
        value = namespace[name]
        types, optional, readable = _expected_types(annotation)
        if value is None and optional:
            continue
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            raise ParameterError(
                f"parameter {name!r} must be {readable}, got {value!r} ({type(value).__name__}); "
                f"e.g. papermill -p {name} {_example(types)}")
    if "profile" in namespace and namespace["profile"] not in PROFILES:
        raise ParameterError(f"parameter 'profile' must be one of {sorted(PROFILES)}, "
                             f"got {namespace['profile']!r}")


def _example(types: tuple[type, ...]) -> str:
    return {int: "0", float: "0.5", str: "text", bool: "True"}[types[-1]]
