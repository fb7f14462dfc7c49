"""An asymptotic closed-loop (ACL) training run (:mod:`utils.training.acl` holds the
procedure): the model, data and files of a run, its training and regeneration phases,
and :func:`run_acl`, the entry point for ``train.py``.

The state is saved after every epoch and phase (``checkpoint.pth.tar``, so
``train.py --resume`` finds it) and regeneration skips images already written, so
an interrupted run continues where it stopped.
"""

import math
import os
from dataclasses import asdict
from typing import Callable, List, Mapping, Optional

import torch
from torch.utils.data import DataLoader

from datasets import list_split
from datasets.context_pairs import ContextPairs
from datasets.sampler import epoch_seed
from datasets.workers import GroupSafeDataLoader, leave_process_group, usable_workers
from models.checkpoint import (
    load_state_dict_into,
    unwrap_state_dict,
)
from models.checkpoint_file import read_checkpoint_file
from utils.atomic import atomic_torch_save
from utils.training.acl import (
    ACLState,
    closed_loop_loss,
    finish_iteration,
    iteration_converged,
    next_learning_rate,
    open_loop_loss,
    regenerate_contexts,
    train_epoch,
)
from utils.training.acl_resume import read_acl_checkpoint, resume_acl
from utils.training.bad_images import usable_images
from utils.training.build import acl_problems, build_configured_model
from utils.training.config import LAST_NAME as STATE_NAME
from utils.training.config import to_plain_dict
from utils.training.resume import check_not_behind, run_state_exists
from utils.training.run_lock import refuse_if_locked, take_experiment_folder
from utils.training.schema import unread_by_acl
from utils.training.state_loading import init_weights_from

__all__ = ["STATE_NAME", "run_acl"]


class _Run:
    """The model, data lists, criterion and files of one ACL run, from the training
    config."""

    def __init__(
        self, cfg: Mapping, settings: Mapping, device: torch.device, log: Callable
    ):
        data, params = cfg["train_data"], cfg["train_params"]
        self.settings, self.device, self.log, self.config = settings, device, log, cfg
        torch.manual_seed(params["seed"])  # the same initial weights in every run
        self.model = build_configured_model(cfg)
        problems = acl_problems(cfg, type(self.model))
        if problems:
            raise ValueError("; ".join(problems))
        self.model.to(device)
        self.block_size = self.model.block_size
        self.exp = data["experiment_path"]
        self.batch_size = data["batch_size"]
        self.workers = usable_workers(data["num_workers"], log)
        self.crop, self.seed = params["crop_size"], params["seed"]
        self.initial_lr = params["learning_rate"]
        self.plateau = cfg["lr_schedule"]
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
            f"acl: {len(self.originals['train'])} training images; validation and "
            f"model selection on {os.path.abspath(validation)} "
            f"({len(self.originals['val'])} images)"
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
        return GroupSafeDataLoader(
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
        """A coding-ready checkpoint (entropy tables built) that
        ``models.load_checkpoint`` reads, with the run's config: a release of it
        (:mod:`utils.training.release`) says how the model was trained."""
        with torch.no_grad():
            self.model.update(force=True)
        atomic_torch_save(
            self._checkpoint(config=to_plain_dict(self.config), **info),
            os.path.join(self.exp, name),
        )

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
                f"model_best_acl_{k}.pth.tar",
                acl_iteration=k,
                epoch=state.epoch,
                loss=open_loop,
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
                    f"model_best_acl_{k}rr.pth.tar",
                    acl_iteration=k,
                    epoch=state.epoch,
                    loss=closed,
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
        done = iteration_converged(state, settings, open_loop) or (
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


def run_acl(
    cfg: Mapping, device: torch.device, log: Callable[[str], None] = print
) -> ACLState:
    """Train ``cfg``'s model with ACL until ``acl.max_iterations`` iterations are done.

    ``cfg`` is the validated training config
    (:func:`utils.training.config.parse_config`, which also holds the ``acl``
    block's defaults and checks): ``train_data`` (data_path, experiment_path,
    batch_size, num_workers, use_checkpoint_path to resume, init_checkpoint_path),
    ``train_params`` (crop_size, learning_rate, lmbda, distortion_metric, seed, N),
    ``model`` (name, kwargs) and ``acl`` (the procedure's settings). Single process.
    Returns the final state; the model to use is
    ``experiment_path/<state.selected>``.
    """
    settings = cfg["acl"]
    refuse_if_locked(cfg["train_data"]["experiment_path"])
    unread = unread_by_acl(cfg)
    if unread:
        log(
            f"warning: ACL training does not read {', '.join(unread)}; its acl "
            "block sets its epochs, stopping, clipping and validation"
        )
    data = cfg["train_data"]
    resumed = None
    if data["use_checkpoint_path"]:  # refused before any image is listed
        resumed = read_acl_checkpoint(data["use_checkpoint_path"])
    run = _Run(cfg, settings, device, log)
    last = os.path.join(run.exp, STATE_NAME)
    if resumed is not None:
        state, optimizer, scheduler = resume_acl(
            run, data["use_checkpoint_path"], *resumed
        )
    elif os.path.exists(last):
        raise run_state_exists(last)
    else:
        if data["init_checkpoint_path"]:
            init_weights_from(data["init_checkpoint_path"], run.model)
        state = ACLState(learning_rate=run.initial_lr)
        optimizer, scheduler = run.optimizer(run.initial_lr, state.mode)

    def recheck() -> None:  # under the lock: another run may have written since
        if data["use_checkpoint_path"]:
            check_not_behind(data["use_checkpoint_path"], run.exp, state.epoch, "epoch")
        elif os.path.exists(last):
            raise run_state_exists(last)

    # Only now: a refused run leaves no empty folder. The folder is this run's alone
    # until it ends (utils/training/run_lock.py).
    _, lock = take_experiment_folder(run.exp, recheck)
    try:
        while True:
            if state.phase == "train":
                _train_phase(run, state, optimizer, scheduler)
            if state.iteration + 1 >= settings.max_iterations:
                break
            optimizer, scheduler = _regenerate_phase(run, state)
    finally:
        lock.release()
    log(
        f"ACL finished after iteration {state.iteration}; use "
        f"{os.path.join(run.exp, state.selected)}"
    )
    return state
