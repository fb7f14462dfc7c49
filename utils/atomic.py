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
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes expects bytes, got {type(data).__name__}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"cannot write {path!r}: directory {directory!r} does not exist"
        )
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path!r}: it is a folder")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        # A device or a pipe (/dev/null, a FIFO): renaming over it would replace
        # the node itself with a file, so it is written in place; atomicity means
        # nothing there.
        with open(path, "wb") as stream:
            stream.write(data)
        return
    fd, tmp = tempfile.mkstemp(
        prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory
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
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
