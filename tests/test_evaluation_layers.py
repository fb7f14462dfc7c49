"""test.py with scalable models (mei2021).

One RD point per layer, one curve per layer.
"""

import json

import numpy as np
import pytest
import torch
from conftest import save_model_checkpoint
from PIL import Image

import test as test_script
from models.mei2021.network import Mei2021Quality, Mei2021Spatial
from utils.evaluation.curves import load_curves


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(2):
        pixels = np.linspace(0, 200, 90)[None, :, None] + rng.integers(
            0, 40, (70, 90, 3)
        )
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"im{index}.png")
    return folder


@pytest.mark.parametrize(
    "kind, sizes",
    [
        (Mei2021Quality, [(70, 90)] * 3),
        (Mei2021Spatial, [(18, 23), (35, 45), (70, 90)]),
    ],
)
def test_each_layer_is_an_operating_point_with_cumulative_real_rate(
    tmp_path, images, capsys, kind, sizes
):
    torch.manual_seed(0)
    checkpoints = [
        save_model_checkpoint(
            tmp_path, kind(num_filters=[8, 10, 12], lmbdas=[3.0, 2.0, 1.0]), f"m{i}"
        )
        for i in range(2)
    ]
    out = tmp_path / "out"
    status = test_script.main(
        [
            "checkpoint",
            "--dataset",
            str(images),
            "-p",
            *map(str, checkpoints),
            "-d",
            str(out),
            "--per-image",
            "--no-progress",
        ]
    )
    assert status == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert results["layer"] == [0, 1, 2, 0, 1, 2]
    page = json.loads((out / "per-image" / "im0.json").read_text())["results"]
    for k, (height, width) in enumerate(sizes):
        # Bits of every stream up to layer k, over the pixels of layer k.
        num_bytes = page["bpp"][k] * height * width / 8
        assert num_bytes == pytest.approx(round(num_bytes), abs=1e-6)
    assert (
        page["bpp"][0] * sizes[0][0] * sizes[0][1]
        < page["bpp"][2] * sizes[2][0] * sizes[2][1]
    )
    curves = load_curves(str(out / "results.json"))
    assert [c.name.rsplit(" ", 2)[-2:] for c in curves] == [
        ["layer", "0"],
        ["layer", "1"],
        ["layer", "2"],
    ]
    assert all(len(c.bpp) == 2 for c in curves)
    plot = ["plot", str(out / "results.json"), "-o", str(tmp_path / "rd.png")]
    assert test_script.main(plot) == 0


def _small_checkpoint(tmp_path, kind):
    torch.manual_seed(0)
    model = kind(num_filters=[8, 10, 12], lmbdas=[3.0, 2.0, 1.0])
    return save_model_checkpoint(tmp_path, model, "m")


@pytest.mark.parametrize("kind", [Mei2021Quality, Mei2021Spatial])
def test_entropy_estimation_gives_one_point_per_layer(tmp_path, images, capsys, kind):
    checkpoint = _small_checkpoint(tmp_path, kind)
    argv = ["checkpoint", "--dataset", str(images), "-p", str(checkpoint)]
    assert test_script.main([*argv, "--no-progress"]) == 0
    real = json.loads(capsys.readouterr().out)["results"]
    status = test_script.main([*argv, "--no-progress", "--entropy-estimation"])
    assert status == 0
    estimated = json.loads(capsys.readouterr().out)["results"]
    assert estimated["layer"] == [0, 1, 2]
    # The likelihoods of layers <= k over the pixels of layer k: what the real
    # coder reports beside its file sizes.
    assert estimated["bpp"] == pytest.approx(real["bpp_est"], rel=1e-3)
    assert estimated["psnr-rgb"] == pytest.approx(real["psnr-rgb"], abs=0.5)


def test_naive_tiles_of_a_quality_model_keep_their_layers(tmp_path, images, capsys):
    checkpoint = _small_checkpoint(tmp_path, Mei2021Quality)
    argv = ["checkpoint", "--dataset", str(images), "-p", str(checkpoint)]
    status = test_script.main(
        [*argv, "--no-progress", "--tiling", "naive", "--patch-size", "64"]
    )
    assert status == 0
    assert json.loads(capsys.readouterr().out)["results"]["layer"] == [0, 1, 2]


def test_naive_tiles_of_a_spatial_model_are_refused_before_coding(
    tmp_path, images, capsys
):
    checkpoint = _small_checkpoint(tmp_path, Mei2021Spatial)
    out = tmp_path / "out"
    argv = ["checkpoint", "--dataset", str(images), "-p", str(checkpoint)]
    status = test_script.main(
        [
            *argv,
            "--no-progress",
            "-d",
            str(out),
            "--tiling",
            "naive",
            "--patch-size",
            "128",
        ]
    )
    assert status == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "naive" in error and "mei2021-spatial" in error
    assert not out.exists()
