"""The ``.cps`` file format: one compressed image, self-describing and checksummed.

All integers are big-endian. Version 1:

======  ======  ==========================================================
offset  bytes   field
======  ======  ==========================================================
0       4       magic ``b"CPS\\x89"``
4       1       format version (1)
5       1       flags: bit 0 entropy-coder order (0 wavefront, 1 raster),
                bit 1 grayscale source (decode to one channel)
6       4       original height H (pixels)
10      4       original width W
14      2       bottom padding (replicated rows added before coding)
16      2       right padding (replicated columns)
18      1       length L of the architecture name
19      L       architecture name (ASCII, e.g. ``cps``)
19+L    8       model fingerprint (:func:`model_fingerprint`)
27+L    4       CRC-32 of the decoded latent y_hat (float32 bytes)
31+L    4       length of the hyperprior string, then the string (rANS, z)
..      4       length of the latent string, then the string (rANS, y)
end-4   4       CRC-32 of every byte before it
======  ======  ==========================================================

The trailing CRC turns truncation and corruption into an error. The fingerprint
makes decoding with another checkpoint an error instead of garbage pixels. The
y_hat CRC lets the decoder prove it rebuilt the encoder's latent exactly: a
machine whose floating-point results differ from the encoder's (see CompressAI
issues 54, 279, 320) gets an error, never a picture with black blocks.
"""

import hashlib
import struct
import zlib
from dataclasses import dataclass

import torch
from torch import nn

MAGIC = b"CPS\x89"
VERSION = 1
ORDER_FLAGS = {"wavefront": 0, "raster": 1}
_GRAYSCALE_FLAG = 2
_FIXED = struct.Struct(">4sBBIIHH")


class BitstreamError(ValueError):
    """A ``.cps`` file that cannot be decoded (foreign, truncated, corrupted, mismatched)."""


@dataclass
class CompressedImage:
    """Everything the decoder needs, plus the encoder's rate estimate (not stored)."""

    height: int
    width: int
    pad_bottom: int
    pad_right: int
    architecture: str
    fingerprint: bytes
    order: str
    grayscale: bool
    y_hat_crc: int
    z_string: bytes
    y_string: bytes
    estimated_bits: float = float("nan")


def model_fingerprint(model: nn.Module) -> bytes:
    """First 8 bytes of a SHA-256 over every named tensor of the model's state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()[:8]


def tensor_crc(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's float32 bytes in row-major order, whatever its layout.

    Computed one slice of the first dimension at a time, so a latent stored
    channels-last is not copied whole.
    """
    crc = 0
    for part in tensor.detach().reshape(-1, *tensor.shape[-2:]) if tensor.dim() > 2 else [tensor]:
        crc = zlib.crc32(part.float().cpu().contiguous().numpy(), crc)
    return crc


def pack(image: CompressedImage) -> bytes:
    """Serialise ``image`` to the bytes of a ``.cps`` file."""
    name = image.architecture.encode("ascii")
    flags = ORDER_FLAGS[image.order] | (_GRAYSCALE_FLAG if image.grayscale else 0)
    parts = [
        _FIXED.pack(MAGIC, VERSION, flags, image.height, image.width,
                    image.pad_bottom, image.pad_right),
        struct.pack(">B", len(name)), name, image.fingerprint,
        struct.pack(">I", image.y_hat_crc),
        struct.pack(">I", len(image.z_string)), image.z_string,
        struct.pack(">I", len(image.y_string)), image.y_string,
    ]
    body = b"".join(parts)
    return body + struct.pack(">I", zlib.crc32(body))


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.position = data, 0

    def take(self, count: int) -> bytes:
        if self.position + count > len(self.data):
            raise BitstreamError("truncated .cps file")
        chunk = self.data[self.position:self.position + count]
        self.position += count
        return chunk

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size))


def unpack(data: bytes) -> CompressedImage:
    """Parse the bytes of a ``.cps`` file; raise :class:`BitstreamError` if invalid."""
    if len(data) < 4 or data[:4] != MAGIC:
        raise BitstreamError("not a .cps file (bad magic number)")
    if len(data) < _FIXED.size + 4:
        raise BitstreamError("truncated .cps file")
    version = data[4]
    if version != VERSION:
        raise BitstreamError(f".cps format version {version} is not supported (this code reads {VERSION})")
    body, (stored_crc,) = data[:-4], struct.unpack(">I", data[-4:])
    if zlib.crc32(body) != stored_crc:
        raise BitstreamError("corrupted or truncated .cps file (checksum mismatch)")
    reader = _Reader(body)
    _, _, flags, height, width, pad_bottom, pad_right = reader.unpack(_FIXED.format)
    (name_length,) = reader.unpack(">B")
    architecture = reader.take(name_length).decode("ascii", errors="replace")
    fingerprint = reader.take(8)
    (y_hat_crc,) = reader.unpack(">I")
    z_string = reader.take(reader.unpack(">I")[0])
    y_string = reader.take(reader.unpack(">I")[0])
    if reader.position != len(body):
        raise BitstreamError("corrupted .cps file (trailing bytes)")
    orders = {value: key for key, value in ORDER_FLAGS.items()}
    return CompressedImage(height=height, width=width, pad_bottom=pad_bottom, pad_right=pad_right,
                           architecture=architecture, fingerprint=fingerprint,
                           order=orders[flags & 1], grayscale=bool(flags & _GRAYSCALE_FLAG),
                           y_hat_crc=y_hat_crc, z_string=z_string, y_string=y_string)
