"""POPS geometry: eq. (1)-(4) from the layer list, checked against brute force."""

import pytest
import torch

import models
from utils.stitching.geometry import (
    analysis_layers,
    check_patch_size,
    check_synthesis_reach,
    geometry_from_layers,
    model_geometry,
    plan_patches,
    synthesis_reach,
    tile_axis,
)


def test_paper_network_has_receptive_field_72_scale_16_overlap_64():
    geometry = model_geometry(models.build_model("cps", N=8))
    assert (geometry.receptive_field, geometry.scale, geometry.overlap) == (72, 16, 64)
    assert geometry.margin == 2 and geometry.min_patch_size == 80


def test_layer_list_is_read_from_the_network():
    layers = analysis_layers(models.build_model("cps", N=8).g_a)
    assert layers == [(2, 2), (3, 1), (3, 1)] * 3 + [(2, 2)]


def test_the_side_multiple_follows_the_strides_of_both_analysis_transforms():
    # 16 in g_a, 4 in h_a.
    assert models.build_model("cps", N=8).downsampling_factor == 64
    # A researcher's deeper hyper-analysis changes it with no other edit; h_a runs on
    # the whole latent, so it may pad, as CompressAI's hyper-analyses do.
    deeper = models.build_model("cps", N=8)
    deeper.h_a.append(torch.nn.Conv2d(8, 8, kernel_size=2, stride=2))
    assert deeper.downsampling_factor == 128
    padded = models.build_model("cps", N=8)
    padded.h_a = torch.nn.Sequential(
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 5, stride=2, padding=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 5, stride=2, padding=2),
    )
    assert padded.downsampling_factor == 64
    from models.base import CodingPlan
    from utils.coding.container import pack, unpack

    padded.update(force=True)
    image = torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8)
    plan = CodingPlan()
    assert (
        padded.eval().decode(unpack(pack(padded.encode(image, plan))), plan).shape
        == image.shape
    )


def test_pointwise_layers_and_gdn_variants_add_no_reach():
    """GDN and its subclasses (CompressAI's GDN1) act per position, so a researcher's
    variant of a padding-free transform keeps its geometry."""
    from compressai.layers import GDN, GDN1

    transform = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 2, stride=2),
        GDN1(4),
        torch.nn.Conv2d(4, 4, 3),
        GDN(4),
        torch.nn.LeakyReLU(),
    )
    assert analysis_layers(transform) == [(2, 2), (3, 1)]
    with pytest.raises(
        ValueError, match="cannot derive the POPS geometry of BatchNorm2d"
    ):
        analysis_layers(torch.nn.BatchNorm2d(4))


@pytest.mark.parametrize(
    "layers, r, rho, eq4_overlap, overlap",
    [
        # EDRB only: r = rho, no overlap needed (Sec. II.B)
        ([(2, 2)] * 4, 16, 16, 0, 0),
        ([(3, 1)], 3, 1, 2, 2),  # r mod rho == 0: o = r - rho
        # r mod rho != 0: o = rho * floor(r / rho); an odd 2e is rounded up to a
        # symmetric margin
        ([(5, 2), (5, 2)], 13, 4, 12, 16),
    ],
)
def test_overlap_follows_equation_4(layers, r, rho, eq4_overlap, overlap):
    geometry = geometry_from_layers(layers)
    assert (geometry.receptive_field, geometry.scale) == (r, rho)
    assert geometry.unreachable * geometry.scale == eq4_overlap
    assert geometry.overlap == overlap


def _changed_columns(transform, base, axis_length, probe_column):
    """Columns of ``base`` whose perturbation changes output column ``probe_column``.

    The unperturbed image is the last item of the same batch, so every item is
    computed by the same kernels and any difference at all is a dependency.
    """
    batch = base.repeat(axis_length + 1, 1, 1, 1)
    for column in range(axis_length):
        batch[column, :, :, column] += 1.0
    with torch.no_grad():
        output = transform(batch)[..., probe_column]  # an int or a slice
    moved = (output[:-1] != output[-1:]).flatten(1).any(1)
    return torch.nonzero(moved).flatten().tolist()


def test_receptive_field_matches_brute_force_measurement():
    torch.manual_seed(0)
    model = models.build_model("cps", N=4).eval()
    geometry = model_geometry(model)
    probe = 5  # a latent column far from both borders of a 160-pixel-wide input
    columns = _changed_columns(model.g_a, torch.rand(1, 3, 64, 160), 160, probe)
    assert columns == list(range(columns[0], columns[0] + geometry.receptive_field))
    # Centred on the latent position's own 16-pixel block.
    assert (
        columns[0]
        == probe * geometry.scale - (geometry.receptive_field - geometry.scale) // 2
    )


def test_synthesis_reaches_margin_latent_positions_on_each_side():
    torch.manual_seed(0)
    model = models.build_model("cps", N=4).eval()
    geometry = model_geometry(model)
    latent = torch.randn(1, 4, 4, 12)
    # Which latent columns influence the 16 output pixel columns of latent column 6?
    block = slice(6 * geometry.scale, 7 * geometry.scale)
    influencing = _changed_columns(
        lambda y: model.g_s(y)[..., block], latent, 12, slice(None)
    )
    assert influencing == list(range(6 - geometry.margin, 6 + geometry.margin + 1))


@pytest.mark.parametrize("length", [1, 4, 5, 8, 13, 16, 17, 40, 63])
@pytest.mark.parametrize("patch", [0, 5, 8, 12, 16, 64])
def test_tiling_owns_every_position_once_and_only_exact_ones(length, patch):
    margin = 2
    tiles = tile_axis(length, patch, margin)
    owners = [0] * length
    for tile in tiles:
        assert 0 <= tile.start < tile.stop <= length
        assert tile.stop - tile.start == min(patch or length, length)
        for position in range(tile.own_start, tile.own_stop):
            owners[position] += 1
            # Exact: at least `margin` from every patch edge that is not the image
            # border.
            assert tile.start == 0 or position - tile.start >= margin
            assert tile.stop == length or tile.stop - 1 - position >= margin
    assert owners == [1] * length


def test_patch_as_large_as_the_image_owns_everything():
    # The authors' stitching left black rows here (256x256 at P=256).
    geometry = model_geometry(models.build_model("cps", N=4))
    assert [
        (r.own_start, r.own_stop, c.own_start, c.own_stop)
        for r, c in plan_patches(16, 16, 256, geometry)
    ] == [(0, 16, 0, 16)]


@pytest.mark.parametrize(
    "patch_size, message",
    [(200, "multiple of 16"), (64, "minimum 80"), (-16, "multiple of 16")],
)
def test_unusable_patch_size_is_a_clear_error(patch_size, message):
    geometry = model_geometry(models.build_model("cps", N=4))
    with pytest.raises(ValueError, match=message):
        check_patch_size(patch_size, geometry)


def test_padded_or_upsampling_layers_are_refused():
    # Zero padding makes border latents depend on the patch edge, so stitched patches
    # would no longer equal the whole image; a strided transposed convolution upsamples.
    with pytest.raises(ValueError, match="is padded: POPS needs padding-free layers"):
        analysis_layers(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1)))
    with pytest.raises(ValueError, match="strided transposed convolution"):
        analysis_layers(torch.nn.ConvTranspose2d(4, 4, 2, stride=2))
    assert analysis_layers(torch.nn.ConvTranspose2d(4, 4, 3)) == [(3, 1)]


@pytest.mark.parametrize("length", [5, 8, 13, 16, 17, 40, 63])
@pytest.mark.parametrize("patch", [5, 8, 12, 16])
def test_tiling_uses_the_fewest_patches_and_none_owns_nothing(length, patch):
    margin = 2
    tiles = tile_axis(length, patch, margin)
    if patch < length:
        step = patch - 2 * margin
        assert len(tiles) == -(-(length - patch) // step) + 1
    # A patch that owns nothing would be computed for nothing.
    assert all(tile.own_stop > tile.own_start for tile in tiles)


PAPER_LAYERS = [(2, 2), (3, 1), (3, 1)] * 3 + [(2, 2)]


def test_rectangular_patches_take_the_height_first():
    geometry = geometry_from_layers(PAPER_LAYERS)
    patches = plan_patches(12, 30, (80, 160), geometry)
    assert {row.stop - row.start for row, _ in patches} == {80 // 16}
    assert {col.stop - col.start for _, col in patches} == {160 // 16}


def test_a_patch_size_of_zero_processes_that_axis_whole():
    geometry = geometry_from_layers(PAPER_LAYERS)
    check_patch_size(0, geometry)
    assert [
        (r.start, r.stop, c.start, c.stop) for r, c in plan_patches(12, 30, 0, geometry)
    ] == [(0, 12, 0, 30)]
    patches = plan_patches(12, 30, (0, 96), geometry)
    assert {(row.start, row.stop) for row, _ in patches} == {(0, 12)}
    assert len({(col.start, col.stop) for _, col in patches}) > 1


def _deeper_cps(analysis: bool, synthesis: bool):
    """CPS with one more BRB at 1/8 scale in g_a, in g_s, or in both."""
    from models.cps.layers import BRB
    from models.cps.network import CPS

    class DeeperCPS(CPS):
        def __init__(self, N=8, brb_kernel_size=3):
            super().__init__(N=N, brb_kernel_size=brb_kernel_size)
            if analysis:
                self.g_a.insert(6, BRB(N, N, brb_kernel_size))
            if synthesis:
                self.g_s.insert(1, BRB(N, N, brb_kernel_size))

    return DeeperCPS


@pytest.mark.parametrize("brb_kernel_size, reach", [(3, 2), (1, 0)])
def test_the_measured_synthesis_reach_is_the_margin_of_the_analysis(
    brb_kernel_size, reach
):
    model = models.build_model("cps", N=8, brb_kernel_size=brb_kernel_size)
    assert synthesis_reach(model) == model_geometry(model).margin == reach
    check_synthesis_reach(model)


def test_a_decoder_reaching_further_than_the_encoder_margin_is_refused(monkeypatch):
    # Patch-wise decoding would differ from the whole image's at every seam.
    deeper_decoder = _deeper_cps(analysis=False, synthesis=True)()
    assert (
        synthesis_reach(deeper_decoder) == 3
        and model_geometry(deeper_decoder).margin == 2
    )
    message = (
        "g_s reads 3 latent positions on each side, more than the 2 that g_a's "
        "geometry leaves, so patches would leave seams"
    )
    with pytest.raises(ValueError, match=message):
        check_synthesis_reach(deeper_decoder)
    # The reach is the architecture's: an added block that starts as the identity
    # (its convolutions zero) reaches as far once trained.
    with torch.no_grad():
        for parameter in deeper_decoder.g_s[1].parameters():
            parameter.zero_()
    assert synthesis_reach(deeper_decoder) == 3
    # Training refuses it before its first step.
    from utils.training.build import build_configured_model

    monkeypatch.setitem(models.MODELS, "deeper-decoder", type(deeper_decoder))
    cfg = {
        "model": {"name": "deeper-decoder", "kwargs": {}},
        "train_params": {"N": 8, "crop_size": 64, "lmbda": 0.01},
    }
    with pytest.raises(ValueError, match=f"model 'deeper-decoder': {message}"):
        build_configured_model(cfg)


def test_a_checkpoint_of_a_decoder_reaching_too_far_is_refused_on_loading(
    tmp_path, monkeypatch
):
    """Trained outside train.py, the variant still never reaches the coders: codec.py
    and test.py load it through load_checkpoint, which refuses it in one line."""
    deeper = _deeper_cps(analysis=False, synthesis=True)
    monkeypatch.setitem(models.MODELS, "deeper-decoder", deeper)
    model = deeper()
    model.update(force=True)
    path = tmp_path / "deeper.pth.tar"
    torch.save(
        {
            "architecture": "deeper-decoder",
            "model_config": dict(model.config),
            "state_dict": model.state_dict(),
        },
        path,
    )
    with pytest.raises(ValueError) as caught:
        models.load_checkpoint(str(path), "cpu")
    assert str(caught.value).startswith(
        f"checkpoint {path} ('deeper-decoder'): g_s reads 3 latent positions on each "
        "side, more than the 2 that g_a's geometry leaves"
    )


class _LopsidedDecoder(torch.nn.Module):
    """Scale 16; each output pixel reads ``behind`` pixels to its left and ``ahead``
    to its right after the upsampling, so g_s reaches unequally far on each side."""

    M = 4

    def __init__(self, behind: int, ahead: int):
        super().__init__()
        self.g_a = torch.nn.Conv2d(3, self.M, kernel_size=16, stride=16)
        self.g_s = torch.nn.Sequential(
            torch.nn.ConvTranspose2d(self.M, 3, kernel_size=16, stride=16),
            torch.nn.ZeroPad2d((behind, ahead, 0, 0)),
            torch.nn.Conv2d(3, 3, kernel_size=(1, behind + ahead + 1)),
        )


@pytest.mark.parametrize(
    "behind, ahead, reach",
    [(0, 0, 0), (0, 1, 1), (0, 16, 1), (0, 17, 2), (1, 0, 1), (17, 0, 2), (3, 20, 2)],
)
def test_the_synthesis_reach_is_the_farther_side_of_a_lopsided_decoder(
    behind, ahead, reach
):
    torch.manual_seed(0)
    model = _LopsidedDecoder(behind, ahead)
    # Brute force: which latent columns move the 16 pixel columns of column 6?
    block = slice(6 * 16, 7 * 16)
    influencing = _changed_columns(
        lambda y: model.g_s(y)[..., block], torch.rand(1, 4, 2, 13), 13, slice(None)
    )
    assert influencing == list(range(influencing[0], influencing[-1] + 1))
    assert max(6 - influencing[0], influencing[-1] - 6) == reach
    assert synthesis_reach(model) == reach


def test_a_cps_variant_with_deeper_transforms_codes_patch_wise_bit_exactly():
    """A researcher's variant (one more BRB at 1/8 scale on each side) gets its own
    geometry, r = 104 and a 96 px overlap, and patches still give the whole-image file
    and image bit for bit: nothing of the paper's 72/64 is assumed anywhere."""
    from models.base import CodingPlan
    from utils.coding.container import pack, unpack
    from utils.stitching.spec import PatchSpec

    torch.manual_seed(0)
    model = _deeper_cps(analysis=True, synthesis=True)()
    check_synthesis_reach(model)
    model.update(force=True)
    model.eval()
    geometry = model_geometry(model)
    assert (geometry.receptive_field, geometry.scale, geometry.overlap) == (104, 16, 96)
    image = torch.randint(0, 256, (3, 150, 230), dtype=torch.uint8)
    whole = CodingPlan(patch=PatchSpec(0))
    data = pack(model.encode(image, whole))
    decoded = model.decode(unpack(data), whole)
    for size in (128, 160):
        patched = CodingPlan(patch=PatchSpec(size))
        assert pack(model.encode(image, patched)) == data
        assert torch.equal(model.decode(unpack(data), patched), decoded)
