"""Command-line flags shared by ``codec.py`` and ``test.py``, parsed and checked once.

Nothing here imports PyTorch: the scripts parse and check their arguments first and
load the heavy libraries afterwards, so ``--help`` and argument errors come back at
once. Each flag becomes one typed value: ``--patch-size`` a
:class:`~utils.stitching.spec.PatchSpec`, ``--max-memory`` bytes (or None), and the
library never parses strings again.
"""

import argparse
import contextlib
import os
import select
import signal
import sys
import tempfile
import warnings
from typing import Callable, Iterator, List, Optional, Sequence

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


def add_force_argument(parser) -> None:
    """``--force``: the one switch letting a script write over existing output files."""
    parser.add_argument(
        "--force",
        action="store_true",
        help="write over output files that exist (an input is never overwritten)",
    )


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
