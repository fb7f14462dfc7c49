"""The memory budget of models that code the whole image at once (no POPS).

Kamisli 2024, Mei 2021 and the CompressAI zoo models cannot split an image, so the
only thing a budget can do for them is refuse, before any allocation, an image whose
coding would break it. What their coding needs is *measured*, through the model's
own ``encode`` and ``decode`` (the contract's, :mod:`models.base`) on a calibration
image. A forward pass is no reliable proxy: Mei 2021's coding needs about twice its
warm forward pass, the zoo models' about a third of a cold one, and which of the two
a calibration sees depends on what the process ran before.

The peak grows with the area, plus fixed buffers that weigh most on small images
(the coders' own copies of the weights, entropy tables), so one per-pixel figure
would over-estimate large images several times and refuse images that fit. The
calibration therefore codes two sizes, :data:`CALIBRATION_SIDES` (128x128 and
512x512, sides rounded up to the model's factor), after a first run at the smaller
one that takes the process's one-time allocations, and extrapolates each of encoding
and decoding from the larger size along the line through both, down to the smaller
size, under which the smaller one's peak is taken as it is.

Why 512x512, and why a heap margin (measured on 2 cores, noise images, random
weights, peaks as :func:`utils.memory.peak_added` reads them; docs/memory.md has the
table). At 4K and 8K the prediction is the line's slope times the area, so the
slope has to be the real cost of a further pixel; no model's peak grew steadily
faster than the area (up to 3072x3072), but the slope between 128x128 and 256x256, used
before, was wrong by more than the 1.1 safety factor allows for. mbt2018-mean's
(N = 192) was 13 % (encoding) and 7 % (decoding) under its cost per pixel from
512x512 to 2048x2048, because the 128x128 peak carries a few megabytes that do not
grow with the image: 3 % of margin was left at 2048x2048. From one process to the
next it moved by 13 % (mbt2018-mean's encoding) and 14 % (Mei 2021 spatial's): peaks
of tens of megabytes differing by a few. Between 128x128 and 512x512 (5x the area
between) mbt2018-mean's slopes are within 3.5 % of its large sizes' cost; a 384x384
top size was not enough (Mei 2021 spatial's decoding peaked 1.06-1.35x its line at
1024x1024 in three processes, against 1.00-1.05x from 512x512). The calibration codes
3x the pixels it did (0.29 megapixels in all): on 2 idle cores 2.2 s for Mei 2021
spatial (1.1 s before), 8.5 s for Mei 2021 quality (3.6 s) and Kamisli B8 N = 768
(7.9 s), and 18-22 s for the autoregressive zoo models, whose CompressAI decoding runs
latent position by position (mbt2018 5.4 s before, Cheng 2020 anchor 8.8 s).

Mei 2021 codes in the transforms' exact mode, which keeps freed blocks in glibc's
heap (:func:`utils.memory.reuse_freed_memory`), and its peak then varies with the
heap's fragmentation: its spatial model's encoding of a 2048x2048 image peaked
between 4173 and 5069 MB above the libraries in four processes, up to 1.12x the line
through its calibration. So on the CPU the prediction carries the POPS
planner's margin for the same heap (``HEAP_FRAGMENTATION``, 1.2) on top of the
safety factor: 1.32x the line in all. The zoo models and Kamisli do not keep freed
blocks, and in a fresh process peak within 1.024x their line, but they code in the
heap an earlier model left: after Mei 2021 spatial had coded an image, Kamisli B16's
calibration peaks grew little or not at all with the area and its decoding peaked
1.29-1.31x the line that followed, and mbt2018-mean's decoding peaked a third higher
than in a fresh process (in one process of three). So every model carries the margin
on the CPU.
"""

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from models.base import CodingPlan, LearnedCodec
from utils.device import model_device
from utils.memory import memory_in_use, peak_added
from utils.stitching.planner import (
    HEAP_FRAGMENTATION,
    SAFETY_BYTES,
    SAFETY_FACTOR,
    check_fits,
)

# Sides of the calibration images, each rounded up to the model's factor.
CALIBRATION_SIDES = (128, 512)


@dataclass(frozen=True)
class CodingCost:
    """Peak bytes added by coding an image whole, as a function of its padded area:
    per direction (encoding, decoding), the peak measured at ``area`` pixels and the
    bytes each further pixel adds, down to ``smallest_area`` (the smaller
    calibration size), under which the peak is taken as it is there; the
    prediction carries ``heap_margin`` (the CPU heap's, see the module's docstring)
    and the planner's safety margins."""

    area: int
    peaks: Tuple[int, ...]
    bytes_per_pixel: Tuple[float, ...]
    smallest_area: int = 0
    heap_margin: float = 1.0

    def line(self, area: int) -> Tuple[float, ...]:
        """Per direction, the peak on the calibration's line at ``area`` padded
        pixels, before any margin."""
        further = max(area, self.smallest_area) - self.area
        return tuple(
            measured + slope * further
            for measured, slope in zip(self.peaks, self.bytes_per_pixel)
        )

    def bytes_for(self, area: int) -> int:
        """Predicted peak added by coding an image of ``area`` padded pixels."""
        peak = max(self.line(area))
        return int(peak * self.heap_margin * SAFETY_FACTOR) + SAFETY_BYTES


# Per architecture, constructor arguments and device: checkpoints of one
# configuration share their cost (their weights change how long the strings are, not
# which buffers coding allocates), so evaluating several of them calibrates once.
_COSTS: Dict[Tuple[str, str, str], CodingCost] = {}


def _coding_peaks(model: nn.Module, device: torch.device, side: int) -> List[int]:
    """Peaks added by encoding and by decoding a side x side noise image (the
    longest strings random weights write)."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(
        0, 256, (3, side, side), dtype=torch.uint8, generator=generator
    )
    plan = CodingPlan()
    payloads = []
    encoding = peak_added(device, lambda: payloads.append(model.encode(image, plan)))
    decoding = peak_added(device, lambda: model.decode(payloads[0], plan))
    return [encoding, decoding]


def coding_cost(model: nn.Module, device: torch.device) -> CodingCost:
    """What coding an image whole costs ``model`` on ``device``, measured once per
    configuration (:data:`CALIBRATION_SIDES` rounded up to the model's factor)."""
    key = (
        model.registry_name,
        json.dumps(model.config, sort_keys=True, default=str),
        str(device),
    )
    if key not in _COSTS:
        factor = model.downsampling_factor
        small, large = (factor * -(-side // factor) for side in CALIBRATION_SIDES)
        large = max(large, 2 * small)  # factors of 512 and more
        _coding_peaks(model, device, small)  # the one-time allocations
        small_peaks = _coding_peaks(model, device, small)
        large_peaks = _coding_peaks(model, device, large)
        added_area = large**2 - small**2
        _COSTS[key] = CodingCost(
            area=large**2,
            smallest_area=small**2,
            heap_margin=HEAP_FRAGMENTATION if device.type == "cpu" else 1.0,
            peaks=tuple(large_peaks),
            bytes_per_pixel=tuple(
                max(big - little, 0) / added_area
                for little, big in zip(small_peaks, large_peaks)
            ),
        )
    return _COSTS[key]


def check_whole_image_fits(
    model: nn.Module,
    device: torch.device,
    budget_bytes: Optional[int],
    height: int,
    width: int,
    multiple: Optional[int] = None,
) -> None:
    """Refuse, before any allocation, a height x width image whose coding by
    ``model`` on ``device`` would break ``budget_bytes`` (None: no budget).

    The cost is that of the area coded: the sides padded to ``multiple``, the
    model's ``downsampling_factor`` unless it pads to another (the zoo models, to
    CompressAI's 64)."""
    if budget_bytes is None:
        return
    factor = multiple or model.downsampling_factor
    padded = (-(-height // factor) * factor) * (-(-width // factor) * factor)
    check_fits(
        memory_in_use(device),
        coding_cost(model, device).bytes_for(padded),
        budget_bytes,
        f"{model.registry_name} coding of a {width}x{height} image, which it codes "
        "whole",
    )


class CodesWholeImages:
    """Mixin of the models that code images whole (listed before
    ``models.base.LearnedCodec`` in the bases): their budget check's calibration,
    taken ahead of timed coding."""

    def __init_subclass__(cls, **kwargs):
        """Refuse a class that lists this mixin after ``LearnedCodec``, whose
        ``measure_budget_costs`` (nothing to measure) would then hide this one."""
        super().__init_subclass__(**kwargs)
        order = cls.__mro__
        if LearnedCodec in order and order.index(LearnedCodec) < order.index(
            CodesWholeImages
        ):
            raise TypeError(
                f"{cls.__name__}: list CodesWholeImages before LearnedCodec in its "
                "bases, or LearnedCodec's measure_budget_costs, which measures "
                "nothing, hides the mixin's"
            )

    def measure_budget_costs(self, plan: CodingPlan) -> None:
        """Calibrate :func:`check_whole_image_fits` for this model and its device."""
        if plan.budget_bytes is not None:
            coding_cost(self, model_device(self))
