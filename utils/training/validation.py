"""Validation of a training run: RD loss on the test crops, summed over processes."""

from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from utils.training import distributed

__all__ = ["validate"]


@torch.no_grad()
def validate(
    raw: nn.Module,
    criterion: nn.Module,
    loader: DataLoader,
    device: torch.device,
    channels_last: bool,
    images_kept: int,
    note_skipped: Callable[[int], None],
) -> Tuple[Dict[str, float], List[Tuple[Tensor, Tensor]]]:
    """Estimated-rate loss, bpp, MSE and mean per-image PSNR on the test centre crops.

    Every process evaluates its share of ``loader``; the sums are all-reduced, so
    every rank returns the same means. The model is put back in training mode.

    Args:
        raw: the model without its DDP wrapper.
        criterion: the run's RD loss (``{"loss", "bpp_loss", ...}`` of ``raw(x), x``).
        loader: yields ``(x, skipped)``: a batch in [0, 1] and its unusable images.
        channels_last: feed ``x`` in channels-last layout, as training does.
        images_kept: how many (original, reconstruction) pairs to return.
        note_skipped: told each batch's count of unusable images.

    Returns:
        ``{"loss", "mse", "bpp", "psnr", "aux"}`` and the first ``images_kept``
        (original, clamped reconstruction) pairs of this process, for TensorBoard.
    """
    raw.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # n, loss, mse, bpp, psnr
    shown = []
    for x, skipped in loader:
        note_skipped(skipped)
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = raw(x)
        losses = criterion(out, x)
        x_hat = out["x_hat"].clamp(0, 1)
        mse = (x_hat - x).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        n = x.shape[0]
        sums += torch.stack(
            [
                torch.tensor(float(n), device=device, dtype=torch.float64),
                losses["loss"].double() * n,
                mse.double().sum(),
                losses["bpp_loss"].double() * n,
                (-10 * torch.log10(mse)).double().sum(),
            ]
        )
        shown.extend(zip(x, x_hat))
        del shown[images_kept:]
    distributed.all_reduce_sum(sums)
    raw.train()
    n, loss, mse, bpp, psnr_sum = sums.tolist()
    metrics = {
        "loss": loss / n,
        "mse": mse / n,
        "bpp": bpp / n,
        "psnr": psnr_sum / n,
        "aux": float(raw.aux_loss()),
    }
    return metrics, shown
