"""train.py's behaviour around a run: device fallback, refusals that leave no trace,
and what the progress bar shows. Tiny CPU runs as in test_train.py."""

import io
import re
import warnings

import pytest
import torch
from test_train_data import write_train_config

import train
from utils.training.config import load_config
from utils.training.distributed import DistContext
from utils.training.loop import Trainer

# Tiny models train many times faster on one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_true_without_cuda_trains_on_the_cpu_with_one_warning(tmp_path, train_images, capsys):
    exp = tmp_path / "exp"
    cfg = write_train_config(tmp_path, train_images, exp, train_params={"max_steps": 1},
                             train_data={"cuda": True})
    assert train.main(["--config", cfg]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "warning" in line] == [
        "train.py: warning: train_data.cuda is true but CUDA is not available on this "
        "machine; training on the CPU"]
    stored = torch.load(exp / "checkpoint.pth.tar", weights_only=True)
    assert stored["config"]["train_data"]["cuda"] is True and stored["global_step"] == 1


@pytest.mark.parametrize("argv_extra, message", [
    (["--resume"], "checkpoint not found"),
    (["--init-from", "nowhere.pth"], "checkpoint not found"),
    (["--set", "train_data.batch_size=64"], "give no full batch"),
])
def test_a_refused_run_leaves_no_experiment_folder_and_no_worker_warning(
        tmp_path, train_images, capsys, argv_extra, message):
    exp = tmp_path / "runs" / "exp"
    cfg = write_train_config(tmp_path, train_images, exp, train_data={"num_workers": 64})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train.main(["--config", cfg] + argv_extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "runs").exists()
    assert not [w for w in caught if "worker" in str(w.message)]


def test_an_experiment_path_that_is_a_file_is_a_one_line_error(tmp_path, train_images, capsys):
    exp = tmp_path / "exp"
    exp.write_text("notes")
    cfg = write_train_config(tmp_path, train_images, exp, train_params={"max_steps": 1})
    assert train.main(["--config", cfg]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "experiment_path" in err[0] and "is a file, not a folder" in err[0]
    assert exp.read_text() == "notes"


def test_the_bar_shows_running_means_and_is_not_redrawn_after_validation(tmp_path, train_images,
                                                                         monkeypatch):
    import tqdm

    class EveryUpdate(tqdm.tqdm):  # redraw at each update, however fast the steps are
        def __init__(self, *args, **kwargs):
            super().__init__(*args, mininterval=0, miniters=1, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", EveryUpdate)
    cfg = load_config(write_train_config(
        tmp_path, train_images, tmp_path / "exp", train_params={"max_steps": 4},
        logging={"progress": True, "val_interval": 0}))
    out = io.StringIO()
    assert Trainer(cfg, DistContext(0, 1, torch.device("cpu")), log=out).fit() == 0
    text = out.getvalue()
    validations = re.findall(r"step (\d) validation: .* psnr ([\d.]+) dB", text)
    assert [step for step, _ in validations] == ["2", "4"]
    # Nothing of an epoch's bar follows its validation line: the bar closes first.
    after_first = text.split("step 2 validation")[1].split("\n", 1)[1]
    assert "epoch 0" not in after_first
    # The running PSNR (clamped crops, epoch mean) is of the order of validation's.
    shown = [float(v) for v in re.findall(r"psnr=([\d.-]+)", text)]
    assert shown and all(abs(v - float(validations[0][1])) < 3 for v in shown)
