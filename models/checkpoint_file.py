"""Reading a checkpoint file: ``torch.load`` with ``weights_only=True``, after the
checks that turn a missing, truncated, damaged or foreign file into one clear line.
"""

import os
import zipfile
import zlib
from typing import Optional

import torch

__all__ = ["read_checkpoint_file", "first_line"]


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none:
    PyTorch and zipfile put details a one-line report leaves out on later lines."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _check_torch_zip(path: str) -> None:
    """Refuse a zip archive that is damaged or that ``torch.save`` did not write.

    ``torch.load`` checks neither the members' CRC-32 (a flipped byte in a tensor
    loads as a wrong weight, and the codec then writes files the intact checkpoint
    refuses as another's) nor, in one line, the layout it needs: every member in one
    folder that holds ``data.pkl`` and ``version`` (or ``.data/version``).
    ``testzip`` reads every member once and compares its CRC: one extra read of the
    file (torch stores members uncompressed).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            mismatch = archive.testzip()
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise ValueError(
            f"cannot read checkpoint {path}: the file is damaged ({first_line(exc)}); "
            "re-download or re-export it"
        ) from None
    except (NotImplementedError, RuntimeError) as exc:  # compressed or encrypted
        raise ValueError(
            f"cannot read checkpoint {path}: not a PyTorch checkpoint (a zip archive "
            f"torch.save does not write: {exc})"
        ) from None
    if mismatch is not None:
        raise ValueError(
            f"cannot read checkpoint {path}: the file is damaged (checksum or "
            f"header mismatch in {mismatch}); re-download or re-export it"
        )
    missing = _missing_torch_layout(names)
    if missing:
        raise ValueError(
            f"cannot read checkpoint {path}: not a PyTorch checkpoint (a zip archive "
            f"without torch.save's layout: {missing})"
        )


def _missing_torch_layout(names: list) -> Optional[str]:
    """What the member ``names`` of a zip archive lack for ``torch.load``, or None."""
    if not names:
        return "it is empty"
    folder = names[0].split("/", 1)[0] + "/"
    stray = [name for name in names if not name.startswith(folder)]
    if stray:  # names[0] itself when it is in no folder
        return f"no folder holds every member ({stray[0]} is outside)"
    if folder + "data.pkl" not in names:
        return f"no {folder}data.pkl"
    if folder + "version" not in names and folder + ".data/version" not in names:
        return f"no {folder}version"
    return None


def read_checkpoint_file(path: str) -> dict:
    """``torch.load`` with ``weights_only=True`` and one-line errors."""
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path}")
    with open(path, "rb") as handle:
        # torch.save writes a zip archive; files of torch < 1.6 are pickles (0x80).
        is_zip = zipfile.is_zipfile(handle)
        handle.seek(0)
        start = handle.read(4)
        if not is_zip and start == b"PK\x03\x04":  # a zip without its closing directory
            raise ValueError(
                f"cannot read checkpoint {path}: the file is truncated or "
                "damaged (a torch.save zip archive without its end)"
            )
        if not is_zip and start[:1] != b"\x80":
            raise ValueError(
                f"cannot read checkpoint {path}: not a PyTorch checkpoint "
                "(neither a torch.save zip archive nor a pickle)"
            )
    if is_zip:
        _check_torch_zip(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors all land here
        reason = first_line(exc)
        if reason.startswith("Weights only load failed"):
            # PyTorch's first line announces options its later lines give; the reason is
            # what matters here, and loading the objects could run code from the file.
            reason = (
                "it holds Python objects besides tensors and plain containers, "
                "which are not loaded because unpickling them can run code; save "
                "the weights alone (torch.save of the state_dict)"
            )
        raise ValueError(f"cannot read checkpoint {path}: {reason}") from None
