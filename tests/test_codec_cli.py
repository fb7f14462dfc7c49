"""codec.py end to end: files on disk, printed rate, odd images, one-line errors."""

import numpy as np
import pytest
import torch
from PIL import Image

import codec
from models.base import CodingPlan
from utils.coding.container import unpack
from utils.image_io import read_image


@pytest.fixture
def checkpoint(tmp_path, tiny_cps):
    path = tmp_path / "model.pth.tar"
    torch.save({"state_dict": tiny_cps.state_dict()}, path)
    return str(path)


def _photo(height=70, width=90, seed=0):
    rng = np.random.default_rng(seed)
    return (np.linspace(0, 255, width)[None, :, None] * 0.8
            + rng.integers(0, 50, (height, width, 3))).astype(np.uint8)


def _run(argv, capsys):
    status = codec.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_encode_then_decode_writes_the_decoded_image(tmp_path, checkpoint, tiny_cps, capsys):
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    status, out, _ = _run(["encode", tmp_path / "in.png", tmp_path / "x.cps", "-p", checkpoint,
                           "--patch-size", 128], capsys)
    assert status == 0
    size = (tmp_path / "x.cps").stat().st_size
    assert f"{size} bytes, {size * 8 / (70 * 90):.4f} bpp" in out
    status, out, _ = _run(["decode", tmp_path / "x.cps", tmp_path / "out.png", "-p", checkpoint],
                          capsys)
    assert status == 0
    written, _ = read_image(str(tmp_path / "out.png"))
    expected = tiny_cps.decode(unpack((tmp_path / "x.cps").read_bytes()), CodingPlan())
    assert torch.equal(written, expected)


@pytest.mark.parametrize("mode, make, channels", [
    ("L", lambda a: Image.fromarray(a[:, :, 0]), 1),
    ("RGBA", lambda a: Image.fromarray(np.dstack([a, np.full(a.shape[:2], 128, np.uint8)])), 3),
    ("P", lambda a: Image.fromarray(a).convert("P"), 3),
    ("I;16", lambda a: Image.fromarray(a[:, :, 0].astype(np.uint16) * 257), 1),
])
def test_odd_image_modes_are_coded(tmp_path, checkpoint, capsys, mode, make, channels):
    make(_photo()).save(tmp_path / "in.png")
    encoded = _run(["encode", tmp_path / "in.png", tmp_path / "x.cps", "-p", checkpoint], capsys)
    assert encoded[0] == 0
    decoded = _run(["decode", tmp_path / "x.cps", tmp_path / "o.png", "-p", checkpoint], capsys)
    assert decoded[0] == 0
    assert np.asarray(Image.open(tmp_path / "o.png")).shape[2:] in ((), (3,))
    assert (np.asarray(Image.open(tmp_path / "o.png")).ndim == 2) == (channels == 1)


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(tmp_path):
    Image.fromarray(np.full((8, 8), 257 * 200, np.uint16)).save(tmp_path / "g16.png")
    image, info = read_image(str(tmp_path / "g16.png"))
    assert info.grayscale and int(image.max()) == 200 and image.shape == (3, 8, 8)


def _one_line_error(status, err, message):
    assert status == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("codec.py: error: ") and message in lines[-1]
    assert "Traceback" not in err


def test_missing_image_is_a_one_line_error(tmp_path, checkpoint, capsys):
    status, _, err = _run(["encode", tmp_path / "none.png", tmp_path / "x.cps", "-p", checkpoint],
                          capsys)
    _one_line_error(status, err, "file not found")


def test_unreadable_image_is_a_one_line_error(tmp_path, checkpoint, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    status, _, err = _run(["encode", tmp_path / "bad.png", tmp_path / "x.cps", "-p", checkpoint],
                          capsys)
    _one_line_error(status, err, "cannot read image")


def test_truncated_stream_is_a_one_line_error_and_writes_nothing(tmp_path, checkpoint, capsys):
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    _run(["encode", tmp_path / "in.png", tmp_path / "x.cps", "-p", checkpoint], capsys)
    data = (tmp_path / "x.cps").read_bytes()
    (tmp_path / "cut.cps").write_bytes(data[: len(data) // 2])
    status, _, err = _run(["decode", tmp_path / "cut.cps", tmp_path / "o.png", "-p", checkpoint],
                          capsys)
    _one_line_error(status, err, "checksum")
    assert not (tmp_path / "o.png").exists()


def test_wrong_checkpoint_is_a_one_line_error(tmp_path, checkpoint, capsys):
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    _run(["encode", tmp_path / "in.png", tmp_path / "x.cps", "-p", checkpoint], capsys)
    torch.manual_seed(9)
    import models
    other = models.build_model("cps", N=8)
    torch.save(other.state_dict(), tmp_path / "other.pth.tar")
    status, _, err = _run(["decode", tmp_path / "x.cps", tmp_path / "o.png", "-p",
                           tmp_path / "other.pth.tar"], capsys)
    _one_line_error(status, err, "another checkpoint")


def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path, checkpoint, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    status, _, err = _run(["encode", tmp_path / "x.png", tmp_path / "x.cps", "-p", checkpoint,
                           "--cuda"], capsys)
    _one_line_error(status, err, "CUDA is not available")


@pytest.mark.parametrize("failure, message", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: not enough "
                  "memory: you tried to allocate 8589934592 bytes."), "DefaultCPUAllocator"),
    (MemoryError(), "out of memory"),
])
def test_running_out_of_memory_is_a_one_line_error_and_writes_nothing(
        tmp_path, checkpoint, capsys, monkeypatch, failure, message):
    """With --max-memory none nothing plans the memory, and PyTorch's or Python's
    allocation failure must still end in one line, not a traceback."""
    from models.cps.network import CPS

    def fail(*_args, **_kwargs):
        raise failure

    monkeypatch.setattr(CPS, "encode", fail)
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    status, _, err = _run(["encode", tmp_path / "in.png", tmp_path / "x.cps", "-p", checkpoint,
                           "--max-memory", "none"], capsys)
    _one_line_error(status, err, message)
    assert not (tmp_path / "x.cps").exists()


def test_an_image_wider_than_the_format_is_refused_before_any_work(tmp_path, checkpoint, capsys,
                                                                    tiny_cps):
    """The container holds 65535 pixels a side: a wider image would give a file no
    decoder reads, so it is refused from its header, and by every model's encode."""
    Image.new("L", (65536, 1)).save(tmp_path / "wide.png")
    status, _, err = _run(["encode", tmp_path / "wide.png", tmp_path / "w.cps", "-p", checkpoint,
                           "--max-memory", "none"], capsys)
    _one_line_error(status, err, "65536x1 image does not fit")
    assert not (tmp_path / "w.cps").exists()
    with pytest.raises(ValueError, match="1 to 65535 pixels a side"):
        tiny_cps.encode(torch.zeros(3, 2, 65536, dtype=torch.uint8), CodingPlan())


@pytest.mark.parametrize("case, message", [
    ("checkpoint as output", "refusing to overwrite"),
    ("folder as input", "is a folder, not a file"),
    ("file as -d", "is a file, not a folder"),
])
def test_paths_that_would_destroy_or_confuse_are_refused(tmp_path, checkpoint, capsys, case,
                                                         message):
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    before = open(checkpoint, "rb").read()
    if case == "checkpoint as output":
        argv = ["encode", tmp_path / "in.png", checkpoint, "-p", checkpoint]
    elif case == "folder as input":
        (tmp_path / "dir.png").mkdir()
        argv = ["encode", tmp_path / "dir.png", tmp_path / "x.cps", "-p", checkpoint]
    else:
        (tmp_path / "out").write_text("a file")
        argv = ["encode", tmp_path / "in.png", "-d", tmp_path / "out", "-p", checkpoint]
    status, _, err = _run(argv, capsys)
    _one_line_error(status, err, message)
    assert open(checkpoint, "rb").read() == before
