"""Image-quality metrics and bit rates for the evaluation harness.

Every distortion metric compares two **8-bit** RGB images (uint8 tensors (3, H, W)):
the reconstruction is what a decoder would write to disk, so it is measured after
rounding, as the CPS paper and CompressAI's published results do.

* PSNR-RGB: ``10 log10(255^2 / MSE)`` with the MSE over all three channels.
* MS-SSIM-RGB: ``pytorch_msssim.ms_ssim`` (data range 255). Its five scales need a
  shorter side above 160 pixels; smaller images get ``None`` and a warning.
* PSNR-B (Yim and Bovik, "Quality assessment of deblocked images", IEEE TIP 2011,
  block size 8) adds the blocking-effect factor (BEF) of the reconstruction (how much
  stronger the differences across 8x8 block borders are than inside blocks) to the
  MSE, so seams cost decibels that PSNR does not show. Two forms are reported:

  - ``psnr-b``: torchmetrics' grayscale implementation run on R, G and B and
    averaged, kept as it was so that older results files stay comparable.
    torchmetrics counts the horizontal border pairs as ``H*W/B - 1`` instead of the
    paper's ``H*(W/B - 1)`` (and likewise vertically): it underrates the BEF, and on
    JPEG-coded Kodak images its luma PSNR-B reads 0.04 to 1.1 dB higher.
  - ``psnr-b-y``: the paper's definition, computed here, on BT.601 luma
    ``Y = 0.299 R + 0.587 G + 0.114 B`` (full range, not rounded), the form most
    deblocking papers report.

  Both need each side longer than the block size; smaller images get ``None`` and
  a warning.

A lossless reconstruction has an infinite PSNR; it is kept as ``inf`` here and the
JSON writers turn it into ``null``.
"""

import math
import warnings
from typing import Dict, Optional

import torch
from pytorch_msssim import ms_ssim
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio_with_blocked_effect

# pytorch_msssim downsamples four times with an 11-tap window: the shorter side must
# exceed (11 - 1) * 2**4 pixels.
MS_SSIM_MIN_SIDE = 161
PSNR_B_BLOCK = 8


def _check_pair(original: Tensor, reconstruction: Tensor) -> None:
    for name, image in (("original", original), ("reconstruction", reconstruction)):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(
                f"{name} must be a uint8 tensor (3, H, W), "
                f"got {image.dtype} {tuple(image.shape)}"
            )
    if original.shape != reconstruction.shape:
        raise ValueError(
            f"reconstruction {tuple(reconstruction.shape)} does not match "
            f"the original {tuple(original.shape)}"
        )


def psnr(original: Tensor, reconstruction: Tensor) -> float:
    """PSNR in dB of two uint8 (3, H, W) images over all channels (inf if equal)."""
    _check_pair(original, reconstruction)
    mse = (original.double() - reconstruction.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ms_ssim_rgb(original: Tensor, reconstruction: Tensor) -> Optional[float]:
    """MS-SSIM of two uint8 (3, H, W) images.

    Returns ``None`` (with a warning) if they are too small.
    """
    _check_pair(original, reconstruction)
    height, width = original.shape[1:]
    if min(height, width) < MS_SSIM_MIN_SIDE:
        warnings.warn(
            f"MS-SSIM needs both sides >= {MS_SSIM_MIN_SIDE} px, the image is "
            f"{width}x{height}: reported as null",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    value = ms_ssim(
        original[None].float(), reconstruction[None].float(), data_range=255.0
    )
    return value.item()


def _fits_blocks(image: Tensor, block_size: int) -> bool:
    """False (with a warning) if a side is too short to hold a block border."""
    height, width = image.shape[-2:]
    if min(height, width) > block_size:
        return True
    warnings.warn(
        f"PSNR-B needs both sides > {block_size} px, the image is {width}x{height}: "
        "reported as null",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def psnr_b(
    original: Tensor, reconstruction: Tensor, block_size: int = PSNR_B_BLOCK
) -> Optional[float]:
    """PSNR-B in dB: torchmetrics' grayscale PSNR-B on R, G and B, averaged.

    ``None`` (with a warning) if a side is ``block_size`` pixels or less.
    """
    _check_pair(original, reconstruction)
    if not _fits_blocks(original, block_size):
        return None
    values = [
        peak_signal_noise_ratio_with_blocked_effect(
            reconstruction[c][None, None].double(),
            original[c][None, None].double(),
            data_range=255.0,
            block_size=block_size,
        ).item()
        for c in range(3)
    ]
    return sum(values) / 3


def blocking_effect_factor(image: Tensor, block_size: int = PSNR_B_BLOCK) -> float:
    """BEF of a grayscale (H, W) image, as Yim and Bovik (IEEE TIP 2011) define it.

    The pairs of horizontally adjacent pixels split into those that straddle a
    vertical block border (columns ``kB - 1`` and ``kB``) and the others; vertical
    pairs likewise. With ``D_B`` the mean squared difference over the border pairs
    of both directions and ``D_Bc`` that over the other pairs::

        BEF = log2(B) / log2(min(H, W)) * max(D_B - D_Bc, 0)

    The means divide by the number of pairs summed, which is the paper's
    ``N_HB = H (W/B - 1)`` and ``N_VB = W (H/B - 1)`` when B divides the sides (a
    partial last block adds no border).
    """
    image = image.double()
    height, width = image.shape
    if min(height, width) <= block_size:
        raise ValueError(
            f"blocking_effect_factor needs both sides > {block_size} px, "
            f"got {width}x{height}"
        )
    squared = {"border": 0.0, "inner": 0.0}
    counts = {"border": 0, "inner": 0}
    for steps in (image[:, 1:] - image[:, :-1], (image[1:, :] - image[:-1, :]).T):
        # ``steps[:, j]``: the difference between pixel j + 1 and pixel j along a line.
        is_border = torch.arange(steps.shape[1]) % block_size == block_size - 1
        squared_steps = steps.pow(2)
        squared["border"] += squared_steps[:, is_border].sum().item()
        squared["inner"] += squared_steps[:, ~is_border].sum().item()
        counts["border"] += steps.shape[0] * int(is_border.sum())
        counts["inner"] += steps.shape[0] * int((~is_border).sum())
    difference = (
        squared["border"] / counts["border"] - squared["inner"] / counts["inner"]
    )
    if difference <= 0:
        return 0.0
    return math.log2(block_size) / math.log2(min(height, width)) * difference


def psnr_b_gray(
    original: Tensor,
    reconstruction: Tensor,
    data_range: float = 255.0,
    block_size: int = PSNR_B_BLOCK,
) -> float:
    """PSNR-B in dB of two grayscale (H, W) images: ``MSE + BEF(reconstruction)``."""
    if original.shape != reconstruction.shape or original.dim() != 2:
        raise ValueError(
            f"psnr_b_gray needs two (H, W) images of one size, got "
            f"{tuple(original.shape)} and {tuple(reconstruction.shape)}"
        )
    mse = (original.double() - reconstruction.double()).pow(2).mean().item()
    degradation = mse + blocking_effect_factor(reconstruction, block_size)
    return (
        math.inf if degradation == 0 else 10 * math.log10(data_range**2 / degradation)
    )


def luma(image: Tensor) -> Tensor:
    """BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` of a (3, H, W) image.

    Returns float64 (H, W).
    """
    red, green, blue = image.double()
    return 0.299 * red + 0.587 * green + 0.114 * blue


def psnr_b_y(
    original: Tensor, reconstruction: Tensor, block_size: int = PSNR_B_BLOCK
) -> Optional[float]:
    """PSNR-B in dB on BT.601 luma, with the paper's border counts.

    ``None`` (with a warning) if a side is ``block_size`` pixels or less.
    """
    _check_pair(original, reconstruction)
    if not _fits_blocks(original, block_size):
        return None
    return psnr_b_gray(luma(original), luma(reconstruction), block_size=block_size)


def image_metrics(
    original: Tensor, reconstruction: Tensor
) -> Dict[str, Optional[float]]:
    """The distortion metrics of the results JSON (CompressAI's keys plus PSNR-B)."""
    return {
        "psnr-rgb": psnr(original, reconstruction),
        "ms-ssim-rgb": ms_ssim_rgb(original, reconstruction),
        "psnr-b": psnr_b(original, reconstruction),
        "psnr-b-y": psnr_b_y(original, reconstruction),
    }


def bits_per_pixel(num_bytes: int, height: int, width: int) -> float:
    """Rate of ``num_bytes`` over the original ``height x width`` pixels."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    return num_bytes * 8.0 / (height * width)


def likelihood_bits(likelihoods: Dict[str, Tensor]) -> float:
    """Estimated bits of a forward pass: ``sum(-log2 p)`` over every latent."""
    return sum(-torch.log2(p.double()).sum().item() for p in likelihoods.values())
