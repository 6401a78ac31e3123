"""Chapters executed outside the quick build of `test_book.py`: every chapter in the paper profile
with tiny sizes, and the real-data chapters alone, on no real data and on a full BRCA-M2C copy with
its test split. A module of its own, so that `pytest -n 2` (`make test`) runs it beside the quick
build."""

import re

import pytest
from test_book import (
    PAPER_LEASE,
    PAPER_TINY,
    REPO,
    TINY,
    _chapter_environment,
    _glued,
    _toc_chapters,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def paper_chapters(tmp_path_factory):
    """Every chapter executed in the paper profile with tiny sizes; returns the executed folder.
    A cell that fails raises papermill's error naming the chapter and the cell. The real-H&E and
    stain-shift chapters read a five-image BRCA-M2C copy with a test split when the real copy is
    there (a float32 forward of one 500 px image takes seconds on these CPUs), and the other
    chapters the small real-data copy of the quick build."""
    import papermill
    from conftest import make_brca_full_copy

    from cellulib.data import paths

    out = tmp_path_factory.mktemp("paper")
    home = tmp_path_factory.mktemp("paper_home")
    brca = paths.brca_m2c_dir()
    real = ({"real_data": str(make_brca_full_copy(brca, tmp_path_factory.mktemp("brca") / "copy"))}
            if brca is not None else {})
    with _chapter_environment(tmp_path_factory, home):
        for name in _toc_chapters():
            papermill.execute_notebook(
                str(REPO / "notebooks" / f"{name}.ipynb"), str(out / f"{name}.ipynb"),
                parameters={"profile": "paper", "seed": 0, **PAPER_TINY[name],
                            **(real if name in ("02b_real_he", "04b_stain_shift", "04c_real_tissue",
                                                "05_discussion") else {})},
                cwd=str(out),
                kernel_name="python3", progress_bar=False)
    return out


def test_every_chapter_runs_in_the_paper_profile(paper_chapters):
    for name in _toc_chapters():
        notebook = paper_chapters / f"{name}.ipynb"
        assert notebook.exists(), f"{name} was not executed in the paper profile"
        text = notebook.read_text()
        assert '"output_type": "error"' not in text and "Traceback" not in text, name
    direct = _glued(paper_chapters / "04_direct_regression_vs_classification.ipynb")
    # the paper's direct models read the patch at the segmentation scale: 128 px / 2
    assert direct["direct_size"] == "64"
    assert direct["schedule_text"] == "'a learning rate decaying from 0.0001 to 1e-05'"
    seg = _glued(paper_chapters / "02_weak_segmentation.ipynb")
    assert seg["seg_epochs"] == "1" and seg["crop"] == "64"
    real = _glued(paper_chapters / "02b_real_he.ipynb", "text/markdown")
    if "detection_md" in real and "skipped" not in real["detection_md"]:
        # the paper profile trains both decoders on BRCA-M2C and tests the paper's ranking
        assert "FPN minus U-Net in pooled F is" in real["detection_md"]
        assert "the two took" in real["training_md"]


def test_lease_parameters_name_only_chapter_parameters():
    """.ci/gpu-check runs PAPER_LEASE on a GPU: every name must be a parameter of its chapter."""
    import nbformat

    for name in _toc_chapters():
        nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        declared = set(re.findall(r"^(\w+)\s*:", cell.source, flags=re.M))
        for params in (TINY[name], PAPER_TINY[name], PAPER_LEASE[name]):
            assert set(params) <= declared, (name, set(params) - declared)



# --------------------------------------------------------------------------------------------------
# the real-H&E chapter on other copies: none at all, and a full copy with a test split
# --------------------------------------------------------------------------------------------------
def _run_real_chapter(tmp_path, monkeypatch, chapter="02b_real_he", **parameters) -> str:
    """Execute a real-data chapter alone with tiny parameters; its outputs as one text."""
    import nbformat
    import papermill

    monkeypatch.setenv("CELLULIB_HOME", str(tmp_path / "home"))  # the kernel inherits it
    out = tmp_path / f"{chapter}.ipynb"
    papermill.execute_notebook(
        str(REPO / "notebooks" / f"{chapter}.ipynb"), str(out),
        parameters={"profile": "quick", "seed": 0, **TINY[chapter], **parameters},
        cwd=str(tmp_path), kernel_name="python3", progress_bar=False)
    texts = []
    for cell in nbformat.read(out, as_version=4).cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
            # glue(..., display=False) stores "application/papermill.record/text/markdown"
            texts.extend(str(v) for k, v in output.get("data", {}).items() if "text/" in k)
    return "\n".join(texts)


def test_real_chapter_without_data_says_it_skipped(tmp_path, monkeypatch):
    empty = tmp_path / "no-real-data"
    empty.mkdir()
    monkeypatch.setenv("CELLULIB_REAL_DATA", str(empty))
    text = _run_real_chapter(tmp_path, monkeypatch)
    assert "BRCA-M2C not found ($CELLULIB_REAL_DATA is" in text and "section was skipped" in text
    assert "Traceback" not in text


def test_real_tissue_chapter_without_data_says_it_skipped(tmp_path, monkeypatch):
    empty = tmp_path / "no-real-data"
    empty.mkdir()
    monkeypatch.setenv("CELLULIB_REAL_DATA", str(empty))
    text = _run_real_chapter(tmp_path, monkeypatch, chapter="04c_real_tissue")
    assert "BRCA-M2C not found ($CELLULIB_REAL_DATA is" in text and "section was skipped" in text
    assert "Traceback" not in text


def test_real_chapter_reports_the_test_split_of_a_full_copy(brca_full_copy, tmp_path, monkeypatch):
    text = _run_real_chapter(tmp_path, monkeypatch, real_data=str(brca_full_copy))
    assert "results on the test split" in text
    assert "The official test split (patients in neither) is present" in text
    # validation holds out whole patients, and the confusion matrix and published F are reported
    assert "patients it has not seen" in text and "DeNuC F (test)" in text
    assert "Of the matched nuclei" in text and "Traceback" not in text
    # the command line's recipe (trained here for one epoch) beside the chapter's FPN, on both splits
    assert "trains a longer recipe than this chapter's 1 epoch: 1 epoch with the class weights 4, 4, 4, 1" in text
    # scored at the threshold its file records (issue 22), which cellulib detect uses
    assert re.search(r"FPN, command line(, threshold 0\.\d)?, test F", text)
    assert "floor (held-out patients)" in text
    assert re.search(r"detecting at the threshold its file records \(0\.\d, chosen on its \d+ "
                     r"training images\)", text)
    # issue 23's synthetic-only detector, at real tissue's scale, on both splits
    assert "Trained only on synthetic patches of the generator calibrated to real tissue" in text
    assert "synthetic only, test F" in text
