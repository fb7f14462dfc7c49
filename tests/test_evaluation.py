"""test.py end to end on tiny images, the coders behind it, datasets and sharding."""

import json
import os
import re
import subprocess
import sys
import urllib.error
import weakref
from dataclasses import replace

import pytest
import torch
from PIL import Image

import models
import test as test_script
from models.base import CodingPlan
from utils.coding.container import pack, unpack
from utils.evaluation.classical_codecs import CODECS
from utils.evaluation.coders import Coded, Coder, ModelCoder
from utils.evaluation.learned_coders import LearnedOptions, learned_coders
from utils.evaluation.metrics import psnr, psnr_b
from utils.evaluation.naive_tiles import NaiveTiles
from utils.evaluation.pretrained import load_pretrained
from utils.evaluation.runs import (
    Run,
    aggregate,
    environment_variable,
    evaluate,
    list_images,
    resolve_dataset,
    to_json,
)
from utils.image_io import image_size, read_image, write_png
from utils.memory import memory_in_use
from utils.stitching.spec import PatchSpec

pytestmark = pytest.mark.filterwarnings("ignore:MS-SSIM needs both sides")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_KEYS = {
    "bpp",
    "bpp_est",
    "psnr-rgb",
    "ms-ssim-rgb",
    "psnr-b",
    "psnr-b-y",
    "encoding_time",
    "decoding_time",
    "peak_memory_mb",
    "verification_peak_memory_mb",
}


def smooth_image(height, width, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.linspace(0, 1, height)[:, None]
    cols = torch.linspace(0, 1, width)[None, :]
    base = torch.stack(
        [80 + 100 * rows * cols, 180 - 90 * rows + 0 * cols, 60 + 120 * cols + 0 * rows]
    )
    noise = torch.randint(-10, 11, (3, height, width), generator=generator)
    return (base + noise).clamp(0, 255).to(torch.uint8)


@pytest.fixture
def images(tmp_path):
    """Two small images with odd sides: one too small for MS-SSIM, one large enough."""
    folder = tmp_path / "images"
    write_png(str(folder / "small.png"), smooth_image(67, 93, 0))
    write_png(str(folder / "large.png"), smooth_image(165, 170, 1))
    return folder


@pytest.fixture
def checkpoint(tmp_path, tiny_cps):
    path = tmp_path / "tiny.pth.tar"
    torch.save({"state_dict": tiny_cps.state_dict(), "architecture": "cps"}, path)
    return path


def run_cli(capsys, argv):
    code = test_script.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_checkpoint_run_reports_real_file_sizes_and_the_saved_pngs_psnr(
    capsys, tmp_path, images, checkpoint, tiny_cps
):
    out_dir = tmp_path / "out"
    code, stdout, _ = run_cli(
        capsys,
        [
            "checkpoint",
            "--dataset",
            images,
            "-a",
            "cps",
            "-p",
            checkpoint,
            "--patch-size",
            80,
            "-d",
            out_dir,
            "--per-image",
            "--save-image",
            "--verify",
            "--no-progress",
        ],
    )
    assert code == 0
    document = json.loads(stdout)
    assert document["name"] == "cps"
    assert set(document["results"]) == RESULT_KEYS
    assert all(len(values) == 1 for values in document["results"].values())
    assert json.loads((out_dir / "results.json").read_text()) == document

    sizes = []
    for stem in ("large", "small"):
        page = json.loads((out_dir / "per-image" / f"{stem}.json").read_text())
        original, _ = read_image(str(images / f"{stem}.png"))
        height, width = original.shape[1:]
        file_bytes = len(
            pack(tiny_cps.encode(original, CodingPlan(patch=PatchSpec(80))))
        )
        expected = file_bytes * 8 / (height * width)
        assert page["results"]["bpp"][0] == pytest.approx(expected, rel=1e-12)
        sizes.append(page["results"]["bpp"][0])
        saved, _ = read_image(str(out_dir / "reconstructions" / f"{stem}.png"))
        assert page["results"]["psnr-rgb"][0] == pytest.approx(
            psnr(original, saved), abs=1e-9
        )
        assert page["results"]["psnr-b"][0] == pytest.approx(
            psnr_b(original, saved), abs=1e-9
        )
        # The header costs.
        assert page["results"]["bpp_est"][0] < page["results"]["bpp"][0]
    assert document["results"]["bpp"][0] == pytest.approx(sum(sizes) / 2, rel=1e-12)
    small = json.loads((out_dir / "per-image" / "small.json").read_text())
    assert small["results"]["ms-ssim-rgb"] == [None]
    large = json.loads((out_dir / "per-image" / "large.json").read_text())
    only_value = large["results"]["ms-ssim-rgb"][0]
    assert document["results"]["ms-ssim-rgb"][0] == pytest.approx(only_value)


def test_several_checkpoints_give_one_entry_each_and_tagged_pngs(
    capsys, tmp_path, images, checkpoint
):
    second = tmp_path / "other.pth"
    second.write_bytes(checkpoint.read_bytes())
    out_dir = tmp_path / "out"
    code, stdout, _ = run_cli(
        capsys,
        [
            "checkpoint",
            "--dataset",
            images,
            "-p",
            checkpoint,
            second,
            "--tiling",
            "none",
            "--max-images",
            1,
            "-d",
            out_dir,
            "--save-image",
            "--no-progress",
        ],
    )
    assert code == 0
    results = json.loads(stdout)["results"]
    assert len(results["bpp"]) == 2 and results["bpp"][0] == results["bpp"][1]
    assert sorted(os.listdir(out_dir / "reconstructions")) == [
        "large-other.png",
        "large-tiny.png",
    ]


def test_a_memory_budget_changes_the_patches_but_not_the_results(
    capsys, images, checkpoint
):
    """--patch-size auto under a budget codes the same files as the whole image."""
    common = ["checkpoint", "--dataset", images, "-p", checkpoint, "--no-progress"]
    code, whole, _ = run_cli(capsys, common + ["--patch-size", 0])
    assert code == 0
    budget = (memory_in_use(torch.device("cpu")) + 300 * 2**20) // 2**20
    code, budgeted, _ = run_cli(
        capsys, common + ["--patch-size", "auto", "--max-memory", f"{budget}MB"]
    )
    assert code == 0
    whole, budgeted = json.loads(whole), json.loads(budgeted)
    for key in ("bpp", "psnr-rgb", "psnr-b"):
        assert budgeted["results"][key] == whole["results"][key]
    assert f"POPS patches planned within {budget} MB" in budgeted["description"]
    # It said "POPS patches of whole".
    assert "cps codec (whole image; wavefront" in whole["description"]


def test_entropy_estimation_reports_the_likelihood_rate(capsys, images, checkpoint):
    code, stdout, _ = run_cli(
        capsys,
        [
            "checkpoint",
            "--dataset",
            images,
            "-p",
            checkpoint,
            "--entropy-estimation",
            "--no-progress",
        ],
    )
    document = json.loads(stdout)
    assert code == 0 and "entropy estimation" in document["description"]
    assert "bpp_est" not in document["results"] and document["results"][
        "decoding_time"
    ] == [None]


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("mei2021-spatial", {"num_filters": [8, 10, 12], "lmbdas": [3.0, 2.0, 1.0]}),
        (
            "kamisli2024",
            {"block_size": 4, "N": 16, "M": 4, "kernel_sizes": [3, 1, 1, 1]},
        ),
        ("mbt2018", {"N": 8, "M": 8}),
    ],
)
def test_entropy_estimation_pads_to_each_models_own_multiple(name, kwargs):
    """Mei 2021 spatial needs multiples of 128, Kamisli of its block: a 70x150 image
    is padded to what each model's forward pass takes."""
    from utils.evaluation.coders import EstimationCoder

    torch.manual_seed(0)
    model = models.build_model(name, **kwargs).eval()
    image = smooth_image(70, 150, 2)
    coded = EstimationCoder(model).code(image)
    assert coded.reconstruction.shape == image.shape and coded.bits > 0


def test_codec_command_evaluates_jpeg_at_each_quality(capsys, images):
    code, stdout, _ = run_cli(
        capsys,
        [
            "codec",
            "--dataset",
            images,
            "--codec",
            "jpeg",
            "-q",
            "20,80",
            "--no-progress",
        ],
    )
    results = json.loads(stdout)["results"]
    assert code == 0
    assert (
        results["bpp"][0] < results["bpp"][1]
        and results["psnr-rgb"][0] < results["psnr-rgb"][1]
    )
    assert "bpp_est" not in results


def test_an_image_the_codec_cannot_code_is_refused_before_the_first_is_coded(
    capsys, monkeypatch, tmp_path
):
    """The size was checked only when the image was coded: a too-wide image late in
    a dataset ended the run after the others had been coded for nothing."""
    write_png(str(tmp_path / "a.png"), torch.zeros(3, 8, 8, dtype=torch.uint8))
    write_png(str(tmp_path / "b.png"), torch.zeros(3, 2, 16384, dtype=torch.uint8))

    def must_not_code(image, quality):
        raise AssertionError("an image was coded")

    monkeypatch.setattr(CODECS["webp"], "code", must_not_code)
    code, _, err = run_cli(
        capsys, ["codec", "--dataset", tmp_path, "--codec", "webp", "-q", 50]
    )
    assert code == 1
    assert err.strip().endswith(
        f"{tmp_path / 'b.png'}: webp codes images of at most 16383 pixels a side, "
        "not 16384x2"
    )


class IdentityTile(Coder):
    """Returns each tile unchanged for one bit, recording the tile shapes."""

    device = torch.device("cpu")
    description = "identity"

    def __init__(self):
        self.shapes = []

    def code(self, tile):
        self.shapes.append(tuple(tile.shape))
        return Coded(
            bits=1.0, reconstruction=tile.clone(), encoding_time=0.0, decoding_time=0.0
        )


class FlatTile(IdentityTile):
    """Replaces each tile by its mean colour: the crudest block-wise codec."""

    def code(self, tile):
        mean = tile.float().mean(dim=(1, 2), keepdim=True).round().to(torch.uint8)
        return Coded(
            bits=1.0,
            reconstruction=mean.expand_as(tile).clone(),
            encoding_time=0.0,
            decoding_time=0.0,
        )


def test_naive_tiles_cover_the_padded_image_and_crop_back():
    image = smooth_image(70, 100, 2)
    inner = IdentityTile()
    coded = NaiveTiles(inner, 32).code(image)
    assert inner.shapes == [(3, 32, 32)] * (3 * 4)
    assert coded.bits == 12
    assert torch.equal(coded.reconstruction, image)


class MeasuredTile(IdentityTile):
    """An identity tile that reports its own peaks, growing from tile to tile."""

    def code(self, tile):
        coded = super().code(tile)
        count = len(self.shapes)
        return replace(coded, peak_mb=100.0 + count, verification_peak_mb=50.0 + count)


def test_naive_tiles_report_the_largest_tiles_peaks_and_none_when_a_tile_has_none():
    image = smooth_image(64, 64, 2)
    coded = NaiveTiles(MeasuredTile(), 32).code(image)
    assert (coded.peak_mb, coded.verification_peak_mb) == (104.0, 54.0)
    unmeasured = NaiveTiles(IdentityTile(), 32).code(image)
    assert (unmeasured.peak_mb, unmeasured.verification_peak_mb) == (None, None)


def test_naive_tiling_seams_cost_psnr_b():
    image = smooth_image(96, 128, 3)
    blocky = NaiveTiles(FlatTile(), 16).code(image).reconstruction
    assert psnr_b(image, blocky) < psnr(image, blocky) - 0.5


@pytest.fixture
def zoo_model():
    """An untrained CompressAI model (no download), behind the codec contract."""
    torch.manual_seed(0)
    model = models.build_model("bmshj2018-factorized", N=128, M=192).eval()
    model.update(force=True)
    return model


def test_a_zoo_model_codes_whole_images_and_naive_tiles(zoo_model):
    image = smooth_image(70, 100, 4)
    [whole] = learned_coders(
        zoo_model, LearnedOptions(CodingPlan(patch=PatchSpec(64)), verify=True)
    )
    assert isinstance(whole, ModelCoder)
    coded = whole.code(image)
    # CompressAI's eval_model: zeros around the image, centred, up to a multiple of 64.
    x = torch.nn.functional.pad(image[None].float().div(255), (14, 14, 5, 53))
    strings = zoo_model.compress(x)["strings"]
    assert coded.bits == 8 * sum(len(s) for group in strings for s in group)
    assert coded.reconstruction.shape == image.shape
    [tiled] = learned_coders(
        zoo_model, LearnedOptions(CodingPlan(patch=PatchSpec(64)), tiling="naive")
    )
    coded = tiled.code(image)
    assert coded.reconstruction.shape == image.shape and coded.bits > 0


def test_pops_tiling_is_refused_for_a_model_with_padded_convolutions(zoo_model):
    with pytest.raises(ValueError, match="--tiling pops needs a padding-free model"):
        learned_coders(
            zoo_model, LearnedOptions(CodingPlan(patch=PatchSpec(128)), tiling="pops")
        )


def test_a_bad_cps_patch_size_is_refused_before_coding(tiny_cps):
    with pytest.raises(ValueError, match="multiple of 16"):
        learned_coders(tiny_cps, LearnedOptions(CodingPlan(patch=PatchSpec(100))))


def test_pretrained_offline_is_a_one_line_error(capsys, monkeypatch, images):
    import compressai.zoo.image

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(compressai.zoo.image, "load_state_dict_from_url", offline)
    code, stdout, stderr = run_cli(
        capsys,
        [
            "pretrained",
            "--dataset",
            images,
            "-a",
            "mbt2018",
            "-q",
            "1",
            "--no-progress",
        ],
    )
    assert code == 1 and stdout == ""
    lines = stderr.strip().splitlines()
    assert "cannot download pretrained mbt2018" in lines[-1] and "https://" in lines[-1]
    assert all("Traceback" not in line for line in lines)


def test_every_pretrained_quality_is_fetched_before_the_first_image_is_coded(
    capsys, monkeypatch, images
):
    """With q1 cached and q2 not downloadable, q1 was evaluated before the error."""
    import utils.evaluation.app as app
    import utils.evaluation.runs as runs

    def fetch(architecture, quality, metric, device):
        if quality == 2:
            raise RuntimeError(f"cannot download pretrained {architecture} q{quality}")
        return models.build_model("mbt2018", N=8)

    def never(*args, **kwargs):
        raise AssertionError("an image was coded")

    monkeypatch.setattr(app, "load_pretrained", fetch)
    monkeypatch.setattr(runs, "_code_image", never)
    argv = ["pretrained", "--dataset", images, "-a", "mbt2018", "-q", "1,2"]
    code, stdout, err = run_cli(capsys, argv + ["--no-progress"])
    assert code == 1 and stdout == ""
    assert err.strip().splitlines()[-1] == (
        "test.py: error: cannot download pretrained mbt2018 q2"
    )


def test_a_torch_home_that_is_a_file_is_named_not_offered_as_a_place(
    tmp_path, monkeypatch
):
    """It said "put that file in TORCH_HOME/hub/checkpoints", under a file."""
    blocker = tmp_path / "torch_home"
    blocker.write_text("a file")
    monkeypatch.setenv("TORCH_HOME", str(blocker))
    with pytest.raises(RuntimeError) as error:
        load_pretrained("mbt2018", 1, "mse", torch.device("cpu"))
    assert f"{blocker} is a file, not a folder; point TORCH_HOME" in str(error.value)


@pytest.mark.parametrize("content", [b"", b"random bytes", "weights of another model"])
def test_a_broken_cached_pretrained_file_is_named_with_the_way_out(
    capsys, monkeypatch, tmp_path, images, content
):
    """Offline users are told to put the file in the cache: one that is empty, not a
    checkpoint or another model's ended in EOFError, UnpicklingError or KeyError."""
    from utils.evaluation.pretrained import pretrained_url

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    cached = (
        tmp_path
        / "hub"
        / "checkpoints"
        / os.path.basename(pretrained_url("mbt2018", 1, "mse"))
    )
    cached.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        cached.write_bytes(content)
    else:
        torch.save({"g_a.0.weight": torch.zeros(3)}, cached)
    code, stdout, stderr = run_cli(
        capsys,
        [
            "pretrained",
            "--dataset",
            images,
            "-a",
            "mbt2018",
            "-q",
            "1",
            "--no-progress",
        ],
    )
    lines = stderr.strip().splitlines()
    assert code == 1 and stdout == "" and len(lines) == 1, lines
    assert lines[0].startswith(
        f"test.py: error: cannot load pretrained mbt2018 (metric mse, "
        f"quality 1) from the cached file {cached}: "
    )
    assert lines[0].endswith("; delete it to download it again")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["codec", "--codec", "jpeg", "-q", "500"],
            "jpeg quality 500 is outside 1..100",
        ),
        (["checkpoint", "-p", "missing.pth"], "checkpoint not found"),
        (["checkpoint", "-p", "x.pth", "--half"], "--half needs --entropy-estimation"),
        (["checkpoint", "-p", "x.pth", "--save-image"], "need -d OUTDIR"),
        (
            [
                "pretrained",
                "-a",
                "mbt2018",
                "-q",
                "1",
                "--tiling",
                "naive",
                "--patch-size",
                "0",
            ],
            None,
        ),
        (
            ["checkpoint", "-p", "x.pth", "--tiling", "naive", "--patch-size", "auto"],
            "not auto",
        ),
    ],
)
def test_bad_command_lines_end_in_one_stderr_line(capsys, images, argv, message):
    if message is None:  # naive tiling without a tile size: refused before any download
        message = "--tiling naive needs a fixed --patch-size > 0"
    code, stdout, stderr = run_cli(
        capsys, argv + ["--dataset", images, "--no-progress"]
    )
    lines = stderr.strip().splitlines()
    assert code == 1 and stdout == ""
    assert lines[-1].startswith("test.py: error:") and message in lines[-1]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--max-memory", "lots", "cannot read memory size 'lots'"),
        ("--patch-size", "big", "must be pixels, 'whole' or 'auto'"),
    ],
)
def test_unreadable_sizes_are_usage_errors(capsys, images, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        test_script.main(
            ["checkpoint", "-p", "x.pth", "--dataset", str(images), option, value]
        )
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("points_to", ["missing", "file"])
def test_a_dataset_variable_that_points_nowhere_is_named_as_the_culprit(
    tmp_path, monkeypatch, points_to
):
    """The message said "set CPS_KODAK" when CPS_KODAK was set, and "does not exist"
    of a file."""
    config = tmp_path / "datasets.yaml"
    config.write_text("Kodak:\n  path: nowhere\n  patch_size: 128\n")
    target = tmp_path / "kodim01.png"
    if points_to == "file":
        target.write_bytes(b"")
    monkeypatch.setenv("CPS_KODAK", str(target))
    with pytest.raises(ValueError) as error:
        resolve_dataset("Kodak", str(config))
    problem = "a file, not a folder" if points_to == "file" else "missing"
    assert str(error.value) == (
        f"dataset Kodak: CPS_KODAK is {target} ({problem}); set it to the "
        "dataset's folder"
    )


def test_a_dataset_name_resolves_through_the_config_and_its_variable(
    tmp_path, monkeypatch
):
    config = tmp_path / "datasets.yaml"
    config.write_text("Kodak:\n  path: nowhere\n  patch_size: 128\n")
    monkeypatch.setenv("CPS_KODAK", str(tmp_path))
    dataset = resolve_dataset("kodak", str(config))
    assert (dataset.name, dataset.folder, dataset.patch_size) == (
        "Kodak",
        str(tmp_path),
        128,
    )
    monkeypatch.delenv("CPS_KODAK")
    with pytest.raises(ValueError, match="set CPS_KODAK"):
        resolve_dataset("Kodak", str(config))
    with pytest.raises(ValueError, match="neither a folder nor a dataset"):
        resolve_dataset("Tecnick", str(config))
    config.write_text("Kodak:\n  path: x\n  patch_size: 128\n  colour: rgb\n")
    with pytest.raises(ValueError, match="exactly the keys"):
        resolve_dataset("Kodak", str(config))
    assert environment_variable("DIV8K") == "CPS_DIV8K"
    with pytest.raises(ValueError, match="datasets config not found"):
        resolve_dataset("Kodak", str(tmp_path / "missing.yaml"))
    config.write_bytes(b"Kodak: [" + b"1, " * 2**19 + b"]")
    with pytest.raises(ValueError, match="more than the"):
        resolve_dataset("Kodak", str(config))


def test_the_shipped_datasets_config_has_the_papers_patch_sizes():
    from utils.evaluation.runs import load_datasets_config

    config = load_datasets_config()
    assert {name: entry["patch_size"] for name, entry in config.items()} == {
        "Kodak": 128,
        "CLIC": 256,
        "DIV8K": 256,
    }


def test_aggregate_averages_present_values_and_json_turns_inf_into_null():
    records = [
        [
            {"bpp": 1.0, "psnr-rgb": float("inf"), "ms-ssim-rgb": None},
            {"bpp": 3.0, "psnr-rgb": 30.0, "ms-ssim-rgb": 0.9},
        ]
    ]
    results = aggregate(records, ["run"])
    assert results["bpp"] == [2.0] and results["ms-ssim-rgb"] == [0.9]
    assert json.loads(to_json({"results": results}))["results"]["psnr-rgb"] == [None]


def _torchrun_test_py(*argv) -> subprocess.CompletedProcess:
    """``test.py argv`` under torchrun, as 2 CPU processes of one thread each."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            os.path.join(REPO, "test.py"),
            *map(str, argv),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=240,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


@pytest.mark.slow  # an end-to-end run of over 20 s on 2 cores
def test_torchrun_shards_images_and_merges_the_same_results(
    capsys, tmp_path, images, checkpoint
):
    write_png(str(images / "third.png"), smooth_image(64, 80, 5))
    common = [
        "checkpoint",
        "--dataset",
        images,
        "-p",
        checkpoint,
        "--patch-size",
        80,
        "--no-progress",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process runs
    try:
        code, stdout, _ = run_cli(capsys, common)
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    single = json.loads(stdout)

    out_dir = tmp_path / "sharded"
    done = _torchrun_test_py(*common, "-d", out_dir, "--save-image")
    assert done.returncode == 0, done.stderr[-2000:]
    sharded = json.loads(done.stdout)
    assert "2 processes" in done.stderr
    for key in ("bpp", "bpp_est", "psnr-rgb", "ms-ssim-rgb", "psnr-b"):
        assert sharded["results"][key] == single["results"][key], key
    written = sorted(os.listdir(out_dir / "reconstructions"))
    assert written == ["large.png", "small.png", "third.png"]
    assert json.loads((out_dir / "results.json").read_text()) == sharded


@pytest.mark.slow  # two fresh processes under torchrun
def test_a_folder_another_evaluation_holds_refuses_every_torchrun_rank(
    tmp_path, images
):
    """Rank 0 alone takes -d; its refusal reaches the other ranks at once instead of
    leaving them in their next collective until the process group's timeout."""
    from utils.evaluation.outputs import HOLDER, LOCK_NAME, NAME
    from utils.folder_lock import lock_folder

    out = tmp_path / "out"
    out.mkdir()
    other = lock_folder(str(out), LOCK_NAME, NAME, HOLDER)  # as another test.py would
    try:
        done = _torchrun_test_py(*_codec_argv(images, out))
    finally:
        other.release()
    assert done.returncode != 0 and done.stdout == ""
    refusal = f"-d/--output-dir {out} is in use by another test.py evaluation"
    assert f"test.py: error: {refusal}" in done.stderr
    # The ranks share stderr, so their lines may interleave.
    assert f"test.py [rank 1]: error: rank 0 refused the run: {refusal}" in done.stderr
    assert sorted(os.listdir(out)) == []


def test_images_sharing_a_stem_are_refused_before_their_per_image_files_collide(
    capsys, tmp_path
):
    folder = tmp_path / "same"
    write_png(str(folder / "a.png"), smooth_image(40, 48, 0))
    Image.fromarray(smooth_image(40, 48, 1).permute(1, 2, 0).numpy()).save(
        folder / "a.jpg"
    )
    code, _, err = run_cli(
        capsys,
        [
            "codec",
            "--dataset",
            folder,
            "--codec",
            "jpeg",
            "-q",
            50,
            "-d",
            tmp_path / "out",
            "--per-image",
            "--no-progress",
        ],
    )
    assert code == 1 and "a.jpg and a.png would write the same per-image files" in err
    assert not (tmp_path / "out" / "per-image").exists()


@pytest.mark.parametrize(
    "qualities, message",
    [
        (",", "expected comma-separated finite floats, got ','"),
        # inf passed jpeg2000's open range (a near-lossless run) and crashed the others.
        ("10,inf", "expected comma-separated finite floats, got '10,inf'"),
        ("nan", "expected comma-separated finite floats, got 'nan'"),
        # an empty item was dropped: "-q 50," coded one quality where two were meant
        ("50,", "'50,' has an empty item; give a value between every two commas"),
        ("50,,60", "'50,,60' has an empty item; give a value between every"),
        ("50,30,50", "50 is given twice in '50,30,50'"),
        ("10,10.0000001", "10 and 10.0000001 in '10,10.0000001' are the same to 6"),
        ("10,10,20,20", "10 is given twice in '10,10,20,20'"),
    ],
)
def test_quality_lists_that_cannot_be_coded_are_usage_errors(
    capsys, images, qualities, message
):
    with pytest.raises(SystemExit) as exit_info:
        test_script.main(
            ["codec", "--dataset", str(images), "--codec", "jpeg2000", "-q", qualities]
        )
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_grayscale_image_is_measured_as_the_gray_png_codec_py_writes(
    capsys, tmp_path, checkpoint, tiny_cps
):
    folder = tmp_path / "gray"
    gray = smooth_image(60, 70, 5)[:1]
    write_png(str(folder / "g.png"), gray)
    code, stdout, _ = run_cli(
        capsys,
        [
            "checkpoint",
            "--dataset",
            folder,
            "-p",
            checkpoint,
            "--tiling",
            "none",
            "-d",
            tmp_path / "out",
            "--save-image",
            "--no-progress",
        ],
    )
    assert code == 0
    original, info = read_image(str(folder / "g.png"))
    assert info.grayscale
    plan = CodingPlan(grayscale=True)
    written = tiny_cps.decode(unpack(pack(tiny_cps.encode(original, plan))), plan)
    assert written.shape[0] == 1
    saved = Image.open(tmp_path / "out" / "reconstructions" / "g.png")
    assert saved.mode == "L"
    expected = psnr(original, written.expand(3, -1, -1))
    assert json.loads(stdout)["results"]["psnr-rgb"][0] == pytest.approx(
        expected, abs=1e-9
    )


def test_an_earlier_evaluation_in_the_output_folder_is_kept_unless_forced(
    capsys, tmp_path, images
):
    out_dir = tmp_path / "out"
    argv = [
        "codec",
        "--dataset",
        images,
        "--codec",
        "jpeg",
        "-q",
        50,
        "-d",
        out_dir,
        "--per-image",
        "--save-image",
        "--no-progress",
    ]
    assert run_cli(capsys, argv)[0] == 0
    written = sorted(path for path in out_dir.rglob("*") if path.is_file())
    before = {path: path.stat().st_mtime_ns for path in written}
    code, stdout, err = run_cli(capsys, argv)
    assert code == 1 and stdout == ""
    assert err.strip() == (
        f"test.py: error: {out_dir}/results.json exists (and 4 more outputs); "
        "pass --force to overwrite"
    )
    assert {path: path.stat().st_mtime_ns for path in written} == before
    assert run_cli(capsys, argv + ["--force"])[0] == 0
    assert all(path.stat().st_mtime_ns != before[path] for path in written)


def test_previous_outputs_are_the_files_this_run_would_replace(tmp_path):
    """per-image/ and reconstructions/ are replaced whole: every file in them counts."""
    from utils.evaluation.outputs import previous_outputs

    folder = tmp_path / "reconstructions"
    folder.mkdir()
    names = ["a.png", "a-q1.png", "b-q1.png", "a-q1.txt"]
    for name in names:
        (folder / name).write_bytes(b"")
    (tmp_path / "per-image").mkdir()
    (tmp_path / "per-image" / "z.json").write_text("{}")
    (tmp_path / "results.json").write_text("{}")
    everything = [str(folder / name) for name in sorted(names)]
    # Also for a run that writes neither folder: it removes them (see the test below).
    assert previous_outputs(str(tmp_path)) == [
        str(tmp_path / "results.json"),
        str(tmp_path / "per-image" / "z.json"),
        *everything,
    ]


def test_a_missing_checkpoint_is_the_only_line_before_any_image_is_read(
    capsys, caplog, tmp_path, images, checkpoint
):
    missing = tmp_path / "missing.pth"
    with caplog.at_level("INFO", logger="cps.test"):
        code, stdout, err = run_cli(
            capsys,
            [
                "checkpoint",
                "--dataset",
                images,
                "-p",
                checkpoint,
                missing,
                "--no-progress",
            ],
        )
    assert code == 1 and stdout == ""
    assert err.strip() == f"test.py: error: checkpoint not found: {missing}"
    assert caplog.text == ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["pretrained", "-a", "mbt2018", "-q", "1,99"],
            "no pretrained mbt2018 for metric 'mse' and quality 99",
        ),
        (
            ["checkpoint", "-a", "no-such-model", "-p", "CKPT"],
            "unknown architecture 'no-such-model'",
        ),
    ],
)
def test_a_model_that_cannot_exist_is_refused_before_the_dataset_summary(
    capsys, caplog, monkeypatch, images, checkpoint, argv, message
):
    import compressai.zoo.image

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(compressai.zoo.image, "load_state_dict_from_url", offline)
    argv = [checkpoint if arg == "CKPT" else arg for arg in argv]
    with caplog.at_level("INFO", logger="cps.test"):
        code, _, err = run_cli(capsys, argv + ["--dataset", images, "--no-progress"])
    assert code == 1 and message in err
    assert "images from" not in caplog.text


def test_an_unreadable_image_in_the_dataset_is_refused_before_any_is_coded(
    capsys, tmp_path
):
    folder = tmp_path / "mixed"
    write_png(str(folder / "a.png"), smooth_image(40, 48, 0))
    (folder / "b.png").write_text("not an image")
    code, _, err = run_cli(
        capsys,
        [
            "codec",
            "--dataset",
            folder,
            "--codec",
            "jpeg",
            "-q",
            50,
            "-d",
            tmp_path / "out",
            "--save-image",
            "--no-progress",
        ],
    )
    assert code == 1 and err.strip().splitlines()[-1].startswith(
        f"test.py: error: cannot read image {folder / 'b.png'}: "
    )
    assert not (tmp_path / "out" / "reconstructions").exists()


def test_a_folder_named_like_an_image_is_left_out_and_a_dead_link_is_named(tmp_path):
    """``x.png/`` was listed and refused as "image not found"."""
    folder = tmp_path / "set"
    write_png(str(folder / "a.png"), smooth_image(40, 48, 0))
    (folder / "x.png").mkdir()
    assert list_images(str(folder)) == [str(folder / "a.png")]
    (folder / "b.png").symlink_to(tmp_path / "gone.png")
    assert list_images(str(folder)) == [str(folder / "a.png"), str(folder / "b.png")]
    with pytest.raises(ValueError, match="b.png is a link to nothing"):
        image_size(str(folder / "b.png"))
    with pytest.raises(ValueError, match="x.png is a folder, not a file"):
        read_image(str(folder / "x.png"))


def test_a_run_that_fails_midway_removes_the_reconstructions_it_wrote(capsys, tmp_path):
    """A truncated PNG passes the header check and fails once decoded: the images
    coded before it leave no reconstructions without a results.json."""
    folder = tmp_path / "mixed"
    write_png(str(folder / "a.png"), smooth_image(40, 48, 0))
    write_png(str(folder / "c.png"), smooth_image(40, 48, 1))
    data = (folder / "c.png").read_bytes()
    (folder / "c.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys,
        [
            "codec",
            "--dataset",
            folder,
            "--codec",
            "jpeg",
            "-q",
            50,
            "-d",
            out,
            "--save-image",
            "--no-progress",
        ],
    )
    assert code == 1 and f"{folder / 'c.png'}" in err.strip().splitlines()[-1]
    # -d was made by this run, which wrote nothing: it goes, reconstructions/ with it.
    assert not out.exists()
    # Nothing is left to refuse: the same command runs again without --force.
    write_png(str(folder / "c.png"), smooth_image(40, 48, 1))
    code, _, _ = run_cli(
        capsys,
        [
            "codec",
            "--dataset",
            folder,
            "--codec",
            "jpeg",
            "-q",
            50,
            "-d",
            out,
            "--save-image",
            "--no-progress",
        ],
    )
    assert code == 0 and sorted(os.listdir(out / "reconstructions")) == [
        "a.png",
        "c.png",
    ]


class _HoldingCoder(Coder):
    """A coder that holds a model, as ModelCoder does, and returns the image."""

    def __init__(self, model):
        self.model = model

    def code(self, image):
        return Coded(8.0 * image.numel(), image.clone(), 0.0, 0.0)


def test_a_runs_model_is_released_before_the_next_run_builds_its_own(tmp_path):
    """The loop variable kept the last coder of a run, and so its model, while the
    next run's build() loaded another: two models at once on the GPU."""
    write_png(str(tmp_path / "a.png"), smooth_image(16, 16, 0))
    first, alive_at_second_build = [], []

    def build_first():
        model = torch.nn.Linear(2, 2)
        first.append(weakref.ref(model))
        return [_HoldingCoder(model)]

    def build_second():
        alive_at_second_build.append(first[0]() is not None)
        return [_HoldingCoder(torch.nn.Linear(2, 2))]

    runs = [Run("one", "one", build_first), Run("two", "two", build_second)]
    table, entries = evaluate(runs, [str(tmp_path / "a.png")], progress=False)
    assert [entry.tag for entry in entries] == ["one", "two"] and len(table) == 2
    assert alive_at_second_build == [False]


def _codec_argv(dataset, out, *extra):
    return ["codec", "--dataset", dataset, "--codec", "jpeg", "-q", "50", "-d", out] + [
        "--per-image",
        "--save-image",
        "--no-progress",
        *map(str, extra),
    ]


def _files(folder):
    """Every file under ``folder`` (hidden ones included) and its bytes."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_a_second_evaluation_in_the_same_folder_is_refused_while_one_runs(
    capsys, monkeypatch, tmp_path, images
):
    """Two runs on one -d (both with --force) mixed their outputs and both exited 0:
    the folder is locked for the whole run, and the second is refused in one line."""
    import utils.evaluation.runs as runs

    out = tmp_path / "out"
    inner = []
    code_image = runs._code_image

    def code_and_start_another(*args, **kwargs):
        if not inner:
            inner.append(run_cli(capsys, _codec_argv(images, out, "--force")))
        return code_image(*args, **kwargs)

    monkeypatch.setattr(runs, "_code_image", code_and_start_another)
    code, _, err = run_cli(capsys, _codec_argv(images, out))
    assert code == 0, err
    [(inner_code, inner_stdout, inner_err)] = inner
    assert inner_code == 1 and inner_stdout == ""
    assert re.fullmatch(
        rf"test.py: error: -d/--output-dir {out} is in use by another test.py "
        rf"evaluation \(process {os.getpid()} on \S+\): wait for it to end, or "
        r"choose another -d/--output-dir",
        inner_err.strip(),
    )
    assert sorted(_files(out)) == [
        "per-image/large.json",
        "per-image/small.json",
        "reconstructions/large.png",
        "reconstructions/small.png",
        "results.json",
    ]  # and neither the lock file nor the staging folder is left


@pytest.mark.parametrize("failure", ["truncated image", "Ctrl-C"])
def test_a_failed_forced_run_leaves_the_previous_outputs_as_they_were(
    capsys, monkeypatch, tmp_path, failure
):
    import utils.evaluation.runs as runs

    folder = tmp_path / "images"
    for number, name in enumerate(["a.png", "b.png", "c.png"]):
        write_png(str(folder / name), smooth_image(40, 48, number))
    out = tmp_path / "out"
    assert run_cli(capsys, _codec_argv(folder, out))[0] == 0
    before = _files(out)
    if failure == "Ctrl-C":
        calls = []
        code_image = runs._code_image

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return code_image(*args, **kwargs)

        monkeypatch.setattr(runs, "_code_image", interrupted)
        expected = 130
    else:
        data = (folder / "c.png").read_bytes()
        (folder / "c.png").write_bytes(data[: len(data) // 2])
        expected = 1
    code, stdout, _ = run_cli(capsys, _codec_argv(folder, out, "-q", "30", "--force"))
    assert code == expected and stdout == ""
    assert _files(out) == before
    assert sorted(os.listdir(out)) == ["per-image", "reconstructions", "results.json"]


def test_a_forced_run_replaces_the_previous_outputs_as_a_whole(
    capsys, tmp_path, images
):
    """Files of the previous run that this one does not write (other images, other
    qualities) go with it, instead of lying beside a results.json that does not
    count them."""
    write_png(str(images / "third.png"), smooth_image(40, 48, 2))
    out = tmp_path / "out"
    argv = _codec_argv(images, out, "-q", "50,20")
    assert run_cli(capsys, argv)[0] == 0
    assert len(os.listdir(out / "reconstructions")) == 6
    argv = _codec_argv(images, out, "--max-images", 2, "--force")
    code, stdout, _ = run_cli(capsys, argv)
    assert code == 0
    assert sorted(_files(out)) == [
        "per-image/large.json",
        "per-image/small.json",
        "reconstructions/large.png",
        "reconstructions/small.png",
        "results.json",
    ]
    assert json.loads((out / "results.json").read_text()) == json.loads(stdout)
    # A forced run that writes no images or per-image files removes the old ones,
    # which described other results.
    argv = _codec_argv(images, out, "--max-images", 1, "--force")
    argv = [arg for arg in argv if arg not in ("--save-image", "--per-image")]
    assert run_cli(capsys, argv)[0] == 0
    assert sorted(_files(out)) == ["results.json"]


@pytest.mark.parametrize(
    "in_the_way, message",
    [
        ("per-image", "per-image is not a folder"),
        ("reconstructions", "reconstructions is not a folder"),
        ("results.json", "results.json is a folder, not a file"),
    ],
)
def test_a_path_in_the_way_is_refused_before_the_first_image_is_coded(
    capsys, monkeypatch, tmp_path, images, in_the_way, message
):
    import utils.evaluation.runs as runs

    def never(*args, **kwargs):
        raise AssertionError("an image was coded")

    monkeypatch.setattr(runs, "_code_image", never)
    out = tmp_path / "out"
    out.mkdir()
    if in_the_way == "results.json":
        (out / in_the_way).mkdir()
    else:
        (out / in_the_way).write_text("in the way")
    code, stdout, err = run_cli(capsys, _codec_argv(images, out, "--force"))
    assert code == 1 and stdout == ""
    assert err.strip() == (
        f"test.py: error: -d/--output-dir {out}: {out / in_the_way} "
        f"{message.split(' ', 1)[1]}; move it away or choose another -d"
    )
    assert sorted(os.listdir(out)) == [in_the_way]


@pytest.mark.parametrize("reached_the_commit_point", [False, True])
def test_a_run_killed_inside_its_commit_leaves_the_outputs_of_one_run(
    tmp_path, reached_the_commit_point
):
    """SIGKILL between moving the previous folders aside and moving results.json in
    left them in the staging folder, which the next run deleted."""
    from utils.evaluation.outputs import EvaluationOutputs

    out = tmp_path / "out"
    staging = out / ".test-staging"
    (staging / ".previous" / "reconstructions").mkdir(parents=True)
    (staging / ".previous" / "reconstructions" / "old.png").write_bytes(b"old")
    (out / "reconstructions").mkdir()
    (out / "reconstructions" / "new.png").write_bytes(b"new")
    (out / "results.json").write_text('{"run": "new"}')
    if not reached_the_commit_point:
        (out / "results.json").write_text('{"run": "old"}')
        (staging / "results.json").write_text('{"run": "new"}')
    with EvaluationOutputs(str(out), False, True, force=True):
        kept = sorted(os.listdir(out / "reconstructions"))
        results = json.loads((out / "results.json").read_text())
    expected = "new" if reached_the_commit_point else "old"
    assert kept == [f"{expected}.png"] and results == {"run": expected}
