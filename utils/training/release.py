"""Turn a training run into the small release the repository ships.

A training checkpoint holds optimizer moments, schedulers and float32 weights: about
four times the size of what a user needs to code images. A release
(:func:`build_release`) keeps only the state dict, with the learned parameters in
float16, entropy tables recomputed for those rounded weights (so that encoder and
decoder agree with the model the file really holds), and a ``training.json`` saying
how the model was made; :mod:`utils.training.training_curves` draws the run's
TensorBoard scalars as a PNG.

    python -m utils.training.release experiment/run/checkpoint_best_loss.pth.tar \\
        experiment/shipped/cps_n64_lambda00035 --runs experiment/run [--force]

An output that exists already (``model.pth``, ``training.json``, and with ``--runs``
``training_curves.png``) is refused, before anything is written, unless ``--force``
is given: a shipped model is never replaced by accident. Every other check comes
first too (the checkpoint and its stored config, the ``--info`` file, scalars in
each ``--runs`` folder): the release is made in memory, and its files are written
together (:func:`utils.atomic.atomic_write_files`), so a refused or failed release
leaves no half-made folder, and with ``--force`` the previous files stay as they were.
A release with ``--force`` but without ``--runs`` removes the curves of the model it
replaces.
"""

import argparse
import datetime
import io
import json
import os
import sys
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from models.checkpoint import UnsolvedQuantilesWarning, load_checkpoint
from models.checkpoint_file import read_checkpoint_file
from utils.atomic import atomic_write_files, strict_json
from utils.cli import (
    REPORTED_ERRORS,
    add_force_argument,
    report_error,
    show_warnings_as_one_line,
)
from utils.device import cpu_model_name
from utils.output_paths import (
    check_output_folder,
    output_folder,
    refuse_existing_outputs,
)
from utils.training.training_curves import (
    curve_panels,
    read_scalars,
    render_curves,
    training_wall_time,
)

WEIGHTS_NAME = "model.pth"
INFO_NAME = "training.json"
CURVES_NAME = "training_curves.png"


def _round_parameters(model: torch.nn.Module) -> None:
    """Round ``model``'s float parameters to float16 values, in place (kept float32)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.copy_(parameter.half().float())


def half_precision_state_dict(
    model: torch.nn.Module, solve_quantiles: bool = False
) -> Dict[str, torch.Tensor]:
    """Round ``model``'s float parameters to float16 in place and return its state dict
    with those parameters stored as float16; buffers keep their dtype.

    The entropy tables are recomputed after the rounding, so the file's tables are
    exactly those of the float16 model that a user will load. ``solve_quantiles``
    first solves the entropy bottlenecks' quantiles for the rounded network by
    CompressAI's bisection (``update(update_quantiles=True)``, what
    :func:`utils.training.step.coding_state_dict` does for a run's best checkpoint),
    and rounds them to float16 like every parameter before the tables are made.
    """
    parameter_names = {name for name, _ in model.named_parameters()}
    with torch.no_grad():
        _round_parameters(model)
        if solve_quantiles:
            model.update(force=True, update_quantiles=True)
            _round_parameters(model)
        model.update(force=True)
    state = {}
    for name, value in model.state_dict().items():
        value = value.detach().cpu()
        halve = name in parameter_names and value.is_floating_point()
        state[name] = value.half() if halve else value
    return state


def _mapping_entry(path: str, parent: Mapping, key: str, what: str) -> Mapping:
    """``parent[key]`` if it is a dict (an empty one if absent), else ``ValueError``
    naming the checkpoint ``path`` and the entry ``what``."""
    value = parent.get(key, {})
    if not isinstance(value, Mapping):
        raise ValueError(
            f"checkpoint {path}: {what} must be a dict, got {type(value).__name__}"
        )
    return value


def _checkpoint_summary(checkpoint: Mapping, path: str) -> dict:
    """What a training checkpoint says about its run (plain values only); a file
    without a training ``config`` (published weights) says nothing.

    Raises:
        ValueError: the stored ``config`` or its ``train_data`` is not a dict.
    """
    if "config" not in checkpoint:
        return {}
    config = _mapping_entry(path, checkpoint, "config", "'config'")
    train_data = _mapping_entry(path, config, "train_data", "'config.train_data'")
    return {
        "global_step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
        # A loss never measured (inf) becomes null in the strict JSON written.
        "best_validation_loss": checkpoint.get("best_loss"),
        "validation_loss": checkpoint.get("loss"),
        "train_params": config.get("train_params"),
        "lr_schedule": config.get("lr_schedule"),
        "batch_size": train_data.get("batch_size"),
        "versions": checkpoint.get("versions"),
    }


def build_release(
    checkpoint_path: str, extra_info: Optional[dict] = None
) -> Tuple[Dict[str, bytes], dict]:
    """The contents of ``model.pth`` and ``training.json`` for ``checkpoint_path``
    (``{file name: bytes}``), made in memory so that every check comes before any
    file is written, and the run description that ``training.json`` holds.

    A training run's last state (``quantiles_solved`` False: its quantiles follow the
    auxiliary loss) has its quantiles solved here and ``training.json`` records
    ``quantiles_solved_at_release``. Solving is chosen over carrying the flag into
    ``model.pth`` (where loading would warn): a released model is coded by users who
    cannot retrain it, and solved quantiles give its weights the bitstream they can
    reach, as the run's best checkpoint would have; the tables are made for the
    solved float16 quantiles the file stores, so encoder and decoder still agree, and
    what differs from the checkpoint is written down rather than lost. The loader's
    warning about those quantiles is silenced for that reason only.

    Raises:
        ValueError: the checkpoint cannot be read or built, its stored config is not
            of the expected shape, or its run description cannot be written as JSON.
    """
    checkpoint = read_checkpoint_file(checkpoint_path)
    if not isinstance(checkpoint, Mapping):  # load_checkpoint says what it holds
        checkpoint = {}
    summary = _checkpoint_summary(checkpoint, checkpoint_path)
    unsolved = checkpoint.get("quantiles_solved") is False
    del checkpoint  # the optimizer state it holds is freed before the model loads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsolvedQuantilesWarning)  # solved below
        model = load_checkpoint(checkpoint_path, torch.device("cpu"))
    solve = unsolved and any(
        name.endswith(".quantiles") for name, _ in model.named_parameters()
    )
    state = half_precision_state_dict(model, solve_quantiles=solve)
    weights = io.BytesIO()
    torch.save(
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
        "file_bytes": weights.getbuffer().nbytes,
        "hardware": f"{cpu_model_name()}, {os.cpu_count()} CPU cores",
        "quantiles_solved_at_release": solve,
        **summary,
        **(extra_info or {}),
    }
    try:
        text = strict_json(info, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"checkpoint {checkpoint_path}: its run description cannot be written "
            f"as JSON ({exc})"
        ) from None
    files = {WEIGHTS_NAME: weights.getvalue(), INFO_NAME: (text + "\n").encode()}
    return files, info


def release_outputs(output_dir: str, runs: Sequence[str]) -> List[str]:
    """The files a release into ``output_dir`` writes: the weights and their
    ``training.json``, and the curves when TensorBoard folders are given."""
    names = [WEIGHTS_NAME, INFO_NAME] + ([CURVES_NAME] if runs else [])
    return [os.path.join(output_dir, name) for name in names]


def read_info(path: str) -> dict:
    """The extra facts of ``--info``: a JSON object.

    Raises:
        ValueError: naming ``path``, which cannot be read, is not JSON, or holds
            something else than an object.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
    except OSError as exc:
        raise ValueError(f"cannot read --info {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ValueError(f"--info {path} is not valid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise ValueError(
            f"--info {path} must hold a JSON object, got {type(info).__name__}"
        )
    return info


def main(argv: Optional[List[str]] = None) -> int:
    show_warnings_as_one_line()
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
        outputs = release_outputs(args.output_dir, args.runs)
        refuse_existing_outputs(outputs, args.force)
        check_output_folder(args.output_dir, "output_dir")
        extra = read_info(args.info) if args.info else {}
        if args.runs:
            scalars = read_scalars(args.runs)
            panels = curve_panels(scalars, args.runs)
            extra.setdefault(
                "training_wall_time_h", round(training_wall_time(args.runs) / 3600, 2)
            )
        files, info = build_release(args.checkpoint, extra)
        if args.runs:
            title = os.path.basename(os.path.normpath(args.output_dir))
            files[CURVES_NAME] = render_curves(scalars, panels, title)
        # Curves of the model --force replaces would be left beside the new one.
        stale_curves = os.path.join(args.output_dir, CURVES_NAME)
        stale = args.force and not args.runs and os.path.isfile(stale_curves)
        with output_folder(args.output_dir, "output_dir"):  # removed if left empty
            atomic_write_files(
                {
                    os.path.join(args.output_dir, name): data
                    for name, data in files.items()
                }
            )
        if stale:
            os.remove(stale_curves)
    except REPORTED_ERRORS as exc:
        return report_error("release", exc)
    weights = os.path.join(args.output_dir, WEIGHTS_NAME)
    print(f"wrote {weights} ({len(files[WEIGHTS_NAME]) / 1e6:.1f} MB)")
    if info["quantiles_solved_at_release"]:
        print(
            f"solved the entropy-bottleneck quantiles of {args.checkpoint} (a training "
            f"run's last state) for coding; {INFO_NAME} records it"
        )
    for path in outputs[1:]:
        print(f"wrote {path}")
    if stale:
        print(f"removed {stale_curves}: it showed the training of the model replaced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
