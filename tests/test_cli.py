"""The shared command-line layer: typed flags parsed once, several inputs per call,
no input ever overwritten, Ctrl-C as one line, and no PyTorch before the arguments
are checked."""

import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import noisy_photos, run_python, save_model_checkpoint
from PIL import Image

import codec
import models
import test as test_script
from utils.cli import report_error, run_main
from utils.stitching.spec import PatchSpec

REPO = __file__.rsplit("/tests/", 1)[0]


@pytest.mark.parametrize(
    "text, size",
    [("auto", None), ("whole", 0), ("0", 0), ("256", 256), (" AUTO ", None)],
)
def test_patch_sizes_are_read_once_into_a_patch_spec(text, size):
    assert PatchSpec.parse(text) == PatchSpec(size)


@pytest.mark.parametrize("text", ["-16", "big", "12.5", ""])
def test_unreadable_patch_sizes_are_refused(text):
    with pytest.raises(ValueError, match="patch size"):
        PatchSpec.parse(text)


@pytest.fixture
def checkpoint(tmp_path, tiny_cps):
    return str(save_model_checkpoint(tmp_path, tiny_cps, "tiny"))


def test_several_inputs_are_coded_in_one_call_into_a_folder(
    tmp_path, checkpoint, capsys
):
    photos = noisy_photos(tmp_path, 3)
    out = tmp_path / "out"
    assert (
        codec.main(["encode", *map(str, photos), "-d", str(out), "-p", checkpoint]) == 0
    )
    assert sorted(path.name for path in out.iterdir()) == [
        f"photo{k}.cps" for k in range(3)
    ]
    decoded = tmp_path / "decoded"
    files = sorted(map(str, out.iterdir()))
    assert codec.main(["decode", *files, "-d", str(decoded), "-p", checkpoint]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 6
    for number, photo in enumerate(photos):
        single = tmp_path / f"single{number}.cps"
        assert codec.main(["encode", str(photo), str(single), "-p", checkpoint]) == 0
        assert single.read_bytes() == (out / f"photo{number}.cps").read_bytes()
        assert Image.open(decoded / f"photo{number}.png").size == Image.open(photo).size


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_a_batch_with_an_unreadable_input_is_refused_before_anything_is_written(
    tmp_path, checkpoint, capsys, command
):
    """Headers (images) and whole files (.cps) are checked before the first is coded."""
    photos = noisy_photos(tmp_path, 2)
    sources = photos
    if command == "decode":
        coded = tmp_path / "coded"
        assert (
            codec.main(
                ["encode", *map(str, photos), "-d", str(coded), "-p", checkpoint]
            )
            == 0
        )
        sources = sorted(coded.iterdir())
    bad = tmp_path / f"bad.{'png' if command == 'encode' else 'cps'}"
    bad.write_bytes(
        sources[0].read_bytes()[: len(sources[0].read_bytes()) // 2]
        if command == "decode"
        else b"not an image"
    )
    capsys.readouterr()
    out = tmp_path / "out"
    assert (
        codec.main(
            [command, *map(str, sources), str(bad), "-d", str(out), "-p", checkpoint]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"codec.py: error: {bad}: ") and len(err.splitlines()) == 1, (
        err
    )
    assert not out.exists()  # not even the folder -d would have made


def test_an_input_that_fails_while_coded_costs_only_its_own_output(
    tmp_path, checkpoint, capsys
):
    """A truncated PNG has a good header: it fails once decoded, the others are coded,
    each failure is one line, and a last line counts them (status 1)."""
    first, second = noisy_photos(tmp_path, 2)
    cut = tmp_path / "cut.png"
    data = first.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert (
        codec.main(
            [
                "encode",
                str(cut),
                str(first),
                str(second),
                "-d",
                str(out),
                "-p",
                checkpoint,
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith(f"codec.py: error: {cut}: "), err
    assert err[1] == (
        f"codec.py: error: 1 of 3 inputs failed ({cut}); the outputs of the "
        f"others were written"
    )
    assert sorted(path.name for path in out.iterdir()) == ["photo0.cps", "photo1.cps"]


def test_an_output_that_is_the_input_is_refused_and_the_input_kept(
    tmp_path, checkpoint, capsys
):
    [photo] = noisy_photos(tmp_path, 1)
    original = photo.read_bytes()
    assert codec.main(["encode", str(photo), str(photo), "-p", checkpoint]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert photo.read_bytes() == original


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_a_missing_output_folder_is_refused_the_same_way_both_ways(
    tmp_path, checkpoint, capsys, command
):
    [photo] = noisy_photos(tmp_path, 1)
    source = photo
    if command == "decode":
        source = tmp_path / "photo.cps"
        assert codec.main(["encode", str(photo), str(source), "-p", checkpoint]) == 0
    capsys.readouterr()
    target = tmp_path / "missing" / "out.bin"
    assert codec.main([command, str(source), str(target), "-p", checkpoint]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("codec.py: error: output folder does not exist")
    assert len(err.splitlines()) == 1


def test_inputs_that_would_share_an_output_are_refused_before_any_work(
    tmp_path, checkpoint, capsys
):
    [photo] = noisy_photos(tmp_path, 1)
    other = tmp_path / "sub"
    other.mkdir()
    twin = other / photo.name
    twin.write_bytes(photo.read_bytes())
    assert (
        codec.main(
            [
                "encode",
                str(photo),
                str(twin),
                "-d",
                str(tmp_path / "out"),
                "-p",
                checkpoint,
            ]
        )
        == 1
    )
    assert "collide" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_warnings_are_printed_as_one_line_without_python_source():
    """Python's format gave 'path/metrics.py:68: RuntimeWarning: ...' and the echoed
    source line on every small image test.py evaluated."""
    script = (
        "import sys, warnings\n"
        "from utils.cli import run_main\n"
        "def work():\n"
        "    warnings.warn('MS-SSIM needs larger images', RuntimeWarning)\n"
        "    return 0\n"
        "sys.exit(run_main(work, 'test.py'))"
    )
    done = run_python(script, timeout=60)
    assert (
        done.returncode == 0 and done.stderr == "warning: MS-SSIM needs larger images\n"
    )


def test_train_py_prints_warnings_as_one_line_too(tmp_path, monkeypatch, capsys):
    import warnings

    import train

    # Restored after.
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    assert train.main(["--config", str(tmp_path / "missing.yaml")]) == 1
    assert (
        warnings.formatwarning("slow", RuntimeWarning, "step.py", 3)
        == "warning: slow\n"
    )


def test_a_reader_of_stdout_that_goes_away_ends_the_program_quietly_with_141():
    """``test.py bdrate ... | head -1`` ended in a BrokenPipeError traceback."""
    script = (
        "import sys\n"
        "from utils.cli import run_main\n"
        "def work():\n"
        "    for _ in range(100000):\n"
        "        print('a results table row')\n"
        "    return 0\n"
        "sys.exit(run_main(work, 'test.py'))"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    child.stdout.close()  # the reader goes away before the output ends
    stderr = child.stderr.read()
    assert child.wait(timeout=60) == 141 and stderr == ""


@pytest.mark.parametrize("stdout", ["the same pipe", "elsewhere"])
def test_a_reader_of_stderr_that_goes_away_ends_the_program_quietly_with_141(stdout):
    """``train.py ... 2>&1 | head`` logs to stderr: a reader gone from stderr alone
    (stdout elsewhere) was a broken pipe that was not stdout's, re-raised, and the
    traceback failed again on the closed stderr."""
    script = (
        "import sys\n"
        "from utils.cli import run_main\n"
        "def work():\n"
        "    for _ in range(100000):\n"
        "        print('a log line', file=sys.stderr)\n"
        "    return 0\n"
        "sys.exit(run_main(work, 'train.py'))"
    )
    if stdout == "the same pipe":  # 2>&1 | head
        streams = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    else:  # 2>&1 >/dev/null | head
        streams = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, **streams)
    (child.stdout or child.stderr).close()
    assert child.wait(timeout=60) == 141


def test_a_reader_gone_before_the_last_buffered_output_is_flushed_ends_quietly():
    """Block-buffered stdout (no PYTHONUNBUFFERED) still held the table when main
    returned, and Python's flush at exit printed 'Exception ignored ...'."""
    script = (
        "import sys\n"
        "from utils.cli import run_main\n"
        "def work():\n"
        "    print('a short table')\n"
        "    sys.stdin.read()  # until the test has closed the reading end\n"
        "    return 0\n"
        "sys.exit(run_main(work, 'test.py'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    child.stdout.close()
    child.stdin.close()
    stderr = child.stderr.read()
    assert child.wait(timeout=60) == 141 and stderr == ""


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(capsys):
    def worker_died():
        raise BrokenPipeError("a DataLoader worker's pipe")

    with pytest.raises(BrokenPipeError):
        run_main(worker_died, "test.py")


def test_ctrl_c_is_one_line_and_status_130(capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert run_main(interrupted, "codec.py") == 130
    assert capsys.readouterr().err == "codec.py: interrupted\n"


@pytest.mark.parametrize(
    "script, argvs",
    [
        ("codec", "(['--help'], ['encode', 'only-one', '-p', 'x'])"),
        (
            "test",
            "(['--help'], ['checkpoint', '--help'], "
            "['codec', '--codec', 'none', '-q', '1'])",
        ),
        ("train", "(['--help'], ['--set', 'x'])"),
    ],
)
def test_help_and_argument_errors_come_back_before_pytorch_is_imported(script, argvs):
    # test.py imported the BD-rate module for its interpolation names, and with it
    # SciPy and matplotlib: 1.4 s before any argument was read.
    probe = (
        f"import sys, {script}\n"
        f"for argv in {argvs}:\n"
        "    try:\n"
        f"        {script}.parse_args(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted({'torch', 'scipy', 'matplotlib'} & set(sys.modules)))\n"
    )
    result = run_python(probe, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_command_line_offers_exactly_the_implemented_names():
    from utils.evaluation import choices, classical_codecs, demo

    assert tuple(classical_codecs.CODECS) == choices.CODEC_NAMES
    assert tuple(demo.DEMO_IMAGES) == choices.DEMO_IMAGE_NAMES


def test_a_small_fixed_patch_is_warned_about(tmp_path, checkpoint, capsys):
    [photo] = noisy_photos(tmp_path, 1)
    assert (
        codec.main(
            [
                "encode",
                str(photo),
                str(tmp_path / "x.cps"),
                "-p",
                checkpoint,
                "--patch-size",
                "80",
            ]
        )
        == 0
    )
    assert (
        "the POPS overlap is 64 px for cps): coding is many times slower than at 256"
        in capsys.readouterr().err
    )
    assert (
        codec.main(
            [
                "encode",
                str(photo),
                str(tmp_path / "y.cps"),
                "-p",
                checkpoint,
                "--patch-size",
                "128",
            ]
        )
        == 0
    )
    assert "warning" not in capsys.readouterr().err


@pytest.fixture
def zoo_checkpoint(tmp_path):
    torch.manual_seed(0)
    return str(
        save_model_checkpoint(
            tmp_path, models.build_model("bmshj2018-factorized", N=8, M=8), "zoo"
        )
    )


def test_a_patch_size_a_whole_image_model_ignores_is_warned_about(
    tmp_path, zoo_checkpoint, capsys
):
    [photo] = noisy_photos(tmp_path, 1)
    assert (
        codec.main(
            [
                "encode",
                str(photo),
                str(tmp_path / "x.cps"),
                "-p",
                zoo_checkpoint,
                "--patch-size",
                "128",
            ]
        )
        == 0
    )
    assert (
        "bmshj2018-factorized codes whole images (no POPS): --patch-size 128 is ignored"
        in capsys.readouterr().err
    )
    # Auto: nothing to warn about.
    assert (
        codec.main(
            ["encode", str(photo), str(tmp_path / "y.cps"), "-p", zoo_checkpoint]
        )
        == 0
    )
    assert "warning" not in capsys.readouterr().err


def test_test_py_warns_of_an_ignored_patch_size_but_not_of_naive_tiles(
    tmp_path, zoo_checkpoint, caplog
):
    noisy_photos(tmp_path, 1)
    base = [
        "checkpoint",
        "--dataset",
        str(tmp_path),
        "-p",
        zoo_checkpoint,
        "--no-progress",
        "--patch-size",
        "64",
    ]
    with caplog.at_level(logging.WARNING, logger="cps.test"):
        assert test_script.main(base) == 0
        assert "--patch-size 64 is ignored" in caplog.text
        caplog.clear()
        assert test_script.main([*base, "--tiling", "naive"]) == 0
        assert "ignored" not in caplog.text


def test_the_budget_and_batch_flags_are_typed_once(tmp_path):
    args = codec.parse_args(
        [
            "encode",
            "a.png",
            "b.cps",
            "-p",
            "c",
            "--max-memory",
            "1.5GB",
            "--patch-size",
            "whole",
            "--batch-size",
            "3",
        ]
    )
    assert args.max_memory == 3 * 2**29 and args.patch_size == PatchSpec(0)
    assert (
        codec.parse_args(
            ["decode", "a", "b", "-p", "c", "--max-memory", "none"]
        ).max_memory
        is None
    )
    with pytest.raises(SystemExit):
        codec.parse_args(["encode", "a", "b", "-p", "c", "--batch-size", "0"])


def test_train_py_reports_config_errors_before_pytorch_is_imported():
    probe = (
        "import sys, train\n"
        "status = train.main(['--config', 'configs/cps_1_lambda00018.yaml',\n"
        "                     '--set', 'train_params.N=5000'])\n"
        "print(status, 'torch' in sys.modules)\n"
    )
    result = run_python(probe, check=True)
    assert result.stdout.split() == ["1", "False"]
    assert "train_params.N" in result.stderr


@pytest.mark.parametrize(
    "rank, program", [(None, "test.py"), ("0", "test.py"), ("1", "test.py [rank 1]")]
)
def test_an_error_names_the_torchrun_rank_that_reports_it(
    capsys, monkeypatch, rank, program
):
    """Under torchrun the ranks share stderr and often repeat one refusal."""
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert report_error("test.py", ValueError("no such file")) == 1
    assert capsys.readouterr().err == f"{program}: error: no such file\n"


def test_test_py_prefixes_its_warnings_as_the_documentation_says(tmp_path):
    # docs/evaluation.md: "warnings are one line each (`warning: ...`)"; test.py's
    # own warnings (an ignored --patch-size, an image's conversions) came bare.
    [photo] = noisy_photos(tmp_path, 1)
    torch.manual_seed(0)
    model = models.build_model("bmshj2018-factorized", N=8, M=8)
    checkpoint = save_model_checkpoint(tmp_path, model, "zoo")
    argv = ["checkpoint", "--dataset", str(photo.parent), "-p", str(checkpoint)]
    argv += ["--no-progress", "--patch-size", "64"]
    done = run_python(f"import sys, test; sys.exit(test.main({argv!r}))")
    assert done.returncode == 0, done.stderr
    ignored = "bmshj2018-factorized codes whole images (no POPS): --patch-size 64"
    lines = done.stderr.splitlines()
    assert any(line.startswith(f"warning: {ignored}") for line in lines), lines
    assert not any(line.startswith(ignored) for line in lines)
