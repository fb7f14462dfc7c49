"""Time and peak memory of patch-wise (POPS) vs whole-image CPS transforms.

    python benchmarks/patch_overhead.py [--sizes 768x512,1920x1080,3840x2160] [--N 192]
        [--patch-size 256] [--batch-size 4] [--cuda] [-o FILE | --publish]

Each measurement runs g_a then g_s on a random image in a fresh process, so the peak
resident memory (CPU) or peak allocated memory (CUDA) belongs to that run alone. The
table gives patch-wise figures as ratios of the whole-image ones.
"""

import argparse
import multiprocessing
import os
import platform
import resource
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import models
from benchmarks.memory_scaling import parse_size
from benchmarks.results_io import (
    parse_with_output,
    refuse_missing_cuda,
    refuse_repeats,
)
from utils.atomic import save_json
from utils.cli import positive_int, run_main
from utils.stitching.geometry import check_patch_size, model_geometry, plan_patches
from utils.stitching.patches import pad_replicate, run_patchwise
from utils.stitching.transforms import transform_mode


def _measure(
    width, height, channels, patch_size, batch_size, device_name, exact, queue
):
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = models.build_model("cps", N=channels).eval().to(device)
    geometry = model_geometry(model)
    image = pad_replicate(
        torch.randint(0, 256, (3, height, width), dtype=torch.uint8),
        model.downsampling_factor,
    )[None]
    latent_size = (image.shape[2] // geometry.scale, image.shape[3] // geometry.scale)
    patches = plan_patches(*latent_size, patch_size, geometry)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = {}
    with transform_mode(device, exact):
        start = time.perf_counter()
        y = torch.empty(1, channels, *latent_size)
        run_patchwise(
            model.g_a,
            image,
            y,
            patches,
            geometry.scale,
            1,
            batch_size,
            device,
            prepare=lambda b: b.float().div_(255),
        )
        timings["analysis_s"] = time.perf_counter() - start
        start = time.perf_counter()
        out = torch.empty(1, 3, *image.shape[2:], dtype=torch.uint8)
        run_patchwise(
            model.g_s,
            y,
            out,
            patches,
            1,
            geometry.scale,
            batch_size,
            device,
            finish=lambda r: r.clamp(0, 1).mul(255).round().to(torch.uint8),
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["synthesis_s"] = time.perf_counter() - start
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({**timings, "peak_mb": peak_mb, "patches": len(patches)})


def measure(*args):
    """Run :func:`_measure` in a fresh process and return its figures."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(*args, queue), daemon=True)
    # Ctrl-C reaches the whole process group: the child ignores it (it printed a
    # traceback), this process reports it in one line and ends the child at exit.
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, handler)
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(
            f"measurement {args} failed with exit code {process.exitcode}"
        )
    return queue.get()


def image_sizes(text):
    """'768x512,1920x1080' -> [(768, 512), (1920, 1080)]; an argparse type."""
    return [parse_size(size) for size in text.split(",")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        type=image_sizes,
        default="768x512,1920x1080,3840x2160",
        help="comma-separated WIDTHxHEIGHT images (default: %(default)s)",
    )
    parser.add_argument("--N", type=positive_int, default=192)
    parser.add_argument("--patch-size", type=positive_int, default=256)
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument(
        "--fast", action="store_true", help="CPU: oneDNN instead of exact mode"
    )
    args = parse_with_output(parser, argv, "patch_overhead.json")
    refuse_repeats(parser, args, "--sizes")
    try:  # in the parent: the child's error would be a traceback after a run
        check_patch_size(
            args.patch_size, model_geometry(models.build_model("cps", N=1))
        )
    except ValueError as exc:
        parser.error(f"--patch-size: {exc}")
    refuse_missing_cuda(parser, args)
    return args


def measure_all(args):
    """Whole and patch-wise figures of every size, printed as they come; returns the
    report. RuntimeError if a measurement fails."""
    device = "cuda" if args.cuda else "cpu"
    rows = []
    print(
        f"{'size':>10} {'mode':>12} {'g_a s':>8} {'g_s s':>8} {'peak MB':>9} "
        f"{'time x':>7} {'mem x':>6}"
    )
    for width, height in args.sizes:
        size = f"{width}x{height}"
        whole = measure(width, height, args.N, 0, 1, device, not args.fast)
        patched = measure(
            width,
            height,
            args.N,
            args.patch_size,
            args.batch_size,
            device,
            not args.fast,
        )
        time_ratio = (patched["analysis_s"] + patched["synthesis_s"]) / (
            whole["analysis_s"] + whole["synthesis_s"]
        )
        memory_ratio = patched["peak_mb"] / whole["peak_mb"]
        for mode, result in (("whole", whole), (f"P={args.patch_size}", patched)):
            print(
                f"{size:>10} {mode:>12} {result['analysis_s']:8.2f} "
                f"{result['synthesis_s']:8.2f} {result['peak_mb']:9.0f}"
                + (
                    f" {time_ratio:7.2f} {memory_ratio:6.2f}"
                    if result is patched
                    else ""
                ),
                flush=True,
            )
        rows.append(
            {
                "size": size,
                "whole": whole,
                "patchwise": patched,
                "time_ratio": time_ratio,
                "memory_ratio": memory_ratio,
            }
        )
    report = {
        "device": device,
        "N": args.N,
        "patch_size": args.patch_size,
        "batch_size": args.batch_size,
        "exact": not args.fast,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "results": rows,
    }
    return report


def main(argv=None):
    args = parse_args(argv)
    try:
        report = measure_all(args)
    except RuntimeError as exc:
        print(f"patch_overhead.py: error: {exc}", file=sys.stderr)
        return 1
    save_json(args.output, report)
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "patch_overhead.py"))
