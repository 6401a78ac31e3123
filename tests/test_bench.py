"""The benchmark runs in its smallest mode and the execution-status page reads executed notebooks.

Speed goals are never asserted here (shared machines are noisy; the bench reports them). What is
checked: every case produces a well-formed row with positive finite figures whose ratio is the
stated quotient, the side-by-side comparisons agree on the values they time (features equal to
the skimage reference, predictions equal to the bare forward pass, the same number of training
images on both sides), and the status page reports the durations papermill recorded.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cellulib import bench

nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[1]
KEYS = {"case", "ours", "reference", "unit", "ratio", "goal", "met", "note"}


def _executed_notebook(path: Path, title: str, cell_seconds: list[float], *,
                       exception: bool = False, papermill: bool = True) -> Path:
    """An executed chapter as papermill writes it (total and per-cell durations in metadata)."""
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(f"# {title}\n\nOne-sentence finding."))
    for k, secs in enumerate(cell_seconds):
        cell = nbformat.v4.new_code_cell(f"x = {k}")
        if papermill:
            cell.metadata["papermill"] = {"duration": secs, "status": "completed"}
        else:  # nbclient's timestamps only
            start = f"2026-11-26T10:00:{k * 10:02d}.000000Z"
            end_s = k * 10 + secs
            cell.metadata["execution"] = {
                "iopub.execute_input": start,
                "shell.execute_reply": f"2026-11-26T10:00:{int(end_s):02d}."
                                       f"{round((end_s % 1) * 1e6):06d}Z"}
        nb.cells.append(cell)
    if exception:
        nb.cells[-1].outputs = [nbformat.v4.new_output("error", ename="ValueError",
                                                       evalue="boom", traceback=[])]
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7"}
    if papermill:
        nb.metadata["papermill"] = {
            "duration": float(sum(cell_seconds)) + 0.5,  # kernel start-up counts in the total
            "start_time": "2026-11-26T15:15:26.792302+00:00",
            "end_time": "2026-11-26T15:16:10.000000+00:00",
            "exception": True if exception else None,
            "parameters": {"profile": "quick"},
        }
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def book_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("book")
    chapters, notebooks = root / "chapters", root / "notebooks"
    chapters.mkdir()
    notebooks.mkdir()
    # 01: 10.0 + 20.5 s of cells, 31.0 s in all; 02: 12.0 s; total 43.0 s
    _executed_notebook(chapters / "01_data_exploration.ipynb", "1. Data exploration", [10.0, 20.5])
    _executed_notebook(chapters / "02_weak_segmentation.ipynb", "2. Weak segmentation", [4.0, 7.5])
    # a half-written papermill output must be ignored
    _executed_notebook(chapters / "03_gbt.ipynb.tmp.ipynb", "3. GBT", [999.0])
    for name in ("01_data_exploration", "02_weak_segmentation", "03_gbt"):
        nbformat.write(nbformat.v4.new_notebook(), notebooks / f"{name}.ipynb")
    return chapters, notebooks


@pytest.fixture(scope="module")
def smallest(book_dirs, tmp_path_factory):
    # one thread: other jobs on a shared 2-core machine make OpenMP threads wait on each other
    torch.set_num_threads(1)
    chapters, _ = book_dirs
    return bench.run_bench("smallest", chapters_dir=chapters, notebooks_dir=None, verbose=False)


def _row(result, case):
    rows = [r for r in result["cases"] if r["case"] == case]
    assert len(rows) == 1, [r["case"] for r in result["cases"]]
    return rows[0]


def test_every_case_gives_one_well_formed_row(smallest):
    cases = [r["case"] for r in smallest["cases"]]
    assert cases == ["features 4x64x64", "predict", "train seg", "train direct", "book",
                     "memory"]
    for row in smallest["cases"]:
        assert KEYS <= set(row), row["case"]
        assert isinstance(row["note"], str) and row["note"], row["case"]
        assert row["met"] in (True, False), row["case"]
        for key in ("ours", "reference", "ratio"):
            value = row[key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (row, key)
    assert smallest["mode"] == "smallest" and smallest["repeats"] == 1


def test_ratios_are_the_stated_quotients(smallest):
    # speed-up for the features (time per map), ours / reference for rates, budgets and memory
    f = _row(smallest, "features 4x64x64")
    assert f["unit"] == "ms/map"
    assert f["ratio"] == pytest.approx(f["reference"] / f["ours"])
    for case, unit in (("predict", "img/s"), ("train seg", "img/s"), ("train direct", "img/s"),
                       ("book", "s"), ("memory", "MiB")):
        row = _row(smallest, case)
        assert row["unit"] == unit
        assert row["ratio"] == pytest.approx(row["ours"] / row["reference"]), case
    # the medians come from the timed calls: one repeat means the figure is that one call
    assert f["ours"] == pytest.approx(1000 * f["details"]["ours_s"][0])
    p = _row(smallest, "predict")
    assert p["ours"] == pytest.approx(bench.MODES["smallest"]["predict_images"]
                                      / p["details"]["ours_s"][0])


def test_features_case_checks_equal_values(smallest):
    row = _row(smallest, "features 4x64x64")
    assert row["details"]["identical"] is True
    assert "blob counts equal" in row["note"]


def test_feature_comparison_catches_a_different_count():
    import pandas as pd

    from cellulib.features import FEATURE_NAMES

    ref = pd.Series(range(81), index=FEATURE_NAMES, dtype=float) + 1.0
    assert bench._compare_features(ref.copy(), ref)[0]
    ours = ref.copy()
    ours["malignant_blob_count_0.50"] += 1
    same, text = bench._compare_features(ours, ref)
    assert not same and "malignant_blob_count_0.50" in text
    ours = ref.copy()
    ours["normal_activation_0.02"] *= 1 + 1e-6  # a sum off by more than rounding
    assert not bench._compare_features(ours, ref)[0]


def test_predict_case_scores_what_the_bare_forward_scores(smallest):
    row = _row(smallest, "predict")
    # predict decodes, resizes and scales the files itself: its scores must equal the bare
    # forward pass on the same pixels (float32 rounding, channels-last vs NCHW)
    assert row["details"]["max_abs_diff"] < 1e-4
    assert row["details"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert len(row["details"]["ours_s"]) == len(row["details"]["reference_s"]) == 1


def test_train_case_sees_the_same_images_on_both_sides(smallest):
    cfg = bench.MODES["smallest"]
    # drop_last with full batches: exactly the configured number of images per epoch
    assert _row(smallest, "train seg")["details"]["images_per_epoch"] == cfg["seg_images"]
    assert _row(smallest, "train direct")["details"]["images_per_epoch"] == cfg["direct_images"]
    for case in ("train seg", "train direct"):
        d = _row(smallest, case)["details"]
        assert d["overhead"] == pytest.approx(1 - _row(smallest, case)["ratio"])


def test_memory_case_runs_both_counts_in_fresh_processes(smallest):
    row = _row(smallest, "memory")
    large, small = bench.MODES["smallest"]["memory_counts"]
    runs = row["details"]["runs"]
    assert set(runs) == {str(large), str(small)}
    for n, run in runs.items():
        assert run["n_ok"] == run["n_images"] == int(n)
        assert run["peak_mib"] >= run["setup_peak_mib"] > 0
    assert row["ours"] == runs[str(large)]["peak_mib"]
    assert row["reference"] == runs[str(small)]["peak_mib"]


def test_book_case_totals_the_recorded_durations(smallest):
    row = _row(smallest, "book")
    assert row["ours"] == pytest.approx(31.0 + 12.0)  # papermill totals, not the cell sums
    assert row["reference"] == bench.BOOK_BUDGET_S
    assert row["met"] is True
    assert "01_data_exploration 31 s" in row["note"] and "03_gbt" not in row["note"]


def test_machine_line_and_table(smallest):
    m = smallest["machine"]
    assert m["cpu_count"] == os.cpu_count()
    assert m["torch_threads"] == torch.get_num_threads()
    assert m["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    text = bench.format_table(smallest)
    lines = text.splitlines()
    assert lines[1].startswith("machine: ") and f"with {m['torch_threads']} thread" in lines[1]
    header = lines[3].split()
    assert header == ["case", "ours", "reference", "unit", "ratio", "goal", "met"]
    body = lines[5:5 + len(smallest["cases"])]
    assert [b.split("  ")[0].strip() for b in body] == [r["case"] for r in smallest["cases"]]
    md = bench.format_table(smallest, markdown=True).splitlines()
    assert md[3] == "| case | ours | reference | unit | ratio | goal | met |"
    assert sum(line.startswith("| ") for line in md) == 2 + len(smallest["cases"])


def test_table_warns_when_the_machine_was_busy(smallest):
    quiet = dict(smallest, machine=dict(smallest["machine"], load_average=0.1,
                                        cpus_available=2), load_average_end=0.2)
    assert "warning" not in bench.format_table(quiet)
    busy = dict(quiet, load_average_end=3.9)
    assert "load average up to 3.9 on 2 cores" in bench.format_table(busy)


def test_unavailable_book_is_reported_not_invented(tmp_path):
    row = bench.bench_book(tmp_path / "missing", None)
    assert row["ours"] is None and row["ratio"] is None and row["met"] is None
    assert row["note"].startswith("not available") and "missing" in row["note"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert bench.bench_book(empty, None)["ratio"] is None


def test_incomplete_book_has_no_verdict(book_dirs):
    chapters, notebooks = book_dirs
    row = bench.bench_book(chapters, notebooks)
    assert row["met"] is None and "03_gbt" in row["note"]
    assert row["ours"] == pytest.approx(43.0)


def test_cli_writes_json_and_rejects_unknown_cases(book_dirs, tmp_path, capsys):
    chapters, _ = book_dirs
    out = tmp_path / "bench.json"
    code = bench.main(["--smallest", "--cases", "book", "--chapters", str(chapters),
                       "--notebooks", str(tmp_path / "none"), "--json", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "book" in printed and "machine:" in printed
    data = json.loads(out.read_text())
    assert {"mode", "repeats", "machine", "cases", "seconds", "command"} <= set(data)
    assert [r["case"] for r in data["cases"]] == ["book"]
    assert KEYS <= set(data["cases"][0])
    with pytest.raises(SystemExit) as err:
        bench.main(["--cases", "features,nope"])
    assert err.value.code == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown mode"):
        bench.run_bench("huge", cases=["book"])


def test_status_page_lists_chapters_with_their_durations(book_dirs, tmp_path):
    chapters, notebooks = book_dirs
    failed = tmp_path / "chapters"
    failed.mkdir()
    for nb in chapters.glob("0*.ipynb"):
        (failed / nb.name).write_bytes(nb.read_bytes())
    _executed_notebook(failed / "04_direct.ipynb", "4. Direct models", [3.0], exception=True)
    _executed_notebook(failed / "05_discussion.ipynb", "5. Discussion", [1.25, 2.25],
                       papermill=False)
    page = bench.status_markdown(failed, notebooks)
    lines = page.splitlines()
    assert lines[0] == "# Execution status"
    rows = {line.split("|")[2].strip(" `"): [c.strip() for c in line.split("|")[1:-1]]
            for line in lines if line.startswith("| ") and ".ipynb" in line}
    assert rows["01_data_exploration.ipynb"][0] == "1. Data exploration"
    assert rows["01_data_exploration.ipynb"][2] == "31.0"
    assert rows["01_data_exploration.ipynb"][3] == "ok"
    assert rows["01_data_exploration.ipynb"][4] == "2026-11-26 15:16:10"
    assert rows["01_data_exploration.ipynb"][5] == "3.11.7"
    assert rows["02_weak_segmentation.ipynb"][2] == "12.0"
    assert rows["04_direct.ipynb"][3] == "failed"
    assert rows["05_discussion.ipynb"][2] == "3.5"  # 1.25 + 2.25 s from nbclient's timestamps
    assert rows["03_gbt.ipynb"][3] == "not executed"
    assert "03_gbt.ipynb.tmp" not in page
    total = [line for line in lines if line.startswith("| **total**")]
    assert total and "**50.0**" in total[0]  # 31 + 12 + 3.5 + 3.5
    import importlib.metadata

    versions = {line.split("|")[1].strip(): line.split("|")[2].strip()
                for line in lines if line.count("|") == 3 and not line.startswith("| ---")}
    assert versions["torch"] == importlib.metadata.version("torch")
    assert versions["fastai"] == importlib.metadata.version("fastai")
    assert versions["papermill"] == importlib.metadata.version("papermill")
    for key in ("python", "torchvision", "lightgbm", "albumentations", "opencv", "numpy",
                "pandas", "jupyter-book"):
        assert key in versions
    assert "## Machine" in page and f"{os.cpu_count()} cores" in page


def test_status_command_writes_the_page_atomically(book_dirs, tmp_path, capsys):
    chapters, _ = book_dirs
    out = tmp_path / "site" / "status.md"
    assert bench.main(["status", "--chapters", str(chapters), "--out", str(out)]) == 0
    assert out.read_text().startswith("# Execution status\n")
    assert [p.name for p in out.parent.iterdir()] == ["status.md"]  # no temporary file left
    assert bench.main(["status", "--chapters", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_corrupt_notebook_is_named(tmp_path):
    (tmp_path / "01_bad.ipynb").write_text("{not json")
    with pytest.raises(ValueError, match="01_bad.ipynb"):
        bench.chapter_times(tmp_path)


def test_module_runs_as_a_program(book_dirs):
    chapters, _ = book_dirs
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.run([sys.executable, "-m", "cellulib.bench", "status", "--chapters",
                           str(chapters)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# Execution status")


def test_execute_chapters_runs_papermill_with_the_quick_profile(tmp_path):
    pytest.importorskip("papermill")
    src = tmp_path / "notebooks"
    src.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    params = nbformat.v4.new_code_cell('profile = "paper"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# 1. Tiny"), params,
                nbformat.v4.new_code_cell("print('profile', profile)")]
    nbformat.write(nb, src / "01_tiny.ipynb")
    out = bench.execute_chapters(src, tmp_path / "out")
    executed = nbformat.read(out / "01_tiny.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "profile quick" in printed
    (row,) = bench.chapter_times(out)
    assert row["status"] == "ok" and row["seconds"] > 0 and row["title"] == "1. Tiny"
