"""The benchmark runs in its smallest mode and the execution-status page reads executed notebooks.

Speed goals are never asserted here (shared machines are noisy; the bench reports them). What is
checked: every case produces a well-formed row with positive finite figures whose ratio is the
stated quotient, the side-by-side comparisons agree on the values they time (features equal to
the skimage reference, predictions equal to the bare forward pass on the same images in the same
order, the same number of training images on both sides), and the status page reports the
durations papermill recorded.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import status_rows

from cellulib.bench import bookstatus, suite
from cellulib.files import imageio

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
    return suite.run_bench("smallest", chapters_dir=chapters, notebooks_dir=None, verbose=False)


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
    assert p["ours"] == pytest.approx(suite.MODES["smallest"]["predict_images"]
                                      / p["details"]["ours_s"][0])


def test_features_case_checks_equal_values(smallest):
    row = _row(smallest, "features 4x64x64")
    assert row["details"]["identical"] is True
    assert "blob counts equal" in row["note"]


def test_feature_comparison_catches_a_different_count():
    import pandas as pd

    from cellulib.models.features import FEATURE_NAMES

    ref = pd.Series(range(81), index=FEATURE_NAMES, dtype=float) + 1.0
    assert suite._compare_features(ref.copy(), ref)[0]
    ours = ref.copy()
    ours["malignant_blob_count_0.50"] += 1
    same, text = suite._compare_features(ours, ref)
    assert not same and "malignant_blob_count_0.50" in text
    ours = ref.copy()
    ours["normal_activation_0.02"] *= 1 + 1e-6  # a sum off by more than rounding
    assert not suite._compare_features(ours, ref)[0]


def test_predict_case_scores_what_the_bare_forward_scores(smallest):
    from cellulib.models import engine

    row = _row(smallest, "predict")
    d = row["details"]
    # predict decodes, resizes and scales the files itself: its scores must equal the bare
    # forward pass on the same pixels at the same precision (the CSV keeps 6 decimals), and the
    # mixed-precision forward pass must stay close to float32
    assert d["max_abs_diff"] < 1e-4
    assert d["amp_vs_float32_max_abs_diff"] <= suite.PREDICT_ATOL
    names = [Path(p).name for p in d["paths"]]
    assert names == sorted(names) and len(names) == suite.MODES["smallest"]["predict_images"]
    assert d["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    # ours and the reference compute alike: the precision the engine picks for this machine
    dtype = engine.amp_dtype(d["device"])
    assert d["precision"] == {None: "float32", torch.bfloat16: "bf16",
                              torch.float16: "fp16"}[dtype]
    assert d["reference_precision"] == engine.precision_label(dtype, channels_last=True)
    assert len(d["ours_s"]) == len(d["reference_s"]) == len(d["float32_s"]) == 1
    assert f"|diff| <= {suite.PREDICT_ATOL:g}" in row["goal"]


def _scored(paths, scores):
    import pandas as pd

    return pd.DataFrame({"path": [str(p) for p in paths], "cellularity": scores, "error": ""})


def test_prediction_check_needs_the_same_images_in_the_same_order():
    import numpy as np

    paths = [f"/tmp/images/9000{k // 10}_{k % 10 + 1}.tif" for k in range(12)]
    scores = np.linspace(0.1, 0.9, 12)
    ours = _scored(paths, scores + 1e-3)
    assert suite._check_same_predictions(ours, paths, scores, "reference") == pytest.approx(1e-3)
    # rows in another order (the old check compared folder order with write order)
    shuffled = ours.sample(frac=1, random_state=0).reset_index(drop=True)
    with pytest.raises(RuntimeError, match="same images in the same order"):
        suite._check_same_predictions(shuffled, paths, scores, "reference")
    with pytest.raises(RuntimeError, match="same images in the same order"):
        suite._check_same_predictions(ours.iloc[:-1], paths, scores, "reference")
    # the right names on the wrong scores
    with pytest.raises(RuntimeError, match="disagree on"):
        suite._check_same_predictions(_scored(paths, scores[::-1]), paths, scores, "reference")
    # the tolerance: bf16-sized differences pass, larger ones and failed images do not
    tol = suite.PREDICT_ATOL
    assert suite._check_same_predictions(_scored(paths, scores + 0.9 * tol), paths, scores,
                                         "reference") <= tol
    with pytest.raises(RuntimeError, match=r"\|difference\| 0.03"):
        suite._check_same_predictions(_scored(paths, scores + 0.03), paths, scores, "reference")
    failed = _scored(paths, scores).assign(error=[""] * 11 + ["x.tif: not an image"])
    with pytest.raises(RuntimeError, match="failed"):
        suite._check_same_predictions(failed, paths, scores, "reference")


def test_predict_case_fails_when_ours_scores_in_another_order(monkeypatch, tmp_path):
    import cellulib.inference.predict as predict

    real = predict.predict_to_csv

    def reversed_order(model, paths, out, **kw):
        return real(model, imageio.collect_images(paths)[::-1], out, **kw)

    monkeypatch.setattr(predict, "predict_to_csv", reversed_order)
    with pytest.raises(RuntimeError, match="same images in the same order"):
        suite.bench_predict(n_images=4, file_size=96, input_size=64, batch_size=2, repeats=1,
                            workdir=tmp_path, workers=1)


def test_train_case_sees_the_same_images_on_both_sides(smallest):
    from cellulib.models import engine

    cfg = suite.MODES["smallest"]
    # drop_last with full batches: exactly the configured number of images per epoch
    assert _row(smallest, "train seg")["details"]["images_per_epoch"] == cfg["seg_images"]
    assert _row(smallest, "train direct")["details"]["images_per_epoch"] == cfg["direct_images"]
    for case in ("train seg", "train direct"):
        d = _row(smallest, case)["details"]
        assert d["overhead"] == pytest.approx(1 - _row(smallest, case)["ratio"])
        assert d["precision"] == engine.precision_label(engine.amp_dtype(d["device"]))
        assert d["reference_optimizer"].startswith("torch AdamW")
        assert all(ms > 0 for ms in d["optimizer_step_ms"].values())


def test_epoch_batches_sets_the_timed_epochs_length():
    cfg = suite.MODES["smallest"]
    result = suite.run_bench("smallest", cases=["train"], verbose=False, epoch_batches=3)
    seg, direct = (_row(result, c)["details"] for c in ("train seg", "train direct"))
    # 3 full batches each (drop_last), whatever the mode's own image counts (4 and 4, batch 4)
    assert (seg["batches_per_epoch"], seg["images_per_epoch"]) == (3, 3 * cfg["seg_bs"])
    assert (direct["batches_per_epoch"], direct["images_per_epoch"]) == (3, 3 * cfg["direct_bs"])
    assert result["command"] == "python -m cellulib.bench --smallest --epoch-batches 3"
    assert suite.MODES["smallest"]["seg_images"] == 4  # the mode itself is left as it was


def test_plain_loop_trains_on_the_loaders_tensors_in_channels_last():
    from fastai.losses import MSELossFlat

    from cellulib.models import engine

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 1))
    batches = [(torch.randn(2, 3, 8, 8), torch.rand(2, 1)) for _ in range(3)]
    device = torch.device("cpu")
    dtype = engine.amp_dtype(device)
    loop = suite._PlainLoop(model, batches, MSELossFlat(), 1e-2, device, dtype)
    assert loop.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    for (xb, yb), (x0, y0) in zip(loop.batches, batches):  # the same tensors, same order
        assert xb.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(xb, x0) and yb is y0
    before = loop.model[3].weight.detach().clone()
    assert loop.epoch() == 6
    assert not torch.equal(before, loop.model[3].weight)  # it trains
    assert all(p.grad is None for p in loop.model.parameters())  # and leaves no gradients


def test_memory_case_runs_both_counts_in_fresh_processes(smallest):
    row = _row(smallest, "memory")
    large, small = suite.MODES["smallest"]["memory_counts"]
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
    assert row["reference"] == bookstatus.BOOK_BUDGET_S
    assert row["met"] is True
    assert "01_data_exploration 31 s" in row["note"] and "03_gbt" not in row["note"]


def test_machine_line_and_table(smallest):
    m = smallest["machine"]
    assert m["cpu_count"] == os.cpu_count()
    assert m["torch_threads"] == torch.get_num_threads()
    assert m["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    text = suite.format_table(smallest)
    lines = text.splitlines()
    assert lines[1].startswith("machine: ") and f"with {m['torch_threads']} thread" in lines[1]
    assert f"({m['precision']})" in lines[1]
    header = lines[3].split()
    assert header == ["case", "ours", "reference", "unit", "ratio", "goal", "met"]
    body = lines[5:5 + len(smallest["cases"])]
    assert [b.split("  ")[0].strip() for b in body] == [r["case"] for r in smallest["cases"]]
    md = suite.format_table(smallest, markdown=True).splitlines()
    assert md[3] == "| case | ours | reference | unit | ratio | goal | met |"
    assert sum(line.startswith("| ") for line in md) == 2 + len(smallest["cases"])


def test_table_warns_when_the_machine_was_busy(smallest):
    quiet = dict(smallest, machine=dict(smallest["machine"], load_average=0.1,
                                        cpus_available=2), load_average_end=0.2)
    assert "warning" not in suite.format_table(quiet)
    busy = dict(quiet, load_average_end=3.9)
    assert "load average up to 3.9 on 2 cores" in suite.format_table(busy)


def test_unavailable_book_is_reported_not_invented(tmp_path):
    row = suite.bench_book(tmp_path / "missing", None)
    assert row["ours"] is None and row["ratio"] is None and row["met"] is None
    assert row["note"].startswith("not available") and "missing" in row["note"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert suite.bench_book(empty, None)["ratio"] is None


def test_incomplete_book_has_no_verdict(book_dirs):
    chapters, notebooks = book_dirs
    row = suite.bench_book(chapters, notebooks)
    assert row["met"] is None and "03_gbt" in row["note"]
    assert row["ours"] == pytest.approx(43.0)


def test_cli_writes_json_and_rejects_unknown_cases(book_dirs, tmp_path, capsys):
    chapters, _ = book_dirs
    out = tmp_path / "bench.json"
    code = suite.main(["--smallest", "--cases", "book", "--chapters", str(chapters),
                       "--notebooks", str(tmp_path / "none"), "--json", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "book" in printed and "machine:" in printed
    data = json.loads(out.read_text())
    assert {"mode", "repeats", "machine", "cases", "seconds", "command"} <= set(data)
    assert [r["case"] for r in data["cases"]] == ["book"]
    assert KEYS <= set(data["cases"][0])
    with pytest.raises(SystemExit) as err:
        suite.main(["--cases", "features,nope"])
    assert err.value.code == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown mode"):
        suite.run_bench("huge", cases=["book"])


def test_status_page_lists_chapters_with_their_durations(book_dirs, tmp_path):
    chapters, notebooks = book_dirs
    failed = tmp_path / "chapters"
    failed.mkdir()
    for nb in chapters.glob("0*.ipynb"):
        (failed / nb.name).write_bytes(nb.read_bytes())
    _executed_notebook(failed / "04_direct.ipynb", "4. Direct models", [3.0], exception=True)
    _executed_notebook(failed / "05_discussion.ipynb", "5. Discussion", [1.25, 2.25],
                       papermill=False)
    page = bookstatus.status_markdown(failed, notebooks)
    lines = page.splitlines()
    assert lines[0] == "# Execution status"
    rows = status_rows(page)
    # an executed chapter's title links to its page, the notebook beside the status page
    assert rows["01_data_exploration"][0] == "[1. Data exploration](01_data_exploration.ipynb)"
    assert rows["01_data_exploration"][1] == "31.0"
    assert rows["01_data_exploration"][2] == ""  # no build history given: not said
    assert rows["01_data_exploration"][3] == "ok"
    assert rows["01_data_exploration"][4] == "2026-11-26 15:16:10"
    # one Python for every chapter: a sentence, not a column of the same value
    assert len(rows["01_data_exploration"]) == 5
    assert "Every executed chapter ran on Python 3.11.7." in page
    assert rows["02_weak_segmentation"][1] == "12.0"
    assert rows["04_direct"][3] == "failed"
    assert rows["05_discussion"][1] == "3.5"  # 1.25 + 2.25 s from nbclient's timestamps
    assert rows["03_gbt"][3] == "not executed"  # no page to link to: the name is the title
    assert "](03_gbt.ipynb)" not in page
    assert "neither goal applies, since 1 of the 5 chapters have no time" in page
    (tmp_path / "none").mkdir()
    assert "neither goal applies, since no chapter has a recorded time yet" in (
        bookstatus.status_markdown(tmp_path / "none"))
    assert "03_gbt.ipynb.tmp" not in page
    total = [line for line in lines if line.startswith("| **total**")]
    assert total and "**50.0**" in total[0]  # 31 + 12 + 3.5 + 3.5
    assert {len(cells) for cells in rows.values()} == {5}
    # chapters run by different Pythons: each row says which
    nb = nbformat.read(failed / "04_direct.ipynb", as_version=4)
    nb.metadata["language_info"]["version"] = "3.12.3"
    nbformat.write(nb, failed / "04_direct.ipynb")
    page = bookstatus.status_markdown(failed, notebooks)
    rows = status_rows(page)
    assert rows["04_direct"][5] == "3.12.3" and rows["01_data_exploration"][5] == "3.11.7"
    assert rows["03_gbt"][5] == ""  # not executed
    assert "| **total** | **50.0** | | | | |" in page and "Every executed chapter ran" not in page
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


def test_status_command_writes_the_page_atomically(book_dirs, tmp_path, capsys, monkeypatch):
    chapters, notebooks = book_dirs
    monkeypatch.setenv("CELLULIB_HOME", str(tmp_path / "home"))  # the cache the history looks at
    out = tmp_path / "site" / "status.md"
    assert bookstatus.main(["--chapters", str(chapters), "--out", str(out)]) == 0
    assert out.read_text().startswith("# Execution status\n")
    assert [p.name for p in out.parent.iterdir()] == ["status.md"]  # no temporary file left
    assert bookstatus.main(["--chapters", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    # the teachers' page needs the source notebooks, and nothing is written without them
    teachers = tmp_path / "site" / "teachers.md"
    assert bookstatus.main(["--chapters", str(chapters), "--out", str(out), "--teachers",
                            str(teachers), "--history", str(tmp_path / "h.json")]) == 2
    assert "--teachers needs --notebooks" in capsys.readouterr().err
    assert not teachers.exists() and not (tmp_path / "h.json").exists()
    # as `make chapters` calls it: the runs are recorded first, so the page says how each was built
    assert bookstatus.main(["--chapters", str(chapters), "--notebooks", str(notebooks), "--out",
                            str(out), "--teachers", str(teachers), "--history",
                            str(tmp_path / "h.json")]) == 0
    row = status_rows(out.read_text())["01_data_exploration"]
    assert row[2] in ("from scratch", "from the cache"), row
    assert teachers.is_file() and (tmp_path / "h.json").is_file()
    # the page alone, as its own text says to regenerate it: it reads the history (here the
    # default one, beside the cache) and records nothing
    history = bookstatus.default_history_path()
    history.write_bytes((tmp_path / "h.json").read_bytes())
    before = history.read_bytes()
    assert bookstatus.main(["--chapters", str(chapters), "--notebooks", str(notebooks),
                            "--out", str(out)]) == 0
    assert status_rows(out.read_text())["01_data_exploration"][2] == row[2]
    assert history.read_bytes() == before
    history.write_text("{not json")  # a damaged history is named, and the page is left as it was
    page = out.read_text()
    assert bookstatus.main(["--chapters", str(chapters), "--out", str(out)]) == 2
    assert str(history) in capsys.readouterr().err and out.read_text() == page


def test_corrupt_notebook_is_named(tmp_path):
    (tmp_path / "01_bad.ipynb").write_text("{not json")
    with pytest.raises(ValueError, match="01_bad.ipynb"):
        bookstatus.chapter_times(tmp_path)


def test_module_runs_as_a_program(book_dirs):
    chapters, _ = book_dirs
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.run([sys.executable, "-m", "cellulib.bench.bookstatus", "--chapters",
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
    out = bookstatus.execute_chapters(src, tmp_path / "out")
    executed = nbformat.read(out / "01_tiny.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "profile quick" in printed
    (row,) = bookstatus.chapter_times(out)
    assert row["status"] == "ok" and row["seconds"] > 0 and row["title"] == "1. Tiny"


def test_quick_and_full_modes_time_the_profiles_sizes():
    from cellulib.data.profiles import get_profile

    for mode, name in (("quick", "quick"), ("full", "paper")):
        profile, sizes = get_profile(name), suite.MODES[mode]
        assert sizes["synth_size"] == sizes["predict_file_size"] == profile["size"]
        assert sizes["seg_crop"] == profile["crop"] and sizes["seg_bs"] == profile["seg_bs"]
        assert sizes["direct_bs"] == sizes["predict_bs"] == profile["direct_bs"]
        # cellularity inputs: direct_size, or the segmentation scale (cellulib.training.train)
        side = profile["direct_size"] or profile["size"] // profile["downscale"]
        assert sizes["direct_size"] == sizes["predict_input"] == side


def test_predict_images_sets_the_predict_cases_image_count():
    """On a GPU a few dozen images time mostly the start: `--predict-images` gives more."""
    result = suite.run_bench("smallest", cases=["predict"], verbose=False, predict_images=11)
    row = _row(result, "predict")
    assert len(row["details"]["paths"]) == 11 and "; 11 TIFFs " in row["note"]
    assert result["command"] == "python -m cellulib.bench --smallest --predict-images 11"
    assert suite.MODES["smallest"]["predict_images"] == 8  # the mode itself is left as it was


@pytest.mark.parametrize("case, option", [("train", "epoch_batches"), ("predict", "predict_images")])
def test_a_size_of_zero_is_refused_by_the_function_and_the_command(case, option, capsys):
    flag = "--" + option.replace("_", "-")
    with pytest.raises(ValueError, match=f"{option} must be at least 1"):
        suite.run_bench("smallest", cases=[case], **{option: 0})
    with pytest.raises(SystemExit):
        suite.main(["--smallest", "--cases", case, flag, "0"])
    assert f"{flag} must be at least 1" in capsys.readouterr().err
