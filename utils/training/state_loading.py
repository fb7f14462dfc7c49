"""Training checkpoints read back: a resume checkpoint's entries checked, loaded into
a run (:func:`restore`), or its weights alone (:func:`init_weights_from`).

What a checkpoint holds, and how it is written, is :mod:`utils.training.state`'s.
Every entry is checked before it is loaded, so that a damaged or hand-edited file
fails with one line naming the entry, and not deep inside ``load_state_dict``; weights
whose sizes differ from the run's model name the config key that would make them fit.
"""

import math
from typing import Optional

import torch
from torch import nn

from models.checkpoint import (
    ArchitectureMismatch,
    load_state_dict_into,
    unwrap_state_dict,
)
from models.checkpoint_file import read_checkpoint_file
from utils.training.optimizers import with_implementation_of
from utils.training.state import TrainPosition

__all__ = [
    "read_resume_checkpoint",
    "check_resume_entries",
    "stored_config",
    "load_entry",
    "restore",
    "init_weights_from",
    "with_configured_state",
]


_RESUME_KEYS = (
    "state_dict",
    "optimizer",
    "aux_optimizer",
    "lr_scheduler",
    "global_step",
    "epoch",
    "epoch_step",
)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_optimizer_state(v) -> bool:
    return (
        isinstance(v, dict)
        and isinstance(v.get("state"), dict)
        and isinstance(v.get("param_groups"), list)
        and len(v["param_groups"]) > 0
        and all(
            isinstance(g, dict) and isinstance(g.get("params"), list)
            for g in v["param_groups"]
        )
    )


def _is_byte_tensor(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1


def _is_rng_state(v) -> bool:
    if not isinstance(v, dict):
        return False
    cuda = v.get("cuda", [])
    return (
        ("torch" not in v or _is_byte_tensor(v["torch"]))
        and isinstance(cuda, (list, tuple))
        and all(_is_byte_tensor(t) for t in cuda)
    )


# What each entry of a resume checkpoint must be: (test, description for the error).
ENTRY_CHECKS = {
    "state_dict": (
        lambda v: (
            isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values())
        ),
        "a mapping of tensors",
    ),
    "optimizer": (_is_optimizer_state, "an optimizer state (state, param_groups)"),
    "aux_optimizer": (_is_optimizer_state, "an optimizer state (state, param_groups)"),
    "lr_scheduler": (lambda v: isinstance(v, dict) and len(v) > 0, "a scheduler state"),
    "global_step": (_is_count, "an integer >= 0"),
    "epoch": (_is_count, "an integer >= 0"),
    "epoch_step": (_is_count, "an integer >= 0"),
    "nonfinite_in_a_row": (_is_count, "an integer >= 0"),
    "best_loss": (_is_number, "a number"),
    "best_step": (lambda v: v is None or _is_count(v), "an integer >= 0 or null"),
    "loss": (lambda v: v is None or _is_number(v), "a number or null"),
    "config": (
        lambda v: isinstance(v, dict),
        "a mapping (the resolved training config)",
    ),
    "rng": (_is_rng_state, "a mapping of uint8 generator states ('torch', 'cuda')"),
    "acl_state": (lambda v: isinstance(v, dict), "a mapping (the ACL position)"),
}


def check_resume_entries(checkpoint, path: str, required=_RESUME_KEYS) -> dict:
    """Check a loaded resume checkpoint; return it or raise one ValueError line.

    ``required`` must all be present; every entry of :data:`ENTRY_CHECKS` that is
    present must have the expected type, so a damaged or hand-edited file fails here,
    naming the entry, and not deep inside ``load_state_dict``.
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"cannot resume from {path}: it holds a {type(checkpoint).__name__}, "
            "not a training checkpoint"
        )
    missing = [k for k in required if k not in checkpoint]
    if missing:
        raise ValueError(
            f"cannot resume from {path}: it has no {missing[0]!r} entry (not "
            "written by this train.py); use --init-from to start from its weights"
        )
    for key, (test, what) in ENTRY_CHECKS.items():
        if key in checkpoint and not test(checkpoint[key]):
            got = checkpoint[key]
            shown = repr(got) if len(repr(got)) <= 40 else type(got).__name__
            raise ValueError(
                f"cannot resume from {path}: entry {key!r} must be {what}, got {shown}"
            )
    return checkpoint


def read_resume_checkpoint(path: str, required=_RESUME_KEYS) -> dict:
    """Read and check a checkpoint written by this trainer.

    See :func:`check_resume_entries`.
    """
    return check_resume_entries(read_checkpoint_file(path), path, required)


def stored_config(path: str) -> dict:
    """The resolved training config stored in the checkpoint ``path``."""
    checkpoint = read_resume_checkpoint(path, required=("config",))
    return checkpoint["config"]


def load_entry(target, checkpoint: dict, key: str, path: str) -> None:
    """``target.load_state_dict(checkpoint[key])``; a one-line error names ``key``.

    An optimizer keeps its own implementation (fused or not, see
    :func:`utils.training.optimizers.with_implementation_of`)."""
    try:
        stored = checkpoint[key]
        if isinstance(target, torch.optim.Optimizer) and isinstance(stored, dict):
            stored = with_implementation_of(target, stored)
        _check_like(target.state_dict(), stored)
        target.load_state_dict(stored)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ValueError(
            f"cannot resume from {path}: entry {key!r} does not fit this model "
            f"and config ({reason})"
        ) from None


def _check_like(fresh: dict, stored: dict) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``stored`` has only keys of
    ``fresh``, each holding the same kind of value.

    Schedulers' ``load_state_dict`` copies whatever it is given into the object, so
    a damaged entry would only fail steps later, inside ``step()``. (Keys missing
    from ``stored``, as in states written by an older PyTorch, keep their values.)
    """
    for name, value in stored.items():
        if name not in fresh:
            raise ValueError(f"unexpected key {name!r}")
        expected = fresh[name]
        if value is None or expected is None:
            continue
        if _is_number(expected) and _is_number(value):
            continue
        if not isinstance(value, type(expected)) and not isinstance(
            expected, type(value)
        ):
            raise TypeError(
                f"{name!r} is a {type(value).__name__}, "
                f"expected a {type(expected).__name__}"
            )


def with_configured_state(raw: nn.Module, state_dict) -> dict:
    """``state_dict`` with ``raw``'s configured entries (``configured_state``, built
    from this run's config) in place of the stored ones: the run trains with the
    config's values, and a stored ``lmbdas`` buffer would have its checkpoints claim
    the lambdas of the run it came from."""
    return {**state_dict, **raw.configured_state()}


def _restore_rng(rng: dict) -> None:
    """Put the global generators back where the checkpoint left them.

    Training itself does not need it (every step re-seeds, see
    :mod:`utils.training.state`); it keeps any other use of the global RNG after a
    resume (a model with dropout, say) on the uninterrupted run's track.
    """
    if isinstance(rng.get("torch"), torch.Tensor):
        torch.set_rng_state(rng["torch"])
    cuda_states = rng.get("cuda")
    if (
        cuda_states
        and torch.cuda.is_available()
        and len(cuda_states) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(cuda_states)


def _load_weights(raw: nn.Module, checkpoint: dict, failure: str) -> None:
    """Load ``checkpoint``'s weights into ``raw``, or raise ``ValueError`` starting
    with ``failure``. Weights of other sizes (a --set or a config that changed
    them) name the config key, from the sizes the file holds (its own lambdas
    included), rather than list shape mismatches."""
    try:
        stored = unwrap_state_dict(checkpoint)
        load_state_dict_into(raw, with_configured_state(raw, stored))
    except ValueError as exc:
        difference = isinstance(exc, ArchitectureMismatch) and _size_difference(
            raw, stored
        )
        raise ValueError(f"{failure}: {difference or exc}") from None


def restore(
    checkpoint: dict,
    raw: nn.Module,
    optimizer,
    aux_optimizer,
    scheduler,
    pos: TrainPosition,
    path: str = "checkpoint",
) -> None:
    """Load model, optimizers, schedule, position from a checked resume checkpoint."""
    _load_weights(raw, checkpoint, f"cannot resume from {path}")
    load_entry(optimizer, checkpoint, "optimizer", path)
    load_entry(aux_optimizer, checkpoint, "aux_optimizer", path)
    load_entry(scheduler, checkpoint, "lr_scheduler", path)
    pos.epoch = checkpoint["epoch"]
    pos.epoch_step = checkpoint["epoch_step"]
    pos.global_step = checkpoint["global_step"]
    pos.best_loss = float(checkpoint.get("best_loss", math.inf))
    pos.best_step = checkpoint.get("best_step")  # absent from older checkpoints
    pos.last_val_loss = checkpoint.get("loss")
    pos.nonfinite_in_a_row = checkpoint.get("nonfinite_in_a_row", 0)
    _restore_rng(checkpoint.get("rng") or {})


def init_weights_from(path: str, raw: nn.Module) -> None:
    """Load only the weights of ``path`` (any format models.load_checkpoint reads).

    For fine-tuning to another lambda: optimizers, schedule and step start afresh.
    """
    checkpoint = read_checkpoint_file(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"cannot initialise from {path}: it holds a {type(checkpoint).__name__}"
        )
    stored_architecture = checkpoint.get("architecture")
    if (
        isinstance(stored_architecture, str)
        and stored_architecture != raw.registry_name
    ):
        raise ValueError(
            f"cannot initialise a {raw.registry_name!r} model from {path}: it "
            f"holds a {stored_architecture!r} model (model.architecture)"
        )
    _load_weights(raw, checkpoint, f"cannot initialise from {path}")


def _size_difference(raw: nn.Module, state_dict) -> Optional[str]:
    """``"its weights have N=192, this run's model N=128 (...)"`` when the sizes differ.

    Shape mismatches are the usual reason weights do not fit a run: the config asks for
    another width. Naming the size says which key to set; ``None`` when the weights do
    not even build a model of this architecture (the caller reports the keys instead).
    """
    try:
        stored = type(raw).from_state_dict(state_dict).config
    except (KeyError, IndexError, TypeError, AttributeError, RuntimeError, ValueError):
        return None
    differing = [key for key in sorted(stored) if stored[key] != raw.config.get(key)]
    if not differing:
        return None
    sizes = ", ".join(f"{key}={stored[key]!r}" for key in differing)
    ours = ", ".join(f"{key}={raw.config.get(key)!r}" for key in differing)
    keys = ", ".join(
        "train_params.N" if key == "N" else f"model.kwargs.{key}" for key in differing
    )
    return f"its weights have {sizes}, this run's model {ours} (set {keys} to match)"
