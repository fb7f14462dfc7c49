"""Kamisli's learned block-based codec (F. Kamisli, "End-to-end learned block-based
image compression with block-level masked convolutions and asymptotic closed-loop
training", Multimedia Tools and Applications, 2024), network version "v9" of the
authors' code.

The image is cut into B x B blocks, each a position of a coarse grid with 3B^2
channels (``models/kamisli2024/layers.py``). Every network works on that grid with
block-level masks, so a block is coded from the *reconstructed* blocks before it
(up-left, up, up-right, left): no hyperprior, no intra-prediction or deblocking net.

.. code-block:: none

    x, z_hat in [-0.5, 0.5] as block grids (3B^2, H/B, W/B);
            z_hat = reconstructed neighbours
    y     = g_a( g_a_source(x) + g_a_context(z_hat) )           1x1 + masked A KxK, then
            GDN, 1x1 (N -> 7N/8), GDN, 1x1 (-> 6N/8), GDN, 1x1 (-> M)
    psi   = entropy_parameters(z_hat)                           masked A K1 -> 12N/8,
            LReLU, masked B K2 -> 10N/8, LReLU, 1x1 -> 8N/8, LReLU, 1x1 -> 2M;
            scales, means = split
    y_hat = round(y - means) + means (noise in training)        GaussianConditional
    x_hat = g_s( g_s_latent(y_hat) + g_s_context(z_hat) )       mirror of g_a with
                                                                IGDN -> 3B^2

Training is open loop: ``forward(x, x_ctx)`` takes the neighbour context ``x_ctx``
from outside, ``x`` itself by default (iteration 0 of the asymptotic closed-loop
procedure, ``utils/training/acl.py``). Real coding is closed loop and sequential over
blocks; ``compress``/``decompress`` (``models/kamisli2024/codec.py``) run it
wavefront by wavefront (``models/kamisli2024/coding.py``). Images and reconstructions
are in [0, 1] at the interface, as for every CompressAI model; internally samples are
shifted to [-0.5, 0.5] so that the zero padding of the masked convolutions (frame
border, blocks not decoded yet) means mid-grey.
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from compressai.entropy_models import GaussianConditional
from compressai.layers import GDN
from compressai.models import CompressionModel
from torch import Tensor, nn

from models.base import ClosedLoopTrainable, CodingPlan, LearnedCodec
from models.checkpoint import load_state_dict_into
from models.kamisli2024 import codec
from models.kamisli2024.coding import BlockPayload
from models.kamisli2024.layers import (
    BlockMaskedConv2d,
    from_blocks,
    network_reach,
    to_blocks,
)
from models.kamisli2024.published import (
    check_authors_masks,
    is_authors_layout,
    split_authors_state_dict,
)
from models.registry import register_model
from models.whole_image_memory import CodesWholeImages
from utils.coding.payload import CompressedImage
from utils.coding.scan_order import wavefront_slope


def _masked_or_plain(
    kind: str, in_channels: int, out_channels: int, kernel_size: int
) -> nn.Conv2d:
    """A 1x1 kind-B masked convolution is a plain 1x1 convolution."""
    if kernel_size == 1 and kind == "B":
        return nn.Conv2d(in_channels, out_channels, 1)
    return BlockMaskedConv2d(kind, in_channels, out_channels, kernel_size)


def _check_arguments(
    block_size: int, N: int, M: int, kernel_sizes: Sequence[int]
) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not isinstance(N, int) or N < 8 or N % 8:
        raise ValueError(
            f"N must be a positive multiple of 8 (widths 7N/8, 6N/8, ...), got {N!r}"
        )
    if not isinstance(M, int) or M < 1:
        raise ValueError(f"M must be a positive integer, got {M!r}")
    if len(kernel_sizes) != 4 or any(not isinstance(k, int) for k in kernel_sizes):
        raise ValueError(
            f"kernel_sizes must be 4 integers like [3, 1, 1, 1], got {kernel_sizes!r}"
        )
    if (
        kernel_sizes[0] < 3
        or kernel_sizes[0] % 2 == 0
        or kernel_sizes[1] < 1
        or kernel_sizes[1] % 2 == 0
    ):
        raise ValueError(
            f"kernel_sizes[0] must be odd and >= 3, kernel_sizes[1] odd, "
            f"got {kernel_sizes!r}"
        )
    if tuple(kernel_sizes[2:]) != (1, 1):
        raise ValueError(
            f"the v9 network uses 1x1 layers after the second; kernel_sizes[2:] must "
            f"be [1, 1], got {list(kernel_sizes[2:])}"
        )


def _split_tiles(x: Tensor, rows: int, cols: int) -> Tensor:
    """(N, C, H, W) -> (N*rows*cols, C, H/rows, W/cols), tiles in raster order."""
    n, c, height, width = x.shape
    x = x.reshape(n, c, rows, height // rows, cols, width // cols).permute(
        0, 2, 4, 1, 3, 5
    )
    return x.reshape(n * rows * cols, c, height // rows, width // cols)


def _join_tiles(x: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of :func:`_split_tiles`."""
    c, tile_height, tile_width = x.shape[1:]
    x = x.reshape(-1, rows, cols, c, tile_height, tile_width).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(-1, c, rows * tile_height, cols * tile_width)


@register_model("kamisli2024", "lbbic")
class Kamisli2024(
    CodesWholeImages, LearnedCodec, ClosedLoopTrainable, CompressionModel
):
    """Block-based codec with block-level masked convolutions.

    Args:
        block_size: B, the block side in pixels (4, 8 or 16 in the paper).
        N: width of the first autoencoder layer (a multiple of 8).
        M: latent channels per block.
        kernel_sizes: the authors' ``KS`` list; ``KS[0]`` is the masked kernel that
            reads neighbour blocks, ``KS[1]`` the entropy network's second kernel,
            ``KS[2:]`` must be 1 (v9 uses 1x1 layers there).
    """

    def __init__(
        self,
        block_size: int = 8,
        N: int = 768,
        M: int = 96,
        kernel_sizes: Sequence[int] = (3, 1, 1, 1),
    ):
        _check_arguments(block_size, N, M, kernel_sizes)
        super().__init__()
        self.block_size, self.N, self.M = block_size, N, M
        self.kernel_sizes = tuple(kernel_sizes)
        channels = self.block_channels
        k1, k2 = kernel_sizes[0], kernel_sizes[1]
        c1, c2, c3 = N, N // 8 * 7, N // 8 * 6
        e1, e2, e3 = N // 8 * 12, N // 8 * 10, N // 8 * 8

        self.g_a_source = nn.Conv2d(channels, c1, 1)
        self.g_a_context = BlockMaskedConv2d("A", channels, c1, k1)
        self.g_a = nn.Sequential(
            GDN(c1),
            nn.Conv2d(c1, c2, 1),
            GDN(c2),
            nn.Conv2d(c2, c3, 1),
            GDN(c3),
            nn.Conv2d(c3, M, 1),
        )
        self.g_s_latent = nn.Conv2d(M, c1, 1)
        self.g_s_context = BlockMaskedConv2d("A", channels, c1, k1)
        self.g_s = nn.Sequential(
            GDN(c1, inverse=True),
            nn.Conv2d(c1, c2, 1),
            GDN(c2, inverse=True),
            nn.Conv2d(c2, c3, 1),
            GDN(c3, inverse=True),
            nn.Conv2d(c3, channels, 1),
        )
        self.entropy_parameters = nn.Sequential(
            BlockMaskedConv2d("A", channels, e1, k1),
            nn.LeakyReLU(),
            _masked_or_plain("B", e1, e2, k2),
            nn.LeakyReLU(),
            nn.Conv2d(e2, e3, 1),
            nn.LeakyReLU(),
            nn.Conv2d(e3, 2 * M, 1),
        )
        self.gaussian_conditional = GaussianConditional(None)

    @property
    def block_channels(self) -> int:
        """Channels of one block: 3 B^2 samples."""
        return 3 * self.block_size**2

    @property
    def downsampling_factor(self) -> int:
        """Image sides are padded (replicating the border) to multiples of this."""
        return self.block_size

    @property
    def config(self) -> dict:
        """Constructor arguments, stored in checkpoints."""
        return {
            "block_size": self.block_size,
            "N": self.N,
            "M": self.M,
            "kernel_sizes": list(self.kernel_sizes),
        }

    def context_reach(self) -> set:
        """Block offsets (di, dj) of z_hat that a block's scales, means, latent or
        reconstruction depend on, composed from the masks of every network."""
        reach = network_reach(self.entropy_parameters)
        for context, layers in (
            (self.g_a_context, self.g_a),
            (self.g_s_context, self.g_s),
        ):
            reach |= network_reach([context, *layers])
        return reach

    @property
    def wavefront_slope(self) -> int:
        """Smallest ``a`` such that every offset in :meth:`context_reach` has
        ``a*di + dj < 0``: blocks with equal ``a*i + j`` are independent."""
        return wavefront_slope(sorted(self.context_reach()))

    def grid_size(self, height: int, width: int) -> tuple:
        """Block rows and columns of an image after padding."""
        return math.ceil(height / self.block_size), math.ceil(width / self.block_size)

    def pad_to_blocks(self, x: Tensor) -> Tensor:
        """Pad (replicating the border) to whole blocks: see :meth:`grid_size`."""
        rows, cols = self.grid_size(*x.shape[-2:])
        bottom = rows * self.block_size - x.shape[-2]
        right = cols * self.block_size - x.shape[-1]
        return (
            F.pad(x, (0, right, 0, bottom), mode="replicate") if bottom or right else x
        )

    def forward(self, x: Tensor, x_ctx: Tensor = None) -> dict:
        """Open-loop pass: every block sees ``x_ctx``'s blocks as its
        reconstructed neighbours.

        Args:
            x: images (N, 3, H, W) in [0, 1], any size (padded internally).
            x_ctx: neighbour context of the same shape in [0, 1]; ``x`` if omitted.

        Returns:
            ``{"x_hat": (N, 3, H, W) unclamped,
            "likelihoods": {"y": (N, M, H/B, W/B)}}``.
        """
        if x_ctx is None:
            x_ctx = x
        elif x_ctx.shape != x.shape:
            raise ValueError(
                f"context shape {tuple(x_ctx.shape)} differs from image shape "
                f"{tuple(x.shape)}"
            )
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected RGB images (N, 3, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        blocks = to_blocks(self.pad_to_blocks(x) - 0.5, self.block_size)
        context = to_blocks(self.pad_to_blocks(x_ctx) - 0.5, self.block_size)
        y = self.g_a(self.g_a_source(blocks) + self.g_a_context(context))
        scales, means = self.entropy_parameters(context).chunk(2, dim=1)
        y_hat, y_likelihoods = self.gaussian_conditional(y, scales, means)
        x_hat = self.g_s(self.g_s_latent(y_hat) + self.g_s_context(context))
        x_hat = from_blocks(x_hat, self.block_size)[:, :, :height, :width] + 0.5
        return {"x_hat": x_hat, "likelihoods": {"y": y_likelihoods}}

    @torch.no_grad()
    def closed_loop(
        self, x: Tensor, tile_blocks: int = 0, context_bits: Optional[int] = None
    ) -> dict:
        """Closed-loop reconstruction of ``x`` (1, 3, H, W) by repeated
        open-loop passes.

        What the codec computes, without a bitstream: every block sees the
        reconstructions of the blocks before it. Blocks of one wavefront only depend on
        earlier fronts, so one eval-mode pass per front, writing that front's clamped
        output into the context, gives the same result as the authors' pass per block;
        the last pass holds every block's reconstruction and likelihoods.

        Args:
            tile_blocks: cut the grid into tiles of this many blocks a side, coded as
                one batch with mid-grey context outside each tile (the authors'
                closed-loop validation uses 16); 0 codes the whole image.
            context_bits: round the context written back to this many bits (the
                authors' validation uses 8); None keeps floats, as the codec does.

        Returns ``{"x_hat": (1, 3, H, W) clamped, "likelihoods": {"y": (1, M, R, K)}}``.
        """
        was_training = self.training
        self.eval()
        height, width = x.shape[-2:]
        grid = self.grid_size(height, width)
        tile = [tile_blocks or size for size in grid]
        tiles = [math.ceil(size / t) for size, t in zip(grid, tile)]
        sides = [count * t * self.block_size for count, t in zip(tiles, tile)]
        padded = F.pad(x, (0, sides[1] - width, 0, sides[0] - height), mode="replicate")
        x_tiles = _split_tiles(padded, *tiles)
        context = torch.full_like(x_tiles, 0.5)
        fronts = self.wavefront_slope * torch.arange(tile[0])[:, None] + torch.arange(
            tile[1]
        )
        fronts = fronts.repeat_interleave(self.block_size, 0).repeat_interleave(
            self.block_size, 1
        )
        fronts = fronts.to(x.device)
        for t in range(int(fronts.max()) + 1):
            out = self(x_tiles, context)
            written = out["x_hat"].clamp(0, 1)
            if context_bits:
                levels = 2**context_bits - 1
                written = written.mul(levels).round_().div_(levels)
            context = torch.where(fronts == t, written, context)
        self.train(was_training)
        x_hat = _join_tiles(out["x_hat"].clamp(0, 1), *tiles)[:, :, :height, :width]
        likelihoods = _join_tiles(out["likelihoods"]["y"], *tiles)[
            :, :, : grid[0], : grid[1]
        ]
        return {"x_hat": x_hat, "likelihoods": {"y": likelihoods}}

    # the codec contract ---------------------------------------------------------------
    def compress(self, x: Tensor, order: str = "wavefront") -> BlockPayload:
        """Code one image (1, 3, H, W) in [0, 1] into a :class:`BlockPayload`
        (:func:`models.kamisli2024.codec.compress`)."""
        return codec.compress(self, x, order)

    def decompress(self, payload: BlockPayload) -> dict:
        """``{"x_hat": (1, 3, H, W) in [0, 1] on the CPU}`` of a payload
        (:func:`models.kamisli2024.codec.decompress`)."""
        return codec.decompress(self, payload)

    def encode(self, image: Tensor, plan: CodingPlan) -> CompressedImage:
        """A uint8 image (3, H, W) in the ``.cps`` container
        (:func:`models.kamisli2024.codec.encode`)."""
        return codec.encode(self, image, plan)

    def decode(self, payload: CompressedImage, plan: CodingPlan) -> Tensor:
        """The uint8 image of an :meth:`encode` payload
        (:func:`models.kamisli2024.codec.decode`)."""
        return codec.decode(self, payload, plan)

    @classmethod
    def holds_published_weights(cls, state_dict) -> bool:
        """The authors' files use their module names (``prtr_forward1``, ...)."""
        return is_authors_layout(state_dict)

    @classmethod
    def from_state_dict(cls, state_dict):
        """Build the model whose sizes are read from the weights, then load them.

        Accepts our layout and the authors' published one (their module names, see
        :mod:`models.kamisli2024.published`)."""
        masks = {}
        if is_authors_layout(state_dict):
            state_dict, masks = split_authors_state_dict(state_dict)
        source = state_dict["g_a_source.weight"]
        block_size = math.isqrt(source.shape[1] // 3)
        kernel_sizes = [
            state_dict["g_a_context.weight"].shape[-1],
            state_dict["entropy_parameters.2.weight"].shape[-1],
            1,
            1,
        ]
        net = cls(
            block_size=block_size,
            N=source.shape[0],
            M=state_dict["g_a.5.weight"].shape[0],
            kernel_sizes=kernel_sizes,
        )
        check_authors_masks(net, masks)
        load_state_dict_into(net, state_dict)
        return net
