"""The checks ``test.py`` makes of its command line: comma-separated value lists,
and the combinations of options that cannot work, refused before any model is loaded
or any image read.

Free of PyTorch, like ``utils.evaluation.choices``, so that argument errors come back
before the heavy libraries load; the script keeps only its parser and ``main``.
"""

import argparse
import math
from typing import List

from utils.evaluation.curves import METRICS
from utils.input_files import check_is_file


def comma_list(kind):
    """A parser of comma-separated values of ``kind``, each given once (a repeated
    quality was coded twice, its reconstruction overwritten; a repeated metric drew
    its panel twice); numbers that read the same at 6 significant digits (``10`` and
    ``10.0000001``) count as repeated, since runs, files and ``cjxl -q`` name them so;
    numbers must be finite (``inf`` passed a codec's range check and crashed it,
    ``nan`` every comparison); an empty item (``-q 50,``) is refused, since it is more
    likely a value left out than a comma too many."""

    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",")]
        if not all(items) and any(items):
            raise argparse.ArgumentTypeError(
                f"{text!r} has an empty item; give a value between every two commas"
            )
        try:
            values = [kind(item) for item in items if item]
        except ValueError:
            values = []
        if not values or (kind is not str and not all(map(math.isfinite, values))):
            finite = "" if kind is str else "finite "
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {finite}{kind.__name__}s, got {text!r}"
            )
        names = [value if kind is not float else f"{value:g}" for value in values]
        for name in names:
            same = [item for item, other in zip(items, names) if other == name]
            if len(same) > 1 and len(set(same)) == 1:
                raise argparse.ArgumentTypeError(
                    f"{same[0]} is given twice in {text!r}"
                )
            if len(same) > 1:  # different texts, one name
                raise argparse.ArgumentTypeError(
                    f"{' and '.join(same)} in {text!r} are the same to 6 "
                    "significant digits"
                )
        return values

    return parse


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse combinations that cannot work, before any model is loaded."""
    if args.command == "demo":
        return
    if args.command in ("plot", "bdrate"):
        _check_metrics(args.metrics)
        return
    _check_image_options(args)
    if args.command != "codec":
        _check_learned_options(args)


def check_checkpoints_exist(args: argparse.Namespace) -> None:
    """Every checkpoint exists, before the dataset is read or PyTorch loads: a missing
    sixth checkpoint would otherwise end the run after five were evaluated. The first,
    cheap check: each is then loaded and checked (readable, a known architecture,
    weights that fit) before the first is evaluated, by
    ``utils.evaluation.app._check_checkpoints``."""
    for path in args.checkpoints if args.command == "checkpoint" else []:
        check_is_file(path, "checkpoint")


def _check_metrics(metrics: List[str]) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(
            f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}"
        )


def _check_image_options(args: argparse.Namespace) -> None:
    """The image count and per-image outputs, common to every evaluation command."""
    if args.max_images < 0:
        raise ValueError(f"--max-images must be >= 0, got {args.max_images}")
    if (args.per_image or args.save_image) and not args.output_dir:
        raise ValueError("--per-image and --save-image need -d OUTDIR")


def _check_learned_options(args: argparse.Namespace) -> None:
    """Tiling, precision and ``--verify`` options of the learned models; ``--patch``
    becomes ``--tiling pops``."""
    if args.patch:
        if args.tiling not in (None, "pops"):
            raise ValueError(
                f"--patch means --tiling pops, but --tiling {args.tiling} was given"
            )
        args.tiling = "pops"
    if (
        args.tiling == "naive"
        and args.patch_size is not None
        and not args.patch_size.size
    ):
        raise ValueError(
            f"--tiling naive needs a fixed --patch-size > 0, not {args.patch_size}"
        )
    if args.half and not (args.entropy_estimation and args.cuda):
        raise ValueError(
            "--half needs --entropy-estimation and --cuda: real bitstreams are "
            "coded in float32"
        )
    if args.verify and args.entropy_estimation:
        raise ValueError("--verify has nothing to decode with --entropy-estimation")
