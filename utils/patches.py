"""Run a transform patch by patch and stitch the exact parts (POPS, Fig. 1).

Both directions use the same latent-unit tiling from :func:`utils.pops.plan_patches`:

* analysis: pixel patch ``[start*rho, stop*rho)`` -> latent, keep ``[own_start, own_stop)``
* synthesis: latent patch ``[start, stop)`` -> pixels, keep ``[own_start*rho, own_stop*rho)``

Every patch has the same size (patches are clipped to the image, never padded), so
patches run in batches of ``batch_size`` on the transform's device, and only one
batch of inputs and outputs is alive at a time.
"""

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from utils.pops import AxisTile

Patch = Tuple[AxisTile, AxisTile]


def run_patchwise(transform: Callable[[Tensor], Tensor], source: Tensor, target: Tensor,
                  patches: List[Patch], in_factor: int, out_factor: int,
                  batch_size: int, device: torch.device,
                  prepare: Optional[Callable[[Tensor], Tensor]] = None,
                  finish: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Fill ``target`` (1, C_out, ...) with ``transform`` applied patch-wise to ``source``.

    Args:
        transform: maps a batch (B, C_in, h, w) on ``device`` to (B, C_out, h', w').
        source: (1, C_in, H_in, W_in), on any device and of any dtype.
        target: (1, C_out, H_out, W_out), preallocated; its dtype decides the output.
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
        group = patches[first:first + batch_size]
        batch = torch.cat([
            source[..., r.start * in_factor:r.stop * in_factor,
                   c.start * in_factor:c.stop * in_factor]
            for r, c in group
        ]).to(device)
        output = transform(prepare(batch) if prepare else batch)
        for index, (r, c) in enumerate(group):
            region = output[index:index + 1, :,
                            (r.own_start - r.start) * out_factor:(r.own_stop - r.start) * out_factor,
                            (c.own_start - c.start) * out_factor:(c.own_stop - c.start) * out_factor]
            if finish is not None:
                region = finish(region)
            target[..., r.own_start * out_factor:r.own_stop * out_factor,
                   c.own_start * out_factor:c.own_stop * out_factor] = region.to(target.device,
                                                                                 target.dtype)
        del batch, output
    return target
