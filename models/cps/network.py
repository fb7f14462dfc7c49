"""The CPS network (Zhang et al., "Continuous Patch Stitching for Block-wise Image
Compression", IEEE SPL 2025, Fig. 4).

A Minnen et al. (2018) joint autoregressive + hyperprior model whose transforms are
padding-free, so that patch-wise analysis and synthesis equal whole-image processing
(see ``utils/stitching/geometry.py`` for the geometry and ``utils/stitching/patches.py``
for the stitching):

.. code-block:: none

    g_a: EDRB(3,N) BRB EDRB BRB EDRB BRB conv2x2/2          x (H, W)  -> y (H/16, W/16)
    g_s: tconv2x2/2 BRB EURB BRB EURB BRB EURB(N,3)        y         -> x_hat
    h_a: conv2x2/2 LReLU conv2x2/2 LReLU conv1x1            y         -> z (H/64, W/64)
    h_s: tconv2x2/2 LReLU tconv2x2/2 (N->3N/2) LReLU conv1x1 (3N/2->2N)

The entropy-parameter network and both entropy models are CompressAI's
``JointAutoregressiveHierarchicalPriors`` ones (M = N). The context model is a 5x5
'A'-type masked convolution with the same parameter names, but it applies its mask
on the fly (:class:`~models.cps.layers.CausalConv2d`) instead of overwriting its
weights on the first call as CompressAI's ``MaskedConv2d`` does, so a model's
fingerprint does not change when it runs. Real bitstreams go through the codec
contract (:meth:`CPS.encode` / :meth:`CPS.decode`, implemented in
``models/cps/coding.py``); CompressAI's ``compress``/``decompress`` are refused.
"""

import functools

import torch
from compressai.models import JointAutoregressiveHierarchicalPriors
from torch import Tensor, nn

from models.base import CodingPlan, LearnedCodec
from models.checkpoint import load_state_dict_into
from models.cps import coding
from models.cps.layers import BRB, EDRB, EURB, CapturableEntropyBottleneck, CausalConv2d
from models.registry import register_model
from utils.stitching.geometry import model_geometry

# Kernel sizes of the bottleneck residual blocks: the paper's 3 and the ablation's 1.
BRB_KERNEL_SIZES = (1, 3)


@register_model("cps", "cps-v4")
class CPS(LearnedCodec, JointAutoregressiveHierarchicalPriors):
    """CPS model with ``N`` channels everywhere (the paper uses N = 192) and
    ``brb_kernel_size`` x ``brb_kernel_size`` kernels in its bottleneck residual
    blocks (3 in the paper; 1 is the BRB-kernel ablation of Table II).

    ``forward(x)`` returns ``{"x_hat", "likelihoods": {"y", "z"}}`` as every
    CompressAI model does, so the usual rate-distortion loss applies. Inputs must have
    sides that are multiples of :attr:`downsampling_factor` (64); :meth:`encode`
    takes any size.
    """

    supports_patches = True

    def __init__(self, N: int = 192, brb_kernel_size: int = 3):
        if brb_kernel_size not in BRB_KERNEL_SIZES:
            raise ValueError(
                f"brb_kernel_size must be one of {BRB_KERNEL_SIZES}, "
                f"got {brb_kernel_size!r}"
            )
        super().__init__(N=N, M=N)
        # Built on a side RNG and given the original's initial values, so that the
        # weights drawn below (and every seeded model) stay as they were.
        with torch.random.fork_rng(devices=[]):
            bottleneck = CapturableEntropyBottleneck(N)
        bottleneck.load_state_dict(self.entropy_bottleneck.state_dict())
        self.entropy_bottleneck = bottleneck
        self.brb_kernel_size = k = brb_kernel_size
        self.g_a = nn.Sequential(
            EDRB(3, N),
            BRB(N, N, k),
            EDRB(N, N),
            BRB(N, N, k),
            EDRB(N, N),
            BRB(N, N, k),
            nn.Conv2d(N, N, kernel_size=2, stride=2),
        )
        self.g_s = nn.Sequential(
            nn.ConvTranspose2d(N, N, kernel_size=2, stride=2),
            BRB(N, N, k),
            EURB(N, N),
            BRB(N, N, k),
            EURB(N, N),
            BRB(N, N, k),
            EURB(N, 3),
        )
        self.h_a = nn.Sequential(
            nn.Conv2d(N, N, kernel_size=2, stride=2),
            nn.LeakyReLU(inplace=True),
            nn.Conv2d(N, N, kernel_size=2, stride=2),
            nn.LeakyReLU(inplace=True),
            nn.Conv2d(N, N, kernel_size=1),
        )
        self.h_s = nn.Sequential(
            nn.ConvTranspose2d(N, N, kernel_size=2, stride=2),
            nn.LeakyReLU(inplace=True),
            nn.ConvTranspose2d(N, N * 3 // 2, kernel_size=2, stride=2),
            nn.LeakyReLU(inplace=True),
            nn.Conv2d(N * 3 // 2, N * 2, kernel_size=1),
        )
        self.context_prediction = CausalConv2d(
            N, 2 * N, kernel_size=5, padding=2, stride=1
        )

    @property
    def downsampling_factor(self) -> int:
        """Image sides must be multiples of this: the scale of g_a's geometry times
        what h_a shrinks the latent by (16 x 4 = 64 for the paper's network)."""
        return model_geometry(self).scale * self._hyper_stride

    @functools.cached_property
    def _hyper_stride(self) -> int:
        """How much ``h_a`` shrinks the latent, measured once on a zero latent: ``h_a``
        runs on the whole latent, never patch by patch, so unlike ``g_a`` it may pad,
        and its strides are all that count."""
        parameter = next(self.h_a.parameters())
        side = 64
        with torch.no_grad():
            z = self.h_a(parameter.new_zeros(1, self.M, side, side))
        return side // z.shape[-1]

    @property
    def config(self) -> dict:
        """Constructor arguments, stored in checkpoints and checked against files;
        ``brb_kernel_size`` only when it is not the paper's 3, so that the configs
        (and fingerprints) of earlier checkpoints are unchanged."""
        config = {"N": self.N}
        if self.brb_kernel_size != 3:
            config["brb_kernel_size"] = self.brb_kernel_size
        return config

    @classmethod
    def from_state_dict(cls, state_dict):
        """Build a model whose width N and BRB kernel are read from the weights,
        then load them."""
        net = cls(
            N=state_dict["g_a.0.conv1.weight"].size(0),
            brb_kernel_size=state_dict["g_a.1.conv1.weight"].size(-1),
        )
        load_state_dict_into(net, state_dict)
        return net

    def encode(self, image: Tensor, plan: CodingPlan):
        """POPS-coded ``.cps`` payload of a uint8 image (``models/cps/coding.py``)."""
        return coding.encode(self, image, plan)

    def decode(self, payload, plan: CodingPlan) -> Tensor:
        """The uint8 image of a payload written by this checkpoint."""
        return coding.decode(self, payload, plan)

    def measure_budget_costs(self, plan: CodingPlan) -> None:
        """Measure the transforms' working memory that the patch planner scales
        (``utils/stitching/planner.py``)."""
        coding.measure_budget_costs(self, plan)

    def compress(self, x, *args, **kwargs):
        """Refused: CPS codes through :meth:`encode`, whose files carry the POPS
        geometry's padding, the checkpoint fingerprint and the latent CRC."""
        raise NotImplementedError(
            "CPS does not use CompressAI's compress(); call "
            "model.encode(image_uint8, CodingPlan()) instead"
        )

    def decompress(self, *args, **kwargs):
        """Refused, as :meth:`compress`."""
        raise NotImplementedError(
            "CPS does not use CompressAI's decompress(); call "
            "model.decode(payload, CodingPlan()) instead"
        )
