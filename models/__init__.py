"""Model architectures, their name registry and checkpoint loading."""

import warnings

# CompressAI wraps helpers in torch.jit.script, which PyTorch deprecates: a warning at
# its import that users of `import models` cannot act on. The scripts filter it too,
# because some of them import CompressAI before this package.
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

from models import (
    cps,  # noqa: F401  (registers "cps")
    kamisli2024,  # noqa: F401  (registers "kamisli2024")
    mei2021,  # noqa: F401  (registers "mei2021-quality", "mei2021-spatial")
    zoo,  # noqa: F401  (registers CompressAI's zoo architectures)
)
from models.checkpoint import load_checkpoint, load_state_dict_into
from models.registry import MODELS, build_model, get_model_class, register_model

__all__ = [
    "MODELS",
    "build_model",
    "get_model_class",
    "register_model",
    "load_checkpoint",
    "load_state_dict_into",
]
