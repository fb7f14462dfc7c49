"""codec.py with a layered model (mei2021): one .cpsl file, any layer decodable."""

import numpy as np
import pytest
import torch
from conftest import save_model_checkpoint
from PIL import Image

import codec
from models.base import CodingPlan
from models.mei2021.network import Mei2021Quality, Mei2021Spatial
from utils.coding.container import unpack


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.linspace(0, 200, 90)[None, :, None] + rng.integers(0, 40, (70, 90, 3))
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "in.png")
    return tmp_path / "in.png"


def _run(argv, capsys):
    status = codec.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("kind", [Mei2021Quality, Mei2021Spatial])
def test_each_layer_decodes_from_a_file_cut_to_it(tmp_path, photo, capsys, kind):
    torch.manual_seed(0)
    model = kind(num_filters=[8, 10, 12], lmbdas=[3.0, 2.0, 1.0])
    checkpoint = save_model_checkpoint(tmp_path, model, "mei")
    status, out, _ = _run(
        ["encode", photo, tmp_path / "all.cpsl", "-p", checkpoint], capsys
    )
    assert status == 0 and "3 of 3 layers" in out
    full = (tmp_path / "all.cpsl").read_bytes()
    expected = [model.decode(unpack(full), CodingPlan(layers=k)) for k in (1, 2, 3)]
    for k in (1, 2, 3):
        status, _, _ = _run(
            [
                "encode",
                photo,
                tmp_path / f"cut{k}.cpsl",
                "-p",
                checkpoint,
                "--layers",
                k,
            ],
            capsys,
        )
        assert status == 0
        cut = (tmp_path / f"cut{k}.cpsl").read_bytes()
        assert len(cut) < len(full) or k == 3
        status, out, _ = _run(
            [
                "decode",
                tmp_path / f"cut{k}.cpsl",
                tmp_path / f"l{k}.png",
                "-p",
                checkpoint,
            ],
            capsys,
        )
        assert status == 0 and f"layer {k} of {k}" in out
        decoded = torch.from_numpy(
            np.array(Image.open(tmp_path / f"l{k}.png"))
        ).permute(2, 0, 1)
        assert torch.equal(decoded, expected[k - 1])
        # The full file decodes the same layer when asked for it.
        status, _, _ = _run(
            [
                "decode",
                tmp_path / "all.cpsl",
                tmp_path / f"a{k}.png",
                "-p",
                checkpoint,
                "--layers",
                k,
            ],
            capsys,
        )
        assert status == 0
        assert (tmp_path / f"a{k}.png").read_bytes() == (
            tmp_path / f"l{k}.png"
        ).read_bytes()


def test_layer_errors_are_one_line(tmp_path, photo, capsys, tiny_cps):
    torch.manual_seed(0)
    model = Mei2021Quality(num_filters=[8, 8], lmbdas=[2.0, 1.0])
    checkpoint = save_model_checkpoint(tmp_path, model, "mei")
    assert (
        _run(
            ["encode", photo, tmp_path / "two.cpsl", "-p", checkpoint, "--layers", 1],
            capsys,
        )[0]
        == 0
    )
    status, _, err = _run(
        [
            "decode",
            tmp_path / "two.cpsl",
            tmp_path / "x.png",
            "-p",
            checkpoint,
            "--layers",
            2,
        ],
        capsys,
    )
    assert status == 1 and err.strip() == (
        f"codec.py: error: {tmp_path / 'two.cpsl'}: the file "
        "holds 1 layers; cannot decode layer 2"
    )
    cps = tmp_path / "cps.pth.tar"
    torch.save({"state_dict": tiny_cps.state_dict()}, cps)
    status, _, err = _run(
        ["encode", photo, tmp_path / "x.cps", "-p", cps, "--layers", 1], capsys
    )
    assert status == 1 and err.startswith(
        "codec.py: error: --layers needs a layered model"
    )
    assert len(err.strip().splitlines()) == 1


def test_only_the_cpsl_a_layered_model_writes_into_a_folder_is_checked_for_overwriting(
    tmp_path, photo, capsys
):
    """A .cps of another model beside it is no output of this run and stays; the .cpsl
    of an earlier run is refused unless forced."""
    torch.manual_seed(0)
    checkpoint = save_model_checkpoint(
        tmp_path, Mei2021Quality(num_filters=[8, 8], lmbdas=[2.0, 1.0]), "mei"
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "in.cps").write_bytes(b"another model's file")
    argv = ["encode", photo, "-d", out, "-p", checkpoint]
    assert _run(argv, capsys)[0] == 0
    assert sorted(path.name for path in out.iterdir()) == ["in.cps", "in.cpsl"]
    status, _, err = _run(argv, capsys)
    assert status == 1 and err.strip() == (
        f"codec.py: error: {out / 'in.cpsl'} exists; pass --force to overwrite"
    )
    assert _run(argv + ["--force"], capsys)[0] == 0
    assert (out / "in.cps").read_bytes() == b"another model's file"
