"""Counting the unusable images a training run meets, and when to give up.

:class:`datasets.CropImageFolder` replaces an image it cannot use by the next one and
reports the indices it skipped with every sample (see its docstring). This tracker
turns those reports into one warning per image, a running count, and a one-line
error once more than ``train_data.max_bad_fraction`` of a split has proved unusable:
a few broken files in a large folder are noise, many mean a wrong or damaged folder.
"""

import os
from typing import Callable, List, Optional, Sequence, Set

from torch import Tensor

from datasets import CropImageFolder
from datasets.image_folder import UnreadableImage, open_rgb

__all__ = ["UnusableImages", "usable_images"]


class TooManyUnusableImages(RuntimeError):
    """More than ``train_data.max_bad_fraction`` of a split has proved unusable."""


class UnusableImages:
    """The unusable images of one split seen so far (by this process).

    Args:
        dataset: the split's dataset.
        split: ``"training"`` or ``"validation"``, for messages.
        max_fraction: stop when more than this fraction of the split is unusable.
        log: prints one line (rank 0 only in the trainer).
    """

    def __init__(
        self,
        dataset: CropImageFolder,
        split: str,
        max_fraction: float,
        log: Callable[[str], None],
    ):
        self.dataset, self.split, self.max_fraction, self.log = (
            dataset,
            split,
            max_fraction,
            log,
        )
        self.seen: Set[str] = set()
        for path, reason in dataset.unusable:  # found while listing the folder
            self._add(str(path), reason)

    @property
    def count(self) -> int:
        return len(self.seen)

    def note(self, skipped: Tensor) -> None:
        """Record a batch's ``skipped`` indices (``-1``: none); raise past the limit."""
        for index in skipped[skipped >= 0].unique().tolist():
            path = str(self.dataset.samples[index])
            if path not in self.seen:
                self._add(path, self.dataset.why_unusable(index))

    def _add(self, path: str, reason: str) -> None:
        self.seen.add(path)
        total = self.dataset.total
        self.log(
            f"warning: skipping {self.split} image {path} ({reason}); "
            f"{self.count} of {total} unusable so far"
        )
        if self.count > self.max_fraction * total:
            raise TooManyUnusableImages(
                f"{self.count} of {total} {self.split} images are unusable, more than "
                f"train_data.max_bad_fraction={self.max_fraction:g}; the last: {path} "
                f"({reason}); repair the folder or raise train_data.max_bad_fraction"
            )


def usable_images(
    paths: Sequence[str],
    split: str,
    max_fraction: float,
    max_pixels: Optional[int],
    log: Callable[[str], None],
) -> List[str]:
    """The images of ``paths`` that decode, checked once up front (for the ACL
    runs, whose originals and context images must stay paired): one warning per
    unusable image, and a one-line error past ``max_fraction`` of them, as
    :class:`UnusableImages`, or when none is usable (``max_fraction`` 1 allows them
    all, and an epoch or a validation of no image would divide by zero)."""
    kept, unusable = [], 0
    for path in paths:
        try:
            open_rgb(path, max_pixels, read_whole=True).close()
        except UnreadableImage as exc:
            unusable += 1
            log(
                f"warning: skipping {split} image {path} ({exc}); {unusable} of "
                f"{len(paths)} unusable so far"
            )
            if unusable > max_fraction * len(paths):
                raise RuntimeError(
                    f"{unusable} of {len(paths)} {split} images are unusable, more "
                    f"than train_data.max_bad_fraction={max_fraction:g}; the last: "
                    f"{path} ({exc}); repair the folder or raise "
                    f"train_data.max_bad_fraction"
                ) from None
            continue
        kept.append(path)
    if not kept:
        raise RuntimeError(
            f"none of the {len(paths)} {split} images in "
            f"{os.path.dirname(paths[0])} is usable; repair the folder or add images"
        )
    return kept
