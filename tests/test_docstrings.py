"""Every "used in chapter N" in the library's docstrings is true: the chapter's code calls the object.

A docstring that claims a chapter uses a function, class, method or module is checked against the
code cells of that chapter's source notebook: the object's name must appear there as a name, or,
for a claim that says "through X", X's name must. Chapters are the book's numbers (1-5) and the two
named chapters beyond the paper (the real-H&E, the stain-shift and the real-tissue chapter).
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cellulib"
NOTEBOOKS = REPO / "notebooks"

NAMED = {"real-H&E": "2b", "stain-shift": "4b", "real-tissue": "4c"}
CLAIM = re.compile(
    r"[Uu]sed\s+(?:in|by)\s+(?:the\s+)?"
    r"(?:(?P<named>real-H&E|stain-shift|real-tissue)\s+chapter"
    r"|chapters?\s+(?P<numbers>\d(?:\s*(?:-|to|,|and|,\s*and)\s*\d)*)(?P<rest>(?:`[^`]*`|[^.;`])*))")


def _chapter_code() -> dict[str, str]:
    code = {}
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]*_*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        key = path.name.split("_")[0].lstrip("0") or "0"
        code[key] = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    return code


def _numbers(text: str) -> list[str]:
    """'3-5' -> 3 4 5; '2 to 5' -> 2..5; '3, 4 and 5' -> 3 4 5."""
    out = [int(d) for d in re.findall(r"\d", text)]
    for lo, hi in re.findall(r"(\d)\s*(?:-|to)\s*(\d)", text):
        out.extend(range(int(lo), int(hi) + 1))
    return [str(n) for n in sorted(set(out))]


def _claims():
    """(module file, object name, chapter, names that satisfy the claim, docstring excerpt)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        objects = [(path.stem, tree)]
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                objects.append((node.name, node))
        for name, node in objects:
            doc = " ".join((ast.get_docstring(node) or "").split())
            for m in CLAIM.finditer(doc):
                if m.group("named"):
                    chapters = [NAMED[m.group("named")]]
                    rest = re.match(r"(?:`[^`]*`|[^.;`])*", doc[m.end():]).group(0)
                else:
                    chapters = _numbers(m.group("numbers"))
                    rest = m.group("rest")
                names = {name}
                if rest.lstrip().startswith("through"):  # indirect: the chapter calls what it names
                    names = set(re.findall(r"`(?:[\w.]+\.)?(\w+)`", rest)) or names
                for chapter in chapters:
                    yield path.name, name, chapter, names, m.group(0)


CLAIMS = list(_claims())


def test_the_check_finds_the_claims():
    # the library makes many such claims; a regex that matched none would pass vacuously
    assert len(CLAIMS) > 50
    assert _numbers("3-5") == ["3", "4", "5"] and _numbers("3, 4 and 5") == ["3", "4", "5"]
    assert _numbers("2 to 5") == ["2", "3", "4", "5"] and _numbers("1 and 2") == ["1", "2"]


@pytest.mark.parametrize("module, name, chapter, names, claim", CLAIMS,
                         ids=[f"{c[0]}:{c[1]}:ch{c[2]}" for c in CLAIMS])
def test_used_in_chapter_claims_are_true(module, name, chapter, names, claim):
    code = _chapter_code()
    assert chapter in code, f"{module}: {name} claims {claim!r}, but there is no chapter {chapter}"
    found = [n for n in names if re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", code[chapter])]
    assert found, (f"{module}: the docstring of {name} says {claim!r}, but chapter {chapter}'s "
                   f"code never names {' or '.join(sorted(names))}")


def _modules() -> list[str]:
    return sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                  for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


@pytest.mark.parametrize("module", _modules())
def test_docstring_examples_run(module):
    """The examples in the library's docstrings are what the code returns (no module ran them
    before: ``disc_kernel(3)``'s example showed a cross where the code gives a full square)."""
    import doctest
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(importlib.import_module(module), report=True,
                                 optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0, f"{module}: {result.failed} of {result.attempted} examples failed"
