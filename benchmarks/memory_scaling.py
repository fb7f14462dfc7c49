"""Peak memory and time of whole codecs as the image grows (the paper's Fig. 6).

    python benchmarks/memory_scaling.py [--sizes 640x360 ... 7680x4320] [--N 192]
        [--methods cps-budget cps-whole mbt2018 cheng2020-anchor] [--max-memory 2GB]
        [--cuda] [--authors-repo PATH [--authors-patch-size 256]] [-o FILE | --publish]

Codecs, each compressing and decompressing a synthetic photo-like image (smooth
gradients plus noise) to real bitstreams:

- ``cps-budget``: this repository's codec under ``--max-memory`` (POPS patches as
  large as the budget allows, the whole image when it fits);
- ``cps-whole``: the same codec and model on the whole image in one pass;
- ``mbt2018``: CompressAI's ``mbt2018`` (quality 3, N = M = 192) ``compress`` and
  ``decompress`` on the whole image, with its per-position context loop;
- ``cheng2020-anchor``: CompressAI's ``cheng2020-anchor`` (quality 4, N = 192, the
  residual-block transforms of Cheng et al., CVPR 2020), coded the same way;
- ``authors-cps``, only with ``--authors-repo PATH`` (a checkout of
  github.com/bblgbr/SPL-CPS): the authors' own CPS code with the same weights as
  ``cps-*``, run as their ``test.py --patch`` runs it (``compress_patch`` with
  ``--authors-patch-size``, default 256; 0 for their whole-image ``compress``).
  The table then gives the ratio of its peak and time to ``cps-budget``'s; without
  the flag its columns read "not measured".

Each (codec, size) runs in a fresh process, so the peak is that run's alone: the
process peak RSS (``VmHWM``, everything the process ever held, the ~0.8 GB of
imported libraries included), or CUDA max allocated memory with ``--cuda``. Runs
predicted to need more than ``--skip-above`` (default 18 GB, this machine has 24 GB)
are not started and their prediction is reported instead. ``transform_s`` is the
time spent in the analysis and synthesis transforms (patch loops included), which
is where patch-wise and whole-image CPS differ. Models have random weights, with
the CPS scale predictions spread over the scale table
(``benchmarks/synthetic.py``): memory and transform time do not depend on them.

Writes a JSON file and a PNG plot next to it (``benchmarks/results/local/`` unless
``--publish``) and prints a Markdown table.

This module is the driver: the command line, which runs to start, a child process
per run, and the merge with ``--update``'s earlier results.
``benchmarks/memory_scaling_child.py`` is the child's side (one codec on one image);
``benchmarks/memory_scaling_report.py`` makes the table and the plot.
"""

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import warnings

warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

from benchmarks.authors import NOT_MEASURED, load_authors_cps
from benchmarks.memory_scaling_child import AUTHORS, METHODS, run_child
from benchmarks.memory_scaling_report import authors_ratios, format_table, plot
from benchmarks.results_io import (
    add_output_arguments,
    machine_info,
    refuse_missing_cuda,
    refuse_repeats,
    resolve_output,
)
from utils.atomic import save_json
from utils.cli import DEFAULT_BUDGET, positive_int, run_main
from utils.memory import format_memory, parse_memory

SIZES = ("640x360", "1280x720", "1920x1080", "3840x2160", "7680x4320")
# Peak bytes per image pixel above the libraries, measured on the CPU (N=192) at
# 1920x1080 and 3840x2160: used only to decide which runs would not fit the machine.
PREDICTED_BYTES_PER_PIXEL = {"cps-whole": 1150, "mbt2018": 800, "cheng2020-anchor": 900}
LIBRARIES_BYTES = 900 * 2**20


def parse_size(text: str) -> Tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height), both positive; an argparse type, also
    shared by ``benchmarks/entropy_coding.py``."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(
            f"image size {text!r} is not WIDTHxHEIGHT in positive "
            "pixels, e.g. 1920x1080"
        )
    return int(parts[0]), int(parts[1])


def memory_size(text: str) -> str:
    """A memory size that :func:`parse_memory` reads (``2GB``), kept as written: the
    children get it on their command line and the results file records it."""
    try:
        parse_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def figure_path(output: str) -> str:
    """The plot written beside the results file ``output``."""
    return os.path.splitext(output)[0] + ".png"


def run_settings(args: argparse.Namespace) -> Dict[str, object]:
    """The settings a results file records, which every entry it holds shares."""
    return {
        "N": args.N,
        "device": "cuda" if args.cuda else "cpu",
        "budget_mb": parse_memory(args.max_memory) / 2**20,
        "authors_patch_size": args.authors_patch_size if args.authors_repo else None,
    }


def previous_results(path: str, settings: Dict[str, object]) -> Dict[str, object]:
    """The memory_scaling results file ``path`` whose entries ``--update`` keeps,
    checked before any run so that the merge at the end cannot fail.

    Raises:
        ValueError: ``path`` cannot be read, is not JSON, is not a memory_scaling
            results file whose entries name a method and an image, or records one
            of ``settings`` (:func:`run_settings`) with another value: the merged
            file would hold runs it does not describe.
    """
    try:
        with open(path) as handle:
            document = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if (
        not isinstance(document, dict)
        or document.get("benchmark") != "memory_scaling"
        or not isinstance(document.get("results"), list)
    ):
        raise ValueError(f"{path} is not a memory_scaling results file")
    for key, value in settings.items():
        recorded = document.get(key)
        if None not in (recorded, value) and recorded != value:
            raise ValueError(
                f"{path} holds runs with {key} {recorded}, this run has {value}: "
                "give the same setting, or another -o"
            )
    for entry in document["results"]:
        if (
            not isinstance(entry, dict)
            or entry.get("method") not in METHODS
            or not isinstance(entry.get("image"), str)
            or not isinstance(entry.get("megapixels"), (int, float))
        ):
            raise ValueError(
                f"{path}: an entry without a known method, an image and its "
                f"megapixels: {json.dumps(entry)[:80]}"
            )
    return document


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        default=[parse_size(size) for size in SIZES],
        help="WIDTHxHEIGHT images",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=None,
        help="default: all but authors-cps, plus authors-cps with --authors-repo",
    )
    parser.add_argument(
        "--N", type=positive_int, default=192, help="CPS width (default: 192)"
    )
    parser.add_argument(
        "--max-memory",
        type=memory_size,
        default=DEFAULT_BUDGET,
        help="budget of cps-budget (default: %(default)s)",
    )
    parser.add_argument(
        "--skip-above",
        type=memory_size,
        default="18GB",
        help="do not start runs predicted to need more (default: %(default)s)",
    )
    parser.add_argument("--cuda", action="store_true", help="transforms on the GPU")
    parser.add_argument(
        "--authors-repo",
        metavar="PATH",
        help="checkout of the authors' SPL-CPS code: adds the authors-cps method",
    )
    parser.add_argument(
        "--authors-patch-size",
        type=int,
        default=None,
        help="patch size of the authors' codec, 0 = whole image (default: 256)",
    )
    add_output_arguments(parser, "memory_scaling.json")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the other entries of an existing --output file (e.g. to add one "
        "run with a higher --skip-above)",
    )
    parser.add_argument(
        "--child", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    refuse_repeats(parser, args, "--sizes", "--methods")
    if args.methods is None:
        args.methods = [m for m in METHODS if m != AUTHORS or args.authors_repo]
    if AUTHORS in args.methods and not args.authors_repo:
        parser.error(f"--methods {AUTHORS} needs --authors-repo PATH")
    if args.authors_repo and AUTHORS not in args.methods:
        parser.error(
            f"--authors-repo is for the {AUTHORS} method, which --methods leaves "
            "out: add it, or leave --authors-repo out"
        )
    if args.authors_patch_size is None:
        args.authors_patch_size = 256
    elif not args.authors_repo:
        parser.error(
            "--authors-patch-size is for the authors' code: give --authors-repo"
        )
    if args.authors_patch_size < 0:
        parser.error("--authors-patch-size must be >= 0")
    refuse_missing_cuda(parser, args)
    resolve_output(parser, args)
    if os.path.isdir(figure_path(args.output)):
        parser.error(
            f"-o/--output: its figure {figure_path(args.output)} is a folder; "
            "remove it or give another -o"
        )
    args.previous, args.previous_authors = None, {}
    if args.update and os.path.exists(args.output):
        try:
            previous = previous_results(args.output, run_settings(args))
        except ValueError as exc:
            parser.error(f"--update: {exc}")
        args.previous = previous["results"]
        # The authors' runs it keeps, when this run does not measure them again.
        args.previous_authors = {
            key: previous.get(key) for key in ("authors_repo", "authors_patch_size")
        }
    return args


def predicted_bytes(
    method: str, width: int, height: int, authors_patch_size: int = 0
) -> int:
    """Rough peak of one run, to skip those that would not fit (0: always run)."""
    if method == "cps-budget" or (method == AUTHORS and authors_patch_size):
        return 0
    if method == AUTHORS:
        method = "cps-whole"
    return LIBRARIES_BYTES + PREDICTED_BYTES_PER_PIXEL[method] * width * height


def measure(method: str, width: int, height: int, args) -> Dict[str, object]:
    size = f"{width}x{height}"
    entry: Dict[str, object] = {
        "method": method,
        "image": size,
        "megapixels": width * height / 1e6,
    }
    prediction = predicted_bytes(method, width, height, args.authors_patch_size)
    if prediction > parse_memory(args.skip_above):
        entry.update(skipped=True, predicted_peak_mb=prediction / 2**20)
        return entry
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        method,
        size,
        "--N",
        str(args.N),
        "--max-memory",
        args.max_memory,
    ]
    command += ["--cuda"] if args.cuda else []
    if method == AUTHORS:
        command += [
            "--authors-repo",
            args.authors_repo,
            "--authors-patch-size",
            str(args.authors_patch_size),
        ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        entry.update(
            failed=True,
            returncode=result.returncode,
            stderr=result.stderr.strip()[-500:],
        )
        return entry
    entry.update(json.loads(result.stdout.strip().splitlines()[-1]))
    return entry


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        method, size = args.child
        return run_child(method, *parse_size(size), args)
    if AUTHORS in args.methods:
        try:
            load_authors_cps(args.authors_repo)
        except ValueError as exc:
            print(f"memory_scaling.py: error: {exc}", file=sys.stderr)
            return 1
    entries = []
    for width, height in args.sizes:
        for method in args.methods:
            entry = measure(method, width, height, args)
            entries.append(entry)
            print(json.dumps(entry), flush=True)
    if args.previous is not None:
        measured = {(entry["method"], entry["image"]) for entry in entries}
        kept = [
            entry
            for entry in args.previous
            if (entry["method"], entry["image"]) not in measured
        ]
        entries = kept + entries
        entries.sort(
            key=lambda entry: (entry["megapixels"], METHODS.index(entry["method"]))
        )
    methods = [
        method
        for method in METHODS
        if any(entry["method"] == method for entry in entries)
    ]
    table = format_table(entries, methods)
    # Authors' entries kept by --update keep the settings they were measured with.
    authors = {} if args.authors_repo else args.previous_authors
    has_authors = AUTHORS in methods
    document = {
        "benchmark": "memory_scaling",
        **run_settings(args),
        "max_memory": args.max_memory,
        "machine": machine_info(),
        "authors_repo": args.authors_repo,
        **(authors if has_authors else {}),
        "authors_ratios": authors_ratios(entries) if has_authors else NOT_MEASURED,
        "results": entries,
        "table": table,
    }
    save_json(args.output, document)
    plot(entries, methods, figure_path(args.output), args.max_memory)
    print(table)  # after the files: a reader may leave
    budget = format_memory(parse_memory(args.max_memory))
    print(f"wrote {args.output} and its plot; budget {budget}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "memory_scaling.py"))
