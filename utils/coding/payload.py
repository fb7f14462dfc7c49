"""What a model's ``encode`` returns and its ``decode`` takes, and the checks a
decoder runs on it before decoding.

A payload is a coded image in memory: :class:`CompressedImage` (what a ``.cps`` file
holds) or :class:`LayeredImage` (a ``.cpsl`` file). ``utils/coding/container.py``
turns payloads into bytes and back; this module holds what the models need apart
from that byte layout: the payload types, the size limits every image is checked
against before any work (:func:`check_size`), and the proofs a file carries: which
model and checkpoint wrote it (:func:`check_model`, :func:`model_fingerprint`) and
that its latents were rebuilt exactly (:func:`tensor_crc`). Image readers, the rANS
input checks and every model's decoder need these (and :class:`BitstreamError`)
without packing a file.
"""

import hashlib
import zlib
from dataclasses import dataclass, field
from typing import List, Union

import torch
from torch import nn

# Hard limit of the formats on each side, checked before anything is allocated.
MAX_SIDE = 65535
# The .cpsl format version a new layered payload is written in.
LAYERED_VERSION = 3


class BitstreamError(ValueError):
    """A file that cannot be decoded (foreign, truncated, corrupted, mismatched)."""


@dataclass
class CompressedImage:
    """A ``.cps`` file's content, plus the encoder's rate estimate (not stored)."""

    height: int
    width: int
    pad_bottom: int
    pad_right: int
    architecture: str
    fingerprint: bytes
    order: str
    grayscale: bool
    y_hat_crc: int
    z_string: bytes
    y_string: bytes
    estimated_bits: float = float("nan")
    # The entropy model's products ran on the fixed-point grid (CPS and Kamisli files
    # from format flag bit 2 on); False: float32, decodable only where the encoder's
    # float32 products are reproduced bit for bit (and the zoo models', whose
    # CompressAI coders run in float32).
    fixed_point: bool = False

    @property
    def stream_bytes(self) -> int:
        """Bytes of the rANS strings alone, as CompressAI counts a rate."""
        return len(self.z_string) + len(self.y_string)


@dataclass
class LayeredImage:
    """A ``.cpsl`` file's content: the first ``len(streams)`` of
    ``total_layers`` layers.

    ``latent_crcs`` holds one CRC-32 per layer (:func:`tensor_crc`): from ``version`` 2
    on (3 is written now) of the layer's coded values, the base latent or the residual
    as rANS decodes it; in version 1 of the layer's latent y^_k, prediction included.
    ``grayscale`` (stored from version 3 on) makes the decoder write one channel.
    ``estimated_bits`` (per layer, from the likelihoods) is the encoder's estimate
    and is not stored in the container.
    """

    height: int
    width: int
    architecture: str
    fingerprint: bytes
    total_layers: int
    streams: List[bytes]
    latent_crcs: List[int]
    estimated_bits: List[float] = field(default_factory=list)
    version: int = LAYERED_VERSION
    grayscale: bool = False

    @property
    def stream_bytes(self) -> int:
        """Bytes of the rANS streams alone."""
        return sum(len(stream) for stream in self.streams)


Payload = Union[CompressedImage, LayeredImage]


def model_fingerprint(model: nn.Module) -> bytes:
    """First 8 bytes of a SHA-256 over every named tensor of the model's state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()[:8]


def tensor_crc(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's float32 bytes in row-major order, whatever its layout.

    Computed one slice of the first dimension at a time, so a latent stored
    channels-last is not copied whole.
    """
    crc = 0
    for part in (
        tensor.detach().reshape(-1, *tensor.shape[-2:])
        if tensor.dim() > 2
        else [tensor]
    ):
        crc = zlib.crc32(part.float().cpu().contiguous().numpy(), crc)
    return crc


def check_size(height: int, width: int) -> None:
    """Refuse an image size outside the format's limits (1..:data:`MAX_SIDE` a side):
    a header that claims one, or an image given to an encoder (before any work, so
    that no file is written that no decoder would read)."""
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise BitstreamError(
            f"a {width}x{height} image does not fit the .cps/.cpsl formats, "
            f"which hold 1 to {MAX_SIDE} pixels a side"
        )


def check_kind(payload: Payload, model: nn.Module, layered: bool = False) -> None:
    """Raise :class:`BitstreamError` if ``payload`` is not of the kind ``model`` writes
    (``.cpsl`` for a layered model, as ``layered`` says, ``.cps`` otherwise)."""
    if layered and not isinstance(payload, LayeredImage):
        raise BitstreamError(
            f"{model.registry_name} decodes layered .cpsl files, not .cps ones"
        )
    if not layered and not isinstance(payload, CompressedImage):
        raise BitstreamError(
            f"{model.registry_name} decodes .cps files, not layered ones"
        )


def check_model(payload: Payload, model: nn.Module, layered: bool = False) -> None:
    """Raise :class:`BitstreamError` if ``payload`` was not written by ``model``: a file
    of the other kind (:func:`check_kind`), of another architecture or of another
    checkpoint."""
    check_kind(payload, model, layered)
    if payload.architecture != model.registry_name:
        raise BitstreamError(
            f"file was encoded with architecture {payload.architecture!r}, "
            f"not {model.registry_name!r}"
        )
    fingerprint = model_fingerprint(model)
    if payload.fingerprint != fingerprint:
        raise BitstreamError(
            f"file was encoded with another checkpoint (model fingerprint "
            f"{payload.fingerprint.hex()}, this one is {fingerprint.hex()})"
        )
