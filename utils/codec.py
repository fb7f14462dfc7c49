"""Compress an image into a :class:`~utils.bitstream.CompressedImage` and back.

.. code-block:: none

    encoder (device)          |  entropy path (CPU, float32, 1 thread)   |  decoder (device)
    pad -> g_a patch-wise ->  y -> h_a -> z -> EB -> z_hat -> h_s -> params
                                 y, params -> ContextCoder -> y string   |  y_hat -> g_s patch-wise -> crop

The transforms run patch by patch with POPS (``utils/patches.py``), so their
memory follows the patch size, not the image. The entropy-parameter path runs on
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
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.bitstream import BitstreamError, CompressedImage, model_fingerprint, tensor_crc
from utils.latent_coding import ContextCoder, single_threaded
from utils.patches import run_patchwise
from utils.pops import model_geometry, plan_patches


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


def pad_replicate(image: Tensor, multiple: int) -> Tensor:
    """Pad a (C, H, W) tensor of any dtype at the bottom and right by repeating the
    last row and column, up to the next multiple of ``multiple``."""
    height, width = image.shape[-2:]
    rows = torch.arange(math.ceil(height / multiple) * multiple).clamp_(max=height - 1)
    cols = torch.arange(math.ceil(width / multiple) * multiple).clamp_(max=width - 1)
    return image[:, rows][:, :, cols]


def _to_unit_float(batch: Tensor) -> Tensor:
    return batch.float().div_(255.0)


def _to_uint8(batch: Tensor) -> Tensor:
    return batch.clamp(0, 1).mul(255.0).round_().to(torch.uint8)


def _rate_estimate(model: nn.Module, y_hat: Tensor, z: Tensor, params: Tensor) -> float:
    """Bits the likelihoods of a forward pass predict for y_hat and z."""
    context = model.context_prediction(y_hat[None])
    scales, means = model.entropy_parameters(torch.cat((params[None], context), 1)).chunk(2, 1)
    y_likelihood = model.gaussian_conditional._likelihood(y_hat[None], scales, means)
    y_likelihood = model.gaussian_conditional.likelihood_lower_bound(y_likelihood)
    _, z_likelihood = model.entropy_bottleneck(z)
    return float(-(y_likelihood.log2().sum() + z_likelihood.log2().sum()))


def encode_image(model: nn.Module, image: Tensor, patch_size: int = 0, batch_size: int = 8,
                 order: str = "wavefront", exact: bool = True,
                 grayscale: bool = False) -> CompressedImage:
    """Compress a uint8 RGB image (3, H, W) with ``model`` (on its own device).

    Args:
        patch_size: POPS patch side in pixels (0: whole image in one pass).
        batch_size: patches per forward call.
        order: entropy-coder order, ``"wavefront"`` (fast) or ``"raster"``.
        exact: on the CPU, use bit-exact native convolutions (see module doc).
        grayscale: mark the file so the decoder writes one channel.
    """
    if hasattr(model, "encode_image"):  # a model with its own codec (kamisli2024): no patches
        return model.encode_image(image, order=order, grayscale=grayscale)
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 RGB tensor (3, H, W), got {image.dtype} {tuple(image.shape)}")
    device = model_device(model)
    geometry = model_geometry(model)
    multiple = model.downsampling_factor
    height, width = image.shape[1:]
    padded = pad_replicate(image, multiple)[None]
    latent_size = (padded.shape[2] // geometry.scale, padded.shape[3] // geometry.scale)
    patches = plan_patches(*latent_size, patch_size, geometry)

    y = torch.empty(1, model.M, *latent_size)
    with transform_mode(device, exact):
        run_patchwise(model.g_a, padded, y, patches, geometry.scale, 1, batch_size, device,
                      prepare=_to_unit_float)
    del padded

    entropy = _cpu_copy(model)
    with torch.inference_mode(), single_threaded():
        z = entropy.h_a(y)
        z_string = entropy.entropy_bottleneck.compress(z)[0]
        z_hat = entropy.entropy_bottleneck.decompress([z_string], z.shape[-2:])
        params = entropy.h_s(z_hat)
    y_string, y_hat = ContextCoder(entropy, order).encode(y[0], params[0])
    with torch.inference_mode():
        estimated_bits = _rate_estimate(entropy, y_hat, z, params[0])
    return CompressedImage(
        height=height, width=width,
        pad_bottom=latent_size[0] * geometry.scale - height,
        pad_right=latent_size[1] * geometry.scale - width,
        architecture=model.registry_name, fingerprint=model_fingerprint(model),
        order=order, grayscale=grayscale, y_hat_crc=tensor_crc(y_hat),
        z_string=z_string, y_string=y_string, estimated_bits=estimated_bits,
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


def decode_image(model: nn.Module, compressed: CompressedImage, patch_size: int = 0,
                 batch_size: int = 8, exact: bool = True) -> Tensor:
    """Rebuild the uint8 image (3, H, W), or (1, H, W) for a grayscale source."""
    if hasattr(model, "decode_image"):
        return model.decode_image(compressed)
    check_compatible(model, compressed)
    device = model_device(model)
    geometry = model_geometry(model)
    latent_size = ((compressed.height + compressed.pad_bottom) // geometry.scale,
                   (compressed.width + compressed.pad_right) // geometry.scale)
    patches = plan_patches(*latent_size, patch_size, geometry)
    z_size = (latent_size[0] * geometry.scale // model.downsampling_factor,
              latent_size[1] * geometry.scale // model.downsampling_factor)

    entropy = _cpu_copy(model)
    with torch.inference_mode(), single_threaded():
        z_hat = entropy.entropy_bottleneck.decompress([compressed.z_string], z_size)
        params = entropy.h_s(z_hat)
    y_hat = ContextCoder(entropy, compressed.order).decode(compressed.y_string, params[0])
    if tensor_crc(y_hat) != compressed.y_hat_crc:
        raise BitstreamError("decoded latent differs from the encoder's (y_hat CRC mismatch): the file "
                             "was written on a machine whose floating-point results differ from this one")

    output = torch.empty(1, 3, *(s * geometry.scale for s in latent_size), dtype=torch.uint8)
    with transform_mode(device, exact):
        run_patchwise(model.g_s, y_hat[None], output, patches, 1, geometry.scale, batch_size,
                      device, finish=_to_uint8)
    image = output[0, :, :compressed.height, :compressed.width]
    if compressed.grayscale:
        image = image.float().mean(dim=0, keepdim=True).round().to(torch.uint8)
    return image.contiguous()
