"""A :class:`~models.kamisli2024.network.Kamisli2024` as a codec: images into
bitstreams and back.

Two levels wrap the wavefront coder (:mod:`models.kamisli2024.coding`), which codes
a block grid:

- :func:`compress` / :func:`decompress` code one image in [0, 1] (padded to whole
  blocks, shifted to [-0.5, 0.5]) into a
  :class:`~models.kamisli2024.coding.BlockPayload` and back; the decoder checks the
  CRC of the dequantised latent, so a damaged string or the wrong checkpoint fails
  loudly instead of decoding noise;
- :func:`encode` / :func:`decode` are the codec contract of :mod:`models.base`:
  uint8 images into the common ``.cps`` container
  (:class:`~utils.coding.payload.CompressedImage`), refused up front when the
  whole image would not fit the plan's memory budget.

The network module defines the layers and the training passes; what turns them into
files (the container, the budget, the image conversions) lives here.
"""

from torch import Tensor, nn

from models.base import CodingPlan, check_image
from models.kamisli2024.coding import BlockCoder, BlockPayload
from models.kamisli2024.layers import from_blocks, to_blocks
from models.whole_image_memory import check_whole_image_fits
from utils.coding.payload import (
    BitstreamError,
    CompressedImage,
    check_model,
    model_fingerprint,
    tensor_crc,
)
from utils.device import model_device
from utils.image_io import to_grayscale, to_uint8, to_unit_float


def compress(model: nn.Module, x: Tensor, order: str = "wavefront") -> BlockPayload:
    """Code one image (1, 3, H, W) in [0, 1] into a :class:`BlockPayload`.

    Runs on the CPU in float32 whatever the model's device (see
    :class:`~models.kamisli2024.coding.BlockCoder`); ``update(force=True)`` must
    have run.
    """
    if x.dim() != 4 or x.shape[:2] != (1, 3):
        raise ValueError(
            f"compress codes one RGB image (1, 3, H, W), got {tuple(x.shape)}"
        )
    height, width = x.shape[-2:]
    blocks = to_blocks(
        model.pad_to_blocks(x.detach().float().cpu()) - 0.5, model.block_size
    )[0]
    string, y_hat, _, bits = BlockCoder(model, order).encode(blocks)
    return BlockPayload(
        string=string,
        height=height,
        width=width,
        order=order,
        y_hat_crc=tensor_crc(y_hat),
        estimated_bits=bits,
    )


def decompress(model: nn.Module, payload: BlockPayload) -> dict:
    """Rebuild ``{"x_hat": (1, 3, H, W) in [0, 1] on the CPU}`` from a payload.

    Raises :class:`~utils.coding.payload.BitstreamError` when the decoded latent
    differs from the encoder's (another checkpoint, or a machine whose
    float32 results differ, for files written before the fixed-point grid).
    """
    rows, cols = model.grid_size(payload.height, payload.width)
    coder = BlockCoder(model, payload.order, fixed_point=payload.fixed_point)
    y_hat, reconstruction = coder.decode(payload.string, rows, cols)
    if tensor_crc(y_hat) != payload.y_hat_crc:
        cause = (
            "a damaged file or the wrong checkpoint"
            if payload.fixed_point
            else "a damaged file, the wrong checkpoint, or a file written before "
            "the fixed-point coder on a machine whose float32 results differ"
        )
        raise BitstreamError(
            f"decoded latent differs from the encoder's (y_hat CRC mismatch): {cause}"
        )
    x_hat = from_blocks(reconstruction[None], model.block_size) + 0.5
    return {"x_hat": x_hat[:, :, : payload.height, : payload.width]}


def encode(model: nn.Module, image: Tensor, plan: CodingPlan) -> CompressedImage:
    """Code a uint8 RGB image (3, H, W) into the ``.cps`` container.

    The file has the common header (size, padding, architecture, checkpoint
    fingerprint, y_hat CRC) and the blocks' rANS string as its latent string;
    there is no hyperprior, so the hyperprior string is empty. Only the plan's
    ``order`` and ``grayscale`` apply: the blocks are coded one by one, so there
    are no patches to plan.
    """
    check_image(image, plan.grayscale)
    height, width = image.shape[1:]
    check_whole_image_fits(model, model_device(model), plan.budget_bytes, height, width)
    payload = compress(model, to_unit_float(image[None]), plan.order)
    rows, cols = model.grid_size(height, width)
    return CompressedImage(
        height=height,
        width=width,
        pad_bottom=rows * model.block_size - height,
        pad_right=cols * model.block_size - width,
        architecture=model.registry_name,
        fingerprint=model_fingerprint(model),
        order=plan.order,
        grayscale=plan.grayscale,
        y_hat_crc=payload.y_hat_crc,
        z_string=b"",
        y_string=payload.string,
        estimated_bits=payload.estimated_bits,
        fixed_point=payload.fixed_point,
    )


def decode(model: nn.Module, payload: CompressedImage, plan: CodingPlan) -> Tensor:
    """Rebuild the uint8 image (3, H, W), or (1, H, W) for a grayscale source,
    from an :func:`encode` payload; payloads of another model raise
    ``BitstreamError``."""
    check_model(payload, model)
    rows, cols = model.grid_size(payload.height, payload.width)
    if (
        rows * model.block_size - payload.height,
        cols * model.block_size - payload.width,
    ) != (payload.pad_bottom, payload.pad_right):
        raise BitstreamError(
            f"inconsistent padding {payload.pad_bottom}/{payload.pad_right} "
            f"for a {payload.width}x{payload.height} image in the file header"
        )
    if payload.z_string:
        raise BitstreamError(
            "the file has a hyperprior string, which kamisli2024 files "
            "never have: it was not written by this model"
        )
    check_whole_image_fits(
        model, model_device(model), plan.budget_bytes, payload.height, payload.width
    )
    blocks = BlockPayload(
        string=payload.y_string,
        height=payload.height,
        width=payload.width,
        order=payload.order,
        y_hat_crc=payload.y_hat_crc,
        fixed_point=payload.fixed_point,
    )
    image = to_uint8(decompress(model, blocks)["x_hat"][0])
    if payload.grayscale:
        image = to_grayscale(image)
    return image.contiguous()
