"""Atomic file writes: a reader never sees a half-written file.

A checkpoint, JSON result or bitstream that is interrupted mid-write (SIGTERM on
a cluster, a full disk, a crash) must not replace the previous good copy with a
truncated one. Every writer therefore writes a temporary file in the *same*
directory (so that the final rename stays on one filesystem), flushes it to disk
and then calls ``os.replace``, which POSIX and Windows both perform atomically.
"""

import io
import os
import tempfile

import torch

__all__ = ["atomic_write_bytes", "atomic_torch_save"]


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
        raise FileNotFoundError(f"cannot write {path!r}: directory {directory!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
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
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())
