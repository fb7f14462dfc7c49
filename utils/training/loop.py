"""The training loop behind ``train.py``: data, model, steps, validation, checkpoints.

.. code-block:: none

    config ──► Trainer.__init__: build_model (registry) ─► datasets + EpochSampler
                                 ─► resume | init-from ─► DataLoader ─► DDP
    fit(): for epoch, for batch:  launch step k (seeded by k) ─► finish step k-1
                                  ─► log (tqdm, TensorBoard)
                                  ├─ epoch end / val_interval: validate ─► LR plateau
                                  │                            ─► save last (+ best)
                                  ├─ checkpoint_interval: save last
                                  └─ SIGINT/SIGTERM, or the log's reader gone
                                     (SIGPIPE): save last, exit 128+signal

Rank 0 alone logs and writes files; every rank trains, validates on its share of
the test crops (the sums are all-reduced) and steps the same LR schedule.

A step's statistics are read (finished) after the next step is launched, so the CPU
queues work while the GPU runs; what needs them at once (a log write, the epoch's
end, a checkpoint, the end of the run) finishes the step in flight first. A stop
request therefore ends the run after the step that follows the request's.
"""

import os
import signal
import sys
from typing import Dict, Optional

import torch

from utils.output_paths import remove_unused_folders
from utils.training import distributed
from utils.training.bad_images import TooManyUnusableImages
from utils.training.build import build_configured_model
from utils.training.config import BEST_NAME, LAST_NAME
from utils.training.distributed import on_rank_0
from utils.training.images import RunImages
from utils.training.monitor import (
    EpochProgress,
    LogStream,
    StepWindow,
    write_train_scalars,
    write_validation,
)
from utils.training.optimizers import build_optimizers, build_scheduler
from utils.training.resume import (
    best_checkpoint_note,
    check_experiment_folder,
    run_finished,
)
from utils.training.run_lock import refuse_if_locked, take_experiment_folder
from utils.training.start_state import load_start_state
from utils.training.state import TrainPosition, build_checkpoint, save_checkpoint
from utils.training.step import TrainStep, coding_state_dict
from utils.training.stop_requests import StopRequests
from utils.training.validation import validate

__all__ = ["Trainer"]


class Trainer:
    """Builds everything from a validated config.

    Args:
        cfg: the config (:func:`utils.training.config.load_config`);
            ``train_data.use_checkpoint_path`` resumes,
            ``train_data.init_checkpoint_path`` initialises the weights only.
        ctx: rank, world size and device
            (:func:`utils.training.distributed.init_distributed`).
        log: where rank 0 prints one-line messages (default: stderr).
    """

    def __init__(self, cfg, ctx: distributed.DistContext, log=None):
        self.cfg, self.ctx = cfg, ctx
        self.stops = StopRequests()
        self.log_stream = LogStream(log or sys.stderr, self.stops.reader_gone)
        self._stop_agreed = False  # a stop request read back from a step
        self._progress: Optional[EpochProgress] = None
        data, params = cfg.train_data, cfg.train_params
        self.exp = data.experiment_path
        resumed_from = data.use_checkpoint_path

        def check_folder() -> None:  # refused in the first second, before any loading
            check_experiment_folder(self.exp, resumed_from)
            refuse_if_locked(self.exp)

        on_rank_0(check_folder)
        torch.manual_seed(params.seed)  # identical initial weights on every rank

        # The model first: its problems are the config's, and come before the data's.
        self.raw = build_configured_model(cfg).to(ctx.device)
        if params.channels_last:
            self.raw = self.raw.to(memory_format=torch.channels_last)
        self.images = RunImages(data, params, ctx, self.log)
        self.unusable = self.images.unusable
        self.steps_per_epoch = self.images.steps_per_epoch
        # Models with a loss of their own (the layered mei2021 models) bring it.
        self.criterion = self.raw.default_loss(params.lmbda, params.distortion_metric)
        self.optimizer, self.aux_optimizer = build_optimizers(
            self.raw, params.learning_rate, params.aux_learning_rate
        )
        self.total_steps = params.max_steps or data.epochs * self.steps_per_epoch
        self.scheduler, self.schedule_per = build_scheduler(
            self.optimizer, cfg.lr_schedule, self.total_steps
        )
        self.pos = TrainPosition()
        load_start_state(self)
        self._build_loaders()
        self.model = distributed.wrap_ddp(self.raw, ctx)
        self.step = TrainStep(
            self.model,
            self.raw,
            self.criterion,
            self.optimizer,
            self.aux_optimizer,
            params.clip_max_norm,
            params.amp,
            params.channels_last,
            params.max_nonfinite_steps,
            params.seed,
            ctx.rank,
            cuda_graph=params.cuda_graphs and ctx.world_size == 1,
        )
        self.step.nonfinite_in_a_row = self.pos.nonfinite_in_a_row
        # Only now, once model and data are known to be fine: a refused run leaves no
        # empty folder. Rank 0 alone writes, so it alone takes the folder.
        self._created, self._lock = [], None

        def take() -> None:
            self._created, self._lock = take_experiment_folder(
                self.exp,
                lambda: check_experiment_folder(
                    self.exp, resumed_from, self.pos.global_step
                ),
            )

        on_rank_0(take)
        self.writer = None
        if ctx.is_main and cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.exp)
        self._saved_at = -1

    # ----------------------------------------------------------------- setup
    def close(self) -> None:
        """Let another run use the experiment folder (rank 0's lock, if held): at the
        end of :meth:`fit`, or for a trainer built and not run (to inspect it)."""
        if self._lock is not None:
            self._lock.release()

    def _build_loaders(self) -> None:
        self.train_loader, self.test_loader = self.images.loaders()

    def log(self, message: str) -> None:
        """One line from rank 0, printed above the progress bar if there is one."""
        if self.ctx.is_main:
            from tqdm import tqdm

            tqdm.write(message, file=self.log_stream)

    # ------------------------------------------------------------ main loop
    def fit(self) -> int:
        """Train until ``epochs`` or ``max_steps``; return the process exit status."""
        try:
            with self.stops.caught():
                return self._fit()
        except TooManyUnusableImages as exc:
            raise TooManyUnusableImages(f"{exc}{self._keep_progress()}") from None
        finally:
            if self.writer is not None:
                self.writer.close()
            self._stop_workers()
            self.close()

    def _stop_workers(self) -> None:
        """Stop the DataLoader workers now, by dropping their loaders for unused ones
        (a loader starts workers only when iterated). Left to the garbage collector
        (the trainer is in reference cycles), a loader could lose its queues before
        telling its workers to stop, then wait seconds for each of them."""
        self._build_loaders()

    def _keep_progress(self) -> str:
        """Save the steps done before a stop for bad data (validation images are first
        read at the first validation, maybe hours in), and say how to go on; a run
        that had done nothing leaves no folder it made (one that existed is kept)."""
        step = self.pos.global_step
        if step == 0:
            self.close()  # its file would keep the folder
            remove_unused_folders(self._created)
            return ""
        if self._saved_at != step:
            self._save(best=False)
        return (
            f"; the {step} steps done are saved: after the repair, continue with "
            f"--resume {os.path.join(self.exp, LAST_NAME)}"
        )

    def _fit(self) -> int:
        log_interval = self.cfg.logging.log_interval
        self.raw.train()
        while not run_finished(self.cfg, self.pos):
            self.images.train_sampler.set_epoch(
                self.pos.epoch, self.pos.epoch_step * self.cfg.train_data.batch_size
            )
            self._progress = progress = EpochProgress(
                self.pos.epoch,
                self.steps_per_epoch,
                self.pos.epoch_step,
                self.ctx.is_main and self.cfg.logging.progress,
                self.log_stream,
            )
            for x, skipped in self.train_loader:
                progress.window.data_done()
                self.unusable["training"].note(skipped)
                x = x.to(self.ctx.device, non_blocking=True)
                # Returns the statistics of the step before, read once this one is
                # queued: the CPU never waits for the GPU to run out of work.
                self._record(
                    self.step.launch(x, self.pos.global_step, self.stops.requested)
                )
                self.pos.global_step += 1
                self.pos.epoch_step += 1
                if self.schedule_per == "step":
                    self.scheduler.step()
                progress.bar.update(1)
                log_due = self.pos.global_step % log_interval == 0
                epoch_done = self.pos.epoch_step == self.steps_per_epoch
                if log_due or epoch_done:  # they need this step's statistics now
                    self._record(self.step.finish())
                if log_due:
                    self._log_train(progress.take_window())
                if epoch_done:
                    self.pos.epoch += 1
                    self.pos.epoch_step = 0
                    progress.bar.close()  # before the validation line, not redrawn
                self._after_step(epoch_done)
                if self._stop_agreed:
                    progress.bar.close()
                    return self._stop()
                if run_finished(self.cfg, self.pos):
                    break
                progress.window.data_wait()
            progress.bar.close()
        self._record(self.step.finish())
        # A run that ends before its first validation (max_steps inside the first epoch
        # with val_interval 0) validates once, so that every finished run leaves a
        # best checkpoint. Runs that validated keep their schedule: an extra validation
        # would step the plateau scheduler and make "3 steps, resume, 3 more" differ
        # from 6 straight.
        if self.pos.best_loss == float("inf"):
            self._validate_and_save()
        elif self._saved_at != self.pos.global_step:
            self._save(best=False)
        self.log(
            f"done at step {self.pos.global_step}; checkpoints in {self.exp}"
            f"{best_checkpoint_note(self.pos, self.cfg.logging.val_interval)}"
        )
        return 0

    def _record(self, stats: Optional[Dict[str, float]]) -> None:
        """A finished step's statistics (none: no step was in flight), into the
        progress, the position's non-finite streak (which checkpoints store) and the
        stop agreed by the ranks. Every rank finishes the same steps at the same
        point of the loop."""
        if stats is None:
            return
        self.pos.nonfinite_in_a_row = self.step.nonfinite_in_a_row
        self._progress.add(stats)
        self._stop_agreed = self._stop_agreed or stats["stop"] > 0

    def _after_step(self, epoch_done: bool) -> None:
        val_interval = self.cfg.logging.val_interval
        checkpoint_interval = self.cfg.logging.checkpoint_interval
        step = self.pos.global_step
        if (val_interval and step % val_interval == 0) or (
            not val_interval and epoch_done
        ):
            self._validate_and_save()
        elif checkpoint_interval and step % checkpoint_interval == 0:
            self._save(best=False)

    def _stop(self) -> int:
        signum = self.stops.signal or signal.SIGTERM
        if self._saved_at != self.pos.global_step:
            self._save(best=False)
        name = signal.Signals(signum).name
        self.log(
            f"stopped by {name} at step {self.pos.global_step}; checkpoint saved in "
            f"{self.exp}; continue with --resume"
        )
        return 128 + int(signum)

    # ------------------------------------------------------ validation/saving
    def _validate_and_save(self) -> None:
        metrics = self.validate()
        loss = metrics["loss"]
        if self.schedule_per == "validation":
            self.scheduler.step(loss)
        self.pos.last_val_loss = loss
        is_best = loss < self.pos.best_loss
        if is_best:
            self.pos.best_loss, self.pos.best_step = loss, self.pos.global_step
        self._save(best=is_best)
        self.log(
            f"step {self.pos.global_step} validation: loss {loss:.4f} bpp "
            f"{metrics['bpp']:.4f} psnr {metrics['psnr']:.2f} dB "
            f"aux {metrics['aux']:.1f}" + (" (best)" if is_best else "")
        )

    def validate(self) -> Dict[str, float]:
        """Validation metrics of the model now (:func:`utils.training.validation.
        validate`), also written to TensorBoard."""
        metrics, shown = validate(
            self.raw,
            self.criterion,
            self.test_loader,
            self.ctx.device,
            self.cfg.train_params.channels_last,
            self.cfg.logging.num_images,
            self.unusable["validation"].note,
        )
        if self.writer is not None:
            write_validation(self.writer, metrics, shown, self.pos.global_step)
        return metrics

    def _save(self, best: bool) -> None:
        self._record(self.step.finish())  # the step in flight: its streak is saved
        self._saved_at = self.pos.global_step
        if not self.ctx.is_main:
            return
        with torch.no_grad():
            self.raw.update(force=True)
        checkpoint = build_checkpoint(
            self.raw,
            self.optimizer,
            self.aux_optimizer,
            self.scheduler,
            self.cfg,
            self.pos,
        )
        save_checkpoint(checkpoint, self.exp, LAST_NAME)
        if best:
            checkpoint["state_dict"], checkpoint["aux_loss"] = coding_state_dict(
                self.raw
            )
            checkpoint["quantiles_solved"] = True
            save_checkpoint(checkpoint, self.exp, BEST_NAME)

    def _log_train(self, window: StepWindow) -> None:
        if self.writer is not None:
            write_train_scalars(
                self.writer,
                window,
                self.pos.global_step,
                self.optimizer.param_groups[0]["lr"],
                self.unusable["training"].count,
            )
