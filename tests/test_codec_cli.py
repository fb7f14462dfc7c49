"""codec.py end to end: files on disk, printed rate, odd images, one-line errors."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import codec
from models.base import CodingPlan
from utils.coding.container import unpack
from utils.image_io import image_size, read_image
from utils.image_samples import _to_8bit


@pytest.fixture
def checkpoint(tmp_path, tiny_cps):
    path = tmp_path / "model.pth.tar"
    torch.save({"state_dict": tiny_cps.state_dict()}, path)
    return str(path)


def _photo(height=70, width=90, seed=0):
    rng = np.random.default_rng(seed)
    return (
        np.linspace(0, 255, width)[None, :, None] * 0.8
        + rng.integers(0, 50, (height, width, 3))
    ).astype(np.uint8)


def _run(argv, capsys):
    status = codec.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_encode_then_decode_writes_the_decoded_image(
    tmp_path, checkpoint, tiny_cps, capsys
):
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    status, out, _ = _run(
        [
            "encode",
            tmp_path / "in.png",
            tmp_path / "x.cps",
            "-p",
            checkpoint,
            "--patch-size",
            128,
        ],
        capsys,
    )
    assert status == 0
    size = (tmp_path / "x.cps").stat().st_size
    assert f"{size} bytes, {size * 8 / (70 * 90):.4f} bpp" in out
    status, out, _ = _run(
        ["decode", tmp_path / "x.cps", tmp_path / "out.png", "-p", checkpoint], capsys
    )
    assert status == 0
    written, _ = read_image(str(tmp_path / "out.png"))
    expected = tiny_cps.decode(unpack((tmp_path / "x.cps").read_bytes()), CodingPlan())
    assert torch.equal(written, expected)


@pytest.mark.parametrize(
    "mode, make, channels",
    [
        ("L", lambda a: Image.fromarray(a[:, :, 0]), 1),
        (
            "RGBA",
            lambda a: Image.fromarray(
                np.dstack([a, np.full(a.shape[:2], 128, np.uint8)])
            ),
            3,
        ),
        ("P", lambda a: Image.fromarray(a).convert("P"), 3),
        ("I;16", lambda a: Image.fromarray(a[:, :, 0].astype(np.uint16) * 257), 1),
    ],
)
def test_odd_image_modes_are_coded(tmp_path, checkpoint, capsys, mode, make, channels):
    make(_photo()).save(tmp_path / "in.png")
    encoded = _run(
        ["encode", tmp_path / "in.png", tmp_path / "x.cps", "-p", checkpoint], capsys
    )
    assert encoded[0] == 0
    decoded = _run(
        ["decode", tmp_path / "x.cps", tmp_path / "o.png", "-p", checkpoint], capsys
    )
    assert decoded[0] == 0
    assert np.asarray(Image.open(tmp_path / "o.png")).shape[2:] in ((), (3,))
    assert (np.asarray(Image.open(tmp_path / "o.png")).ndim == 2) == (channels == 1)


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(tmp_path):
    Image.fromarray(np.full((8, 8), 257 * 200, np.uint16)).save(tmp_path / "g16.png")
    image, info = read_image(str(tmp_path / "g16.png"))
    assert info.grayscale and int(image.max()) == 200 and image.shape == (3, 8, 8)


def test_every_sixteen_bit_value_scales_to_the_nearest_eight_bit_one():
    # v / 257 is never halfway for an integer v, so np.round's tie rule plays no part.
    values = np.arange(65536)
    expected = np.round(values / 257).astype(np.uint8)
    assert np.array_equal(_to_8bit(values.astype(np.uint16)), expected)
    # Mode I images are int32: those whose values fit 16 bits scale the same way.
    assert _to_8bit(np.array([0, 386, 65535], np.int32)).tolist() == [0, 2, 255]


@pytest.mark.parametrize("outside", [-5, 70000])
def test_thirty_two_bit_samples_that_do_not_fit_sixteen_bits_are_refused(
    tmp_path, outside
):
    """Clipping them coded another picture (mostly white) with a '16-bit' warning."""
    samples = np.full((8, 8), 1000, np.int32)
    samples[3, 4] = outside
    Image.fromarray(samples).save(tmp_path / "i32.tif")
    with pytest.raises(
        ValueError,
        match=f"i32.tif: integer samples from .*{outside}.* do not fit 16 bits",
    ):
        read_image(str(tmp_path / "i32.tif"))


def test_a_floating_point_image_is_refused_from_its_header(tmp_path):
    """So that a batch or a dataset is checked before the first image is coded."""
    Image.fromarray(np.zeros((8, 8), np.float32)).save(tmp_path / "f.tif")
    for reader in (image_size, read_image):
        with pytest.raises(
            ValueError, match="f.tif: floating-point images are not supported"
        ):
            reader(str(tmp_path / "f.tif"))


def _png16(path, samples):
    """A PNG of 16-bit RGB or RGBA samples (H, W, 3 or 4), which PIL cannot write."""
    import struct
    import zlib

    height, width, channels = samples.shape
    rows = b"".join(
        b"\x00" + samples[row].astype(">u2").tobytes() for row in range(height)
    )

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, {3: 2, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("channels", [3, 4])
def test_sixteen_bit_colour_is_rounded_not_truncated(tmp_path, channels):
    """PIL keeps the high byte of 16-bit RGB (200 -> 0, 32767 -> 127); the reader
    rounds v / 257 as it does for 16-bit grayscale."""
    samples = np.array(
        [[[200, 32767, 65535, 9][:channels], [128, 383, 384, 9][:channels]]], np.uint16
    )
    _png16(tmp_path / "c16.png", samples)
    image, info = read_image(str(tmp_path / "c16.png"))
    assert image[:, 0, :].t().tolist() == [[1, 127, 255], [0, 1, 1]]
    assert "16-bit samples scaled to 8 bits" in info.conversions
    assert ("alpha channel dropped" in info.conversions) == (channels == 4)


def test_a_truncated_sixteen_bit_colour_png_is_one_line_without_library_internals(
    tmp_path,
):
    rng = np.random.default_rng(0)
    _png16(tmp_path / "c16.png", rng.integers(0, 65536, (64, 64, 3)).astype(np.uint16))
    data = (tmp_path / "c16.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as caught:
        read_image(str(tmp_path / "cut.png"))
    message = str(caught.value)
    assert message.startswith(f"cannot read image {tmp_path / 'cut.png'}: ")
    assert "\n" not in message and ".cpp" not in message, message


def test_exif_orientation_and_extra_frames_are_applied_and_reported(tmp_path):
    picture = Image.fromarray(_photo(32, 48))
    exif = picture.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    picture.save(tmp_path / "turned.jpg", exif=exif)
    image, info = read_image(str(tmp_path / "turned.jpg"))
    assert image.shape == (3, 48, 32)
    assert info.conversions == ["rotated or flipped as its EXIF orientation says"]
    frames = [Image.new("RGB", (8, 8), (40 * k, 0, 0)) for k in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    image, info = read_image(str(tmp_path / "anim.gif"))
    assert "the first of its 3 frames coded" in info.conversions
    assert int(image[0, 0, 0]) == 0


def test_a_one_pixel_image_reads_without_warnings(tmp_path, recwarn):
    Image.new("RGB", (1, 1), (3, 4, 5)).save(tmp_path / "one.png")
    image, _ = read_image(str(tmp_path / "one.png"))
    assert image.flatten().tolist() == [3, 4, 5] and len(recwarn) == 0


def _one_line_error(status, err, message):
    assert status == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("codec.py: error: ") and message in lines[-1]
    assert "Traceback" not in err


def test_missing_image_is_a_one_line_error(tmp_path, checkpoint, capsys):
    status, _, err = _run(
        ["encode", tmp_path / "none.png", tmp_path / "x.cps", "-p", checkpoint], capsys
    )
    _one_line_error(status, err, "input not found")


def test_unreadable_image_is_a_one_line_error(tmp_path, checkpoint, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    status, _, err = _run(
        ["encode", tmp_path / "bad.png", tmp_path / "x.cps", "-p", checkpoint], capsys
    )
    _one_line_error(status, err, "cannot read image")


def test_truncated_stream_is_a_one_line_error_and_writes_nothing(
    tmp_path, checkpoint, capsys
):
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    _run(["encode", tmp_path / "in.png", tmp_path / "x.cps", "-p", checkpoint], capsys)
    data = (tmp_path / "x.cps").read_bytes()
    (tmp_path / "cut.cps").write_bytes(data[: len(data) // 2])
    status, _, err = _run(
        ["decode", tmp_path / "cut.cps", tmp_path / "o.png", "-p", checkpoint], capsys
    )
    _one_line_error(status, err, "checksum")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    "head, message",
    [
        (b"RIFF", "bad magic number"),  # a video given by mistake
        (b"CPS\x89\x01", "reading of this 300 MB file"),
    ],
)
def test_a_large_input_to_decode_is_refused_before_it_is_read_whole(
    tmp_path, checkpoint, capsys, head, message
):
    """codec.py read a file to decode whole before looking at it: a 3 GB file that
    was no .cps at all held 3.9 GB under the default 2 GB budget before its magic
    number was refused. The magic number comes first, then the size against the
    budget (the file is held about three times while it is parsed)."""
    from utils.memory import memory_in_use

    path = tmp_path / "large.cps"
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(300 * 2**20)  # sparse: no disk space, no time to write
    budget = memory_in_use(torch.device("cpu")) // 2**20 + 200
    status, _, err = _run(
        ["decode", path, tmp_path / "o.png", "-p", checkpoint]
        + ["--max-memory", f"{budget}MB"],
        capsys,
    )
    _one_line_error(status, err, message)
    assert not (tmp_path / "o.png").exists()


def test_wrong_checkpoint_is_a_one_line_error(tmp_path, checkpoint, capsys):
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    _run(["encode", tmp_path / "in.png", tmp_path / "x.cps", "-p", checkpoint], capsys)
    torch.manual_seed(9)
    import models

    other = models.build_model("cps", N=8)
    torch.save(other.state_dict(), tmp_path / "other.pth.tar")
    status, _, err = _run(
        [
            "decode",
            tmp_path / "x.cps",
            tmp_path / "o.png",
            "-p",
            tmp_path / "other.pth.tar",
        ],
        capsys,
    )
    _one_line_error(status, err, "another checkpoint")


def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path, checkpoint, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    status, _, err = _run(
        ["encode", tmp_path / "x.png", tmp_path / "x.cps", "-p", checkpoint, "--cuda"],
        capsys,
    )
    _one_line_error(status, err, "CUDA is not available")


@pytest.mark.parametrize(
    "failure, message",
    [
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: not enough "
                "memory: you tried to allocate 8589934592 bytes."
            ),
            "DefaultCPUAllocator",
        ),
        (MemoryError(), "out of memory"),
    ],
)
def test_running_out_of_memory_is_a_one_line_error_and_writes_nothing(
    tmp_path, checkpoint, capsys, monkeypatch, failure, message
):
    """With --max-memory none nothing plans the memory, and PyTorch's or Python's
    allocation failure must still end in one line, not a traceback."""
    from models.cps.network import CPS

    def fail(*_args, **_kwargs):
        raise failure

    monkeypatch.setattr(CPS, "encode", fail)
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    status, _, err = _run(
        [
            "encode",
            tmp_path / "in.png",
            tmp_path / "x.cps",
            "-p",
            checkpoint,
            "--max-memory",
            "none",
        ],
        capsys,
    )
    _one_line_error(status, err, message)
    assert not (tmp_path / "x.cps").exists()


def test_an_image_wider_than_the_format_is_refused_before_any_work(
    tmp_path, checkpoint, capsys, tiny_cps
):
    """The container holds 65535 pixels a side: a wider image would give a file no
    decoder reads, so it is refused from its header, and by every model's encode."""
    Image.new("L", (65536, 1)).save(tmp_path / "wide.png")
    status, _, err = _run(
        [
            "encode",
            tmp_path / "wide.png",
            tmp_path / "w.cps",
            "-p",
            checkpoint,
            "--max-memory",
            "none",
        ],
        capsys,
    )
    _one_line_error(status, err, "65536x1 image does not fit")
    assert not (tmp_path / "w.cps").exists()
    with pytest.raises(ValueError, match="1 to 65535 pixels a side"):
        tiny_cps.encode(torch.zeros(3, 2, 65536, dtype=torch.uint8), CodingPlan())


@pytest.mark.parametrize(
    "case, message",
    [
        ("checkpoint as output", "refusing to overwrite"),
        ("folder as input", "is a folder, not a file"),
        # A pipe was called "file not found".
        ("pipe as input", "p.png is not a regular file (a device or a pipe)"),
        ("file as -d", "is a file, not a folder"),
        ("empty output name", "the output name is empty"),
        ("output ending in a separator", "names a folder, not a file"),
        (
            "output in a folder nobody can write",
            "the folder of output /proc/x.cps is not writable",
        ),
        ("-d that cannot be created", "-d /proc/out cannot be created"),
    ],
)
def test_paths_that_would_destroy_or_confuse_are_refused(
    tmp_path, checkpoint, capsys, case, message, monkeypatch
):
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    before = open(checkpoint, "rb").read()
    if case == "checkpoint as output":
        argv = ["encode", tmp_path / "in.png", checkpoint, "-p", checkpoint]
    elif case == "folder as input":
        (tmp_path / "dir.png").mkdir()
        argv = ["encode", tmp_path / "dir.png", tmp_path / "x.cps", "-p", checkpoint]
    elif case == "pipe as input":
        os.mkfifo(tmp_path / "p.png")
        argv = ["encode", tmp_path / "p.png", tmp_path / "x.cps", "-p", checkpoint]
    elif case == "file as -d":
        (tmp_path / "out").write_text("a file")
        argv = ["encode", tmp_path / "in.png", "-d", tmp_path / "out", "-p", checkpoint]
    elif case == "-d that cannot be created":
        argv = ["encode", tmp_path / "in.png", "-d", "/proc/out", "-p", checkpoint]
    else:
        target = {
            "empty output name": "",
            "output ending in a separator": f"{tmp_path}/x.cps/",
            "output in a folder nobody can write": "/proc/x.cps",
        }[case]
        argv = ["encode", tmp_path / "in.png", target, "-p", checkpoint]
    # Refused from the paths alone: the model is never loaded, nothing is coded.
    monkeypatch.setattr(
        codec, "_load", lambda args: pytest.fail("the model was loaded")
    )
    status, _, err = _run(argv, capsys)
    _one_line_error(status, err, message)
    assert open(checkpoint, "rb").read() == before


def test_decoding_to_a_name_that_is_not_png_warns_and_writes_png(
    tmp_path, checkpoint, capsys
):
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    _run(["encode", tmp_path / "in.png", tmp_path / "x.cps", "-p", checkpoint], capsys)
    status, _, err = _run(
        ["decode", tmp_path / "x.cps", tmp_path / "out.jpg", "-p", checkpoint], capsys
    )
    assert status == 0 and "out.jpg: decode writes PNG data whatever the name" in err
    assert Image.open(tmp_path / "out.jpg").format == "PNG"


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_an_existing_output_is_refused_unless_forced(
    tmp_path, checkpoint, capsys, command
):
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    source, target = tmp_path / "in.png", tmp_path / "out.bin"
    if command == "decode":
        source = tmp_path / "in.cps"
        assert (
            _run(["encode", tmp_path / "in.png", source, "-p", checkpoint], capsys)[0]
            == 0
        )
    target.write_bytes(b"keep me")
    status, _, err = _run([command, source, target, "-p", checkpoint], capsys)
    _one_line_error(status, err, f"{target} exists; pass --force to overwrite")
    assert target.read_bytes() == b"keep me"
    status, _, _ = _run([command, source, target, "-p", checkpoint, "--force"], capsys)
    assert status == 0 and target.read_bytes() != b"keep me"


def test_a_batch_with_one_existing_output_writes_none_of_them(
    tmp_path, checkpoint, capsys
):
    for number in range(3):
        Image.fromarray(_photo(seed=number)).save(tmp_path / f"p{number}.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "p2.cps").write_bytes(b"earlier")
    inputs = [tmp_path / f"p{number}.png" for number in range(3)]
    status, _, err = _run(["encode", *inputs, "-d", out, "-p", checkpoint], capsys)
    _one_line_error(status, err, "p2.cps exists; pass --force")
    assert sorted(path.name for path in out.iterdir()) == ["p2.cps"]
    assert (
        _run(["encode", *inputs, "-d", out, "-p", checkpoint, "--force"], capsys)[0]
        == 0
    )
    assert sorted(path.name for path in out.iterdir()) == ["p0.cps", "p1.cps", "p2.cps"]
    assert (out / "p2.cps").read_bytes() != b"earlier"


def test_a_patch_size_pops_cannot_stitch_is_one_error_line_without_a_warning(
    tmp_path, checkpoint, capsys
):
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    status, _, err = _run(
        [
            "encode",
            tmp_path / "in.png",
            tmp_path / "x.cps",
            "-p",
            checkpoint,
            "--patch-size",
            100,
        ],
        capsys,
    )
    _one_line_error(
        status, err, "patch size 100 must be 0 (whole image) or a positive multiple"
    )
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.cps").exists()


def test_weights_of_another_model_point_to_the_architecture_flag(tmp_path, capsys):
    """A bare state dict names no architecture, so cps is assumed; the error says how
    to name the right one, and naming it works."""
    import models

    torch.manual_seed(0)
    zoo = models.build_model("bmshj2018-factorized", N=8, M=8)
    torch.save(zoo.state_dict(), tmp_path / "zoo.pth")
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    argv = [
        "encode",
        tmp_path / "in.png",
        tmp_path / "x.cps",
        "-p",
        tmp_path / "zoo.pth",
    ]
    status, _, err = _run(argv, capsys)
    _one_line_error(status, err, "does not fit architecture 'cps'")
    assert "'cps' was assumed: name the right one (-a/--architecture" in err
    assert _run(argv + ["-a", "bmshj2018-factorized"], capsys)[0] == 0
