"""EXIF orientation: which of the eight turns makes an image upright, and applying
it, for evaluation (:func:`utils.image_io.read_image`, on sample arrays) and training
(:func:`upright_rgb`, on PIL images) alike, so that a photo is coded and trained on
as viewers show it. A value outside 1 to 8, or EXIF data PIL cannot parse, leaves
the image as stored, with a note that says so.
"""

import reprlib
from typing import List, Tuple

import numpy as np
from PIL import Image

__all__ = ["ARRAY_TURNS", "exif_orientation", "upright_rgb"]

_EXIF_ORIENTATION = 0x0112
# EXIF orientations 2 to 8 as what turns (H, W, ...) samples upright, as
# PIL.ImageOps.exif_transpose does, but on views of the array.
ARRAY_TURNS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a),
}

# ARRAY_TURNS as PIL's transpositions (PIL's rotations are counter-clockwise).
_PIL_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(opened: Image.Image) -> Tuple[int, List[str]]:
    """The EXIF orientation to apply (1: none) and the note that says so."""
    try:
        value = opened.getexif().get(_EXIF_ORIENTATION, 1)
    except MemoryError:
        raise
    except Exception:  # PIL's EXIF parser fails in many ways on damaged data
        return 1, ["EXIF data unreadable, so its orientation was ignored"]
    if type(value) is int and value in ARRAY_TURNS:
        return value, ["rotated or flipped as its EXIF orientation says"]
    if value == 1:
        return 1, []
    return 1, [f"EXIF orientation {reprlib.repr(value)} is not 1 to 8, so ignored"]


def upright_rgb(image: Image.Image) -> Image.Image:
    """``image`` (opened, one PIL reads right: :func:`utils.image_io.pil_reads_right`)
    in RGB, turned as :func:`utils.image_io.read_image` turns it: by its EXIF
    orientation, under the same rules (:func:`exif_orientation`)."""
    rgb = image.convert("RGB")
    # After decoding: a PNG's eXIf chunk may follow the pixels.
    turn, _ = exif_orientation(image)
    # PIL's own transpose: one copy, where the arrays of ARRAY_TURNS take three.
    return rgb if turn == 1 else rgb.transpose(_PIL_TURNS[turn])
