"""Training checkpoints: what they hold and how they are written (reading them back,
checked, is :mod:`utils.training.state_loading`'s).

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

from utils.atomic import atomic_torch_save
from utils.training.config import LAST_NAME, to_plain_dict

__all__ = ["TrainPosition", "build_checkpoint", "save_checkpoint"]

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


def save_checkpoint(
    checkpoint: dict, experiment_path: str, name: str = LAST_NAME
) -> str:
    """Write ``checkpoint`` atomically to ``experiment_path/name``; return the path."""
    path = os.path.join(experiment_path, name)
    atomic_torch_save(checkpoint, path)
    return path
