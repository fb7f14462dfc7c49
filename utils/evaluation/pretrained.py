"""The CompressAI zoo's published weights, fetched for ``test.py pretrained``.

torch.hub downloads each file once into ``$TORCH_HOME/hub/checkpoints``; without a
network, a user puts the file there by hand, so every failure names that folder, and
a cached file that holds no weights is named as the cause instead of the zoo's error.
The zoo model is then rebuilt as the registered contract class of its architecture,
so that it codes through the same methods as every other model.
"""

import contextlib
import os
import sys

import torch
from torch import nn

from models import get_model_class
from models.checkpoint_file import first_line
from utils.output_paths import nearest_existing


def pretrained_url(architecture: str, quality: int, metric: str) -> str:
    """Where CompressAI publishes the zoo weights of ``architecture`` at ``quality`` for
    ``metric``; a name or quality the zoo lacks raises ``ValueError``, without any
    download, so that a command line can be checked before the first model loads."""
    from compressai.zoo.image import model_urls

    if architecture not in model_urls:
        raise ValueError(
            f"no pretrained CompressAI model {architecture!r}; choose from "
            f"{', '.join(sorted(model_urls))}"
        )
    try:
        return model_urls[architecture][metric][quality]
    except KeyError:
        qualities = sorted(model_urls[architecture].get(metric, {}))
        raise ValueError(
            f"no pretrained {architecture} for metric {metric!r} and quality "
            f"{quality}; qualities: {qualities}"
        ) from None


def load_pretrained(
    architecture: str, quality: int, metric: str, device: torch.device
) -> nn.Module:
    """A CompressAI zoo model with its published weights (downloaded once by torch.hub),
    as the registered contract class of that architecture."""
    from compressai.zoo import image_models

    url = pretrained_url(architecture, quality, metric)
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    cached = os.path.join(cache, os.path.basename(url))
    was_cached = os.path.isfile(cached)
    try:
        # torch.hub announces downloads on stdout, which belongs to the results JSON.
        with contextlib.redirect_stdout(sys.stderr):
            zoo_model = image_models[architecture](
                quality=quality, metric=metric, pretrained=True, progress=False
            )
    except Exception as exc:
        # A failed download, or a cached file that holds no weights.
        reason = first_line(exc)
        if was_cached:  # users are told to put the file there themselves
            raise ValueError(
                f"cannot load pretrained {architecture} (metric {metric}, quality "
                f"{quality}) from the cached file {cached}: "
                f"{type(exc).__name__}: {reason}; delete it to download it "
                "again"
            ) from None
        if not isinstance(exc, (OSError, RuntimeError)):
            raise
        blocked = nearest_existing(cache)
        if not os.path.isdir(blocked):  # TORCH_HOME (or a folder under it) is a file
            raise RuntimeError(
                f"cannot keep pretrained weights in {cache}: {blocked} is a file, "
                "not a folder; point TORCH_HOME at a folder"
            ) from None
        raise RuntimeError(
            f"cannot download pretrained {architecture} (metric {metric}, quality "
            f"{quality}) from {url}: {reason}; without network, put that file in "
            f"{cache}"
        ) from None
    model = get_model_class(architecture).from_state_dict(zoo_model.state_dict())
    return model.to(device).eval()
