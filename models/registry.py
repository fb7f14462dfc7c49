"""The one table of architecture names.

Every script resolves a model name through :func:`get_model_class`, so adding an
architecture means decorating its class once. Aliases live in the same table: the CPS
authors call their network ``cps-v4``.
"""

import inspect
from typing import Callable, Dict, Type

from compressai.models import CompressionModel

from models.base import LearnedCodec

MODELS: Dict[str, Type[LearnedCodec]] = {}


def register_model(
    name: str, *aliases: str
) -> Callable[[Type[LearnedCodec]], Type[LearnedCodec]]:
    """Class decorator that registers a model under ``name`` and its ``aliases``.

    Only complete :class:`models.base.LearnedCodec` subclasses that are also CompressAI
    ``CompressionModel``s are accepted (every abstract member implemented, and
    ``update()`` for the entropy tables): the scripts reach a model through that
    contract alone, so anything else would fail later, deep inside ``train.py``,
    ``codec.py`` or ``test.py``.
    """

    def decorator(cls: Type[LearnedCodec]) -> Type[LearnedCodec]:
        if not (isinstance(cls, type) and issubclass(cls, LearnedCodec)):
            raise TypeError(
                f"model {name!r}: {cls!r} is not a models.base.LearnedCodec subclass"
            )
        if inspect.isabstract(cls):
            missing = sorted(cls.__abstractmethods__)
            owners = sorted({_declaring_class(cls, member) for member in missing})
            raise TypeError(
                f"model {name!r}: {cls.__name__} does not implement "
                f"{', '.join(missing)} (abstract in "
                f"{', '.join(owners)})"
            )
        if not issubclass(cls, CompressionModel):
            raise TypeError(
                f"model {name!r}: {cls.__name__} is not a CompressAI "
                "CompressionModel, whose update() builds the entropy tables"
            )
        taken = [key for key in (name, *aliases) if key in MODELS]
        if taken:
            raise ValueError(f"model name {taken[0]!r} is already registered")
        MODELS.update(dict.fromkeys((name, *aliases), cls))
        cls.registry_name = name
        return cls

    return decorator


def _declaring_class(cls: type, member: str) -> str:
    """The full name of the class in ``cls``'s bases that declares
    ``member`` abstract."""
    return next(
        f"{base.__module__}.{base.__qualname__}"
        for base in cls.__mro__
        if member in vars(base)
        and getattr(vars(base)[member], "__isabstractmethod__", False)
    )


def get_model_class(name: str) -> Type[LearnedCodec]:
    """Return the class registered under ``name`` (an alias works too)."""
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ValueError(
            f"unknown architecture {name!r}; known: {known} (a new model "
            "registers when models/__init__.py imports its module)"
        ) from None


def build_model(name: str, **kwargs) -> LearnedCodec:
    """Instantiate the architecture ``name`` with constructor ``kwargs``."""
    return get_model_class(name)(**kwargs)
