"""rANS decoding of truncated or forged strings: bounded reads, never a crash."""

import multiprocessing
import os

import pytest
import torch
from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.entropy_models import EntropyBottleneck, GaussianConditional

from utils.coding.payload import BitstreamError
from utils.coding.rans import max_bytes_read, safe_string

MASK64 = (1 << 64) - 1


def _tables():
    """CompressAI Gaussian tables (a few scales), plus one whose escape bin holds
    almost all the mass, so that nearly every symbol takes the bypass path."""
    conditional = GaussianConditional(None)
    conditional.update_scale_table(torch.tensor([0.11, 1.0, 8.0, 60.0]))
    lengths = conditional.cdf_length.tolist()
    cdfs = [row[:n] for row, n in zip(conditional.quantized_cdf.tolist(), lengths)]
    offsets = conditional.offset.tolist()
    return cdfs + [[0, 1, 1 << 16]], lengths + [3], offsets + [0]


def _int32(value):
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _emulate(buffer, indexes, cdfs, lengths, offsets):
    """CompressAI 1.2.8's ``decode_with_indexes`` in Python: (symbols, words read)."""
    words = [
        int.from_bytes(buffer[i : i + 4], "little")
        for i in range(0, len(buffer) - 3, 4)
    ]
    state = {"x": words[0] | words[1] << 32, "ptr": 2}

    def refill_if_low(x):
        if x < 1 << 31:
            x = (x << 32 | words[state["ptr"]]) & MASK64
            state["ptr"] += 1
        state["x"] = x

    def get_bits():
        value = state["x"] & 15
        refill_if_low(state["x"] >> 4)
        return value

    out = []
    for index in indexes:
        cdf, max_value = cdfs[index], lengths[index] - 2
        cum = state["x"] & 0xFFFF
        s = next(j for j in range(lengths[index]) if cdf[j] > cum) - 1
        refill_if_low((cdf[s + 1] - cdf[s]) * (state["x"] >> 16) + cum - cdf[s])
        value = s
        if value == max_value:
            val = get_bits()
            count = val
            while val == 15:
                val = get_bits()
                count = _int32(count + val)
            raw = 0
            for j in range(count):
                raw |= get_bits() << (4 * j % 32)  # x86 masks shift counts to 5 bits
            raw = _int32(raw)
            value = -(raw >> 1) - 1 if raw & 1 else (raw >> 1) + max_value
        out.append(_int32(value + offsets[index]))
    return out, state["ptr"]


def test_emulator_reproduces_compressai_on_real_and_random_strings():
    cdfs, lengths, offsets = _tables()
    generator = torch.Generator().manual_seed(0)
    indexes = torch.randint(0, len(cdfs), (400,), generator=generator).tolist()
    symbols = torch.randint(-40, 40, (400,), generator=generator).tolist()
    encoder = BufferedRansEncoder()
    encoder.encode_with_indexes(symbols, indexes, cdfs, lengths, offsets)
    real = encoder.flush()
    forged = (
        b"\xff" * 8
        + torch.randint(0, 256, (40,), generator=generator, dtype=torch.uint8)
        .numpy()
        .tobytes()
    )
    for string in (real, forged):
        buffer = safe_string(string, len(indexes))
        expected = RansDecoder().decode_with_indexes(
            buffer, indexes, cdfs, lengths, offsets
        )
        decoded, read = _emulate(buffer, indexes, cdfs, lengths, offsets)
        assert decoded == expected
        if string is real:
            assert decoded == symbols and read * 4 == len(real)


@pytest.mark.parametrize(
    "string",
    [
        b"\xff" * 64,
        b"\xff" * 8 + b"\x0f" * 24,
        b"\x00\x00\x00\x80" * 2,
        bytes(range(256)) * 2,
    ],
)
def test_words_read_stay_within_the_bound_for_adversarial_strings(string):
    cdfs, lengths, offsets = _tables()
    escape = len(cdfs) - 1
    for indexes in ([escape] * 300, [k % len(cdfs) for k in range(300)]):
        buffer = safe_string(string, len(indexes))
        _, read = _emulate(buffer, indexes, cdfs, lengths, offsets)
        assert 4 * read <= max_bytes_read(len(string), len(indexes)) == len(buffer)


def test_bound_is_needed_an_all_ones_string_reads_far_past_its_end():
    cdfs, lengths, offsets = _tables()
    string = b"\xff" * 64
    _, read = _emulate(safe_string(string, 1), [len(cdfs) - 1], cdfs, lengths, offsets)
    assert 4 * read > 10 * len(string)


@pytest.mark.parametrize(
    "string, message", [(b"\x01" * 7, "truncated"), (b"\x00" * 8, "below 2\\*\\*31")]
)
def test_strings_no_encoder_writes_are_rejected(string, message):
    with pytest.raises(BitstreamError, match=message):
        safe_string(string, 10)


def _decode_forged_strings(strings, indexes, tables):
    """Decode forged strings far longer than they are through both decoder entry
    points (``EntropyBottleneck.decompress`` calls ``decode_with_indexes``); run in
    a forked child, where a bad read is a signal. No torch here: its thread pools
    do not survive a fork."""
    for padded in strings:
        RansDecoder().decode_with_indexes(padded, indexes, *tables)
        decoder = RansDecoder()
        decoder.set_stream(padded)
        for start in range(0, len(indexes), 20_000):
            decoder.decode_stream(indexes[start : start + 20_000], *tables)
    os._exit(0)


def test_forged_short_strings_decode_garbage_without_a_signal():
    gaussian_tables = _tables()
    bottleneck = EntropyBottleneck(4)
    bottleneck.update(force=True)
    bottleneck_tables = (
        bottleneck.quantized_cdf.tolist(),
        bottleneck.cdf_length.tolist(),
        bottleneck.offset.tolist(),
    )
    symbols = 60_000
    forged = [
        safe_string(s, symbols)
        for s in (b"\xff" * 8, b"\x00\x00\x00\x80" * 2, bytes(range(8, 20)))
    ]
    context = multiprocessing.get_context("fork")
    for indexes, strings, tables in (
        (
            [k * 7 % len(gaussian_tables[0]) for k in range(symbols)],
            forged,
            gaussian_tables,
        ),
        ([k % 4 for k in range(symbols)], forged[:1], bottleneck_tables),
    ):
        child = context.Process(
            target=_decode_forged_strings, args=(strings, indexes, tables)
        )
        child.start()
        child.join(timeout=60)
        assert child.exitcode == 0  # negative: killed by that signal
