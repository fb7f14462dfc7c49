"""The shipped-model release (utils/training/release.py) and ``python test.py demo``."""

import json

import pytest
import torch

import models
import test as test_cli
from models.base import CodingPlan
from utils.evaluation import demo
from utils.evaluation.demo import _crop_window, demo_image
from utils.evaluation.shipped import SHIPPED_DIR, find_shipped_models
from utils.stitching.spec import PatchSpec
from utils.training.release import main
from utils.training.training_curves import (
    curve_panels,
    read_scalars,
    render_curves,
    training_wall_time,
)


def release_into(checkpoint, folder, info):
    """Release ``checkpoint`` into ``folder`` as the command does, with ``info``
    given as the ``--info`` file."""
    info_file = folder.parent / f"{folder.name}-info.json"
    folder.parent.mkdir(parents=True, exist_ok=True)
    info_file.write_text(json.dumps(info))
    assert main([str(checkpoint), str(folder), "--info", str(info_file)]) == 0


@pytest.fixture
def release(tmp_path, tiny_cps):
    """A tiny CPS exported like the shipped models, trained 'for' lambda 0.01."""
    checkpoint = tmp_path / "run" / "checkpoint.pth.tar"
    checkpoint.parent.mkdir()
    torch.save({"architecture": "cps", "state_dict": tiny_cps.state_dict()}, checkpoint)
    folder = tmp_path / "shipped" / "tiny"
    release_into(checkpoint, folder, {"train_params": {"lmbda": 0.01}})
    return folder


def test_export_stores_half_precision_weights_that_code_consistently(release, tiny_cps):
    stored = torch.load(release / "model.pth", map_location="cpu", weights_only=True)
    weight = stored["state_dict"]["g_a.0.conv1.weight"]
    assert weight.dtype == torch.float16
    assert (
        stored["state_dict"]["gaussian_conditional._quantized_cdf"].dtype == torch.int32
    )
    info = json.loads((release / "training.json").read_text())
    assert info["model_config"] == {"N": 8} and info["train_params"]["lmbda"] == 0.01
    assert info["parameters"] == sum(p.numel() for p in tiny_cps.parameters())

    model = models.load_checkpoint(str(release / "model.pth"), "cpu")
    assert torch.equal(model.g_a[0].conv1.weight, weight.float())
    image = demo_image("chelsea")[:, :96, :112]
    whole = CodingPlan(patch=PatchSpec(0))
    decoded = model.decode(model.encode(image, whole), whole)
    assert decoded.shape == image.shape
    # The rounding is small: the fp16 model codes like the fp32 one, up to a few levels.
    reference = tiny_cps.decode(tiny_cps.encode(image, whole), whole)
    assert (decoded.int() - reference.int()).abs().float().mean() < 2.0


def test_training_curves_merge_resumptions_and_chain_fine_tuning(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    base, tuned = tmp_path / "base", tmp_path / "tuned"
    # A run to step 2, resumed from its step-1 checkpoint up to step 3 (same folder,
    # a second event file), then a fine-tuning run (its first log at its step 1) in
    # another folder, whose step k is step 3 + k of the whole history.
    launches = (
        (base, 0, [5.0, 4.0, 3.5]),
        (base, 1, [3.75, 3.0, 2.0]),
        (tuned, 1, [1.5, 1.0]),
    )
    for number, (folder, start, values) in enumerate(launches):
        with SummaryWriter(str(folder), filename_suffix=f".{number}") as writer:
            for step, value in enumerate(values, start):
                writer.add_scalar(
                    "train/loss", value, step, walltime=1000.0 * number + 10 * step
                )
            writer.add_scalar(
                "val/psnr", 20.0 + number, start, walltime=1000.0 * number
            )
    scalars = read_scalars([str(base), str(tuned)])
    assert scalars["train/loss"] == [
        (0, 5.0),
        (1, 3.75),
        (2, 3.0),
        (3, 2.0),
        (4, 1.5),
        (5, 1.0),
    ]
    # Spans of the three launches (20 s, 30 s and 20 s), not the pauses between them.
    assert training_wall_time([str(base), str(tuned)]) == 20.0 + 30.0 + 20.0
    panels = curve_panels(scalars, [str(base), str(tuned)])
    assert [label for label, _ in panels] == ["loss", "PSNR (dB)"]
    assert render_curves(scalars, panels, "tiny")[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no TensorBoard folder"):
        read_scalars([str(tmp_path / "missing")])


def test_shipped_models_are_listed_lowest_lambda_first(tmp_path, release):
    other = tmp_path / "shipped" / "other"
    other.mkdir()
    (other / "model.pth").write_bytes((release / "model.pth").read_bytes())
    (other / "training.json").write_text(json.dumps({"train_params": {"lmbda": 0.002}}))
    found = find_shipped_models([str(release), str(other / "model.pth")])
    assert [m.lmbda for m in found] == [0.002, 0.01]
    assert found[0].label == "CPS λ=0.002"
    with pytest.raises(ValueError, match="no model weights"):
        find_shipped_models([str(tmp_path / "nowhere")])
    # A release folder and its weights file are one model: its rows were doubled.
    with pytest.raises(ValueError, match="names .*model.pth twice"):
        find_shipped_models([str(release), str(release / "model.pth")])


def test_crop_window_sits_on_a_tile_corner_inside_the_image():
    top, left = _crop_window(300, 451, 128, 128)
    assert (top + 64, left + 64) == (128, 256)
    assert _crop_window(100, 100, 128, 100) == (0, 0)


@pytest.mark.slow  # a large image or a whole demo run
def test_demo_writes_table_plots_and_results(tmp_path, release, capsys):
    output = tmp_path / "demo"
    status = test_cli.main(
        [
            "demo",
            "--models",
            str(release),
            "--images",
            "chelsea",
            "-d",
            str(output),
            "--patch-size",
            "128",
        ]
    )
    assert status == 0
    table = capsys.readouterr().out
    assert "CPS λ=0.01 (POPS, P=128)" in table and "naive 128px tiles" in table
    for name in ("rd.png", "crops.png"):
        assert (output / name).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((output / "results.json").read_text())
    model = results["models"][0]
    cps, jpeg = model["per_image"]["cps"][0], model["per_image"]["jpeg"][0]
    # The JPEG row is the quality whose size is closest to CPS's on that image.
    gaps = [abs(r["bpp"] - cps["bpp"]) for r in results["jpeg"]["per_quality"].values()]
    assert abs(jpeg["bpp"] - cps["bpp"]) <= min(gaps) + 1e-9
    assert cps["bpp"] > 0 and cps["psnr-rgb"] > 5


def test_demo_reports_a_missing_model_in_one_line(tmp_path, capsys):
    status = test_cli.main(
        ["demo", "--models", str(tmp_path / "absent"), "-d", str(tmp_path)]
    )
    assert status == 1
    assert (
        capsys.readouterr().err.strip().startswith("test.py: error: no model weights")
    )


def test_an_earlier_demo_is_kept_unless_forced(tmp_path, capsys):
    """Refused before any work: the absent model would be the error otherwise."""
    (tmp_path / "rd.png").write_bytes(b"earlier")
    argv = ["demo", "--models", str(tmp_path / "absent"), "-d", str(tmp_path)]
    assert test_cli.main(argv) == 1
    assert capsys.readouterr().err.strip() == (
        f"test.py: error: {tmp_path / 'rd.png'} exists; pass --force to overwrite"
    )
    assert test_cli.main(argv + ["--force"]) == 1
    assert "no model weights" in capsys.readouterr().err
    assert (tmp_path / "rd.png").read_bytes() == b"earlier"


@pytest.fixture
def no_coding(monkeypatch):
    """Makes coding an image fail the test: a refusal must come before any of it."""

    def refuse(*args):
        raise AssertionError("the demo started coding before refusing")

    monkeypatch.setattr(demo, "ClassicalCoder", refuse)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("test.py: error: "), err
    return err[0]


@pytest.mark.parametrize(
    "info, field",
    [
        ("[1]", "must hold a JSON object"),
        ('{"train_params": [0.01]}', "train_params must be an object"),
        (
            '{"train_params": {"lmbda": "abc"}}',
            "train_params.lmbda must be a positive number",
        ),
        ('{"train_params": {"lmbda": 0.01', "is not valid JSON"),
    ],
)
def test_demo_refuses_a_damaged_training_json_naming_the_file_and_field(
    tmp_path, release, no_coding, capsys, info, field
):
    (release / "training.json").write_text(info)
    output = tmp_path / "demo"
    assert test_cli.main(["demo", "--models", str(release), "-d", str(output)]) == 1
    assert f"{release / 'training.json'}" in _one_error_line(capsys)
    assert not output.exists()


@pytest.mark.parametrize(
    "patch_size, message",
    [
        (
            "0",
            "--patch-size must be a positive multiple of 16 "
            "(the POPS patch and naive tile side), got 0",
        ),
        ("-16", "--patch-size must be a positive multiple of 16"),
        ("7", "--patch-size must be a positive multiple of 16"),
        # The largest demo image side is 741 px (motorcycle): naive tiles of 8192 px
        # were padded out to 4 GB after minutes of coding.
        ("8192", "--patch-size 8192 is larger than the demo images need: at most 752"),
    ],
)
def test_demo_refuses_a_patch_size_before_coding_and_leaves_no_folder(
    tmp_path, no_coding, capsys, patch_size, message
):
    output = tmp_path / "demo"
    shipped = f"{SHIPPED_DIR}/cps_n64_lambda0013"
    argv = ["demo", "--models", shipped, "-d", str(output), "--patch-size", patch_size]
    assert test_cli.main(argv) == 1
    assert _one_error_line(capsys).startswith(f"test.py: error: {message}")
    assert not output.exists()


def test_demo_loads_every_model_before_coding(tmp_path, no_coding, capsys):
    """A file that is no model, listed after a good one, is refused before the first
    model codes anything."""
    (tmp_path / "notamodel.pth").write_bytes(b"not a checkpoint")
    output = tmp_path / "demo"
    argv = [
        "demo",
        "--models",
        f"{SHIPPED_DIR}/cps_n64_lambda0013",
        str(tmp_path / "notamodel.pth"),
        "-d",
        str(output),
    ]
    assert test_cli.main(argv) == 1
    assert "cannot read checkpoint" in _one_error_line(capsys)
    assert not output.exists()


def test_demo_refuses_an_empty_output_folder_name(no_coding, capsys):
    assert test_cli.main(["demo", "-d", ""]) == 1
    assert _one_error_line(capsys) == (
        "test.py: error: -d/--output-dir is empty: name the folder for the demo's files"
    )


def test_half_precision_rounds_the_model_itself_and_keeps_buffer_dtypes(tiny_cps):
    from utils.training.release import half_precision_state_dict

    buffers = {name: value.dtype for name, value in tiny_cps.state_dict().items()}
    parameters = {name for name, _ in tiny_cps.named_parameters()}
    state = half_precision_state_dict(tiny_cps)
    # The model now holds the float16 values, so the tables recomputed from it are
    # those of the weights the file stores.
    for name, parameter in tiny_cps.named_parameters():
        assert torch.equal(parameter, parameter.half().float()), name
        assert state[name].dtype == torch.float16
    for name, dtype in buffers.items():
        if name not in parameters:
            assert state[name].dtype == dtype, name


def test_training_json_records_the_checkpoints_run_and_the_extra_facts_win(
    tmp_path, tiny_cps
):
    checkpoint = tmp_path / "checkpoint_best_loss.pth.tar"
    config = {
        "train_params": {"lmbda": 0.0035, "N": 8},
        "lr_schedule": {"type": "plateau"},
        "train_data": {"batch_size": 16},
    }
    torch.save(
        {
            "architecture": "cps",
            "state_dict": tiny_cps.state_dict(),
            "config": config,
            "global_step": 1200,
            "epoch": 3,
            "best_loss": 0.75,
            "loss": 0.8,
        },
        checkpoint,
    )
    release_into(checkpoint, tmp_path / "out", {"epoch": 4, "data": "flickr"})
    info = json.loads((tmp_path / "out" / "training.json").read_text())
    assert info["train_params"] == config["train_params"] and info["batch_size"] == 16
    assert (
        info["global_step"],
        info["best_validation_loss"],
        info["validation_loss"],
    ) == (1200, 0.75, 0.8)
    assert info["epoch"] == 4 and info["data"] == "flickr"  # what --info says is kept
    assert info["source_checkpoint"] == "checkpoint_best_loss.pth.tar"


def test_release_command_keeps_a_given_wall_time_and_reports_bad_info_in_one_line(
    tmp_path, capsys
):
    from torch.utils.tensorboard import SummaryWriter

    checkpoint = tmp_path / "run" / "checkpoint.pth.tar"
    checkpoint.parent.mkdir()
    torch.manual_seed(0)
    torch.save(
        {
            "architecture": "cps",
            "state_dict": models.build_model("cps", N=8).state_dict(),
        },
        checkpoint,
    )
    with SummaryWriter(str(tmp_path / "run")) as writer:
        for step in range(3):
            writer.add_scalar(
                "train/loss", 1.0 / (step + 1), step, walltime=100.0 + 3600 * step
            )
    (tmp_path / "info.json").write_text(json.dumps({"training_wall_time_h": 30.5}))
    out = tmp_path / "shipped" / "tiny"
    assert (
        main(
            [
                str(checkpoint),
                str(out),
                "--runs",
                str(tmp_path / "run"),
                "--info",
                str(tmp_path / "info.json"),
            ]
        )
        == 0
    )
    assert (
        json.loads((out / "training.json").read_text())["training_wall_time_h"] == 30.5
    )
    assert (out / "training_curves.png").exists()
    argv = [str(checkpoint), str(out), "--runs", str(tmp_path / "run"), "--force"]
    assert main(argv) == 0
    assert (
        json.loads((out / "training.json").read_text())["training_wall_time_h"] == 2.0
    )
    capsys.readouterr()
    (tmp_path / "info.json").write_text("{not json")
    argv = [str(checkpoint), str(out), "--info", str(tmp_path / "info.json"), "--force"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("release: error: ")


@pytest.mark.parametrize("existing", ["model.pth", "training.json", "curves"])
def test_release_command_refuses_existing_outputs_unless_forced(
    tmp_path, capsys, existing
):
    """A second release into the same folder (a shipped model, say) is refused in one
    line with status 1 and nothing written, whichever output exists; --force writes."""
    from torch.utils.tensorboard import SummaryWriter

    checkpoint = tmp_path / "run" / "checkpoint.pth.tar"
    checkpoint.parent.mkdir()
    torch.manual_seed(0)
    model = models.build_model("cps", N=8)
    torch.save({"architecture": "cps", "state_dict": model.state_dict()}, checkpoint)
    with SummaryWriter(str(tmp_path / "run")) as writer:
        writer.add_scalar("train/loss", 1.0, 0)
    out = tmp_path / "shipped" / "tiny"
    out.mkdir(parents=True)
    name = "training_curves.png" if existing == "curves" else existing
    (out / name).write_bytes(b"shipped")
    argv = [str(checkpoint), str(out), "--runs", str(tmp_path / "run")]
    capsys.readouterr()
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("release: error: "), err
    assert str(out / name) in err[0] and "--force" in err[0]
    assert captured.out == ""
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing else written
    assert (out / name).read_bytes() == b"shipped"  # and that one untouched

    assert main(argv + ["--force"]) == 0
    assert {p.name for p in out.iterdir()} == {
        "model.pth",
        "training.json",
        "training_curves.png",
    }
    assert (out / name).read_bytes() != b"shipped"


def test_release_command_without_runs_ignores_curves_and_refuses_a_file_folder(
    tmp_path, capsys
):
    """Without --runs no curves are written, so existing curves are no reason to
    refuse (and stay as they were), unless --force replaces the model they showed;
    an output folder that is a file is refused."""
    checkpoint = tmp_path / "checkpoint.pth.tar"
    model = models.build_model("cps", N=8)
    torch.save({"architecture": "cps", "state_dict": model.state_dict()}, checkpoint)
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "training_curves.png").write_bytes(b"kept")
    assert main([str(checkpoint), str(out)]) == 0
    assert (out / "training_curves.png").read_bytes() == b"kept"
    assert main([str(checkpoint), str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.pth", "training.json"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    capsys.readouterr()
    assert main([str(checkpoint), str(blocker)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0], err
    assert blocker.read_text() == "x"


@pytest.fixture
def run(tmp_path, tiny_cps):
    """A training run folder: a checkpoint with a config, and logged scalars."""
    from torch.utils.tensorboard import SummaryWriter

    folder = tmp_path / "run"
    folder.mkdir()
    torch.save(
        {"architecture": "cps", "state_dict": tiny_cps.state_dict(), "config": {}},
        folder / "checkpoint.pth.tar",
    )
    with SummaryWriter(str(folder)) as writer:
        writer.add_scalar("train/loss", 1.0, 0)
    return folder


def _release_error(capsys) -> str:
    """The one line a refused release prints, checked to be all it prints."""
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("release: error: "), err
    assert "Traceback" not in captured.err and captured.out == ""
    return err[0]


def _files(folder) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_release_refuses_a_runs_folder_without_scalars_before_writing(
    tmp_path, run, capsys
):
    """An empty --runs folder was found only after model.pth and training.json (with
    a training time of 0 h) were written."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "shipped" / "tiny"
    argv = [str(run / "checkpoint.pth.tar"), str(out), "--runs", str(empty)]
    assert main(argv) == 1
    assert (
        _release_error(capsys) == f"release: error: no TensorBoard scalars in {empty}"
    )
    assert not (tmp_path / "shipped").exists()
    # A continued run's folder that holds nothing is refused as well.
    assert main(argv[:3] + [str(run), str(empty)]) == 1
    assert str(empty) in _release_error(capsys)
    # Into an earlier release with --force: its files stay as they were.
    assert main(argv[:3] + [str(run)]) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(argv + ["--force"]) == 1
    assert str(empty) in _release_error(capsys)
    assert _files(out) == before


@pytest.mark.parametrize(
    "config, entry",
    [
        ("lambda 0.01", "'config' must be a dict, got str"),
        ({"train_data": 16}, "'config.train_data' must be a dict, got int"),
    ],
)
def test_release_refuses_a_stored_config_of_the_wrong_shape_before_writing(
    tmp_path, tiny_cps, capsys, config, entry
):
    checkpoint = tmp_path / "checkpoint.pth.tar"
    torch.save(
        {"architecture": "cps", "state_dict": tiny_cps.state_dict(), "config": config},
        checkpoint,
    )
    out = tmp_path / "shipped" / "tiny"
    assert main([str(checkpoint), str(out)]) == 1
    assert _release_error(capsys) == f"release: error: checkpoint {checkpoint}: {entry}"
    assert not (tmp_path / "shipped").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "must hold a JSON object, got list"),
        ("{not json", "is not valid JSON: "),
        (None, "cannot read --info"),
    ],
)
def test_release_refuses_an_info_file_that_is_no_json_object_naming_it(
    tmp_path, run, capsys, text, message
):
    info = tmp_path / "info.json"
    if text is not None:
        info.write_text(text)
    out = tmp_path / "shipped" / "tiny"
    argv = [str(run / "checkpoint.pth.tar"), str(out), "--info", str(info)]
    assert main(argv) == 1
    error = _release_error(capsys)
    assert str(info) in error and message in error, error
    assert not (tmp_path / "shipped").exists()


def test_a_release_that_fails_while_writing_leaves_the_previous_one(
    tmp_path, run, capsys, monkeypatch
):
    """A full disk while writing the last file: no file of the earlier release was
    replaced, no temporary is left, and a new folder is removed again."""
    from utils import atomic

    out = tmp_path / "shipped" / "tiny"
    argv = [str(run / "checkpoint.pth.tar"), str(out), "--runs", str(run)]
    assert main(argv) == 0
    before = _files(out)
    capsys.readouterr()
    calls = []
    real_fsync = atomic.os.fsync

    def full_on_the_third_file(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", full_on_the_third_file)
    assert main(argv + ["--force"]) == 1
    assert "No space left on device" in _release_error(capsys)
    assert _files(out) == before
    calls.clear()
    fresh = tmp_path / "fresh" / "tiny"
    assert main([argv[0], str(fresh), "--runs", str(run)]) == 1
    assert "No space left on device" in _release_error(capsys)
    assert not (tmp_path / "fresh").exists()


def test_release_solves_the_quantiles_of_a_runs_last_state_and_says_so(
    tmp_path, tiny_cps, capsys
):
    """A last state's quantiles follow the auxiliary loss and loading it warns; its
    release loaded without a warning but coded like it. The release now solves them,
    silently for the loader, and training.json records that it did."""
    import warnings

    checkpoint = tmp_path / "checkpoint.pth.tar"
    state = {"architecture": "cps", "state_dict": tiny_cps.state_dict()}
    torch.save({**state, "quantiles_solved": False}, checkpoint)
    with pytest.warns(UserWarning, match="training run's last state"):
        models.load_checkpoint(str(checkpoint))
    unsolved = float(tiny_cps.aux_loss().detach())
    out = tmp_path / "last"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main([str(checkpoint), str(out)]) == 0
        released = models.load_checkpoint(str(out / "model.pth"))
    assert "solved the entropy-bottleneck quantiles" in capsys.readouterr().out
    assert json.loads((out / "training.json").read_text())[
        "quantiles_solved_at_release"
    ]
    assert float(released.aux_loss().detach()) < min(0.1, unsolved / 10)

    # A best checkpoint's quantiles were solved in training: kept (in float16).
    torch.save({**state, "quantiles_solved": True}, checkpoint)
    assert main([str(checkpoint), str(tmp_path / "best")]) == 0
    info = json.loads((tmp_path / "best" / "training.json").read_text())
    assert info["quantiles_solved_at_release"] is False
    kept = models.load_checkpoint(str(tmp_path / "best" / "model.pth"))
    assert torch.equal(
        kept.entropy_bottleneck.quantiles,
        tiny_cps.entropy_bottleneck.quantiles.half().float(),
    )


def test_release_prints_warnings_as_one_line(tmp_path, capsys, monkeypatch):
    import warnings

    # Python's format (an earlier test's main may have set the one-line one already);
    # restored after.
    monkeypatch.setattr(warnings, "formatwarning", lambda *args: "file:3: echoed\n")
    assert main([str(tmp_path / "missing.pth"), str(tmp_path / "out")]) == 1
    assert "missing.pth" in _release_error(capsys)
    assert (
        warnings.formatwarning("slow", RuntimeWarning, "release.py", 3)
        == "warning: slow\n"
    )
