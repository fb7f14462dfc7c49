"""The fixed-point entropy arithmetic: exact sums, so files decode on any machine.

A machine with other vector units sums a product's terms in another order. These
tests stand in for such a machine by summing in other orders on purpose, and check
that the fixed-point results, and so the files, do not change a bit.
"""

import os

import pytest
import torch
from torch import nn

import models
from models.base import CodingPlan
from utils.coding import fixed_point
from utils.coding.container import pack, unpack
from utils.coding.fixed_point import ACTIVATION_BOUND, GridLinear, hyper_synthesis
from utils.image_io import read_image

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
SHIPPED = os.path.join(
    os.path.dirname(os.path.dirname(__file__)),
    "experiment",
    "shipped",
    "cps_n64_lambda00035",
    "model.pth",
)


def _layer(outputs=48, inputs=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(outputs, inputs, generator=generator) / inputs**0.5
    bias = torch.randn(outputs, generator=generator)
    return weight, bias, generator


def _reversed_blocked_sum(inputs, columns):
    """The same integer sum in another order: column blocks of 7, last block first."""
    total = torch.zeros(inputs.shape[0], columns.shape[1], dtype=torch.float64)
    for start in reversed(range(0, inputs.shape[1], 7)):
        total = total + inputs[:, start : start + 7] @ columns[start : start + 7]
    return total


def test_a_layer_gives_the_same_bits_in_any_summation_order():
    weight, bias, generator = _layer()
    layer = GridLinear(weight, bias)
    inputs = layer.to_grid(torch.randn(64, 96, generator=generator) * 10)
    whole = GridLinear.partial_sum(inputs, layer.columns(0, 96))
    permutation = torch.randperm(96, generator=generator)
    permuted = inputs[:, permutation] @ layer.columns(0, 96)[permutation]
    split = GridLinear.partial_sum(
        inputs[:, 50:], layer.columns(50, 96)
    ) + GridLinear.partial_sum(inputs[:, :50], layer.columns(0, 50))
    for other in (permuted, split, _reversed_blocked_sum(inputs, layer.columns(0, 96))):
        assert torch.equal(layer.finish(other, 0.01), layer.finish(whole, 0.01))
    # The integer sums are the exact ones.
    exact = inputs.long() @ layer.columns(0, 96).long()
    assert torch.equal(whole.long(), exact)


def test_sums_stay_exact_at_the_largest_inputs():
    """Inputs at the clipping bound with the signs of the weights give the largest
    sums the grid allows; they must still be exact float64 integers."""
    weight, bias, _ = _layer(outputs=8, inputs=1024)
    weight[0] *= 50
    layer = GridLinear(weight, bias)
    inputs = layer.to_grid(torch.sign(weight) * ACTIVATION_BOUND * 4)  # clipped
    assert inputs.abs().max() == ACTIVATION_BOUND * 2**layer.input_bits
    totals = (inputs * layer.weight).sum(1, dtype=torch.float64) + layer.bias
    exact = (inputs.long() * layer.weight.long()).sum(1) + layer.bias.long()
    assert totals.abs().max() < 2**53
    assert torch.equal(totals.long(), exact)


def test_a_layer_follows_the_float_layer_to_grid_precision():
    weight, bias, generator = _layer()
    inputs = torch.randn(64, 96, generator=generator) * 3
    expected = inputs.double() @ weight.double().t() + bias.double()
    layer = GridLinear(weight, bias)
    assert layer.input_bits >= 14 and layer.weight_bits >= 14
    # Rounding moves each input and weight by at most half a step of its grid, the
    # bias by half a step of the output grid.
    input_error, weight_error = (
        2.0 ** -(layer.input_bits + 1),
        2.0 ** -(layer.weight_bits + 1),
    )
    bound = (
        inputs.double().abs().sum(1, keepdim=True) * weight_error
        + weight.double().abs().sum(1) * input_error
        + 96 * input_error * weight_error
        + layer.output_scale / 2
    )
    error = (layer(inputs) - expected).abs()
    assert torch.all(error <= bound) and error.max() < 1e-3
    leaky = torch.nn.functional.leaky_relu(layer(inputs), 0.01)
    assert torch.equal(layer(inputs, 0.01), leaky)


def test_weights_too_large_for_any_grid_are_an_error():
    with pytest.raises(ValueError, match="fixed-point grid"):
        GridLinear(torch.full((2, 4), 1e30), None)


def test_hyper_synthesis_equals_h_s_to_grid_precision(tiny_cps):
    z_hat = torch.round(torch.randn(1, tiny_cps.N, 3, 5) * 4)
    with torch.no_grad():
        expected = tiny_cps.h_s(z_hat)
    params = hyper_synthesis(tiny_cps.h_s, z_hat)
    assert params.shape == expected.shape and params.dtype == torch.float32
    assert params.permute(0, 2, 3, 1).is_contiguous()
    assert (params - expected).abs().max() < 1e-2


@pytest.mark.parametrize("chunk", [1, 12, 10**9])
def test_hyper_synthesis_does_not_depend_on_its_chunks(tiny_cps, monkeypatch, chunk):
    """One z_hat row at a time, several rows, or all at once: the same bits (a large
    image is synthesised in chunks to bound its float64 work)."""
    z_hat = torch.round(torch.randn(1, tiny_cps.N, 7, 5) * 4)
    whole = hyper_synthesis(tiny_cps.h_s, z_hat)
    monkeypatch.setattr(fixed_point, "CHUNK_POSITIONS", chunk)
    assert (
        fixed_point.chunk_positions(5) == {1: 5, 12: 10, 10**9: 10**9 // 5 * 5}[chunk]
    )
    assert torch.equal(hyper_synthesis(tiny_cps.h_s, z_hat), whole)


def test_hyper_synthesis_names_a_layer_it_cannot_run():
    with pytest.raises(ValueError, match="no fixed-point form"):
        hyper_synthesis(nn.Sequential(nn.Conv2d(4, 4, 3)), torch.zeros(1, 4, 5, 5))


def _image(height=96, width=80, seed=0):
    generator = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(
        torch.rand(1, 3, height // 8, width // 8, generator=generator) * 255,
        size=(height, width),
        mode="bilinear",
    )
    return smooth[0].round().to(torch.uint8)


def test_a_decoder_that_sums_in_another_order_rebuilds_the_file(tiny_cps, monkeypatch):
    """Stand-in for a machine with other vector units: the decoder's every sum of
    products runs in another order. The latent check passes and the image is the
    same; the float32 products of files without the flag could not promise this."""
    image = _image()
    data = pack(tiny_cps.encode(image, CodingPlan()))
    assert unpack(data).fixed_point
    reference = tiny_cps.decode(unpack(data), CodingPlan())
    monkeypatch.setattr(GridLinear, "partial_sum", staticmethod(_reversed_blocked_sum))
    monkeypatch.setattr(
        fixed_point.GridLinear,
        "__call__",
        lambda self, inputs, slope=None: self.finish(
            _reversed_blocked_sum(self.to_grid(inputs), self.weight.t()), slope
        ),
    )
    assert torch.equal(tiny_cps.decode(unpack(data), CodingPlan()), reference)
    # And an encoder summing in that order writes the same file.
    assert pack(tiny_cps.encode(image, CodingPlan())) == data


def test_a_file_written_on_another_machine_decodes():
    """tests/assets/fixed_point_v1.cps was written on an AVX-512 CPU with the shipped
    N=64 model, fixed_point_v1_decoded.png is its decode there. Any machine rebuilds
    its latent exactly (the CRC passes); the synthesis transform's float arithmetic
    may move pixels by one level."""
    model = models.load_checkpoint(SHIPPED, device="cpu")
    with open(os.path.join(ASSETS, "fixed_point_v1.cps"), "rb") as handle:
        decoded = model.decode(unpack(handle.read()), CodingPlan())
    then, _ = read_image(os.path.join(ASSETS, "fixed_point_v1_decoded.png"))
    difference = (decoded.int() - then.int()).abs()
    assert decoded.shape == then.shape
    assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01
