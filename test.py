"""Evaluate learned and classical codecs on a dataset; RD plots and BD-rate tables.

    python test.py checkpoint --dataset Kodak -a cps -p CKPT [CKPT ...] [--patch-size P]
    python test.py pretrained --dataset Kodak -a mbt2018 -q 1,2,3 [--tiling naive]
    python test.py codec --dataset Kodak --codec jpeg -q 10,30,50,70,90
    python test.py plot RESULTS.json [...] -o rd.png
    python test.py bdrate --anchor assets/anchors/kodak/hm.json RESULTS.json [...]
    python test.py demo [--models DIR ...] [-d experiment/demo]
    python test.py ... --force     (write over output files that exist)

Evaluation prints one JSON document in CompressAI's results format on stdout (one
list entry per checkpoint or quality, or per layer of a scalable mei2021 checkpoint,
averaged over the images); progress and logs
go to stderr. ``-d OUTDIR`` also writes ``results.json``, ``per-image/<stem>.json``
(``--per-image``) and ``reconstructions/<stem>[-<run>].png`` (``--save-image``).
Under ``torchrun --nproc_per_node=K test.py ...`` the images are shared among the
processes and rank 0 writes the merged results. An output file that exists is
refused, before any work, unless ``--force`` is given. A command line argparse cannot
read (an unknown flag, a missing argument, a value of the wrong type) prints the usage
and one error line and exits with status 2; any other bad input ends with one line on
stderr and status 1.
"""

import argparse
import logging
import sys
import warnings
from typing import List, Optional

# CompressAI wraps helpers in torch.jit.script, which PyTorch deprecates: a warning at
# every start that users cannot act on.
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

from utils.cli import (
    ARCHITECTURE_HELP,
    LogFormatter,
    add_coding_arguments,
    add_force_argument,
    report_error,
    run_main,
)
from utils.evaluation.argument_checks import (
    check_arguments,
    check_checkpoints_exist,
    comma_list,
)
from utils.evaluation.choices import (
    CODEC_NAMES,
    DATASETS_CONFIG,
    DEMO_IMAGE_NAMES,
    DEMO_OUTPUT,
    INTERPOLATIONS,
    TILINGS,
)
from utils.evaluation.curves import METRICS

ZOO_METRICS = ("mse", "ms-ssim")


def _add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset and output")
    group.add_argument(
        "--dataset",
        required=True,
        help="a folder of images, or a name from --datasets-config "
        "(Kodak, CLIC, DIV8K; $CPS_<NAME> overrides its folder)",
    )
    group.add_argument(
        "--datasets-config", default=DATASETS_CONFIG, help="dataset name table"
    )
    group.add_argument(
        "--max-images",
        type=int,
        default=0,
        help="evaluate only the first N images (0: all)",
    )
    group.add_argument(
        "-d",
        "--output-dir",
        default=None,
        help="write results.json (and per-image files, reconstructions) here",
    )
    group.add_argument(
        "--per-image", action="store_true", help="write per-image/<stem>.json"
    )
    group.add_argument(
        "--save-image",
        action="store_true",
        help="write reconstructions/<stem>.png (<stem>-<run>.png for several runs)",
    )
    group.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars on stderr (logs, CI)",
    )
    add_force_argument(group)


def _add_learned_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("learned coding")
    group.add_argument(
        "--tiling",
        choices=TILINGS,
        default=None,
        help="pops: CPS patch stitching (default for cps); none: whole image "
        "(default for zoo models); naive: independent P x P tiles",
    )
    group.add_argument(
        "--patch",
        action="store_true",
        help="same as --tiling pops (the CPS authors' flag)",
    )
    add_coding_arguments(
        group,
        None,
        "the dataset's: 128 Kodak, 256 CLIC/DIV8K and folders",
        naive_tiles=True,
    )
    group.add_argument(
        "--entropy-estimation",
        action="store_true",
        help="rate from forward-pass likelihoods instead of real bitstreams",
    )
    group.add_argument(
        "--verify",
        action="store_true",
        help="decode every stream a second time with another patch plan, within "
        "the same budget, and require the same pixels",
    )
    group.add_argument(
        "--half",
        action="store_true",
        help="float16 forward pass (only with --entropy-estimation and --cuda)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of every sub-command, before the checks of :func:`parse_args`;
    tests/test_docs.py holds the docs to every flag it defines."""
    parser = argparse.ArgumentParser(prog="test.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    checkpoint = commands.add_parser("checkpoint", help="evaluate trained checkpoints")
    checkpoint.add_argument(
        "-a",
        "--architecture",
        default=None,
        help=ARCHITECTURE_HELP,
    )
    checkpoint.add_argument(
        "-p",
        "--path",
        dest="checkpoints",
        nargs="+",
        required=True,
        help="checkpoint files, one run each",
    )
    checkpoint.add_argument(
        "--config",
        default=None,
        help="accepted for the CPS authors' command line; the model width "
        "is read from the checkpoint",
    )

    pretrained = commands.add_parser(
        "pretrained", help="evaluate CompressAI zoo models"
    )
    pretrained.add_argument(
        "-a", "--architecture", required=True, help="zoo name, e.g. mbt2018"
    )
    pretrained.add_argument(
        "-q",
        "--quality",
        type=comma_list(int),
        required=True,
        help="comma-separated qualities, e.g. 1,2,3",
    )
    pretrained.add_argument(
        "--metric",
        choices=ZOO_METRICS,
        default="mse",
        help="the loss the zoo weights were trained for (default: %(default)s)",
    )
    for command in (checkpoint, pretrained):
        _add_dataset_arguments(command)
        _add_learned_arguments(command)

    codec = commands.add_parser("codec", help="evaluate a classical codec")
    codec.add_argument(
        "--codec",
        choices=sorted(CODEC_NAMES),
        required=True,
        help="the classical codec (the table in docs/evaluation.md)",
    )
    codec.add_argument(
        "-q",
        "--quality",
        type=comma_list(float),
        required=True,
        help="comma-separated qualities in the codec's own scale "
        "(see utils/evaluation/classical_codecs.py)",
    )
    _add_dataset_arguments(codec)
    codec.set_defaults(cuda=False)  # classical codecs run on the CPU

    plot = commands.add_parser("plot", help="RD curves from results files")
    plot.add_argument("results", nargs="+", help="results JSON files")
    plot.add_argument(
        "-o", "--output", required=True, help="image file (png, pdf, svg)"
    )
    plot.add_argument(
        "--metrics",
        type=comma_list(str),
        default=list(METRICS),
        help=f"comma-separated panels, from {','.join(METRICS)} (default: all "
        "that some file has)",
    )
    plot.add_argument(
        "--title", default="", help="title above the panels (default: none)"
    )
    plot.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="FILE=NAME",
        help="name the curve of results file FILE (repeatable)",
    )
    add_force_argument(plot)

    bdrate = commands.add_parser("bdrate", help="BD-rate table against an anchor")
    bdrate.add_argument(
        "--anchor", required=True, help="results JSON of the anchor (e.g. HM)"
    )
    bdrate.add_argument("results", nargs="+", help="results JSON files to compare")
    bdrate.add_argument(
        "--metrics",
        type=comma_list(str),
        default=list(METRICS),
        help=f"comma-separated columns, from {','.join(METRICS)} (default: "
        "all that the anchor has)",
    )
    bdrate.add_argument(
        "--interpolation",
        choices=INTERPOLATIONS,
        default="pchip",
        help="how the bjontegaard package fits each curve (default: %(default)s)",
    )
    bdrate.add_argument(
        "-o", "--output", default=None, help="also write the Markdown table here"
    )
    bdrate.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="FILE=NAME",
        help="name the row of results file FILE, or the anchor (repeatable)",
    )
    add_force_argument(bdrate)

    demo = commands.add_parser(
        "demo",
        help="the shipped CPS models on bundled photographs "
        "against JPEG and naive tiling (no download)",
    )
    demo.add_argument(
        "--models",
        nargs="*",
        default=[],
        help="release folders or weight files (default: experiment/shipped/*)",
    )
    demo.add_argument(
        "--images",
        type=comma_list(str),
        default=list(DEMO_IMAGE_NAMES),
        help=f"comma-separated, from {','.join(DEMO_IMAGE_NAMES)} (default: all)",
    )
    demo.add_argument(
        "-d",
        "--output-dir",
        default=DEMO_OUTPUT,
        help="results.json, rd.png and crops.png go here (default: %(default)s)",
    )
    demo.add_argument(
        "--patch-size",
        type=int,
        default=128,
        help="POPS patch and naive tile side (default: %(default)s)",
    )
    demo.add_argument("--cuda", action="store_true", help="run the networks on the GPU")
    add_force_argument(demo)

    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(args)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        args = parse_args(argv)
        check_checkpoints_exist(args)
    except ValueError as exc:
        return report_error("test.py", exc)

    def run() -> int:
        # PyTorch and the models load here, after the checks.
        from utils.evaluation import app

        return app.run(args)

    return run_main(run, "test.py")


if __name__ == "__main__":
    sys.exit(main())
