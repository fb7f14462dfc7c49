"""Resuming an ACL run from its ``checkpoint.pth.tar``.

The checkpoint is read and checked first (:func:`read_acl_checkpoint`), before the
run lists and checks its images, so that a file that cannot be resumed (a model file
the run wrote, a CPS checkpoint) is refused in the first second. Then
:func:`resume_acl` restores the weights, the optimizer, the plateau schedule and the
procedure's state, and forgets the best losses if the config changed what the
validation losses measure.
"""

from dataclasses import fields
from typing import Tuple

from models.checkpoint import load_state_dict_into, unwrap_state_dict
from models.checkpoint_file import read_checkpoint_file
from utils.training.acl import ACLState
from utils.training.config import LAST_NAME as STATE_NAME
from utils.training.optimizers import restart_plateau
from utils.training.resume import (
    LOSS_KEYS,
    check_not_behind,
    forgotten_bests_warning,
    report_config_changes,
)
from utils.training.state_loading import (
    check_resume_entries,
    load_entry,
    with_configured_state,
)

__all__ = ["ACL_LOSS_KEYS", "read_acl_checkpoint", "resume_acl"]

# What the ACL validation losses also depend on: the closed-loop tiling and the
# validation images.
ACL_LOSS_KEYS = LOSS_KEYS + ("acl.closed_loop_tile:", "acl.validation_path:")

_RESUME_KEYS = (
    "state_dict",
    "optimizer",
    "lr_scheduler",
    "acl_state",
    "epoch",
    "config",
)


def read_acl_checkpoint(path: str) -> Tuple[dict, ACLState]:
    """The ACL checkpoint at ``path`` and the procedure's state it holds.

    Raises:
        ValueError: naming ``path``, if it holds no ACL state (a model file the run
            wrote, another training's checkpoint) or lacks an entry a resume needs.
    """
    checkpoint = read_checkpoint_file(path)
    if isinstance(checkpoint, dict) and "acl_state" not in checkpoint:
        raise ValueError(
            f"cannot resume from {path}: it holds no ACL state (entry 'acl_state'); "
            f"resume from the run's {STATE_NAME}, or start from its weights "
            "with --init-from"
        )
    check_resume_entries(checkpoint, path, _RESUME_KEYS)
    try:
        state = ACLState(**checkpoint["acl_state"])
    except TypeError:
        raise ValueError(
            f"cannot resume from {path}: entry 'acl_state' has other keys "
            f"than {', '.join(f.name for f in fields(ACLState))}"
        ) from None
    return checkpoint, state


def resume_acl(run, path: str, checkpoint: dict, state: ACLState):
    """Restore ``checkpoint`` (read from ``path`` by :func:`read_acl_checkpoint`) into
    the ACL run ``run``: its weights, and a new optimizer and schedule loaded with the
    stored ones. A change of what the validation losses measure
    (:data:`ACL_LOSS_KEYS`) forgets the best losses of ``state``.

    Returns:
        ``(state, optimizer, scheduler)``.
    """
    check_not_behind(path, run.exp, checkpoint["epoch"], "epoch")
    try:
        weights = with_configured_state(run.model, unwrap_state_dict(checkpoint))
        load_state_dict_into(run.model, weights)
    except ValueError as exc:
        raise ValueError(f"cannot resume from {path}: {exc}") from None
    optimizer, scheduler = run.optimizer(state.learning_rate, state.mode)
    load_entry(optimizer, checkpoint, "optimizer", path)
    load_entry(scheduler, checkpoint, "lr_scheduler", path)
    run.log(
        f"resuming ACL iteration {state.iteration} ({state.phase}) after epoch "
        f"{state.epoch}"
    )
    if report_config_changes(checkpoint["config"], run.config, run.log, ACL_LOSS_KEYS):
        state.forget_best_losses()
        restart_plateau(scheduler)
        run.log(forgotten_bests_warning("the best open- and closed-loop checkpoints"))
    return state, optimizer, scheduler
