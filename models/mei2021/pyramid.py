"""The image pyramid of the spatially scalable Mei et al. 2021 model.

:func:`image_pyramid` builds the spatial model's inputs from each training crop on
the fly, so no pre-processed dataset is needed. The authors do not say how their
pyramid files were made; we downsample the full-resolution image directly to each
level with PyTorch's **antialiased bicubic** filter (``antialias=True``, i.e. a
bicubic kernel stretched by the scale factor, as PIL's ``Image.BICUBIC`` resize),
clamped to [0, 1]. :func:`reference_pyramid` gives the 8-bit images the spatial
layers are measured against, and :func:`pyramid_sizes` their sizes.
"""

import math
from typing import List, Tuple

import torch.nn.functional as F
from torch import Tensor

from utils.image_io import to_uint8, to_unit_float
from utils.stitching.patches import pad_replicate

__all__ = ["pyramid_sizes", "image_pyramid", "reference_pyramid"]


def pyramid_sizes(height: int, width: int, levels: int) -> List[Tuple[int, int]]:
    """Size of every pyramid level of a ``height x width`` image, coarsest first.

    Level j (counted from the top) has ``ceil(height / 2^j) x ceil(width / 2^j)``
    pixels: the decoded image of spatial layer k is cropped to this size, and its
    rate is counted over these pixels.
    """
    if height <= 0 or width <= 0 or levels < 1:
        raise ValueError(
            f"need a positive image size and level count, got {height}x{width}, "
            f"{levels} levels"
        )
    return [
        (math.ceil(height / 2**j), math.ceil(width / 2**j))
        for j in range(levels - 1, -1, -1)
    ]


def image_pyramid(x: Tensor, levels: int) -> List[Tensor]:
    """Antialiased-bicubic pyramid of ``x`` (B, 3, H, W) in [0, 1], coarsest first.

    H and W must be multiples of ``2^(levels-1)`` so that every level halves exactly;
    the last level is ``x`` itself (not a copy).
    """
    factor = 2 ** (levels - 1)
    height, width = x.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(
            f"a {levels}-level pyramid needs sides that are multiples of {factor}, "
            f"got {height}x{width}"
        )
    out = []
    for j in range(levels - 1, 0, -1):
        size = (height // 2**j, width // 2**j)
        level = F.interpolate(
            x, size=size, mode="bicubic", antialias=True, align_corners=False
        )
        out.append(level.clamp(0, 1))
    out.append(x)
    return out


def reference_pyramid(image: Tensor, levels: int, multiple: int) -> List[Tensor]:
    """The uint8 image each spatial layer is measured against, coarsest first.

    ``image`` (3, H, W) uint8 is padded to ``multiple`` exactly as the encoder pads
    it (replicating the last row and column), its pyramid is built, and level k is
    cropped to ``pyramid_sizes(H, W)[k]``.
    """
    height, width = image.shape[-2:]
    padded = to_unit_float(pad_replicate(image, multiple))[None]
    levels_ = image_pyramid(padded, levels)
    return [
        to_uint8(level[0, :, :h, :w])
        for level, (h, w) in zip(levels_, pyramid_sizes(height, width, levels))
    ]
