"""Memory: sizes like ``2GB``, what the process holds now, and its peak over a block.

A budget bounds the peak memory of the whole process: resident set size (RSS) on
the CPU, or CUDA allocated memory when the transforms run on a GPU. How the codec
spends it is planned in ``utils/stitching/planner.py``; this module only reads and
resets the counters, and turns sizes into bytes and back.

On Linux with glibc, :func:`return_freed_memory` makes freed tensors go back to the
operating system at once (glibc otherwise keeps up to 32 MB blocks in its heap), so
the RSS follows the live tensors and measurements of it mean something.

PyTorch is imported inside the two functions that read CUDA counters, so that
command lines parse ``--max-memory`` before the heavy libraries load.
"""

import contextlib
import ctypes
import ctypes.util
import functools
import re
import sys
from typing import Callable, Iterator, List, Optional

NO_BUDGET_HINT = "run without one (--max-memory none) and choose --patch-size yourself"

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_memory(text: str) -> int:
    """Bytes in a size such as ``2GB``, ``1.5G``, ``512MB``, ``640M`` or ``100000``.

    Units are binary (1 GB = 2**30 bytes, as for RAM); ``KiB``/``MiB``/``GiB``
    spellings are accepted too.
    """
    match = re.fullmatch(
        r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE
    )
    if not match:
        raise ValueError(
            f"cannot read memory size {text!r}: expected a number with an optional "
            "unit, e.g. 2GB, 512MB"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value < 1:
        raise ValueError(f"memory size {text!r} is zero")
    return int(value)


def format_memory(size: float) -> str:
    """``1536 * 2**20`` -> ``'1536 MB'`` (binary units, as :func:`parse_memory` reads);
    sizes under a megabyte in kilobytes or bytes, so that none reads as ``0 MB``."""
    if size >= 2**20:
        return f"{size / 2**20:.0f} MB"
    if size >= 2**10:
        return f"{size / 2**10:.0f} KB"
    return f"{size:.0f} B"


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        library = ctypes.CDLL(name or "libc.so.6")
        library.mallopt  # noqa: B018 - glibc only; musl has no mallopt
        return library
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD = 65536, 128 * 1024
_TUNED_THRESHOLD = 2**20  # mmap and trim thresholds once return_freed_memory has run
_MALLOC_TUNED = False


def return_freed_memory() -> None:
    """Hand memory freed by tensors back to the operating system (glibc only).

    The first call fixes glibc's mmap threshold at 1 MB (by default it grows up
    to 32 MB as blocks are freed, which keeps freed activations resident) and
    lowers its trim threshold; every call trims the heap.
    """
    global _MALLOC_TUNED
    if _LIBC is None:
        return
    if not _MALLOC_TUNED:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _TUNED_THRESHOLD)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, _TUNED_THRESHOLD)
        _MALLOC_TUNED = True
    _LIBC.malloc_trim(0)


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within this block, glibc serves large blocks from its heap and keeps freed
    ones for reuse instead of mapping fresh pages for each (glibc only).

    A transform allocates tens of megabytes per layer output; mapped afresh, each
    costs a page fault per 4 KB, about 0.4 s per GB faulted, a sixth of the CPU
    transforms' time. The peak is unchanged as long as freed blocks are reused, and
    the heap is trimmed on the way out, so the memory planner, which reads the
    process's resident memory between phases, sees only live memory there.
    """
    if _LIBC is None:
        yield
        return
    _LIBC.mallopt(_M_MMAP_MAX, 0)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        _LIBC.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        _LIBC.mallopt(
            _M_TRIM_THRESHOLD,
            _TUNED_THRESHOLD if _MALLOC_TUNED else _DEFAULT_TRIM_THRESHOLD,
        )
        _LIBC.malloc_trim(0)


def proc_status_kb(field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``).

    Returns None off Linux.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (``VmHWM``) to its current RSS.

    Returns False where unsupported.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def memory_in_use(device) -> int:
    """Bytes the budget counts right now on ``device`` (a ``torch.device``): process
    RSS, or CUDA allocated memory."""
    if device.type == "cuda":
        import torch

        return torch.cuda.memory_allocated(device)
    resident = proc_status_kb("VmRSS")
    if resident is None:
        raise ValueError(
            f"a memory budget needs the process's resident memory from "
            f"/proc/self/status, which this system lacks; {NO_BUDGET_HINT}"
        )
    return resident * 1024


@functools.lru_cache(maxsize=None)
def _peak_rss_resettable() -> bool:
    """Whether this system gives a resettable peak RSS.

    Probed once: the probe resets it.
    """
    return proc_status_kb("VmHWM") is not None and reset_peak_rss()


class PeakMemory:
    """The peak memory reached inside a ``with`` block: the one meter of the project.

    On CUDA devices this is ``torch.cuda.max_memory_allocated`` (tensors only) after
    a reset of the peak statistics. On the CPU it is the peak resident set size of
    the whole process: on Linux the high-water mark is reset first (writing 5 to
    ``/proc/self/clear_refs``) and read back from ``VmHWM``; elsewhere it falls back
    to ``getrusage``'s lifetime maximum, which can only grow from block to block.
    ``kind`` says which one is measured and ``resettable`` whether it is a true
    per-block peak (a memory budget needs one).

    Meters nest: the counters are global to the process (or device), so a meter
    entered inside another hands the peak reached so far to the open ones before it
    resets the counter, and each reports the peak of its own block.

    Usage::

        with PeakMemory(device) as memory:
            ...
        memory.peak_bytes, memory.peak_mb
    """

    _open: List["PeakMemory"] = []  # entered and not yet left, outermost first

    def __init__(self, device):
        self.device = device
        self.peak_bytes: Optional[int] = None
        self._carried = 0
        if device.type == "cuda":
            self.kind, self.resettable = "cuda max_memory_allocated", True
        elif _peak_rss_resettable():
            self.kind, self.resettable = "process peak RSS (VmHWM)", True
        else:
            self.kind, self.resettable = "process lifetime peak RSS (getrusage)", False

    @property
    def peak_mb(self) -> Optional[float]:
        return None if self.peak_bytes is None else self.peak_bytes / 2**20

    def _read_peak(self) -> int:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.resettable:
            return proc_status_kb("VmHWM") * 1024
        return _lifetime_peak_rss()

    def _reset(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            reset_peak_rss()

    def __enter__(self) -> "PeakMemory":
        outer = [meter for meter in PeakMemory._open if meter.device == self.device]
        if outer:
            reached = self._read_peak()
            for meter in outer:
                meter._carried = max(meter._carried, reached)
        elif self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        self._reset()
        self._carried = 0
        PeakMemory._open.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        PeakMemory._open.remove(self)
        self.peak_bytes = max(self._read_peak(), self._carried)


def _lifetime_peak_rss() -> int:
    """``getrusage``'s maximum RSS in bytes (kilobytes on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_added(device, run: Callable[[], None]) -> int:
    """Bytes ``run()`` adds to the peak of what a budget counts on ``device`` (a
    ``torch.device``), its result freed: how the planners measure working memory."""
    return_freed_memory()
    before = memory_in_use(device)
    meter = PeakMemory(device)
    if not meter.resettable:
        raise ValueError(
            f"a memory budget needs to reset the process's peak memory through "
            f"/proc/self/clear_refs, which this system lacks; {NO_BUDGET_HINT}"
        )
    with meter:
        run()
    return_freed_memory()
    return max(meter.peak_bytes - before, 0)
