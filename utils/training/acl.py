"""Asymptotic closed-loop (ACL) training of the Kamisli (2024) codec (paper Sec. 3.3,
``train_all_acl`` in the authors' code).

The codec is closed loop: a block is coded from the *reconstructions* of its
neighbours, which depend on the model being trained. ACL trains open loop on pairs
(x, z_k), where the neighbour context z_k is a fixed image set, and regenerates that
set between iterations with the current model, so that the context approaches the
model's own closed-loop reconstructions:

.. code-block:: none

    z_0 = x                                     (iteration 0: teacher forcing)
    iteration k: epochs of RD training on (x, z_k), loss = RD(f(x, z_k))
                 chained (after the switch): 1/2 RD(f(x, z_k)) + 1/2 RD(f(x, x_hat_1))
                 each epoch   L_ol = open-loop RD on validation pairs
                              -> LR plateau step, best -> model_best_acl_{k}
                 every max(1, closed_loop_every - k) epochs
                              L_cl = closed-loop RD (recursive reconstruction),
                              best over all iterations -> model_best_acl_{k}rr
                 stop: k = 0 and L_ol < itr0_threshold | L_ol (L_cl after the switch)
                       has not improved for more than count_thresholds[k] epochs
                 switch (k >= 2, open-loop mode): best L_cl did not improve by 1 %
                       -> closed-loop mode, chained loss, LR x 0.66
    select model_best_acl_{k} (open-loop mode) or model_best_acl_{k}rr, regenerate
    z_{k+1} = clamp(f(x, z_k)) in eval mode as 8-bit PNGs, new Adam with
    lr = lr0*w + lr*(1-w), w = max(5 - (k+1), 0)/10, and a new plateau scheduler.

This module holds the procedure's rules and steps; :mod:`utils.training.acl_run`
runs them with files, phases and resumption (``run_acl``, the entry point for
``train.py``).
"""

import math
import os
from dataclasses import dataclass, field
from typing import List, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets.context_pairs import ContextPairs
from utils.image_io import to_uint8, write_png

__all__ = [
    "count_threshold",
    "ACLState",
    "open_loop_loss",
    "closed_loop_loss",
    "regenerate_contexts",
    "train_epoch",
    "next_learning_rate",
    "finish_iteration",
    "iteration_converged",
]


def count_threshold(settings: Mapping, iteration: int) -> int:
    """Epochs without improvement that end ``iteration`` (``acl.count_thresholds``; the
    last entry holds for every later iteration)."""
    thresholds = settings["count_thresholds"]
    return thresholds[min(iteration, len(thresholds) - 1)]


@dataclass
class ACLState:
    """Where an ACL run stands (plain types only, saved in every checkpoint)."""

    iteration: int = 0
    phase: str = "train"  # "train" or "regenerate"
    mode: str = "ol_loss"  # convergence decided on open- or closed-loop loss
    chained: bool = False
    epoch: int = 0  # epochs over all iterations
    iteration_epochs: int = 0
    best_ol: float = math.inf  # reset at each open-loop-mode iteration
    best_cl: float = math.inf  # never reset
    best_cl_previous: float = math.inf  # best_cl when the previous iteration ended
    ol_stale: int = 0  # epochs without open-loop improvement
    cl_stale: int = 0  # closed-loop validations without improvement
    learning_rate: float = 0.0
    selected: str = ""  # checkpoint the regenerate phase starts from
    history: List[dict] = field(default_factory=list)

    def forget_best_losses(self) -> None:
        """Start the best open- and closed-loop losses (and their counts of epochs
        without improvement) again, after a change of what the validation losses
        measure. With no earlier closed-loop best to compare, the switch rule waits
        for an iteration measured with the new loss."""
        self.best_ol = self.best_cl = self.best_cl_previous = math.inf
        self.ol_stale = self.cl_stale = 0


@torch.no_grad()
def open_loop_loss(
    model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device
) -> float:
    """Mean RD loss of eval-mode passes on (x, z) pairs, reconstructions clamped."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, z in loader:
        x, z = x.to(device), z.to(device)
        out = model(x, z)
        out["x_hat"] = out["x_hat"].clamp(0, 1)
        total += float(criterion(out, x)["loss"]) * x.shape[0]
        count += x.shape[0]
    model.train(was_training)
    return total / count


def closed_loop_loss(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    device: torch.device,
    tile_blocks: int = 16,
) -> float:
    """Mean RD loss of closed-loop reconstructions (``model.closed_loop``, context
    rounded to 8 bits, as the authors' validation) of the images of ``loader``."""
    total, count = 0.0, 0
    for x, _ in loader:
        for image in x.to(device).split(1):
            out = model.closed_loop(image, tile_blocks, context_bits=8)
            total += float(criterion(out, image)["loss"])
            count += 1
    return total / count


@torch.no_grad()
def regenerate_contexts(
    model: nn.Module, pairs: ContextPairs, targets: Sequence[str], device: torch.device
) -> int:
    """Write ``clamp(model(x, z))`` (eval mode: rounded latents) as 8-bit PNGs.

    ``pairs`` must hold whole images (crop 0). Targets that exist are skipped (they
    were written atomically by an interrupted run of the same selected model), so
    calling this again resumes. Returns the number of images written.
    """
    was_training = model.training
    model.eval()
    written = 0
    for index, target in enumerate(targets):
        if os.path.exists(target):
            continue
        x, z = (t[None].to(device) for t in pairs[index])
        x_hat = model(x, z)["x_hat"][0].clamp(0, 1)
        write_png(target, to_uint8(x_hat))
        written += 1
    model.train(was_training)
    return written


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    device: torch.device,
    chained: bool,
    clip_value: float,
) -> float:
    """One epoch of open-loop training on (x, z) pairs; returns the mean loss.

    With ``chained`` the loss is ``(RD(f(x, z)) + RD(f(x, x_hat_1))) / 2`` where
    ``x_hat_1`` is the first pass's output, not detached: the gradient flows through
    both passes (twice the memory), as in the authors' code.
    """
    model.train()
    total, count = 0.0, 0
    for x, z in loader:
        x, z = x.to(device), z.to(device)
        out = model(x, z)
        loss = criterion(out, x)["loss"]
        if chained:
            loss = 0.5 * loss + 0.5 * criterion(model(x, out["x_hat"]), x)["loss"]
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise RuntimeError(
                f"non-finite ACL training loss {float(loss)}; lower the learning rate"
            )
        loss.backward()
        if clip_value > 0:
            nn.utils.clip_grad_value_(model.parameters(), clip_value)
        optimizer.step()
        total += float(loss.detach()) * x.shape[0]
        count += x.shape[0]
    return total / max(count, 1)


def next_learning_rate(initial: float, current: float, iteration: int) -> float:
    """Learning rate at the start of ``iteration``: back towards the initial rate in
    the early iterations, ``w*initial + (1-w)*current`` with ``w = max(5-k, 0)/10``."""
    weight = max(5 - iteration, 0) / 10
    return initial * weight + current * (1.0 - weight)


def iteration_converged(state: ACLState, settings: Mapping, open_loop: float) -> bool:
    """Whether the training phase of ``state.iteration`` ends: the watched loss
    (closed-loop after the switch, else open-loop) has not improved for more than
    :func:`count_threshold` epochs; iteration 0 ends below ``itr0_threshold``."""
    threshold = count_threshold(settings, state.iteration)
    if state.mode == "cl_loss":
        return state.cl_stale > threshold
    if state.iteration == 0:
        return open_loop < settings.itr0_threshold
    return state.ol_stale > threshold


def finish_iteration(state: ACLState, settings: Mapping, optimizer) -> None:
    """End the training phase of an iteration: pick the checkpoint the next one starts
    from (``state.selected``) and apply the switch rule (mode, chained loss, LR)."""
    k = state.iteration
    # The rule compares two measured closed-loop bests: with none before this
    # iteration (forgotten on a change of the loss) there is nothing to compare,
    # and no closed-loop model to select.
    switch = (
        state.mode == "ol_loss"
        and k >= settings.switch_from_iteration
        and math.isfinite(state.best_cl_previous)
        and not state.best_cl < settings.switch_ratio * state.best_cl_previous
    )
    if state.mode == "ol_loss" and not switch:
        state.selected = f"model_best_acl_{k}.pth.tar"
        state.best_cl_previous = state.best_cl
    else:
        state.selected = f"model_best_acl_{k}rr.pth.tar"
        if switch:
            state.mode, state.chained = "cl_loss", True
            for group in optimizer.param_groups:
                group["lr"] *= settings.switch_lr_factor
    state.learning_rate = optimizer.param_groups[0]["lr"]
    state.phase = "regenerate"
