"""Entropy-model arithmetic that gives the same bits on every machine.

The decoder must rebuild exactly the means and CDF indexes the encoder used, or the
rANS state desynchronises. float32 matrix products do not guarantee that across
machines: their summation order depends on the library's blocking for the CPU's
vector unit, so a file written on an AVX2 CPU failed the latent check on an AVX-512
one (``tests/test_codec.py``). Every product of the entropy model (``h_s``, the
context model, the entropy-parameter network; for Kamisli 2024 every product of its
block coder) therefore runs on a fixed-point grid, one per layer:

- the layer's inputs are clipped to ``±ACTIVATION_BOUND`` and rounded to multiples
  of ``2**-a``, its weights to multiples of ``2**-b``;
- ``a`` and ``b`` share the bits that keep every sum of products below ``2**52`` in
  units of ``2**-(a + b)`` (:func:`fraction_bits`): for the layers here about 15
  each, so inputs and weights move by about 3e-5 and 1.5e-5 at most;
- the products run as float64 matrix products: every operand, product and partial
  sum is then an integer times a power of two that float64 holds exactly, so the
  result is the exact sum whatever the summation order, blocking, thread count or
  use of fused multiply-adds, on any CPU or GPU;
- biases are added on the product grid and LeakyReLU is one IEEE multiplication,
  which every machine rounds the same way.

Integer networks make the same argument (Ballé et al., "Integer networks for data
compression with latent-variable models", ICLR 2019); this keeps the trained float
weights and rounds them when the coder is built, so training is unchanged. The
means and scales move by about 1e-4 at most from the float network's, far below
the unit quantisation step of the latent.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

ACTIVATION_BOUND = 2.0**15
# Integers up to 2**53 are exact in float64; one bit is kept for the bias sum.
_EXACT_LIMIT = 2.0**52
# Finer than float32 resolves at the bound: more input bits would buy nothing.
_MAX_INPUT_BITS = 24


def fraction_bits(weight: Tensor, bias: Optional[Tensor]) -> Tuple[int, int]:
    """(input bits ``a``, weight bits ``b``) of a layer with ``weight`` (out, in) and
    ``bias``: the largest ``a + b``, split evenly, for which every output on inputs
    within ``±ACTIVATION_BOUND`` is an integer below ``2**52`` in units of
    ``2**-(a + b)``, and so is every partial sum.

    Raises:
        ValueError: weights too large for any grid (a damaged checkpoint).
    """
    weight = weight.detach().double()
    inputs = weight.shape[1]
    row_sum = float(weight.abs().sum(1).max())
    largest_bias = (
        float(bias.detach().double().abs().max()) if bias is not None else 0.0
    )
    for total in range(2 * _MAX_INPUT_BITS, -1, -1):
        input_bits = min(_MAX_INPUT_BITS, (total + 1) // 2)
        weight_bits = total - input_bits
        input_units = ACTIVATION_BOUND * 2.0**input_bits
        # Rounding moves each weight by at most half a unit, the bias by half a step.
        products = input_units * (row_sum * 2.0**weight_bits + 0.5 * inputs)
        bias_units = largest_bias * 2.0**total + 0.5
        if products + bias_units < _EXACT_LIMIT:
            return input_bits, weight_bits
    raise ValueError(
        f"weights summing to {row_sum:.3g} per output do not fit a fixed-point grid"
    )


class GridLinear:
    """A linear layer ``x W^T + b`` computed exactly on its fixed-point grid.

    The weight may be applied in column blocks (:meth:`partial_sum`) whose integer
    sums are added before :meth:`finish`: the total is the same exact integer
    whichever blocks and order are used.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        self.input_bits, self.weight_bits = fraction_bits(weight, bias)
        self.output_scale = 2.0 ** -(self.input_bits + self.weight_bits)
        self.weight = torch.round(
            weight.detach().double().cpu() * 2.0**self.weight_bits
        )
        self.bias = (
            None
            if bias is None
            else torch.round(bias.detach().double().cpu() / self.output_scale)
        )

    def to_grid(self, values: Tensor) -> Tensor:
        """``values`` clipped to ``±ACTIVATION_BOUND`` and rounded to this layer's input
        grid, as float64 integers (multiples of one grid step)."""
        scale = 2.0**self.input_bits
        return torch.round(
            values.double().clamp(-ACTIVATION_BOUND, ACTIVATION_BOUND) * scale
        )

    def columns(self, start: int, stop: int) -> Tensor:
        """The integer weight of input columns start..stop, transposed for
        :meth:`partial_sum` (in, out)."""
        return self.weight[:, start:stop].t().contiguous()

    @staticmethod
    def partial_sum(inputs: Tensor, columns: Tensor) -> Tensor:
        """Exact integer sum of products of grid ``inputs`` (n, k) (:meth:`to_grid`)
        with weight ``columns`` (k, out) from :meth:`columns`."""
        return inputs @ columns

    def finish(self, total: Tensor, negative_slope: Optional[float] = None) -> Tensor:
        """float64 output from the summed integer products: bias, scale, and an
        optional LeakyReLU (slope 0 for ReLU)."""
        if self.bias is not None:
            total = total + self.bias
        output = total * self.output_scale
        if negative_slope is not None:
            output = torch.where(output < 0, output * negative_slope, output)
        return output

    def __call__(
        self, inputs: Tensor, negative_slope: Optional[float] = None
    ) -> Tensor:
        """The whole layer on float ``inputs`` (n, in), rounded onto the grid first."""
        return self.finish(self.to_grid(inputs) @ self.weight.t(), negative_slope)


# z_hat positions synthesised at a time (whole rows of z_hat, at least one): the
# float64 temporaries of a whole 7680x4320 image at once took 1.4 GB (N = 192); in
# chunks of 256 they take tens of MB, and the synthesis ran 1.6x faster.
CHUNK_POSITIONS = 256
# Float64 (n, 2M) arrays alive at once in the last layer of a chunk (inputs on the
# grid, the product, its scaling and the activation), for the memory planner.
CHUNK_COPIES = 4


def chunk_positions(width: int) -> int:
    """The z_hat positions :func:`hyper_synthesis` computes at a time for a z_hat
    ``width`` positions wide."""
    return max(1, CHUNK_POSITIONS // width) * width


@dataclass
class _Stage:
    """One layer of ``h_s`` on the grid: a pointwise product, which is a transposed
    convolution when ``factor`` is not (1, 1), then an optional activation."""

    linear: GridLinear
    slope: Optional[float]
    factor: Tuple[int, int]
    outputs: int


def _grid_stages(h_s: nn.Sequential) -> List[_Stage]:
    """The layers of ``h_s`` as grid products, activations folded into them.

    Raises:
        ValueError: a layer of another kind.
    """
    layers = list(h_s.children())
    stages, index = [], 0
    while index < len(layers):
        layer = layers[index]
        slope = None
        if index + 1 < len(layers) and isinstance(
            layers[index + 1], (nn.LeakyReLU, nn.ReLU)
        ):
            activation = layers[index + 1]
            slope = (
                activation.negative_slope
                if isinstance(activation, nn.LeakyReLU)
                else 0.0
            )
            index += 1
        index += 1
        if _is_pointwise_convolution(layer):
            stages.append(
                _Stage(
                    GridLinear(layer.weight[:, :, 0, 0], layer.bias),
                    slope,
                    (1, 1),
                    layer.out_channels,
                )
            )
        elif _is_block_transposed_convolution(layer):
            factor_h, factor_w = layer.stride
            # (in, out, kh, kw) -> (out*kh*kw, in): one output row per
            # (channel, offset).
            weight = layer.weight.permute(1, 2, 3, 0).reshape(-1, layer.in_channels)
            bias = (
                None
                if layer.bias is None
                else layer.bias.repeat_interleave(factor_h * factor_w)
            )
            stages.append(
                _Stage(
                    GridLinear(weight, bias),
                    slope,
                    (factor_h, factor_w),
                    layer.out_channels,
                )
            )
        else:
            raise ValueError(
                f"h_s layer {layer} has no fixed-point form (expected 1x1 "
                "convolutions and transposed convolutions with kernel = stride)"
            )
    return stages


def _run_stages(stages: List[_Stage], rows: Tensor, height: int, width: int) -> Tensor:
    """The stages on ``rows`` (height*width, C) of a height x width grid; returns the
    output rows in row-major order of the upsampled grid."""
    for stage in stages:
        rows = stage.linear(rows, stage.slope)
        factor_h, factor_w = stage.factor
        if (factor_h, factor_w) != (1, 1):
            blocks = rows.view(height, width, stage.outputs, factor_h, factor_w)
            height, width = height * factor_h, width * factor_w
            rows = blocks.permute(0, 3, 1, 4, 2).reshape(height * width, stage.outputs)
    return rows


def hyper_synthesis(h_s: nn.Sequential, z_hat: Tensor) -> Tensor:
    """``h_s(z_hat)`` for a batch of one (1, C, h, w), on the fixed-point grid.

    ``h_s`` may hold 1x1 convolutions, transposed convolutions whose kernel equals
    their stride (each input pixel fills its own output block, so the layer is one
    matrix product), each optionally followed by a LeakyReLU or ReLU. Every output
    block then depends on one z_hat pixel only, so the rows of z_hat are synthesised
    a few at a time (:data:`CHUNK_POSITIONS`) into a float32 output: the result does
    not depend on the chunking, and the float64 work stays small at any image size.
    Returns float32 (1, C', H, W) stored channels-last.

    Raises:
        ValueError: a layer of another kind.
    """
    if z_hat.dim() != 4 or z_hat.shape[0] != 1:
        raise ValueError(
            f"hyper_synthesis codes one latent (1, C, h, w), got {tuple(z_hat.shape)}"
        )
    stages = _grid_stages(h_s)
    height, width = z_hat.shape[2:]
    scale_h = math.prod(stage.factor[0] for stage in stages)
    scale_w = math.prod(stage.factor[1] for stage in stages)
    output = z_hat.new_empty(
        1, height * scale_h, width * scale_w, stages[-1].outputs, dtype=torch.float32
    )
    chunk_rows = chunk_positions(width) // width
    for top in range(0, height, chunk_rows):
        bottom = min(height, top + chunk_rows)
        rows = (
            z_hat[0, :, top:bottom].permute(1, 2, 0).reshape((bottom - top) * width, -1)
        )
        result = _run_stages(stages, rows, bottom - top, width)
        output[0, top * scale_h : bottom * scale_h] = result.view(
            (bottom - top) * scale_h, width * scale_w, -1
        )
    return output.permute(0, 3, 1, 2)


def _is_pointwise_convolution(layer: nn.Module) -> bool:
    return (
        type(layer) is nn.Conv2d
        and layer.kernel_size == (1, 1)
        and layer.stride == (1, 1)
        and layer.groups == 1
        and layer.padding == (0, 0)
        and layer.dilation == (1, 1)
    )


def _is_block_transposed_convolution(layer: nn.Module) -> bool:
    return (
        type(layer) is nn.ConvTranspose2d
        and layer.kernel_size == layer.stride
        and layer.groups == 1
        and layer.padding == (0, 0)
        and layer.output_padding == (0, 0)
        and layer.dilation == (1, 1)
    )
