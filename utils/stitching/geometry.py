"""POPS geometry: receptive field, scale and overlap computed from a layer list.

Zhang et al. 2025, Sec. II.A. For the l-th layer with kernel k_l and stride s_l:

    r_l   = r_{l-1} + (k_l - 1) * prod_{i<l} s_i                      (1)
    rho_l = prod_{i<=l} s_i
    2e    = ceil(r_l / rho_l) - 1       (latent positions a patch cannot compute)  (3)
    o     = rho_l * 2e                  (overlap between neighbouring patches)     (4)

The layer list is read from the network itself (:func:`analysis_layers`), never
typed by hand: a change to ``g_a`` changes the overlap with it. For the paper's
network r = 72, rho = 16, e = 2 and o = 64.

Patches therefore lose ``e`` latent positions (``e * rho`` pixels) on every side that
is interior to the image; :func:`tile_axis` lays patches out so that the parts they
compute exactly cover the image once.
"""

import copy
import math
from dataclasses import dataclass
from typing import Iterable, List, Tuple, Union

import torch
from compressai.layers import GDN
from torch import nn

Layer = Tuple[int, int]  # (kernel size, stride)

# Modules that act on each position separately: they add nothing to the geometry.
_POINTWISE = (nn.LeakyReLU, nn.ReLU, nn.Identity)


def analysis_layers(module: nn.Module) -> List[Layer]:
    """(kernel, stride) list along the longest path of an analysis transform.

    Blocks declare their own path in a ``pops_layers`` attribute; plain convolutions
    contribute themselves; pointwise modules (activations, GDN) contribute nothing.
    Anything else is refused rather than guessed.
    """
    if hasattr(module, "pops_layers"):
        return list(module.pops_layers)
    if isinstance(module, nn.Sequential):
        return [layer for child in module for layer in analysis_layers(child)]
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        (kernel, _), (stride, _) = module.kernel_size, module.stride
        if isinstance(module, nn.ConvTranspose2d) and stride != 1:
            raise ValueError(
                "a strided transposed convolution has no place in an analysis transform"
            )
        if any(p != 0 for p in module.padding):
            raise ValueError(f"{module} is padded: POPS needs padding-free layers")
        return [(kernel, stride)]
    if isinstance(module, (*_POINTWISE, GDN)):
        return []
    raise ValueError(f"cannot derive the POPS geometry of {type(module).__name__}")


@dataclass(frozen=True)
class PopsGeometry:
    """Receptive field ``r``, scale ``rho`` and overlap of a padding-free transform."""

    receptive_field: int
    scale: int

    @property
    def unreachable(self) -> int:
        """2e of eq. (3): latent positions per patch that depend on pixels
        outside it."""
        return math.ceil(self.receptive_field / self.scale) - 1

    @property
    def margin(self) -> int:
        """Latent positions dropped on each interior side of a patch (e, rounded up).

        Eq. (3) counts both sides together; an odd 2e is rounded up so the margin is
        the same on both sides, which keeps every patch exact.
        """
        return math.ceil(self.unreachable / 2)

    @property
    def overlap(self) -> int:
        """o of eq. (4) in pixels: how much neighbouring patches share."""
        return 2 * self.margin * self.scale

    @property
    def min_patch_size(self) -> int:
        """Smallest patch side that still computes one latent row exactly."""
        return self.overlap + self.scale


def geometry_from_layers(layers: Iterable[Layer]) -> PopsGeometry:
    """Apply eq. (1) and the product of strides to a (kernel, stride) list."""
    receptive_field, scale = 1, 1
    for kernel, stride in layers:
        receptive_field += (kernel - 1) * scale
        scale *= stride
    return PopsGeometry(receptive_field=receptive_field, scale=scale)


def model_geometry(model: nn.Module) -> PopsGeometry:
    """Geometry of ``model.g_a``; the synthesis transform must reach no further
    (:func:`check_synthesis_reach`)."""
    return geometry_from_layers(analysis_layers(model.g_a))


def synthesis_reach(model: nn.Module) -> int:
    """Latent positions on each side that the pixels of one latent position read
    through ``model.g_s``, measured on a probe copy of the transform.

    The copy gets positive weights and a positive latent (double precision), so every
    path of the architecture carries signal and no trained or zero-initialised weight
    hides one. One latent column is perturbed, and the output columns that move,
    [c*rho + a, c*rho + b], give the dependency of every column by translation; the
    pixels of column q then read the columns q + d for the integers d with -b <= d*rho
    <= rho - 1 - a. Measured rather than derived, so that any block of ``g_s`` counts
    without declaring its path.

    Raises:
        ValueError: the probe's output does not depend on the latent at all.
    """
    geometry = model_geometry(model)
    scale, columns = geometry.scale, 2 * (geometry.margin + 6) + 1
    probe = columns // 2
    generator = torch.Generator().manual_seed(0)
    transform = copy.deepcopy(model.g_s).cpu().double().eval()
    with torch.no_grad():
        for parameter in transform.parameters():
            fan_in = parameter[0].numel() if parameter.dim() > 1 else 1
            parameter.copy_(
                torch.rand(parameter.shape, generator=generator, dtype=torch.float64)
                .add(0.5)
                .div(fan_in)
            )
        latent = torch.rand(
            1, model.M, 3, columns, generator=generator, dtype=torch.float64
        )
        batch = latent.repeat(2, 1, 1, 1)
        batch[1, :, :, probe] += 1.0
        output = transform(batch)
    moved = (output[1] != output[0]).flatten(0, 1).any(0).nonzero().flatten()
    if len(moved) == 0:
        raise ValueError("g_s's output does not depend on its latent input")
    first, last = int(moved[0]) - probe * scale, int(moved[-1]) - probe * scale
    return max(last // scale, (scale - 1 - first) // scale)


def check_synthesis_reach(model: nn.Module) -> None:
    """Refuse a POPS model whose ``g_s`` reads more latent positions on a side than the
    margin ``g_a``'s geometry leaves: its patch-wise decode would differ from the
    whole image's at every seam (a researcher's deeper decoder, say)."""
    margin, reach = model_geometry(model).margin, synthesis_reach(model)
    if reach > margin:
        raise ValueError(
            f"g_s reads {reach} latent positions on each side, more than the "
            f"{margin} that g_a's geometry leaves, so patches would leave seams: "
            "give g_a at least g_s's reach"
        )


@dataclass(frozen=True)
class AxisTile:
    """One patch along one axis, in latent units.

    The patch reads ``[start, stop)`` and owns ``[own_start, own_stop)``: the
    positions it computes exactly and that no other patch writes.
    """

    start: int
    stop: int
    own_start: int
    own_stop: int


def tile_axis(length: int, patch: int, margin: int) -> List[AxisTile]:
    """Lay patches of ``patch`` latent positions over an axis of ``length``.

    One rule for every patch: consecutive patches step by ``patch - 2 * margin``; the
    last one is moved back to end flush with the border; each patch owns what it
    reads minus ``margin`` on every side that is not the image border, clipped so
    that owned ranges do not overlap. A patch of 0 or one at least as long as the axis
    gives a single patch covering everything (whole-image processing).
    """
    if length <= 0:
        raise ValueError(f"cannot tile an axis of length {length}")
    if patch <= 0 or patch >= length:
        return [AxisTile(0, length, 0, length)]
    step = patch - 2 * margin
    if step <= 0:
        raise ValueError(
            f"patch of {patch} latent positions is too small for margin {margin}"
        )
    starts = list(range(0, length - patch, step)) + [length - patch]
    tiles, owned_until = [], 0
    for start in starts:
        stop = start + patch
        own_start = max(owned_until, start + margin if start > 0 else 0)
        own_stop = stop - margin if stop < length else length
        tiles.append(AxisTile(start, stop, own_start, own_stop))
        owned_until = own_stop
    return tiles


def plan_patches(
    latent_height: int,
    latent_width: int,
    patch_size: Union[int, Tuple[int, int]],
    geometry: PopsGeometry,
) -> List[Tuple[AxisTile, AxisTile]]:
    """All (row tile, column tile) pairs for a latent of the given size.

    ``patch_size`` is in pixels: one side for square patches, or (height, width);
    0 for a side means the whole axis. Each side must be a multiple of the scale
    (otherwise patches fall off the latent grid) and at least ``min_patch_size``.
    """
    patch_height, patch_width = (
        (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    )
    for side in (patch_height, patch_width):
        check_patch_size(side, geometry)
    rows = tile_axis(latent_height, patch_height // geometry.scale, geometry.margin)
    cols = tile_axis(latent_width, patch_width // geometry.scale, geometry.margin)
    return [(row, col) for row in rows for col in cols]


def check_patch_size(patch_size: int, geometry: PopsGeometry) -> None:
    """Raise ``ValueError`` for a patch size POPS cannot stitch exactly."""
    if patch_size == 0:
        return
    if patch_size < 0 or patch_size % geometry.scale:
        raise ValueError(
            f"patch size {patch_size} must be 0 (whole image) or a positive "
            f"multiple of {geometry.scale}"
        )
    if patch_size < geometry.min_patch_size:
        raise ValueError(
            f"patch size {patch_size} is below the minimum "
            f"{geometry.min_patch_size} "
            f"(overlap {geometry.overlap} + {geometry.scale})"
        )
