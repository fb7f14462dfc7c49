"""Square crops from a CompressAI ``ImageFolder`` whose randomness comes from
the sampler.

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

A large image folder usually holds a few broken files (a truncated download, an
HTML page saved as ``.jpg``, a PNG with a bad checksum) and sometimes a huge one.
None of them may crash a run hours in, inside a DataLoader worker. An image is
therefore checked before it is decoded: its header gives the size, and one above
``max_pixels`` (a decompression bomb, a 12000x12000 scan) is refused without
allocating it; a PNG's checksums are verified. An image that is refused or fails to
decode is replaced by the next image of the folder (deterministically, so resumed
runs still match), and the sample reports which indices it had to skip; the trainer
warns once per such image and stops when their share exceeds a configured fraction.
Images are turned upright by their EXIF orientation, and images of 16-bit or wider
samples read, by :func:`utils.image_io.read_image`'s rules, as evaluation reads them
(PIL's own conversion keeps the orientation and clips such samples to white or black).
"""

import io
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torchvision.transforms.functional as TF
from compressai.datasets import ImageFolder
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from utils.coding.payload import check_size
from utils.image_io import is_image_file, pil_reads_right, read_image
from utils.orientation import upright_rgb

__all__ = [
    "CropImageFolder",
    "list_split",
    "UnreadableImage",
    "open_rgb",
    "REPLACEMENTS",
]

# Images tried after a failed one before a sample gives up (see CropImageFolder).
REPLACEMENTS = 4


class UnreadableImage(Exception):
    """An image file that cannot be used; the message says why, on one line."""


def open_rgb(
    path, max_pixels: Optional[int] = None, read_whole: bool = False
) -> Image.Image:
    """Decode ``path`` to an RGB ``PIL.Image`` turned upright by its EXIF orientation,
    as evaluation reads it (:func:`utils.image_io.read_image`), or raise
    :class:`UnreadableImage`.

    The size is read from the header and checked against ``max_pixels`` (``None``:
    PIL's own decompression-bomb limit alone) before any pixel is decoded, and, with
    ``read_whole`` (ACL, which reads its images whole with ``read_image``), against
    the sides the .cps/.cpsl formats hold, which ``read_image`` refuses beyond (a
    crop of a wider panorama trains as well); PNG chunk checksums are verified (PIL's
    decoder skips them).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        with warnings.catch_warnings():  # the size is checked below, against our limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                _check_pixels(image.size, max_pixels)
                if read_whole:
                    _check_sides(image.size)
                if image.format == "PNG":
                    image.verify()
            with Image.open(io.BytesIO(data)) as image:
                if pil_reads_right(image, data):
                    return upright_rgb(image)
        return _read_deep_samples(path)
    except (UnreadableImage, MemoryError):  # the machine's problem, not the file's
        raise
    except Image.UnidentifiedImageError:  # its message names a BytesIO, not the file
        raise UnreadableImage("not an image file of a format PIL reads") from None
    except Image.DecompressionBombError:  # PIL's own limit, before the size is known
        limit = (
            f"train_data.max_image_pixels={max_pixels}"
            if max_pixels is not None
            else f"PIL's limit of {2 * Image.MAX_IMAGE_PIXELS}"
        )
        raise UnreadableImage(f"more pixels than {limit}") from None
    # Image plugins fail in many ways (OSError, SyntaxError, ValueError, zlib and
    # struct errors): any of them means this file is unusable.
    except Exception as exc:
        # The OS names the file in its message; the warning names it once already.
        named = isinstance(exc, OSError) and exc.filename is not None
        text = exc.strerror if named else " ".join(str(exc).split())
        raise UnreadableImage(f"{type(exc).__name__}: {text or 'no details'}") from None


def _read_deep_samples(path) -> Image.Image:
    """An image of 16- or 32-bit integer samples read as evaluation reads it
    (:func:`utils.image_io.read_image`: scaled to 8 bits, or refused when it does not
    fit 16 bits or holds floats); PIL's convert("RGB") clips such samples to white
    or black."""
    try:
        planes, _ = read_image(str(path))
    except ValueError as exc:
        raise UnreadableImage(
            str(exc).removeprefix(f"cannot read image {path}: ")
        ) from None
    return Image.fromarray(planes.permute(1, 2, 0).numpy())


def list_split(root: str, split: str) -> ImageFolder:
    """CompressAI's ``ImageFolder`` for ``root/split``, limited to image files.

    Raises ``ValueError`` when the folder is missing or holds no image.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise ValueError(
            f"missing image folder {split_dir} (data_path must hold "
            "train/ and test/ sub-folders)"
        )
    folder = ImageFolder(root, split=split)
    # A stray README or .DS_Store would otherwise crash a worker hours into a run.
    folder.samples = [p for p in folder.samples if is_image_file(p.name)]
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
        max_pixels: images with more pixels are refused unread (see :func:`open_rgb`).

    Indexing takes ``(index, crop_seed)`` pairs (see the module docstring) and
    returns ``(crop, skipped)``: a float tensor of shape ``(3, crop, crop)`` and an
    int64 tensor of :data:`REPLACEMENTS` entries, the indices of the unusable images
    that were replaced by the next one (``-1``: unused entry). When an image and its
    ``REPLACEMENTS`` successors are all unusable, a one-line ``RuntimeError`` says so.

    ``unusable`` lists ``(path, reason)`` for images refused while listing the folder
    (``small_images="skip"`` reads every header); ``total`` counts them too.
    """

    def __init__(
        self,
        root: str,
        split: str,
        crop: int,
        random_crop: bool,
        small_images: str = "pad",
        max_pixels: Optional[int] = None,
    ):
        if small_images not in ("pad", "skip"):
            raise ValueError(
                f"small_images must be 'pad' or 'skip', got {small_images!r}"
            )
        self.folder = list_split(root, split)
        self.crop, self.random_crop, self.max_pixels = crop, random_crop, max_pixels
        self.total = len(self.folder.samples)
        self.skipped = 0
        self.unusable: List[Tuple[Path, str]] = []
        if small_images == "skip":
            kept = []
            for path in self.folder.samples:
                try:
                    size = _image_size(path, max_pixels)
                except UnreadableImage as exc:
                    self.unusable.append((path, str(exc)))
                    continue
                if min(size) >= crop:
                    kept.append(path)
                else:
                    self.skipped += 1
            if not kept:
                raise ValueError(
                    f"no image of {Path(root) / split} is usable: {self.skipped} "
                    f"are smaller than {crop}x{crop} (use small_images: pad), "
                    f"{len(self.unusable)} unreadable"
                )
            self.folder.samples = kept

    @property
    def samples(self) -> List[Path]:
        return self.folder.samples

    def __len__(self) -> int:
        return len(self.folder)

    def why_unusable(self, index: int) -> str:
        """Why image ``index`` cannot be used ("" if it can): for messages."""
        try:
            open_rgb(self.samples[index], self.max_pixels).close()
        except UnreadableImage as exc:
            return str(exc)
        return ""

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        index, crop_seed = key
        skipped = torch.full((REPLACEMENTS,), -1, dtype=torch.int64)
        for attempt in range(REPLACEMENTS + 1):
            candidate = (index + attempt) % len(self)
            try:
                image = open_rgb(self.samples[candidate], self.max_pixels)
                break
            except UnreadableImage as exc:
                if attempt + 1 == len(self):  # every image tried: do not count twice
                    raise RuntimeError(
                        f"none of the {len(self)} images can be used, the last "
                        f"{self.samples[candidate]} ({exc}); check the image folder"
                    ) from None
                if attempt == REPLACEMENTS:
                    raise RuntimeError(
                        f"{REPLACEMENTS + 1} images in a row cannot be used, "
                        f"the last {self.samples[candidate]} ({exc}); check "
                        "the image folder"
                    ) from None
                skipped[attempt] = candidate
        return self._crop(image, crop_seed), skipped

    def _crop(self, image: Image.Image, crop_seed: int) -> Tensor:
        image = _pad_to(image, self.crop)
        width, height = image.size
        if self.random_crop:
            g = torch.Generator().manual_seed(int(crop_seed))
            top = int(torch.randint(height - self.crop + 1, (1,), generator=g))
            left = int(torch.randint(width - self.crop + 1, (1,), generator=g))
        else:
            top, left = (height - self.crop) // 2, (width - self.crop) // 2
        return TF.to_tensor(TF.crop(image, top, left, self.crop, self.crop))


def _image_size(path: Path, max_pixels: Optional[int]) -> Sequence[int]:
    """``(width, height)`` from the header alone;
    :class:`UnreadableImage` if unusable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                size = image.size
    except MemoryError:
        raise
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image file of a format PIL reads") from None
    except Exception as exc:  # any plugin failure, as in open_rgb
        raise UnreadableImage(
            f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from None
    _check_pixels(size, max_pixels)
    return size


def _check_sides(size: Sequence[int]) -> None:
    try:
        check_size(size[1], size[0])
    except ValueError as exc:
        raise UnreadableImage(str(exc)) from None


def _check_pixels(size: Sequence[int], max_pixels: Optional[int]) -> None:
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise UnreadableImage(
            f"{size[0]}x{size[1]} pixels is more than "
            f"train_data.max_image_pixels={max_pixels}"
        )


def _pad_to(image: Image.Image, crop: int) -> Image.Image:
    """Edge-replicate ``image`` on the right/bottom until both sides reach ``crop``."""
    width, height = image.size
    pad_w, pad_h = max(0, crop - width), max(0, crop - height)
    if pad_w == 0 and pad_h == 0:
        return image
    return TF.pad(image, [0, 0, pad_w, pad_h], padding_mode="edge")
