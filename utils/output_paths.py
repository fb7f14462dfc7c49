"""Where the scripts write: output folders made only once a run is known to start,
and output files checked before any coding.

A bad output path fails in the first second, before any model loads or image is
coded; a folder is created only when the run starts, and a run that fails removes
the folders it made and left empty; an existing output is replaced only with
``--force`` (:func:`utils.cli.add_force_argument`), and an input never.
"""

import contextlib
import os
import tempfile
from typing import Iterator, List, Optional, Sequence


def nearest_existing(path: str) -> str:
    """``path`` made absolute if it exists, else its nearest existing parent: where a
    folder to be made at ``path`` would start (a file there means it never can)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_output_folder(folder: str, name: str) -> None:
    """Refuse, without creating anything, an output folder that cannot be made or
    written: a file, a path under a file, or a folder (itself, or its nearest existing
    parent if it is still to be made) where no file can be created. A script calls it
    with its other checks, so that a bad path fails in the first second while the
    folder itself is made only once the run is known to start
    (:func:`output_folder`); ``name`` is the flag or config key that gave it.

    Raises:
        ValueError: naming ``folder`` and what is wrong with it.
    """
    if not folder:
        raise ValueError(f"{name} is empty: name a folder")
    if os.path.exists(folder):
        if not os.path.isdir(folder):
            raise ValueError(f"{name} {folder} is a file, not a folder")
        _check_writable(folder, f"{name} {folder}")
        return
    parent = nearest_existing(os.path.dirname(os.path.abspath(folder)))
    if not os.path.isdir(parent):
        raise ValueError(f"{name} {folder} cannot be created: {parent} is a file")
    _check_writable(parent, f"{name} {folder} cannot be created: {parent}")


def create_output_folder(folder: str, name: str) -> List[str]:
    """Create the output folder ``folder`` and its missing parents, after the checks of
    :func:`check_output_folder`.

    Returns the folders this call created, outermost first (empty when ``folder``
    existed), for :func:`remove_unused_folders`.

    Raises:
        ValueError: ``folder`` is a file, or cannot be created or written.
    """
    check_output_folder(folder, name)
    missing = []
    # Resolved first, so that "x/../y" makes y alone, not an x left behind.
    target = path = os.path.realpath(folder)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    if missing:  # an existing folder was found writable by the check
        try:
            os.makedirs(target, exist_ok=True)
        except OSError as exc:
            raise ValueError(
                f"{name} {folder} cannot be created: {exc.strerror}"
            ) from None
        _check_writable(folder, f"{name} {folder}")
    return missing[::-1]


def remove_unused_folders(created: Sequence[str]) -> None:
    """Remove the folders of ``created`` (as :func:`create_output_folder` returns them)
    that hold no file, and the empty folders a run made inside them, so that a run that
    wrote nothing leaves nothing behind. Everything under the outermost one is this
    run's, since it did not exist before; a folder that holds a file is kept, and a
    folder that existed before the run is never in ``created``."""
    if not created:
        return
    for root, _, _ in os.walk(created[0], topdown=False):
        try:
            os.rmdir(root)
        except OSError:  # holds a file (or another process removed it first)
            pass


@contextlib.contextmanager
def output_folder(folder: Optional[str], name: str) -> Iterator[List[str]]:
    """Create ``folder`` and its missing parents (:func:`create_output_folder`) for the
    ``with`` block, and if the block raises (Ctrl-C included), remove those of them
    that hold no file (:func:`remove_unused_folders`): a refused or failed run leaves
    no empty folder behind, and never touches one that existed. Removal waits for an
    error because, under ``torchrun``, a process that wrote nothing may end while
    rank 0 still writes. ``folder`` None creates nothing.

    Yields the created folders, outermost first.
    """
    created = create_output_folder(folder, name) if folder is not None else []
    try:
        yield created
    except BaseException:
        remove_unused_folders(created)
        raise


def _check_writable(folder: str, what: str) -> None:
    """Create and remove a file in ``folder``: the one test that holds for root, for
    read-only mounts and for pseudo file systems (``/sys``, ``/proc``) alike, which
    ``os.access`` is not."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"{what} is not writable: {exc.strerror}") from None


def refuse_existing_outputs(outputs, force: bool) -> None:
    """Refuse, unless ``force``, when any of ``outputs`` is an existing file, naming the
    first; callers pass every file a run will write, before writing any, so that a
    refused run leaves nothing half done. Devices and pipes (``/dev/null``) are not
    files that could be lost, and pass."""
    existing = [path for path in outputs if os.path.isfile(path)]
    if existing and not force:
        more = f" (and {len(existing) - 1} more outputs)" if len(existing) > 1 else ""
        raise ValueError(f"{existing[0]} exists{more}; pass --force to overwrite")


def check_output_path(output: str, inputs) -> None:
    """Refuse an output that is one of the inputs (overwriting it would lose the input,
    so ``--force`` does not allow it), a folder (or a name ending in a separator), an
    empty name, or one whose folder does not exist or cannot be written, all before
    any coding. Whether it exists already is :func:`refuse_existing_outputs`'
    question; a device or pipe that exists (``/dev/null``) is written in place."""
    if not output:
        raise ValueError("the output name is empty")
    if output.endswith(("/", os.sep)):
        raise ValueError(f"output {output} names a folder, not a file")
    target = os.path.realpath(output)
    for source in inputs:
        if os.path.exists(source) and os.path.realpath(source) == target:
            raise ValueError(
                f"output {output} is the input {source}: refusing to overwrite it"
            )
    if os.path.isdir(output):
        raise ValueError(f"output {output} is a folder, not a file")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise ValueError(f"output folder does not exist: {folder}")
    if not os.path.exists(output) or os.path.isfile(output):
        _check_writable(folder, f"the folder of output {output}")
