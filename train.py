"""Rate-distortion training of a registered model (CPS, baselines) from a YAML config.

Single process (GPU or CPU)::

    python train.py --config configs/cps_1_lambda00018.yaml
    python train.py --config configs/cps_1_lambda00018.yaml \\
        --set train_params.lmbda=0.025

Several GPUs (DistributedDataParallel, one process per GPU)::

    torchrun --nproc_per_node=4 train.py --config configs/cps_1_lambda00018.yaml

Resume exactly where a run stopped: the checkpoint alone restores the resolved
config stored in it (``--config``/``--set`` given again override it, and each
difference is printed), or ``--resume`` without a path takes
``experiment_path/checkpoint.pth.tar`` of ``--config``. The run goes on in the
folder that holds the checkpoint (``--set train_data.experiment_path=...`` names
another). Or start a new run from
another run's weights (fine-tuning to a new lambda; optimizers and step start
afresh)::

    python train.py --resume experiment/cps_lambda00018_v4/checkpoint.pth.tar
    python train.py --config configs/cps_1_lambda00018.yaml --resume
    python train.py --config configs/cps_2_lambda00035.yaml \\
        --init-from experiment/cps_lambda00018_v4/checkpoint_best_loss.pth.tar

Every config key: ``docs/training.md`` (``utils/training/schema.py``); the loop:
``utils/training/loop.py``.
"""

import argparse
import os
import sys
import traceback
import warnings

# CompressAI wraps helpers in torch.jit.script, which PyTorch deprecates: a warning at
# every start that users cannot act on.
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

from utils.cli import REPORTED_ERRORS, outputs_gone, report_error, run_main
from utils.training.config import LAST_NAME, load_config, parse_config, to_plain_dict


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config",
        help="YAML experiment config (optional with "
        "--resume CHECKPOINT: the stored config is used)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="BLOCK.KEY=VALUE",
        help="override config keys, e.g. train_params.lmbda=0.025 "
        "train_data.batch_size=4 (several per --set, and --set may "
        "repeat, each key once; each value is parsed as YAML)",
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CHECKPOINT",
        help="continue a run exactly, in the folder of CHECKPOINT and with the "
        "config stored in it (default: experiment_path/" + LAST_NAME + " of --config)",
    )
    start.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="start a new run from these weights (fine-tuning)",
    )
    args = parser.parse_args(argv)
    if args.config is None and not args.resume:
        parser.error("--config is required, unless --resume names a checkpoint")
    return args


def problems_of_the_model(cfg) -> list:
    """:func:`utils.training.build.model_problems`, when the keys the model is
    built from are valid. While one of them is refused (and reported), the model is
    not checked, and the config's problems come back before PyTorch is imported."""
    model, params = cfg.get("model", {}), cfg.get("train_params", {})
    if not ("name" in model and "kwargs" in model and "N" in params):
        return []
    from utils.training.build import model_problems

    return model_problems(cfg)


def resolve_config(args):
    """The validated config with ``--resume``/``--init-from`` folded in.

    ``--resume CHECKPOINT`` without ``--config`` starts from the resolved config
    stored in the checkpoint; ``--set`` overrides apply on top of either. A resumed
    run writes to the folder that holds its checkpoint, unless ``--set
    train_data.experiment_path=...`` names another. The model the config names is
    checked with it (:func:`problems_of_the_model`), before any image is read, and
    its problems are reported with the config's.
    """
    if args.config is None:
        from utils.training.state_loading import (  # reads a PyTorch checkpoint
            stored_config,
        )

        path = os.path.abspath(args.resume)
        cfg = load_config(
            None,
            args.overrides,
            base=stored_config(path),
            source=f"{path} (stored config)",
            checks=[problems_of_the_model],
        )
    else:
        cfg = load_config(args.config, args.overrides, checks=[problems_of_the_model])
    if args.resume is None and args.init_from is None:
        return cfg
    raw = to_plain_dict(cfg)
    if args.resume is not None:
        checkpoint = os.path.abspath(
            args.resume or os.path.join(cfg.train_data.experiment_path, LAST_NAME)
        )
        raw["train_data"]["use_checkpoint_path"] = checkpoint
        raw["train_data"]["init_checkpoint_path"] = ""
        if EXPERIMENT_KEY not in _overridden_keys(args.overrides):
            # The run goes on where its checkpoint is: the experiment_path stored in it
            # is where it was written, a folder that may since have been moved, or the
            # original of a copy, whose checkpoints the resume would overwrite.
            raw["train_data"]["experiment_path"] = os.path.dirname(checkpoint)
    else:
        raw["train_data"]["init_checkpoint_path"] = os.path.abspath(args.init_from)
        raw["train_data"]["use_checkpoint_path"] = ""
    return parse_config(raw, source=args.config or args.resume)


EXPERIMENT_KEY = "train_data.experiment_path"


def _overridden_keys(overrides) -> set:
    """The ``block.key`` names that ``--set`` assigns."""
    return {assignment.partition("=")[0].strip() for assignment in overrides}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def use_cuda(cfg) -> bool:
    """``train_data.cuda``, or the CPU with a warning if this machine has no CUDA.

    The paper configs say ``cuda: true``; on a CPU-only machine they still run as
    written (slowly), and the stored config keeps ``cuda: true`` for the next resume.
    """
    import torch

    if cfg.train_data.cuda and not torch.cuda.is_available():
        if os.environ.get("RANK") in (None, "0"):
            _log(
                "train.py: warning: train_data.cuda is true but CUDA is not "
                "available on this machine; training on the CPU"
            )
        return False
    return cfg.train_data.cuda


def _run_acl(cfg, cuda: bool) -> int:
    """Asymptotic closed-loop training (single process, utils/training/acl.py)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "train_params.training_mode=acl runs in one process; start it "
            "with python, not torchrun"
        )
    from utils.device import select_device
    from utils.training.acl_run import run_acl

    run_acl(cfg, select_device(cuda), _log)
    return 0


def main(argv=None) -> int:
    """Train; the exit status. Errors are one line with status 1; Ctrl-C (before the
    loop handles it) is status 130 and a log reader that went away (``2>&1 | head``)
    status 141, quietly (:func:`utils.cli.run_main`)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_main(lambda: _train(args), "train.py")


def _train(args) -> int:
    try:
        cfg = resolve_config(args)
        cuda = use_cuda(cfg)
        if cfg.train_params.training_mode == "acl":
            return _run_acl(cfg, cuda)
        from utils.training import distributed
        from utils.training.loop import Trainer

        ctx = distributed.init_distributed(cuda)
        try:
            status = Trainer(cfg, ctx).fit()
            # Every rank finishes before the group is torn down: a gloo rank whose peer
            # has already left can abort in its teardown ("terminate called without an
            # active exception"), failing a run that completed.
            ctx.barrier()
            return status
        finally:
            distributed.cleanup()
    except BaseException as exc:
        # An error re-raised from a DataLoader worker is in a reference cycle
        # (PyTorch's reraise frame holds it) that kept the loader's iterator alive:
        # its workers were left to the garbage collector, which may close the
        # iterator's queues before telling the workers to stop, or to the
        # interpreter's exit, which waited for them forever. Clearing the finished
        # frames (their locals; a traceback still prints) frees the iterator, and it
        # stops its workers, whatever the error.
        traceback.clear_frames(exc.__traceback__)
        if isinstance(exc, BrokenPipeError) and outputs_gone():
            raise  # the log's reader left: run_main ends the run quietly
        if isinstance(exc, REPORTED_ERRORS):  # a broken pipe here is a worker's
            return report_error("train.py", exc)
        raise


if __name__ == "__main__":
    sys.exit(main())
