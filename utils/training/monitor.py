"""What a training run shows while it runs: its log stream, step statistics gathered
between two TensorBoard writes, and the scalars and images written (``train/*``,
``val/*``)."""

import time
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from utils.cli import silence_gone_readers
from utils.training.step import STAT_NAMES

__all__ = [
    "LogStream",
    "StepWindow",
    "EpochProgress",
    "write_train_scalars",
    "write_validation",
]

# The step statistics logged as ``train/<name>`` (``stop`` is a flag, not a figure).
LOGGED_STATS = ("loss", "mse", "bpp", "aux", "grad_norm", "psnr")


class LogStream:
    """The stream rank 0 logs to (messages and the progress bar), which turns a reader
    that went away (``train.py ... 2>&1 | head``) into a stop, as a signal would: the
    run saves its checkpoint after the current step and ends with status 141 (128 +
    SIGPIPE), where the write error used to end it at once, without a checkpoint and
    with a traceback. The gone output is pointed at /dev/null
    (:func:`utils.cli.silence_gone_readers`), so the lines still to come are dropped;
    a broken pipe that is not an output's is raised."""

    def __init__(self, stream, on_gone):
        self.stream, self.on_gone = stream, on_gone

    def write(self, text: str):
        return self._call(self.stream.write, text)

    def flush(self) -> None:
        self._call(self.stream.flush)

    def _call(self, method, *args):
        try:
            return method(*args)
        except BrokenPipeError:
            if not silence_gone_readers(self.stream):
                raise
            self.on_gone()
            return len(args[0]) if args else None

    def __getattr__(self, name: str):
        # What tqdm asks of its file besides writing: fileno, isatty, encoding.
        return getattr(self.stream, name)


class StepWindow:
    """Running sums of step statistics, and of the time spent waiting for data.

    A step the loss skipped (non-finite) is counted apart, not averaged in.
    """

    def __init__(self):
        self._clock = time.perf_counter
        self.count, self.skipped, self.data_wait_s = 0, 0, 0.0
        self.sums = dict.fromkeys(STAT_NAMES, 0.0)
        self._waiting_since = self._clock()

    def data_wait(self) -> None:
        """The loop now waits for the next batch."""
        self._waiting_since = self._clock()

    def data_done(self) -> None:
        """The batch arrived: the wait since :meth:`data_wait` is added."""
        self.data_wait_s += self._clock() - self._waiting_since

    def add(self, stats: Dict[str, float]) -> None:
        """One step's statistics (:data:`utils.training.step.STAT_NAMES`)."""
        if stats["skipped"]:
            self.skipped += 1
            return
        self.count += 1
        for key in self.sums:
            self.sums[key] += stats[key]

    def means(self) -> Dict[str, float]:
        """The mean of each statistic over the steps added (at least one)."""
        return {k: v / self.count for k, v in self.sums.items()}


class EpochProgress:
    """What an epoch shows while it runs: a progress bar with the epoch's running
    means, and the :class:`StepWindow` of the next TensorBoard write.

    Args:
        epoch, total, done: the epoch, its steps, and those already done (resumed).
        shown: whether the bar is drawn (rank 0, ``logging.progress``).
        stream: where the bar is drawn.
    """

    def __init__(self, epoch: int, total: int, done: int, shown: bool, stream):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            initial=done,
            desc=f"epoch {epoch}",
            dynamic_ncols=True,
            leave=False,
            disable=not shown,
            file=stream,
        )
        self.window, self._running = StepWindow(), StepWindow()

    def add(self, stats: Dict[str, float]) -> None:
        """A finished step's statistics, into the window and the bar's means."""
        self.window.add(stats)
        self._running.add(stats)
        if self._running.count:  # shown by the bar's next refresh
            means = self._running.means()
            self.bar.set_postfix(
                loss=f"{means['loss']:.4f}",
                bpp=f"{means['bpp']:.3f}",
                psnr=f"{means['psnr']:.2f}",
                refresh=False,
            )

    def take_window(self) -> StepWindow:
        """The window so far, which a new one replaces."""
        window, self.window = self.window, StepWindow()
        return window


def write_train_scalars(
    writer, window: StepWindow, step: int, lr: float, unusable_images: int
) -> None:
    """The means of ``window`` as ``train/*`` scalars at ``step``, with the learning
    rate, the mean data wait per step and the unusable images met so far."""
    writer.add_scalar("train/skipped_steps", window.skipped, step)
    if window.count == 0:
        return
    means = window.means()
    for key in LOGGED_STATS:
        writer.add_scalar(f"train/{key}", means[key], step)
    writer.add_scalar("train/lr", lr, step)
    writer.add_scalar("train/data_wait_s", window.data_wait_s / window.count, step)
    writer.add_scalar("train/unusable_images", unusable_images, step)


def write_validation(
    writer,
    metrics: Dict[str, float],
    shown: List[Tuple[Tensor, Tensor]],
    step: int,
) -> None:
    """Validation ``metrics`` as ``val/*`` scalars, and the (original,
    reconstruction) pairs ``shown`` side by side as one image grid."""
    for key, value in metrics.items():
        writer.add_scalar(f"val/{key}", value, step)
    if shown:
        from torchvision.utils import make_grid

        grid = make_grid(
            torch.stack([t for pair in shown for t in pair]).float(), nrow=2
        )
        writer.add_image("val/original_vs_reconstruction", grid.cpu(), step)
