"""Layered bitstreams of the Mei et al. 2021 models: one stream per layer,
in one container.

:func:`encode` pads the image (replicate) to a multiple of the model's
:attr:`downsampling_factor`, then codes the base latent and each enhancement
residual with that layer's factorized prior (CompressAI ``EntropyBottleneck``, rANS).
:func:`decode` decodes layers 0..K-1 from the streams of those layers only and crops
layer K-1's reconstruction to its size (the image size for quality models, the
pyramid level size ``ceil(H/2^j) x ceil(W/2^j)`` for spatial ones). The encoder
predicts from exactly the values the decoder rebuilds (the shared ``_run_layers``
loop), both run with the codec's deterministic convolution settings
(``utils.stitching.transforms.transform_mode``: on CUDA, cuDNN's default transposed
convolutions are not bit-reproducible from call to call, which made the encoder's and
the decoder's predictions differ). The container stores a CRC of every layer's coded
values (the base latent or the residual, symbols plus the entropy model's medians),
which rANS decoding reproduces exactly on any machine: a damaged stream or stale
entropy tables fail loudly, while a machine whose float predictions differ from the
encoder's by rounding decodes the file, to within that rounding of the encoder's
reconstruction. Version 1 files hold the CRC of each latent y^_k, prediction
included, and decode where the encoder's float results are reproduced.

The payload is a :class:`~utils.coding.payload.LayeredImage`, written as a
``.cpsl`` file by ``utils/coding/container.py``.
"""

from typing import Optional

import torch
from torch import Tensor, nn

from models.base import CodingPlan, check_image
from models.mei2021.pyramid import pyramid_sizes
from models.weight_checks import entropy_tables_ready
from models.whole_image_memory import check_whole_image_fits
from utils.coding.payload import (
    BitstreamError,
    LayeredImage,
    check_kind,
    check_model,
    model_fingerprint,
    tensor_crc,
)
from utils.coding.rans import safe_string
from utils.device import model_device
from utils.image_io import to_grayscale, to_uint8, to_unit_float
from utils.stitching.patches import pad_replicate
from utils.stitching.transforms import transform_mode

__all__ = ["encode", "decode", "encode_latents", "decode_latents", "layer_sizes"]


def _check_model(model: nn.Module) -> None:
    if model.training:
        raise RuntimeError(
            "layered coding needs the model in eval mode (call model.eval())"
        )
    if not entropy_tables_ready(model):
        raise RuntimeError(
            "the entropy models have no CDF tables; call model.update() first"
        )


def _padded_size(model: nn.Module, height: int, width: int):
    factor = model.downsampling_factor
    return -(-height // factor) * factor, -(-width // factor) * factor


def encode(model: nn.Module, image: Tensor, plan: CodingPlan) -> LayeredImage:
    """Code a uint8 (3, H, W) image into one stream per layer of ``model``, keeping
    the first ``plan.layers`` of them (all for 0)."""
    if plan.layers > model.num_layers:
        raise ValueError(
            f"cannot keep {plan.layers} layers: {model.registry_name} has "
            f"{model.num_layers}"
        )
    layered = encode_latents(model, image, plan.budget_bytes, plan.grayscale)[0]
    layered.grayscale = plan.grayscale
    if plan.layers:
        layered.streams = layered.streams[: plan.layers]
        layered.latent_crcs = layered.latent_crcs[: plan.layers]
        layered.estimated_bits = layered.estimated_bits[: plan.layers]
    return layered


def encode_latents(
    model: nn.Module,
    image: Tensor,
    budget_bytes: Optional[int] = None,
    grayscale: bool = False,
):
    """All layers' payload, and the encoder's per-layer outputs.

    The second value holds the lists ``x_hat``, ``y_hat`` and ``prediction`` (None for
    the base) of the encoder's own reconstruction loop, for comparison with
    :func:`decode_latents`. With ``budget_bytes``, an image whose coding would break
    it is refused before any work, and so is a colour image coded as ``grayscale``
    (:func:`~models.base.check_image`).
    """
    _check_model(model)
    check_image(image, grayscale)
    height, width = image.shape[1:]
    device = model_device(model)
    check_whole_image_fits(model, device, budget_bytes, height, width)
    x = to_unit_float(pad_replicate(image, model.downsampling_factor).to(device))[None]
    streams, estimated, crcs = [], [], []

    def code(k, value, _size):
        entropy_model = model.entropy_bottlenecks[k]
        streams.append(entropy_model.compress(value)[0])
        # Eval mode: round around the medians.
        decoded, likelihoods = entropy_model(value)
        estimated.append(float(-torch.log2(likelihoods.double()).sum()))
        crcs.append(tensor_crc(decoded))
        return decoded, None

    with transform_mode(device, exact=True):
        out = model._run_layers(model.layer_inputs(x), code, tuple(x.shape[-2:]))
    layered = LayeredImage(
        height=height,
        width=width,
        architecture=model.registry_name,
        fingerprint=model_fingerprint(model),
        total_layers=model.num_layers,
        streams=streams,
        latent_crcs=crcs,
        estimated_bits=estimated,
    )
    return layered, out


def decode_latents(
    model: nn.Module,
    layered: LayeredImage,
    upto: Optional[int] = None,
    budget_bytes: Optional[int] = None,
) -> dict:
    """Decode layers 0..upto-1 and return the model's per-layer outputs (uncropped).

    Only ``layered.streams[:upto]`` is read. Raises :class:`BitstreamError` when the
    streams belong to another model or a layer's decoded values differ from the
    encoder's (its latent, for version 1 files); with ``budget_bytes``, the header's
    size is checked against it before any work.
    """
    _check_model(model)
    stored = len(layered.streams)
    upto = stored if upto is None else upto
    if not 1 <= upto <= stored:
        raise ValueError(
            f"cannot decode {upto} layers: the file holds {stored} "
            f"(of {model.num_layers})"
        )
    check_model(layered, model, layered=True)
    if layered.total_layers != model.num_layers:
        raise BitstreamError(
            f"the file says the model has {layered.total_layers} layers; "
            f"this one has {model.num_layers}"
        )
    device = model_device(model)
    check_whole_image_fits(model, device, budget_bytes, layered.height, layered.width)

    def code(k, _value, latent_size):
        entropy_model = model.entropy_bottlenecks[k]
        symbols = entropy_model.channels * latent_size[0] * latent_size[1]
        stream = safe_string(layered.streams[k], symbols, f"layer {k}")
        decoded = entropy_model.decompress([stream], latent_size)
        if layered.version >= 2 and tensor_crc(decoded) != layered.latent_crcs[k]:
            raise BitstreamError(
                f"layer {k}: the decoded values differ from the encoder's "
                "(CRC mismatch): a damaged stream or other entropy tables"
            )
        return decoded, None

    size = _padded_size(model, layered.height, layered.width)
    with transform_mode(device, exact=True):
        out = model._run_layers(None, code, size, upto)
    if layered.version == 1:
        for k, y_hat in enumerate(out["y_hat"]):
            if tensor_crc(y_hat) != layered.latent_crcs[k]:
                raise BitstreamError(
                    f"layer {k}: the decoded latent differs from the encoder's "
                    f"(CRC mismatch on {device}); a version 1 file decodes on the "
                    f"encoder's platform only"
                )
    return out


def decode(model: nn.Module, layered: LayeredImage, plan: CodingPlan) -> Tensor:
    """The uint8 image of layer ``plan.layers`` (the top stored layer for 0), decoded
    from the streams of that layer and the ones below it only, and cropped to the
    layer's size (the image size for quality models, the pyramid level for spatial
    ones)."""
    check_kind(layered, model, layered=True)  # decode_latents checks the rest
    stored = len(layered.streams)
    if plan.layers > stored:
        raise ValueError(
            f"the file holds {stored} layers; cannot decode layer {plan.layers}"
        )
    upto = plan.layers or stored
    x_hat = decode_latents(model, layered, upto, plan.budget_bytes)["x_hat"][-1]
    height, width = decoded_size(model, layered, plan)
    image = to_uint8(x_hat[0, :, :height, :width]).cpu()
    return to_grayscale(image) if layered.grayscale else image


def decoded_size(model: nn.Module, layered: LayeredImage, plan: CodingPlan):
    """(h, w) of the layer :func:`decode` returns for ``plan``."""
    upto = plan.layers or len(layered.streams)
    return layer_sizes(model, layered.height, layered.width)[upto - 1]


def layer_sizes(model: nn.Module, height: int, width: int):
    """Output size (h, w) of every layer for an original ``height x width`` image."""
    if all(scale == 1 for scale in model.layer_scales()):
        return [(height, width)] * model.num_layers
    return pyramid_sizes(height, width, model.num_layers)
