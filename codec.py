"""Compress one image to a ``.cps`` file, or decompress one, with a CPS checkpoint.

    python codec.py encode IN.png OUT.cps -p CKPT [--max-memory 2GB] [--patch-size P] [--cuda]
    python codec.py decode IN.cps OUT.png -p CKPT [--max-memory 2GB] [--patch-size P] [--cuda]

``--max-memory`` bounds the peak memory of the whole process (RSS; CUDA allocated
memory with ``--cuda``): the transforms then run on the POPS patches that fit and
recompute the least overlap, the whole image when it fits. A budget that cannot be met is an
error before any work is done. The decoded image does not depend on the budget.

Layered models (``mei2021-quality``, ``mei2021-spatial``) write a ``.cpsl`` container
with one stream per layer instead; ``--layers K`` keeps (encode) or decodes (decode)
only the first K layers, and the decoder outputs layer K's reconstruction.

Prints the rate computed from the file size (header included) and the times. Any
bad input ends with one line on stderr and exit status 1.
"""

import argparse
import os
import sys
import time
import warnings
from typing import List, Optional

# CompressAI wraps helpers in torch.jit.script, which PyTorch deprecates: a warning at
# every start that users cannot act on.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)

import torch

import models
from models.mei2021.coding import MAGIC as LAYERED_MAGIC
from models.mei2021.coding import (decode_layers, encode_layers, pack_layers, truncate_layers,
                                   unpack_layers)
from utils.atomic import atomic_write_bytes
from utils.coding.container import pack, unpack
from models.cps.coding import decode_image, encode_image, model_device
from utils.device import select_device
from utils.image_io import read_image, write_png
from utils.coding.context_coder import ORDERS
from utils.memory import DEFAULT_BUDGET, format_memory, parse_memory, proc_status_kb


def _memory_size(text: str) -> Optional[int]:
    """``--max-memory``: bytes, or None for ``none`` (no budget)."""
    if text.strip().lower() == "none":
        return None
    try:
        return parse_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, source, target in (("encode", "image to compress (PNG, JPEG, ...)", "output .cps file"),
                                 ("decode", ".cps file", "output PNG")):
        command = commands.add_parser(name)
        command.add_argument("input", help=source)
        command.add_argument("output", help=target)
        command.add_argument("-p", "--checkpoint", required=True, help="model checkpoint (.pth.tar)")
        command.add_argument("-a", "--architecture", default=None,
                             help="architecture name when the checkpoint does not say (default: cps)")
        command.add_argument("--max-memory", type=_memory_size, default=DEFAULT_BUDGET,
                             help="peak memory of the process, e.g. 1GB or 800MB, or none "
                                  "(default: %(default)s)")
        command.add_argument("--patch-size", type=int, default=None,
                             help="POPS patch side in pixels, a multiple of 16, or 0 for the whole "
                                  "image (default: the patches that fit --max-memory with the least overlap)")
        command.add_argument("--batch-size", type=int, default=8,
                             help="most patches per forward pass (default: %(default)s)")
        command.add_argument("--cuda", action="store_true", help="run the transforms on the GPU")
        command.add_argument("--fast", action="store_true",
                             help="CPU: use oneDNN convolutions (faster; patch-wise results then equal "
                                  "whole-image ones to float rounding instead of bit for bit)")
        command.add_argument("--layers", type=int, default=0,
                             help="layered models: keep / decode the first K layers (0: all)")
    commands.choices["encode"].add_argument("--entropy-coder-order", choices=ORDERS, default="wavefront")
    args = parser.parse_args(argv)
    if args.layers < 0:
        parser.error(f"--layers must be >= 0, got {args.layers}")
    return args


def _check_layers(args: argparse.Namespace, model: torch.nn.Module) -> None:
    if args.layers and not hasattr(model, "num_layers"):
        raise ValueError(f"--layers needs a layered model (mei2021-*), not "
                         f"{getattr(model, 'registry_name', type(model).__name__)}")


def encode_layered(args: argparse.Namespace, model: torch.nn.Module, image: torch.Tensor) -> str:
    """One stream per layer in a ``.cpsl`` container, cut to ``--layers`` if given."""
    start = time.perf_counter()
    data = pack_layers(model, encode_layers(model, image.to(model_device(model))))
    if args.layers:
        data = truncate_layers(data, args.layers)
    seconds = time.perf_counter() - start
    atomic_write_bytes(args.output, data)
    pixels = image.shape[1] * image.shape[2]
    kept = args.layers or model.num_layers
    return (f"{args.output}: {len(data)} bytes ({kept} of {model.num_layers} layers), "
            f"{len(data) * 8 / pixels:.4f} bpp over the full-resolution pixels, "
            f"encoded in {seconds:.2f} s")


def decode_layered(args: argparse.Namespace, model: torch.nn.Module, data: bytes) -> str:
    """Layer ``--layers`` (default: the last one stored) of a ``.cpsl`` container."""
    layered = unpack_layers(data)
    stored = len(layered.streams)
    if args.layers > stored:
        raise ValueError(f"{args.input} holds {stored} layers; cannot decode layer {args.layers}")
    start = time.perf_counter()
    image = decode_layers(model, layered, upto=args.layers or stored)[-1]
    seconds = time.perf_counter() - start
    write_png(args.output, image)
    return (f"{args.output}: layer {args.layers or stored} of {stored}, "
            f"{image.shape[2]}x{image.shape[1]}, decoded in {seconds:.2f} s")


def encode(args: argparse.Namespace, model: torch.nn.Module) -> str:
    image, info = read_image(args.input)
    for change in info.conversions:
        print(f"warning: {args.input}: {change}", file=sys.stderr)
    if hasattr(model, "num_layers"):
        return encode_layered(args, model, image)
    start = time.perf_counter()
    compressed = encode_image(model, image, args.patch_size, args.batch_size,
                              order=args.entropy_coder_order, exact=not args.fast,
                              grayscale=info.grayscale, max_memory=args.max_memory)
    data = pack(compressed)
    seconds = time.perf_counter() - start
    atomic_write_bytes(args.output, data)
    pixels = compressed.height * compressed.width
    return (f"{args.output}: {len(data)} bytes, {len(data) * 8 / pixels:.4f} bpp "
            f"(estimate {compressed.estimated_bits / pixels:.4f}), encoded in {seconds:.2f} s"
            f"{_peak_note(args)}")


def decode(args: argparse.Namespace, model: torch.nn.Module) -> str:
    if not os.path.isfile(args.input):
        raise ValueError(f"file not found: {args.input}")
    with open(args.input, "rb") as handle:
        data = handle.read()
    if data[:len(LAYERED_MAGIC)] == LAYERED_MAGIC:
        return decode_layered(args, model, data)
    start = time.perf_counter()
    compressed = unpack(data)
    image = decode_image(model, compressed, args.patch_size, args.batch_size, exact=not args.fast,
                         max_memory=args.max_memory)
    seconds = time.perf_counter() - start
    write_png(args.output, image)
    pixels = compressed.height * compressed.width
    return (f"{args.output}: {compressed.width}x{compressed.height}, {len(data) * 8 / pixels:.4f} bpp, "
            f"decoded in {seconds:.2f} s{_peak_note(args)}")


def _peak_note(args: argparse.Namespace) -> str:
    """The process's peak memory so far, against the budget, where it can be read."""
    if args.cuda and torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    elif proc_status_kb("VmHWM") is not None:
        peak = proc_status_kb("VmHWM") * 1024
    else:
        return ""
    budget = format_memory(args.max_memory) if args.max_memory else "none"
    return f", peak memory {format_memory(peak)} (budget {budget})"


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        device = select_device(args.cuda)
        model = models.load_checkpoint(args.checkpoint, device, args.architecture)
        _check_layers(args, model)
        print((encode if args.command == "encode" else decode)(args, model))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
