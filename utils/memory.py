"""Memory budgets: sizes like ``2GB``, what the process holds, and patch plans.

A budget bounds the peak memory of the whole process: resident set size (RSS) on
the CPU, or CUDA allocated memory when the transforms run on a GPU. The codec
spends it in phases, one after the other, and each must fit:

* transform phase: what the process holds already (interpreter, libraries, model,
  image), the latent buffers the phase fills, and the working memory of one batch
  of patches. The working memory is *measured*: the transform runs once on a
  calibration patch and the peak it adds, per input pixel, is scaled to the patch
  and batch being planned (:class:`TransformCost`). For CPS at N=192 in exact mode
  this is about 2.4 kB per pixel of patch, mostly im2col buffers.
* entropy phase: latent-sized tensors only (``y``, the hyper-decoder's ``params``,
  the y_hat buffer, the rANS symbol buffer), counted by :func:`entropy_phase_bytes`.

:func:`plan_for_budget` then takes, among the patch shapes that fit (rectangles,
whole rows or columns included), the one that computes the fewest pixels including
overlap (the whole image when it fits), and for it the largest batch that fits.
The budget covers the whole process, so on a CPU the roughly 0.8 GB that importing
PyTorch, torchvision and CompressAI costs counts too.

On Linux with glibc, :func:`return_freed_memory` makes freed tensors go back to the
operating system at once (glibc otherwise keeps up to 32 MB blocks in its heap), so
the RSS follows the live tensors and measurements of it mean something.
"""

import ctypes
import ctypes.util
import re
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from utils.coding.context_coder import ENCODER_BYTES_PER_SYMBOL

DEFAULT_BUDGET = "2GB"
NO_BUDGET_HINT = "run without one (--max-memory none) and choose --patch-size yourself"

_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
# Slack on top of the measured working memory: the calibration patch is smaller
# than most planned ones, allocator rounding, small temporaries.
_SAFETY_FACTOR = 1.1
_SAFETY_BYTES = 16 * 2 ** 20


def parse_memory(text: str) -> int:
    """Bytes in a size such as ``2GB``, ``1.5G``, ``512MB``, ``640M`` or ``100000``.

    Units are binary (1 GB = 2**30 bytes, as for RAM); ``KiB``/``MiB``/``GiB``
    spellings are accepted too.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read memory size {text!r}: expected a number with an optional "
                         "unit, e.g. 2GB, 512MB")
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value < 1:
        raise ValueError(f"memory size {text!r} is zero")
    return int(value)


def format_memory(size: float) -> str:
    """``1536 * 2**20`` -> ``'1536 MB'`` (binary megabytes, as :func:`parse_memory` reads)."""
    return f"{size / 2 ** 20:.0f} MB"


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        library = ctypes.CDLL(name or "libc.so.6")
        library.mallopt  # noqa: B018 - glibc only; musl has no mallopt
        return library
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_TUNED = False


def return_freed_memory() -> None:
    """Hand memory freed by tensors back to the operating system (glibc only).

    The first call fixes glibc's mmap threshold at 1 MB (by default it grows up
    to 32 MB as blocks are freed, which keeps freed activations resident) and
    lowers its trim threshold; every call trims the heap.
    """
    global _MALLOC_TUNED
    if _LIBC is None:
        return
    if not _MALLOC_TUNED:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 2 ** 20)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 ** 20)
        _MALLOC_TUNED = True
    _LIBC.malloc_trim(0)


def proc_status_kb(field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (``VmHWM``) to its current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def memory_in_use(device: torch.device) -> int:
    """Bytes the budget counts right now: process RSS, or CUDA allocated memory."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    resident = proc_status_kb("VmRSS")
    if resident is None:
        raise ValueError(f"a memory budget needs the process's resident memory from "
                         f"/proc/self/status, which this system lacks; {NO_BUDGET_HINT}")
    return resident * 1024


class PeakSince:
    """Peak bytes (as :func:`memory_in_use` counts them) reached inside a ``with`` block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakSince":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not reset_peak_rss():
            raise ValueError(f"a memory budget needs to reset the process's peak memory through "
                             f"/proc/self/clear_refs, which this system lacks; {NO_BUDGET_HINT}")
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = (proc_status_kb("VmHWM") or 0) * 1024


@dataclass(frozen=True)
class TransformCost:
    """Working memory of a transform run patch-wise: ``bytes_per_pixel`` times the
    input pixels of a batch (pixels of the patch for analysis, latent positions
    times scale**2 for synthesis, i.e. always the patch's area in image pixels)."""

    bytes_per_pixel: float

    def batch_bytes(self, batch: int, height: int, width: int) -> int:
        """Predicted peak added by one batch of ``batch`` patches of height x width pixels."""
        return int(self.bytes_per_pixel * batch * height * width * _SAFETY_FACTOR) + _SAFETY_BYTES


_COSTS: Dict[Tuple[int, str, bool], TransformCost] = {}
CALIBRATION_PATCH = 256


def measure_cost(key: Tuple[int, str, bool], device: torch.device,
                 run_patch: Callable[[int], None]) -> TransformCost:
    """Measure, once per process and ``key``, what one calibration patch adds to the
    peak; ``run_patch(side)`` must run the transform on one patch of ``side`` pixels
    exactly as the codec would (same mode, same preparation) and free its output.

    The calibration patch is 256 pixels: per pixel, the cost of a CPS transform is
    within 12 % of its value at 768 pixels and above it (the padding-free borders
    make small patches dearer per pixel), so larger patches are not underestimated.
    """
    if key not in _COSTS:
        return_freed_memory()
        before = memory_in_use(device)
        with PeakSince(device) as peak:
            run_patch(CALIBRATION_PATCH)
        return_freed_memory()
        added = max(peak.peak - before, 0)
        _COSTS[key] = TransformCost(added / CALIBRATION_PATCH ** 2)
    return _COSTS[key]


@dataclass(frozen=True)
class PatchPlan:
    """Patch (height, width) in pixels (0: the whole axis) and batch for a transform."""

    patch_size: Tuple[int, int]
    batch_size: int
    peak_bytes: int


def plan_for_budget(image_size: Tuple[int, int], scale: int, min_patch: int, cost: TransformCost,
                    held_bytes: int, budget: int, max_batch: int,
                    axis_tiling: Callable[[int, int], Tuple[int, int]],
                    patch_size: Optional[int] = None, what: str = "transform") -> PatchPlan:
    """The patch shape, then the batch, for a transform within ``budget``.

    Patches may be rectangular and may span a whole axis. Among the shapes whose
    single patch keeps ``held_bytes`` plus its working memory within the budget
    (the whole image is one of them when it fits), the one that computes the fewest
    pixels in total wins: overlap is recomputed work, and a larger square is not
    always better (640x640 patches tile a 1280x768 image with 2.5x its area, 416x416
    ones with 1.4x, 768x304 stripes with 1.2x). Shapes within 2 % of the best total
    count as equal and the largest of them is taken (fewer patches, larger GEMMs).
    The batch is then as large as the budget allows.

    Args:
        image_size: padded (height, width) in pixels.
        scale, min_patch: the POPS grid and smallest exact patch side (pixels).
        held_bytes: memory in use during the phase apart from the batch.
        max_batch: upper bound on patches per forward pass.
        axis_tiling: (axis 0 or 1, patch side in pixels, 0 = whole axis) ->
            (number of tiles, pixels they cover in total along the axis).
        patch_size: a fixed square side (0: whole image); only the batch is then chosen.
    Raises:
        ValueError: if not even one patch of the smallest shape fits.
    """
    available = budget - held_bytes

    def extent(axis: int, side: int) -> int:
        return image_size[axis] if side == 0 or side >= image_size[axis] else side

    def batch_bytes(batch: int, shape: Tuple[int, int]) -> int:
        return cost.batch_bytes(batch, extent(0, shape[0]), extent(1, shape[1]))

    if patch_size is None:
        sides = [[0] + list(range(min_patch, length, scale)) for length in image_size]
    else:
        sides = [[patch_size], [patch_size]]
    tilings = [{side: axis_tiling(axis, side) for side in sides[axis]} for axis in (0, 1)]
    fitting = [(rows, cols) for rows in sides[0] for cols in sides[1]
               if batch_bytes(1, (rows, cols)) <= available]
    if not fitting:
        smallest = (sides[0][-1], sides[1][-1])
        shape = "x".join(str(extent(axis, smallest[axis])) for axis in (0, 1))
        raise ValueError(f"memory budget {format_memory(budget)} is too small for the {what}: it "
                         f"needs at least {format_memory(held_bytes + batch_bytes(1, smallest))} "
                         f"({format_memory(held_bytes)} already held, plus one {shape} px patch)")

    def computed(shape: Tuple[int, int]) -> int:
        return tilings[0][shape[0]][1] * tilings[1][shape[1]][1]

    fewest = min(computed(shape) for shape in fitting)
    shape = max((shape for shape in fitting if computed(shape) <= 1.02 * fewest),
                key=lambda shape: extent(0, shape[0]) * extent(1, shape[1]))
    patches = tilings[0][shape[0]][0] * tilings[1][shape[1]][0]
    batch = max(1, min(max_batch, patches))
    while batch > 1 and batch_bytes(batch, shape) > available:
        batch -= 1
    return PatchPlan(shape, batch, held_bytes + batch_bytes(batch, shape))


def entropy_phase_bytes(channels: int, positions: int, encoding: bool) -> int:
    """Latent-sized memory of the entropy phase for ``positions`` latent positions
    of ``channels`` (M) channels, float32: params (2M), the padded y_hat buffer (M)
    and its channels-last result view, ``y`` (M, encoder), the rANS symbol buffer
    (6 bytes per symbol, encoder), and a transient copy of params while it is
    rearranged channels-last (2M)."""
    per_position = 4 * (2 * channels + channels + 2 * channels)
    if encoding:
        per_position += 4 * channels + ENCODER_BYTES_PER_SYMBOL * channels
    return int(per_position * positions * _SAFETY_FACTOR)


def check_fits(needed: int, budget: int, what: str) -> None:
    """Raise ``ValueError`` if ``needed`` bytes exceed ``budget``."""
    if needed > budget:
        raise ValueError(f"memory budget {format_memory(budget)} is too small for the {what}: it "
                         f"needs about {format_memory(needed)}")
