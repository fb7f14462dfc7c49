"""Compress images to ``.cps`` files, or decompress them, with any registered model.

    python codec.py encode IN.png OUT.cps -p CKPT [--max-memory 2GB] [--patch-size P]
        [--cuda]
    python codec.py decode IN.cps OUT.png -p CKPT [--max-memory 2GB] [--patch-size P]
        [--cuda]
    python codec.py encode A.png B.png C.png -d OUTDIR -p CKPT      (OUTDIR/A.cps, ...)
    python codec.py ... --force     (write over output files that exist)

``--max-memory`` bounds the peak memory of the whole process (RSS; CUDA allocated
memory with ``--cuda``): the transforms then run on the POPS patches that fit and
recompute the least overlap, the whole image when it fits. A budget that cannot be
met is an error before any work is done. The decoded image does not depend on the
budget or the patch size.

Layered models (``mei2021-quality``, ``mei2021-spatial``) write a ``.cpsl`` container
with one stream per layer instead; ``--layers K`` keeps (encode) or decodes (decode)
only the first K layers, and the decoder outputs layer K's reconstruction.

Several inputs with ``-d OUTDIR`` pay the start-up once; outputs are named after each
input's stem. Every input is checked before the first is coded (an image's header, a
coded file whole); one that fails only while being coded (a truncated image) is
reported, the others are still coded, and the status is 1. Prints the rate computed
from the file size (header included) and the times. An output file that exists is
refused, before anything is written, unless ``--force`` is given; an output is never
one of the inputs, even with ``--force``.
A command line argparse cannot read (an unknown flag, a missing argument, a value of
the wrong type) prints the usage and one error line and exits with status 2; any
other bad input ends with one line on stderr and status 1; Ctrl-C ends it with
status 130.
"""

import argparse
import math
import os
import sys
import time
from typing import List, Optional, Tuple

from utils.cli import (
    ARCHITECTURE_HELP,
    REPORTED_ERRORS,
    add_coding_arguments,
    add_force_argument,
    check_patch_size_for_model,
    one_line,
    report_error,
    run_main,
)
from utils.input_files import check_is_file
from utils.output_paths import (
    check_output_folder,
    check_output_path,
    create_output_folder,
    refuse_existing_outputs,
    remove_unused_folders,
)

COMMANDS = {
    "encode": ("images to compress (PNG, JPEG, ...)", ".cps"),
    "decode": (".cps or .cpsl files", ".png"),
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every sub-command, before the checks of :func:`parse_args`;
    tests/test_docs.py holds the docs to every flag it defines."""
    parser = argparse.ArgumentParser(
        prog="codec.py", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (sources, suffix) in COMMANDS.items():
        command = commands.add_parser(name)
        command.add_argument(
            "paths",
            nargs="+",
            metavar="PATH",
            help=f"IN OUT, or with -d several INs ({sources})",
        )
        command.add_argument(
            "-d",
            "--output-dir",
            default=None,
            help=f"write OUTDIR/<input stem>{suffix} for every input "
            "(created if missing)",
        )
        command.add_argument(
            "-p", "--checkpoint", required=True, help="model checkpoint (.pth.tar)"
        )
        command.add_argument(
            "-a",
            "--architecture",
            default=None,
            help=ARCHITECTURE_HELP,
        )
        add_coding_arguments(command, "auto", "auto")
        command.add_argument(
            "--layers",
            type=int,
            default=0,
            help="layered models: keep / decode the first K layers (0: all)",
        )
        add_force_argument(command)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.layers < 0:
        parser.error(f"--layers must be >= 0, got {args.layers}")
    if args.output_dir is None and len(args.paths) != 2:
        parser.error("give IN OUT, or several inputs with -d OUTDIR")
    return args


def jobs(
    args: argparse.Namespace, layered_suffix: bool = False
) -> List[Tuple[str, str]]:
    """(input, output) pairs, checked before any work: inputs exist, outputs do not
    overwrite an input, two inputs do not share an output, and ``-d`` can be made
    (it is made by :func:`main`, once the model and inputs have passed too)."""
    if args.output_dir is None:
        pairs = [(args.paths[0], args.paths[1])]
    else:
        suffix = COMMANDS[args.command][1]
        if layered_suffix:
            suffix = ".cpsl"
        pairs = [
            (
                path,
                os.path.join(
                    args.output_dir,
                    os.path.splitext(os.path.basename(path))[0] + suffix,
                ),
            )
            for path in args.paths
        ]
    inputs = [source for source, _ in pairs]
    for source in inputs:
        check_is_file(source, "input")
    outputs = [target for _, target in pairs]
    if len(set(map(os.path.realpath, outputs))) < len(outputs):
        raise ValueError(
            "two inputs have the same name, so their outputs would collide"
        )
    if args.output_dir is not None:
        # Made only once every check has passed (main), so that a refused run leaves
        # no empty folder; one still to be made holds no input and no file to lose.
        check_output_folder(args.output_dir, "-d")
        if not os.path.isdir(args.output_dir):
            return pairs
    for target in outputs:
        # The checkpoint is read too: writing over it would destroy the model.
        check_output_path(target, inputs + [args.checkpoint])
    return pairs


def _check_reading_fits(source: str, budget) -> None:
    """Refuse, from the header alone, an image the format cannot hold or whose reading
    would break the budget."""
    from utils.coding.payload import check_size
    from utils.image_io import image_size
    from utils.stitching.planner import check_reading_fits

    width, height = image_size(source)
    check_size(height, width)
    check_reading_fits(width, height, budget)


# Copies of a coded file held while it is parsed: its bytes, the body checked against
# the trailing CRC, and the strings cut from the body.
_CODED_FILE_COPIES = 3


def _read_coded(source: str, budget) -> bytes:
    """The bytes of the ``.cps``/``.cpsl`` file ``source``, refused before it is read
    whole: from its first bytes when it is no such file, and from its size when
    parsing it would break the budget (a video given by mistake was read into
    memory first, past the budget)."""
    from utils.coding.container import check_magic
    from utils.memory import format_memory
    from utils.stitching.planner import check_file_reading_fits

    with open(source, "rb") as handle:
        check_magic(handle.read(4))
        size = os.fstat(handle.fileno()).st_size
        check_file_reading_fits(
            _CODED_FILE_COPIES * size,
            budget,
            f"reading of this {format_memory(size)} file",
        )
        handle.seek(0)
        return handle.read()


def check_inputs(args: argparse.Namespace, model, plan, pairs) -> None:
    """Check every input before the first is coded, so that a batch with a bad file
    fails before writing anything: an image's header (a readable format, a size the
    container holds, a reading that fits the budget), or a whole ``.cps``/``.cpsl``
    file (its checksum, and that this model wrote it). What only decoding the pixels
    shows (a truncated image) is found in :func:`main`'s loop."""
    from utils.coding.container import unpack
    from utils.coding.payload import LayeredImage, check_model

    for source, _ in pairs:
        try:
            # On CUDA the budget counts GPU memory, which reading does not use.
            budget = None if args.cuda else plan.budget_bytes
            if args.command == "encode":
                _check_reading_fits(source, budget)
            else:
                payload = unpack(_read_coded(source, budget))
                # Architecture and checkpoint; the model's decode refuses the
                # wrong kind.
                check_model(payload, model, layered=isinstance(payload, LayeredImage))
        except ValueError as exc:
            raise ValueError(_naming(source, str(exc))) from None


def _naming(source: str, message: str) -> str:
    """``message``, starting with the input it concerns and naming it once
    (``cannot read image PATH: why`` becomes ``PATH: cannot read image: why``)."""
    if message.startswith(source):
        return message
    return f"{source}: {message.replace(f' {source}:', ':')}"


def encode(args, model, plan, source: str, target: str) -> str:
    from models.base import check_payload
    from utils.atomic import atomic_write_bytes
    from utils.coding.container import pack
    from utils.image_io import read_image

    image, info = read_image(source)
    for change in info.conversions:
        print(f"warning: {source}: {change}", file=sys.stderr)
    model.measure_budget_costs(plan)  # a calibration, not this image's coding
    start = time.perf_counter()
    payload = check_payload(
        model, model.encode(image, plan.with_(grayscale=info.grayscale))
    )
    data = pack(payload)
    seconds = time.perf_counter() - start
    atomic_write_bytes(target, data)
    pixels = image.shape[1] * image.shape[2]
    if model.operating_points > 1:
        return (
            f"{target}: {len(data)} bytes ({len(payload.streams)} of "
            f"{model.operating_points} layers), "
            f"{len(data) * 8 / pixels:.4f} bpp over the "
            f"full-resolution pixels, encoded in {seconds:.2f} s"
        )
    estimate = payload.estimated_bits / pixels
    return (
        f"{target}: {len(data)} bytes, {len(data) * 8 / pixels:.4f} bpp"
        f"{'' if math.isnan(estimate) else f' (estimate {estimate:.4f})'}, "
        f"encoded in {seconds:.2f} s{_peak_note(args)}"
    )


def decode(args, model, plan, source: str, target: str) -> str:
    from models.base import check_decoded
    from utils.coding.container import unpack
    from utils.coding.payload import LayeredImage
    from utils.image_io import write_png

    data = _read_coded(source, None if args.cuda else plan.budget_bytes)
    model.measure_budget_costs(plan)  # a calibration, not this file's decoding
    start = time.perf_counter()
    payload = unpack(data)
    image = check_decoded(model, payload, plan, model.decode(payload, plan))
    seconds = time.perf_counter() - start
    write_png(target, image)
    if isinstance(payload, LayeredImage):
        stored = len(payload.streams)
        return (
            f"{target}: layer {plan.layers or stored} of {stored}, "
            f"{image.shape[2]}x{image.shape[1]}, decoded in {seconds:.2f} s"
        )
    pixels = payload.height * payload.width
    return (
        f"{target}: {payload.width}x{payload.height}, "
        f"{len(data) * 8 / pixels:.4f} bpp, "
        f"decoded in {seconds:.2f} s{_peak_note(args)}"
    )


def _peak_note(args: argparse.Namespace) -> str:
    """The process's peak memory so far, against the budget, where it can be read."""
    import torch

    from utils.memory import format_memory, proc_status_kb

    peak_kb = None if args.cuda else proc_status_kb("VmHWM")
    if args.cuda:
        peak = torch.cuda.max_memory_allocated()
    elif peak_kb is not None:
        peak = peak_kb * 1024
    else:
        return ""
    budget = format_memory(args.max_memory) if args.max_memory else "none"
    return f", peak memory {format_memory(peak)} (budget {budget})"


def _load(args: argparse.Namespace):
    """The model and the coding plan; the heavy libraries load here, after the
    arguments have been checked. ``models`` comes first: it silences a CompressAI
    warning before CompressAI loads."""
    import models
    from models.base import CodingPlan
    from utils.device import select_device

    model = models.load_checkpoint(
        args.checkpoint, select_device(args.cuda), args.architecture
    )
    if args.layers and model.operating_points == 1:
        raise ValueError(
            f"--layers needs a layered model (mei2021-*), not {model.registry_name}"
        )
    plan = CodingPlan(
        patch=args.patch_size,
        batch_size=args.batch_size,
        budget_bytes=args.max_memory,
        order=args.entropy_coder_order,
        exact=not args.fast,
        layers=args.layers,
    )
    return model, plan


def _code_all(args: argparse.Namespace, model, plan, pairs) -> List[str]:
    """Code every (input, output) pair; return the inputs that failed. One input's
    failure (found only once its pixels are decoded) does not cost the others: each
    output is whole, or not written at all."""
    code = encode if args.command == "encode" else decode
    failed = []
    for source, target in pairs:
        if args.command == "decode" and not target.lower().endswith(".png"):
            print(
                f"warning: {target}: decode writes PNG data whatever the name",
                file=sys.stderr,
            )
        try:
            print(code(args, model, plan, source, target), flush=True)
        except REPORTED_ERRORS as exc:
            print(
                f"codec.py: error: {_naming(source, one_line(exc))}",
                file=sys.stderr,
            )
            failed.append(source)
    return failed


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        try:
            pairs = jobs(args)
            model, plan = _load(args)
            check_patch_size_for_model(
                args.patch_size,
                model,
                None,
                lambda text: print(f"warning: {text}", file=sys.stderr),
            )
            if (
                args.command == "encode"
                and args.output_dir
                and model.operating_points > 1
            ):
                pairs = jobs(args, layered_suffix=True)
            # Once the names are final (.cpsl for a layered model), and all of them
            # before the first is written, so that a refused batch writes nothing.
            refuse_existing_outputs([target for _, target in pairs], args.force)
            check_inputs(args, model, plan, pairs)
            # Only now, so that a refused run leaves no empty folder behind.
            created = (
                []
                if args.output_dir is None
                else create_output_folder(args.output_dir, "-d")
            )
        except REPORTED_ERRORS as exc:
            return report_error("codec.py", exc)
        try:
            failed = _code_all(args, model, plan, pairs)
        finally:  # a folder that received an output holds a file and stays
            remove_unused_folders(created)
        if failed and len(pairs) > 1:
            others = (
                "nothing was written"
                if len(failed) == len(pairs)
                else "the outputs of the others were written"
            )
            return report_error(
                "codec.py",
                ValueError(
                    f"{len(failed)} of {len(pairs)} inputs failed "
                    f"({', '.join(failed)}); {others}"
                ),
            )
        return 1 if failed else 0

    return run_main(run, "codec.py")


if __name__ == "__main__":
    sys.exit(main())
