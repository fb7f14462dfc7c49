"""The latent string of the fixed-point context coder: a sequence of rANS streams.

A decoder pads each rANS stream for safety (``utils/coding/rans.py``) and holds it
three times while CompressAI's decoder takes it, so one stream for a whole 8K latent
would hold 6 GB. The fixed-point coder therefore starts a new stream at the first
front boundary at or past every :data:`STREAM_SYMBOLS` symbols and writes each as a
4-byte big-endian length and the stream (part of the ``.cps`` format, flag bit 2).
"""

import struct
from typing import List

from utils.coding.payload import BitstreamError

__all__ = [
    "STREAM_SYMBOLS",
    "stream_starts",
    "largest_stream_symbols",
    "join_streams",
    "split_streams",
]

# Symbols after which the fixed-point coder starts a new rANS stream (at the next
# front boundary): part of the file format.
STREAM_SYMBOLS = 1 << 18
_STREAM_LENGTH = struct.Struct(">I")


def stream_starts(sizes: List[int], channels: int) -> List[int]:
    """Latent positions (in coding order) at which each rANS stream of the
    fixed-point coder starts: 0, then the first front boundary at or past every
    :data:`STREAM_SYMBOLS` symbols since the last start."""
    starts, position, since_start = [0], 0, 0
    for size in sizes:
        if since_start >= STREAM_SYMBOLS:
            starts.append(position)
            since_start = 0
        position += size
        since_start += size * channels
    return starts


def largest_stream_symbols(
    height: int, width: int, channels: int, fixed_point: bool
) -> int:
    """An upper bound on the symbols of one rANS stream of a (height, width) latent:
    the whole latent for float32 files, else :data:`STREAM_SYMBOLS` plus one front
    (at most one position per row)."""
    total = height * width * channels
    if not fixed_point:
        return total
    return min(total, STREAM_SYMBOLS + min(height, width) * channels)


def join_streams(streams: List[bytes]) -> bytes:
    """The latent string of the fixed-point coder: each stream after its length."""
    return b"".join(_STREAM_LENGTH.pack(len(stream)) + stream for stream in streams)


def split_streams(string: bytes, count: int) -> List[bytes]:
    """The ``count`` streams of a :func:`join_streams` string.

    Raises:
        BitstreamError: lengths that do not add up to the string.
    """
    streams, offset = [], 0
    for _ in range(count):
        if offset + _STREAM_LENGTH.size > len(string):
            raise BitstreamError(
                f"y string is truncated: it holds fewer than the {count} "
                "streams of this latent"
            )
        (length,) = _STREAM_LENGTH.unpack_from(string, offset)
        offset += _STREAM_LENGTH.size
        if offset + length > len(string):
            raise BitstreamError(
                "y string is truncated: a stream is shorter than its length"
            )
        streams.append(string[offset : offset + length])
        offset += length
    if offset != len(string):
        raise BitstreamError(
            f"y string has {len(string) - offset} bytes after its {count} streams"
        )
    return streams
