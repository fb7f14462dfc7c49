"""The output folder of an evaluation (``test.py ... -d OUTDIR``): one run at a time,
and replaced as a whole or not at all.

A run holds an exclusive lock on ``OUTDIR`` (:mod:`utils.folder_lock`) from the moment
it makes or takes the folder to its end, so that two runs cannot mix their files. It
writes its reconstructions and per-image documents into a hidden staging folder inside
``OUTDIR``, and only once every image is coded replaces the previous run's outputs with
them: ``per-image/`` and ``reconstructions/`` are swapped as folders (so that files of
the previous run that this one does not write, other images or other qualities, go
with them; a folder this run does not write at all goes too, as it described the
previous results), and ``results.json`` comes last, written atomically. A run that
fails or is interrupted removes its staging folder and leaves the previous outputs
exactly as they were.

Under ``torchrun`` only rank 0 makes, locks and fills the folder (every process writes
its reconstructions into the staging folder rank 0 made); a refusal there is passed to
every process, so that none waits for rank 0 in a collective.
"""

import os
import shutil
from typing import Dict, List, Optional

from utils.atomic import save_json
from utils.folder_lock import FolderLock, lock_folder, refuse_if_locked
from utils.output_paths import (
    create_output_folder,
    refuse_existing_outputs,
    remove_unused_folders,
)
from utils.training.distributed import on_rank_0

LOCK_NAME = ".test.lock"
STAGING_NAME = ".test-staging"
PREVIOUS_NAME = ".previous"  # inside the staging folder, during a commit
NAME = "-d/--output-dir"
HOLDER = "test.py evaluation"
FOLDERS = ("per-image", "reconstructions")


def previous_outputs(output_dir: str) -> List[str]:
    """The files in ``output_dir`` that an evaluation would replace: ``results.json``,
    and every file of ``per-image/`` and of ``reconstructions/``, since those folders
    are replaced whole (or removed, by a run that writes none: they would describe
    other results than the new ``results.json``)."""
    found = [os.path.join(output_dir, "results.json")]
    for folder in FOLDERS:
        folder = os.path.join(output_dir, folder)
        if os.path.isdir(folder):
            for root, _, files in sorted(os.walk(folder)):
                found += [os.path.join(root, name) for name in sorted(files)]
    return [path for path in found if os.path.isfile(path)]


def check_paths(output_dir: str, per_image: bool, save_image: bool) -> None:
    """Refuse a path in ``output_dir`` that the run could not replace once every image
    is coded: a folder named ``results.json``, or something other than a folder named
    ``per-image`` or ``reconstructions`` where the run writes one.

    Raises:
        ValueError: naming the path in the way.
    """
    results = os.path.join(output_dir, "results.json")
    if os.path.isdir(results):
        raise ValueError(
            f"{NAME} {output_dir}: {results} is a folder, not a file; "
            "move it away or choose another -d"
        )
    for folder, wanted in zip(FOLDERS, (per_image, save_image)):
        path = os.path.join(output_dir, folder)
        if wanted and os.path.lexists(path) and not os.path.isdir(path):
            raise ValueError(
                f"{NAME} {output_dir}: {path} is not a folder; "
                "move it away or choose another -d"
            )


class EvaluationOutputs:
    """The outputs of one evaluation in ``output_dir`` (None: no ``-d``, nothing to
    write), used as a ``with`` block around the coding: entering it makes and locks
    the folder and its staging folder (rank 0), :meth:`commit` replaces the previous
    outputs (rank 0), and leaving it releases the lock, after removing the staging
    folder and the folders the run made if the block raised (Ctrl-C included)."""

    def __init__(
        self, output_dir: Optional[str], per_image: bool, save_image: bool, force: bool
    ):
        self.output_dir = output_dir or None
        self.folders = [
            folder for folder, wanted in zip(FOLDERS, (per_image, save_image)) if wanted
        ]
        self.force = force
        self._lock: Optional[FolderLock] = None
        self._created: List[str] = []
        self.staging = (
            os.path.join(self.output_dir, STAGING_NAME) if self.output_dir else None
        )

    @property
    def image_folder(self) -> Optional[str]:
        """Where every process writes its reconstructions (None without them)."""
        if self.staging is None or "reconstructions" not in self.folders:
            return None
        return os.path.join(self.staging, "reconstructions")

    def check(self) -> None:
        """The refusals that need no lock, for the first second of a run (rank 0): the
        folder in use by another run, a path in the way, outputs that exist without
        ``--force``. They are made again under the lock (:meth:`__enter__`)."""
        if self.output_dir is None:
            return
        if os.path.isdir(self.output_dir):
            refuse_if_locked(self.output_dir, LOCK_NAME, NAME, HOLDER)
        self._check_outputs()

    def _check_outputs(self) -> None:
        per_image, save_image = (folder in self.folders for folder in FOLDERS)
        check_paths(self.output_dir, per_image, save_image)
        refuse_existing_outputs(previous_outputs(self.output_dir), self.force)

    def __enter__(self) -> "EvaluationOutputs":
        if self.output_dir is not None:
            on_rank_0(self._take)
        return self

    def _take(self) -> None:
        """Make and lock the folder, check it again (another run may have written
        there since :meth:`check`), and make the staging folder, in place of any a
        killed run left."""
        self._created = create_output_folder(self.output_dir, "-d")
        try:
            self._lock = lock_folder(self.output_dir, LOCK_NAME, NAME, HOLDER)
            self._finish_a_killed_commit()
            self._check_outputs()
            _remove(self.staging)
            os.mkdir(self.staging)
            for folder in self.folders:
                os.mkdir(os.path.join(self.staging, folder))
        except BaseException:
            self._abandon()
            raise

    def _finish_a_killed_commit(self) -> None:
        """A run killed inside :meth:`commit` (SIGKILL, a power cut) left the previous
        run's folders in the staging folder. Its ``results.json`` still there means it
        never reached the commit point, so the previous folders go back in place of
        what it had moved in; otherwise it had committed, and they are dropped."""
        previous = os.path.join(self.staging, PREVIOUS_NAME)
        unfinished = os.path.isfile(os.path.join(self.staging, "results.json"))
        if not (os.path.isdir(previous) and unfinished):
            return
        for folder in FOLDERS:
            kept = os.path.join(previous, folder)
            if os.path.lexists(kept):
                target = os.path.join(self.output_dir, folder)
                _remove(target)
                os.rename(kept, target)

    def commit(self, document: dict, pages: Dict[str, dict]) -> None:
        """Write ``pages`` (per-image documents by stem) into the staging folder, then
        replace the previous outputs: the folders first, ``results.json`` last, moved
        in from the staging folder (the commit point: see
        :meth:`_finish_a_killed_commit`). A failure on the way puts the previous
        folders back."""
        if self.output_dir is None:
            return
        if "per-image" in self.folders:
            for stem, page in pages.items():
                save_json(os.path.join(self.staging, "per-image", f"{stem}.json"), page)
        staged_results = os.path.join(self.staging, "results.json")
        save_json(staged_results, document)
        previous = os.path.join(self.staging, PREVIOUS_NAME)
        os.mkdir(previous)
        moved_away, placed = [], []
        try:
            for folder in FOLDERS:
                target = os.path.join(self.output_dir, folder)
                written = folder in self.folders
                # check_paths refused anything but a folder where one is written.
                if os.path.isdir(target) or (written and os.path.lexists(target)):
                    os.rename(target, os.path.join(previous, folder))
                    moved_away.append(folder)
                if written:
                    os.rename(os.path.join(self.staging, folder), target)
                    placed.append(folder)
            os.replace(staged_results, os.path.join(self.output_dir, "results.json"))
        except BaseException:
            for folder in reversed(placed):
                os.rename(
                    os.path.join(self.output_dir, folder),
                    os.path.join(self.staging, folder),
                )
            for folder in reversed(moved_away):
                os.rename(
                    os.path.join(previous, folder),
                    os.path.join(self.output_dir, folder),
                )
            raise
        _remove(self.staging)  # and the previous folders in it

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self._abandon()
        elif self._lock is not None:
            self._lock.release()

    def _abandon(self) -> None:
        """Remove the staging folder, release the lock, and remove the folders this
        run made if they hold nothing (rank 0; nothing to do elsewhere)."""
        if self.staging is not None and self._lock is not None:
            _remove(self.staging)
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        remove_unused_folders(self._created)
        self._created = []


def _remove(path: str) -> None:
    """Remove a file, link or folder tree at ``path``, if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
