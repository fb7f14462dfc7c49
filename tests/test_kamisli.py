"""The Kamisli (2024) network: block layout, masks, causality, reach and presets."""

import glob
import os

import pytest
import torch
import yaml
from compressai.losses import RateDistortionLoss

import models
from models.kamisli2024.layers import (
    BlockMaskedConv2d,
    block_mask,
    compose_reach,
    from_blocks,
    network_reach,
    to_blocks,
)
from models.kamisli2024.network import Kamisli2024

CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"
)
KERNELS = {"KS3111": [3, 1, 1, 1], "KS3311": [3, 3, 1, 1]}
# The blocks a block depends on, as (row, column) offsets: the 4 causal neighbours
# through the 'A' mask, and with a 3x3 second entropy layer (KS3311) rows i-2 (cols
# j-2..j+2), i-1 (cols j-2..j+1) and i (cols j-2, j-1).
FOUR_NEIGHBOURS = {(-1, -1), (-1, 0), (-1, 1), (0, -1)}
KS3311_ENTROPY_REACH = (
    {(-2, j) for j in range(-2, 3)}
    | {(-1, j) for j in range(-2, 2)}
    | {(0, -2), (0, -1)}
)


def tiny(kernel_sizes, block_size=2, seed=0):
    torch.manual_seed(seed)
    return Kamisli2024(
        block_size=block_size, N=8, M=4, kernel_sizes=kernel_sizes
    ).eval()


def branches(model, x, z):
    """y, scales, means and the block reconstruction of an eval-mode open-loop pass."""
    blocks = to_blocks(x - 0.5, model.block_size)
    context = to_blocks(z - 0.5, model.block_size)
    y = model.g_a(model.g_a_source(blocks) + model.g_a_context(context))
    scales, means = model.entropy_parameters(context).chunk(2, 1)
    y_hat = model.gaussian_conditional.quantize(y, "dequantize", means)
    x_hat = model.g_s(model.g_s_latent(y_hat) + model.g_s_context(context))
    return {"y": y, "scales": scales, "means": means, "x_hat": x_hat}


def test_block_layout_is_position_major_and_inverts_exactly():
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    blocks = to_blocks(x, 4)
    assert blocks.shape == (2, 48, 2, 3)
    for v, h, c in [(0, 0, 0), (1, 2, 1), (3, 3, 2), (2, 0, 1)]:
        # sample (v, h) of block (1, 2), colour c, sits in channel (v*B + h)*3 + c
        assert blocks[1, (v * 4 + h) * 3 + c, 1, 2] == x[1, c, 4 + v, 8 + h]
    assert torch.equal(from_blocks(blocks, 4), x)
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        to_blocks(x[:, :, :7], 4)


def test_masks_match_the_paper():
    assert block_mask("A", 3).tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert block_mask("B", 3).tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 0]]
    assert block_mask("B", 1).tolist() == [[1]]
    assert block_mask("A", 5).tolist() == [
        [1] * 5,
        [1] * 5,
        [1, 1, 0, 0, 0],
        [0] * 5,
        [0] * 5,
    ]
    with pytest.raises(ValueError, match="sees nothing"):
        BlockMaskedConv2d("A", 3, 3, 1)
    with pytest.raises(ValueError, match="odd kernel size"):
        block_mask("A", 4)
    with pytest.raises(ValueError, match="unknown mask kind"):
        block_mask("C", 3)


def test_masked_taps_are_zero_stay_zero_and_get_no_gradient():
    torch.manual_seed(0)
    conv = BlockMaskedConv2d("A", 2, 3, 3)
    closed = block_mask("A", 3) == 0
    assert torch.all(conv.weight[:, :, closed] == 0)
    conv.weight.data.normal_()  # even if the masked taps held values ...
    before = conv.weight.detach().clone()
    x = torch.randn(1, 2, 5, 5)
    out = conv(x)
    out.sum().backward()
    # ... the forward does not rewrite the weight,
    assert torch.equal(conv.weight, before)
    expected = torch.nn.functional.conv2d(x, before * ~closed, conv.bias, padding=1)
    assert torch.allclose(out, expected, atol=1e-6)  # ... it ignores them
    assert torch.all(conv.weight.grad[:, :, closed] == 0)
    assert torch.all(conv.weight.grad[:, :, ~closed] != 0)
    assert "mask" not in conv.state_dict()  # derived, not stored


def test_compose_reach_of_two_3x3_masks_is_the_papers_set():
    reach = compose_reach(
        [BlockMaskedConv2d("A", 1, 1, 3).taps(), BlockMaskedConv2d("B", 1, 1, 3).taps()]
    )
    assert reach == KS3311_ENTROPY_REACH
    assert (-1, 2) not in reach and (-2, 2) in reach


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_receptive_field_equals_a_brute_force_oracle(name):
    """Perturb the context at one block; the outputs that change are exactly the
    blocks whose reach contains it, branch by branch."""
    model = tiny(KERNELS[name])
    torch.manual_seed(1)
    x, z = torch.rand(1, 3, 20, 20), torch.rand(1, 3, 20, 20)
    centre = (5, 5)
    z2 = z.clone()
    z2[:, :, 10:12, 10:12] = torch.rand(1, 3, 2, 2)
    with torch.no_grad():
        before, after = branches(model, x, z), branches(model, x, z2)
    found = {}
    for key in before:
        changed = (before[key] != after[key]).any(dim=1)[0]
        found[key] = {
            (centre[0] - int(i), centre[1] - int(j)) for i, j in torch.nonzero(changed)
        }
    entropy_reach = KS3311_ENTROPY_REACH if name == "KS3311" else FOUR_NEIGHBOURS
    assert (
        found["scales"]
        == found["means"]
        == entropy_reach
        == network_reach(model.entropy_parameters)
    )
    # y and x_hat read the context directly, and through the means of y_hat
    assert found["y"] == FOUR_NEIGHBOURS
    assert found["x_hat"] == FOUR_NEIGHBOURS | entropy_reach
    assert model.context_reach() == FOUR_NEIGHBOURS | entropy_reach


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_changing_one_block_never_changes_an_earlier_block(name):
    model = tiny(KERNELS[name], block_size=4)
    torch.manual_seed(2)
    x, z = torch.rand(1, 3, 24, 28), torch.rand(1, 3, 24, 28)
    rows, cols = 6, 7
    for q in [(0, 3), (2, 0), (3, 4), (5, 6)]:
        z2, x2 = z.clone(), x.clone()
        z2[:, :, 4 * q[0] : 4 * q[0] + 4, 4 * q[1] : 4 * q[1] + 4] += 0.25
        x2[:, :, 4 * q[0] : 4 * q[0] + 4, 4 * q[1] : 4 * q[1] + 4] -= 0.25
        with torch.no_grad():
            base = branches(model, x, z)
            moved_context, moved_source = branches(model, x, z2), branches(model, x2, z)
        order = torch.arange(rows * cols).reshape(rows, cols)
        earlier_or_same = order <= q[0] * cols + q[1]
        later = order > q[0] * cols + q[1]
        for key in base:
            context_diff = (base[key] != moved_context[key]).any(dim=1)[0]
            assert not context_diff[earlier_or_same].any(), (key, q)
            source_diff = (base[key] != moved_source[key]).any(dim=1)[0]
            if key == "y":  # the source block itself, and nothing else
                assert source_diff[q] and source_diff.sum() == 1, (key, q)
            elif key == "x_hat":  # y_hat may round to the same values
                assert source_diff.sum() == source_diff[q], (key, q)
            else:
                assert not source_diff.any()
        if q != (rows - 1, cols - 1):
            assert (base["x_hat"] != moved_context["x_hat"]).any(dim=1)[0][later].any()


@pytest.mark.parametrize(
    "kernel_sizes, slope",
    [([3, 1, 1, 1], 2), ([3, 3, 1, 1], 2), ([5, 1, 1, 1], 3), ([5, 3, 1, 1], 3)],
)
def test_wavefront_slope_is_the_smallest_that_orders_the_reach(kernel_sizes, slope):
    model = tiny(kernel_sizes)
    reach = model.context_reach()
    assert model.wavefront_slope == slope
    assert all(slope * di + dj < 0 for di, dj in reach)
    assert any((slope - 1) * di + dj >= 0 for di, dj in reach)


def test_forward_pads_any_size_and_returns_compressai_outputs():
    model = tiny([3, 1, 1, 1], block_size=4)
    out = model(torch.rand(2, 3, 13, 18))
    assert out["x_hat"].shape == (2, 3, 13, 18)
    assert out["likelihoods"]["y"].shape == (2, 4, 4, 5)
    assert torch.all(out["likelihoods"]["y"] > 0) and torch.all(
        out["likelihoods"]["y"] <= 1
    )
    with pytest.raises(ValueError, match="context shape"):
        model(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 12))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"N": 12}, "multiple of 8"),
        ({"kernel_sizes": [3, 1, 3, 1]}, r"kernel_sizes\[2:\]"),
        ({"kernel_sizes": [2, 1, 1, 1]}, "odd"),
        ({"kernel_sizes": [3, 1, 1]}, "4 integers"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_bad_constructor_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Kamisli2024(**{"block_size": 2, "N": 8, "M": 4, **kwargs})


def test_registry_config_and_state_dict_round_trip(tmp_path):
    assert models.get_model_class("kamisli2024") is Kamisli2024
    assert models.get_model_class("lbbic") is Kamisli2024
    model = tiny([3, 3, 1, 1], block_size=4)
    model.update(force=True)
    rebuilt = Kamisli2024.from_state_dict(model.state_dict())
    assert (
        rebuilt.config
        == model.config
        == {"block_size": 4, "N": 8, "M": 4, "kernel_sizes": [3, 3, 1, 1]}
    )
    path = tmp_path / "k.pth.tar"
    # As DDP saves it.
    wrapped = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"architecture": "kamisli2024", "state_dict": wrapped}, path)
    loaded = models.load_checkpoint(str(path))
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded(x)["x_hat"], model(x)["x_hat"])


def test_rate_is_charged_to_the_original_pixels_with_compressais_lambda():
    """The authors' loss R + lambda_ * MSE with lambda_ = 255^2 * lmbda (their config's
    ``lambda_``), R in bits per pixel of the unpadded image, is CompressAI's
    RateDistortionLoss."""
    model = tiny([3, 1, 1, 1], block_size=4)
    torch.manual_seed(3)
    x = torch.rand(2, 3, 13, 18)  # padded to 16 x 20 for the blocks
    with torch.no_grad():
        out = model(x)
    bpp = float(-out["likelihoods"]["y"].log2().sum()) / (2 * 13 * 18)
    mse = float(((out["x_hat"] - x) ** 2).mean())
    loss = float(RateDistortionLoss(0.0018)(out, x)["loss"])
    assert loss == pytest.approx(bpp + 117.045 * mse, rel=1e-5)


def _presets():
    return sorted(glob.glob(os.path.join(CONFIGS, "kamisli_*.yaml")))


# Widths of the v9 network (autoencoder N, 7N/8, 6N/8; entropy net 12N/8, 10N/8, 8N/8)
# and parameter counts in millions, total and without the masked-out taps.
EXPECTED = {
    "kamisli_B4_KS3311_N512M96.yaml": (
        4,
        512,
        96,
        (512, 448, 384),
        (768, 640, 512),
        7.78,
        5.39,
    ),
    "kamisli_B8_KS3111_N768M96.yaml": (
        8,
        768,
        96,
        (768, 672, 576),
        (1152, 960, 768),
        11.59,
        9.01,
    ),
    "kamisli_B8_KS3311_N1152M128.yaml": (
        8,
        1152,
        128,
        (1152, 1008, 864),
        (1728, 1440, 1152),
        42.22,
        28.40,
    ),
    "kamisli_B16_KS3111_N1280M192.yaml": (
        16,
        1280,
        192,
        (1280, 1120, 960),
        (1920, 1600, 1280),
        51.40,
        34.19,
    ),
}
# The authors' experiment folders exp_<lambda_>, with lambda_ = 255^2 * lmbda.
AUTHORS_LAMBDAS = [
    117.045,
    227.5875,
    435.6675,
    845.325,
    1625.625,
    3140.7075,
    6060.33,
    11704.5,
]


def test_the_four_presets_ship_and_build_with_the_papers_sizes():
    assert [os.path.basename(p) for p in _presets()] == sorted(EXPECTED)
    for path in _presets():
        with open(path) as f:
            cfg = yaml.safe_load(f)
        block, n, m, widths, entropy, total, active = EXPECTED[os.path.basename(path)]
        assert cfg["model"]["name"] == "kamisli2024"
        model = models.build_model(
            "kamisli2024", N=cfg["train_params"]["N"], **cfg["model"]["kwargs"]
        )
        assert (model.block_size, model.N, model.M) == (block, n, m)
        assert (
            model.g_a_source.out_channels,
            model.g_a[1].out_channels,
            model.g_a[3].out_channels,
        ) == widths
        assert model.g_s[5].out_channels == 3 * block**2
        ent = model.entropy_parameters
        widths = tuple(ent[i].out_channels for i in (0, 2, 4, 6))
        assert widths == (*entropy, 2 * m)
        count = sum(p.numel() for p in model.parameters())
        # The paper's "active" count leaves out the weights the masks force to zero.
        masked = sum(
            int((layer.mask == 0).expand_as(layer.weight).sum())
            for layer in model.modules()
            if isinstance(layer, BlockMaskedConv2d)
        )
        assert (
            abs(count / 1e6 - total) < 0.006
            and abs((count - masked) / 1e6 - active) < 0.006
        )
        assert model.wavefront_slope == 2
        assert any(
            abs(cfg["train_params"]["lmbda"] * 255**2 - lam) < 1e-6
            for lam in AUTHORS_LAMBDAS
        )
