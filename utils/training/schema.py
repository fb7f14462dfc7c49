"""Every key of a training config: its type, default, allowed range and meaning.

:data:`SCHEMA` maps ``block -> key -> _Key``. It is the single source of the
defaults and checks: :mod:`utils.training.config` validates files, ``--set``
overrides and the configs stored in checkpoints against it, and the training code
reads the validated values without checking them again. The ranges are wide enough
for every published setting and narrow enough to catch typos (``N: 1923`` for 192,
``crop_size: 64000``) and values that could not be stored (a seed beyond 64 bits).
"""

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

from PIL import Image

__all__ = ["SCHEMA", "REQUIRED", "INT64_MAX", "check_value", "unread_by_acl"]

REQUIRED = object()  # marks a key without a default
INT64_MAX = 2**63 - 1  # seeds and step counts are stored as 64-bit integers
# PIL refuses images above twice its MAX_IMAGE_PIXELS before their size can be checked.
PIL_PIXEL_LIMIT = 2 * Image.MAX_IMAGE_PIXELS


class _Key:
    """One config entry.

    Args:
        kind: ``int``, ``float``, ``bool``, ``str``, ``list`` or ``dict``.
        default: the value when the key is absent (``REQUIRED``: none).
        check: ``callable(value) -> error text or None``, after the type check.
        choices: the allowed values of a ``str`` key.
        path: a file or folder; relative values in a file are relative to its folder.
        doc: one line for ``docs/training.md``.
    """

    def __init__(
        self,
        kind: type,
        default: Any = REQUIRED,
        check: Optional[Callable] = None,
        choices: Optional[Sequence[str]] = None,
        path: bool = False,
        doc: str = "",
    ):
        self.kind, self.default, self.check = kind, default, check
        self.choices, self.path, self.doc = choices, path, doc


def _non_empty(value: str) -> Optional[str]:
    """A check for a required path: an empty one names no folder."""
    return None if value.strip() else "must not be empty"


def _within(low, high, low_open: bool = False) -> Callable:
    """A check for ``low <= v <= high`` (``low < v`` with ``low_open``)."""

    def check(v):
        above = v > low if low_open else v >= low
        if above and v <= high:
            return None
        return f"must be in {'(' if low_open else '['}{low}, {high}]"

    return check


def _int_list(
    low: int, high: int, min_length: int, max_length: int, increasing: bool = False
) -> Callable:
    """A check for a list of integers in ``[low, high]``."""

    def check(v):
        if not min_length <= len(v) <= max_length or any(
            not isinstance(x, int) or isinstance(x, bool) or not low <= x <= high
            for x in v
        ):
            return (
                f"must be a list of {min_length} to {max_length} integers in "
                f"[{low}, {high}]"
            )
        if increasing and list(v) != sorted(set(v)):
            return "must be strictly increasing"
        return None

    return check


def _sane_width(v):
    # SPL-CPS ships a config with ``N: 1923`` (a typo for 192): refuse the absurd.
    # (Kamisli's presets use N up to 1280.)
    if not 1 <= v <= 1536:
        return "must be in [1, 1536] (CPS uses 192, kamisli2024 up to 1280)"
    return None


_COUNT = _within(0, 1_000_000)  # epochs, patience, cooldowns ...
_STEPS = _within(0, INT64_MAX)  # step counts and intervals (0 where it means "off")
_LR = _within(0.0, 1.0, low_open=True)
_LR_FLOOR = _within(0.0, 1.0)
_FRACTION = _within(0.0, 1.0, low_open=True)

SCHEMA: Dict[str, Dict[str, _Key]] = {
    "train_data": {
        "data_path": _Key(
            str,
            path=True,
            check=_non_empty,
            doc="folder holding train/ and test/ image folders",
        ),
        "use_checkpoint_path": _Key(
            str, "", path=True, doc="resume this checkpoint exactly (same as --resume)"
        ),
        "init_checkpoint_path": _Key(
            str, "", path=True, doc="start from these weights only (--init-from)"
        ),
        "batch_size": _Key(int, 32, _within(1, 4096), doc="training crops per step"),
        "test_batch_size": _Key(
            int, 4, _within(1, 4096), doc="validation crops per batch"
        ),
        "epochs": _Key(
            int, 200, _within(1, 1_000_000), doc="passes over the training set"
        ),
        "num_workers": _Key(
            int,
            4,
            _within(0, 256),
            doc="DataLoader worker processes, at most one per CPU",
        ),
        "cuda": _Key(
            bool, False, doc="train on the GPU (the CPU, with a warning, without one)"
        ),
        "experiment_path": _Key(
            str,
            path=True,
            check=_non_empty,
            doc="checkpoints and TensorBoard logs go here",
        ),
        "small_images": _Key(
            str,
            "pad",
            choices=("pad", "skip"),
            doc="images smaller than the crop: edge-padded or left out",
        ),
        "pin_memory": _Key(bool, True, doc="page-locked batches (GPU runs)"),
        "persistent_workers": _Key(
            bool, True, doc="keep DataLoader workers between epochs"
        ),
        "max_bad_fraction": _Key(
            float,
            0.01,
            _within(0.0, 1.0),
            doc="share of unusable images (per split) that stops a run",
        ),
        "max_image_pixels": _Key(
            int,
            64_000_000,
            _within(1, PIL_PIXEL_LIMIT),
            doc="larger images are skipped unread (decompression bombs)",
        ),
    },
    "train_params": {
        "crop_size": _Key(
            int, 256, _within(8, 4096), doc="square training crop side (pixels)"
        ),
        "learning_rate": _Key(float, 1e-4, _LR, doc="Adam, network parameters"),
        "aux_learning_rate": _Key(
            float, 1e-3, _LR, doc="Adam, entropy-bottleneck quantiles"
        ),
        "lmbda": _Key(
            float,
            check=_within(0.0, 10_000.0, low_open=True),
            doc="rate-distortion trade-off: loss = lmbda * D + bpp",
        ),
        "clip_max_norm": _Key(
            float, 1.0, _within(0.0, 1e6), doc="gradient norm; 0: no clip"
        ),
        "N": _Key(int, 192, _sane_width, doc="model width (channels)"),
        "distortion_metric": _Key(
            str, "mse", choices=("mse", "ms-ssim"), doc="D: 255^2 * MSE or 1 - MS-SSIM"
        ),
        "seed": _Key(int, 0, _within(0, INT64_MAX), doc="weights, crops and noise"),
        "max_steps": _Key(
            int, 0, _STEPS, doc="stop after this many steps; 0: epochs decide"
        ),
        "max_nonfinite_steps": _Key(
            int,
            10,
            _within(1, 1_000_000),
            doc="consecutive non-finite steps before the run stops",
        ),
        "amp": _Key(bool, False, doc="bfloat16 autocast for the forward pass"),
        "channels_last": _Key(bool, False, doc="channels-last memory format"),
        "cuda_graphs": _Key(
            bool,
            False,
            doc="replay each step as a CUDA graph (one GPU; ignored on the CPU)",
        ),
        "training_mode": _Key(
            str,
            "open_loop",
            choices=("open_loop", "acl"),
            doc="acl: asymptotic closed-loop training (kamisli2024)",
        ),
    },
    "model": {
        "name": _Key(str, "cps", doc="registry name (models/registry.py)"),
        "kwargs": _Key(dict, {}, doc="constructor kwargs besides N"),
    },
    "lr_schedule": {
        "type": _Key(
            str,
            "plateau",
            choices=("plateau", "multistep", "cosine", "constant"),
            doc="plateau: on the validation loss; multistep/cosine: per step",
        ),
        "factor": _Key(
            float,
            0.1,
            _within(0.0, 1.0, low_open=True),
            doc="plateau/multistep: LR multiplier",
        ),
        "patience": _Key(int, 10, _COUNT, doc="plateau: validations to wait"),
        "milestones": _Key(
            list,
            [],
            _int_list(1, INT64_MAX, 0, 10_000, increasing=True),
            doc="multistep: global steps",
        ),
        "min_lr": _Key(float, 0.0, _LR_FLOOR, doc="plateau/cosine: floor"),
    },
    # Asymptotic closed-loop training (utils/training/acl.py,
    # read when train_params.training_mode is acl); defaults: the Kamisli
    # authors' B8 low-rate run.
    "acl": {
        "itr0_threshold": _Key(
            float,
            0.32,
            _within(0.0, 1e12, low_open=True),
            doc="open-loop validation loss that ends iteration 0",
        ),
        "count_thresholds": _Key(
            list,
            [8, 8, 7, 6, 5, 5],
            _int_list(0, 1_000_000, 1, 1000),
            doc="stale epochs ending iteration k (last: later ones)",
        ),
        "max_iterations": _Key(
            int, 8, _within(1, 1000), doc="the authors' finals: 4 to 16"
        ),
        "max_epochs_per_iteration": _Key(int, 0, _COUNT, doc="0: no limit"),
        "closed_loop_every": _Key(
            int,
            5,
            _within(1, 1000),
            doc="closed-loop validation every max(1, this - k) epochs",
        ),
        "closed_loop_tile": _Key(
            int, 16, _within(0, 4096), doc="tile side in blocks; 0: whole"
        ),
        "switch_from_iteration": _Key(
            int,
            2,
            _within(0, 1000),
            doc="first iteration that may switch to closed loop",
        ),
        "switch_ratio": _Key(
            float,
            0.99,
            _FRACTION,
            doc="switch unless best closed-loop loss < ratio * previous",
        ),
        "switch_lr_factor": _Key(
            float, 0.66, _FRACTION, doc="LR multiplier at the switch"
        ),
        "min_lr_closed_loop": _Key(
            float, 2e-5, _LR_FLOOR, doc="LR floor after the switch"
        ),
        "plateau_threshold": _Key(
            float,
            3e-4,
            _within(0.0, 1.0),
            doc="relative improvement the plateau schedule needs",
        ),
        "plateau_cooldown": _Key(
            int, 1, _COUNT, doc="plateau schedule cooldown (epochs)"
        ),
        "clip_value": _Key(
            float, 0.5, _within(0.0, 1e6), doc="gradient clip by value; 0: off"
        ),
        "validation_path": _Key(
            str, "", path=True, doc="validation images; empty: data_path/test"
        ),
    },
    "logging": {
        "log_interval": _Key(
            int, 100, _within(1, INT64_MAX), doc="steps between TensorBoard scalars"
        ),
        "val_interval": _Key(
            int, 0, _STEPS, doc="steps between validations; 0: each epoch"
        ),
        "checkpoint_interval": _Key(
            int, 0, _STEPS, doc="steps between extra saves; 0: at validation only"
        ),
        "num_images": _Key(
            int, 4, _within(0, 64), doc="reconstructions shown per validation"
        ),
        "tensorboard": _Key(
            bool, True, doc="write TensorBoard events to experiment_path"
        ),
        "progress": _Key(bool, True, doc="tqdm progress bar"),
    },
}


# What an asymptotic closed-loop run reads besides ``model`` and its own ``acl``
# block (utils/training/acl_run.py): it has its own epochs, stopping rule, clipping
# (acl.clip_value), validation and logging, so the open-loop trainer's other keys do
# not apply to it.
_ACL_READS = {
    "train_data": (
        "data_path",
        "use_checkpoint_path",
        "init_checkpoint_path",
        "batch_size",
        "num_workers",
        "cuda",
        "experiment_path",
        "max_bad_fraction",
        "max_image_pixels",
    ),
    "train_params": (
        "crop_size",
        "learning_rate",
        "lmbda",
        "N",
        "distortion_metric",
        "seed",
        "training_mode",
    ),
    "lr_schedule": ("type", "factor", "patience", "min_lr"),
    "logging": (),
}


def unread_by_acl(cfg: Dict[str, Dict[str, Any]]) -> List[str]:
    """``block.key = value`` for each setting of the validated ``cfg`` that an ACL run
    does not read and that differs from its default: an ACL run warns of them, since
    a user who sets ``train_params.max_steps`` or ``amp`` expects them to act."""
    return [
        f"{block}.{key} = {cfg[block][key]!r}"
        for block, read in _ACL_READS.items()
        for key, spec in SCHEMA[block].items()
        if key not in read and cfg[block][key] != spec.default
    ]


def check_value(where: str, spec: _Key, value: Any) -> Any:
    """``value`` converted to ``spec.kind`` and checked; raises a one-line ValueError.

    YAML's habit of reading ``1e-4`` (no dot) as a string is forgiven for float keys,
    and an integer is accepted where a float is expected.
    """
    kind = spec.kind
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind in (dict, list) and value is None:
        value = kind()
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(
            f"config key {where} must be {kind.__name__}, got {_short(value)}"
        )
    if kind is float and not math.isfinite(value):
        raise ValueError(f"config key {where} must be finite, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(
            f"config key {where} must be one of {list(spec.choices)}, "
            f"got {_short(value)}"
        )
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise ValueError(f"config key {where} {problem}, got {_short(value)}")
    return value


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a pasted list can be long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
