"""The coders ``test.py`` and the demo evaluate a learned model with: its tiling
(``--tiling``: POPS patches, the whole image or naive tiles), ``--entropy-estimation``,
``--half`` and ``--verify`` checked against what the model can do, and turned into one
coder per operating point.

Kept apart from the coders themselves (``utils.evaluation.coders``,
``utils.evaluation.naive_tiles``): this is the one place that decides which of them a
command line asks for.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from models.base import CodingPlan
from utils.evaluation.coders import EstimationCoder, ModelCoder
from utils.evaluation.naive_tiles import NaiveTiles
from utils.stitching.geometry import check_patch_size, model_geometry
from utils.stitching.spec import PatchSpec


@dataclass
class LearnedOptions:
    """How ``test.py`` codes with a learned model (see its ``--help``).

    ``tiling`` None picks ``pops`` for models that support patches and ``none``
    otherwise; ``plan.patch`` is the POPS patch, or the tile side for ``naive``.
    """

    plan: CodingPlan
    tiling: Optional[str] = None
    entropy_estimation: bool = False
    half: bool = False
    verify: bool = False


def _layers_at_full_resolution(model: nn.Module) -> bool:
    """Whether every operating point reconstructs the image at its own size (not a
    spatially scalable model's smaller lower layers), as naive tiles need."""
    side = model.downsampling_factor
    image = torch.zeros(3, side, side, dtype=torch.uint8)
    return all(
        tuple(model.reference_image(image, point).shape) == tuple(image.shape)
        for point in range(model.operating_points)
    )


def learned_coders(model: nn.Module, options: LearnedOptions):
    """One coder per operating point of ``model`` under ``options``; bad combinations
    raise ``ValueError``."""
    tiling = options.tiling or ("pops" if model.supports_patches else "none")
    patch = options.plan.patch
    if tiling == "pops" and not model.supports_patches:
        raise ValueError(
            f"--tiling pops needs a padding-free model such as cps; "
            f"{model.registry_name} pads its convolutions: use none or naive"
        )
    if tiling == "naive" and not (patch.size and patch.size > 0):
        raise ValueError("--tiling naive needs a fixed --patch-size > 0")
    if tiling == "naive" and not _layers_at_full_resolution(model):
        raise ValueError(
            f"--tiling naive needs every layer at the image's resolution; "
            f"{model.registry_name} codes its lower layers at a smaller one: "
            "use none"
        )
    if tiling == "pops" and not patch.is_auto:
        check_patch_size(patch.size, model_geometry(model))
    if options.entropy_estimation:
        coders = [
            EstimationCoder(model, half=options.half, point=point)
            for point in range(model.operating_points)
        ]
        return (
            [NaiveTiles(coder, patch.size) for coder in coders]
            if tiling == "naive"
            else coders
        )
    plan = options.plan if tiling == "pops" else options.plan.with_(patch=PatchSpec(0))
    coders = [
        ModelCoder(
            model, plan, point, count_header=tiling != "naive", verify=options.verify
        )
        for point in range(model.operating_points)
    ]
    return (
        [NaiveTiles(coder, patch.size) for coder in coders]
        if tiling == "naive"
        else coders
    )
