"""train.py and the training loop: exact resume, checkpoints, guards, signals.

Every run uses a tiny CPS (N=8), 64x64 crops of a few synthetic images in
``tmp_path``, ``num_workers=0`` and one CPU thread, so each run is short.
"""

import io
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from compressai.losses import RateDistortionLoss
from test_train_data import make_image_folder, write_train_config

import models
import train
from models.weight_checks import entropy_tables_ready
from utils.training.config import load_config, to_plain_dict
from utils.training.distributed import DistContext
from utils.training.loop import Trainer
from utils.training.optimizers import build_optimizers, build_scheduler
from utils.training.step import NonFiniteLossError, TrainStep, step_seed

# Tiny models train many times faster on one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = DistContext(0, 1, torch.device("cpu"))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b


@pytest.mark.parametrize(
    "schedule",
    [
        {"type": "plateau", "patience": 0, "factor": 0.5},
        {"type": "multistep", "milestones": [2, 5], "factor": 0.5},
    ],
)
def test_resumed_run_matches_uninterrupted_run_bit_for_bit(
    tmp_path, train_images, schedule
):
    # 4 training images at batch 2: 2 steps per epoch, a validation after each.
    # 6 steps straight vs 3 steps (stopping mid-epoch) + a resume up to 6.
    straight, split = tmp_path / "straight", tmp_path / "split"
    cfg = write_train_config(
        tmp_path,
        train_images,
        straight,
        lr_schedule=schedule,
        train_params={"max_steps": 6},
    )
    assert train.main(["--config", cfg]) == 0
    cfg = write_train_config(tmp_path, train_images, split, lr_schedule=schedule)
    assert train.main(["--config", cfg, "--set", "train_params.max_steps=3"]) == 0
    middle = load(split / "checkpoint.pth.tar")
    assert (middle["global_step"], middle["epoch"], middle["epoch_step"]) == (3, 1, 1)
    assert (
        train.main(["--config", cfg, "--set", "train_params.max_steps=6", "--resume"])
        == 0
    )

    a, b = load(straight / "checkpoint.pth.tar"), load(split / "checkpoint.pth.tar")
    for key in ("state_dict", "optimizer", "aux_optimizer", "lr_scheduler"):
        assert_same_tensors(a[key], b[key])
    assert (a["global_step"], a["epoch"], a["epoch_step"]) == (6, 3, 0)
    assert (a["loss"], a["best_loss"]) == (b["loss"], b["best_loss"])
    assert not torch.equal(
        a["state_dict"]["g_a.0.conv1.weight"],
        middle["state_dict"]["g_a.0.conv1.weight"],
    )


def test_checkpoints_are_self_describing_and_ready_for_coding(tmp_path, train_images):
    exp = tmp_path / "exp"
    cfg = write_train_config(tmp_path, train_images, exp, train_params={"max_steps": 2})
    assert train.main(["--config", cfg]) == 0
    last, best = (
        load(exp / "checkpoint.pth.tar"),
        load(exp / "checkpoint_best_loss.pth.tar"),
    )
    for ckpt in (last, best):
        assert {
            "epoch",
            "state_dict",
            "loss",
            "optimizer",
            "aux_optimizer",
            "lr_scheduler",
            "architecture",
            "model_config",
            "config",
            "global_step",
            "best_loss",
            "rng",
        } <= set(ckpt)
        assert ckpt["architecture"] == "cps" and ckpt["model_config"] == {"N": 8}
        assert not any(k.startswith("module.") for k in ckpt["state_dict"])
        assert ckpt["config"] == to_plain_dict(load_config(cfg))
    assert best["loss"] == best["best_loss"] == last["loss"]
    # The best checkpoint's quantiles are solved for coding; the live ones are not yet.
    assert best["aux_loss"] < 0.1 < last["aux_loss"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = models.load_checkpoint(str(exp / "checkpoint_best_loss.pth.tar"))
    assert model.N == 8 and entropy_tables_ready(model)
    # Coding with the last state works but says that its bpp is not the best it can be.
    with pytest.warns(
        UserWarning,
        match=r"checkpoint\.pth\.tar is a training run's last "
        r"state: .* code with the run's checkpoint_best_loss\.pth\.tar",
    ):
        models.load_checkpoint(str(exp / "checkpoint.pth.tar"))
    assert float(model.aux_loss().detach()) == pytest.approx(best["aux_loss"], abs=1e-4)
    # The global generator's state is stored, and a resume puts it back.
    assert last["rng"]["torch"].dtype == torch.uint8
    torch.manual_seed(1234)
    Trainer(
        train.resolve_config(
            train.parse_args(
                ["--config", cfg, "--resume", "--set", "train_params.max_steps=3"]
            )
        ),
        CPU,
        log=io.StringIO(),
    )
    assert torch.equal(torch.get_rng_state(), last["rng"]["torch"])


def test_a_resumed_run_keeps_the_best_checkpoint_from_before_the_interruption(
    tmp_path, train_images, monkeypatch, capsys
):
    # Validation stubbed: loss 1.0 at step 2, before the interruption, then 2.0 at
    # step 4.
    losses = iter([1.0, 2.0])
    monkeypatch.setattr(
        Trainer,
        "validate",
        lambda self: {
            "loss": next(losses),
            "mse": 0.01,
            "bpp": 0.5,
            "psnr": 20.0,
            "aux": 0.0,
        },
    )
    exp = tmp_path / "exp"
    cfg = write_train_config(tmp_path, train_images, exp, train_params={"max_steps": 2})
    assert train.main(["--config", cfg]) == 0
    assert (
        train.main(["--config", cfg, "--resume", "--set", "train_params.max_steps=4"])
        == 0
    )
    last, best = (
        load(exp / "checkpoint.pth.tar"),
        load(exp / "checkpoint_best_loss.pth.tar"),
    )
    assert (last["global_step"], last["loss"], last["best_loss"]) == (4, 2.0, 1.0)
    assert (best["global_step"], best["loss"]) == (2, 1.0)
    assert (last["best_step"], best["best_step"]) == (2, 2)
    # The last line says the best checkpoint is not the last step's model.
    done = capsys.readouterr().err.strip().splitlines()[-1]
    assert done == (
        f"done at step 4; checkpoints in {exp}; checkpoint_best_loss.pth.tar is "
        "from step 2, the best of the validations, which run at the end of each "
        "epoch"
    )


def test_a_resumed_run_carries_over_its_streak_of_nonfinite_steps(
    tmp_path, train_images
):
    exp = tmp_path / "exp"
    cfg = write_train_config(
        tmp_path,
        train_images,
        exp,
        train_params={"max_steps": 1, "max_nonfinite_steps": 3},
    )
    assert train.main(["--config", cfg]) == 0
    checkpoint = load(exp / "checkpoint.pth.tar")
    assert checkpoint["nonfinite_in_a_row"] == 0
    checkpoint["nonfinite_in_a_row"] = 2  # as if stopped two NaN steps into a streak
    torch.save(checkpoint, exp / "checkpoint.pth.tar")
    trainer = Trainer(
        train.resolve_config(
            train.parse_args(
                ["--config", cfg, "--resume", "--set", "train_params.max_steps=2"]
            )
        ),
        CPU,
        log=io.StringIO(),
    )
    assert trainer.pos.nonfinite_in_a_row == trainer.step.nonfinite_in_a_row == 2
    # So the first NaN step after the resume is the third in a row, and ends the run.
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        trainer.step(torch.full((2, 3, 64, 64), float("nan")), trainer.pos.global_step)


def test_the_plateau_schedule_lowers_the_lr_only_once_validation_stops_improving():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler, per = build_scheduler(
        optimizer, {"type": "plateau", "factor": 0.5, "patience": 1, "min_lr": 0.0}, 100
    )
    assert per == "validation"
    for loss in (4.0, 3.0, 2.0, 1.0):  # a falling loss improves at every validation
        scheduler.step(loss)
    assert optimizer.param_groups[0]["lr"] == 1.0
    for loss in (1.0, 1.5):  # patience 1: the second validation without improvement
        scheduler.step(loss)
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_each_rank_and_each_step_draws_its_own_noise():
    assert step_seed(0, 5, 0) != step_seed(0, 5, 1)
    seeds = {
        step_seed(seed, step, rank)
        for seed in (0, 1, 2**31)
        for step in range(50)
        for rank in range(8)
    }
    assert len(seeds) == 3 * 50 * 8
    assert all(0 <= seed < 2**63 for seed in seeds)  # what torch.manual_seed takes


def test_init_from_takes_the_weights_and_starts_a_new_run(tmp_path, train_images):
    source = models.build_model("cps", N=8)
    wrapped = {"module." + k: v for k, v in source.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 41}, tmp_path / "authors.pth.tar")
    cfg = write_train_config(tmp_path, train_images, tmp_path / "exp")
    args = train.parse_args(
        [
            "--config",
            cfg,
            "--init-from",
            str(tmp_path / "authors.pth.tar"),
            "--set",
            "train_params.lmbda=0.05",
        ]
    )
    trainer = Trainer(train.resolve_config(args), CPU, log=io.StringIO())
    assert (
        trainer.pos.global_step == 0 and trainer.optimizer.state_dict()["state"] == {}
    )
    for name, value in source.state_dict().items():
        if value.numel():
            assert torch.equal(trainer.raw.state_dict()[name], value), name
    assert trainer.criterion.lmbda == 0.05
    trainer.close()  # built to look at, not run: the folder is free again

    other = tmp_path / "wide.pth.tar"
    torch.save(models.build_model("cps", N=16).state_dict(), other)
    with pytest.raises(
        ValueError,
        match=r"cannot initialise from .*wide.pth.tar: its weights "
        r"have N=16, this run's model N=8 \(set "
        r"train_params.N to match\)$",
    ):
        Trainer(
            train.resolve_config(
                train.parse_args(["--config", cfg, "--init-from", str(other)])
            ),
            CPU,
        )
    # Weights of another model: the architectures are named, not a list of keys.
    torch.save({"architecture": "mbt2018-mean", "state_dict": {}}, other)
    with pytest.raises(
        ValueError,
        match=r"^cannot initialise a 'cps' model from .*wide.pth.tar: "
        r"it holds a 'mbt2018-mean' model",
    ):
        Trainer(
            train.resolve_config(
                train.parse_args(["--config", cfg, "--init-from", str(other)])
            ),
            CPU,
        )
    # Weights that build no model of this architecture keep the key-level report.
    torch.save({"state_dict": {"g_a.0.weight": torch.zeros(1)}}, other)
    with pytest.raises(
        ValueError,
        match=r"cannot initialise from .*: checkpoint does not fit "
        r"architecture 'cps': missing",
    ):
        Trainer(
            train.resolve_config(
                train.parse_args(["--config", cfg, "--init-from", str(other)])
            ),
            CPU,
        )
    # A file that holds no state dict is named.
    torch.save({"a": 1}, other)
    with pytest.raises(
        ValueError,
        match=r"^cannot initialise from .*wide.pth.tar: not a state "
        r"dict: entry 'a' is not a tensor \(int\)$",
    ):
        Trainer(
            train.resolve_config(
                train.parse_args(["--config", cfg, "--init-from", str(other)])
            ),
            CPU,
        )


def test_a_resume_with_another_width_names_the_key_to_set(tmp_path):
    """As --init-from does: a resume whose --set changes the model's sizes used to
    list shape mismatches, which say nothing of the config key that caused them."""
    from utils.training.state_loading import restore

    path = tmp_path / "wide.pth.tar"
    torch.save({"state_dict": models.build_model("cps", N=16).state_dict()}, path)
    with pytest.raises(ValueError) as caught:
        restore(torch.load(path), models.build_model("cps", N=8), *[None] * 4, path)
    assert str(caught.value) == (
        f"cannot resume from {path}: its weights have N=16, this run's model N=8 "
        "(set train_params.N to match)"
    )


def run_cli(argv, capsys):
    status = train.main(argv)
    return status, capsys.readouterr().err.strip().splitlines()


def test_cli_errors_are_one_stderr_line(tmp_path, train_images, capsys):
    exp = tmp_path / "exp"
    cfg = write_train_config(tmp_path, train_images, exp, train_params={"max_steps": 1})
    status, err = run_cli(["--config", str(tmp_path / "missing.yaml")], capsys)
    assert status == 1 and err == [
        f"train.py: error: config file not found: {tmp_path / 'missing.yaml'}"
    ]
    status, err = run_cli(["--config", cfg, "--resume"], capsys)
    assert status == 1 and len(err) == 1 and "checkpoint not found" in err[0]
    assert run_cli(["--config", cfg], capsys)[0] == 0
    status, err = run_cli(["--config", cfg], capsys)  # would overwrite the run
    assert status == 1 and len(err) == 1 and "pass --resume" in err[0]
    # A folder holding only a best checkpoint (the last one moved away) is kept too.
    os.remove(exp / "checkpoint.pth.tar")
    best = (exp / "checkpoint_best_loss.pth.tar").read_bytes()
    status, err = run_cli(["--config", cfg], capsys)
    assert status == 1 and err == [
        f"train.py: error: {exp / 'checkpoint_best_loss.pth.tar'} "
        "exists, which a new run would overwrite: choose another "
        "train_data.experiment_path, or move that file away"
    ]
    assert (exp / "checkpoint_best_loss.pth.tar").read_bytes() == best
    status, err = run_cli(["--config", str(tmp_path)], capsys)
    assert status == 1 and err == [
        f"train.py: error: config file {tmp_path} is a folder, not a file"
    ]
    bare = tmp_path / "bare.pth"
    torch.save(models.build_model("cps", N=8).state_dict(), bare)
    status, err = run_cli(["--config", cfg, "--resume", str(bare)], capsys)
    assert status == 1 and len(err) == 1 and "use --init-from" in err[0]


def make_step(lmbda=0.01, metric="mse", **kwargs):
    torch.manual_seed(0)
    model = models.build_model("cps", N=8).train()
    optimizer, aux_optimizer = build_optimizers(model, 1e-3, 1e-3)
    return model, TrainStep(
        model,
        model,
        RateDistortionLoss(lmbda, metric),
        optimizer,
        aux_optimizer,
        **kwargs,
    )


def test_nonfinite_loss_skips_the_update_and_a_streak_aborts():
    model, step = make_step(max_nonfinite_steps=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = torch.full((2, 3, 64, 64), float("nan"))
    good = torch.rand(2, 3, 64, 64)
    for i in range(2):
        with pytest.warns(RuntimeWarning, match=f"non-finite.*{i + 1} in a row"):
            assert step(bad, i)["skipped"] == 1.0
    assert_same_tensors(model.state_dict(), before)
    assert step(good, 2)["skipped"] == 0.0 and step.nonfinite_in_a_row == 0
    assert not torch.equal(model.g_a[0].conv1.weight, before["g_a.0.conv1.weight"])
    with pytest.warns(RuntimeWarning):
        step(bad, 3)
        step(bad, 4)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        step(bad, 5)


def test_cuda_graph_option_changes_nothing_on_the_cpu():
    batches = [
        torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i))
        for i in range(5)
    ]
    runs = []
    for cuda_graph in (False, True):
        model, step = make_step(cuda_graph=cuda_graph)
        runs.append(([step(x, i) for i, x in enumerate(batches)], model.state_dict()))
        assert not step.graph_captured
    assert runs[0][0] == runs[1][0]
    assert_same_tensors(runs[0][1], runs[1][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_follow_the_eager_steps_and_still_skip_nonfinite_batches():
    """After the eager warm-up steps the step is replayed; the replayed steps train
    like eager ones (same seeds, so the same noise), and a NaN batch still skips the
    update without disturbing the captured gradients."""
    batches = [
        torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)).cuda()
        for i in range(8)
    ]
    losses, weights = [], []
    for cuda_graph in (False, True):
        model, step = make_step(cuda_graph=cuda_graph)
        model.cuda()
        losses.append([step(x, i)["loss"] for i, x in enumerate(batches)])
        assert step.graph_captured == cuda_graph
        weights.append(model.g_s[-1].conv.weight.detach().clone())
        if cuda_graph:
            before = model.g_s[-1].conv.weight.detach().clone()
            with pytest.warns(RuntimeWarning, match="non-finite"):
                assert (
                    step(torch.full_like(batches[0], float("nan")), 8)["skipped"] == 1.0
                )
            assert torch.equal(model.g_s[-1].conv.weight, before)
            assert step(batches[0], 9)["skipped"] == 0.0
            assert not torch.equal(model.g_s[-1].conv.weight, before)
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert torch.allclose(weights[0], weights[1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "options, side",
    [
        ({"amp": True}, 64),
        ({"channels_last": True}, 64),
        ({"metric": "ms-ssim", "lmbda": 3.0}, 192),  # 5 MS-SSIM scales need >= 161 px
    ],
)
def test_amp_channels_last_and_ms_ssim_steps_train_the_model(options, side):
    model, step = make_step(**options)
    if options.get("channels_last"):
        model.to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, side, side)
    before = model.g_s[-1].conv.weight.clone()
    stats = step(x, 0)
    assert stats["skipped"] == 0.0 and stats["bpp"] > 0 and stats["mse"] > 0
    if options.get("metric") == "ms-ssim":  # loss = lmbda * (1 - MS-SSIM) + bpp
        assert 0 < (stats["loss"] - stats["bpp"]) / 3.0 < 1
    assert not torch.equal(model.g_s[-1].conv.weight, before)


def test_each_step_moves_every_quantile_by_the_aux_lr_and_lowers_the_aux_loss():
    # The aux loss is an L1 distance, so each quantile's gradient is +-1 at every
    # step and Adam moves it by exactly the aux learning rate (which differs from
    # the network's here, to show which optimizer moved it).
    torch.manual_seed(0)
    model = models.build_model("cps", N=8).train()
    optimizer, aux_optimizer = build_optimizers(model, 1e-3, 1e-2)
    step = TrainStep(model, model, RateDistortionLoss(0.01), optimizer, aux_optimizer)
    quantiles = model.entropy_bottleneck.quantiles
    start = quantiles.detach().clone()
    aux = [step(torch.rand(2, 3, 64, 64), i)["aux"] for i in range(3)]
    moved = (quantiles.detach() - start).abs()
    assert moved.flatten().tolist() == pytest.approx([3e-2] * moved.numel(), rel=1e-3)
    assert aux[0] > aux[1] > aux[2]
    # The network's own step also changes the aux loss; the quantiles alone lower it.
    with torch.no_grad():
        trained = model.aux_loss().item()
        quantiles.copy_(start)
        assert model.aux_loss().item() > trained


def test_training_lowers_the_validation_loss(tmp_path, train_images):
    # At lmbda 0.01 the first tens of steps only pull the (unclamped) output back
    # into [0, 1]: the loss halves while the PSNR of the clamped output stands still.
    # lmbda 0.1 and lr 3e-3 put the distortion first, so 30 steps must show
    # real learning: 6.5 -> 11.2 dB at seed 0 and 6.9 -> 13.6 dB at seed 1.
    cfg = load_config(
        write_train_config(
            tmp_path,
            train_images,
            tmp_path / "exp",
            train_params={"max_steps": 30, "lmbda": 0.1, "learning_rate": 3e-3},
            logging={"val_interval": 10, "progress": False, "tensorboard": False},
        )
    )
    trainer = Trainer(cfg, CPU, log=io.StringIO())
    before = trainer.validate()
    assert trainer.fit() == 0
    after = trainer.validate()
    assert trainer.pos.global_step == 30
    assert after["loss"] < 0.2 * before["loss"]
    assert after["mse"] < 0.5 * before["mse"]
    assert after["psnr"] > before["psnr"] + 3.0
    assert 0 < after["bpp"] < 1


class _RaiseSignalAt:
    """Dataset wrapper that delivers ``signum`` to this process at sample ``at``."""

    def __init__(self, dataset, at, signum):
        self.dataset, self.at, self.signum, self.seen = dataset, at, signum, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        self.seen += 1
        if self.seen == self.at:
            signal.raise_signal(self.signum)
        return self.dataset[key]


def test_sigint_mid_epoch_saves_the_current_step_and_exits_130(tmp_path, train_images):
    cfg = load_config(write_train_config(tmp_path, train_images, tmp_path / "exp"))
    trainer = Trainer(cfg, CPU, log=io.StringIO())
    trainer.train_loader = trainer.images.loader(
        _RaiseSignalAt(trainer.images.train_set, 5, signal.SIGINT),
        trainer.images.train_sampler,
        2,
        True,
    )
    assert trainer.fit() == 128 + signal.SIGINT
    ckpt = load(tmp_path / "exp" / "checkpoint.pth.tar")
    # Sample 5 is the first of step 3: that step completes, then the run stops.
    assert (ckpt["global_step"], ckpt["epoch"], ckpt["epoch_step"]) == (3, 1, 1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow  # an end-to-end run in a fresh process or a large image
@pytest.mark.parametrize("target", ["main process", "process group with workers"])
def test_sigterm_from_outside_saves_a_checkpoint(tmp_path, train_images, target):
    """The group case is a batch scheduler's time limit: the DataLoader workers get the
    signal too, and one dying of it ended the run without a checkpoint."""
    exp = tmp_path / "exp"
    cfg = write_train_config(
        tmp_path, train_images, exp, logging={"checkpoint_interval": 1}
    )
    workers = "2" if target == "process group with workers" else "0"
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO, "train.py"),
            "--config",
            cfg,
            "--set",
            f"train_data.num_workers={workers}",
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    # The first checkpoint (after step 1) proves the handlers are installed; the
    # generous limit only matters on a starved machine.
    deadline = time.time() + 600
    while not (exp / "checkpoint.pth.tar").exists() and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    assert (exp / "checkpoint.pth.tar").exists(), (
        "train.py wrote no checkpoint in 600 s"
    )
    if workers == "0":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    assert load(exp / "checkpoint.pth.tar")["global_step"] >= 1


def test_tensorboard_gets_training_scalars_validation_scalars_and_images(
    tmp_path, train_images
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = tmp_path / "exp"
    cfg = write_train_config(
        tmp_path,
        train_images,
        exp,
        train_params={"max_steps": 4},
        logging={"tensorboard": True, "log_interval": 2, "num_images": 1},
    )
    assert train.main(["--config", cfg]) == 0
    events = EventAccumulator(str(exp), size_guidance={"images": 0}).Reload()
    for key in ("loss", "mse", "bpp", "aux", "psnr", "lr"):
        assert [e.step for e in events.Scalars(f"train/{key}")] == [2, 4], key
    for key in ("loss", "mse", "bpp", "aux", "psnr"):
        assert [e.step for e in events.Scalars(f"val/{key}")] == [2, 4], key
    # Training PSNR is the mean per-crop PSNR of the clamped output: at least the PSNR
    # of the mean (unclamped) MSE, by Jensen's inequality. The LR is the configured one.
    for mse, value in zip(events.Scalars("train/mse"), events.Scalars("train/psnr")):
        assert value.value >= -10 * math.log10(mse.value) - 1e-4
    assert events.Scalars("train/lr")[0].value == pytest.approx(1e-3)
    (image,) = [
        e for e in events.Images("val/original_vs_reconstruction") if e.step == 4
    ]
    # One pair, 2px grid.
    assert (image.width, image.height) == (2 * 64 + 3 * 2, 64 + 2 * 2)


def test_unusable_training_images_are_skipped_counted_and_past_the_limit_stop_the_run(
    tmp_path, capsys
):
    from test_train_data import write_broken_images

    data = make_image_folder(tmp_path / "data", n_train=6)
    (tmp_path / "data" / "train" / "zz_text.jpg").write_text("<html></html>")
    exp = tmp_path / "exp"
    cfg = write_train_config(
        tmp_path,
        data,
        exp,
        train_params={"max_steps": 4},
        train_data={"num_workers": 1, "max_bad_fraction": 0.2},
    )
    assert train.main(["--config", cfg]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "zz_text.jpg" in line]
    assert warnings == [
        f"warning: skipping training image {tmp_path}/data/train/zz_text.jpg "
        "(not an image file of a format PIL reads); 1 of 7 unusable so far"
    ]

    # Four more broken files: 5 of 11 is more than 20 %, a one-line error through a
    # worker.
    write_broken_images(tmp_path / "data" / "train")
    status, err = run_cli(
        ["--config", cfg, "--set", f"train_data.experiment_path={exp}2"], capsys
    )
    assert status == 1
    assert (
        err[-1].startswith("train.py: error: ")
        and "train_data.max_bad_fraction=0.2" in err[-1]
    )
    assert not any("Traceback" in line for line in err)


def test_a_run_stopped_for_bad_validation_images_keeps_its_steps_and_resumes(
    tmp_path, capsys
):
    """Validation images are first read at the first validation, after a whole epoch:
    that work was thrown away, with no checkpoint, when they proved unusable."""
    data = make_image_folder(tmp_path / "data", n_train=4, n_test=3)
    cut = tmp_path / "data" / "test" / "02.png"
    cut.write_bytes(cut.read_bytes()[:60])
    exp = tmp_path / "exp"
    cfg = write_train_config(tmp_path, data, exp, train_params={"max_steps": 4})
    status, err = run_cli(["--config", cfg], capsys)
    assert status == 1 and err[-1].startswith(
        "train.py: error: 1 of 3 validation images"
    )
    assert err[-1].endswith(
        f"; the 2 steps done are saved: after the repair, continue with "
        f"--resume {exp / 'checkpoint.pth.tar'}"
    ), err[-1]
    assert load(exp / "checkpoint.pth.tar")["global_step"] == 2
    cut.unlink()
    status, _ = run_cli(["--resume", str(exp / "checkpoint.pth.tar")], capsys)
    assert status == 0 and load(exp / "checkpoint.pth.tar")["global_step"] == 4


def test_a_run_stopped_for_bad_images_before_its_first_step_leaves_no_folder(
    tmp_path, capsys
):
    data = make_image_folder(tmp_path / "data", n_train=4)
    for name in ("01.png", "02.png"):
        path = tmp_path / "data" / "train" / name
        path.write_bytes(path.read_bytes()[:60])
    exp = tmp_path / "exp"
    cfg = write_train_config(tmp_path, data, exp, train_params={"max_steps": 4})
    status, err = run_cli(["--config", cfg], capsys)
    assert status == 1 and "training images are unusable" in err[-1], err
    assert "steps done are saved" not in err[-1] and not exp.exists()


def test_a_worker_error_is_one_line_and_leaves_no_worker_running(tmp_path, capsys):
    """Workers left running made the process wait for them at exit: it hung."""
    data = make_image_folder(tmp_path / "data", n_train=1)
    for i in range(5):
        (tmp_path / "data" / "train" / f"x{i}.jpg").write_bytes(b"")
    cfg = write_train_config(
        tmp_path,
        data,
        tmp_path / "exp",
        train_data={"batch_size": 1, "num_workers": 1, "max_bad_fraction": 1.0},
    )
    status, err = run_cli(["--config", cfg], capsys)
    errors = [line for line in err if line.startswith("train.py:")]
    assert status == 1 and len(errors) == 1
    assert errors[0].startswith(
        "train.py: error: 5 images in a row cannot be used, the last "
    )
    assert multiprocessing.active_children() == []


def test_a_bug_raised_in_a_worker_leaves_no_worker_running(
    tmp_path, train_images, monkeypatch
):
    """Only the reported errors freed the loader's iterator: a worker's TypeError (a
    bug in cropping or collating) printed its traceback, then hung at exit."""
    import datasets.image_folder

    def broken(*args, **kwargs):
        raise TypeError("a bug in the crop")

    monkeypatch.setattr(datasets.image_folder, "open_rgb", broken)  # forked workers
    cfg = write_train_config(
        tmp_path, train_images, tmp_path / "exp", train_data={"num_workers": 1}
    )
    with pytest.raises(TypeError, match="a bug in the crop"):
        train.main(["--config", cfg])
    assert multiprocessing.active_children() == []


def test_resume_from_the_checkpoint_alone_restores_its_config_and_prints_each_change(
    tmp_path, train_images, capsys
):
    exp = tmp_path / "exp"
    cfg = write_train_config(tmp_path, train_images, exp, train_params={"max_steps": 2})
    assert train.main(["--config", cfg]) == 0
    capsys.readouterr()
    ckpt = str(exp / "checkpoint.pth.tar")
    status, err = run_cli(
        ["--resume", ckpt, "--set", "train_params.max_steps=3"], capsys
    )
    assert status == 0
    assert [line for line in err if "config changed" in line] == [
        "warning: config changed since the checkpoint: train_params.max_steps: 2 -> 3"
    ]
    stored = load(ckpt)
    assert stored["global_step"] == 3
    assert stored["config"]["train_params"] == {
        **to_plain_dict(load_config(cfg)).get("train_params"),
        "max_steps": 3,
    }
    # --config given again overrides the stored config; each difference is one line.
    # One --set takes several overrides.
    status, err = run_cli(
        [
            "--config",
            cfg,
            "--resume",
            ckpt,
            "--set",
            "train_params.lmbda=0.02",
            "train_params.max_steps=4",
        ],
        capsys,
    )
    assert status == 0
    assert [line for line in err if "config changed" in line] == [
        "warning: config changed since the checkpoint: "
        "train_params.lmbda: 0.01 -> 0.02",
        "warning: config changed since the checkpoint: train_params.max_steps: 3 -> 4",
    ]
    assert err[
        err.index(
            "warning: config changed since the checkpoint: train_params.max_steps: "
            "3 -> 4"
        )
        + 1
    ] == (
        "warning: the run continues with the changed values; train.py --resume "
        "CHECKPOINT without --config or --set keeps the checkpoint's config"
    )
    # A new lambda makes the old best loss incomparable: the best checkpoint is this
    # lambda's (it stayed the old lambda's model when the new losses were higher).
    assert (
        "warning: the loss changed, so earlier validation losses do not compare: "
        "checkpoint_best_loss.pth.tar and the plateau schedule start again from the "
        "next validation"
    ) in err
    best = load(str(exp / "checkpoint_best_loss.pth.tar"))
    assert best["config"]["train_params"]["lmbda"] == 0.02
    # argparse: neither --config nor a checkpoint.
    with pytest.raises(SystemExit) as info:
        train.main(["--set", "train_params.max_steps=5"])
    assert info.value.code == 2
    assert (
        "--config is required, unless --resume names a checkpoint"
        in capsys.readouterr().err
    )


def test_a_checkpoint_written_before_the_crop_size_rename_still_resumes(
    tmp_path, train_images, capsys
):
    exp = tmp_path / "exp"
    cfg = write_train_config(tmp_path, train_images, exp, train_params={"max_steps": 2})
    assert train.main(["--config", cfg]) == 0
    ckpt = exp / "checkpoint.pth.tar"
    old = load(ckpt)
    params = old["config"]["train_params"]
    params["patch_size"] = params.pop("crop_size")
    params["training_modality"] = "patch"
    torch.save(old, ckpt)
    capsys.readouterr()
    # The same config: nothing changed (the run is finished, which is said instead).
    status, err = run_cli(["--config", cfg, "--resume", str(ckpt)], capsys)
    assert status == 1 and not [line for line in err if "config changed" in line]
    # Refused, not resumed.
    assert not [line for line in err if line.startswith("resuming")]
    assert err[-1].endswith(
        "already finished its run at step 2 (train_params.max_steps=2); "
        "raise that limit with --set to train further"
    )
    status, err = run_cli(
        ["--resume", str(ckpt), "--set", "train_params.max_steps=3"], capsys
    )
    assert status == 0 and load(ckpt)["config"]["train_params"]["crop_size"] == 64
    assert [line for line in err if "config changed" in line] == [
        "warning: config changed since the checkpoint: train_params.max_steps: 2 -> 3"
    ]


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "optimizer",
            {},
            "entry 'optimizer' must be an optimizer state (state, param_groups), "
            "got {}",
        ),
        (
            "rng",
            "not a state",
            "entry 'rng' must be a mapping of uint8 generator states",
        ),
        (
            "rng",
            {"torch": "abc"},
            "entry 'rng' must be a mapping of uint8 generator states",
        ),
        (
            "config",
            [1, 2],
            "entry 'config' must be a mapping (the resolved training config), "
            "got [1, 2]",
        ),
        ("global_step", "3", "entry 'global_step' must be an integer >= 0, got '3'"),
        (
            "lr_scheduler",
            {"milestones": 3},
            "entry 'lr_scheduler' does not fit this model",
        ),
        (
            "aux_optimizer",
            {"state": {}, "param_groups": [{"params": [0, 1, 2]}]},
            "entry 'aux_optimizer' does not fit this model",
        ),
    ],
)
def test_tampered_resume_checkpoints_are_one_line_errors_naming_the_entry(
    tmp_path, train_images, capsys, key, value, message
):
    exp = tmp_path / "exp"
    cfg = write_train_config(tmp_path, train_images, exp, train_params={"max_steps": 1})
    assert train.main(["--config", cfg]) == 0
    ckpt = exp / "checkpoint.pth.tar"
    tampered = load(ckpt)
    tampered[key] = value
    torch.save(tampered, ckpt)
    capsys.readouterr()
    for argv in (["--resume", str(ckpt)], ["--config", cfg, "--resume"]):
        status, err = run_cli(argv + ["--set", "train_params.max_steps=2"], capsys)
        assert status == 1 and len(err) == 1, err
        assert err[0].startswith(f"train.py: error: cannot resume from {ckpt}: ")
        if key != "config" or argv[0] == "--config":
            assert message in err[0]


@pytest.mark.parametrize("training", [True, False])
def test_the_capturable_entropy_bottleneck_computes_what_compressai_computes(training):
    """Same values as CompressAI's forward (same noise), and no tensor built from
    host data on the way, which is what made CUDA graph capture fail."""
    from compressai.entropy_models import EntropyBottleneck

    from models.cps.layers import CapturableEntropyBottleneck

    torch.manual_seed(0)
    reference = EntropyBottleneck(6).train(training)
    capturable = CapturableEntropyBottleneck(6).train(training)
    capturable.load_state_dict(reference.state_dict())
    z = torch.randn(2, 6, 5, 7) * 3
    torch.manual_seed(1)
    expected = reference(z)
    torch.manual_seed(1)
    original_tensor = torch.tensor
    try:
        torch.tensor = None  # any call fails
        got = capturable(z)
    finally:
        torch.tensor = original_tensor
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_seeded_cps_model_keeps_the_bottleneck_values_compressai_drew():
    """The capturable bottleneck takes over the values CompressAI's drew first in the
    model's construction, so seeded models (and their fingerprints) are unchanged."""
    from compressai.entropy_models import EntropyBottleneck

    torch.manual_seed(3)
    model = models.build_model("cps", N=8)
    torch.manual_seed(3)
    drawn_first = EntropyBottleneck(8)
    assert_same_tensors(model.entropy_bottleneck.state_dict(), drawn_first.state_dict())


def test_the_captured_part_of_a_cps_step_reads_nothing_back_and_builds_no_host_tensor(
    monkeypatch,
):
    """What a CUDA graph cannot capture, caught on the CPU: any read-back to the host
    (item, tolist, bool, float, numpy) or tensor built from host data in the forward
    pass, the losses, the backward passes and the clipping of a CPS step."""
    model, step = make_step()

    def refuse(name):
        def refused(*args, **kwargs):
            raise AssertionError(f"{name} called inside the captured part of the step")

        return refused

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, refuse(f"torch.{name}"))
    statistics = step._statistics(torch.rand(2, 3, 64, 64))
    monkeypatch.undo()
    assert statistics.shape == (6,) and torch.isfinite(statistics).all()


def test_a_run_ending_before_its_first_validation_still_leaves_a_best_checkpoint(
    tmp_path, train_images, capsys
):
    exp = tmp_path / "exp"
    # max_steps inside the first epoch, validation only at epoch ends.
    cfg = write_train_config(
        tmp_path,
        train_images,
        exp,
        train_params={"max_steps": 1},
        logging={"val_interval": 0},
    )
    status, err = run_cli(["--config", cfg], capsys)
    assert status == 0 and load(exp / "checkpoint.pth.tar")["epoch_step"] == 1
    assert [line for line in err if "validation" in line][0].startswith(
        "step 1 validation: "
    )
    best = load(exp / "checkpoint_best_loss.pth.tar")
    assert best["global_step"] == 1 and math.isfinite(best["best_loss"])


def _stopped_mid_epoch(tmp_path, train_images, steps: int) -> str:
    """The last checkpoint of a batch-1 run stopped after ``steps`` steps of its
    first 4-step epoch."""
    cfg = write_train_config(
        tmp_path,
        train_images,
        tmp_path / "exp",
        train_params={"max_steps": steps},
        train_data={"batch_size": 1},
    )
    assert train.main(["--config", cfg]) == 0
    ckpt = str(tmp_path / "exp" / "checkpoint.pth.tar")
    assert load(ckpt)["epoch_step"] == steps
    return ckpt


def test_resuming_mid_epoch_with_another_batch_size_is_refused_instead_of_hanging(
    tmp_path, train_images, capsys
):
    ckpt = _stopped_mid_epoch(tmp_path, train_images, 2)
    capsys.readouterr()
    # Batch 2 of 4 (batch_size 1) cannot go on with 2 per batch: the 2 images left
    # would be skipped as a finished epoch of 2 batches, and the loader, asked to start
    # at the epoch's end, yielded no batch at all: the run looped forever.
    status, err = run_cli(
        [
            "--resume",
            ckpt,
            "--set",
            "train_data.batch_size=2",
            "train_params.max_steps=5",
        ],
        capsys,
    )
    assert status == 1
    assert err[-1] == (
        f"train.py: error: {ckpt} stopped at batch 2 of epoch 0 with batch_size 1; "
        "a mid-epoch resume needs that batch_size and the same process count "
        "(this run: batch_size 2, 1 process), or start a new run from its "
        "weights with --init-from"
    )
    assert load(ckpt)["global_step"] == 2  # untouched
    # At an epoch boundary the batch size may change.
    status, _ = run_cli(["--resume", ckpt, "--set", "train_params.max_steps=4"], capsys)
    assert status == 0 and load(ckpt)["epoch_step"] == 0
    status, _ = run_cli(
        [
            "--resume",
            ckpt,
            "--set",
            "train_data.batch_size=2",
            "train_params.max_steps=5",
        ],
        capsys,
    )
    assert status == 0 and load(ckpt)["global_step"] == 5


def test_resuming_mid_epoch_after_the_folder_shrank_says_so(
    tmp_path, train_images, capsys
):
    """The message blamed the batch size, which had not changed."""
    ckpt = _stopped_mid_epoch(tmp_path, train_images, 3)
    for name in ("02.png", "03.png"):
        os.remove(os.path.join(train_images, "train", name))
    status, err = run_cli(
        ["--resume", ckpt, "--set", "train_params.max_steps=5"], capsys
    )
    assert status == 1 and err[-1] == (
        f"train.py: error: {ckpt} stopped at batch 3 of epoch 0, but an epoch of this "
        f"run has 2 batches per process (2 training images in {train_images}, "
        "1 process): fewer images or more processes than when the run began; resume "
        "with the same folder and process count, or start a new run from its weights "
        "with --init-from"
    )


def test_a_log_reader_that_goes_away_stops_the_run_as_a_signal_would(
    tmp_path, train_images
):
    """``train.py ... 2>&1 | head -2`` ended at the first line after head left, with
    status 1, a traceback and the steps since the last checkpoint lost."""
    cfg = load_config(write_train_config(tmp_path, train_images, tmp_path / "exp"))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    with os.fdopen(write, "w", buffering=1) as log:  # as stderr: each line written
        trainer = Trainer(cfg, CPU, log=log)
        assert trainer.fit() == 128 + signal.SIGPIPE
    # The first line is step 2's validation; step 3 completes, then the run stops.
    ckpt = load(tmp_path / "exp" / "checkpoint.pth.tar")
    assert (ckpt["global_step"], ckpt["epoch"], ckpt["epoch_step"]) == (3, 1, 1)


def test_train_py_piped_to_a_reader_that_exits_early_ends_quietly_with_141(
    tmp_path, train_images
):
    """The whole path of ``train.py ... 2>&1 | head -1``: stdout and stderr are one
    pipe, whose reader leaves after the first line."""
    exp = tmp_path / "exp"
    cfg = write_train_config(tmp_path, train_images, exp)
    child = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), "--config", cfg],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert child.stdout.readline().startswith("step 2 validation: ")
    child.stdout.close()
    assert child.wait(timeout=600) == 128 + signal.SIGPIPE
    # Saved after the step in which the next line (step 4's validation) failed.
    assert load(exp / "checkpoint.pth.tar")["global_step"] == 5


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_holds_it(
    tmp_path, train_images, capsys
):
    """Two runs on one experiment_path were both accepted (the refusal only looked for
    a checkpoint, which the first had not written yet), and overwrote each other's
    checkpoints."""
    exp = tmp_path / "exp"
    cfg = write_train_config(tmp_path, train_images, exp, train_params={"max_steps": 2})
    in_use = (
        rf"train_data.experiment_path {exp} is in use by another training run "
        rf"\(process {os.getpid()} on [^ ]+\): wait for it to end, or choose another "
        r"train_data.experiment_path"
    )
    first = Trainer(load_config(cfg), CPU, log=io.StringIO())
    with pytest.raises(ValueError, match=f"^{in_use}$"):
        Trainer(load_config(cfg), CPU, log=io.StringIO())
    status, err = run_cli(["--config", cfg], capsys)
    assert status == 1 and len(err) == 1
    assert re.fullmatch(f"train.py: error: {in_use}", err[0])
    assert first.fit() == 0
    assert not (exp / ".train.lock").exists()  # a run that ends removes its lock
    # A resume holds the folder too.
    resume = ["--config", cfg, "--resume", "--set", "train_params.max_steps=4"]
    resumed = Trainer(
        train.resolve_config(train.parse_args(resume)), CPU, log=io.StringIO()
    )
    status, err = run_cli(resume, capsys)
    assert (
        status == 1
        and len(err) == 1
        and re.fullmatch(f"train.py: error: {in_use}", err[0])
    )
    assert resumed.fit() == 0
    assert load(exp / "checkpoint.pth.tar")["global_step"] == 4


def test_a_run_that_died_holding_the_folder_leaves_no_stale_lock(
    tmp_path, train_images
):
    exp = tmp_path / "exp"
    exp.mkdir()
    cfg = write_train_config(tmp_path, train_images, exp, train_params={"max_steps": 1})
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "os.write(fd, b'%d crashed-host' % os.getpid())\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)",
            str(exp / ".train.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(
            ValueError,
            match=rf"in use by another training run \(process {holder.pid} "
            r"on crashed-host\)",
        ):
            Trainer(load_config(cfg), CPU, log=io.StringIO())
    finally:
        holder.kill()
        holder.wait()
    assert (exp / ".train.lock").exists()  # the file stays; its lock went with the run
    assert Trainer(load_config(cfg), CPU, log=io.StringIO()).fit() == 0


def test_a_resume_continues_in_the_folder_that_holds_its_checkpoint(
    tmp_path, train_images, capsys
):
    """After ``mv runs/a runs/b``, ``--resume runs/b/checkpoint.pth.tar`` re-created
    runs/a and wrote there: the experiment_path stored in the checkpoint won; and a
    resumed copy overwrote the original's checkpoint."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cfg = write_train_config(tmp_path, train_images, a, train_params={"max_steps": 2})
    assert train.main(["--config", cfg]) == 0
    os.rename(a, b)
    status, err = run_cli(
        [
            "--resume",
            str(b / "checkpoint.pth.tar"),
            "--set",
            "train_params.max_steps=3",
        ],
        capsys,
    )
    assert status == 0 and not a.exists()
    assert f"the run continues in {b}; it was written in {a}" in err
    assert not any("experiment_path" in line for line in err if "changed" in line)
    resumed = load(b / "checkpoint.pth.tar")
    assert resumed["global_step"] == 3
    assert resumed["config"]["train_data"]["experiment_path"] == str(b)
    # A copy goes on in the copy; the original is not touched.
    shutil.copytree(b, c)
    original = (b / "checkpoint.pth.tar").read_bytes()
    resume_c = ["--resume", str(c / "checkpoint.pth.tar")]
    assert train.main([*resume_c, "--set", "train_params.max_steps=4"]) == 0
    assert (b / "checkpoint.pth.tar").read_bytes() == original
    assert load(c / "checkpoint.pth.tar")["global_step"] == 4
    # --set names another folder explicitly, and is obeyed.
    d = tmp_path / "d"
    overrides = ["train_params.max_steps=5", f"train_data.experiment_path={d}"]
    assert train.main([*resume_c, "--set", *overrides]) == 0
    assert load(c / "checkpoint.pth.tar")["global_step"] == 4
    assert load(d / "checkpoint.pth.tar")["global_step"] == 5


def test_a_resume_that_would_replace_a_later_checkpoint_is_refused(
    tmp_path, train_images, capsys
):
    """``--resume RUN/checkpoint_best_loss.pth.tar`` replaced RUN/checkpoint.pth.tar,
    at a later step, with an earlier state, and the steps between were lost."""
    exp = tmp_path / "exp"
    cfg = write_train_config(tmp_path, train_images, exp, train_params={"max_steps": 2})
    assert train.main(["--config", cfg]) == 0  # validates at step 2: the best
    assert (
        train.main(["--config", cfg, "--resume", "--set", "train_params.max_steps=3"])
        == 0
    )
    last, best = exp / "checkpoint.pth.tar", exp / "checkpoint_best_loss.pth.tar"
    before = last.read_bytes()
    assert (load(last)["global_step"], load(best)["global_step"]) == (3, 2)
    capsys.readouterr()
    status, err = run_cli(
        ["--resume", str(best), "--set", "train_params.max_steps=4"], capsys
    )
    assert status == 1 and err == [
        f"train.py: error: {last} is at global step 3, past {best} (global step 2), "
        f"and resuming would replace it: resume from {last} to continue that run, or "
        "write elsewhere with --set train_data.experiment_path=FOLDER"
    ]
    assert last.read_bytes() == before
    # Written elsewhere, the best state goes on; the run's own folder is untouched.
    other = tmp_path / "from_best"
    overrides = ["train_params.max_steps=4", f"train_data.experiment_path={other}"]
    assert train.main(["--resume", str(best), "--set", *overrides]) == 0
    assert load(other / "checkpoint.pth.tar")["global_step"] == 4
    assert last.read_bytes() == before
