"""RD plots: one panel per metric, every curve told apart by colour and marker.

MS-SSIM is drawn in decibels, ``-10 log10(1 - MS-SSIM)``, as BD-rates use it
(:mod:`utils.evaluation.curves`).
"""

from typing import List, Sequence

from utils.evaluation.curves import AXIS_LABELS, METRICS, Curve
from utils.figures import save_figure, style_axis

__all__ = ["curve_styles", "rd_figure", "plot_curves"]


# Twenty colours (tab20, dark shades first) and twenty markers, so that curves
# differ in both, and a curve stays identifiable in grayscale print.
MARKERS = tuple("os^vD<>ph*XPd8H1234+")


def curve_styles(count: int) -> List[dict]:
    """Matplotlib keyword arguments for ``count`` curves: the first 20 all differ in
    colour and in marker (dashed lines from the 11th on); more curves repeat them."""
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors
    colours = palette[0::2] + palette[1::2]
    return [
        {
            "color": colours[i % 20],
            "marker": MARKERS[i % 20],
            "linestyle": "-" if i % 20 < 10 else "--",
        }
        for i in range(count)
    ]


def rd_figure(
    curves: Sequence[Curve], metrics: Sequence[str] = METRICS, title: str = ""
):
    """One RD panel per metric that some curve has, with one legend right of the panels.

    Returns ``(figure, metrics shown)``; the caller saves or closes the figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if any(len(c.points(m)) > 0 for c in curves)]
    if not shown:
        raise ValueError(f"no curve has any of the metrics {', '.join(metrics)}")
    figure, axes = plt.subplots(
        1, len(shown), figsize=(5.5 * len(shown), 4.5), squeeze=False
    )
    handles = {}
    for axis, metric in zip(axes[0], shown):
        for curve, style in zip(curves, curve_styles(len(curves))):
            pairs = curve.points(metric)
            if pairs:
                (line,) = axis.plot(
                    *zip(*pairs), markersize=4, label=curve.name, **style
                )
                handles.setdefault(curve.name, line)
        style_axis(axis, "bits per pixel", AXIS_LABELS[metric], legend=False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    # Outside the panels, so that no curve hides under it however many there are.
    figure.legend(
        handles.values(),
        handles.keys(),
        loc="upper left",
        fontsize="small",
        bbox_to_anchor=(1.0, 0.95),
        bbox_transform=figure.transFigure,
    )
    return figure, shown


def plot_curves(
    curves: Sequence[Curve],
    output: str,
    metrics: Sequence[str] = METRICS,
    title: str = "",
) -> List[str]:
    """Draw :func:`rd_figure` and write it to ``output`` atomically.

    Returns the metrics that were plotted. Text between ``$`` signs is drawn as
    matplotlib mathtext (``$\\lambda$``); text it cannot parse is a ``ValueError``
    naming the curve or the title, not the parser's bare message.
    """
    for text, what in [(title, "the title (--title)")] + [
        (curve.name, f"the curve name '{curve.name}' (--label, or its file's name)")
        for curve in curves
    ]:
        _check_mathtext(text, what)
    figure, shown = rd_figure(curves, metrics, title)
    save_figure(figure, output)
    return shown


def _check_mathtext(text: str, what: str) -> None:
    """Refuse ``text`` with a line that matplotlib reads as mathtext
    (``cbook.is_math_text``: an even, non-zero number of unescaped ``$``) and cannot
    parse, as it would draw it: line by line."""
    from matplotlib import cbook
    from matplotlib.mathtext import MathTextParser

    for line in text.split("\n"):
        if not cbook.is_math_text(line):
            continue
        try:
            MathTextParser("path").parse(line)
        except ValueError as exc:
            reason = ([part for part in str(exc).splitlines() if part] or [""])[-1]
            raise ValueError(
                f"{what} holds mathtext matplotlib cannot draw ({reason}); write "
                "\\$ for a dollar sign"
            ) from None
