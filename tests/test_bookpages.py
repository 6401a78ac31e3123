"""The book's comforts and its teachers' page: each chapter's parameters folded into one collapsed
block (on a notebook papermill executed), the "source notebook" link, the exercises' solutions
removed on request, and the history of build times behind the teachers' page."""

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import status_rows

from cellulib.bench import bookstatus

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARAMS = 'a = 1  # the first value\nname = "x"  # a label\n'


def _notebook(path: Path, cells: list[dict], kernel: str = "cellulib") -> Path:
    nb = {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python (cellulib)",
                                                      "language": "python", "name": kernel}},
          "nbformat": 4, "nbformat_minor": 5}
    for i, cell in enumerate(cells):
        cell.setdefault("id", f"cell-{i}")
        cell.setdefault("metadata", {})
        cell["source"] = cell["source"].splitlines(keepends=True)
        if cell["cell_type"] == "code":
            cell.setdefault("outputs", [])
            cell.setdefault("execution_count", None)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _demo_source(tmp_path: Path) -> Path:
    return _notebook(tmp_path / "01_demo.ipynb", [
        {"cell_type": "markdown", "source": "# A demo chapter\n\nIt prints twice its parameter."},
        {"cell_type": "code", "source": PARAMS, "metadata": {"tags": ["parameters"]}},
        {"cell_type": "code", "source": "print('twice a:', 2 * a, name)"},
    ])


@pytest.fixture
def executed(tmp_path, project_kernel):
    """The demo chapter executed by papermill with the project's kernel and two new values."""
    import papermill

    out = tmp_path / "book" / "chapters" / "01_demo.ipynb"
    out.parent.mkdir(parents=True)
    papermill.execute_notebook(str(_demo_source(tmp_path)), str(out), parameters={"a": 3},
                               kernel_name=project_kernel, progress_bar=False, cwd=str(tmp_path))
    return out


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _text(cell: dict) -> str:
    return "".join(cell["source"])


def test_fold_parameters_makes_one_block_of_defaults_and_injected_values(executed):
    before = _cells(executed)
    assert [c.get("metadata", {}).get("tags") for c in before[1:3]] == [
        ["parameters"], ["injected-parameters"]]
    assert "twice a: 6 x" in "".join(before[3]["outputs"][0]["text"]), "papermill ran with the kernel"

    assert bookstatus.fold_parameters(executed) is True
    cells = _cells(executed)
    assert len(cells) == len(before) + 1
    assert "remove-cell" in cells[1]["metadata"]["tags"]
    assert "remove-cell" in cells[2]["metadata"]["tags"]
    block = cells[3]
    assert block["cell_type"] == "markdown"
    assert block["metadata"]["tags"] == [bookstatus.PARAMETERS_BLOCK_TAG]
    text = _text(block)
    assert text.startswith("::::{dropdown} Parameters of this run\n") and text.endswith("\n::::")
    # both sources, verbatim, in that order: the defaults with their comments, then papermill's
    assert PARAMS.rstrip() in text and _text(cells[2]).strip() in text
    assert text.index(PARAMS.rstrip()) < text.index("a = 3")
    assert [c["source"] for c in cells[:3]] == [c["source"] for c in before[:3]], "sources unchanged"
    # nbformat's layout, and a second fold changes nothing
    raw = executed.read_text(encoding="utf-8")
    assert raw == json.dumps(json.loads(raw), indent=1, ensure_ascii=False) + "\n"
    assert bookstatus.fold_parameters(executed) is False
    assert executed.read_text(encoding="utf-8") == raw


def test_fold_without_injected_values_says_the_defaults_apply(tmp_path):
    src = _demo_source(tmp_path)
    assert bookstatus.fold_parameters(src) is True
    cells = _cells(src)
    assert "the defaults apply" in _text(cells[2]) and "a = 1" in _text(cells[2])
    plain = _notebook(tmp_path / "plain.ipynb", [{"cell_type": "code", "source": "x = 1"}])
    assert bookstatus.fold_parameters(plain) is False


def test_fold_names_a_broken_notebook(tmp_path):
    bad = tmp_path / "broken.ipynb"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="broken.ipynb: not a readable notebook"):
        bookstatus.fold_parameters(bad)
    out = subprocess.run([sys.executable, "-m", "cellulib.bench.bookstatus", "--fold", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "broken.ipynb" in out.stderr and "Traceback" not in out.stderr


def test_chapter_page_shows_one_collapsed_parameters_block_and_a_source_link(executed, tmp_path):
    """A one-chapter book with the real configuration: the folded parameters are one closed
    dropdown, the parameter cells are not shown beside it, and the header gets a link to the
    chapter's source notebook (set by the book's JavaScript, checked in headless Chromium)."""
    bookstatus.fold_parameters(executed)
    root = executed.parents[2]
    shutil.copy(REPO / "_config.yml", root / "_config.yml")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n"
                                   "  - file: book/chapters/01_demo\n")
    (root / "book" / "intro.md").write_text("# Intro\n\nA test book.\n")
    for name in ("_ext", "_static", "references.bib"):
        src = REPO / "book" / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / "book" / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLULIB_REPOSITORY")}
    out = subprocess.run([str(BIN / "jupyter-book"), "build", str(root), "--warningiserror",
                          "--nitpick"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    page = root / "_build" / "html" / "book" / "chapters" / "01_demo.html"
    html = page.read_text()
    assert html.count("Parameters of this run") == 1
    dropdown = html.split("Parameters of this run")[1]
    assert "<details" in html.split("Parameters of this run")[0][-400:], "not a dropdown"
    assert " open" not in html.split("Parameters of this run")[0][-400:], "the block starts closed"
    assert html.count("the first value") == 1 and "the first value" in dropdown, (
        "the parameters cell is shown outside the block")
    assert "twice a: 6 x" in html
    assert '<meta name="cellulib-source" content="notebooks/01_demo.ipynb">' in html
    href = "../../../../notebooks/01_demo.ipynb"
    assert f'<meta name="cellulib-source-href" content="{href}">' in html
    assert "source-link.js" in html
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=5000", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    link = dom.split('id="cellulib-source-link"')[1].split(">")[0] if "cellulib-source-link" in dom else ""
    assert f'href="{href}"' in link, "the header has no link to the source notebook"


def test_source_link_points_at_the_configured_repository_only(monkeypatch):
    sys.path.insert(0, str(REPO / "book" / "_ext"))
    try:
        import source_link
    finally:
        sys.path.pop(0)

    class App:
        class config:
            html_theme_options = {}

    page, src = "book/chapters/02_x", "notebooks/02_x.ipynb"
    monkeypatch.delenv("CELLULIB_REPOSITORY_URL", raising=False)
    assert source_link._href(App, page, src) == "../../../../notebooks/02_x.ipynb"
    monkeypatch.setenv("CELLULIB_REPOSITORY_URL", "https://example.org/o/r")
    monkeypatch.setenv("CELLULIB_REPOSITORY_REF", "abc123")
    assert source_link._href(App, page, src) == "https://example.org/o/r/blob/abc123/notebooks/02_x.ipynb"
    App.config.html_theme_options = {"repository_url": source_link._JUPYTER_BOOK_DEFAULT}
    assert source_link._href(App, page, src).startswith("https://example.org/o/r/"), (
        "Jupyter Book's own default is no repository of this book")
    App.config.html_theme_options = {"repository_url": "https://example.com/a/b/",
                                     "repository_branch": "dev"}
    assert source_link._href(App, page, src) == "https://example.com/a/b/blob/dev/notebooks/02_x.ipynb"


def test_hide_solutions_keeps_the_exercises(tmp_path):
    copy = tmp_path / "01_data_exploration.ipynb"
    shutil.copy(REPO / "notebooks" / copy.name, copy)
    text = "".join(_text(c) for c in _cells(copy))
    n_solutions, n_exercises = text.count("{solution-start}"), text.count("```{exercise}")
    assert n_solutions == 2 and n_exercises == 2
    assert bookstatus.hide_solutions(copy) == n_solutions
    after = "".join(_text(c) for c in _cells(copy))
    assert "solution-start" not in after and "solution-end" not in after
    assert "The synthetic dataset is regenerated" not in after  # the first solution's text
    assert after.count("```{exercise}") == n_exercises and ":label: ex-disc" in after
    assert bookstatus.hide_solutions(copy) == 0


# --------------------------------------------------------------------------------------------------
# the history of build times and the teachers' page
# --------------------------------------------------------------------------------------------------
T0 = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


def _executed_record(folder: Path, chapter: str, start: datetime, seconds: float,
                     parameters: dict) -> Path:
    """An executed chapter as papermill leaves it: only its metadata matters here."""
    path = _notebook(folder / f"{chapter}.ipynb",
                     [{"cell_type": "markdown", "source": f"# {chapter}"},
                      {"cell_type": "code", "source": "x = 1"}])
    nb = json.loads(path.read_text())
    nb["metadata"]["papermill"] = {
        "start_time": start.isoformat(), "end_time": (start + timedelta(seconds=seconds)).isoformat(),
        "duration": seconds, "exception": None, "parameters": parameters}
    path.write_text(json.dumps(nb, indent=1))
    return path


def _touch(path: Path, when: datetime) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"model")
    os.utime(path, (when.timestamp(), when.timestamp()))


def test_history_tells_scratch_from_cache_and_the_page_shows_both(tmp_path):
    notebooks, chapters, cache = tmp_path / "nb", tmp_path / "ch", tmp_path / "home"
    for d in (notebooks, chapters, cache):
        d.mkdir()
    for name in ("01_a", "02_b", "03_c"):
        _demo_source(notebooks).rename(notebooks / f"{name}.ipynb")
    history = tmp_path / "history.json"
    book = {"profile": "quick", "seed": 0}
    # first build: 01_a writes a model during its run, 02_b writes nothing, 03_c failed (not kept)
    _executed_record(chapters, "01_a", T0, 100.0, book)
    _executed_record(chapters, "02_b", T0 + timedelta(seconds=200), 20.0, book)
    _touch(cache / "models" / "seg-1.pt", T0 + timedelta(seconds=50))
    _touch(cache / "models" / "old.pt", T0 - timedelta(days=1))  # before any run: not counted
    runs = bookstatus.record_history(chapters, history, cache)
    assert [(r["chapter"], r["built"], r["files_written"], r["seconds"]) for r in runs] == [
        ("01_a", "scratch", 1, 100.0), ("02_b", "cache", 0, 20.0)]
    assert len(bookstatus.record_history(chapters, history, cache)) == 2, "no run twice"
    # second build: 01_a again, its model from the cache (12 s); 03_c for the first time
    later = T0 + timedelta(hours=1)
    _executed_record(chapters, "01_a", later, 12.0, book)
    _executed_record(chapters, "03_c", later + timedelta(seconds=30), 5.0, {"seed": 1})
    runs = bookstatus.record_history(chapters, history, cache)
    assert [(r["chapter"], r["built"]) for r in runs][2:] == [("01_a", "cache"), ("03_c", "cache")]
    assert json.loads(history.read_text())["runs"] == runs

    page = bookstatus.teachers_markdown(chapters, notebooks, history, cache)
    times, exercises = page.split("## Exercises in a few minutes")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in times.splitlines() if line.startswith("| `0")}
    assert rows["`01_a`"] == ["100 s", "12 s", "`-p profile quick -p seed 0`"]
    assert rows["`02_b`"][:2] == ["—", "20 s"]
    # each row names the parameters of the executed copy, and its times are runs with those
    assert rows["`03_c`"] == ["—", "5 s", "`-p seed 1`"]
    # the dash is explained once, under the table
    assert times.count("—: not measured on this machine yet.") == 1
    assert "The whole book from scratch: not measured on this machine yet (1 of 3 chapters seen)" in page
    assert "Every chapter from the cache: 37 s in all." in page  # 12 + 20 + 5
    # these chapters have no exercise parameters: their rows show the runs above
    assert exercises.count("| `-` |") == 3 and exercises.count("| — |") == 2
    assert exercises.count("—: not measured on this machine yet.") == 1
    assert "## Solutions" in page and "SOLUTIONS=hide" in page and "make lab" in page
    assert "With a new seed, run the chapters in the book's order" in exercises


def test_a_build_from_an_empty_model_cache_is_from_scratch_for_every_chapter(tmp_path):
    """A fresh `make book`: `make data` renders the synthetic set before the first chapter, so the
    data exploration writes nothing, yet it ran in a build from scratch, and the teachers' page
    gives the whole book's time (on 2026-12-07 it said "not measured (7 of 8 chapters seen)")."""
    notebooks, chapters, cache = tmp_path / "nb", tmp_path / "ch", tmp_path / "home"
    for d in (notebooks, chapters, cache):
        d.mkdir()
    for name in ("01_a", "02_b", "03_c"):
        _demo_source(notebooks).rename(notebooks / f"{name}.ipynb")
    history, book = tmp_path / "history.json", {"profile": "quick", "seed": 0}
    # make data renders the synthetic set before the chapters
    _touch(cache / "synth" / "train.tif", T0 - timedelta(minutes=2))
    _executed_record(chapters, "01_a", T0, 30.0, book)  # writes nothing
    _executed_record(chapters, "02_b", T0 + timedelta(seconds=40), 100.0, book)
    _touch(cache / "models" / "seg-1.pt", T0 + timedelta(seconds=120))
    _executed_record(chapters, "03_c", T0 + timedelta(seconds=150), 7.0, book)  # reads 02_b's model
    runs = bookstatus.record_history(chapters, history, cache)
    assert [(r["chapter"], r["built"], r["files_written"]) for r in runs] == [
        ("01_a", "scratch", 0), ("02_b", "scratch", 1), ("03_c", "scratch", 0)]
    page = bookstatus.teachers_markdown(chapters, notebooks, history, cache)
    assert "The whole book from scratch took 137 s here." in page  # 30 + 100 + 7
    # the status page measures this build against issue 21's goal for a build from scratch
    status = bookstatus.status_markdown(chapters, notebooks, history)
    assert _status_built(status) == {"01_a": "from scratch", "02_b": "from scratch",
                                     "03_c": "from scratch"}
    assert ("In this build these 3 chapters took 137 s, every model trained: 15% of the "
            "15-minute goal (met).") in status  # 137 / 900
    assert "within 15 min from a fresh clone" in status and "within 4 min re-executed" in status
    assert "neither goal applies, since the build history does not say how every chapter" in (
        bookstatus.status_markdown(chapters, notebooks))

    # a re-execution of the same book: the model is older than every new run, so all from the cache
    later = T0 + timedelta(hours=1)
    for i, name in enumerate(("01_a", "02_b", "03_c")):
        _executed_record(chapters, name, later + timedelta(seconds=20 * i), 10.0 + i, book)
    runs = bookstatus.record_history(chapters, history, cache)
    assert [r["built"] for r in runs[3:]] == ["cache", "cache", "cache"]
    status = bookstatus.status_markdown(chapters, notebooks, history)
    assert set(_status_built(status).values()) == {"from the cache"}
    assert ("these 3 chapters took 33 s, every model from the cache: 14% of the 4-minute goal "
            "(met).") in status  # (10 + 11 + 12) / 240
    # a model trained again after a run of the batch had started: one chapter wrote it, the
    # others that wrote nothing stay from the cache, since an older model was there
    _touch(cache / "models" / "gbt-2.pt", later + timedelta(hours=1, seconds=5))
    _executed_record(chapters, "02_b", later + timedelta(hours=1), 60.0, book)
    _executed_record(chapters, "03_c", later + timedelta(hours=1, seconds=70), 9.0, book)
    runs = bookstatus.record_history(chapters, history, cache)
    assert [(r["chapter"], r["built"]) for r in runs[6:]] == [("02_b", "scratch"),
                                                              ("03_c", "cache")]
    status = bookstatus.status_markdown(chapters, notebooks, history)
    assert _status_built(status) == {"01_a": "from the cache", "02_b": "from scratch",
                                     "03_c": "from the cache"}
    assert ("these 3 chapters took 79 s; neither goal applies, since some chapters trained "
            "models and others read them from the cache.") in status  # 10 + 60 + 9


def _status_built(page: str) -> dict[str, str]:
    """Chapter -> the status page's "built" column."""
    return {chapter: cells[2] for chapter, cells in status_rows(page).items()}


def test_history_refuses_a_damaged_file_naming_it(tmp_path):
    history = tmp_path / "book-history.json"
    history.write_text("[1, 2")
    (tmp_path / "ch").mkdir()
    with pytest.raises(ValueError, match="book-history.json: not a book history"):
        bookstatus.record_history(tmp_path / "ch", history, tmp_path)
    assert history.read_text() == "[1, 2", "nothing written over it"


def test_exercises_run_with_their_parameters_and_reach_the_teachers_page(tmp_path, project_kernel,
                                                                        monkeypatch):
    """`make exercises` in small: each chapter executed with the book's values plus its exercise
    parameters, folded, recorded in the history, and its time shown in the exercises' table."""
    notebooks, home = tmp_path / "nb", tmp_path / "home"
    notebooks.mkdir()
    monkeypatch.setenv("CELLULIB_HOME", str(home))
    _demo_source(notebooks).rename(notebooks / "02_weak_segmentation.ipynb")
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from cellulib.bench import bookstatus as b; "
         "b.EXERCISE_PARAMETERS['02_weak_segmentation'] = {'a': 5}; sys.exit(b.main(sys.argv[1:]))",
         "--execute-exercises", str(tmp_path / "ex"), "--notebooks", str(notebooks),
         "--chapters", str(tmp_path / "none"), "--teachers", str(tmp_path / "teachers.md")],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    executed = tmp_path / "ex" / "02_weak_segmentation.ipynb"
    cells = _cells(executed)
    printed = [o for c in cells if c["cell_type"] == "code" for o in c["outputs"]]
    assert "twice a: 10 x" in "".join(printed[0]["text"])
    assert any(bookstatus.PARAMETERS_BLOCK_TAG in c["metadata"].get("tags", []) for c in cells)
    runs = json.loads((home / "book-history.json").read_text())["runs"]
    assert [(r["chapter"], r["parameters"], r["built"]) for r in runs] == [
        ("02_weak_segmentation", {"profile": "quick", "seed": 0, "a": 5}, "cache")]
    # the page, written from a book built with the book's values, shows the exercise run's time
    monkeypatch.setitem(bookstatus.EXERCISE_PARAMETERS, "02_weak_segmentation", {"a": 5})
    book = tmp_path / "book"
    book.mkdir()
    _executed_record(book, "02_weak_segmentation", T0, 30.0, {"profile": "quick", "seed": 0})
    page = bookstatus.teachers_markdown(book, notebooks, home / "book-history.json", home)
    row = next(line for line in page.split("## Exercises")[1].splitlines()
               if "`02_weak_segmentation`" in line)
    assert row.startswith("| `02_weak_segmentation` | `-p a 5` |")
    assert f"| {runs[0]['seconds']:.0f} s |" in row


def test_later_exercises_reuse_the_models_the_earlier_exercises_trained():
    """A workshop runs the chapters in order with `-p seed 1`: the stain-shift and real-tissue
    chapters and the discussion read SR, the direct models and the BRCA-M2C network again, and
    without the earlier exercises' settings they trained the book's longer recipes anew (more than
    10 minutes for the stain-shift exercise on 2026-12-07)."""
    ex = bookstatus.EXERCISE_PARAMETERS
    trained = {"sr_epochs": ex["03_feature_importance"]["sr_epochs"],
               "sr_finetune_epochs": ex["03_feature_importance"]["sr_finetune_epochs"],
               "epochs": ex["04_direct_regression_vs_classification"]["epochs"],
               "real_epochs": ex["02b_real_he"]["epochs"]}
    for later in ("04b_stain_shift", "04c_real_tissue", "05_discussion"):
        assert {k: ex[later].get(k) for k in trained} == trained, later


def test_exercise_parameters_are_declared_by_their_chapters():
    """Every exercise parameter is one the chapter's parameters cell declares, of its type."""
    import ast

    chapters = {p.stem: p for p in (REPO / "notebooks").glob("[0-9][0-9]*_*.ipynb")}
    assert set(bookstatus.EXERCISE_PARAMETERS) == set(chapters)
    for name, params in bookstatus.EXERCISE_PARAMETERS.items():
        cell = next(c for c in _cells(chapters[name])
                    if "parameters" in c.get("metadata", {}).get("tags", []))
        declared = {node.target.id: ast.unparse(node.annotation)
                    for node in ast.parse(_text(cell)).body if isinstance(node, ast.AnnAssign)}
        for key, value in params.items():
            assert key in declared, f"{name} has no parameter {key!r}"
            assert type(value).__name__ in declared[key], f"{name}: {key} is {declared[key]}"
