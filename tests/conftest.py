"""Shared pytest fixtures: tiny data, the real H&E images beside the repository; the project's pins."""
import functools
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]

#: pytest-xdist's worker processes in this run (`make test` runs two on these 2-core machines;
#: 1 without ``-n``).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))

#: Torch threads for a test process: the cores shared among the workers. Two processes of two
#: OpenMP threads each on 2 cores wait for each other (a 13 s training test took 181 s that way).
_CORES = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
          else os.cpu_count() or 1)
TEST_THREADS = max(1, _CORES // WORKERS)
if WORKERS > 1:
    # before torch is imported: this process, and every kernel, CLI run and worker it starts
    os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)


def status_rows(page: str) -> dict[str, list[str]]:
    """The status page's chapter rows, by the linked notebook's name (the title when unlinked)."""
    rows = {}
    for line in page.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if not line.startswith("| ") or cells[0] in ("chapter", "---", "**total**") or len(cells) < 5:
            continue
        link = re.fullmatch(r"\[.*\]\((.+)\.ipynb\)", cells[0])
        rows[link.group(1) if link else cells[0]] = cells
    return rows


@functools.cache
def constraint_pins() -> dict[str, str]:
    """The exact versions ``constraints.txt`` pins, by normalised distribution name."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """The folder of public real H&E images (`cellulib.data.paths.real_dir`: ``$CELLULIB_REAL_DATA``
    or ``../shared/data/real``); skips when absent."""
    from cellulib.data import paths

    path = paths.real_dir()
    if path is None:
        pytest.skip(paths.real_data_missing("real H&E images", parameter=None, part="test"))
    return path


@pytest.fixture(scope="session")
def brca_dir(real_dir) -> Path:
    """The BRCA-M2C copy (`cellulib.data.paths.brca_m2c_dir`: ``brca-m2c`` in the real data folder,
    SPEC 1.4); skips when absent."""
    from cellulib.data import paths

    path = paths.brca_m2c_dir()
    if path is None:
        pytest.skip(f"BRCA-M2C copy not found in {real_dir}")
    return path


def _link_brca_image(brca_dir: Path, root: Path, name: str) -> None:
    """Link BRCA-M2C image ``name`` and its dots file from ``brca_dir`` into the copy ``root``."""
    stem = name.rsplit(".", 1)[0]
    (root / "images" / name).symlink_to(brca_dir / "images" / name)
    label = f"{stem}_gt_class_coords.txt"
    (root / "labels" / label).symlink_to(brca_dir / "labels" / label)


def make_brca_full_copy(brca_dir: Path, root: Path) -> Path:
    """A small BRCA-M2C copy with the three splits a full clone has (the real copy lacks the
    official test split): two training images, one validation image, and two more validation
    images of the real copy listed in brca_ds_test.txt. Links, not copies."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()

    def listed(split):
        text = (brca_dir / f"brca_ds_{split}.txt").read_text()
        return [ln.strip() for ln in text.splitlines() if ln.strip()]

    train, val_names = listed("train")[:2], listed("val")
    val, test = val_names[:1], val_names[1:3]
    for name in train + val + test:
        _link_brca_image(brca_dir, root, name)
    for split, listed_names in (("train", train), ("val", val), ("test", test)):
        (root / f"brca_ds_{split}.txt").write_text("\n".join(listed_names) + "\n")
    return root


def make_small_real_data(real_dir: Path, root: Path, n_train: int = 12, n_val: int = 3) -> Path:
    """A folder laid out like the project's ``shared/data/real`` (`cellulib.data.paths.real_dir`)
    whose BRCA-M2C copy holds ``n_train`` images of the official training split and ``n_val`` of
    the validation split, spread over each list (every k-th name), instead of all 90; the other
    real files as they are. Links, not copies.

    For the tiny book builds: a chapter's real-data sections cost time per BRCA-M2C image (one
    epoch over every training image, each network's threshold chosen on them, the held-out
    patients scored under every stain shift), whatever the tiny parameters, and 15 images run the
    same cells as 90 (patient-disjoint split included) in half the time.
    """
    root.mkdir(parents=True)
    for path in real_dir.iterdir():
        if path.name != "brca-m2c":
            (root / path.name).symlink_to(path)
    brca = real_dir / "brca-m2c"
    if not brca.is_dir():
        return root
    copy = root / "brca-m2c"
    (copy / "images").mkdir(parents=True)
    (copy / "labels").mkdir()
    for name in ("LICENSE", "README.md"):
        if (brca / name).exists():
            (copy / name).symlink_to(brca / name)
    for split, n in (("train", n_train), ("val", n_val)):
        text = (brca / f"brca_ds_{split}.txt").read_text()
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
        kept = names[::max(1, len(names) // n)][:n]
        for name in kept:
            _link_brca_image(brca, copy, name)
        (copy / f"brca_ds_{split}.txt").write_text("\n".join(kept) + "\n")
    return root


@pytest.fixture
def brca_full_copy(brca_dir, tmp_path):
    """`make_brca_full_copy` in the test's folder."""
    return make_brca_full_copy(brca_dir, tmp_path / "brca-full")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one torch thread: on a shared 2-core machine, two OpenMP threads
    per process on tiny batches mostly wait for each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def project_kernel(tmp_path_factory) -> str:
    """The kernel the chapters name (``cellulib``), for papermill and Jupyter servers in tests.

    ``make install`` registers it in the environment; where it is missing (``pip install -e .``
    without make) it is registered under a temporary prefix for this session only, found through
    ``JUPYTER_PATH`` (which subprocesses inherit), so the environment is never written to.
    """
    from cellulib.bench.lab import KERNEL_NAME, install_kernel, kernel_spec_dir

    if kernel_spec_dir() is None:
        prefix = tmp_path_factory.mktemp("kernel-prefix")
        install_kernel(prefix)
        share = str(prefix / "share" / "jupyter")
        before = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = share + (os.pathsep + before if before else "")
        assert kernel_spec_dir() is not None, "the kernel registered for the tests is not found"
    return KERNEL_NAME
