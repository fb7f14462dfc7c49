"""Real bitstreams: round trips, patch-size independence and corrupted files."""

import os
import struct
import zlib
from dataclasses import replace

import pytest
import torch

import models
from models.base import CodingPlan
from utils.coding.container import pack, unpack
from utils.coding.context_coder import ContextCoder
from utils.coding.payload import BitstreamError, CompressedImage, LayeredImage
from utils.stitching.spec import PatchSpec


def _image(height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # A smooth gradient plus noise, so the rate is neither zero nor saturated.
    ramp = torch.linspace(0, 200, width).expand(3, height, width)
    noise = torch.randint(0, 40, (3, height, width), generator=generator)
    return (ramp + noise).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("size", [(150, 230), (64, 64), (1, 1), (100, 400), (300, 70)])
def test_file_and_reconstruction_do_not_depend_on_patch_sizes(tiny_cps, size):
    image = _image(*size)
    files = {
        p: pack(tiny_cps.encode(image, CodingPlan(patch=PatchSpec(p))))
        for p in (0, 128, 192)
    }
    assert len(set(files.values())) == 1, "encoder patch size changed the bitstream"
    data = files[0]
    decoded = [
        tiny_cps.decode(unpack(data), CodingPlan(patch=PatchSpec(p), batch_size=b))
        for p, b in ((0, 1), (128, 3), (256, 8))
    ]
    assert decoded[0].shape == (3, *size) and decoded[0].dtype == torch.uint8
    assert all(torch.equal(d, decoded[0]) for d in decoded)


def test_decoder_rebuilds_the_encoders_latent_exactly(tiny_cps):
    torch.manual_seed(3)
    params = torch.randn(16, 12, 20)
    y = 4 * torch.randn(8, 12, 20)
    for order in ("wavefront", "raster"):
        coder = ContextCoder(tiny_cps, order)
        string, y_hat, _ = coder.encode(y, params)
        assert torch.equal(coder.decode(string, params), y_hat)
        assert (y_hat - y).abs().max() <= 0.5 + 1e-5


def test_raster_and_wavefront_orders_give_the_same_image(tiny_cps):
    image = _image(128, 192)
    outputs = [
        tiny_cps.decode(
            unpack(pack(tiny_cps.encode(image, CodingPlan(order=order)))), CodingPlan()
        )
        for order in ("wavefront", "raster")
    ]
    assert torch.equal(outputs[0], outputs[1])


def test_rate_is_counted_from_the_file_and_matches_the_estimate(tiny_cps):
    image = _image(192, 256)
    compressed = tiny_cps.encode(image, CodingPlan())
    payload_bits = 8 * (len(compressed.y_string) + len(compressed.z_string))
    assert len(pack(compressed)) * 8 > payload_bits
    # rANS costs the likelihoods' bits plus a flush of up to 64 bits per string.
    assert (
        abs(payload_bits - compressed.estimated_bits)
        <= 0.1 * compressed.estimated_bits + 128
    )


def test_grayscale_flag_decodes_to_one_channel(tiny_cps):
    gray = _image(64, 96)[:1].expand(3, -1, -1).contiguous()
    decoded = tiny_cps.decode(
        unpack(pack(tiny_cps.encode(gray, CodingPlan(grayscale=True)))), CodingPlan()
    )
    assert decoded.shape == (1, 64, 96)


@pytest.fixture
def encoded(tiny_cps):
    return pack(tiny_cps.encode(_image(96, 128), CodingPlan()))


def test_truncated_file_is_an_error(tiny_cps, encoded):
    for cut in (3, 10, len(encoded) // 2, len(encoded) - 1):
        with pytest.raises(BitstreamError):
            unpack(encoded[:cut])


def test_corrupted_byte_is_an_error(encoded):
    corrupted = bytearray(encoded)
    corrupted[len(corrupted) // 2] ^= 0x40
    with pytest.raises(BitstreamError, match="checksum"):
        unpack(bytes(corrupted))


def test_foreign_file_is_an_error():
    with pytest.raises(BitstreamError, match="not a .cps or .cpsl file"):
        unpack(b"\x89PNG\r\n\x1a\n" + bytes(100))


def test_future_version_is_an_error(encoded):
    newer = bytearray(encoded)
    newer[4] = 99
    with pytest.raises(BitstreamError, match="version 99"):
        unpack(bytes(newer))


def test_other_checkpoint_is_an_error(encoded):
    torch.manual_seed(5)
    other = models.build_model("cps", N=8).eval()
    other.update(force=True)
    with pytest.raises(BitstreamError, match="another checkpoint"):
        other.decode(unpack(encoded), CodingPlan())


def test_desynchronised_decoder_is_an_error_not_garbage(tiny_cps, encoded):
    tampered = replace(unpack(encoded), y_hat_crc=unpack(encoded).y_hat_crc ^ 1)
    with pytest.raises(BitstreamError, match="differs from the encoder"):
        tiny_cps.decode(unpack(pack(tampered)), CodingPlan())


def test_inconsistent_header_is_an_error(tiny_cps, encoded):
    body = bytearray(encoded[:-4])
    # Bottom padding larger than the 64-pixel multiple.
    struct.pack_into(">H", body, 14, 200)
    with pytest.raises(BitstreamError, match="inconsistent size"):
        tiny_cps.decode(
            unpack(bytes(body) + struct.pack(">I", zlib.crc32(body))), CodingPlan()
        )


def test_bytes_after_the_last_string_are_an_error_even_under_a_valid_checksum(encoded):
    # Junk spliced in before the final CRC, and the CRC recomputed: only the string
    # lengths can tell that the file should have ended earlier.
    body = encoded[:-4] + b"\x00\x01\x02"
    with pytest.raises(BitstreamError, match="trailing bytes"):
        unpack(body + struct.pack(">I", zlib.crc32(body)))


def _sized(height, width, layered):
    if layered:
        return LayeredImage(
            height=height,
            width=width,
            architecture="mei2021-quality",
            fingerprint=bytes(8),
            total_layers=2,
            streams=[b"base"],
            latent_crcs=[7],
        )
    return CompressedImage(
        height=height,
        width=width,
        pad_bottom=1,
        pad_right=1,
        architecture="cps",
        fingerprint=bytes(8),
        order="raster",
        grayscale=False,
        y_hat_crc=7,
        z_string=b"z",
        y_string=b"y",
    )


def _claiming_width(data, width, layered):
    """``data`` with its header's width field set to ``width``.

    Its CRC is recomputed.
    """
    header_end = len(data) - len(b"base") if layered else len(data)
    body = bytearray(data[: header_end - 4])
    struct.pack_into(">I", body, 11 if layered else 10, width)
    return bytes(body) + struct.pack(">I", zlib.crc32(body)) + data[header_end:]


@pytest.mark.parametrize("layered", [False, True])
def test_a_side_of_65535_pixels_round_trips_and_65536_is_refused(layered):
    for height, width in ((65535, 1), (1, 65535), (65535, 65535)):
        payload = unpack(pack(_sized(height, width, layered)))
        assert (payload.height, payload.width) == (height, width)
    for height, width in ((65536, 1), (1, 65536)):
        with pytest.raises(BitstreamError, match="1 to 65535 pixels a side"):
            pack(_sized(height, width, layered))
    # The width field has room for 65536: a header that claims it is refused on reading.
    data = pack(_sized(1, 65535, layered))
    assert unpack(_claiming_width(data, 65535, layered)).width == 65535
    with pytest.raises(BitstreamError, match="1 to 65535 pixels a side"):
        unpack(_claiming_width(data, 65536, layered))


def test_bad_patch_size_is_an_error(tiny_cps):
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny_cps.encode(_image(256, 256), CodingPlan(patch=PatchSpec(200)))


def test_a_file_written_before_the_fixed_point_entropy_model_decodes_or_is_refused():
    """tests/assets/legacy_v1.cps was written with float32 entropy arithmetic and the
    exact mode's earlier native convolutions, on an AVX2 CPU (legacy_v1_decoded.png
    is its decode then). Where this CPU's float32 products match that one's, the
    decoder rebuilds the same latent and pixels within one level of that decode;
    elsewhere it must refuse the file on the latent CRC, never return a wrong image."""
    import models
    from models.base import CodingPlan
    from utils.coding.container import unpack
    from utils.coding.payload import BitstreamError
    from utils.image_io import read_image

    assets = os.path.join(os.path.dirname(__file__), "assets")
    model = models.load_checkpoint(
        os.path.join(
            os.path.dirname(os.path.dirname(__file__)),
            "experiment",
            "shipped",
            "cps_n64_lambda00035",
            "model.pth",
        ),
        device="cpu",
    )
    with open(os.path.join(assets, "legacy_v1.cps"), "rb") as handle:
        compressed = unpack(handle.read())
    assert not compressed.fixed_point
    try:
        decoded = model.decode(compressed, CodingPlan())
    except BitstreamError as error:
        assert "written before the fixed-point entropy model" in str(error)
        return
    then, _ = read_image(os.path.join(assets, "legacy_v1_decoded.png"))
    difference = (decoded.int() - then.int()).abs()
    assert decoded.shape == then.shape == (3, 96, 56)
    assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01
