"""Naive tiling, the block-wise baseline of the CPS paper: the image is padded
(replicate) to a multiple of P, cut into non-overlapping P x P tiles and every tile
is coded on its own by another coder. Its seams are what PSNR-B measures, and what
POPS patch stitching avoids.

Kept apart from the coders it wraps (``utils.evaluation.coders``): it adds a tiling
to any of them and sums their figures, tile by tile.
"""

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from utils.evaluation.coders import Coded, Coder
from utils.stitching.patches import pad_replicate


class NaiveTiles(Coder):
    """Non-overlapping ``tile`` x ``tile`` blocks, coded independently by ``inner``.

    The image is padded (replicate) to a multiple of ``tile``; the rates of all tiles
    add up and are charged to the original pixels.
    """

    def __init__(self, inner: Coder, tile: int):
        if tile <= 0:
            raise ValueError(f"naive tiling needs a tile size > 0, got {tile}")
        self.inner, self.tile = inner, tile
        # A layer of a scalable model stays that layer, tile by tile.
        self.device, self.layer = inner.device, inner.layer
        self.description = (
            f"naive tiling: independent {tile}x{tile} tiles of the image padded "
            f"(replicate) to a multiple of {tile}; each tile: {inner.description}"
        )

    def code(self, image: Tensor) -> Coded:
        height, width = image.shape[1:]
        padded = pad_replicate(image, self.tile)
        output = torch.empty_like(padded)
        totals = Coded(
            bits=0.0,
            reconstruction=output,
            encoding_time=0.0,
            decoding_time=0.0,
            estimated_bits=0.0,
            peak_mb=0.0,
            verification_peak_mb=0.0,
        )
        # Estimation coders have no decoding time, and so the tiles' total has none;
        # peaks are the largest tile's (None if the inner coder does not measure
        # its own).
        for top in range(0, padded.shape[1], self.tile):
            for left in range(0, padded.shape[2], self.tile):
                block = padded[
                    :, top : top + self.tile, left : left + self.tile
                ].contiguous()
                coded = self.inner.code(block)
                output[:, top : top + self.tile, left : left + self.tile] = (
                    coded.reconstruction
                )
                totals = replace(
                    totals,
                    bits=totals.bits + coded.bits,
                    encoding_time=totals.encoding_time + coded.encoding_time,
                    decoding_time=_add(totals.decoding_time, coded.decoding_time),
                    estimated_bits=_add(totals.estimated_bits, coded.estimated_bits),
                    peak_mb=_max(totals.peak_mb, coded.peak_mb),
                    verification_peak_mb=_max(
                        totals.verification_peak_mb, coded.verification_peak_mb
                    ),
                )
        return replace(totals, reconstruction=output[:, :height, :width].contiguous())


def _add(total: Optional[float], value: Optional[float]) -> Optional[float]:
    """Sum that stays None once a term is missing."""
    return None if total is None or value is None else total + value


def _max(peak: Optional[float], value: Optional[float]) -> Optional[float]:
    """Maximum that stays None once a term is missing."""
    return None if peak is None or value is None else max(peak, value)
