"""Metric functions on inputs whose answer is known."""

import math
import mmap

import pytest
import torch
from pytorch_msssim import ms_ssim
from torchmetrics.functional.image import peak_signal_noise_ratio_with_blocked_effect

from utils.evaluation.metrics import (
    bits_per_pixel,
    blocking_effect_factor,
    image_metrics,
    likelihood_bits,
    luma,
    ms_ssim_rgb,
    psnr,
    psnr_b,
    psnr_b_gray,
    psnr_b_y,
)
from utils.memory import PeakMemory


def ramp(height=64, width=96):
    """A smooth gray ramp, the same in R, G and B: no edge lies on a block border."""
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    return (40 + rows + cols).to(torch.uint8).expand(3, height, width).contiguous()


def add(image, offsets):
    return (image.int() + offsets).clamp(0, 255).to(torch.uint8)


def block_checkerboard(height, width, block=8, amplitude=4):
    """+-amplitude, constant over each block.

    Every error jump sits on a block border.
    """
    rows = (torch.arange(height) // block)[:, None]
    cols = (torch.arange(width) // block)[None, :]
    return ((rows + cols) % 2 * 2 - 1) * amplitude


def pixel_checkerboard(height, width, amplitude=4):
    """+-amplitude alternating every pixel.

    Error jumps everywhere, borders are not special.
    """
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    return ((rows + cols) % 2 * 2 - 1) * amplitude


def test_identical_images_have_infinite_psnr_and_psnr_b_and_unit_ms_ssim():
    image = ramp(192, 200)
    assert psnr(image, image) == math.inf
    assert psnr_b(image, image) == math.inf
    assert ms_ssim_rgb(image, image) == pytest.approx(1.0, abs=1e-6)


def test_psnr_matches_the_closed_form_for_a_known_mse():
    image = ramp()
    distorted = add(image, pixel_checkerboard(64, 96, amplitude=5))  # MSE = 25 exactly
    assert psnr(image, distorted) == pytest.approx(
        10 * math.log10(255**2 / 25), abs=1e-12
    )


def test_psnr_b_equals_psnr_when_errors_do_not_line_up_with_block_borders():
    image = ramp()
    distorted = add(image, pixel_checkerboard(64, 96))
    assert psnr_b(image, distorted) == pytest.approx(psnr(image, distorted), abs=1e-9)


def test_blocky_error_gets_a_lower_psnr_b_than_smooth_error_of_the_same_mse():
    image = ramp()
    blocky = add(image, block_checkerboard(64, 96))
    smooth = add(image, pixel_checkerboard(64, 96))
    assert psnr(image, blocky) == pytest.approx(psnr(image, smooth), abs=1e-12)
    assert psnr_b(image, blocky) < psnr_b(image, smooth) - 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psnr_b_never_exceeds_psnr_on_gray_images(seed):
    generator = torch.Generator().manual_seed(seed)
    image = ramp(72, 88)
    noise = torch.randint(-6, 7, (72, 88), generator=generator)
    distorted = add(image, noise)
    assert psnr_b(image, distorted) <= psnr(image, distorted) + 1e-9


def test_psnr_b_is_the_mean_of_the_channels_psnr_b():
    image = ramp()
    errors = [
        block_checkerboard(64, 96, amplitude=4),
        block_checkerboard(64, 96, amplitude=8),
        pixel_checkerboard(64, 96, amplitude=3),
    ]
    distorted = add(image, torch.stack(errors))
    per_channel = [
        psnr_b(image, add(image, error.expand(3, -1, -1))) for error in errors
    ]
    assert len(set(round(v, 6) for v in per_channel)) == 3
    assert psnr_b(image, distorted) == pytest.approx(sum(per_channel) / 3, abs=1e-9)


def three_block_columns():
    """16x24 gray image: block columns 10 | 14 | 10, and +2 on rows 0-3.

    Border pairs: 2 per row across columns 7|8 and 15|16, each (14-10)^2 = 16, so
    N_HB = 16 * (24/8 - 1) = 32 pairs summing 512; vertical borders (row 7|8) are flat,
    N_VB = 24 * (16/8 - 1) = 24. D_B = 512 / 56 = 64/7.
    Other pairs: only rows 3|4 differ, 24 pairs of 2^2 = 96, over
    N_HBc + N_VBc = (16*23 - 32) + (24*15 - 24) = 672. D_Bc = 1/7.
    BEF = log2(8) / log2(16) * (64/7 - 1/7) = 3/4 * 9 = 6.75.
    """
    image = torch.full((16, 24), 10.0, dtype=torch.float64)
    image[:, 8:16] = 14
    image[:4] += 2
    return image


def test_blocking_effect_factor_matches_a_hand_computed_example():
    assert blocking_effect_factor(three_block_columns()) == pytest.approx(
        6.75, abs=1e-12
    )


def test_psnr_b_gray_adds_the_bef_of_the_reconstruction_to_the_mse():
    reconstruction = three_block_columns()
    original = reconstruction + pixel_checkerboard(16, 24, amplitude=1)  # MSE = 1
    expected = 10 * math.log10(255**2 / (1 + 6.75))
    assert psnr_b_gray(original, reconstruction) == pytest.approx(expected, abs=1e-12)
    # torchmetrics divides by 16*24/8 - 1 = 47 border pairs per direction instead of
    # 32 + 24.
    theirs = peak_signal_noise_ratio_with_blocked_effect(
        reconstruction[None, None], original[None, None], data_range=255.0
    ).item()
    assert theirs - expected > 0.1


def test_a_bef_that_is_smaller_on_borders_than_inside_is_zero():
    assert blocking_effect_factor(pixel_checkerboard(16, 24).double()) == 0.0


def test_luma_is_the_bt601_weighting():
    image = torch.zeros(3, 9, 9, dtype=torch.uint8)
    image[0], image[1], image[2] = 100, 200, 50
    assert luma(image)[4, 4].item() == pytest.approx(
        0.299 * 100 + 0.587 * 200 + 0.114 * 50
    )


def test_psnr_b_y_of_a_gray_image_is_psnr_b_gray_of_that_gray():
    image = ramp()
    distorted = add(image, block_checkerboard(64, 96))
    expected = psnr_b_gray(image[0], distorted[0])
    assert psnr_b_y(image, distorted) == pytest.approx(expected, abs=1e-9)
    assert psnr_b_y(image, distorted) < psnr(image, distorted) - 1.0
    assert psnr_b_y(image, image) == math.inf


@pytest.mark.parametrize("height, width", [(8, 64), (64, 8), (5, 5)])
def test_psnr_b_of_an_image_of_one_block_or_less_is_none_with_a_warning(height, width):
    image = ramp(height, width)
    for metric in (psnr_b, psnr_b_y):
        with pytest.warns(RuntimeWarning, match="PSNR-B needs both sides > 8"):
            assert metric(image, image) is None


def test_ms_ssim_of_a_small_image_is_none_with_a_warning():
    image = ramp(100, 300)
    with pytest.warns(RuntimeWarning, match="MS-SSIM needs both sides"):
        assert ms_ssim_rgb(image, add(image, pixel_checkerboard(100, 300))) is None


def test_ms_ssim_drops_with_distortion():
    image = ramp(170, 180)
    mild = add(image, pixel_checkerboard(170, 180, amplitude=2))
    strong = add(image, block_checkerboard(170, 180, amplitude=20))
    assert 1.0 > ms_ssim_rgb(image, mild) > ms_ssim_rgb(image, strong)


def test_image_metrics_returns_the_four_result_keys():
    image = ramp(170, 180)
    values = image_metrics(image, add(image, pixel_checkerboard(170, 180)))
    assert set(values) == {"psnr-rgb", "ms-ssim-rgb", "psnr-b", "psnr-b-y"}


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, 64, 96),  # float
        torch.zeros(1, 64, 96, dtype=torch.uint8),  # one channel
        torch.zeros(3, 64, 95, dtype=torch.uint8),  # other size
    ],
)
def test_metrics_reject_wrong_inputs(bad):
    with pytest.raises(ValueError):
        psnr(ramp(), bad)


def test_bits_per_pixel_counts_the_original_pixels():
    assert bits_per_pixel(100, 10, 20) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        bits_per_pixel(100, 0, 20)


def test_likelihood_bits_is_minus_log2_of_the_probabilities():
    likelihoods = {
        "y": torch.full((1, 2, 2, 2), 0.5),
        "z": torch.full((1, 1, 1, 1), 0.25),
    }
    assert likelihood_bits(likelihoods) == pytest.approx(8 * 1 + 2)


def _resident_mb() -> float:
    with open("/proc/self/status") as handle:
        return (
            next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
            / 1024
        )


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory(torch.device("cpu")) as small:
        torch.zeros(1)
    assert small.peak_mb > 0
    if not small.kind.endswith("(VmHWM)"):
        return  # a lifetime peak cannot show one allocation
    # The peak restarts from the resident size at entry, whatever earlier tests left.
    resident_before = _resident_mb()
    with PeakMemory(torch.device("cpu")) as large:
        # Fresh pages (an anonymous map), not a block the allocator kept from earlier
        # tests.
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\1" * len(block))
        block.close()
    assert large.peak_mb - resident_before > 48


def _touch_fresh_pages(megabytes: int) -> None:
    """Raise the peak RSS by about ``megabytes``.

    An anonymous map, written, then unmapped.
    """
    block = mmap.mmap(-1, megabytes * 2**20)
    block.write(b"\1" * len(block))
    block.close()


def test_nested_peak_meters_each_report_their_own_block():
    """An inner meter resets the process's counter; the outer one must still see a
    peak reached before the inner block (naive tiling nests one meter per tile)."""
    cpu = torch.device("cpu")
    if not PeakMemory(cpu).resettable:
        pytest.skip("needs a resettable peak RSS (Linux /proc/self/clear_refs)")
    resident_before = _resident_mb()
    with PeakMemory(cpu) as outer:
        _touch_fresh_pages(96)
        with PeakMemory(cpu) as inner:
            torch.zeros(1)
    assert outer.peak_mb - resident_before > 80
    assert inner.peak_mb - resident_before < 40


def test_ms_ssim_needs_a_shorter_side_of_161_pixels():
    # pytorch_msssim asserts a side above 160: 160 must come back as None, not crash.
    small, large = ramp(160, 170), ramp(161, 170)
    with pytest.warns(RuntimeWarning, match="MS-SSIM needs both sides >= 161"):
        assert ms_ssim_rgb(small, add(small, pixel_checkerboard(160, 170))) is None
    assert 0.9 < ms_ssim_rgb(large, add(large, pixel_checkerboard(161, 170))) < 1.0


def test_ms_ssim_uses_the_8_bit_data_range():
    # SSIM's stabilising constants scale with the data range: [0, 255] with range 255
    # must equal [0, 1] with range 1, not a 255-fold too small range.
    image = ramp(170, 180)
    distorted = add(image, block_checkerboard(170, 180, amplitude=20))
    expected = ms_ssim(
        image[None].float() / 255, distorted[None].float() / 255, data_range=1.0
    ).item()
    assert ms_ssim_rgb(image, distorted) == pytest.approx(expected, abs=1e-5)


def test_psnr_b_forms_honour_a_block_size_other_than_8():
    # Errors constant over 16x16 blocks: their seams are only a quarter of the 8x8
    # borders, so a 16-pixel grid sees more blocking than the default one.
    image = ramp()
    distorted = add(image, block_checkerboard(64, 96, block=16))
    assert psnr_b(image, distorted, block_size=16) < psnr_b(image, distorted) - 1.0
    assert psnr_b_y(image, distorted, block_size=16) < psnr_b_y(image, distorted) - 1.0
    expected = psnr_b_gray(image[0], distorted[0], block_size=16)
    assert psnr_b_y(image, distorted, block_size=16) == pytest.approx(
        expected, abs=1e-9
    )


def test_blocking_effect_factor_refuses_an_image_of_one_block_on_a_side():
    with pytest.raises(ValueError, match="needs both sides > 8 px, got 16x8"):
        blocking_effect_factor(torch.zeros(8, 16))
    assert blocking_effect_factor(torch.zeros(9, 16)) == 0.0


def test_metrics_reject_a_pair_of_one_channel_images():
    # Matching shapes are not enough: a grayscale pair must not pass as RGB.
    gray = torch.zeros(1, 64, 96, dtype=torch.uint8)
    with pytest.raises(
        ValueError, match=r"original must be a uint8 tensor \(3, H, W\)"
    ):
        psnr(gray, gray)


def test_image_metrics_puts_each_value_under_its_own_key():
    # Channels with different errors: the RGB-mean and the luma PSNR-B differ.
    image = ramp(170, 180)
    errors = torch.stack(
        [
            block_checkerboard(170, 180, amplitude=8),
            pixel_checkerboard(170, 180, amplitude=3),
            block_checkerboard(170, 180, amplitude=2),
        ]
    )
    distorted = add(image, errors)
    values = image_metrics(image, distorted)
    assert values["psnr-b"] != pytest.approx(values["psnr-b-y"], abs=0.1)
    assert values == {
        "psnr-rgb": psnr(image, distorted),
        "ms-ssim-rgb": ms_ssim_rgb(image, distorted),
        "psnr-b": psnr_b(image, distorted),
        "psnr-b-y": psnr_b_y(image, distorted),
    }


@pytest.mark.parametrize("height, width", [(0, 20), (10, 0), (-10, 20), (10, -20)])
def test_bits_per_pixel_refuses_an_empty_or_negative_size(height, width):
    with pytest.raises(ValueError, match="image size must be positive"):
        bits_per_pixel(100, height, width)
