"""Start-up cost of codec.py: wall time and peak RSS of whole command-line runs.

    python benchmarks/startup.py [--size 128] [--batch 4] [--N 192] [--repeats 3]
        [-o FILE | --publish]

Each row is one fresh Python process, timed from start to exit. Its peak resident
memory is its own ``VmHWM``, read at exit by a few lines run before the command
(the kernel's ``ru_maxrss`` of a child would start from the RSS of this parent,
which forked it); without ``/proc`` the peak is not reported.

- ``import torch``: ``python -c "import torch"``, the floor every row pays;
- ``codec.py --help``: the imports of the command-line tool;
- ``encode 1 image``: ``codec.py encode`` of one ``--size`` x ``--size`` image with
  random N=192 weights (loading them included);
- ``encode N images``: ``--batch`` images. When ``codec.py encode`` takes several
  inputs with ``-d OUTDIR``, that is one process; otherwise it is ``--batch``
  separate calls, their times added and their peaks' maximum kept, and the table
  says so.

Times are the median of ``--repeats`` runs; the last column is the time over the
``import torch`` row. Writes ``benchmarks/results/local/startup.json`` (or the
tracked ``benchmarks/results/startup.json`` with ``--publish``).
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.results_io import (
    add_output_arguments,
    machine_info,
    resolve_output,
    save_results,
)
from utils.cli import run_main

CODEC = os.path.join(ROOT, "codec.py")
PEAK_MARK = "STARTUP_PEAK_KB"
# Run as ``python -c PROBE TARGET ARGS...``: runs TARGET (a script, or ``-c CODE``) as
# ``python TARGET ARGS...`` would, and at exit writes the process's VmHWM to stderr.
PROBE = """
import atexit, os, runpy, sys

def report():
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    sys.stderr.write("\\nSTARTUP_PEAK_KB " + line.split()[1] + "\\n")

atexit.register(report)
sys.argv = sys.argv[1:]
if sys.argv[0] == "-c":
    code = sys.argv[1]
    sys.argv = ["-c"] + sys.argv[2:]
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
else:
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=4, help="images of the batch row")
    parser.add_argument("--N", type=int, default=192, help="model width")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (median)")
    add_output_arguments(parser, "startup.json")
    args = parser.parse_args(argv)
    for name in ("size", "batch", "N", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    resolve_output(parser, args)
    return args


def run_once(command: List[str]) -> Dict[str, Optional[float]]:
    """Wall seconds and peak RSS (MB, ``None`` without ``/proc``) of ``python ARGS``
    given as ``[python, *ARGS]``; RuntimeError if it fails."""
    start = time.perf_counter()
    result = subprocess.run(
        [command[0], "-c", PROBE, *command[1:]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    seconds = time.perf_counter() - start
    lines = result.stderr.strip().splitlines()
    peaks = [int(line.split()[1]) for line in lines if line.startswith(PEAK_MARK + " ")]
    if result.returncode != 0:
        other = [line for line in lines if not line.startswith(PEAK_MARK)]
        last = other[-1] if other else f"exit status {result.returncode}"
        raise RuntimeError(f"{' '.join(command[1:])} failed: {last}")
    return {"seconds": seconds, "peak_rss_mb": peaks[-1] / 1024 if peaks else None}


def measure(commands: List[List[str]], repeats: int) -> Dict[str, float]:
    """Median over ``repeats`` of the summed time of ``commands`` run one after the
    other, and the largest peak RSS among them."""
    totals, peaks = [], []
    for _ in range(repeats):
        runs = [run_once(command) for command in commands]
        totals.append(sum(run["seconds"] for run in runs))
        peaks.append(max((run["peak_rss_mb"] or 0.0) for run in runs))
    return {
        "seconds": statistics.median(totals),
        "peak_rss_mb": max(peaks) or None,
        "processes": len(commands),
    }


def codec_takes_several_inputs() -> bool:
    """True when ``codec.py encode`` has a ``-d`` output folder for several inputs."""
    result = subprocess.run(
        [sys.executable, CODEC, "encode", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return result.returncode == 0 and any(
        token in result.stdout
        for token in ("-d OUTDIR", "-d OUTPUT_DIR", "--output-dir")
    )


def prepare(folder: str, args: argparse.Namespace) -> Dict[str, object]:
    """Random N weights (a bare state dict) and ``--batch`` PNGs in ``folder``."""
    from PIL import Image

    from benchmarks.synthetic import synthetic_image, synthetic_model
    from utils.atomic import atomic_torch_save

    weights = os.path.join(folder, "weights.pth.tar")
    atomic_torch_save(synthetic_model(args.N, seed=0).state_dict(), weights)
    images = []
    for index in range(args.batch):
        image = synthetic_image(args.size, args.size).roll(index * 7, dims=2)
        images.append(os.path.join(folder, f"image{index}.png"))
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(images[-1])
    return {"weights": weights, "images": images}


def rows_to_run(
    folder: str,
    files: Dict[str, object],
    batch_in_one: bool,
) -> Dict[str, List[List[str]]]:
    python, weights, images = sys.executable, files["weights"], files["images"]
    encode = [python, CODEC, "encode", "-p", weights]
    if batch_in_one:
        batch = [encode + images + ["-d", os.path.join(folder, "batch")]]
    else:
        batch = [
            encode + [image, os.path.join(folder, f"batch{index}.cps")]
            for index, image in enumerate(images)
        ]
    return {
        "import torch": [[python, "-c", "import torch"]],
        "codec.py --help": [[python, CODEC, "--help"]],
        "encode 1 image": [encode + [images[0], os.path.join(folder, "one.cps")]],
        f"encode {len(images)} images": batch,
    }


def format_table(rows: Dict[str, dict], batch_in_one: bool) -> str:
    baseline = rows["import torch"]["seconds"]
    lines = [
        "| run | processes | time (s) | peak RSS (MB) | time over import torch |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        peak = (
            "not measured"
            if row["peak_rss_mb"] is None
            else f"{row['peak_rss_mb']:.0f}"
        )
        lines.append(
            f"| {name} | {row['processes']} | {row['seconds']:.2f} | {peak} | "
            f"{row['seconds'] / baseline:.2f}x |"
        )
    if not batch_in_one:
        lines.append(
            "\nThe batch row is separate codec.py calls, one per image: this "
            "codec.py encode takes one input (no -d OUTDIR)."
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="cps-startup-") as folder:
            files = prepare(folder, args)
            batch_in_one = codec_takes_several_inputs()
            rows = {
                name: measure(commands, args.repeats)
                for name, commands in rows_to_run(folder, files, batch_in_one).items()
            }
    except (RuntimeError, OSError) as exc:
        print(f"startup.py: error: {exc}", file=sys.stderr)
        return 1
    table = format_table(rows, batch_in_one)
    document = {
        "benchmark": "startup",
        "N": args.N,
        "size": args.size,
        "batch": args.batch,
        "repeats": args.repeats,
        "batch_in_one_process": batch_in_one,
        "machine": machine_info(
            python=platform.python_version(), load_average=list(os.getloadavg())
        ),
        "results": rows,
        "table": table,
    }
    save_results(args.output, document)  # before the table: a reader may leave
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "startup.py"))
