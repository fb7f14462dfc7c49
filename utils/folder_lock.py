"""One run at a time in an output folder.

Two runs writing the same folder mix their files, and a check for files that exist
cannot see a run that has not written any yet. So a run holds an exclusive ``flock``
on a lock file in its folder from the moment it creates or takes the folder to its
end, and a second run is refused in one line naming the folder and the process that
holds it. The operating system drops the lock when the process ends, however it ends:
a crashed or killed run leaves no stale lock behind, only the file, which the next
run takes. A run that ends removes the file.

Generic: the caller names the lock file, the flag or key that gave the folder (for
the errors) and the kind of run that holds it (``train.py`` through
:mod:`utils.training.run_lock`, ``test.py``'s evaluations through
:mod:`utils.evaluation.outputs`).
"""

import fcntl
import os
import socket
from typing import Optional

__all__ = ["FolderLock", "lock_folder", "refuse_if_locked"]


class FolderLock:
    """The lock of a run on its folder (:func:`lock_folder`), held until
    :meth:`release` (or the end of the process)."""

    def __init__(self, path: str, descriptor: int):
        self.path = path
        self._descriptor: Optional[int] = descriptor

    def release(self) -> None:
        """Remove the lock file, then let the lock go; a second call does nothing.

        The file goes first, while the lock is held: a run that opened it meanwhile
        finds, once it has the lock, that the path names another file or none, and
        locks anew (:func:`lock_folder`), so two runs never both hold one.
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
        # A lock taken and never released by its owner lets go when collected.
        self.release()


def lock_folder(folder: str, lock_name: str, name: str, holder: str) -> FolderLock:
    """Take the lock ``lock_name`` of the existing folder ``folder`` for this run, or
    refuse. ``name`` is the flag or key that gave the folder and ``holder`` the kind of
    run that holds one (``"training run"``), both for the errors.

    Returns:
        the :class:`FolderLock`, to release when the run ends.

    Raises:
        ValueError: another run holds the lock (naming its process where the lock
            file says which), or the lock file cannot be created or locked.
    """
    path = os.path.join(folder, lock_name)
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ValueError(
                f"{name} {folder}: cannot create the lock file {lock_name}: "
                f"{exc.strerror}"
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            refusal = _in_use(folder, name, holder, descriptor)
            os.close(descriptor)
            raise refusal from None
        except OSError as exc:
            os.close(descriptor)
            raise ValueError(
                f"{name} {folder}: cannot lock {lock_name}: {exc.strerror}"
            ) from None
        try:
            current = os.path.samestat(os.fstat(descriptor), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode())
            return FolderLock(path, descriptor)
        # The run that held it ended and removed the file in between: lock the new one.
        os.close(descriptor)


def refuse_if_locked(folder: str, lock_name: str, name: str, holder: str) -> None:
    """Refuse at once, before a run loads anything, if another run holds ``folder``.

    The lock itself is taken later (:func:`lock_folder`), when the run creates or takes
    the folder; this probe only makes a second run fail in its first second rather
    than after its slow checks. It takes a shared lock and drops it, so it must not be
    called by a process that holds the folder.

    Raises:
        ValueError: as :func:`lock_folder` does.
    """
    try:
        descriptor = os.open(
            os.path.join(folder, lock_name), os.O_RDONLY | os.O_CLOEXEC
        )
    except OSError:  # no lock file (or none readable: lock_folder will say)
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(folder, name, holder, descriptor) from None
    except OSError:  # no locks on this file system: lock_folder will say
        pass
    finally:
        os.close(descriptor)


def _in_use(folder: str, name: str, holder: str, descriptor: int) -> ValueError:
    return ValueError(
        f"{name} {folder} is in use by another {holder}{_holder(descriptor)}: "
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
