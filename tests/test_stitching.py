"""Patch-wise g_a and g_s equal whole-image g_a and g_s (the CPS guarantee)."""

import pytest
import torch

import models
from utils.stitching.geometry import model_geometry, plan_patches, tile_axis
from utils.stitching.patches import pad_replicate, read_region, run_patchwise
from utils.stitching.transforms import transform_mode

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return models.build_model("cps", N=8).eval()


def _patchwise(
    model, transform, source, out_shape, patch_size, in_factor, out_factor, batch
):
    geometry = model_geometry(model)
    latent = (
        source.shape[-2:]
        if in_factor == 1
        else [s // geometry.scale for s in source.shape[-2:]]
    )
    target = torch.empty(out_shape)
    return run_patchwise(
        transform,
        source,
        target,
        plan_patches(*latent, patch_size, geometry),
        in_factor,
        out_factor,
        batch,
        CPU,
    )


# Sizes: a Kodak-like one, odd multiples of 64, sides below, equal to and above P,
# tall and wide.
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
        y_patch = _patchwise(
            model, model.g_a, image, y_whole.shape, patch_size, scale, 1, 3
        )
        x_whole = model.g_s(y_whole)
        x_patch = _patchwise(
            model, model.g_s, y_whole, x_whole.shape, patch_size, 1, scale, 3
        )
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
        halves = torch.cat(
            [model.g_a(image[..., :128]), model.g_a(image[..., 128:])], dim=-1
        )
    assert (halves - whole).abs().max() > 1e-3


def test_batch_size_does_not_change_the_result(model):
    image = torch.rand(1, 3, 320, 320)
    scale = model_geometry(model).scale
    with transform_mode(CPU, True):
        results = [
            _patchwise(model, model.g_a, image, (1, 8, 20, 20), 128, scale, 1, batch)
            for batch in (1, 4, 100)
        ]
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_pad_replicate_repeats_the_last_row_and_column_up_to_the_multiple():
    image = torch.arange(35, dtype=torch.uint8).view(1, 5, 7)
    padded = pad_replicate(image, 4)
    assert padded.shape == (1, 8, 8) and padded.dtype == torch.uint8
    assert torch.equal(padded[:, :5, :7], image)
    assert torch.equal(padded[:, :5, 7], image[:, :, 6])
    assert torch.equal(padded[:, 5:, :], padded[:, 4:5, :].expand(-1, 3, -1))
    assert torch.equal(pad_replicate(image, 1), image)


def test_read_region_past_one_edge_only_replicates_that_edge():
    image = torch.arange(35.0).view(1, 5, 7)
    below = read_region(image, 2, 8, 1, 4)  # rows past the bottom, columns inside
    assert torch.equal(below, pad_replicate(image, 8)[:, 2:8, 1:4])
    right = read_region(image, 0, 3, 4, 9)  # columns past the right, rows inside
    assert torch.equal(right, pad_replicate(image, 9)[:, 0:3, 4:9])


def _pointwise_patches(height, width, patch, margin):
    return [
        (row, col)
        for row in tile_axis(height, patch, margin)
        for col in tile_axis(width, patch, margin)
    ]


def test_a_source_and_target_smaller_than_the_tiling_are_replicated_and_cropped():
    # A 5x7 image under a 6x8 tiling (an image whose sides are not multiples of the
    # downsampling factor): the last patches read past the edges and write past them.
    torch.manual_seed(0)
    source = torch.rand(1, 2, 5, 7)
    target = torch.full((1, 2, 5, 7), float("nan"))
    run_patchwise(
        lambda batch: batch * 2 + 1,
        source,
        target,
        _pointwise_patches(6, 8, 4, 1),
        1,
        1,
        2,
        CPU,
    )
    assert torch.equal(target, source * 2 + 1)


def test_prepare_and_finish_run_on_each_patch_around_the_transform():
    # uint8 in, uint8 out, float in between: what the codec does with the image.
    source = torch.arange(48, dtype=torch.uint8).view(1, 1, 6, 8) * 5
    target = torch.zeros(1, 1, 6, 8, dtype=torch.uint8)
    run_patchwise(
        lambda batch: 1 - batch,
        source,
        target,
        _pointwise_patches(6, 8, 4, 1),
        1,
        1,
        3,
        CPU,
        prepare=lambda batch: batch.float() / 255,
        finish=lambda region: (region * 255).round().to(torch.uint8),
    )
    assert torch.equal(target, 255 - source)
