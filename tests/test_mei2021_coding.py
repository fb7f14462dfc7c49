"""Layered bitstreams of the Mei et al. 2021 models.

Exactness, layer independence, container.

Random tiny models (widths 8-12) with entropy tables; images synthesised in memory,
with sides that are not multiples of 64/128 so that padding and cropping are exercised.
"""

import contextlib
import dataclasses
import zlib
from unittest import mock

import pytest
import torch

from models.base import CodingPlan
from models.mei2021.coding import decode_latents, encode_latents
from models.mei2021.network import Mei2021Quality, Mei2021Spatial
from models.mei2021.pyramid import pyramid_sizes
from utils.coding import container
from utils.coding.container import LAYERED_MAGIC, pack, truncate_layers, unpack
from utils.coding.payload import LAYERED_VERSION, BitstreamError, tensor_crc
from utils.evaluation.coders import ModelCoder
from utils.image_io import to_uint8
from utils.stitching.transforms import transform_mode


def decode_layers(model, layered, upto=None):
    """Every layer's image up to ``upto`` (all stored ones by default), base first."""
    upto = len(layered.streams) if upto is None else upto
    return [model.decode(layered, CodingPlan(layers=k)) for k in range(1, upto + 1)]


def _ready(model):
    model.eval()
    model.update(force=True)
    return model


@pytest.fixture(scope="module")
def quality():
    torch.manual_seed(0)
    return _ready(Mei2021Quality(num_filters=[8, 10, 12], lmbdas=[3.0, 2.0, 1.0]))


@pytest.fixture(scope="module")
def spatial():
    torch.manual_seed(0)
    return _ready(Mei2021Spatial(num_filters=[8, 10, 12], lmbdas=[3.0, 2.0, 1.0]))


def smooth_image(height, width, seed=0):
    """A uint8 image with structure (gradients plus a little noise)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.linspace(0, 1, height)[:, None]
    cols = torch.linspace(0, 1, width)[None, :]
    planes = torch.stack([rows * cols, (rows + cols) / 2, 1 - rows * 0.5 + 0 * cols])
    noisy = planes + 0.03 * torch.randn(3, height, width, generator=generator)
    return to_uint8(noisy)


@pytest.fixture(scope="module")
def coded_quality(quality):
    image = smooth_image(70, 90)
    layered, encoder = encode_latents(quality, image)
    return image, layered, encoder


@pytest.fixture(scope="module")
def coded_spatial(spatial):
    image = smooth_image(130, 75, seed=1)
    layered, encoder = encode_latents(spatial, image)
    return image, layered, encoder


@pytest.mark.parametrize("name", ["quality", "spatial"])
def test_encoder_and_decoder_predictions_and_latents_agree_exactly(name, request):
    model = request.getfixturevalue(name)
    _, layered, encoder = request.getfixturevalue(f"coded_{name}")
    decoder = decode_latents(model, layered)
    assert encoder["prediction"][0] is None and decoder["prediction"][0] is None
    for k in range(1, model.num_layers):
        assert torch.equal(encoder["prediction"][k], decoder["prediction"][k])
    for k in range(model.num_layers):
        assert torch.equal(encoder["y_hat"][k], decoder["y_hat"][k])
        assert torch.equal(encoder["x_hat"][k], decoder["x_hat"][k])


@pytest.mark.parametrize("name", ["quality", "spatial"])
def test_eval_forward_reproduces_the_decoded_reconstructions(name, request):
    model = request.getfixturevalue(name)
    side = model.downsampling_factor
    image = smooth_image(side, 2 * side, seed=3)
    # The coder's convolution settings.
    with transform_mode(torch.device("cpu"), exact=True):
        forward = model(image.float().div(255)[None])["x_hats"]
    decoded = decode_layers(model, model.encode(image, CodingPlan()))
    for k in range(model.num_layers):
        assert torch.equal(to_uint8(forward[k][0]), decoded[k])


@pytest.mark.parametrize("name", ["quality", "spatial"])
def test_a_container_truncated_to_k_layers_still_decodes_layers_up_to_k(name, request):
    model = request.getfixturevalue(name)
    _, layered, _ = request.getfixturevalue(f"coded_{name}")
    data = pack(layered)
    full = decode_layers(model, unpack(data))
    for keep in range(1, model.num_layers + 1):
        shorter = truncate_layers(data, keep)
        assert len(shorter) < len(data) or keep == model.num_layers
        partial = unpack(shorter)
        assert len(partial.streams) == keep
        images = decode_layers(model, partial)
        assert len(images) == keep
        assert all(torch.equal(a, b) for a, b in zip(images, full))
        with pytest.raises(ValueError, match=f"holds {keep}"):
            decode_layers(model, partial, upto=keep + 1)


def test_corrupting_a_higher_stream_leaves_lower_layers_unchanged(
    quality, coded_quality
):
    _, layered, _ = coded_quality
    reference = decode_layers(quality, layered, upto=2)
    streams = list(layered.streams)
    streams[2] = bytes(b ^ 0x5A for b in streams[2])
    damaged = type(layered)(**{**layered.__dict__, "streams": streams})
    lower = decode_layers(quality, damaged, upto=2)
    assert all(torch.equal(a, b) for a, b in zip(lower, reference))
    data = pack(damaged)
    unpack(truncate_layers(data, 2))  # the damaged layer is dropped: fine
    with pytest.raises(BitstreamError, match="CRC mismatch|differs"):
        decode_layers(quality, damaged)


def test_output_sizes_follow_the_original_image_and_the_pyramid(
    quality, spatial, coded_quality, coded_spatial
):
    image, layered, _ = coded_quality
    assert [tuple(x.shape) for x in decode_layers(quality, layered)] == [
        (3, 70, 90)
    ] * 3
    image, layered, _ = coded_spatial
    sizes = [tuple(x.shape[1:]) for x in decode_layers(spatial, layered)]
    assert sizes == pyramid_sizes(130, 75, 3) == [(33, 19), (65, 38), (130, 75)]


def test_real_rates_are_cumulative_and_close_to_the_estimate(quality, coded_quality):
    image, layered, _ = coded_quality
    coders = [ModelCoder(quality, CodingPlan(), point) for point in range(3)]
    records = [coder.code(image) for coder in coders]
    data = pack(layered)
    assert [coder.layer for coder in coders] == [0, 1, 2]
    for k, record in enumerate(records):
        assert record.bits == len(truncate_layers(data, k + 1)) * 8
        payload_bits = 8 * sum(len(s) for s in layered.streams[: k + 1])
        estimate = sum(layered.estimated_bits[: k + 1])
        assert abs(payload_bits - estimate) < 0.05 * estimate + 32 * (k + 1)
        assert record.estimated_bits == estimate
    assert records[0].bits < records[1].bits < records[2].bits


def test_spatial_layer_records_use_each_layers_own_pixels(spatial, coded_spatial):
    image, layered, _ = coded_spatial
    data = pack(layered)
    for k, (h, w) in enumerate(pyramid_sizes(130, 75, 3)):
        coder = ModelCoder(spatial, CodingPlan(), k)
        coded = coder.code(image)
        assert tuple(coder.reference_image(image).shape[1:]) == (h, w)
        assert tuple(coded.reconstruction.shape[1:]) == (h, w)
        assert coded.bits == len(truncate_layers(data, k + 1)) * 8


def test_decoding_with_other_weights_is_an_error(coded_quality):
    _, layered, _ = coded_quality
    torch.manual_seed(5)
    other = _ready(Mei2021Quality(num_filters=[8, 10, 12], lmbdas=[3.0, 2.0, 1.0]))
    with pytest.raises(BitstreamError, match="another checkpoint"):
        decode_layers(other, layered)


def test_decoding_with_the_other_mode_is_an_error(spatial, coded_quality):
    with pytest.raises(BitstreamError, match="mei2021-quality"):
        decode_layers(spatial, coded_quality[1])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: b"XXXX" + d[4:], "bad magic"),
        (lambda d: d[:4] + bytes([9]) + d[5:], "version 9"),
        (lambda d: d[:8] + bytes([d[8] ^ 1]) + d[9:], "header"),
        (lambda d: d[:-3], "incomplete"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
        (lambda d: d + b"\x00", "trailing"),
        (lambda d: d[:10], "truncated"),
    ],
)
def test_damaged_containers_are_rejected_with_a_specific_error(
    quality, coded_quality, damage, message
):
    data = pack(coded_quality[1])
    assert data[:4] == LAYERED_MAGIC
    with pytest.raises(BitstreamError, match=message):
        unpack(damage(data))


def test_a_header_with_an_impossible_layer_count_is_refused(coded_quality):
    # Forged with valid checksums, so the layer count is the only fault: three layers
    # stored for a two-layer model, and no layer at all. pack() refuses to write either.
    layered = coded_quality[1]
    for impossible in (
        dataclasses.replace(layered, total_layers=2),
        dataclasses.replace(layered, streams=[], latent_crcs=[]),
    ):
        with pytest.raises(ValueError, match="a .cpsl payload holds 1 to total_layers"):
            pack(impossible)
        layers = [
            (len(stream), zlib.crc32(stream), crc)
            for stream, crc in zip(impossible.streams, impossible.latent_crcs)
        ]
        data = container._layered_header(impossible, layers) + b"".join(
            impossible.streams
        )
        for read in (unpack, lambda data: truncate_layers(data, 1)):
            with pytest.raises(
                BitstreamError, match=r"^truncated or corrupted \.cpsl header$"
            ):
                read(data)


def test_coding_needs_eval_mode_and_entropy_tables():
    torch.manual_seed(0)
    model = Mei2021Quality(num_filters=[8, 8], lmbdas=[2.0, 1.0])
    image = smooth_image(64, 64)
    with pytest.raises(RuntimeError, match="eval mode"):
        model.encode(image, CodingPlan())
    with pytest.raises(RuntimeError, match="update"):
        model.eval().encode(image, CodingPlan())
    with pytest.raises(ValueError, match="uint8"):
        _ready(model).encode(image.float(), CodingPlan())


def test_truncate_rejects_impossible_layer_counts(quality, coded_quality):
    data = pack(coded_quality[1])
    for keep in (0, 4):
        with pytest.raises(ValueError, match="1..3"):
            truncate_layers(data, keep)


def _predictions_rounded_differently(model):
    """Patch ``model``'s predictors as on a machine whose float results differ from
    the encoder's: every prediction moves by about one float32 ulp."""
    patches = []
    for predictor in model.predictors:
        original = predictor.forward
        patches.append(
            mock.patch.object(
                predictor,
                "forward",
                side_effect=lambda x, original=original: original(x) * (1 + 2**-23),
            )
        )
    return patches


def _as_version_1(model, image):
    """The file this codec wrote before version 2.

    It has y^_k CRCs instead of coded values'.
    """
    layered, encoder = encode_latents(model, image)
    return dataclasses.replace(
        layered, version=1, latent_crcs=[tensor_crc(y) for y in encoder["y_hat"]]
    )


def test_a_machine_with_other_float_rounding_decodes_the_file(quality, coded_quality):
    """The layer CRCs cover what rANS decodes, not the float predictions, so another
    machine decodes a file to within its rounding of the encoder's reconstruction."""
    _, layered, encoder = coded_quality
    layered = unpack(pack(layered))
    assert layered.version == LAYERED_VERSION
    with contextlib.ExitStack() as stack:
        for patch in _predictions_rounded_differently(quality):
            stack.enter_context(patch)
        decoded = decode_latents(quality, layered)
    # The rounding did differ.
    assert not torch.equal(decoded["y_hat"][1], encoder["y_hat"][1])
    for ours, theirs in zip(decoded["x_hat"], encoder["x_hat"]):
        assert (ours - theirs).abs().max() < 1e-4


def test_version_1_files_decode_where_written_and_are_refused_elsewhere(quality):
    image = smooth_image(70, 90, seed=3)
    data = pack(_as_version_1(quality, image))
    assert data[4] == 1
    old = unpack(data)
    assert old.version == 1
    assert torch.equal(
        quality.decode(old, CodingPlan()),
        quality.decode(encode_latents(quality, image)[0], CodingPlan()),
    )
    assert unpack(truncate_layers(data, 2)).version == 1
    with contextlib.ExitStack() as stack:
        for patch in _predictions_rounded_differently(quality):
            stack.enter_context(patch)
        with pytest.raises(
            BitstreamError, match="version 1 file decodes on the encoder's"
        ):
            quality.decode(old, CodingPlan())


@pytest.mark.parametrize("layers", [0, 2])
def test_a_grayscale_source_decodes_to_one_channel_at_every_layer(spatial, layers):
    """Version 3 stores the grayscale flag, so a gray PNG comes back gray, as with .cps;
    a truncated file keeps the flag."""
    gray = smooth_image(70, 90, seed=4)[:1].expand(3, -1, -1).contiguous()
    data = pack(spatial.encode(gray, CodingPlan(grayscale=True, layers=layers)))
    decoded = spatial.decode(unpack(data), CodingPlan())
    colour = spatial.decode(
        spatial.encode(gray, CodingPlan(layers=layers)), CodingPlan()
    )
    assert decoded.shape[0] == 1 and colour.shape[0] == 3
    assert torch.equal(decoded, colour.float().mean(0, keepdim=True).round().byte())
    assert unpack(truncate_layers(data, 1)).grayscale


def test_version_2_files_without_a_flags_byte_still_decode(quality):
    image = smooth_image(70, 90, seed=5)
    layered = encode_latents(quality, image)[0]
    data = pack(dataclasses.replace(layered, version=2))
    assert len(data) == len(pack(layered)) - 1 and data[4] == 2
    old = unpack(data)
    assert (old.version, old.grayscale) == (2, False)
    assert torch.equal(
        quality.decode(old, CodingPlan()), quality.decode(layered, CodingPlan())
    )
    with pytest.raises(ValueError, match="cannot mark a grayscale source"):
        pack(dataclasses.replace(layered, version=2, grayscale=True))


def test_unknown_cpsl_flag_bits_are_refused(quality):
    layered = encode_latents(quality, smooth_image(70, 90, seed=6))[0]
    data = bytearray(pack(layered))
    flags_at = 15 + 1 + len(layered.architecture) + 8
    header_end = flags_at + 1 + 12 * len(layered.streams)
    data[flags_at] |= 0x80
    data[header_end : header_end + 4] = zlib.crc32(bytes(data[:header_end])).to_bytes(
        4, "big"
    )
    with pytest.raises(BitstreamError, match="unknown .cpsl flag bits"):
        unpack(bytes(data))
