"""CompressAI's zoo architectures, registered under their zoo names behind the
codec contract.

Each zoo class (``mbt2018``, ``cheng2020-anchor``, ...) gets a subclass that keeps
its parameter names, so a researcher's own CompressAI checkpoint loads as it is,
and that codes the way CompressAI's ``eval_model`` does:

* the image is padded with zeros, centred, to a multiple of 64 (CompressAI's
  ``compute_padding``, as ``eval_model``), then ``compress``/``decompress`` run on
  it and the result is cropped;
* the rate is counted from the rANS strings alone (:attr:`rate_includes_container`
  is False), as ``eval_model`` counts it;
* weights are loaded with the class's own ``from_state_dict``, whose
  ``load_state_dict`` is :func:`models.checkpoint.load_state_dict_into` here (so they
  are checked as every architecture's are), and the CDF tables are rebuilt with
  ``update(force=True)``, as ``eval_model`` does by default.

The strings travel in the ``.cps`` container like every other model's (latent
string ``y``, hyperprior string ``z``, empty for factorized models), and are padded
for CompressAI's decoder as every other string is (``utils/coding/rans.py``). The
zoo models do not expose their decoded latent, so the container's latent CRC is 0
and unchecked.
"""

import functools
import inspect
from typing import Dict, Tuple, Type

import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck
from compressai.layers import MaskedConv2d
from compressai.models import CompressionModel
from compressai.models.utils import remap_old_keys
from compressai.ops import compute_padding
from compressai.zoo.image import model_architectures
from compressai.zoo.image_vbr import model_architectures as vbr_architectures
from torch import Tensor, nn

from models.base import CodingPlan, LearnedCodec, check_image
from models.checkpoint import load_state_dict_into
from models.registry import register_model
from models.whole_image_memory import CodesWholeImages, check_whole_image_fits
from utils.coding.payload import (
    BitstreamError,
    CompressedImage,
    check_model,
    model_fingerprint,
)
from utils.coding.rans import safe_string
from utils.device import model_device
from utils.image_io import to_grayscale, to_uint8, to_unit_float

# CompressAI's eval_model pads every image to this multiple (six stride-2 stages).
EVAL_MODEL_MULTIPLE = 64


class ZooCodec(CodesWholeImages, LearnedCodec):
    """The codec contract over a CompressAI ``compress``/``decompress`` pair. The whole
    image is coded at once, so the plan's budget is checked against the image size
    first; patching does not apply."""

    rate_includes_container = False
    zoo_class: Type[nn.Module]  # the CompressAI class this one extends

    def __init_subclass__(cls, **kwargs):
        """Refuse at once a subclass that names no ``zoo_class``: its members read it,
        and would otherwise fail on first use with a misleading AttributeError."""
        super().__init_subclass__(**kwargs)
        if not isinstance(getattr(cls, "zoo_class", None), type):
            raise TypeError(
                f"{cls.__name__} must set zoo_class, the CompressAI class it "
                "extends (e.g. zoo_class = FactorizedPrior)"
            )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict loads (those of CompressAI's ``from_state_dict``) go through
        :func:`models.checkpoint.load_state_dict_into`, as every other architecture's:
        one line naming the missing, unexpected or mis-shaped entries instead of
        PyTorch's list of them, and weights refused when non-finite or of a dtype that
        cannot hold them, which CompressAI's own load casts and keeps. The entropy
        bottlenecks' names of CompressAI before 1.2 (``_matrix0``) are renamed first,
        as CompressAI's own load does. Other loads are CompressAI's (or, to assign
        the tensors, PyTorch's)."""
        for name, module in self.named_modules():
            if isinstance(module, EntropyBottleneck):
                state_dict = remap_old_keys(name, state_dict)
        if assign:
            return nn.Module.load_state_dict(self, state_dict, strict, assign)
        if not strict:
            return CompressionModel.load_state_dict(self, state_dict, strict)
        return load_state_dict_into(self, state_dict)

    def encode(self, image: Tensor, plan: CodingPlan) -> CompressedImage:
        """The rANS strings of ``compress`` on the zero-padded image; the plan's
        ``grayscale`` and budget apply, its patching does not (whole image)."""
        check_image(image, plan.grayscale)
        self.apply_masks()
        height, width = image.shape[1:]
        check_whole_image_fits(
            self,
            model_device(self),
            plan.budget_bytes,
            height,
            width,
            EVAL_MODEL_MULTIPLE,
        )
        padding, _ = compute_padding(height, width, min_div=EVAL_MODEL_MULTIPLE)
        left, right, top, bottom = padding
        x = F.pad(to_unit_float(image.to(model_device(self)))[None], padding)
        with torch.inference_mode():
            strings = self.compress(x)["strings"]
        return CompressedImage(
            height=height,
            width=width,
            pad_bottom=top + bottom,
            pad_right=left + right,
            architecture=self.registry_name,
            fingerprint=model_fingerprint(self),
            order="wavefront",
            grayscale=plan.grayscale,
            y_hat_crc=0,
            z_string=strings[1][0] if len(strings) > 1 else b"",
            y_string=strings[0][0],
        )

    def decode(self, payload: CompressedImage, plan: CodingPlan) -> Tensor:
        """``decompress`` of the strings, cropped back to the original size."""
        self.apply_masks()  # before the fingerprint, as when encoding
        check_model(payload, self)
        padded = (
            payload.height + payload.pad_bottom,
            payload.width + payload.pad_right,
        )
        if (
            padded[0] % EVAL_MODEL_MULTIPLE
            or padded[1] % EVAL_MODEL_MULTIPLE
            or max(payload.pad_bottom, payload.pad_right) >= EVAL_MODEL_MULTIPLE
        ):
            raise BitstreamError(
                f"inconsistent padding {payload.pad_bottom}/{payload.pad_right} "
                f"for a {payload.width}x{payload.height} image in the file header"
            )
        check_whole_image_fits(
            self,
            model_device(self),
            plan.budget_bytes,
            payload.height,
            payload.width,
            EVAL_MODEL_MULTIPLE,
        )
        y_channels, y_stride, z_channels, z_stride = self.latent_layout
        # decompress takes the shape of the deepest latent: z's, or y's
        # without a hyperprior.
        deepest = z_stride or y_stride
        shape = (padded[0] // deepest, padded[1] // deepest)
        y_symbols = y_channels * padded[0] * padded[1] // y_stride**2
        strings = [[safe_string(payload.y_string, y_symbols, "y")]]
        if bool(payload.z_string) != bool(z_stride):
            raise BitstreamError(
                f"{self.registry_name} {'has a' if z_stride else 'has no'} "
                f"hyperprior, but the file holds "
                f"{'a' if payload.z_string else 'no'} z string"
            )
        if payload.z_string:
            z_symbols = z_channels * padded[0] * padded[1] // z_stride**2
            strings.append([safe_string(payload.z_string, z_symbols, "z")])
        with torch.inference_mode():
            x_hat = self.decompress(strings, shape)["x_hat"]
        top, left = payload.pad_bottom // 2, payload.pad_right // 2
        image = to_uint8(
            x_hat[0, :, top : top + payload.height, left : left + payload.width]
        ).cpu()
        return to_grayscale(image) if payload.grayscale else image.contiguous()

    @functools.cached_property
    def latent_layout(self) -> Tuple[int, int, int, int]:
        """(channels, stride) of the latent y and of the hyperlatent z (0, 0 without an
        ``h_a``), measured once by running the transforms on a small zero image: they
        bound the symbols a string may hold (``safe_string``), whatever strides a
        subclass of a zoo class uses."""
        side = max(self.downsampling_factor, EVAL_MODEL_MULTIPLE)
        hyper_analysis = self._modules.get("h_a")
        with torch.no_grad():
            y = self.g_a(torch.zeros(1, 3, side, side, device=model_device(self)))
            z = hyper_analysis(y) if hyper_analysis is not None else None
        layout = (y.shape[1], side // y.shape[-1])
        return layout + ((z.shape[1], side // z.shape[-1]) if z is not None else (0, 0))

    @property
    def downsampling_factor(self) -> int:
        """The zoo class's own (this class comes first in the method resolution order,
        so the contract's abstract member would otherwise hide it)."""
        return self.zoo_class.downsampling_factor.fget(self)

    def apply_masks(self) -> None:
        """Zero the masked taps of CompressAI's ``MaskedConv2d`` weights, as its first
        forward call does in place: done up front, the weights (and so the checkpoint
        fingerprint in the files) are the same before and after coding."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, MaskedConv2d):
                    module.weight.mul_(module.mask)

    @property
    def config(self) -> dict:
        """N (and M where the class takes it), read back from the built model."""
        names = inspect.signature(self.zoo_class.__init__).parameters
        return {name: getattr(self, name) for name in ("N", "M") if name in names}


def _register(name: str, base: Type[nn.Module]) -> Type[ZooCodec]:
    """A registered contract class for the zoo class ``base``."""

    def from_state_dict(cls, state_dict):
        model = base.from_state_dict.__func__(cls, state_dict)
        model.apply_masks()
        model.update(force=True)
        return model

    cls = type(
        base.__name__,
        (ZooCodec, base),
        {
            "__doc__": f"CompressAI's ``{base.__name__}`` (zoo name ``{name}``) "
            "behind the codec contract.",
            "__module__": __name__,
            "zoo_class": base,
            "from_state_dict": classmethod(from_state_dict),
        },
    )
    return register_model(name)(cls)


# CompressAI's eval_model adds its variable-rate models to this same dict when it is
# imported; those take other constructor and compress arguments, so they are left out
# whatever was imported first.
ZOO: Dict[str, Type[ZooCodec]] = {
    name: _register(name, base)
    for name, base in model_architectures.items()
    if name not in vbr_architectures
}
