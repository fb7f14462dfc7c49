"""Loading weights: the authors' published files, our training checkpoints, or a bare
state dict, always with ``weights_only=True``.

Users of CompressAI-style repositories trip over the same four things (CompressAI
issues 39, 75, 113, 145, 183): weights nested under ``state_dict``, a ``module.``
prefix left by multi-GPU training, entropy tables whose size differs from the freshly
built model's, and tables that were never computed because ``update()`` was not run.
:func:`load_checkpoint` handles all four and reports anything else as one clear error.
"""

import os
from typing import Mapping, Optional

import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from torch import Tensor, nn

from models.registry import get_model_class

# Prefixes added by DataParallel/DistributedDataParallel and by torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Buffers that update() computes; a checkpoint may lack them or hold other sizes.
_ENTROPY_TABLES = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


def unwrap_state_dict(checkpoint: Mapping) -> dict:
    """Return the bare ``{name: tensor}`` dict inside ``checkpoint``.

    Accepts a bare state dict or one nested under ``state_dict``, ``network``,
    ``model`` or ``model_state_dict`` (the keys CompressAI's ``eval_model`` reads too),
    and strips wrapper prefixes such as ``module.``.
    """
    for key in ("state_dict", "network", "model", "model_state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state_dict = {}
    for name, value in checkpoint.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"not a state dict: entry {name!r} is a {type(value).__name__}")
        for prefix in _WRAPPER_PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix):]
        state_dict[name] = value
    return state_dict


def _is_entropy_table(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in _ENTROPY_TABLES


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load ``state_dict`` into ``model``, tolerating only absent entropy tables.

    Tables of a different size are resized by CompressAI's ``load_state_dict``;
    missing or empty ones are recomputed with ``update(force=True)``. Any other
    missing, unexpected or mis-shaped entry raises ``ValueError``.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not _is_entropy_table(k)]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and not _is_entropy_table(k) and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatches (e.g. {wrong_shape[0]})")
    if problems:
        name = getattr(model, "registry_name", type(model).__name__)
        raise ValueError(f"checkpoint does not fit architecture {name!r}: " + "; ".join(problems))

    tables_present = all(k in state_dict and state_dict[k].numel() > 0
                         for k in expected if _is_entropy_table(k))
    if tables_present:
        model.load_state_dict(dict(state_dict), strict=True)
    else:
        weights = {k: v for k, v in state_dict.items() if not _is_entropy_table(k)}
        nn.Module.load_state_dict(model, weights, strict=False)
        model.update(force=True)


def entropy_tables_ready(model: nn.Module) -> bool:
    """True when every entropy model has its CDF tables (``update()`` has run)."""
    return all(
        m._quantized_cdf.numel() > 0
        for m in model.modules()
        if isinstance(m, (EntropyBottleneck, GaussianConditional))
    )


def read_checkpoint_file(path: str) -> dict:
    """``torch.load`` with ``weights_only=True`` and one-line errors."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors all land here
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read checkpoint {path}: {first_line}") from None


def load_checkpoint(path: str, device: torch.device | str = "cpu",
                    architecture: Optional[str] = None) -> nn.Module:
    """Build the model stored in ``path`` on ``device``, ready for coding (eval mode).

    The architecture is ``architecture`` if given, else the ``architecture`` entry our
    training checkpoints carry, else ``"cps"`` (the authors' files carry none). The
    model width is inferred from the weights by the class's ``from_state_dict``.
    """
    checkpoint = read_checkpoint_file(path)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"cannot read checkpoint {path}: it holds a {type(checkpoint).__name__}")
    name = architecture or checkpoint.get("architecture") or "cps"
    cls = get_model_class(name)
    state_dict = unwrap_state_dict(checkpoint)
    try:
        model = cls.from_state_dict(state_dict)
    except KeyError as exc:
        raise ValueError(f"checkpoint {path} does not fit architecture {name!r}: "
                         f"no key {exc.args[0]!r}") from None
    return model.to(device).eval()
