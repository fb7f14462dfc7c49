"""Time the Kamisli (2024) codec: wavefront decoding against block-by-block decoding.

The published codec decodes one block per step, (H/B)*(W/B) steps (6144 for a Kodak
image at B = 8). ``models/kamisli2024/coding.py`` decodes one skewed wavefront per step,
``a*(H/B - 1) + W/B`` steps with the slope ``a`` the masks imply (222 for Kodak at
B = 8). Both orders run the same code, so this measures the schedule alone, and the
script checks that both reconstruct the image bit for bit identically.

The model of a preset config has random weights unless ``--checkpoint`` is given;
its scale predictions are then spread over the scale table (a log-uniform scale per
latent channel between 0.11 and 16, through the last layer's bias) and its latents
stretched, so that symbols and CDF rows look like a trained model's. Network time
does not depend on the weights.

Block-by-block coding of a whole image takes minutes per preset on a small CPU;
``--reference-rows`` limits it to the first block rows (its time per block does not
depend on the image size) and extrapolates; the table marks such times with ``*``.

Usage::

    python benchmarks/kamisli_decoding.py                 # B8 low-rate preset, 768x512
    python benchmarks/kamisli_decoding.py --config configs/kamisli_*.yaml
        --reference-rows 8
"""

import argparse
import math
import os
import platform
import sys
import time
from typing import Dict, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models
from benchmarks.memory_scaling import parse_size
from benchmarks.results_io import parse_with_output, refuse_repeats
from models.kamisli2024.coding import BlockCoder
from models.kamisli2024.layers import to_blocks
from utils.atomic import save_json
from utils.cli import run_main
from utils.training.build import build_configured_model
from utils.training.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "kamisli_B8_KS3111_N768M96.yaml")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config",
        nargs="+",
        default=[DEFAULT_CONFIG],
        help="kamisli_*.yaml presets, timed one after the other",
    )
    parser.add_argument(
        "--checkpoint",
        help="trained weights instead of random ones (one --config only)",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default="768x512",
        help="image WIDTHxHEIGHT (default: Kodak)",
    )
    parser.add_argument(
        "--reference-rows",
        type=int,
        default=0,
        help="code only this many block rows block by block and extrapolate "
        "(0: the whole image)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parse_with_output(parser, argv, "kamisli_decoding.json")
    refuse_repeats(parser, args, "--config")
    args.width, args.height = args.size
    if args.reference_rows < 0:
        parser.error("--reference-rows must be >= 0")
    if args.checkpoint and len(args.config) > 1:
        parser.error("--checkpoint goes with a single --config")
    try:
        args.presets = {config: kamisli_config(config) for config in args.config}
    except (ValueError, OSError) as exc:
        parser.error(f"--config: {exc}")
    return args


def kamisli_config(path: str) -> dict:
    """The validated config at ``path``, checked to build a Kamisli model; read when
    parsing, so that a bad one stops the run before the presets ahead of it.

    Raises:
        ValueError: the config is invalid or names another architecture.
        OSError: it cannot be read.
    """
    cfg = load_config(path)
    name = cfg["model"]["name"]
    if models.get_model_class(name) is not models.get_model_class("kamisli2024"):
        raise ValueError(
            f"{path} configures a {name} model, not a Kamisli one: give a "
            "configs/kamisli_*.yaml preset"
        )
    return cfg


def build_model(args, config: str) -> torch.nn.Module:
    """The preset's model: trained weights, or random ones with realistic symbols."""
    if args.checkpoint:
        return models.load_checkpoint(
            args.checkpoint, "cpu", architecture="kamisli2024"
        )
    torch.manual_seed(args.seed)
    model = build_configured_model(args.presets[config]).eval()
    with torch.no_grad():
        last = model.entropy_parameters[-1]
        last.weight.mul_(0.01)
        log_scales = torch.empty(model.M).uniform_(math.log(0.11), math.log(16.0))
        last.bias[: model.M] = log_scales.exp()
        model.g_a[-1].weight.mul_(10.0)
    model.update(force=True)
    return model


def test_image(width: int, height: int, seed: int) -> torch.Tensor:
    """A smooth random picture with texture, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(2, height // 64), max(2, width // 64), generator=g)
    smooth = torch.nn.functional.interpolate(
        low, size=(height, width), mode="bicubic", align_corners=False
    )
    return (smooth + 0.05 * torch.randn(1, 3, height, width, generator=g)).clamp(0, 1)


def time_order(model, blocks: torch.Tensor, order: str) -> Dict:
    coder = BlockCoder(model, order)
    rows, cols = blocks.shape[1:]
    start = time.perf_counter()
    string, y_hat, encoded, _ = coder.encode(blocks)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded_y, decoded = coder.decode(string, rows, cols)
    decode_s = time.perf_counter() - start
    if not (torch.equal(decoded, encoded) and torch.equal(decoded_y, y_hat)):
        raise RuntimeError(f"{order} decoder differs from its encoder")
    steps = sum(1 for _ in coder.fronts(rows, cols))
    return {
        "steps": steps,
        "blocks": rows * cols,
        "encode_s": encode_s,
        "decode_s": decode_s,
        "bytes": len(string),
        "reconstruction": decoded,
    }


def run(args, config: str) -> Dict:
    model = build_model(args, config)
    image = test_image(args.width, args.height, args.seed)
    blocks = to_blocks(model.pad_to_blocks(image) - 0.5, model.block_size)[0]
    rows, cols = blocks.shape[1:]
    wave = time_order(model, blocks, "wavefront")
    reference_rows = min(args.reference_rows or rows, rows)
    raster = time_order(model, blocks[:, :reference_rows].contiguous(), "raster")
    identical = torch.equal(
        raster.pop("reconstruction"), wave.pop("reconstruction")[:, :reference_rows]
    )
    if not identical:
        raise RuntimeError("wavefront and block-by-block reconstructions differ")
    scale = rows / reference_rows
    raster_full = {
        "steps": rows * cols,
        "blocks": rows * cols,
        "encode_s": raster["encode_s"] * scale,
        "decode_s": raster["decode_s"] * scale,
        "extrapolated_from_blocks": raster["blocks"] if scale > 1 else None,
    }
    return {
        "config": args.checkpoint or os.path.relpath(os.path.abspath(config), ROOT),
        "model": model.config,
        "image": f"{args.width}x{args.height}",
        "grid": [rows, cols],
        "wavefront_slope": model.wavefront_slope,
        "wavefront": wave,
        "block_by_block": raster_full,
        "decode_speedup": raster_full["decode_s"] / wave["decode_s"],
        "encode_speedup": raster_full["encode_s"] / wave["encode_s"],
        "reconstructions_identical": identical,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": 1,
            "load_average": os.getloadavg()[0],
            "torch": torch.__version__,
        },
    }


def format_table(result: Dict) -> str:
    star = "*" if result["block_by_block"]["extrapolated_from_blocks"] else ""
    grid = result["grid"]
    lines = [
        f"{result['config']}  {result['image']}  grid {grid[0]}x{grid[1]}  "
        f"slope {result['wavefront_slope']}",
        f"{'order':<15}{'steps':>8}{'encode s':>12}{'decode s':>12}",
    ]
    for name, key, mark in (
        ("block-by-block", "block_by_block", star),
        ("wavefront", "wavefront", ""),
    ):
        r = result[key]
        lines.append(
            f"{name:<15}{r['steps']:>8}{r['encode_s']:>11.2f}{mark or ' '}"
            f"{r['decode_s']:>11.2f}{mark or ' '}"
        )
    lines.append(
        f"speed-up: decode {result['decode_speedup']:.1f}x, encode "
        f"{result['encode_speedup']:.1f}x; reconstructions identical: "
        f"{result['reconstructions_identical']}"
    )
    if star:
        blocks = result["block_by_block"]["extrapolated_from_blocks"]
        lines.append(f"* extrapolated from {blocks} blocks")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = []
    try:
        for config in args.config:
            results.append(run(args, config))
            print(format_table(results[-1]) + "\n", flush=True)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"kamisli_decoding.py: error: {exc}", file=sys.stderr)
        return 1
    document = {
        "benchmark": "Kamisli 2024 codec, wavefront vs block-by-block, CPU, 1 thread",
        "runs": results,
    }
    save_json(args.output, document)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "kamisli_decoding.py"))
