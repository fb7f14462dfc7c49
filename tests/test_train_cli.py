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
def test_cuda_true_without_cuda_trains_on_the_cpu_with_one_warning(
    tmp_path, train_images, capsys
):
    exp = tmp_path / "exp"
    cfg = write_train_config(
        tmp_path,
        train_images,
        exp,
        train_params={"max_steps": 1},
        train_data={"cuda": True},
    )
    assert train.main(["--config", cfg]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "warning" in line] == [
        "train.py: warning: train_data.cuda is true but CUDA is not available on this "
        "machine; training on the CPU"
    ]
    stored = torch.load(exp / "checkpoint.pth.tar", weights_only=True)
    assert stored["config"]["train_data"]["cuda"] is True and stored["global_step"] == 1


@pytest.mark.parametrize(
    "argv_extra, message",
    [
        (["--resume"], "checkpoint not found"),
        (["--init-from", "nowhere.pth"], "checkpoint not found"),
        (
            ["--set", "train_data.batch_size=64"],
            "give no full batch of 64 per process (1 process)",
        ),
    ],
)
def test_a_refused_run_leaves_no_experiment_folder_and_no_worker_warning(
    tmp_path, train_images, capsys, argv_extra, message
):
    exp = tmp_path / "runs" / "exp"
    cfg = write_train_config(
        tmp_path, train_images, exp, train_data={"num_workers": 64}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train.main(["--config", cfg] + argv_extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "runs").exists()
    assert not [w for w in caught if "worker" in str(w.message)]


@pytest.mark.parametrize(
    "model, message",
    [
        ({"name": "kamisli"}, "unknown architecture 'kamisli'; known: "),
        (
            {"kwargs": {"depth": 3}},
            "model 'cps' rejects its kwargs {'depth': 3, 'N': 8}: ",
        ),
    ],
    ids=["architecture", "kwarg"],
)
def test_a_model_the_config_cannot_build_is_reported_before_the_images_are_counted(
    tmp_path, train_images, capsys, model, message
):
    # 4 training images give no batch of 64 either: the config's mistake comes first.
    exp = tmp_path / "runs" / "exp"
    cfg = write_train_config(
        tmp_path, train_images, exp, train_data={"batch_size": 64}, model=model
    )
    assert train.main(["--config", cfg]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "full batch" not in err[0], err
    assert not (tmp_path / "runs").exists()
    # So does the trainer itself, given a config checked without the model.
    with pytest.raises(ValueError, match=re.escape(message)):
        Trainer(load_config(cfg), DistContext(0, 1, torch.device("cpu")))


def test_a_crop_the_model_cannot_take_is_reported_with_the_other_config_problems(
    tmp_path, train_images, capsys
):
    cfg = write_train_config(tmp_path, train_images, tmp_path / "exp")
    overrides = ["train_params.crop_size=100", "train_data.batch_size=0"]
    assert train.main(["--config", cfg, "--set"] + overrides) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"train.py: error: {cfg}: 2 problems: config key train_data.batch_size must "
        "be in [1, 4096], got 0; train_params.crop_size=100 must be a multiple of 64 "
        "for model 'cps'"
    ]


def test_every_model_and_acl_problem_is_reported_with_the_config_problems(
    tmp_path, train_images, capsys
):
    cfg = write_train_config(
        tmp_path,
        train_images,
        tmp_path / "exp",
        train_data={"batch_size": 0},
        train_params={"training_mode": "acl", "crop_size": 96},
        lr_schedule={"type": "cosine"},
    )
    assert train.main(["--config", cfg]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4 problems: config key train_data.batch_size " in err[0]
    assert (
        "implements models.base.ClosedLoopTrainable" in err[0] and "not 'cps'" in err[0]
    )
    assert "lr_schedule.type is 'cosine'" in err[0]
    assert "train_params.crop_size=96 must be a multiple of 64" in err[0]


def test_an_experiment_path_that_is_a_file_is_a_one_line_error(
    tmp_path, train_images, capsys
):
    exp = tmp_path / "exp"
    exp.write_text("notes")
    cfg = write_train_config(tmp_path, train_images, exp, train_params={"max_steps": 1})
    assert train.main(["--config", cfg]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "experiment_path" in err[0]
        and "is a file, not a folder" in err[0]
    )
    assert exp.read_text() == "notes"


def test_the_bar_shows_running_means_and_is_not_redrawn_after_validation(
    tmp_path, train_images, monkeypatch
):
    import tqdm

    class EveryUpdate(tqdm.tqdm):  # redraw at each update, however fast the steps are
        def __init__(self, *args, **kwargs):
            super().__init__(*args, mininterval=0, miniters=1, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", EveryUpdate)
    cfg = load_config(
        write_train_config(
            tmp_path,
            train_images,
            tmp_path / "exp",
            train_params={"max_steps": 4},
            logging={"progress": True, "val_interval": 0},
        )
    )
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


class _Split:
    """Just what UnusableImages reads of a CropImageFolder."""

    def __init__(self, total, unusable=()):
        self.samples = [f"img{i}.png" for i in range(total)]
        self.total, self.unusable = total, list(unusable)

    def why_unusable(self, index):
        return f"broken {index}"


def test_unusable_images_count_each_image_once_including_index_0():
    from utils.training.bad_images import UnusableImages

    log = []
    tracker = UnusableImages(_Split(10), "training", 0.5, log.append)
    # -1 marks "nothing skipped"; index 0 is a real image like any other.
    tracker.note(torch.tensor([-1, 0, 3, 3, -1]))
    tracker.note(torch.tensor([0, -1]))
    assert tracker.count == 2
    assert log == [
        "warning: skipping training image img0.png (broken 0); 1 of 10 unusable so far",
        "warning: skipping training image img3.png (broken 3); 2 of 10 unusable so far",
    ]


def test_unusable_images_stop_the_run_only_past_the_fraction():
    from utils.training.bad_images import UnusableImages

    # 2 of 10 at max_bad_fraction 0.2 is at the limit, not past it: the run goes on.
    tracker = UnusableImages(
        _Split(10, [("listed.png", "too small")]), "validation", 0.2, lambda line: None
    )
    tracker.note(torch.tensor([4]))
    assert tracker.count == 2
    with pytest.raises(
        RuntimeError,
        match=r"^3 of 10 validation images are unusable, more than "
        r"train_data.max_bad_fraction=0.2; the last: img5.png",
    ):
        tracker.note(torch.tensor([5]))


def test_the_acl_check_up_front_keeps_the_good_images_and_stops_only_past_the_fraction(
    tmp_path,
):
    from PIL import Image

    from utils.training.bad_images import usable_images

    paths = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        if i == 1:
            path.write_bytes(b"not a png")
        else:
            Image.new("RGB", (4, 4)).save(path)
        paths.append(str(path))
    log = []
    # 1 of 4 at 0.25 is at the limit: kept images only, one warning.
    assert (
        usable_images(paths, "train", 0.25, None, log.append) == [paths[0]] + paths[2:]
    )
    assert len(log) == 1 and log[0].startswith(
        f"warning: skipping train image {paths[1]} ("
    )
    with pytest.raises(RuntimeError, match="1 of 4 train images are unusable"):
        usable_images(paths, "train", 0.2, None, log.append)


@pytest.mark.parametrize("existed", [False, True], ids=["made", "existing"])
def test_a_run_stopped_before_its_first_step_removes_only_the_folders_it_made(
    tmp_path, capsys, existed
):
    """Bad images stop the run before any step: the experiment folder (and its parent)
    that the run created go, but a folder the user had made stays."""
    from test_train_data import make_image_folder

    data = make_image_folder(tmp_path / "data", n_train=4)
    for name in ("01.png", "02.png"):
        path = tmp_path / "data" / "train" / name
        path.write_bytes(path.read_bytes()[:60])
    exp = tmp_path / "runs" / "exp"
    if existed:
        exp.mkdir(parents=True)
    cfg = write_train_config(tmp_path, data, exp, train_params={"max_steps": 4})
    status = train.main(["--config", cfg])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and "training images are unusable" in err[-1], err
    assert exp.is_dir() == existed and (tmp_path / "runs").exists() == existed
