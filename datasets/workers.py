"""DataLoader workers: at most one per CPU, each in a process group of its own.

A job's stop signal often goes to the whole process group: Ctrl-C in a terminal,
``timeout``, a batch scheduler at its time limit, ``kill -TERM -PGID``. The main
process then finishes its step, saves a checkpoint and exits; a worker that got the
signal too died first, and the run ended with "DataLoader worker ... killed by
signal" and no checkpoint. Each worker therefore leaves the group when it starts.
A signal that reached the group while a worker was being started (before it left)
would still kill it, so :class:`GroupSafeDataLoader` starts its workers with the stop
signals blocked, and each worker drops what it received before it left, then
unblocks them. The main process still stops its workers by process id (PyTorch sends
them SIGTERM when it shuts them down), and a worker whose main process was killed
outright still exits, as PyTorch's workers watch their parent.
"""

import os
import signal
from typing import Callable

from torch.utils.data import DataLoader

__all__ = ["GroupSafeDataLoader", "leave_process_group", "usable_workers"]

# What a terminal, ``timeout`` or a batch scheduler sends to a job's process group.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def leave_process_group(worker_id: int) -> None:
    """``worker_init_fn`` of every training DataLoader: leave the main process's
    group, then discard the stop signals sent to the group meanwhile (ignoring a
    pending signal discards it) and take them again as a worker normally does."""
    os.setpgid(0, 0)
    for stop in STOP_SIGNALS:
        previous = signal.signal(stop, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {stop})
        signal.signal(stop, previous)


class GroupSafeDataLoader(DataLoader):
    """A DataLoader whose workers start with the stop signals blocked, so that none
    dies of a signal sent to the group before it could leave it
    (:func:`leave_process_group`, its ``worker_init_fn``); the main process gets such
    a signal as soon as the workers are started."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def usable_workers(requested: int, log: Callable[[str], None]) -> int:
    """``requested`` DataLoader workers, at most one for each CPU this process may run
    on: more only take turns on the same cores, and PyTorch warns at every loader.
    ``log`` is told when there are fewer."""
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may run on
    except AttributeError:  # no such call outside Linux: all of the machine's
        cpus = os.cpu_count() or 1
    if requested > cpus:
        log(
            f"train_data.num_workers is {requested}, more than the {cpus} CPUs this "
            f"process may use: {cpus} workers load the images"
        )
    return min(requested, cpus)
