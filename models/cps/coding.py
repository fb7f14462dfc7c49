"""The CPS codec: a uint8 image to a
:class:`~utils.coding.payload.CompressedImage` and back.

.. code-block:: none

    encoder (device)  | entropy path (CPU, fixed-point, 1 thread) | decoder (device)
    g_a patch-wise -> y -> h_a -> z -> EB -> z_hat -> h_s -> params
                      y, params -> ContextCoder -> y string | y_hat -> g_s patch-wise
                                                            |   -> crop

The transforms run patch by patch with POPS (``utils/stitching/patches.py``), so
their memory follows the patch size, not the image. A memory budget
(``plan.budget_bytes``) lets the :class:`~utils.stitching.planner.Planner` pick the
patch shape and batch that keep the whole process within it while recomputing the
least overlap. The padded image is never materialised (border patches replicate
the last row and column on the fly), the latents are stored channels-last so the
entropy coder reads them without a reordered copy, and the decoder stitches into a
preallocated uint8 image laid out height x width x channels, ready for a PNG
writer. The entropy path's products (``h_s``, the context model and the entropy
parameters) run at both ends on the CPU, whatever the transforms' device, as exact
sums on a fixed-point grid (``utils/coding/fixed_point.py``), so a file written on
one machine decodes on any other, with CUDA or without (CompressAI issues 54, 279,
320). Files written before that grid, without its header flag, decode with the
float32 arithmetic they were written with. In exact mode
(``utils/stitching/transforms.py``) neither side's patch size changes a bit of the
file or of the decoded image.
"""

import copy

import torch
from torch import Tensor, nn

from models.base import CodingPlan, check_image
from utils.coding.context_coder import ContextCoder
from utils.coding.fixed_point import hyper_synthesis
from utils.coding.payload import (
    BitstreamError,
    CompressedImage,
    check_model,
    model_fingerprint,
    tensor_crc,
)
from utils.coding.rans import safe_string
from utils.coding.threads import single_threaded
from utils.device import model_device
from utils.image_io import to_uint8
from utils.stitching.geometry import plan_patches
from utils.stitching.patches import run_patchwise
from utils.stitching.planner import Planner
from utils.stitching.transforms import (
    channels_last_buffer,
    gray_uint8,
    input_preparation,
    transform_mode,
)


def _cpu_copy(model: nn.Module) -> nn.Module:
    """The model itself if it lives on the CPU, else a CPU copy for the entropy path."""
    if model_device(model).type == "cpu":
        return model
    return copy.deepcopy(model).cpu()


def _hyper_params(entropy: nn.Module, z_hat: Tensor, fixed_point: bool) -> Tensor:
    """h_s(z_hat) as (2M, h, w) stored channels-last: on the fixed-point grid, or in
    float32 for files written before it."""
    if fixed_point:
        return hyper_synthesis(entropy.h_s, z_hat)[0]
    params = entropy.h_s(z_hat)
    return params.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)[0]


def measure_budget_costs(model: nn.Module, plan: CodingPlan) -> None:
    """Measure now both transforms' working memory under ``plan``'s budget (see
    ``LearnedCodec.measure_budget_costs``)."""
    if plan.budget_bytes is not None:
        planner = Planner(model, model_device(model), plan.budget_bytes, plan.exact)
        planner.cost("analysis")
        planner.cost("synthesis")


def encode(model: nn.Module, image: Tensor, plan: CodingPlan) -> CompressedImage:
    """Compress a uint8 RGB image (3, H, W) with the CPS ``model`` (on its own device).

    Raises:
        ValueError: bad input, a patch size off the POPS grid, or a budget too small
            for this image.
    """
    check_image(image, plan.grayscale)
    device = model_device(model)
    planner = Planner(model, device, plan.budget_bytes, plan.exact)
    geometry = planner.geometry
    multiple = model.downsampling_factor
    height, width = image.shape[1:]
    latent_size = (
        -(-height // multiple) * multiple // geometry.scale,
        -(-width // multiple) * multiple // geometry.scale,
    )
    positions = latent_size[0] * latent_size[1]
    planner.return_freed_memory()
    planner.check_entropy_phase(latent_size, encoding=True, fixed_point=True)
    patches = planner.plan(
        "analysis",
        latent_size,
        plan.patch,
        plan.batch_size,
        held_on_cpu=4 * model.M * positions,
    )

    y = channels_last_buffer(model.M, *latent_size)
    with transform_mode(device, plan.exact):
        run_patchwise(
            model.g_a,
            image[None],
            y,
            plan_patches(*latent_size, patches.patch_size, geometry),
            geometry.scale,
            1,
            patches.batch_size,
            device,
            prepare=input_preparation("analysis", device),
        )

    entropy = _cpu_copy(model)
    with torch.inference_mode(), single_threaded():
        z = entropy.h_a(y)
        z_string = entropy.entropy_bottleneck.compress(z)[0]
        z_hat = entropy.entropy_bottleneck.decompress([z_string], z.shape[-2:])
        params = _hyper_params(entropy, z_hat, fixed_point=True)
        z_bits = float(-entropy.entropy_bottleneck(z)[1].log2().sum())
    y_string, y_hat, y_bits = ContextCoder(entropy, plan.order).encode(y[0], params)
    return CompressedImage(
        height=height,
        width=width,
        pad_bottom=latent_size[0] * geometry.scale - height,
        pad_right=latent_size[1] * geometry.scale - width,
        architecture=model.registry_name,
        fingerprint=model_fingerprint(model),
        order=plan.order,
        grayscale=plan.grayscale,
        y_hat_crc=tensor_crc(y_hat),
        z_string=z_string,
        y_string=y_string,
        estimated_bits=y_bits + z_bits,
        fixed_point=True,
    )


def _check_padding(model: nn.Module, compressed: CompressedImage) -> None:
    multiple = model.downsampling_factor
    for size, pad in (
        (compressed.height, compressed.pad_bottom),
        (compressed.width, compressed.pad_right),
    ):
        if (size + pad) % multiple or pad >= multiple:
            raise BitstreamError(
                f"inconsistent size {size} with padding {pad} in the file header"
            )


def decode(model: nn.Module, compressed: CompressedImage, plan: CodingPlan) -> Tensor:
    """Rebuild the uint8 image (3, H, W), or (1, H, W) for a grayscale source.

    The result is stored height x width x channels (``image.permute(1, 2, 0)`` is
    contiguous). The plan's patch, batch and budget change the memory and the time,
    never the decoded image.
    """
    check_model(compressed, model)
    _check_padding(model, compressed)
    device = model_device(model)
    planner = Planner(model, device, plan.budget_bytes, plan.exact)
    geometry = planner.geometry
    latent_size = (
        (compressed.height + compressed.pad_bottom) // geometry.scale,
        (compressed.width + compressed.pad_right) // geometry.scale,
    )
    z_size = (
        latent_size[0] * geometry.scale // model.downsampling_factor,
        latent_size[1] * geometry.scale // model.downsampling_factor,
    )
    channels = 1 if compressed.grayscale else 3
    planner.return_freed_memory()
    planner.check_entropy_phase(
        latent_size, encoding=False, fixed_point=compressed.fixed_point
    )
    # Planned before any work, counting what the synthesis phase will hold: y_hat's
    # padded buffer and the output image.
    border = 2 * (model.context_prediction.kernel_size[0] // 2)
    y_hat_bytes = 4 * model.M * (latent_size[0] + border) * (latent_size[1] + border)
    image_bytes = channels * compressed.height * compressed.width
    patches = planner.plan(
        "synthesis",
        latent_size,
        plan.patch,
        plan.batch_size,
        held_on_cpu=y_hat_bytes + image_bytes,
    )

    entropy = _cpu_copy(model)
    with torch.inference_mode(), single_threaded():
        z_symbols = entropy.entropy_bottleneck.channels * z_size[0] * z_size[1]
        z_string = safe_string(compressed.z_string, z_symbols, "z")
        z_hat = entropy.entropy_bottleneck.decompress([z_string], z_size)
        params = _hyper_params(entropy, z_hat, compressed.fixed_point)
    y_hat = ContextCoder(
        entropy, compressed.order, fixed_point=compressed.fixed_point
    ).decode(compressed.y_string, params)
    del params
    if tensor_crc(y_hat) != compressed.y_hat_crc:
        cause = (
            "the file is damaged"
            if compressed.fixed_point
            else "the file is damaged, or was written before the fixed-point entropy "
            "model on a machine whose float32 results differ from this one"
        )
        raise BitstreamError(
            f"decoded latent differs from the encoder's (y_hat CRC mismatch): {cause}"
        )

    planner.return_freed_memory()
    output = channels_last_buffer(
        channels, compressed.height, compressed.width, torch.uint8
    )
    with transform_mode(device, plan.exact):
        run_patchwise(
            model.g_s,
            y_hat[None],
            output,
            plan_patches(*latent_size, patches.patch_size, geometry),
            1,
            geometry.scale,
            patches.batch_size,
            device,
            prepare=input_preparation("synthesis", device),
            finish=gray_uint8 if compressed.grayscale else to_uint8,
        )
    return output[0]
