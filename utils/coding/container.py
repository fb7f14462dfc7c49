"""The two file formats every model writes: ``.cps`` (one stream set) and
``.cpsl`` (layers).

One module owns both byte layouts, with one header reader, one CRC rule and one
set of size limits, so every model's files are checked the same way before any
allocation. The payloads it packs, and the checks a decoder runs on them, are
``utils/coding/payload.py``'s. All integers are big-endian.

``.cps``, version 1 (CPS, Kamisli 2024 and the CompressAI zoo models):

======  ======  ==========================================================
offset  bytes   field
======  ======  ==========================================================
0       4       magic ``b"CPS\\x89"``
4       1       format version (1)
5       1       flags: bit 0 entropy-coder order (0 wavefront, 1 raster),
                bit 1 grayscale source (decode to one channel), bit 2 the
                entropy model ran on the fixed-point grid, so the file decodes
                on any machine (``utils/coding/fixed_point.py``; CPS and Kamisli
                files from this flag on; without it, float32 as files written
                before);
                other bits 0
6       4       original height H (pixels)
10      4       original width W
14      2       bottom padding (rows added before coding)
16      2       right padding (columns added before coding)
18      1       length L of the architecture name
19      L       architecture name (ASCII, e.g. ``cps``)
19+L    8       model fingerprint (``payload.model_fingerprint``)
27+L    4       CRC-32 of the decoded latent y_hat (float32 bytes)
31+L    4       length of the hyperprior string, then the string (rANS, z)
..      4       length of the latent string, then the string (rANS, y)
end-4   4       CRC-32 of every byte before it
======  ======  ==========================================================

``.cpsl``, version 3 (the layered Mei 2021 models; versions 1 and 2 are still read):

======  ======  ================================================================
offset  bytes   field
======  ======  ================================================================
0       4       magic ``b"CPSL"``
4       1       format version (3)
5       1       S, number of layers stored (1..L); a prefix of the model's layers
6       1       L, number of layers of the model
7       4       original height H (pixels)
11      4       original width W
15      1       length n of the architecture name, then the name (ASCII)
16+n    8       model fingerprint
24+n    1       flags: bit 1 grayscale source (decode to one channel), as in
                ``.cps``; other bits 0 (versions 1 and 2 have no flags byte)
25+n    12*S    per stored layer: stream length, CRC-32 of the stream, CRC-32 of the
                layer's coded values (float32 bytes): the base latent or the
                residual exactly as rANS decodes it (symbols plus medians), the
                same on every machine; version 1 held the CRC of the layer's
                latent y^_k, which adds the decoder's float prediction
..      4       CRC-32 of the header (every byte above)
..      ..      the S streams, base first
======  ======  ================================================================

The CRCs turn truncation and corruption into an error. The fingerprint makes
decoding with another checkpoint an error instead of garbage pixels. The latent
CRCs let the decoder prove it rebuilt the encoder's latents exactly: a machine whose
floating-point results differ from the encoder's (CompressAI issues 54, 279, 320)
gets an error, never a picture with black blocks. (A ``.cpsl`` layer's values do not
depend on floating-point results, so its CRC checks the symbols; a version 1 file's
CRC covers the float prediction too, and such a file decodes only where the
encoder's float results are reproduced.) CompressAI zoo models do not
expose their decoded latent, so their files store 0 there and their decoder does
not check it. Dropping the top layers of a ``.cpsl`` file is a header rewrite
(:func:`truncate_layers`), so a server can serve lower operating points without
re-encoding.
"""

import struct
import zlib
from typing import List, Tuple

from utils.coding.payload import (
    BitstreamError,
    CompressedImage,
    LayeredImage,
    Payload,
    check_size,
)

MAGIC = b"CPS\x89"
LAYERED_MAGIC = b"CPSL"
VERSION = 1
_LAYERED_VERSIONS = (1, 2, 3)
# The first .cpsl version with a flags byte.
_LAYERED_FLAGS_VERSION = 3
ORDER_FLAGS = {"wavefront": 0, "raster": 1}
_GRAYSCALE_FLAG = 2
_FIXED_POINT_FLAG = 4
_KNOWN_FLAGS = 7
_FIXED = struct.Struct(">4sBBIIHH")
_LAYERED_FIXED = struct.Struct(">4sBBBIIB")
_LAYER = struct.Struct(">III")
_CRC = struct.Struct(">I")


def _with_crc(body: bytes) -> bytes:
    return body + _CRC.pack(zlib.crc32(body))


def _checked_body(data: bytes, what: str) -> bytes:
    """``data`` without its trailing CRC-32, which must match."""
    body = data[: -_CRC.size]
    if zlib.crc32(body) != _CRC.unpack(data[-_CRC.size :])[0]:
        raise BitstreamError(f"corrupted or truncated {what} (checksum mismatch)")
    return body


class _Reader:
    """Sequential reads that fail as a truncated file instead of reading short."""

    def __init__(self, data: bytes, kind: str):
        self.data, self.position, self.kind = data, 0, kind

    def take(self, count: int) -> bytes:
        if self.position + count > len(self.data):
            raise BitstreamError(f"truncated {self.kind} file")
        chunk = self.data[self.position : self.position + count]
        self.position += count
        return chunk

    def unpack(self, layout: struct.Struct):
        return layout.unpack(self.take(layout.size))

    def name(self) -> str:
        (length,) = struct.unpack(">B", self.take(1))
        return self.take(length).decode("ascii", errors="replace")


def _check_version(data: bytes, kind: str, supported: Tuple[int, ...]) -> None:
    if data[4] not in supported:
        readable = " and ".join(str(version) for version in supported)
        raise BitstreamError(
            f"{kind} format version {data[4]} is not supported (this code "
            f"reads {readable})"
        )


def _pack_image(image: CompressedImage) -> bytes:
    name = image.architecture.encode("ascii")
    flags = (
        ORDER_FLAGS[image.order]
        | (_GRAYSCALE_FLAG if image.grayscale else 0)
        | (_FIXED_POINT_FLAG if image.fixed_point else 0)
    )
    return _with_crc(
        b"".join(
            [
                _FIXED.pack(
                    MAGIC,
                    VERSION,
                    flags,
                    image.height,
                    image.width,
                    image.pad_bottom,
                    image.pad_right,
                ),
                struct.pack(">B", len(name)),
                name,
                image.fingerprint,
                _CRC.pack(image.y_hat_crc),
                struct.pack(">I", len(image.z_string)),
                image.z_string,
                struct.pack(">I", len(image.y_string)),
                image.y_string,
            ]
        )
    )


def _unpack_image(data: bytes) -> CompressedImage:
    if len(data) < _FIXED.size + _CRC.size:
        raise BitstreamError("truncated .cps file")
    _check_version(data, ".cps", (VERSION,))
    reader = _Reader(_checked_body(data, ".cps file"), ".cps")
    _, _, flags, height, width, pad_bottom, pad_right = reader.unpack(_FIXED)
    if flags & ~_KNOWN_FLAGS:
        raise BitstreamError(
            f"unknown .cps flag bits {flags:#04x}: written by a newer version"
        )
    check_size(height, width)
    architecture = reader.name()
    fingerprint = reader.take(8)
    (y_hat_crc,) = reader.unpack(_CRC)
    z_string = reader.take(reader.unpack(_CRC)[0])
    y_string = reader.take(reader.unpack(_CRC)[0])
    if reader.position != len(reader.data):
        raise BitstreamError("corrupted .cps file (trailing bytes)")
    orders = {value: key for key, value in ORDER_FLAGS.items()}
    return CompressedImage(
        height=height,
        width=width,
        pad_bottom=pad_bottom,
        pad_right=pad_right,
        architecture=architecture,
        fingerprint=fingerprint,
        order=orders[flags & 1],
        grayscale=bool(flags & _GRAYSCALE_FLAG),
        y_hat_crc=y_hat_crc,
        z_string=z_string,
        y_string=y_string,
        fixed_point=bool(flags & _FIXED_POINT_FLAG),
    )


def _layered_header(layered: LayeredImage, layers: List[tuple]) -> bytes:
    name = layered.architecture.encode("ascii")
    fixed = _LAYERED_FIXED.pack(
        LAYERED_MAGIC,
        layered.version,
        len(layers),
        layered.total_layers,
        layered.height,
        layered.width,
        len(name),
    )
    if layered.version >= _LAYERED_FLAGS_VERSION:
        flags = bytes([_GRAYSCALE_FLAG if layered.grayscale else 0])
    elif layered.grayscale:
        raise ValueError(
            f".cpsl version {layered.version} cannot mark a grayscale source"
        )
    else:
        flags = b""
    return _with_crc(
        fixed
        + name
        + layered.fingerprint
        + flags
        + b"".join(_LAYER.pack(*layer) for layer in layers)
    )


def _pack_layered(layered: LayeredImage) -> bytes:
    if not 1 <= len(layered.streams) <= layered.total_layers or len(
        layered.latent_crcs
    ) != len(layered.streams):
        raise ValueError(
            f"a .cpsl payload holds 1 to total_layers={layered.total_layers} "
            f"layers, each with a latent CRC; got {len(layered.streams)} "
            f"streams and {len(layered.latent_crcs)} CRCs"
        )
    layers = [
        (len(stream), zlib.crc32(stream), crc)
        for stream, crc in zip(layered.streams, layered.latent_crcs)
    ]
    return _layered_header(layered, layers) + b"".join(layered.streams)


def _read_layered_header(data: bytes):
    """(image without streams, per-layer (length, CRC, latent CRC),
    offset of the streams)."""
    if len(data) < _LAYERED_FIXED.size:
        raise BitstreamError("truncated .cpsl file (incomplete header)")
    _check_version(data, ".cpsl", _LAYERED_VERSIONS)
    version, stored, total, height, width, name_length = _LAYERED_FIXED.unpack_from(
        data
    )[1:]
    flag_bytes = 1 if version >= _LAYERED_FLAGS_VERSION else 0
    end = _LAYERED_FIXED.size + name_length + 8 + flag_bytes + _LAYER.size * stored
    if len(data) < end + _CRC.size or not 1 <= stored <= total:
        raise BitstreamError("truncated or corrupted .cpsl header")
    reader = _Reader(_checked_body(data[: end + _CRC.size], ".cpsl header"), ".cpsl")
    reader.take(_LAYERED_FIXED.size - 1)
    check_size(height, width)
    architecture = reader.name()
    fingerprint = reader.take(8)
    flags = reader.take(flag_bytes)[0] if flag_bytes else 0
    if flags & ~_GRAYSCALE_FLAG:
        raise BitstreamError(
            f"unknown .cpsl flag bits {flags:#04x}: written by a newer version"
        )
    layers = [reader.unpack(_LAYER) for _ in range(stored)]
    layered = LayeredImage(
        height=height,
        width=width,
        architecture=architecture,
        fingerprint=fingerprint,
        total_layers=total,
        streams=[],
        latent_crcs=[latent_crc for _, _, latent_crc in layers],
        version=version,
        grayscale=bool(flags & _GRAYSCALE_FLAG),
    )
    return layered, layers, end + _CRC.size


def _unpack_layered(data: bytes) -> LayeredImage:
    layered, layers, offset = _read_layered_header(data)
    for k, (length, crc, _) in enumerate(layers):
        stream = data[offset : offset + length]
        if len(stream) != length:
            raise BitstreamError(f"truncated .cpsl file: layer {k} is incomplete")
        if zlib.crc32(stream) != crc:
            raise BitstreamError(f"corrupted .cpsl file: layer {k} fails its checksum")
        layered.streams.append(stream)
        offset += length
    if offset != len(data):
        raise BitstreamError("corrupted .cpsl file (trailing bytes)")
    return layered


def pack(payload: Payload) -> bytes:
    """The bytes of the ``.cps`` or ``.cpsl`` file holding ``payload``.

    Raises:
        BitstreamError: a size the format cannot hold (see :func:`check_size`).
        ValueError: a layered payload whose layer count reading would refuse.
    """
    check_size(payload.height, payload.width)
    if isinstance(payload, LayeredImage):
        return _pack_layered(payload)
    return _pack_image(payload)


def check_magic(head: bytes) -> None:
    """Refuse bytes that do not start as a ``.cps`` or ``.cpsl`` file does, so that a
    reader can look at a file's first 4 bytes before it holds the rest.

    Raises:
        BitstreamError: another magic number (or fewer than 4 bytes).
    """
    if head[:4] not in (MAGIC, LAYERED_MAGIC):
        raise BitstreamError("not a .cps or .cpsl file (bad magic number)")


def unpack(data: bytes) -> Payload:
    """Parse a ``.cps`` or ``.cpsl`` file (told apart by their magic numbers).

    Raises:
        BitstreamError: a foreign, truncated, corrupted or out-of-limits file.
    """
    check_magic(data)
    if data[:4] == MAGIC:
        return _unpack_image(data)
    return _unpack_layered(data)


def truncate_layers(data: bytes, keep: int) -> bytes:
    """The ``.cpsl`` file ``data`` with only its first ``keep`` layers
    (header rewritten)."""
    if data[:4] != LAYERED_MAGIC:
        raise BitstreamError("not a layered .cpsl file (bad magic number)")
    layered, layers, offset = _read_layered_header(data)
    if not 1 <= keep <= len(layers):
        raise ValueError(f"can keep 1..{len(layers)} layers of this file, got {keep}")
    length = sum(layer[0] for layer in layers[:keep])
    return _layered_header(layered, layers[:keep]) + data[offset : offset + length]
