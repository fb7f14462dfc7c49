"""utils.image_io.read_image on the files PIL reads wrongly or refuses: 16-bit samples
in every container, EXIF orientations, colour models, sizes over PIL's limit.

Every odd file is built here, byte by byte where PIL cannot write it, and each
expected value comes from a closed form (``round(v / 257)``) or from PIL's own
reference (``ImageOps.exif_transpose``) on an 8-bit twin of the file.
"""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from utils.coding.payload import MAX_SIDE
from utils.image_io import image_size, read_image

SCALED = "16-bit samples scaled to 8 bits"
ALPHA = "alpha channel dropped"
TURNED = "rotated or flipped as its EXIF orientation says"


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + data))
    return struct.pack(">I", len(data)) + kind + data + crc


def _rows(samples: np.ndarray, depth: int) -> bytes:
    """PNG scanlines (filter 0) of samples (H, W) or (H, W, C) at ``depth`` bits."""
    height = samples.shape[0]
    flat = samples.reshape(height, -1)
    if depth == 16:
        lines = [row.astype(">u2").tobytes() for row in flat]
    elif depth == 8:
        lines = [row.astype(np.uint8).tobytes() for row in flat]
    else:  # 1, 2 or 4 bits: packed from the most significant bit, rows padded
        per_byte = 8 // depth
        width = -(-flat.shape[1] // per_byte) * per_byte
        padded = np.zeros((height, width), np.int64)
        padded[:, : flat.shape[1]] = flat
        shifts = 8 - depth * np.arange(1, per_byte + 1)
        packed = (padded.reshape(height, -1, per_byte) << shifts).sum(axis=2)
        lines = [row.astype(np.uint8).tobytes() for row in packed]
    return b"".join(b"\x00" + line for line in lines)


def _png(path, samples, depth, colour_type, before=(), after=(), size=None):
    """Write a PNG of ``samples`` with chunks ``before`` and ``after`` its IDAT
    ((kind, data) pairs); ``size`` (width, height) overrides the header's size."""
    height, width = size[::-1] if size else samples.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + b"".join(_chunk(kind, data) for kind, data in before)
        + _chunk(b"IDAT", zlib.compress(_rows(samples, depth)))
        + b"".join(_chunk(kind, data) for kind, data in after)
        + _chunk(b"IEND", b"")
    )


def _rounded(samples: np.ndarray) -> np.ndarray:
    return np.round(samples / 257).astype(np.uint8)


def _hwc(image) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


# 16-bit values whose high byte (what PIL keeps) differs from round(v / 257).
WIDE = np.array([[200, 32767, 65535, 383], [128, 384, 65407, 1000]], np.uint16)


def test_sixteen_bit_gray_with_alpha_png_is_rounded_gray_without_alpha(tmp_path):
    """PIL opens PNG colour type 4 at 16 bits as RGBA of one byte a sample."""
    alpha = np.full_like(WIDE, 65535 - 7)
    _png(tmp_path / "la16.png", np.stack([WIDE, alpha], axis=-1), 16, 4)
    image, info = read_image(str(tmp_path / "la16.png"))
    assert info.grayscale and info.conversions == [ALPHA, SCALED]
    assert np.array_equal(_hwc(image), np.repeat(_rounded(WIDE)[..., None], 3, -1))


def test_sixteen_bit_gray_png_without_alpha_is_rounded_gray(tmp_path):
    _png(tmp_path / "l16.png", WIDE, 16, 0)
    image, info = read_image(str(tmp_path / "l16.png"))
    assert info.grayscale and info.conversions == [SCALED]
    assert np.array_equal(image[0].numpy(), _rounded(WIDE))


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_low_bit_depth_gray_and_palette_pngs_read_exactly(tmp_path, depth):
    levels = 2**depth
    samples = np.arange(3 * 5).reshape(3, 5) % levels
    _png(tmp_path / "gray.png", samples, depth, 0)
    image, info = read_image(str(tmp_path / "gray.png"))
    assert info.grayscale and info.conversions == []
    assert np.array_equal(image[1].numpy(), samples * (255 // (levels - 1)))
    colours = np.random.default_rng(depth).integers(0, 256, (levels, 3), np.uint8)
    before = [(b"PLTE", colours.tobytes())]
    _png(tmp_path / "palette.png", samples, depth, 3, before=before)
    image, info = read_image(str(tmp_path / "palette.png"))
    assert not info.grayscale and info.conversions == ["palette converted to RGB"]
    assert np.array_equal(_hwc(image), colours[samples])


@pytest.mark.parametrize(
    "planar, channels", [("contig", 3), ("separate", 3), ("contig", 4)]
)
def test_sixteen_bit_rgb_tiff_is_rounded_as_png_is(tmp_path, planar, channels):
    """PIL keeps the high byte of contiguous samples and reads planar ones as 8-bit
    samples; TIFF and PNG now give the same picture and the same notes."""
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 65536, (6, 5, channels)).astype(np.uint16)
    samples[0, :4, 0] = WIDE[0]
    stored = samples if planar == "contig" else np.moveaxis(samples, -1, 0)
    extra = {"extrasamples": [2]} if channels == 4 else {}
    tifffile.imwrite(
        tmp_path / "c16.tif", stored, photometric="rgb", planarconfig=planar, **extra
    )
    image, info = read_image(str(tmp_path / "c16.tif"))
    assert np.array_equal(_hwc(image), _rounded(samples[..., :3]))
    assert info.conversions == [ALPHA] * (channels == 4) + [SCALED]
    _png(tmp_path / "c16.png", samples, 16, {3: 2, 4: 6}[channels])
    as_png, png_info = read_image(str(tmp_path / "c16.png"))
    assert np.array_equal(as_png, image) and png_info.conversions == info.conversions


def test_sixteen_bit_ppm_is_rounded_and_reported(tmp_path):
    samples = np.stack([WIDE, WIDE[::-1], WIDE[:, ::-1]], axis=-1)
    header = b"P6 4 2 65535\n"
    (tmp_path / "c16.ppm").write_bytes(header + samples.astype(">u2").tobytes())
    image, info = read_image(str(tmp_path / "c16.ppm"))
    assert np.array_equal(_hwc(image), _rounded(samples))
    assert info.conversions == [SCALED]


def test_sixteen_bit_sgi_colour_is_refused_not_truncated(tmp_path):
    """PIL reads it keeping each sample's high byte; nothing here reads it exactly."""
    header = struct.pack(">hbbHHHHll", 474, 0, 2, 3, 4, 2, 3, 0, 65535)
    planes = np.stack([WIDE, WIDE, WIDE])[:, ::-1]  # SGI stores the bottom row first
    body = header.ljust(512, b"\x00") + planes.astype(">u2").tobytes()
    (tmp_path / "c16.sgi").write_bytes(body)
    for reader in (image_size, read_image):
        with pytest.raises(ValueError, match="c16.sgi: 16-bit colour samples of SGI"):
            reader(str(tmp_path / "c16.sgi"))


def _exif(orientation) -> bytes:
    """EXIF holding one orientation tag (an int as SHORT, a str as ASCII, as a
    camera may write it wrongly), with the prefix of a JPEG's APP1 segment."""
    if isinstance(orientation, str):
        entry = struct.pack(">HHI4s", 0x0112, 2, 2, orientation.encode() + b"\x00\x00")
    else:
        entry = struct.pack(">HHIH2x", 0x0112, 3, 1, orientation)
    return b"Exif\x00\x00MM\x00\x2a" + struct.pack(">IH", 8, 1) + entry + b"\x00" * 4


def _photo(height=3, width=5) -> np.ndarray:
    return (np.arange(height * width * 3).reshape(height, width, 3) * 5).astype(
        np.uint8
    )


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_the_image_as_pil_does(tmp_path, orientation):
    Image.fromarray(_photo()).save(tmp_path / "o.png", exif=_exif(orientation))
    with Image.open(tmp_path / "o.png") as opened:
        expected = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    image, info = read_image(str(tmp_path / "o.png"))
    assert np.array_equal(_hwc(image), expected)
    assert info.conversions == [TURNED] * (orientation != 1)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("where", ["before", "after"])
def test_sixteen_bit_colour_png_is_turned_by_its_exif(tmp_path, orientation, where):
    """The 16-bit decoder skipped the orientation; an eXIf chunk may follow the
    pixels, where PIL finds it only by decoding them."""
    photo = _photo()
    Image.fromarray(photo).save(tmp_path / "o8.png", exif=_exif(orientation))
    chunks = {where: [(b"eXIf", _exif(orientation)[6:])]}  # no prefix in PNG
    _png(tmp_path / "o16.png", photo.astype(np.uint16) * 257, 16, 2, **chunks)
    expected, expected_info = read_image(str(tmp_path / "o8.png"))
    image, info = read_image(str(tmp_path / "o16.png"))
    assert np.array_equal(image, expected)
    assert info.conversions == expected_info.conversions + [SCALED]


def test_sixteen_bit_animated_png_reports_its_frames(tmp_path):
    photo = _photo().astype(np.uint16) * 257
    control = struct.pack(">IIIIIHHBB", 0, 5, 3, 0, 0, 1, 10, 0, 0)
    after = [
        (b"fcTL", struct.pack(">I", 1) + control[4:]),
        (b"fdAT", struct.pack(">I", 2) + zlib.compress(_rows(photo[::-1], 16))),
    ]
    before = [(b"acTL", struct.pack(">II", 2, 0)), (b"fcTL", control)]
    _png(tmp_path / "anim16.png", photo, 16, 2, before=before, after=after)
    image, info = read_image(str(tmp_path / "anim16.png"))
    assert info.conversions == ["the first of its 2 frames coded", SCALED]
    assert np.array_equal(_hwc(image), _photo())


@pytest.mark.parametrize("value", [0, 9, "6"])
def test_an_invalid_exif_orientation_is_ignored_and_says_so(tmp_path, value):
    """It printed "rotated or flipped" and turned nothing."""
    Image.fromarray(_photo()).save(tmp_path / "bad.jpg", exif=_exif(value))
    image, info = read_image(str(tmp_path / "bad.jpg"))
    assert image.shape == (3, 3, 5)
    assert info.conversions == [f"EXIF orientation {value!r} is not 1 to 8, so ignored"]


@pytest.mark.parametrize(
    "mode, name", [("CMYK", "c.jpg"), ("CMYK", "c.tif"), ("YCbCr", "y.tif")]
)
def test_other_colour_models_are_converted_to_rgb_with_a_note(tmp_path, mode, name):
    picture = Image.fromarray(_photo()).convert(mode)
    picture.save(tmp_path / name)
    with Image.open(tmp_path / name) as opened:
        assert opened.mode == mode
        expected = np.asarray(opened.convert("RGB"))
    image, info = read_image(str(tmp_path / name))
    assert info.conversions == [f"{mode} colours converted to RGB"]
    assert np.array_equal(_hwc(image), expected)


def test_an_image_over_pil_pixel_limit_is_sized_from_its_header(tmp_path):
    """20000x20000 (400 Mpx) is over PIL's decompression-bomb refusal (179 Mpx) but
    within the .cps limits; the header alone is read, so no pixel data is needed."""
    _png(tmp_path / "big.png", np.zeros((1, 1)), 1, 0, size=(20000, 20000))
    assert image_size(str(tmp_path / "big.png")) == (20000, 20000)


def test_pil_pixel_limit_does_not_decide_and_is_restored(tmp_path, monkeypatch):
    """A limit far under the image stands for the 179 Mpx a test cannot decode."""
    Image.fromarray(_photo(40, 30)).save(tmp_path / "in.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    image, info = read_image(str(tmp_path / "in.png"))
    assert np.array_equal(_hwc(image), _photo(40, 30)) and info.conversions == []
    assert image_size(str(tmp_path / "in.png")) == (30, 40)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_a_side_over_the_container_limit_is_refused_from_the_header(tmp_path):
    """Only a header: decoding would fail with another message."""
    path = tmp_path / "wide.png"
    _png(path, np.zeros((1, 1)), 1, 0, size=(MAX_SIDE + 1, 8))
    for reader in (image_size, read_image):
        with pytest.raises(ValueError) as caught:
            reader(str(path))
        assert str(caught.value) == (
            f"cannot read image {path}: a {MAX_SIDE + 1}x8 image does not fit the "
            f".cps/.cpsl formats, which hold 1 to {MAX_SIDE} pixels a side"
        )


def test_an_unreadable_file_is_named_once_in_its_error(tmp_path):
    """PIL's own message named the file again."""
    (tmp_path / "text.png").write_text("not an image")
    for reader in (image_size, read_image):
        with pytest.raises(ValueError) as caught:
            reader(str(tmp_path / "text.png"))
        message = str(caught.value)
        assert message == (
            f"cannot read image {tmp_path / 'text.png'}: "
            "not an image file of a format PIL reads"
        )


def _interlaced_png(path, samples, colour_type):
    """A 16-bit PNG of ``samples`` in the seven Adam7 passes (PIL writes none)."""
    height, width = samples.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 1)
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4))
    passes += ((0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    data = b"".join(
        _rows(samples[row::row_step, column::column_step], 16)
        for column, row, column_step, row_step in passes
        if column < width and row < height
    )
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(data))
        + _chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("size", [(5, 7), (1, 1), (9, 2), (16, 17)])
def test_an_interlaced_sixteen_bit_png_reads_as_its_samples(tmp_path, size):
    """Its data length, summed over the Adam7 passes, passes the length check."""
    samples = np.random.default_rng(3).integers(0, 65536, (*size, 3), dtype=np.uint16)
    _interlaced_png(tmp_path / "i16.png", samples, 2)
    image, info = read_image(str(tmp_path / "i16.png"))
    assert np.array_equal(_hwc(image), _rounded(samples))
    assert info.conversions == [SCALED]


@pytest.mark.parametrize("colour_type", [2, 4, 6])
def test_a_sixteen_bit_png_with_too_little_image_data_is_refused(tmp_path, colour_type):
    """Complete chunks, but data for 2 of 50 rows: libpng only warns, and torchvision
    then crashed the whole process (a segmentation fault) instead of an error."""
    channels = {2: 3, 4: 2, 6: 4}[colour_type]
    samples = np.zeros((2, 70, channels), np.uint16)
    path = tmp_path / "short.png"
    _png(path, samples, 16, colour_type, size=(70, 50))
    needed = 50 * (1 + 70 * 2 * channels)
    with pytest.raises(ValueError) as caught:
        read_image(str(path))
    assert str(caught.value) == (
        f"cannot read image {path}: the image data holds "
        f"{2 * (1 + 70 * 2 * channels)} of the {needed} bytes its header says "
        "(a damaged or truncated file)"
    )


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_a_tiff_that_pil_would_scramble_is_refused(tmp_path, orientation):
    """PIL 13 gives an uncompressed grayscale TIFF turned a quarter by its EXIF
    orientation the turned size but the stored data: refused, never scrambled (a PIL
    that reads it must give what the PNG with the same tag gives)."""
    samples = np.arange(35, dtype=np.uint8).reshape(5, 7)
    Image.fromarray(samples).save(tmp_path / "twin.png", exif=_exif(orientation))
    expected, _ = read_image(str(tmp_path / "twin.png"))
    path = tmp_path / "turned.tif"
    Image.fromarray(samples).save(path, tiffinfo={0x0112: orientation})
    try:
        image, _ = read_image(str(path))
    except ValueError as exc:
        assert "PIL misreads this TIFF file" in str(exc)
    else:
        assert np.array_equal(image.numpy(), expected.numpy())
