"""A DistributedSampler whose data order is a pure function of (seed, epoch, rank).

It is a ``torch.utils.data.DistributedSampler`` (each rank takes every
``world_size``-th entry of a permutation seeded by the run's seed and the epoch)
with the two things exact resumption needs:

* every index comes with a ``crop_seed`` drawn from the same generator, so the
  dataset's random crop does not depend on any process-global RNG state
  (see :mod:`datasets.image_folder`);
* :meth:`EpochSampler.set_epoch` takes ``start``, the number of samples this rank
  has already consumed in the epoch, so a run resumed mid-epoch continues with the
  very next batch instead of replaying the epoch.

For training (``pad=True``) the permutation is padded by wrapping around, as
``DistributedSampler`` does, so every rank gets the same number of samples and the
ranks' step counts stay in lock step; for validation (``pad=False``) nothing is
repeated and the ranks' sums add up to exactly one pass over the data.
"""

from typing import Iterator, Tuple

import torch
from torch.utils.data import DistributedSampler

__all__ = ["EpochSampler", "epoch_seed", "SEED_STRIDE"]

# A prime above any plausible epoch count or dataset size, so that seeds mixed with it
# stay distinct (``seed + epoch`` would give seed 1 at epoch 0 the draws of seed 0 at
# epoch 1).
SEED_STRIDE = 1_000_003


def epoch_seed(seed: int, epoch: int) -> int:
    """Generator seed of epoch ``epoch`` of a run seeded with ``seed``.

    Reduced to 63 bits: any config seed (up to 2**63 - 1) is a valid generator seed,
    and smaller mixes, those of every seed below 9 * 10**12, keep their value.
    """
    return (seed * SEED_STRIDE + epoch) % (2**63 - 1)


class EpochSampler(DistributedSampler):
    """Yields ``(index, crop_seed)`` pairs for one rank of one epoch.

    Args:
        num_samples: size of the dataset.
        seed: base seed of the run.
        shuffle: random permutation (training) or dataset order (validation).
        rank, world_size: this process's share of the data.
        pad: repeat samples so that all ranks get the same count.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ):
        if num_samples <= 0:
            raise ValueError(
                f"EpochSampler needs at least one sample, got {num_samples}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        # The base class only needs len(dataset); rank, num_replicas, shuffle, seed
        # and epoch keep its meaning, and num_samples/total_size are set to ours.
        super().__init__(
            range(num_samples),
            num_replicas=world_size,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
        self.dataset_size = num_samples
        self.pad = pad
        self.start = 0
        self.num_samples = self.per_rank()
        self.total_size = self.num_samples * world_size if pad else num_samples

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select ``epoch`` and skip this rank's first ``start`` samples of it."""
        if not 0 <= start <= self.per_rank():
            raise ValueError(
                f"cannot start at sample {start} of an epoch of {self.per_rank()}"
            )
        self.epoch = epoch
        self.start = start

    def per_rank(self) -> int:
        """Samples this rank sees in a full epoch."""
        if self.pad:
            return -(-self.dataset_size // self.num_replicas)
        return len(range(self.rank, self.dataset_size, self.num_replicas))

    def __len__(self) -> int:
        return self.per_rank() - self.start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.shuffle:
            order = torch.randperm(self.dataset_size, generator=g)
        else:
            order = torch.arange(self.dataset_size)
        crop_seeds = torch.randint(2**62, (self.dataset_size,), generator=g)
        if self.pad:
            total = self.per_rank() * self.num_replicas
            order = order.repeat(-(-total // self.dataset_size))[:total]
        mine = order[self.rank :: self.num_replicas][self.start :]
        for index in mine.tolist():
            yield index, int(crop_seeds[index])
