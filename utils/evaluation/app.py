"""What ``test.py`` runs once its arguments are checked: evaluations, plots, BD-rate
tables and the demo. Kept apart from the script so that ``test.py --help`` and argument
errors come back before PyTorch loads."""

import argparse
import logging
import os
import re
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import torch

import models
from models.base import CodingPlan
from utils.atomic import atomic_write_bytes
from utils.cli import REPORTED_ERRORS, check_patch_size_for_model, report_error
from utils.device import select_device
from utils.evaluation.classical_codecs import get_codec
from utils.evaluation.coders import ClassicalCoder
from utils.evaluation.curves import (
    distinct_names,
    load_curve,
    load_curves,
    parse_labels,
)
from utils.evaluation.demo import run_demo
from utils.evaluation.learned_coders import LearnedOptions, learned_coders
from utils.evaluation.outputs import EvaluationOutputs
from utils.evaluation.pretrained import load_pretrained, pretrained_url
from utils.evaluation.rd import bd_rate_table, format_table
from utils.evaluation.rd_plot import plot_curves
from utils.evaluation.runs import (
    Run,
    aggregate,
    evaluate,
    list_images,
    per_image_documents,
    resolve_dataset,
    shard,
    to_json,
)
from utils.image_io import image_size
from utils.memory import PeakMemory
from utils.output_paths import (
    check_output_folder,
    check_output_path,
    refuse_existing_outputs,
)
from utils.stitching.planner import check_reading_fits
from utils.stitching.spec import PatchSpec
from utils.training.distributed import cleanup, init_distributed, on_rank_0

log = logging.getLogger("cps.test")

# Patch size for a dataset given as a folder (the paper's value for large images).
FOLDER_PATCH_SIZE = 256


def _unique_tags(tags: List[str]) -> List[str]:
    safe = [re.sub(r"[^A-Za-z0-9._=-]+", "_", tag) for tag in tags]
    return (
        safe if len(set(safe)) == len(safe) else [f"run{i}" for i in range(len(tags))]
    )


def _learned_runs(
    args: argparse.Namespace, device, patch: PatchSpec, names: List[str]
) -> List[Run]:
    plan = CodingPlan(
        patch=patch,
        batch_size=args.batch_size,
        budget_bytes=args.max_memory,
        order=args.entropy_coder_order,
        exact=not args.fast,
    )
    options = LearnedOptions(
        plan=plan,
        tiling=args.tiling,
        entropy_estimation=args.entropy_estimation,
        half=args.half,
        verify=args.verify,
    )

    def build(load):
        def make():
            model = load()
            names.append(model.registry_name)
            # Refusals first: a warning about options that end in an error is noise.
            coders = learned_coders(model, options)
            check_patch_size_for_model(args.patch_size, model, args.tiling, log.warning)
            log.info("%s: %s", model.registry_name, coders[0].description)
            return coders

        return make

    if args.command == "checkpoint":
        if args.architecture:
            # An unknown name, before any work.
            models.get_model_class(args.architecture)
        if args.config:
            log.info(
                "--config %s is not needed: the model is built from the checkpoint",
                args.config,
            )
        kept = _check_checkpoints(args, device, options)

        def load(path: str):
            model = kept.pop(path, None)  # the run then owns it, and releases it
            if model is None:
                model = models.load_checkpoint(
                    path, device, architecture=args.architecture
                )
            return model

        return [
            Run(path, tag, build(lambda path=path: load(path)))
            for path, tag in zip(args.checkpoints, _run_tags(args))
        ]
    for quality in args.quality:
        pretrained_url(args.architecture, quality, args.metric)  # before any download
    # Every quality's weights fetched (or found in the cache) and loaded once before
    # the first image, so that a failed download of the last quality does not end a
    # run that has already evaluated the others.
    for quality in args.quality:
        load_pretrained(args.architecture, quality, args.metric, torch.device("cpu"))
    return [
        Run(
            f"{args.architecture} q{q}",
            tag,
            build(
                lambda q=q: load_pretrained(args.architecture, q, args.metric, device)
            ),
        )
        for q, tag in zip(args.quality, _run_tags(args))
    ]


def _run_tags(args: argparse.Namespace) -> List[str]:
    """The runs' names in output file names (``q<quality>``, or the checkpoint's
    name), known before any model loads, so that existing outputs are refused first."""
    if args.command == "checkpoint":
        return _unique_tags([_checkpoint_stem(path) for path in args.checkpoints])
    return _unique_tags([f"q{q:g}" for q in args.quality])


def _check_checkpoints(
    args: argparse.Namespace, device, options: LearnedOptions
) -> Dict[str, object]:
    """Load every checkpoint and build its coders before the first image is coded,
    so that a damaged sixth checkpoint (unreadable, of an unknown architecture, with
    weights that do not fit, or refusing the coding options) ends the run before five
    were evaluated, not after. Each model is released once checked, so no more than
    two are held at once; the first is kept for its run, so that a lone checkpoint is
    read once.

    Returns ``{path: model}`` for the first checkpoint.
    """
    kept = {}
    for number, path in enumerate(args.checkpoints):
        try:
            with warnings.catch_warnings():
                if number:  # said when its run loads it, not twice
                    warnings.simplefilter("ignore")
                model = models.load_checkpoint(
                    path,
                    device if number == 0 else "cpu",
                    architecture=args.architecture,
                )
            learned_coders(model, options)
            check_patch_size_for_model(args.patch_size, model, args.tiling, _silent)
        except (ValueError, RuntimeError) as exc:
            if path in str(exc):
                raise
            # Among several checkpoints, the message must say which one.
            raise type(exc)(f"{path}: {exc}") from None
        if number == 0:
            kept[path] = model
        del model
    return kept


def _silent(message: str) -> None:
    """A warning not to give yet: the run gives it when it starts."""


def _check_distinct_stems(paths: List[str]) -> None:
    """Per-image files are named by stem: ``a.png`` and ``a.jpg`` would share them."""
    seen = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in seen:
            raise ValueError(
                f"{os.path.basename(seen[stem])} and {os.path.basename(path)} "
                f"would write the same per-image files ({stem}.*); rename one"
            )
        seen[stem] = path


def _checkpoint_stem(path: str) -> str:
    """A checkpoint's name for file names: its file name without ``.pth``/``.tar``,
    or its folder's name for the names every run or release folder uses
    (``train.py``'s ``checkpoint``/``checkpoint_best_loss``, a release's ``model``)."""
    stem = re.sub(r"(\.pth)?(\.tar)?$", "", os.path.basename(path))
    if stem in ("model", "checkpoint", "checkpoint_best_loss"):
        folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
        return f"{folder}_{stem}" if stem.startswith("checkpoint") else folder
    return stem


def _codec_runs(
    args: argparse.Namespace, names: List[str], sizes: Dict[str, Tuple[int, int]]
) -> List[Run]:
    """The runs of a classical codec, after checking every quality and the size of
    every image (``path: (width, height)``, from the headers) it is given."""
    codec = get_codec(args.codec)
    names.append(args.codec)
    for quality in args.quality:
        codec.scale.check(args.codec, quality)
    for path, (width, height) in sizes.items():
        try:
            codec.sizes.check(args.codec, height, width)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return [
        Run(f"{args.codec} q{q:g}", tag, lambda q=q: [ClassicalCoder(codec, q)])
        for q, tag in zip(args.quality, _run_tags(args))
    ]


def _check_readings_fit(sizes: Dict[str, Tuple[int, int]], budget) -> None:
    """Refuse, from its header, an image whose reading would break the budget, as
    codec.py does: a PNG of a few kilobytes can declare an image of gigabytes, which
    would otherwise be read whole before a later phase refused it."""
    for path, (width, height) in sizes.items():
        try:
            check_reading_fits(width, height, budget)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def run_evaluation(args: argparse.Namespace) -> Optional[dict]:
    """Evaluate and return the results document (None on ranks other than 0)."""
    select_device(args.cuda)  # --cuda without a GPU is refused here
    context = init_distributed(args.cuda)
    device = context.device
    dataset = resolve_dataset(args.dataset, args.datasets_config)
    if args.output_dir:
        check_output_folder(args.output_dir, "-d")  # made once every check passed
    paths = list_images(dataset.folder)
    paths = paths[: args.max_images] if args.max_images else paths
    sizes = {path: image_size(path) for path in paths}  # every header before coding
    if args.per_image or args.save_image:
        _check_distinct_stems(paths)
    outputs = EvaluationOutputs(
        args.output_dir, args.per_image, args.save_image, args.force
    )
    on_rank_0(outputs.check)  # in use, a path in the way, outputs without --force
    names: List[str] = []
    if args.command == "codec":
        runs = _codec_runs(args, names, sizes)
    else:
        patch = args.patch_size or PatchSpec(
            FOLDER_PATCH_SIZE if dataset.patch_size is None else dataset.patch_size
        )
        runs = _learned_runs(args, device, patch, names)  # checkpoints loaded here
        if device.type == "cpu":  # on CUDA the budget counts GPU memory only
            _check_readings_fit(sizes, args.max_memory)
    rank, world = shard()
    log.info(
        "%s: %d image%s from %s, %d run%s%s",
        dataset.name,
        len(paths),
        "" if len(paths) == 1 else "s",
        dataset.folder,
        len(runs),
        "" if len(runs) == 1 else "s",
        f", {world} processes" if world > 1 else "",
    )

    # Rank 0 makes and locks -d, and the staging folder every process writes its
    # reconstructions into; a failure removes the staging folder and the folders the
    # run made, and leaves the previous run's outputs as they were.
    with outputs:
        records, entries = evaluate(
            runs, paths, outputs.image_folder, progress=not args.no_progress
        )
        if rank != 0:
            return None
        document, pages = _results_document(
            args, dataset, paths, device, names, records, entries
        )
        outputs.commit(document, pages)
    return document


def _results_document(args, dataset, paths, device, names, records, entries):
    """The results document of an evaluation and, with ``--per-image``, the per-image
    documents by stem, for ``-d``."""
    labels = [entry.label for entry in entries]
    descriptions = [entry.description for entry in entries]
    header = {
        "name": "+".join(dict.fromkeys(names)),
        "description": " | ".join(dict.fromkeys(descriptions)),
        "meta": {
            "dataset": dataset.name,
            "folder": dataset.folder,
            "images": len(paths),
            "runs": labels,
            "device": device.type,
            "peak_memory": PeakMemory(device).kind,
            "psnr-b": "Yim & Bovik 2011, 8x8 blocks, mean over R, G, B (torchmetrics)",
            "psnr-b-y": "Yim & Bovik 2011, 8x8 blocks, BT.601 luma, the paper's border "
            "counts",
        },
    }
    document = dict(header, results=aggregate(records, labels))
    pages = per_image_documents(records, paths, header) if args.per_image else {}
    return document, pages


def run_plot(args: argparse.Namespace) -> dict:
    check_output_path(args.output, args.results)
    refuse_existing_outputs([args.output], args.force)
    labels = parse_labels(args.label, args.results)
    curves = distinct_names(
        [
            curve
            for path in args.results
            for curve in load_curves(path, labels.get(path))
        ]
    )
    shown = plot_curves(curves, args.output, args.metrics, args.title)
    log.info("wrote %s", args.output)
    return {"plot": args.output, "metrics": shown, "curves": [c.name for c in curves]}


def run_bdrate(args: argparse.Namespace) -> dict:
    if args.output is not None:
        check_output_path(args.output, [args.anchor, *args.results])
        refuse_existing_outputs([args.output], args.force)
    labels = parse_labels(args.label, [args.anchor, *args.results])
    anchor, *tests = distinct_names(
        [load_curve(path, labels.get(path)) for path in (args.anchor, *args.results)]
    )
    table = bd_rate_table(anchor, tests, args.metrics, args.interpolation)
    text = format_table(table)
    print(text, file=sys.stderr)
    if args.output is not None:
        atomic_write_bytes(args.output, (text + "\n").encode())
    return table


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; print its JSON document on stdout.

    Returns the exit status.
    """
    try:
        if args.command == "plot":
            document = run_plot(args)
        elif args.command == "bdrate":
            document = run_bdrate(args)
        elif args.command == "demo":
            document = run_demo(
                args.models,
                args.images,
                args.output_dir,
                select_device(args.cuda),
                args.patch_size,
                log.info,
                args.force,
            )
            print(document["table"])
            log.info("wrote %s/{results.json,rd.png,crops.png}", args.output_dir)
            document = None
        else:
            document = run_evaluation(args)
    except REPORTED_ERRORS as exc:
        return report_error("test.py", exc)
    finally:
        cleanup()
    if document is not None:
        print(to_json(document))
    return 0
