"""``python test.py demo``: the shipped CPS models on photographs that need no download.

scikit-image installs a few real photographs inside its package (astronaut, coffee,
chelsea, rocket, the left view of the stereo motorcycle). The demo codes each with
every shipped model through real ``.cps`` files (POPS patches), with the same model
on naive independent tiles (the block artefacts POPS removes), and with JPEG at the
quality whose file size is closest to CPS's, then writes under the output folder:

* ``results.json``: per image and averaged bpp, PSNR, MS-SSIM, PSNR-B and times;
* ``rd.png``: the averaged RD points against a JPEG curve;
* ``crops.png``: the same enlarged crop (around a tile corner) of the original, CPS,
  naive tiling and JPEG, for the lowest-rate model.

The table is printed on stdout. Files of an earlier demo in the output folder are
refused, before any work, unless ``force``.
"""

import os
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

import models
from models.base import CodingPlan
from utils.atomic import atomic_write_json
from utils.evaluation.choices import DEMO_IMAGE_NAMES, DEMO_OUTPUT, REPO_ROOT
from utils.evaluation.classical_codecs import get_codec
from utils.evaluation.coders import ClassicalCoder, Coded
from utils.evaluation.curves import Curve
from utils.evaluation.learned_coders import LearnedOptions, learned_coders
from utils.evaluation.metrics import bits_per_pixel, image_metrics
from utils.evaluation.rd_plot import plot_curves
from utils.evaluation.runs import mean_over_images
from utils.evaluation.shipped import ShippedModel, find_shipped_models
from utils.output_paths import (
    check_output_folder,
    output_folder,
    refuse_existing_outputs,
)
from utils.stitching.geometry import model_geometry
from utils.stitching.spec import PatchSpec

_CPU = torch.device("cpu")  # run_demo's default device
JPEG_QUALITIES = (1, 2, 3, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 95)
OUTPUT_FILES = ("results.json", "rd.png", "crops.png")
METRIC_KEYS = (
    "bpp",
    "psnr-rgb",
    "ms-ssim-rgb",
    "psnr-b",
    "encoding_time",
    "decoding_time",
)


def _skimage_photo(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        if name == "motorcycle":
            return skimage.data.stereo_motorcycle()[0]
        return getattr(skimage.data, name)()

    return load


DEMO_IMAGES: Dict[str, Callable[[], np.ndarray]] = {
    name: _skimage_photo(name) for name in DEMO_IMAGE_NAMES
}


def demo_image(name: str) -> torch.Tensor:
    """The bundled photograph ``name`` as a uint8 (3, H, W) tensor."""
    if name not in DEMO_IMAGES:
        raise ValueError(
            f"unknown demo image {name!r}; choose from {', '.join(DEMO_IMAGES)}"
        )
    pixels = np.ascontiguousarray(DEMO_IMAGES[name]()[..., :3])
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _demo_coders(
    model_info: ShippedModel, device: torch.device, patch_size: int, largest_side: int
) -> tuple:
    """The POPS and naive-tile coders of one model at ``patch_size``.

    Built for every model before anything is coded, so that a file that is no model,
    a model POPS cannot patch or a patch size it cannot use ends the demo at once.
    The size must be positive (naive tiles need one) and at most the largest image
    side rounded up to the model's grid: a larger naive tile codes padding only, and
    a huge one exhausts the memory after minutes of work.
    """
    model = models.load_checkpoint(model_info.path, device)
    if not model.supports_patches:
        raise ValueError(
            f"{model_info.path}: the demo codes POPS patches, which "
            f"{model.registry_name} cannot (it pads its convolutions)"
        )
    scale = model_geometry(model).scale
    if patch_size <= 0 or patch_size % scale:
        raise ValueError(
            f"--patch-size must be a positive multiple of {scale} (the POPS "
            f"patch and naive tile side), got {patch_size}"
        )
    limit = -(-largest_side // scale) * scale
    if patch_size > limit:
        raise ValueError(
            f"--patch-size {patch_size} is larger than the demo images need: at "
            f"most {limit} (their largest side, {largest_side} px, rounded up "
            f"to a multiple of {scale})"
        )
    plan = CodingPlan(patch=PatchSpec(patch_size))
    [pops] = learned_coders(model, LearnedOptions(plan, tiling="pops"))
    [naive] = learned_coders(model, LearnedOptions(plan, tiling="naive"))
    return pops, naive


def _record(original: torch.Tensor, coded: Coded, **extra) -> dict:
    height, width = original.shape[1:]
    return {
        "bpp": bits_per_pixel(int(round(coded.bits / 8)), height, width),
        **image_metrics(original, coded.reconstruction),
        "encoding_time": coded.encoding_time,
        "decoding_time": coded.decoding_time,
        **extra,
    }


def _mean(records: List[dict]) -> dict:
    """Each metric averaged over the demo images."""
    return {
        key: mean_over_images([record.get(key) for record in records], key, "demo")
        for key in METRIC_KEYS
    }


def _crop_window(height: int, width: int, tile: int, side: int):
    """(top, left) of a ``side`` x ``side`` window centred on the tile corner nearest
    the image centre, where naive tiling shows its seams."""
    corner_y = max(tile, round(height / 2 / tile) * tile)
    corner_x = max(tile, round(width / 2 / tile) * tile)
    top = min(max(corner_y - side // 2, 0), height - side)
    left = min(max(corner_x - side // 2, 0), width - side)
    return top, left


def _write_crops(panels: List[tuple], output: str, tile: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.figures import save_figure

    height, width = panels[0][1].shape[1:]
    side = min(128, height, width)
    top, left = _crop_window(height, width, tile, side)
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for axis, (title, picture) in zip(axes, panels):
        crop = picture[:, top : top + side, left : left + side].permute(1, 2, 0).numpy()
        axis.imshow(crop, interpolation="nearest")
        axis.set_title(title, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    save_figure(
        figure,
        output,
        f"{side}x{side} crop at ({top}, {left}), tile corner near the centre",
    )


def _format_table(rows: List[tuple]) -> str:
    header = ("method", "bpp", "PSNR dB", "MS-SSIM", "PSNR-B dB", "enc s", "dec s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, mean in rows:
        cells = [label]
        for key, digits in zip(METRIC_KEYS, (3, 2, 4, 2, 2, 2)):
            value = mean.get(key)
            cells.append("-" if value is None else f"{value:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(
    model_paths: Sequence[str] = (),
    image_names: Sequence[str] = tuple(DEMO_IMAGES),
    output_dir: str = DEMO_OUTPUT,
    device: torch.device = _CPU,
    patch_size: int = 128,
    log: Callable[[str], None] = print,
    force: bool = False,
) -> dict:
    """Run the demo; return the results document (also written to ``results.json``).
    ``force`` writes over the files of an earlier demo in ``output_dir``.

    Every input is checked, and every model loaded, before the first image is coded;
    ``output_dir`` is created only then, and removed again by a run that fails before
    writing a file in it, so a refused run leaves no empty folder.
    """
    if not output_dir:
        raise ValueError(
            "-d/--output-dir is empty: name the folder for the demo's files"
        )
    results_path, rd_path, crops_path = (
        os.path.join(output_dir, name) for name in OUTPUT_FILES
    )
    refuse_existing_outputs([results_path, rd_path, crops_path], force)
    check_output_folder(output_dir, "-d")
    shipped = find_shipped_models(model_paths)
    images = {name: demo_image(name) for name in image_names}
    largest_side = max(max(image.shape[1:]) for image in images.values())
    coders = [
        _demo_coders(model_info, device, patch_size, largest_side)
        for model_info in shipped
    ]
    jpeg = get_codec("jpeg")
    jpeg.check_available()
    with output_folder(output_dir, "-d"):  # a failure before any file removes it
        return _code_and_write(
            shipped,
            coders,
            images,
            jpeg,
            patch_size,
            log,
            (results_path, rd_path, crops_path),
        )


def _code_and_write(shipped, coders, images, jpeg, patch_size, log, outputs) -> dict:
    """The demo once every input has passed its checks: code, measure, write
    ``outputs`` (results, RD plot, crops) and return the results document."""
    results_path, rd_path, crops_path = outputs
    jpeg_records = {q: [] for q in JPEG_QUALITIES}
    jpeg_pictures = {}
    for name, image in images.items():
        for quality in JPEG_QUALITIES:
            coded = ClassicalCoder(jpeg, quality).code(image)
            jpeg_records[quality].append(
                _record(image, coded, image=name, quality=quality)
            )
            jpeg_pictures[name, quality] = coded.reconstruction

    document = {
        "images": list(images),
        "patch_size": patch_size,
        "models": [],
        "jpeg": {"per_quality": {str(q): _mean(r) for q, r in jpeg_records.items()}},
    }
    rows, crops = [], None
    cps_curve, naive_curve = {"bpp": [], "metrics": {}}, {"bpp": [], "metrics": {}}
    for model_info, (pops, naive) in zip(shipped, coders):
        log(f"{model_info.label}: {model_info.path}")
        per_image = {"cps": [], "naive": [], "jpeg": []}
        for number, (name, image) in enumerate(images.items(), 1):
            cps_coded, naive_coded = pops.code(image), naive.code(image)
            log(
                f"  {model_info.label}: image {number}/{len(images)} ({name}) "
                f"coded with POPS and naive tiles"
            )
            per_image["cps"].append(_record(image, cps_coded, image=name))
            per_image["naive"].append(_record(image, naive_coded, image=name))
            target = per_image["cps"][-1]["bpp"]
            match = min(
                (
                    records[len(per_image["cps"]) - 1]
                    for records in jpeg_records.values()
                ),
                key=lambda r: abs(r["bpp"] - target),
            )
            per_image["jpeg"].append(match)
            if crops is None:  # lowest-rate model, first image
                crops = [
                    ("original", image),
                    (
                        f"CPS (POPS) {per_image['cps'][-1]['bpp']:.2f} bpp",
                        cps_coded.reconstruction,
                    ),
                    (
                        f"naive tiles {per_image['naive'][-1]['bpp']:.2f} bpp",
                        naive_coded.reconstruction,
                    ),
                    (
                        f"JPEG q{match['quality']} {match['bpp']:.2f} bpp",
                        jpeg_pictures[name, match["quality"]],
                    ),
                ]
        means = {kind: _mean(records) for kind, records in per_image.items()}
        rows += [
            (f"{model_info.label} (POPS, P={patch_size})", means["cps"]),
            (f"{model_info.label} naive {patch_size}px tiles", means["naive"]),
            (f"JPEG at the size of {model_info.label}", means["jpeg"]),
        ]
        for curve, kind in ((cps_curve, "cps"), (naive_curve, "naive")):
            curve["bpp"].append(means[kind]["bpp"])
            for metric in ("psnr-rgb", "ms-ssim-rgb", "psnr-b"):
                curve["metrics"].setdefault(metric, []).append(means[kind][metric])
        document["models"].append(
            {
                "path": os.path.relpath(model_info.path, REPO_ROOT),
                "lmbda": model_info.lmbda,
                "mean": means,
                "per_image": per_image,
            }
        )

    jpeg_means = [document["jpeg"]["per_quality"][str(q)] for q in JPEG_QUALITIES]
    curves = [
        Curve(f"CPS, POPS P={patch_size}", cps_curve["bpp"], cps_curve["metrics"]),
        Curve(
            f"CPS, naive {patch_size}px tiles",
            naive_curve["bpp"],
            naive_curve["metrics"],
        ),
        Curve(
            "JPEG (Pillow, 4:2:0)",
            [m["bpp"] for m in jpeg_means],
            {
                k: [m[k] for m in jpeg_means]
                for k in ("psnr-rgb", "ms-ssim-rgb", "psnr-b")
            },
        ),
    ]
    plot_curves(curves, rd_path, title=f"demo: {len(images)} scikit-image photographs")
    _write_crops(crops, crops_path, patch_size)
    table = _format_table(rows)
    document["table"] = table
    atomic_write_json(results_path, document, indent=1)
    return document
