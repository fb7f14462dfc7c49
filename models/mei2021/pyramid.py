"""Scalable (layered) coding support: input pyramid, padding, joint loss, per-layer results.

Used by the Mei et al. 2021 baselines (``models/mei2021/network.py``), but nothing here
depends on that model beyond the output keys of its ``forward`` and the coding
functions of ``models/mei2021/coding.py``.

* :func:`image_pyramid` builds the spatial model's inputs from each training crop on
  the fly, so no pre-processed dataset is needed. The authors do not say how their
  pyramid files were made; we downsample the full-resolution image directly to each
  level with PyTorch's **antialiased bicubic** filter (``antialias=True``, i.e. a
  bicubic kernel stretched by the scale factor, as PIL's ``Image.BICUBIC`` resize),
  clamped to [0, 1].
* :class:`ScalableRDLoss` is the joint single-stage loss of B6, with the signature of
  CompressAI's ``RateDistortionLoss``.
* :func:`evaluate_layers` codes one image and returns one record per layer, in the
  results format of ``test.py`` plus a ``layer`` index.
"""

import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.stitching.patches import pad_replicate

__all__ = ["pyramid_sizes", "image_pyramid", "to_uint8", "reference_pyramid",
           "ScalableRDLoss", "evaluate_layers", "layered_references", "mean_over_images"]


def pyramid_sizes(height: int, width: int, levels: int) -> List[Tuple[int, int]]:
    """Size of every pyramid level of a ``height x width`` image, coarsest first.

    Level j (counted from the top) has ``ceil(height / 2^j) x ceil(width / 2^j)``
    pixels: the decoded image of spatial layer k is cropped to this size, and its
    rate is counted over these pixels.
    """
    if height <= 0 or width <= 0 or levels < 1:
        raise ValueError(f"need a positive image size and level count, got {height}x{width}, "
                         f"{levels} levels")
    return [(math.ceil(height / 2 ** j), math.ceil(width / 2 ** j))
            for j in range(levels - 1, -1, -1)]


def image_pyramid(x: Tensor, levels: int) -> List[Tensor]:
    """Antialiased-bicubic pyramid of ``x`` (B, 3, H, W) in [0, 1], coarsest first.

    H and W must be multiples of ``2^(levels-1)`` so that every level halves exactly;
    the last level is ``x`` itself (not a copy).
    """
    factor = 2 ** (levels - 1)
    height, width = x.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(f"a {levels}-level pyramid needs sides that are multiples of {factor}, "
                         f"got {height}x{width}")
    out = []
    for j in range(levels - 1, 0, -1):
        size = (height // 2 ** j, width // 2 ** j)
        level = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        out.append(level.clamp(0, 1))
    out.append(x)
    return out


def to_uint8(x: Tensor) -> Tensor:
    """(3, H, W) float in [0, 1] -> uint8, rounded (Mei's evaluation rounds to 8 bit)."""
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def reference_pyramid(image: Tensor, levels: int, multiple: int) -> List[Tensor]:
    """The uint8 image each spatial layer is measured against, coarsest first.

    ``image`` (3, H, W) uint8 is padded to ``multiple`` exactly as the encoder pads
    it (replicating the last row and column), its pyramid is built, and level k is
    cropped to ``pyramid_sizes(H, W)[k]``.
    """
    height, width = image.shape[-2:]
    padded = pad_replicate(image, multiple).float().div(255)[None]
    levels_ = image_pyramid(padded, levels)
    return [to_uint8(level[0, :, :h, :w])
            for level, (h, w) in zip(levels_, pyramid_sizes(height, width, levels))]


class ScalableRDLoss(nn.Module):
    """Joint rate-distortion loss of all layers (Mei et al. 2021, B6).

    ``L = sum_k [ lambda_k * R_k + 255^2 * MSE(target_k, x^_k) ]``, images in [0, 1].

    * ``cumulative=True`` (quality): ``R_k = sum_{j<=k} bits_j / (B*H*W)``, so the base
      bits are charged ``sum(lambda)`` times. Lambda multiplies the *rate*: CompressAI's
      ``lmbda`` corresponds to ``1 / lambda_k`` (250 -> 0.004).
    * ``cumulative=False`` (spatial): ``R_k = bits_k / (B*H_k*W_k)`` over layer k's own
      pixels, and ``target_k`` is the pyramid level of layer k.

    ``output`` is a model output with ``x_hats``, ``targets`` and ``likelihoods`` (one
    entry per layer, in layer order). Returns ``loss``; ``bpp_loss`` (bits of all
    layers over the top layer's pixels: the top operating point's rate) and
    ``mse_loss`` (top layer), as CompressAI's ``RateDistortionLoss`` does for the
    generic trainer; and ``bpp_loss_k``/``mse_loss_k`` (R_k and MSE_k) for every layer.
    """

    def __init__(self, lmbdas: Sequence[float], cumulative: bool):
        super().__init__()
        if not lmbdas or any(not v > 0 for v in lmbdas):
            raise ValueError(f"lmbdas must be positive, got {list(lmbdas)!r}")
        self.lmbdas = [float(v) for v in lmbdas]
        self.cumulative = cumulative

    def forward(self, output: Dict, target: Tensor) -> Dict[str, Tensor]:
        x_hats, targets = output["x_hats"], output["targets"]
        likelihoods = list(output["likelihoods"].values())
        if not len(x_hats) == len(targets) == len(likelihoods) == len(self.lmbdas):
            raise ValueError(f"loss has {len(self.lmbdas)} lambdas but the output has "
                             f"{len(x_hats)} layers and {len(likelihoods)} likelihoods")
        if targets[-1].shape != target.shape:
            raise ValueError(f"target {tuple(target.shape)} does not match the top layer "
                             f"{tuple(targets[-1].shape)}")
        batch = target.shape[0]
        result, loss, total_bits = {}, 0.0, 0.0
        for k, (x_hat, ref, p, lmbda) in enumerate(zip(x_hats, targets, likelihoods, self.lmbdas)):
            bits = torch.log(p).sum() / -math.log(2)
            total_bits = total_bits + bits
            if self.cumulative:
                rate = total_bits / (batch * ref.shape[-2] * ref.shape[-1])
            else:
                rate = bits / (batch * ref.shape[-2] * ref.shape[-1])
            mse = F.mse_loss(x_hat, ref)
            loss = loss + lmbda * rate + 255.0 ** 2 * mse
            result[f"bpp_loss_{k}"], result[f"mse_loss_{k}"] = rate, mse
        pixels = batch * target.shape[-2] * target.shape[-1]
        result.update(loss=loss, bpp_loss=total_bits / pixels, mse_loss=result[f"mse_loss_{k}"])
        return result


def evaluate_layers(model: nn.Module, image: Tensor, metrics=None) -> List[dict]:
    """Code ``image`` with a layered model and measure every operating point.

    Args:
        model: a Mei model in eval mode with entropy tables (``update()`` done).
        image: uint8 (3, H, W) on any device.
        metrics: ``f(original, reconstruction) -> dict`` on uint8 images; defaults to
            ``utils.evaluation.metrics.image_metrics`` (PSNR-RGB, MS-SSIM-RGB, PSNR-B).

    Returns:
        One record per layer k: ``layer``, ``bpp`` (real, cumulative: bytes of streams
        <= k, as packed in the container, over the pixels of layer k), ``bpp_est``
        (the same from the likelihoods), the metrics of the 8-bit reconstruction
        against layer k's reference (the image, or its pyramid level for spatial
        models), ``height``/``width`` of layer k, ``encoding_time`` (one encoder run,
        all layers) and ``decoding_time`` (decoding layers <= k from the container
        truncated to them).
    """
    from models.mei2021.coding import (decode_layers, encode_layers, pack_layers, truncate_layers,
                                       unpack_layers)
    from utils.evaluation.metrics import image_metrics

    metrics = image_metrics if metrics is None else metrics
    start = time.perf_counter()
    layered = encode_layers(model, image)
    encoding_time = time.perf_counter() - start
    data = pack_layers(model, layered)
    references = layered_references(model, image)
    records = []
    for k in range(model.num_layers):
        operating_point = truncate_layers(data, k + 1)  # what a client of layer k receives
        start = time.perf_counter()
        reconstruction = decode_layers(model, unpack_layers(operating_point))[k]
        decoding_time = time.perf_counter() - start
        height, width = references[k].shape[-2:]
        record = {"layer": k, "bpp": len(operating_point) * 8 / (height * width),
                  "bpp_est": sum(layered.estimated_bits[: k + 1]) / (height * width)}
        record.update(metrics(references[k].cpu(), reconstruction.cpu()))
        record.update(height=height, width=width, encoding_time=encoding_time,
                      decoding_time=decoding_time)
        records.append(record)
    return records


def layered_references(model: nn.Module, image: Tensor) -> List[Tensor]:
    """The uint8 image each layer of ``model`` reconstructs, base first."""
    scales = model.layer_scales()
    if all(s == 1 for s in scales):
        return [image] * len(scales)
    return reference_pyramid(image, len(scales), model.downsampling_factor)


def mean_over_images(records: List[List[dict]]) -> List[Dict[str, Optional[float]]]:
    """Average per-image layer records (``records[i][k]``) into one record per layer."""
    if not records:
        raise ValueError("no images to average")
    out = []
    for k in range(len(records[0])):
        layer = {"layer": k}
        for key in records[0][k]:
            if key == "layer":
                continue
            values = [image[k][key] for image in records]
            layer[key] = None if any(v is None for v in values) else sum(values) / len(values)
        out.append(layer)
    return out
