"""Image-quality metrics and bit rates for the evaluation harness.

Every distortion metric compares two **8-bit** RGB images (uint8 tensors (3, H, W)):
the reconstruction is what a decoder would write to disk, so it is measured after
rounding, as the CPS paper and CompressAI's published results do.

* PSNR-RGB: ``10 log10(255^2 / MSE)`` with the MSE over all three channels.
* MS-SSIM-RGB: ``pytorch_msssim.ms_ssim`` (data range 255). Its five scales need a
  shorter side above 160 pixels; smaller images get ``None`` and a warning.
* PSNR-B (Yim and Bovik, "Quality assessment of deblocked images", IEEE TIP 2011,
  block size 8): torchmetrics' implementation, which accepts one channel only, run
  on R, G and B separately and averaged. It adds the blocking-effect factor of the
  reconstruction (how much stronger the differences across 8x8 block borders are
  than inside blocks) to the MSE, so seams cost decibels that PSNR does not show.

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
            raise ValueError(f"{name} must be a uint8 tensor (3, H, W), "
                             f"got {image.dtype} {tuple(image.shape)}")
    if original.shape != reconstruction.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} does not match "
                         f"the original {tuple(original.shape)}")


def psnr(original: Tensor, reconstruction: Tensor) -> float:
    """PSNR in dB of two uint8 (3, H, W) images over all channels (inf if equal)."""
    _check_pair(original, reconstruction)
    mse = (original.double() - reconstruction.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ms_ssim_rgb(original: Tensor, reconstruction: Tensor) -> Optional[float]:
    """MS-SSIM of two uint8 (3, H, W) images, or ``None`` (with a warning) if too small."""
    _check_pair(original, reconstruction)
    height, width = original.shape[1:]
    if min(height, width) < MS_SSIM_MIN_SIDE:
        warnings.warn(f"MS-SSIM needs both sides >= {MS_SSIM_MIN_SIDE} px, the image is "
                      f"{width}x{height}: reported as null", RuntimeWarning, stacklevel=2)
        return None
    value = ms_ssim(original[None].float(), reconstruction[None].float(), data_range=255.0)
    return value.item()


def psnr_b(original: Tensor, reconstruction: Tensor, block_size: int = PSNR_B_BLOCK) -> float:
    """PSNR-B in dB: torchmetrics' grayscale PSNR-B on R, G and B, averaged."""
    _check_pair(original, reconstruction)
    values = [
        peak_signal_noise_ratio_with_blocked_effect(
            reconstruction[c][None, None].double(), original[c][None, None].double(),
            data_range=255.0, block_size=block_size).item()
        for c in range(3)
    ]
    return sum(values) / 3


def image_metrics(original: Tensor, reconstruction: Tensor) -> Dict[str, Optional[float]]:
    """The three distortion metrics of the results JSON, keyed as CompressAI keys them."""
    return {
        "psnr-rgb": psnr(original, reconstruction),
        "ms-ssim-rgb": ms_ssim_rgb(original, reconstruction),
        "psnr-b": psnr_b(original, reconstruction),
    }


def bits_per_pixel(num_bytes: int, height: int, width: int) -> float:
    """Rate of ``num_bytes`` over the original ``height x width`` pixels."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    return num_bytes * 8.0 / (height * width)


def likelihood_bits(likelihoods: Dict[str, Tensor]) -> float:
    """Estimated bits of a forward pass: ``sum(-log2 p)`` over every latent."""
    return sum(-torch.log2(p.double()).sum().item() for p in likelihoods.values())
