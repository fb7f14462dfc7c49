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


# What a stop signal does to a worker: what it does to a Python program that sets no
# handler. A forked worker inherits the trainer's handlers, which only set a flag
# in the worker's copy of the trainer: PyTorch's SIGTERM to a worker it shuts down
# would be swallowed.
_WORKER_HANDLERS = {
    signal.SIGINT: signal.default_int_handler,
    signal.SIGTERM: signal.SIG_DFL,
}


def leave_process_group(worker_id: int) -> None:
    """``worker_init_fn`` of every training DataLoader: leave the main process's
    group, then discard the stop signals sent to the group meanwhile (ignoring a
    pending signal discards it) and take them as a Python program with no handlers
    of its own does (:data:`_WORKER_HANDLERS`), not as the trainer that forked it."""
    os.setpgid(0, 0)
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {stop})
        signal.signal(stop, _WORKER_HANDLERS[stop])


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
