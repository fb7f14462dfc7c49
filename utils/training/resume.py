"""Whether a run can go on from a checkpoint, and what changed since it was written.

A resume continues bit for bit only where the images of the current epoch are drawn
as before: mid-epoch, ``epoch_step * batch_size`` samples per process are already
used, so the batch size and the process count must not change, and the epoch must
still hold that many batches. A run that reached its limit has nothing left to do.
These checks run before the run announces that it resumes.
"""

import os
from typing import List, Optional, Tuple

from utils.training.config import (
    BEST_NAME,
    LAST_NAME,
    parse_config,
    rename_legacy_keys,
    to_plain_dict,
)
from utils.training.state import TrainPosition
from utils.training.state_loading import read_resume_checkpoint

__all__ = [
    "run_finished",
    "best_checkpoint_note",
    "moved_run_note",
    "check_resume_position",
    "check_not_behind",
    "check_experiment_folder",
    "config_changes",
    "LOSS_KEYS",
    "report_config_changes",
    "run_state_exists",
]

# Where the weights come from is not a change of the run, nor where it writes (the
# folder of its checkpoint, unless --set names another; the trainer says which).
_START_KEYS = (
    "train_data.use_checkpoint_path:",
    "train_data.init_checkpoint_path:",
    "train_data.experiment_path:",
)

# Config keys that change what the training loss measures (its scale included).
LOSS_KEYS = (
    "train_params.lmbda:",
    "train_params.distortion_metric:",
    "model.kwargs.lmbdas:",  # the layered mei2021 models' own lambdas
)


def run_finished(cfg, position: TrainPosition) -> bool:
    """Whether ``position`` has reached ``max_steps`` (when set) or ``epochs``."""
    max_steps = cfg.train_params.max_steps
    if max_steps and position.global_step >= max_steps:
        return True
    return position.epoch >= cfg.train_data.epochs


def best_checkpoint_note(position: TrainPosition, val_interval: int) -> str:
    """Where the best checkpoint comes from, when not from the last step (a resumed
    run that ends between validations keeps the best of the earlier ones), as the
    end of the run's last line."""
    best = position.best_step
    if best is None or best == position.global_step:
        return ""
    schedule = (
        f"every {val_interval} steps (logging.val_interval)"
        if val_interval
        else "at the end of each epoch"
    )
    return (
        f"; {BEST_NAME} is from step {best}, the best of the validations, which "
        f"run {schedule}"
    )


def moved_run_note(checkpoint: dict, experiment: str) -> Optional[str]:
    """A line for a resume whose checkpoint was written in another folder than the
    one the run continues in (``experiment``), or None."""
    written_in = ((checkpoint.get("config") or {}).get("train_data") or {}).get(
        "experiment_path"
    )
    if not isinstance(written_in, str) or _same_folder(written_in, experiment):
        return None
    return f"the run continues in {experiment}; it was written in {written_in}"


def _same_folder(a: str, b: str) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def check_resume_position(
    path: str,
    stored: Optional[dict],
    cfg,
    position: TrainPosition,
    steps_per_epoch: int,
    train_images: int,
    world_size: int,
) -> None:
    """Refuse a resume that cannot continue where the checkpoint at ``path`` stopped.

    Args:
        stored: the checkpoint's config (``None`` for an old one without it).
        cfg: this run's config; ``position`` the restored position.
        steps_per_epoch: batches per process in an epoch of this run.
        train_images: the training images this run found.
        world_size: this run's process count.

    Raises:
        ValueError: mid-epoch with another batch size, or an epoch now too short
            for the batches already done; or a run already finished.
    """
    data, params = cfg.train_data, cfg.train_params
    if position.epoch_step:
        stored_batch = ((stored or {}).get("train_data") or {}).get("batch_size")
        processes = f"{world_size} process{'es' if world_size > 1 else ''}"
        stopped_at = f"{path} stopped at batch {position.epoch_step} of epoch "
        if (
            stored_batch in (None, data.batch_size)
            and position.epoch_step >= steps_per_epoch
        ):
            raise ValueError(
                f"{stopped_at}{position.epoch}, but an epoch of this run has "
                f"{steps_per_epoch} batches per process ({train_images} training "
                f"images in {data.data_path}, {processes}): fewer images or more "
                "processes than when the run began; resume with the same folder and "
                "process count, or start a new run from its weights with --init-from"
            )
        if stored_batch not in (None, data.batch_size):
            raise ValueError(
                f"{stopped_at}{position.epoch} with batch_size "
                f"{stored_batch or 'unknown'}; a mid-epoch resume needs that "
                f"batch_size and the same process count (this run: batch_size "
                f"{data.batch_size}, {processes}), "
                "or start a new run from its weights with --init-from"
            )
    if run_finished(cfg, position):
        limit = (
            f"train_params.max_steps={params.max_steps}"
            if params.max_steps and position.global_step >= params.max_steps
            else f"train_data.epochs={data.epochs}"
        )
        raise ValueError(
            f"{path} already finished its run at step {position.global_step} "
            f"({limit}); raise that limit with --set to train further"
        )


def check_not_behind(
    path: str, experiment_path: str, position: int, counter: str = "global_step"
) -> None:
    """Refuse a resume from ``path`` that would replace a later state of the run in
    ``experiment_path``: its ``checkpoint.pth.tar``, when it is another file than
    ``path`` and its ``counter`` (the step; an ACL run's epoch) is past ``position``,
    the resumed one. Resuming a run's ``checkpoint_best_loss.pth.tar`` replaced the
    run's later last state with an earlier one, losing the steps between, silently.
    A last state that cannot be read holds no steps to lose, and is not compared.

    Raises:
        ValueError: saying how to go on: resume from the later checkpoint, or write
            elsewhere with ``--set train_data.experiment_path``.
    """
    last = os.path.join(experiment_path, LAST_NAME)
    if not os.path.isfile(last) or (
        os.path.exists(path) and os.path.samefile(last, path)
    ):
        return
    try:
        later = read_resume_checkpoint(last, required=(counter,))[counter]
    except (ValueError, OSError):
        return
    if later > position:
        name = counter.replace("_", " ")
        raise ValueError(
            f"{last} is at {name} {later}, past {path} ({name} {position}), and "
            f"resuming would replace it: resume from {last} to continue that run, or "
            "write elsewhere with --set train_data.experiment_path=FOLDER"
        )


def config_changes(stored: Optional[dict], cfg) -> List[str]:
    """``block.key: old -> new`` for each key of ``cfg`` that differs from ``stored``.

    The stored config is read as a config file would be (the authors' key names of
    older checkpoints are mapped to ours); where the checkpoint came from is not a
    change.
    """
    if not stored:
        return []
    try:
        stored = to_plain_dict(parse_config(stored, "stored config"))
    except ValueError:  # a config from another version: compare it as it is
        stored = rename_legacy_keys(stored)
    return [
        change
        for change in config_differences(stored, to_plain_dict(cfg))
        if not change.startswith(_START_KEYS)
    ]


def forgotten_bests_warning(bests: str) -> str:
    """The warning of a resume whose loss changed (:func:`report_config_changes`):
    ``bests`` (the best checkpoints the run keeps) and the plateau schedule start
    again."""
    return (
        "warning: the loss changed, so earlier validation losses do not compare: "
        f"{bests} and the plateau schedule start again from the next validation"
    )


def report_config_changes(
    stored: Optional[dict], cfg, log, loss_keys: Tuple[str, ...] = LOSS_KEYS
) -> bool:
    """Log each key of ``cfg`` that differs from the checkpoint's ``stored`` config
    (:func:`config_changes`) and a reminder of how to keep the stored values.

    Returns whether one of the changes is of ``loss_keys``: the validation losses
    of the checkpoint and those to come then measure different things, and the
    caller forgets the best one it holds.
    """
    changes = config_changes(stored, cfg)
    for change in changes:
        log(f"warning: config changed since the checkpoint: {change}")
    if changes:
        log(
            "warning: the run continues with the changed values; "
            "train.py --resume CHECKPOINT without --config or --set keeps the "
            "checkpoint's config"
        )
    return any(change.startswith(loss_keys) for change in changes)


def config_differences(old: dict, new: dict, prefix: str = "") -> List[str]:
    """``["block.key: old -> new", ...]`` for the entries that differ."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_differences(a, b, prefix=name + ".")
        elif a != b:
            changes.append(f"{name}: {a!r} -> {b!r}")
    return changes


def run_state_exists(last: str) -> ValueError:
    """The refusal of a new run in a folder whose ``last`` (a run's
    ``checkpoint.pth.tar``) it would overwrite; open-loop and ACL runs alike."""
    return ValueError(
        f"{last} exists: pass --resume to continue that run, or choose "
        "another train_data.experiment_path"
    )


def check_experiment_folder(
    folder: str, resumed_from: str, resumed_step: Optional[int] = None
) -> None:
    """Refuse a new run (``resumed_from`` empty) in a ``folder`` that holds another
    run's checkpoints, and a resume from ``resumed_from`` at ``resumed_step`` (once
    known) in one that holds a later state (:func:`check_not_behind`).

    Raises:
        ValueError: naming the file in the way and what to do.
    """
    if resumed_from:
        if resumed_step is not None:
            check_not_behind(resumed_from, folder, resumed_step)
        return
    last, best = os.path.join(folder, LAST_NAME), os.path.join(folder, BEST_NAME)
    if os.path.exists(last):
        raise run_state_exists(last)
    if os.path.exists(best):
        raise ValueError(
            f"{best} exists, which a new run would overwrite: choose another "
            "train_data.experiment_path, or move that file away"
        )
