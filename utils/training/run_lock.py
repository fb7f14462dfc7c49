"""One training run at a time in an experiment folder.

Two runs writing the same ``experiment_path`` overwrite each other's checkpoints, and
the check that refuses a new run in a folder holding ``checkpoint.pth.tar`` cannot see
a run that has not written one yet. So a run (new, resumed, either training mode)
holds an exclusive ``flock`` on ``experiment_path/.train.lock`` from the moment it
creates or takes the folder to its end, and a second run is refused in one line. The
operating system drops the lock when the process ends, however it ends: a crashed or
killed run leaves no stale lock behind, only the file, which the next run takes. A
run that ends removes the file. The locking itself is :mod:`utils.folder_lock`'s,
which ``test.py``'s evaluations share; this module names the lock and the folder.

Under torchrun only rank 0 writes, so only rank 0 locks (:class:`~utils.training.loop.
Trainer`).
"""

from typing import Callable, List, Tuple

from utils.folder_lock import FolderLock, lock_folder
from utils.folder_lock import refuse_if_locked as refuse_if_folder_locked
from utils.output_paths import create_output_folder, remove_unused_folders

__all__ = [
    "LOCK_NAME",
    "ExperimentLock",
    "lock_experiment",
    "refuse_if_locked",
    "take_experiment_folder",
]

LOCK_NAME = ".train.lock"
HOLDER = "training run"

# The lock of a run on its experiment folder (utils/folder_lock.py).
ExperimentLock = FolderLock


def lock_experiment(
    folder: str, name: str = "train_data.experiment_path"
) -> ExperimentLock:
    """Take the lock of the existing folder ``folder`` for this run, or refuse
    (:func:`utils.folder_lock.lock_folder`); ``name`` is the config key that gave the
    folder, for the errors.

    Raises:
        ValueError: another run holds the lock, or it cannot be taken.
    """
    return lock_folder(folder, LOCK_NAME, name, HOLDER)


def take_experiment_folder(
    folder: str, recheck: Callable[[], None], name: str = "train_data.experiment_path"
) -> Tuple[List[str], ExperimentLock]:
    """Create ``folder`` (and its missing parents), lock it for this run, and run
    ``recheck`` under the lock: another run may have written its checkpoints since
    the folder was first checked. A refusal leaves no lock and no folder it made.

    Returns:
        the folders made (for :func:`utils.output_paths.remove_unused_folders`,
        should the run stop before its first step) and the :class:`ExperimentLock`.

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
    """Refuse at once, before a run loads anything, if another run holds ``folder``
    (:func:`utils.folder_lock.refuse_if_locked`); the lock itself is taken later
    (:func:`lock_experiment`), when the run creates or takes the folder.

    Raises:
        ValueError: as :func:`lock_experiment` does.
    """
    refuse_if_folder_locked(folder, LOCK_NAME, name, HOLDER)
