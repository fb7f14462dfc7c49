"""Convolutions as fixed-shape matrix products: the CPU's exact transform mode.

POPS promises that a patch computes exactly what the whole image computes at the
positions it keeps. The arithmetic must then not depend on the size of the tensor
it runs on, and oneDNN's convolutions do depend on it: they pick kernels, blockings
and Winograd tiles by shape, so the last bits of an output change with the patch.

Here every convolution of ``g_a`` and ``g_s`` becomes matrix products on the
channels-last rows of its input, and every product has exactly :data:`ROWS`
rows (the last one padded). Each output is then one fixed sequence of operations:

* a valid ``k x k`` convolution with stride 1 (the BRB's 3x3, the 1x1 layers, GDN's
  normalisation) reads its input as one (pixels, channels) matrix; the tap
  ``(dy, dx)`` is that matrix shifted by ``dy * width + dx`` rows, so the output is
  ``bias + X_0 W_0 + X_1 W_1 + ...`` accumulated tap by tap in a fixed order (rows
  that wrap past a line's end are computed and dropped);
* a ``k x k`` convolution with stride ``k`` (EDRB) is one product on the
  space-to-depth rearranged input, with ``k * k * channels`` terms per output;
* a ``k x k`` transposed convolution with stride ``k`` (EURB) is one product with
  ``k * k * out_channels`` columns, rearranged depth-to-space;
* a ``k x k`` transposed convolution with stride 1 (the BRB's second layer) is the
  valid convolution of the input zero-padded by ``k - 1`` with the flipped kernel.

A product of fixed shape runs the same BLAS kernel with the same reduction order
for every row, and a row's result does not depend on where the row sits in the
product (``tests/test_exact_convolution.py`` checks crops against whole inputs,
``tests/test_stitching.py`` whole codecs across patch plans). With MKL, products of
fewer than 8 rows take another path with other rounding, which is why the row count
is fixed rather than left to the patch. Other convolutions (dilated, grouped,
padded, other strides) run natively, with oneDNN and NNPACK off.
"""

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

# Rows of every matrix product (a pixel per row). Large enough that the per-call
# cost is small next to the product, small enough that the accumulator stays in cache
# and that the deepest layers of small patches waste little on padding: 2048 rows
# coded Kodak 2 % faster than 4096 whole-image and 9 % faster at P = 128.
ROWS = 2048

_Pair = Union[int, Sequence[int]]


def _pair(value: _Pair) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _rows(x: Tensor) -> Tensor:
    """``x`` (B, C, H, W) as a (B*H*W, C) matrix of channels-last rows."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _as_image(rows: Tensor, batch: int, height: int, width: int) -> Tensor:
    """(B*H*W, C) rows as a channels-last (B, C, H, W) tensor."""
    return rows.view(batch, height, width, -1).permute(0, 3, 1, 2)


def _products(
    inputs: Tensor,
    weights: Sequence[Tensor],
    offsets: Sequence[int],
    bias: Optional[Tensor],
    count: int,
    allocate: int = 0,
) -> Tensor:
    """``out[r] = bias + sum_t inputs[r + offsets[t]] @ weights[t]`` for ``r < count``,
    in products of exactly :data:`ROWS` rows, the taps added in the given order.

    ``inputs`` must hold ``count + max(offsets)`` rows. The result has at least
    ``allocate`` rows; those past ``count`` are left undefined.
    """
    reach = max(offsets)
    padded_count = -(-count // ROWS) * ROWS
    output = torch.empty(
        max(padded_count, allocate), weights[0].shape[1], dtype=inputs.dtype
    )
    full = count - count % ROWS
    for start in range(0, full, ROWS):
        _accumulate(output[start : start + ROWS], inputs, start, weights, offsets, bias)
    if full < count:  # the last rows, zero-padded to a whole product
        tail = inputs.new_zeros(ROWS + reach, inputs.shape[1])
        tail[: count - full + reach] = inputs[full : count + reach]
        _accumulate(output[full:padded_count], tail, 0, weights, offsets, bias)
    return output


def _accumulate(
    target: Tensor,
    inputs: Tensor,
    start: int,
    weights: Sequence[Tensor],
    offsets: Sequence[int],
    bias: Optional[Tensor],
) -> None:
    first = inputs[start + offsets[0] : start + offsets[0] + ROWS]
    if bias is None:
        torch.mm(first, weights[0], out=target)
    else:
        torch.addmm(bias, first, weights[0], out=target)
    for weight, offset in zip(weights[1:], offsets[1:]):
        target.addmm_(inputs[start + offset : start + offset + ROWS], weight)


def _stride_one(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Valid convolution, stride 1, as shifted products over the flattened rows."""
    batch, channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    out_h, out_w = height - kernel_h + 1, width - kernel_w + 1
    taps = [(dy, dx) for dy in range(kernel_h) for dx in range(kernel_w)]
    weights = [weight[:, :, dy, dx].t().contiguous() for dy, dx in taps]
    offsets = [dy * width + dx for dy, dx in taps]
    pixels = batch * height * width
    rows = _products(
        _rows(x.contiguous(memory_format=torch.channels_last)),
        weights,
        offsets,
        bias,
        pixels - offsets[-1],
        allocate=pixels,
    )
    # Row r is pixel (b, i, j) of the input grid; keep those whose window fits.
    return _as_image(rows[:pixels], batch, height, width)[:, :, :out_h, :out_w]


def _space_to_depth_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Convolution whose stride equals its kernel: one product per output pixel."""
    batch, channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    out_h, out_w = height // kernel_h, width // kernel_w
    blocks = (
        x[:, :, : out_h * kernel_h, : out_w * kernel_w]
        .permute(0, 2, 3, 1)
        .reshape(batch, out_h, kernel_h, out_w, kernel_w, channels)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(-1, kernel_h * kernel_w * channels)
    )
    matrix = weight.permute(2, 3, 1, 0).reshape(-1, out_channels)
    rows = _products(blocks, [matrix], [0], bias, blocks.shape[0])
    return _as_image(rows[: blocks.shape[0]], batch, out_h, out_w)


def _depth_to_space_transpose(
    x: Tensor, weight: Tensor, bias: Optional[Tensor]
) -> Tensor:
    """Transposed convolution whose stride equals its kernel: one product per input
    pixel, each giving a ``k x k`` block of outputs."""
    batch, _, height, width = x.shape
    _, out_channels, kernel_h, kernel_w = weight.shape
    matrix = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    block_bias = None if bias is None else bias.repeat(kernel_h * kernel_w)
    pixels = batch * height * width
    rows = _products(_rows(x), [matrix], [0], block_bias, pixels)
    image = (
        rows[:pixels]
        .view(batch, height, width, kernel_h, kernel_w, out_channels)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(batch, height * kernel_h, width * kernel_w, out_channels)
    )
    return image.permute(0, 3, 1, 2)


def _full_transpose(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Transposed convolution with stride 1: the valid convolution of the input padded
    by ``k - 1`` zeros with the flipped, transposed kernel."""
    batch, channels, height, width = x.shape
    pad_h, pad_w = weight.shape[2] - 1, weight.shape[3] - 1
    padded = x.new_zeros(batch, height + 2 * pad_h, width + 2 * pad_w, channels)
    padded[:, pad_h : pad_h + height, pad_w : pad_w + width] = x.permute(0, 2, 3, 1)
    flipped = weight.flip(2, 3).transpose(0, 1)
    return _stride_one(padded.permute(0, 3, 1, 2), flipped, bias)


def _products_apply(x: Tensor, groups: int, dilation: _Pair, padded: bool) -> bool:
    """Whether a convolution call is a form computed here: float32 CPU images, no
    groups, dilation or padding."""
    return (
        groups == 1
        and _pair(dilation) == (1, 1)
        and not padded
        and x.dim() == 4
        and x.dtype == torch.float32
        and x.device.type == "cpu"
    )


def _by_stride(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: _Pair,
    stride_one,
    stride_kernel,
) -> Optional[Tensor]:
    stride = _pair(stride)
    if stride == (1, 1):
        return stride_one(x, weight, bias)
    if stride == tuple(weight.shape[2:]):
        return stride_kernel(x, weight, bias)
    return None


def exact_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: _Pair = 1,
    padding: Union[_Pair, str] = 0,
    dilation: _Pair = 1,
    groups: int = 1,
) -> Optional[Tensor]:
    """``F.conv2d`` as fixed-shape products, or ``None`` for a form not handled here."""
    padded = padding not in (0, (0, 0), [0, 0], "valid")
    too_small = x.dim() == 4 and any(x.shape[i] < weight.shape[i] for i in (2, 3))
    if too_small or not _products_apply(x, groups, dilation, padded):
        return None  # PyTorch's own convolution, and its error for a too small input
    return _by_stride(x, weight, bias, stride, _stride_one, _space_to_depth_conv)


def exact_conv_transpose2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: _Pair = 1,
    padding: _Pair = 0,
    output_padding: _Pair = 0,
    groups: int = 1,
    dilation: _Pair = 1,
) -> Optional[Tensor]:
    """``F.conv_transpose2d`` as fixed-shape products, or ``None`` if not handled."""
    padded = _pair(padding) != (0, 0) or _pair(output_padding) != (0, 0)
    if not _products_apply(x, groups, dilation, padded):
        return None
    return _by_stride(
        x, weight, bias, stride, _full_transpose, _depth_to_space_transpose
    )


class ExactConvolutions(TorchFunctionMode):
    """Within this mode, ``F.conv2d`` and ``F.conv_transpose2d`` on the CPU run as
    fixed-shape matrix products (see the module doc); other forms run natively."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = None
        if func is F.conv2d:
            result = exact_conv2d(*args, **kwargs)
        elif func is F.conv_transpose2d:
            result = exact_conv_transpose2d(*args, **kwargs)
        return func(*args, **kwargs) if result is None else result
