"""Plan the POPS patches and batch that keep a coding run within a memory budget.

The codec spends the budget in phases, one after the other, and each must fit:

* transform phase: what the process holds already (interpreter, libraries, model,
  image), the latent buffers the phase fills, and the working memory of one batch
  of patches. The working memory is *measured*: the transform runs once on a
  calibration patch and the peak it adds, per input pixel, is scaled to the patch
  and batch being planned (:class:`TransformCost`); for CPS this is mostly im2col
  buffers.
* entropy phase: latent-sized tensors (``y``, the hyper-decoder's ``params``, the
  y_hat buffer) and one rANS stream's buffers, counted by :func:`entropy_phase_bytes`.

:func:`choose_patches` then takes, among the patch shapes that fit (rectangles,
whole rows or columns included), the one that computes the fewest pixels including
overlap (the whole image when it fits), and for it the largest batch that fits.
The budget covers the whole process, so on a CPU what importing PyTorch,
torchvision and CompressAI costs counts too. :class:`Planner` owns all of it for
one model: the measured costs, the memory held, and the plans.
"""

import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from utils.coding.fixed_point import CHUNK_COPIES, chunk_positions
from utils.coding.front_rans import ENCODER_BYTES_PER_SYMBOL
from utils.coding.rans import PADDING_BYTES_PER_SYMBOL
from utils.coding.streams import largest_stream_symbols
from utils.image_io import READ_BYTES_PER_PIXEL, to_uint8
from utils.memory import (
    format_memory,
    memory_in_use,
    peak_added,
    return_freed_memory,
)
from utils.stitching.geometry import (
    PopsGeometry,
    check_patch_size,
    model_geometry,
    tile_axis,
)
from utils.stitching.spec import PatchSpec
from utils.stitching.transforms import input_preparation, transform_mode

CALIBRATION_PATCH = 256
# Slack on top of measured working memory (here and for the whole-image models,
# ``models/whole_image_memory.py``): calibration images are smaller than most coded
# ones, allocator rounding, small temporaries.
SAFETY_FACTOR = 1.1
SAFETY_BYTES = 16 * 2**20
# On the CPU, transforms keep freed blocks in glibc's heap for the next patch
# (``utils/memory.py``), and over many patches they fragment: in the 91 patches of a
# 7680x4320 analysis the retained free heap grew from 609 to 699 MB (+15 %), and
# planned peaks under a 2 GB budget were passed by 12-15 % of a patch's working
# memory. One calibration patch cannot see this, so CPU costs carry the margin (and
# so do the whole-image models' on the CPU, ``models/whole_image_memory.py``).
HEAP_FRAGMENTATION = 1.2
# Copies of a padded rANS string alive while CompressAI's decoder takes it.
_PADDED_STREAM_COPIES = 3


@dataclass(frozen=True)
class TransformCost:
    """Working memory of a transform run patch-wise: ``bytes_per_pixel`` times the
    input pixels of a batch (pixels of the patch for analysis, latent positions
    times scale**2 for synthesis, i.e. always the patch's area in image pixels)."""

    bytes_per_pixel: float

    def batch_bytes(self, batch: int, height: int, width: int) -> int:
        """Predicted peak added by one batch of ``batch`` patches of
        height x width pixels."""
        return (
            int(self.bytes_per_pixel * batch * height * width * SAFETY_FACTOR)
            + SAFETY_BYTES
        )


@dataclass(frozen=True)
class PatchPlan:
    """Patch (height, width) in pixels (0: the whole axis) and batch for a transform."""

    patch_size: Tuple[int, int]
    batch_size: int
    peak_bytes: int


# Measured costs, per transform module (weakly held: a freed model takes its costs
# with it, and a new module never inherits another's) and per (device, mode).
CostsByDeviceAndMode = Dict[Tuple[str, object], TransformCost]
_COSTS: "weakref.WeakKeyDictionary[nn.Module, CostsByDeviceAndMode]" = (
    weakref.WeakKeyDictionary()
)


def check_fits(held: int, needed: int, budget: int, what: str) -> None:
    """Raise ``ValueError`` if ``needed`` bytes on top of the ``held`` ones exceed
    ``budget``. The message says which is which: on a small image nearly all of it
    is the libraries the process has loaded, which no patch size can reduce."""
    if held + needed > budget:
        raise ValueError(
            f"memory budget {format_memory(budget)} is too small for the {what}: it "
            f"needs about {format_memory(held + needed)} ({format_memory(held)} "
            f"already held, plus {format_memory(needed)}); raise --max-memory, or "
            "give none"
        )


def check_file_reading_fits(needed: int, budget: Optional[int], what: str) -> None:
    """Refuse, before a file is read, a reading that would hold ``needed`` bytes of
    the CPU's memory on top of what the process holds now and so break ``budget``
    (bytes; None for no budget). ``what`` names the reading in the refusal."""
    if budget is not None:
        check_fits(memory_in_use(torch.device("cpu")), needed, budget, what)


def check_reading_fits(width: int, height: int, budget: Optional[int]) -> None:
    """Refuse, from the size in an image file's header, a reading that would break
    ``budget``: the :data:`~utils.image_io.READ_BYTES_PER_PIXEL` bytes per pixel that
    reading holds at once. A PNG of a few kilobytes can declare a huge image, so this
    comes before its pixels are decoded."""
    check_file_reading_fits(
        READ_BYTES_PER_PIXEL * width * height,
        budget,
        f"reading of this {width}x{height} image",
    )


def entropy_phase_bytes(
    channels: int,
    positions: int,
    encoding: bool,
    stream_symbols: int,
    hyper_chunk: int = 0,
) -> int:
    """Memory of the entropy phase for ``positions`` latent positions of ``channels``
    (M) channels, float32: params (2M), the padded y_hat buffer (M) and its
    channels-last result view, ``y`` (M, encoder), a transient copy of params while
    it is rearranged channels-last (2M); the fixed-point ``h_s``'s float64 work on
    ``hyper_chunk`` latent positions at a time (``utils/coding/fixed_point.py``);
    and for one rANS stream of at most ``stream_symbols`` symbols, the encoder's
    symbol buffer (6 bytes per symbol) or the decoder's zero-padded string
    (``utils/coding/rans.py``), held three times while CompressAI's decoder takes it
    (``utils/coding/context_coder.py``)."""
    per_position = 4 * (2 * channels + channels + 2 * channels)
    if encoding:
        per_position += 4 * channels
        stream_bytes = ENCODER_BYTES_PER_SYMBOL * stream_symbols
    else:
        stream_bytes = _PADDED_STREAM_COPIES * PADDING_BYTES_PER_SYMBOL * stream_symbols
    hyper_bytes = CHUNK_COPIES * 8 * 2 * channels * hyper_chunk
    return int((per_position * positions + hyper_bytes + stream_bytes) * SAFETY_FACTOR)


def _axis_tiling(
    latent_length: int, side: int, geometry: PopsGeometry
) -> Tuple[int, int]:
    """(number of tiles, pixels they cover in total) along one axis, for a patch side
    in pixels (0: the whole axis)."""
    tiles = tile_axis(latent_length, side // geometry.scale, geometry.margin)
    return len(tiles), sum(tile.stop - tile.start for tile in tiles) * geometry.scale


def choose_patches(
    geometry: PopsGeometry,
    latent_size: Tuple[int, int],
    cost: TransformCost,
    held_bytes: int,
    budget: int,
    max_batch: int,
    patch: PatchSpec,
    what: str = "transform",
) -> PatchPlan:
    """The patch shape, then the batch, for a transform within ``budget``.

    Patches may be rectangular and may span a whole axis. Among the shapes whose
    single patch keeps ``held_bytes`` plus its working memory within the budget
    (the whole image is one of them when it fits), the one that computes the fewest
    pixels in total wins: overlap is recomputed work, and a larger square is not
    always better (640x640 patches tile a 1280x768 image with 2.5x its area, 416x416
    ones with 1.4x, 768x304 stripes with 1.2x). Shapes within 2 % of the best total
    count as equal and the largest of them is taken (fewer patches, larger GEMMs).
    The batch is then as large as the budget allows. A fixed ``patch`` only has its
    batch chosen.

    Raises:
        ValueError: if not even one patch of the smallest shape fits.
    """
    image_size = (latent_size[0] * geometry.scale, latent_size[1] * geometry.scale)
    available = budget - held_bytes

    def extent(axis: int, side: int) -> int:
        return image_size[axis] if side == 0 or side >= image_size[axis] else side

    def batch_bytes(batch: int, shape: Tuple[int, int]) -> int:
        return cost.batch_bytes(batch, extent(0, shape[0]), extent(1, shape[1]))

    if patch.is_auto:
        sides = [
            [0] + list(range(geometry.min_patch_size, length, geometry.scale))
            for length in image_size
        ]
    else:
        sides = [[patch.size], [patch.size]]
    tilings = [
        {side: _axis_tiling(latent_size[axis], side, geometry) for side in sides[axis]}
        for axis in (0, 1)
    ]
    fitting = [
        (rows, cols)
        for rows in sides[0]
        for cols in sides[1]
        if batch_bytes(1, (rows, cols)) <= available
    ]
    if not fitting:
        smallest = (sides[0][-1], sides[1][-1])
        shape = "x".join(str(extent(axis, smallest[axis])) for axis in (0, 1))
        raise ValueError(
            f"memory budget {format_memory(budget)} is too small for the {what}: it "
            f"needs at least {format_memory(held_bytes + batch_bytes(1, smallest))} "
            f"({format_memory(held_bytes)} already held, plus one {shape} px "
            "patch); raise --max-memory, or give none"
        )

    def computed(shape: Tuple[int, int]) -> int:
        return tilings[0][shape[0]][1] * tilings[1][shape[1]][1]

    fewest = min(computed(shape) for shape in fitting)
    shape = max(
        (shape for shape in fitting if computed(shape) <= 1.02 * fewest),
        key=lambda shape: extent(0, shape[0]) * extent(1, shape[1]),
    )
    patches = tilings[0][shape[0]][0] * tilings[1][shape[1]][0]
    batch = max(1, min(max_batch, patches))
    while batch > 1 and batch_bytes(batch, shape) > available:
        batch -= 1
    return PatchPlan(shape, batch, held_bytes + batch_bytes(batch, shape))


class Planner:
    """Patch plans for one POPS model (``g_a``, ``g_s``, ``M`` channels) on ``device``.

    With ``budget_bytes`` None there is no budget: a fixed patch is used as asked,
    ``auto`` means the whole image, and the batch is the one asked for.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        budget_bytes: Optional[int],
        exact: bool = True,
    ):
        self.model, self.device, self.budget, self.exact = (
            model,
            device,
            budget_bytes,
            exact,
        )
        self.geometry = model_geometry(model)

    def return_freed_memory(self) -> None:
        """Trim the heap before a phase is planned, so the RSS read is the
        live memory."""
        if self.budget is not None:
            return_freed_memory()

    def check_entropy_phase(
        self, latent_size: Tuple[int, int], encoding: bool, fixed_point: bool
    ) -> None:
        """Fail before any work if the entropy phase's buffers alone break the budget
        (they live on the CPU whatever the transforms' device); ``fixed_point``: the
        file's latent is coded in several streams
        (``utils/coding/front_rans.py``)."""
        if self.budget is None or self.device.type != "cpu":
            return
        stream_symbols = largest_stream_symbols(*latent_size, self.model.M, fixed_point)
        positions = latent_size[0] * latent_size[1]
        hyper_chunk = 0
        # h_s maps each z_hat position to an upsampling x upsampling block.
        if fixed_point:
            upsampling = self.model.downsampling_factor // self.geometry.scale
            hyper_chunk = min(
                positions,
                upsampling**2 * chunk_positions(-(-latent_size[1] // upsampling)),
            )
        needed = entropy_phase_bytes(
            self.model.M, positions, encoding, stream_symbols, hyper_chunk
        )
        check_fits(
            memory_in_use(self.device),
            needed,
            self.budget,
            "entropy coding of this image's latent",
        )

    def plan(
        self,
        direction: str,
        latent_size: Tuple[int, int],
        patch: PatchSpec,
        max_batch: int,
        held_on_cpu: int,
    ) -> PatchPlan:
        """Patch and batch for ``"analysis"`` (``g_a``) or ``"synthesis"`` (``g_s``)
        of a latent of ``latent_size``; ``held_on_cpu`` bytes will be allocated on
        the CPU during the phase on top of what the process holds now."""
        if not patch.is_auto:
            check_patch_size(patch.size, self.geometry)
        if self.budget is None:
            side = patch.size or 0
            return PatchPlan((side, side), max_batch, 0)
        held = memory_in_use(self.device) + (
            held_on_cpu if self.device.type == "cpu" else 0
        )
        return choose_patches(
            self.geometry,
            latent_size,
            self.cost(direction),
            held,
            self.budget,
            max_batch,
            patch,
            what=f"{direction} transform",
        )

    def cost(self, direction: str) -> TransformCost:
        """What one calibration patch adds to the peak, per pixel; measured once per
        transform, device and mode, running the transform exactly as the codec does."""
        transform = self.model.g_a if direction == "analysis" else self.model.g_s
        key = (str(self.device), self.exact)
        costs = _COSTS.setdefault(transform, {})
        if key not in costs:
            costs[key] = self._measure(transform, direction)
        return costs[key]

    def _measure(self, transform: nn.Module, direction: str) -> TransformCost:
        """The calibration patch is 256 pixels: per pixel, the cost of a CPS
        transform is within 12 % of its value at 768 pixels and above it (the
        padding-free borders make small patches dearer per pixel), so larger patches
        are not underestimated."""
        if direction == "analysis":
            shape, dtype = (1, 3, CALIBRATION_PATCH, CALIBRATION_PATCH), torch.uint8
        else:
            side = CALIBRATION_PATCH // self.geometry.scale
            shape, dtype = (1, self.model.M, side, side), torch.float32
        prepare = input_preparation(direction, self.device)

        def run() -> None:
            with transform_mode(self.device, self.exact):
                output = transform(
                    prepare(torch.zeros(shape, dtype=dtype, device=self.device))
                )
                if direction == "synthesis":
                    to_uint8(output)

        fragmentation = HEAP_FRAGMENTATION if self.device.type == "cpu" else 1.0
        return TransformCost(
            peak_added(self.device, run) * fragmentation / CALIBRATION_PATCH**2
        )
