"""The optimizers and the learning-rate schedule of a training run.

CompressAI's split (``examples/train.py``): Adam for the network, a second Adam for
the entropy bottleneck's quantiles. Both are *fused* Adam, for one reason beyond
speed: a fused step accepts a ``found_inf`` flag on the device and skips its update
when the flag is set, so :class:`utils.training.step.TrainStep` can skip a
non-finite step without reading anything back to the CPU first (the CPU then queues
the next step while the GPU still runs this one).
"""

from typing import Iterable

import torch
from compressai.optimizers import net_aux_optimizer
from torch import Tensor, nn

from utils.training.distributed import aux_parameter_names

__all__ = [
    "build_optimizers",
    "check_fused",
    "step_unless",
    "with_implementation_of",
    "build_scheduler",
    "restart_plateau",
]

# The param-group settings that choose how a step is computed, not what it computes:
# a run keeps its own when it loads an optimizer state (see with_implementation_of).
IMPLEMENTATION_SETTINGS = ("fused", "foreach")


def build_optimizers(model: nn.Module, lr: float, aux_lr: float):
    """Fused Adam for the network, a separate fused Adam for the quantiles."""
    if not aux_parameter_names(model):
        # No EntropyBottleneck (kamisli2024): no quantiles to train. The aux
        # optimizer then holds one empty tensor, so that steps, checkpoints and
        # resume stay uniform.
        return (
            torch.optim.Adam(model.parameters(), lr=lr, fused=True),
            torch.optim.Adam(
                [torch.zeros(0, requires_grad=True)], lr=aux_lr, fused=True
            ),
        )
    conf = {
        "net": {"type": "Adam", "lr": lr, "fused": True},
        "aux": {"type": "Adam", "lr": aux_lr, "fused": True},
    }
    optimizers = net_aux_optimizer(model, conf)
    return optimizers["net"], optimizers["aux"]


def check_fused(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Raise ``ValueError`` unless every param group of ``optimizers`` is fused, which
    :func:`step_unless` needs (an unfused step refuses ``found_inf``)."""
    for optimizer in optimizers:
        if not all(group.get("fused") for group in optimizer.param_groups):
            raise ValueError(
                f"{type(optimizer).__name__} is not fused: a training step skips "
                "non-finite updates on the device, which needs fused optimizers "
                "(build them with utils.training.optimizers.build_optimizers)"
            )


def step_unless(optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """``optimizer.step()``, which leaves parameters, moments and step counts as they
    are where ``found_inf`` (a float32 scalar on the device) is 1.

    The flag reaches the fused kernel through the optimizer's ``found_inf``
    attribute, as :class:`torch.amp.GradScaler` passes it.
    """
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def with_implementation_of(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """The optimizer ``state`` to load into ``optimizer``, with ``optimizer``'s own
    :data:`IMPLEMENTATION_SETTINGS` in each param group.

    ``load_state_dict`` takes every group setting from the state, and a checkpoint
    written before the optimizers were fused says ``fused: None``: the resumed run
    would step unfused, which cannot skip an update on the device. A state that
    does not have this run's groups is returned unchanged, for ``load_state_dict``
    to refuse.
    """
    groups = state.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        return state
    if not all(isinstance(group, dict) for group in groups):
        return state
    settings = [
        {key: group[key] for key in IMPLEMENTATION_SETTINGS if key in group}
        for group in optimizer.param_groups
    ]
    return {
        **state,
        "param_groups": [
            {**group, **own} for group, own in zip(groups, settings, strict=True)
        ],
    }


def build_scheduler(optimizer: torch.optim.Optimizer, sched_cfg, total_steps: int):
    """The learning-rate schedule of ``lr_schedule``.

    Returns ``(scheduler, per)``; ``per`` is ``"validation"`` for the plateau
    schedule (stepped with the validation loss, as the authors do) and ``"step"``
    for the others (stepped after every training step; milestones are global steps).
    """
    kind = sched_cfg["type"]
    lr_sched = torch.optim.lr_scheduler
    if kind == "plateau":
        return lr_sched.ReduceLROnPlateau(
            optimizer,
            "min",
            factor=sched_cfg["factor"],
            patience=sched_cfg["patience"],
            min_lr=sched_cfg["min_lr"],
        ), "validation"
    if kind == "multistep":
        return lr_sched.MultiStepLR(
            optimizer,
            milestones=list(sched_cfg["milestones"]),
            gamma=sched_cfg["factor"],
        ), "step"
    if kind == "cosine":
        return lr_sched.CosineAnnealingLR(
            optimizer, T_max=max(1, total_steps), eta_min=sched_cfg["min_lr"]
        ), "step"
    if kind == "constant":
        return lr_sched.ConstantLR(optimizer, factor=1.0, total_iters=0), "step"
    raise ValueError(f"unknown lr_schedule.type {kind!r}")


def restart_plateau(scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau) -> None:
    """Make ``scheduler`` forget its best loss and its epochs without improvement,
    after a change of the loss: the next validation loss becomes its best."""
    scheduler.best = scheduler.mode_worse
    scheduler.num_bad_epochs = 0
