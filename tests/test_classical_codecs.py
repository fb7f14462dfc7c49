"""Classical codecs: real files, decoded back, rate and quality moving the right way.

JPEG and WebP (Pillow) always run; the others run where their library or tool exists
(``.ci/run`` installs ffmpeg and libjxl-tools).
"""

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, features

from utils.evaluation.classical_codecs import CODECS, get_codec
from utils.evaluation.metrics import psnr


def photo_like(height=67, width=91):
    """Smooth shading plus a few sharp edges and deterministic texture, odd sides."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.arange(height, dtype=torch.float32)[:, None]
    cols = torch.arange(width, dtype=torch.float32)[None, :]
    base = torch.stack(
        [60 + rows + cols, 200 - rows + 0 * cols, 90 + 0.5 * cols + 0 * rows]
    )
    base[:, 20:45, 30:60] += 50
    texture = torch.randint(-12, 13, (3, height, width), generator=generator)
    return (base + texture).clamp(0, 255).to(torch.uint8)


def available(name):
    try:
        get_codec(name)
    except RuntimeError:
        return False
    return True


# (codec, qualities from worst to best)
SWEEPS = {
    "jpeg": [10, 50, 95],
    "webp": [10, 50, 95],
    "jpeg2000": [80, 20, 4],
    "avif": [10, 50, 95],
    "x265": [45, 30, 10],
    "jxl": [20, 60, 95],
}
MAGIC = {
    "jpeg": b"\xff\xd8",
    "webp": b"RIFF",
    "jpeg2000": b"\xff\x4f\xff\x51",
    "jxl": b"\xff\x0a",
}


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_better_quality_costs_more_bytes_and_gives_higher_psnr(name):
    if name not in ("jpeg", "webp") and not available(name):
        pytest.skip(f"{name} is not available here")
    codec = get_codec(name)
    image = photo_like()
    results = [codec.code(image, quality) for quality in SWEEPS[name]]
    sizes = [len(r.data) for r in results]
    quality = [psnr(image, r.reconstruction) for r in results]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    assert quality == sorted(quality) and quality[0] > 15
    for result in results:
        assert result.reconstruction.dtype == torch.uint8
        assert result.reconstruction.shape == image.shape
        assert result.encoding_time >= 0 and result.decoding_time >= 0
        if name in MAGIC:
            assert result.data.startswith(MAGIC[name])


@pytest.mark.parametrize("name", ["jpeg", "webp"])
def test_the_reconstruction_is_what_pillow_decodes_from_the_returned_bytes(name):
    image = photo_like()
    result = get_codec(name).code(image, 40)
    with Image.open(io.BytesIO(result.data)) as picture:
        decoded = torch.from_numpy(np.asarray(picture.convert("RGB")).copy())
    assert torch.equal(decoded.permute(2, 0, 1), result.reconstruction)


def test_jpeg_xl_at_quality_100_is_lossless():
    if not available("jxl"):
        pytest.skip("cjxl/djxl not installed (apt-get install libjxl-tools)")
    image = photo_like()
    assert torch.equal(get_codec("jxl").code(image, 100).reconstruction, image)


def test_jpeg_xl_codes_at_the_lowest_quality_its_scale_allows():
    if not available("jxl"):
        pytest.skip("cjxl/djxl not installed (apt-get install libjxl-tools)")
    # Below it cjxl fails with "Setting frame distance failed" (distance above 25).
    lowest = CODECS["jxl"].scale.low
    assert get_codec("jxl").code(photo_like(), lowest).data.startswith(MAGIC["jxl"])


def test_x265_at_qp_0_is_near_lossless():
    if not available("x265"):
        pytest.skip("ffmpeg not installed (apt-get install ffmpeg)")
    image = photo_like()
    assert psnr(image, get_codec("x265").code(image, 0).reconstruction) > 45


@pytest.mark.parametrize(
    "name, quality, match",
    [
        ("jpeg", 0, "outside 1..100"),
        ("jpeg", 50.5, "must be an integer"),
        ("webp", 101, "outside 0..100"),
        ("x265", 52, "outside 0..51"),
        ("jxl", 4, "outside 4.05..100"),
        ("jpeg2000", 0.5, "compression ratio"),
    ],
)
def test_qualities_outside_the_codec_scale_are_refused(name, quality, match):
    codec = CODECS[name]
    with pytest.raises(ValueError, match=match):
        codec.scale.check(name, quality)


def test_an_unknown_codec_is_refused_with_the_list():
    with pytest.raises(ValueError, match="choose from jpeg, webp"):
        get_codec("bpg")


@pytest.mark.parametrize("name, package", [("x265", "ffmpeg"), ("jxl", "libjxl-tools")])
def test_a_missing_tool_names_its_debian_package(monkeypatch, name, package):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match=f"apt-get install {package}"):
        get_codec(name)


def test_a_pillow_build_without_the_format_is_reported(monkeypatch):
    monkeypatch.setattr(features, "check", lambda feature: False)
    with pytest.raises(RuntimeError, match="Pillow built with avif support"):
        get_codec("avif")


@pytest.mark.parametrize("height, width", [(16, 15), (9, 32)])
def test_x265_refuses_an_image_below_its_smallest_side_in_one_line(height, width):
    """ffmpeg/libx265 failed on such pictures with its own multi-part message."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    with pytest.raises(ValueError) as error:
        CODECS["x265"].code(image, 30)
    assert str(error.value) == (
        f"x265 codes images of 16 pixels a side or more, not {width}x{height}"
    )


@pytest.mark.parametrize(
    "name, largest",
    [("jpeg", 65500), ("webp", 16383), ("avif", 32768)],
)
def test_a_side_beyond_the_library_limit_is_refused_in_one_line(name, largest):
    """libwebp and libjpeg failed in their own words; libavif wrote a file it could
    not read back. The largest side still codes and decodes."""
    if not available(name):
        pytest.skip(f"{name} is not available")
    coded = CODECS[name].code(torch.zeros(3, 2, largest, dtype=torch.uint8), 50)
    assert coded.reconstruction.shape == (3, 2, largest)
    with pytest.raises(ValueError) as error:
        CODECS[name].code(torch.zeros(3, largest + 1, 2, dtype=torch.uint8), 50)
    assert str(error.value) == (
        f"{name} codes images of at most {largest} pixels a side, not 2x{largest + 1}"
    )


def test_avif_refuses_more_pixels_than_its_decoder_reads():
    with pytest.raises(ValueError, match="avif codes images of at most 268435456 "):
        CODECS["avif"].sizes.check("avif", 16385, 16384)
    CODECS["avif"].sizes.check("avif", 16384, 16384)


@pytest.mark.skipif(not available("x265"), reason="needs ffmpeg")
def test_x265_refuses_a_thin_image_too_long_for_its_coding_tree_units():
    """libx265 failed with ffmpeg's 'maybe incorrect parameters such as ... width or
    height' on a picture under 32 pixels high and over 4216 wide."""
    image = torch.zeros(3, 16, 4216, dtype=torch.uint8)
    assert CODECS["x265"].code(image, 30).reconstruction.shape == image.shape
    with pytest.raises(ValueError) as error:
        CODECS["x265"].code(torch.zeros(3, 4217, 31, dtype=torch.uint8), 30)
    assert str(error.value) == (
        "x265 codes an image with a side under 32 pixels only up to 4216 pixels "
        "long, not 31x4217"
    )
    CODECS["x265"].sizes.check("x265", 32, 8192)  # a wider tree unit codes it


@pytest.mark.parametrize("name", ["jpeg", "x265"])
@pytest.mark.parametrize(
    "image",
    [torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8)],
    ids=["batched", "float"],
)
def test_every_codec_refuses_what_is_not_a_uint8_rgb_image(name, image):
    with pytest.raises(ValueError, match=r"expected a uint8 tensor \(3, H, W\), got"):
        CODECS[name].code(image, 30)


@pytest.mark.parametrize("limit", [1000, 4000])
@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_a_reconstruction_over_pils_bomb_limit_is_decoded_without_a_word(
    name, limit, monkeypatch, recwarn
):
    """test.py reads an image of any size the budget allows (over PIL's
    decompression-bomb limit of about 179 Mpx too), but decoded the codec's own file
    under that limit: a 26000x26000 image ended in a DecompressionBombError traceback,
    and one over the limit alone in a warning about an attack. The limit is lowered
    here so that a small image crosses it (twice over: the error; once: the warning)."""
    if name not in ("jpeg", "webp") and not available(name):
        pytest.skip(f"{name} is not available here")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    image = photo_like()  # 6097 pixels
    result = get_codec(name).code(image, SWEEPS[name][1])
    assert result.reconstruction.shape == image.shape
    assert not [w for w in recwarn if w.category is Image.DecompressionBombWarning]
    assert Image.MAX_IMAGE_PIXELS == limit  # lifted for the decode only
