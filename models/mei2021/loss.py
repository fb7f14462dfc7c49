"""The joint training loss of the Mei et al. 2021 layered models."""

import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ScalableRDLoss"]


class ScalableRDLoss(nn.Module):
    """Joint rate-distortion loss of all layers, trained in one stage (Mei et al. 2021).

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
            raise ValueError(
                f"loss has {len(self.lmbdas)} lambdas but the output has "
                f"{len(x_hats)} layers and {len(likelihoods)} likelihoods"
            )
        if targets[-1].shape != target.shape:
            raise ValueError(
                f"target {tuple(target.shape)} does not match the top layer "
                f"{tuple(targets[-1].shape)}"
            )
        batch = target.shape[0]
        result, loss, total_bits = {}, 0.0, 0.0
        for k, (x_hat, ref, p, lmbda) in enumerate(
            zip(x_hats, targets, likelihoods, self.lmbdas)
        ):
            bits = torch.log(p).sum() / -math.log(2)
            total_bits = total_bits + bits
            if self.cumulative:
                rate = total_bits / (batch * ref.shape[-2] * ref.shape[-1])
            else:
                rate = bits / (batch * ref.shape[-2] * ref.shape[-1])
            mse = F.mse_loss(x_hat, ref)
            loss = loss + lmbda * rate + 255.0**2 * mse
            result[f"bpp_loss_{k}"], result[f"mse_loss_{k}"] = rate, mse
        pixels = batch * target.shape[-2] * target.shape[-1]
        result.update(
            loss=loss, bpp_loss=total_bits / pixels, mse_loss=result[f"mse_loss_{k}"]
        )
        return result
