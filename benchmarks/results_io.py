"""Where the benchmarks write their results.

A run writes to ``benchmarks/results/local/`` (git-ignored), so that trying a
benchmark on a laptop never changes the tracked figures. ``--publish`` writes the
tracked ``benchmarks/results/NAME`` instead; ``-o/--output`` names any other file.
That file is checked when the arguments are parsed, so that a path the run could
not write ends it at once, not after minutes of measuring.
"""

import argparse
import os
from typing import Optional, Sequence

from utils.atomic import save_json
from utils.output_paths import check_output_path

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LOCAL_DIR = os.path.join(RESULTS_DIR, "local")


def add_output_arguments(parser: argparse.ArgumentParser, filename: str) -> None:
    """Add ``-o/--output`` and ``--publish`` for a benchmark whose results file is
    ``filename``; call :func:`resolve_output` after parsing."""
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help=f"results file (default: benchmarks/results/local/{filename})",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help=f"write the tracked benchmarks/results/{filename}",
    )
    parser.set_defaults(results_filename=filename)


def check_output(path: str) -> None:
    """Refuse an output that the end of a run could not write: an empty name, a
    folder, a path under a regular file, or one whose folder does not exist or cannot
    be written; and a name without ``.json`` (scripts that draw a figure write it
    beside the JSON, as ``.png``: ``-o x.png`` would have overwritten it). Raises
    ValueError saying which."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(folder):
        raise ValueError(f"output {path}: {folder} is a file, not a folder")
    check_output_path(path, ())
    if not path.endswith(".json"):
        raise ValueError(
            f"output {path} must be a .json file (a figure, if any, is "
            "written beside it as .png)"
        )


def resolve_output(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Set and return ``args.output``: the given file, the tracked one with
    ``--publish``, else the local one (its folder is created when written). Both
    flags together, or a given file that :func:`check_output` refuses, are usage
    errors."""
    if args.publish and args.output is not None:
        parser.error("give --publish or -o/--output, not both")
    if args.output is None:
        folder = RESULTS_DIR if args.publish else LOCAL_DIR
        args.output = os.path.join(folder, args.results_filename)
    else:
        try:
            check_output(args.output)
        except ValueError as exc:
            parser.error(f"-o/--output: {exc}")
    return args.output


def parse_with_output(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], filename: str
) -> argparse.Namespace:
    """Add the output flags for ``filename`` (:func:`add_output_arguments`), parse
    ``argv`` and resolve ``args.output``: the last steps of a benchmark's parser."""
    add_output_arguments(parser, filename)
    args = parser.parse_args(argv)
    resolve_output(parser, args)
    return args


def refuse_repeats(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *options: str
) -> None:
    """A usage error when a list option (``"--sizes"``, ...) names a value twice: the
    benchmark would measure it twice and write the same row twice."""
    for option in options:
        seen = []
        for value in getattr(args, option.lstrip("-").replace("-", "_")) or ():
            if value in seen:
                shown = "x".join(map(str, value)) if isinstance(value, tuple) else value
                parser.error(f"{option} names {shown} twice")
            seen.append(value)


def refuse_missing_cuda(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> None:
    """A usage error when ``--cuda`` is given on a machine without CUDA: a run would
    fail on its first tensor, or in every child process that it records as failed."""
    import torch

    if args.cuda and not torch.cuda.is_available():
        parser.error(
            "--cuda was given but CUDA is not available on this machine; leave "
            "--cuda out to measure on the CPU"
        )


def machine_info(**extra: object) -> dict:
    """The machine a result comes from: CPU model (from /proc/cpuinfo where there is
    one), the vector instructions PyTorch's CPU kernels use (``AVX2``, ``AVX512``:
    the same 2-core machine can be either from one session to the next, and the
    figures differ by up to 2x), core count and PyTorch version, then the ``extra``
    fields. PyTorch is imported on call so that importing this module stays light:
    startup.py loads PyTorch only once its measurements are done."""
    import torch

    from utils.device import cpu_model_name  # imports PyTorch

    return {
        "cpu": cpu_model_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        **extra,
    }


def save_results(path: str, document: dict) -> None:
    """Save the results ``document`` to ``path`` (:func:`utils.atomic.save_json`) and
    say where it went."""
    save_json(path, document)
    print(f"wrote {path}")
