"""Reading any image file as 8-bit RGB, writing PNGs atomically, and 8-bit <-> float.

CPS codes 8-bit RGB. Other inputs are converted, and the conversion is reported in
:class:`ImageInfo` so that callers can warn about it:

* grayscale (L, I, I;16): replicated to three channels for coding and marked so the
  decoder writes a grayscale PNG again;
* 16-bit samples: scaled to 8 bits (``round(v / 257)``);
* palette (P) and CMYK/YCbCr: converted to RGB;
* an alpha channel (RGBA, LA, PA): dropped, because CPS does not code transparency;
* an EXIF orientation: applied, so the image is coded as viewers show it;
* several frames (an animated GIF, a multi-page TIFF): the first is coded.
"""

import io
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from utils.atomic import atomic_write_bytes

# Formats Pillow only identifies: decoding them needs an external handler or program.
_IDENTIFY_ONLY_FORMATS = frozenset({"BUFR", "GRIB", "HDF5", "WMF", "MPEG", "EPS"})
# File suffixes (lower case) of the formats Pillow decodes, and so :func:`read_image`:
# training folders and evaluation datasets both list their images by this one set.
IMAGE_SUFFIXES = frozenset(
    suffix.lower()
    for suffix, image_format in Image.registered_extensions().items()
    if image_format in Image.OPEN and image_format not in _IDENTIFY_ONLY_FORMATS
)


# PIL modes of 8-bit samples, which PIL's own convert("RGB") turns into RGB exactly;
# other modes (16- and 32-bit integers, floats) need :func:`read_image`'s rules.
EIGHT_BIT_MODES = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La", "RGBa"}
)


def is_image_file(name: str) -> bool:
    """Whether ``name`` has the suffix of a format :func:`read_image` reads."""
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


@dataclass
class ImageInfo:
    """What :func:`read_image` found and what it changed."""

    mode: str
    grayscale: bool
    conversions: List[str] = field(default_factory=list)


_FLOAT_MESSAGE = (
    "floating-point images are not supported; save the image as 8- or 16-bit PNG"
)


def _to_8bit(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f":
        raise ValueError(_FLOAT_MESSAGE)
    # 32-bit integer images (PIL mode I) share the mode of 16-bit grayscale PNGs; only
    # values that fit 16 bits can be scaled as 16-bit samples, and clipping the rest
    # would code a different picture.
    if array.size and (int(array.min()) < 0 or int(array.max()) > 65535):
        raise ValueError(
            f"integer samples from {int(array.min())} to {int(array.max())} "
            "do not fit 16 bits; save the image as 8- or 16-bit PNG"
        )
    # round(v / 257) in integers (v / 257 is never halfway for an integer v), with
    # 4-byte temporaries instead of float64 ones.
    samples = array.astype(np.uint32)
    samples += 128
    samples //= 257
    return samples.astype(np.uint8)


# Bytes per pixel that reading an image may hold at once: PIL's decoded buffer (up to
# four 8-bit channels, or 16-bit samples) and the RGB tensor made from it.
READ_BYTES_PER_PIXEL = 8 + 3


def image_size(path: str) -> Tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels; a file
    that is not an image, or one whose header already says :func:`read_image` will
    refuse it (floating-point samples), is a ``ValueError`` here, so that callers can
    check every input before coding the first."""
    if not os.path.isfile(path):
        raise ValueError(f"image not found: {path}")
    try:
        # PIL warns about large images on opening; the caller checks the size itself.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.mode == "F":
                    raise ValueError(_FLOAT_MESSAGE)
                return image.size
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types with three colour samples: RGB (2) and RGBA (6).
_PNG_COLOUR_TYPES = (2, 6)


# Bytes of a file that :func:`colour_png16_type` reads: the signature and
# the IHDR chunk.
_PNG_HEADER_BYTES = 26


def colour_png16_type(header: bytes) -> Optional[int]:
    """The PNG colour type (RGB 2, RGBA 6) if ``header``, the first bytes of a file, is
    that of a PNG of 16-bit colour samples (read from its IHDR chunk); None for
    anything else. Callers that hold the file's bytes pass them, without reopening it.

    PIL has no 16-bit RGB mode and reads these by keeping each sample's high byte
    (``v >> 8``); they are decoded by torchvision instead, so that they are scaled as
    the module doc says.
    """
    header = header[:_PNG_HEADER_BYTES]
    if (
        len(header) == _PNG_HEADER_BYTES
        and header[:8] == _PNG_SIGNATURE
        and header[12:16] == b"IHDR"
        and header[24] == 16
        and header[25] in _PNG_COLOUR_TYPES
    ):
        return header[25]
    return None


def _read_16bit_colour_png(path: str, colour_type: int) -> Tuple[Tensor, ImageInfo]:
    from torchvision.io import ImageReadMode, decode_png, read_file

    try:
        samples = decode_png(read_file(path), ImageReadMode.RGB)
    except RuntimeError as exc:
        # torchvision prefixes the C++ function and source line: not the user's concern.
        reason = re.sub(r"^.*?\.cpp:\d+,\s*", "", (str(exc).splitlines() or [""])[0])
        raise ValueError(f"cannot read image {path}: {reason}") from None
    image = torch.from_numpy(_to_8bit(samples.numpy()))
    info = ImageInfo(
        mode="RGB;16", grayscale=False, conversions=["16-bit samples scaled to 8 bits"]
    )
    if colour_type == 6:
        info.conversions.insert(0, "alpha channel dropped")
    return image, info


_EXIF_ORIENTATION = 0x0112


def _as_viewed(opened: Image.Image) -> Tuple[Image.Image, List[str]]:
    """The frame a viewer shows first, turned as its EXIF orientation says, and notes
    on what that changed (PIL sets ``n_frames`` on multi-frame formats only)."""
    notes = []
    frames = getattr(opened, "n_frames", 1)
    if frames > 1:
        notes.append(f"the first of its {frames} frames coded")
    if opened.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        notes.append("rotated or flipped as its EXIF orientation says")
        return ImageOps.exif_transpose(opened), notes
    return opened, notes


def read_image(path: str) -> Tuple[Tensor, ImageInfo]:
    """Return the image at ``path`` as a uint8 tensor (3, H, W).

    Also returns what was converted.
    """
    if not os.path.isfile(path):
        raise ValueError(f"image not found: {path}")
    with open(path, "rb") as handle:
        colour_type = colour_png16_type(handle.read(_PNG_HEADER_BYTES))
    if colour_type is not None:
        return _read_16bit_colour_png(path, colour_type)
    try:
        # PIL warns about images over 89 Mpx; the codec's memory budget decides instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened:
            image, notes = _as_viewed(opened)
            image.load()
            mode = image.mode
            gray = mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L")
            info = ImageInfo(mode=mode, grayscale=gray, conversions=notes)
            if mode in ("RGBA", "LA", "PA") or (
                mode == "P" and "transparency" in image.info
            ):
                info.conversions.append("alpha channel dropped")
            if mode == "P":
                info.conversions.append("palette converted to RGB")
                image = image.convert("RGB")
            if mode.startswith("I"):
                array = _to_8bit(np.asarray(image))
                info.conversions.append("16-bit samples scaled to 8 bits")
            elif mode == "F":
                raise ValueError(_FLOAT_MESSAGE)
            elif info.grayscale:
                array = np.asarray(image.convert("L"))
            else:
                array = np.asarray(image.convert("RGB"))
    except ValueError as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    except (OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    if array.ndim == 2:
        array = np.broadcast_to(array[:, :, None], (*array.shape, 3))
    # One copy, straight from PIL's (H, W, 3) array to a writable (3, H, W) tensor (a
    # 1x1 image's transpose is contiguous already, and PIL's buffer read-only).
    planes = np.ascontiguousarray(array.transpose(2, 0, 1))
    if not planes.flags.writeable:
        planes = planes.copy()
    return torch.from_numpy(planes), info


def write_png(path: str, image: Tensor) -> None:
    """Write a uint8 tensor (1 or 3, H, W) as PNG, atomically."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"expected a uint8 tensor (1 or 3, H, W), "
            f"got {image.dtype} {tuple(image.shape)}"
        )
    array = image.permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def to_grayscale(image: Tensor) -> Tensor:
    """Mean of the three channels of a uint8 (..., 3, H, W) tensor, rounded.

    Returns (..., 1, H, W).
    """
    return image.float().mean(dim=-3, keepdim=True).round_().to(torch.uint8)


def to_unit_float(image: Tensor) -> Tensor:
    """uint8 samples to float32 in [0, 1] (any shape)."""
    return image.float().div_(255.0)


def to_uint8(image: Tensor) -> Tensor:
    """Samples in [0, 1] (any shape, any float dtype) to rounded, clamped uint8: the one
    float -> 8-bit conversion of every decoder and evaluation path."""
    return image.float().clamp(0, 1).mul(255.0).round_().to(torch.uint8)
