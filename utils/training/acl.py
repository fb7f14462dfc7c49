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
                 each epoch   L_ol = open-loop RD on validation pairs -> LR plateau step,
                              best -> model_best_acl_{k}
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

Entry point for ``train.py``: :func:`run_acl`. The state is saved after every epoch
and phase (``checkpoint.pth.tar``, so ``train.py --resume`` finds it) and regeneration
skips images already written, so an interrupted run continues where it stopped.
"""

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets import list_split
from datasets.context_pairs import ContextPairs
from datasets.sampler import epoch_seed
from datasets.workers import leave_process_group
from models.base import ClosedLoopTrainable
from models.checkpoint import (
    load_state_dict_into,
    read_checkpoint_file,
    unwrap_state_dict,
)
from utils.atomic import atomic_torch_save
from utils.cli import prepare_output_folder
from utils.image_io import to_uint8, write_png
from utils.training.bad_images import usable_images
from utils.training.build import build_configured_model
from utils.training.config import LAST_NAME as STATE_NAME
from utils.training.config import to_plain_dict
from utils.training.state import check_resume_entries, load_entry

__all__ = [
    "count_threshold",
    "ACLState",
    "open_loop_loss",
    "closed_loop_loss",
    "regenerate_contexts",
    "train_epoch",
    "next_learning_rate",
    "finish_iteration",
    "run_acl",
    "STATE_NAME",
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


class _Run:
    """The model, data lists, criterion and files of one ACL run (from the train config)."""

    def __init__(
        self, cfg: Mapping, settings: Mapping, device: torch.device, log: Callable
    ):
        data, params, model_cfg = cfg["train_data"], cfg["train_params"], cfg["model"]
        self.settings, self.device, self.log, self.config = settings, device, log, cfg
        torch.manual_seed(params["seed"])  # the same initial weights in every run
        self.model = build_configured_model(cfg)
        if not isinstance(self.model, ClosedLoopTrainable):
            raise ValueError(
                f"ACL training needs a block-based model that implements "
                f"models.base.ClosedLoopTrainable, such as kamisli2024, not "
                f"{model_cfg['name']!r}"
            )
        self.model.to(device)
        self.block_size = self.model.block_size
        self.exp = data["experiment_path"]
        self.batch_size, self.workers = data["batch_size"], data["num_workers"]
        self.crop, self.seed = params["crop_size"], params["seed"]
        self.initial_lr = params["learning_rate"]
        self.plateau = cfg["lr_schedule"]
        if self.plateau["type"] != "plateau":
            raise ValueError(
                f"ACL steps a plateau schedule on the validation loss; "
                f"lr_schedule.type is {self.plateau['type']!r}"
            )
        self.criterion = self.model.default_loss(
            params["lmbda"], params["distortion_metric"]
        )
        validation = settings.validation_path or os.path.join(data["data_path"], "test")
        listed = {
            "train": list_split(data["data_path"], "train").samples,
            "val": list_split(
                os.path.dirname(os.path.abspath(validation)),
                os.path.basename(os.path.abspath(validation)),
            ).samples,
        }
        self.originals = {
            split: usable_images(
                [str(p) for p in paths],
                split,
                data["max_bad_fraction"],
                data["max_image_pixels"],
                log,
            )
            for split, paths in listed.items()
        }
        log(
            f"acl: {len(self.originals['train'])} training images; validation and model "
            f"selection on {os.path.abspath(validation)} ({len(self.originals['val'])} images)"
        )

    def contexts(self, split: str, iteration: int) -> Optional[List[str]]:
        """Context images of iteration ``iteration`` (None at iteration 0: z = x)."""
        if iteration == 0:
            return None
        folder = os.path.join(self.exp, "acl", f"contexts_{iteration}", split)
        return [
            os.path.join(
                folder, f"{i:06d}_{os.path.splitext(os.path.basename(p))[0]}.png"
            )
            for i, p in enumerate(self.originals[split])
        ]

    def train_loader(self, iteration: int, epoch: int) -> DataLoader:
        pairs = ContextPairs(
            self.originals["train"],
            self.contexts("train", iteration),
            self.crop,
            self.block_size,
            self.seed,
        )
        pairs.set_epoch(epoch)
        return DataLoader(
            pairs,
            self.batch_size,
            shuffle=True,
            num_workers=self.workers,
            worker_init_fn=leave_process_group,
            generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)),
        )

    def val_pairs(self, iteration: int) -> ContextPairs:
        return ContextPairs(
            self.originals["val"], self.contexts("val", iteration), 0, self.block_size
        )

    def optimizer(self, lr: float, mode: str):
        """Adam and the authors' plateau schedule (a fresh pair at every iteration)."""
        settings, plateau = self.settings, self.plateau
        optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            factor=plateau["factor"],
            patience=plateau["patience"],
            threshold=settings.plateau_threshold,
            threshold_mode="rel",
            cooldown=settings.plateau_cooldown,
            min_lr=plateau["min_lr"]
            if mode == "ol_loss"
            else settings.min_lr_closed_loop,
        )
        return optimizer, scheduler

    def _checkpoint(self, **extra) -> dict:
        state_dict = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return {
            "architecture": self.model.registry_name,
            "model_config": self.model.config,
            "state_dict": state_dict,
            **extra,
        }

    def save_model(self, name: str, **info) -> None:
        """A coding-ready checkpoint (entropy tables built) that load_checkpoint reads."""
        with torch.no_grad():
            self.model.update(force=True)
        atomic_torch_save(self._checkpoint(**info), os.path.join(self.exp, name))

    def save_state(self, state: ACLState, optimizer, scheduler) -> None:
        atomic_torch_save(
            self._checkpoint(
                optimizer=optimizer.state_dict(),
                lr_scheduler=scheduler.state_dict(),
                acl_state=asdict(state),
                epoch=state.epoch,
                config=to_plain_dict(self.config),
            ),
            os.path.join(self.exp, STATE_NAME),
        )

    def load_weights(self, path: str) -> None:
        load_state_dict_into(self.model, unwrap_state_dict(read_checkpoint_file(path)))


def _converged(state: ACLState, settings: Mapping, open_loop: float) -> bool:
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
    switch = (
        state.mode == "ol_loss"
        and k >= settings.switch_from_iteration
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


def _train_phase(run: _Run, state: ACLState, optimizer, scheduler) -> None:
    settings, k = run.settings, state.iteration
    if state.iteration_epochs == 0 and state.mode == "ol_loss":
        state.best_ol = math.inf
    val_loader = DataLoader(run.val_pairs(k), batch_size=1)
    while True:
        # quantisation noise: resumable per epoch
        torch.manual_seed(epoch_seed(run.seed, state.epoch))
        train = train_epoch(
            run.model,
            run.train_loader(k, state.epoch),
            optimizer,
            run.criterion,
            run.device,
            state.chained,
            settings.clip_value,
        )
        state.epoch += 1
        state.iteration_epochs += 1
        open_loop = open_loop_loss(run.model, val_loader, run.criterion, run.device)
        scheduler.step(open_loop)
        record = {
            "iteration": k,
            "epoch": state.epoch,
            "train": train,
            "open_loop": open_loop,
        }
        if open_loop < state.best_ol:
            state.best_ol, state.ol_stale = open_loop, 0
            run.save_model(
                f"model_best_acl_{k}.pth.tar", acl_iteration=k, loss=open_loop
            )
        else:
            state.ol_stale += 1
        if state.epoch % max(1, settings.closed_loop_every - k) == 0:
            closed = closed_loop_loss(
                run.model,
                val_loader,
                run.criterion,
                run.device,
                settings.closed_loop_tile,
            )
            record["closed_loop"] = closed
            if closed < state.best_cl:
                state.best_cl, state.cl_stale = closed, 0
                run.save_model(
                    f"model_best_acl_{k}rr.pth.tar", acl_iteration=k, loss=closed
                )
            else:
                state.cl_stale += 1
        state.history.append(record)
        run.log(
            f"acl iteration {k} epoch {state.epoch}: "
            + ", ".join(
                f"{key} {value:.4f}"
                for key, value in record.items()
                if isinstance(value, float)
            )
        )
        done = _converged(state, settings, open_loop) or (
            0 < settings.max_epochs_per_iteration <= state.iteration_epochs
        )
        if done:
            finish_iteration(state, settings, optimizer)
        run.save_state(state, optimizer, scheduler)
        if done:
            return


def _regenerate_phase(run: _Run, state: ACLState):
    k = state.iteration
    selected = os.path.join(run.exp, state.selected)
    if os.path.exists(selected):
        run.load_weights(selected)
    else:  # no closed-loop validation beat the earlier iterations' best
        run.log(
            f"{state.selected} does not exist; iteration {k + 1} starts from the "
            "current weights"
        )
    for split in ("train", "val"):
        pairs = ContextPairs(
            run.originals[split], run.contexts(split, k), 0, run.block_size
        )
        count = regenerate_contexts(
            run.model, pairs, run.contexts(split, k + 1), run.device
        )
        run.log(f"acl iteration {k + 1}: wrote {count} {split} context images")
    state.iteration, state.phase = k + 1, "train"
    state.iteration_epochs = state.ol_stale = state.cl_stale = 0
    state.learning_rate = next_learning_rate(run.initial_lr, state.learning_rate, k + 1)
    optimizer, scheduler = run.optimizer(state.learning_rate, state.mode)
    run.save_state(state, optimizer, scheduler)
    return optimizer, scheduler


_RESUME_KEYS = (
    "state_dict",
    "optimizer",
    "lr_scheduler",
    "acl_state",
    "epoch",
    "config",
)


def run_acl(
    cfg: Mapping, device: torch.device, log: Callable[[str], None] = print
) -> ACLState:
    """Train ``cfg``'s model with ACL until ``acl.max_iterations`` iterations are done.

    ``cfg`` is the validated training config (:func:`utils.training.config.parse_config`,
    which also holds the ``acl`` block's defaults and checks): ``train_data``
    (data_path, experiment_path, batch_size, num_workers, use_checkpoint_path to
    resume, init_checkpoint_path), ``train_params`` (crop_size, learning_rate, lmbda,
    distortion_metric, seed, N), ``model`` (name, kwargs) and ``acl``
    (the procedure's settings). Single process. Returns the final state; the model to
    use is ``experiment_path/<state.selected>``.
    """
    settings = cfg["acl"]
    run = _Run(cfg, settings, device, log)
    data = cfg["train_data"]
    last = os.path.join(run.exp, STATE_NAME)
    if data["use_checkpoint_path"]:
        path = data["use_checkpoint_path"]
        checkpoint = read_checkpoint_file(path)
        if isinstance(checkpoint, dict) and "acl_state" not in checkpoint:
            raise ValueError(f"{path} is not an ACL checkpoint")
        check_resume_entries(checkpoint, path, _RESUME_KEYS)
        try:
            state = ACLState(**checkpoint["acl_state"])
        except TypeError:
            raise ValueError(
                f"cannot resume from {path}: entry 'acl_state' has other keys "
                f"than {', '.join(f.name for f in fields(ACLState))}"
            ) from None
        run.load_weights(path)
        optimizer, scheduler = run.optimizer(state.learning_rate, state.mode)
        load_entry(optimizer, checkpoint, "optimizer", path)
        load_entry(scheduler, checkpoint, "lr_scheduler", path)
        log(
            f"resuming ACL iteration {state.iteration} ({state.phase}) after epoch {state.epoch}"
        )
    elif os.path.exists(last):
        raise ValueError(
            f"{last} exists: pass --resume to continue that run, or choose "
            "another train_data.experiment_path"
        )
    else:
        if data["init_checkpoint_path"]:
            run.load_weights(data["init_checkpoint_path"])
        state = ACLState(learning_rate=run.initial_lr)
        optimizer, scheduler = run.optimizer(run.initial_lr, state.mode)
    # Only now: a refused run leaves no empty folder.
    prepare_output_folder(run.exp, "train_data.experiment_path")
    while True:
        if state.phase == "train":
            _train_phase(run, state, optimizer, scheduler)
        if state.iteration + 1 >= settings.max_iterations:
            break
        optimizer, scheduler = _regenerate_phase(run, state)
    log(
        f"ACL finished after iteration {state.iteration}; use "
        f"{os.path.join(run.exp, state.selected)}"
    )
    return state
