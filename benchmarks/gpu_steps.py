"""The checks of ``benchmarks/gpu_check.py``: what each runs and how its results
are read. Each check runs the repository's own scripts in a child process, as a
user would, with random N=192 weights saved in the authors' layout:

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
   CompressAI example loop (also with one host read per step), of ``train.py``'s
   step and of that step with bfloat16 autocast and channels_last, each also
   replayed as a CUDA graph, in images/s; it passes when the graph-replayed step
   reaches :data:`TRAINING_TARGETS` (1.0x the example in float32, 1.3x with both
   options).
"""

import glob
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    "tests/test_train_overlap.py",
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
    # The indexes of the commands allowed to exit with a non-zero status.
    may_fail: List[int] = field(default_factory=list)


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
        kept = ("final_loss", "graph_replayed", "operators_per_step")
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
