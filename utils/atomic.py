"""Atomic file writes: a reader never sees a half-written file.

A checkpoint, JSON result or bitstream that is interrupted mid-write (SIGTERM on
a cluster, a full disk, a crash) must not replace the previous good copy with a
truncated one. Every writer therefore writes a temporary file in the *same*
directory (so that the final rename stays on one filesystem), flushes it to disk
and then calls ``os.replace``, which POSIX and Windows both perform atomically.
"""

import io
import json
import math
import os
import stat
import tempfile

__all__ = [
    "atomic_write_bytes",
    "atomic_write_files",
    "atomic_torch_save",
    "strict_json",
    "atomic_write_json",
    "save_json",
]


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically.

    Args:
        path: destination file (str or PathLike). Its directory must exist.
        data: ``bytes``/``bytearray``/``memoryview`` to store.

    Raises:
        TypeError: ``data`` is not bytes-like (a ``str`` would be ambiguous).
        FileNotFoundError: the destination directory does not exist.
    """
    atomic_write_files({path: data})


def atomic_write_files(files):
    """Write several files (``{path: bytes}``) so that either all of them are replaced
    or none is: each is first written in full to a temporary file in its folder, and
    only once every one is on disk are they renamed into place. A failure while
    writing (a full disk, an interrupt) removes the temporaries and leaves every
    earlier file as it was; a rename within one folder does not fail short of the
    folder itself going away. A device or a pipe that exists (``/dev/null``, a FIFO)
    is written in place after all the renames (renaming over it would replace the
    node itself), so a failure there leaves the regular files already replaced.

    Raises:
        TypeError: some data is not bytes-like (a ``str`` would be ambiguous).
        FileNotFoundError: a destination directory does not exist.
        IsADirectoryError: a destination is a folder.
    """
    paths = {}
    for path, data in files.items():
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"{path}: expected bytes, got {type(data).__name__}")
        path = os.fspath(path)
        _check_destination(path)
        paths[path] = data
    temporaries = {}
    try:
        for path, data in paths.items():
            if _is_regular_or_absent(path):
                temporaries[path] = _temporary_copy(path, data)
        in_place = [path for path in paths if path not in temporaries]
        for path in list(temporaries):
            os.replace(temporaries.pop(path), path)
        for path in in_place:
            with open(path, "wb") as stream:
                stream.write(paths[path])
    except BaseException:
        for tmp in temporaries.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def _check_destination(path: str) -> None:
    """Refuse ``path`` before anything is written: its folder must exist and it must
    not be a folder itself."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"cannot write {path!r}: directory {directory!r} does not exist"
        )
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path!r}: it is a folder")


def _is_regular_or_absent(path: str) -> bool:
    return not os.path.exists(path) or stat.S_ISREG(os.stat(path).st_mode)


def _temporary_copy(path: str, data) -> str:
    """A temporary file beside ``path`` (same file system, so the final rename is
    atomic) holding ``data``, flushed to disk, with the permissions a plain ``open``
    would give; removed again if writing it fails."""
    fd, tmp = tempfile.mkstemp(
        prefix=".tmp-",
        suffix="-" + os.path.basename(path),
        dir=os.path.dirname(os.path.abspath(path)),
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


def atomic_torch_save(obj, path):
    """``torch.save(obj, path)`` made atomic (serialised in memory, then written).

    Serialising to memory first means a pickling error leaves no file behind at
    all, and the old checkpoint at ``path`` stays intact.
    """
    # here, so that scripts can write JSON and figures before PyTorch loads
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def strict_json(document, indent: int = 2, sort_keys: bool = False) -> str:
    """JSON text every parser reads: infinite or NaN numbers (a lossless PSNR, an
    unmeasured figure) become ``null`` instead of Python's non-standard ``NaN``."""
    return json.dumps(
        _finite_or_none(document), indent=indent, sort_keys=sort_keys, allow_nan=False
    )


def atomic_write_json(path, document, indent: int = 2, sort_keys: bool = False) -> None:
    """:func:`strict_json` of ``document`` written to ``path`` atomically (its folder
    must exist), ending in a newline."""
    atomic_write_bytes(path, (strict_json(document, indent, sort_keys) + "\n").encode())


def save_json(path, document) -> None:
    """:func:`atomic_write_json` of ``document`` to ``path``, creating its folder first
    (results folders such as ``per-image/`` or ``benchmarks/results/local/``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_json(path, document)
