"""What a caller asks of the patch tiling: :class:`PatchSpec`.

Free of PyTorch, so command lines (``utils/cli.py``) parse and check it before the
heavy libraries load. Whether a fixed size suits a model's POPS grid is checked
against that model's geometry (:func:`utils.stitching.geometry.check_patch_size`).
"""

from dataclasses import dataclass
from typing import Optional

AUTO = "auto"
WHOLE = "whole"


@dataclass(frozen=True)
class PatchSpec:
    """The whole image (``size == 0``), fixed ``size`` x ``size`` patches, or ``auto``
    (``size is None``: the patches that fit the memory budget and recompute the least
    overlap; the whole image when there is no budget)."""

    size: Optional[int] = None

    @classmethod
    def parse(cls, text: str) -> "PatchSpec":
        """``auto``, ``whole`` (or ``0``), or a side in pixels."""
        text = str(text).strip().lower()
        if text == AUTO:
            return cls(None)
        if text == WHOLE:
            return cls(0)
        try:
            size = int(text)
        except ValueError:
            raise ValueError(
                f"patch size must be pixels, {WHOLE!r} or {AUTO!r}, got {text!r}"
            ) from None
        if size < 0:
            raise ValueError(f"patch size must be >= 0 (0: whole image), got {size}")
        return cls(size)

    @property
    def is_auto(self) -> bool:
        return self.size is None

    @property
    def is_whole(self) -> bool:
        return self.size == 0

    def __str__(self) -> str:
        return AUTO if self.is_auto else WHOLE if self.is_whole else f"{self.size} px"
