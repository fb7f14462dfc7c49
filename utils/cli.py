"""Command-line flags shared by ``codec.py`` and ``test.py``, parsed and checked once.

Nothing here imports PyTorch: the scripts parse and check their arguments first and
load the heavy libraries afterwards, so ``--help`` and argument errors come back at
once. Each flag becomes one typed value: ``--patch-size`` a
:class:`~utils.stitching.spec.PatchSpec`, ``--max-memory`` bytes (or None), and the
library never parses strings again.
"""

import argparse
import logging
import os
import select
import signal
import sys
import warnings
from typing import Callable, Optional

from utils.coding import ORDERS
from utils.memory import parse_memory
from utils.stitching.spec import AUTO, WHOLE, PatchSpec

DEFAULT_BUDGET = "2GB"
NO_BUDGET = "none"


def memory_budget(text: str) -> Optional[int]:
    """``--max-memory``: bytes, or None for ``none`` (no budget)."""
    if text.strip().lower() == NO_BUDGET:
        return None
    try:
        return parse_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def patch_spec(text: str) -> PatchSpec:
    """``--patch-size``: pixels, ``whole`` (or 0) or ``auto``."""
    try:
        return PatchSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """An integer of at least 1 (batch sizes, counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# The -a help of the commands that load a checkpoint (codec.py, test.py checkpoint).
ARCHITECTURE_HELP = (
    "registered architecture to build, over the one the checkpoint names (default: "
    "the checkpoint's, else the one whose published layout the weights match, else "
    "cps)"
)


def add_coding_arguments(
    group,
    patch_default: Optional[str],
    patch_help_default: str,
    naive_tiles: bool = False,
) -> None:
    """The flags of a learned codec run: patching, batch, budget, device, exactness.

    ``patch_default`` None leaves ``--patch-size`` unset (the caller picks a default,
    e.g. the dataset's); ``patch_help_default`` says what that default is.
    ``naive_tiles``: the command also has ``--tiling naive``, which cuts every
    model's input into tiles of ``--patch-size``.
    """
    without_pops = "models without POPS code whole images and ignore it"
    if naive_tiles:
        without_pops = (
            f"with --tiling naive the tile side of any model; otherwise {without_pops}"
        )
    group.add_argument(
        "--patch-size",
        type=patch_spec,
        default=None if patch_default is None else PatchSpec.parse(patch_default),
        help=f"POPS patch side in pixels (a multiple of 16 for CPS; "
        f"{without_pops}), {WHOLE!r} (or 0) for "
        f"the whole image, or {AUTO!r} for the patches that fit --max-memory "
        f"with the least recomputed overlap (default: {patch_help_default})",
    )
    group.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="most patches per forward pass (default: %(default)s)",
    )
    group.add_argument(
        "--max-memory",
        type=memory_budget,
        default=parse_memory(DEFAULT_BUDGET),
        help=f"peak memory of the process (RSS; CUDA allocated memory with "
        f"--cuda), e.g. 1GB or 800MB, or {NO_BUDGET} (default: "
        f"{DEFAULT_BUDGET})",
    )
    group.add_argument(
        "--entropy-coder-order",
        choices=ORDERS,
        default="wavefront",
        help="order in which the context model codes the latent when "
        "encoding (raster: CompressAI's, slower); a file records its own, "
        "so decoding does not need it (default: %(default)s)",
    )
    group.add_argument(
        "--cuda", action="store_true", help="run the networks on the GPU"
    )
    group.add_argument(
        "--fast",
        action="store_true",
        help="CPU: oneDNN convolutions (faster; patch-wise results then equal "
        "whole-image ones to float rounding instead of bit for bit)",
    )


def check_patch_size_for_model(
    spec: Optional[PatchSpec], model, tiling: Optional[str], warn: Callable[[str], None]
) -> None:
    """Check a fixed ``--patch-size`` against the model once it is loaded, before any
    coding: refuse one POPS cannot stitch (``ValueError``, and no warning first), then
    say so when it will not do what it seems to. A model that codes whole images (no
    POPS) ignores it unless ``tiling`` is ``naive``; a POPS patch under twice the
    model's overlap recomputes more than three quarters of itself, so coding is many
    times slower."""
    if spec is None or not spec.size or tiling == "naive":
        return
    if not model.supports_patches:
        warn(
            f"{model.registry_name} codes whole images (no POPS): "
            f"--patch-size {spec.size} is ignored "
            f"(--tiling naive in test.py cuts independent tiles of that size)"
        )
        return
    if tiling == "none":  # the model codes the whole image, as asked
        return
    from utils.stitching.geometry import check_patch_size, model_geometry

    geometry = model_geometry(model)
    check_patch_size(spec.size, geometry)
    if spec.size < 2 * geometry.overlap:
        warn(
            f"--patch-size {spec.size} recomputes most of every patch as overlap "
            f"(the POPS overlap is {geometry.overlap} px for {model.registry_name}): "
            f"coding is many times slower than at {4 * geometry.overlap} or auto"
        )


# Errors a script reports in one line with exit status 1: bad input, a file system
# problem, a machine without the memory. Anything else is a bug and keeps its traceback.
REPORTED_ERRORS = (ValueError, RuntimeError, OSError, MemoryError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line.

    An error raised inside a DataLoader worker reaches the main process wrapped in a
    message that carries the worker's whole traceback; its last line is the original
    ``Type: message``, and only the message is kept. A bare ``MemoryError`` says so.
    """
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return "out of memory" if isinstance(exc, MemoryError) else type(exc).__name__
    if len(lines) == 1:
        return lines[0]
    last = lines[-1]
    kind, sep, message = last.partition(": ")
    return message if sep and kind.isidentifier() else last


def report_error(program: str, exc: BaseException) -> int:
    """Print ``program: error: message`` on stderr, on one line; under torchrun, a
    rank other than 0 names itself (``program [rank 1]: error: ...``), since the
    ranks share stderr and often report the same refusal.

    Returns the status, 1.
    """
    rank = os.environ.get("RANK")
    if rank not in (None, "0"):
        program = f"{program} [rank {rank}]"
    print(f"{program}: error: {one_line(exc)}", file=sys.stderr)
    return 1


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


class LogFormatter(logging.Formatter):
    """The message alone, a warning's prefixed ``warning:`` as the scripts print
    their own and Python's warnings (:func:`show_warnings_as_one_line`)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"warning: {text}" if record.levelno == logging.WARNING else text


def show_warnings_as_one_line() -> None:
    """Print warnings as ``warning: message``, as the scripts print their own,
    instead of Python's file, line number and echoed source line, which say nothing
    to a user."""
    warnings.formatwarning = _one_line_warning


def run_main(main: Callable[[], int], program: str) -> int:
    """Run ``main`` so that Ctrl-C ends the program with one line and status 130,
    a reader of stdout or stderr that went away (``... | head``, ``... 2>&1 | head``)
    ends it quietly with status 141, as a shell reports a program stopped by SIGPIPE,
    and warnings are one line each (:func:`show_warnings_as_one_line`)."""
    show_warnings_as_one_line()
    try:
        status = main()
        # Piped output is block-buffered: a reader gone before the last block is met
        # here, not in Python's flush at exit (a message and status 120).
        sys.stdout.flush()
        return status
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # Another pipe (a codec's subprocess, a DataLoader worker) is an error.
        if not silence_gone_readers():
            raise
        return 128 + signal.SIGPIPE


def reader_gone(stream) -> bool:
    """Whether ``stream`` writes to a pipe whose reading end is closed (it polls as an
    error); False for a stream without a descriptor (replaced, closed, in memory)."""
    try:
        descriptor = stream.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    poller.register(descriptor, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def outputs_gone() -> bool:
    """Whether the reader of stdout or of stderr went away (:func:`reader_gone`)."""
    return reader_gone(sys.stdout) or reader_gone(sys.stderr)


def silence_gone_readers(*streams) -> bool:
    """After a ``BrokenPipeError``: point stdout, stderr and ``streams`` at /dev/null
    where their reader went away (:func:`reader_gone`), so that what is still written
    to them is dropped quietly; Python flushes stdout at exit, and would otherwise fail
    again, with a message on a stderr that may be gone too (``2>&1 | head``).

    Returns whether any of them had lost its reader: if none had, the broken pipe was
    another one's (a codec's subprocess, a DataLoader worker), which is an error.
    """
    gone = False
    for stream in (sys.stdout, sys.stderr, *streams):
        if reader_gone(stream):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
            gone = True
    return gone


def add_force_argument(parser) -> None:
    """``--force``: the one switch letting a script write over existing output files."""
    parser.add_argument(
        "--force",
        action="store_true",
        help="write over output files that exist (an input is never overwritten)",
    )
