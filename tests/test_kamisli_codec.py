"""Real bitstreams of the Kamisli (2024) codec.

Bit-exact decoding, wavefront == raster.
"""

import copy
import dataclasses
import json
import os

import pytest
import torch
import yaml

from models.base import CodingPlan
from models.kamisli2024.coding import BlockCoder
from models.kamisli2024.layers import from_blocks, to_blocks
from models.kamisli2024.network import Kamisli2024
from utils.coding.container import pack, unpack
from utils.coding.payload import BitstreamError

KERNELS = {"KS3111": [3, 1, 1, 1], "KS3311": [3, 3, 1, 1]}


def coding_model(kernel_sizes, seed=0, block_size=4, spread=True):
    """A tiny random model; with ``spread`` its latents cost real bits (y spans
    dozens of quantisation steps, scales about 10)."""
    torch.manual_seed(seed)
    model = Kamisli2024(
        block_size=block_size, N=8, M=4, kernel_sizes=kernel_sizes
    ).eval()
    if spread:
        with torch.no_grad():
            model.g_a[-1].weight.mul_(100)
            model.entropy_parameters[-1].weight.mul_(0.1)
            model.entropy_parameters[-1].bias[: model.M] = 10.0
    model.update(force=True)
    return model


def image(height, width, seed=1):
    torch.manual_seed(seed)
    smooth = torch.nn.functional.interpolate(
        torch.rand(1, 3, 4, 4),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    )
    return (smooth + 0.1 * torch.rand(1, 3, height, width)).clamp(0, 1)


def grid(model, x):
    return to_blocks(model.pad_to_blocks(x) - 0.5, model.block_size)[0]


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("order", ["wavefront", "raster"])
def test_decoder_rebuilds_the_encoders_latent_and_reconstruction_bit_for_bit(
    name, order
):
    model = coding_model(KERNELS[name])
    x = image(21, 30)
    coder = BlockCoder(model, order)
    string, y_hat, reconstruction, bits = coder.encode(grid(model, x))
    assert len(string) > 50  # the test model really codes something
    decoded_y, decoded = BlockCoder(model, order).decode(string, 6, 8)
    assert torch.equal(decoded_y, y_hat)
    assert torch.equal(decoded, reconstruction)
    # the public API: crop back to the original size, values in [0, 1]
    payload = model.compress(x, order=order)
    assert payload.string == string and (payload.height, payload.width) == (21, 30)
    x_hat = model.decompress(payload)["x_hat"]
    expected = (from_blocks(reconstruction[None], 4) + 0.5)[:, :, :21, :30]
    assert x_hat.shape == (1, 3, 21, 30) and torch.equal(x_hat, expected)
    assert 0 <= float(x_hat.min()) and float(x_hat.max()) <= 1
    # the rate estimate is the real rate to within rANS overhead
    assert abs(8 * len(string) - bits) < 0.02 * bits + 64


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_wavefront_decode_equals_the_block_by_block_decode(name):
    model = coding_model(KERNELS[name], seed=3)
    x = image(32, 44, seed=4)
    wave = model.compress(x, order="wavefront")
    raster = model.compress(x, order="raster")
    assert wave.y_hat_crc == raster.y_hat_crc
    assert abs(len(wave.string) - len(raster.string)) <= 4  # same symbols, other order
    assert torch.equal(
        model.decompress(wave)["x_hat"], model.decompress(raster)["x_hat"]
    )


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_the_codec_reconstructs_what_the_training_forward_computes_in_closed_loop(name):
    """The per-block codec and the padded whole-grid forward agree (to float rounding):
    the codec pads intermediate features with zeros at the frame border, as the
    training forward does. (An unscaled model: float differences of about 1e-7 must
    not move y - means across a rounding boundary.)"""
    model = coding_model(KERNELS[name], seed=5, spread=False)
    x = image(22, 27, seed=6)
    payload = model.compress(x)
    decoded = model.decompress(payload)["x_hat"]
    closed = model.closed_loop(x, tile_blocks=0, context_bits=None)
    assert torch.allclose(closed["x_hat"], decoded, atol=1e-5)
    closed_bits = float(-closed["likelihoods"]["y"].log2().sum())
    assert closed_bits == pytest.approx(payload.estimated_bits, rel=1e-3)


def test_changing_one_image_block_never_changes_an_earlier_decoded_block():
    model = coding_model(KERNELS["KS3311"], seed=7)
    x = image(24, 28, seed=8)
    coder = BlockCoder(model)
    _, y_hat, reconstruction, _ = coder.encode(grid(model, x))
    order = torch.arange(6 * 7).reshape(6, 7)
    for q in [(1, 5), (3, 0), (4, 3)]:
        x2 = x.clone()
        block = (
            slice(None),
            slice(None),
            slice(4 * q[0], 4 * q[0] + 4),
            slice(4 * q[1], 4 * q[1] + 4),
        )
        x2[block] = 1 - x2[block]
        _, y_hat2, reconstruction2, _ = coder.encode(grid(model, x2))
        earlier = order < q[0] * 7 + q[1]
        assert torch.equal(y_hat[:, earlier], y_hat2[:, earlier])
        assert torch.equal(reconstruction[:, earlier], reconstruction2[:, earlier])
        assert not torch.equal(y_hat[:, ~earlier], y_hat2[:, ~earlier])


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_every_block_depends_only_on_earlier_fronts(name):
    model = coding_model(KERNELS[name])
    coder = BlockCoder(model)
    rows, cols = 64, 96  # a Kodak image at B = 8
    fronts = list(coder.fronts(rows, cols))
    assert len(fronts) == model.wavefront_slope * (rows - 1) + cols == 222
    assert len(list(BlockCoder(model, "raster").fronts(rows, cols))) == rows * cols
    step = torch.full((rows, cols), -1)
    for t, (r, c) in enumerate(fronts):
        assert torch.all(step[r, c] == -1)
        step[r, c] = t
    assert torch.all(step >= 0)
    for di, dj in model.context_reach():
        i, j = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        inside = (i + di >= 0) & (j + dj >= 0) & (j + dj < cols)
        assert torch.all(step[(i + di)[inside], (j + dj)[inside]] < step[inside])


def test_streams_from_another_model_or_with_a_wrong_checksum_are_refused():
    model = coding_model(KERNELS["KS3111"])
    payload = model.compress(image(16, 16))
    other = coding_model(KERNELS["KS3111"], seed=11)
    with pytest.raises(BitstreamError, match="CRC"):
        other.decompress(payload)
    payload.y_hat_crc ^= 1
    with pytest.raises(BitstreamError, match="CRC"):
        model.decompress(payload)


def test_cps_files_round_trip_and_their_size_is_the_rate():
    """The ``.cps`` container path (what codec.py and test.py call).

    A header + one string.
    """
    model = coding_model(KERNELS["KS3311"], seed=14)
    x = image(21, 30, seed=15)
    pixels = x.mul(255).round().to(torch.uint8)[0]
    compressed = model.encode(pixels, CodingPlan(order="raster"))
    data = pack(compressed)
    assert (compressed.pad_bottom, compressed.pad_right) == (
        3,
        2,
    ) and compressed.z_string == b""
    # fixed fields 18, name 1 + 11, fingerprint 8, CRCs 4 + 4, two string lengths 4 + 4
    assert len(data) == 54 + len(compressed.y_string)
    decoded = model.decode(unpack(data), CodingPlan())
    expected = model.decompress(
        model.compress(pixels[None].float() / 255, order="raster")
    )["x_hat"]
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 21, 30)
    assert torch.equal(decoded, expected[0].mul(255).round().to(torch.uint8))
    # A grayscale image, as read_image gives it.
    one_plane = pixels[:1].expand(3, -1, -1)
    gray, colour = (
        model.decode(unpack(pack(model.encode(one_plane, plan))), CodingPlan())
        for plan in (CodingPlan(grayscale=True), CodingPlan())
    )
    assert gray.shape == (1, 21, 30)
    assert torch.equal(gray[0], colour.float().mean(0).round().to(torch.uint8))
    with pytest.raises(BitstreamError, match="another checkpoint"):
        coding_model(KERNELS["KS3311"], seed=16).decode(unpack(data), CodingPlan())
    with pytest.raises(BitstreamError, match="hyperprior string"):
        model.decode(dataclasses.replace(unpack(data), z_string=b"z"), CodingPlan())
    with pytest.raises(ValueError, match="uint8 RGB"):
        model.encode(pixels.float(), CodingPlan())


def test_bad_requests_are_one_line_errors():
    model = coding_model(KERNELS["KS3111"])
    with pytest.raises(ValueError, match="one RGB image"):
        model.compress(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="unknown block coding order"):
        model.compress(torch.rand(1, 3, 8, 8), order="zigzag")
    fresh = Kamisli2024(block_size=4, N=8, M=4)
    with pytest.raises(RuntimeError, match="update"):
        fresh.compress(torch.rand(1, 3, 8, 8))


def test_the_benchmark_times_both_orders_and_checks_they_agree(tmp_path):
    from benchmarks import kamisli_decoding

    # A preset shrunk to N=8, M=4: the benchmark reads it as train.py does.
    preset = os.path.join(
        os.path.dirname(os.path.dirname(__file__)),
        "configs",
        "kamisli_B4_KS3311_N512M96.yaml",
    )
    config = tmp_path / "tiny.yaml"
    with open(preset, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    raw["train_params"]["N"], raw["model"]["kwargs"]["M"] = 8, 4
    config.write_text(yaml.safe_dump(raw))
    output = tmp_path / "bench.json"
    assert (
        kamisli_decoding.main(
            [
                "--config",
                str(config),
                "--size",
                "40x22",
                "--reference-rows",
                "2",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    (run,) = json.loads(output.read_text())["runs"]
    assert run["grid"] == [6, 10] and run["wavefront_slope"] == 2
    assert (
        run["wavefront"]["steps"] == 2 * 5 + 10 and run["block_by_block"]["steps"] == 60
    )
    assert run["block_by_block"]["extrapolated_from_blocks"] == 20
    assert run["reconstructions_identical"] and run["decode_speedup"] > 0
    with pytest.raises(SystemExit):
        kamisli_decoding.parse_args(["--size", "40by22"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_stream_written_by_a_cuda_model_decodes_on_the_cpu():
    """The coder copies the weights to the CPU: the model's device changes nothing."""
    model = coding_model(KERNELS["KS3311"], seed=12)
    on_gpu = copy.deepcopy(model).cuda()
    x = image(20, 28, seed=13)
    payload = on_gpu.compress(x.cuda())
    assert payload.string == model.compress(x).string
    assert torch.equal(
        model.decompress(payload)["x_hat"], on_gpu.decompress(payload)["x_hat"]
    )


def _reversed_blocked_call(self, inputs, negative_slope=None):
    """GridLinear's layer with its sums taken in another order: blocks of 5 columns,
    last block first (what another machine's BLAS might do)."""
    grid_inputs, weight = self.to_grid(inputs), self.weight.t()
    total = torch.zeros(grid_inputs.shape[0], weight.shape[1], dtype=torch.float64)
    for start in reversed(range(0, grid_inputs.shape[1], 5)):
        total = total + grid_inputs[:, start : start + 5] @ weight[start : start + 5]
    return self.finish(total, negative_slope)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_a_decoder_that_sums_in_another_order_rebuilds_the_file(name, monkeypatch):
    from utils.coding.fixed_point import GridLinear

    model = coding_model(KERNELS[name])
    x = image(21, 30)
    payload = model.compress(x)
    assert payload.fixed_point
    expected = model.decompress(payload)["x_hat"]
    monkeypatch.setattr(GridLinear, "__call__", _reversed_blocked_call)
    assert torch.equal(model.decompress(payload)["x_hat"], expected)
    assert model.compress(x).string == payload.string


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_files_written_with_float32_products_still_decode_in_either_order(name):
    model = coding_model(KERNELS[name])
    x = grid(model, image(21, 30))
    results = {}
    for order in ("wavefront", "raster"):
        string, y_hat, reconstruction, _ = BlockCoder(
            model, order, fixed_point=False
        ).encode(x)
        decoded_y, decoded = BlockCoder(model, order, fixed_point=False).decode(
            string, 6, 8
        )
        assert torch.equal(decoded_y, y_hat) and torch.equal(decoded, reconstruction)
        results[order] = y_hat, reconstruction
    assert torch.equal(results["wavefront"][0], results["raster"][0])
    assert torch.equal(results["wavefront"][1], results["raster"][1])
