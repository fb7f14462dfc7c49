"""Training config: the authors' YAML layout, validated, with defaults and overrides.

The CPS authors' files have two blocks and load unchanged::

    train_data:   data_path, use_checkpoint_path, batch_size, test_batch_size, epochs,
                  num_workers, cuda, experiment_path
    train_params: patch_size, training_modality, learning_rate, aux_learning_rate,
                  lmbda, clip_max_norm, N

Two of their keys have another form here: ``patch_size`` is read as
``train_params.crop_size`` (the training crop, not the POPS coding patch of
``codec.py``), and ``training_modality`` (only ``"patch"`` exists) is accepted and
dropped. Everything this repository adds is optional and has a default
(:data:`utils.training.schema.SCHEMA`): more keys in those two blocks, plus the blocks
``model``, ``lr_schedule``, ``acl`` and ``logging``.

Every value of every block is checked when the file is read (in any training mode),
``--set block.key=value`` overrides and the configs stored in checkpoints go through
the very same checks, and all the problems are reported together in one line
(``train.py`` adds the model's, :func:`utils.training.build.model_problems`, to the
same line), so a config fails in the first seconds of a run, once, before any image
is read, and not after a day of training.
Relative paths in a file are relative to the file's folder; relative paths given
with ``--set`` are relative to the current directory.
"""

import copy
import os
from typing import Any, Callable, Iterable, List, Mapping, Optional, Tuple

from easydict import EasyDict

from utils.training.schema import REQUIRED, SCHEMA, check_value
from utils.yaml_io import load_yaml_file, load_yaml_text

# The run's checkpoints in experiment_path: the latest (what --resume continues) and
# the best on the validation loss. Named here, free of PyTorch, for the command line.
LAST_NAME = "checkpoint.pth.tar"
BEST_NAME = "checkpoint_best_loss.pth.tar"

__all__ = [
    "SCHEMA",
    "load_config",
    "parse_config",
    "apply_overrides",
    "rename_legacy_keys",
    "resolve_paths",
    "to_plain_dict",
]

# The CPS authors' names for keys this repository renamed: (block, authors' key, ours).
LEGACY_KEYS = (("train_params", "patch_size", "crop_size"),)
# Keys of the authors' files that no code reads: (block, key, the only value accepted).
# ``training_modality: "patch"`` names the one way both they and we train.
IGNORED_KEYS = (("train_params", "training_modality", "patch"),)


def _legacy_renamed(raw: Mapping) -> Tuple[dict, List[str]]:
    """A copy of ``raw`` with the authors' key names mapped to ours, dead keys dropped,
    and the problems found on the way (a dropped key of another value, both names of
    a renamed key). A key in such a problem is left out, so that the rest of the
    config is still checked and every problem is reported together."""
    raw, problems = dict(raw), []
    for block, key, accepted in IGNORED_KEYS:
        given = raw.get(block)
        if isinstance(given, Mapping) and key in given:
            if given[key] != accepted:
                problems.append(
                    f"{block}.{key} must be {accepted!r} (the only mode there is), "
                    f"got {given[key]!r}"
                )
            raw[block] = {k: v for k, v in given.items() if k != key}
    for block, old, new in LEGACY_KEYS:
        given = raw.get(block)
        if not isinstance(given, Mapping) or old not in given:
            continue
        given = dict(given)
        value = given.pop(old)
        if new in given:
            problems.append(
                f"set only one of {block}.{new} and {block}.{old} "
                f"(the authors' name for {new})"
            )
        else:
            given[new] = value
        raw[block] = given
    return raw, problems


def rename_legacy_keys(raw: Mapping, source: str = "config") -> dict:
    """A copy of ``raw`` with the authors' key names mapped to ours, dead keys dropped.

    ``train_params.patch_size`` (the authors' name, also stored in checkpoints written
    before the rename) becomes ``train_params.crop_size``. Raises a one-line
    ``ValueError`` when both names are given or a dropped key has another value.
    """
    raw, problems = _legacy_renamed(raw)
    _raise_if_any(problems, source)
    return raw


def _cross_checks(cfg: Mapping) -> List[str]:
    """Problems that involve more than one key (each key is already valid)."""
    problems = []
    params, data = cfg.get("train_params", {}), cfg.get("train_data", {})
    sched, model = cfg.get("lr_schedule", {}), cfg.get("model", {})
    if (
        params.get("distortion_metric") == "ms-ssim"
        and params.get("crop_size", 161) < 161
    ):
        problems.append(
            f"train_params.crop_size={params['crop_size']} is too small for ms-ssim "
            "(5 scales need sides of at least 161 pixels)"
        )
    if data.get("use_checkpoint_path") and data.get("init_checkpoint_path"):
        problems.append(
            "set only one of train_data.use_checkpoint_path (resume) and "
            "train_data.init_checkpoint_path (initialise from weights)"
        )
    if sched.get("type") == "multistep" and sched.get("milestones") == []:
        problems.append("lr_schedule.type=multistep needs lr_schedule.milestones")
    if "N" in model.get("kwargs", {}):
        problems.append("set the model width with train_params.N, not model.kwargs.N")
    return problems


def _validate(raw: Any, source: str) -> Tuple[dict, List[str]]:
    """The config with defaults filled in, and every problem found (possibly none)."""
    if not isinstance(raw, Mapping):
        return {}, [f"expected a mapping of blocks, got {type(raw).__name__}"]
    raw, problems = _legacy_renamed(raw)
    problems += [
        f"unknown block {b!r}; known: {', '.join(SCHEMA)}"
        for b in raw
        if b not in SCHEMA
    ]
    cfg = {}
    for block, keys in SCHEMA.items():
        given = raw.get(block)
        if given is None:
            given = {}
        if not isinstance(given, Mapping):
            problems.append(
                f"block {block!r} must be a mapping, got {type(given).__name__}"
            )
            given = {}
        problems += [
            f"unknown key {block}.{key}; known in {block}: {', '.join(keys)}"
            for key in given
            if key not in keys
        ]
        cfg[block] = {}
        for key, spec in keys.items():
            if key in given:
                try:
                    cfg[block][key] = check_value(f"{block}.{key}", spec, given[key])
                except ValueError as exc:
                    problems.append(str(exc))
            elif spec.default is REQUIRED:
                problems.append(f"missing required key {block}.{key}")
            else:
                cfg[block][key] = copy.deepcopy(spec.default)
    return cfg, problems + _cross_checks(cfg)


def _raise_if_any(problems: List[str], source: str) -> None:
    if len(problems) == 1:
        raise ValueError(f"{source}: {problems[0]}")
    if problems:
        raise ValueError(f"{source}: {len(problems)} problems: " + "; ".join(problems))


def parse_config(raw: Any, source: str = "config") -> EasyDict:
    """Validate a parsed config mapping and fill in the defaults.

    Returns an ``EasyDict`` (``cfg.train_params.lmbda``) holding every key of
    :data:`SCHEMA`. Raises one ``ValueError`` listing every problem on one line.
    """
    cfg, problems = _validate(raw, source)
    _raise_if_any(problems, source)
    return EasyDict(cfg)


def _override(raw: dict, assignment: str) -> None:
    """Apply a ``block.key=value`` assignment to ``raw`` in place (one-line errors)."""
    name, sep, text = assignment.partition("=")
    name = name.strip()
    if not sep or "." not in name:
        raise ValueError(f"override {assignment!r} must look like block.key=value")
    block, key = name.split(".", 1)
    if block not in SCHEMA:
        raise ValueError(
            f"override {assignment!r}: unknown block {block!r}; known blocks: "
            f"{', '.join(SCHEMA)}"
        )
    renamed = {(b, old): new for b, old, new in LEGACY_KEYS}.get((block, key))
    if renamed:
        raise ValueError(
            f"override {assignment!r}: {block}.{key} is called {block}.{renamed}"
        )
    if key not in SCHEMA[block]:
        raise ValueError(
            f"override {assignment!r}: unknown key {block}.{key}; known in "
            f"{block}: {', '.join(SCHEMA[block])}"
        )
    value = load_yaml_text(text, f"override {assignment!r}") if text.strip() else ""
    if SCHEMA[block][key].path and isinstance(value, str) and value.strip():
        # Typed in a shell: relative to the current folder.
        value = os.path.abspath(value)
    if not isinstance(raw.get(block), dict):
        raw[block] = {}
    raw[block][key] = value


def apply_overrides(raw: dict, assignments: Iterable[str]) -> List[str]:
    """Apply ``--set`` assignments to the raw mapping ``raw`` in place.

    Each value is parsed as YAML (``0.025``, ``true``, ``[1000, 2000]``, ``{a: 1}``);
    the key must exist in :data:`SCHEMA` and be set once. Returns the problems found
    (malformed or repeated assignments); the values themselves are checked by
    :func:`parse_config`.
    """
    problems, given = [], set()
    for assignment in assignments:
        name = assignment.partition("=")[0].strip()
        if name in given:
            # As a config file may not repeat a key: which of the two was meant?
            problems.append(f"override {assignment!r}: {name} is set twice")
            continue
        given.add(name)
        try:
            _override(raw, assignment)
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def resolve_paths(raw: dict, folder: str) -> None:
    """Make the relative path values of ``raw`` relative to ``folder``, in place."""
    for block, keys in SCHEMA.items():
        given = raw.get(block)
        if not isinstance(given, dict):
            continue
        for key, spec in keys.items():
            value = given.get(key)
            if spec.path and isinstance(value, str) and value.strip():
                given[key] = os.path.normpath(
                    os.path.join(folder, os.path.expanduser(value))
                )


def load_config(
    path: Optional[str],
    overrides: Iterable[str] = (),
    base: Optional[Mapping] = None,
    source: str = "stored config",
    checks: Iterable[Callable[[dict], List[str]]] = (),
) -> EasyDict:
    """Read the YAML file ``path``, apply ``overrides`` and validate the result.

    ``base`` (a config stored in a checkpoint, for resuming; ``source`` names it in
    errors) stands in for the file when ``path`` is ``None``. ``checks`` find more
    problems, such as the model's (:func:`utils.training.build.model_problems`):
    each gets the config with its defaults, less the keys whose values were refused,
    even when other keys were. Every problem of the file, of the overrides and of the
    checks is reported together in one ``ValueError``.
    """
    if path is None:
        raw = copy.deepcopy(dict(base or {}))
    else:
        source = path
        raw = load_yaml_file(path)
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ValueError(
                f"config file {path}: expected a mapping of blocks, "
                f"got {type(raw).__name__}"
            )
        resolve_paths(raw, os.path.dirname(os.path.abspath(path)))
    raw, problems = _legacy_renamed(raw)  # before the overrides, which use our names
    problems += apply_overrides(raw, overrides)
    cfg, more = _validate(raw, source)
    for check in checks:
        more += check(cfg)
    _raise_if_any(problems + more, source)
    return EasyDict(cfg)


def to_plain_dict(cfg: Mapping) -> dict:
    """Deep copy of ``cfg`` as plain dicts/lists (safe for ``weights_only`` loads)."""
    if isinstance(cfg, Mapping):
        return {str(k): to_plain_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_plain_dict(v) for v in cfg]
    return cfg
