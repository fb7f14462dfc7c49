"""What a classical codec accepts: qualities on its own scale, and the image sizes
its library codes. Both are checked before the first image is coded (``test.py
codec`` reads every image's header first), so that a run is refused in one line
instead of failing in a library's words halfway through a dataset.
"""

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class QualityScale:
    """Allowed quality values of a codec."""

    low: float
    high: float
    integer: bool
    meaning: str

    def check(self, codec: str, quality: float) -> None:
        if self.integer and quality != int(quality):
            raise ValueError(
                f"{codec} quality must be an integer ({self.meaning}), got {quality:g}"
            )
        if not self.low <= quality <= self.high:
            raise ValueError(
                f"{codec} quality {quality:g} is outside {self.low:g}..{self.high:g} "
                f"({self.meaning})"
            )


@dataclass(frozen=True)
class SizeLimits:
    """The image sizes a codec codes: sides from ``low`` to ``high`` pixels and at
    most ``pixels`` in all (None: no limit known).

    Beyond them the libraries fail in their own words, some only when decoding
    (libavif writes a 65500-pixel-wide AVIF that it cannot read back); the limits
    let ``test.py codec`` refuse such an image from its header, before the first
    image is coded.
    """

    low: int = 1
    high: Optional[int] = None
    pixels: Optional[int] = None
    # (short, longest): an image with a side under ``short`` pixels codes only up to
    # ``longest`` pixels long.
    thin: Optional[Tuple[int, int]] = None

    def check(self, codec: str, height: int, width: int) -> None:
        if min(height, width) < self.low:
            raise ValueError(
                f"{codec} codes images of {self.low} pixels a side or more, "
                f"not {width}x{height}"
            )
        short, longest = self.thin or (0, None)
        if min(height, width) < short and max(height, width) > longest:
            raise ValueError(
                f"{codec} codes an image with a side under {short} pixels only "
                f"up to {longest} pixels long, not {width}x{height}"
            )
        if self.high is not None and max(height, width) > self.high:
            raise ValueError(
                f"{codec} codes images of at most {self.high} pixels a side, "
                f"not {width}x{height}"
            )
        if self.pixels is not None and height * width > self.pixels:
            raise ValueError(
                f"{codec} codes images of at most {self.pixels} pixels, "
                f"not {width}x{height}"
            )


ANY_SIZE = SizeLimits()  # the limits of a codec that states none
