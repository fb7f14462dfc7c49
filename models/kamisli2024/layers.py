"""Building blocks of the Kamisli (2024) block-based codec.

The image is cut into non-overlapping B x B blocks and every block becomes one
position of a coarse grid whose channel vector holds the block's 3*B*B samples
(:func:`to_blocks`). All networks are convolutions on that grid, masked
PixelCNN-style at the level of *blocks* (:class:`BlockMaskedConv2d`), so a block only
ever sees blocks before it in raster order. This module also derives, from the
masks themselves, which earlier blocks a block depends on (:func:`compose_reach`);
the wavefront decoder takes its schedule from that set.
"""

from typing import Iterable, List, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Offset = Tuple[int, int]
MASK_KINDS = ("A", "B")


def to_blocks(x: Tensor, block_size: int) -> Tensor:
    """(N, C, H, W) -> (N, C*B*B, H/B, W/B), one grid position per B x B block.

    The channel of sample (v, h) of a block, colour c, is ``(v*B + h)*C + c``:
    position-major, colour-minor, as in the authors' code (this is *not*
    ``F.pixel_unshuffle`` order, which is colour-major).
    """
    n, c, height, width = x.shape
    if height % block_size or width % block_size:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of the block size "
            f"{block_size}; pad it first"
        )
    rows, cols = height // block_size, width // block_size
    x = x.reshape(n, c, rows, block_size, cols, block_size)
    return x.permute(0, 3, 5, 1, 2, 4).reshape(
        n, block_size * block_size * c, rows, cols
    )


def from_blocks(blocks: Tensor, block_size: int, channels: int = 3) -> Tensor:
    """Exact inverse of :func:`to_blocks`: (N, C*B*B, R, K) -> (N, C, R*B, K*B)."""
    n, _, rows, cols = blocks.shape
    x = blocks.reshape(n, block_size, block_size, channels, rows, cols)
    return x.permute(0, 3, 4, 1, 5, 2).reshape(
        n, channels, rows * block_size, cols * block_size
    )


def block_mask(kind: str, kernel_size: int) -> Tensor:
    """The (k, k) mask of a block-level masked convolution.

    Every row above the centre is open (the upper-right diagonal included), the
    centre row is open left of the centre, and the centre itself is open for kind
    ``"B"`` only. For k = 3: A = [[1,1,1],[1,0,0],[0,0,0]],
    B = [[1,1,1],[1,1,0],[0,0,0]].
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; choose from {MASK_KINDS}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"masked convolutions need an odd kernel size, got {kernel_size}"
        )
    centre = kernel_size // 2
    mask = torch.zeros(kernel_size, kernel_size, device="cpu")
    mask[:centre] = 1
    mask[centre, :centre] = 1
    if kind == "B":
        mask[centre, centre] = 1
    return mask


class BlockMaskedConv2d(nn.Conv2d):
    """A "same"-padded convolution whose taps outside :func:`block_mask` are zero.

    The mask is built once, as a buffer, and applied functionally
    (``conv(x, weight * mask)``): masked taps get no gradient and the stored weight
    is never rewritten, unlike CompressAI's ``MaskedConv2d`` which zeroes
    ``weight.data`` at every forward. Masked taps are also zeroed at construction so
    that state dicts hold no meaningless values.
    """

    def __init__(
        self, kind: str, in_channels: int, out_channels: int, kernel_size: int
    ):
        mask = block_mask(kind, kernel_size)
        if mask.sum() == 0:
            raise ValueError(f"a kind {kind!r} mask of size {kernel_size} sees nothing")
        super().__init__(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2
        )
        self.kind = kind
        centre = kernel_size // 2
        self._taps = [
            (int(i) - centre, int(j) - centre) for i, j in torch.nonzero(mask)
        ]
        self.register_buffer(
            "mask", mask[None, None].to(self.weight.device), persistent=False
        )
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)

    def taps(self) -> List[Offset]:
        """(row, column) offsets, relative to the output position, that are read."""
        return list(self._taps)


def layer_taps(layer: nn.Module) -> List[Offset]:
    """Offsets a layer reads: its mask's for a masked conv, the centre for a
    1x1 conv."""
    if isinstance(layer, BlockMaskedConv2d):
        return layer.taps()
    if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1):
        raise ValueError(
            f"unmasked {layer.kernel_size} convolution would break causality"
        )
    return [(0, 0)]


def compose_reach(tap_sets: Sequence[Iterable[Offset]]) -> Set[Offset]:
    """Offsets of the input a stack of layers reads (a Minkowski sum of their taps).

    ``tap_sets[0]`` belongs to the layer applied first. For the KS = 3,3 entropy
    network of the paper this gives rows i-2 (columns j-2..j+2), i-1 (j-2..j+1) and
    i (j-2, j-1): (i-1, j+2) is not reached, although (i-2, j+2) is.
    """
    reach = {(0, 0)}
    for taps in tap_sets:
        reach = {(di + ti, dj + tj) for di, dj in reach for ti, tj in taps}
    return reach


def network_reach(layers: Iterable[nn.Module]) -> Set[Offset]:
    """:func:`compose_reach` of the convolutions in ``layers`` (other layers act
    per position)."""
    return compose_reach([layer_taps(m) for m in layers if isinstance(m, nn.Conv2d)])
