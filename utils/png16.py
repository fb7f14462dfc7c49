"""PNG files of 16-bit samples that PIL reads wrongly: finding them from the first
bytes, and checking their image data before torchvision decodes them.

PIL has no mode of several 16-bit channels: it reads 16-bit RGB, RGBA and gray with
alpha by keeping one byte of each sample. :mod:`utils.image_samples` decodes these with
torchvision instead, whose libpng only warns when the image data is shorter than the
header says, and then crashes the process: :func:`check_png16_data` refuses such a
file first.
"""

import zlib
from typing import Iterator, Optional, Tuple

import numpy as np

__all__ = [
    "PNG_HEADER_BYTES",
    "colour_png16_type",
    "check_png16_data",
    "png_chunk",
]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types of 16-bit samples that PIL reads by keeping one byte of each: RGB
# (2), gray with alpha (4, which PIL opens as RGBA) and RGBA (6); 16-bit gray (0) it
# reads whole, as mode I;16.
_PNG16_MISREAD_TYPES = (2, 4, 6)
# Bytes of a file that :func:`colour_png16_type` reads: the signature and IHDR chunk.
PNG_HEADER_BYTES = 26


def colour_png16_type(header: bytes) -> Optional[int]:
    """The PNG colour type (RGB 2, gray with alpha 4, RGBA 6) if ``header``, the first
    bytes of a file, is that of a PNG of 16-bit samples that PIL misreads (read from
    its IHDR chunk); None for anything else. Callers that hold the file's bytes pass
    them, without reopening it.

    PIL has no 16-bit mode of several channels and reads these by keeping one byte of
    each sample; they are decoded by torchvision instead, so that they are scaled as
    :mod:`utils.image_io` says.
    """
    header = header[:PNG_HEADER_BYTES]
    if (
        len(header) == PNG_HEADER_BYTES
        and header[:8] == _PNG_SIGNATURE
        and header[12:16] == b"IHDR"
        and header[24] == 16
        and header[25] in _PNG16_MISREAD_TYPES
    ):
        return header[25]
    return None


def _png_chunks(data: np.ndarray) -> Iterator[Tuple[bytes, np.ndarray]]:
    """(type, content) of each chunk of the PNG file ``data``, up to IEND."""
    offset = len(_PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length = int.from_bytes(data[offset : offset + 4].tobytes(), "big")
        name = data[offset + 4 : offset + 8].tobytes()
        yield name, data[offset + 8 : offset + 8 + length]
        if name == b"IEND":
            return
        offset += 12 + length


# Samples per pixel of each PNG colour type, and the Adam7 passes (first column and
# row, column and row steps) of an interlaced image.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


def _png16_data_bytes(header: bytes) -> int:
    """Bytes of filtered scanlines that a PNG of 16-bit samples with the IHDR content
    ``header`` must decompress to: one filter byte per row of every pass."""
    width = int.from_bytes(header[0:4], "big")
    height = int.from_bytes(header[4:8], "big")
    pixel_bytes = 2 * _PNG_CHANNELS[header[9]]
    passes = _ADAM7 if header[12] == 1 else ((0, 0, 1, 1),)
    total = 0
    for column, row, column_step, row_step in passes:
        columns = max(0, -(-(width - column) // column_step))
        rows = max(0, -(-(height - row) // row_step))
        if columns and rows:
            total += rows * (1 + columns * pixel_bytes)
    return total


def check_png16_data(data: np.ndarray) -> None:
    """Refuse a 16-bit PNG whose image data is shorter than its header says (damaged
    or cut inside its last IDAT chunk), before torchvision decodes it: libpng only
    warns about it, and torchvision then crashes the process. The data is
    decompressed a piece at a time, up to the size needed, and not kept."""
    header = png_chunk(data, b"IHDR") or b""
    if len(header) != 13:
        raise ValueError("damaged PNG header (IHDR)")
    needed = _png16_data_bytes(header)
    inflate, found = zlib.decompressobj(), 0
    try:
        for name, content in _png_chunks(data):
            if name != b"IDAT":
                continue
            pending = content.tobytes()
            while pending and found < needed:
                found += len(inflate.decompress(pending, 1 << 20))
                pending = inflate.unconsumed_tail
            if found >= needed:
                return
    except zlib.error as exc:
        raise ValueError(f"damaged image data ({exc})") from None
    raise ValueError(
        f"the image data holds {found} of the {needed} bytes its header says "
        "(a damaged or truncated file)"
    )


def png_chunk(data: np.ndarray, kind: bytes) -> Optional[bytes]:
    """The content of the first ``kind`` chunk of the PNG file ``data``, or None."""
    for name, content in _png_chunks(data):
        if name == kind:
            return content.tobytes()
    return None
