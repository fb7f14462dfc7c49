"""The ways ``test.py`` turns an image into bits and back, one class per way.

Every coder maps a uint8 RGB image (3, H, W) to a :class:`Coded`: the number of
bits, the 8-bit reconstruction and the encoding/decoding times.

* :class:`CpsCoder` codes with the CPS codec (``models.cps.coding``) and counts the bytes
  of the ``.cps`` file (``utils.coding.container.pack``, header included). Patch-wise
  (POPS) or whole-image coding give the same pixels; only memory differs.
* :class:`CompressAICoder` codes with a model's own ``compress``/``decompress``
  (CompressAI zoo models): the image is padded (replicate) to the model's
  ``downsampling_factor`` (64 with a hyperprior) and the bits are those of the rANS
  strings, as CompressAI counts them.
* :class:`NaiveTiles` wraps either of them: the image is padded (replicate) to a
  multiple of P, cut into non-overlapping P x P tiles and every tile is coded on
  its own. This is the block-wise baseline of the CPS paper; its seams are what
  PSNR-B measures.
* :class:`EstimationCoder` runs one forward pass and takes the rate from the
  likelihoods (``--entropy-estimation``); nothing is entropy-coded.
* :class:`ClassicalCoder` calls a classical codec (``utils.evaluation.classical_codecs``).

Times are wall-clock seconds, with CUDA synchronised before each reading.
"""

import contextlib
import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from utils.coding.container import pack, unpack
from models.cps.coding import decode_image, encode_image, model_device
from utils.memory import format_memory
from utils.stitching.patches import pad_replicate
from utils.evaluation.metrics import likelihood_bits
from utils.stitching.geometry import check_patch_size, model_geometry

# CompressAI's models need sides divisible by 2**6 (g_a and h_a strides).
DEFAULT_MULTIPLE = 64


@dataclass
class Coded:
    """One image coded once."""

    bits: float
    reconstruction: Tensor  # uint8 (3, H, W), on the CPU
    encoding_time: float
    decoding_time: Optional[float]
    estimated_bits: Optional[float] = None


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _to_float(image: Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    return image[None].to(device=device, dtype=dtype).div_(255.0)


def _to_uint8(batch: Tensor, height: int, width: int) -> Tensor:
    pixels = batch[0, :, :height, :width].float().clamp(0, 1).mul(255.0).round()
    return pixels.to(device="cpu", dtype=torch.uint8)


def _verification_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` for the second decode of ``--verify``."""
    return copy.deepcopy(model).cpu() if model_device(model).type != "cpu" else model


def _check_same(first: Tensor, second: Tensor, what: str) -> None:
    if not torch.equal(first, second):
        differing = (first.int() - second.int()).abs()
        raise RuntimeError(f"--verify failed: {what} ({int((differing > 0).sum())} samples "
                           f"differ, by up to {int(differing.max())})")


class CpsCoder:
    """Real ``.cps`` files from ``models.cps.coding`` (POPS patches of ``patch_size``).

    Args:
        count_header: count the whole file (True) or only the two rANS strings, as
            CompressAI does (False; used for naive tiles, each of which would
            otherwise pay a header).
        verify: decode each file a second time, whole-image on the CPU, and require
            the same pixels; the decoder itself already checks that it rebuilt the
            encoder's latent (the y_hat CRC stored in the file).
    """

    def __init__(self, model: nn.Module, patch_size: Optional[int], batch_size: int = 8,
                 order: str = "wavefront", exact: bool = True, count_header: bool = True,
                 verify: bool = False, max_memory: Optional[int] = None):
        self.model, self.patch_size, self.batch_size = model, patch_size, batch_size
        self.order, self.exact, self.count_header = order, exact, count_header
        self.max_memory = max_memory
        self.device = model_device(model)
        self.reference = _verification_copy(model) if verify else None
        if patch_size is None:
            patches = f"POPS patches planned within {format_memory(max_memory)}" \
                if max_memory else "whole image"
        else:
            patches = f"POPS patches of {patch_size} px" if patch_size else "whole image"
        counted = ".cps file size, header included" if count_header else "rANS strings only"
        self.description = (f"CPS codec ({patches}, {order} entropy coder); "
                            f"bpp from the {counted}")

    def code(self, image: Tensor) -> Coded:
        start = _clock(self.device)
        compressed = encode_image(self.model, image, self.patch_size, self.batch_size,
                                  order=self.order, exact=self.exact, max_memory=self.max_memory)
        data = pack(compressed)
        middle = _clock(self.device)
        reconstruction = decode_image(self.model, unpack(data), self.patch_size,
                                      self.batch_size, exact=self.exact, max_memory=self.max_memory)
        end = _clock(self.device)
        if self.reference is not None:
            again = decode_image(self.reference, unpack(data), 0, self.batch_size, exact=True)
            _check_same(reconstruction.cpu(), again, "patch-wise decode differs from a "
                                                      "whole-image CPU decode of the same file")
        size = len(data)
        if not self.count_header:
            size = len(compressed.z_string) + len(compressed.y_string)
        return Coded(bits=8.0 * size, reconstruction=reconstruction.cpu(),
                     encoding_time=middle - start, decoding_time=end - middle,
                     estimated_bits=compressed.estimated_bits)


class CompressAICoder:
    """A model's own ``compress``/``decompress`` on the image padded to its multiple."""

    def __init__(self, model: nn.Module, verify: bool = False):
        self.model = model
        self.device = model_device(model)
        self.multiple = getattr(model, "downsampling_factor", DEFAULT_MULTIPLE)
        self.reference = _verification_copy(model) if verify else None
        self.description = (f"model compress/decompress, input padded (replicate) to a multiple "
                            f"of {self.multiple}; bpp from the rANS strings (no container)")

    def code(self, image: Tensor) -> Coded:
        height, width = image.shape[1:]
        x = _to_float(pad_replicate(image, self.multiple), self.device)
        with torch.inference_mode():
            start = _clock(self.device)
            compressed = self.model.compress(x)
            middle = _clock(self.device)
            decoded = self.model.decompress(compressed["strings"], compressed["shape"])
            end = _clock(self.device)
            reconstruction = _to_uint8(decoded["x_hat"], height, width)
            if self.reference is not None:
                again = self.reference.decompress(compressed["strings"], compressed["shape"])
                _check_same(reconstruction, _to_uint8(again["x_hat"], height, width),
                            "a second decode on the CPU gives other pixels")
        size = sum(len(string) for strings in compressed["strings"] for string in strings)
        return Coded(bits=8.0 * size, reconstruction=reconstruction,
                     encoding_time=middle - start, decoding_time=end - middle)

    def estimate_bits(self, image: Tensor) -> float:
        """Likelihood rate of a forward pass on the same padded input."""
        x = _to_float(pad_replicate(image, self.multiple), self.device)
        with torch.inference_mode():
            return likelihood_bits(self.model(x)["likelihoods"])


class EstimationCoder:
    """One forward pass; the rate is ``sum(-log2 p)`` of the likelihoods.

    The forward time is reported as the encoding time; there is no decoding time.
    ``half`` runs the pass in float16 (CUDA only).
    """

    def __init__(self, model: nn.Module, half: bool = False):
        self.model = model.half() if half else model
        self.dtype = torch.float16 if half else torch.float32
        self.device = model_device(model)
        self.multiple = getattr(model, "downsampling_factor", DEFAULT_MULTIPLE)
        self.description = (f"entropy estimation: bpp from the likelihoods of a "
                            f"{'float16' if half else 'float32'} forward pass, no bitstream")

    def code(self, image: Tensor) -> Coded:
        height, width = image.shape[1:]
        x = _to_float(pad_replicate(image, self.multiple), self.device, self.dtype)
        with torch.inference_mode():
            start = _clock(self.device)
            output = self.model(x)
            end = _clock(self.device)
        return Coded(bits=likelihood_bits(output["likelihoods"]),
                     reconstruction=_to_uint8(output["x_hat"], height, width),
                     encoding_time=end - start, decoding_time=None)


class NaiveTiles:
    """Non-overlapping ``tile`` x ``tile`` blocks, each coded independently by ``inner``.

    The image is padded (replicate) to a multiple of ``tile``; the rates of all tiles
    add up and are charged to the original pixels.
    """

    def __init__(self, inner, tile: int):
        if tile <= 0:
            raise ValueError(f"naive tiling needs a tile size > 0, got {tile}")
        self.inner, self.tile = inner, tile
        self.device = inner.device
        self.description = (f"naive tiling: independent {tile}x{tile} tiles of the image padded "
                            f"(replicate) to a multiple of {tile}; each tile: {inner.description}")

    def _tiles(self, image: Tensor):
        padded = pad_replicate(image, self.tile)
        for top in range(0, padded.shape[1], self.tile):
            for left in range(0, padded.shape[2], self.tile):
                yield top, left, padded[:, top:top + self.tile, left:left + self.tile].contiguous()

    def code(self, image: Tensor) -> Coded:
        height, width = image.shape[1:]
        output = torch.empty_like(pad_replicate(image, self.tile))
        bits, encoding, decoding, estimated = 0.0, 0.0, 0.0, 0.0
        for top, left, block in self._tiles(image):
            coded = self.inner.code(block)
            output[:, top:top + self.tile, left:left + self.tile] = coded.reconstruction
            bits += coded.bits
            encoding += coded.encoding_time
            decoding = _add(decoding, coded.decoding_time)
            estimated = _add(estimated, coded.estimated_bits)
        return Coded(bits=bits, reconstruction=output[:, :height, :width].contiguous(),
                     encoding_time=encoding, decoding_time=decoding, estimated_bits=estimated)

    def estimate_bits(self, image: Tensor) -> Optional[float]:
        """Sum of the inner coder's estimates over the tiles, if it has any."""
        if not hasattr(self.inner, "estimate_bits"):
            return None
        return sum(self.inner.estimate_bits(block) for _, _, block in self._tiles(image))


def _add(total: Optional[float], value: Optional[float]) -> Optional[float]:
    """Sum that stays None once a term is missing."""
    return None if total is None or value is None else total + value


class ClassicalCoder:
    """One classical codec at one quality (see ``utils.evaluation.classical_codecs``)."""

    device = torch.device("cpu")

    def __init__(self, codec, quality: float):
        self.codec, self.quality = codec, quality
        self.description = (f"{codec.summary}; quality: {codec.scale.meaning}; "
                            "bpp from the file size")

    def code(self, image: Tensor) -> Coded:
        result = self.codec.code(image, self.quality)
        return Coded(bits=8.0 * len(result.data), reconstruction=result.reconstruction,
                     encoding_time=result.encoding_time, decoding_time=result.decoding_time)


class LayeredCoder:
    """Layer ``layer`` (0 = base) of a scalable model (``mei2021-*``) from a real ``.cpsl``
    container cut to layers <= ``layer``.

    The rate is cumulative (every stream a client of this layer receives, container
    header included) over the pixels of this layer's reconstruction, and the metrics
    compare it with :meth:`reference_image`: the image itself for quality layers, its
    pyramid level for spatial layers.
    """

    def __init__(self, model: nn.Module, layer: int):
        if not 0 <= layer < model.num_layers:
            raise ValueError(f"layer {layer} does not exist; the model has {model.num_layers}")
        self.model, self.layer = model, layer
        self.device = model_device(model)
        self.description = (f"layered {getattr(model, 'registry_name', type(model).__name__)} "
                            f"(.cpsl container cut to layers <= k; bpp cumulative over the pixels "
                            f"of layer k)")

    def reference_image(self, image: Tensor) -> Tensor:
        from models.mei2021.pyramid import layered_references

        return layered_references(self.model, image)[self.layer].cpu()

    def code(self, image: Tensor) -> Coded:
        from models.mei2021.coding import (decode_layers, encode_layers, pack_layers,
                                           truncate_layers, unpack_layers)

        start = _clock(self.device)
        layered = encode_layers(self.model, image.to(self.device))
        data = truncate_layers(pack_layers(self.model, layered), self.layer + 1)
        middle = _clock(self.device)
        reconstruction = decode_layers(self.model, unpack_layers(data))[self.layer]
        end = _clock(self.device)
        return Coded(bits=8.0 * len(data), reconstruction=reconstruction.cpu(),
                     encoding_time=middle - start, decoding_time=end - middle,
                     estimated_bits=sum(layered.estimated_bits[:self.layer + 1]))


TILINGS = ("none", "naive", "pops")


def codes_with_pops(model: nn.Module) -> bool:
    """True for padding-free models, which the CPS codec can code patch by patch."""
    if hasattr(model, "encode_image"):  # codes itself, block by block (kamisli2024)
        return False
    try:
        model_geometry(model)
    except (ValueError, AttributeError):
        return False
    return True


@dataclass
class LearnedOptions:
    """How ``test.py`` codes with a learned model (see its ``--help``).

    ``tiling`` None picks ``pops`` for padding-free models and ``none`` otherwise.
    """

    tiling: Optional[str] = None
    patch_size: Optional[int] = 256  # None: chosen within max_memory
    batch_size: int = 8
    max_memory: Optional[int] = None
    order: str = "wavefront"
    exact: bool = True
    entropy_estimation: bool = False
    half: bool = False
    verify: bool = False


def learned_coder(model: nn.Module, options: LearnedOptions):
    """The coder for ``model`` under ``options``; bad combinations raise ``ValueError``."""
    pops_capable = codes_with_pops(model)
    tiling = options.tiling or ("pops" if pops_capable else "none")
    size = options.patch_size
    if tiling == "pops" and not pops_capable:
        raise ValueError(f"--tiling pops needs a padding-free model such as cps; "
                         f"{type(model).__name__} pads its convolutions: use none or naive")
    if tiling == "naive" and not (size and size > 0):
        raise ValueError("--tiling naive needs --patch-size > 0")
    if tiling == "pops" and size is not None:
        check_patch_size(size, model_geometry(model))
    if options.entropy_estimation:
        inner = EstimationCoder(model, half=options.half)
    elif pops_capable or hasattr(model, "encode_image"):
        inner = CpsCoder(model, size if tiling == "pops" else 0, options.batch_size,
                         options.order, options.exact, count_header=tiling != "naive",
                         verify=options.verify, max_memory=options.max_memory)
    else:
        inner = CompressAICoder(model, verify=options.verify)
    return NaiveTiles(inner, size) if tiling == "naive" else inner


def load_pretrained(architecture: str, quality: int, metric: str,
                    device: torch.device) -> nn.Module:
    """A CompressAI zoo model with its published weights (downloaded once by torch.hub)."""
    from compressai.zoo import image_models
    from compressai.zoo.image import model_urls

    if architecture not in model_urls:
        raise ValueError(f"no pretrained CompressAI model {architecture!r}; choose from "
                         f"{', '.join(sorted(model_urls))}")
    try:
        url = model_urls[architecture][metric][quality]
    except KeyError:
        qualities = sorted(model_urls[architecture].get(metric, {}))
        raise ValueError(f"no pretrained {architecture} for metric {metric!r} and quality "
                         f"{quality}; qualities: {qualities}") from None
    try:
        # torch.hub announces downloads on stdout, which belongs to the results JSON.
        with contextlib.redirect_stdout(sys.stderr):
            model = image_models[architecture](quality=quality, metric=metric, pretrained=True,
                                               progress=False)
    except (OSError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise RuntimeError(f"cannot download pretrained {architecture} (metric {metric}, quality "
                           f"{quality}) from {url}: {reason}; without network, put that file in "
                           f"{cache}") from None
    return model.to(device).eval()
