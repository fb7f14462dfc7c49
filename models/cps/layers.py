"""Padding-free building blocks of the CPS network (Zhang et al. 2025, Sec. II.B-C).

Every convolution here is "valid" (no padding), so a block's output at a position
depends only on a fixed window of its input. That locality is what lets POPS cut an
image into overlapping patches and stitch their features back exactly.

Each block declares the (kernel, stride) list of its longest path in
``pops_layers``; ``utils.stitching.geometry`` reads these lists to compute the
receptive field and the overlap.

Module and attribute names follow the authors' checkpoints key for key, so their
published weights load without renaming.
"""

from typing import Optional, Tuple

from compressai.entropy_models import EntropyBottleneck
from compressai.layers import GDN, MaskedConv2d
from torch import Tensor, nn


class EDRB(nn.Module):
    """Even-sized down-sampling residual block (Fig. 3a): halves H and W.

    .. code-block:: none

        x ─┬─ conv2x2/2 ─ LReLU ─ conv1x1 ─ GDN ─(+)─►
           └──────────── conv2x2/2 ─────────────┘
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=2, stride=2)
        self.leaky_relu = nn.LeakyReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=1)
        self.gdn = GDN(out_ch)
        self.skip = nn.Conv2d(in_ch, out_ch, kernel_size=2, stride=2)
        # conv1 sets the geometry: conv2 and GDN are pointwise,
        # the skip is conv1's twin.
        self.pops_layers = ((self.conv1.kernel_size[0], self.conv1.stride[0]),)

    def forward(self, x: Tensor) -> Tensor:
        out = self.gdn(self.conv2(self.leaky_relu(self.conv1(x))))
        return out + self.skip(x)


class EURB(nn.Module):
    """Even-sized up-sampling residual block (Fig. 3a): doubles H and W.

    .. code-block:: none

        x ─┬─ tconv2x2/2 ─ LReLU ─ conv1x1 ─ IGDN ─(+)─►
           └──────────── tconv2x2/2 ──────────────┘
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.subpel_conv = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
        self.leaky_relu = nn.LeakyReLU(inplace=True)
        self.conv = nn.Conv2d(out_ch, out_ch, kernel_size=1)
        self.igdn = GDN(out_ch, inverse=True)
        self.upsample = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.igdn(self.conv(self.leaky_relu(self.subpel_conv(x))))
        return out + self.upsample(x)


class BRB(nn.Module):
    """Bottleneck residual block (Fig. 3b): size-preserving for any input size.

    A valid k x k convolution shrinks each side by k - 1 and a k x k transposed
    convolution (stride 1) grows it back, so the block deepens the network without
    padding. With the paper's k = 3 each output depends on a 5x5 input window, which
    is why POPS needs an overlap; k = 1 (the Table II ablation) is pointwise.

    .. code-block:: none

        x ─┬─ convKxK ─ LReLU ─ tconvKxK ─ LReLU ─(+)─►
           └────────── identity (or conv1x1) ──────┘
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=kernel_size)
        self.leaky_relu = nn.LeakyReLU(inplace=True)
        self.conv2 = nn.ConvTranspose2d(out_ch, out_ch, kernel_size=kernel_size)
        self.skip = nn.Conv2d(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else None
        self.pops_layers = ((kernel_size, 1), (kernel_size, 1))

    def forward(self, x: Tensor) -> Tensor:
        out = self.leaky_relu(self.conv2(self.leaky_relu(self.conv1(x))))
        identity = x if self.skip is None else self.skip(x)
        return out + identity


class CausalConv2d(MaskedConv2d):
    """CompressAI's 'A'-type masked convolution that never modifies its weight.

    ``MaskedConv2d.forward`` multiplies ``weight.data`` by the mask in place, so the
    stored weights change on the first call (and a model's fingerprint with them).
    Here the mask is applied on the fly; gradients of masked taps are zero.
    Parameter and buffer names (``weight``, ``bias``, ``mask``) are unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class CapturableEntropyBottleneck(EntropyBottleneck):
    """CompressAI's ``EntropyBottleneck`` with a forward pass a CUDA graph can capture.

    CompressAI 1.2.8 builds the axis permutation of ``forward`` as a tensor on the
    input's device: a host-to-device copy, then a read-back per axis when it is
    used, both of which stop CUDA graph capture (``TrainStep(cuda_graph=True)``).
    This forward computes the same values with the permutation as plain integers.
    Parameters, buffers, coding and the auxiliary loss are inherited unchanged.
    """

    def forward(
        self, x: Tensor, training: Optional[bool] = None
    ) -> Tuple[Tensor, Tensor]:
        if training is None:
            training = self.training
        # (B, C, ...) <-> (C, B, ...); its own inverse.
        swap = (1, 0, *range(2, x.dim()))
        channels_first = x.permute(*swap).contiguous()
        shape = channels_first.shape
        values = channels_first.reshape(shape[0], 1, -1)
        mode = "noise" if training else "dequantize"
        outputs = self.quantize(values, mode, self._get_medians())
        likelihood = self._likelihood(outputs)[0]
        if self.use_likelihood_bound:
            likelihood = self.likelihood_lower_bound(likelihood)
        return (
            outputs.reshape(shape).permute(*swap).contiguous(),
            likelihood.reshape(shape).permute(*swap).contiguous(),
        )
