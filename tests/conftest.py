"""Shared pytest fixtures: tiny data, the real H&E images beside the repository."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]


def _real_dir() -> Path:
    env = os.environ.get("CELLULIB_REAL_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """The folder of public real H&E images (``../shared/data/real``); skips when absent."""
    path = _real_dir()
    if not path.is_dir() or not any(path.iterdir()):
        pytest.skip(f"real H&E images not found at {path}")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one torch thread: on a shared 2-core machine, two OpenMP threads
    per process on tiny batches mostly wait for each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
