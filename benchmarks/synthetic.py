"""The stand-ins the benchmarks measure with: a CPS model with random weights that
codes like a trained one, and a deterministic photo-like image of any size.

Random weights would put every predicted scale at the scale table's first row, so
:func:`synthetic_model` spreads them over the whole table (a log-uniform scale per
channel between 0.11 and 16, through the last entropy-parameter layer's bias):
symbols, CDF rows and bitstream sizes then look like a trained model's, while
memory and transform time do not depend on the weights.
"""

import math

import torch

__all__ = ["synthetic_model", "synthetic_image"]


def synthetic_model(channels: int, seed: int) -> torch.nn.Module:
    """A CPS model whose predicted scales spread over the whole scale table."""
    # Imported here: memory_scaling.py's zoo runs take only the image from this
    # module, and their peak memory should not include this repository's models.
    import models

    torch.manual_seed(seed)
    model = models.build_model("cps", N=channels).eval()
    last = model.entropy_parameters[-1]
    with torch.no_grad():
        last.weight.mul_(0.1)
        last.bias[:channels] = (
            torch.empty(channels).uniform_(math.log(0.11), math.log(16.0)).exp()
        )
        last.bias[channels:] = 0.0
    model.update(force=True)
    return model


def synthetic_image(width: int, height: int) -> torch.Tensor:
    """Smooth colour gradients plus 10 % noise, uint8 (3, H, W)."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.linspace(0, 1, height)[:, None].expand(height, width)
    cols = torch.linspace(0, 1, width)[None].expand(height, width)
    image = torch.stack([rows * cols, rows, cols]).mul_(0.8)
    image.add_(torch.rand(3, height, width, generator=generator), alpha=0.1)
    return image.mul_(255).round_().to(torch.uint8)
