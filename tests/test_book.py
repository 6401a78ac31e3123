"""The book end to end: every chapter executed with tiny parameters through papermill, the book built
with warnings as errors, the HTML checked, and the intro and chapter 1 rendered in headless Chromium."""

import contextlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cellulib.bench import bookstatus

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Tiny parameters per chapter: enough to run every cell, small enough for the test budget. Every
# chapter reads the same tiny dataset, and later chapters reuse the models cached by earlier ones.
# The real data is read from a copy whose BRCA-M2C holds 15 of its 90 images (_chapter_environment):
# the real sections' cost goes with the images, not with these parameters (the quick build took
# about 400 s with all 90 and 200 s with 15, every glued value present in both).
DATA = {"n_train": 24, "n_val": 8, "n_cells": 6, "size": 128}
SEG = {"crop": 64, "patches_per_epoch": 1}
TINY = {
    "01_data_exploration": {**DATA, "n_examples": 4},
    "02_weak_segmentation": {**DATA, **SEG, "epochs": 1},
    # BRCA-M2C from ../shared when present (its section is skipped otherwise); the synthetic network
    # is chapter 2's, from the cache
    # cli_recipe: the command line's recipe (class weights) trained for one epoch, so that its
    # section runs; the paper profile has no recipe of its own for the command line
    "02b_real_he": {**DATA, "epochs": 1, "crop": 64, "patches_per_epoch": 1, "seg_epochs": 1,
                    "seg_crop": 64, "seg_patches_per_epoch": 1, "n_boot": 100,
                    "cli_recipe": True, "cli_epochs": 1},
    "03_feature_importance": {**DATA, **SEG, "seg_epochs": 1, "sr_epochs": 1,
                              "sr_finetune_epochs": 1, "gbt_rounds": 20, "n_boot": 100},
    "04_direct_regression_vs_classification": {**DATA, "epochs": 1, "input_size": 64,
                                               "n_boot": 100},
    # every model from the cache of chapters 2-4 and 2b, except the two retrained with stain jitter
    "04b_stain_shift": {**DATA, **SEG, "seg_epochs": 1, "sr_epochs": 1, "sr_finetune_epochs": 1,
                        "gbt_rounds": 20, "epochs": 1, "input_size": 64, "real_epochs": 1,
                        "real_crop": 64, "real_patches_per_epoch": 1, "n_boot": 100},
    # the six models and the BRCA-M2C FPN from the cache; GBT and SR retrained on the FPN's maps
    "04c_real_tissue": {**DATA, **SEG, "seg_epochs": 1, "sr_epochs": 1, "sr_finetune_epochs": 1,
                        "gbt_rounds": 20, "epochs": 1, "input_size": 64, "real_epochs": 1,
                        "real_crop": 64, "real_patches_per_epoch": 1, "n_boot": 100},
    "05_discussion": {**DATA, **SEG, "seg_epochs": 1, "sr_epochs": 1, "sr_finetune_epochs": 1,
                      "gbt_rounds": 20, "epochs": 1, "input_size": 64, "real_epochs": 1,
                      "real_crop": 64, "real_patches_per_epoch": 1, "n_boot": 100},
}

# The paper profile with the same tiny sizes, so that every line reading the paper's settings runs
# (decaying schedules, the direct models' input at the segmentation scale: no input_size given).
PAPER_TINY = {name: {k: v for k, v in params.items()
                     if k not in ("input_size", "cli_recipe", "cli_epochs")}
              for name, params in TINY.items()}

# The paper profile trimmed to fit a 15-minute GPU lease (.ci/gpu-check, PAPER=lease): the paper's
# 512 px patches, batch sizes, rates and schedules, with fewer patches and epochs. Chapters share
# models through the cache, so later chapters repeat the earlier ones' settings.
DATA_LEASE = {"n_train": 120, "n_val": 40, "n_cells": 40}
CASCADE_LEASE = {**DATA_LEASE, "seg_epochs": 10, "sr_epochs": 6, "sr_finetune_epochs": 2}
PAPER_LEASE = {
    "01_data_exploration": DATA_LEASE,
    "02_weak_segmentation": {**DATA_LEASE, "epochs": 10},
    "02b_real_he": {**DATA_LEASE, "epochs": 10, "seg_epochs": 10, "n_boot": 500},
    "03_feature_importance": {**CASCADE_LEASE, "n_boot": 500},
    "04_direct_regression_vs_classification": {**DATA_LEASE, "epochs": 8, "n_boot": 500},
    "04b_stain_shift": {**CASCADE_LEASE, "epochs": 8, "real_epochs": 10, "n_boot": 500},
    "04c_real_tissue": {**CASCADE_LEASE, "epochs": 8, "real_epochs": 10, "n_boot": 500},
    "05_discussion": {**CASCADE_LEASE, "epochs": 8, "real_epochs": 10, "n_boot": 500},
}

# Numbered figures each chapter shows (glued PNGs with captions).
FIGURES = {
    "01_data_exploration": 8,
    "02_weak_segmentation": 2,
    "02b_real_he": 5,
    "03_feature_importance": 6,
    "04_direct_regression_vs_classification": 5,
    "04b_stain_shift": 5,
    "04c_real_tissue": 1,
    "05_discussion": 0,
}

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _chapter_environment(tmp_path_factory, home: Path):
    """For the block, ``CELLULIB_HOME`` is ``home`` and, when the real data is there,
    ``CELLULIB_REAL_DATA`` names a copy of it with 15 of BRCA-M2C's 90 images
    (`conftest.make_small_real_data`); without real data the chapters skip their real-data
    sections, as a fresh laptop's would. papermill's kernels inherit both."""
    from conftest import make_small_real_data

    from cellulib.data import paths

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CELLULIB_HOME", str(home))
        real = paths.real_dir()
        if real is not None:
            copy = make_small_real_data(real, tmp_path_factory.mktemp("real") / "real")
            mp.setenv(paths.REAL_DATA_ENV, str(copy))
        yield


def _toc_chapters() -> list[str]:
    """The executed chapters in the table of contents (not the pages cellulib.bench.bookstatus writes)."""
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    return [Path(f).name for f in files
            if f.startswith("book/chapters/") and Path(f).name[:2].isdigit()]


@pytest.fixture(scope="module")
def built_book(tmp_path_factory, project_kernel):
    """Execute every chapter into a copy of the book with the project's kernel, fold each one's
    parameters, write the status and teachers' pages as `make chapters` does, and build it;
    returns the HTML folder."""
    import papermill

    root = tmp_path_factory.mktemp("book")
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "book", root / "book", ignore=shutil.ignore_patterns("chapters", "exercises"))
    chapters = root / "book" / "chapters"
    chapters.mkdir()
    home = tmp_path_factory.mktemp("cellulib_home")
    # the kernel inherits both: a fresh, tiny dataset, and the real data with a small BRCA-M2C copy
    with _chapter_environment(tmp_path_factory, home):
        for name in _toc_chapters():
            assert name in TINY, f"add tiny test parameters for chapter {name}"
            papermill.execute_notebook(
                str(REPO / "notebooks" / f"{name}.ipynb"),
                str(chapters / f"{name}.ipynb"),
                parameters={"profile": "quick", "seed": 0, **TINY[name]},
                cwd=str(chapters),
                kernel_name=project_kernel,
                progress_bar=False,
            )
            bookstatus.fold_parameters(chapters / f"{name}.ipynb")
    history = home / "book-history.json"  # recorded first, as `make chapters` does
    bookstatus.record_history(chapters, history, cache_dir=home)
    bookstatus.write_status(chapters, chapters / "status.md", notebooks_dir=REPO / "notebooks",
                            history=history)
    bookstatus.write_teachers(chapters, chapters / "teachers.md", REPO / "notebooks", history,
                              cache_dir=home)
    out = subprocess.run(
        [str(BIN / "jupyter-book"), "build", str(root), "--warningiserror", "--nitpick", "--keep-going"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return root / "_build" / "html"


def _glued(notebook: Path, mime: str = "text/plain") -> dict[str, str]:
    """The values a chapter glued (myst-nb's records), as text (``mime="text/markdown"``: the
    glued Markdown's own text, where text/plain holds only its repr)."""
    import nbformat

    values = {}
    for cell in nbformat.read(notebook, as_version=4).cells:
        for output in cell.get("outputs", []):
            record = output.get("metadata", {}).get("scrapbook", {})
            text = output.get("data", {}).get(record.get("mime_prefix", "") + mime)
            if record.get("name") and text is not None:
                values[record["name"]] = text
    return values


def test_no_chapter_prints_a_warning(built_book):
    """A warning printed by a cell (pandas, numpy, torch) would show in the rendered page as a stray
    stderr block: none may. The library's MetricWarning is let through: it states something true
    of the data (a metric undefined on some bootstrap resamples), which the tiny models cause."""
    import nbformat

    chapters = built_book.parent.parent / "book" / "chapters"
    printed = []
    for name in _toc_chapters():
        for i, cell in enumerate(nbformat.read(chapters / f"{name}.ipynb", as_version=4).cells):
            for output in cell.get("outputs", []):
                text = "".join(output.get("text", "")) if output.get("name") == "stderr" else ""
                if re.search(r"(?<!Metric)Warning\b", text):
                    printed.append(f"{name}, cell {i}: {text.strip()[:300]}")
    assert not printed, "\n".join(printed)


def test_every_chapter_page_has_its_figures(built_book):
    for name in _toc_chapters():
        page = built_book / "book" / "chapters" / f"{name}.html"
        assert page.exists(), f"{page} missing"
        html = page.read_text()
        assert "Traceback" not in html and "Error" not in html.split("<body")[1][:200]
        assert "&lt;Figure size" not in html, f"{name}: a figure was glued as text, not as an image"
        images = [p for p in html.split('src="')[1:] if p.split('"')[0].endswith((".png", ".svg"))]
        assert len(images) >= FIGURES[name], f"{name}: expected {FIGURES[name]} figures, found {len(images)}"
        for src in images:
            assert (page.parent / src.split('"')[0]).resolve().exists(), src.split('"')[0]
        numbered = re.findall(r'<span class="caption-number">Fig(?:ure|\.) [\d.]+', html)
        assert len(numbered) >= FIGURES[name], f"{name}: figures are numbered with captions"


def test_every_chapter_page_folds_its_parameters_into_one_block(built_book):
    for name in _toc_chapters():
        html = (built_book / "book" / "chapters" / f"{name}.html").read_text()
        assert html.count("Parameters of this run") == 1, name
        block = html.split("Parameters of this run")[1]
        # papermill's injected cell (it starts with the comment "# Parameters") is shown once:
        # inside the block, beside the defaults
        assert html.count("# Parameters</span>") == 1 and "# Parameters</span>" in block, name
        assert "profile" in block and "seed" in block, name
        assert f'content="notebooks/{name}.ipynb"' in html, f"{name}: no source-notebook link"


def test_teachers_page_shows_the_times_of_this_build(built_book):
    html = (built_book / "book" / "chapters" / "teachers.html").read_text()
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html))
    assert "For teachers" in text and "make lab" in text and "SOLUTIONS=hide" in text
    for name in _toc_chapters():
        assert name in text, f"{name} missing from the teachers' page"
    # chapter 2 trained its networks in this build (a fresh cache): its from-scratch time is shown
    row = html.split(">02_weak_segmentation<")[1].split("</tr>")[0]  # the table, not the sidebar
    assert re.search(r"\d+ s", row), row


def test_every_executed_chapter_glues_the_numbers_of_its_prose(built_book):
    """The executed chapters (parameters folded, as the book shows them): every number in the
    prose is glued or on the allow-list (`cellulib.bench.bookstatus.unglued_numbers`)."""
    from test_prose import PENDING

    chapters = built_book.parents[1] / "book" / "chapters"
    typed = [f"{name} cell {i}: ...{text}..." for name in _toc_chapters() if name not in PENDING
             for _, i, text in bookstatus.unglued_numbers(chapters / f"{name}.ipynb")]
    assert not typed, "numbers typed in the prose, glue them:\n" + "\n".join(typed)


def test_quick_real_he_chapter_trains_the_fpn_alone(built_book):
    """Issue 21: the quick profile trains one decoder on BRCA-M2C and says how to compare both
    (the paper build of `test_chapters.py` trains and compares them)."""
    from cellulib.data import paths

    if paths.brca_m2c_dir() is None:
        pytest.skip("BRCA-M2C not found: the real-H&E chapter skipped its sections")
    glued = _glued(built_book.parents[1] / "book" / "chapters" / "02b_real_he.ipynb", "text/markdown")
    assert "trains the FPN for 1 epochs" in glued["training_md"]
    assert "`-p compare_decoders True`" in glued["training_md"]
    assert "This build trains one decoder on real nuclei, the **FPN**" in glued["detection_md"]
    assert "U-Net" not in glued["detection_md"]


def test_status_page_lists_every_chapter(built_book):
    html = (built_book / "book" / "chapters" / "status.html").read_text()
    assert "Execution status" in html and "torch" in html
    for name in _toc_chapters():
        assert name in html, f"{name} missing from the status page"
    # a build from an empty cache: measured against the goal for the whole book from scratch
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html))
    assert re.search(r"In this build these \d+ chapters took \d+ s, every model trained: \d+% of "
                     r"the 15-minute goal \((met|not met)\)", text), text[-1500:]
    assert text.count("from scratch") >= len(_toc_chapters()) + 1, "each chapter, and the legend"


def test_intro_and_references_pages(built_book):
    intro = (built_book / "book" / "intro.html").read_text()
    assert "papermill" in intro and "01_data_exploration" in intro
    refs = (built_book / "book" / "references.html").read_text()
    assert "Rakhlin" in refs and "Shrout" in refs


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.parametrize("page", ["book/intro.html", "book/chapters/01_data_exploration.html"])
def test_page_renders_in_headless_chromium(built_book, page, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    shot = tmp_path / "shot.png"
    cmd = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1280,1600",
        "--virtual-time-budget=5000", f"--screenshot={shot}", (built_book / page).as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.exists(), "chromium wrote no screenshot"
    img = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert img.shape[:2] == (1600, 1280)
    non_white = (img.min(axis=2) < 200).mean()
    assert non_white > 0.02, f"page looks blank ({non_white:.1%} non-white pixels)"
    assert len(np.unique(img.reshape(-1, 3)[::7], axis=0)) > 50, "page has almost no distinct colours"
    # text is laid out in rows: many rows hold dark pixels, not just one block
    dark_rows = (img.min(axis=2) < 100).any(axis=1).mean()
    assert dark_rows > 0.1, f"too little dark text ({dark_rows:.1%} of rows)"

