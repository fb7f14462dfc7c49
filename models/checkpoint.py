"""Loading weights: the authors' published files, our training checkpoints, or a bare
state dict, always with ``weights_only=True``.

Users of CompressAI-style repositories trip over the same four things (CompressAI
issues 39, 75, 113, 145, 183): weights nested under ``state_dict``, a ``module.``
prefix left by multi-GPU training, entropy tables whose size differs from the freshly
built model's, and tables that were never computed because ``update()`` was not run.
:func:`load_checkpoint` handles all four and reports anything else as one clear error.
"""

import warnings
from typing import Mapping, Optional

import torch
from compressai.models import CompressionModel
from torch import Tensor, nn

from models.checkpoint_file import first_line, read_checkpoint_file
from models.registry import MODELS, get_model_class
from models.weight_checks import (
    check_buildable,
    check_dtypes,
    is_entropy_table,
    validate_loaded_model,
)
from utils.stitching.geometry import check_synthesis_reach


class ArchitectureMismatch(ValueError):
    """The weights of a checkpoint do not fit the architecture they are loaded into
    (missing, unexpected or mis-shaped entries)."""


# Prefixes added by DataParallel/DistributedDataParallel and by torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Buffers that update() computes; a checkpoint may lack them or hold other sizes.


def _strip_wrapper_prefixes(name: str) -> str:
    """Drop ``module.`` / ``_orig_mod.`` however they nest
    (DataParallel around compile, ...)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                stripped = True
    return name


# The entries that may hold the state dict, in the order they are tried.
_WRAPPERS = ("state_dict", "network", "model", "model_state_dict")


def unwrap_state_dict(checkpoint: Mapping) -> dict:
    """Return the bare ``{name: tensor}`` dict inside ``checkpoint``.

    Accepts a bare state dict or one nested under ``state_dict``, ``network``,
    ``model`` or ``model_state_dict`` (the keys CompressAI's ``eval_model`` reads too),
    and strips wrapper prefixes such as ``module.``.
    """
    for key in _WRAPPERS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
        if key in checkpoint and isinstance(checkpoint[key], (list, tuple, Tensor)):
            raise ValueError(
                f"not a state dict: its {key!r} entry is a "
                f"{type(checkpoint[key]).__name__}, not a dict of tensors"
            )
    # A nested dict first, wherever it is: the likely weights, beside an "epoch".
    for name, value in checkpoint.items():
        if isinstance(value, Mapping):
            entries = ", ".join(map(repr, _WRAPPERS))
            raise ValueError(
                f"not a state dict: entry {name!r} is a dict, not a tensor (weights "
                f"are read from the top level or from one of the entries {entries}); "
                f"if {name!r} holds them, save that dict alone with torch.save"
            )
    state_dict = {}
    for name, value in checkpoint.items():
        if not isinstance(name, str):
            raise ValueError(
                f"not a state dict: key {name!r} is not a parameter name string"
            )
        if not isinstance(value, Tensor):
            raise ValueError(
                f"not a state dict: entry {name!r} is not a tensor "
                f"({type(value).__name__})"
            )
        name = _strip_wrapper_prefixes(name)
        state_dict[name] = value
    return state_dict


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, Tensor]):
    """Load ``state_dict`` into ``model``, tolerating only absent entropy tables.

    Tables of a different size are resized by CompressAI's ``load_state_dict``;
    missing or empty ones are recomputed with ``update(force=True)``. Any other
    missing, unexpected or mis-shaped entry, or one of a dtype that cannot hold the
    model's values (:func:`~models.weight_checks.check_dtypes`), raises ``ValueError``.
    Returns what PyTorch's ``load_state_dict`` returns (the absent tables, if any).
    """
    check_buildable(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not is_entropy_table(k)]
    unexpected = [k for k in state_dict if k not in expected]
    # An entry of the wrong rank first: it is the likely cause of the others (a size
    # read from a reshaped tensor builds a model that every other entry then misfits).
    wrong_shape = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in sorted(
            state_dict.items(),
            key=lambda item: (
                item[0] not in expected or item[1].dim() == expected[item[0]].dim()
            ),
        )
        if k in expected and not is_entropy_table(k) and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatches (e.g. {wrong_shape[0]})")
    if problems:
        raise ArchitectureMismatch(
            f"checkpoint does not fit architecture "
            f"{model.registry_name!r}: " + "; ".join(problems)
        )
    check_dtypes(state_dict, expected)

    tables_present = all(
        k in state_dict and state_dict[k].numel() > 0
        for k in expected
        if is_entropy_table(k)
    )
    if tables_present:
        # CompressAI's, which resizes the tables; a zoo model's own load_state_dict
        # comes here.
        loaded = CompressionModel.load_state_dict(model, dict(state_dict), strict=True)
    else:
        weights = {k: v for k, v in state_dict.items() if not is_entropy_table(k)}
        loaded = nn.Module.load_state_dict(model, weights, strict=False)
        model.update(force=True)
    validate_loaded_model(model)
    return loaded


def _plain(value):
    """``value`` with tuples as lists, so a config compares equal however
    it was stored."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _check_stored_config(path: str, stored, rebuilt: Mapping) -> None:
    """Refuse a checkpoint whose ``model_config`` disagrees with the model its
    weights give.

    Our checkpoints store the constructor arguments beside the weights; every model
    rebuilds them from the weights alone (tested for each architecture), so a
    disagreement means an edited or mixed-up file, not a model to guess between.
    """
    if stored is None:
        return
    if not isinstance(stored, Mapping):
        raise ValueError(
            f"checkpoint {path}: 'model_config' must be a dict, "
            f"got {type(stored).__name__}"
        )
    stored, rebuilt = _plain(stored), _plain(rebuilt)
    differing = sorted(
        key
        for key in stored.keys() | rebuilt.keys()
        if stored.get(key) != rebuilt.get(key)
    )
    if differing:
        key = differing[0]
        raise ValueError(
            f"checkpoint {path}: its model_config says {key}={stored.get(key)!r} "
            f"but its weights give {key}={rebuilt.get(key)!r}"
        )


class UnsolvedQuantilesWarning(UserWarning):
    """A checkpoint whose entropy-bottleneck quantiles follow the auxiliary loss
    instead of being solved for coding (a training run's last state): it codes, at a
    higher bpp than it needs. Its own class, so that the release, which solves them,
    can silence it and nothing else."""


def load_checkpoint(
    path: str, device: torch.device | str = "cpu", architecture: Optional[str] = None
) -> nn.Module:
    """Build the model stored in ``path`` on ``device``, ready for coding (eval mode).

    The architecture is ``architecture`` if given, else the ``architecture`` entry our
    training checkpoints carry, else the registered architecture whose
    ``holds_published_weights`` recognises the weights (Kamisli's published module
    names) and ``"cps"`` otherwise (published files carry no architecture). The model
    sizes are inferred from the weights by the class's ``from_state_dict``; a
    ``model_config`` stored beside them must agree. Weights that do not fit raise
    :class:`ArchitectureMismatch`, which says how to name another architecture when
    the name was only assumed. A training run's last state (``checkpoint.pth.tar``,
    whose quantiles were not solved for coding) loads with a warning.
    """
    checkpoint = read_checkpoint_file(path)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"cannot read checkpoint {path}: it holds a {type(checkpoint).__name__}"
        )
    try:
        state_dict = unwrap_state_dict(checkpoint)
    except ValueError as exc:
        raise ValueError(f"checkpoint {path}: {exc}") from None
    name = (
        architecture
        or checkpoint.get("architecture")
        or _published_architecture(state_dict)
    )
    if not isinstance(name, str):
        raise ValueError(
            f"checkpoint {path}: 'architecture' must be a model name string, "
            f"got {type(name).__name__} {name!r}"
        )
    try:
        model = _model_from_weights(path, name, state_dict)
    except ArchitectureMismatch as exc:
        if architecture or checkpoint.get("architecture"):
            raise
        raise ArchitectureMismatch(
            f"{exc}; the file names no architecture, so {name!r} was "
            "assumed: name the right one (-a/--architecture in codec.py "
            "and test.py)"
        ) from None
    _check_stored_config(path, checkpoint.get("model_config"), model.config)
    _check_seamless(model, path, name)
    if checkpoint.get("quantiles_solved") is False and any(
        key.endswith(".quantiles") for key in state_dict
    ):
        warnings.warn(
            UnsolvedQuantilesWarning(
                f"{path} is a training run's last state: its entropy-bottleneck "
                "quantiles follow the auxiliary loss instead of being solved for "
                "coding, so its bpp can be higher than it needs to be; code with the "
                "run's checkpoint_best_loss.pth.tar, or resume and let it validate"
            ),
            stacklevel=2,
        )
    return model.to(device).eval()


# (class, constructor kwargs) of the POPS architectures whose synthesis reach was
# checked in this process: the probe depends on the architecture, not the weights.
_SEAMLESS_ARCHITECTURES = set()


def _check_seamless(model: nn.Module, path: str, name: str) -> None:
    """Refuse a POPS variant whose g_s reaches further than g_a's margin: it would
    leave seams between patches (``check_synthesis_reach`` in
    ``utils/stitching/geometry.py``). ``train.py`` refuses it before training; this
    catches one trained elsewhere. Probed once per architecture and process (0.2 s
    at N=192)."""
    key = (type(model), repr(sorted(model.config.items())))
    if not model.supports_patches or key in _SEAMLESS_ARCHITECTURES:
        return
    try:
        check_synthesis_reach(model)
    except ValueError as exc:
        raise ValueError(f"checkpoint {path} ({name!r}): {exc}") from None
    _SEAMLESS_ARCHITECTURES.add(key)


def _published_architecture(state_dict: dict) -> str:
    """The architecture of a file that names none (the authors' published files): the
    one that recognises its layout (Kamisli's module names), else ``cps``."""
    for cls in dict.fromkeys(MODELS.values()):
        if cls.holds_published_weights(state_dict):
            return cls.registry_name
    return "cps"


def _model_from_weights(path: str, name: str, state_dict: dict) -> nn.Module:
    """The architecture ``name`` built from ``state_dict`` by its ``from_state_dict``;
    weights that do not fit raise :class:`ArchitectureMismatch`."""
    cls = get_model_class(name)
    try:
        check_buildable(state_dict)
        return cls.from_state_dict(state_dict)
    except ValueError as exc:  # a check that names the entry: add the file
        if path in str(exc):
            raise
        error = (
            ArchitectureMismatch
            if isinstance(exc, ArchitectureMismatch)
            else ValueError
        )
        raise error(f"{path}: {exc}") from None
    except KeyError as exc:
        raise ArchitectureMismatch(
            f"checkpoint {path} does not fit architecture {name!r}: "
            f"no key {exc.args[0]!r}"
        ) from None
    except (IndexError, TypeError, AttributeError, RuntimeError) as exc:
        # A tensor of the wrong rank where a size is read, or CompressAI's own
        # load_state_dict refusing (its message lists every key: the first line
        # says it).
        raise ArchitectureMismatch(
            f"checkpoint {path} does not fit architecture {name!r}: {first_line(exc)}"
        ) from None
