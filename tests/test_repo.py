"""Repository hygiene: dependency lists agree, notebooks carry no outputs, the code is ruff-clean."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from cellulib.bench.lab import KERNEL_DISPLAY_NAME, KERNEL_NAME

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]*_*.ipynb"))  # 02b_... too


def _normalise(spec: str) -> tuple[str, str]:
    req = Requirement(spec)
    return req.name.lower().replace("_", "-"), str(req.specifier)


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pyproject = set(map(_normalise, project["dependencies"]))
    for extra in project["optional-dependencies"].values():
        pyproject |= set(map(_normalise, extra))
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = {_normalise(s) for s in pip_section if not s.startswith("-e")}
    assert conda == pyproject, f"only in pyproject: {pyproject - conda}; only in environment.yml: {conda - pyproject}"
    assert "python=3.11" in env["dependencies"]


def test_constraints_pin_every_dependency_exactly():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for e in project["optional-dependencies"].values() for s in e]
    from conftest import constraint_pins

    pins = constraint_pins()
    for spec in specs:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {spec}"
    assert pins["torch"] == "2.13.0" and pins["torchvision"] == "0.28.0"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_sources_are_clean(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    assert cells[0]["cell_type"] == "markdown" and "".join(cells[0]["source"]).startswith("# ")
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and cells.index(tagged[0]) == 1, "the second cell must be the parameters cell"
    # nbformat 4.5 cell ids (a missing one is a MissingIDFieldWarning at every execution, and
    # "will become a hard error in future nbformat versions"), each unique
    ids = [cell.get("id") for cell in cells]
    assert None not in ids, f"{path.name}: cells {[i for i, x in enumerate(ids) if x is None]} have no id"
    assert len(set(ids)) == len(ids), f"{path.name}: cell ids repeat"
    for cell in cells:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, (
                f"{path.name}: committed notebooks carry no outputs"
            )
            compile("".join(cell["source"]), path.name, "exec")  # every code cell parses
    # the project's kernel (`make install` registers it), so papermill and JupyterLab agree
    assert nb["metadata"]["kernelspec"] == {"display_name": KERNEL_DISPLAY_NAME, "language": "python",
                                            "name": KERNEL_NAME}


#: Issue 24: a chapter is a chapter, not a script. Code lines are the non-blank lines that are not
#: comments; the parameters cell (one line per parameter, with its help) is not counted.
CHAPTER_CODE_LINES, CELL_CODE_LINES = 100, 15


def _code_lines(source: str) -> int:
    return sum(1 for line in source.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def test_code_lines_are_counted_by_hand():
    assert _code_lines("import a\n\n# a comment\n    x = 1  # kept\n   \n") == 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapters_are_thin(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"
             and "parameters" not in c.get("metadata", {}).get("tags", [])]
    sizes = [_code_lines("".join(c["source"])) for c in cells]
    assert sum(sizes) <= CHAPTER_CODE_LINES, f"{path.name}: {sum(sizes)} code lines; move logic into cellulib"
    fat = [(i, n) for i, n in enumerate(sizes) if n > CELL_CODE_LINES]
    assert not fat, f"{path.name}: code cells (index among code cells, lines) over {CELL_CODE_LINES}: {fat}"


def test_toc_lists_only_existing_pages():
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    # written by `python -m cellulib.bench.bookstatus`
    generated = {"book/chapters/status", "book/chapters/teachers"}
    for file in files:
        if file in generated:
            continue
        if file.startswith("book/chapters/"):
            source = REPO / "notebooks" / (Path(file).name + ".ipynb")
        else:
            source = REPO / (file + ".md")
        assert source.exists(), f"_toc.yml lists {file} but {source} does not exist"
    listed = {Path(f).name for f in files}
    assert {p.stem for p in NOTEBOOKS} <= listed, "every chapter notebook is in the table of contents"


def test_ruff_clean():
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "cellulib", "tests"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
