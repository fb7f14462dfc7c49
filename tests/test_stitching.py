"""Patch-wise g_a and g_s equal whole-image g_a and g_s (the CPS guarantee)."""

import pytest
import torch

import models
from utils.stitching.geometry import model_geometry, plan_patches
from utils.stitching.patches import run_patchwise
from utils.stitching.transforms import transform_mode

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return models.build_model("cps", N=8).eval()


def _patchwise(model, transform, source, out_shape, patch_size, in_factor, out_factor, batch):
    geometry = model_geometry(model)
    latent = (source.shape[-2:] if in_factor == 1
              else [s // geometry.scale for s in source.shape[-2:]])
    target = torch.empty(out_shape)
    return run_patchwise(transform, source, target, plan_patches(*latent, patch_size, geometry),
                         in_factor, out_factor, batch, CPU)


# Sizes: a Kodak-like one, odd multiples of 64, sides below, equal to and above P, tall and wide.
SIZES = [(192, 320), (64, 448), (448, 64), (128, 128), (256, 192)]


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("patch_size", [128, 192, 256])
@pytest.mark.parametrize("size", SIZES)
def test_patchwise_transforms_equal_whole_image(model, size, patch_size, exact):
    torch.manual_seed(0)
    image = torch.rand(1, 3, *size)
    scale = model_geometry(model).scale
    with transform_mode(CPU, exact):
        y_whole = model.g_a(image)
        y_patch = _patchwise(model, model.g_a, image, y_whole.shape, patch_size, scale, 1, 3)
        x_whole = model.g_s(y_whole)
        x_patch = _patchwise(model, model.g_s, y_whole, x_whole.shape, patch_size, 1, scale, 3)
    for whole, patch in ((y_whole, y_patch), (x_whole, x_patch)):
        if exact:
            assert torch.equal(patch, whole)
        else:
            signal_range = (whole.max() - whole.min()).item()
            assert (patch - whole).abs().max().item() <= 1e-5 * signal_range


def test_naive_tiling_would_not_be_exact(model):
    """Guard for the test above: without the overlap, patches do differ."""
    image = torch.rand(1, 3, 128, 256)
    with torch.no_grad():
        whole = model.g_a(image)
        halves = torch.cat([model.g_a(image[..., :128]), model.g_a(image[..., 128:])], dim=-1)
    assert (halves - whole).abs().max() > 1e-3


def test_batch_size_does_not_change_the_result(model):
    image = torch.rand(1, 3, 320, 320)
    scale = model_geometry(model).scale
    with transform_mode(CPU, True):
        results = [_patchwise(model, model.g_a, image, (1, 8, 20, 20), 128, scale, 1, batch)
                   for batch in (1, 4, 100)]
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
