"""Training data: square crops of CompressAI image folders and a resumable sampler."""

from datasets.image_folder import CropImageFolder, list_split
from datasets.sampler import EpochSampler

__all__ = ["CropImageFolder", "EpochSampler", "list_split"]
