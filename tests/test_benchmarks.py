"""The benchmarks' plumbing: where results go, and the authors' code run beside ours."""

import importlib
import json
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import time
import warnings
from unittest import mock

import pytest
import torch
from conftest import REPO, run_python
from PIL import Image

from benchmarks import codec_speed, memory_scaling, memory_scaling_report
from benchmarks.authors import authors_model, load_authors_cps, run_authors
from benchmarks.results_io import LOCAL_DIR, RESULTS_DIR

# The authors' layout: net/cps.py (class CPS, a JointAutoregressiveHierarchicalPriors
# built by from_state_dict, with compress_patch/decompress_patch and a stored device
# name that the patch manager uses) and net/patchmanager.py. The stand-in borrows our
# transforms, which have the authors' state-dict layout.
FAKE_CPS = """
from compressai.models.google import JointAutoregressiveHierarchicalPriors
from net.patchmanager import PatchManager

import models


class CPS(JointAutoregressiveHierarchicalPriors):
    def __init__(self, N=192, **kwargs):
        super().__init__(N=N, M=N, **kwargs)
        ours = models.build_model("cps", N=N)
        self.g_a, self.h_a, self.h_s, self.g_s = ours.g_a, ours.h_a, ours.h_s, ours.g_s
        self.device = "cuda"
        self.N = N

    @classmethod
    def from_state_dict(cls, state_dict):
        net = cls(state_dict["g_a.0.conv1.weight"].size(0))
        net.load_state_dict(state_dict)
        return net

    def compress_patch(self, x, x_patch_size):
        self.patch_manger = PatchManager(x, x_patch_size, self.device)
        return self.compress(x)

    def decompress_patch(self, strings, shape, x_patch_size):
        return self.decompress(strings, shape)
"""
FAKE_PATCH_MANAGER = """
class PatchManager:
    def __init__(self, x, patch_size, device):
        if x.device.type != device:
            raise RuntimeError(f"input on {x.device.type}, patch manager on {device}")
"""


@pytest.fixture
def authors_repo(tmp_path):
    """A minimal stand-in for a checkout of github.com/bblgbr/SPL-CPS."""
    repo = tmp_path / "SPL-CPS"
    (repo / "net").mkdir(parents=True)
    (repo / "net" / "cps.py").write_text(FAKE_CPS)
    (repo / "net" / "patchmanager.py").write_text(FAKE_PATCH_MANAGER)
    return str(repo)


def small_png(folder, width=70, height=50, name="a.png"):
    folder.mkdir(exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(
        0, 256, (height, width, 3), generator=generator, dtype=torch.uint8
    )
    Image.fromarray(pixels.numpy()).save(folder / name)
    return str(folder)


def test_results_go_to_the_ignored_folder_unless_published(tmp_path):
    assert codec_speed.parse_args([]).output == os.path.join(
        LOCAL_DIR, "codec_speed.json"
    )
    published = codec_speed.parse_args(["--publish"]).output
    assert published == os.path.join(RESULTS_DIR, "codec_speed.json")
    chosen = str(tmp_path / "x.json")
    assert memory_scaling.parse_args(["-o", chosen]).output == chosen
    with pytest.raises(SystemExit):
        memory_scaling.parse_args(["-o", chosen, "--publish"])


def test_the_local_results_folder_is_ignored_by_git():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, ".gitignore")) as handle:
        assert "/benchmarks/results/local/" in handle.read().split()


def test_the_authors_model_takes_our_weights_and_codes_an_image(authors_repo, tiny_cps):
    model = authors_model(
        load_authors_cps(authors_repo), tiny_cps.state_dict(), torch.device("cpu")
    )
    assert model.device == "cpu"
    assert torch.equal(
        model.state_dict()["g_a.0.conv1.weight"],
        tiny_cps.state_dict()["g_a.0.conv1.weight"],
    )
    image = torch.randint(0, 256, (3, 40, 70), dtype=torch.uint8)
    whole, patched = run_authors(model, image), run_authors(model, image, patch_size=64)
    assert whole["bytes"] > 0 and whole["bytes"] == patched["bytes"]
    assert whole["encode_s"] > 0 and whole["decode_s"] > 0


def test_a_folder_without_the_authors_module_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no net/cps.py there"):
        load_authors_cps(str(tmp_path))


def test_codec_speed_reports_not_measured_without_the_authors_code(tmp_path, capsys):
    output = tmp_path / "speed.json"
    argv = [
        "--images",
        small_png(tmp_path / "images"),
        "--count",
        "1",
        "--N",
        "8",
        "--modes",
        "exact",
        "-o",
        str(output),
    ]
    assert codec_speed.main(argv) == 0
    document = json.loads(output.read_text())
    assert document["authors"] == "not measured"
    assert "| exact |" in capsys.readouterr().out
    assert document["table"].splitlines()[2].endswith("| not measured | not measured |")
    assert not hasattr(codec_speed, "AUTHORS_SECONDS")


@pytest.mark.parametrize(
    "patch, described", [([], "whole"), (["--patch-size", "128"], "128 px")]
)
def test_codec_speed_times_the_authors_code_on_the_same_images(
    tmp_path, authors_repo, patch, described
):
    output = tmp_path / "speed.json"
    argv = [
        "--images",
        small_png(tmp_path / "images"),
        "--count",
        "1",
        "--N",
        "8",
        "--modes",
        "exact",
        "--authors-repo",
        authors_repo,
        "-o",
        str(output),
        *patch,
    ]
    assert codec_speed.main(argv) == 0
    document = json.loads(output.read_text())
    authors, ours = document["authors"], document["results"]["exact"]
    assert authors["total_s"] > 0 and document["patch"] == described
    assert ours["time_vs_authors"] == pytest.approx(
        ours["total_s"] / authors["total_s"]
    )
    assert "not measured" not in document["table"]


def test_codec_speed_with_a_wrong_authors_folder_is_one_line_and_exit_1(
    tmp_path, capsys
):
    argv = [
        "--images",
        small_png(tmp_path / "images"),
        "--count",
        "1",
        "--N",
        "8",
        "--authors-repo",
        str(tmp_path),
        "-o",
        str(tmp_path / "x.json"),
    ]
    assert codec_speed.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no net/cps.py" in err[0]


def test_a_checkout_whose_api_changed_fails_as_one_line_naming_the_method(
    tmp_path, authors_repo, capsys
):
    cps = os.path.join(authors_repo, "net", "cps.py")
    with open(cps) as source:
        changed = source.read().replace(
            "def compress_patch(self, x, x_patch_size):",
            "def compress_patch(self, x, x_patch_size, overlap):",
        )
    with open(cps, "w") as source:
        source.write(changed)
    argv = [
        "--images",
        small_png(tmp_path / "images"),
        "--count",
        "1",
        "--N",
        "8",
        "--patch-size",
        "64",
        "--authors-repo",
        authors_repo,
        "-o",
        str(tmp_path / "x.json"),
    ]
    assert codec_speed.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "codec_speed.py: error: the authors' CPS.compress_patch failed: TypeError: "
        "CPS.compress_patch() missing 1 required positional argument: 'overlap'"
    ]


def test_memory_scaling_runs_the_authors_code_in_a_child(authors_repo, capsys):
    argv = [
        "--child",
        "authors-cps",
        "70x50",
        "--N",
        "8",
        "--authors-repo",
        authors_repo,
        "--authors-patch-size",
        "64",
    ]
    assert memory_scaling.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bytes"] > 0 and result["peak_mb"] > 0


def test_memory_scaling_runs_cheng2020_from_the_zoo(capsys):
    assert memory_scaling.main(["--child", "cheng2020-anchor", "64x64"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bytes"] > 0 and result["peak_mb"] > 0


def test_memory_scaling_records_the_patches_the_budget_chose(capsys):
    """The cps-budget child reports the planner's choice for both directions."""
    import models.cps.coding
    import utils.stitching.planner

    originals = models.cps.coding.run_patchwise, utils.stitching.planner.choose_patches
    argv = ["--child", "cps-budget", "300x200", "--N", "8", "--max-memory", "2GB"]
    assert memory_scaling.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Encode and decode.
    assert len(result["patch_sizes"]) == len(result["batch_sizes"]) == 2
    assert result["bytes"] > 0 and result["transform_s"] > 0
    assert (
        models.cps.coding.run_patchwise,
        utils.stitching.planner.choose_patches,
    ) == originals


def test_memory_scaling_lists_cheng2020_and_needs_a_checkout_for_the_authors():
    assert memory_scaling.parse_args([]).methods == [
        "cps-budget",
        "cps-whole",
        "mbt2018",
        "cheng2020-anchor",
    ]
    with pytest.raises(SystemExit):
        memory_scaling.parse_args(["--methods", "authors-cps"])


def test_memory_scaling_table_gives_the_authors_ratios_or_not_measured():
    def entry(method, peak, seconds):
        return {
            "method": method,
            "image": "640x360",
            "megapixels": 0.23,
            "peak_mb": peak,
            "encode_s": seconds / 2,
            "decode_s": seconds / 2,
        }

    ours = [entry("cps-budget", 1000.0, 4.0)]
    table = memory_scaling_report.format_table(ours, ["cps-budget"])
    assert table.splitlines()[2] == (
        "| 640x360 | 1000 | 4.0 | not measured | not measured | not measured |"
    )
    both = ours + [entry("authors-cps", 3000.0, 10.0)]
    (ratio,) = memory_scaling_report.authors_ratios(both)
    assert ratio == {"image": "640x360", "peak_ratio": 3.0, "time_ratio": 2.5}
    assert (
        memory_scaling_report.format_table(both, ["cps-budget", "authors-cps"])
        .splitlines()[2]
        .endswith("| 3000 | 10.0 | 3.00x, 2.50x |")
    )


def test_the_gpu_check_dry_run_validates_every_command_and_writes_both_reports(
    tmp_path,
):
    from benchmarks import gpu_check

    kodak = tmp_path / "kodak"
    for index in range(3):
        small_png(kodak, 24, 16, f"kodim{index + 1:02d}.png")
    output = tmp_path / "out"
    assert (
        gpu_check.main(
            ["--dry-run", "--kodak", str(kodak), "--output-dir", str(output)]
        )
        == 0
    )
    report = json.loads((output / "gpu_check.json").read_text())
    assert [step["name"] for step in report["steps"]] == [
        "cuda_tests",
        "evaluate",
        "cross_device",
        "memory_8k",
        "wavefront",
        "training",
    ]
    assert all(step["status"] == "dry run: commands valid" for step in report["steps"])
    commands = [c for step in report["steps"] for c in step["commands"]]
    assert sum("--patch-size 128" in c for c in commands) == 1
    assert sum("--patch-size auto" in c for c in commands) == 1
    assert sum(" decode " in c for c in commands) == 4
    markdown = (output / "gpu_check.md").read_text()
    assert markdown.count("| dry run: commands valid |") == 6


def test_the_gpu_check_names_a_flag_that_a_script_does_not_take(tmp_path):
    from benchmarks import gpu_check, gpu_steps

    command = gpu_steps.memory_step(str(tmp_path)).commands[0] + ["--no-such-flag"]
    assert "--no-such-flag" in gpu_check.validate_command(command)
    missing = [command[0], os.path.join(gpu_check.ROOT, "benchmarks", "gone.py")]
    assert gpu_check.validate_command(missing) == "benchmarks/gone.py does not exist"


def test_the_gpu_check_without_kodak_refuses_to_run_but_can_dry_run(
    tmp_path, monkeypatch
):
    from benchmarks import gpu_check, gpu_steps

    monkeypatch.delenv("CPS_KODAK", raising=False)
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])
    with pytest.raises(ValueError, match="need 3"):
        gpu_steps.kodak_images(str(tmp_path))


def _done(code=0, stderr=""):
    return subprocess.CompletedProcess([], code, "", stderr)


@pytest.mark.parametrize(
    "cpu_decode_offset, outcome, status",
    [
        (0, {"max_abs_diff": 0, "pixels_differing": 0.0}, "pass"),
        # float rounding in g_s
        (1, {"max_abs_diff": 1, "pixels_differing": 0.25}, "pass"),
        (5, {"max_abs_diff": 5, "pixels_differing": 0.25}, "fail"),
        (None, "refused on the latent CRC", "pass"),
    ],
)
def test_cross_device_decodes_must_agree_within_a_level_or_be_refused_on_the_crc(
    tmp_path, cpu_decode_offset, outcome, status
):
    import numpy
    from PIL import Image

    from benchmarks import gpu_steps

    def write_png(name, offset=0):
        pixels = numpy.full((2, 2, 3), 100, dtype=numpy.uint8)
        pixels[0, 0] += offset
        Image.fromarray(pixels).save(tmp_path / name)

    step = gpu_steps.cross_device_step(str(tmp_path), "w.pth", "kodim01.png")
    for name in ("encoded_cuda.cps", "encoded_cpu.cps"):
        (tmp_path / name).write_bytes(b"file")
    for name in ("cuda_to_cuda.png", "cpu_to_cuda.png", "cpu_to_cpu.png"):
        write_png(name)
    results = [_done()] * 6
    if cpu_decode_offset is None:
        results[3] = _done(
            1, "codec.py: error: decoded latent differs (y_hat CRC mismatch)"
        )
    else:
        write_png("cuda_to_cpu.png", cpu_decode_offset)
    summary = step.summarise(results)
    assert summary["figures"]["cuda_to_cpu"] == outcome and summary["status"] == status
    assert summary["figures"]["cpu_to_cuda"] == {
        "max_abs_diff": 0,
        "pixels_differing": 0.0,
    }
    assert summary["figures"]["same_file_from_both_encoders"]
    (tmp_path / "encoded_cpu.cps").write_bytes(b"another file")
    assert step.summarise(results)["status"] == "fail"


@pytest.mark.parametrize(
    "graph_speed_up, status", [(1.05, "pass"), (0.95, "below target")]
)
def test_training_check_compares_the_graph_replayed_steps_with_their_targets(
    tmp_path, graph_speed_up, status
):
    from benchmarks import gpu_steps

    def row(loop, images_per_s, **extra):
        return {"loop": loop, "images_per_s": images_per_s, **extra}

    rows = [
        row("compressai_example", 100.0, operators_per_step=953),
        row(
            "train_py_cuda_graph",
            100.0 * graph_speed_up,
            graph_replayed=True,
            operators_per_step=12,
        ),
        row("train_py_bf16_channels_last_cuda_graph", 140.0, graph_replayed=True),
    ]
    (tmp_path / "training.json").write_text(json.dumps({"results": rows}))
    step = gpu_steps.training_step(str(tmp_path))
    summary = step.summarise([_done()])
    assert summary["status"] == status
    graph = summary["figures"]["train_py_cuda_graph"]
    assert graph["vs_compressai_example"] == pytest.approx(graph_speed_up)
    assert graph["operators_per_step"] == 12
    # A capture that failed trains eagerly: its speed cannot pass the check.
    rows[1].update(images_per_s=200.0, graph_replayed=False)
    (tmp_path / "training.json").write_text(json.dumps({"results": rows}))
    assert step.summarise([_done()])["status"] == "below target"


def test_a_failing_or_slow_command_stops_its_check(tmp_path):
    from benchmarks import gpu_check, gpu_steps

    def never(_results):
        raise AssertionError("summarise must not run")

    failing = gpu_steps.Step(
        "f", "", [[sys.executable, "-c", "raise SystemExit(3)"]], 30, never
    )
    slow = gpu_steps.Step(
        "s", "", [[sys.executable, "-c", "import time; time.sleep(5)"]], 1, never
    )
    assert gpu_check.run_step(failing, time.monotonic() + 30)["status"] == "error"
    assert gpu_check.run_step(slow, time.monotonic() + 30)["status"] == "timeout"


def test_startup_measures_one_child_process_time_and_peak_memory():
    from benchmarks import startup

    small = startup.run_once([sys.executable, "-c", "pass"])
    large = startup.run_once([sys.executable, "-c", "b = bytearray(200 * 2 ** 20)"])
    assert 0 < small["seconds"] < 30
    assert large["peak_rss_mb"] - small["peak_rss_mb"] > 150
    with pytest.raises(RuntimeError, match="boom"):
        startup.run_once([sys.executable, "-c", "raise SystemExit('boom')"])


@pytest.mark.parametrize("batch_in_one", [True, False])
def test_startup_runs_a_batch_in_one_call_only_when_codec_takes_several_inputs(
    batch_in_one,
):
    from benchmarks import startup

    files = {"weights": "w.pth", "images": ["a.png", "b.png", "c.png"]}
    rows = startup.rows_to_run("out", files, batch_in_one)
    assert list(rows) == [
        "import torch",
        "codec.py --help",
        "encode 1 image",
        "encode 3 images",
    ]
    batch = rows["encode 3 images"]
    assert len(batch) == (1 if batch_in_one else 3)
    assert ("-d" in batch[0]) == batch_in_one
    timings = {
        name: {"seconds": 2.0, "peak_rss_mb": 500.0, "processes": len(commands)}
        for name, commands in rows.items()
    }
    table = startup.format_table(timings, batch_in_one)
    assert ("separate codec.py calls" in table) != batch_in_one
    assert "| encode 3 images | 3 | 2.00 | 500 | 1.00x |" in table or batch_in_one


@pytest.mark.slow
def test_startup_benchmark_runs_end_to_end(tmp_path):
    from benchmarks import startup

    output = tmp_path / "startup.json"
    argv = [
        "--N",
        "8",
        "--size",
        "32",
        "--batch",
        "2",
        "--repeats",
        "1",
        "-o",
        str(output),
    ]
    assert startup.main(argv) == 0
    document = json.loads(output.read_text())
    assert set(document["results"]) == {
        "import torch",
        "codec.py --help",
        "encode 1 image",
        "encode 2 images",
    }
    assert all(row["seconds"] > 0 for row in document["results"].values())


def test_the_cuda_tests_check_reports_the_failed_tests():
    from benchmarks import gpu_check, gpu_steps

    step = gpu_steps.cuda_tests_step()
    assert (
        step.commands[0][1:3] == ["-m", "pytest"]
        and gpu_check.validate_command(step.commands[0]) is None
    )
    passed = subprocess.CompletedProcess(
        [], 0, "...\n5 passed, 94 deselected in 7.5s\n", ""
    )
    assert step.summarise([passed]) == {
        "status": "pass",
        "figures": {"summary": "5 passed, 94 deselected in 7.5s"},
    }
    output = (
        "FAILED tests/test_train.py::test_x - AssertionError: no\n"
        "1 failed, 4 passed in 7.5s\n"
    )
    failed = step.summarise([subprocess.CompletedProcess([], 1, output, "")])
    assert failed["status"] == "fail" and failed["figures"]["failed"] == [
        "FAILED tests/test_train.py::test_x"
    ]


def _usage_error(parse, argv, capsys):
    """The one-line message of the usage error (exit 2) that ``parse(argv)`` ends in."""
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("script", [codec_speed, memory_scaling])
def test_an_output_that_cannot_be_written_is_a_usage_error_before_the_run(
    tmp_path, capsys, script
):
    a_file = tmp_path / "file.json"
    a_file.write_text("{}")
    for output, reason in [
        (tmp_path, "is a folder"),
        (a_file / "x.json", "is a file"),
        (tmp_path / "missing" / "x.json", "does not exist"),
        ("", "empty"),
        # memory_scaling's figure goes to the same name with .png
        (tmp_path / "x.png", "must be a .json file"),
    ]:
        message = _usage_error(script.parse_args, ["-o", str(output)], capsys)
        assert "-o/--output" in message and reason in message


def test_every_script_that_takes_an_output_checks_it_when_parsing(tmp_path, capsys):
    from benchmarks import (
        entropy_coding,
        kamisli_decoding,
        patch_overhead,
        train_throughput,
    )

    for script in (entropy_coding, kamisli_decoding, patch_overhead, train_throughput):
        message = _usage_error(script.parse_args, ["-o", str(tmp_path)], capsys)
        assert "is a folder" in message


@pytest.mark.parametrize(
    "script, argv, message",
    [
        (
            "codec_speed",
            ["--modes", "exact", "fast", "exact"],
            "--modes names exact twice",
        ),
        ("entropy_coding", ["--sizes", "64x64", "64X64"], "--sizes names 64x64 twice"),
        (
            "entropy_coding",
            ["--coders", "raster", "raster"],
            "--coders names raster twice",
        ),
        (
            "gpu_check",
            ["--dry-run", "--checks", "training", "training"],
            "--checks names training twice",
        ),
        (
            "kamisli_decoding",
            ["--config", "a.yaml", "a.yaml"],
            "--config names a.yaml twice",
        ),
        (
            "memory_scaling",
            ["--methods", "mbt2018", "mbt2018"],
            "--methods names mbt2018 twice",
        ),
        ("memory_scaling", ["--sizes", "64x64", "64x64"], "--sizes names 64x64 twice"),
    ],
)
def test_a_list_option_naming_a_value_twice_is_a_usage_error(
    script, argv, message, capsys
):
    # Measured twice, the value would get two rows in the results and the tables.
    module = importlib.import_module(f"benchmarks.{script}")
    assert _usage_error(module.parse_args, argv, capsys).endswith(message)


@pytest.mark.parametrize(
    "script, argv, named",
    [
        ("memory_scaling", ["--sizes", "abc"], "--sizes"),
        ("memory_scaling", ["--sizes", "0x0"], "--sizes"),
        ("memory_scaling", ["--skip-above", "abc"], "--skip-above"),
        ("memory_scaling", ["--max-memory", "abc"], "--max-memory"),
        ("memory_scaling", ["--N", "0"], "--N"),
        ("memory_scaling", ["--N", "-8"], "--N"),
        # patch_overhead's ended in a traceback after the first child process, or
        # (--patch-size 0) timed the whole image against itself as a patch-wise run.
        ("patch_overhead", ["--sizes", "abc"], "--sizes"),
        ("patch_overhead", ["--sizes", "64x64,0x64"], "--sizes"),
        ("patch_overhead", ["--sizes", "64x64,64x64"], "--sizes names 64x64 twice"),
        ("patch_overhead", ["--N", "0"], "--N"),
        ("patch_overhead", ["--patch-size", "0"], "--patch-size"),
        ("patch_overhead", ["--patch-size", "-5"], "--patch-size"),
        ("patch_overhead", ["--batch-size", "0"], "--batch-size"),
        ("patch_overhead", ["--patch-size", "32"], "below the minimum 80"),
        # codec_speed said only "invalid parse value: '-5'"; train_throughput timed
        # train.py's step skipping every non-finite step under --lmbda nan.
        ("codec_speed", ["--patch-size", "-5"], "patch size must be >= 0"),
        ("codec_speed", ["--patch-size", "abc"], "patch size must be pixels"),
        ("train_throughput", ["--lmbda", "nan"], "--lmbda must be a positive number"),
        ("train_throughput", ["--lmbda", "-1"], "--lmbda must be a positive number"),
    ],
)
def test_bad_sizes_counts_widths_and_weights_are_usage_errors_when_parsing(
    script, argv, named, capsys
):
    module = importlib.import_module(f"benchmarks.{script}")
    assert named in _usage_error(module.parse_args, argv, capsys)


def test_memory_scaling_reads_sizes_and_the_skip_limit_when_parsing():
    args = memory_scaling.parse_args(["--sizes", "640X360", "--skip-above", "1GB"])
    assert args.sizes == [(640, 360)] and args.skip_above == "1GB"


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"benchmark": "codec_speed"}',
        '{"benchmark": "memory_scaling", "results": [{}]}',
    ],
)
def test_memory_scaling_update_needs_a_memory_scaling_results_file(
    tmp_path, capsys, content
):
    output = tmp_path / "invalid.json"
    output.write_text(content)
    message = _usage_error(
        memory_scaling.parse_args, ["--update", "-o", str(output)], capsys
    )
    assert "--update" in message and str(output) in message


def test_memory_scaling_update_keeps_the_published_entries():
    published = os.path.join(RESULTS_DIR, "memory_scaling.json")
    args = memory_scaling.parse_args(["--update", "-o", published])
    with open(published) as handle:
        assert args.previous == json.load(handle)["results"]


def test_memory_scaling_update_without_the_authors_keeps_their_settings(
    tmp_path, monkeypatch
):
    """The authors' entries were kept but the file said authors_repo null and their
    ratios "not measured": it held runs it did not describe."""
    published = os.path.join(RESULTS_DIR, "memory_scaling_authors.json")
    with open(published) as handle:
        before = json.load(handle)
    output = tmp_path / "update.json"
    output.write_text(json.dumps(before))
    kept = [e for e in before["results"] if e["method"] == "cps-budget"][0]
    size = kept["image"]
    monkeypatch.setattr(memory_scaling, "measure", lambda *_args: dict(kept))
    monkeypatch.setattr(memory_scaling, "plot", lambda *_args: None)
    budget = f"{before['budget_mb']:g}MB"
    argv = ["--update", "--methods", "cps-budget", "--sizes", size]
    argv += ["--max-memory", budget, "-o", str(output)]
    assert memory_scaling.main(argv) == 0
    after = json.loads(output.read_text())
    assert after["authors_repo"] == before["authors_repo"] is not None
    assert after["authors_patch_size"] == before["authors_patch_size"]
    assert after["authors_ratios"] == before["authors_ratios"]


def test_memory_scaling_with_a_wrong_authors_folder_stops_before_the_run(
    tmp_path, capsys, monkeypatch
):
    def never(*_args):
        raise AssertionError("no run may start")

    monkeypatch.setattr(memory_scaling, "measure", never)
    argv = ["--authors-repo", str(tmp_path / "missing"), "-o", str(tmp_path / "x.json")]
    assert memory_scaling.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "memory_scaling.py: error: --authors-repo"
    )
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    "source, why",
    [
        ("def broken(:\n", "SyntaxError"),
        ("import sys\nsys.exit('needs a GPU')\n", "SystemExit: needs a GPU"),
        (
            "raise AttributeError('module has no attribute x')\n",
            "AttributeError: module has no",
        ),
        ("class CPS:\n    pass\n", "from_state_dict"),
    ],
)
def test_an_unusable_authors_module_is_one_clear_error(tmp_path, source, why):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "cps.py").write_text(source)
    with pytest.raises(ValueError) as error:
        load_authors_cps(str(tmp_path))
    message = str(error.value)
    assert len(message.splitlines()) == 1 and why in message
    assert "not a usable checkout" in message and "bblgbr/SPL-CPS" in message


@pytest.mark.parametrize(
    "script", ["codec_speed", "memory_scaling", "patch_overhead", "train_throughput"]
)
def test_cuda_on_a_machine_without_it_is_a_usage_error_before_the_run(
    script, capsys, monkeypatch
):
    # memory_scaling recorded every child as failed and wrote its results, exit 0;
    # patch_overhead ended in a traceback; codec_speed failed in torch's words.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = importlib.import_module(f"benchmarks.{script}")
    message = _usage_error(module.parse_args, ["--cuda"], capsys)
    assert "--cuda was given but CUDA is not available" in message
    assert "leave --cuda out" in message


def test_patch_overhead_reports_a_failed_measurement_in_one_line(
    tmp_path, capsys, monkeypatch
):
    from benchmarks import patch_overhead

    def failed(*args):
        raise RuntimeError(f"measurement {args} failed with exit code 1")

    monkeypatch.setattr(patch_overhead, "measure", failed)
    output = tmp_path / "x.json"
    assert patch_overhead.main(["--sizes", "64x64", "-o", str(output)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("patch_overhead.py: error: measurement")
    assert not output.exists()


@pytest.mark.parametrize(
    "config, why",
    [
        ("configs/cps_2_lambda00035.yaml", "configures a cps model, not a Kamisli one"),
        ("configs/missing.yaml", "config file not found"),
    ],
)
def test_kamisli_decoding_refuses_a_config_it_cannot_time_before_any_run(
    config, why, capsys
):
    # A CPS preset ended in an AttributeError traceback; a bad second preset
    # stopped the run after the first one had been timed, and nothing was written.
    from benchmarks import kamisli_decoding

    argv = ["--config", "configs/kamisli_B8_KS3111_N768M96.yaml", config]
    message = _usage_error(kamisli_decoding.parse_args, argv, capsys)
    assert "error: --config: " in message and why in message


def _run_script(script, argv, monkeypatch):
    """Run ``benchmarks/<script>.py argv`` in this process as ``python`` would (its
    ``__main__`` block included); return its exit status."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    # run_main makes warnings one line for the rest of the process.
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    path = os.path.join(os.path.dirname(RESULTS_DIR), f"{script}.py")
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as stop:
        return stop.code
    except KeyboardInterrupt:  # would end the test session itself
        pytest.fail(f"{script}.py let Ctrl-C's KeyboardInterrupt out")
    pytest.fail(f"{script}.py ended without sys.exit")


def _interrupt(*_args, **_kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "script, argv, interrupted",
    [
        ("codec_speed", ["--count", "1"], "benchmarks.synthetic.synthetic_model"),
        (
            "entropy_coding",
            ["--sizes", "64x64"],
            "benchmarks.synthetic.synthetic_model",
        ),
        ("startup", [], "benchmarks.synthetic.synthetic_model"),
        ("memory_scaling", ["--sizes", "64x64"], "subprocess.run"),
        ("patch_overhead", ["--sizes", "64x64"], "multiprocessing.get_context"),
        (
            "train_throughput",
            ["--N", "8", "--crop", "64", "--batch-size", "1"],
            "compressai.losses.RateDistortionLoss",
        ),
        (
            "kamisli_decoding",
            ["--size", "64x64"],
            "utils.training.build.build_configured_model",
        ),
    ],
)
def test_ctrl_c_mid_run_is_one_line_status_130_and_no_results_file(
    script, argv, interrupted, tmp_path, capsys, monkeypatch
):
    # It ended in a KeyboardInterrupt traceback.
    monkeypatch.setattr(interrupted, _interrupt)
    output = tmp_path / "x.json"
    assert _run_script(script, [*argv, "-o", str(output)], monkeypatch) == 130
    assert capsys.readouterr().err == f"{script}.py: interrupted\n"
    assert os.listdir(tmp_path) == []


def test_a_reader_of_the_table_that_goes_away_ends_a_benchmark_quietly_with_141(
    tmp_path, capsys, monkeypatch
):
    # ``gpu_check.py --dry-run | head -1`` ended in a BrokenPipeError traceback.
    read, write = os.pipe()
    os.close(read)
    stdout = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    argv = ["--dry-run", "--checks", "memory_8k", "--output-dir", str(tmp_path)]
    try:
        assert _run_script("gpu_check", argv, monkeypatch) == 141
    finally:
        stdout.close()
    assert capsys.readouterr().err == ""


def test_a_benchmark_whose_reader_left_keeps_its_results_file(
    tmp_path, capsys, monkeypatch
):
    """The table was printed before the results were saved: a table longer than
    the pipe's buffer (here, a line-buffered stream) met the gone reader first, and
    ended a finished run with 141 and nothing written."""
    from utils.image_io import write_png

    images = tmp_path / "images"
    write_png(str(images / "a.png"), torch.zeros(3, 64, 64, dtype=torch.uint8))
    read, write = os.pipe()
    os.close(read)
    stdout = os.fdopen(write, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", stdout)
    output = tmp_path / "speed.json"
    argv = ["--images", str(images), "--count", "1", "--N", "8", "--modes", "fast"]
    try:
        assert (
            _run_script("codec_speed", [*argv, "-o", str(output)], monkeypatch) == 141
        )
    finally:
        stdout.close()
    assert json.loads(output.read_text())["results"]["fast"]["total_s"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output-dir", "{file}"], "--output-dir {file} is a file, not a folder"),
        (["--output-dir", "{file}/sub"], "--output-dir {file}/sub cannot be created"),
        (["--output-dir", ""], "--output-dir is empty: name a folder"),
        (["--work-dir", "{file}"], "--work-dir {file} is a file, not a folder"),
        (["--budget-s", "nan"], "--budget-s must be a positive number of seconds"),
        (["--budget-s", "inf"], "--budget-s must be a positive number of seconds"),
    ],
)
def test_the_gpu_check_refuses_bad_folders_and_budgets_when_parsing(
    argv, message, tmp_path, capsys
):
    # A file as --output-dir was a FileExistsError traceback once the checks had run
    # (on a GPU, after the first one); an empty one wrote the reports into the
    # current folder; a budget of nan was never reached.
    from benchmarks import gpu_check

    a_file = tmp_path / "file"
    a_file.write_text("")
    argv = ["--dry-run", *(arg.format(file=a_file) for arg in argv)]
    assert message.format(file=a_file) in _usage_error(
        gpu_check.parse_args, argv, capsys
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--N", "8"], "holds runs with N 192, this run has 8"),
        (
            ["--max-memory", "1GB"],
            "holds runs with budget_mb 2048.0, this run has 1024",
        ),
        (
            ["--methods", "authors-cps", "--authors-repo", "{repo}"],
            "holds runs with authors_patch_size 128, this run has 256",
        ),
    ],
)
def test_memory_scaling_update_refuses_a_file_measured_with_other_settings(
    argv, message, authors_repo, tmp_path, capsys
):
    # The merged file held the old N = 192 entries under the new run's "N": 8, and
    # their ratios to the new runs' figures.
    published = os.path.join(RESULTS_DIR, "memory_scaling_authors.json")
    output = tmp_path / "update.json"
    output.write_bytes(open(published, "rb").read())
    argv = ["--update", "-o", str(output), *(a.format(repo=authors_repo) for a in argv)]
    error = _usage_error(memory_scaling.parse_args, argv, capsys)
    assert "--update" in error and message in error and "give the same setting" in error


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--authors-repo", "{repo}", "--methods", "cps-budget"],
            "--authors-repo is for the authors-cps method, which --methods leaves "
            "out: add it, or leave --authors-repo out",
        ),
        (
            ["--authors-patch-size", "128"],
            "--authors-patch-size is for the authors' code: give --authors-repo",
        ),
    ],
)
def test_memory_scaling_refuses_authors_flags_that_would_not_be_used(
    argv, message, authors_repo, capsys
):
    # Both were accepted and silently had no effect; the first was also recorded in
    # the results as the authors' checkout without being checked.
    argv = [arg.format(repo=authors_repo) for arg in argv]
    assert _usage_error(memory_scaling.parse_args, argv, capsys).endswith(message)


def test_the_gpu_check_refuses_the_kodak_folder_as_its_work_folder(tmp_path, capsys):
    # Its decoded PNGs (cpu_to_cpu.png, ...) went there and sort before kodim01.png,
    # so the next gpu_check or codec_speed run took them for the first Kodak images.
    from benchmarks import gpu_check

    kodak = small_png(tmp_path / "kodak", name="kodim01.png")
    argv = ["--dry-run", "--kodak", kodak, "--work-dir", f"{kodak}/."]
    message = _usage_error(gpu_check.parse_args, argv, capsys)
    assert f"--work-dir {kodak}/. is the Kodak folder" in message


def test_patch_overhead_starts_its_child_deaf_to_ctrl_c_and_ended_at_exit(monkeypatch):
    # Ctrl-C reaches the whole process group: the child printed a traceback of its
    # own below the parent's one line.
    from benchmarks import patch_overhead

    started = {}

    class Child:
        def __init__(self, target, args, daemon):
            started["daemon"] = daemon

        def start(self):
            started["sigint"] = signal.getsignal(signal.SIGINT)

        def join(self):
            self.exitcode = 0

    class Context:
        Process = Child

        def Queue(self):
            return mock.Mock(get=lambda: {"analysis_s": 1.0})

    monkeypatch.setattr(multiprocessing, "get_context", lambda method: Context())
    handler = signal.getsignal(signal.SIGINT)
    assert patch_overhead.measure(64, 64, 8, 0, 1, "cpu", True) == {"analysis_s": 1.0}
    assert started == {"daemon": True, "sigint": signal.SIG_IGN}
    assert signal.getsignal(signal.SIGINT) is handler


def test_memory_scaling_refuses_an_output_whose_figure_name_is_a_folder(
    tmp_path, capsys
):
    # The plot was written once the run was over: a traceback, beside a results file.
    (tmp_path / "x.png").mkdir()
    argv = ["-o", str(tmp_path / "x.json")]
    message = _usage_error(memory_scaling.parse_args, argv, capsys)
    assert f"its figure {tmp_path / 'x.png'} is a folder" in message


def test_the_startup_benchmark_imports_pytorch_only_once_it_has_measured():
    """results_io imported utils.device, and with it PyTorch, at the top, so the
    parent of the timed processes held PyTorch's memory and threads while they ran."""
    code = "import sys, benchmarks.startup; print('torch' in sys.modules)"
    done = run_python(code, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.slow  # a fresh interpreter per script imports PyTorch and CompressAI
@pytest.mark.parametrize(
    "script",
    [
        "codec_speed",
        "entropy_coding",
        "gpu_check",
        "kamisli_decoding",
        "memory_scaling",
        "patch_overhead",
        "startup",
        "train_throughput",
    ],
)
def test_a_benchmarks_help_prints_no_warning_a_user_cannot_act_on(script):
    # train_throughput.py imported CompressAI before `models` filtered its deprecated
    # torch.jit.script, and warned above its usage.
    done = subprocess.run(
        [sys.executable, "-W", "default", f"benchmarks/{script}.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.startswith("usage:") and done.stderr == "", done.stderr
