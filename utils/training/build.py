"""The model a training config describes, for both training modes.

Kept apart from :mod:`utils.training.config`, which reads and checks configs
without importing PyTorch (so that ``train.py`` reports config errors at once).
"""

import models

__all__ = ["build_configured_model"]


def build_configured_model(cfg):
    """The model a validated config names, built from ``model.kwargs`` and
    ``train_params.N``; both training modes build it here.

    Raises:
        ValueError: the model rejects its kwargs, or the training crop is not a
            multiple of its :attr:`~models.base.LearnedCodec.downsampling_factor`.
    """
    name, params = cfg["model"]["name"], cfg["train_params"]
    kwargs = dict(cfg["model"]["kwargs"], N=params["N"])
    try:
        model = models.build_model(name, **kwargs)
    except TypeError as exc:
        raise ValueError(f"model {name!r} rejects its kwargs {kwargs}: {exc}") from None
    factor = model.downsampling_factor
    if params["crop_size"] % factor:
        raise ValueError(f"train_params.crop_size={params['crop_size']} must be a "
                         f"multiple of {factor} for model {name!r}")
    return model
