"""The codec contract every registered architecture implements.

Scripts and utilities reach a model only through these members, whatever the
model (CPS, Kamisli 2024, Mei 2021, a CompressAI zoo network):

.. code-block:: none

    image uint8 (3, H, W) --encode(image, plan)--> payload
        --container.pack--> .cps / .cpsl bytes
    .cps / .cpsl bytes --container.unpack--> payload
        --decode(payload, plan)--> image uint8

* :meth:`LearnedCodec.encode` / :meth:`LearnedCodec.decode`: real bitstreams. The
  payload is one of the container's types (``utils/coding/payload.py``, written
  by ``utils/coding/container.py``), so every model's files share one header, one
  CRC rule and one set of size limits.
  The :class:`CodingPlan` says what the caller wants (patching, memory budget,
  entropy-coder order, exactness, layers); each model decides how to honour it.
* :meth:`LearnedCodec.measure_budget_costs`: what checking a plan's memory budget
  measures, taken before a caller starts timing.
* :meth:`LearnedCodec.forward`: ``{"x_hat", "likelihoods"}`` as in CompressAI, for
  training and for rate estimation without coding. A scalable model (more than one
  operating point) also gives ``x_hats``, every point's reconstruction, and one
  ``likelihoods`` entry per point, both base first: point ``k``'s estimated rate is
  that of the first ``k + 1`` entries.
* :meth:`LearnedCodec.default_loss`: the loss ``train.py`` optimises, and
  :meth:`LearnedCodec.aux_loss`, the quantile loss of the entropy bottlenecks.
* :attr:`LearnedCodec.operating_points` and :meth:`LearnedCodec.reference_image`:
  a scalable model has one operating point per layer; point ``k`` decodes with
  ``plan.layers = k + 1`` and is measured against ``reference_image(image, k)``.
* :attr:`LearnedCodec.downsampling_factor`: the side multiple ``forward`` needs; a
  caller pads images to it (training crops must be multiples of it).
* :attr:`LearnedCodec.supports_patches`: whether ``plan.patch`` changes anything
  (POPS); ``test.py`` picks its default tiling from it. A model that sets it gives
  ``utils/stitching`` what it reads: padding-free ``g_a``/``g_s`` (blocks declare
  their ``pops_layers``, the geometry is derived from them) and ``M`` latent channels.
* :attr:`LearnedCodec.rate_includes_container`: bpp from the whole file (header
  included) or, as CompressAI's ``eval_model`` counts it, from the rANS strings.
* ``config`` and ``from_state_dict``: the constructor arguments a checkpoint stores,
  and a model rebuilt from weights alone (whose ``config`` must equal the stored one).
* ``update(force=True)``, CompressAI's: every registered model is also a CompressAI
  ``CompressionModel``, whose ``update`` builds the entropy tables that the loader,
  the trainer and the release call before coding.

Adding an architecture means subclassing this and a CompressAI model, implementing
``encode``/``decode`` and registering the class (``models/registry.py``).
:class:`ClosedLoopTrainable` is the further contract of the models that asymptotic
closed-loop training (``training_mode: acl``) can train.
"""

import abc
from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import torch
from compressai.entropy_models import EntropyBottleneck
from compressai.losses import RateDistortionLoss
from torch import Tensor, nn

from utils.coding import ORDERS
from utils.coding.payload import CompressedImage, LayeredImage, Payload, check_size
from utils.stitching.spec import PatchSpec


@dataclass(frozen=True)
class CodingPlan:
    """What the caller asks of one encode or decode.

    Attributes:
        patch: POPS tiling of the transforms (models without POPS ignore it).
        batch_size: most patches per forward pass.
        budget_bytes: peak memory of the whole process (CPU RSS, or CUDA allocated
            memory for a CUDA model); None for no budget.
        order: entropy-coder order of context models, ``wavefront`` or ``raster``.
        exact: on the CPU, convolutions as fixed-shape matrix products, bit-exact
            across patch plans (see ``utils/stitching/transforms.py``); False uses
            oneDNN (slightly faster, equal to float rounding).
        grayscale: mark the file so that the decoder writes one channel.
        layers: scalable models: keep (encode) or decode the first K layers; 0 for all.
    """

    patch: PatchSpec = field(default_factory=PatchSpec)
    batch_size: int = 8
    budget_bytes: Optional[int] = None
    order: str = "wavefront"
    exact: bool = True
    grayscale: bool = False
    layers: int = 0

    def __post_init__(self):
        self._check_types()
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.budget_bytes is not None and self.budget_bytes < 1:
            raise ValueError(
                f"memory budget must be positive, got {self.budget_bytes} bytes"
            )
        if self.order not in ORDERS:
            raise ValueError(
                f"unknown entropy coder order {self.order!r}; choose from {ORDERS}"
            )
        if self.layers < 0:
            raise ValueError(f"layers must be >= 0 (0: all), got {self.layers}")

    def _check_types(self) -> None:
        """Refuse a value of the wrong type, which would otherwise fail deep in a
        codec (``patch=256``) or be taken for another (``grayscale="no"`` is true)."""
        if not isinstance(self.patch, PatchSpec):
            raise TypeError(
                f"patch must be a PatchSpec (PatchSpec(256), PatchSpec(0) for the "
                f"whole image, PatchSpec() for auto), got {self.patch!r}"
            )
        for name in ("exact", "grayscale"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"{name} must be True or False, got {getattr(self, name)!r}"
                )
        for name in ("batch_size", "layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        budget = self.budget_bytes
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int)
        ):
            raise TypeError(
                f"budget_bytes must be an int or None (utils.memory.parse_memory "
                f"reads '2GB'), got {budget!r}"
            )

    def with_(self, **changes) -> "CodingPlan":
        """A copy with ``changes`` applied (and checked)."""
        return replace(self, **changes)


class LearnedCodec(nn.Module, abc.ABC):
    """Base class of every registered architecture; see the module docstring."""

    registry_name: str  # set by ``models.registry.register_model``
    supports_patches = False
    rate_includes_container = True

    @abc.abstractmethod
    def encode(self, image: Tensor, plan: CodingPlan) -> Payload:
        """Compress a uint8 RGB image (3, H, W) into a container payload."""

    @abc.abstractmethod
    def decode(self, payload: Payload, plan: CodingPlan) -> Tensor:
        """Rebuild the uint8 image (3, H, W), or (1, H, W) for a grayscale source.

        Raises:
            utils.coding.payload.BitstreamError: a payload of another model or
                checkpoint, or one this machine does not decode exactly.
        """

    def measure_budget_costs(self, plan: CodingPlan) -> None:
        """Take now the measurements that checking ``plan``'s memory budget needs, so
        that they do not land in the first image's timed coding (``test.py`` and
        ``codec.py`` call this before they time). Each is made once and kept;
        coding makes any that are missing. Nothing to measure without a
        budget, nor for a model whose budget check measures nothing (this default)."""

    def default_loss(self, lmbda: float, metric: str = "mse") -> nn.Module:
        """The training loss: CompressAI's rate-distortion loss (``lmbda`` weighs the
        distortion, ``metric`` is ``mse`` or ``ms-ssim``)."""
        return RateDistortionLoss(lmbda=lmbda, metric=metric)

    def aux_loss(self) -> Tensor:
        """The entropy bottlenecks' quantile loss (CompressAI's ``aux_loss``), always a
        tensor: zero for a model without an ``EntropyBottleneck`` (Kamisli 2024), where
        CompressAI returns the int 0."""
        losses = [
            module.loss()
            for module in self.modules()
            if isinstance(module, EntropyBottleneck)
        ]
        return sum(losses) if losses else next(self.parameters()).new_zeros(())

    @property
    @abc.abstractmethod
    def downsampling_factor(self) -> int:
        """Sides of a ``forward`` input must be multiples of this (the stride product
        of the analysis transforms)."""

    @property
    def operating_points(self) -> int:
        """Rate points one payload offers (one per layer for scalable models)."""
        return 1

    def reference_image(self, image: Tensor, point: int) -> Tensor:
        """The uint8 image operating point ``point`` reconstructs (the input itself
        unless the point is a smaller pyramid level)."""
        return image

    def decoded_size(self, payload: Payload, plan: CodingPlan) -> tuple:
        """(height, width) that ``decode(payload, plan)`` returns: the header's size,
        unless the decoded operating point is a smaller pyramid level."""
        return payload.height, payload.width

    def configured_state(self) -> Dict[str, Tensor]:
        """State-dict entries that the constructor's arguments set and training does
        not learn (Mei 2021's ``lmbdas``; none by default). Training keeps these
        when it loads other weights (a resume, ``--init-from``): they say what the
        run trains for, as its config does."""
        return {}

    @property
    @abc.abstractmethod
    def config(self) -> dict:
        """Constructor arguments: stored in checkpoints beside the weights, and equal to
        what ``from_state_dict`` rebuilds from them (``load_checkpoint`` checks it)."""

    @classmethod
    @abc.abstractmethod
    def from_state_dict(cls, state_dict) -> "LearnedCodec":
        """The model whose sizes are read from ``state_dict``, with
        those weights loaded."""

    @classmethod
    def holds_published_weights(cls, state_dict) -> bool:
        """Whether ``state_dict`` is in the layout of this architecture's published
        files, which name no architecture: ``load_checkpoint`` then picks this one.
        False unless a model's authors published files under their own names."""
        return False


class ClosedLoopTrainable(abc.ABC):
    """What asymptotic closed-loop training (ACL, Kamisli et al. 2024) needs of a
    block-based model besides :class:`LearnedCodec`: an open-loop pass whose blocks
    see a given context as their decoded neighbours, and the closed-loop
    reconstruction the decoder would produce. ``training_mode: acl`` refuses models
    that do not implement it."""

    block_size: int  # pixels per side of one block

    @abc.abstractmethod
    def forward(self, x: Tensor, x_ctx: Optional[Tensor] = None) -> dict:
        """``{"x_hat", "likelihoods"}`` of images (N, 3, H, W) in [0, 1] whose blocks
        see ``x_ctx``'s blocks (same shape; ``x`` if None) as their neighbours."""

    @abc.abstractmethod
    def closed_loop(
        self, x: Tensor, tile_blocks: int = 0, context_bits: Optional[int] = None
    ) -> dict:
        """``{"x_hat", "likelihoods"}`` of (1, 3, H, W) when every block sees the
        reconstructions of the blocks coded before it (``tile_blocks``: code tiles of
        that many blocks a side independently, 0 the whole image; ``context_bits``:
        round the context to that many bits, None keeps floats)."""


def check_payload(model: LearnedCodec, payload) -> Payload:
    """``payload`` if ``encode`` returned one of the container's types; else a
    RuntimeError naming the model (a bug in the model, not in the image)."""
    if not isinstance(payload, (CompressedImage, LayeredImage)):
        raise RuntimeError(
            f"{model.registry_name}'s encode returned a "
            f"{type(payload).__name__}, not a CompressedImage or LayeredImage "
            "(models/base.py)"
        )
    return payload


def check_decoded(
    model: LearnedCodec, payload: Payload, plan: CodingPlan, image
) -> Tensor:
    """``image`` if ``decode`` kept the contract; else a RuntimeError naming the model
    (a bug in the model, which must not pass for a damaged file or be written out).

    The contract: a uint8 tensor (3, H, W), or (1, H, W) for a grayscale source, of
    :meth:`LearnedCodec.decoded_size` (the header's size, or a pyramid level's).
    """
    channels = 1 if payload.grayscale else 3
    height, width = model.decoded_size(payload, plan)
    if not (
        isinstance(image, Tensor)
        and image.dtype == torch.uint8
        and tuple(image.shape) == (channels, height, width)
    ):
        got = (
            f"a {image.dtype} tensor {tuple(image.shape)}"
            if isinstance(image, Tensor)
            else f"a {type(image).__name__}"
        )
        raise RuntimeError(
            f"{model.registry_name}'s decode returned {got} for a "
            f"{payload.width}x{payload.height} file; the contract is a uint8 "
            f"({channels}, {height}, {width}) tensor (models/base.py)"
        )
    return image


def check_image(image: Tensor, grayscale: bool = False) -> None:
    """Refuse anything but a uint8 RGB tensor (3, H, W) of a size the container holds,
    and a colour image coded as ``grayscale`` (a plan's flag), whose decoder would
    write the mean of its channels (an encoder calls this first, before any work)."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(
            f"expected a uint8 RGB tensor (3, H, W), got {image.dtype} "
            f"{tuple(image.shape)}"
        )
    check_size(*image.shape[1:])
    if grayscale and not (
        torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    ):
        raise ValueError(
            "plan.grayscale is set but the image's channels differ: a grayscale "
            "image comes as one plane repeated three times (utils.image_io.read_image "
            "gives it so), or leave grayscale False"
        )
