"""``torchrun --nproc_per_node=2 train.py`` on the CPU with the gloo backend.

One launch of the real ``train.main`` in two processes. A small
wrapper script saves each rank's final parameters, which lets the test check what
DDP must guarantee and two independent processes would not give: the ranks saw
different images, yet all their parameters, the entropy bottleneck's quantiles
(trained by the auxiliary loss outside DDP's buckets) included, are identical
and were trained. Rank 0 alone logs and writes files. Three more launches check
that a run stopped mid-epoch and resumed under torchrun ends where an
uninterrupted one does.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch
from test_train_data import make_image_folder, write_train_config

import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs train.main unchanged and dumps every rank's parameters once fit() returns.
WRAPPER = """\
import os, sys, torch
sys.path.insert(0, {repo!r})
import train
import utils.training.loop

fit = utils.training.loop.Trainer.fit

def fit_and_dump(self):
    status = fit(self)
    params = {{k: v.detach().clone() for k, v in self.raw.named_parameters()}}
    torch.save(params, os.path.join({out!r}, "rank%d.pt" % self.ctx.rank))
    return status

utils.training.loop.Trainer.fit = fit_and_dump
sys.exit(train.main(sys.argv[1:]))
"""


def _torchrun(script, *args):
    """Run ``script`` under torchrun with 2 CPU processes; return its stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # Own session, so that a timeout kills the workers too, not only torchrun.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            *args,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


@pytest.mark.slow  # an end-to-end run in a fresh process or a large image
def test_two_gloo_processes_train_one_model_and_only_rank_0_writes(tmp_path):
    # 4 training images, batch 1 per process: 2 steps per epoch with 2 processes
    # (4 without DDP), so 2 epochs end at global step 4.
    data = make_image_folder(tmp_path / "data", n_train=4, n_test=3)
    exp = tmp_path / "exp"
    cfg = write_train_config(
        tmp_path,
        data,
        exp,
        train_data={"batch_size": 1, "epochs": 2},
        logging={"tensorboard": True, "progress": False},
    )
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(repo=REPO, out=str(tmp_path)))
    stderr = _torchrun(wrapper, "--config", cfg)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    quantiles = [k for k in ranks[0] if k.endswith(".quantiles")]
    assert quantiles == ["entropy_bottleneck.quantiles"]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), (
            f"{name} differs between ranks"
        )

    ckpt = torch.load(exp / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert (ckpt["global_step"], ckpt["epoch"], ckpt["epoch_step"]) == (4, 2, 0)
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    for name, value in ranks[0].items():
        assert torch.equal(ckpt["state_dict"][name], value), name
    torch.manual_seed(0)  # the trainer's initial weights (train_params.seed = 0)
    init = dict(models.build_model("cps", N=8).named_parameters())
    for name in ("entropy_bottleneck.quantiles", "g_a.0.conv1.weight"):
        assert not torch.equal(ranks[0][name], init[name]), f"{name} was not trained"

    # One line per event, from rank 0 only; one TensorBoard file.
    lines = stderr.splitlines()
    assert sum("validation: loss" in line for line in lines) == 2
    assert sum(line.startswith("done at step 4") for line in lines) == 1
    assert len(list(exp.glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("value", ["x", "0"])
def test_a_bad_torchrun_environment_is_a_one_line_error(
    tmp_path, value, capsys, monkeypatch
):
    import train

    data = make_image_folder(tmp_path / "data")
    cfg = write_train_config(tmp_path, data, tmp_path / "exp")
    for name, text in (("WORLD_SIZE", value), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, text)
    assert train.main(["--config", cfg]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("train.py: error: ")
        and "WORLD_SIZE" in err[0]
    )


@pytest.mark.slow  # an end-to-end run of over 20 s on 2 cores
def test_a_resumed_two_process_run_matches_an_uninterrupted_one(tmp_path):
    """Stop both ranks mid-epoch (step 1 of 2) and resume.

    The run ends where a straight run ends.
    """
    data = make_image_folder(tmp_path / "data", n_train=4, n_test=3)
    straight, split = tmp_path / "straight", tmp_path / "split"
    epochs = {"batch_size": 1, "epochs": 2}
    _torchrun(
        "train.py",
        "--config",
        write_train_config(tmp_path, data, straight, train_data=epochs),
    )
    cfg = write_train_config(tmp_path, data, split, train_data=epochs)
    _torchrun("train.py", "--config", cfg, "--set", "train_params.max_steps=1")
    middle = torch.load(
        split / "checkpoint.pth.tar", map_location="cpu", weights_only=True
    )
    assert (middle["global_step"], middle["epoch"], middle["epoch_step"]) == (1, 0, 1)
    _torchrun("train.py", "--config", cfg, "--resume")

    a, b = (
        torch.load(folder / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
        for folder in (straight, split)
    )
    assert (
        (a["global_step"], a["epoch"], a["epoch_step"])
        == (b["global_step"], b["epoch"], b["epoch_step"])
        == (4, 2, 0)
    )
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name


@pytest.mark.slow  # an end-to-end run in a fresh process or a large image
def test_a_folder_another_run_holds_refuses_every_rank_at_once(tmp_path):
    """Rank 0 alone takes the experiment folder; a refusal must not leave the other
    ranks waiting for it until the process group's timeout (30 minutes)."""
    from utils.training.run_lock import lock_experiment

    data = make_image_folder(tmp_path / "data")
    exp = tmp_path / "exp"
    exp.mkdir()
    cfg = write_train_config(tmp_path, data, exp, train_data={"batch_size": 1})
    other = lock_experiment(str(exp))  # as another train.py would
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            os.path.join(REPO, "train.py"),
            "--config",
            cfg,
        ],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    other.release()
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert f"train.py: error: train_data.experiment_path {exp} is in use by " in (
        "\n".join(lines)
    )
    # The ranks share stderr, so their lines may interleave.
    assert (
        f"train.py [rank 1]: error: rank 0 refused the run: "
        f"train_data.experiment_path {exp} is in use by " in proc.stderr
    )
