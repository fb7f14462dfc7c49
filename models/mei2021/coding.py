"""Layered bitstreams of the Mei et al. 2021 models: one stream per layer, in one container.

:func:`encode_layers` pads the image (replicate) to a multiple of the model's
:attr:`downsampling_factor`, then codes the base latent and each enhancement
residual with that layer's factorized prior (CompressAI ``EntropyBottleneck``, rANS).
:func:`decode_layers` decodes layers 0..upto-1 from the streams of those layers only
and crops every reconstruction to its layer's size (the image size for quality
models, the pyramid level size ``ceil(H/2^j) x ceil(W/2^j)`` for spatial ones).
The encoder predicts from exactly the values the decoder rebuilds (the shared
``_run_layers`` loop), both run with the codec's deterministic convolution settings
(``models.cps.coding.transform_mode``: on CUDA, cuDNN's default transposed convolutions
are not bit-reproducible from call to call, which made the encoder's and the
decoder's predictions differ), and the container stores a CRC of every decoded latent
so a decoder that does not reproduce them fails loudly instead of drifting.

Container (``.cpsl``), big-endian, version 1:

======  ======  ================================================================
offset  bytes   field
======  ======  ================================================================
0       4       magic ``b"CPSL"``
4       1       format version (1)
5       1       S, number of layers stored (1..L); a prefix of the model's layers
6       1       L, number of layers of the model
7       4       original height H (pixels)
11      4       original width W
15      1       length n of the architecture name, then the name (ASCII)
16+n    8       model fingerprint (``utils.coding.container.model_fingerprint``)
24+n    12*S    per stored layer: stream length, CRC-32 of the stream, CRC-32 of the
                layer's decoded latent y^_k (float32 bytes)
..      4       CRC-32 of the header (every byte above)
..      ..      the S streams, base first
======  ======  ================================================================

Dropping the top layers is a header rewrite (:func:`truncate_layers`): a server can
serve lower operating points without re-encoding, and a file truncated that way
still decodes every layer it holds.
"""

import struct
import zlib
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import Tensor, nn

from models.checkpoint import entropy_tables_ready
from utils.coding.container import BitstreamError, model_fingerprint, tensor_crc
from models.cps.coding import transform_mode
from utils.stitching.patches import pad_replicate
from models.mei2021.pyramid import pyramid_sizes, to_uint8

__all__ = ["LayeredImage", "encode_layers", "encode_latents", "decode_layers", "decode_latents",
           "layer_sizes", "pack_layers", "unpack_layers",
           "truncate_layers", "MAGIC", "VERSION"]

MAGIC = b"CPSL"
VERSION = 1
_FIXED = struct.Struct(">4sBBBIIB")
_LAYER = struct.Struct(">III")


@dataclass
class LayeredImage:
    """The streams of one image and what is needed to decode them.

    ``estimated_bits`` (per layer, from the likelihoods) is the encoder's estimate
    and is not stored in the container.
    """

    height: int
    width: int
    architecture: str
    fingerprint: bytes
    streams: List[bytes]
    y_hat_crcs: List[int]
    estimated_bits: List[float] = field(default_factory=list)


def _check_model(model: nn.Module) -> None:
    if model.training:
        raise RuntimeError("layered coding needs the model in eval mode (call model.eval())")
    if not entropy_tables_ready(model):
        raise RuntimeError("the entropy models have no CDF tables; call model.update() first")


def _padded_size(model: nn.Module, height: int, width: int):
    factor = model.downsampling_factor
    return -(-height // factor) * factor, -(-width // factor) * factor


def encode_layers(model: nn.Module, image: Tensor) -> LayeredImage:
    """Code a uint8 (3, H, W) image into one stream per layer of ``model``."""
    return encode_latents(model, image)[0]


def encode_latents(model: nn.Module, image: Tensor):
    """:func:`encode_layers`, also returning the encoder's per-layer outputs.

    The second value holds the lists ``x_hat``, ``y_hat`` and ``prediction`` (None for
    the base) of the encoder's own reconstruction loop, for comparison with
    :func:`decode_latents`.
    """
    _check_model(model)
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a uint8 tensor (3, H, W), got {image.dtype} "
                         f"{tuple(image.shape)}")
    height, width = image.shape[1:]
    device = next(model.parameters()).device
    x = pad_replicate(image, model.downsampling_factor).to(device).float().div(255)[None]
    streams, estimated = [], []

    def code(k, value, _size):
        entropy_model = model.entropy_bottlenecks[k]
        streams.append(entropy_model.compress(value)[0])
        decoded, likelihoods = entropy_model(value)  # eval mode: round around the medians
        estimated.append(float(-torch.log2(likelihoods.double()).sum()))
        return decoded, None

    with transform_mode(device, exact=True):
        out = model._run_layers(model.layer_inputs(x), code, tuple(x.shape[-2:]))
    layered = LayeredImage(height=height, width=width, architecture=model.registry_name,
                           fingerprint=model_fingerprint(model), streams=streams,
                           y_hat_crcs=[tensor_crc(y) for y in out["y_hat"]],
                           estimated_bits=estimated)
    return layered, out


def decode_latents(model: nn.Module, layered: LayeredImage, upto: Optional[int] = None) -> dict:
    """Decode layers 0..upto-1 and return the model's per-layer outputs (uncropped).

    Only ``layered.streams[:upto]`` is read. Raises :class:`BitstreamError` when the
    streams belong to another model or a decoded latent differs from the encoder's.
    """
    _check_model(model)
    stored = len(layered.streams)
    upto = stored if upto is None else upto
    if not 1 <= upto <= stored:
        raise ValueError(f"cannot decode {upto} layers: the file holds {stored} "
                         f"(of {model.num_layers})")
    if layered.architecture != model.registry_name:
        raise BitstreamError(f"the streams were made by {layered.architecture!r}, "
                             f"not by {model.registry_name!r}")
    if layered.fingerprint != model_fingerprint(model):
        raise BitstreamError("the streams were made with other weights (fingerprint mismatch)")
    device = next(model.parameters()).device

    def code(k, _value, latent_size):
        return model.entropy_bottlenecks[k].decompress([layered.streams[k]], latent_size), None

    size = _padded_size(model, layered.height, layered.width)
    with transform_mode(device, exact=True):
        out = model._run_layers(None, code, size, upto)
    for k, y_hat in enumerate(out["y_hat"]):
        if tensor_crc(y_hat) != layered.y_hat_crcs[k]:
            raise BitstreamError(f"layer {k}: the decoded latent differs from the encoder's "
                                 f"(CRC mismatch on {device}); decode on the encoder's platform")
    return out


def decode_layers(model: nn.Module, layered: LayeredImage,
                  upto: Optional[int] = None) -> List[Tensor]:
    """Decode layers 0..upto-1 (all stored ones by default) into uint8 images, base first.

    Reconstruction k is rounded to 8 bit and cropped to layer k's size.
    """
    out = decode_latents(model, layered, upto)
    sizes = layer_sizes(model, layered.height, layered.width)
    return [to_uint8(x_hat[0, :, :h, :w]).cpu() for x_hat, (h, w) in zip(out["x_hat"], sizes)]


def layer_sizes(model: nn.Module, height: int, width: int):
    """Output size (h, w) of every layer for an original ``height x width`` image."""
    if all(scale == 1 for scale in model.layer_scales()):
        return [(height, width)] * model.num_layers
    return pyramid_sizes(height, width, model.num_layers)


def pack_layers(model: nn.Module, layered: LayeredImage) -> bytes:
    """Serialise ``layered`` (all its streams) into the container described above."""
    name = layered.architecture.encode("ascii")
    header = [_FIXED.pack(MAGIC, VERSION, len(layered.streams), model.num_layers,
                          layered.height, layered.width, len(name)), name, layered.fingerprint]
    for stream, y_crc in zip(layered.streams, layered.y_hat_crcs):
        header.append(_LAYER.pack(len(stream), zlib.crc32(stream), y_crc))
    head = b"".join(header)
    return head + struct.pack(">I", zlib.crc32(head)) + b"".join(layered.streams)


def _parse(data: bytes):
    if len(data) < 4 or data[:4] != MAGIC:
        raise BitstreamError("not a layered .cpsl file (bad magic number)")
    if len(data) < _FIXED.size:
        raise BitstreamError("truncated .cpsl file (incomplete header)")
    _, version, stored, total, height, width, name_length = _FIXED.unpack_from(data)
    if version != VERSION:
        raise BitstreamError(f".cpsl format version {version} is not supported "
                             f"(this code reads {VERSION})")
    position = _FIXED.size + name_length + 8
    end = position + _LAYER.size * stored
    if len(data) < end + 4 or not 1 <= stored <= total:
        raise BitstreamError("truncated or corrupted .cpsl header")
    if zlib.crc32(data[:end]) != struct.unpack_from(">I", data, end)[0]:
        raise BitstreamError("corrupted .cpsl header (checksum mismatch)")
    name = data[_FIXED.size:_FIXED.size + name_length].decode("ascii", errors="replace")
    layers = [_LAYER.unpack_from(data, position + _LAYER.size * k) for k in range(stored)]
    return {"total": total, "height": height, "width": width, "name": name,
            "fingerprint": data[position - 8:position], "layers": layers, "body": end + 4}


def unpack_layers(data: bytes) -> LayeredImage:
    """Parse a container; raise :class:`BitstreamError` if it is foreign or damaged."""
    info = _parse(data)
    streams, offset = [], info["body"]
    for k, (length, crc, _) in enumerate(info["layers"]):
        stream = data[offset:offset + length]
        if len(stream) != length:
            raise BitstreamError(f"truncated .cpsl file: layer {k} is incomplete")
        if zlib.crc32(stream) != crc:
            raise BitstreamError(f"corrupted .cpsl file: layer {k} fails its checksum")
        streams.append(stream)
        offset += length
    if offset != len(data):
        raise BitstreamError("corrupted .cpsl file (trailing bytes)")
    return LayeredImage(height=info["height"], width=info["width"], architecture=info["name"],
                        fingerprint=info["fingerprint"], streams=streams,
                        y_hat_crcs=[y_crc for _, _, y_crc in info["layers"]])


def truncate_layers(data: bytes, keep: int) -> bytes:
    """The container ``data`` with only its first ``keep`` layers (header rewritten)."""
    info = _parse(data)
    stored = len(info["layers"])
    if not 1 <= keep <= stored:
        raise ValueError(f"can keep 1..{stored} layers of this file, got {keep}")
    name = info["name"].encode("ascii")
    head = [_FIXED.pack(MAGIC, VERSION, keep, info["total"], info["height"], info["width"],
                        len(name)), name, info["fingerprint"]]
    head += [_LAYER.pack(*layer) for layer in info["layers"][:keep]]
    head = b"".join(head)
    length = sum(layer[0] for layer in info["layers"][:keep])
    body = data[info["body"]:info["body"] + length]
    return head + struct.pack(">I", zlib.crc32(head)) + body
