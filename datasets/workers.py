"""DataLoader workers that leave SIGINT and SIGTERM to the main process.

A batch scheduler at its time limit (Slurm, ``timeout``) and Ctrl-C in a terminal
signal every process of the job. The main process then finishes its step, saves a
checkpoint and exits; a worker that died of the signal first ended the run with
"DataLoader worker ... killed by signal" and no checkpoint. Workers therefore ignore
both signals, and so multiprocessing's exit hook, which stops the workers still
alive with SIGTERM and waits for them, would wait forever: the main process ends its
own workers with SIGKILL just before that hook runs. A worker whose main process
was killed outright still exits, as PyTorch's workers watch their parent.
"""

import atexit
import multiprocessing
import signal
from typing import Callable

__all__ = ["stop_signal_worker_init"]

_exit_hook_registered = False


def _ignore_stop_signals(worker_id: int) -> None:
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)


def _end_workers() -> None:
    """At exit: kill the daemon children (the workers) still alive, and reap them."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


def stop_signal_worker_init() -> Callable[[int], None]:
    """The ``worker_init_fn`` of a training DataLoader; registers, once, the exit hook
    that ends this process's workers (it runs before multiprocessing's, which was
    registered earlier, at import)."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_end_workers)
        _exit_hook_registered = True
    return _ignore_stop_signals
