"""The GPU checks in one run: CUDA evaluation, cross-device files, memory, speed.

    python benchmarks/gpu_check.py --kodak DIR [--output-dir DIR] [--budget-s 470]
    python benchmarks/gpu_check.py --dry-run [--kodak DIR]

(``benchmarks/gpu_check.sh`` runs the first line.) Each check runs the repository's
own scripts in a child process, as a user would, with random N=192 weights saved
in the authors' layout (a bare state dict, scale predictions spread over the scale
table as in ``benchmarks/entropy_coding.py``):

0. ``cuda_tests``: the test suite's CUDA tests (``pytest -k cuda`` on
   :data:`CUDA_TEST_FILES`), which found a device mix-up in the context coder;
1. ``evaluate``: ``test.py checkpoint --cuda`` on the first 3 Kodak images with
   ``--patch-size 128`` and with ``--patch-size auto``;
2. ``cross_device``: ``codec.py`` encodes one Kodak image on CUDA and on the CPU
   (the two files must be byte-identical) and decodes each file on both. A decode on
   the other device either rebuilds the same latent (its CRC is checked), so that its
   pixels differ from the encoder device's by at most
   :data:`CROSS_DEVICE_TOLERANCE` (float rounding in ``g_s``), or refuses the file on
   the latent CRC: never a silent difference;
3. ``memory_8k``: ``benchmarks/memory_scaling.py`` codes a 7680x4320 image on CUDA
   under ``--max-memory 2GB``; the peak ``max_memory_allocated`` must stay within it;
4. ``wavefront``: ``benchmarks/entropy_coding.py`` times the wavefront context coder
   on the latents of 1920x1080 and 7680x4320 images;
5. ``training``: ``benchmarks/train_throughput.py --cuda`` runs 200 steps of the
   CompressAI example loop, of ``train.py``'s step and of that step with bfloat16
   autocast and channels_last, each also replayed as a CUDA graph, in images/s; it
   passes when the graph-replayed step reaches :data:`TRAINING_TARGETS` (1.0x the
   example in float32, 1.3x with both options).

The checks share a time budget (``--budget-s``, default 470 s, so that the whole
run stays under 8 minutes); a check that would start past it is reported as
skipped. Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--output-dir``
(default ``benchmarks/results/local/gpu_check``); weights, bitstreams and
intermediate results go to ``--work-dir`` (default: a temporary folder).

``--dry-run`` needs no GPU: it parses every command with its script's own
``parse_args`` (so a renamed flag or a missing script fails here, not on the
GPU), checks the Kodak folder if one is given, and writes the JSON and Markdown
with each check marked "dry run".
"""

import argparse
import contextlib
import glob
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.results_io import LOCAL_DIR, refuse_repeats
from utils.atomic import atomic_torch_save, atomic_write_bytes, save_json

DEFAULT_OUTPUT_DIR = os.path.join(LOCAL_DIR, "gpu_check")
KODAK_IMAGES = 3
BUDGET = "2GB"
TRAIN_STEPS = 200
# The synthesis transform's float arithmetic differs between a GPU and a CPU, so a
# pixel may round to the neighbouring level; the latent itself must be identical.
CROSS_DEVICE_TOLERANCE = 1
CHECKS = (
    "cuda_tests",
    "evaluate",
    "cross_device",
    "memory_8k",
    "wavefront",
    "training",
)
# The test files whose CUDA tests (named "cuda") the first check runs.
CUDA_TEST_FILES = (
    "tests/test_latent_coding.py",
    "tests/test_kamisli_codec.py",
    "tests/test_train.py",
)
# Throughput that train.py's step must reach against CompressAI's example loop.
TRAINING_TARGETS = {
    "train_py_cuda_graph": 1.0,
    "train_py_bf16_channels_last_cuda_graph": 1.3,
}


@dataclass
class Step:
    """One check: its commands (run in order) and how to read their results."""

    name: str
    description: str
    commands: List[List[str]]
    timeout_s: int
    summarise: Callable[[List[subprocess.CompletedProcess]], Dict[str, object]]
    may_fail: List[int] = field(
        default_factory=list
    )  # command indexes allowed to exit != 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--kodak",
        default=os.environ.get("CPS_KODAK"),
        help="Kodak folder (default: $CPS_KODAK)",
    )
    parser.add_argument(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        help="gpu_check.json and gpu_check.md go here",
    )
    parser.add_argument(
        "--work-dir",
        help="weights and intermediate files (default: a "
        "temporary folder, removed afterwards)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=470.0,
        help="time for all checks together (default: %(default)s)",
    )
    parser.add_argument(
        "--checks",
        nargs="+",
        choices=CHECKS,
        default=list(CHECKS),
        metavar="CHECK",
        help=f"run only these ({', '.join(CHECKS)}; default: all)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate every command on the CPU without running it",
    )
    args = parser.parse_args(argv)
    refuse_repeats(parser, args, "--checks")
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    if not args.dry_run and not args.kodak:
        parser.error("give --kodak DIR or set $CPS_KODAK")
    return args


def kodak_images(folder: str) -> List[str]:
    """The first :data:`KODAK_IMAGES` PNGs of ``folder`` (ValueError if fewer)."""
    paths = sorted(glob.glob(os.path.join(folder, "*.png")))[:KODAK_IMAGES]
    if len(paths) < KODAK_IMAGES:
        raise ValueError(
            f"--kodak {folder}: {len(paths)} PNG images, need {KODAK_IMAGES}"
        )
    return paths


def _python(script: str, *arguments: str) -> List[str]:
    return [sys.executable, os.path.join(ROOT, script), *arguments]


def _read_json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def _sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def cuda_tests_step() -> Step:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "-q",
        "-k",
        "cuda",
        *CUDA_TEST_FILES,
    ]

    def summarise(results):
        (result,) = results
        lines = result.stdout.strip().splitlines()
        failed = [line.split(" - ")[0] for line in lines if line.startswith("FAILED")]
        return {
            "status": "pass" if result.returncode == 0 else "fail",
            "figures": {
                "summary": lines[-1] if lines else "no output",
                **({"failed": failed} if failed else {}),
            },
        }

    return Step(
        "cuda_tests",
        "the test suite's CUDA tests (pytest -k cuda)",
        [command],
        120,
        summarise,
        may_fail=[0],
    )


def evaluate_step(work: str, weights: str, kodak: str) -> Step:
    runs = {
        "128": os.path.join(work, "evaluate_128"),
        "auto": os.path.join(work, "evaluate_auto"),
    }
    commands = [
        _python(
            "test.py",
            "checkpoint",
            "-p",
            weights,
            "--dataset",
            kodak,
            "--max-images",
            str(KODAK_IMAGES),
            "--patch-size",
            patch,
            "--cuda",
            "--no-progress",
            "-d",
            folder,
        )
        for patch, folder in runs.items()
    ]

    def summarise(_results):
        figures = {}
        for patch, folder in runs.items():
            results = _read_json(os.path.join(folder, "results.json"))["results"]
            figures[f"P={patch}"] = {
                key: values[0]
                for key, values in results.items()
                if isinstance(values, list) and values
            }
        return {"status": "pass", "figures": figures}

    return Step(
        "evaluate",
        f"test.py checkpoint --cuda, {KODAK_IMAGES} Kodak images, "
        "--patch-size 128 and auto",
        commands,
        150,
        summarise,
    )


def _pixel_difference(path: str, reference: str):
    """Largest absolute difference of two 8-bit images; share of values that differ."""
    import numpy
    from PIL import Image

    first, second = (
        numpy.asarray(Image.open(p), dtype=numpy.int16) for p in (path, reference)
    )
    difference = numpy.abs(first - second)
    return int(difference.max()), float((difference > 0).mean())


def cross_device_step(work: str, weights: str, image: str) -> Step:
    files = {
        device: os.path.join(work, f"encoded_{device}.cps")
        for device in ("cuda", "cpu")
    }
    flags = {"cuda": ["--cuda"], "cpu": []}
    commands = [
        _python("codec.py", "encode", "-p", weights, *flags[device], image, path)
        for device, path in files.items()
    ]
    decodes = [(encoder, decoder) for encoder in files for decoder in ("cuda", "cpu")]
    commands += [
        _python(
            "codec.py",
            "decode",
            "-p",
            weights,
            *flags[decoder],
            files[encoder],
            os.path.join(work, f"{encoder}_to_{decoder}.png"),
        )
        for encoder, decoder in decodes
    ]

    def summarise(results):
        figures = {
            "same_file_from_both_encoders": _sha256(files["cuda"])
            == _sha256(files["cpu"])
        }
        status = "pass" if figures["same_file_from_both_encoders"] else "fail"
        for (encoder, decoder), result in zip(decodes, results[2:]):
            key = f"{encoder}_to_{decoder}"
            if result.returncode != 0:
                refused = "CRC" in result.stderr
                figures[key] = (
                    "refused on the latent CRC" if refused else "decode error"
                )
                if not refused or encoder == decoder:
                    status = "fail"
            elif encoder != decoder:
                largest, share = _pixel_difference(
                    os.path.join(work, f"{encoder}_to_{decoder}.png"),
                    os.path.join(work, f"{encoder}_to_{encoder}.png"),
                )
                figures[key] = {"max_abs_diff": largest, "pixels_differing": share}
                if largest > CROSS_DEVICE_TOLERANCE:
                    status = "fail"
            else:
                figures[key] = "decoded"
        return {"status": status, "figures": figures}

    return Step(
        "cross_device",
        "codec.py: CUDA encode / CPU decode and CPU encode / CUDA "
        "decode: the same file, the same latent (CRC), pixels within "
        f"{CROSS_DEVICE_TOLERANCE}",
        commands,
        240,
        summarise,
        may_fail=[2, 3, 4, 5],
    )


def memory_step(work: str) -> Step:
    output = os.path.join(work, "memory_8k.json")
    command = _python(
        "benchmarks/memory_scaling.py",
        "--sizes",
        "7680x4320",
        "--methods",
        "cps-budget",
        "--cuda",
        "--max-memory",
        BUDGET,
        "-o",
        output,
    )

    def summarise(_results):
        document = _read_json(output)
        (entry,) = document["results"]
        if "peak_mb" not in entry:
            return {"status": "fail", "figures": entry}
        within = entry["peak_mb"] <= document["budget_mb"]
        return {
            "status": "pass" if within else "fail",
            "figures": {
                "peak_mb": entry["peak_mb"],
                "budget_mb": document["budget_mb"],
                "encode_s": entry["encode_s"],
                "decode_s": entry["decode_s"],
                "patch_sizes": entry.get("patch_sizes"),
            },
        }

    return Step(
        "memory_8k",
        f"CUDA peak max_memory_allocated at 7680x4320 against --max-memory {BUDGET}",
        [command],
        150,
        summarise,
    )


def wavefront_step(work: str) -> Step:
    output = os.path.join(work, "wavefront.json")
    command = _python(
        "benchmarks/entropy_coding.py",
        "--sizes",
        "1920x1080",
        "7680x4320",
        "--coders",
        "wavefront",
        "-o",
        output,
    )

    def summarise(_results):
        figures = {
            entry["image"]: {
                "encode_s": entry["wavefront"]["encode_s"],
                "decode_s": entry["wavefront"]["decode_s"],
            }
            for entry in _read_json(output)["results"]
        }
        return {"status": "pass", "figures": figures}

    return Step(
        "wavefront",
        "wavefront context decoding at 1920x1080 and 7680x4320",
        [command],
        90,
        summarise,
    )


def training_step(work: str) -> Step:
    output = os.path.join(work, "training.json")
    command = _python(
        "benchmarks/train_throughput.py",
        "--cuda",
        "--steps",
        str(TRAIN_STEPS),
        "--warmup",
        "5",
        "--repeats",
        "1",
        "-o",
        output,
    )

    def summarise(_results):
        rows = _read_json(output)["results"]
        reference = rows[0]["images_per_s"]
        kept = ("final_loss", "graph_replayed")
        figures = {
            row["loop"]: {
                "images_per_s": row["images_per_s"],
                "vs_compressai_example": row["images_per_s"] / reference,
                **{key: row[key] for key in kept if key in row},
            }
            for row in rows
        }
        met = all(
            figures[loop]["vs_compressai_example"] >= target
            and figures[loop].get("graph_replayed", True)
            for loop, target in TRAINING_TARGETS.items()
        )
        return {"status": "pass" if met else "below target", "figures": figures}

    return Step(
        "training",
        f"{TRAIN_STEPS} training steps, amp + channels_last against the "
        "CompressAI example loop",
        [command],
        240,
        summarise,
    )


def build_steps(work: str, weights: str, kodak: str) -> List[Step]:
    first_image = os.path.join(kodak, "kodim01.png")
    if os.path.isdir(kodak):
        first_image = kodak_images(kodak)[0]
    return [
        cuda_tests_step(),
        evaluate_step(work, weights, kodak),
        cross_device_step(work, weights, first_image),
        memory_step(work),
        wavefront_step(work),
        training_step(work),
    ]


def _load_script(path: str):
    """Import a script by path under a private name, for its ``parse_args``."""
    name = "gpu_check_" + os.path.relpath(path, ROOT).replace(os.sep, "_").replace(
        ".", "_"
    )
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def validate_command(command: List[str]) -> Optional[str]:
    """Why ``command`` would fail to start (a missing script, a flag its parser
    refuses), or ``None``: the script's own ``parse_args`` reads the arguments, as on
    a machine with CUDA (a parser may refuse ``--cuda`` where there is none)."""
    import torch

    if command[1:3] == ["-m", "pytest"]:  # the test files must exist
        missing = [
            path
            for path in CUDA_TEST_FILES
            if not os.path.isfile(os.path.join(ROOT, path))
        ]
        return f"{', '.join(missing)} missing" if missing else None
    script, arguments = command[1], command[2:]
    if not os.path.isfile(script):
        return f"{os.path.relpath(script, ROOT)} does not exist"
    module = _load_script(script)
    errors = io.StringIO()
    try:
        with (
            contextlib.redirect_stderr(errors),
            mock.patch.object(torch.cuda, "is_available", return_value=True),
        ):
            module.parse_args(arguments)
    except SystemExit:
        message = errors.getvalue().strip().splitlines()
        return message[-1] if message else "argument parsing failed"
    except ValueError as exc:
        return str(exc)
    return None


def save_weights(path: str) -> None:
    """Random N=192 CPS weights as the authors publish them: a bare state dict."""
    from benchmarks.entropy_coding import synthetic_model

    atomic_torch_save(synthetic_model(192, seed=0).state_dict(), path)


def run_step(step: Step, deadline: float) -> Dict[str, object]:
    """Run ``step``'s commands within its timeout and the deadline; read its results."""
    start = time.monotonic()
    results = []
    for index, command in enumerate(step.commands):
        remaining = min(
            step.timeout_s - (time.monotonic() - start), deadline - time.monotonic()
        )
        if remaining <= 0:
            return {"status": "timeout", "seconds": time.monotonic() - start}
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=remaining, cwd=ROOT
            )
        except subprocess.TimeoutExpired:
            return {
                "status": "timeout",
                "seconds": time.monotonic() - start,
                "command": " ".join(command),
            }
        results.append(result)
        if result.returncode != 0 and index not in step.may_fail:
            return {
                "status": "error",
                "seconds": time.monotonic() - start,
                "command": " ".join(command),
                "stderr": result.stderr.strip()[-800:],
            }
    try:
        outcome = step.summarise(results)
    except (OSError, KeyError, ValueError, IndexError) as exc:
        outcome = {"status": "error", "stderr": f"cannot read the results: {exc!r}"}
    outcome["seconds"] = time.monotonic() - start
    return outcome


def _cell(figures) -> str:
    def show(value):
        if isinstance(value, float):
            return f"{value:.3g}"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
        return str(value)

    if not isinstance(figures, dict):
        return show(figures)
    return "; ".join(f"{key}: {show(value)}" for key, value in figures.items())


def format_markdown(report: dict) -> str:
    lines = [
        f"# GPU check ({report['device']})",
        "",
        "| check | what | status | seconds | figures |",
        "|---|---|---|---|---|",
    ]
    for step in report["steps"]:
        seconds = "" if step.get("seconds") is None else f"{step['seconds']:.1f}"
        details = step.get("figures", step.get("stderr", ""))
        lines.append(
            f"| {step['name']} | {step['description']} | {step['status']} | "
            f"{seconds} | {_cell(details).replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def _device_name(dry_run: bool) -> str:
    if dry_run:
        return "dry run, no GPU used"
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            "no CUDA device: run with --dry-run to check the commands only"
        )
    return torch.cuda.get_device_name(0)


def write_report(report: dict, output_dir: str) -> str:
    """Write ``gpu_check.json`` and ``gpu_check.md``; return the Markdown."""
    markdown = format_markdown(report)
    save_json(os.path.join(output_dir, "gpu_check.json"), report)
    atomic_write_bytes(os.path.join(output_dir, "gpu_check.md"), markdown.encode())
    return markdown


def run_checks(args: argparse.Namespace, work: str) -> dict:
    """Run (or, with ``--dry-run``, validate) every check. The report is written again
    after each check, so that a run cut short still leaves the checks it finished."""
    weights = os.path.join(work, "cps_n192_random_authors_layout.pth.tar")
    kodak = args.kodak or os.path.join(work, "kodak-not-given")
    if args.kodak:
        kodak_images(args.kodak)
    device = _device_name(args.dry_run)
    steps = [
        step for step in build_steps(work, weights, kodak) if step.name in args.checks
    ]
    report = {
        "benchmark": "gpu_check",
        "device": device,
        "kodak": args.kodak,
        "budget_s": args.budget_s,
        "steps": [],
    }
    if not args.kodak:
        report["note"] = "no --kodak or $CPS_KODAK: the image folder was not checked"
    if args.dry_run:
        for step in steps:
            problems = [
                problem for problem in map(validate_command, step.commands) if problem
            ]
            report["steps"].append(
                {
                    "name": step.name,
                    "description": step.description,
                    "status": "dry run: "
                    + ("; ".join(problems) if problems else "commands valid"),
                    "valid": not problems,
                    "commands": [" ".join(c) for c in step.commands],
                }
            )
        return report
    deadline = time.monotonic() + args.budget_s
    save_weights(weights)
    for step in steps:
        entry = {
            "name": step.name,
            "description": step.description,
            "commands": [" ".join(c) for c in step.commands],
        }
        if time.monotonic() >= deadline:
            entry.update(status="skipped (time budget)")
        else:
            entry.update(run_step(step, deadline))
        report["steps"].append(entry)
        write_report(report, args.output_dir)
        print(f"{step.name}: {entry['status']}", flush=True)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.work_dir:
            os.makedirs(args.work_dir, exist_ok=True)
            report = run_checks(args, os.path.abspath(args.work_dir))
        else:
            with tempfile.TemporaryDirectory(prefix="cps-gpu-check-") as work:
                report = run_checks(args, work)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"gpu_check.py: error: {exc}", file=sys.stderr)
        return 1
    print(write_report(report, args.output_dir))
    if args.dry_run:
        return 0 if all(step["valid"] for step in report["steps"]) else 1
    return 0 if all(step["status"] == "pass" for step in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
