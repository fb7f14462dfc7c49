"""The evaluation loop of ``test.py``: datasets, per-image coding, sharding, results.

A *run* is one operating point (a checkpoint, a zoo quality, a codec quality). Every
run codes every image of the dataset; per image it records the real rate, the
likelihood estimate where there is one, PSNR-RGB, MS-SSIM-RGB, PSNR-B, the times and
the peak memory (``utils.evaluation.metrics``). The dataset result of a run is the
mean over images of each quantity, as in CompressAI's published results.

Under ``torchrun --nproc_per_node=K`` the images are sharded: process ``r`` codes
images ``r, r+K, r+2K, ...`` (each on its own GPU with ``--cuda``), every process
writes its own reconstructions, and the per-image records are gathered so that the
merged results are those of a single-process run (times and memory aside). A
failure in one process is passed along with the records instead of leaving the
others waiting in the collective.
"""

import logging
import os
import re
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from utils.atomic import strict_json
from utils.cli import REPORTED_ERRORS
from utils.evaluation.choices import DATASETS_CONFIG, REPO_ROOT
from utils.evaluation.coders import Coder
from utils.evaluation.metrics import image_metrics
from utils.image_io import is_image_file, read_image, to_grayscale, write_png
from utils.memory import PeakMemory
from utils.yaml_io import load_yaml_file

log = logging.getLogger("cps.test")

RESULT_KEYS = (
    "bpp",
    "bpp_est",
    "psnr-rgb",
    "ms-ssim-rgb",
    "psnr-b",
    "psnr-b-y",
    "encoding_time",
    "decoding_time",
    "peak_memory_mb",
    "verification_peak_memory_mb",
    "layer",
)


@dataclass(frozen=True)
class Dataset:
    """A folder of test images and the patch size the paper uses for it (or None)."""

    name: str
    folder: str
    patch_size: Optional[int]


def load_datasets_config(path: str = DATASETS_CONFIG) -> Dict[str, dict]:
    """Read and validate ``configs/datasets.yaml``.

    Each entry is ``NAME: {path: str, patch_size: int}``.
    """
    config = load_yaml_file(path, "datasets config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of dataset names")
    for name, entry in config.items():
        if not isinstance(entry, dict) or set(entry) != {"path", "patch_size"}:
            raise ValueError(
                f"{path}: dataset {name!r} must have exactly the keys "
                "path and patch_size"
            )
        if not isinstance(entry["path"], str):
            raise ValueError(f"{path}: dataset {name!r}: path must be a string")
        size = entry["patch_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(
                f"{path}: dataset {name!r}: patch_size must be an integer >= 0"
            )
    return config


def environment_variable(name: str) -> str:
    """``CPS_<NAME>``: the variable overriding a dataset's folder (CPS_KODAK, ...)."""
    return "CPS_" + re.sub(r"[^A-Z0-9]", "_", name.upper())


def resolve_dataset(spec: str, config_path: str = DATASETS_CONFIG) -> Dataset:
    """A dataset from a folder path, or from a name in the config (case-insensitive).

    A named dataset's folder is ``$CPS_<NAME>`` when that variable is set, else the
    config's ``path`` (relative paths are relative to the repository root).
    """
    if os.path.isdir(spec):
        return Dataset(os.path.basename(os.path.normpath(spec)), spec, None)
    config = load_datasets_config(config_path)
    names = {name.lower(): name for name in config}
    if spec.lower() not in names:
        raise ValueError(
            f"--dataset {spec!r} is neither a folder nor a dataset of {config_path} "
            f"({', '.join(config)})"
        )
    name = names[spec.lower()]
    variable = environment_variable(name)
    from_variable = os.environ.get(variable)
    folder = from_variable or os.path.join(REPO_ROOT, config[name]["path"])
    if not os.path.isdir(folder):
        problem = "a file, not a folder" if os.path.exists(folder) else "missing"
        where = (
            f"{variable} is {folder} ({problem}); set it to the dataset's folder"
            if from_variable
            else f"folder {folder} ({problem}); set {variable} or edit {config_path}"
        )
        raise ValueError(f"dataset {name}: {where}")
    return Dataset(name, folder, config[name]["patch_size"])


def list_images(folder: str) -> List[str]:
    """Image files directly inside ``folder``, sorted by name; sub-folders are left
    out, even one named like an image (a link to nothing stays, and is refused)."""
    paths = sorted(
        os.path.join(folder, entry)
        for entry in os.listdir(folder)
        if is_image_file(entry) and not os.path.isdir(os.path.join(folder, entry))
    )
    if not paths:
        raise ValueError(f"no images (files in a format Pillow reads) in {folder}")
    return paths


@dataclass
class Run:
    """One model, checkpoint or quality: ``label`` for logs, ``tag`` for file names;
    ``build`` returns its coders (``utils.evaluation.coders``), one per operating
    point, and is called once per process."""

    label: str
    tag: str
    build: Callable[[], List[Coder]]


@dataclass
class Entry:
    """One operating point in the results: a run's only coder, or one layer of it."""

    label: str
    tag: str
    description: str


def _entry(run: Run, coder: Coder, several: bool) -> Entry:
    if coder.layer is None or not several:
        return Entry(run.label, run.tag, coder.description)
    return Entry(
        f"{run.label} layer {coder.layer}",
        f"{run.tag}-L{coder.layer}",
        coder.description,
    )


def shard() -> Tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside ``torchrun``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reconstruction_name(path: str, tag: str, several_runs: bool) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{stem}-{tag}.png" if several_runs else f"{stem}.png"


def _code_image(
    coder: Coder, image: torch.Tensor, grayscale: bool = False
) -> Tuple[dict, torch.Tensor]:
    """Code one image and measure it. A grayscale source is measured, and returned, as
    the one-channel image ``codec.py`` writes for it (the channel mean of the decoded
    RGB, which the file's grayscale flag asks for; the flag costs no bits)."""
    with PeakMemory(coder.device) as memory:
        coded = coder.code(image)
    reconstruction = (
        to_grayscale(coded.reconstruction) if grayscale else coded.reconstruction
    )
    # A layer of a spatially scalable model reconstructs a smaller reference image.
    reference = coder.reference_image(image)
    height, width = reference.shape[1:]
    record = {"bpp": coded.bits / (height * width)}
    if coded.estimated_bits is not None:
        record["bpp_est"] = coded.estimated_bits / (height * width)
    record.update(image_metrics(reference, reconstruction.expand(3, -1, -1)))
    # A coder that measured its own peak (apart from a verification decode)
    # knows better.
    peak = memory.peak_mb if coded.peak_mb is None else coded.peak_mb
    record.update(
        encoding_time=coded.encoding_time,
        decoding_time=coded.decoding_time,
        peak_memory_mb=peak,
    )
    if coded.verification_peak_mb is not None:
        record["verification_peak_memory_mb"] = coded.verification_peak_mb
    if coder.layer is not None:
        record["layer"] = coder.layer
    return record, reconstruction


def _code_shard(
    runs: Sequence[Run],
    paths: Sequence[str],
    indexes: Sequence[int],
    image_folder: Optional[str],
    rank: int,
    progress: bool,
):
    """Code the images ``indexes`` of ``paths`` with every run; write the
    reconstructions into ``image_folder`` (a staging folder that the caller removes
    if this fails: utils/evaluation/outputs.py)."""
    records, entries = {}, []
    for run in runs:
        coders = run.build()
        for coder in coders:
            entry = _entry(run, coder, len(coders) > 1)
            number = len(entries)
            entries.append(entry)
            label = f"[rank {rank}] {entry.label}" if shard()[1] > 1 else entry.label
            for index in tqdm(
                indexes, desc=label, unit="image", disable=not progress, leave=False
            ):
                image, info = read_image(paths[index])
                if number == 0:
                    for change in info.conversions:
                        log.warning("%s: %s", paths[index], change)
                try:
                    records[number, index], reconstruction = _code_image(
                        coder, image, info.grayscale
                    )
                except (ValueError, RuntimeError) as exc:
                    raise type(exc)(f"{paths[index]}: {exc}") from None
                if image_folder is not None:
                    name = reconstruction_name(
                        paths[index], entry.tag, len(runs) > 1 or len(coders) > 1
                    )
                    write_png(os.path.join(image_folder, name), reconstruction)
        # Nothing may hold this run's models when the next build() loads its own
        # (the loop variable would keep the last one: twice the memory on a GPU).
        coders = coder = None
    return records, entries


def evaluate(
    runs: Sequence[Run],
    paths: Sequence[str],
    image_folder: Optional[str] = None,
    progress: bool = True,
) -> Tuple[List[List[dict]], List[Entry]]:
    """Code every image with every operating point of every run, sharded over the
    ``torchrun`` processes.

    Returns ``records[entry][image]`` (every process gets all of them) and the
    entries (one per operating point). With ``image_folder``, reconstructions are
    written there as ``<stem>.png`` (one entry) or ``<stem>-<tag>.png``: a staging
    folder, which the caller removes if the run fails or is interrupted.
    """
    rank, world = shard()
    indexes = range(rank, len(paths), world)
    if world == 1:
        records, entries = _code_shard(
            runs, paths, indexes, image_folder, rank, progress
        )
    else:
        try:
            outcome = _code_shard(runs, paths, indexes, image_folder, rank, progress)
        except Exception as exc:  # passed on to every process below, then raised there
            if not isinstance(exc, REPORTED_ERRORS):  # a bug: keep its traceback
                traceback.print_exc()
            outcome = f"rank {rank}: {exc}"
        gathered = [None] * world
        dist.all_gather_object(gathered, outcome)
        failures = [item for item in gathered if isinstance(item, str)]
        if failures:
            raise RuntimeError(failures[0])
        records = {key: value for part, _ in gathered for key, value in part.items()}
        entries = gathered[0][1]
    table = [
        [records[number, index] for index in range(len(paths))]
        for number in range(len(entries))
    ]
    return table, entries


def mean_over_images(
    values: List[Optional[float]], key: str, label: str
) -> Optional[float]:
    """The mean of the per-image values that exist (a metric an image is too small
    for is None), with a warning naming ``label`` when some are missing; None when
    all are."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if len(present) < len(values):
        log.warning(
            "%s: %s missing for %d of %d images; averaged over the others",
            label,
            key,
            len(values) - len(present),
            len(values),
        )
    return sum(present) / len(present)


def aggregate(records: List[List[dict]], labels: Sequence[str]) -> Dict[str, list]:
    """CompressAI-style ``results``: per key, one dataset mean per run."""
    keys = [
        k for k in RESULT_KEYS if any(k in record for run in records for record in run)
    ]
    # The layer index of a scalable model's operating point is the same on every image.
    return {
        key: [
            run[0].get(key)
            if key == "layer"
            else mean_over_images([record.get(key) for record in run], key, label)
            for run, label in zip(records, labels)
        ]
        for key in keys
    }


def per_image_documents(
    records: List[List[dict]], paths: Sequence[str], header: dict
) -> Dict[str, dict]:
    """One results document per image (same schema, one entry per run), by stem."""
    documents = {}
    for index, path in enumerate(paths):
        stem = os.path.splitext(os.path.basename(path))[0]
        results = {
            key: [run[index].get(key) for run in records]
            for key in RESULT_KEYS
            if any(key in run[index] for run in records)
        }
        documents[stem] = dict(header, image=path, results=results)
    return documents


def to_json(document: dict) -> str:
    """Strict JSON text: infinite or NaN numbers (a lossless PSNR) become ``null``."""
    return strict_json(document)
