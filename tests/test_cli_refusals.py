"""Refused runs of the command-line scripts: refused before any work where the input
shows it, and leaving nothing behind, not even an empty output folder.

Each test is a command a user could type (in-process, through the scripts' ``main``)
whose defect an audit found: a damaged checkpoint found only after the ones before it
were evaluated, a BD-rate table without a column that still exited 0, and output
folders left empty by runs that failed before writing anything.
"""

import os

import pytest
import torch
from conftest import noisy_photos, save_model_checkpoint

import codec
import test as test_script
from utils.evaluation import app
from utils.output_paths import output_folder

pytestmark = pytest.mark.filterwarnings("ignore:MS-SSIM needs both sides")

HM = "assets/anchors/kodak/hm.json"  # PSNR-RGB and MS-SSIM-RGB, no PSNR-B
JPEG = "assets/results/kodak/jpeg_pillow.json"  # all four metrics


@pytest.fixture(autouse=True)
def _in_repository(monkeypatch):
    """The bundled results files are named relative to the repository root."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def good(tmp_path, tiny_cps):
    """A checkpoint that loads and codes: a random CPS with N=8."""
    return str(save_model_checkpoint(tmp_path, tiny_cps, "good"))


@pytest.fixture
def truncated(tmp_path, good):
    """The first half of a good checkpoint, as an interrupted copy leaves it."""
    data = open(good, "rb").read()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _unfitting(tmp_path, tiny_cps):
    """A readable checkpoint of a known architecture whose weights lack a layer."""
    state = {k: v for k, v in tiny_cps.state_dict().items() if not k.startswith("g_s")}
    path = tmp_path / "unfitting.pth"
    torch.save({"architecture": "cps", "state_dict": state}, path)
    return str(path)


def _unknown_architecture(tmp_path, tiny_cps):
    path = tmp_path / "unknown.pth"
    torch.save(
        {"architecture": "no-such-model", "state_dict": tiny_cps.state_dict()}, path
    )
    return str(path)


def _one_error_line(capsys, program):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and err[-1].startswith(f"{program}: error: "), err
    return err[-1]


# ------------------------------------------------ every checkpoint before the first


@pytest.mark.parametrize("make_bad", ["truncated", "unfitting", "unknown"])
def test_a_bad_second_checkpoint_stops_the_run_before_the_first_is_evaluated(
    tmp_path, tiny_cps, good, truncated, monkeypatch, capsys, make_bad
):
    bad = {
        "truncated": lambda: truncated,
        "unfitting": lambda: _unfitting(tmp_path, tiny_cps),
        "unknown": lambda: _unknown_architecture(tmp_path, tiny_cps),
    }[make_bad]()
    evaluated = []
    monkeypatch.setattr(app, "evaluate", lambda *a, **k: evaluated.append(a))
    noisy_photos(tmp_path / "images")
    argv = ["checkpoint", "-p", good, bad, "--dataset", str(tmp_path / "images")]
    assert test_script.main(argv + ["--no-progress"]) == 1
    assert bad in _one_error_line(capsys, "test.py")
    assert evaluated == []


def test_the_check_reads_a_lone_checkpoint_once_and_each_other_one_twice(
    tmp_path, tiny_cps, good, monkeypatch, capsys
):
    """The check before the run loads every checkpoint but keeps the first for its
    run: a lone checkpoint is read once, two are read three times, never all at
    once, and the results are those of a run without the check."""
    import models

    other = str(save_model_checkpoint(tmp_path, tiny_cps, "other"))
    loads = []
    real = models.load_checkpoint

    def counting(path, *args, **kwargs):
        loads.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(models, "load_checkpoint", counting)
    noisy_photos(tmp_path / "images", 1)
    common = ["--dataset", str(tmp_path / "images"), "--no-progress"]
    assert test_script.main(["checkpoint", "-p", good, *common]) == 0
    assert loads == [good]
    loads.clear()
    assert test_script.main(["checkpoint", "-p", good, other, *common]) == 0
    assert loads == [good, other, other]
    assert '"results"' in capsys.readouterr().out


# ------------------------------------------------------ BD-rate without a column


def test_bdrate_refuses_metrics_the_anchor_has_none_of_naming_those_it_has(
    tmp_path, capsys
):
    output = tmp_path / "table.md"
    argv = ["bdrate", "--anchor", HM, JPEG, "--metrics", "psnr-b", "-o", str(output)]
    assert test_script.main(argv) == 1
    line = _one_error_line(capsys, "test.py")
    assert "psnr-b" in line and "psnr-rgb, ms-ssim-rgb" in line, line
    assert not output.exists()


def test_bdrate_keeps_the_columns_the_anchor_has_when_it_lacks_others(capsys):
    argv = ["bdrate", "--anchor", HM, JPEG, "--metrics", "psnr-b,psnr-rgb"]
    assert test_script.main(argv) == 0
    table = capsys.readouterr().err
    assert "BD-rate psnr-rgb (%)" in table and "BD-rate psnr-b " not in table


# --------------------------------------------------------- no empty output folder


def test_codec_with_an_unreadable_checkpoint_creates_no_output_folder(
    tmp_path, truncated, capsys
):
    [photo] = noisy_photos(tmp_path / "in", 1)
    target = tmp_path / "new1" / "deep"
    argv = ["encode", str(photo), "-d", str(target), "-p", truncated]
    assert codec.main(argv) == 1
    assert truncated in _one_error_line(capsys, "codec.py")
    assert not (tmp_path / "new1").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_codec_whose_every_input_fails_while_coded_leaves_only_what_existed(
    tmp_path, good, capsys, existing
):
    """A truncated PNG passes the header check and fails once decoded: with nothing
    written, the folder this run made goes, and one that existed stays."""
    [photo] = noisy_photos(tmp_path / "in", 1)
    data = photo.read_bytes()
    photo.write_bytes(data[: len(data) // 2])
    target = tmp_path / "out"
    if existing:
        target.mkdir()
    assert codec.main(["encode", str(photo), "-d", str(target), "-p", good]) == 1
    assert str(photo) in _one_error_line(capsys, "codec.py")
    assert target.exists() == existing
    assert not existing or list(target.iterdir()) == []


def test_test_py_with_an_unreadable_checkpoint_creates_no_output_folder(
    tmp_path, truncated, capsys
):
    noisy_photos(tmp_path / "images")
    argv = ["checkpoint", "-p", truncated, "--dataset", str(tmp_path / "images")]
    assert test_script.main(argv + ["-d", str(tmp_path / "new3"), "--no-progress"]) == 1
    assert truncated in _one_error_line(capsys, "test.py")
    assert not (tmp_path / "new3").exists()


@pytest.mark.parametrize("damage", ["header", "pixels"])
@pytest.mark.parametrize("existing", [False, True])
def test_test_py_with_a_bad_image_leaves_only_the_folders_that_existed(
    tmp_path, capsys, damage, existing
):
    """A bad header is refused before the folder is made; bad pixels fail midway,
    after it was: either way a made folder (with its parents and the reconstructions
    folder) goes, and one that existed stays, empty."""
    first, second = noisy_photos(tmp_path / "images")
    data = second.read_bytes()
    second.write_bytes(
        b"not an image" if damage == "header" else data[: len(data) // 2]
    )
    out = tmp_path / "new4"
    if existing:
        out.mkdir()
    target = out / "deep"
    argv = ["codec", "--codec", "jpeg", "-q", "50", "--dataset", str(first.parent)]
    argv += ["-d", str(target), "--save-image", "--per-image", "--no-progress"]
    assert test_script.main(argv) == 1
    assert str(second) in _one_error_line(capsys, "test.py")
    assert out.exists() == existing
    assert not existing or list(out.iterdir()) == []


def test_output_folder_removes_only_the_empty_folders_it_made(tmp_path):
    """The shared mechanism on its own: the parents it made go with the folder when
    the block fails before writing (Ctrl-C included); a folder holding a file, one
    that existed, and the folder of a block that ends well stay."""
    made = tmp_path / "a" / "b"
    with pytest.raises(KeyboardInterrupt):
        with output_folder(str(made), "-d") as created:
            assert created == [str(tmp_path / "a"), str(made)]
            (made / "sub").mkdir()  # an empty folder the run made inside
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(RuntimeError):
        with output_folder(str(made), "-d"):
            (made / "kept.txt").write_text("written")
            raise RuntimeError("after writing")
    assert (made / "kept.txt").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        with output_folder(str(existing / "new"), "-d") as created:
            assert created == [str(existing / "new")]
            raise RuntimeError("before writing")
    assert list(existing.iterdir()) == [] and existing.is_dir()

    with output_folder(str(tmp_path / "ok"), "-d"):
        pass
    assert (tmp_path / "ok").is_dir()  # a run that ends well keeps its folder


def test_a_folder_named_through_dotdot_is_made_alone_and_removed_alone(
    tmp_path, monkeypatch
):
    """-d x/../y makes y only: an x made on the way would be left behind, since x/..
    is not the folder the run writes to."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError):
        with output_folder("x/../y", "-d"):
            assert (tmp_path / "y").is_dir() and not (tmp_path / "x").exists()
            raise RuntimeError("refused")
    assert sorted(os.listdir(tmp_path)) == []


# ------------------------------------------------------- reading within the budget


def test_test_py_refuses_an_image_whose_reading_breaks_the_budget_before_coding(
    tmp_path, good, monkeypatch, capsys
):
    """A PNG of a few kilobytes can declare a huge image (here 64 Mpx, 704 MB to
    read): test.py read it whole, past --max-memory, and failed only at a later
    phase; under the default 2 GB a 26000x26000 one held 2.8 GB. Like codec.py it
    refuses from the header, before any image is coded."""
    from PIL import Image

    from utils.memory import memory_in_use

    evaluated = []
    monkeypatch.setattr(app, "evaluate", lambda *a, **k: evaluated.append(a))
    (tmp_path / "images").mkdir()
    Image.new("1", (8000, 8000)).save(tmp_path / "images" / "bomb.png")
    budget = memory_in_use(torch.device("cpu")) // 2**20 + 256
    argv = ["checkpoint", "-p", good, "--dataset", str(tmp_path / "images")]
    assert (
        test_script.main([*argv, "--max-memory", f"{budget}MB", "--no-progress"]) == 1
    )
    line = _one_error_line(capsys, "test.py")
    assert "bomb.png: memory budget" in line, line
    assert "reading of this 8000x8000 image" in line, line
    assert evaluated == []
