"""Compress one image to a ``.cps`` file, or decompress one, with a CPS checkpoint.

    python codec.py encode IN.png OUT.cps -p CKPT [--patch-size P] [--cuda]
    python codec.py decode IN.cps OUT.png -p CKPT [--patch-size P] [--cuda]

Prints the rate computed from the file size (header included) and the times. Any
bad input ends with one line on stderr and exit status 1.
"""

import argparse
import os
import sys
import time
from typing import List, Optional

import torch

import models
from utils.atomic import atomic_write_bytes
from utils.bitstream import pack, unpack
from utils.codec import decode_image, encode_image
from utils.device import select_device
from utils.image_io import read_image, write_png
from utils.latent_coding import ORDERS


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
        command.add_argument("--patch-size", type=int, default=256,
                             help="POPS patch side in pixels, a multiple of 16 (0: whole image)")
        command.add_argument("--batch-size", type=int, default=8, help="patches per forward pass")
        command.add_argument("--cuda", action="store_true", help="run the transforms on the GPU")
        command.add_argument("--fast", action="store_true",
                             help="CPU: use oneDNN convolutions (faster; patch-wise results then equal "
                                  "whole-image ones to float rounding instead of bit for bit)")
    commands.choices["encode"].add_argument("--entropy-coder-order", choices=ORDERS, default="wavefront")
    return parser.parse_args(argv)


def encode(args: argparse.Namespace, model: torch.nn.Module) -> str:
    image, info = read_image(args.input)
    for change in info.conversions:
        print(f"warning: {args.input}: {change}", file=sys.stderr)
    start = time.perf_counter()
    compressed = encode_image(model, image, args.patch_size, args.batch_size,
                              order=args.entropy_coder_order, exact=not args.fast,
                              grayscale=info.grayscale)
    data = pack(compressed)
    seconds = time.perf_counter() - start
    atomic_write_bytes(args.output, data)
    pixels = compressed.height * compressed.width
    return (f"{args.output}: {len(data)} bytes, {len(data) * 8 / pixels:.4f} bpp "
            f"(estimate {compressed.estimated_bits / pixels:.4f}), encoded in {seconds:.2f} s")


def decode(args: argparse.Namespace, model: torch.nn.Module) -> str:
    if not os.path.isfile(args.input):
        raise ValueError(f"file not found: {args.input}")
    with open(args.input, "rb") as handle:
        data = handle.read()
    start = time.perf_counter()
    compressed = unpack(data)
    image = decode_image(model, compressed, args.patch_size, args.batch_size, exact=not args.fast)
    seconds = time.perf_counter() - start
    write_png(args.output, image)
    pixels = compressed.height * compressed.width
    return (f"{args.output}: {compressed.width}x{compressed.height}, {len(data) * 8 / pixels:.4f} bpp, "
            f"decoded in {seconds:.2f} s")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        device = select_device(args.cuda)
        model = models.load_checkpoint(args.checkpoint, device, args.architecture)
        print((encode if args.command == "encode" else decode)(args, model))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
