"""An opened image file's samples as 8-bit arrays, each read by the reader that reads
it right, with notes on what was changed (:func:`utils.image_io.read_image` reports
them):

* PNGs of 16-bit colour samples, or gray with alpha, which PIL misreads
  (:mod:`utils.png16`): decoded by torchvision;
* TIFFs of 16-bit colour samples: read by tifffile;
* the rest: read by PIL, 32-bit integer (mode I) samples refused unless they fit 16
  bits, PNM samples of another maximum value than 255 scaled by PIL itself.

16-bit samples are scaled to 8 bits as ``round(v / 257)``; an alpha channel or a
transparent colour is dropped; palettes and other colour models become RGB.
"""

import re
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from utils.png16 import check_png16_data, png_chunk

__all__ = ["FLOAT_MESSAGE", "error_reason", "read_samples"]


FLOAT_MESSAGE = (
    "floating-point images are not supported; save the image as 8- or 16-bit PNG"
)
_SCALED = "16-bit samples scaled to 8 bits"
# What each reader of samples returns: (H, W) or (H, W, 3) uint8 samples, the mode
# read, whether the image is grayscale, and notes on what was changed.
_Samples = Tuple[np.ndarray, str, bool, List[str]]
_GRAY_MODES = frozenset({"1", "L", "LA", "La"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_RGB_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa"})


def _to_8bit(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f":
        raise ValueError(FLOAT_MESSAGE)
    # 32-bit integer images (PIL mode I) share the mode of 16-bit grayscale PNGs; only
    # values that fit 16 bits can be scaled as 16-bit samples, and clipping the rest
    # would code a different picture.
    if array.size and (int(array.min()) < 0 or int(array.max()) > 65535):
        raise ValueError(
            f"integer samples from {int(array.min())} to {int(array.max())} "
            "do not fit 16 bits; save the image as 8- or 16-bit PNG"
        )
    # round(v / 257) in integers (v / 257 is never halfway for an integer v), with
    # 4-byte temporaries instead of float64 ones, a few megabytes at a time so that
    # reading holds no more than utils.image_io.READ_BYTES_PER_PIXEL.
    scaled = np.empty(array.shape, np.uint8)
    step = max(1, (1 << 20) // max(1, array[0].size))
    for start in range(0, len(array), step):
        samples = array[start : start + step].astype(np.uint32)
        samples += 128
        samples //= 257
        scaled[start : start + step] = samples
    return scaled


def error_reason(exc: BaseException) -> str:
    """``exc``'s message on one line, without the file name that PIL and the OS put in
    theirs: the caller names the file once."""
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image file of a format PIL reads"
    if isinstance(exc, OSError) and exc.filename is not None:
        return exc.strerror or type(exc).__name__
    return " ".join(str(exc).split()) or type(exc).__name__


def _png16_samples(opened: Image.Image, path: str, colour_type: int) -> _Samples:
    """A PNG that :func:`utils.png16.colour_png16_type` names, decoded by
    torchvision; its EXIF is put where ``opened.getexif()`` finds it without decoding
    the image again (PIL finds an eXIf chunk after the pixels only so)."""
    from torchvision.io import ImageReadMode, decode_png

    data = np.fromfile(path, np.uint8)
    check_png16_data(data)
    gray = colour_type == 4
    try:
        samples = decode_png(
            torch.from_numpy(data), ImageReadMode.GRAY if gray else ImageReadMode.RGB
        )
    except RuntimeError as exc:
        # torchvision prefixes the C++ function and source line: not the user's concern.
        reason = re.sub(r"^.*?\.cpp:\d+,\s*", "", (str(exc).splitlines() or [""])[0])
        raise ValueError(reason) from None
    if "exif" not in opened.info:
        opened.info["exif"] = png_chunk(data, b"eXIf") or b""
    planes = samples.numpy()
    array = _to_8bit(planes[0] if gray else planes.transpose(1, 2, 0))
    mode = {2: "RGB;16", 4: "LA;16", 6: "RGBA;16"}[colour_type]
    return array, mode, gray, ["alpha channel dropped"] * (colour_type > 2) + [_SCALED]


def _tiff16_samples(path: str) -> _Samples:
    """A TIFF of 16-bit colour samples (found from its header by
    :mod:`utils.image_io`), read by tifffile (installed with scikit-image, which
    requirements.txt pins)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages[0]
            samples, axes, photometric = page.asarray(), page.axes, page.photometric
    except MemoryError:
        raise
    except Exception as exc:  # tifffile fails in many ways (codecs, tags, truncation)
        raise ValueError(f"{type(exc).__name__}: {error_reason(exc)}") from None
    if axes == "SYX":  # one plane per channel
        samples = np.moveaxis(samples, 0, -1)
    if photometric != 2 or samples.ndim != 3 or samples.shape[2] < 3:
        raise ValueError(
            "16-bit TIFF samples are supported for RGB only; save the image as "
            "16-bit PNG"
        )
    notes = ["alpha channel dropped"] * (samples.shape[2] > 3) + [_SCALED]
    return _to_8bit(samples[:, :, :3]), "RGB;16", False, notes


def _pnm_scale_note(image: Image.Image) -> Optional[str]:
    """The note for PNM samples whose maximum value is not 255, which PIL scales to 8
    bits itself (16 bits as ``round(v / 257)``, as :func:`_to_8bit`), or None."""
    for codec, _, _, args in getattr(image, "tile", ()):
        if codec in ("ppm", "ppm_plain") and image.mode != "1":
            maxval = args[1]
            if maxval == 65535:
                return _SCALED
            if maxval > 255 or 255 % maxval:  # 1, 3, 15...: exact, as 2- or 4-bit PNG
                return f"samples of maximum value {maxval} scaled to 8 bits"
    return None


def _pil_samples(image: Image.Image) -> _Samples:
    """An image that PIL reads right."""
    scale_note = _pnm_scale_note(image)  # before load() clears the tiles
    width, height = image.size
    for tile in getattr(image, "tile", ()):
        if tile[1][2] > width or tile[1][3] > height:
            # PIL 13 swaps the size of an uncompressed grayscale TIFF whose EXIF
            # orientation turns it a quarter, but not its data: the pixels would be
            # scrambled.
            raise ValueError(
                f"PIL misreads this {image.format} file (its data is laid out for "
                f"{tile[1][2]}x{tile[1][3]} pixels, its size says {width}x{height}); "
                "save the image as PNG"
            )
    image.load()
    mode = image.mode
    notes = []
    if mode in _ALPHA_MODES or "transparency" in image.info:
        notes.append("alpha channel dropped")
    if mode.startswith("I"):
        return _to_8bit(np.asarray(image)), mode, True, notes + [scale_note or _SCALED]
    notes += [scale_note] if scale_note else []
    if mode in _GRAY_MODES:
        return np.asarray(image.convert("L")), mode, True, notes
    if mode in ("P", "PA"):
        notes.append("palette converted to RGB")
    elif mode not in _RGB_MODES:
        notes.append(f"{mode} colours converted to RGB")
    return np.asarray(image.convert("RGB")), mode, False, notes


def read_samples(
    opened: Image.Image, path: str, colour_type: Optional[int], tiff16: bool
) -> _Samples:
    """(H, W) or (H, W, 3) uint8 samples of the image ``opened`` from ``path``, the
    mode read, whether it is grayscale, and notes on what was changed.

    ``colour_type`` is that of a 16-bit PNG PIL misreads
    (:func:`utils.png16.colour_png16_type`, None for any other file), ``tiff16``
    whether the file is a TIFF of 16-bit colour samples.
    """
    if colour_type is not None:
        return _png16_samples(opened, path, colour_type)
    if tiff16:
        return _tiff16_samples(path)
    return _pil_samples(opened)
