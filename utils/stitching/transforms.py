"""How the analysis and synthesis transforms run when coding: settings and conversions.

On the CPU the transforms run with oneDNN and NNPACK disabled ("exact" mode):
PyTorch's native convolutions then give patch-wise results bit-identical to
whole-image results, so the latent, the file and the decoded 8-bit image do not
depend on the patch size either side used. With oneDNN (``exact=False``) they agree
to float rounding only (about 1e-7), which is faster. On CUDA, cuDNN runs in its
deterministic mode, because its default transposed convolutions are not
bit-reproducible from call to call.
"""

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor

from utils.image_io import to_uint8, to_unit_float


@contextlib.contextmanager
def transform_mode(device: torch.device, exact: bool) -> Iterator[None]:
    """Inference with deterministic convolution settings on ``device``."""
    with torch.inference_mode():
        if device.type == "cpu":
            # oneDNN picks kernels by tensor size and NNPACK takes over from batch 16 on;
            # with both off, each output is one fixed-order im2col + GEMM reduction.
            mkldnn_was_enabled = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = not exact
            try:
                with torch.backends.nnpack.flags(enabled=not exact):
                    yield
            finally:
                torch.backends.mkldnn.enabled = mkldnn_was_enabled
        else:
            with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
                yield


def input_preparation(direction: str, device: torch.device) -> Callable[[Tensor], Tensor]:
    """What each patch batch goes through before the transform: uint8 -> [0, 1] for
    ``"analysis"``, and on the CPU a channels-last layout, which makes the
    convolutions faster. Exact mode stays exact: channels-last native convolutions
    are as independent of the patch size as the others (tested through the codec)."""
    channels_last = device.type == "cpu"

    def prepare(batch: Tensor) -> Tensor:
        if direction == "analysis":
            batch = to_unit_float(batch)
        return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
    return prepare


def gray_uint8(batch: Tensor) -> Tensor:
    """Rounded mean of the three rounded 8-bit channels of a (B, 3, H, W) batch."""
    return to_uint8(batch).float().mean(dim=1, keepdim=True).round_().to(torch.uint8)


def channels_last_buffer(channels: int, height: int, width: int, dtype=torch.float32) -> Tensor:
    """An uninitialised (1, C, H, W) tensor stored as (H, W, C)."""
    return torch.empty(1, height, width, channels, dtype=dtype).permute(0, 3, 1, 2)
