"""The model a training config describes, for both training modes.

Kept apart from :mod:`utils.training.config`, which reads and checks configs
without importing PyTorch (so that ``train.py`` reports config errors at once).
"""

import torch

import models
from utils.stitching.geometry import check_synthesis_reach

__all__ = ["build_configured_model"]


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
    kwargs = dict(cfg["model"]["kwargs"], N=params["N"])
    try:
        model = models.build_model(name, **kwargs)
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
    factor = model.downsampling_factor
    if params["crop_size"] % factor:
        raise ValueError(
            f"train_params.crop_size={params['crop_size']} must be a "
            f"multiple of {factor} for model {name!r}"
        )
    _check_trainable(model, name, params["lmbda"])
    return model


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
