"""The BRB kernel size (Table II ablation): geometry, checkpoints, ablation configs."""

import glob
import os

import pytest
import torch
import yaml
from test_pops import _changed_columns
from test_train_data import make_image_folder, write_train_config

import models
import train
from utils.stitching.geometry import analysis_layers, model_geometry
from utils.training.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATION = sorted(glob.glob(os.path.join(REPO, "configs", "ablation", "*.yaml")))


# Tiny models train many times faster on one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "kernel, expected", [(3, (72, 16, 64, 2)), (1, (16, 16, 0, 0))]
)
def test_geometry_follows_the_brb_kernel(kernel, expected):
    model = models.build_model("cps", N=8, brb_kernel_size=kernel)
    assert analysis_layers(model.g_a) == [(2, 2), (kernel, 1), (kernel, 1)] * 3 + [
        (2, 2)
    ]
    geometry = model_geometry(model)
    assert (
        geometry.receptive_field,
        geometry.scale,
        geometry.overlap,
        geometry.margin,
    ) == expected


@pytest.mark.parametrize("kernel", [1, 3])
def test_derived_geometry_matches_brute_force_measurement(kernel):
    torch.manual_seed(0)
    model = models.build_model("cps", N=4, brb_kernel_size=kernel).eval()
    geometry = model_geometry(model)
    probe = 5
    columns = _changed_columns(model.g_a, torch.rand(1, 3, 64, 160), 160, probe)
    assert columns == list(range(columns[0], columns[0] + geometry.receptive_field))
    assert (
        columns[0]
        == probe * geometry.scale - (geometry.receptive_field - geometry.scale) // 2
    )
    # The synthesis transform reaches exactly `margin` latent positions on each side.
    block = slice(6 * geometry.scale, 7 * geometry.scale)
    influencing = _changed_columns(
        lambda y: model.g_s(y)[..., block], torch.randn(1, 4, 4, 12), 12, slice(None)
    )
    assert influencing == list(range(6 - geometry.margin, 6 + geometry.margin + 1))


def test_config_names_the_kernel_only_when_it_is_not_the_papers():
    assert models.build_model("cps", N=8).config == {"N": 8}
    assert models.build_model("cps", N=8, brb_kernel_size=3).config == {"N": 8}
    assert models.build_model("cps", N=8, brb_kernel_size=1).config == {
        "N": 8,
        "brb_kernel_size": 1,
    }


@pytest.mark.parametrize("kernel", [1, 3])
def test_checkpoint_kernel_is_inferred_from_the_weights(tmp_path, kernel):
    torch.manual_seed(0)
    model = models.build_model("cps", N=8, brb_kernel_size=kernel).eval()
    model.update(force=True)
    path = tmp_path / "bare.pth.tar"
    torch.save(model.state_dict(), path)
    loaded = models.load_checkpoint(str(path), "cpu")
    assert loaded.brb_kernel_size == kernel and loaded.config == model.config
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(image)["x_hat"], model(image)["x_hat"])


@pytest.mark.parametrize("kernel", [0, 2, 5, "3"])
def test_unsupported_brb_kernel_is_a_clear_error(kernel):
    with pytest.raises(ValueError, match="brb_kernel_size must be one of \\(1, 3\\)"):
        models.build_model("cps", N=8, brb_kernel_size=kernel)


def test_ablation_covers_the_channels_and_kernels_of_table_2():
    settings = set()
    for path in ABLATION:
        cfg = load_config(path)
        settings.add((cfg.train_params.N, cfg.model.kwargs.get("brb_kernel_size", 3)))
        assert cfg.train_params.lmbda == 0.013
    assert settings == {(128, 3), (192, 1), (256, 3), (192, 3)}


@pytest.mark.parametrize("path", ABLATION, ids=os.path.basename)
def test_each_ablation_config_trains_two_steps(tmp_path, path):
    """The config's model block as written.

    Data, width and batch are shrunk to a tiny run.
    """
    with open(path) as handle:
        raw = yaml.safe_load(handle)
    experiment = tmp_path / "exp"
    cfg = write_train_config(
        tmp_path,
        make_image_folder(tmp_path / "data"),
        experiment,
        train_params={"max_steps": 2},
        **{k: v for k, v in raw.items() if k == "model"},
    )
    assert train.main(["--config", cfg]) == 0
    saved = torch.load(
        experiment / "checkpoint.pth.tar", map_location="cpu", weights_only=True
    )
    assert saved["global_step"] == 2
    kernel = raw.get("model", {}).get("kwargs", {}).get("brb_kernel_size", 3)
    assert saved["model_config"] == (
        {"N": 8} if kernel == 3 else {"N": 8, "brb_kernel_size": 1}
    )
