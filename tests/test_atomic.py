"""Atomic writes: an interrupted write keeps the old file, and special files are not
replaced by regular ones."""

import json
import os
import stat
import threading

import pytest

from utils import atomic
from utils.atomic import atomic_write_bytes, atomic_write_json, strict_json


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(
    tmp_path, monkeypatch
):
    target = tmp_path / "results.json"
    target.write_bytes(b"old")

    def disk_full(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new and longer")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["results.json"]


def test_a_fifo_output_is_written_in_place_and_stays_a_fifo(tmp_path):
    """Renaming over a device or pipe (/dev/null) would replace it with a file."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    atomic_write_bytes(fifo, b"payload")
    reader.join(timeout=10)
    assert received == [b"payload"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_folder_or_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        atomic_write_bytes(tmp_path, b"x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_bytes(tmp_path / "missing" / "x.cps", b"x")


def test_json_is_strict_so_every_parser_reads_it(tmp_path):
    document = {
        "psnr": [float("inf"), 30.5],
        "loss": float("nan"),
        "nested": ({"x": 1},),
    }
    assert json.loads(strict_json(document)) == {
        "psnr": [None, 30.5],
        "loss": None,
        "nested": [{"x": 1}],
    }
    atomic_write_json(tmp_path / "r.json", document)
    text = (tmp_path / "r.json").read_text()
    assert text.endswith("\n") and "NaN" not in text and "Infinity" not in text
