"""Shared fixtures: tiny models and synthetic images, so the suite needs no data."""

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import models


def run_python(
    code: str, timeout: float = 120, check: bool = False
) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh process at the repository's root, its output
    captured as text: for what a test must not do in its own process (fork while
    threads run, import a module afresh, exit)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread, restoring the count afterwards.

    The tiny training models (N=8, 64x64 crops) launch kernels so short that, on a
    busy machine with few cores, a second intra-op thread mostly spins waiting for
    its partner and makes each step many times slower. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def train_images(tmp_path):
    """A small image folder for training runs: ``make_image_folder(tmp_path / "data")``
    from test_train_data.py (4 training and 2 test PNGs, the first of each split smaller
    than a 64x64 crop)."""
    from test_train_data import make_image_folder  # it imports this module at its top

    return make_image_folder(tmp_path / "data")


@pytest.fixture
def tiny_cps():
    """A randomly initialised CPS with N=8 and entropy tables, in eval mode."""
    torch.manual_seed(0)
    model = models.build_model("cps", N=8).eval()
    model.update(force=True)
    return model


def data_dir(variable: str) -> str:
    """Path named by an environment variable, or skip the test when it is unset."""
    path = os.environ.get(variable)
    if not path or not os.path.isdir(path):
        pytest.skip(f"set {variable} to run this test on real data")
    return path


def save_model_checkpoint(folder, model, name):
    """Put ``model`` in eval mode with entropy tables and save it the way train.py
    does (architecture, constructor kwargs, state dict); return the path."""
    model.eval()
    model.update(force=True)
    path = folder / f"{name}.pth.tar"
    torch.save(
        {
            "architecture": model.registry_name,
            "model_config": dict(model.config),
            "state_dict": model.state_dict(),
        },
        path,
    )
    return path


def noisy_photos(folder, count=2):
    """``count`` small noisy PNGs of growing heights in ``folder`` (created)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for number in range(count):
        pixels = rng.integers(0, 255, (40 + 8 * number, 56, 3)).astype(np.uint8)
        paths.append(folder / f"photo{number}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths
