"""Training throughput (images/s) of train.py's step vs a CompressAI-example loop.

    python benchmarks/train_throughput.py [--cuda] [--batch-size 8] [--crop 256]
        [--N 192] [--steps 30] [--warmup 5] [--repeats 3] [-o FILE | --publish]

Both loops train the same CPS model (same initial weights, same batch) with
CompressAI's ``RateDistortionLoss``, Adam, gradient clipping at 1.0 and a separate
auxiliary optimizer:

* ``compressai_example``: the body of CompressAI's ``examples/train.py``
  ``train_one_epoch`` written out (zero_grad, forward, loss, backward, clip, step,
  aux_loss backward, aux step), with the example's optimizers (unfused Adam);
* ``train_py``: :class:`utils.training.step.TrainStep` as ``train.py`` runs it:
  per-step RNG seeding, fused Adam that skips a non-finite step on the device,
  clipping of the network's parameters only, and each step's statistics read back
  after the next step is launched (the CPU never waits for the GPU); on CUDA also
  with channels_last, with bfloat16 autocast, and with both
  (``train_py_channels_last``, ``train_py_bf16``, ``train_py_bf16_channels_last``),
  so that each option's share of the speed-up is visible, and replayed as a CUDA
  graph in float32 and with both options (``train_py_cuda_graph``,
  ``train_py_bf16_channels_last_cuda_graph``);
* on CUDA, ``compressai_example_host_read``: the example loop reading its loss back
  to the CPU after clipping, before the optimizers step, which makes the CPU wait
  for the GPU once per step instead of queueing step k+1 while the GPU runs step k.
  It shows what such a wait costs (``train.py`` read its statistics there until its
  steps were split in a launch and a deferred finish).

The batch is a fixed random tensor already on the device, so the figures measure
the optimisation step, not JPEG decoding (train.py overlaps that with DataLoader
workers). Each loop also reports the ATen operators one step dispatches: on a GPU
nearly each is a kernel launch, which is what a small-batch step is bound by. Note
that PyTorch's default Adam (the example's) runs one operator group per parameter on
the CPU but ``foreach`` kernels on CUDA, so the example's count depends on the
device. Each loop is timed ``--repeats`` times and the median is reported. The
defaults are batch 8, 256x256 crops (the paper's crop size, Sec. III-A) and N = 192.
"""

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import warnings

# CompressAI, imported here before `models` filters it, wraps helpers in
# torch.jit.script, which PyTorch deprecates: a warning nobody running this can act on.
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

import torch
from compressai.losses import RateDistortionLoss
from compressai.optimizers import net_aux_optimizer
from torch.utils._python_dispatch import TorchDispatchMode

import models
from benchmarks.results_io import (
    parse_with_output,
    refuse_missing_cuda,
    save_results,
)
from utils.cli import run_main
from utils.training.optimizers import build_optimizers
from utils.training.step import TrainStep


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cuda", action="store_true", help="run on the current CUDA device"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--crop", type=int, default=256, help="square crop side (pixels)"
    )
    parser.add_argument("--N", type=int, default=192, help="CPS width")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per loop")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timings per loop (median)"
    )
    parser.add_argument("--lmbda", type=float, default=0.0035)
    args = parse_with_output(parser, argv, "train_throughput.json")
    for name in ("batch_size", "crop", "N", "steps", "repeats"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if not 0 < args.lmbda < math.inf:
        # nan made every step non-finite: train_py skipped them all, and was timed.
        parser.error(f"--lmbda must be a positive number, got {args.lmbda}")
    multiple = models.build_model("cps", N=1).downsampling_factor  # the same at every N
    if args.crop % multiple:
        parser.error(
            f"--crop {args.crop} must be a multiple of {multiple} (the CPS "
            "downsampling)"
        )
    refuse_missing_cuda(parser, args)
    return args


def compressai_example_step(
    model, criterion, optimizer, aux_optimizer, clip_max_norm, read_loss=False
):
    """``step(x, i)``: one iteration of CompressAI's example training loop.

    The iteration runs on batch ``x``; with ``read_loss`` it also reads the loss
    back to the CPU before the optimizer steps, as ``train_py`` reads its
    statistics there (the same updates, one wait for the GPU per step).
    """

    def step(x, _):
        optimizer.zero_grad()
        aux_optimizer.zero_grad()
        out_criterion = criterion(model(x), x)
        out_criterion["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        if read_loss:
            float(out_criterion["loss"].detach())
        optimizer.step()
        aux_loss = model.aux_loss()
        aux_loss.backward()
        aux_optimizer.step()

    return step


def example_optimizers(model, lr, aux_lr):
    """The optimizers of CompressAI's example: Adam as PyTorch defaults it."""
    conf = {"net": {"type": "Adam", "lr": lr}, "aux": {"type": "Adam", "lr": aux_lr}}
    optimizers = net_aux_optimizer(model, conf)
    return optimizers["net"], optimizers["aux"]


def _loops(base, device, lmbda):
    """Yield ``(name, model, step(x, i))`` per loop; every model starts as ``base``.

    A generator, so that only one loop's model and optimizer state is alive at once.
    """
    variants = [("compressai_example", {}), ("train_py", {})]
    if device.type == "cuda":  # each option alone too, to see which one pays
        both = {"amp": True, "channels_last": True}
        variants += [
            ("compressai_example_host_read", {"read_loss": True}),
            ("train_py_channels_last", {"channels_last": True}),
            ("train_py_bf16", {"amp": True}),
            ("train_py_bf16_channels_last", both),
            ("train_py_cuda_graph", {"cuda_graph": True}),
            ("train_py_bf16_channels_last_cuda_graph", {**both, "cuda_graph": True}),
        ]
    for name, options in variants:
        model = copy.deepcopy(base).to(device).train()
        if options.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        criterion = RateDistortionLoss(lmbda)
        if name.startswith("compressai_example"):
            optimizer, aux_optimizer = example_optimizers(model, 1e-4, 1e-3)
            step = compressai_example_step(
                model, criterion, optimizer, aux_optimizer, 1.0, **options
            )
        else:
            optimizer, aux_optimizer = build_optimizers(model, 1e-4, 1e-3)
            step = TrainStep(
                model,
                model,
                criterion,
                optimizer,
                aux_optimizer,
                clip_max_norm=1.0,
                **options,
            )
        yield name, model, step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it, views excluded.

    On a GPU nearly every such operator is one kernel launch, so the count is what a
    launch-bound step pays for, measured without timing noise and on any device.
    """

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def measure(step, x, device, steps, warmup, repeats):
    """Median images/s and ms/step of ``step``, and its operators per step.

    Taken over ``repeats`` runs of ``steps`` calls. A :class:`TrainStep` runs as
    ``train.py`` runs it: each call launches a step and reads the one before, and
    the last is read before the clock stops. One more call, after the timed ones,
    counts the operators (:class:`OperatorCount`).
    """
    train_step = step if isinstance(step, TrainStep) else None
    call = step.launch if train_step else step
    last = None

    def run(first: int, count: int):
        nonlocal last
        for i in range(first, first + count):
            call(x, i)
        if train_step:
            last = train_step.finish()
        _sync(device)

    run(0, warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = []
    for r in range(repeats):
        start = time.perf_counter()
        run(warmup + r * steps, steps)
        timings.append(time.perf_counter() - start)
    seconds = statistics.median(timings)
    counter = OperatorCount()
    with counter:
        call(x, warmup + repeats * steps)
    if train_step:
        train_step.finish()
    result = {
        "images_per_s": steps * x.shape[0] / seconds,
        "ms_per_step": 1e3 * seconds / steps,
        "ms_per_step_runs": [round(1e3 * t / steps, 2) for t in timings],
        "operators_per_step": counter.count,
    }
    # Same weights, batch and seeds: comparable across loops.
    if train_step:
        result.update(final_loss=last["loss"], graph_replayed=step.graph_captured)
    if device.type == "cuda":
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device("cuda" if args.cuda else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    base = models.build_model("cps", N=args.N)
    x = torch.rand(args.batch_size, 3, args.crop, args.crop, device=device)
    rows = []
    for name, model, step in _loops(base, device, args.lmbda):
        rows.append(
            {
                "loop": name,
                **measure(step, x, device, args.steps, args.warmup, args.repeats),
            }
        )
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()

    reference = rows[0]["images_per_s"]
    where = (
        torch.cuda.get_device_name(device)
        if args.cuda
        else platform.processor() or "cpu"
    )
    record = {
        "benchmark": "train_throughput",
        "settings": {
            "batch_size": args.batch_size,
            "crop": args.crop,
            "N": args.N,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "lmbda": args.lmbda,
        },
        "device": where,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "torch": torch.__version__,
        "results": rows,
    }
    save_results(args.output, record)  # before the table: a reader may leave
    print(
        f"batch {args.batch_size}, crop {args.crop}, N {args.N}, "
        f"{args.steps} timed steps x {args.repeats} on {where}"
    )
    print(
        f"{'loop':<30}{'images/s':>10}{'ms/step':>10}{'vs example':>12}"
        f"{'operators':>11}"
    )
    for row in rows:
        print(
            f"{row['loop']:<30}{row['images_per_s']:>10.2f}{row['ms_per_step']:>10.1f}"
            f"{row['images_per_s'] / reference:>11.2f}x"
            f"{row['operators_per_step']:>11}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "train_throughput.py"))
