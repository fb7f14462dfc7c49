"""How the entropy coders use CPU threads: pinned to one for exact float sums, and a
second one only where a core is idle."""

import contextlib
import os
import time
from typing import Iterator, Tuple

import torch

__all__ = ["single_threaded", "idle_core_available"]


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run float code with one thread and full float32 matmul precision, so that
    every reduction happens in one fixed order whatever the caller configured.

    ``torch.set_float32_matmul_precision("medium")``, common in training scripts,
    sends float32 GEMMs to bfloat16 oneDNN kernels on CPUs that have them; an
    encoder with that setting and a decoder without it would compute different
    means, so the precision is pinned here (and restored afterwards).
    """
    threads = torch.get_num_threads()
    precision = torch.get_float32_matmul_precision()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.set_num_threads(threads)


def _busy_seconds() -> Tuple[float, float]:
    """(CPU seconds all processes have been busy, of which this process) so far."""
    with open("/proc/stat") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    ticks = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (sum(fields[:8]) - idle) / ticks, own.user + own.system


def idle_core_available(window: float = 0.1) -> bool:
    """Whether a CPU core besides this process's is idle: the pipelined coder's
    worker thread then runs beside the main one instead of stealing its time slices.

    Measured over ``window`` seconds from ``/proc/stat``, minus this process's own
    CPU time, so that the codec's own busy transforms do not count; where that is
    unavailable, from the one-minute load average. Pipelining speeds coding up only
    when a core is idle; on busy cores the second thread competes for them and
    slows coding down (``benchmarks/entropy_coding.py --pipeline on|off``
    compares them).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    if cpus < 2:
        return False
    try:
        busy_before, own_before = _busy_seconds()
        time.sleep(window)
        busy_after, own_after = _busy_seconds()
        others = ((busy_after - busy_before) - (own_after - own_before)) / window
    except (OSError, ValueError, IndexError):
        try:
            others = os.getloadavg()[0] - 1
        except OSError:
            return False
    return others <= cpus - 1.5
