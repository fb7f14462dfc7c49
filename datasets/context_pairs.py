"""Training pairs for asymptotic closed-loop training (``utils/training/acl.py``).

Each sample is an original image x and the neighbour-context image z the model
reads its blocks' neighbours from: z = x at ACL iteration 0, the previous
iteration's reconstructions afterwards. Crops start on the block grid (a context
block stays a block the model reconstructed) and flips apply to x and z together.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datasets.sampler import SEED_STRIDE, epoch_seed
from utils.image_io import read_image, to_unit_float

__all__ = ["ContextPairs"]


class ContextPairs(Dataset):
    """(x, z) pairs in [0, 1]: an original and its neighbour-context image.

    Args:
        originals: image paths.
        contexts: same-size context images, one per original; ``None`` gives z = x.
        crop: training crop side (a multiple of the block size); 0 keeps whole images.
        block_size: crops start on the block grid, so a context block stays the block
            the model reconstructed.
        seed: crops and flips (applied to x and z together) of item ``i`` in epoch
            ``e`` come from ``(seed, e, i)`` only (:meth:`set_epoch`), each triple
            its own generator seed.
    """

    def __init__(
        self,
        originals: Sequence[str],
        contexts: Optional[Sequence[str]],
        crop: int,
        block_size: int,
        seed: int = 0,
    ):
        if contexts is not None and len(contexts) != len(originals):
            raise ValueError(
                f"{len(contexts)} context images for {len(originals)} originals"
            )
        if crop % block_size:
            raise ValueError(
                f"crop {crop} is not a multiple of the block size {block_size}"
            )
        self.originals, self.contexts = list(originals), contexts
        self.crop, self.block_size, self.seed, self.epoch = crop, block_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.originals)

    def __getitem__(self, index: int):
        x = to_unit_float(read_image(self.originals[index])[0])
        z = (
            x
            if self.contexts is None
            else to_unit_float(read_image(self.contexts[index])[0])
        )
        if z.shape != x.shape:
            raise ValueError(
                f"context {self.contexts[index]} has size {tuple(z.shape[1:])}, "
                f"its original {tuple(x.shape[1:])}"
            )
        if not self.crop:
            return x, z
        pair = torch.cat((x, z))
        short = (max(0, self.crop - pair.shape[1]), max(0, self.crop - pair.shape[2]))
        if any(short):  # small images: replicate the edge, as CropImageFolder does
            pair = F.pad(pair[None], (0, short[1], 0, short[0]), mode="replicate")[0]
        g = torch.Generator().manual_seed(
            (epoch_seed(self.seed, self.epoch) * SEED_STRIDE + index) % (2**63 - 1)
        )
        top, left = (
            (
                int(
                    torch.randint(
                        (size - self.crop) // self.block_size + 1, (1,), generator=g
                    )
                )
                * self.block_size
            )
            for size in pair.shape[1:]
        )
        pair = pair[:, top : top + self.crop, left : left + self.crop]
        flips = torch.rand(2, generator=g) < 0.5
        if flips[0]:
            pair = pair.flip(2)
        if flips[1]:
            pair = pair.flip(1)
        return pair[:3], pair[3:]
