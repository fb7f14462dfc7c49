"""The Kamisli (2024) networks evaluated at chosen blocks, bit for bit alike in
encoder and decoder.

The wavefront coder (:mod:`models.kamisli2024.coding`) needs the scales, means,
latents and reconstructions of one front of blocks at a time. Every network is
therefore evaluated only at the front's positions, as matrix products on
(positions, channels) rows: a masked convolution gathers the taps its mask opens,
intermediate features that a later masked layer reads (the KS = 3,3 entropy network)
are kept in a feature map, zero outside the frame exactly as the training forward's
zero padding, so the coder computes what ``forward`` computes (to float rounding).

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
row ``i`` always occupies row ``i % ROWS_PER_PRODUCT`` of its product (the *slot*,
:func:`front_slots`), in either order, so a row sees the same call, position and
inputs whatever the order, on one thread; such files decode where the CPU
reproduces the writer's float32 products.
"""

from typing import Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F
from compressai.layers import GDN
from torch import Tensor, nn

from models.kamisli2024.layers import BlockMaskedConv2d
from utils.coding.fixed_point import GridLinear

ROWS_PER_PRODUCT = 8


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


class Front(NamedTuple):
    """The blocks coded in one step, laid out in product slots.

    ``rows``/``cols`` give, for every slot, the block it evaluates (a dummy in-grid
    block for unused slots); ``used`` marks the slots holding the front's blocks, in
    increasing row order (the bitstream order).
    """

    rows: Tensor
    cols: Tensor
    used: Tensor


def front_slots(rows: Tensor, cols: Tensor, grid_rows: int) -> Front:
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
    return Front(slot_rows, slot_cols, used)


def cpu_float32(tensor: Tensor) -> Tensor:
    """A contiguous float32 copy on the CPU, where the coder runs whatever the
    model's device."""
    return tensor.detach().float().cpu().contiguous()


class _Linear:
    """A 1x1 convolution applied to (positions, channels) rows."""

    def __init__(self, conv: nn.Conv2d, fixed_point: bool):
        if conv.kernel_size != (1, 1):
            raise ValueError(f"expected a 1x1 convolution, got {conv.kernel_size}")
        self.product = _product(
            cpu_float32(conv.weight).reshape(conv.out_channels, -1),
            cpu_float32(conv.bias),
            fixed_point,
        )

    def __call__(self, h: Tensor) -> Tensor:
        return self.product(h)


class _GDN:
    """CompressAI's GDN / IGDN on rows: ``x * rsqrt(beta + gamma x^2)``
    (sqrt if inverse)."""

    def __init__(self, gdn: GDN, fixed_point: bool):
        self.norm = _product(
            cpu_float32(gdn.gamma_reparam(gdn.gamma)),
            cpu_float32(gdn.beta_reparam(gdn.beta)),
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
        weight = cpu_float32(conv.weight)[
            :, :, self.tap_rows + centre, self.tap_cols + centre
        ]
        # Channel-major, taps inner.
        self.product = _product(
            weight.reshape(conv.out_channels, -1), cpu_float32(conv.bias), fixed_point
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


class CodingState:
    """What coding one image builds up: the reconstruction z_hat and the feature
    maps of the masked layers, zero-padded by ``pad`` blocks on every side."""

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


class RowNetwork:
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
        self, state: CodingState, front: Front, side: Optional[Tensor] = None
    ) -> Tensor:
        pad, rows, cols = state.pad, front.rows, front.cols
        h = self.context(state.z_hat, pad, rows, cols)
        if self.source is not None:
            h = h + self.source(side)
        for layer in self.layers:
            if isinstance(layer, _Masked):
                feature_map = state.feature_map(layer)
                feature_map[:, rows[front.used] + pad, cols[front.used] + pad] = h[
                    front.used
                ].t()
                h = layer(feature_map, pad, rows, cols)
            else:
                h = layer(h)
        return h
