"""How the analysis and synthesis transforms run when coding: settings and conversions.

On the CPU the default is the "exact" mode: every convolution runs as matrix
products of one fixed shape (``utils/stitching/exact_convolution.py``), so that
patch-wise results are bit-identical to whole-image results, and the latent, the
file and the decoded 8-bit image do not depend on the patch size either side used.
With ``exact=False`` oneDNN runs them, about 1.1x faster on 2 cores, and patch-wise
results agree with whole-image ones to float rounding (about 1e-7).

Why products rather than a oneDNN setting: oneDNN chooses kernels, blockings and
Winograd tiles by tensor shape, and a probe of every layer type of the network
(1x1, 3x3, 2x2/2 and transposed, 3 to 192 channels, batches of 1 to 8, crops of 8 to
64 pixels) found crop- or batch-dependent bits for nearly all of them, whatever
the setting. PyTorch's native convolutions are exact too but 1.5x slower than
oneDNN; products of a fixed shape run as fast as oneDNN's direct 3x3 kernels within
about 15 % and are exact by construction.

On CUDA, cuDNN runs in its deterministic mode, because its default transposed
convolutions are not bit-reproducible from call to call; its kernels still depend on
the shape, so there patch-wise pixels agree to float rounding while the latent is
checked by its CRC.
"""

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor

from utils.image_io import to_grayscale, to_uint8, to_unit_float
from utils.memory import reuse_freed_memory
from utils.stitching.exact_convolution import ExactConvolutions


@contextlib.contextmanager
def transform_mode(device: torch.device, exact: bool) -> Iterator[None]:
    """Inference with deterministic convolution settings on ``device``."""
    with torch.inference_mode():
        if device.type == "cpu":
            # oneDNN picks kernels by tensor size and NNPACK takes over from
            # batch 16 on. Exact mode runs the convolutions as fixed-shape
            # products instead, and the forms those do not cover natively with
            # both libraries off.
            mkldnn_was_enabled = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = not exact
            try:
                with (
                    torch.backends.nnpack.flags(enabled=not exact),
                    reuse_freed_memory(),
                    ExactConvolutions() if exact else contextlib.nullcontext(),
                ):
                    yield
            finally:
                torch.backends.mkldnn.enabled = mkldnn_was_enabled
        else:
            with torch.backends.cudnn.flags(
                enabled=True, benchmark=False, deterministic=True
            ):
                yield


def input_preparation(
    direction: str, device: torch.device
) -> Callable[[Tensor], Tensor]:
    """What each patch batch goes through before the transform: uint8 -> [0, 1] for
    ``"analysis"``, and on the CPU a channels-last layout, which makes the
    convolutions faster and is the layout the exact mode's products read."""
    channels_last = device.type == "cpu"

    def prepare(batch: Tensor) -> Tensor:
        if direction == "analysis":
            batch = to_unit_float(batch)
        return (
            batch.contiguous(memory_format=torch.channels_last)
            if channels_last
            else batch
        )

    return prepare


def gray_uint8(batch: Tensor) -> Tensor:
    """Rounded mean of the three rounded 8-bit channels of a (B, 3, H, W) batch."""
    return to_grayscale(to_uint8(batch))


def channels_last_buffer(
    channels: int, height: int, width: int, dtype=torch.float32
) -> Tensor:
    """An uninitialised (1, C, H, W) tensor stored as (H, W, C)."""
    return torch.empty(1, height, width, channels, dtype=dtype).permute(0, 3, 1, 2)
