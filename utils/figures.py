"""The look of every figure here and its atomic write (RD plots, demo crops, training
curves, benchmark plots).

Matplotlib is imported by the callers, which draw; this module only styles an axis
and writes a finished figure, so it loads nothing heavy itself.
"""

import io
import os

from utils.atomic import atomic_write_bytes

__all__ = ["style_axis", "render_figure", "save_figure"]


def style_axis(axis, xlabel: str, ylabel: str, legend: bool = True) -> None:
    """Labels, a light grid and a small legend: the look of every plot here."""
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(True, alpha=0.3)
    if legend:
        axis.legend(fontsize="small")


def render_figure(
    figure, title: str = "", dpi: int = 150, file_format: str = "png"
) -> bytes:
    """Title and lay out ``figure``, then return it rendered in ``file_format`` and
    release it: for a caller that writes the picture together with other files."""
    import matplotlib.pyplot as plt

    try:
        if title:
            figure.suptitle(title)
        figure.tight_layout()
        rendered = io.BytesIO()
        # A tight box keeps a legend placed outside the panels in the picture.
        figure.savefig(rendered, format=file_format, dpi=dpi, bbox_inches="tight")
        return rendered.getvalue()
    finally:
        plt.close(figure)


def save_figure(figure, output: str, title: str = "", dpi: int = 150) -> None:
    """Title, lay out, write ``output`` atomically and release the figure.

    The picture is rendered in memory in the format the extension names (PNG by
    default), then written through :func:`utils.atomic.atomic_write_bytes`, so an
    interrupted run never leaves half a picture.

    Raises:
        ValueError: the folder of ``output`` does not exist.
    """
    import matplotlib.pyplot as plt

    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        plt.close(figure)
        raise ValueError(f"cannot write {output}: folder {directory} does not exist")
    rendered = render_figure(
        figure, title, dpi, os.path.splitext(output)[1].lstrip(".") or "png"
    )
    atomic_write_bytes(output, rendered)
