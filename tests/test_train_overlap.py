"""The training step never waits for the device: it launches step k, then reads step
k - 1, skips non-finite updates on the device, and resumes older checkpoints."""

import io
import signal

import pytest
import torch
from compressai.losses import RateDistortionLoss
from test_train import CPU, load, make_step
from test_train_data import write_train_config

import models
import train
from utils.training.config import load_config
from utils.training.loop import Trainer
from utils.training.step import PendingStatistics, TrainStep

pytestmark = pytest.mark.usefixtures("one_thread")


def test_launching_a_step_reads_nothing_back_from_the_device(monkeypatch):
    """A read (``item``, ``tolist``, ``bool``, ``float``) makes the CPU wait for the
    GPU to finish the step, so it could not queue the next one meanwhile."""
    model, step = make_step()
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor,
            name,
            lambda t, *a, _real=real, _name=name: reads.append(_name) or _real(t, *a),
        )
    before = model.g_s[-1].conv.weight.detach().clone()
    assert step.launch(torch.rand(2, 3, 64, 64), 0) is None  # none was in flight
    assert reads == []
    assert not torch.equal(model.g_s[-1].conv.weight, before)  # the update ran
    stats = step.finish()
    assert reads == ["tolist"] and stats["skipped"] == 0.0 and stats["loss"] > 0
    assert step.finish() is None


def test_a_nonfinite_step_is_skipped_on_the_device_before_its_statistics_are_read():
    model, step = make_step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adam_steps = []
    step.launch(torch.full((2, 3, 64, 64), float("nan")), 0)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    for optimizer in (step.optimizer, step.aux_optimizer):
        adam_steps += [s["step"].item() for s in optimizer.state.values()]
    assert adam_steps and set(adam_steps) == {0.0}  # the skipped step is not counted
    with pytest.warns(RuntimeWarning, match="step 0: non-finite"):
        assert step.finish()["skipped"] == 1.0
    assert step.nonfinite_in_a_row == 1


def test_train_step_refuses_optimizers_that_cannot_skip_on_the_device():
    model = models.build_model("cps", N=8)
    plain = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="Adam is not fused.*build_optimizers"):
        TrainStep(model, model, RateDistortionLoss(0.01), plain, plain)


def test_the_loop_finishes_each_step_after_launching_the_next(
    tmp_path, train_images, monkeypatch
):
    """Except where the statistics are needed at once: the log write (every 3 steps
    here) and the epoch's end (4 steps of batch 1)."""
    cfg = write_train_config(
        tmp_path,
        train_images,
        tmp_path / "exp",
        train_params={"max_steps": 4},
        train_data={"batch_size": 1},
        logging={"log_interval": 3},
    )
    trainer = Trainer(load_config(cfg), CPU, log=io.StringIO())
    events, launch, read = [], trainer.step.launch, PendingStatistics.read

    def recorded_launch(x, step, stop_request=False):
        events.append(f"launch {step}")
        return launch(x, step, stop_request)

    def recorded_read(pending):
        events.append(f"read {pending.step}")
        return read(pending)

    monkeypatch.setattr(trainer.step, "launch", recorded_launch)
    monkeypatch.setattr(PendingStatistics, "read", recorded_read)
    assert trainer.steps_per_epoch == 4
    assert trainer.fit() == 0
    assert events == [
        "launch 0",
        "launch 1",
        "read 0",
        "launch 2",
        "read 1",
        "read 2",  # the log write at step 3
        "launch 3",
        "read 3",  # the epoch's end
    ]


@pytest.mark.parametrize("log_interval, saved_at", [(100, 3), (2, 2)])
def test_a_signal_during_a_step_ends_the_run_at_most_two_steps_later(
    tmp_path, train_images, monkeypatch, log_interval, saved_at
):
    """docs/training.md ("Stopping"): a signal that arrives while step 0 runs (on a
    GPU the CPU waits inside ``launch``) misses step 0's statistics, which were
    formed as step 0 was launched; step 1 carries it, and step 2 reads it, unless
    step 1 is due a log write (every 2 steps here), which reads it at once."""
    cfg = write_train_config(
        tmp_path,
        train_images,
        tmp_path / "exp",
        train_data={"batch_size": 1},
        logging={"log_interval": log_interval},
    )
    trainer = Trainer(load_config(cfg), CPU, log=io.StringIO())
    launch = trainer.step.launch

    def launch_then_signal(x, step, stop_request=False):
        stats = launch(x, step, stop_request)
        if step == 0:
            signal.raise_signal(signal.SIGINT)
        return stats

    monkeypatch.setattr(trainer.step, "launch", launch_then_signal)
    assert trainer.steps_per_epoch == 4  # no epoch end before the stop
    assert trainer.fit() == 128 + signal.SIGINT
    checkpoint = load(tmp_path / "exp" / "checkpoint.pth.tar")
    assert checkpoint["global_step"] == saved_at


def test_a_checkpoint_from_before_the_fused_optimizers_resumes_fused(
    tmp_path, train_images
):
    """Loading an optimizer state takes its group settings from the file, and older
    checkpoints say ``fused: None``: the resumed run must step fused still."""
    exp = tmp_path / "exp"
    cfg = write_train_config(tmp_path, train_images, exp, train_params={"max_steps": 1})
    assert train.main(["--config", cfg]) == 0
    checkpoint = load(exp / "checkpoint.pth.tar")
    for key in ("optimizer", "aux_optimizer"):
        for group in checkpoint[key]["param_groups"]:
            assert group["fused"] is True
            group["fused"] = None
    torch.save(checkpoint, exp / "checkpoint.pth.tar")
    args = train.parse_args(
        ["--config", cfg, "--resume", "--set", "train_params.max_steps=2"]
    )
    trainer = Trainer(train.resolve_config(args), CPU, log=io.StringIO())
    for optimizer in (trainer.optimizer, trainer.aux_optimizer):
        assert all(group["fused"] is True for group in optimizer.param_groups)
    assert trainer.fit() == 0 and trainer.pos.global_step == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_steps_read_a_step_late_train_as_steps_waited_for(cuda_graph):
    """On a GPU the statistics really arrive late (pinned copies behind the step,
    and with ``cuda_graph`` behind replays that overwrite the captured statistics):
    the same statistics and weights as steps waited for, and a NaN batch is skipped
    on the device (its weights unchanged before anything is read back)."""
    batches = [
        torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)).cuda()
        for i in range(6)
    ]
    batches.insert(2, torch.full_like(batches[0], float("nan")))
    runs = []
    for overlapped in (False, True):
        model, step = make_step(cuda_graph=cuda_graph)
        model.cuda()
        with pytest.warns(RuntimeWarning, match="step 2: non-finite"):
            if overlapped:
                stats = [step.launch(x, i) for i, x in enumerate(batches)]
                stats = stats[1:] + [step.finish()]
            else:
                stats = [step(x, i) for i, x in enumerate(batches)]
        assert step.graph_captured == cuda_graph
        runs.append((stats, model.g_s[-1].conv.weight.detach().clone()))
    (waited, waited_weight), (late, late_weight) = runs
    assert [s["skipped"] for s in late] == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    for a, b in zip(waited, late):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, nan_ok=True)
    assert torch.allclose(waited_weight, late_weight, rtol=1e-4, atol=1e-6)

    model, step = make_step()
    model.cuda()
    step(batches[0], 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step.launch(batches[2], 1)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert step.finish()["skipped"] == 1.0
