"""Square crops from a CompressAI ``ImageFolder`` whose randomness comes from the sampler.

Training takes random ``crop x crop`` crops, validation centre crops (the CPS
authors' recipe, ``RandomCrop(256)`` / ``CenterCrop(256)``). Two differences:

* An image smaller than the crop is either padded by edge replication
  (``small_images="pad"``, the default: every image is used and no black border
  teaches the codec to spend bits on an artificial edge) or left out
  (``small_images="skip"``). The authors' ``RandomCrop`` crashes on such images.
* A sample is addressed by ``(index, crop_seed)`` rather than by ``index``: the crop
  position is drawn from ``crop_seed`` and nothing else. :class:`EpochSampler`
  derives those seeds from ``(seed, epoch)``, so the stream of crops is a pure
  function of the config, whatever the number of DataLoader workers, and a resumed
  run sees exactly the crops the uninterrupted run would have seen.
"""

from pathlib import Path
from typing import List, Sequence, Tuple

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from compressai.datasets import ImageFolder

__all__ = ["CropImageFolder", "list_split"]

_IMAGE_SUFFIXES = {s.lower() for s in Image.registered_extensions()}


def list_split(root: str, split: str) -> ImageFolder:
    """CompressAI's ``ImageFolder`` for ``root/split``, limited to image files.

    Raises ``ValueError`` when the folder is missing or holds no image.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise ValueError(f"missing image folder {split_dir} (data_path must hold "
                         "train/ and test/ sub-folders)")
    folder = ImageFolder(root, split=split)
    # A stray README or .DS_Store would otherwise crash a worker hours into a run.
    folder.samples = [p for p in folder.samples if p.suffix.lower() in _IMAGE_SUFFIXES]
    if not folder.samples:
        raise ValueError(f"no images in {split_dir}")
    return folder


class CropImageFolder(Dataset):
    """``crop x crop`` RGB crops in [0, 1] of the images of ``root/split``.

    Args:
        root: folder with ``train/`` and ``test/`` sub-folders.
        split: ``"train"`` or ``"test"``.
        crop: side of the square crop in pixels.
        random_crop: random position (training) or centre (validation).
        small_images: ``"pad"`` (edge replication up to ``crop``) or ``"skip"``.

    Indexing takes ``(index, crop_seed)`` pairs (see the module docstring) and
    returns a float tensor of shape ``(3, crop, crop)``.
    """

    def __init__(self, root: str, split: str, crop: int, random_crop: bool,
                 small_images: str = "pad"):
        if small_images not in ("pad", "skip"):
            raise ValueError(f"small_images must be 'pad' or 'skip', got {small_images!r}")
        self.folder = list_split(root, split)
        self.crop = crop
        self.random_crop = random_crop
        self.skipped = 0
        if small_images == "skip":
            kept = [p for p in self.folder.samples if min(_image_size(p)) >= crop]
            self.skipped = len(self.folder.samples) - len(kept)
            if not kept:
                raise ValueError(f"all {self.skipped} images in {Path(root) / split} are "
                                 f"smaller than {crop}x{crop}; use small_images: pad")
            self.folder.samples = kept

    @property
    def samples(self) -> List[Path]:
        return self.folder.samples

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: Tuple[int, int]) -> Tensor:
        index, crop_seed = key
        try:
            image = self.folder[index]
        except OSError as exc:
            raise RuntimeError(f"cannot read image {self.samples[index]}: {exc}") from None
        image = _pad_to(image, self.crop)
        width, height = image.size
        if self.random_crop:
            g = torch.Generator().manual_seed(int(crop_seed))
            top = int(torch.randint(height - self.crop + 1, (1,), generator=g))
            left = int(torch.randint(width - self.crop + 1, (1,), generator=g))
        else:
            top, left = (height - self.crop) // 2, (width - self.crop) // 2
        return TF.to_tensor(TF.crop(image, top, left, self.crop, self.crop))


def _image_size(path: Path) -> Sequence[int]:
    try:
        with Image.open(path) as image:  # reads the header only
            return image.size
    except OSError as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def _pad_to(image: Image.Image, crop: int) -> Image.Image:
    """Edge-replicate ``image`` on the right/bottom until both sides reach ``crop``."""
    width, height = image.size
    pad_w, pad_h = max(0, crop - width), max(0, crop - height)
    if pad_w == 0 and pad_h == 0:
        return image
    return TF.pad(image, [0, 0, pad_w, pad_h], padding_mode="edge")
