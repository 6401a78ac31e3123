"""The GitHub Actions workflows: valid for actionlint (installed by the test extra), and calling the
same `make` targets as the README's commands; the book's deploy and cache settings as promised."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
MAKE = re.compile(r"(?:^|[\s;&|(])make\s+([a-z][\w-]*)")


def _actionlint() -> str:
    path = shutil.which("actionlint", path=str(Path(sys.executable).parent))
    assert path, ("actionlint is not installed in this environment: install the test extra "
                  "(make install, or pip install -c constraints.txt -e '.[test]')")
    return path


def _runs(workflow: Path) -> list[str]:
    doc = yaml.safe_load(workflow.read_text())
    return [step["run"] for job in doc["jobs"].values() for step in job.get("steps", [])
            if "run" in step]


def _readme_targets() -> set[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    return {t for block in blocks for line in block.splitlines()
            for t in MAKE.findall(line.split("#", 1)[0])}


def test_there_are_the_two_workflows():
    assert {w.name for w in WORKFLOWS} == {"book.yml", "ci.yml"}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_passes_actionlint(workflow):
    out = subprocess.run([_actionlint(), "-no-color", str(workflow)], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    """The check above can fail: a job that needs a job that does not exist, a bad expression."""
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  deploy:\n    needs: build\n    runs-on: ubuntu-latest\n"
                   "    steps:\n      - run: echo ${{ github.nope }\n")
    out = subprocess.run([_actionlint(), "-no-color", str(bad)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "build" in out.stdout


def test_workflows_call_the_readme_commands():
    readme = _readme_targets()
    assert {"book", "test"} <= readme, readme
    for workflow in WORKFLOWS:
        for run in _runs(workflow):
            used = set(MAKE.findall(run))
            assert used <= readme, f"{workflow.name} runs make {used - readme}, not in the README"
    assert "make book" in [r.strip() for r in _runs(REPO / ".github/workflows/book.yml")]
    assert "bash .ci/run" in [r.strip() for r in _runs(REPO / ".github/workflows/ci.yml")]
    ci_run = (REPO / ".ci" / "run").read_text()
    assert set(MAKE.findall(ci_run)) == {"test"}, ".ci/run runs the README's make test"


def test_book_workflow_deploys_and_caches_as_promised():
    doc = yaml.safe_load((REPO / ".github/workflows/book.yml").read_text())
    on = doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` as True
    assert on["push"]["branches"] == ["main"]
    ci = yaml.safe_load((REPO / ".github/workflows/ci.yml").read_text())
    assert "pull_request" in ci.get("on", ci.get(True))
    build, deploy = doc["jobs"]["build"], doc["jobs"]["deploy"]
    uses = {s.get("uses", "").split("@")[0]: s for s in build["steps"]}
    assert uses["actions/upload-pages-artifact"]["with"]["path"] == "_build/html"
    assert deploy["needs"] == "build"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["steps"][0]["uses"].startswith("actions/deploy-pages@")
    caches = {s["with"]["path"]: s["with"] for s in build["steps"]
              if s.get("uses", "").startswith("actions/cache@")}
    assert set(caches) == {"~/.cache/pip", "data"}, "pip's cache and $CELLULIB_HOME (./data)"
    deps = "hashFiles('pyproject.toml', 'constraints.txt')"
    models = caches["data"]
    assert deps in models["key"] and "hashFiles('cellulib/**', 'notebooks/**')" in models["key"]
    # a model cache of other package versions is never restored (the cache's own key covers the
    # data, settings and training code, not the packages)
    restore = [k.strip() for k in models["restore-keys"].splitlines() if k.strip()]
    assert restore and all(deps in key for key in restore)
    artifact = next(s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert artifact["if"] == "always()" and artifact["with"]["path"] == "book/chapters"
    names = next(s for s in build["steps"] if s.get("name") == "Name the chapter that failed")
    assert names["if"] == "failure()" and ".ipynb.tmp.ipynb" in names["run"]
    makefile = (REPO / "Makefile").read_text()
    assert "export CELLULIB_HOME ?= $(CURDIR)/data" in makefile, "the cached folder is the Makefile's"
    assert "$@.tmp.ipynb" in makefile and "FAILED: chapter" in makefile


def test_failed_chapter_step_names_the_chapter(tmp_path):
    """The failure step's script, run on a folder where one chapter's papermill copy remained."""
    doc = yaml.safe_load((REPO / ".github/workflows/book.yml").read_text())
    script = next(s["run"] for s in doc["jobs"]["build"]["steps"]
                  if s.get("name") == "Name the chapter that failed")
    chapters = tmp_path / "book" / "chapters"
    chapters.mkdir(parents=True)
    (chapters / "01_ok.ipynb").write_text("{}")
    (chapters / "02_weak_segmentation.ipynb.tmp.ipynb").write_text("{}")
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stdout.startswith("::error file=notebooks/02_weak_segmentation.ipynb::chapter "
                                 "02_weak_segmentation failed"), out.stdout
    (chapters / "02_weak_segmentation.ipynb.tmp.ipynb").unlink()
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and "no chapter failed" in out.stdout
