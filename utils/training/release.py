"""Turn a training run into the small release the repository ships.

A training checkpoint holds optimizer moments, schedulers and float32 weights: about
four times the size of what a user needs to code images. :func:`export_weights`
writes only the state dict, with the learned parameters in float16, entropy tables
recomputed for those rounded weights (so that encoder and decoder agree with the
model the file really holds), and a ``training.json`` saying how the model was made.
:func:`export_curves` draws the run's TensorBoard scalars as a PNG.

    python -m utils.training.release experiment/run/checkpoint_best_loss.pth.tar \\
        experiment/shipped/cps_n64_lambda00035 --runs experiment/run [--force]

An output that exists already (``model.pth``, ``training.json``, and with ``--runs``
``training_curves.png``) is refused, before anything is written, unless ``--force``
is given: a shipped model is never replaced by accident.
"""

import argparse
import datetime
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

from models.checkpoint import load_checkpoint
from models.checkpoint_file import read_checkpoint_file
from utils.atomic import atomic_torch_save, atomic_write_json
from utils.cli import (
    add_force_argument,
    check_output_folder,
    output_folder,
    refuse_existing_outputs,
)
from utils.device import cpu_model_name

WEIGHTS_NAME = "model.pth"
INFO_NAME = "training.json"
CURVES_NAME = "training_curves.png"
# TensorBoard tags drawn by export_curves, one panel each, if the run logged them.
CURVE_PANELS = (
    ("loss", ("train/loss", "val/loss")),
    ("bits per pixel", ("train/bpp", "val/bpp")),
    ("PSNR (dB)", ("train/psnr", "val/psnr")),
    ("aux loss", ("train/aux", "val/aux")),
)


def half_precision_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Round ``model``'s float parameters to float16 in place and return its state dict
    with those parameters stored as float16; buffers keep their dtype.

    The entropy tables are recomputed after the rounding, so the file's tables are
    exactly those of the float16 model that a user will load.
    """
    parameter_names = {name for name, _ in model.named_parameters()}
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point():
                parameter.copy_(parameter.half().float())
        model.update(force=True)
    state = {}
    for name, value in model.state_dict().items():
        value = value.detach().cpu()
        halve = name in parameter_names and value.is_floating_point()
        state[name] = value.half() if halve else value
    return state


def _checkpoint_summary(path: str) -> dict:
    """What a training checkpoint says about its run (plain values only)."""
    checkpoint = read_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or "config" not in checkpoint:
        return {}
    config = checkpoint["config"]
    return {
        "global_step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
        # A loss never measured (inf) becomes null in the strict JSON written.
        "best_validation_loss": checkpoint.get("best_loss"),
        "validation_loss": checkpoint.get("loss"),
        "train_params": config.get("train_params"),
        "lr_schedule": config.get("lr_schedule"),
        "batch_size": config.get("train_data", {}).get("batch_size"),
        "versions": checkpoint.get("versions"),
    }


def export_weights(
    checkpoint_path: str, output_dir: str, extra_info: Optional[dict] = None
) -> str:
    """Write ``output_dir/model.pth`` and ``output_dir/training.json``.

    Returns the weights path.
    """
    model = load_checkpoint(checkpoint_path, torch.device("cpu"))
    state = half_precision_state_dict(model)
    os.makedirs(output_dir, exist_ok=True)
    weights = os.path.join(output_dir, WEIGHTS_NAME)
    atomic_torch_save(
        {
            "architecture": model.registry_name,
            "model_config": dict(model.config),
            "state_dict": state,
        },
        weights,
    )
    info = {
        "architecture": model.registry_name,
        "model_config": dict(model.config),
        "source_checkpoint": os.path.basename(checkpoint_path),
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "weights": (
            f"{WEIGHTS_NAME}: float16 parameters, float32/int32 buffers "
            "and entropy tables"
        ),
        "parameters": sum(p.numel() for p in model.parameters()),
        "file_bytes": os.path.getsize(weights),
        "hardware": f"{cpu_model_name()}, {os.cpu_count()} CPU cores",
        **_checkpoint_summary(checkpoint_path),
        **(extra_info or {}),
    }
    atomic_write_json(os.path.join(output_dir, INFO_NAME), info, sort_keys=True)
    return weights


def read_scalars(run_dirs: Sequence[str]) -> Dict[str, List[tuple]]:
    """``{tag: [(step, value), ...]}`` from the TensorBoard event files of ``run_dirs``.

    Inside one folder the event files of a run and of its resumptions are merged and
    a later event for the same tag and step replaces an earlier one (a resumed run
    repeats the steps since its last checkpoint). Each further folder is a run that
    started from the previous one's weights (``--init-from``) and counts its steps
    from 0 again, so its steps are shifted to follow the previous folder's last step.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: Dict[str, Dict[int, float]] = {}
    offset = 0
    for run_dir in run_dirs:
        if not os.path.isdir(run_dir):
            raise ValueError(f"no TensorBoard folder {run_dir}")
        accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        accumulator.Reload()
        last = offset
        for tag in accumulator.Tags()["scalars"]:
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


def export_curves(run_dirs: Sequence[str], output: str, title: str = "") -> List[str]:
    """Draw the run's loss, bpp, PSNR and aux-loss curves into ``output`` (PNG).

    Returns the panels drawn; raises ``ValueError`` when the runs logged none of them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.figures import save_figure, style_axis

    scalars = read_scalars(run_dirs)
    panels = [
        (label, [t for t in tags if t in scalars]) for label, tags in CURVE_PANELS
    ]
    panels = [(label, tags) for label, tags in panels if tags]
    if not panels:
        raise ValueError(f"no training scalars in {', '.join(run_dirs)}")
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
    save_figure(figure, output, title)
    return [label for label, _ in panels]


def release_outputs(output_dir: str, runs: Sequence[str]) -> List[str]:
    """The files a release into ``output_dir`` writes: the weights and their
    ``training.json``, and the curves when TensorBoard folders are given."""
    names = [WEIGHTS_NAME, INFO_NAME] + ([CURVES_NAME] if runs else [])
    return [os.path.join(output_dir, name) for name in names]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", help="training checkpoint (e.g. checkpoint_best_loss.pth.tar)"
    )
    parser.add_argument(
        "output_dir", help="release folder (model.pth, training.json, curves)"
    )
    parser.add_argument(
        "--runs",
        nargs="*",
        default=[],
        help="TensorBoard folders of the run (and of runs it continued)",
    )
    parser.add_argument(
        "--info",
        default=None,
        help="JSON file of extra facts to record (data, wall time, ...)",
    )
    add_force_argument(parser)
    args = parser.parse_args(argv)
    try:
        refuse_existing_outputs(release_outputs(args.output_dir, args.runs), args.force)
        check_output_folder(args.output_dir, "output_dir")
        extra = {}
        if args.info:
            with open(args.info) as handle:
                extra = json.load(handle)
        if args.runs:
            extra.setdefault(
                "training_wall_time_h", round(training_wall_time(args.runs) / 3600, 2)
            )
        with output_folder(args.output_dir, "output_dir"):  # removed if left empty
            weights = export_weights(args.checkpoint, args.output_dir, extra)
        print(f"wrote {weights} ({os.path.getsize(weights) / 1e6:.1f} MB)")
        if args.runs:
            curves = os.path.join(args.output_dir, CURVES_NAME)
            export_curves(
                args.runs, curves, title=os.path.basename(args.output_dir.rstrip("/"))
            )
            print(f"wrote {curves}")
    except (ValueError, RuntimeError, OSError, json.JSONDecodeError) as exc:
        print(f"release: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
