"""The context coder's arithmetic: from a front's context windows and hyper-decoder
params to its scales and means, in float32 or on the fixed-point grid.

A front's computation has two halves (see ``utils/coding/context_coder.py``): the
*far part* (taps that read fronts older than the previous one, and the params half
of the first 1x1 convolution), which a worker thread may compute ahead, and the rest
(*near* taps, then the entropy-parameter network). Both classes here split the
same way and differ only in number format:

- :class:`FixedPointNetwork` (files with the fixed-point flag, all CPS files written
  now): exact integer sums on the grid of ``utils/coding/fixed_point.py``, so every
  machine derives the same means and CDF indexes;
- :class:`Float32Network` (files written before the flag): float32 products in the
  order those files were written with, bit for bit; such files decode where the
  encoder's float32 products are reproduced exactly (the same kind of CPU).
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.coding.fixed_point import GridLinear

# (weight (out, in), bias, LeakyReLU slope or None) of one 1x1 convolution.
LinearLayer = Tuple[Tensor, Tensor, Optional[float]]


def linear_layers(entropy_parameters: nn.Module) -> List[LinearLayer]:
    """The entropy-parameter network as float32 CPU GEMM operands, one per 1x1
    convolution; anything else than 1x1 convolutions each optionally followed by
    one LeakyReLU/ReLU is refused."""
    layers: List[list] = []
    for module in entropy_parameters.children():
        if (
            isinstance(module, nn.Conv2d)
            and module.kernel_size == (1, 1)
            and module.groups == 1
            and module.stride == (1, 1)
            and module.bias is not None
        ):
            weight = module.weight.detach().cpu().float()[:, :, 0, 0].contiguous()
            layers.append([weight, module.bias.detach().cpu().float(), None])
        elif (
            isinstance(module, (nn.LeakyReLU, nn.ReLU))
            and layers
            and layers[-1][2] is None
        ):
            layers[-1][2] = (
                module.negative_slope if isinstance(module, nn.LeakyReLU) else 0.0
            )
        else:
            raise ValueError(
                f"entropy_parameters layer {module} is not supported by the context "
                "coder (expected 1x1 convolutions with bias, each optionally followed "
                "by one LeakyReLU/ReLU)"
            )
    if not layers:
        raise ValueError("entropy_parameters has no 1x1 convolution")
    return [tuple(layer) for layer in layers]


class Float32Network:
    """float32 arithmetic, as files without the fixed-point flag were written.

    Args:
        context_weight: the context convolution's causal taps, (2M, taps, M).
        context_bias: (2M,).
        layers: the entropy-parameter 1x1 convolutions; the first reads
            ``cat(params, context)``.
        hyper_width: the number of params channels (2M).
    """

    def __init__(
        self,
        context_weight: Tensor,
        context_bias: Tensor,
        layers: List[LinearLayer],
        hyper_width: int,
    ):
        self.context_weight = context_weight
        self.context_bias = context_bias
        first_weight, self.first_bias, self.first_slope = layers[0]
        self.hyper_weight = first_weight[:, :hyper_width].contiguous()
        self.first_context_weight = first_weight[:, hyper_width:].contiguous()
        self.layers = layers[1:]

    def tap_weights(self, taps: Sequence[int]) -> Tensor:
        """The context weight of ``taps`` for windows gathered tap-major,
        (2M, taps*M)."""
        outputs = self.context_weight.shape[0]
        return self.context_weight[:, list(taps)].reshape(outputs, -1).contiguous()

    def far_part(
        self, far_windows: Tensor, far_weight: Tensor, front_params: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """The far taps' context plus bias, and the params half of the first 1x1
        convolution plus its bias."""
        return (
            F.linear(far_windows, far_weight, self.context_bias),
            F.linear(front_params, self.hyper_weight, self.first_bias),
        )

    def scales_and_means(
        self, near_windows: Tensor, near_weight: Tensor, partial: Tuple[Tensor, Tensor]
    ) -> Tuple[Tensor, Tensor]:
        """float32 scales and means (n, M) of a front, given its far part."""
        partial_context, partial_hidden = partial
        context = torch.addmm(partial_context, near_windows, near_weight.t())
        hidden = torch.addmm(partial_hidden, context, self.first_context_weight.t())
        if self.first_slope is not None:
            hidden = F.leaky_relu(hidden, self.first_slope)
        for weight, bias, slope in self.layers:
            hidden = F.linear(hidden, weight, bias)
            if slope is not None:
                hidden = F.leaky_relu(hidden, slope)
        scales, means = hidden.chunk(2, dim=1)
        return scales, means


class FixedPointNetwork:
    """Exact fixed-point arithmetic (``utils/coding/fixed_point.py``); the same
    arguments as :class:`Float32Network`. The far and near taps, and the params and
    context halves of the first convolution, are integer partial sums of one
    :class:`~utils.coding.fixed_point.GridLinear` each, so splitting them changes
    nothing."""

    def __init__(
        self,
        context_weight: Tensor,
        context_bias: Tensor,
        layers: List[LinearLayer],
        hyper_width: int,
    ):
        outputs, taps, channels = context_weight.shape
        self.channels = channels
        self.context = GridLinear(
            context_weight.reshape(outputs, taps * channels), context_bias
        )
        first_weight, first_bias, self.first_slope = layers[0]
        self.first = GridLinear(first_weight, first_bias)
        self.hyper_columns = self.first.columns(0, hyper_width)
        self.context_columns = self.first.columns(hyper_width, first_weight.shape[1])
        self.layers = [
            (GridLinear(weight, bias), slope) for weight, bias, slope in layers[1:]
        ]

    def tap_weights(self, taps: Sequence[int]) -> Tensor:
        """The integer context weight of ``taps``, (taps*M, 2M)."""
        blocks = [
            self.context.columns(tap * self.channels, (tap + 1) * self.channels)
            for tap in taps
        ]
        if not blocks:
            return self.context.weight.new_zeros(0, self.context.weight.shape[0])
        return torch.cat(blocks)

    def far_part(
        self, far_windows: Tensor, far_weight: Tensor, front_params: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """Integer sums of the far taps and of the params half of the
        first convolution."""
        return (
            GridLinear.partial_sum(self.context.to_grid(far_windows), far_weight),
            GridLinear.partial_sum(
                self.first.to_grid(front_params), self.hyper_columns
            ),
        )

    def scales_and_means(
        self, near_windows: Tensor, near_weight: Tensor, partial: Tuple[Tensor, Tensor]
    ) -> Tuple[Tensor, Tensor]:
        """float32 scales and means (n, M) of a front, given its far part."""
        partial_context, partial_hidden = partial
        context_sum = partial_context + GridLinear.partial_sum(
            self.context.to_grid(near_windows), near_weight
        )
        context = self.context.finish(context_sum)
        hidden_sum = partial_hidden + GridLinear.partial_sum(
            self.first.to_grid(context), self.context_columns
        )
        hidden = self.first.finish(hidden_sum, self.first_slope)
        for layer, slope in self.layers:
            hidden = layer(hidden, slope)
        scales, means = hidden.float().chunk(2, dim=1)
        return scales, means
