"""Real bitstreams for the Kamisli (2024) block-based codec, decoded wavefront
by wavefront.

Decoding is inherently sequential: block (i, j) needs the reconstructions of the
blocks its masks reach. The published codec therefore visits the (H/B)*(W/B) blocks
one at a time (6144 steps for a Kodak image at B = 8). The masks only reach blocks
above (up to the upper right) and to the left, so with the slope ``a`` that
:meth:`Kamisli2024.wavefront_slope` derives from the masks, every block a block
depends on has a smaller ``t = a*i + j``. All blocks with the same ``t`` (one skewed
diagonal, a *front*) are therefore coded in one batched step: ``a*(R-1) + K`` steps
for an R x K block grid (222 instead of 6144 for Kodak at B = 8, a = 2).

.. code-block:: none

    per front (rows, cols):   z_hat (reconstructed blocks, zero outside the frame)
        psi = entropy_parameters(z_hat at the reach)  -> scales, means -> CDF indexes
        encoder only: y = g_a(x block, z_hat) ; symbols = round(y - means)
        decoder only: symbols <- rANS(indexes)
        y_hat = symbols + means ; x_hat = clamp(g_s(y_hat, z_hat), -0.5, 0.5) -> z_hat

The networks run at the front's positions only, on the CPU, laid out so that encoder
and decoder compute every number bit for bit alike in either order
(:mod:`models.kamisli2024.row_networks`); this module schedules the fronts and codes
the symbols.

Bitstream: one rANS string; fronts in increasing ``t``, blocks within a front by
increasing row, the M latent channels of a block innermost.
"""

import copy
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch
from compressai.ans import BufferedRansEncoder, RansDecoder
from torch import Tensor, nn

from models.kamisli2024.row_networks import (
    CodingState,
    Front,
    RowNetwork,
    cpu_float32,
    front_slots,
)
from utils.coding import ORDERS
from utils.coding.rans import safe_string
from utils.coding.scan_order import coding_order
from utils.coding.threads import single_threaded


@dataclass
class BlockPayload:
    """A compressed image: what :meth:`Kamisli2024.compress` returns.

    Attributes:
        string: the rANS bytes of all blocks.
        height, width: the original image size (the grid is padded to multiples of B).
        order: ``"wavefront"`` or ``"raster"``, the order the string was written in.
        y_hat_crc: CRC-32 of the encoder's dequantised latent, checked by the decoder.
        estimated_bits: the likelihood estimate of the string's length (not stored).
        fixed_point: the products ran on the fixed-point grid
            (:mod:`models.kamisli2024.row_networks`).
    """

    string: bytes
    height: int
    width: int
    order: str
    y_hat_crc: int
    estimated_bits: float = float("nan")
    fixed_point: bool = True


class BlockCoder:
    """Entropy codes a block grid with a
    :class:`~models.kamisli2024.network.Kamisli2024`.

    Args:
        model: the model, on any device, with entropy tables (``update()`` has run).
            Its weights are copied to the CPU in float32.
        order: ``"wavefront"`` (default) or ``"raster"`` (the published schedule).
        fixed_point: products on the fixed-point grid (default; the same bits on
            every machine), or float32 as files written before it.
    """

    def __init__(
        self, model: nn.Module, order: str = "wavefront", fixed_point: bool = True
    ):
        if order not in ORDERS:
            raise ValueError(
                f"unknown block coding order {order!r}; choose from {ORDERS}"
            )
        conditional = model.gaussian_conditional
        if conditional.quantized_cdf.numel() == 0:
            raise RuntimeError(
                "the model has no entropy tables: call model.update(force=True) first"
            )
        self.order = order
        self.slope = model.wavefront_slope
        self.channels = model.block_channels
        self.latent_channels = model.M
        self.entropy = RowNetwork(
            model.entropy_parameters[0], model.entropy_parameters[1:], fixed_point
        )
        self.encoder = RowNetwork(
            model.g_a_context, model.g_a, fixed_point, source=model.g_a_source
        )
        self.decoder = RowNetwork(
            model.g_s_context, model.g_s, fixed_point, source=model.g_s_latent
        )
        self.pad = max(self.entropy.reach, self.encoder.reach, self.decoder.reach)
        self.conditional = copy.deepcopy(conditional).cpu()
        self.cdfs = self.conditional.quantized_cdf.tolist()
        self.cdf_lengths = self.conditional.cdf_length.reshape(-1).int().tolist()
        self.offsets = self.conditional.offset.reshape(-1).int().tolist()

    def fronts(self, rows: int, cols: int) -> Iterator[Tuple[Tensor, Tensor]]:
        """(rows, cols) of the blocks coded together, step by step, by
        increasing row."""
        positions, sizes = coding_order(rows, cols, self.order, self.slope)
        for front in torch.split(positions, sizes):
            yield front // cols, front % cols

    def _parameters(self, state: CodingState, front: Front) -> Tuple[Tensor, Tensor]:
        scales, means = self.entropy(state, front).chunk(2, dim=1)
        return scales, means

    def _reconstruct(self, state: CodingState, front: Front, y_hat: Tensor) -> None:
        x_hat = self.decoder(state, front, side=y_hat).clamp_(-0.5, 0.5)[front.used]
        pad = state.pad
        state.z_hat[:, front.rows[front.used] + pad, front.cols[front.used] + pad] = (
            x_hat.t()
        )

    def _bits(self, y_hat: Tensor, scales: Tensor, means: Tensor) -> float:
        likelihood = self.conditional._likelihood(y_hat, scales, means)
        return float(-self.conditional.likelihood_lower_bound(likelihood).log2().sum())

    @torch.inference_mode()
    def encode(self, blocks: Tensor) -> Tuple[bytes, Tensor, Tensor, float]:
        """Code a block grid (3B^2, R, K) of samples in [-0.5, 0.5].

        Returns the string, the dequantised latent (M, R, K), the reconstruction
        (3B^2, R, K) and the likelihood estimate of the string's length in bits.
        """
        blocks = cpu_float32(blocks)
        if blocks.dim() != 3 or blocks.shape[0] != self.channels:
            raise ValueError(
                f"expected a block grid ({self.channels}, R, K), "
                f"got {tuple(blocks.shape)}"
            )
        grid_rows, grid_cols = blocks.shape[1:]
        state = CodingState(self.channels, grid_rows, grid_cols, self.pad)
        y_hat_grid = torch.zeros(self.latent_channels, grid_rows, grid_cols)
        symbols: List[Tensor] = []
        indexes: List[Tensor] = []
        bits = 0.0
        with single_threaded():
            for rows, cols in self.fronts(grid_rows, grid_cols):
                front = front_slots(rows, cols, grid_rows)
                scales, means = self._parameters(state, front)
                y = self.encoder(
                    state, front, side=blocks[:, front.rows, front.cols].t()
                )
                front_symbols = self.conditional.quantize(y, "symbols", means)
                y_hat = self.conditional.dequantize(front_symbols, means)
                self._reconstruct(state, front, y_hat)
                used = front.used
                y_hat_grid[:, rows, cols] = y_hat[used].t()
                symbols.append(front_symbols[used].reshape(-1))
                indexes.append(self.conditional.build_indexes(scales[used]).reshape(-1))
                bits += self._bits(y_hat[used], scales[used], means[used])
        encoder = BufferedRansEncoder()
        encoder.encode_with_indexes(
            torch.cat(symbols).tolist(),
            torch.cat(indexes).tolist(),
            self.cdfs,
            self.cdf_lengths,
            self.offsets,
        )
        return encoder.flush(), y_hat_grid, state.reconstruction().clone(), bits

    def _decode_front(self, decoder: RansDecoder, indexes: Tensor) -> Tensor:
        """Decode one front's symbols, handing rANS only the CDF rows the front uses."""
        used, local = torch.unique(indexes.reshape(-1), return_inverse=True)
        used = used.tolist()
        values = decoder.decode_stream(
            local.tolist(),
            [self.cdfs[i] for i in used],
            [self.cdf_lengths[i] for i in used],
            [self.offsets[i] for i in used],
        )
        return torch.tensor(values, dtype=torch.int32).reshape(indexes.shape)

    @torch.inference_mode()
    def decode(
        self, string: bytes, grid_rows: int, grid_cols: int
    ) -> Tuple[Tensor, Tensor]:
        """Rebuild (y_hat (M, R, K), reconstruction (3B^2, R, K)) from ``string``;
        any string is safe to decode (:func:`~utils.coding.rans.safe_string`)."""
        state = CodingState(self.channels, grid_rows, grid_cols, self.pad)
        y_hat_grid = torch.zeros(self.latent_channels, grid_rows, grid_cols)
        decoder = RansDecoder()
        decoder.set_stream(
            safe_string(string, self.latent_channels * grid_rows * grid_cols, "y")
        )
        with single_threaded():
            for rows, cols in self.fronts(grid_rows, grid_cols):
                front = front_slots(rows, cols, grid_rows)
                scales, means = self._parameters(state, front)
                front_symbols = torch.zeros(means.shape, dtype=torch.int32)
                front_symbols[front.used] = self._decode_front(
                    decoder, self.conditional.build_indexes(scales[front.used])
                )
                y_hat = self.conditional.dequantize(front_symbols, means)
                self._reconstruct(state, front, y_hat)
                y_hat_grid[:, rows, cols] = y_hat[front.used].t()
        return y_hat_grid, state.reconstruction().clone()
