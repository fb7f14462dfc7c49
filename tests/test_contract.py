"""The codec contract: every registered architecture, built small, goes through the
same code path of codec.py and test.py; zoo models evaluate as CompressAI's eval_model
does."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from compressai.utils.eval_model.__main__ import eval_model
from compressai.utils.eval_model.__main__ import (
    load_checkpoint as eval_model_checkpoint,
)
from conftest import run_python
from PIL import Image

import codec
import models
import models.whole_image_memory
import test as test_script
import utils.stitching.planner
from models.base import CodingPlan, LearnedCodec, check_decoded
from models.cps.network import CPS
from utils.coding.container import pack, unpack
from utils.coding.payload import BitstreamError, CompressedImage, LayeredImage
from utils.evaluation.coders import ModelCoder
from utils.training.build import build_configured_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every registered architecture (aliases apart), with the constructor arguments of a
# small instance.
SMALL = {
    "cps": {"N": 8},
    "kamisli2024": {"block_size": 4, "N": 16, "M": 8},
    "mei2021-quality": {"num_filters": [8, 8], "lmbdas": [2.0, 1.0]},
    "mei2021-spatial": {"num_filters": [8, 8], "lmbdas": [2.0, 1.0]},
    "bmshj2018-factorized": {"N": 8, "M": 8},
    "bmshj2018_factorized_relu": {"N": 8, "M": 8},
    "bmshj2018-hyperprior": {"N": 8, "M": 8},
    "mbt2018-mean": {"N": 8, "M": 8},
    "mbt2018": {"N": 8, "M": 8},
    "cheng2020-anchor": {"N": 8},
    "cheng2020-attn": {"N": 8},
}


# CompressAI decodes these latent position by position, so the calibration of their
# memory budget (a 512x512 decode) takes seconds: their runs under a budget are slow.
AUTOREGRESSIVE_ZOO = {"mbt2018", "cheng2020-anchor", "cheng2020-attn"}
SMALL_BUDGETED = [
    pytest.param(name, marks=pytest.mark.slow) if name in AUTOREGRESSIVE_ZOO else name
    for name in sorted(SMALL)
]


def small_model(name: str, seed: int = 0) -> LearnedCodec:
    torch.manual_seed(seed)
    model = models.build_model(name, **SMALL[name]).eval()
    model.update(force=True)
    return model


def test_every_registered_architecture_is_listed_here():
    primary = {cls.registry_name for cls in models.MODELS.values()}
    assert primary == set(SMALL)


@pytest.mark.slow  # a fresh interpreter imports PyTorch and CompressAI
def test_the_registry_is_the_same_when_compressais_eval_model_is_imported_first():
    # eval_model adds CompressAI's variable-rate models to the zoo's own table on
    # import.
    probe = (
        "import compressai.utils.eval_model.__main__\n"
        "import models\n"
        "print(sorted({cls.registry_name for cls in models.MODELS.values()}))\n"
    )
    done = run_python(probe, check=True)
    assert done.stdout.strip() == str(sorted(SMALL))


@pytest.mark.slow  # a fresh interpreter imports PyTorch and CompressAI
def test_importing_the_models_package_prints_no_warning_a_user_cannot_act_on():
    # The README's Python example starts with `import models`; CompressAI's use of the
    # deprecated torch.jit.script warned there, under every default warning filter.
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", "import models"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stderr == ""


def test_registering_a_name_twice_or_an_incomplete_codec_is_refused():
    with pytest.raises(ValueError, match="'cps' is already registered"):
        models.register_model("cps-copy", "cps")(type(small_model("cps")))
    assert "cps-copy" not in models.MODELS  # nothing half-registered
    with pytest.raises(TypeError, match="not a models.base.LearnedCodec subclass"):
        models.register_model("plain-module")(torch.nn.Conv2d)
    assert "plain-module" not in models.MODELS

    class NoCoder(LearnedCodec):
        downsampling_factor = 16

    with pytest.raises(
        TypeError,
        match="NoCoder does not implement config, decode, encode, from_state_dict",
    ):
        models.register_model("no-coder")(NoCoder)

    # Complete, but the loader and the trainer could not build its entropy tables.
    class NoTables(LearnedCodec):
        downsampling_factor, config = 16, {}
        encode = decode = from_state_dict = None

    with pytest.raises(
        TypeError, match="NoTables is not a CompressAI CompressionModel"
    ):
        models.register_model("no-tables")(NoTables)
    assert "no-tables" not in models.MODELS


class _ForgetsASetting(CPS):
    """A setting that is not a layer size, which from_state_dict cannot see."""

    def __init__(self, N=8, brb_kernel_size=3, clamp=False):
        super().__init__(N=N, brb_kernel_size=brb_kernel_size)
        self.clamp = clamp

    @property
    def config(self):
        return {"N": self.N, "clamp": self.clamp}


class _ForwardReturnsATensor(CPS):
    def forward(self, x):
        return super().forward(x)["x_hat"]


class _LossWithoutRate(CPS):
    def default_loss(self, lmbda, metric="mse"):
        return lambda out, x: {"loss": (out["x_hat"] - x).pow(2).mean()}


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (
            _ForgetsASetting,
            {"clamp": True},
            r"from_state_dict rebuilds config \{'N': 8, 'clamp': "
            r"False\} .* no checkpoint of this run would load",
        ),
        (_ForwardReturnsATensor, {}, "forward must return a dict with 'x_hat'"),
        (
            _LossWithoutRate,
            {},
            "default_loss must return a dict with 'loss' and 'bpp_loss'",
        ),
    ],
)
def test_training_refuses_a_model_that_breaks_the_contract_before_its_first_step(
    monkeypatch, cls, kwargs, message
):
    # Found at the start, not at the first checkpoint or the first step hours later.
    monkeypatch.setitem(models.MODELS, "new-model", cls)
    cfg = {
        "model": {"name": "new-model", "kwargs": kwargs},
        "train_params": {"N": 8, "crop_size": 64, "lmbda": 0.01},
    }
    with pytest.raises(ValueError, match=f"model 'new-model': {message}"):
        build_configured_model(cfg)


class _TakesNoWidth(CPS):
    def __init__(self, brb_kernel_size=3):
        super().__init__(N=8, brb_kernel_size=brb_kernel_size)


def test_a_model_whose_constructor_takes_no_n_is_told_that_training_passes_it(
    monkeypatch,
):
    monkeypatch.setitem(models.MODELS, "new-model", _TakesNoWidth)
    cfg = {
        "model": {"name": "new-model", "kwargs": {}},
        "train_params": {"N": 8, "crop_size": 64, "lmbda": 0.01},
    }
    with pytest.raises(
        ValueError,
        match="unexpected keyword argument 'N'; train.py passes "
        "train_params.N to every model, so its __init__ must "
        "accept N",
    ):
        build_configured_model(cfg)


def test_the_contract_check_leaves_the_model_and_the_random_draws_of_a_run_unchanged():
    from utils.training.build import _check_trainable

    model = models.build_model("cps", N=8)
    model.g_s[1].eval()  # a part its constructor froze keeps its mode
    state = {key: value.clone() for key, value in model.state_dict().items()}
    modes = [module.training for module in model.modules()]
    torch.manual_seed(0)
    _check_trainable(model, "cps", 0.01)
    next_draw = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(next_draw, torch.rand(4))
    assert [module.training for module in model.modules()] == modes
    assert all(
        torch.equal(value, state[key]) for key, value in model.state_dict().items()
    )


def test_a_member_that_raises_during_the_check_is_one_error_naming_the_model(
    monkeypatch,
):
    class ReadsAnotherKey(CPS):
        @classmethod
        def from_state_dict(cls, state_dict):
            return cls(N=state_dict["g_a.0.weight"].size(0))

    monkeypatch.setitem(models.MODELS, "new-model", ReadsAnotherKey)
    cfg = {
        "model": {"name": "new-model", "kwargs": {}},
        "train_params": {"N": 8, "crop_size": 64, "lmbda": 0.01},
    }
    with pytest.raises(
        ValueError, match="^model 'new-model': KeyError: 'g_a.0.weight'$"
    ):
        build_configured_model(cfg)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_architecture_rebuilds_its_config_from_its_weights(name):
    # load_checkpoint builds models from weights alone and checks them against the
    # model_config a checkpoint stores.
    model = small_model(name)
    assert type(model).from_state_dict(model.state_dict()).config == model.config


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.linspace(0, 200, 90)[None, :, None] + rng.integers(0, 40, (70, 90, 3))
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "in.png")
    return tmp_path / "in.png"


@pytest.mark.parametrize("name", SMALL_BUDGETED)
def test_every_architecture_round_trips_through_the_codec_cli(
    tmp_path, photo, capsys, name
):
    model = small_model(name)
    checkpoint = tmp_path / "model.pth.tar"
    torch.save({"architecture": name, "state_dict": model.state_dict()}, checkpoint)
    encoded = tmp_path / "in.cps"
    assert codec.main(["encode", str(photo), str(encoded), "-p", str(checkpoint)]) == 0
    assert (
        codec.main(
            ["decode", str(encoded), str(tmp_path / "out.png"), "-p", str(checkpoint)]
        )
        == 0
    )
    capsys.readouterr()
    decoded = np.asarray(Image.open(tmp_path / "out.png"))
    image = torch.from_numpy(np.asarray(Image.open(photo)).copy()).permute(2, 0, 1)
    expected = model.decode(
        unpack(pack(model.encode(image, CodingPlan()))),
        CodingPlan(layers=model.operating_points),
    )
    assert np.array_equal(decoded, expected.permute(1, 2, 0).numpy())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_architecture_evaluates_through_test_py(tmp_path, photo, capsys, name):
    model = small_model(name)
    checkpoint = tmp_path / "model.pth.tar"
    torch.save({"architecture": name, "state_dict": model.state_dict()}, checkpoint)
    status = test_script.main(
        [
            "checkpoint",
            "--dataset",
            str(photo.parent),
            "-p",
            str(checkpoint),
            "--no-progress",
            "--max-memory",
            "none",
        ]
    )
    document = json.loads(capsys.readouterr().out)
    assert status == 0
    assert len(document["results"]["bpp"]) == model.operating_points
    assert all(bpp > 0 for bpp in document["results"]["bpp"])


class _DecodesARowShort(CPS):
    def decode(self, payload, plan):
        return super().decode(payload, plan)[:, :-1]


class _EncodesADict(CPS):
    def encode(self, image, plan):
        return dataclasses.asdict(super().encode(image, plan))


@pytest.fixture
def new_model_checkpoint(tmp_path, monkeypatch):
    """A checkpoint of architecture 'new-model', registered as the class given."""

    def register(cls):
        monkeypatch.setitem(models.MODELS, "new-model", cls)
        monkeypatch.setattr(cls, "registry_name", "new-model")
        checkpoint = tmp_path / "new.pth.tar"
        torch.save(
            {
                "architecture": "new-model",
                "state_dict": small_model("cps").state_dict(),
            },
            checkpoint,
        )
        return str(checkpoint)

    return register


def test_a_model_breaking_the_contract_is_named_and_writes_nothing(
    tmp_path, photo, capsys, new_model_checkpoint
):
    # A model bug must not pass for a damaged file, nor leave a PNG a row short.
    checkpoint = new_model_checkpoint(_DecodesARowShort)
    encoded, decoded = tmp_path / "in.cps", tmp_path / "out.png"
    assert codec.main(["encode", str(photo), str(encoded), "-p", checkpoint]) == 0
    capsys.readouterr()
    assert codec.main(["decode", str(encoded), str(decoded), "-p", checkpoint]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        "new-model's decode returned a torch.uint8 tensor (3, 69, 90) for "
        "a 90x70 file; the contract is a uint8 (3, 70, 90) tensor "
        "(models/base.py)"
    )
    assert not decoded.exists()
    status = test_script.main(
        [
            "checkpoint",
            "--dataset",
            str(photo.parent),
            "-p",
            checkpoint,
            "--no-progress",
            "--max-memory",
            "none",
        ]
    )
    assert status == 1 and "new-model's decode returned" in capsys.readouterr().err

    checkpoint = new_model_checkpoint(_EncodesADict)
    assert (
        codec.main(["encode", str(photo), str(tmp_path / "b.cps"), "-p", checkpoint])
        == 1
    )
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith(
            "new-model's encode returned a dict, not a CompressedImage or LayeredImage "
            "(models/base.py)"
        )
    )
    assert not (tmp_path / "b.cps").exists()


@pytest.mark.parametrize(
    "name, layers, size",
    [
        ("mei2021-quality", 1, (40, 56)),
        ("mei2021-spatial", 1, (20, 28)),
        ("mei2021-spatial", 0, (40, 56)),
        ("cps", 0, (40, 56)),
    ],
)
def test_a_decoded_image_must_have_exactly_the_size_of_its_operating_point(
    name, layers, size
):
    model = small_model(name)
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    payload = unpack(pack(model.encode(image, CodingPlan())))
    plan = CodingPlan(layers=layers)
    decoded = model.decode(payload, plan)
    assert model.decoded_size(payload, plan) == size == tuple(decoded.shape[1:])
    assert check_decoded(model, payload, plan, decoded) is decoded
    for wrong in (decoded[:, :-1], decoded[:, :1, :1], decoded.float(), decoded[None]):
        with pytest.raises(RuntimeError, match=f"{name}'s decode returned"):
            check_decoded(model, payload, plan, wrong)


def _count_budget_measurements(monkeypatch) -> list:
    """The calibrations the two budget checks run, recorded as they happen (the
    whole-image costs measured by earlier tests forgotten)."""
    runs = []
    monkeypatch.setattr(models.whole_image_memory, "_COSTS", {})

    def recorded(function):
        def run(*args, **kwargs):
            runs.append(function.__name__)
            return function(*args, **kwargs)

        return run

    monkeypatch.setattr(
        models.whole_image_memory,
        "_coding_peaks",
        recorded(models.whole_image_memory._coding_peaks),
    )
    monkeypatch.setattr(
        utils.stitching.planner.Planner,
        "_measure",
        recorded(utils.stitching.planner.Planner._measure),
    )
    return runs


def test_a_class_listing_the_whole_image_mixin_after_learned_codec_is_refused():
    # LearnedCodec's measure_budget_costs, which measures nothing, would hide the
    # mixin's: the calibration would land in the first image's timed encoding, and the
    # contract test below would fail on a bare `assert []`.
    from compressai.models import FactorizedPrior

    from models.whole_image_memory import CodesWholeImages

    with pytest.raises(TypeError, match="list CodesWholeImages before LearnedCodec"):

        class Late(LearnedCodec, CodesWholeImages, FactorizedPrior):
            pass

    class Early(CodesWholeImages, LearnedCodec, FactorizedPrior):
        pass

    assert Early.measure_budget_costs is CodesWholeImages.measure_budget_costs


@pytest.mark.parametrize("name", SMALL_BUDGETED)
def test_every_architecture_measures_its_budget_costs_before_coding(name, monkeypatch):
    # test.py calls measure_budget_costs before it starts a clock, so a calibration
    # must not be left for the first budgeted encode or decode to run.
    runs = _count_budget_measurements(monkeypatch)
    model = small_model(name)
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    plan = CodingPlan(budget_bytes=2**40)
    model.measure_budget_costs(CodingPlan())
    assert not runs  # nothing to measure without a budget
    model.measure_budget_costs(plan)
    measured = len(runs)  # none for a model whose budget check measures nothing
    model.decode(model.encode(image, plan), plan)
    assert len(runs) == measured


def test_checkpoints_of_one_configuration_share_their_whole_image_calibration(
    monkeypatch,
):
    # test.py checkpoint A B C of one Kamisli configuration calibrates once.
    runs = _count_budget_measurements(monkeypatch)
    plan = CodingPlan(budget_bytes=2**40)
    small_model("kamisli2024", seed=0).measure_budget_costs(plan)
    calibrated = len(runs)
    small_model("kamisli2024", seed=1).measure_budget_costs(plan)
    assert calibrated and len(runs) == calibrated
    other = models.build_model("kamisli2024", block_size=4, N=8, M=8).eval()
    other.update(force=True)
    other.measure_budget_costs(plan)
    assert len(runs) == 2 * calibrated


def test_test_py_times_the_first_image_without_the_budgets_calibration(monkeypatch):
    calibrations = []
    measure = models.whole_image_memory._coding_peaks

    def slow_measure(*args):
        calibrations.append(args[-1])
        time.sleep(0.5)
        return measure(*args)

    monkeypatch.setattr(models.whole_image_memory, "_COSTS", {})
    monkeypatch.setattr(models.whole_image_memory, "_coding_peaks", slow_measure)
    coder = ModelCoder(small_model("mbt2018-mean"), CodingPlan(budget_bytes=2**40))
    coded = coder.code(torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8))
    assert calibrations  # 1.5 s of calibration ran, outside the timed coding
    assert coded.encoding_time < 0.5


def test_codec_py_times_its_coding_without_the_budgets_calibration(
    tmp_path, photo, capsys, monkeypatch
):
    # codec.py prints "encoded in N s" and "decoded in N s" under its default 2 GB
    # budget; a whole-image model's calibration (seconds for Kamisli or an
    # autoregressive zoo model) is not part of that coding.
    measure = models.whole_image_memory._coding_peaks

    def slow_measure(*args):
        time.sleep(0.5)
        return measure(*args)

    costs = {}
    monkeypatch.setattr(models.whole_image_memory, "_COSTS", costs)
    monkeypatch.setattr(models.whole_image_memory, "_coding_peaks", slow_measure)
    checkpoint = tmp_path / "model.pth.tar"
    model = small_model("mbt2018-mean")
    torch.save(
        {"architecture": model.registry_name, "state_dict": model.state_dict()},
        checkpoint,
    )
    encoded, decoded = tmp_path / "in.cps", tmp_path / "out.png"
    assert codec.main(["encode", str(photo), str(encoded), "-p", str(checkpoint)]) == 0
    costs.clear()  # as a decoding process has measured nothing yet
    assert (
        codec.main(["decode", str(encoded), str(decoded), "-p", str(checkpoint)]) == 0
    )
    seconds = [
        float(text.split(" in ")[1].split(" s")[0])
        for text in capsys.readouterr().out.splitlines()
    ]
    assert len(seconds) == 2 and max(seconds) < 0.5, seconds


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_architecture_refuses_what_it_cannot_code_faithfully(name):
    # What the contract promises the scripts whatever the model: bad images and files
    # end in ValueError / BitstreamError (one line), never in garbage or an allocation
    # past the budget. A new model is held to it once it is listed in SMALL.
    model = small_model(name)
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    plan = CodingPlan()
    for bad in (image.float(), image[:1], image[None]):
        with pytest.raises(ValueError, match="expected a uint8 RGB tensor"):
            model.encode(bad, plan)
    # A colour image marked grayscale would decode to the mean of its channels.
    with pytest.raises(ValueError, match="plan.grayscale is set but the image's"):
        model.encode(image, plan.with_(grayscale=True))
    gray = image[:1].expand(3, -1, -1)
    one_channel = model.decode(model.encode(gray, plan.with_(grayscale=True)), plan)
    three = model.decode(model.encode(gray, plan), plan)
    assert torch.equal(one_channel[0], three.float().mean(0).round().to(torch.uint8))
    assert one_channel.shape == (1, *image.shape[1:])
    payload = model.encode(image, plan)
    foreign = small_model("mbt2018" if name == "cps" else "cps").encode(image, plan)
    forged = [
        dataclasses.replace(payload, height=8 * payload.height, width=8 * payload.width)
    ]
    if isinstance(payload, CompressedImage):  # .cpsl headers store no padding
        forged.append(dataclasses.replace(payload, pad_bottom=payload.pad_bottom + 64))
        if payload.z_string:  # a hyperprior's file without its z string
            forged.append(dataclasses.replace(payload, z_string=b""))
        # A forged file of the other kind, with this model's name and fingerprint.
        forged.append(
            LayeredImage(
                payload.height,
                payload.width,
                payload.architecture,
                payload.fingerprint,
                1,
                [payload.y_string],
                [0],
            )
        )
    else:
        forged.append(
            CompressedImage(
                payload.height,
                payload.width,
                0,
                0,
                payload.architecture,
                payload.fingerprint,
                "wavefront",
                False,
                0,
                b"",
                payload.streams[0],
            )
        )
    for wrong in (foreign, *forged):
        with pytest.raises(BitstreamError):
            model.decode(unpack(pack(wrong)), plan)
    with pytest.raises(ValueError, match="memory budget 1 MB is too small"):
        model.decode(unpack(pack(payload)), plan.with_(budget_bytes=2**20))
    assert model.decode(unpack(pack(payload)), plan).shape == image.shape


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"patch": 256}, "patch must be a PatchSpec"),
        ({"grayscale": "no"}, "grayscale must be True or False"),
        ({"exact": 1}, "exact must be True or False"),
        ({"batch_size": 2.0}, "batch_size must be an int"),
        ({"layers": True}, "layers must be an int"),
        ({"budget_bytes": "2GB"}, "budget_bytes must be an int or None"),
    ],
)
def test_a_coding_plan_of_the_wrong_types_is_refused_where_it_is_made(changes, message):
    """``patch=256`` failed deep in the planner, and ``grayscale="no"`` was true."""
    with pytest.raises(TypeError, match=message):
        CodingPlan(**changes)


def test_cps_refuses_compressais_compress_with_a_pointer_to_the_contract(tiny_cps):
    with pytest.raises(NotImplementedError, match="model.encode"):
        tiny_cps.compress(torch.zeros(1, 3, 64, 64))


def _write_photos(folder, sizes):
    folder.mkdir()
    rng = np.random.default_rng(1)
    for number, (height, width) in enumerate(sizes):
        ramp = np.linspace(0, 180, width)[None, :, None]
        pixels = ramp + rng.integers(0, 60, (height, width, 3))
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img{number}.png")
    return sorted(folder / name for name in os.listdir(folder))


@pytest.mark.filterwarnings("ignore:MS-SSIM needs")
def test_a_compressai_checkpoint_evaluates_as_compressais_eval_model(tmp_path, capsys):
    """Same checkpoint, same images (one of them not a multiple of 64): same bpp,
    PSNR within 0.01 dB."""
    torch.manual_seed(0)
    trained = models.get_model_class("mbt2018").zoo_class(N=8, M=8)
    checkpoint = tmp_path / "my_mbt2018.pth.tar"
    # CompressAI's train.py layout.
    torch.save({"state_dict": trained.state_dict()}, checkpoint)
    paths = _write_photos(tmp_path / "images", [(192, 256), (170, 200)])

    reference_model = eval_model_checkpoint("mbt2018", False, str(checkpoint))
    reference = eval_model(
        reference_model,
        tmp_path,
        tmp_path / "images",
        paths,
        architecture="mbt2018",
        half=False,
        per_image=False,
    )

    status = test_script.main(
        [
            "checkpoint",
            "-a",
            "mbt2018",
            "-p",
            str(checkpoint),
            "--dataset",
            str(tmp_path / "images"),
            "--no-progress",
        ]
    )
    ours = json.loads(capsys.readouterr().out)["results"]
    assert status == 0
    assert ours["bpp"][0] == pytest.approx(reference["bpp"], rel=1e-12)
    assert abs(ours["psnr-rgb"][0] - reference["psnr-rgb"]) <= 0.01


def test_a_zoo_subclass_with_other_strides_measures_its_latent_sizes_and_round_trips():
    # The rANS strings are padded for the symbols the header's size allows, counted
    # from latent_layout: a y of stride 8 holds four times the symbols of stride 16.
    from compressai.models import ScaleHyperprior
    from compressai.models.utils import conv, deconv

    from models.zoo import ZooCodec

    class FinerHyperprior(ZooCodec, ScaleHyperprior):
        zoo_class = ScaleHyperprior

        def __init__(self, N=8, M=8):
            super().__init__(N=N, M=M)
            self.g_a = torch.nn.Sequential(
                conv(3, N), torch.nn.ReLU(), conv(N, N), torch.nn.ReLU(), conv(N, M)
            )
            self.g_s = torch.nn.Sequential(
                deconv(M, N),
                torch.nn.ReLU(),
                deconv(N, N),
                torch.nn.ReLU(),
                deconv(N, 3),
            )

        @property
        def downsampling_factor(self):
            return 32

        from_state_dict = None

    assert models.get_model_class("bmshj2018-hyperprior")(N=8, M=12).latent_layout == (
        12,
        16,
        8,
        64,
    )
    assert models.get_model_class("bmshj2018-factorized")(N=8, M=12).latent_layout == (
        12,
        16,
        0,
        0,
    )
    torch.manual_seed(0)
    model = FinerHyperprior().eval()
    model.registry_name = "finer-hyperprior"
    model.update(force=True)
    assert model.latent_layout == (8, 8, 8, 32)
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    payload = unpack(pack(model.encode(image, CodingPlan())))
    assert model.decode(payload, CodingPlan()).shape == image.shape
    with pytest.raises(
        BitstreamError, match="has a hyperprior, but the file holds no z"
    ):
        model.decode(dataclasses.replace(payload, z_string=b""), CodingPlan())
    factorized = small_model("bmshj2018-factorized")
    payload = unpack(pack(factorized.encode(image, CodingPlan())))
    with pytest.raises(
        BitstreamError, match="has no hyperprior, but the file holds a z"
    ):
        factorized.decode(
            dataclasses.replace(payload, z_string=b"\0" * 8), CodingPlan()
        )


def test_a_zoo_subclass_that_names_no_zoo_class_is_refused_where_it_is_defined():
    from compressai.models import FactorizedPrior

    from models.zoo import ZooCodec

    with pytest.raises(
        TypeError, match="Forgot must set zoo_class, the CompressAI class"
    ):

        class Forgot(ZooCodec, FactorizedPrior):
            pass
