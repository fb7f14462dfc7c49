"""Memory-safe input for CompressAI's rANS decoder.

CompressAI's ``RansDecoder`` (``set_stream`` + ``decode_stream``, and
``decode_with_indexes``, which ``EntropyBottleneck.decompress`` calls) reads the
string as 32-bit words without ever comparing its read pointer with the string's
end: it decodes as many symbols as it is given indexes for. A file whose latent
string is 8 bytes long but whose header announces a large image makes it read
megabytes past the end of the string, and the process dies of SIGSEGV. The decoder
cannot be told where the string ends, so :func:`safe_string` appends enough zero
bytes that no decode of ``symbols`` symbols can read past them (the bound is proved
in :func:`max_bytes_read`). A legitimate string is read exactly up to its end, so the
zeros never change a correct decode; a truncated or forged string decodes to garbage,
which the codec's y_hat checksum rejects.

Every decode of an untrusted string must go through :func:`safe_string` with the
total number of symbols that will be decoded from it.
"""

from utils.coding.payload import BitstreamError

# Lower end of the decoder's state interval (RANS64_L): every state a real encoder
# writes, and so the first 8 bytes of every real string, is at least this.
RANS64_L = 1 << 31
# The bound of max_bytes_read: words per decoded symbol and per word of the string.
WORDS_PER_SYMBOL = 21
WORDS_PER_STRING_WORD = 16
# Padding bytes per symbol a decoder holds on top of its string (memory budgets).
PADDING_BYTES_PER_SYMBOL = 4 * WORDS_PER_SYMBOL


def max_bytes_read(length: int, symbols: int) -> int:
    """Most bytes CompressAI 1.2.8's rANS decoder can read from a buffer whose first
    ``length`` bytes are the string and whose rest is zero, while decoding
    ``symbols`` symbols with valid tables (``cdf[0] = 0``, non-decreasing,
    last entry ``2**16``), provided the first 8 bytes hold a state >= 2**31.

    Derivation. Let ``W = ceil(length / 4)`` (the words that hold string bytes; a
    partial word is completed with zeros). The decoder's state ``x`` is a uint64.

    1. Reads. ``Rans64DecInit`` reads 2 words. ``Rans64DecAdvance`` (once per
       symbol) and ``Rans64DecGetBits`` (the bypass path) each read at most one
       word: their renormalisation is an ``if``, not a loop.
    2. Invariant ``x >= 2**31`` (true initially by the precondition). Advance sets
       ``x' = f * (x >> 16) + (x & 0xffff) - start`` with ``f >= 1`` and
       ``start <= x & 0xffff`` (the decoded bin contains ``x & 0xffff``), so
       ``x' >= 2**15``; if ``x' < 2**31`` it becomes ``x' << 32 | w >= 2**47``.
       GetBits(4) sets ``x >> 4 >= 2**27``, refilled to ``>= 2**59`` when below
       ``2**31``.
    3. Refill spacing. After a refill inside GetBits, ``x >= 2**59``, and a call
       refills only when ``x < 2**35`` before it: the next 7 calls cannot refill.
       So ``G`` consecutive GetBits calls read at most ``ceil(G / 8)`` words.
       Since ``x < 2**64``, the 9th consecutive call without refill cannot happen
       either: the first refill of a run is at its call 9 at the latest, and after
       it the calls return the nibbles of the words read, 8 per word, in order.
    4. Bypass cost. A symbol in the escape bin reads a count: ``K`` calls, all
       but the last returning 15, then ``n <= 15 (K - 1) + 14`` raw calls, so
       ``G = K + n < 16 K`` calls and at most ``2 K`` words. Its 15-nibbles come
       from the state (at most 9, point 3) and from words read during the count:
       8 per all-ones string word, up to 7 from the string word that ends the run,
       none from a zero padding word (its first nibble, 0, ends the run). Each
       string word is read once, so over all symbols ``sum K <= 10 S + 8 W``.
    5. Total: ``2 + S + 2 (10 S + 8 W) = 2 + 21 S + 16 W`` words.

    The bound is tight up to constants: a string of 0xff bytes makes one symbol's
    count loop run over the whole string and the raw loop read 15 nibbles per
    string nibble, past the end. Hence the padding, ``84 S + 16 length`` bytes
    roughly, which a decoder holds for the whole decode.
    """
    if length < 0 or symbols < 0:
        raise ValueError(f"length {length} and symbols {symbols} must be >= 0")
    words = -(-length // 4)
    return 4 * (2 + WORDS_PER_SYMBOL * symbols + WORDS_PER_STRING_WORD * words)


def safe_string(string: bytes, symbols: int, name: str = "rANS") -> bytes:
    """``string`` followed by enough zero bytes that decoding ``symbols`` symbols
    from it cannot read outside the returned buffer (see :func:`max_bytes_read`).

    Raises :class:`~utils.coding.payload.BitstreamError` when ``string`` cannot
    be a rANS string (shorter than the 8-byte final state, or a state below 2**31,
    which no encoder writes): the bound does not hold for those. ``name`` names
    the string in that message (``"y"``, ``"z"``).
    """
    string = bytes(string)
    if len(string) < 8:
        raise BitstreamError(
            f"{name} string of {len(string)} bytes is truncated: it must hold "
            "at least the encoder's 8-byte final state"
        )
    if int.from_bytes(string[:8], "little") < RANS64_L:
        raise BitstreamError(
            f"{name} string is corrupted: its initial state is below 2**31, "
            "which no encoder writes"
        )
    return string + bytes(max_bytes_read(len(string), symbols) - len(string))
