"""Reading a checkpoint file: ``torch.load`` with ``weights_only=True``, after the
checks that turn a missing, truncated, damaged or foreign file into one clear line.
"""

import warnings
import zipfile
from typing import Optional

import torch

from utils.input_files import check_is_file

__all__ = ["read_checkpoint_file", "first_line"]


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none:
    PyTorch and zipfile put details a one-line report leaves out on later lines."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _damaged(path: str, reason: str) -> ValueError:
    return ValueError(
        f"cannot read checkpoint {path}: the file is damaged ({reason}); "
        "re-download or re-export it"
    )


def _first_crc_mismatch(archive: zipfile.ZipFile) -> Optional[str]:
    """The first member whose bytes or local header do not match the directory, or
    None. Like ``testzip``, but a member stored with CRC 0 is not read: that is what
    ``torch.save`` writes after ``torch.serialization.set_crc32_options(False)``, and
    ``torch.load`` reads such files (an empty member has CRC 0 too). Reading a member
    through ``open`` checks its CRC at the end: one extra read of the file (torch
    stores members uncompressed)."""
    for member in archive.infolist():
        if member.CRC == 0:
            continue
        try:
            with archive.open(member) as stream:
                while stream.read(1 << 20):
                    pass
        except zipfile.BadZipFile:
            return member.filename
    return None


def _check_torch_zip(path: str) -> None:
    """Refuse a zip archive that is damaged or that ``torch.save`` did not write.

    ``torch.load`` checks neither the members' CRC-32 (a flipped byte in a tensor
    loads as a wrong weight, and the codec then writes files the intact checkpoint
    refuses as another's) nor, in one line, the layout it needs: every member in one
    folder that holds ``data.pkl`` and ``version`` (or ``.data/version``).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            mismatch = _first_crc_mismatch(archive)
    except (NotImplementedError, RuntimeError) as exc:  # compressed or encrypted
        raise ValueError(
            f"cannot read checkpoint {path}: not a PyTorch checkpoint (a zip archive "
            f"torch.save does not write: {first_line(exc)})"
        ) from None
    except Exception as exc:
        # Damaged sizes, offsets or names fail in zipfile as BadZipFile, EOFError,
        # OSError (a negative seek), OverflowError, UnicodeDecodeError and others.
        raise _damaged(path, first_line(exc)) from None
    if mismatch is not None:
        raise _damaged(path, f"checksum or header mismatch in {mismatch}")
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


# How a file of torch.save's legacy (non-zip) format starts when torch.load can read
# it with weights_only=True: pickle protocol 2 (torch.save's default) or 3, then the
# format's magic number (a 10-byte LONG1). Protocols 4 and 5 frame it, and
# weights_only cannot read their frames. Any other pickle (pickle.dump's) is refused
# before torch.load, which would warn about its protocol and then call its tensors
# Python objects.
_LEGACY_STARTS = tuple(
    bytes([0x80, protocol, 0x8A, 10])
    + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
    for protocol in (2, 3)
)


def read_checkpoint_file(path: str) -> dict:
    """``torch.load`` with ``weights_only=True`` and one-line errors."""
    check_is_file(path, "checkpoint")
    with open(path, "rb") as handle:
        # torch.save writes a zip archive; files of torch < 1.6 are pickles (0x80).
        try:
            is_zip = zipfile.is_zipfile(handle)
        except Exception as exc:  # an end record that zipfile reads and refuses
            raise _damaged(path, first_line(exc)) from None
        handle.seek(0)
        start = handle.read(len(_LEGACY_STARTS[0]))
        if not is_zip and start[:4] == b"PK\x03\x04":  # a zip without its end
            raise ValueError(
                f"cannot read checkpoint {path}: the file is truncated or "
                "damaged (a torch.save zip archive without its end)"
            )
        if not is_zip and start[:1] != b"\x80":
            raise ValueError(
                f"cannot read checkpoint {path}: not a PyTorch checkpoint "
                "(neither a torch.save zip archive nor a pickle)"
            )
        cut_short = len(start) < len(_LEGACY_STARTS[0])
        if cut_short and any(legacy.startswith(start) for legacy in _LEGACY_STARTS):
            raise ValueError(  # not even the start of a legacy file's first pickle
                f"cannot read checkpoint {path}: the file is truncated (a legacy "
                f"torch.save file of {len(start)} bytes)"
            )
        if not is_zip and not start.startswith(_LEGACY_STARTS):
            raise ValueError(
                f"cannot read checkpoint {path}: not a PyTorch checkpoint that loads "
                "without running its code (a pickle torch.save did not write, e.g. "
                "pickle.dump's, or a legacy torch.save with pickle_protocol 4 or "
                "more); load it in Python you trust and save it with torch.save"
            )
    if is_zip:
        _check_torch_zip(path)
    try:
        with warnings.catch_warnings():
            # Raised for protocol 3, which loads, and for sparse tensors, which
            # check_buildable refuses: neither is the user's to act on.
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            warnings.filterwarnings("ignore", "Validating sparse tensor invariants")
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
