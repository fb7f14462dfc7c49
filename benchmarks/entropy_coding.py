"""Time the entropy coding of the latent alone: wavefront vs raster order.

Three coders of the same N=192 model, on the latent sizes of 768x512, 1920x1080,
3840x2160 and 7680x4320 images (sides padded to multiples of 64, then /16):

- ``wavefront``: :class:`utils.coding.context_coder.ContextCoder`, the codec's default;
- ``raster``: the same coder, one position per step (our reference order);
- ``compressai``: CompressAI's own ``mbt2018`` loop (``_compress_ar`` and
  ``_decompress_ar``), the per-position coder CompressAI ships.

The wavefront coder codes every latent whole. The two per-position coders would
take minutes to hours on the large latents, so they code only the first rows of
each latent (``--reference-positions`` positions, rounded up to whole rows); their
time per position, which does not depend on the latent size, is extrapolated to the
whole latent, and the table marks those times with ``*``.

The model has random weights, so its scale predictions are first spread over the
scale table (a log-uniform scale per channel between 0.11 and 16, set through the
last layer's bias), and ``y`` is drawn with those scales, so that symbols, CDF rows
and bitstream sizes look like a trained model's rather than all sitting in the
table's first row. Timing of the parameter networks does not depend on the weights.

There is no CUDA column: the context coder runs on the CPU whatever device the
transforms use, so that a file written with CUDA decodes on a CPU and the reverse.
The wavefront coder runs as the codec runs it: with its second thread when a core
is idle (``--pipeline auto``, the default); ``on`` and ``off`` force the choice.

Usage::

    python benchmarks/entropy_coding.py                  # all four sizes (minutes)
    python benchmarks/entropy_coding.py --sizes 768x512 --output /tmp/bench.json
    python benchmarks/entropy_coding.py --publish       # update benchmarks/results/
"""

import argparse
import math
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.memory_scaling import parse_size
from benchmarks.results_io import (
    machine_info,
    parse_with_output,
    refuse_repeats,
)
from benchmarks.synthetic import synthetic_model
from utils.atomic import save_json
from utils.cli import run_main
from utils.coding.context_coder import ContextCoder
from utils.coding.scan_order import coding_order
from utils.coding.threads import single_threaded
from utils.stitching.geometry import model_geometry

IMAGE_SIZES = ("768x512", "1920x1080", "3840x2160", "7680x4320")
CODERS = ("wavefront", "raster", "compressai")
PIPELINE_CHOICES = {"auto": None, "on": True, "off": False}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=parse_size,
        nargs="+",
        default=[parse_size(size) for size in IMAGE_SIZES],
        help="image sizes WIDTHxHEIGHT (default: %(default)s)",
    )
    parser.add_argument("-N", type=int, default=192, help="model width (default: 192)")
    parser.add_argument(
        "--reference-positions",
        type=int,
        default=1000,
        help="latent positions the raster and CompressAI coders code per size "
        "before extrapolating (default: 1000)",
    )
    parser.add_argument(
        "--coders",
        nargs="+",
        choices=CODERS,
        default=list(CODERS),
        help="coders to time (default: all)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="best of this many runs per measurement (default: 1)",
    )
    parser.add_argument(
        "--pipeline",
        choices=PIPELINE_CHOICES,
        default="auto",
        help="the wavefront coder's second thread: as the codec decides "
        "(auto, the default), always (on) or never (off)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parse_with_output(parser, argv, "entropy_coding.json")
    refuse_repeats(parser, args, "--sizes", "--coders")
    if args.N < 1 or args.reference_positions < 1 or args.repeats < 1:
        parser.error("-N, --reference-positions and --repeats must be positive")
    return args


def latent_size(model: torch.nn.Module, width: int, height: int) -> Tuple[int, int]:
    """(rows, columns) of the latent ``model`` codes for a width x height image: the
    image padded to the model's side multiple, over the scale of its analysis."""
    multiple, scale = model.downsampling_factor, model_geometry(model).scale
    return (
        math.ceil(height / multiple) * multiple // scale,
        math.ceil(width / multiple) * multiple // scale,
    )


def synthetic_latent(
    model: torch.nn.Module, rows: int, cols: int, seed: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``y`` (M, rows, cols) drawn with the model's per-channel scales.

    Returned with ``params``.
    """
    generator = torch.Generator().manual_seed(seed)
    channels = model.M
    scales = model.entropy_parameters[-1].bias[:channels].detach()
    y = torch.randn(channels, rows, cols, generator=generator) * scales[:, None, None]
    params = torch.randn(2 * channels, rows, cols, generator=generator)
    return y, params


def best_time(function: Callable[[], object], repeats: int) -> Tuple[float, object]:
    """Shortest wall time of ``repeats`` calls, and the last call's result."""
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def time_context_coder(
    model, y, params, order: str, repeats: int, pipeline: Optional[bool] = False
) -> Dict[str, object]:
    coder = ContextCoder(model, order, pipeline)
    encode_s, (string, y_hat, _) = best_time(lambda: coder.encode(y, params), repeats)
    decode_s, decoded = best_time(lambda: coder.decode(string, params), repeats)
    return {
        "encode_s": encode_s,
        "decode_s": decode_s,
        "bytes": len(string),
        "bit_exact": bool(torch.equal(y_hat, decoded)),
        "pipeline": coder.last_pipelined,
    }


def time_compressai(model, y, params, repeats: int) -> Dict[str, object]:
    """CompressAI's ``mbt2018`` per-position loop on a (1, M, H, W) latent."""
    kernel = model.context_prediction.kernel_size[0]
    pad = kernel // 2
    height, width = y.shape[1:]

    def encode():
        y_padded = F.pad(y[None], (pad, pad, pad, pad))
        return model._compress_ar(
            y_padded, params[None], height, width, kernel, pad
        ), y_padded

    def decode():
        y_hat = torch.zeros(1, model.M, height + 2 * pad, width + 2 * pad)
        model._decompress_ar(string, y_hat, params[None], height, width, kernel, pad)
        return y_hat

    with torch.inference_mode():
        encode_s, (string, y_padded) = best_time(encode, repeats)
        decode_s, decoded = best_time(decode, repeats)
    return {
        "encode_s": encode_s,
        "decode_s": decode_s,
        "bytes": len(string),
        "bit_exact": bool(torch.equal(y_padded, decoded)),
    }


def measure_size(model, width: int, height: int, args) -> Dict[str, object]:
    """All requested coders on the latent of one image size."""
    rows, cols = latent_size(model, width, height)
    positions = rows * cols
    y, params = synthetic_latent(model, rows, cols, args.seed)
    coder = ContextCoder(model)
    entry = {
        "image": f"{width}x{height}",
        "latent": [rows, cols],
        "positions": positions,
        "fronts": len(coding_order(rows, cols, "wavefront", coder.slope)[1]),
    }
    # Per-position coders: the first rows only, extrapolated per position.
    crop_rows = min(rows, math.ceil(args.reference_positions / cols))
    for name in args.coders:
        if name == "wavefront":
            result = time_context_coder(
                model,
                y,
                params,
                "wavefront",
                args.repeats,
                PIPELINE_CHOICES[args.pipeline],
            )
            result["measured_positions"] = positions
        else:
            crop_y, crop_params = (
                y[:, :crop_rows].contiguous(),
                params[:, :crop_rows].contiguous(),
            )
            if name == "raster":
                result = time_context_coder(
                    model, crop_y, crop_params, "raster", args.repeats
                )
            else:
                # Its fastest setting here: 2 threads slow it down.
                with single_threaded():
                    result = time_compressai(model, crop_y, crop_params, args.repeats)
            result["measured_positions"] = crop_rows * cols
            factor = positions / (crop_rows * cols)
            for key in ("encode_s", "decode_s"):
                result[key] = result[key] * factor
        result["extrapolated"] = result["measured_positions"] < positions
        entry[name] = result
    for name in CODERS[1:]:
        if name in entry and "wavefront" in entry:
            for step in ("encode", "decode"):
                entry[f"{step}_speedup_vs_{name}"] = (
                    entry[name][f"{step}_s"] / entry["wavefront"][f"{step}_s"]
                )
    return entry


def format_table(results: List[Dict[str, object]], coders: Sequence[str]) -> str:
    """Markdown table: seconds per coder and step, then the wavefront speed-ups."""
    header = ["image", "latent", "fronts"]
    for name in coders:
        header += [f"{name} enc (s)", f"{name} dec (s)"]
    header += [
        f"dec x vs {name}"
        for name in coders
        if name != "wavefront" and "wavefront" in coders
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in results:
        cells = [
            entry["image"],
            "x".join(map(str, entry["latent"])),
            str(entry["fronts"]),
        ]
        for name in coders:
            mark = "*" if entry[name]["extrapolated"] else ""
            cells += [
                f"{entry[name]['encode_s']:.2f}{mark}",
                f"{entry[name]['decode_s']:.2f}{mark}",
            ]
        cells += [
            f"{entry[f'decode_speedup_vs_{name}']:.0f}x"
            for name in coders
            if name != "wavefront" and "wavefront" in coders
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def entropy_machine_info() -> Dict[str, object]:
    """:func:`~benchmarks.results_io.machine_info` with the Python version and the
    load average."""
    return machine_info(
        python=platform.python_version(),
        load_average_before=list(os.getloadavg())
        if hasattr(os, "getloadavg")
        else None,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    info = entropy_machine_info()
    model = synthetic_model(args.N, args.seed)
    results = []
    for width, height in args.sizes:
        results.append(measure_size(model, width, height, args))
        print(
            f"{width}x{height}: "
            + ", ".join(
                f"{name} {results[-1][name]['encode_s']:.2f}/"
                f"{results[-1][name]['decode_s']:.2f} s"
                for name in args.coders
            ),
            flush=True,
        )
    table = format_table(results, args.coders)
    report = {
        "benchmark": "entropy_coding",
        "device": "cpu",
        "N": args.N,
        "reference_positions": args.reference_positions,
        "repeats": args.repeats,
        "pipeline": args.pipeline,
        "seed": args.seed,
        "machine": info,
        "load_average_after": list(os.getloadavg())
        if hasattr(os, "getloadavg")
        else None,
        "note": "times in seconds for the latent coding alone; per-position coders "
        "(raster, compressai) measured on measured_positions and extrapolated",
        "results": results,
        "table": table,
    }
    save_json(args.output, report)  # before the table: a reader may leave
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "entropy_coding.py"))
