"""Mei et al. 2021 scalable models: geometry, reuse, joint loss, pyramid and training.

Tiny widths (8-16 channels) and 64x64 / 128x128 images keep the file fast; the
published widths are only instantiated to check the channel bookkeeping of the quality
and spatial models.
"""

import math

import pytest
import torch

import models
from models.mei2021.loss import ScalableRDLoss
from models.mei2021.network import Mei2021Quality, Mei2021Spatial
from models.mei2021.pyramid import image_pyramid, pyramid_sizes, reference_pyramid
from utils.training.optimizers import build_optimizers
from utils.training.step import TrainStep

QUALITY_WIDTHS = [8, 10, 12, 14]
SPATIAL_WIDTHS = [8, 10, 12]


def tiny_quality(**kwargs):
    torch.manual_seed(0)
    return Mei2021Quality(
        num_filters=QUALITY_WIDTHS, lmbdas=[4.0, 3.0, 2.0, 1.0], **kwargs
    )


def tiny_spatial(**kwargs):
    torch.manual_seed(0)
    return Mei2021Spatial(num_filters=SPATIAL_WIDTHS, lmbdas=[3.0, 2.0, 1.0], **kwargs)


def test_both_models_are_registered_under_their_issue_names():
    assert models.get_model_class("mei2021-quality") is Mei2021Quality
    assert models.get_model_class("mei2021-spatial") is Mei2021Spatial


def test_published_widths_give_the_synthesis_and_predictor_inputs_of_the_paper():
    quality = Mei2021Quality()
    assert [g[0].in_channels for g in quality.g_s] == [96, 216, 360, 556]
    assert [p.conv1.in_channels for p in quality.predictors] == [96, 216, 360]
    assert quality.lmbdas.tolist() == [250.0, 100.0, 50.0, 25.0]
    spatial = Mei2021Spatial()
    assert [g[0].in_channels for g in spatial.g_s] == [96, 192, 192]
    assert [p.conv1.in_channels for p in spatial.predictors] == [96, 192]
    assert [u[0].in_channels for u in spatial.up] == [96, 192]
    assert [u[-1].out_channels for u in spatial.up] == [96, 96]
    assert spatial.downsampling_factor == 128 and quality.downsampling_factor == 64


def test_quality_forward_has_full_resolution_latents_and_outputs_for_every_layer():
    model = tiny_quality()
    x = torch.rand(2, 3, 64, 128)
    out = model(x)
    assert list(out["likelihoods"]) == ["yB", "r1", "r2", "r3"]
    shapes = [tuple(p.shape) for p in out["likelihoods"].values()]
    assert shapes == [(2, n, 4, 8) for n in QUALITY_WIDTHS]
    assert [tuple(t.shape) for t in out["x_hats"]] == [(2, 3, 64, 128)] * 4
    assert out["x_hat"] is out["x_hats"][-1]
    assert all(t is x for t in out["targets"])


def test_spatial_forward_works_at_quarter_half_and_full_resolution():
    model = tiny_spatial()
    x = torch.rand(1, 3, 128, 256)
    out = model(x)
    shapes = [tuple(p.shape[-2:]) for p in out["likelihoods"].values()]
    assert shapes == [(2, 4), (4, 8), (8, 16)]  # H/64, H/32, H/16
    assert [tuple(t.shape[-2:]) for t in out["x_hats"]] == [
        (32, 64),
        (64, 128),
        (128, 256),
    ]
    assert [tuple(t.shape[-2:]) for t in out["targets"]] == [
        (32, 64),
        (64, 128),
        (128, 256),
    ]
    assert out["targets"][-1] is x


@pytest.mark.parametrize(
    "factory, size", [(tiny_quality, (64, 100)), (tiny_spatial, (64, 64))]
)
def test_forward_rejects_sides_that_are_not_multiples_of_the_downsampling_factor(
    factory, size
):
    with pytest.raises(ValueError, match="multiples of"):
        factory()(torch.rand(1, 3, *size))


def test_up_transform_is_linear():
    model = tiny_spatial()
    up = model.up[0]
    a, b = torch.randn(1, 8, 3, 5), torch.randn(1, 8, 3, 5)
    zero = torch.zeros_like(a)
    residual = up(a + b) - up(a) - up(b) + up(zero)
    assert residual.abs().max() < 1e-5
    assert up(a).shape == (1, 8, 6, 10)


def test_prediction_transform_sums_its_skips_as_the_paper_draws_them():
    predictor = tiny_quality().predictors[0]
    seen = {}
    for name in ("conv5", "deconv7"):
        getattr(predictor, name).register_forward_hook(
            lambda module, args, output, name=name: seen.__setitem__(name, args[0])
        )
    for name in ("gdn2", "conv4", "conv6"):
        getattr(predictor, name).register_forward_hook(
            lambda module, args, output, name=name: seen.__setitem__(name, output)
        )
    out = predictor(torch.randn(1, 8, 8, 8))
    assert torch.allclose(seen["conv5"], seen["conv4"] + seen["gdn2"])
    assert torch.allclose(seen["deconv7"], seen["conv6"] + seen["conv4"] + seen["gdn2"])
    assert out.shape == (1, 10, 8, 8)


def test_base_loss_ignores_enhancement_modules_but_enhancement_loss_trains_the_base():
    model = tiny_quality()
    x = torch.rand(1, 3, 64, 64)
    out = model(x)
    losses = ScalableRDLoss([1.0, 1.0, 1.0, 1.0], cumulative=True)(out, x)
    base_loss = 4.0 * losses["bpp_loss_0"] + 255.0**2 * losses["mse_loss_0"]
    e1_modules = [model.g_a[1], model.predictors[0], model.g_s[1]]
    e1_params = [p for m in e1_modules for p in m.parameters()]
    grads = torch.autograd.grad(base_loss, e1_params, allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    e1_loss = losses["bpp_loss_1"] + 255.0**2 * losses["mse_loss_1"]
    grads = torch.autograd.grad(e1_loss, list(model.g_a[0].parameters()))
    assert any(torch.count_nonzero(g) > 0 for g in grads)


def _fake_output(sizes, bits_per_element, batch=2):
    """Model-like output.

    Its likelihoods make each layer cost a known number of bits.
    """
    torch.manual_seed(1)
    targets = [torch.rand(batch, 3, h, w) for h, w in sizes]
    x_hats = [t + 0.01 * (k + 1) for k, t in enumerate(targets)]
    likelihoods = {
        f"l{k}": torch.full((batch, 4, h // 16, w // 16), 2.0 ** -bits_per_element[k])
        for k, (h, w) in enumerate(sizes)
    }
    return {
        "x_hat": x_hats[-1],
        "x_hats": x_hats,
        "targets": targets,
        "likelihoods": likelihoods,
    }


def test_quality_loss_charges_cumulative_rates():
    out = _fake_output([(32, 64)] * 3, [1.0, 2.0, 3.0])
    lmbdas = [250.0, 100.0, 50.0]
    losses = ScalableRDLoss(lmbdas, cumulative=True)(out, out["targets"][-1])
    pixels = 2 * 32 * 64
    bits = [2 * 4 * 2 * 4 * b for b in (1.0, 2.0, 3.0)]  # elements x bits per element
    rates = [sum(bits[: k + 1]) / pixels for k in range(3)]
    mses = [0.01**2, 0.02**2, 0.03**2]
    expected = sum(lam * r + 255.0**2 * m for lam, r, m in zip(lmbdas, rates, mses))
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-4)
    assert losses["bpp_loss"].item() == pytest.approx(rates[-1], rel=1e-5)
    assert losses["bpp_loss_1"].item() == pytest.approx(rates[1], rel=1e-5)
    assert losses["mse_loss"].item() == pytest.approx(mses[-1], rel=1e-3)


def test_spatial_loss_normalises_each_rate_by_its_own_resolution_without_accumulating():
    sizes = [(32, 32), (64, 64), (128, 128)]
    out = _fake_output(sizes, [2.0, 2.0, 2.0])
    lmbdas = [400.0, 300.0, 200.0]
    losses = ScalableRDLoss(lmbdas, cumulative=False)(out, out["targets"][-1])
    bits = [2 * 4 * (h // 16) * (w // 16) * 2.0 for h, w in sizes]
    rates = [b / (2 * h * w) for b, (h, w) in zip(bits, sizes)]
    assert rates == pytest.approx([1 / 32] * 3)
    mses = [0.01**2, 0.02**2, 0.03**2]
    expected = sum(lam * r + 255.0**2 * m for lam, r, m in zip(lmbdas, rates, mses))
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-4)
    assert losses["bpp_loss_2"].item() == pytest.approx(rates[2], rel=1e-5)
    assert losses["bpp_loss"].item() == pytest.approx(
        sum(bits) / (2 * 128 * 128), rel=1e-5
    )


def test_loss_rejects_an_output_with_another_number_of_layers():
    out = _fake_output([(32, 32)] * 2, [1.0, 1.0])
    with pytest.raises(ValueError, match="3 lambdas"):
        ScalableRDLoss([1.0, 2.0, 3.0], cumulative=True)(out, out["targets"][-1])


@pytest.mark.parametrize("cls", [Mei2021Quality, Mei2021Spatial])
def test_joint_loss_decreases_on_a_tiny_run(cls):
    torch.manual_seed(0)
    model = cls(num_filters=[6, 8], lmbdas=[2.0, 1.0])  # two layers keep it fast
    criterion = model.default_loss()
    side = 64
    ramp = torch.linspace(0, 1, side)
    gradient = torch.stack(
        [
            ramp[None, :].expand(side, side),
            ramp[:, None].expand(side, side),
            torch.full((side, side), 0.3),
        ]
    )
    images = torch.stack([gradient, torch.rand(3, side, side).mul(0.2).add(0.4)])
    optimizer, aux_optimizer = build_optimizers(model, 2e-3, 1e-3)
    # The generic training step of train.py, with the model's own joint loss.
    step = TrainStep(
        model, model, criterion, optimizer, aux_optimizer, clip_max_norm=0.0
    )
    stats = [step(images, k) for k in range(20)]
    losses = [s["loss"] for s in stats]
    assert all(math.isfinite(v) for v in losses) and not any(
        s["skipped"] for s in stats
    )
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert stats[-1]["aux"] < stats[0]["aux"]


def test_config_and_from_state_dict_rebuild_the_same_model_with_its_lambdas():
    model = tiny_spatial()
    assert model.config == {"num_filters": SPATIAL_WIDTHS, "lmbdas": [3.0, 2.0, 1.0]}
    model.eval().update(force=True)
    clone = Mei2021Spatial.from_state_dict(model.state_dict()).eval()
    assert clone.config == model.config
    x = torch.rand(1, 3, 128, 128)
    assert torch.equal(clone(x)["x_hat"], model(x)["x_hat"])
    assert clone.default_loss().lmbdas == [3.0, 2.0, 1.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_filters": [8], "lmbdas": [1.0]}, "at least 2 layers"),
        ({"num_filters": [8, 8], "lmbdas": [1.0]}, "one lambda per layer"),
        ({"num_filters": [8, 0], "lmbdas": [1.0, 1.0]}, "integers in"),
        ({"num_filters": [8, 8], "lmbdas": [1.0, -2.0]}, "positive"),
        # It used to pass here and fail later as "non-finite weights ... from a
        # diverged training run".
        (
            {"num_filters": [8, 8], "lmbdas": [math.inf, 1.0]},
            r"lmbdas entries must be positive finite numbers, got \[inf, 1.0\]",
        ),
        ({"num_filters": [8, 8], "lmbdas": [1.0, 1.0], "N": 192}, "train_params.N"),
    ],
)
def test_constructor_rejects_inconsistent_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Mei2021Quality(**kwargs)


def test_generic_trainer_width_is_accepted_when_it_names_the_base_width():
    assert Mei2021Quality(num_filters=[8, 8], lmbdas=[2.0, 1.0], N=8).num_filters == (
        8,
        8,
    )


@pytest.mark.parametrize(
    "height, width, expected",
    [
        (37, 50, [(10, 13), (19, 25), (37, 50)]),
        (1, 3, [(1, 1), (1, 2), (1, 3)]),
        (128, 64, [(32, 16), (64, 32), (128, 64)]),
    ],
)
def test_pyramid_sizes_round_odd_sides_up(height, width, expected):
    assert pyramid_sizes(height, width, 3) == expected


def test_image_pyramid_keeps_constant_images_constant_and_halves_exactly():
    x = torch.full((1, 3, 16, 24), 0.25)
    levels = image_pyramid(x, 3)
    assert [tuple(t.shape[-2:]) for t in levels] == [(4, 6), (8, 12), (16, 24)]
    assert all(torch.allclose(t, x[..., : t.shape[-2], : t.shape[-1]]) for t in levels)
    with pytest.raises(ValueError, match="multiples of 4"):
        image_pyramid(torch.rand(1, 3, 18, 24), 3)


def test_image_pyramid_averages_a_fine_checkerboard_to_mid_grey():
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2
    x = checker.float().expand(1, 3, 32, 32)
    quarter = image_pyramid(x, 3)[0]
    assert torch.allclose(quarter, torch.full_like(quarter, 0.5), atol=0.02)


def test_reference_pyramid_crops_odd_images_to_their_level_sizes():
    image = torch.randint(0, 256, (3, 37, 50), dtype=torch.uint8)
    levels = reference_pyramid(image, 3, 128)
    assert [tuple(t.shape[-2:]) for t in levels] == pyramid_sizes(37, 50, 3)
    assert torch.equal(levels[-1], image)
    assert all(t.dtype == torch.uint8 for t in levels)


def test_load_checkpoint_rebuilds_a_saved_model_from_its_architecture_entry(tmp_path):
    model = tiny_quality().eval()
    model.update(force=True)
    path = tmp_path / "mei.pth.tar"
    torch.save(
        {"architecture": "mei2021-quality", "state_dict": model.state_dict()}, path
    )
    loaded = models.load_checkpoint(str(path), "cpu")
    assert isinstance(loaded, Mei2021Quality) and loaded.config == model.config
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(loaded(x)["x_hat"], model(x)["x_hat"])


def test_a_bfloat16_step_keeps_the_per_layer_outputs_the_joint_loss_needs():
    torch.manual_seed(0)
    model = Mei2021Quality(num_filters=[6, 8], lmbdas=[2.0, 1.0])
    optimizer, aux_optimizer = build_optimizers(model, 1e-3, 1e-3)
    step = TrainStep(
        model, model, model.default_loss(), optimizer, aux_optimizer, amp=True
    )
    before = [p.clone() for p in model.parameters()]
    stats = step(torch.rand(2, 3, 64, 64), 0)
    assert stats["skipped"] == 0.0 and math.isfinite(stats["loss"])
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def write_layered_config(tmp_path, name, max_steps):
    """A tiny two-layer ``name`` model's training config (lambdas 2 and 1) over
    generated images, written in ``tmp_path``; the run writes to ``tmp_path/run``."""
    from test_train_data import make_image_folder, write_train_config

    return write_train_config(
        tmp_path,
        make_image_folder(tmp_path / "data"),
        tmp_path / "run",
        train_params={"max_steps": max_steps, "N": 8},
        model={"name": name, "kwargs": {"num_filters": [8, 8], "lmbdas": [2.0, 1.0]}},
    )


@pytest.mark.parametrize("name", ["mei2021-quality", "mei2021-spatial"])
def test_train_py_trains_a_layered_model_with_its_joint_loss(tmp_path, name):
    import os

    from models.mei2021.loss import ScalableRDLoss
    from utils.training.config import load_config
    from utils.training.distributed import DistContext
    from utils.training.loop import Trainer

    config = write_layered_config(tmp_path, name, max_steps=2)
    with open(os.devnull, "w") as quiet:
        trainer = Trainer(
            load_config(config), DistContext(0, 1, torch.device("cpu")), log=quiet
        )
        assert isinstance(trainer.criterion, ScalableRDLoss)
        assert trainer.fit() == 0
    assert (tmp_path / "run" / "checkpoint_best_loss.pth.tar").is_file()


def test_init_from_weights_of_another_layer_count_names_the_keys_to_set(tmp_path):
    """The file's own lambdas size it: with the run's swapped in, the three-layer
    weights rebuilt nothing and the error listed 115 unexpected keys instead."""
    from utils.training.state_loading import init_weights_from

    three = Mei2021Quality(num_filters=[8, 8, 8], lmbdas=[3.0, 2.0, 1.0])
    path = tmp_path / "three.pth.tar"
    torch.save({"state_dict": three.state_dict()}, path)
    two = Mei2021Quality(num_filters=[8, 8], lmbdas=[2.0, 1.0])
    with pytest.raises(ValueError) as error:
        init_weights_from(str(path), two)
    assert str(error.value) == (
        f"cannot initialise from {path}: its weights have lmbdas=[3.0, 2.0, 1.0], "
        "num_filters=[8, 8, 8], this run's model lmbdas=[2.0, 1.0], num_filters="
        "[8, 8] (set model.kwargs.lmbdas, model.kwargs.num_filters to match)"
    )


def test_a_layered_run_resumed_or_fine_tuned_with_other_lmbdas_records_them(tmp_path):
    """The lambdas the run trains with (the config's) are the ones its checkpoints
    store: loading the earlier weights used to put the old lambdas back in the
    model's buffer, so the files said the model was trained for those."""
    import os

    import train

    config = write_layered_config(tmp_path, "mei2021-quality", max_steps=1)
    assert train.main(["--config", config]) == 0
    last = str(tmp_path / "run" / "checkpoint.pth.tar")
    other = "model.kwargs={num_filters: [8, 8], lmbdas: [20.0, 10.0]}"
    assert (
        train.main(["--resume", last, "--set", other, "train_params.max_steps=2"]) == 0
    )
    fine_tuned = "train_data.experiment_path=" + str(tmp_path / "tuned")
    assert (
        train.main(
            ["--config", config, "--init-from", last, "--set", other, fine_tuned]
        )
        == 0
    )
    for run in ("run", "tuned"):
        for name in ("checkpoint.pth.tar", "checkpoint_best_loss.pth.tar"):
            path = os.path.join(tmp_path, run, name)
            stored = torch.load(path, map_location="cpu", weights_only=True)
            assert stored["state_dict"]["lmbdas"].tolist() == [20.0, 10.0]
            assert stored["model_config"]["lmbdas"] == [20.0, 10.0]
        best = os.path.join(tmp_path, run, "checkpoint_best_loss.pth.tar")
        assert models.load_checkpoint(best, "cpu").default_loss().lmbdas == [
            20.0,
            10.0,
        ]
