"""Evaluate learned and classical codecs on a dataset; RD plots and BD-rate tables.

    python test.py checkpoint --dataset Kodak -a cps -p CKPT [CKPT ...] [--patch-size P]
    python test.py pretrained --dataset Kodak -a mbt2018 -q 1,2,3 [--tiling naive]
    python test.py codec --dataset Kodak --codec jpeg -q 10,30,50,70,90
    python test.py plot RESULTS.json [...] -o rd.png
    python test.py bdrate --anchor assets/anchors/kodak/hm.json RESULTS.json [...]
    python test.py demo [--models DIR ...] [-d experiment/demo]

Evaluation prints one JSON document in CompressAI's results format on stdout (one
list entry per checkpoint or quality, or per layer of a scalable mei2021 checkpoint,
averaged over the images); progress and logs
go to stderr. ``-d OUTDIR`` also writes ``results.json``, ``per-image/<stem>.json``
(``--per-image``) and ``reconstructions/<stem>[-<run>].png`` (``--save-image``).
Under ``torchrun --nproc_per_node=K test.py ...`` the images are shared among the
processes and rank 0 writes the merged results. Any bad input ends with one line on
stderr and exit status 1.
"""

import argparse
import logging
import os
import re
import sys
import warnings
from typing import List, Optional

# CompressAI wraps helpers in torch.jit.script, which PyTorch deprecates: a warning at
# every start that users cannot act on.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated",
                        category=FutureWarning)

import models
from models.base import CodingPlan
from utils.atomic import atomic_write_bytes
from utils.cli import add_coding_arguments, run_main, warn_small_patch
from utils.device import select_device
from utils.evaluation.classical_codecs import CODECS, get_codec
from utils.evaluation.coders import (
    TILINGS,
    ClassicalCoder,
    LearnedOptions,
    learned_coders,
    load_pretrained,
)
from utils.evaluation.demo import DEFAULT_OUTPUT, DEMO_IMAGES, run_demo
from utils.evaluation.rd import (
    INTERPOLATIONS,
    METRICS,
    bd_rate_table,
    format_table,
    load_curve,
    load_curves,
    parse_labels,
    plot_curves,
)
from utils.evaluation.runs import (
    DATASETS_CONFIG,
    Run,
    aggregate,
    evaluate,
    list_images,
    per_image_documents,
    resolve_dataset,
    shard,
    to_json,
    write_json,
)
from utils.memory import PeakMemory
from utils.stitching.spec import PatchSpec
from utils.training.distributed import cleanup, init_distributed

log = logging.getLogger("cps.test")

# Patch size for a dataset given as a folder (the paper's value for large images).
FOLDER_PATCH_SIZE = 256
ZOO_METRICS = ("mse", "ms-ssim")


def _numbers(kind):
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, "
                                             f"got {text!r}") from None
    return parse


def _add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset and output")
    group.add_argument("--dataset", required=True,
                       help="a folder of images, or a name from --datasets-config "
                            "(Kodak, CLIC, DIV8K; $CPS_<NAME> overrides its folder)")
    group.add_argument("--datasets-config", default=DATASETS_CONFIG, help="dataset name table")
    group.add_argument("--max-images", type=int, default=0,
                       help="evaluate only the first N images (0: all)")
    group.add_argument("-d", "--output-dir", default=None,
                       help="write results.json (and per-image files, reconstructions) here")
    group.add_argument("--per-image", action="store_true", help="write per-image/<stem>.json")
    group.add_argument("--save-image", action="store_true",
                       help="write reconstructions/<stem>.png (<stem>-<run>.png for several runs)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_learned_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("learned coding")
    group.add_argument("--tiling", choices=TILINGS, default=None,
                       help="pops: CPS patch stitching (default for cps); none: whole image "
                            "(default for zoo models); naive: independent P x P tiles")
    group.add_argument("--patch", action="store_true",
                       help="same as --tiling pops (the CPS authors' flag)")
    add_coding_arguments(group, None, "the dataset's: 128 Kodak, 256 CLIC/DIV8K and folders")
    group.add_argument("--entropy-estimation", action="store_true",
                       help="rate from forward-pass likelihoods instead of real bitstreams")
    group.add_argument("--verify", action="store_true",
                       help="decode every stream a second time with another patch plan, within "
                            "the same budget, and require the same pixels")
    group.add_argument("--half", action="store_true",
                       help="float16 forward pass (only with --entropy-estimation and --cuda)")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="test.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    checkpoint = commands.add_parser("checkpoint", help="evaluate trained checkpoints")
    checkpoint.add_argument("-a", "--architecture", default=None,
                            help="registered architecture (default: the checkpoint's, else cps)")
    checkpoint.add_argument("-p", "--path", dest="checkpoints", nargs="+", required=True,
                            help="checkpoint files, one run each")
    checkpoint.add_argument("--config", default=None,
                            help="accepted for the CPS authors' command line; the model width "
                                 "is read from the checkpoint")

    pretrained = commands.add_parser("pretrained", help="evaluate CompressAI zoo models")
    pretrained.add_argument("-a", "--architecture", required=True, help="zoo name, e.g. mbt2018")
    pretrained.add_argument("-q", "--quality", type=_numbers(int), required=True,
                            help="comma-separated qualities, e.g. 1,2,3")
    pretrained.add_argument("--metric", choices=ZOO_METRICS, default="mse",
                            help="metric the zoo model was trained for")
    for command in (checkpoint, pretrained):
        _add_dataset_arguments(command)
        _add_learned_arguments(command)

    codec = commands.add_parser("codec", help="evaluate a classical codec")
    codec.add_argument("--codec", choices=sorted(CODECS), required=True)
    codec.add_argument("-q", "--quality", type=_numbers(float), required=True,
                       help="comma-separated qualities in the codec's own scale "
                            "(see utils/evaluation/classical_codecs.py)")
    _add_dataset_arguments(codec)

    plot = commands.add_parser("plot", help="RD curves from results files")
    plot.add_argument("results", nargs="+", help="results JSON files")
    plot.add_argument("-o", "--output", required=True, help="image file (png, pdf, svg)")
    plot.add_argument("--metrics", type=_numbers(str), default=list(METRICS))
    plot.add_argument("--title", default="")
    plot.add_argument("--label", action="append", default=[], metavar="FILE=NAME",
                      help="name the curve of results file FILE (repeatable)")

    bdrate = commands.add_parser("bdrate", help="BD-rate table against an anchor")
    bdrate.add_argument("--anchor", required=True, help="results JSON of the anchor (e.g. HM)")
    bdrate.add_argument("results", nargs="+", help="results JSON files to compare")
    bdrate.add_argument("--metrics", type=_numbers(str), default=list(METRICS))
    bdrate.add_argument("--interpolation", choices=INTERPOLATIONS, default="pchip")
    bdrate.add_argument("-o", "--output", default=None, help="also write the Markdown table here")
    bdrate.add_argument("--label", action="append", default=[], metavar="FILE=NAME",
                        help="name the row of results file FILE, or the anchor (repeatable)")

    demo = commands.add_parser("demo", help="the shipped CPS models on bundled photographs "
                                            "against JPEG and naive tiling (no download)")
    demo.add_argument("--models", nargs="*", default=[],
                      help="release folders or weight files (default: experiment/shipped/*)")
    demo.add_argument("--images", type=_numbers(str), default=list(DEMO_IMAGES),
                      help=f"comma-separated, from {','.join(DEMO_IMAGES)}")
    demo.add_argument("-d", "--output-dir", default=DEFAULT_OUTPUT,
                      help="results.json, rd.png and crops.png go here")
    demo.add_argument("--patch-size", type=int, default=128, help="POPS patch and naive tile side")
    demo.add_argument("--cuda", action="store_true", help="run the networks on the GPU")

    args = parser.parse_args(argv)
    _check_arguments(args)
    return args


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse combinations that cannot work, before any model is loaded."""
    if args.command == "demo":
        return
    if args.command in ("plot", "bdrate"):
        _check_metrics(args.metrics)
        return
    _check_image_options(args)
    if args.command != "codec":
        _check_learned_options(args)


def _check_metrics(metrics: List[str]) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")


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
            raise ValueError(f"--patch means --tiling pops, but --tiling {args.tiling} was given")
        args.tiling = "pops"
    if args.tiling == "naive" and args.patch_size is not None and not args.patch_size.size:
        raise ValueError(f"--tiling naive needs a fixed --patch-size > 0, not {args.patch_size}")
    warn_small_patch(args.patch_size, log.warning)
    if args.half and not (args.entropy_estimation and args.cuda):
        raise ValueError("--half needs --entropy-estimation and --cuda: real bitstreams are "
                         "coded in float32")
    if args.verify and args.entropy_estimation:
        raise ValueError("--verify has nothing to decode with --entropy-estimation")


def _unique_tags(tags: List[str]) -> List[str]:
    safe = [re.sub(r"[^A-Za-z0-9._=-]+", "_", tag) for tag in tags]
    return safe if len(set(safe)) == len(safe) else [f"run{i}" for i in range(len(tags))]


def _learned_runs(args: argparse.Namespace, device, patch: PatchSpec,
                  names: List[str]) -> List[Run]:
    plan = CodingPlan(patch=patch, batch_size=args.batch_size, budget_bytes=args.max_memory,
                      order=args.entropy_coder_order, exact=not args.fast)
    options = LearnedOptions(plan=plan, tiling=args.tiling,
                             entropy_estimation=args.entropy_estimation, half=args.half,
                             verify=args.verify)

    def build(load):
        def make():
            model = load()
            names.append(model.registry_name)
            return learned_coders(model, options)
        return make

    if args.command == "checkpoint":
        if args.config:
            log.info("--config %s is not needed: the model is built from the checkpoint",
                     args.config)
        stems = [_checkpoint_stem(path) for path in args.checkpoints]
        return [Run(path, tag, build(lambda path=path: models.load_checkpoint(
                    path, device, architecture=args.architecture)))
                for path, tag in zip(args.checkpoints, _unique_tags(stems))]
    return [Run(f"{args.architecture} q{q}", f"q{q}", build(lambda q=q: load_pretrained(
                args.architecture, q, args.metric, device)))
            for q in args.quality]


def _checkpoint_stem(path: str) -> str:
    """A checkpoint's name for file names: its file name without ``.pth``/``.tar``, or its
    folder's name for the generic ``model.pth`` of a release folder."""
    stem = re.sub(r"(\.pth)?(\.tar)?$", "", os.path.basename(path))
    if stem in ("model", "checkpoint", "checkpoint_best_loss", "checkpoint_last"):
        folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
        return f"{folder}_{stem}" if stem.startswith("checkpoint") else folder
    return stem


def _codec_runs(args: argparse.Namespace, names: List[str]) -> List[Run]:
    codec = get_codec(args.codec)
    names.append(args.codec)
    for quality in args.quality:
        codec.scale.check(args.codec, quality)
    return [Run(f"{args.codec} q{q:g}", f"q{q:g}", lambda q=q: [ClassicalCoder(codec, q)])
            for q in args.quality]


def run_evaluation(args: argparse.Namespace) -> Optional[dict]:
    """Evaluate and return the results document (None on ranks other than 0)."""
    cuda = getattr(args, "cuda", False)
    device = select_device(cuda)
    context = init_distributed(cuda)
    device = context.device if cuda else device
    dataset = resolve_dataset(args.dataset, args.datasets_config)
    if args.output_dir:
        _prepare_output_dir(args.output_dir)
    paths = list_images(dataset.folder)
    paths = paths[:args.max_images] if args.max_images else paths
    names: List[str] = []
    if args.command == "codec":
        runs, patch_note = _codec_runs(args, names), ""
    else:
        patch = args.patch_size or PatchSpec(FOLDER_PATCH_SIZE if dataset.patch_size is None
                                             else dataset.patch_size)
        runs, patch_note = _learned_runs(args, device, patch, names), f", patch: {patch}"
    rank, world = shard()
    log.info("%s: %d images from %s, %d run(s)%s%s", dataset.name, len(paths), dataset.folder,
             len(runs), patch_note, f", {world} processes" if world > 1 else "")

    image_folder = os.path.join(args.output_dir, "reconstructions") if args.save_image else None
    records, entries = evaluate(runs, paths, image_folder, progress=not args.no_progress)
    if rank != 0:
        return None
    labels = [entry.label for entry in entries]
    descriptions = [entry.description for entry in entries]
    header = {
        "name": "+".join(dict.fromkeys(names)),
        "description": " | ".join(dict.fromkeys(descriptions)),
        "meta": {"dataset": dataset.name, "folder": dataset.folder, "images": len(paths),
                 "runs": labels, "device": device.type, "peak_memory": PeakMemory(device).kind,
                 "psnr-b": "Yim & Bovik 2011, 8x8 blocks, mean over R, G, B (torchmetrics)",
                 "psnr-b-y": "Yim & Bovik 2011, 8x8 blocks, BT.601 luma, the paper's border "
                             "counts"},
    }
    document = dict(header, results=aggregate(records, labels))
    if args.output_dir:
        write_json(os.path.join(args.output_dir, "results.json"), document)
        if args.per_image:
            for stem, page in per_image_documents(records, paths, header).items():
                write_json(os.path.join(args.output_dir, "per-image", f"{stem}.json"), page)
    return document


def _prepare_output_dir(folder: str) -> None:
    """Create ``-d OUTDIR`` (or accept an existing folder) before any coding, so that a
    bad path fails in the first second rather than after the evaluation."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"-d {folder} exists and is not a folder")
    os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise ValueError(f"-d {folder} is not writable")


def run_plot(args: argparse.Namespace) -> dict:
    labels = parse_labels(args.label, args.results)
    curves = [curve for path in args.results for curve in load_curves(path, labels.get(path))]
    shown = plot_curves(curves, args.output, args.metrics, args.title)
    log.info("wrote %s", args.output)
    return {"plot": args.output, "metrics": shown, "curves": [c.name for c in curves]}


def run_bdrate(args: argparse.Namespace) -> dict:
    labels = parse_labels(args.label, [args.anchor, *args.results])
    table = bd_rate_table(load_curve(args.anchor, labels.get(args.anchor)),
                          [load_curve(p, labels.get(p)) for p in args.results],
                          args.metrics, args.interpolation)
    text = format_table(table)
    print(text, file=sys.stderr)
    if args.output:
        atomic_write_bytes(args.output, (text + "\n").encode())
    return table


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return run_main(lambda: _main(argv), "test.py")


def _main(argv: Optional[List[str]]) -> int:
    try:
        args = parse_args(argv)
        if args.command == "plot":
            document = run_plot(args)
        elif args.command == "bdrate":
            document = run_bdrate(args)
        elif args.command == "demo":
            document = run_demo(args.models, args.images, args.output_dir,
                                select_device(args.cuda), args.patch_size, log.info)
            print(document["table"])
            log.info("wrote %s/{results.json,rd.png,crops.png}", args.output_dir)
            document = None
        else:
            document = run_evaluation(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"test.py: error: {exc}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    if document is not None:
        print(to_json(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
