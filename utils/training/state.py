"""Training checkpoints: what they hold, how they are written and read back.

A checkpoint is a plain dict in the CPS authors' format (``epoch``, ``state_dict``,
``loss``, ``optimizer``, ``aux_optimizer``, ``lr_scheduler``) extended with what
exact resumption and self-description need::

    architecture, model_config   registry name and constructor kwargs (models.load_checkpoint)
    config                       the full resolved training config
    global_step, epoch_step      position: steps done in total and in the current epoch
    best_loss, nonfinite_in_a_row
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

import torch
from torch import nn

import compressai

from models.checkpoint import load_state_dict_into, read_checkpoint_file, unwrap_state_dict
from utils.atomic import atomic_torch_save
from utils.training.config import to_plain_dict

__all__ = ["LAST_NAME", "BEST_NAME", "TrainPosition", "build_checkpoint", "save_checkpoint",
           "read_resume_checkpoint", "init_weights_from", "config_differences"]

LAST_NAME = "checkpoint.pth.tar"
BEST_NAME = "checkpoint_best_loss.pth.tar"
RNG_SCHEME = "crops: EpochSampler(seed, epoch); noise: step_seed(seed, step, rank)"


class TrainPosition:
    """Where training stands; everything besides the modules that a resume restores."""

    def __init__(self):
        self.epoch = 0
        self.epoch_step = 0
        self.global_step = 0
        self.best_loss = math.inf
        self.last_val_loss: Optional[float] = None
        self.nonfinite_in_a_row = 0


def build_checkpoint(raw: nn.Module, optimizer, aux_optimizer, scheduler, config,
                     pos: TrainPosition, state_dict=None, aux_loss=None) -> dict:
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
        "architecture": getattr(raw, "registry_name", type(raw).__name__),
        "model_config": dict(getattr(raw, "config", {})),
        "config": to_plain_dict(config),
        "global_step": pos.global_step,
        "epoch_step": pos.epoch_step,
        "best_loss": pos.best_loss,
        "nonfinite_in_a_row": pos.nonfinite_in_a_row,
        "rng": _rng_state(int(config["train_params"]["seed"])),
        "aux_loss": aux_loss,
        "versions": {"torch": str(torch.__version__), "compressai": str(compressai.__version__)},
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
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(checkpoint: dict, experiment_path: str, name: str = LAST_NAME) -> str:
    """Write ``checkpoint`` atomically to ``experiment_path/name``; return the path."""
    path = os.path.join(experiment_path, name)
    atomic_torch_save(checkpoint, path)
    return path


_RESUME_KEYS = ("state_dict", "optimizer", "aux_optimizer", "lr_scheduler", "global_step",
                "epoch", "epoch_step")


def read_resume_checkpoint(path: str) -> dict:
    """Read a checkpoint written by this trainer, or raise a one-line ValueError."""
    checkpoint = read_checkpoint_file(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"cannot resume from {path}: not a training checkpoint")
    missing = [k for k in _RESUME_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"cannot resume from {path}: it has no {missing[0]!r} entry (not "
                         "written by this train.py); use --init-from to start from its weights")
    return checkpoint


def restore(checkpoint: dict, raw: nn.Module, optimizer, aux_optimizer, scheduler,
            pos: TrainPosition) -> None:
    """Load model, optimizers, schedule and position from a resume checkpoint."""
    load_state_dict_into(raw, unwrap_state_dict(checkpoint))
    optimizer.load_state_dict(checkpoint["optimizer"])
    aux_optimizer.load_state_dict(checkpoint["aux_optimizer"])
    scheduler.load_state_dict(checkpoint["lr_scheduler"])
    pos.epoch = int(checkpoint["epoch"])
    pos.epoch_step = int(checkpoint["epoch_step"])
    pos.global_step = int(checkpoint["global_step"])
    pos.best_loss = float(checkpoint.get("best_loss", math.inf))
    pos.last_val_loss = checkpoint.get("loss")
    pos.nonfinite_in_a_row = int(checkpoint.get("nonfinite_in_a_row", 0))
    _restore_rng(checkpoint.get("rng") or {})


def init_weights_from(path: str, raw: nn.Module) -> None:
    """Load only the weights of ``path`` (any format models.load_checkpoint reads).

    For fine-tuning to another lambda: optimizers, schedule and step start afresh.
    """
    checkpoint = read_checkpoint_file(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"cannot initialise from {path}: it holds a {type(checkpoint).__name__}")
    try:
        load_state_dict_into(raw, unwrap_state_dict(checkpoint))
    except ValueError as exc:
        raise ValueError(f"cannot initialise from {path}: {exc}") from None


def config_differences(old: dict, new: dict, prefix: str = "") -> list:
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
