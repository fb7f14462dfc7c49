"""Autoregressive entropy coding of the latent ``y`` (Minnen et al. 2018 context model).

CompressAI's ``mbt2018`` visits the latent one position at a time. A position's
context only reads the positions its masked convolution marks causal; with the 5x5
mask these are rows i-2, i-1 (columns j-2..j+2) and (i, j-2), (i, j-1). Numbering the
positions ``t = a*i + j`` with the smallest slope ``a`` for which every causal tap has
a smaller ``t`` (:func:`wavefront_slope`, a = 3 for the 5x5 mask) makes all positions
with the same ``t`` independent, so they are coded together: ``a*(H-1) + W`` steps
instead of ``H*W``.

Both orders share one implementation: a *front* is a set of positions coded in one
step; ``raster`` order has one position per front (the reference), ``wavefront``
order one skewed diagonal per front (the default). The encoder and the decoder run
exactly the same operations on tensors of exactly the same shapes, front by front,
on the CPU in float32 with one thread, so the means and CDF indexes they compute are
bit-identical. Bitstream order: fronts in increasing ``t``, positions within a front
by increasing row, channels innermost.
"""

import contextlib
from typing import Iterator, List, Tuple

import torch
from torch import Tensor, nn

from compressai.ans import BufferedRansEncoder, RansDecoder

ORDERS = ("wavefront", "raster")


def causal_taps(mask: Tensor) -> List[Tuple[int, int]]:
    """(row, column) offsets from the centre that the context mask lets through."""
    taps = mask[0, 0]
    centre_row, centre_col = taps.shape[0] // 2, taps.shape[1] // 2
    return [(int(i) - centre_row, int(j) - centre_col) for i, j in torch.nonzero(taps)]


def wavefront_slope(taps: List[Tuple[int, int]]) -> int:
    """Smallest integer ``a >= 1`` such that ``a*di + dj < 0`` for every causal tap.

    Then position (i, j) only reads positions with a smaller ``t = a*i + j``.
    """
    slope = 1
    for di, dj in taps:
        if di > 0 or (di == 0 and dj >= 0):
            raise ValueError(f"context tap {(di, dj)} is not causal in raster order")
        if di < 0:
            slope = max(slope, dj // -di + 1)
    return slope


def scan_fronts(height: int, width: int, order: str, slope: int) -> Iterator[Tuple[Tensor, Tensor]]:
    """Yield (rows, cols) index tensors of the positions coded together, in order."""
    if order == "raster":
        for i in range(height):
            for j in range(width):
                yield torch.tensor([i]), torch.tensor([j])
    elif order == "wavefront":
        all_rows = torch.arange(height)
        for t in range(slope * (height - 1) + width):
            cols = t - slope * all_rows
            keep = (cols >= 0) & (cols < width)
            yield all_rows[keep], cols[keep]
    else:
        raise ValueError(f"unknown entropy coder order {order!r}; choose from {ORDERS}")


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run float code with one thread, so reductions happen in one fixed order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ContextCoder:
    """Codes ``y`` given the hyper-decoder output ``params`` with a joint AR model.

    Args:
        model: a CPU model with ``context_prediction`` (a ``MaskedConv2d``),
            ``entropy_parameters`` (1x1 convolutions) and an updated
            ``gaussian_conditional``.
        order: ``"wavefront"`` or ``"raster"``.
    """

    def __init__(self, model: nn.Module, order: str = "wavefront"):
        if order not in ORDERS:
            raise ValueError(f"unknown entropy coder order {order!r}; choose from {ORDERS}")
        context = model.context_prediction
        self.order = order
        self.taps = causal_taps(context.mask)
        self.slope = wavefront_slope(self.taps)
        self.pad = context.kernel_size[0] // 2
        rows = torch.tensor([di for di, _ in self.taps]) + self.pad
        cols = torch.tensor([dj for _, dj in self.taps]) + self.pad
        # Only the causal taps of the weight: (2M, M * taps), ordered channel-major.
        self.weight = context.weight.detach()[:, :, rows, cols].reshape(context.out_channels, -1)
        self.bias = context.bias.detach()
        self.tap_rows, self.tap_cols = rows - self.pad, cols - self.pad
        self.entropy_parameters = model.entropy_parameters
        self.conditional = model.gaussian_conditional
        self.cdfs = self.conditional.quantized_cdf.tolist()
        self.cdf_lengths = self.conditional.cdf_length.reshape(-1).int().tolist()
        self.offsets = self.conditional.offset.reshape(-1).int().tolist()

    def _front_parameters(self, y_hat: Tensor, params: Tensor, rows: Tensor,
                          cols: Tensor) -> Tuple[Tensor, Tensor]:
        """Indexes and means (n, M) for the positions (rows, cols) of one front."""
        window_rows = rows[:, None] + self.tap_rows + self.pad
        window_cols = cols[:, None] + self.tap_cols + self.pad
        windows = y_hat[:, window_rows, window_cols]            # (M, n, taps)
        windows = windows.permute(1, 0, 2).reshape(len(rows), -1)
        context = torch.addmm(self.bias, windows, self.weight.t())  # (n, 2M)
        hyper = params[:, rows, cols].t()                      # (n, 2M)
        features = torch.cat((hyper, context), dim=1)[:, :, None, None]
        scales, means = self.entropy_parameters(features)[:, :, 0, 0].chunk(2, 1)
        return self.conditional.build_indexes(scales), means

    def _positions(self, shape: Tuple[int, int]) -> Iterator[Tuple[Tensor, Tensor]]:
        return scan_fronts(shape[0], shape[1], self.order, self.slope)

    @torch.inference_mode()
    def encode(self, y: Tensor, params: Tensor) -> Tuple[bytes, Tensor]:
        """Code ``y`` (M, H, W) given ``params`` (2M, H, W); return (string, y_hat)."""
        y, params = y.float().cpu(), params.float().cpu()
        height, width = y.shape[1:]
        y_hat = torch.zeros(y.shape[0], height + 2 * self.pad, width + 2 * self.pad)
        symbols, indexes = [], []
        with single_threaded():
            for rows, cols in self._positions((height, width)):
                front_indexes, means = self._front_parameters(y_hat, params, rows, cols)
                values = self.conditional.quantize(y[:, rows, cols].t(), "symbols", means)
                y_hat[:, rows + self.pad, cols + self.pad] = self.conditional.dequantize(values, means).t()
                symbols.append(values.reshape(-1))
                indexes.append(front_indexes.reshape(-1))
        encoder = BufferedRansEncoder()
        encoder.encode_with_indexes(torch.cat(symbols).tolist(), torch.cat(indexes).tolist(),
                                    self.cdfs, self.cdf_lengths, self.offsets)
        return encoder.flush(), y_hat[:, self.pad:self.pad + height, self.pad:self.pad + width]

    @torch.inference_mode()
    def decode(self, string: bytes, params: Tensor) -> Tensor:
        """Rebuild y_hat (M, H, W) from ``string`` and ``params`` (2M, H, W)."""
        params = params.float().cpu()
        height, width = params.shape[1:]
        channels = params.shape[0] // 2
        y_hat = torch.zeros(channels, height + 2 * self.pad, width + 2 * self.pad)
        decoder = RansDecoder()
        decoder.set_stream(string)
        with single_threaded():
            for rows, cols in self._positions((height, width)):
                front_indexes, means = self._front_parameters(y_hat, params, rows, cols)
                values = decoder.decode_stream(front_indexes.reshape(-1).tolist(), self.cdfs,
                                               self.cdf_lengths, self.offsets)
                values = torch.tensor(values, dtype=torch.int32).reshape(means.shape)
                y_hat[:, rows + self.pad, cols + self.pad] = self.conditional.dequantize(values, means).t()
        return y_hat[:, self.pad:self.pad + height, self.pad:self.pad + width]
