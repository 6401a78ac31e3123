"""The book's execution record: how long each chapter took and whether it ran, the status page the
book ends with, and the machine it ran on (``python -m cellulib.bookstatus``).

``make chapters`` executes every chapter with papermill and then writes the page::

    python -m cellulib.bookstatus --chapters book/chapters --notebooks notebooks \
        --out book/chapters/status.md

The ``book`` case of :mod:`cellulib.bench` reads the same records.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = [
    "BOOK_BUDGET_S",
    "machine_info",
    "chapter_times",
    "execute_chapters",
    "status_markdown",
    "write_status",
    "main",
]

#: Budget of the whole book in the quick profile on a 2-core CPU, in seconds.
BOOK_BUDGET_S: float = 600.0


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The machine a benchmark ran on: CPU cores, torch threads, device and versions.

    Printed above every benchmark table and written to the JSON output, since no timing means
    anything without it. Used in the README's performance section and the book's status page.

    Returns
    -------
    dict
        ``cpu_count``, ``cpus_available`` (the affinity mask), ``cpu_model``, ``torch_threads``,
        ``device`` (``cpu`` or ``cuda (GPU name)``), ``precision`` (what
        :func:`cellulib.engine.amp_dtype` picks there), ``python``, ``torch``, ``platform`` and
        ``load_average`` (1-minute; other jobs on a shared machine make timings noisy).
    """
    import torch

    from cellulib import engine

    device = engine.resolve_device()
    name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    available = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_available": available,
        "cpu_model": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "device": name,
        "precision": engine.precision_label(engine.amp_dtype(device)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average": load,
    }


def _cell_seconds(cell: dict) -> float | None:
    meta = cell.get("metadata", {})
    pm = meta.get("papermill") or {}
    if isinstance(pm.get("duration"), (int, float)):
        return float(pm["duration"])
    ex = meta.get("execution") or {}
    a, b = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
    if a and b:
        return (_parse_time(b) - _parse_time(a)).total_seconds()
    return None


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _title(nb: dict, fallback: str) -> str:
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            source = "".join(cell.get("source", ""))
            for line in source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
            break
    return fallback


def _read_notebook(path: Path) -> dict:
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable notebook ({type(exc).__name__}: {exc})") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError(f"{path}: not a Jupyter notebook (no 'cells' list)")
    return nb


def chapter_times(chapters_dir: str | os.PathLike,
                  notebooks_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Execution time, status and date of every executed chapter notebook in a folder.

    Reads what papermill records (``metadata.papermill``: duration, end time, exception; per cell
    ``metadata.papermill.duration``), falling back to the cells' execution timestamps that nbclient
    writes. Temporary copies (``*.tmp.ipynb``) are skipped. With ``notebooks_dir``, chapters that
    have a source notebook but no executed copy are listed as ``not executed``. Used by the
    ``book`` benchmark and the book's execution-status page.

    Returns
    -------
    list of dict
        In file-name order: ``chapter`` (file stem), ``title``, ``seconds`` (None when unknown),
        ``status`` (``ok``, ``failed``, ``not executed`` or ``unknown``), ``executed_at`` (ISO
        text or ""), ``python`` (the kernel's version) and ``n_cells``.

    Raises
    ------
    ValueError
        ``chapters_dir`` is not a folder, or a notebook there cannot be parsed (named).
    """
    folder = Path(chapters_dir)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder of executed chapters")
    rows = []
    for path in sorted(folder.glob("*.ipynb")):
        if path.name.endswith(".tmp.ipynb") or path.name.startswith("."):
            continue
        nb = _read_notebook(path)
        pm = nb.get("metadata", {}).get("papermill") or {}
        cells = [c for c in nb["cells"] if c.get("cell_type") == "code"]
        seconds = pm.get("duration")
        if not isinstance(seconds, (int, float)):
            per_cell = [_cell_seconds(c) for c in cells]
            known = [s for s in per_cell if s is not None]
            seconds = float(sum(known)) if known else None
        errors = any(o.get("output_type") == "error" for c in cells for o in c.get("outputs", []))
        if pm.get("exception") or errors:
            status = "failed"
        elif seconds is None:
            status = "unknown"
        else:
            status = "ok"
        rows.append({
            "chapter": path.stem,
            "title": _title(nb, path.stem),
            "seconds": None if seconds is None else float(seconds),
            "status": status,
            "executed_at": pm.get("end_time") or "",
            "python": nb.get("metadata", {}).get("language_info", {}).get("version", ""),
            "n_cells": len(cells),
        })
    if notebooks_dir is not None and Path(notebooks_dir).is_dir():
        done = {r["chapter"] for r in rows}
        for path in sorted(Path(notebooks_dir).glob("[0-9][0-9]*_*.ipynb")):
            if path.stem not in done:
                rows.append({"chapter": path.stem, "title": path.stem, "seconds": None,
                             "status": "not executed", "executed_at": "", "python": "",
                             "n_cells": 0})
        rows.sort(key=lambda r: r["chapter"])
    return rows


def execute_chapters(notebooks_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     parameters: dict[str, Any] | None = None,
                     cwd: str | os.PathLike | None = None, verbose: bool = False) -> Path:
    """Execute every chapter notebook (``NN_*.ipynb``) with papermill into ``out_dir``, in order.

    What ``make chapters`` does, callable from the benchmark (``--execute-book``) to time the book
    from scratch. ``parameters`` default to ``{"profile": "quick"}``. A chapter that fails is
    recorded as failed in its output notebook and the others still run. Returns ``out_dir``.
    """
    import papermill

    src = Path(notebooks_dir)
    notebooks = sorted(src.glob("[0-9][0-9]*_*.ipynb"))
    if not notebooks:
        raise ValueError(f"{src}: no chapter notebooks (NN_name.ipynb) to execute")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for nb in notebooks:
        _log(f"book: executing {nb.name}", verbose)
        try:
            papermill.execute_notebook(str(nb), str(out / nb.name),
                                       parameters=parameters or {"profile": "quick"},
                                       cwd=str(cwd) if cwd else None, progress_bar=False)
        except papermill.PapermillExecutionError as exc:
            _log(f"book: {nb.name} failed: {exc.ename}: {exc.evalue}", verbose)
    return out


_STATUS_PACKAGES = (
    ("torch", ("torch",)),
    ("torchvision", ("torchvision",)),
    ("fastai", ("fastai",)),
    ("lightgbm", ("lightgbm",)),
    ("albumentations", ("albumentations",)),
    ("opencv", ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless")),
    ("scikit-image", ("scikit-image",)),
    ("numpy", ("numpy",)),
    ("pandas", ("pandas",)),
    ("jupyter-book", ("jupyter-book",)),
    ("papermill", ("papermill",)),
)


def _package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for label, dists in _STATUS_PACKAGES:
        versions[label] = "not installed"
        for dist in dists:
            try:
                versions[label] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    from cellulib import __version__

    versions["cellulib"] = __version__
    return versions


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def status_markdown(chapters_dir: str | os.PathLike,
                    notebooks_dir: str | os.PathLike | None = None) -> str:
    """The book's execution-status page (MyST Markdown): per-chapter times, versions, machine.

    What well-run books show (QuantEcon's status page): for each chapter the execution time, the
    status and when it ran, read from the executed notebooks (:func:`chapter_times`); the total
    against the 600 s budget of the quick profile; the versions of the key packages in the
    environment that wrote the page (``make chapters`` executes and writes it in one go) and the
    machine. Written by ``python -m cellulib.bookstatus``; shown as the book's last page.

    Parameters
    ----------
    chapters_dir : path
        Folder of executed chapters (``book/chapters``).
    notebooks_dir : path, optional
        Source notebooks; chapters without an executed copy are listed as ``not executed``.

    Returns
    -------
    str
        The page, starting with ``# Execution status``.

    Examples
    --------
    >>> page = status_markdown("book/chapters")  # doctest: +SKIP
    >>> page.splitlines()[0]  # doctest: +SKIP
    '# Execution status'
    """
    rows = chapter_times(chapters_dir, notebooks_dir)
    machine = machine_info()
    lines = [
        "# Execution status",
        "",
        "Every chapter of this book is a notebook executed top to bottom by papermill before the "
        "book is built. The table gives each chapter's execution time as papermill recorded it, "
        "its status and when it ran; the versions below are those of the environment that wrote "
        "this page. Regenerate it with "
        "`python -m cellulib.bookstatus --chapters book/chapters --out book/chapters/status.md`.",
        "",
        "| chapter | file | execution time (s) | status | executed at (UTC) | Python |",
        "| --- | --- | ---: | --- | --- | --- |",
    ]
    for r in rows:
        when = r["executed_at"].replace("T", " ")[:19] if r["executed_at"] else ""
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {_md_escape(r['title'])} | `{r['chapter']}.ipynb` | {secs} | "
                     f"{r['status']} | {when} | {r['python']} |")
    timed = [r["seconds"] for r in rows if r["seconds"] is not None]
    total = sum(timed)
    lines.append(f"| **total** | | **{total:.1f}** | | | |")
    lines += [
        "",
        f"Goal: the whole book in the quick profile within {BOOK_BUDGET_S:.0f} s on a 2-core CPU; "
        f"these {len(timed)} chapters took {total:.0f} s "
        f"({100 * total / BOOK_BUDGET_S:.0f}% of the budget).",
        "",
        "## Package versions",
        "",
        "| package | version |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in _package_versions().items()]
    lines += [
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu_model']}, {machine['cpus_available']} of {machine['cpu_count']} "
        "cores available",
        f"- torch threads: {machine['torch_threads']}",
        f"- device: {machine['device']}",
        f"- platform: {machine['platform']}",
        f"- page written: {datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
    ]
    return "\n".join(lines)


def write_status(chapters_dir: str | os.PathLike, out: str | os.PathLike,
                 notebooks_dir: str | os.PathLike | None = None) -> Path:
    """Write :func:`status_markdown` to ``out`` atomically (a temporary file renamed into place)."""
    from cellulib.imageio import atomic_write_text

    return atomic_write_text(out, status_markdown(chapters_dir, notebooks_dir))


def _status_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cellulib.bookstatus",
        description="Write the book's execution-status page (MyST Markdown) from the executed "
        "chapter notebooks: execution time, status and date per chapter, package versions and "
        "machine.",
    )
    p.add_argument("--chapters", default="book/chapters", help="executed chapters folder")
    p.add_argument("--notebooks", default=None,
                   help="source notebooks folder (lists chapters not executed yet)")
    p.add_argument("--out", default=None, help="page to write (default: print it)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m cellulib.bookstatus [--chapters DIR] [--notebooks DIR] [--out PAGE]``."""
    args = _status_parser().parse_args(argv)
    try:
        if args.out:
            path = write_status(args.chapters, args.out, args.notebooks)
            print(f"execution status written to {path}")
        else:
            print(status_markdown(args.chapters, args.notebooks))
    except ValueError as exc:
        print(f"cellulib.bookstatus: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
