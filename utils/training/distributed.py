"""Multi-process (torchrun) helpers: process group, device, DDP wrapping, reductions.

``torchrun --nproc_per_node=K train.py ...`` sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; a plain ``python train.py`` sets none and runs as rank 0 of 1. The
same code path serves both: every helper here is a no-op without a process group.

The auxiliary loss needs care under DistributedDataParallel. The entropy
bottleneck's ``quantiles`` get no gradient from the rate-distortion loss (in
training, ``forward`` adds noise and never uses the medians); they are trained by
``aux_loss()`` alone. Left in DDP's buckets, their bucket would be reduced only
during ``aux_loss().backward()``: after gradient clipping had already seen the
network's un-averaged gradients, which the late reduction would then overwrite.
:func:`wrap_ddp` therefore tells DDP to ignore them, so the network's gradients are
averaged by the end of the main backward pass, and the trainer averages the
quantiles' gradients itself with :func:`average_gradients`. ``aux_loss()`` depends
only on the bottleneck's own parameters, identical on every rank, so the ranks'
auxiliary gradients agree up to floating-point non-determinism; averaging makes
the agreement exact and the quantiles stay bit-identical across ranks.
"""

import datetime
import os
from typing import Callable, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DistContext",
    "init_distributed",
    "wrap_ddp",
    "average_gradients",
    "all_reduce_sum",
    "aux_parameter_names",
    "cleanup",
    "on_rank_0",
]


class DistContext:
    """Rank, world size and device of this process."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank = rank
        self.world_size = world_size
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={value!r} is not an integer"
        ) from None


def init_distributed(cuda: bool, timeout_s: int = 1800) -> DistContext:
    """Join the torchrun process group if there is one and pick this rank's device.

    The callers have settled ``cuda`` against the machine (``train.py`` falls back to
    the CPU with a warning, ``test.py --cuda`` refuses). Backends: NCCL on GPUs,
    gloo on CPU.
    """
    world_size = _env_int("WORLD_SIZE")
    if world_size is None:
        return DistContext(0, 1, torch.device("cuda" if cuda else "cpu"))
    rank, local_rank = _env_int("RANK") or 0, _env_int("LOCAL_RANK") or 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} and RANK={rank} are inconsistent; "
            "launch several processes with torchrun --nproc_per_node=K"
        )
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only "
                f"{torch.cuda.device_count()} CUDA devices are visible"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistContext(rank, world_size, device)


def aux_parameter_names(model: nn.Module) -> List[str]:
    """Names of the parameters trained by the auxiliary loss (CompressAI convention)."""
    return [name for name, _ in model.named_parameters() if name.endswith(".quantiles")]


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Wrap ``model`` in DDP when running distributed; return it unchanged otherwise.

    The quantiles are excluded from DDP's gradient reduction (see the module
    docstring) and broadcast from rank 0 once so that all ranks start equal.
    Buffers are synchronised once at construction but not at each forward: the only
    buffers are constants and the entropy-coding tables, which rank 0 rebuilds
    alone before saving a checkpoint (their shapes may then differ between ranks).
    """
    if not ctx.distributed:
        return model
    ignored = aux_parameter_names(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    params = dict(model.named_parameters())
    for name in ignored:
        dist.broadcast(params[name].data, src=0)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(
        model, device_ids=device_ids, forward_sync_buffers=False
    )


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over all ranks (no-op if single-process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world_size = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world_size)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place and return it (no-op when single-process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def cleanup() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def on_rank_0(action: Callable[[], None]) -> None:
    """Run ``action`` on rank 0 alone, the process that writes files (train.py's
    experiment folder, test.py's ``-d``). If it raises ``ValueError`` or ``OSError``,
    every process raises: rank 0 its own error, the others one that quotes it, so
    that under torchrun no process waits for rank 0 in its next collective until the
    process group's timeout. Every process must call it; without a process group it
    runs ``action`` and nothing else."""
    grouped = dist.is_available() and dist.is_initialized()
    refusal = None
    if not grouped or dist.get_rank() == 0:
        try:
            action()
        except (ValueError, OSError) as exc:
            refusal = exc
    if grouped:
        message = [None if refusal is None else str(refusal)]
        dist.broadcast_object_list(message, src=0)
        if refusal is None and message[0] is not None:
            raise ValueError(f"rank 0 refused the run: {message[0]}")
    if refusal is not None:
        raise refusal
