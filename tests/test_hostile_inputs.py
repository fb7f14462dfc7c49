"""Fuzzing the command lines with forged, truncated and hostile inputs.

Every case runs codec.py or test.py and must end with exit status 1, exactly one line
on stderr, no traceback, no signal, within a time limit, and with every file the user
gave left as it was. The cases of one test run one after the other in one child
process (so PyTorch loads once per test, not once per case); a signal kills the child
and fails the test, naming the case it was running. The cases are the ones a fuzzing
run found: forged headers with valid CRCs claiming huge images, latent strings far
too short for their header, damaged and truncated files, hostile checkpoints, and
outputs that would overwrite an input.
"""

import json
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import save_model_checkpoint
from PIL import Image

import models
from models.base import CodingPlan
from utils.coding.container import pack
from utils.coding.payload import CompressedImage, LayeredImage

REPO = __file__.rsplit("/tests/", 1)[0]
TIME_LIMIT_S = 60


CHILD = """
import contextlib, io, json, sys, time
import codec, test
cases = json.load(open(sys.argv[1]))
results = {}
for name, script, argv in cases:
    open(sys.argv[2] + '.running', 'w').write(name)
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = (codec if script == 'codec' else test).main(argv)
        except SystemExit as exc:
            status = exc.code
    results[name] = {'returncode': status, 'stdout': out.getvalue(),
                     'stderr': err.getvalue(), 'seconds': time.perf_counter() - start}
json.dump(results, open(sys.argv[2], 'w'))
"""


@dataclass
class Result:
    """What one case left: its exit status, its output and how long it took."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_cases(folder, cases, timeout=240):
    """Run ``(name, "codec" | "test", argv)`` cases in one child; {name: Result}."""
    spec, report = folder / "cases.json", folder / "results.json"
    spec.write_text(
        json.dumps(
            [(name, script, [str(a) for a in argv]) for name, script, argv in cases]
        )
    )
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(spec), str(report)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    running = (
        (folder / "results.json.running").read_text()
        if (folder / "results.json.running").exists()
        else "?"
    )
    assert child.returncode == 0, (
        f"the child died (status {child.returncode}) during case "
        f"{running}: {child.stderr[-2000:]}"
    )
    return {
        name: Result(**value) for name, value in json.loads(report.read_text()).items()
    }


def run(argv, timeout=TIME_LIMIT_S):
    """One command in its own child process (for the cases about process start-up)."""
    return subprocess.run(
        [sys.executable, *map(str, argv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def cps(folder):
    torch.manual_seed(0)
    model = models.build_model("cps", N=8)
    return model, save_model_checkpoint(folder, model, "cps")


@pytest.fixture(scope="module")
def mei(folder):
    torch.manual_seed(0)
    model = models.build_model("mei2021-quality", num_filters=[8, 8], lmbdas=[2.0, 1.0])
    return model, save_model_checkpoint(folder, model, "mei")


@pytest.fixture(scope="module")
def kamisli(folder):
    torch.manual_seed(0)
    model = models.build_model("kamisli2024", block_size=4, N=16, M=8)
    return model, save_model_checkpoint(folder, model, "kamisli")


def forged_cps(model, side, y_string=b"\xff" * 8, z_string=b"\xff" * 8):
    """A well-formed .cps file (valid CRC, this checkpoint's fingerprint) whose header
    claims a side x side image while its strings hold a few bytes."""
    from utils.coding.payload import model_fingerprint

    pad = -side % model.downsampling_factor
    return pack(
        CompressedImage(
            height=side,
            width=side,
            pad_bottom=pad,
            pad_right=pad,
            architecture=model.registry_name,
            fingerprint=model_fingerprint(model),
            order="wavefront",
            grayscale=False,
            y_hat_crc=0,
            z_string=z_string,
            y_string=y_string,
        )
    )


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body))


def _layered(model, side, streams=2):
    from utils.coding.payload import model_fingerprint

    return pack(
        LayeredImage(
            height=side,
            width=side,
            architecture=model.registry_name,
            fingerprint=model_fingerprint(model),
            total_layers=2,
            streams=[b"\xff" * 8] * streams,
            latent_crcs=[0] * streams,
        )
    )


def _size_forged(model, height, width):
    data = bytearray(forged_cps(model, 64)[:-4])
    struct.pack_into(">II", data, 6, height, width)
    return _with_crc(bytes(data))


def _zero_sized_layered(model):
    data = bytearray(_layered(model, 64, streams=1))
    header_end = len(data) - 8 - 4
    struct.pack_into(">II", data, 7, 0, 0)
    return _with_crc(bytes(data[:header_end])) + bytes(data[header_end + 4 :])


def _unknown_flags(model):
    data = bytearray(forged_cps(model, 64)[:-4])
    data[5] |= 0x80
    return _with_crc(bytes(data))


def _damaged(data: bytes, rng: random.Random) -> bytes:
    """One random flip of 1-4 bits, truncation or appended junk, by turns."""
    mutated = bytearray(data)
    kind = rng.randrange(3)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        mutated = mutated[: rng.randrange(len(mutated))]
    else:
        mutated += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(mutated)


def _checkpoint_variant(folder, model, name, change):
    state = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    entry = {"architecture": "cps", "state_dict": state}
    change(entry)
    path = folder / f"{name}.pth.tar"
    torch.save(entry, path)
    return path


def _nan_weights(entry):
    for key, tensor in entry["state_dict"].items():
        if tensor.is_floating_point() and "cdf" not in key:
            tensor.fill_(float("nan"))


# (case name, expected fragment of the one error line); filled by the fixture below.
EXPECTED = {}
DAMAGED_FILES_PER_MODEL = 30


@pytest.fixture(scope="module")
def outcomes(folder, cps, mei, kamisli):
    """Build every hostile input, run all cases in one child, return {name: Result}."""
    cases, photo = [], folder / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3)).astype(np.uint8)).save(photo)

    def case(name, script, argv, expected):
        cases.append((name, script, argv))
        EXPECTED[name] = expected

    def decode_case(name, data, checkpoint, expected, *flags, suffix=".cps"):
        path = folder / f"{name}{suffix}"
        path.write_bytes(data)
        case(
            name,
            "codec",
            ["decode", path, folder / f"{name}.png", "-p", checkpoint, *flags],
            expected,
        )

    cps_model, cps_checkpoint = cps
    for side, budget in ((4096, "2GB"), (6144, "2GB"), (8192, "2GB"), (2048, "none")):
        decode_case(
            f"forged cps {side} budget {budget}",
            forged_cps(cps_model, side),
            cps_checkpoint,
            "error:",
            "--max-memory",
            budget,
        )
    for side in (4096, 30000):
        decode_case(
            f"forged kamisli {side}",
            forged_cps(kamisli[0], side, z_string=b""),
            kamisli[1],
            "memory budget",
        )
        decode_case(
            f"forged cpsl {side}",
            _layered(mei[0], side),
            mei[1],
            "memory budget",
            suffix=".cpsl",
        )
    decode_case(
        "zero-sized cps", _size_forged(cps_model, 0, 0), cps_checkpoint, "1 to 65535"
    )
    decode_case(
        "oversized cps",
        _size_forged(cps_model, 70000, 16),
        cps_checkpoint,
        "1 to 65535",
    )
    decode_case(
        "zero-sized cpsl",
        _zero_sized_layered(mei[0]),
        mei[1],
        "1 to 65535",
        suffix=".cpsl",
    )
    # The name must not hold the fragment: the error line quotes the file's path.
    decode_case(
        "newer header bits",
        _unknown_flags(cps_model),
        cps_checkpoint,
        "unknown .cps flag bits 0x80: written by a newer version",
    )

    shuffle = random.Random(0)
    for kind, (model, checkpoint) in (("cps", cps), ("mei", mei), ("kamisli", kamisli)):
        image = torch.from_numpy(np.asarray(Image.open(photo)).copy()).permute(2, 0, 1)
        data = pack(model.eval().encode(image, CodingPlan()))
        for number in range(DAMAGED_FILES_PER_MODEL):
            decode_case(
                f"damaged {kind} {number}",
                _damaged(data, shuffle),
                checkpoint,
                "error:",
            )

    hostile = {
        "zero cdf": (
            lambda entry: entry["state_dict"][
                "gaussian_conditional._quantized_cdf"
            ].zero_(),
            "_quantized_cdf",
        ),
        "nan weights": (_nan_weights, "finite"),
        "list architecture": (
            lambda entry: entry.update(architecture=["cps"]),
            "architecture",
        ),
    }
    for name, (change, expected) in hostile.items():
        path = _checkpoint_variant(folder, cps_model, name.replace(" ", "_"), change)
        case(
            f"checkpoint {name}",
            "codec",
            ["encode", photo, folder / "c.cps", "-p", path],
            expected,
        )
    for name, content in (("text", b"just some text\n"), ("empty", b"")):
        path = folder / f"{name}.pth"
        path.write_bytes(content)
        case(
            f"checkpoint {name} file",
            "codec",
            ["encode", photo, folder / "t.cps", "-p", path],
            "checkpoint",
        )

    huge = folder / "huge.png"
    Image.new("1", (12000, 12000)).save(huge)  # 144 Mpx; a few kilobytes on disk
    case(
        "reading a huge image under a budget",
        "codec",
        [
            "encode",
            huge,
            folder / "huge.cps",
            "-p",
            cps_checkpoint,
            "--max-memory",
            "2GB",
        ],
        "reading of this 12000x12000 image",
    )

    same = folder / "same.png"
    Image.new("RGB", (16, 16)).save(same)
    case(
        "encode onto its input",
        "codec",
        ["encode", same, folder / "." / same.name, "-p", cps_checkpoint],
        "refusing to overwrite",
    )
    same_cps = folder / "same.cps"
    same_cps.write_bytes(
        pack(cps_model.encode(torch.zeros(3, 16, 16, dtype=torch.uint8), CodingPlan()))
    )
    case(
        "decode onto its input",
        "codec",
        ["decode", same_cps, folder / "." / same_cps.name, "-p", cps_checkpoint],
        "refusing to overwrite",
    )
    originals = {path: path.read_bytes() for path in (same, same_cps)}

    tiny = folder / "tiny_images"
    tiny.mkdir()
    Image.new("RGB", (6, 5), (120, 40, 200)).save(tiny / "tiny.png")
    cases.append(
        (
            "test.py tiny image",
            "test",
            ["checkpoint", "-p", cps_checkpoint, "--dataset", tiny, "--no-progress"],
        )
    )
    not_a_folder = folder / "a_file"
    not_a_folder.write_text("x")
    case(
        "test.py output is a file",
        "test",
        [
            "checkpoint",
            "-p",
            cps_checkpoint,
            "--dataset",
            tiny,
            "-d",
            not_a_folder,
            "--no-progress",
        ],
        "not a folder",
    )

    results = run_cases(folder, cases)
    for path, content in originals.items():
        assert path.read_bytes() == content, f"{path} was overwritten"
    return results


def _error_cases():
    """Case names, known once the module's fixture has been built (pytest collects
    before fixtures run, so the list is rebuilt here from the same recipe)."""
    names = [
        f"forged cps {side} budget {budget}"
        for side, budget in (
            (4096, "2GB"),
            (6144, "2GB"),
            (8192, "2GB"),
            (2048, "none"),
        )
    ]
    names += [
        f"forged {kind} {side}"
        for side in (4096, 30000)
        for kind in ("kamisli", "cpsl")
    ]
    names += ["zero-sized cps", "oversized cps", "zero-sized cpsl", "newer header bits"]
    names += [
        f"damaged {kind} {n}"
        for kind in ("cps", "mei", "kamisli")
        for n in range(DAMAGED_FILES_PER_MODEL)
    ]
    names += [
        f"checkpoint {name}"
        for name in (
            "zero cdf",
            "nan weights",
            "list architecture",
            "text file",
            "empty file",
        )
    ]
    names += [
        "reading a huge image under a budget",
        "encode onto its input",
        "decode onto its input",
        "test.py output is a file",
    ]
    return names


ERROR_CASES = _error_cases()


@pytest.mark.parametrize("name", ERROR_CASES)
def test_every_hostile_input_ends_in_one_line_and_status_1(outcomes, name):
    result = outcomes[name]
    assert result.seconds < TIME_LIMIT_S, f"{name} took {result.seconds:.0f} s"
    if name.startswith("test.py"):
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert EXPECTED[name] in result.stderr.strip().splitlines()[-1]
        return
    assert_one_line_error(result, EXPECTED[name])


def test_the_fuzz_list_covers_every_case_built(outcomes):
    assert set(ERROR_CASES) | {"test.py tiny image"} == set(outcomes)


def test_test_py_reports_null_for_metrics_of_tiny_images(outcomes):
    result = outcomes["test.py tiny image"]
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(result.stdout)["results"]
    assert results["psnr-b"] == [None] and results["ms-ssim-rgb"] == [None]
    assert results["bpp"][0] > 0


def _wait_until_torch_is_loading(child: subprocess.Popen) -> None:
    """Return once ``child`` maps libtorch: the scripts import torch inside
    ``utils.cli.run_main``, so a signal from then on meets its handler, however slowly
    a loaded machine starts the interpreter."""
    maps = f"/proc/{child.pid}/maps"
    deadline = time.monotonic() + TIME_LIMIT_S
    while time.monotonic() < deadline and child.poll() is None:
        try:
            with open(maps) as mapped:
                if "libtorch" in mapped.read():
                    return
        except OSError:
            break
        time.sleep(0.01)
    pytest.skip("the process could not be observed loading torch")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_in_a_real_process_is_one_line_and_status_130(folder, cps):
    """SIGINT while codec.py loads and codes: no traceback, exit status 130."""
    _, checkpoint = cps
    photo = folder / "sigint.png"
    Image.new("RGB", (64, 64)).save(photo)
    child = subprocess.Popen(
        [
            sys.executable,
            "codec.py",
            "encode",
            str(photo),
            str(folder / "sigint.cps"),
            "-p",
            str(checkpoint),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_until_torch_is_loading(child)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=TIME_LIMIT_S)
    if child.returncode == 0:
        pytest.skip("the process finished before the signal arrived")
    assert child.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "codec.py: interrupted"
