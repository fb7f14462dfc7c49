"""The GPU checks in one run: CUDA evaluation, cross-device files, memory, speed.

    python benchmarks/gpu_check.py --kodak DIR [--output-dir DIR] [--budget-s 470]
    python benchmarks/gpu_check.py --dry-run [--kodak DIR]

(``benchmarks/gpu_check.sh`` runs the first line.) The six checks (the CUDA tests,
evaluation with ``--cuda``, files across devices, memory at 8K, wavefront decoding,
training throughput) are described in ``benchmarks/gpu_steps.py``. Each runs the
repository's own scripts in a child process, as a user would, with random N=192
weights saved in the authors' layout (a bare state dict, scale predictions spread
over the scale table as in ``benchmarks/entropy_coding.py``).

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
import importlib.util
import io
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.gpu_steps import (
    CHECKS,
    CUDA_TEST_FILES,
    Step,
    build_steps,
    kodak_images,
)
from benchmarks.results_io import LOCAL_DIR, refuse_repeats
from utils.atomic import atomic_torch_save, atomic_write_bytes, save_json
from utils.cli import run_main
from utils.output_paths import check_output_folder

DEFAULT_OUTPUT_DIR = os.path.join(LOCAL_DIR, "gpu_check")


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
    if not 0 < args.budget_s < math.inf:
        parser.error(
            f"--budget-s must be a positive number of seconds, got {args.budget_s}"
        )
    # Checked before the checks run: the report is first written after one.
    folders = {"--output-dir": args.output_dir}
    if args.work_dir is not None:
        folders["--work-dir"] = args.work_dir
    for flag, folder in folders.items():
        try:
            check_output_folder(folder, flag)
        except ValueError as exc:
            parser.error(str(exc))
    if not args.dry_run and not args.kodak:
        parser.error("give --kodak DIR or set $CPS_KODAK")
    both = args.kodak and args.work_dir
    if both and os.path.realpath(args.kodak) == os.path.realpath(args.work_dir):
        # The decoded PNGs (cpu_to_cuda.png, ...) sort before kodim01.png: the
        # next run would take them for Kodak images.
        parser.error(
            f"--work-dir {args.work_dir} is the Kodak folder: its decoded PNGs would "
            "be read as Kodak images; give another folder"
        )
    return args


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
    from benchmarks.synthetic import synthetic_model

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
    sys.exit(run_main(main, "gpu_check.py"))
