"""What a training run starts from: a checkpoint it resumes, or the weights of
``--init-from``.

A resume restores the model, the optimizers, the schedule and the position
(:func:`utils.training.state_loading.restore`), checks that the run can go on from there
(:mod:`utils.training.resume`) before it says that it resumes, and reports what the
config changed since the checkpoint was written; a change of the loss itself forgets
the best loss. ``--init-from`` loads the weights only.
"""

from utils.training.config import BEST_NAME
from utils.training.optimizers import restart_plateau
from utils.training.resume import (
    check_not_behind,
    check_resume_position,
    forgotten_bests_warning,
    moved_run_note,
    report_config_changes,
)
from utils.training.state_loading import (
    init_weights_from,
    read_resume_checkpoint,
    restore,
)

__all__ = ["load_start_state"]


def load_start_state(trainer) -> None:
    """Resume ``trainer`` (a :class:`utils.training.loop.Trainer` being built: its
    model, optimizers, schedule and position exist, its data is listed) from
    ``train_data.use_checkpoint_path``, or initialise its weights from
    ``train_data.init_checkpoint_path``; neither set: nothing to do."""
    data = trainer.cfg.train_data
    if data.use_checkpoint_path:
        path = data.use_checkpoint_path
        checkpoint = read_resume_checkpoint(path)
        restore(
            checkpoint,
            trainer.raw,
            trainer.optimizer,
            trainer.aux_optimizer,
            trainer.scheduler,
            trainer.pos,
            path,
        )
        # A refused resume says so first, without announcing that it resumes.
        check_resume_position(
            path,
            checkpoint.get("config"),
            trainer.cfg,
            trainer.pos,
            trainer.steps_per_epoch,
            len(trainer.images.train_set),
            trainer.ctx.world_size,
        )
        check_not_behind(path, trainer.exp, trainer.pos.global_step)
        trainer.log(
            f"resuming {path} at step {trainer.pos.global_step} "
            f"(epoch {trainer.pos.epoch}, batch {trainer.pos.epoch_step})"
        )
        moved = moved_run_note(checkpoint, trainer.exp)
        if moved:
            trainer.log(moved)
        if report_config_changes(checkpoint.get("config"), trainer.cfg, trainer.log):
            _forget_best_loss(trainer)
    elif data.init_checkpoint_path:
        init_weights_from(data.init_checkpoint_path, trainer.raw)
        trainer.log(f"initialised weights from {data.init_checkpoint_path}")


def _forget_best_loss(trainer) -> None:
    """After a change of the loss itself (lambda, distortion metric) the losses
    before and after cannot be compared: the best checkpoint, and the plateau
    schedule, start again from the next validation."""
    trainer.pos.best_loss, trainer.pos.best_step = float("inf"), None
    if trainer.schedule_per == "validation":
        restart_plateau(trainer.scheduler)
    trainer.log(forgotten_bests_warning(BEST_NAME))
