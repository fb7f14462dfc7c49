"""Run a transform patch by patch and stitch the exact parts (POPS, Fig. 1).

Both directions use the same latent-unit tiling from
:func:`utils.stitching.geometry.plan_patches`:

* analysis: pixel patch ``[start*rho, stop*rho)`` -> latent,
  keep ``[own_start, own_stop)``
* synthesis: latent patch ``[start, stop)`` -> pixels,
  keep ``[own_start*rho, own_stop*rho)``

Every patch has the same size (patches are clipped to the image, never padded), so
patches run in batches of ``batch_size`` on the transform's device, and only one
batch of inputs and outputs is alive at a time.

The source may be smaller than the tiling (an image whose sides are not multiples
of the model's downsampling factor): regions past its bottom or right edge repeat
its last row or column, exactly as :func:`pad_replicate` would, without a padded
copy of the image. Likewise the target may be smaller than the tiling's output (the
decoded image without its padding): writes are clipped to it.
"""

import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from utils.stitching.geometry import AxisTile

Patch = Tuple[AxisTile, AxisTile]


def pad_replicate(image: Tensor, multiple: int) -> Tensor:
    """Pad a (C, H, W) tensor of any dtype at the bottom and right by repeating the
    last row and column, up to the next multiple of ``multiple``."""
    height, width = image.shape[-2:]
    return read_region(
        image,
        0,
        math.ceil(height / multiple) * multiple,
        0,
        math.ceil(width / multiple) * multiple,
    )


def read_region(source: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """``source[..., top:bottom, left:right]``, where rows and columns past the last
    one repeat it (a view when the region lies inside ``source``)."""
    height, width = source.shape[-2:]
    if bottom <= height and right <= width:
        return source[..., top:bottom, left:right]
    rows = torch.arange(top, bottom).clamp_(max=height - 1)
    cols = torch.arange(left, right).clamp_(max=width - 1)
    return source.index_select(-2, rows).index_select(-1, cols)


def run_patchwise(
    transform: Callable[[Tensor], Tensor],
    source: Tensor,
    target: Tensor,
    patches: List[Patch],
    in_factor: int,
    out_factor: int,
    batch_size: int,
    device: torch.device,
    prepare: Optional[Callable[[Tensor], Tensor]] = None,
    finish: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """Fill ``target`` (1, C_out, ...) with ``transform`` applied patch-wise
    to ``source``.

    Args:
        transform: maps a batch (B, C_in, h, w) on ``device`` to (B, C_out, h', w').
        source: (1, C_in, H_in, W_in), on any device and of any dtype; may be
            smaller than the tiling (edges are replicated).
        target: (1, C_out, H_out, W_out), preallocated, of any memory layout; its
            dtype decides the output; may be smaller than the tiling (cropped).
        patches: tiling in latent units.
        in_factor, out_factor: pixels per latent unit on the input and output side
            (rho and 1 for analysis, 1 and rho for synthesis).
        batch_size: patches per call of ``transform``.
        prepare: applied to each input batch on ``device`` (e.g. uint8 -> float).
        finish: applied to each owned output region before it is written (e.g.
            float -> uint8), so no full-size float copy of the output is needed.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    for first in range(0, len(patches), batch_size):
        group = patches[first : first + batch_size]
        batch = torch.cat(
            [
                read_region(
                    source,
                    r.start * in_factor,
                    r.stop * in_factor,
                    c.start * in_factor,
                    c.stop * in_factor,
                )
                for r, c in group
            ]
        ).to(device)
        output = transform(prepare(batch) if prepare else batch)
        del batch
        for index, (r, c) in enumerate(group):
            top, left = r.own_start * out_factor, c.own_start * out_factor
            bottom = min(r.own_stop * out_factor, target.shape[-2])
            right = min(c.own_stop * out_factor, target.shape[-1])
            if bottom <= top or right <= left:
                continue
            region = output[
                index : index + 1,
                :,
                top - r.start * out_factor : bottom - r.start * out_factor,
                left - c.start * out_factor : right - c.start * out_factor,
            ]
            if finish is not None:
                region = finish(region)
            target[..., top:bottom, left:right] = region.to(target.device, target.dtype)
        del output
    return target
