"""The context coder: wavefront schedule derived from the mask, bit-exact round trips,
agreement with the model's own context path and with CompressAI's per-position coder."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from compressai.layers import MaskedConv2d

import models
import utils.coding.front_rans as front_rans
import utils.coding.streams as latent_streams
import utils.coding.threads as coder_threads
from tests.conftest import data_dir
from utils.coding.context_coder import ContextCoder
from utils.coding.scan_order import causal_taps, coding_order, wavefront_slope
from utils.memory import PeakMemory, memory_in_use


def spread_scales(
    model: torch.nn.Module, seed: int = 0, high: float = 16.0
) -> torch.nn.Module:
    """Make a random model predict scales over the whole table (log-uniform 0.11..high
    per channel) and means around zero, as a trained model does, then update it."""
    channels = model.M
    last = model.entropy_parameters[-1]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        last.weight.mul_(0.1)
        log_scales = torch.empty(channels).uniform_(
            math.log(0.11), math.log(high), generator=generator
        )
        last.bias[:channels] = log_scales.exp()
        last.bias[channels:] = 0.5 * torch.randn(channels, generator=generator)
    model.update(force=True)
    return model


@pytest.fixture
def coding_model(tiny_cps):
    return spread_scales(tiny_cps)


def random_latent(model, height, width, seed, outliers=False):
    """(y, params) with values at the model's scales; ``outliers`` adds values far
    outside the CDF tables, which the rANS coder escapes with Elias-gamma bits."""
    generator = torch.Generator().manual_seed(seed)
    scales = model.entropy_parameters[-1].bias[: model.M].detach()
    y = torch.randn(model.M, height, width, generator=generator) * scales[:, None, None]
    if outliers:
        far = torch.rand(y.shape, generator=generator) < 0.02
        y[far] += 500 * torch.randn(int(far.sum()), generator=generator)
    params = torch.randn(2 * model.M, height, width, generator=generator)
    return y, params


@torch.no_grad()
def model_parameters(model, y_hat, params):
    """(scales, means), each (1, M, H, W), that the model's own context prediction and
    entropy parameters compute for a decoded ``y_hat`` (M, H, W)."""
    context = model.context_prediction(y_hat[None])
    return model.entropy_parameters(torch.cat((params[None], context), 1)).chunk(2, 1)


def dependencies(kernel_size, height, width):
    """Brute force: (reader, read) position pairs of a type-A masked convolution,
    found by feeding it one-hot inputs."""
    conv = MaskedConv2d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    pairs = []
    for read in range(height * width):
        one_hot = torch.zeros(1, 1, height * width)
        one_hot[0, 0, read] = 1.0
        with torch.no_grad():
            readers = torch.nonzero(
                conv(one_hot.view(1, 1, height, width)).view(-1)
            ).view(-1)
        pairs += [
            (divmod(int(reader), width), divmod(read, width)) for reader in readers
        ]
    return pairs


def test_the_5x5_mask_reads_two_rows_above_and_two_positions_to_the_left():
    mask = MaskedConv2d(1, 1, 5, padding=2).mask
    expected = {(di, dj) for di in (-2, -1) for dj in range(-2, 3)} | {(0, -2), (0, -1)}
    assert set(causal_taps(mask)) == expected


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
def test_wavefront_slope_is_the_smallest_that_orders_every_brute_force_dependency(
    kernel_size,
):
    pairs = dependencies(kernel_size, 9, 11)
    assert pairs, "the masked convolution read nothing"

    def orders_all(slope):
        return all(slope * p[0] + p[1] > slope * q[0] + q[1] for p, q in pairs)

    brute_force = next(slope for slope in range(1, 50) if orders_all(slope))
    assert (
        wavefront_slope(causal_taps(MaskedConv2d(1, 1, kernel_size).mask))
        == brute_force
    )
    if kernel_size == 5:
        assert brute_force == 3


def test_a_mask_that_reads_the_current_position_is_rejected():
    mask = MaskedConv2d(1, 1, 5, mask_type="B").mask
    with pytest.raises(ValueError, match="not causal"):
        wavefront_slope(causal_taps(mask))


@pytest.mark.parametrize(
    "height,width", [(1, 1), (1, 7), (6, 1), (2, 2), (5, 9), (8, 3)]
)
def test_no_position_reads_a_position_of_its_own_or_a_later_front(height, width):
    positions, sizes = coding_order(height, width, "wavefront", 3)
    assert sorted(positions.tolist()) == list(range(height * width))
    front_of = torch.empty(height * width, dtype=torch.long)
    front_of[positions] = torch.repeat_interleave(
        torch.arange(len(sizes)), torch.tensor(sizes)
    )
    for (pi, pj), (qi, qj) in dependencies(5, height, width):
        assert front_of[qi * width + qj] < front_of[pi * width + pj]
    rows = positions // width
    starts = [0] + torch.tensor(sizes).cumsum(0).tolist()
    for start, stop in zip(starts, starts[1:]):
        assert torch.all(rows[start + 1 : stop] > rows[start : stop - 1])
    if width >= 3:
        assert len(sizes) == 3 * (height - 1) + width


@pytest.mark.parametrize("order", ["wavefront", "raster"])
@pytest.mark.parametrize("height,width", [(1, 1), (3, 2), (6, 5), (4, 9)])
def test_the_worker_thread_only_reads_fronts_that_are_final(
    coding_model, order, height, width
):
    """Far taps of front k (computed while front k-1 is coded) must read fronts <= k-2
    or the zero padding; near taps fronts <= k-1."""
    layout = ContextCoder(coding_model, order)._layout(height, width)
    front_of = torch.full(((height + 4) * (width + 4),), -1)
    fronts = torch.repeat_interleave(
        torch.arange(len(layout.sizes)), torch.tensor(layout.sizes)
    )
    front_of[layout.centres] = fronts
    for windows, lag in ((layout.far_windows, 2), (layout.near_windows, 1)):
        taps = windows.numel() // fronts.numel()
        read = front_of[windows].view(fronts.numel(), taps)
        assert torch.all((read == -1) | (read <= fronts[:, None] - lag))
    assert len(layout.far_taps) + len(layout.near_taps) == 12


@pytest.mark.parametrize("order", ["wavefront", "raster"])
def test_pipelined_and_sequential_coders_write_and_read_the_same_stream(
    coding_model, order
):
    y, params = random_latent(coding_model, 9, 14, 21, outliers=True)
    pipelined = ContextCoder(coding_model, order, pipeline=True)
    sequential = ContextCoder(coding_model, order, pipeline=False)
    string, y_hat, _ = pipelined.encode(y, params)
    sequential_string, sequential_y_hat, _ = sequential.encode(y, params)
    assert sequential_string == string and torch.equal(sequential_y_hat, y_hat)
    assert torch.equal(sequential.decode(string, params), y_hat)
    assert torch.equal(pipelined.decode(string, params), y_hat)


def test_the_callers_matmul_precision_and_threads_keep_the_stream_and_are_restored(
    coding_model,
):
    y, params = random_latent(coding_model, 6, 8, 5)
    coder = ContextCoder(coding_model)
    string, y_hat, _ = coder.encode(y, params)
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert coder.encode(y, params)[0] == string
        assert torch.get_float32_matmul_precision() == "medium"
        assert torch.get_num_threads() == threads
    finally:
        torch.set_float32_matmul_precision(precision)


def test_raster_order_has_one_position_per_front_in_reading_order():
    positions, sizes = coding_order(3, 4, "raster", 3)
    assert positions.tolist() == list(range(12)) and sizes == [1] * 12


@pytest.mark.parametrize("order", ["wavefront", "raster"])
@pytest.mark.parametrize(
    "height,width,seed",
    [(1, 1, 0), (1, 9, 1), (9, 1, 2), (4, 5, 3), (7, 13, 4), (16, 11, 5), (12, 12, 6)],
)
def test_decoder_rebuilds_exactly_the_encoders_y_hat(
    coding_model, order, height, width, seed
):
    y, params = random_latent(coding_model, height, width, seed, outliers=seed % 2 == 1)
    string, y_hat, _ = ContextCoder(coding_model, order).encode(y, params)
    decoded = ContextCoder(coding_model, order).decode(string, params)
    assert torch.equal(decoded, y_hat)
    assert (y_hat - y).abs().max() <= 0.5 + 1e-3


def test_many_random_latents_round_trip_bit_exactly(coding_model):
    """Odd sizes, outliers, and the pipelined coder on one side only, in turn."""
    coders = ContextCoder(coding_model), ContextCoder(coding_model, pipeline=True)
    generator = torch.Generator().manual_seed(7)
    for trial in range(12):
        height, width = torch.randint(1, 15, (2,), generator=generator).tolist()
        y, params = random_latent(
            coding_model, height, width, 100 + trial, outliers=trial % 3 == 0
        )
        encoder, decoder = coders if trial % 2 else coders[::-1]
        string, y_hat, _ = encoder.encode(y, params)
        assert torch.equal(decoder.decode(string, params), y_hat), (height, width)


def test_coded_means_and_scales_are_the_models_masked_convolution(coding_model):
    """The gathered taps and GEMMs compute what the model's own layers compute."""
    y, params = random_latent(coding_model, 10, 14, 3)
    coder = ContextCoder(coding_model)
    string, y_hat, _ = coder.encode(y, params)
    scales, means = model_parameters(coding_model, y_hat, params)
    offsets = y_hat - means[0]
    assert (offsets - offsets.round()).abs().max() < 1e-4
    assert torch.equal(offsets.round(), (y - means[0]).round())
    # The rANS stream costs what the model's likelihoods predict.
    likelihoods = coding_model.gaussian_conditional._likelihood(
        y_hat[None], scales, means
    )
    predicted_bits = -likelihoods.clamp_min(1e-9).log2().sum().item()
    assert abs(len(string) * 8 - predicted_bits) < 0.05 * predicted_bits + 64


def test_scale_indexes_equal_compressais_build_indexes(coding_model):
    conditional = coding_model.gaussian_conditional
    table = conditional.scale_table
    scales = torch.cat(
        (
            torch.rand(2000) * 300 - 10,
            table,
            torch.nextafter(table, table + 1),
            torch.nextafter(table, table - 1),
            torch.tensor([0.0, -1.0]),
        )
    ).view(2, -1)
    assert torch.equal(
        ContextCoder(coding_model).scale_indexes(scales),
        conditional.build_indexes(scales),
    )


def test_raster_decoder_reads_compressais_mbt2018_stream(coding_model):
    """CompressAI's own per-position coder is an independent reference for the raster
    order; its arithmetic is float32 like the coder's without the fixed-point grid."""
    y, params = random_latent(coding_model, 5, 7, 11)
    y_padded = F.pad(y[None], (2, 2, 2, 2))
    with torch.no_grad():
        string = coding_model._compress_ar(y_padded, params[None], 5, 7, 5, 2)
    ours = ContextCoder(coding_model, "raster", fixed_point=False).decode(
        string, params
    )
    assert torch.allclose(ours, y_padded[0, :, 2:-2, 2:-2], atol=1e-5)


def test_raster_and_wavefront_streams_differ_but_each_decodes_its_own(coding_model):
    y, params = random_latent(coding_model, 9, 10, 4)
    results = {}
    for order in ("raster", "wavefront"):
        string, y_hat, _ = ContextCoder(coding_model, order).encode(y, params)
        assert torch.equal(
            ContextCoder(coding_model, order).decode(string, params), y_hat
        )
        results[order] = string, y_hat
    assert results["raster"][0] != results["wavefront"][0]
    assert torch.allclose(results["raster"][1], results["wavefront"][1], atol=1e-5)


@pytest.mark.parametrize("kernel_size", [3, 7])
def test_other_mask_sizes_derive_their_own_slope_and_round_trip(
    coding_model, kernel_size
):
    channels = coding_model.M
    torch.manual_seed(kernel_size)
    coding_model.context_prediction = MaskedConv2d(
        channels, 2 * channels, kernel_size, padding=kernel_size // 2
    )
    coder = ContextCoder(coding_model)
    assert coder.slope == kernel_size // 2 + 1
    y, params = random_latent(coding_model, 8, 9, kernel_size)
    string, y_hat, _ = coder.encode(y, params)
    assert torch.equal(coder.decode(string, params), y_hat)
    _, means = model_parameters(coding_model, y_hat, params)
    offsets = y_hat - means[0]
    assert (offsets - offsets.round()).abs().max() < 1e-4


def test_bad_arguments_raise_one_clear_error(coding_model):
    coder = ContextCoder(coding_model)
    y, params = random_latent(coding_model, 3, 4, 0)
    with pytest.raises(ValueError, match="unknown entropy coder order 'zigzag'"):
        ContextCoder(coding_model, "zigzag")
    with pytest.raises(
        ValueError, match=r"params must have shape \(2M, H, W\) = \(16, H, W\)"
    ):
        coder.encode(y, params[:8])
    with pytest.raises(ValueError, match="y has shape"):
        coder.encode(y[:, :2], params)
    with pytest.raises(ValueError, match="params must have shape"):
        coder.decode(b"", params[None])
    with pytest.raises(ValueError, match="latent size 0x4 is empty"):
        coder.encode(y[:, :0], params[:, :0])
    with pytest.raises(ValueError, match="y string of 3 bytes is truncated"):
        coder.decode(latent_streams.join_streams([b"abc"]), params)
    with pytest.raises(ValueError, match="fewer than the 1 streams"):
        coder.decode(b"abc", params)
    with pytest.raises(ValueError, match="shorter than its length"):
        coder.decode(latent_streams.join_streams([b"abcdefghij"])[:-1], params)
    with pytest.raises(ValueError, match="2 bytes after its 1 streams"):
        coder.decode(latent_streams.join_streams([b"abcdefghij"]) + b"xy", params)
    fresh = models.build_model("cps", N=8)
    with pytest.raises(RuntimeError, match="call model.update"):
        ContextCoder(fresh)


@pytest.mark.parametrize("order", ["wavefront", "raster"])
@pytest.mark.parametrize(
    "name,rows,cols",
    [
        ("kodim01", (0, 128), (0, 192)),
        ("kodim07", (256, 320), (64, 512)),
        ("kodim23", (0, 512), (0, 768)),
    ],
)
def test_real_image_latents_round_trip_bit_exactly(tiny_cps, name, rows, cols, order):
    """Kodak crops of several sizes through the (random) analysis transforms."""
    from utils.image_io import read_image

    image, _ = read_image(f"{data_dir('CPS_KODAK')}/{name}.png")
    x = image[None, :, rows[0] : rows[1], cols[0] : cols[1]].float() / 255
    with torch.no_grad():
        y = tiny_cps.g_a(x)
        z_hat, _ = tiny_cps.entropy_bottleneck(tiny_cps.h_a(y))
        params = tiny_cps.h_s(z_hat)
    coder = ContextCoder(tiny_cps, order)
    string, y_hat, _ = coder.encode(y[0], params[0])
    assert torch.equal(coder.decode(string, params[0]), y_hat)
    assert (y_hat - y[0]).abs().max() <= 0.5 + 1e-3


def test_the_benchmark_writes_a_table_of_bit_exact_timings(tmp_path):
    from benchmarks import entropy_coding

    output = tmp_path / "bench.json"
    assert (
        entropy_coding.main(
            [
                "--sizes",
                "200x70",
                "-N",
                "8",
                "--reference-positions",
                "20",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    report = json.loads(output.read_text())
    (entry,) = report["results"]
    assert entry["latent"] == [8, 16] and entry["fronts"] == 3 * 7 + 16
    assert all(
        entry[name]["bit_exact"] for name in ("wavefront", "raster", "compressai")
    )
    assert (
        entry["raster"]["measured_positions"] == 32 and entry["raster"]["extrapolated"]
    )
    assert not entry["wavefront"]["extrapolated"]
    assert (
        entry["decode_speedup_vs_raster"] > 0
        and "| 200x70 | 8x16 | 37 |" in report["table"]
    )
    # Refused while parsing, before any run.
    with pytest.raises(SystemExit) as exit_info:
        entropy_coding.main(["--output", str(tmp_path / "missing" / "x.json")])
    assert exit_info.value.code == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_latent_coded_from_cuda_tensors_decodes_on_the_cpu_and_back(coding_model):
    y, params = random_latent(coding_model, 11, 13, 9)
    cuda_model = copy.deepcopy(coding_model).cuda()
    string, y_hat, _ = ContextCoder(cuda_model).encode(y.cuda(), params.cuda())
    assert torch.equal(ContextCoder(coding_model).decode(string, params), y_hat)
    string, y_hat, _ = ContextCoder(coding_model).encode(y, params)
    assert torch.equal(ContextCoder(cuda_model).decode(string, params.cuda()), y_hat)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_image_encoded_on_cuda_decodes_on_the_cpu_and_back(tiny_cps):
    from models.base import CodingPlan
    from utils.coding.container import pack, unpack

    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 70, 130), dtype=torch.uint8, generator=generator)
    cuda_model = copy.deepcopy(tiny_cps).cuda()
    for encoder, decoder in ((cuda_model, tiny_cps), (tiny_cps, cuda_model)):
        data = pack(encoder.encode(image, CodingPlan()))
        decoded = decoder.decode(unpack(data), CodingPlan())
        reference = encoder.decode(unpack(data), CodingPlan())
        assert decoded.shape == image.shape
        assert (decoded.int() - reference.int()).abs().max() <= 1


@pytest.mark.parametrize(
    "all_busy, own_busy, idle", [(0.2, 0.2, True), (0.3, 0.1, False), (0.12, 0.1, True)]
)
def test_idle_core_check_does_not_count_this_process(
    monkeypatch, all_busy, own_busy, idle
):
    """Busy seconds over the 0.1 s window on 2 CPUs: only other processes' count."""
    samples = iter([(100.0, 50.0), (100.0 + all_busy, 50.0 + own_busy)])
    monkeypatch.setattr(coder_threads, "_busy_seconds", lambda: next(samples))
    monkeypatch.setattr(
        coder_threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False
    )
    monkeypatch.setattr(coder_threads.time, "sleep", lambda seconds: None)
    assert coder_threads.idle_core_available(window=0.1) is idle


def test_stream_starts_follow_front_boundaries_past_each_stream_budget(monkeypatch):
    monkeypatch.setattr(latent_streams, "STREAM_SYMBOLS", 10)
    # Fronts of 1, 2, 3, 4, 3, 5 positions with 2 channels: 2, 4, 6, 8, 6, 10 symbols;
    # a stream reaches 10 symbols after the third front and again after the fifth.
    assert latent_streams.stream_starts([1, 2, 3, 4, 3, 5], 2) == [0, 6, 13]
    assert latent_streams.stream_starts([1, 2, 3, 4, 3], 2) == [0, 6]
    assert latent_streams.stream_starts([1], 2) == [0]
    bound = latent_streams.largest_stream_symbols(5, 9, 2, fixed_point=True)
    assert bound == 10 + 5 * 2
    assert latent_streams.largest_stream_symbols(5, 9, 2, fixed_point=False) == 90


@pytest.mark.parametrize("order", ["wavefront", "raster"])
def test_a_latent_in_many_streams_round_trips_and_each_stream_is_padded_alone(
    coding_model, order, monkeypatch
):
    monkeypatch.setattr(latent_streams, "STREAM_SYMBOLS", 64)
    y, params = random_latent(coding_model, 9, 11, 13, outliers=True)
    padded = []
    real_safe_string = front_rans.safe_string
    monkeypatch.setattr(
        front_rans,
        "safe_string",
        lambda *args: padded.append(args[1]) or real_safe_string(*args),
    )
    coder = ContextCoder(coding_model, order)
    string, y_hat, _ = coder.encode(y, params)
    assert torch.equal(coder.decode(string, params), y_hat)
    layout = coder._layout(9, 11)
    starts = latent_streams.stream_starts(layout.sizes, coding_model.M)
    assert len(padded) == len(starts) > 3
    assert sum(padded) == 9 * 11 * coding_model.M
    assert max(padded) <= latent_streams.largest_stream_symbols(
        9, 11, coding_model.M, True
    )


def test_a_stream_starts_at_the_front_that_reaches_the_budget_exactly(monkeypatch):
    # "At or past": fronts of 5 + 5 symbols fill a budget of 10, so the third front
    # opens a new stream (part of the file format, like the budget itself).
    monkeypatch.setattr(latent_streams, "STREAM_SYMBOLS", 10)
    assert latent_streams.stream_starts([5, 5, 5], 1) == [0, 10]
    assert latent_streams.stream_starts([5, 4, 5], 1) == [0]


def test_the_stream_bound_of_a_small_latent_is_the_whole_latent():
    # A latent below one stream budget is one stream: the memory plan must not
    # reserve a full budget's buffers for it.
    assert latent_streams.largest_stream_symbols(4, 5, 8, fixed_point=True) == 4 * 5 * 8


def test_the_stream_framing_of_the_cps_format_is_fixed():
    # Decoders of existing .cps files rely on these: a new stream every 2**18 symbols,
    # each after its length as 4 big-endian bytes.
    assert latent_streams.STREAM_SYMBOLS == 2**18
    string = latent_streams.join_streams([b"abc", b""])
    assert string == b"\x00\x00\x00\x03abc\x00\x00\x00\x00"
    assert latent_streams.split_streams(string, 2) == [b"abc", b""]


@pytest.mark.parametrize("order", ["wavefront", "raster"])
@pytest.mark.parametrize("height,width", [(0, 4), (3, 0)])
def test_an_empty_latent_has_no_coding_order(order, height, width):
    with pytest.raises(ValueError, match=f"latent size {height}x{width} is empty"):
        coding_order(height, width, order, 3)


@pytest.mark.parametrize("height,width", [(37, 5), (5, 37), (9, 9), (64, 1), (1, 64)])
@pytest.mark.parametrize("slope", [1, 2, 3])
def test_wavefront_order_is_the_stable_sort_of_the_positions_by_front(
    height, width, slope
):
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    expected = torch.argsort(slope * rows + cols, stable=True)
    positions, sizes = coding_order(height, width, "wavefront", slope)
    assert torch.equal(positions, expected)
    assert sum(sizes) == height * width


@pytest.mark.skipif(
    not PeakMemory(torch.device("cpu")).resettable, reason="needs a resettable peak"
)
def test_the_order_of_a_tall_latent_needs_memory_linear_in_its_positions():
    # A 65535 x 4 pixel image is a 16384 x 1 Kamisli block grid: ranking a front's
    # positions by row made a key range of slope * height**2, 4 GB before any budget
    # check. 4096 rows made 270 MB of keys.
    cpu = torch.device("cpu")
    before = memory_in_use(cpu)
    with PeakMemory(cpu) as memory:
        positions, sizes = coding_order(4096, 1, "wavefront", 2)
    assert torch.equal(positions, torch.arange(4096)) and sizes == [1] * 4096
    assert memory.peak_bytes - before < 32 << 20, memory.peak_mb
