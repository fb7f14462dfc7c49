"""The one table of architecture names.

Every script resolves a model name through :func:`get_model_class`, so adding an
architecture means decorating its class once. Aliases live in the same table: the CPS
authors call their network ``cps-v4``.
"""

from typing import Callable, Dict, Type

from torch import nn

MODELS: Dict[str, Type[nn.Module]] = {}


def register_model(name: str, *aliases: str) -> Callable[[Type[nn.Module]], Type[nn.Module]]:
    """Class decorator that registers a model under ``name`` and its ``aliases``."""

    def decorator(cls: Type[nn.Module]) -> Type[nn.Module]:
        for key in (name, *aliases):
            if key in MODELS:
                raise ValueError(f"model name {key!r} is already registered")
            MODELS[key] = cls
        cls.registry_name = name
        return cls

    return decorator


def get_model_class(name: str) -> Type[nn.Module]:
    """Return the class registered under ``name`` (an alias works too)."""
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown architecture {name!r}; known: {known}") from None


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate the architecture ``name`` with constructor ``kwargs``."""
    return get_model_class(name)(**kwargs)
