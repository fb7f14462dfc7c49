"""Checkpoints the codec cannot use are one-line errors at load time.

Each error names the entry.
"""

import pytest
import torch

import models
from models.weight_checks import is_entropy_table


def _saved(tmp_path, state_dict, **extra):
    path = tmp_path / "model.pth.tar"
    torch.save({"state_dict": state_dict, **extra}, path)
    return str(path)


def _load_error(path) -> str:
    with pytest.raises(ValueError) as error:
        models.load_checkpoint(path, "cpu")
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_valid_checkpoint_passes_validation(tmp_path, tiny_cps):
    model = models.load_checkpoint(_saved(tmp_path, tiny_cps.state_dict()), "cpu")
    assert torch.equal(
        model.gaussian_conditional._quantized_cdf,
        tiny_cps.gaussian_conditional._quantized_cdf,
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected(tmp_path, tiny_cps, value):
    state = tiny_cps.state_dict()
    state["h_s.2.bias"][3] = value
    assert "entry h_s.2.bias holds non-finite values" in _load_error(
        _saved(tmp_path, state)
    )


@pytest.mark.parametrize("module", ["gaussian_conditional", "entropy_bottleneck"])
@pytest.mark.parametrize(
    "corrupt, message",
    [
        # a zero-frequency symbol
        (
            lambda cdf, lengths, offsets: cdf[1].__setitem__(
                slice(3, 5), cdf[1][4].item()
            ),
            "_quantized_cdf row 1 is not a CDF",
        ),
        # decreasing
        (
            lambda cdf, lengths, offsets: cdf[0].__setitem__(2, cdf[0][1] - 1),
            "_quantized_cdf row 0 is not a CDF",
        ),
        (lambda cdf, lengths, offsets: cdf[2].__setitem__(0, 7), "row 2 is not a CDF"),
        (
            lambda cdf, lengths, offsets: lengths.__setitem__(1, 1),
            "_cdf_length[1] = 1 is outside",
        ),
        (
            lambda cdf, lengths, offsets: lengths.__setitem__(0, cdf.shape[1] + 1),
            "_cdf_length[0]",
        ),
        (
            lambda cdf, lengths, offsets: lengths.__setitem__(2, lengths[2] - 1),
            "row 2 is not a CDF",
        ),
        (
            lambda cdf, lengths, offsets: offsets.__setitem__(1, 5),
            "_offset[1] = 5 is outside",
        ),
        (
            lambda cdf, lengths, offsets: offsets.__setitem__(1, -(10**6)),
            "_offset[1] = -1000000",
        ),
    ],
)
def test_hostile_entropy_tables_are_rejected(
    tmp_path, tiny_cps, module, corrupt, message
):
    state = tiny_cps.state_dict()
    corrupt(
        state[f"{module}._quantized_cdf"],
        state[f"{module}._cdf_length"],
        state[f"{module}._offset"],
    )
    error = _load_error(_saved(tmp_path, state))
    assert f"entry {module}." in error and message in error


@pytest.mark.parametrize("module", ["gaussian_conditional", "entropy_bottleneck"])
@pytest.mark.parametrize(
    "offset, accepted",
    [
        (lambda width: -width, False),
        (lambda width: 1 - width, True),
        (lambda width: 0, True),
        (lambda width: 1, False),
    ],
    ids=["-width", "1-width", "0", "1"],
)
def test_offsets_are_accepted_from_just_above_minus_the_table_width_up_to_zero(
    tmp_path, tiny_cps, module, offset, accepted
):
    # The documented rule is -width < offset <= 0; both ends are pinned here.
    state = tiny_cps.state_dict()
    width = state[f"{module}._quantized_cdf"].shape[1]
    state[f"{module}._offset"][1] = offset(width)
    path = _saved(tmp_path, state)
    if accepted:
        model = models.load_checkpoint(path, "cpu")
        assert int(model.state_dict()[f"{module}._offset"][1]) == offset(width)
    else:
        message = f"{module}._offset[1] = {offset(width)} is outside ({-width}, 0]"
        assert message in _load_error(path)


def test_unsorted_scale_table_is_rejected(tmp_path, tiny_cps):
    state = tiny_cps.state_dict()
    state["gaussian_conditional.scale_table"] = state[
        "gaussian_conditional.scale_table"
    ].flip(0)
    assert "gaussian_conditional.scale_table must hold" in _load_error(
        _saved(tmp_path, state)
    )


@pytest.mark.parametrize("architecture", [["cps"], 3, {"name": "cps"}])
def test_architecture_that_is_not_a_string_is_rejected(
    tmp_path, tiny_cps, architecture
):
    path = _saved(tmp_path, tiny_cps.state_dict(), architecture=architecture)
    assert "'architecture' must be a model name string" in _load_error(path)


def test_text_file_given_as_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("N: 192\nlambda: 0.0018\n")
    assert "not a PyTorch checkpoint" in _load_error(str(path))


def test_tables_compressai_computes_satisfy_the_check(tiny_cps):
    # The check demands what the rANS coder needs and no more than update() gives.
    for module in (tiny_cps.gaussian_conditional, tiny_cps.entropy_bottleneck):
        lengths = module._cdf_length.long()
        for row, length in zip(module._quantized_cdf.long(), lengths):
            assert row[0] == 0 and row[length - 1] == 1 << 16
            assert (torch.diff(row[:length]) > 0).all()


def _scalar_weight(state_dict, name):
    state_dict = dict(state_dict)
    state_dict[name] = torch.tensor(1.0)
    return state_dict


@pytest.mark.parametrize(
    "architecture, make_state, message",
    [
        (
            "cps",
            lambda cps: {1: torch.zeros(1)},
            "key 1 is not a parameter name string",
        ),
        (
            "cps",
            lambda cps: _scalar_weight(cps.state_dict(), "g_a.0.conv1.weight"),
            "does not fit architecture 'cps'",
        ),
        (
            "kamisli2024",
            lambda cps: {"g_a_source.weight": torch.zeros(5)},
            "does not fit architecture 'kamisli2024'",
        ),
        (
            "mbt2018",
            lambda cps: {
                "g_a.0.weight": torch.zeros(8, 3, 5, 5),
                "g_a.6.weight": torch.zeros(8, 8, 5, 5),
            },
            "does not fit architecture 'mbt2018'",
        ),
    ],
)
def test_weights_of_the_wrong_shape_or_kind_are_one_line_errors(
    tmp_path, tiny_cps, architecture, make_state, message
):
    """Sizes are read from the weights: a tensor of the wrong rank, a missing layer or a
    non-string key must not surface as IndexError or a CompressAI traceback."""
    path = tmp_path / "odd.pth"
    torch.save({"architecture": architecture, "state_dict": make_state(tiny_cps)}, path)
    assert message in _load_error(str(path))


@pytest.mark.parametrize("tables", ["stored", "absent"])
def test_quantiles_too_far_apart_to_tabulate_are_refused_before_update_runs(
    tmp_path, tiny_cps, tables
):
    # update() would build a 2e7-symbol row per channel: 20 GB and many minutes.
    state = tiny_cps.state_dict()
    state["entropy_bottleneck.quantiles"][3, 0, 2] = 1e7
    if tables == "absent":
        state = {k: v for k, v in state.items() if "_quantized_cdf" not in k}
    path = _saved(tmp_path, state)
    message = _load_error(path)
    assert message.startswith(f"{path}: checkpoint entry entropy_bottleneck.quantiles")
    assert "spans 1e+07 symbols in channel 3" in message and "65536" in message


def test_quantiles_wide_but_tabulable_get_their_tables(tmp_path, tiny_cps):
    """Spans of a few thousand symbols are slow to tabulate, not unusable: a limit
    of 4096 refused files that had loaded and coded."""
    state = tiny_cps.state_dict()
    quantiles = state["entropy_bottleneck.quantiles"]
    quantiles[:, 0, 0] = quantiles[:, 0, 1] - 2499.5
    quantiles[:, 0, 2] = quantiles[:, 0, 1] + 2499.5
    state = {k: v for k, v in state.items() if "_quantized_cdf" not in k}
    model = models.load_checkpoint(_saved(tmp_path, state), "cpu")
    assert model.entropy_bottleneck._quantized_cdf.shape[1] == 5001 + 2


def _zoo_weights(name):
    torch.manual_seed(0)
    return models.get_model_class(name).zoo_class(N=8, M=8).state_dict()


@pytest.mark.parametrize(
    "fill, dtype, message",
    [
        (float("nan"), "float32", "g_a.0.weight holds non-finite values"),
        (1.0, "int64", "g_a.0.weight is int64, where the model holds real floating"),
    ],
)
def test_a_compressai_zoo_checkpoint_is_checked_like_every_other(
    tmp_path, fill, dtype, message
):
    # CompressAI's own load_state_dict loaded these, casting or keeping NaN.
    state = _zoo_weights("mbt2018")
    state["g_a.0.weight"] = torch.full_like(state["g_a.0.weight"], fill).to(
        getattr(torch, dtype)
    )
    path = _saved(tmp_path, state, architecture="mbt2018")
    assert message in _load_error(path)


def test_zoo_weights_given_to_another_zoo_architecture_name_the_entries_that_differ(
    tmp_path,
):
    # Before, the line was PyTorch's first one: "Error(s) in loading state_dict for
    # ScaleHyperprior:".
    path = _saved(tmp_path, _zoo_weights("mbt2018"))
    with pytest.raises(models.checkpoint.ArchitectureMismatch) as caught:
        models.load_checkpoint(path, "cpu", architecture="bmshj2018-hyperprior")
    assert str(caught.value) == (
        f"{path}: checkpoint does not fit architecture 'bmshj2018-hyperprior': "
        "unexpected 9 keys (e.g. entropy_parameters.0.weight); 4 shape mismatches "
        "(e.g. h_s.2.weight (8, 12, 5, 5) vs (8, 8, 5, 5))"
    )


def test_zoo_weights_with_compressai_1_1_entropy_bottleneck_names_load(tmp_path):
    """CompressAI before 1.2 named them _matrix0, _bias0, _factor0; its own load
    renames them, and the checked load refused them as unexpected keys."""
    state = _zoo_weights("bmshj2018-factorized")
    old_names = {"matrices.": "_matrix", "biases.": "_bias", "factors.": "_factor"}
    renamed = {}
    for key, value in state.items():
        for new, old in old_names.items():
            key = key.replace(f"entropy_bottleneck.{new}", f"entropy_bottleneck.{old}")
        renamed[key] = value
    assert "entropy_bottleneck._matrix0" in renamed
    path = _saved(tmp_path, renamed, architecture="bmshj2018-factorized")
    model = models.load_checkpoint(path, "cpu")
    for key, value in state.items():
        if not is_entropy_table(key):  # rebuilt by update()
            assert torch.equal(model.state_dict()[key], value), key


def test_a_zoo_model_loads_non_strictly_as_pytorch_models_do():
    """The checked load took CompressAI's signature, which has no assign: a
    non-strict load raised a TypeError."""
    model = models.get_model_class("bmshj2018-factorized").zoo_class(N=8, M=8)
    zoo = models.build_model("bmshj2018-factorized", N=8, M=8)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("g_a")}
    result = zoo.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and "g_s.0.weight" in result.missing_keys
    zoo.load_state_dict(model.state_dict(), assign=True)
    assert torch.equal(zoo.g_a[0].weight, model.g_a[0].weight)
