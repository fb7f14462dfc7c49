"""DataLoader workers: at most one per CPU, each in a process group of its own.

A job's stop signal often goes to the whole process group: Ctrl-C in a terminal,
``timeout``, a batch scheduler at its time limit, ``kill -TERM -PGID``. The main
process then finishes its step, saves a checkpoint and exits; a worker that got the
signal too died first, and the run ended with "DataLoader worker ... killed by
signal" and no checkpoint. Each worker therefore leaves the group when it starts.
The main process still stops its workers by process id (PyTorch sends them SIGTERM
when it shuts them down), and a worker whose main process was killed outright still
exits, as PyTorch's workers watch their parent.
"""

import os
from typing import Callable

__all__ = ["leave_process_group", "usable_workers"]


def leave_process_group(worker_id: int) -> None:
    """``worker_init_fn`` of every training DataLoader: see the module docstring."""
    os.setpgid(0, 0)


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
