"""A training run's curves, for its release: the scalars TensorBoard logged (a run,
its resumptions and the runs it continued, merged on one step axis), the time spent
training, and the PNG of its loss, rate, PSNR and auxiliary-loss panels
(``training_curves.png``, :mod:`utils.training.release`).
"""

import os
from typing import Dict, List, Mapping, Sequence, Tuple

__all__ = [
    "CURVE_PANELS",
    "read_scalars",
    "training_wall_time",
    "curve_panels",
    "render_curves",
]

# TensorBoard tags drawn by render_curves, one panel each, if the run logged them.
CURVE_PANELS = (
    ("loss", ("train/loss", "val/loss")),
    ("bits per pixel", ("train/bpp", "val/bpp")),
    ("PSNR (dB)", ("train/psnr", "val/psnr")),
    ("aux loss", ("train/aux", "val/aux")),
)


def read_scalars(run_dirs: Sequence[str]) -> Dict[str, List[tuple]]:
    """``{tag: [(step, value), ...]}`` from the TensorBoard event files of ``run_dirs``.

    Inside one folder the event files of a run and of its resumptions are merged and
    a later event for the same tag and step replaces an earlier one (a resumed run
    repeats the steps since its last checkpoint). Each further folder is a run that
    started from the previous one's weights (``--init-from``) and counts its steps
    from 0 again, so its steps are shifted to follow the previous folder's last step.

    Raises:
        ValueError: a folder is missing or holds no scalars (a wrong path would
            otherwise draw nothing and count no training time).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: Dict[str, Dict[int, float]] = {}
    offset = 0
    for run_dir in run_dirs:
        if not os.path.isdir(run_dir):
            raise ValueError(f"no TensorBoard folder {run_dir}")
        accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        accumulator.Reload()
        tags = accumulator.Tags()["scalars"]
        if not tags:
            raise ValueError(f"no TensorBoard scalars in {run_dir}")
        last = offset
        for tag in tags:
            for event in accumulator.Scalars(tag):
                merged.setdefault(tag, {})[offset + event.step] = event.value
                last = max(last, offset + event.step)
        offset = last
    return {tag: sorted(points.items()) for tag, points in merged.items()}


def training_wall_time(run_dirs: Sequence[str]) -> float:
    """Seconds spent training: the span of the logged scalars of each event file (one
    file per launch of train.py, so a resumed run adds its own span and the pause
    between launches is not counted), summed over ``run_dirs``."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    total = 0.0
    for run_dir in run_dirs:
        for name in sorted(os.listdir(run_dir)):
            if name.startswith("events.out.tfevents"):
                times = [
                    event.wall_time
                    for event in EventFileLoader(os.path.join(run_dir, name)).Load()
                    if event.HasField("summary")
                ]
                total += max(times) - min(times) if times else 0.0
    return total


def curve_panels(
    scalars: Mapping[str, list], run_dirs: Sequence[str]
) -> List[Tuple[str, List[str]]]:
    """The panels of :data:`CURVE_PANELS` that ``scalars`` (from ``run_dirs``) can
    draw, each with its logged tags.

    Raises:
        ValueError: the runs logged none of them.
    """
    panels = [
        (label, [t for t in tags if t in scalars]) for label, tags in CURVE_PANELS
    ]
    panels = [(label, tags) for label, tags in panels if tags]
    if not panels:
        raise ValueError(f"no training scalars in {', '.join(run_dirs)}")
    return panels


def render_curves(
    scalars: Mapping[str, list], panels: Sequence[Tuple[str, List[str]]], title: str
) -> bytes:
    """The PNG of ``panels`` (:func:`curve_panels`) drawn from ``scalars``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.figures import render_figure, style_axis

    figure, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False
    )
    for axis, (label, tags) in zip(axes[0], panels):
        for tag in tags:
            steps, values = zip(*scalars[tag])
            axis.plot(
                steps,
                values,
                label=tag,
                marker="o" if tag.startswith("val/") else None,
                markersize=3,
                linewidth=1,
            )
        if label in ("loss", "aux loss"):
            axis.set_yscale("log")
        style_axis(axis, "step", label)
    return render_figure(figure, title)
