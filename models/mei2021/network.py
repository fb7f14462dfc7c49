"""Mei et al. 2021: scalable image coding with latent-feature reuse and prediction.

Y. Mei, L. Li, Z. Li, F. Li, "Learning-based scalable image compression with
latent-feature reuse and prediction", IEEE Transactions on Multimedia, 2021. A
PyTorch port of the authors' TensorFlow 1 code. The published training scripts do
not run as released (duplicated ``--lmbdaB`` flags, undefined names in the spatial
script, no padding of sizes that are not multiples of 64/128); the port follows
their evident intent and pads inputs in the codec.

L layers, each with its own analysis transform g_a^k. The base latent is coded
directly; an enhancement layer k codes only the residual between its latent and a
prediction P_k made from the *decoded* latents below it, and its synthesis g_s^k
reuses those latents. Every latent is coded with its own factorized prior
(CompressAI ``EntropyBottleneck``), one bitstream per layer, so a decoder can stop
after any layer (``models/mei2021/coding.py``).

.. code-block:: none

    quality: every layer sees the full image x
      y_B = g_a^B(x)                      f_B = y^_B
      y^_k = P_k(f_{k-1}) + Q(g_a^k(x) - P_k(f_{k-1}))        f_k = cat(f_{k-1}, y^_k)
      x^_k = g_s^k(f_k)                   (f_k: all decoded latents <= k, at H/16)

    spatial: layer k sees pyramid level x_k (H/4, H/2, H for 3 layers)
      y_B = g_a^B(x_B)                    z_B = y^_B                     (H/64)
      y^_k = P_k(z_{k-1}) + Q(g_a^k(x_k) - P_k(z_{k-1}))      P_k upsamples 2x
      z_k = cat(Up_k(z_{k-1}), y^_k)      x^_k = g_s^k(z_k)              (H/2^(L-1-k))

Q adds uniform noise in training and rounds around the entropy model's medians at
test time, so in eval mode ``forward`` reproduces the decoder's reconstructions.
Inputs to ``forward`` must have sides that are multiples of
:attr:`~_MeiScalable.downsampling_factor` (64 quality, 128 spatial with 3 layers);
the codec pads other sizes. The spatial model builds its input pyramid itself
from the full-resolution image (``models.mei2021.pyramid.image_pyramid``:
antialiased bicubic).

Training is joint and single-stage: one loss sums every layer's rate-distortion term
(:class:`models.mei2021.loss.ScalableRDLoss`), built by
:meth:`~_MeiScalable.default_loss` from the per-layer lambdas the model carries (a
buffer, so checkpoints remember what they were trained for).
"""

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from compressai.entropy_models import EntropyBottleneck
from compressai.models import CompressionModel
from torch import Tensor, nn

from models.base import CodingPlan, LearnedCodec
from models.checkpoint import load_state_dict_into
from models.mei2021 import coding
from models.mei2021.layers import (
    PredictionTransform,
    analysis_transform,
    synthesis_transform,
    up_transform,
)
from models.mei2021.loss import ScalableRDLoss
from models.mei2021.pyramid import image_pyramid, reference_pyramid
from models.registry import register_model
from models.whole_image_memory import CodesWholeImages

__all__ = ["Mei2021Quality", "Mei2021Spatial"]

# code(k, value, latent_size) -> (decoded value, likelihoods or None); see _run_layers.
LayerCoder = Callable[
    [int, Optional[Tensor], Tuple[int, int]], Tuple[Tensor, Optional[Tensor]]
]


def _check_lists(
    num_filters: Sequence[int], lmbdas: Sequence[float], N: Optional[int]
) -> None:
    if not isinstance(num_filters, (list, tuple)) or len(num_filters) < 2:
        raise ValueError(
            "num_filters must list the widths of at least 2 layers, "
            f"got {num_filters!r}"
        )
    for width in num_filters:
        if (
            not isinstance(width, int)
            or isinstance(width, bool)
            or not 1 <= width <= 1024
        ):
            raise ValueError(
                "num_filters entries must be integers in [1, 1024], "
                f"got {num_filters!r}"
            )
    if not isinstance(lmbdas, (list, tuple)) or len(lmbdas) != len(num_filters):
        raise ValueError(
            f"lmbdas must give one lambda per layer ({len(num_filters)}), "
            f"got {lmbdas!r}"
        )
    for lmbda in lmbdas:
        if (
            isinstance(lmbda, bool)
            or not isinstance(lmbda, (int, float))
            or not 0 < lmbda < math.inf
        ):
            raise ValueError(
                f"lmbdas entries must be positive finite numbers, got {lmbdas!r}"
            )
    if N is not None and N != num_filters[0]:
        raise ValueError(
            f"N={N} must equal the base-layer width num_filters[0]={num_filters[0]} "
            "(set train_params.N to it)"
        )


class _MeiScalable(CodesWholeImages, LearnedCodec, CompressionModel):
    """Parts shared by both modes; subclasses define the layer geometry and reuse.

    Args:
        num_filters: width N_k of every layer, base first.
        lmbdas: rate weight lambda_k of every layer (loss = sum lambda*R + 255^2*MSE).
        N: optional; the generic trainer passes ``train_params.N``, which must then
            equal ``num_filters[0]``.
    """

    upsampling_predictor = (
        False  # P_k keeps (quality) or doubles (spatial) the resolution
    )

    def __init__(
        self,
        num_filters: Sequence[int],
        lmbdas: Sequence[float],
        N: Optional[int] = None,
    ):
        super().__init__()
        _check_lists(num_filters, lmbdas, N)
        self.num_filters = tuple(num_filters)
        lmbdas = torch.tensor([float(v) for v in lmbdas], dtype=torch.float64)
        self.register_buffer("lmbdas", lmbdas)
        widths = self.num_filters
        self.g_a = nn.ModuleList(analysis_transform(n) for n in widths)
        # tfc 1.x filters.
        self.entropy_bottlenecks = nn.ModuleList(
            EntropyBottleneck(n, filters=(3, 3, 3)) for n in widths
        )
        feature = self.feature_channels
        self.predictors = nn.ModuleList(
            PredictionTransform(feature[k - 1], widths[k], self.upsampling_predictor)
            for k in range(1, len(widths))
        )
        self.g_s = nn.ModuleList(
            synthesis_transform(feature[k], widths[k]) for k in range(len(widths))
        )

    # geometry -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.num_filters)

    @property
    def feature_channels(self) -> List[int]:
        """Channels of the reused feature f_k (quality) / z_k (spatial)
        of each layer."""
        raise NotImplementedError

    def layer_scales(self) -> List[int]:
        """Downscaling factor of each layer's image w.r.t. the full image (1 = full)."""
        raise NotImplementedError

    def latent_size(self, k: int, height: int, width: int) -> Tuple[int, int]:
        """Latent size of layer ``k`` for a (padded) full-resolution
        ``height x width``."""
        step = 16 * self.layer_scales()[k]
        return height // step, width // step

    @property
    def config(self) -> dict:
        """Constructor arguments, stored in checkpoints and checked against files."""
        return {"num_filters": list(self.num_filters), "lmbdas": self.lmbdas.tolist()}

    def configured_state(self) -> Dict[str, Tensor]:
        """The per-layer lambdas: the loss this model trains with."""
        return {"lmbdas": self.lmbdas.detach().clone()}

    def default_loss(
        self, lmbda: Optional[float] = None, metric: str = "mse"
    ) -> ScalableRDLoss:
        """The joint loss of the paper with this model's own per-layer lambdas (the
        training config's single ``lmbda`` does not apply); MSE only."""
        if metric != "mse":
            raise ValueError(
                f"{self.registry_name} trains with MSE only, not {metric!r}"
            )
        return ScalableRDLoss(self.lmbdas.tolist(), cumulative=self.cumulative_rate)

    # the codec contract ---------------------------------------------------------------
    def encode(self, image: Tensor, plan: CodingPlan):
        """One stream per layer (the first ``plan.layers`` for > 0) in a
        ``.cpsl`` payload."""
        return coding.encode(self, image, plan)

    def decode(self, payload, plan: CodingPlan) -> Tensor:
        """Layer ``plan.layers`` (the top stored one for 0) of a ``.cpsl`` payload."""
        return coding.decode(self, payload, plan)

    @property
    def operating_points(self) -> int:
        """One per layer: point k decodes layers 0..k."""
        return self.num_layers

    def decoded_size(self, payload, plan: CodingPlan) -> tuple:
        """The size of layer ``plan.layers`` (the top stored one for 0)."""
        return coding.decoded_size(self, payload, plan)

    def reference_image(self, image: Tensor, point: int) -> Tensor:
        """The image itself for quality layers, its pyramid level for spatial ones."""
        if all(scale == 1 for scale in self.layer_scales()):
            return image
        return reference_pyramid(image, self.num_layers, self.downsampling_factor)[
            point
        ]

    # the layer loop -------------------------------------------------------------------
    def layer_inputs(self, x: Tensor) -> List[Tensor]:
        """The image each layer's g_a analyses, base first."""
        raise NotImplementedError

    def reuse(self, k: int, feature: Optional[Tensor], y_hat: Tensor) -> Tensor:
        """Feature of layer ``k`` from the one below and the layer's decoded latent."""
        raise NotImplementedError

    def check_size(self, height: int, width: int) -> None:
        factor = self.downsampling_factor
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(
                f"{type(self).__name__} needs sides that are multiples of {factor}, "
                f"got {height}x{width}; pad the image (the codec does)"
            )

    def _run_layers(
        self,
        inputs: Optional[List[Tensor]],
        code: LayerCoder,
        size: Tuple[int, int],
        upto: Optional[int] = None,
    ) -> dict:
        """Run layers 0..upto-1 with ``code`` doing the (real or simulated) coding.

        ``code(k, r, latent_size)`` receives the value to code (the base latent or a
        residual; ``None`` on the decoder, which has no input) and returns the
        decoded value and its likelihoods. Sharing this loop between ``forward``, the
        encoder and the decoder is what makes their predictions agree exactly.
        """
        upto = self.num_layers if upto is None else upto
        feature, out = (
            None,
            {"x_hat": [], "y_hat": [], "prediction": [], "likelihoods": []},
        )
        for k in range(upto):
            prediction = None if k == 0 else self.predictors[k - 1](feature)
            value = None
            if inputs is not None:
                value = self.g_a[k](inputs[k])
                value = value if prediction is None else value - prediction
            decoded, likelihoods = code(k, value, self.latent_size(k, *size))
            y_hat = decoded if prediction is None else prediction + decoded
            feature = self.reuse(k, feature, y_hat)
            out["x_hat"].append(self.g_s[k](feature))
            out["y_hat"].append(y_hat)
            out["prediction"].append(prediction)
            out["likelihoods"].append(likelihoods)
        return out

    def forward(self, x: Tensor) -> dict:
        """Training/validation pass over all layers.

        Args:
            x: (B, 3, H, W) in [0, 1], H and W multiples of :attr:`downsampling_factor`.

        Returns:
            ``x_hat``: the top layer's reconstruction (B, 3, H, W) (what the generic
            trainer shows); ``x_hats``: every layer's reconstruction, base first;
            ``targets``: the image each layer is compared with (x for quality, the
            pyramid levels for spatial); ``likelihoods``: ``{"yB", "r1", ...}`` of the
            base latent and of each residual, in layer order.
        """
        self.check_size(x.shape[-2], x.shape[-1])
        inputs = self.layer_inputs(x)

        def simulate(k, value, _size):
            return self.entropy_bottlenecks[k](value)

        out = self._run_layers(inputs, simulate, tuple(x.shape[-2:]))
        names = ["yB"] + [f"r{k}" for k in range(1, self.num_layers)]
        return {
            "x_hat": out["x_hat"][-1],
            "x_hats": out["x_hat"],
            "targets": inputs,
            "likelihoods": dict(zip(names, out["likelihoods"])),
        }

    @classmethod
    def from_state_dict(cls, state_dict):
        """Build a model whose widths and lambdas are read from the weights,
        then load them."""
        num_filters, k = [], 0
        while f"g_a.{k}.0.weight" in state_dict:
            num_filters.append(int(state_dict[f"g_a.{k}.0.weight"].size(0)))
            k += 1
        if "lmbdas" not in state_dict:
            raise KeyError("lmbdas")
        net = cls(num_filters=num_filters, lmbdas=state_dict["lmbdas"].tolist())
        load_state_dict_into(net, state_dict)
        return net


@register_model("mei2021-quality")
class Mei2021Quality(_MeiScalable):
    """Quality-scalable Mei et al. 2021: 4 layers at full resolution by default.

    Widths 96/120/144/196 and lambdas 250/100/50/25 (rate weights, distortion on the
    0-255 scale; CompressAI's lambda is 1/lambda_k). Rates are cumulative: the loss of
    layer k charges the bits of every layer <= k.
    """

    cumulative_rate = True

    def __init__(
        self,
        num_filters: Sequence[int] = (96, 120, 144, 196),
        lmbdas: Sequence[float] = (250.0, 100.0, 50.0, 25.0),
        N: Optional[int] = None,
    ):
        super().__init__(num_filters, lmbdas, N)

    @property
    def downsampling_factor(self) -> int:
        """16 in g_a times 4 in the predictor's hourglass."""
        return 64

    @property
    def feature_channels(self) -> List[int]:
        return [sum(self.num_filters[: k + 1]) for k in range(len(self.num_filters))]

    def layer_scales(self) -> List[int]:
        return [1] * self.num_layers

    def layer_inputs(self, x: Tensor) -> List[Tensor]:
        return [x] * self.num_layers

    def reuse(self, k: int, feature: Optional[Tensor], y_hat: Tensor) -> Tensor:
        return y_hat if feature is None else torch.cat([feature, y_hat], dim=1)


@register_model("mei2021-spatial")
class Mei2021Spatial(_MeiScalable):
    """Spatial-scalable Mei et al. 2021: 3 layers at H/4, H/2, H by default.

    Widths 96/96/96 and lambdas 400/300/200; the rate of layer k is normalised by
    that layer's own pixel count and is not cumulative. Layer k's feature is
    ``z_k = cat(Up_k(z_{k-1}), y^_k)``, so reuse reaches one level down.
    """

    cumulative_rate = False
    upsampling_predictor = True

    def __init__(
        self,
        num_filters: Sequence[int] = (96, 96, 96),
        lmbdas: Sequence[float] = (400.0, 300.0, 200.0),
        N: Optional[int] = None,
    ):
        super().__init__(num_filters, lmbdas, N)
        feature = self.feature_channels
        self.up = nn.ModuleList(
            up_transform(feature[k - 1], self.num_filters[k - 1])
            for k in range(1, self.num_layers)
        )

    @property
    def downsampling_factor(self) -> int:
        """The base latent (H / (16 * 2^(L-1))) must be even for the predictor."""
        return 32 * 2 ** (self.num_layers - 1)

    @property
    def feature_channels(self) -> List[int]:
        widths = self.num_filters
        return [widths[0]] + [widths[k - 1] + widths[k] for k in range(1, len(widths))]

    def layer_scales(self) -> List[int]:
        return [2 ** (self.num_layers - 1 - k) for k in range(self.num_layers)]

    def layer_inputs(self, x: Tensor) -> List[Tensor]:
        return image_pyramid(x, self.num_layers)

    def reuse(self, k: int, feature: Optional[Tensor], y_hat: Tensor) -> Tensor:
        if feature is None:
            return y_hat
        return torch.cat([self.up[k - 1](feature), y_hat], dim=1)
