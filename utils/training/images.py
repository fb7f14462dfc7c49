"""The images of a training run: the crop folders, their samplers and loaders."""

from functools import cached_property
from typing import Callable, Tuple

from torch.utils.data import DataLoader

from datasets import CropImageFolder, EpochSampler
from datasets.workers import GroupSafeDataLoader, leave_process_group, usable_workers
from utils.training.bad_images import UnusableImages
from utils.training.distributed import DistContext

__all__ = ["RunImages"]


class RunImages:
    """Random training crops and central validation crops of ``data_path``'s
    ``train/`` and ``test/``, split across the processes of a run.

    Args:
        data: the config's ``train_data`` block.
        params: the config's ``train_params`` block (crop size, seed).
        ctx: rank, world size and device of this process.
        log: prints a one-line message (rank 0's log).

    Raises:
        ValueError: a folder holds no usable image, or the training images give
            no full batch per process.
    """

    def __init__(self, data, params, ctx: DistContext, log: Callable[[str], None]):
        self.data, self.device = data, ctx.device
        self._log = log
        self.train_set, self.test_set = (
            CropImageFolder(
                data.data_path,
                split,
                params.crop_size,
                split == "train",
                data.small_images,
                data.max_image_pixels,
            )
            for split in ("train", "test")
        )
        splits = (("training", self.train_set), ("validation", self.test_set))
        for name, dataset in splits:
            if dataset.skipped:
                log(
                    f"skipped {dataset.skipped} {name} images smaller than "
                    f"{params.crop_size} px"
                )
        self.unusable = {
            name: UnusableImages(dataset, name, data.max_bad_fraction, log)
            for name, dataset in splits
        }
        self.train_sampler, self.test_sampler = (
            EpochSampler(
                len(dataset), params.seed, train, ctx.rank, ctx.world_size, pad=train
            )
            for dataset, train in ((self.train_set, True), (self.test_set, False))
        )
        self.steps_per_epoch = self.train_sampler.per_rank() // data.batch_size
        if self.steps_per_epoch == 0:
            processes = f"{ctx.world_size} process" + "es" * (ctx.world_size > 1)
            raise ValueError(
                f"{len(self.train_set)} training images give no full batch of "
                f"{data.batch_size} per process ({processes})"
            )

    @cached_property
    def workers(self) -> int:
        """Worker processes per loader (:func:`datasets.workers.usable_workers`),
        counted when the first loader is made: after the run's checks, so that a
        refused run prints its error alone."""
        return usable_workers(self.data.num_workers, self._log)

    def loaders(self) -> Tuple[DataLoader, DataLoader]:
        """New training and validation loaders; their workers start when iterated."""
        return (
            self.loader(self.train_set, self.train_sampler, self.data.batch_size, True),
            self.loader(
                self.test_set, self.test_sampler, self.data.test_batch_size, False
            ),
        )

    def loader(self, dataset, sampler, batch_size: int, train: bool) -> DataLoader:
        """A loader of ``dataset`` in ``sampler``'s order; training drops the last
        partial batch. Workers leave the process group, so that a stop signal to
        the group reaches the main process alone (``datasets/workers.py``)."""
        workers = self.workers
        return GroupSafeDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=workers,
            worker_init_fn=leave_process_group,
            pin_memory=self.data.pin_memory and self.device.type == "cuda",
            persistent_workers=self.data.persistent_workers and workers > 0,
        )
