"""Reading any image file as 8-bit RGB, writing PNGs atomically, and 8-bit <-> float.

CPS codes 8-bit RGB. Other inputs are converted, and every conversion is reported in
:class:`ImageInfo` so that callers can warn about it:

* grayscale (1-, 2-, 4-, 8- or 16-bit, with or without alpha): replicated to three
  channels for coding and marked so the decoder writes a grayscale PNG again;
* 16-bit samples (PNG, TIFF, PNM): scaled to 8 bits (``round(v / 257)``); PNM samples
  of another maximum value are scaled by PIL;
* palette (P, PA) and other colour models (CMYK, YCbCr...): converted to RGB;
* an alpha channel or a transparent colour: dropped, because CPS does not code
  transparency;
* an EXIF orientation (2 to 8): applied, so the image is coded as viewers show it; a
  value outside 1 to 8 is ignored, with a note that says so;
* several frames (an animated GIF, a multi-page TIFF): the first is coded.

What cannot be read exactly is refused with a ``ValueError`` naming the file:
floating-point samples, integers wider than 16 bits, colour samples of other depths
than 8 and 16 bits. The size limits are the repository's own, not PIL's
decompression-bomb limit (about 179 Mpx): the sides the .cps/.cpsl formats hold
(:func:`utils.coding.payload.check_size`), checked from the header before
decoding, and the memory budget, which callers check against
:data:`READ_BYTES_PER_PIXEL` times :func:`image_size`. Each format's samples are read
by :mod:`utils.image_samples`.
"""

import io
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Tuple, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from utils.atomic import atomic_write_bytes
from utils.coding.payload import check_size
from utils.image_samples import FLOAT_MESSAGE, error_reason, read_samples
from utils.input_files import check_is_file
from utils.orientation import ARRAY_TURNS, exif_orientation
from utils.png16 import PNG_HEADER_BYTES, colour_png16_type

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


# Bytes per pixel that reading an image may hold at once: the decoded buffer (up to
# four 8-bit channels in PIL, or four 16-bit samples) and the RGB array made from it.
READ_BYTES_PER_PIXEL = 8 + 3

_S = TypeVar("_S")
_T = TypeVar("_T")
_PIL_LIMIT_LOCK = threading.Lock()


def beyond_pil_limit(read: Callable[[_S], _T], source: _S) -> _T:
    """``read(source)``, whatever PIL's decompression-bomb limit says; ``read`` opens
    ``source`` (a path, or bytes) with PIL afresh at each call.

    PIL refuses to open an image over twice ``Image.MAX_IMAGE_PIXELS`` (about 179 Mpx)
    and warns over it; :func:`_check_header` and the caller's memory budget decide
    instead (and a classical codec's own file, decoded back, is as large as the image
    read). The limit is one process-wide setting, so it is lifted only to read a file
    PIL refused, under a lock, and restored at once.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return read(source)
        except Image.DecompressionBombError:
            pass
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return read(source)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_header(image: Image.Image) -> bool:
    """Refuse, from the header alone, an image :func:`read_image` cannot read right:
    floating-point samples, a side the .cps/.cpsl formats cannot hold, colour samples
    wider than 8 bits that only PIL could read (:func:`_wide_colour_tiff`). True for
    a TIFF of 16-bit colour samples, which tifffile reads instead."""
    if image.mode == "F":
        raise ValueError(FLOAT_MESSAGE)
    width, height = image.size
    check_size(height, width)
    return _wide_colour_tiff(image)


def _wide_colour_tiff(image: Image.Image) -> bool:
    """True for a TIFF of 16-bit colour samples; ``ValueError`` for colour samples of
    another width over 8 bits; False for the rest.

    PIL has no mode for wide colour samples and reads them by keeping one byte of each;
    16-bit PNGs are decoded apart (:mod:`utils.png16`), and PNM ones PIL scales right
    itself (the "ppm" decoders).
    """
    if image.mode.startswith("I") or image.format == "PNG":
        return False
    if image.format == "TIFF":
        bits = image.tag_v2.get(258, 1)  # BitsPerSample, one value per channel
        bits = tuple(bits) if isinstance(bits, tuple) else (bits,)
        if max(bits) <= 8:
            return False
        if set(bits) == {16}:
            return True
        raise ValueError(
            f"TIFF samples of {'/'.join(map(str, bits))} bits are not supported; "
            "save the image as 8- or 16-bit PNG"
        )
    for codec, _, _, args in getattr(image, "tile", ()):
        rawmode = args if isinstance(args, str) else (args or ("",))[0]
        if codec == "SGI16" or (isinstance(rawmode, str) and ";16" in rawmode):
            raise ValueError(
                f"16-bit colour samples of {image.format} images are not supported; "
                "save the image as 16-bit PNG"
            )
    return False


def pil_reads_right(image: Image.Image, header: bytes) -> bool:
    """Whether PIL's ``convert("RGB")`` gives the samples of ``image`` (opened, not
    decoded; ``header`` the first bytes of its file) as :func:`read_image` would:
    8-bit samples, not 16-bit ones that PIL reads by keeping one byte of each (PNG
    colour or gray with alpha, TIFF colour) and :func:`read_image` scales or refuses.
    """
    if image.mode not in EIGHT_BIT_MODES or colour_png16_type(header) is not None:
        return False
    try:
        return not _wide_colour_tiff(image)
    except ValueError:
        return False


def image_size(path: str) -> Tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels; a file
    that is not an image, or one whose header already says :func:`read_image` will
    refuse it (see :func:`_check_header`), is a ``ValueError`` here, so that callers
    can check every input before coding the first."""
    check_is_file(path, "image")

    def header(name: str) -> Tuple[int, int]:
        with Image.open(name) as image:
            _check_header(image)
            return image.size

    try:
        return beyond_pil_limit(header, path)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {error_reason(exc)}") from None


def _decode(path: str) -> Tuple[np.ndarray, ImageInfo, int]:
    """(H, W[, 3]) uint8 samples, what was found and changed, and the orientation."""
    with open(path, "rb") as handle:
        colour_type = colour_png16_type(handle.read(PNG_HEADER_BYTES))
    with Image.open(path) as opened:
        tiff16 = _check_header(opened)
        frames = getattr(opened, "n_frames", 1)  # multi-frame formats only
        notes = [f"the first of its {frames} frames coded"] if frames > 1 else []
        array, mode, gray, found = read_samples(opened, path, colour_type, tiff16)
        turn, turned = exif_orientation(opened)
    return array, ImageInfo(mode, gray, notes + turned + found), turn


def read_image(path: str) -> Tuple[Tensor, ImageInfo]:
    """Return the image at ``path`` as a uint8 tensor (3, H, W), turned upright.

    Also returns what was converted. Raises ``ValueError`` naming the file for one
    that cannot be read exactly (see the module doc).
    """
    check_is_file(path, "image")
    try:
        array, info, turn = beyond_pil_limit(_decode, path)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {error_reason(exc)}") from None
    if turn != 1:
        array = ARRAY_TURNS[turn](array)
    if array.ndim == 2:
        array = np.broadcast_to(array[:, :, None], (*array.shape, 3))
    # One copy, straight from the (H, W, 3) array to a writable (3, H, W) tensor (a
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
