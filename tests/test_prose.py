"""Every number in a chapter's prose is computed: glued from code that ran, or on the short
allow-list of `cellulib.bench.bookstatus.unglued_numbers` (parts, years, names, code, formulas); so is
the text that code cells glue into it. The executed chapters of `tests/test_book.py` are checked
too; papermill leaves markdown and code as they are, so the chapter sources give the same answer
here in a second."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellulib.bench import bookstatus
from cellulib.reporting import paper

REPO = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.stem for p in (REPO / "notebooks").glob("*.ipynb"))

#: Chapters whose prose is allowed to state typed numbers for now, with the reason (none left).
PENDING: dict[str, str] = {}


def _notebook(tmp_path: Path, *markdown: str) -> Path:
    cells = [{"cell_type": "markdown", "id": f"c{i}", "metadata": {}, "source": text}
             for i, text in enumerate(markdown)]
    path = tmp_path / "ch.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_typed_numbers_are_found_with_chapter_cell_and_text(tmp_path):
    path = _notebook(tmp_path, "Nuclei are drawn as discs within about 16 px.",
                     "A clean cell.", "The paper reports MSE 0.010-0.025; 200,000 draws.")
    assert bookstatus.unglued_numbers(path) == [
        ("ch", 0, "Nuclei are drawn as discs within about 16 px."),
        ("ch", 2, "The paper reports MSE 0.010-0.025; 200,000 draws."),
        ("ch", 2, "The paper reports MSE 0.010-0.025; 200,000 draws."),
        ("ch", 2, "The paper reports MSE 0.010-0.025; 200,000 draws."),
    ]


def test_the_allow_list(tmp_path):
    allowed = (
        "The FPN reaches {glue:text}`j_fpn:.2f` and {glue}`n_cells` patches {cite}`rakhlin2019`.\n"
        "See {numref}`fig-x`, chapter 3, chapters 2-4, Tables 2 and 3, the paper's Fig. 6, paper\n"
        "section 3.4, paper eq. 1-3, SPEC 5.1, stage 2 and issue 24; Macenko's method (2009).\n"
        "ResNet-34, ResNet50, BRCA-M2C, ICC(2,1), x2, 20x and a 1x1 convolution; `weights=(1, 1, 4, 1)`;\n"
        "$\\alpha = 0.15$; a 95% CI that excludes 0, scores from 0 to 1; [a link](https://x.org/3).\n"
        "1. a numbered list\n"
        "```bash\npapermill -p seed 7 a.ipynb\n```\n"
        "```{glue:figure} fig_a\n:name: fig-a\n:figwidth: 80%\n\nA caption with {glue:text}`n`.\n```\n"
        "```{solution-start} ex-a\n:class: dropdown\n```\nNothing typed.\n```{solution-end}\n```\n"
    )
    assert bookstatus.unglued_numbers(_notebook(tmp_path, allowed)) == []
    # a directive's body is prose: its caption is checked, its options are not
    typed = "```{glue:figure} fig_a\n:figwidth: 80%\n\nStacked; 20 bins.\n```\n"
    (found,) = bookstatus.unglued_numbers(_notebook(tmp_path, typed))
    assert found[2].endswith("Stacked; 20 bins. ```")


def test_text_glued_by_code_is_prose_too(tmp_path):
    code = ('glue("a", Markdown(f"{n:,} draws sit at KS {ks:.2f} " f"in steps of 0.05"), display=False)\n'
            'glue("b", f"seed {seed} of {n_seeds}", display=False)\n'
            'print("not glued: 7")\n')
    path = tmp_path / "ch.ipynb"
    path.write_text(json.dumps({"cells": [{"cell_type": "code", "id": "c0", "metadata": {},
                                           "outputs": [], "source": code, "execution_count": None}],
                                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert bookstatus.unglued_numbers(path) == [("ch", 0, "draws sit at KS in steps of 0.05")]


def _check(chapter: str, path: Path) -> None:
    if chapter in PENDING:
        pytest.xfail(PENDING[chapter])
    typed = [f"cell {i}: ...{text}..." for _, i, text in bookstatus.unglued_numbers(path)]
    assert not typed, f"{chapter}: numbers typed in the prose, glue them:\n" + "\n".join(typed)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_prose_glues_its_numbers(chapter):
    _check(chapter, REPO / "notebooks" / f"{chapter}.ipynb")


def test_book_numbers_come_from_their_definitions():
    from cellulib import constants
    from cellulib.models import features

    n = paper.book_numbers()
    assert n["disc_px"] == 15 and n["malignant_weight"] == 4  # paper 4.2, eq. 3
    assert (n["train_pct"], n["valid_pct"]) == (80, 20)
    assert n["n_features"] == len(features.FEATURE_NAMES) == 3 * (1 + 7 * 2 + 6 * 2)
    assert n["n_bins"] == constants.N_BINS == 101 and n["bin_step"] == pytest.approx(0.01)
    assert (n["fpn_level_maps"], n["fpn_maps"], n["fpn_dropout"]) == (64, 256, 0.5)
    assert (n["gbt_rounds"], n["gbt_lr"], n["gbt_depth"], n["gbt_leaves"]) == (600, 0.01, 5, 8)
    assert n["area_thresholds"] == "0.02, 0.04, 0.08, 0.16, 0.24, 0.32 and 0.5"
    assert (n["paper_seg_epochs"], n["paper_crop"], n["paper_seg_side"]) == (150, 256, 256)
    assert n["detection_radius"] == 6  # MCSpatNet's protocol (SPEC 1.4)
    # the paper's values as it prints them (Tables 1-3, the challenge)
    assert (n["paper_j_fpn"], n["paper_j_unet"]) == ("0.47", "0.35")
    assert (n["paper_resnet50_random"], n["paper_resnet50_imagenet"]) == ("0.025", "0.011")
    assert n["paper_pk_pathologists"] == "0.927"
    assert (n["paper_mse_range"], n["paper_kappa_range"]) == ("0.010-0.025", "0.571-0.689")
    assert n["code_disc_diameter"] == 12 and n["code_lr_steps"] == "5e-4, 1e-4, 5e-5, 2e-5"


def test_paper_text_refuses_what_the_paper_does_not_print():
    with pytest.raises(KeyError, match="no single MSE of 'U-Net decoder'"):
        paper.paper_text("Table 2", "U-Net decoder", "MSE")


#: The reporting modules that write the chapters' computed sentences. Left out, with the reason:
#: ``paper`` (the paper's published values, typed once there on purpose), ``plots`` (axis labels
#: with units), ``statistics`` (the names of kappa's four bins), ``parameters`` (error messages).
SENTENCE_MODULES = ("sentences", "verdicts", "realtissue", "robustness", "scoring", "tables",
                    "evaluation")


def test_library_sentences_are_found_with_module_and_line(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text('"""Docstring: 7 of 9 is fine here."""\n'
                   'def f(n, k):\n'
                   '    """Returns 3 sentences."""\n'
                   '    a = f"{n} of {k} models beat the floor of 0.75"\n'
                   '    b = "a 95% CI, chapter 3, ResNet-34"\n'
                   '    c = "%.3f"\n'
                   '    return a + b + c + "; 200 draws"\n')
    assert bookstatus.unglued_library_numbers(src) == [
        ("mod", 4, "of models beat the floor of 0.75"),
        ("mod", 7, "; 200 draws"),
    ]


@pytest.mark.parametrize("module", SENTENCE_MODULES)
def test_library_sentences_glue_their_numbers(module):
    path = REPO / "cellulib" / "reporting" / f"{module}.py"
    typed = [f"line {line}: ...{text}..." for _, line, text in bookstatus.unglued_library_numbers(path)]
    assert not typed, f"reporting/{module}.py: numbers typed in sentences, compute them:\n" + "\n".join(typed)
