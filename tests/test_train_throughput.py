"""benchmarks/train_throughput.py: its reference loop and a tiny run of the script."""

import importlib.util
import json
import os

import pytest
import torch
from compressai.losses import RateDistortionLoss

import models
from utils.training.optimizers import build_optimizers
from utils.training.step import TrainStep, step_seed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "train_throughput", os.path.join(REPO, "benchmarks", "train_throughput.py")
)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


# Tiny models train many times faster on one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_step_updates_the_network_exactly_like_the_compressai_example_loop():
    # Same weights, batch and noise: the network's weights after two steps must be
    # bit-identical. (The quantiles differ slightly by design: the example computes
    # the aux loss after the network step, TrainStep before it.)
    torch.manual_seed(0)
    base = models.build_model("cps", N=8)
    x = torch.rand(2, 3, 64, 64)
    results = []
    for use_train_step in (False, True):
        model = models.build_model("cps", N=8)
        model.load_state_dict(base.state_dict())
        optimizer, aux_optimizer = build_optimizers(model, 1e-3, 1e-3)
        criterion = RateDistortionLoss(0.01)
        if use_train_step:
            step = TrainStep(
                model, model, criterion, optimizer, aux_optimizer, clip_max_norm=0.1
            )
        else:
            step = bench.compressai_example_step(
                model, criterion, optimizer, aux_optimizer, 0.1
            )
        for i in range(2):
            torch.manual_seed(step_seed(0, i, 0))  # what TrainStep does itself
            step(x, i)
        results.append({k: v.detach().clone() for k, v in model.named_parameters()})
    example, ours = results
    for name, value in example.items():
        if name.endswith(".quantiles"):
            assert not torch.equal(value, base.state_dict()[name])
            assert torch.allclose(value, ours[name], atol=1e-2)
        else:
            assert torch.equal(value, ours[name]), name
            if "g_a.0" in name:
                assert not torch.equal(value, base.state_dict()[name])


def test_benchmark_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "tt.json"
    argv = [
        "--batch-size",
        "1",
        "--crop",
        "64",
        "--N",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "-o",
        str(out),
    ]
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["settings"]["N"] == 8 and record["settings"]["crop"] == 64
    assert [r["loop"] for r in record["results"]] == ["compressai_example", "train_py"]
    for row in record["results"]:
        assert row["images_per_s"] > 0 and len(row["ms_per_step_runs"]) == 2
        assert row["ms_per_step"] == pytest.approx(1e3 / row["images_per_s"])
        assert row["operators_per_step"] > 100
    table = capsys.readouterr().out
    assert "compressai_example" in table and "train_py" in table and "1.00x" in table
    with pytest.raises(SystemExit):
        bench.parse_args(["--crop", "100"])


def test_host_read_example_loop_reads_the_loss_once_per_step_and_updates_the_same(
    monkeypatch,
):
    """The GPU check's ``compressai_example_host_read`` row must differ from the
    example loop by the one read alone, or it cannot attribute train.py's gap."""
    reads = []
    real_float = torch.Tensor.__float__
    monkeypatch.setattr(
        torch.Tensor, "__float__", lambda t: reads.append(t) or real_float(t)
    )
    batch = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    updated = []
    for read_loss in (False, True):
        torch.manual_seed(0)
        model = models.build_model("cps", N=8)
        optimizer, aux_optimizer = build_optimizers(model, 1e-3, 1e-3)
        step = bench.compressai_example_step(
            model,
            RateDistortionLoss(0.01),
            optimizer,
            aux_optimizer,
            1.0,
            read_loss=read_loss,
        )
        reads.clear()
        step(batch, 0)
        assert len(reads) == read_loss
        updated.append(model.state_dict())
    plain, with_read = updated
    assert all(torch.equal(plain[name], with_read[name]) for name in plain)


def test_train_step_dispatches_fewer_operators_than_the_example_loop_does_on_cuda():
    """A GPU step at batch 8 is bound by kernel launches, about one per operator.
    On CUDA the example's Adam runs ``foreach`` kernels; ``TrainStep`` (fused Adam,
    statistics, the on-device skip) must not launch more than that."""
    counts = {}
    batch = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for loop in ("example", "train_step"):
        torch.manual_seed(0)
        model = models.build_model("cps", N=8)
        criterion = RateDistortionLoss(0.01)
        if loop == "example":
            optimizer, aux_optimizer = bench.example_optimizers(model, 1e-4, 1e-3)
            for group in optimizer.param_groups + aux_optimizer.param_groups:
                group["foreach"] = True  # PyTorch's default for CUDA parameters
            call = bench.compressai_example_step(
                model, criterion, optimizer, aux_optimizer, 1.0
            )
        else:
            optimizer, aux_optimizer = build_optimizers(model, 1e-4, 1e-3)
            step = TrainStep(model, model, criterion, optimizer, aux_optimizer)
            call = step.launch
        call(batch, 0)  # the optimizers' states are made in the first step
        counter = bench.OperatorCount()
        with counter:
            call(batch, 1)
        counts[loop] = counter.count
    assert counts["train_step"] < counts["example"], counts
