"""The ways ``test.py`` turns an image into bits and back, one class per way.

Every coder maps a uint8 RGB image (3, H, W) to a :class:`Coded`: the number of
bits, the 8-bit reconstruction and the encoding/decoding times.

* :class:`ModelCoder` codes with any registered model through the codec contract
  (``models/base.py``): ``encode`` -> container bytes -> ``decode``, one operating
  point of the model. The rate is the file's size, or its rANS strings alone for
  models that count rates as CompressAI does.
* :class:`EstimationCoder` runs one forward pass and takes the rate from the
  likelihoods (``--entropy-estimation``); nothing is entropy-coded.
* :class:`ClassicalCoder` calls a classical codec
  (``utils.evaluation.classical_codecs``).

Naive tiles wrap any of them (``utils.evaluation.naive_tiles``), and
``utils.evaluation.learned_coders`` picks a learned model's coders from the command
line. Times are wall-clock seconds, with CUDA synchronised before each reading.
"""

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from models.base import CodingPlan, check_decoded, check_payload
from utils.coding.container import pack, unpack
from utils.coding.payload import LayeredImage
from utils.device import model_device
from utils.evaluation.metrics import likelihood_bits
from utils.image_io import to_uint8, to_unit_float
from utils.memory import PeakMemory, format_memory
from utils.stitching.geometry import model_geometry
from utils.stitching.patches import pad_replicate
from utils.stitching.spec import PatchSpec


@dataclass
class Coded:
    """One image coded once.

    With ``--verify``, ``peak_mb`` is the coding's own peak memory and
    ``verification_peak_mb`` the second decode's, each measured on its own.
    """

    bits: float
    reconstruction: Tensor  # uint8 (3, H, W), on the CPU
    encoding_time: float
    decoding_time: Optional[float]
    estimated_bits: Optional[float] = None
    peak_mb: Optional[float] = None
    verification_peak_mb: Optional[float] = None


class Coder:
    """What :func:`utils.evaluation.runs.evaluate` needs of a coder.

    ``device`` (where its peak memory is read), ``description`` (for the results
    header), ``layer`` (the operating point of a scalable model, else None),
    :meth:`code`, and :meth:`reference_image`, the image the reconstruction is
    measured against.
    """

    device = torch.device("cpu")
    description = ""
    layer: Optional[int] = None

    def code(self, image: Tensor) -> Coded:
        raise NotImplementedError

    def reference_image(self, image: Tensor) -> Tensor:
        return image


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _check_same(first: Tensor, second: Tensor, what: str) -> None:
    if not torch.equal(first, second):
        differing = (first.int() - second.int()).abs()
        raise RuntimeError(
            f"--verify failed: {what} ({int((differing > 0).sum())} samples "
            f"differ, by up to {int(differing.max())})"
        )


def forward_bits(model: nn.Module, image: Tensor) -> float:
    """Likelihood rate of one forward pass on the image padded (replicate) to the
    model's :attr:`~models.base.LearnedCodec.downsampling_factor`."""
    padded = pad_replicate(image, model.downsampling_factor)
    x = to_unit_float(padded.to(model_device(model)))[None]
    with torch.inference_mode():
        return likelihood_bits(model(x)["likelihoods"])


def verification_plan(model: nn.Module, plan: CodingPlan) -> CodingPlan:
    """A second decode's plan that tiles differently from ``plan``, within the same
    budget: patch-independence is then proven, not assumed. Fixed patches become
    auto (the budget's choice, the whole image without one); auto or whole-image
    becomes the smallest exact patch of the model, doubled."""
    if not model.supports_patches:
        return plan
    if plan.patch.size:
        return plan.with_(patch=PatchSpec(None))
    geometry = model_geometry(model)
    return plan.with_(patch=PatchSpec(2 * geometry.min_patch_size))


class _PointCoder(Coder):
    """A coder of operating point ``point`` of a registered model: the point checked,
    ``layer`` set for a scalable model (None otherwise), and the reference image the
    point is measured against."""

    def __init__(self, model: nn.Module, point: int):
        if not 0 <= point < model.operating_points:
            raise ValueError(
                f"operating point {point} does not exist; "
                f"{model.registry_name} has {model.operating_points}"
            )
        self.model, self.point = model, point
        self.layer = point if model.operating_points > 1 else None

    def reference_image(self, image: Tensor) -> Tensor:
        return self.model.reference_image(image, self.point).cpu()


class ModelCoder(_PointCoder):
    """Operating point ``point`` of a registered model, coded to real container bytes.

    Args:
        plan: how to encode and decode; ``plan.layers`` is set from ``point``.
        count_header: count the whole file (True) or the rANS strings only (False;
            used for naive tiles, each of which would otherwise pay a header). Models
            whose rates are counted as CompressAI counts them never count the header.
        verify: decode each file a second time with another patch plan
            (:func:`verification_plan`) and require the same pixels; the decoder
            itself already checks that it rebuilt the encoder's latent.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: CodingPlan,
        point: int = 0,
        count_header: bool = True,
        verify: bool = False,
    ):
        super().__init__(model, point)
        self.verify = verify
        self.plan = plan.with_(layers=point + 1) if model.operating_points > 1 else plan
        self.count_header = count_header and model.rate_includes_container
        self.device = model_device(model)
        self.description = self._describe()

    def _describe(self) -> str:
        parts = [f"{self.model.registry_name} codec"]
        if self.model.supports_patches:
            if self.plan.patch.is_auto:
                parts.append(
                    (
                        "POPS patches planned within "
                        f"{format_memory(self.plan.budget_bytes)}"
                    )
                    if self.plan.budget_bytes
                    else "whole image"
                )
            elif self.plan.patch.is_whole:
                parts.append("whole image")
            else:
                parts.append(f"POPS patches of {self.plan.patch}")
            parts.append(f"{self.plan.order} entropy coder")
        if self.layer is not None:
            parts.append(
                "container cut to layers <= k, bpp cumulative over layer k's pixels"
            )
        counted = (
            "file size, header included" if self.count_header else "rANS strings only"
        )
        return (
            f"{parts[0]} ({'; '.join(parts[1:]) or 'whole image'}); "
            f"bpp from the {counted}"
        )

    def code(self, image: Tensor) -> Coded:
        self.model.measure_budget_costs(self.plan)  # not part of any image's figures
        with PeakMemory(self.device) as coding:
            start = _clock(self.device)
            payload = check_payload(self.model, self.model.encode(image, self.plan))
            data = pack(payload)
            middle = _clock(self.device)
            decoded = unpack(data)
            reconstruction = check_decoded(
                self.model, decoded, self.plan, self.model.decode(decoded, self.plan)
            ).cpu()
            end = _clock(self.device)
        coded = Coded(
            bits=8.0 * (len(data) if self.count_header else payload.stream_bytes),
            reconstruction=reconstruction,
            encoding_time=middle - start,
            decoding_time=end - middle,
            estimated_bits=self._estimate(payload, image),
            peak_mb=coding.peak_mb,
        )
        if self.verify:
            with PeakMemory(self.device) as verification:
                decoded, plan = unpack(data), verification_plan(self.model, self.plan)
                again = check_decoded(
                    self.model, decoded, plan, self.model.decode(decoded, plan)
                )
            coded.verification_peak_mb = verification.peak_mb
            _check_same(
                reconstruction,
                again.cpu(),
                "a second decode with another patch plan gives other pixels",
            )
        return coded

    def _estimate(self, payload, image: Tensor) -> float:
        """The encoder's own estimate, or a forward pass's where it gives none."""
        if isinstance(payload, LayeredImage):
            return sum(payload.estimated_bits[: self.point + 1])
        if math.isfinite(payload.estimated_bits):
            return payload.estimated_bits
        return forward_bits(self.model, image)


class EstimationCoder(_PointCoder):
    """One forward pass; the rate is ``sum(-log2 p)`` of the likelihoods.

    The forward time is reported as the encoding time; there is no decoding time.
    ``half`` runs the pass in float16 (CUDA only). For a scalable model, ``point``
    is the layer (default: the top one): the likelihoods of the layers up to it, and
    its reconstruction, measured against its reference image, as
    :class:`ModelCoder` measures it.
    """

    def __init__(
        self, model: nn.Module, half: bool = False, point: Optional[int] = None
    ):
        super().__init__(
            model.half() if half else model,
            model.operating_points - 1 if point is None else point,
        )
        self.dtype = torch.float16 if half else torch.float32
        self.device = model_device(model)
        self.description = (
            f"entropy estimation: bpp from the likelihoods of a "
            f"{'float16' if half else 'float32'} forward pass, no bitstream"
        )
        if self.layer is not None:
            self.description += (
                "; layer k: the likelihoods of layers <= k over layer k's pixels"
            )

    def code(self, image: Tensor) -> Coded:
        height, width = self.reference_image(image).shape[1:]
        x = to_unit_float(pad_replicate(image, self.model.downsampling_factor))[None]
        with torch.inference_mode():
            start = _clock(self.device)
            output = self.model(x.to(device=self.device, dtype=self.dtype))
            end = _clock(self.device)
        likelihoods, x_hat = output["likelihoods"], output["x_hat"]
        if self.layer is not None:
            # A scalable model's forward gives one likelihood entry per operating
            # point and every point's reconstruction, base first (models/base.py).
            likelihoods = dict(list(likelihoods.items())[: self.point + 1])
            x_hat = output["x_hats"][self.point]
        return Coded(
            bits=likelihood_bits(likelihoods),
            reconstruction=to_uint8(x_hat[0, :, :height, :width]).cpu(),
            encoding_time=end - start,
            decoding_time=None,
        )


class ClassicalCoder(Coder):
    """One classical codec at one quality.

    See ``utils.evaluation.classical_codecs``.
    """

    def __init__(self, codec, quality: float):
        self.codec, self.quality = codec, quality
        self.description = (
            f"{codec.summary}; quality: {codec.scale.meaning}; bpp from the file size"
        )

    def code(self, image: Tensor) -> Coded:
        result = self.codec.code(image, self.quality)
        return Coded(
            bits=8.0 * len(result.data),
            reconstruction=result.reconstruction,
            encoding_time=result.encoding_time,
            decoding_time=result.decoding_time,
        )
