"""Training checkpoints: what they hold, how they are written and read back.

A checkpoint is a plain dict in the CPS authors' format (``epoch``, ``state_dict``,
``loss``, ``optimizer``, ``aux_optimizer``, ``lr_scheduler``) extended with what
exact resumption and self-description need::

    architecture, model_config   registry name and constructor kwargs
                                 (models.load_checkpoint builds the first and
                                 checks the second against the weights)
    config                       the full resolved training config
    global_step, epoch_step      position: steps done in total and in the current epoch
    best_loss, nonfinite_in_a_row
    quantiles_solved             False in the last state, True in the best one:
                                 whether the entropy bottlenecks' quantiles were
                                 solved for coding
    rng                          {"seed", "scheme", "torch", "cuda"}: how every random
                                 draw is derived, and the global generators' states
    aux_loss, versions

Only tensors and plain Python types are stored, so ``torch.load(weights_only=True)``
reads it, and the state dict carries no ``module.`` prefix. Randomness follows a
recipe: crops come from ``EpochSampler`` seeds and the quantisation noise of step
``k`` from ``step_seed(seed, k, rank)``, which is why a resumed run continues bit
for bit (on CPU) whatever the generators' states; those are stored and restored
as well, for any other user of the global RNG.

Files are written atomically (:mod:`utils.atomic`): ``checkpoint.pth.tar`` (the last
state, for resuming) and ``checkpoint_best_loss.pth.tar`` (lowest validation loss,
with quantiles solved for coding, see :func:`utils.training.step.coding_state_dict`).
"""

import math
import os
from typing import Optional

import compressai
import torch
from torch import nn

from models.checkpoint import (
    ArchitectureMismatch,
    load_state_dict_into,
    unwrap_state_dict,
)
from models.checkpoint_file import read_checkpoint_file
from utils.atomic import atomic_torch_save
from utils.training.config import LAST_NAME, to_plain_dict
from utils.training.optimizers import with_implementation_of

__all__ = [
    "TrainPosition",
    "build_checkpoint",
    "save_checkpoint",
    "read_resume_checkpoint",
    "check_resume_entries",
    "stored_config",
    "load_entry",
    "restore",
    "init_weights_from",
    "with_configured_state",
]

RNG_SCHEME = "crops: EpochSampler(seed, epoch); noise: step_seed(seed, step, rank)"


class TrainPosition:
    """Where training stands; everything besides the modules that a resume restores."""

    def __init__(self):
        self.epoch = 0
        self.epoch_step = 0
        self.global_step = 0
        self.best_loss = math.inf
        self.best_step: Optional[int] = None  # the step of the best checkpoint
        self.last_val_loss: Optional[float] = None
        self.nonfinite_in_a_row = 0


def build_checkpoint(
    raw: nn.Module,
    optimizer,
    aux_optimizer,
    scheduler,
    config,
    pos: TrainPosition,
    state_dict=None,
    aux_loss=None,
) -> dict:
    """Assemble the checkpoint dict. ``state_dict`` (and its ``aux_loss``) default to
    ``raw``'s own.

    ``raw.update(force=True)`` must have run so that the stored tables match the
    stored quantiles (the trainer does this before saving).
    """
    if state_dict is None:
        state_dict = {k: v.detach().cpu() for k, v in raw.state_dict().items()}
    if aux_loss is None:
        with torch.no_grad():
            aux_loss = float(raw.aux_loss())
    return {
        "epoch": pos.epoch,
        "state_dict": state_dict,
        "loss": pos.last_val_loss,
        "optimizer": optimizer.state_dict(),
        "aux_optimizer": aux_optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "architecture": raw.registry_name,
        "model_config": dict(raw.config),
        "config": to_plain_dict(config),
        "global_step": pos.global_step,
        "epoch_step": pos.epoch_step,
        "best_loss": pos.best_loss,
        "best_step": pos.best_step,
        "nonfinite_in_a_row": pos.nonfinite_in_a_row,
        # The live model's quantiles follow the auxiliary loss; the caller marks the
        # copy whose quantiles coding_state_dict solved.
        "quantiles_solved": False,
        "rng": _rng_state(int(config["train_params"]["seed"])),
        "aux_loss": aux_loss,
        "versions": {
            "torch": str(torch.__version__),
            "compressai": str(compressai.__version__),
        },
    }


def _rng_state(seed: int) -> dict:
    """The RNG recipe plus the generators' current states (uint8 tensors)."""
    state = {"seed": seed, "scheme": RNG_SCHEME, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(rng: dict) -> None:
    """Put the global generators back where the checkpoint left them.

    Training itself does not need it (every step re-seeds, see the module
    docstring); it keeps any other use of the global RNG after a resume (a model
    with dropout, say) on the uninterrupted run's track.
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


def save_checkpoint(
    checkpoint: dict, experiment_path: str, name: str = LAST_NAME
) -> str:
    """Write ``checkpoint`` atomically to ``experiment_path/name``; return the path."""
    path = os.path.join(experiment_path, name)
    atomic_torch_save(checkpoint, path)
    return path


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
    try:
        stored = unwrap_state_dict(checkpoint)
        load_state_dict_into(raw, with_configured_state(raw, stored))
    except ValueError as exc:
        # A --set that changed the sizes: name the key, as --init-from does.
        difference = isinstance(exc, ArchitectureMismatch) and _size_difference(
            raw, stored
        )
        raise ValueError(f"cannot resume from {path}: {difference or exc}") from None
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
    try:
        stored = unwrap_state_dict(checkpoint)
        load_state_dict_into(raw, with_configured_state(raw, stored))
    except ValueError as exc:
        # The stored sizes, as the file holds them (its own lambdas included).
        difference = isinstance(exc, ArchitectureMismatch) and _size_difference(
            raw, stored
        )
        raise ValueError(
            f"cannot initialise from {path}: {difference or exc}"
        ) from None


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
