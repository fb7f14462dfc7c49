"""The order in which a context model codes a latent: raster, or wavefront fronts.

A masked context reads only the positions its mask marks causal. Numbering the
positions ``t = a*i + j`` with the smallest slope ``a`` for which every causal tap
has a smaller ``t`` makes all positions with the same ``t`` (a *front*) independent
of each other, so they are coded in one step. CPS's latent context coder
(``utils/coding/context_coder.py``) and Kamisli 2024's block coder both walk these
fronts; ``raster`` order has one position per front.

:func:`front_layout` adds what a coder needs to walk the fronts: where each
position's context taps read in a padded buffer, and which taps read the previous
front (*near*) or older ones (*far*, computable a front ahead).
"""

from typing import List, NamedTuple, Tuple

import torch
from torch import Tensor

from utils.coding import ORDERS

__all__ = [
    "causal_taps",
    "wavefront_slope",
    "coding_order",
    "FrontLayout",
    "front_layout",
]


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


def coding_order(
    height: int, width: int, order: str, slope: int
) -> Tuple[Tensor, List[int]]:
    """Positions of a (height, width) latent in coding order, and the front sizes.

    Returns:
        positions: (height*width,) int64 flat indexes ``i*width + j``; front ``k``
            is ``positions[sum(sizes[:k]):sum(sizes[:k+1])]``, by increasing row.
        sizes: number of positions in each front, in coding order.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown entropy coder order {order!r}; choose from {ORDERS}")
    if height < 1 or width < 1:
        raise ValueError(f"latent size {height}x{width} is empty")
    if order == "raster":
        return torch.arange(height * width), [1] * (height * width)
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    front = slope * rows + cols
    # Sorted by scattering unique keys into their range: linear time, where argsort's
    # n log n is a visible cost on large latents. Within a front the row fixes the
    # column and a later row has a smaller column, so the key ranks the positions of
    # a front by the shorter side: a key range of about (slope + 1) * height * width.
    # Ranking by row on a tall latent made it slope * height**2 (4 GB of keys for a
    # 65535 x 4 pixel Kamisli image), whatever the budget.
    if height <= width:
        keys = front * height + rows
    else:
        keys = front * width + (width - 1 - cols)
    slots = torch.full((int(keys[-1]) + 1,), -1)
    slots[keys] = torch.arange(height * width)
    positions = slots[slots >= 0]
    sizes = torch.bincount(front)
    return positions, sizes[sizes > 0].tolist()


class FrontLayout(NamedTuple):
    """The fronts of one latent size and order, and the buffer rows their taps read."""

    positions: Tensor  # (P,) flat indexes i*W + j in coding order
    centres: Tensor  # (P,) row of each position in the padded buffer
    sizes: List[int]  # positions per front
    far_taps: Tuple[int, ...]  # indexes into the taps of those reading older fronts
    near_taps: Tuple[int, ...]  # those reading the previous front
    far_windows: Tensor  # (P*far,) buffer rows the far taps read, in coding order
    near_windows: Tensor  # (P*near,) buffer rows the near taps read


def front_layout(
    height: int,
    width: int,
    order: str,
    taps: List[Tuple[int, int]],
    slope: int,
    pad: Tuple[int, int],
) -> FrontLayout:
    """Coding order, buffer rows, and the split of ``taps`` into near and far ones.

    The buffer holds the latent with ``pad`` (rows, columns) of zeros on each side,
    one row per position. A tap (di, dj) reads the front ``di*slope + dj``
    (wavefront) or ``di*width + dj`` (raster) steps back. When some wavefront steps
    hold no position (width < slope) fronts are not consecutive steps and every tap
    counts as near.
    """
    positions, sizes = coding_order(height, width, order, slope)
    if order == "raster":
        steps_back = [-(di * width + dj) for di, dj in taps]
    elif len(sizes) == slope * (height - 1) + width:
        steps_back = [-(di * slope + dj) for di, dj in taps]
    else:
        steps_back = [1] * len(taps)
    near = tuple(k for k, back in enumerate(steps_back) if back == 1)
    far = tuple(k for k, back in enumerate(steps_back) if back != 1)
    padded_width = width + 2 * pad[1]
    centres = (positions // width + pad[0]) * padded_width + positions % width + pad[1]
    offsets = torch.tensor([di * padded_width + dj for di, dj in taps])

    def windows(chosen: Tuple[int, ...]) -> Tensor:
        return (centres[:, None] + offsets[list(chosen)]).reshape(-1)

    return FrontLayout(
        positions, centres, sizes, far, near, windows(far), windows(near)
    )
