"""Loading the authors' checkpoints and ours: layout, formats, clear errors."""

import os

import pytest
import torch

import models
from models.checkpoint import unwrap_state_dict
from models.weight_checks import entropy_tables_ready

LAYOUT = os.path.join(
    os.path.dirname(__file__), "assets", "official_checkpoint_keys.tsv"
)


def _published_layout():
    layout = {}
    with open(LAYOUT) as handle:
        for line in handle:
            if line.strip() and not line.startswith("#"):
                key, shape = line.rstrip("\n").split("\t")
                layout[key] = tuple(
                    int(n) for n in shape.strip("()").split(",") if n.strip()
                )
    return layout


def test_state_dict_matches_the_published_checkpoints_at_n192():
    model = models.build_model("cps", N=192)
    model.update(force=True)
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert ours == _published_layout()


def test_authors_alias_names_the_same_architecture():
    assert models.get_model_class("cps-v4") is models.get_model_class("cps")


def _save(path, obj):
    torch.save(obj, path)
    return str(path)


def test_authors_training_checkpoint_with_module_prefix_loads(tmp_path, tiny_cps):
    # The authors' train.py saves {epoch, state_dict, loss, optimizer, ...}; multi-GPU
    # training adds "module.".
    wrapped = {f"module.{k}": v for k, v in tiny_cps.state_dict().items()}
    path = _save(
        tmp_path / "checkpoint_best_loss.pth.tar",
        {
            "epoch": 3,
            "state_dict": wrapped,
            "loss": 1.5,
            "optimizer": torch.optim.Adam(tiny_cps.parameters()).state_dict(),
        },
    )
    model = models.load_checkpoint(path, "cpu")
    assert model.N == 8 and not model.training
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(image)["x_hat"], tiny_cps(image)["x_hat"])


@pytest.mark.parametrize(
    "wrappers", ["module.module.", "_orig_mod.module.", "module._orig_mod."]
)
def test_nested_wrapper_prefixes_are_all_stripped(wrappers):
    # torch.compile around DataParallel (or the reverse) nests the prefixes.
    weight = torch.zeros(2)
    assert unwrap_state_dict({"state_dict": {f"{wrappers}g_a.0.weight": weight}}) == {
        "g_a.0.weight": weight
    }


def test_checkpoint_whose_model_config_disagrees_with_its_weights_is_refused(
    tmp_path, tiny_cps
):
    state = tiny_cps.state_dict()
    good = _save(
        tmp_path / "good.pth.tar",
        {
            "architecture": "cps",
            "state_dict": state,
            "model_config": dict(tiny_cps.config),
        },
    )
    assert models.load_checkpoint(good).config == tiny_cps.config
    edited = _save(
        tmp_path / "edited.pth.tar",
        {
            "architecture": "cps",
            "state_dict": state,
            "model_config": {**tiny_cps.config, "N": 16},
        },
    )
    with pytest.raises(
        ValueError, match="model_config says N=16 but its weights give N=8"
    ):
        models.load_checkpoint(edited)


def test_checkpoint_saved_before_update_gets_its_entropy_tables(tmp_path):
    torch.manual_seed(0)
    untrained = models.build_model("cps", N=8)  # update() never ran: empty CDF tables
    path = _save(tmp_path / "fresh.pth.tar", untrained.state_dict())
    assert entropy_tables_ready(models.load_checkpoint(path, "cpu"))


@pytest.mark.parametrize("module", ["gaussian_conditional", "entropy_bottleneck"])
def test_a_checkpoint_missing_one_modules_entropy_tables_gets_them_recomputed(
    tmp_path, tiny_cps, module
):
    # What the refusal of a damaged table advises: delete that module's tables.
    state = tiny_cps.state_dict()
    for table in ("_quantized_cdf", "_offset", "_cdf_length"):
        del state[f"{module}.{table}"]
    model = models.load_checkpoint(_save(tmp_path / "edited.pth.tar", state), "cpu")
    expected = tiny_cps.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_tables_of_another_size_are_resized(tmp_path, tiny_cps):
    path = _save(tmp_path / "bare.pth.tar", tiny_cps.state_dict())
    model = models.load_checkpoint(path, "cpu")
    assert torch.equal(
        model.gaussian_conditional._quantized_cdf,
        tiny_cps.gaussian_conditional._quantized_cdf,
    )


def test_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path, tiny_cps):
    state = tiny_cps.state_dict()
    state.pop("g_s.0.weight")
    path = _save(tmp_path / "broken.pth.tar", state)
    with pytest.raises(
        ValueError, match="does not fit architecture 'cps': missing 1 keys"
    ):
        models.load_checkpoint(path, "cpu")


@pytest.mark.parametrize(
    "content, message",
    [(b"", "cannot read checkpoint"), (b"not a checkpoint", "cannot read checkpoint")],
)
def test_unreadable_checkpoint_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.pth.tar"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        models.load_checkpoint(str(path), "cpu")


def test_missing_checkpoint_and_unknown_architecture_are_clear_errors(
    tmp_path, tiny_cps
):
    with pytest.raises(ValueError, match="checkpoint not found"):
        models.load_checkpoint(str(tmp_path / "nope.pth.tar"), "cpu")
    path = _save(tmp_path / "ok.pth.tar", tiny_cps.state_dict())
    with pytest.raises(ValueError, match="unknown architecture 'bmshj'"):
        models.load_checkpoint(path, "cpu", architecture="bmshj")


class _NotAWeight:
    """A Python object that weights_only loading refuses."""


@pytest.mark.parametrize(
    "case, message",
    [
        ("folder", "checkpoint {path} is a folder, not a file"),
        ("pipe", "checkpoint {path} is not a regular file (a device or a pipe)"),
        (
            "python object",
            "cannot read checkpoint {path}: it holds Python objects besides tensors",
        ),
        (
            "state_dict a list",
            "checkpoint {path}: not a state dict: its 'state_dict' entry is a "
            "list, not a dict of tensors",
        ),
        (
            "plain dict",
            "checkpoint {path}: not a state dict: entry 'a' is not a tensor (int)",
        ),
    ],
)
def test_files_that_hold_no_weights_say_so_naming_the_file(
    tmp_path, tiny_cps, case, message
):
    path = tmp_path / "bad.pth"
    if case == "folder":
        path.mkdir()
    elif case == "pipe":  # was "checkpoint not found"
        os.mkfifo(path)
    elif case == "python object":
        torch.save({"state_dict": tiny_cps.state_dict(), "extra": _NotAWeight()}, path)
    elif case == "state_dict a list":
        torch.save({"architecture": "cps", "state_dict": [1, 2]}, path)
    else:
        torch.save({"a": 1}, path)
    with pytest.raises(ValueError) as caught:
        models.load_checkpoint(str(path), "cpu")
    assert str(caught.value).startswith(message.format(path=path)), caught.value
    assert "\x1b" not in str(caught.value) and "two options" not in str(caught.value)


@pytest.mark.parametrize("kept", ["half", "all but 10 bytes"])
def test_a_truncated_checkpoint_says_it_is_truncated(tmp_path, tiny_cps, kept):
    whole = tmp_path / "whole.pth"
    torch.save({"state_dict": tiny_cps.state_dict()}, whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2] if kept == "half" else data[:-10])
    with pytest.raises(
        ValueError, match=f"cannot read checkpoint {cut}: the file is truncated"
    ):
        models.load_checkpoint(str(cut), "cpu")


def test_a_tensor_of_the_wrong_rank_is_named_before_the_mismatches_it_causes(
    tmp_path, tiny_cps
):
    """CPS reads N from g_a.0.conv1.weight: flattened, it builds a model every other
    entry misfits, and the message named one of those instead of the cause."""
    weights = dict(tiny_cps.state_dict())
    weights["g_a.0.conv1.weight"] = weights["g_a.0.conv1.weight"].reshape(-1)
    path = _save(tmp_path / "flat.pth.tar", weights)
    with pytest.raises(
        models.checkpoint.ArchitectureMismatch,
        match=r"shape mismatches \(e\.g\. g_a\.0\.conv1\.weight \(\d+,\) vs",
    ):
        models.load_checkpoint(path, "cpu")


def test_running_the_model_never_changes_its_weights(tiny_cps):
    # CompressAI's MaskedConv2d zeroes masked taps in place on its first forward, which
    # would change a checkpoint's fingerprint and make its files undecodable.
    before = {k: v.clone() for k, v in tiny_cps.state_dict().items()}
    with torch.no_grad():
        tiny_cps(torch.rand(1, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in tiny_cps.state_dict().items())


@pytest.mark.parametrize("epoch_first", [False, True])
@pytest.mark.parametrize("wrapper", ["net", "ema", "state_dict_ema"])
def test_weights_nested_under_an_unknown_entry_name_it_and_the_fix(
    tmp_path, tiny_cps, wrapper, epoch_first
):
    # With "epoch" first the line was "entry 'epoch' is not a tensor (int)".
    path = tmp_path / "wrapped.pth"
    entries = [(wrapper, tiny_cps.state_dict()), ("epoch", 3)]
    torch.save(dict(entries[::-1] if epoch_first else entries), path)
    with pytest.raises(ValueError) as caught:
        models.load_checkpoint(str(path), "cpu")
    assert str(caught.value) == (
        f"checkpoint {path}: not a state dict: entry {wrapper!r} is a dict, not a "
        "tensor (weights are read from the top level or from one of the entries "
        "'state_dict', 'network', 'model', 'model_state_dict'); if "
        f"{wrapper!r} holds them, save that dict alone with torch.save"
    )
