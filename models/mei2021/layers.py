"""Building blocks of Mei et al. 2021 (see ``models/mei2021/network.py``), ported
from TF1.

tensorflow-compression's
``SignalConv2D(5, corr=True, strides_down=s, padding="same_zeros")`` is CompressAI's
``conv(cin, cout, 5, s)`` and its transposed counterpart (``strides_up=s``) is
``deconv(cin, cout, 5, s)``: padding 2 and, for stride 2, ``output_padding=1`` give
the same "same" geometry (a side ``n`` maps to ``n/s`` and back to ``n*s``).
``tfc.GDN`` is CompressAI's :class:`~compressai.layers.GDN` with the same
reparametrisation. A stride-1 transposed convolution is built with
``deconv(..., stride=1)``, which sets padding 2 and no output padding.
"""

from compressai.layers import GDN
from compressai.models.utils import conv, deconv
from torch import Tensor, nn

__all__ = [
    "analysis_transform",
    "synthesis_transform",
    "PredictionTransform",
    "up_transform",
]


def analysis_transform(N: int) -> nn.Sequential:
    """g_a: RGB (3, H, W) -> latent (N, H/16, W/16); four stride-2 5x5 convolutions."""
    return nn.Sequential(
        conv(3, N, 5, 2),
        GDN(N),
        conv(N, N, 5, 2),
        GDN(N),
        conv(N, N, 5, 2),
        GDN(N),
        conv(N, N, 5, 2),
    )


def synthesis_transform(in_channels: int, N: int) -> nn.Sequential:
    """g_s: (in_channels, h, w) -> RGB (3, 16h, 16w); ``N`` is the hidden width.

    ``in_channels`` is the width of whatever latents the layer reuses: e.g. 96 + 120 =
    216 for the first quality enhancement layer (base and first enhancement latents).
    """
    return nn.Sequential(
        deconv(in_channels, N, 5, 2),
        GDN(N, inverse=True),
        deconv(N, N, 5, 2),
        GDN(N, inverse=True),
        deconv(N, N, 5, 2),
        GDN(N, inverse=True),
        deconv(N, 3, 5, 2),
    )


def up_transform(in_channels: int, N: int) -> nn.Sequential:
    """Up: a purely linear learned 2x upsampler of latent features (no activation).

    Used by the spatial model to carry the lower layer's features to the next
    resolution: TConv(5, 2) -> TConv(5, 1) -> TConv(5, 1), all with ``N`` outputs.
    """
    return nn.Sequential(
        deconv(in_channels, N, 5, 2),
        deconv(N, N, 5, 1),
        deconv(N, N, 5, 1),
    )


class PredictionTransform(nn.Module):
    """P(F, N): predicts a layer's latent from the decoded latents of the layers below.

    An hourglass with two plain-sum skips (x4 + x2, then x6 + x4 + x2)::

        x1 = GDN(Conv5/2 -> F (c))          # c: (F, h, w)
        x2 = GDN(Conv5/s1 -> N (x1))        # quality s1 = 2 (h/4), spatial s1 = 1 (h/2)
        x3 = GDN(Conv5/1 -> N (x2));  x4 = Conv5/1 -> N (x3)
        x5 = GDN(Conv5/1 -> N (x4 + x2)); x6 = Conv5/1 -> N (x5)
        x7 = IGDN(TConv5/2 -> N (x6 + x4 + x2));  out = TConv5/2 -> N (x7)

    With ``upsample=False`` (quality) the output has the input's resolution h x w; with
    ``upsample=True`` (spatial) it has 2h x 2w, the resolution of the next layer.

    Args:
        in_channels: F, the channel count of the concatenated lower latents.
        N: width of the predicted latent.
        upsample: spatial-model variant (second convolution at stride 1).
    """

    def __init__(self, in_channels: int, N: int, upsample: bool):
        super().__init__()
        self.conv1 = conv(in_channels, in_channels, 5, 2)
        self.gdn1 = GDN(in_channels)
        self.conv2 = conv(in_channels, N, 5, 1 if upsample else 2)
        self.gdn2 = GDN(N)
        self.conv3 = conv(N, N, 5, 1)
        self.gdn3 = GDN(N)
        self.conv4 = conv(N, N, 5, 1)
        self.conv5 = conv(N, N, 5, 1)
        self.gdn5 = GDN(N)
        self.conv6 = conv(N, N, 5, 1)
        self.deconv7 = deconv(N, N, 5, 2)
        self.igdn7 = GDN(N, inverse=True)
        self.deconv8 = deconv(N, N, 5, 2)

    def forward(self, c: Tensor) -> Tensor:
        x2 = self.gdn2(self.conv2(self.gdn1(self.conv1(c))))
        x4 = self.conv4(self.gdn3(self.conv3(x2)))
        x6 = self.conv6(self.gdn5(self.conv5(x4 + x2)))
        return self.deconv8(self.igdn7(self.deconv7(x6 + x4 + x2)))
