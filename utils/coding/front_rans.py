"""rANS coding of a latent front by front: the symbol side of the context coder.

The context coder (``utils/coding/context_coder.py``) schedules the fronts and
computes each front's symbols (encoder) or CDF indexes (decoder); this module turns
those symbols into the latent string and back with CompressAI's rANS coder. It is
apart because its costs are those of the rANS coder's interface, not of the
entropy model:

* Encoding. ``BufferedRansEncoder`` converts the whole CDF table to C++ at every
  call and keeps :data:`ENCODER_BYTES_PER_SYMBOL` bytes per symbol until it
  flushes, so fronts are handed over in chunks of about
  :data:`_ENCODE_CHUNK_SYMBOLS` symbols.
* Decoding. The decoder hands the rANS coder only the CDF rows a front uses:
  converting the whole padded table (64 rows of 3135 ints) to C++ at every
  ``decode_stream`` call was a fixed cost per front that dominated decoding. Each
  stream is padded (:func:`~utils.coding.rans.safe_string`) only when its first
  front comes, so one padded stream is held at a time.
* Streams. Fixed-point files start a new rANS stream at the front boundaries
  :func:`~utils.coding.streams.stream_starts` picks and join the streams
  (``utils/coding/streams.py``); float32 files hold one stream for the whole latent.

Bitstream order: fronts in coding order, positions within a front by increasing
row, channels innermost.
"""

import struct
from dataclasses import dataclass
from typing import List, Tuple

import torch
from compressai.ans import BufferedRansEncoder, RansDecoder
from torch import Tensor, nn

from utils.coding.rans import safe_string
from utils.coding.streams import join_streams, split_streams, stream_starts

__all__ = ["ENCODER_BYTES_PER_SYMBOL", "CdfTables", "FrontEncoder", "FrontDecoder"]

# CompressAI's BufferedRansEncoder keeps one RansSymbol (two uint16 and a bool) per
# coded symbol until it flushes.
ENCODER_BYTES_PER_SYMBOL = 6
# Symbols handed to the rANS encoder per call: each call converts the CDF table to
# C++ once, so chunks amortise that while bounding the Python lists.
_ENCODE_CHUNK_SYMBOLS = 1 << 20


@dataclass(frozen=True)
class CdfTables:
    """A Gaussian conditional's quantised CDFs as the rANS coder takes them: one list
    per row, with the rows' lengths and offsets."""

    cdfs: List[List[int]]
    lengths: List[int]
    offsets: List[int]

    @classmethod
    def of(cls, conditional: nn.Module) -> "CdfTables":
        """The tables of an updated ``GaussianConditional``, each row trimmed to its
        length: the padding is never read by the coder."""
        lengths = conditional.cdf_length.reshape(-1).int().tolist()
        cdfs = [
            row[:length]
            for row, length in zip(conditional.quantized_cdf.tolist(), lengths)
        ]
        return cls(cdfs, lengths, conditional.offset.reshape(-1).int().tolist())


def _stream_plan(
    sizes: List[int], channels: int, fixed_point: bool
) -> Tuple[List[int], List[int]]:
    """Start position (coding order) and symbol count of each rANS stream of a latent
    whose fronts hold ``sizes`` positions of ``channels`` symbols."""
    starts = stream_starts(sizes, channels) if fixed_point else [0]
    ends = starts[1:] + [sum(sizes)]
    return starts, [(end - start) * channels for start, end in zip(starts, ends)]


class FrontEncoder:
    """Encodes a latent's fronts, added in coding order, into the latent string.

    Args:
        tables: the CDFs the fronts' indexes point into.
        sizes: the positions of each front, in coding order.
        channels: symbols per position (M).
        fixed_point: several streams (fixed-point files) or one (float32 files).
    """

    def __init__(
        self, tables: CdfTables, sizes: List[int], channels: int, fixed_point: bool
    ):
        self.tables = tables
        self.fixed_point = fixed_point
        self._later_starts = set(_stream_plan(sizes, channels, fixed_point)[0][1:])
        self._streams: List[bytes] = []
        self._encoder = BufferedRansEncoder()
        self._symbols: List[Tensor] = []
        self._indexes: List[Tensor] = []

    def add(self, start: int, symbols: Tensor, indexes: Tensor) -> None:
        """Code the symbols and CDF indexes (n, M, int32) of the front that starts at
        position ``start`` (coding order)."""
        if start in self._later_starts:
            self._end_stream()
        self._symbols.append(symbols)
        self._indexes.append(indexes)
        if sum(map(Tensor.numel, self._symbols)) >= _ENCODE_CHUNK_SYMBOLS:
            self._send()

    def finish(self) -> bytes:
        """The latent string of every front added."""
        self._end_stream()
        return join_streams(self._streams) if self.fixed_point else self._streams[0]

    def _send(self) -> None:
        self._encoder.encode_with_indexes(
            torch.cat(self._symbols).view(-1).tolist(),
            torch.cat(self._indexes).view(-1).tolist(),
            self.tables.cdfs,
            self.tables.lengths,
            self.tables.offsets,
        )
        self._symbols.clear()
        self._indexes.clear()

    def _end_stream(self) -> None:
        if self._symbols:
            self._send()
        self._streams.append(self._encoder.flush())
        self._encoder = BufferedRansEncoder()


class FrontDecoder:
    """Decodes a latent string front by front, in coding order.

    Any string is safe to decode (:func:`~utils.coding.rans.safe_string`): a
    truncated or forged one gives wrong symbols, which the codec's checksum rejects,
    or a :class:`~utils.coding.payload.BitstreamError`, here when its streams'
    lengths do not add up.

    Args: as :class:`FrontEncoder`'s, after the latent string.
    """

    def __init__(
        self,
        tables: CdfTables,
        string: bytes,
        sizes: List[int],
        channels: int,
        fixed_point: bool,
    ):
        self.tables = tables
        starts, symbols = _stream_plan(sizes, channels, fixed_point)
        streams = split_streams(string, len(starts)) if fixed_point else [string]
        self._pending = {
            start: (stream, count)
            for start, stream, count in zip(starts, streams, symbols)
        }
        self._decoder = RansDecoder()

    def decode(self, start: int, indexes: Tensor) -> Tensor:
        """The symbols (n, M, int32) of the front that starts at position ``start``
        (coding order), given its CDF indexes (n, M, int32)."""
        if start in self._pending:
            stream, count = self._pending.pop(start)
            self._decoder.set_stream(safe_string(stream, count, "y"))
        tables = self.tables
        used = torch.bincount(indexes.view(-1), minlength=len(tables.cdfs)) > 0
        remap = torch.cumsum(used, 0, dtype=torch.int32) - 1
        rows = torch.nonzero(used).view(-1).tolist()
        values = self._decoder.decode_stream(
            remap[indexes.view(-1)].tolist(),
            [tables.cdfs[k] for k in rows],
            [tables.lengths[k] for k in rows],
            [tables.offsets[k] for k in rows],
        )
        # struct unboxes a list of ints much faster than torch.tensor does.
        packed = bytearray(struct.pack(f"{len(values)}i", *values))
        return torch.frombuffer(packed, dtype=torch.int32).view(indexes.shape)
