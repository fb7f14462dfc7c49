"""Checkpoints whose bytes or tensors cannot be what the model holds are refused in one
line naming the file, by every loader (``models.load_checkpoint`` for codec.py and
test.py, ``init_weights_from`` for train.py --init-from), before any library warning.

Each case below once loaded silently, loaded with a cast, or printed PyTorch's own
output: a flipped byte in the zip (``torch.load`` checks no CRC), an empty weight
(a model of width 0 and a warning about zero-element tensors), a zip without torch's
layout (a C++ "enforce fail"), and weights of a dtype the model would cast them from.
"""

import os
import pickle
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import codec
import models
from models.checkpoint_file import read_checkpoint_file
from utils.training.state_loading import init_weights_from


def _save(path, state_dict):
    torch.save({"architecture": "cps", "state_dict": state_dict}, path)
    return path


def _load_error(path, loader="load_checkpoint") -> str:
    """The error of loading ``path``: one line naming the file, with no warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError) as error:
            if loader == "load_checkpoint":
                models.load_checkpoint(str(path), "cpu")
            else:
                init_weights_from(str(path), models.build_model("cps", N=8))
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert [str(w.message) for w in caught] == []
    return message


def _member_holding(path, tensor) -> str:
    """The name of the zip member of ``path`` that stores ``tensor``'s bytes."""
    with zipfile.ZipFile(path) as archive:
        return next(
            name
            for name in archive.namelist()
            if archive.read(name) == tensor.numpy().tobytes()
        )


def _damaged_and_member(tmp_path, tiny_cps):
    """A checkpoint with one bit flipped inside a weight's stored bytes, and the name
    of the zip member holding them."""
    bias = tiny_cps.state_dict()["h_s.2.bias"]
    path = _save(tmp_path / "damaged.pth", tiny_cps.state_dict())
    member = _member_holding(path, bias)
    data = bytearray(path.read_bytes())
    start = data.find(bias.numpy().tobytes())
    data[start + 5] ^= 0x10
    path.write_bytes(data)
    return path, member


def _damaged(tmp_path, tiny_cps):
    return _damaged_and_member(tmp_path, tiny_cps)[0]


def test_a_flipped_byte_inside_the_zip_is_refused_naming_the_member(tmp_path, tiny_cps):
    path, member = _damaged_and_member(tmp_path, tiny_cps)
    # torch.load alone returns the wrong weight: the CRC check is all that stops it.
    loaded = torch.load(path, weights_only=True)["state_dict"]["h_s.2.bias"]
    assert not torch.equal(loaded, tiny_cps.state_dict()["h_s.2.bias"])
    assert _load_error(path) == (
        f"cannot read checkpoint {path}: the file is damaged (checksum or header "
        f"mismatch in {member}); re-download or re-export it"
    )


def test_a_legacy_pickle_checkpoint_still_loads(tmp_path, tiny_cps):
    path = tmp_path / "legacy.pth"
    torch.save(
        {"state_dict": tiny_cps.state_dict()},
        path,
        _use_new_zipfile_serialization=False,
    )
    assert not zipfile.is_zipfile(path)
    model = models.load_checkpoint(str(path), "cpu")
    assert torch.equal(model.h_s[2].bias, tiny_cps.h_s[2].bias)


def _empty_weight(tmp_path, tiny_cps, key="g_a.0.conv1.weight", shape=(0, 3, 5, 5)):
    state = dict(tiny_cps.state_dict())
    state[key] = torch.zeros(shape)
    return _save(tmp_path / "empty.pth", state)


@pytest.mark.parametrize("loader", ["load_checkpoint", "init_weights_from"])
@pytest.mark.parametrize(
    "key, shape",
    [("g_a.0.conv1.weight", (0, 3, 5, 5)), ("g_a.1.conv1.weight", (8, 8, 0, 0))],
)
def test_an_empty_weight_is_refused_before_a_model_is_built(
    tmp_path, tiny_cps, loader, key, shape
):
    """CPS reads N and the BRB kernel from these two: a size of 0 built a model that
    PyTorch warned about, then blamed an unrelated entry."""
    path = _empty_weight(tmp_path, tiny_cps, key, shape)
    message = _load_error(path, loader)
    assert f"entry {key} has shape {shape}, with no elements" in message


@pytest.mark.parametrize("loader", ["load_checkpoint", "init_weights_from"])
def test_a_weight_on_the_meta_device_is_refused_naming_it_and_the_file(
    tmp_path, tiny_cps, loader
):
    # Before: "Error(s) in loading state_dict for CPS:", or with --init-from PyTorch's
    # "Cannot copy out of meta tensor" without the file's name.
    state = dict(tiny_cps.state_dict())
    state["h_s.2.weight"] = torch.empty_like(state["h_s.2.weight"], device="meta")
    message = _load_error(_save(tmp_path / "meta.pth", state), loader)
    assert "checkpoint entry h_s.2.weight is on the meta device" in message


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_a_sparse_weight_is_refused_naming_it(tmp_path, tiny_cps):
    # ... in one line, without PyTorch's warning about validating it above.
    state = dict(tiny_cps.state_dict())
    state["h_s.2.weight"] = state["h_s.2.weight"].to_sparse()
    path = _save(tmp_path / "sparse.pth", state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            ValueError, match="entry h_s.2.weight is stored as torch.sparse_"
        ):
            models.load_checkpoint(str(path), "cpu")


def _zip_of(tmp_path, *names):
    path = tmp_path / "notes.pth"
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(name, "N: 192\n")
    return path


@pytest.mark.parametrize(
    "names, reason",
    [
        (["a.txt"], "no folder holds every member (a.txt is outside)"),
        (["notes/a.txt"], "no notes/data.pkl"),
        (["notes/data.pkl"], "no notes/version"),
        ([], "it is empty"),
    ],
)
def test_a_zip_without_torch_content_is_not_a_pytorch_checkpoint(
    tmp_path, names, reason
):
    path = _zip_of(tmp_path, *names)
    assert _load_error(path) == (
        f"cannot read checkpoint {path}: not a PyTorch checkpoint (a zip archive "
        f"without torch.save's layout: {reason})"
    )


def _with_entry(tmp_path, tiny_cps, key, value):
    state = {name: tensor.clone() for name, tensor in tiny_cps.state_dict().items()}
    state[key] = value(state[key])
    return _save(tmp_path / "cast.pth", state)


@pytest.mark.parametrize("loader", ["load_checkpoint", "init_weights_from"])
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("g_a.0.conv1.weight", lambda t: t.to(torch.complex64), "is complex64"),
        (
            "g_a.0.conv1.weight",
            lambda t: t.to(torch.int32),
            "is int32, where the model holds real floating point values (float32)",
        ),
        (
            "h_s.2.bias",
            lambda t: t > 0,
            "is bool, where the model holds real floating point values",
        ),
        (
            "gaussian_conditional._quantized_cdf",
            lambda t: t.to(torch.float32),
            "is float32, where the model holds integer values (int32)",
        ),
        (
            "entropy_bottleneck._offset",
            lambda t: t.to(torch.float64),
            "is float64, where the model holds integer values (int32)",
        ),
        (
            "entropy_bottleneck._cdf_length",
            lambda t: t.to(torch.int64) + (1 << 32),
            "holds values outside the range of int32",
        ),
    ],
)
def test_an_entry_of_a_dtype_that_cannot_hold_the_model_values_is_refused(
    tmp_path, tiny_cps, loader, key, value, message
):
    path = _with_entry(tmp_path, tiny_cps, key, value)
    assert f"checkpoint entry {key} " in _load_error(path, loader)
    assert message in _load_error(path, loader)


@pytest.mark.parametrize(
    "key, dtype",
    [
        ("g_a.0.conv1.weight", torch.float16),
        ("g_a.0.conv1.weight", torch.bfloat16),
        ("h_s.2.bias", torch.float64),
        ("gaussian_conditional._quantized_cdf", torch.int64),
    ],
)
def test_other_dtypes_of_the_same_kind_load_as_their_values(
    tmp_path, tiny_cps, key, dtype
):
    path = _with_entry(tmp_path, tiny_cps, key, lambda t: t.to(dtype))
    model = models.load_checkpoint(str(path), "cpu")
    expected = tiny_cps.state_dict()[key]
    assert torch.equal(model.state_dict()[key], expected.to(dtype).to(expected.dtype))


def test_entropy_tables_stored_in_narrower_integers_load_as_their_values(
    tmp_path, tiny_cps
):
    """int16 (or int8 where the values fit) offsets and lengths: compared in their own
    dtype, int32's limits wrapped around and a valid negative offset was refused."""
    narrow = {
        "entropy_bottleneck._offset": torch.int8,
        "entropy_bottleneck._cdf_length": torch.int8,
        "gaussian_conditional._offset": torch.int16,
        "gaussian_conditional._cdf_length": torch.int16,
    }
    original = tiny_cps.state_dict()
    state = {
        name: tensor.to(narrow.get(name, tensor.dtype))
        for name, tensor in original.items()
    }
    model = models.load_checkpoint(str(_save(tmp_path / "narrow.pth", state)), "cpu")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], original[name]) for name in original)


def test_a_checkpoint_saved_without_crc32_loads(tmp_path, tiny_cps):
    """torch.serialization.set_crc32_options(False) stores CRC 0 for every member;
    testzip called all of them damaged although torch.load reads them."""
    path = tmp_path / "no-crc.pth"
    torch.serialization.set_crc32_options(False)
    try:
        _save(path, tiny_cps.state_dict())
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(path) as archive:
        assert {member.CRC for member in archive.infolist()} == {0}
    model = models.load_checkpoint(str(path), "cpu")
    assert torch.equal(model.h_s[2].bias, tiny_cps.h_s[2].bias)


def _multi_disk(tmp_path, tiny_cps):
    """A checkpoint whose zip64 end locator counts 2 disks: zipfile.is_zipfile raised
    BadZipFile ("zipfiles that span multiple disks are not supported")."""
    path = _save(tmp_path / "disks.pth", tiny_cps.state_dict())
    data = bytearray(path.read_bytes())
    data[data.rfind(b"PK\x06\x07") + 16] = 2
    path.write_bytes(data)
    return path


def test_bytes_flipped_anywhere_give_the_checkpoint_or_one_line_naming_it(tmp_path):
    """Damaged names, sizes and offsets failed inside zipfile with errors that did not
    name the file (UnicodeDecodeError, OSError, OverflowError). A small checkpoint is
    mostly zip structure; each of 30 seeded offsets is damaged on its own."""
    torch.manual_seed(0)
    state = {"w": torch.randn(4, 3), "b": torch.randn(5), "n": torch.arange(3)}
    data = _save(tmp_path / "small.pth", state).read_bytes()
    rng = np.random.default_rng(0)
    path = tmp_path / "flipped.pth"
    for offset in rng.choice(len(data), size=30, replace=False):
        damaged = bytearray(data)
        damaged[offset] ^= int(rng.integers(1, 256))
        path.write_bytes(damaged)
        try:
            read_checkpoint_file(str(path))
        except ValueError as error:
            assert str(path) in str(error) and "\n" not in str(error), offset


@pytest.mark.parametrize(
    "make_checkpoint",
    [
        _damaged,
        _empty_weight,
        lambda tmp_path, tiny_cps: _zip_of(tmp_path, "a.txt"),
        _multi_disk,
        lambda tmp_path, tiny_cps: _with_entry(
            tmp_path, tiny_cps, "g_a.0.conv1.weight", lambda t: t.to(torch.complex64)
        ),
    ],
    ids=["damaged", "empty weight", "zip of text", "multi-disk", "complex weight"],
)
def test_codec_refuses_a_bad_checkpoint_in_one_line_and_writes_nothing(
    tmp_path, tiny_cps, capsys, make_checkpoint
):
    path = make_checkpoint(tmp_path, tiny_cps)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
        tmp_path / "in.png"
    )
    argv = ["encode", tmp_path / "in.png", tmp_path / "x.cps", "-p", path]
    status = codec.main([str(arg) for arg in argv])
    err = capsys.readouterr().err.strip()
    assert status == 1
    assert err.startswith("codec.py: error: ") and "\n" not in err
    assert str(path) in err
    assert not (tmp_path / "x.cps").exists()


class _TouchesAFile:
    """Unpickled, it runs ``touch`` on its path."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("content", ["weights", "code"])
def test_a_pickle_that_torch_save_did_not_write_is_refused_without_a_warning(
    tmp_path, tiny_cps, content
):
    # torch.load printed "Detected pickle protocol 4 ... please file an issue" above
    # the error, which called plain tensors "Python objects".
    path, touched = tmp_path / "pickled.pth", tmp_path / "touched"
    saved = (
        {"state_dict": dict(tiny_cps.state_dict())}
        if content == "weights"
        else _TouchesAFile(touched)
    )
    path.write_bytes(pickle.dumps(saved, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError) as caught:
            models.load_checkpoint(str(path), "cpu")
    assert str(caught.value).startswith(
        f"cannot read checkpoint {path}: not a PyTorch checkpoint that loads without "
        "running its code (a pickle torch.save did not write, e.g. pickle.dump's, "
    )
    assert not touched.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_a_legacy_checkpoint_loads_without_a_warning_where_torch_load_can_read_it(
    tmp_path, tiny_cps, protocol
):
    path = tmp_path / "legacy.pth"
    torch.save(
        {"state_dict": tiny_cps.state_dict()},
        path,
        _use_new_zipfile_serialization=False,
        pickle_protocol=protocol,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if protocol == 4:  # weights_only cannot read its frames
            with pytest.raises(ValueError, match="legacy torch.save with pickle_pro"):
                models.load_checkpoint(str(path), "cpu")
            return
        model = models.load_checkpoint(str(path), "cpu")
    assert torch.equal(model.h_s[2].bias, tiny_cps.h_s[2].bias)


@pytest.mark.parametrize("length", [1, 5, 13])
def test_a_legacy_checkpoint_cut_inside_its_first_bytes_is_called_truncated(
    tmp_path, tiny_cps, length
):
    """It was called a pickle torch.save did not write, to be loaded in trusted
    Python."""
    path = tmp_path / "legacy.pth"
    torch.save(tiny_cps.state_dict(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:length])
    with pytest.raises(ValueError) as error:
        models.load_checkpoint(str(path), "cpu")
    assert str(error.value).endswith(
        f"the file is truncated (a legacy torch.save file of {length} bytes)"
    )
