"""The model a training config describes, for both training modes.

Kept apart from :mod:`utils.training.config`, which reads and checks configs
without importing PyTorch: ``train.py`` passes it :func:`model_problems` as a check,
so that the model's problems are reported with the config's, before any image is read.
"""

from typing import List, Mapping, Optional, Type

import torch

import models
from models.base import ClosedLoopTrainable, LearnedCodec
from utils.stitching.geometry import check_synthesis_reach

__all__ = ["acl_problems", "build_configured_model", "model_problems"]


def build_configured_model(cfg):
    """The model a validated config names, built from ``model.kwargs`` and
    ``train_params.N``; both training modes build it here.

    Raises:
        ValueError: the model rejects its kwargs, the training crop is not a
            multiple of its :attr:`~models.base.LearnedCodec.downsampling_factor`, or
            the model breaks the contract the trainer relies on
            (:func:`_check_trainable`).
    """
    name, params = cfg["model"]["name"], cfg["train_params"]
    model = _construct(name, cfg["model"]["kwargs"], params["N"])
    problem = _crop_problem(params["crop_size"], model, name)
    if problem:
        raise ValueError(problem)
    _check_trainable(model, name, params["lmbda"])
    return model


def model_problems(cfg: Mapping) -> List[str]:
    """The problems of the config's model that need no data: an unknown
    architecture, kwargs its constructor refuses, a training crop that is not a
    multiple of its ``downsampling_factor``, and :func:`acl_problems`.

    A check for :func:`utils.training.config.load_config`: ``cfg`` holds the keys
    whose values passed the schema (a refused one is absent, already reported, and
    the checks that need it are left out), ``model.name``, ``model.kwargs`` and
    ``train_params.N`` among them. Builds the model once on the CPU, leaving the
    global random generator as it was.
    """
    name, params = cfg["model"]["name"], cfg["train_params"]
    try:
        model_class = models.get_model_class(name)
    except ValueError as exc:
        return [str(exc)] + _acl_problems_if_acl(cfg)
    problems = _acl_problems_if_acl(cfg, model_class)
    try:
        with torch.random.fork_rng(devices=[]):
            model = _construct(name, cfg["model"]["kwargs"], params["N"])
    except ValueError as exc:
        return problems + [str(exc)]
    crop = params.get("crop_size")
    problem = None if crop is None else _crop_problem(crop, model, name)
    return problems + ([problem] if problem else [])


def _acl_problems_if_acl(
    cfg: Mapping, model_class: Optional[Type[LearnedCodec]] = None
) -> List[str]:
    """:func:`acl_problems` when ``train_params.training_mode`` is ``acl``."""
    if cfg.get("train_params", {}).get("training_mode") != "acl":
        return []
    return acl_problems(cfg, model_class)


def acl_problems(
    cfg: Mapping, model_class: Optional[Type[LearnedCodec]] = None
) -> List[str]:
    """Why asymptotic closed-loop training cannot train ``cfg``: the model
    (``model_class``, when known) must implement
    :class:`~models.base.ClosedLoopTrainable`, and the schedule must be ``plateau``.
    """
    problems = []
    if model_class is not None and not issubclass(model_class, ClosedLoopTrainable):
        problems.append(
            f"ACL training needs a block-based model that implements "
            f"models.base.ClosedLoopTrainable, such as kamisli2024, not "
            f"{cfg['model']['name']!r}"
        )
    schedule = cfg.get("lr_schedule", {}).get("type")
    if schedule not in (None, "plateau"):
        problems.append(
            f"ACL steps a plateau schedule on the validation loss; "
            f"lr_schedule.type is {schedule!r}"
        )
    return problems


def _construct(name: str, kwargs: Mapping, width: int) -> LearnedCodec:
    """The registered model ``name`` built from ``kwargs`` and ``N=width``; a
    constructor that refuses them is one ValueError."""
    kwargs = dict(kwargs, N=width)
    try:
        return models.build_model(name, **kwargs)
    except TypeError as exc:
        hint = (
            "; train.py passes train_params.N to every model, so its __init__ must "
            "accept N"
            if "'N'" in str(exc)
            else ""
        )
        raise ValueError(
            f"model {name!r} rejects its kwargs {kwargs}: {exc}{hint}"
        ) from None


def _crop_problem(crop: int, model: LearnedCodec, name: str) -> Optional[str]:
    factor = model.downsampling_factor
    if crop % factor:
        return (
            f"train_params.crop_size={crop} must be a multiple of {factor} for "
            f"model {name!r}"
        )
    return None


def _check_trainable(model, name: str, lmbda: float) -> None:
    """Refuse, before the first step, a model whose training would fail or produce
    files nothing can load (a new architecture's mistakes, found in seconds instead
    of at the first save, hours later):

    * ``from_state_dict`` must rebuild ``config`` from the weights alone, or no
      checkpoint of the run would load (a setting that is not a layer size must be
      stored in a buffer, as Mei 2021's ``lmbdas``);
    * ``forward`` of a ``downsampling_factor``-sided image must give
      ``{"x_hat", "likelihoods"}`` with ``x_hat`` of the input's shape;
    * ``default_loss`` must give ``loss`` and ``bpp_loss`` (``mse_loss`` optional);
    * a POPS model's ``g_s`` must reach no further than ``g_a``'s margin
      (:func:`~utils.stitching.geometry.check_synthesis_reach`).

    Each problem, an exception raised by one of those members included, is one
    ValueError naming the model. The model's weights, buffers and module modes and
    the global random generator are left as they were, so the run does not change.
    """
    modes = {module: module.training for module in model.modules()}
    try:
        with torch.random.fork_rng(devices=[]):
            _check_members(model, lmbda)
    except Exception as exc:  # a new model's bug, reported as the contract's
        detail = (
            exc if isinstance(exc, _ContractError) else f"{type(exc).__name__}: {exc}"
        )
        raise ValueError(f"model {name!r}: {detail}") from None
    finally:
        for module, training in modes.items():
            module.train(training)


class _ContractError(Exception):
    """A member's result that breaks the contract (the message says which)."""


def _check_members(model, lmbda: float) -> None:
    """The checks of :func:`_check_trainable`; the model is left in eval mode."""
    rebuilt = type(model).from_state_dict(model.state_dict()).config
    if rebuilt != model.config:
        raise _ContractError(
            f"from_state_dict rebuilds config {rebuilt} from the weights, "
            f"not {model.config}, so no checkpoint of this run would load; "
            "store settings that are not layer sizes in buffers"
        )
    side = model.downsampling_factor
    x = torch.full((1, 3, side, side), 0.5)
    model.eval()
    with torch.no_grad():
        out = model(x)
        if not (
            isinstance(out, dict)
            and {"x_hat", "likelihoods"} <= set(out)
            and isinstance(out["likelihoods"], dict)
        ):
            raise _ContractError(
                "forward must return a dict with 'x_hat' and a "
                "'likelihoods' dict, as CompressAI models do"
            )
        if tuple(out["x_hat"].shape) != tuple(x.shape):
            raise _ContractError(
                f"forward of a {side}x{side} image (its downsampling_factor) "
                f"gave x_hat {tuple(out['x_hat'].shape)}"
            )
        losses = model.default_loss(lmbda)(out, x)
    if not (isinstance(losses, dict) and {"loss", "bpp_loss"} <= set(losses)):
        raise _ContractError(
            "default_loss must return a dict with 'loss' and 'bpp_loss' (and "
            "optionally 'mse_loss'), as CompressAI's RateDistortionLoss does"
        )
    if model.supports_patches:
        try:
            check_synthesis_reach(model)
        except ValueError as exc:
            raise _ContractError(str(exc)) from None
