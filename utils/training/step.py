"""One rate-distortion training step and the objects it needs.

The step follows CompressAI's ``examples/train.py`` (main loss with
``RateDistortionLoss``, gradient clipping, then a separate auxiliary optimizer for
the entropy bottleneck's quantiles) with six additions:

* the global RNG is re-seeded from ``(seed, step, rank)`` before each step, so the
  quantisation noise of step ``k`` is the same whether or not the run was
  interrupted before it (no generator state needs saving or restoring);
* a non-finite loss or gradient skips the update with a warning, and the run stops
  after ``max_nonfinite_steps`` such steps in a row;
* the step never waits for the GPU: the skip is decided on the device (fused Adam's
  ``found_inf``, :mod:`utils.training.optimizers`) and the statistics come back to
  the CPU on their own (:class:`PendingStatistics`), so ``train.py`` queues step
  ``k + 1`` while the GPU runs step ``k``, as the example loop does;
* optional bfloat16 autocast and channels_last memory format for GPUs;
* on a GPU, optionally, the forward and backward passes replayed as one CUDA graph
  (``cuda_graph``): at batch 8 a CPS step launches a thousand small kernels, and
  replaying them costs one launch instead of a thousand (see :class:`TrainStep`);
* under DDP, the statistics are averaged over ranks, and so is the auxiliary
  gradient (see :mod:`utils.training.distributed`).
"""

import copy
import math
import warnings
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.training.distributed import (
    all_reduce_sum,
    aux_parameter_names,
    average_gradients,
)
from utils.training.optimizers import check_fused, step_unless

__all__ = [
    "step_seed",
    "PendingStatistics",
    "TrainStep",
    "NonFiniteLossError",
    "coding_state_dict",
    "STAT_NAMES",
]

# Order of the statistics vector a step returns (averaged over ranks).
# psnr: mean per-crop PSNR of the clamped reconstructions, as validation measures it
# (but of the training forward pass, with noise in place of rounding).
STAT_NAMES = ("loss", "mse", "bpp", "aux", "grad_norm", "psnr", "stop")


# Eager steps (on a side stream, as capture requires) before the graph is captured.
STEPS_BEFORE_CAPTURE = 3


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class _CapturedStep(NamedTuple):
    """A captured forward + backward pass and the static tensors it reads and writes."""

    graph: "torch.cuda.CUDAGraph"
    batch: Tensor  # copied into before each replay
    statistics: Tensor  # written by each replay
    params: List[nn.Parameter]
    grads: List[Optional[Tensor]]  # the gradient tensors the graph writes


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global RNG for training step ``step`` on ``rank`` (a 63-bit mix)."""
    mixed = (
        seed * 0x9E3779B97F4A7C15
        + step * 0xBF58476D1CE4E5B9
        + rank * 0x94D049BB133111EB
    )
    return mixed % (2**63 - 1)


def _to_float32(value):
    """``value`` with every floating tensor inside (dicts, lists, tuples) in float32.

    Layered models return lists of per-layer outputs next to ``x_hat`` and
    ``likelihoods``; all of them reach the criterion.
    """
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: _to_float32(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(item) for item in value)
    return value


class PendingStatistics:
    """The statistics of a launched step (:data:`STAT_NAMES`) on their way to the CPU.

    On a GPU the copy is queued behind the step, into pinned memory, and waited for
    only by :meth:`read`; on the CPU the values are there at once.

    Args:
        step: the global step they belong to.
        values: the rank-averaged statistics, one float32 tensor.
    """

    def __init__(self, step: int, values: Tensor):
        self.step = step
        self._ready: Optional["torch.cuda.Event"] = None
        self._values = values
        if values.is_cuda:
            self._values = torch.empty(
                values.shape, dtype=values.dtype, pin_memory=True
            )
            self._values.copy_(values, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(values.device))

    def read(self) -> List[float]:
        """The values, once the step has run (waits for it on a GPU)."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._values.tolist()


class TrainStep:
    """Optimisation steps that never make the CPU wait for the device.

    :meth:`launch` queues a step (forward, backward, clipping, both optimizers'
    steps, skipped on the device if a statistic is not finite), then reads the
    statistics of the step launched before it: step ``k`` is read once step
    ``k + 1`` is queued, so the GPU always has work while the CPU waits.
    :meth:`finish` reads the step in flight at once (for a log write or a
    checkpoint); calling the object runs one step and waits for it.

    Args:
        model: the (possibly DDP-wrapped) model; ``raw`` is the unwrapped one.
        criterion: the model's ``default_loss`` (``models/base.py``).
        optimizer, aux_optimizer: fused, from
            :func:`utils.training.optimizers.build_optimizers`.
        clip_max_norm: gradient clipping threshold; 0 disables clipping.
        amp: bfloat16 autocast for the forward pass.
        channels_last: feed NHWC batches (the model must have been converted).
        max_nonfinite_steps: consecutive skipped steps that abort the run.
        seed, rank: for :func:`step_seed`.
        cuda_graph: on a CUDA device and a single process, capture the forward pass,
            the loss, the backward passes and the clipping as one CUDA graph after
            :data:`STEPS_BEFORE_CAPTURE` eager steps, and replay it from then on. The
            optimizers still step eagerly (a few fused kernels), so learning-rate
            schedules and checkpoints are unchanged, and a non-finite statistic
            still skips their step. Each replay follows :func:`torch.manual_seed`,
            which resets the offset of the graph's random numbers, so the noise of
            step ``k`` is drawn as in eager mode. A model whose forward pass cannot
            be captured (one that reads a value back to the CPU, say) trains eagerly
            after one warning. Ignored on the CPU.
    """

    def __init__(
        self,
        model: nn.Module,
        raw: nn.Module,
        criterion: nn.Module,
        optimizer,
        aux_optimizer,
        clip_max_norm: float = 1.0,
        amp: bool = False,
        channels_last: bool = False,
        max_nonfinite_steps: int = 10,
        seed: int = 0,
        rank: int = 0,
        cuda_graph: bool = False,
    ):
        check_fused((optimizer, aux_optimizer))
        self.model, self.raw, self.criterion = model, raw, criterion
        self.optimizer, self.aux_optimizer = optimizer, aux_optimizer
        self.clip_max_norm = clip_max_norm
        self.amp = amp
        self.channels_last = channels_last
        self.max_nonfinite_steps = max_nonfinite_steps
        self.seed, self.rank = seed, rank
        self.nonfinite_in_a_row = 0
        aux_names = set(aux_parameter_names(raw))
        named = list(raw.named_parameters())
        self.net_params = [
            p for n, p in named if n not in aux_names and p.requires_grad
        ]
        self.aux_params = [p for n, p in named if n in aux_names]
        self.cuda_graph = cuda_graph
        self.steps_taken = 0
        self._in_flight: Optional[PendingStatistics] = None
        self._captured: Optional[_CapturedStep] = None
        self._side_stream: Optional["torch.cuda.Stream"] = None

    @property
    def graph_captured(self) -> bool:
        """Whether steps are being replayed from a captured CUDA graph."""
        return self._captured is not None

    def forward_losses(self, x: Tensor) -> Tuple[Dict[str, Tensor], Tensor, Tensor]:
        """Forward pass and criterion; returns (criterion outputs, mse of x_hat, mean
        per-crop PSNR of the clamped x_hat)."""
        device_type = x.device.type
        # A graph replays the casts it captured, so autocast must not cache them.
        with torch.autocast(
            device_type,
            dtype=torch.bfloat16,
            enabled=self.amp,
            cache_enabled=not self.cuda_graph,
        ):
            out = self.model(x)
        if self.amp:  # the rate and the loss are computed in float32
            out = _to_float32(out)
        losses = self.criterion(out, x)
        mse = (
            losses["mse_loss"] if "mse_loss" in losses else F.mse_loss(out["x_hat"], x)
        )
        with torch.no_grad():
            error = (out["x_hat"].float().clamp(0, 1) - x).pow(2).flatten(1).mean(1)
            psnr_mean = (-10 * torch.log10(error.clamp_min(1e-10))).mean()
        return losses, mse.detach(), psnr_mean

    def __call__(
        self, x: Tensor, step: int, stop_request: bool = False
    ) -> Dict[str, float]:
        """One step, waited for: :meth:`launch` then :meth:`finish` (a step that
        was in flight before is finished, and its statistics dropped)."""
        self.launch(x, step, stop_request)
        return self.finish()

    def launch(
        self, x: Tensor, step: int, stop_request: bool = False
    ) -> Optional[Dict[str, float]]:
        """Queue training on batch ``x`` (B, 3, H, W) in [0, 1] as global step
        ``step``, then finish the step that was in flight before (see
        :meth:`finish`) and return its statistics, or None if none was.

        Nothing but that finish waits for the device, and by then the device has
        this step queued behind it. ``stop_request`` (e.g. a signal arrived) is
        OR-ed over ranks and read back as ``stats["stop"] > 0``, so that all ranks
        stop after the same step.
        """
        torch.manual_seed(step_seed(self.seed, step, self.rank))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not (self.cuda_graph and x.is_cuda):
            statistics = self._eager_statistics(x)
        elif self._captured is not None and self._captured.batch.shape == x.shape:
            statistics = self._replay(x)
        elif self.steps_taken < STEPS_BEFORE_CAPTURE or self._captured is not None:
            statistics = self._side_stream_statistics(x)
        else:
            statistics = self._capture_and_replay(x)
        self.steps_taken += 1
        stop = torch.full((1,), float(stop_request), device=x.device)
        world = (
            torch.distributed.get_world_size()
            if torch.distributed.is_initialized()
            else 1
        )
        stats = all_reduce_sum(torch.cat([statistics, stop])) / world
        found_inf = (~torch.isfinite(stats)).any().float()
        step_unless(self.optimizer, found_inf)
        step_unless(self.aux_optimizer, found_inf)
        before, self._in_flight = self._in_flight, PendingStatistics(step, stats)
        return None if before is None else self._read(before)

    def finish(self) -> Optional[Dict[str, float]]:
        """The statistics of the step in flight (waiting for it), or None if none
        is: the rank-averaged :data:`STAT_NAMES`, and ``skipped`` (1.0 when a
        non-finite value skipped the update, with a warning). A streak of
        ``max_nonfinite_steps`` skipped steps raises :class:`NonFiniteLossError`.
        """
        pending, self._in_flight = self._in_flight, None
        return None if pending is None else self._read(pending)

    def _read(self, pending: PendingStatistics) -> Dict[str, float]:
        values = pending.read()
        result = dict(zip(STAT_NAMES, values))
        if all(math.isfinite(v) for v in values):
            self.nonfinite_in_a_row = 0
            result["skipped"] = 0.0
            return result
        self.nonfinite_in_a_row += 1
        result["skipped"] = 1.0
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} consecutive steps had a non-finite loss "
                f"or gradient (last at step {pending.step}); lower the learning "
                "rate or check the data"
            )
        warnings.warn(
            f"step {pending.step}: non-finite loss or gradient, update skipped "
            f"({self.nonfinite_in_a_row} in a row)",
            RuntimeWarning,
            stacklevel=3,
        )
        return result

    def _statistics(self, x: Tensor) -> Tensor:
        """Forward, backward, clipping and the auxiliary backward on batch ``x``;
        returns the first six :data:`STAT_NAMES` as one float32 tensor. Nothing here
        reads a value back to the CPU, so it can be captured as a CUDA graph."""
        losses, mse, psnr_mean = self.forward_losses(x)
        losses["loss"].backward()
        max_norm = self.clip_max_norm if self.clip_max_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net_params, max_norm)
        aux_loss = self.raw.aux_loss()
        if aux_loss.requires_grad:
            aux_loss.backward()
        average_gradients(self.aux_params)
        return torch.stack(
            [
                losses["loss"].detach().float(),
                mse.float(),
                losses["bpp_loss"].detach().float(),
                aux_loss.detach().float(),
                grad_norm.detach().float().to(x.device),
                psnr_mean.float(),
            ]
        )

    def _clear_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.aux_optimizer.zero_grad(set_to_none=True)

    def _eager_statistics(self, x: Tensor) -> Tensor:
        self._clear_gradients()
        return self._statistics(x)

    def _side_stream_statistics(self, x: Tensor) -> Tensor:
        """An eager step on a side stream: the warm-up that graph capture needs, and
        the fallback for a batch of another shape than the captured one."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(x.device)
        stream = self._side_stream
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            statistics = self._eager_statistics(x)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        return statistics

    def _capture_and_replay(self, x: Tensor) -> Tensor:
        self._clear_gradients()
        batch = x.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                statistics = self._statistics(batch)
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0]
        else:
            reason = None
        # Outside the handler: its traceback holds the autograd graph.
        if reason is not None:
            warnings.warn(
                f"the training step cannot be captured as a CUDA graph ({reason}); "
                f"training eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
            self.cuda_graph = False
            return self._eager_statistics(x)
        params = self.net_params + self.aux_params
        self._captured = _CapturedStep(
            graph, batch, statistics, params, [p.grad for p in params]
        )
        return self._replay(x)

    def _replay(self, x: Tensor) -> Tensor:
        captured = self._captured
        captured.batch.copy_(x)
        # An eager step in between (another batch shape) replaced the gradients.
        for param, grad in zip(captured.params, captured.grads):
            param.grad = grad
        captured.graph.replay()
        return captured.statistics


def coding_state_dict(raw: nn.Module) -> Tuple[Dict[str, Tensor], float]:
    """State dict (and aux loss) of a copy of ``raw`` made ready for entropy coding.

    The copy's quantiles are solved by CompressAI's bisection search
    (``update(update_quantiles=True)``) instead of waiting for the auxiliary loss
    to converge, then the CDF tables are rebuilt. The live model is untouched, so
    training (and its exact resumption) is unaffected.
    """
    coder = copy.deepcopy(raw).eval()
    with torch.no_grad():
        coder.update(force=True, update_quantiles=True)
        aux_loss = float(coder.aux_loss())
    return {k: v.detach().cpu() for k, v in coder.state_dict().items()}, aux_loss
