"""Whole-codec speed on Kodak-sized images: encode + decode to real files, N=192.

    python benchmarks/codec_speed.py [--images DIR] [--count 3] [--N 192] [--cuda]
        [--patch-size whole|auto|P] [--authors-repo PATH] [-o FILE | --publish]

Times CPS's ``encode`` and ``decode`` (the codec contract) end to end (transforms,
hyperprior, wavefront context coding, file packing) for each CPU mode of the
transforms:

- ``exact``: convolutions as fixed-shape matrix products, patch-wise results
  bit-identical to whole-image ones (the default of codec.py and test.py);
- ``fast``: oneDNN convolutions (``codec.py --fast``), equal to float rounding.

Both code the whole image by default (a Kodak image needs about 1.2 GB at N=192,
within the default 2GB budget), or P x P patches with ``--patch-size P`` (the paper
codes Kodak with P = 128), with the same N=192 model, random weights whose scale
predictions are spread over the scale table (``benchmarks/entropy_coding.py``).

With ``--authors-repo PATH`` (a checkout of github.com/bblgbr/SPL-CPS) the authors'
``CPS`` model is built from the same weights and times its ``compress`` and
``decompress`` (``compress_patch``/``decompress_patch`` at the same P with
``--patch-size P``) on the same images in the same run (``benchmarks/authors.py``);
the table then gives each mode's time as a ratio of theirs. Without the flag the
authors' column reads "not measured".

Images come from ``--images`` (or ``$CPS_KODAK``); without them, synthetic 768x512
images are used. Writes JSON to ``benchmarks/results/local/codec_speed.json``
(``--publish``: the tracked ``benchmarks/results/codec_speed.json``).
"""

import argparse
import glob
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import warnings

warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

import torch

from benchmarks.authors import (
    NOT_MEASURED,
    authors_model,
    load_authors_cps,
    run_authors,
)
from benchmarks.results_io import (
    add_output_arguments,
    machine_info,
    refuse_missing_cuda,
    refuse_repeats,
    resolve_output,
    save_results,
)
from benchmarks.synthetic import synthetic_image, synthetic_model
from models.base import CodingPlan
from utils.cli import patch_spec, run_main
from utils.coding.container import pack, unpack
from utils.image_io import read_image
from utils.stitching.spec import PatchSpec


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--images",
        default=os.environ.get("CPS_KODAK"),
        help="folder of PNGs (default: $CPS_KODAK, else synthetic 768x512 images)",
    )
    parser.add_argument(
        "--count", type=int, default=3, help="images to time (default: 3)"
    )
    parser.add_argument("--N", type=int, default=192)
    parser.add_argument(
        "--modes", nargs="+", choices=("exact", "fast"), default=["exact", "fast"]
    )
    parser.add_argument("--cuda", action="store_true", help="transforms on the GPU")
    parser.add_argument(
        "--patch-size",
        type=patch_spec,
        default=PatchSpec(0),
        help="whole (default), auto, or P: P x P patches, for the authors' code too",
    )
    parser.add_argument(
        "--authors-repo",
        metavar="PATH",
        help="checkout of the authors' SPL-CPS code, timed on the same images",
    )
    add_output_arguments(parser, "codec_speed.json")
    args = parser.parse_args(argv)
    refuse_repeats(parser, args, "--modes")
    if args.count < 1 or args.N < 1:
        parser.error("--count and --N must be positive")
    refuse_missing_cuda(parser, args)
    resolve_output(parser, args)
    return args


def load_images(folder: Optional[str], count: int) -> List[torch.Tensor]:
    if folder:
        paths = sorted(glob.glob(os.path.join(folder, "*.png")))[:count]
        if not paths:
            raise ValueError(f"no PNG images in {folder}")
        return [read_image(path)[0] for path in paths]
    return [synthetic_image(768, 512) for _ in range(count)]


def medians(runs: List[Dict[str, float]]) -> Dict[str, float]:
    encode_s = statistics.median(run["encode_s"] for run in runs)
    decode_s = statistics.median(run["decode_s"] for run in runs)
    return {"encode_s": encode_s, "decode_s": decode_s, "total_s": encode_s + decode_s}


def time_mode(
    model, images: List[torch.Tensor], patch: PatchSpec, exact: bool
) -> Dict[str, float]:
    plan = CodingPlan(patch=patch, exact=exact)
    runs = []
    for image in images:
        start = time.perf_counter()
        data = pack(model.encode(image, plan))
        middle = time.perf_counter()
        decoded = model.decode(unpack(data), plan)
        end = time.perf_counter()
        if decoded.shape != image.shape:
            raise RuntimeError(
                f"decoded {tuple(decoded.shape)} for {tuple(image.shape)}"
            )
        runs.append({"encode_s": middle - start, "decode_s": end - middle})
    return medians(runs)


def time_authors(
    repo: str,
    state_dict: dict,
    images: List[torch.Tensor],
    device: torch.device,
    patch: PatchSpec,
) -> Dict[str, float]:
    """The authors' medians; their codec has no automatic plan, so ``auto`` (the
    whole image when there is no memory budget) runs their whole-image codec."""
    model = authors_model(load_authors_cps(repo), state_dict, device)
    patch_size = patch.size or 0
    run_authors(model, images[0], patch_size)  # untimed, like ours
    return medians([run_authors(model, image, patch_size) for image in images])


def format_table(results: Dict[str, dict], authors: Optional[dict]) -> str:
    authors_cell = NOT_MEASURED if authors is None else f"{authors['total_s']:.2f}"
    lines = [
        "| transforms | encode (s) | decode (s) | total (s) | authors' total (s) "
        "| time / authors' |",
        "|---|---|---|---|---|---|",
    ]
    for mode, result in results.items():
        ratio = NOT_MEASURED if authors is None else f"{result['time_vs_authors']:.2f}x"
        lines.append(
            f"| {mode} | {result['encode_s']:.2f} | {result['decode_s']:.2f} | "
            f"{result['total_s']:.2f} | {authors_cell} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.cuda else "cpu")
    try:
        images = load_images(args.images, args.count)
        model = synthetic_model(args.N, seed=0).to(device)
        authors = None
        if args.authors_repo:
            authors = time_authors(
                args.authors_repo, model.state_dict(), images, device, args.patch_size
            )
        # One untimed run: first calls pay for oneDNN primitive creation and
        # page faults.
        model.encode(images[0], CodingPlan(patch=args.patch_size))
        results = {
            mode: time_mode(model, images, args.patch_size, exact=mode == "exact")
            for mode in args.modes
        }
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"codec_speed.py: error: {exc}", file=sys.stderr)
        return 1
    for result in results.values():
        if authors is not None:
            result["time_vs_authors"] = result["total_s"] / authors["total_s"]
    table = format_table(results, authors)
    document = {
        "benchmark": "codec_speed",
        "N": args.N,
        "device": str(device),
        "images": args.images or "synthetic 768x512",
        "count": len(images),
        "patch": str(args.patch_size),
        "authors": authors if authors is not None else NOT_MEASURED,
        "authors_repo": args.authors_repo,
        "machine": machine_info(load_average=os.getloadavg()),
        "results": results,
        "table": table,
    }
    save_results(args.output, document)  # before the table: a reader may leave
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "codec_speed.py"))
