"""One training run at a time in an experiment folder.

Two runs writing the same ``experiment_path`` overwrite each other's checkpoints, and
the check that refuses a new run in a folder holding ``checkpoint.pth.tar`` cannot see
a run that has not written one yet. So a run (new, resumed, either training mode)
holds an exclusive ``flock`` on ``experiment_path/.train.lock`` from the moment it
creates or takes the folder to its end, and a second run is refused in one line. The
operating system drops the lock when the process ends, however it ends: a crashed or
killed run leaves no stale lock behind, only the file, which the next run takes. A
run that ends removes the file.

Under torchrun only rank 0 writes, so only rank 0 locks (:class:`~utils.training.loop.
Trainer`).
"""

import fcntl
import os
import socket
from typing import Callable, List, Optional, Tuple

from utils.cli import create_output_folder, remove_unused_folders

__all__ = [
    "LOCK_NAME",
    "ExperimentLock",
    "lock_experiment",
    "refuse_if_locked",
    "take_experiment_folder",
]

LOCK_NAME = ".train.lock"


class ExperimentLock:
    """The lock of a run on its experiment folder (:func:`lock_experiment`), held until
    :meth:`release` (or the end of the process)."""

    def __init__(self, path: str, descriptor: int):
        self.path = path
        self._descriptor: Optional[int] = descriptor

    def release(self) -> None:
        """Remove the lock file, then let the lock go; a second call does nothing.

        The file goes first, while the lock is held: a run that opened it meanwhile
        finds, once it has the lock, that the path names another file or none, and
        locks anew (:func:`lock_experiment`), so two runs never both hold one.
        """
        if self._descriptor is None:
            return
        try:
            os.unlink(self.path)
        except OSError:  # removed by hand, or the folder is gone
            pass
        os.close(self._descriptor)
        self._descriptor = None

    def __del__(self):
        # A trainer built and never run (tests, notebooks) lets go when collected.
        self.release()


def lock_experiment(folder: str, name: str = "train_data.experiment_path"):
    """Take the lock of the existing folder ``folder`` for this run, or refuse.

    ``name`` is the config key that gave the folder, for the errors.

    Returns:
        the :class:`ExperimentLock`, to release when the run ends.

    Raises:
        ValueError: another run holds the lock (naming its process where the lock
            file says which), or the lock file cannot be created or locked.
    """
    path = os.path.join(folder, LOCK_NAME)
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ValueError(
                f"{name} {folder}: cannot create the lock file {LOCK_NAME}: "
                f"{exc.strerror}"
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            refusal = _in_use(folder, name, descriptor)
            os.close(descriptor)
            raise refusal from None
        except OSError as exc:
            os.close(descriptor)
            raise ValueError(
                f"{name} {folder}: cannot lock {LOCK_NAME}: {exc.strerror}"
            ) from None
        try:
            current = os.path.samestat(os.fstat(descriptor), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode())
            return ExperimentLock(path, descriptor)
        # The run that held it ended and removed the file in between: lock the new one.
        os.close(descriptor)


def take_experiment_folder(
    folder: str, recheck: Callable[[], None], name: str = "train_data.experiment_path"
) -> Tuple[List[str], ExperimentLock]:
    """Create ``folder`` (and its missing parents), lock it for this run, and run
    ``recheck`` under the lock: another run may have written its checkpoints since
    the folder was first checked. A refusal leaves no lock and no folder it made.

    Returns:
        the folders made (for :func:`utils.cli.remove_unused_folders`, should the
        run stop before its first step) and the :class:`ExperimentLock`.

    Raises:
        ValueError: the folder cannot be made or locked, or ``recheck`` refuses.
    """
    created = create_output_folder(folder, name)
    try:
        lock = lock_experiment(folder, name)
    except ValueError:
        remove_unused_folders(created)
        raise
    try:
        recheck()
    except ValueError:
        lock.release()
        remove_unused_folders(created)
        raise
    return created, lock


def refuse_if_locked(folder: str, name: str = "train_data.experiment_path") -> None:
    """Refuse at once, before a run loads anything, if another run holds ``folder``.

    The lock itself is taken later (:func:`lock_experiment`), when the run creates or
    takes the folder; this probe only makes a second run fail in its first second
    rather than after reading its checkpoint and images. It takes a shared lock and
    drops it, so it must not be called by a process that holds the folder.

    Raises:
        ValueError: as :func:`lock_experiment` does.
    """
    try:
        descriptor = os.open(
            os.path.join(folder, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC
        )
    except OSError:  # no lock file (or none readable: lock_experiment will say)
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(folder, name, descriptor) from None
    except OSError:  # no locks on this file system: lock_experiment will say
        pass
    finally:
        os.close(descriptor)


def _in_use(folder: str, name: str, descriptor: int) -> ValueError:
    return ValueError(
        f"{name} {folder} is in use by another training run{_holder(descriptor)}: "
        f"wait for it to end, or choose another {name}"
    )


def _holder(descriptor: int) -> str:
    """`` (process PID on HOST)`` from the lock file, or nothing if it says nothing."""
    try:
        fields = os.pread(descriptor, 256, 0).decode("ascii", "replace").split()
    except OSError:
        return ""
    if len(fields) != 2 or not fields[0].isdigit():
        return ""
    return f" (process {fields[0]} on {fields[1]})"
