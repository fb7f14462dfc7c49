"""DataLoader workers in a process group of their own.

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

__all__ = ["leave_process_group"]


def leave_process_group(worker_id: int) -> None:
    """``worker_init_fn`` of every training DataLoader: see the module docstring."""
    os.setpgid(0, 0)
