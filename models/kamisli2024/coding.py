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

Every network is evaluated only at the front's positions, as matrix products on
(positions, channels) rows: a masked convolution gathers the taps its mask opens,
intermediate features that a later masked layer reads (the KS = 3,3 entropy network)
are kept in a feature map, zero outside the frame exactly as the training forward's
zero padding, so the codec computes what ``forward`` computes (to float rounding).

Bit-exactness. Encoder and decoder must compute every scale, mean and reconstruction
bit for bit alike, and the wavefront order must reproduce the block-by-block
(raster) order exactly: a block's numbers must not depend on which other blocks
share its product. By default every product is an exact integer sum on the
fixed-point grid of ``utils/coding/fixed_point.py``, so neither the blocks sharing a
product nor the machine (its vector unit, its BLAS) can change a bit; the other
operations (GDN's square root, LeakyReLU, clamping, rounding) are single IEEE
operations, rounded alike everywhere. Files written before that grid (no
fixed-point flag) ran float32 products, which BLAS libraries do not make
independent of the row count (MKL sums in another order for 1 to 3 rows, and for
small widths the result depends on the row count and the row's position); they are
decoded as written: every product has exactly ``ROWS_PER_PRODUCT`` rows, and block
row ``i`` always occupies row ``i % ROWS_PER_PRODUCT`` of its product (the *slot*),
in either order, so a row sees the same call, position and inputs whatever the
order, on one thread; such files decode where the CPU reproduces the writer's
float32 products.

Bitstream: one rANS string; fronts in increasing ``t``, blocks within a front by
increasing row, the M latent channels of a block innermost.
"""

import copy
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.layers import GDN
from torch import Tensor, nn

from models.kamisli2024.layers import BlockMaskedConv2d
from utils.coding import ORDERS
from utils.coding.fixed_point import GridLinear
from utils.coding.rans import safe_string
from utils.coding.scan_order import coding_order
from utils.coding.threads import single_threaded

ROWS_PER_PRODUCT = 8


@dataclass
class BlockPayload:
    """A compressed image: what :meth:`Kamisli2024.compress` returns.

    Attributes:
        string: the rANS bytes of all blocks.
        height, width: the original image size (the grid is padded to multiples of B).
        order: ``"wavefront"`` or ``"raster"``, the order the string was written in.
        y_hat_crc: CRC-32 of the encoder's dequantised latent, checked by the decoder.
        estimated_bits: the likelihood estimate of the string's length (not stored).
        fixed_point: the products ran on the fixed-point grid (see the module doc).
    """

    string: bytes
    height: int
    width: int
    order: str
    y_hat_crc: int
    estimated_bits: float = float("nan")
    fixed_point: bool = True


class _Float32Product:
    """``F.linear`` as float32 products of exactly ROWS_PER_PRODUCT rows, for files
    without the fixed-point flag (see the module doc).

    Each chunk is copied to a fresh (aligned) tensor: some BLAS kernels' results
    depend on the alignment of their inputs.
    """

    def __init__(self, weight: Tensor, bias: Tensor):
        self.weight, self.bias = weight, bias

    def __call__(self, h: Tensor) -> Tensor:
        return torch.cat(
            [
                F.linear(chunk.clone(), self.weight, self.bias)
                for chunk in h.split(ROWS_PER_PRODUCT)
            ]
        )


class _FixedPointProduct:
    """``F.linear`` as an exact sum on the fixed-point grid, returned in float32."""

    def __init__(self, weight: Tensor, bias: Tensor):
        self.layer = GridLinear(weight, bias)

    def __call__(self, h: Tensor) -> Tensor:
        return self.layer(h).float()


def _product(weight: Tensor, bias: Tensor, fixed_point: bool):
    return (_FixedPointProduct if fixed_point else _Float32Product)(weight, bias)


class _Front(NamedTuple):
    """The blocks coded in one step, laid out in product slots.

    ``rows``/``cols`` give, for every slot, the block it evaluates (a dummy in-grid
    block for unused slots); ``used`` marks the slots holding the front's blocks, in
    increasing row order (the bitstream order).
    """

    rows: Tensor
    cols: Tensor
    used: Tensor


def _front_slots(rows: Tensor, cols: Tensor, grid_rows: int) -> _Front:
    """Block row ``i`` goes to slot ``i % ROWS_PER_PRODUCT`` of its product."""
    base = int(rows.min()) // ROWS_PER_PRODUCT * ROWS_PER_PRODUCT
    span = (
        int(rows.max()) - base
    ) // ROWS_PER_PRODUCT * ROWS_PER_PRODUCT + ROWS_PER_PRODUCT
    used = torch.zeros(span, dtype=torch.bool)
    used[rows - base] = True
    slot_cols = torch.zeros(span, dtype=torch.long)
    slot_cols[rows - base] = cols
    slot_rows = torch.arange(base, base + span).clamp_(max=grid_rows - 1)
    return _Front(slot_rows, slot_cols, used)


def _cpu(tensor: Tensor) -> Tensor:
    return tensor.detach().float().cpu().contiguous()


class _Linear:
    """A 1x1 convolution applied to (positions, channels) rows."""

    def __init__(self, conv: nn.Conv2d, fixed_point: bool):
        if conv.kernel_size != (1, 1):
            raise ValueError(f"expected a 1x1 convolution, got {conv.kernel_size}")
        self.product = _product(
            _cpu(conv.weight).reshape(conv.out_channels, -1),
            _cpu(conv.bias),
            fixed_point,
        )

    def __call__(self, h: Tensor) -> Tensor:
        return self.product(h)


class _GDN:
    """CompressAI's GDN / IGDN on rows: ``x * rsqrt(beta + gamma x^2)``
    (sqrt if inverse)."""

    def __init__(self, gdn: GDN, fixed_point: bool):
        self.norm = _product(
            _cpu(gdn.gamma_reparam(gdn.gamma)),
            _cpu(gdn.beta_reparam(gdn.beta)),
            fixed_point,
        )
        self.inverse = gdn.inverse

    def __call__(self, h: Tensor) -> Tensor:
        norm = self.norm(h * h)
        return h * (torch.sqrt(norm) if self.inverse else torch.rsqrt(norm))


class _LeakyReLU:
    def __init__(self, layer: nn.LeakyReLU, fixed_point: bool):
        self.slope = layer.negative_slope

    def __call__(self, h: Tensor) -> Tensor:
        return F.leaky_relu(h, self.slope)


class _Masked:
    """A block-masked convolution evaluated at chosen positions of a padded
    feature map."""

    def __init__(self, conv: BlockMaskedConv2d, fixed_point: bool):
        taps = conv.taps()
        self.reach = max(max(abs(di), abs(dj)) for di, dj in taps)
        self.tap_rows = torch.tensor([di for di, _ in taps])
        self.tap_cols = torch.tensor([dj for _, dj in taps])
        centre = conv.kernel_size[0] // 2
        weight = _cpu(conv.weight)[:, :, self.tap_rows + centre, self.tap_cols + centre]
        # Channel-major, taps inner.
        self.product = _product(
            weight.reshape(conv.out_channels, -1), _cpu(conv.bias), fixed_point
        )
        self.in_channels = conv.in_channels

    def __call__(
        self, feature_map: Tensor, pad: int, rows: Tensor, cols: Tensor
    ) -> Tensor:
        # The window: (C, n, taps).
        window = feature_map[
            :, rows[:, None] + self.tap_rows + pad, cols[:, None] + self.tap_cols + pad
        ]
        window = window.permute(1, 0, 2).reshape(len(rows), -1)
        return self.product(window)


def _row_layer(module: nn.Module, fixed_point: bool):
    if isinstance(module, BlockMaskedConv2d):
        return _Masked(module, fixed_point)
    if isinstance(module, nn.Conv2d):
        return _Linear(module, fixed_point)
    if isinstance(module, GDN):
        return _GDN(module, fixed_point)
    if isinstance(module, nn.LeakyReLU):
        return _LeakyReLU(module, fixed_point)
    raise TypeError(f"the block coder cannot evaluate a {type(module).__name__} layer")


class _Session:
    """The growing reconstruction z_hat and the feature maps of
    one image, zero-padded."""

    def __init__(self, channels: int, rows: int, cols: int, pad: int):
        self.pad, self.rows, self.cols = pad, rows, cols
        self.z_hat = torch.zeros(channels, rows + 2 * pad, cols + 2 * pad)
        self.maps: Dict[int, Tensor] = {}

    def feature_map(self, layer: _Masked) -> Tensor:
        if id(layer) not in self.maps:
            self.maps[id(layer)] = torch.zeros(layer.in_channels, *self.z_hat.shape[1:])
        return self.maps[id(layer)]

    def reconstruction(self) -> Tensor:
        return self.z_hat[
            :, self.pad : self.pad + self.rows, self.pad : self.pad + self.cols
        ]


class _RowNetwork:
    """``layers(context(z_hat) [+ source(side input)])`` evaluated
    at given positions."""

    def __init__(
        self,
        context: BlockMaskedConv2d,
        layers: nn.Module,
        fixed_point: bool,
        source: Optional[nn.Conv2d] = None,
    ):
        self.context = _Masked(context, fixed_point)
        self.source = _Linear(source, fixed_point) if source is not None else None
        self.layers = [_row_layer(m, fixed_point) for m in layers]
        self.reach = max(
            [self.context.reach]
            + [m.reach for m in self.layers if isinstance(m, _Masked)]
        )

    def __call__(
        self, session: _Session, front: _Front, side: Optional[Tensor] = None
    ) -> Tensor:
        pad, rows, cols = session.pad, front.rows, front.cols
        h = self.context(session.z_hat, pad, rows, cols)
        if self.source is not None:
            h = h + self.source(side)
        for layer in self.layers:
            if isinstance(layer, _Masked):
                feature_map = session.feature_map(layer)
                feature_map[:, rows[front.used] + pad, cols[front.used] + pad] = h[
                    front.used
                ].t()
                h = layer(feature_map, pad, rows, cols)
            else:
                h = layer(h)
        return h


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
        self.entropy = _RowNetwork(
            model.entropy_parameters[0], model.entropy_parameters[1:], fixed_point
        )
        self.encoder = _RowNetwork(
            model.g_a_context, model.g_a, fixed_point, source=model.g_a_source
        )
        self.decoder = _RowNetwork(
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

    def _parameters(self, session: _Session, front: _Front) -> Tuple[Tensor, Tensor]:
        scales, means = self.entropy(session, front).chunk(2, dim=1)
        return scales, means

    def _reconstruct(self, session: _Session, front: _Front, y_hat: Tensor) -> None:
        x_hat = self.decoder(session, front, side=y_hat).clamp_(-0.5, 0.5)[front.used]
        pad = session.pad
        session.z_hat[:, front.rows[front.used] + pad, front.cols[front.used] + pad] = (
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
        blocks = _cpu(blocks)
        if blocks.dim() != 3 or blocks.shape[0] != self.channels:
            raise ValueError(
                f"expected a block grid ({self.channels}, R, K), "
                f"got {tuple(blocks.shape)}"
            )
        grid_rows, grid_cols = blocks.shape[1:]
        session = _Session(self.channels, grid_rows, grid_cols, self.pad)
        y_hat_grid = torch.zeros(self.latent_channels, grid_rows, grid_cols)
        symbols: List[Tensor] = []
        indexes: List[Tensor] = []
        bits = 0.0
        with single_threaded():
            for rows, cols in self.fronts(grid_rows, grid_cols):
                front = _front_slots(rows, cols, grid_rows)
                scales, means = self._parameters(session, front)
                y = self.encoder(
                    session, front, side=blocks[:, front.rows, front.cols].t()
                )
                front_symbols = self.conditional.quantize(y, "symbols", means)
                y_hat = self.conditional.dequantize(front_symbols, means)
                self._reconstruct(session, front, y_hat)
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
        return encoder.flush(), y_hat_grid, session.reconstruction().clone(), bits

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
        session = _Session(self.channels, grid_rows, grid_cols, self.pad)
        y_hat_grid = torch.zeros(self.latent_channels, grid_rows, grid_cols)
        decoder = RansDecoder()
        decoder.set_stream(
            safe_string(string, self.latent_channels * grid_rows * grid_cols, "y")
        )
        with single_threaded():
            for rows, cols in self.fronts(grid_rows, grid_cols):
                front = _front_slots(rows, cols, grid_rows)
                scales, means = self._parameters(session, front)
                front_symbols = torch.zeros(means.shape, dtype=torch.int32)
                front_symbols[front.used] = self._decode_front(
                    decoder, self.conditional.build_indexes(scales[front.used])
                )
                y_hat = self.conditional.dequantize(front_symbols, means)
                self._reconstruct(session, front, y_hat)
                y_hat_grid[:, rows, cols] = y_hat[front.used].t()
        return y_hat_grid, session.reconstruction().clone()
