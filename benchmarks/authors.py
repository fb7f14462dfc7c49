"""Run the CPS authors' published code (SPL-CPS) beside ours, from a user's checkout.

The authors' repository is not a package: ``test.py`` imports ``from net.cps import
CPS`` with the checkout as the working folder, and ``net/cps.py`` imports
``net.patchmanager`` the same way. :func:`load_authors_cps` therefore puts the
checkout first on ``sys.path`` and imports ``net.cps`` from it. Their ``CPS`` is
CompressAI's ``JointAutoregressiveHierarchicalPriors`` with other transforms, built
by ``CPS.from_state_dict``; its state dict has the same keys and shapes as ours, so
one set of weights (random, at N = 192) serves both, and the comparison measures
the code, not the weights.

Their ``test.py`` pads the image with zeros to a multiple of 64, then times
``compress``/``decompress`` (whole image) or ``compress_patch``/``decompress_patch``
(their patch-wise codec, ``--patch``); :func:`run_authors` does the same. Their
model stores a device name that the patch manager uses (``'cuda'`` by default), so
it is set to the device the benchmark runs on.
"""

import importlib
import os
import sys
import time
from typing import Dict

import torch
import torch.nn.functional as F
from compressai.ops import compute_padding

NOT_MEASURED = "not measured"
# What this module calls on the authors' ``CPS``.
API = (
    "from_state_dict",
    "update",
    "compress",
    "decompress",
    "compress_patch",
    "decompress_patch",
)


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for a one-line error."""
    first_line = next(iter(str(exc).splitlines()), "")
    return type(exc).__name__ + (f": {first_line}" if first_line else "")


def _call_authors(method: str, function, *args):
    """``function(*args)``, a call into the authors' code, whose failures (of any kind:
    a checkout whose API changed raises TypeError, a script-style module may exit)
    become a one-line RuntimeError naming ``method``."""
    try:
        return function(*args)
    except (Exception, SystemExit) as exc:
        raise RuntimeError(
            f"the authors' CPS.{method} failed: {_first_line(exc)}"
        ) from None


def _unusable(repo: str, why: str) -> ValueError:
    """The one error for a ``--authors-repo`` that cannot serve, saying ``why``."""
    return ValueError(
        f"--authors-repo {repo} is not a usable checkout of the authors' code "
        f"(https://github.com/bblgbr/SPL-CPS): {why}"
    )


def load_authors_cps(repo: str) -> type:
    """The ``CPS`` class of the authors' checkout at ``repo``, with the methods that
    :func:`authors_model` and :func:`run_authors` call.

    Raises:
        ValueError: ``repo`` has no ``net/cps.py``, importing it fails in any way
            (their module may raise anything, ``SystemExit`` included), or it has no
            such ``CPS``; the message is one line.
    """
    module_file = os.path.join(repo, "net", "cps.py")
    if not os.path.isfile(module_file):
        raise _unusable(repo, "no net/cps.py there")
    # A ``net`` package imported earlier (another checkout) would shadow this one.
    for name in [
        name for name in sys.modules if name == "net" or name.startswith("net.")
    ]:
        del sys.modules[name]
    sys.path.insert(0, os.path.abspath(repo))
    try:
        module = importlib.import_module("net.cps")
    except (Exception, SystemExit) as exc:
        raise _unusable(repo, f"cannot import net.cps: {_first_line(exc)}") from None
    finally:
        sys.path.remove(os.path.abspath(repo))
    if not isinstance(getattr(module, "CPS", None), type):
        raise _unusable(repo, "net/cps.py defines no class CPS")
    missing = [name for name in API if not callable(getattr(module.CPS, name, None))]
    if missing:
        raise _unusable(repo, "net/cps.py's CPS has no " + ", ".join(missing))
    return module.CPS


def authors_model(
    cps_class: type, state_dict: dict, device: torch.device
) -> torch.nn.Module:
    """The authors' model with ``state_dict``, ready to code on ``device``."""
    model = _call_authors("from_state_dict", cps_class.from_state_dict, state_dict)
    _call_authors("update", lambda: model.update(force=True))
    model.device = device.type
    return model.to(device).eval()


def run_authors(
    model: torch.nn.Module,
    image: torch.Tensor,
    patch_size: int = 0,
) -> Dict[str, float]:
    """Encode and decode a uint8 (3, H, W) image as the authors' ``test.py`` does.

    ``patch_size`` 0 codes the whole image, else their patch-wise codec. Returns
    the encode and decode seconds and the size of the strings in bytes.
    """
    device = next(model.parameters()).device
    x = image.to(device).float().div(255)[None]
    pad, _ = compute_padding(x.shape[2], x.shape[3], min_div=2**6)
    x = F.pad(x, pad, mode="constant", value=0)
    with torch.no_grad():
        start = time.perf_counter()
        if patch_size:
            coded = _call_authors("compress_patch", model.compress_patch, x, patch_size)
        else:
            coded = _call_authors("compress", model.compress, x)
        middle = time.perf_counter()
        if patch_size:
            decoded = _call_authors(
                "decompress_patch",
                model.decompress_patch,
                coded["strings"],
                coded["shape"],
                patch_size,
            )
        else:
            decoded = _call_authors(
                "decompress", model.decompress, coded["strings"], coded["shape"]
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
    if decoded["x_hat"].shape[-2:] != x.shape[-2:]:
        raise RuntimeError(
            f"the authors' decoder returned {tuple(decoded['x_hat'].shape)} "
            f"for an input of {tuple(x.shape)}"
        )
    size = sum(len(string) for strings in coded["strings"] for string in strings)
    return {"encode_s": middle - start, "decode_s": end - middle, "bytes": size}
