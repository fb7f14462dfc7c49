"""Compress an image into a :class:`~utils.coding.container.CompressedImage` and back.

.. code-block:: none

    encoder (device)          |  entropy path (CPU, float32, 1 thread)   |  decoder (device)
    pad -> g_a patch-wise ->  y -> h_a -> z -> EB -> z_hat -> h_s -> params
                                 y, params -> ContextCoder -> y string   |  y_hat -> g_s patch-wise -> crop

The transforms run patch by patch with POPS (``utils/stitching/patches.py``), so their
memory follows the patch size, not the image. A memory budget (``max_memory``, see
``utils/memory.py``) picks the patch shape and batch that keep the whole process
within it while recomputing the least overlap; the padded image is never materialised (border patches replicate the
last row and column on the fly), the latents are stored channels-last so the
entropy coder reads them without a reordered copy, and the decoder stitches into a
preallocated uint8 image laid out height x width x channels, ready for a PNG
writer. The entropy-parameter path runs on
the CPU at both ends whatever the transforms' device, so a file written with CUDA
decodes on a CPU and the reverse (CompressAI issues 54, 279, 320).

On the CPU the transforms run with oneDNN and NNPACK disabled ("exact" mode): PyTorch's
native convolutions then give patch-wise results bit-identical to whole-image results, so
the latent, the file and the decoded 8-bit image do not depend on the patch size
either side used. With oneDNN (``exact=False``) they agree to float rounding only
(about 1e-7), which is faster.
"""

import contextlib
import copy
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from utils.coding.container import BitstreamError, CompressedImage, model_fingerprint, tensor_crc
from utils.coding.context_coder import ContextCoder, single_threaded
from utils.memory import (PatchPlan, check_fits, entropy_phase_bytes, measure_cost,
                          memory_in_use, parse_memory, plan_for_budget, return_freed_memory)
from utils.stitching.patches import run_patchwise
from utils.stitching.geometry import PopsGeometry, check_patch_size, model_geometry, plan_patches, tile_axis


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def transform_mode(device: torch.device, exact: bool) -> Iterator[None]:
    """Deterministic convolution settings for the analysis and synthesis transforms."""
    with torch.inference_mode():
        if device.type == "cpu":
            # oneDNN picks kernels by tensor size and NNPACK takes over from batch 16 on;
            # with both off, each output is one fixed-order im2col + GEMM reduction.
            mkldnn_was_enabled = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = not exact
            try:
                with torch.backends.nnpack.flags(enabled=not exact):
                    yield
            finally:
                torch.backends.mkldnn.enabled = mkldnn_was_enabled
        else:
            with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
                yield


def _cpu_copy(model: nn.Module) -> nn.Module:
    """The model itself if it lives on the CPU, else a CPU copy for the entropy path."""
    if model_device(model).type == "cpu":
        return model
    return copy.deepcopy(model).cpu()


def _to_unit_float(batch: Tensor) -> Tensor:
    return batch.float().div_(255.0)


def _to_uint8(batch: Tensor) -> Tensor:
    return batch.clamp(0, 1).mul(255.0).round_().to(torch.uint8)


def _to_gray_uint8(batch: Tensor) -> Tensor:
    """Rounded mean of the three rounded 8-bit channels, as :func:`utils.image_io.to_grayscale`."""
    return _to_uint8(batch).float().mean(dim=1, keepdim=True).round_().to(torch.uint8)


def channels_last_buffer(channels: int, height: int, width: int, dtype=torch.float32) -> Tensor:
    """An uninitialised (1, C, H, W) tensor stored as (H, W, C)."""
    return torch.empty(1, height, width, channels, dtype=dtype).permute(0, 3, 1, 2)


def _prepare_input(direction: str, device: torch.device, exact: bool):
    """What each patch batch goes through before the transform: uint8 -> [0, 1] for
    analysis, and on the CPU a channels-last layout, which makes the convolutions
    faster (g_a on a Kodak image at N=192, 2 cores: 2.4 s instead of 2.9 s in exact
    mode, 1.5 s instead of 2.0 s with oneDNN). Exact mode stays exact: the
    channels-last native convolutions are as independent of the patch size as the
    others (tested through the codec)."""
    channels_last = device.type == "cpu"

    def prepare(batch: Tensor) -> Tensor:
        if direction == "analysis":
            batch = _to_unit_float(batch)
        return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
    return prepare


def _channels_last(tensor: Tensor) -> Tensor:
    return tensor.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def _budget_bytes(max_memory) -> int:
    return parse_memory(max_memory) if isinstance(max_memory, str) else int(max_memory)


def _plan(model: nn.Module, direction: str, latent_size: Tuple[int, int], geometry: PopsGeometry,
          patch_size: Optional[int], batch_size: int, max_memory, exact: bool,
          held_on_cpu: int) -> PatchPlan:
    """Patch size and batch for ``model.g_a`` (``direction="analysis"``) or
    ``model.g_s`` within ``max_memory``; without a budget, the given ones."""
    if max_memory is None:
        return PatchPlan((patch_size or 0, patch_size or 0), batch_size, 0)
    if patch_size is not None:
        check_patch_size(patch_size, geometry)
    device = model_device(model)
    prepare = _prepare_input(direction, device, exact)
    if direction == "analysis":
        transform, finish = model.g_a, None
        channels, divisor, dtype = 3, 1, torch.uint8
    else:
        transform, finish = model.g_s, _to_uint8
        channels, divisor, dtype = model.M, geometry.scale, torch.float32

    def run_patch(side: int) -> None:
        with transform_mode(device, exact):
            patch = torch.zeros(1, channels, side // divisor, side // divisor, dtype=dtype, device=device)
            output = transform(prepare(patch))
            if finish is not None:
                finish(output)

    cost = measure_cost((id(transform), str(device), exact), device, run_patch)
    held = memory_in_use(device) + (held_on_cpu if device.type == "cpu" else 0)
    image_size = (latent_size[0] * geometry.scale, latent_size[1] * geometry.scale)
    return plan_for_budget(
        image_size, geometry.scale, geometry.min_patch_size, cost, held, _budget_bytes(max_memory),
        batch_size, lambda axis, side: _axis_tiling(latent_size[axis], side, geometry), patch_size,
        what="analysis transform" if direction == "analysis" else "synthesis transform")


def _axis_tiling(latent_length: int, side: int, geometry: PopsGeometry) -> Tuple[int, int]:
    """(number of tiles, pixels they cover in total) along one axis, for a patch side
    in pixels (0: the whole axis)."""
    tiles = tile_axis(latent_length, side // geometry.scale, geometry.margin)
    return len(tiles), sum(tile.stop - tile.start for tile in tiles) * geometry.scale


def _check_entropy_phase(model: nn.Module, positions: int, encoding: bool, max_memory) -> None:
    """Fail before any work if the latent-sized buffers alone break the budget."""
    if max_memory is None or model_device(model).type != "cpu":
        return
    needed = memory_in_use(torch.device("cpu")) + entropy_phase_bytes(model.M, positions, encoding)
    check_fits(needed, _budget_bytes(max_memory), "entropy coding of this image's latent")


def _hyper_params(entropy: nn.Module, z_hat: Tensor) -> Tensor:
    """h_s(z_hat) as (2M, h, w) stored channels-last, on one thread."""
    return _channels_last(entropy.h_s(z_hat))[0]


def encode_image(model: nn.Module, image: Tensor, patch_size: Optional[int] = None,
                 batch_size: int = 8, order: str = "wavefront", exact: bool = True,
                 grayscale: bool = False, max_memory=None) -> CompressedImage:
    """Compress a uint8 RGB image (3, H, W) with ``model`` (on its own device).

    Args:
        patch_size: POPS patch side in pixels (0: whole image; None: the tiling
            that fits ``max_memory`` and recomputes the least overlap).
        batch_size: most patches per forward call (fewer if the budget says so).
        order: entropy-coder order, ``"wavefront"`` (fast) or ``"raster"``.
        exact: on the CPU, use bit-exact native convolutions (see module doc).
        grayscale: mark the file so the decoder writes one channel.
        max_memory: peak memory of the process (CPU RSS, or CUDA allocated memory
            for a CUDA model), in bytes or as ``"2GB"``. None (the library's
            default; codec.py and test.py default to ``utils.memory.DEFAULT_BUDGET``):
            no budget, and ``patch_size=None`` means the whole image.
    Raises:
        ValueError: bad input, or a budget too small for this image.
    """
    if hasattr(model, "encode_image"):  # a model with its own codec (kamisli2024): no patches
        return model.encode_image(image, order=order, grayscale=grayscale)
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 RGB tensor (3, H, W), got {image.dtype} {tuple(image.shape)}")
    device = model_device(model)
    geometry = model_geometry(model)
    multiple = model.downsampling_factor
    height, width = image.shape[1:]
    latent_size = (-(-height // multiple) * multiple // geometry.scale,
                   -(-width // multiple) * multiple // geometry.scale)
    positions = latent_size[0] * latent_size[1]
    if max_memory is not None:
        return_freed_memory()
    _check_entropy_phase(model, positions, True, max_memory)
    plan = _plan(model, "analysis", latent_size, geometry, patch_size, batch_size, max_memory, exact,
                 held_on_cpu=4 * model.M * positions)

    y = channels_last_buffer(model.M, *latent_size)
    with transform_mode(device, exact):
        run_patchwise(model.g_a, image[None], y, plan_patches(*latent_size, plan.patch_size, geometry),
                      geometry.scale, 1, plan.batch_size, device,
                      prepare=_prepare_input("analysis", device, exact))

    entropy = _cpu_copy(model)
    with torch.inference_mode(), single_threaded():
        z = entropy.h_a(y)
        z_string = entropy.entropy_bottleneck.compress(z)[0]
        z_hat = entropy.entropy_bottleneck.decompress([z_string], z.shape[-2:])
        params = _hyper_params(entropy, z_hat)
        z_bits = float(-entropy.entropy_bottleneck(z)[1].log2().sum())
    y_string, y_hat, y_bits = ContextCoder(entropy, order).encode(y[0], params)
    return CompressedImage(
        height=height, width=width,
        pad_bottom=latent_size[0] * geometry.scale - height,
        pad_right=latent_size[1] * geometry.scale - width,
        architecture=model.registry_name, fingerprint=model_fingerprint(model),
        order=order, grayscale=grayscale, y_hat_crc=tensor_crc(y_hat),
        z_string=z_string, y_string=y_string, estimated_bits=y_bits + z_bits,
    )


def check_compatible(model: nn.Module, compressed: CompressedImage) -> None:
    """Raise :class:`BitstreamError` if ``compressed`` was not made by ``model``."""
    if compressed.architecture != model.registry_name:
        raise BitstreamError(f"file was encoded with architecture {compressed.architecture!r}, "
                             f"not {model.registry_name!r}")
    if compressed.fingerprint != model_fingerprint(model):
        raise BitstreamError(f"file was encoded with another checkpoint (model fingerprint "
                             f"{compressed.fingerprint.hex()}, this one is "
                             f"{model_fingerprint(model).hex()})")
    multiple = model.downsampling_factor
    for size, pad in ((compressed.height, compressed.pad_bottom), (compressed.width, compressed.pad_right)):
        if size < 1 or (size + pad) % multiple or pad >= multiple:
            raise BitstreamError(f"inconsistent size {size} with padding {pad} in the file header")


def decode_image(model: nn.Module, compressed: CompressedImage, patch_size: Optional[int] = None,
                 batch_size: int = 8, exact: bool = True, max_memory=None) -> Tensor:
    """Rebuild the uint8 image (3, H, W), or (1, H, W) for a grayscale source.

    The result is stored height x width x channels (``image.permute(1, 2, 0)`` is
    contiguous). ``patch_size``, ``batch_size`` and ``max_memory`` as for
    :func:`encode_image`; none of them changes the decoded image.
    """
    if hasattr(model, "decode_image"):
        return model.decode_image(compressed)
    check_compatible(model, compressed)
    device = model_device(model)
    geometry = model_geometry(model)
    latent_size = ((compressed.height + compressed.pad_bottom) // geometry.scale,
                   (compressed.width + compressed.pad_right) // geometry.scale)
    z_size = (latent_size[0] * geometry.scale // model.downsampling_factor,
              latent_size[1] * geometry.scale // model.downsampling_factor)
    channels = 1 if compressed.grayscale else 3
    if max_memory is not None:
        return_freed_memory()
    _check_entropy_phase(model, latent_size[0] * latent_size[1], False, max_memory)
    # Planned before any work, counting what the synthesis phase will hold: y_hat's
    # padded buffer and the output image.
    border = 2 * (model.context_prediction.kernel_size[0] // 2)
    y_hat_bytes = 4 * model.M * (latent_size[0] + border) * (latent_size[1] + border)
    plan = _plan(model, "synthesis", latent_size, geometry, patch_size, batch_size, max_memory, exact,
                 held_on_cpu=y_hat_bytes + channels * compressed.height * compressed.width)

    entropy = _cpu_copy(model)
    with torch.inference_mode(), single_threaded():
        z_hat = entropy.entropy_bottleneck.decompress([compressed.z_string], z_size)
        params = _hyper_params(entropy, z_hat)
    y_hat = ContextCoder(entropy, compressed.order).decode(compressed.y_string, params)
    del params
    if tensor_crc(y_hat) != compressed.y_hat_crc:
        raise BitstreamError("decoded latent differs from the encoder's (y_hat CRC mismatch): the file "
                             "was written on a machine whose floating-point results differ from this one")

    if max_memory is not None:
        return_freed_memory()
    output = channels_last_buffer(channels, compressed.height, compressed.width, torch.uint8)
    with transform_mode(device, exact):
        run_patchwise(model.g_s, y_hat[None], output, plan_patches(*latent_size, plan.patch_size, geometry),
                      1, geometry.scale, plan.batch_size, device,
                      prepare=_prepare_input("synthesis", device, exact),
                      finish=_to_gray_uint8 if compressed.grayscale else _to_uint8)
    return output[0]
