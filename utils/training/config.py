"""Training configuration: the authors' YAML layout, validated, with defaults and overrides.

The CPS authors' files (``configs/cps_*_lambda*.yaml``) have two blocks and must load
unchanged::

    train_data:   data_path, use_checkpoint_path, batch_size, test_batch_size, epochs,
                  num_workers, cuda, experiment_path
    train_params: patch_size (read as crop_size), training_modality (only "patch"), learning_rate, aux_learning_rate,
                  lmbda, clip_max_norm, N

Everything this repository adds is optional and has a default (see :data:`SCHEMA`):
more keys in those two blocks, plus the blocks ``model`` (registry name and
constructor kwargs), ``lr_schedule`` and ``logging``.

Every value is checked when the file is read, and ``--set block.key=value`` overrides
go through the very same checks, so a typo fails in the first second of a run and not
after a day of training. Unknown keys are an error that names the key; YAML's habit of
reading ``1e-4`` as a string is forgiven for float keys.
"""

import copy
import math
import os
from typing import Any, Dict, Iterable, Mapping

import yaml
from easydict import EasyDict

__all__ = ["SCHEMA", "load_config", "parse_config", "apply_override", "block_defaults",
           "rename_legacy_keys",
           "to_plain_dict"]

REQUIRED = object()  # marks a key without a default


class _Key:
    """One config entry: its type, default and an optional extra check."""

    def __init__(self, kind, default=REQUIRED, check=None, choices=None, doc=""):
        self.kind = kind
        self.default = default
        self.check = check  # callable(value) -> error text or None
        self.choices = choices
        self.doc = doc


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _sane_width(v):
    # SPL-CPS ships a config with ``N: 1923`` (a typo for 192): refuse the absurd.
    # (Kamisli's presets use N up to 1280.)
    if not 1 <= v <= 1536:
        return "must be in [1, 1536] (CPS uses 192, kamisli2024 up to 1280); is it a typo?"
    return None


def _fraction(v):
    return None if 0 < v < 1 else "must be in (0, 1)"


def _count_list(v):
    if not v or any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in v):
        return "must be a non-empty list of integers >= 0"
    return None


def _sorted_steps(v):
    if any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in v):
        return "must be a list of positive integers (global steps)"
    return None if list(v) == sorted(set(v)) else "must be strictly increasing"


SCHEMA: Dict[str, Dict[str, _Key]] = {
    "train_data": {
        "data_path": _Key(str, doc="folder holding train/ and test/ image folders"),
        "use_checkpoint_path": _Key(str, "", doc="resume this checkpoint exactly"),
        "init_checkpoint_path": _Key(str, "", doc="start from these weights only"),
        "batch_size": _Key(int, 32, _positive),
        "test_batch_size": _Key(int, 4, _positive),
        "epochs": _Key(int, 200, _positive),
        "num_workers": _Key(int, 4, _non_negative),
        "cuda": _Key(bool, False),
        "experiment_path": _Key(str, doc="checkpoints and TensorBoard logs go here"),
        "small_images": _Key(str, "pad", choices=("pad", "skip")),
        "pin_memory": _Key(bool, True),
        "persistent_workers": _Key(bool, True),
    },
    "train_params": {
        "crop_size": _Key(int, 256, _positive, doc="square training crop side in pixels"),
        "learning_rate": _Key(float, 1e-4, _positive),
        "aux_learning_rate": _Key(float, 1e-3, _positive),
        "lmbda": _Key(float, check=_positive),
        "clip_max_norm": _Key(float, 1.0, _non_negative, doc="0 disables clipping"),
        "N": _Key(int, 192, _sane_width),
        "distortion_metric": _Key(str, "mse", choices=("mse", "ms-ssim")),
        "seed": _Key(int, 0, _non_negative),
        "max_steps": _Key(int, 0, _non_negative, doc="stop after this many steps; 0: epochs"),
        "max_nonfinite_steps": _Key(int, 10, _positive, doc="consecutive skips before abort"),
        "amp": _Key(bool, False, doc="bfloat16 autocast for the forward pass"),
        "channels_last": _Key(bool, False),
        "training_mode": _Key(str, "open_loop", choices=("open_loop", "acl"),
                              doc="acl: asymptotic closed-loop training (utils/training/acl.py)"),
    },
    "model": {
        "name": _Key(str, "cps", doc="registry name (models/registry.py)"),
        "kwargs": _Key(dict, {}, doc="constructor kwargs besides N"),
    },
    "lr_schedule": {
        "type": _Key(str, "plateau", choices=("plateau", "multistep", "cosine", "constant")),
        "factor": _Key(float, 0.1, _fraction, doc="plateau/multistep: LR multiplier"),
        "patience": _Key(int, 10, _non_negative, doc="plateau: validations to wait"),
        "milestones": _Key(list, [], _sorted_steps, doc="multistep: global steps"),
        "min_lr": _Key(float, 0.0, _non_negative, doc="plateau/cosine: floor"),
    },
    # Asymptotic closed-loop training (utils/training/acl.py, read when
    # train_params.training_mode is acl); defaults: the Kamisli authors' B8 low-rate run.
    "acl": {
        "itr0_threshold": _Key(float, 0.32, _positive, doc="open-loop loss ending iteration 0"),
        "count_thresholds": _Key(list, [8, 8, 7, 6, 5, 5], _count_list,
                                 doc="stale epochs ending iteration k (last entry: k >= len)"),
        "max_iterations": _Key(int, 8, _positive, doc="the authors stop by hand (final: 4-16)"),
        "max_epochs_per_iteration": _Key(int, 0, _non_negative, doc="0: no limit"),
        "closed_loop_every": _Key(int, 5, _positive, doc="closed-loop validation period"),
        "closed_loop_tile": _Key(int, 16, _non_negative, doc="tile side in blocks; 0: whole"),
        "switch_from_iteration": _Key(int, 2, _non_negative),
        "switch_ratio": _Key(float, 0.99, _positive),
        "switch_lr_factor": _Key(float, 0.66, _positive),
        "min_lr_closed_loop": _Key(float, 2e-5, _non_negative, doc="LR floor after the switch"),
        "plateau_threshold": _Key(float, 3e-4, _non_negative, doc="relative"),
        "plateau_cooldown": _Key(int, 1, _non_negative),
        "clip_value": _Key(float, 0.5, _non_negative, doc="gradient clipping by value"),
        "validation_path": _Key(str, "", doc="validation images; '': data_path/test"),
    },
    "logging": {
        "log_interval": _Key(int, 100, _positive, doc="steps between TensorBoard scalars"),
        "val_interval": _Key(int, 0, _non_negative, doc="steps between validations; 0: epoch"),
        "checkpoint_interval": _Key(int, 0, _non_negative, doc="extra saves; 0: at validation"),
        "num_images": _Key(int, 4, _non_negative, doc="reconstructions shown per validation"),
        "tensorboard": _Key(bool, True),
        "progress": _Key(bool, True, doc="tqdm progress bar"),
    },
}


def _coerce(where: str, spec: _Key, value: Any) -> Any:
    """Return ``value`` converted to ``spec.kind`` or raise a one-line ValueError."""
    kind = spec.kind
    if kind is float and isinstance(value, str):
        try:  # PyYAML reads "1e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is dict and value is None:
        value = {}
    if kind is list and value is None:
        value = []
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ValueError(f"config key {where} must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"config key {where} must be finite, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"config key {where} must be one of {list(spec.choices)}, got {value!r}")
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise ValueError(f"config key {where} {problem}, got {value!r}")
    return value


def _cross_checks(cfg: Mapping) -> None:
    """Checks that involve more than one key."""
    tp, td, sched = cfg["train_params"], cfg["train_data"], cfg["lr_schedule"]
    if tp["distortion_metric"] == "ms-ssim" and tp["crop_size"] < 161:
        raise ValueError(f"train_params.crop_size={tp['crop_size']} is too small for "
                         "ms-ssim (5 scales need sides of at least 161 pixels)")
    if td["use_checkpoint_path"] and td["init_checkpoint_path"]:
        raise ValueError("set only one of train_data.use_checkpoint_path (resume) and "
                         "train_data.init_checkpoint_path (initialise from weights)")
    if sched["type"] == "multistep" and not sched["milestones"]:
        raise ValueError("lr_schedule.type=multistep needs lr_schedule.milestones")
    if "N" in cfg["model"]["kwargs"]:
        raise ValueError("set the model width with train_params.N, not model.kwargs.N")


# The CPS authors' names for keys this repository renamed: (block, authors' key, ours).
LEGACY_KEYS = (("train_params", "patch_size", "crop_size"),)
# Keys of the authors' files that no code reads: (block, key, the only value accepted).
# ``training_modality: "patch"`` names the one way both they and we train.
IGNORED_KEYS = (("train_params", "training_modality", "patch"),)


def rename_legacy_keys(raw: Mapping, source: str) -> Mapping:
    """A copy of ``raw`` with the authors' key names mapped to ours, dead keys dropped.

    ``train_params.patch_size`` (the authors' name, also stored in checkpoints written
    before the rename) is the training crop, ``train_params.crop_size`` here; it is
    not the POPS coding patch of ``codec.py``/``test.py --patch-size``.
    """
    raw = dict(raw)
    for block, key, accepted in IGNORED_KEYS:
        given = raw.get(block)
        if isinstance(given, Mapping) and key in given:
            if given[key] != accepted:
                raise ValueError(f"{source}: {block}.{key} must be {accepted!r} (the only "
                                 f"mode there is), got {given[key]!r}")
            raw[block] = {k: v for k, v in given.items() if k != key}
    for block, old, new in LEGACY_KEYS:
        given = raw.get(block)
        if not isinstance(given, Mapping) or old not in given:
            continue
        if new in given:
            raise ValueError(f"{source}: set only one of {block}.{new} and {block}.{old} "
                             f"(the authors' name for {new})")
        given = dict(given)
        given[new] = given.pop(old)
        raw[block] = given
    return raw


def parse_config(raw: Any, source: str = "config") -> EasyDict:
    """Validate a parsed YAML mapping and fill in defaults.

    Returns an ``EasyDict`` (``cfg.train_params.lmbda``) holding every key of
    :data:`SCHEMA`. Raises ``ValueError`` naming the first offending key.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected a mapping of blocks, got {type(raw).__name__}")
    unknown = [b for b in raw if b not in SCHEMA]
    if unknown:
        raise ValueError(f"{source}: unknown block {unknown[0]!r}; known: {', '.join(SCHEMA)}")
    raw = rename_legacy_keys(raw, source)
    cfg = {}
    for block, keys in SCHEMA.items():
        given = raw.get(block) or {}
        if not isinstance(given, Mapping):
            raise ValueError(f"{source}: block {block!r} must be a mapping")
        for key in given:
            if key not in keys:
                raise ValueError(f"{source}: unknown key {block}.{key}; known in {block}: "
                                 + ", ".join(keys))
        cfg[block] = {}
        for key, spec in keys.items():
            if key in given:
                cfg[block][key] = _coerce(f"{block}.{key}", spec, given[key])
            elif spec.default is REQUIRED:
                raise ValueError(f"{source}: missing required key {block}.{key}")
            else:
                cfg[block][key] = copy.deepcopy(spec.default)
    _cross_checks(cfg)
    return EasyDict(cfg)


def block_defaults(block: str) -> EasyDict:
    """The default values of one block of :data:`SCHEMA` (blocks without required keys)."""
    return EasyDict({key: copy.deepcopy(spec.default) for key, spec in SCHEMA[block].items()})


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``block.key=value`` assignment to the raw mapping ``raw`` in place.

    The value is parsed as YAML (``0.025``, ``true``, ``[1000, 2000]``, ``{a: 1}``);
    the key must exist in :data:`SCHEMA`. Type checks happen in :func:`parse_config`.
    """
    name, sep, text = assignment.partition("=")
    name = name.strip()
    if not sep or "." not in name:
        raise ValueError(f"override {assignment!r} must look like block.key=value")
    block, key = name.split(".", 1)
    if block not in SCHEMA:
        raise ValueError(f"override {assignment!r}: unknown block {block!r}")
    if key not in SCHEMA[block]:
        raise ValueError(f"override {assignment!r}: unknown key {block}.{key}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        raise ValueError(f"override {assignment!r}: value is not valid YAML") from None
    if raw.get(block) is None:
        raw[block] = {}
    raw[block][key] = value


def load_config(path: str, overrides: Iterable[str] = ()) -> EasyDict:
    """Read the YAML file ``path``, apply ``overrides`` and validate the result."""
    if not os.path.isfile(path):
        raise ValueError(f"config file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(f"config file {path} is not valid YAML{where}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path}: expected a mapping of blocks")
    raw = copy.deepcopy(raw)
    for assignment in overrides:
        apply_override(raw, assignment)
    return parse_config(raw, source=path)


def to_plain_dict(cfg: Mapping) -> dict:
    """Deep copy of ``cfg`` made of plain dicts/lists (safe for ``weights_only`` loads)."""
    if isinstance(cfg, Mapping):
        return {str(k): to_plain_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_plain_dict(v) for v in cfg]
    return cfg
