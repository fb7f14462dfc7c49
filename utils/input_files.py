"""One refusal, in one form, for an input path that is no regular file: an image, a
checkpoint, a config or a coded file. A pipe or a device given by mistake would
otherwise be called missing, and a dangling link look like a typo."""

import os


def check_is_file(path: str, what: str) -> None:
    """Refuse a ``path`` that is not a regular file, saying what it is instead.

    ``what`` names the input in the message (``"image"``, ``"checkpoint"``).

    Raises:
        ValueError: a folder, a link to nothing, a device or pipe, or nothing at all.
    """
    if os.path.isfile(path):
        return
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a folder, not a file")
    if os.path.islink(path):
        raise ValueError(f"{what} not found: {path} is a link to nothing")
    if os.path.exists(path):
        raise ValueError(f"{what} {path} is not a regular file (a device or a pipe)")
    raise ValueError(f"{what} not found: {path}")
