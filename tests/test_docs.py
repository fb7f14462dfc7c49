"""The documentation's commands and code work as written.

Every ``python SCRIPT ...`` line of a ```bash / ```sh / ```console block in README.md
and docs/*.md is parsed by that script's own ``parse_args``: a usage error fails the
test (``--help`` exiting 0 would pass). The commands that run on bundled data (the
codec on ``assets/images``, BD-rate tables of ``assets/``, the demo) run for real,
the "From Python" snippet runs in a fresh interpreter from the repository root, and
the "Add a model" examples are executed, registered and used for a round trip.
"""

import argparse
import dataclasses
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from typing import Dict, List, Tuple

import pytest
import torch
from conftest import run_python

import models
from models.base import CodingPlan
from utils.coding.container import pack, unpack
from utils.coding.payload import BitstreamError
from utils.evaluation import rd
from utils.evaluation.curves import load_curve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(REPO, "README.md")] + sorted(
    glob.glob(os.path.join(REPO, "docs", "*.md"))
)
SHELL_BLOCK = re.compile(r"^```(bash|sh|console)\n(.*?)^```", re.S | re.M)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SHIPPED = "experiment/shipped/cps_n64_lambda00035/model.pth"
BUNDLED_IMAGE = "assets/images/astronaut.png"


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def documented_commands() -> List[Tuple[str, List[str]]]:
    """(page:line, argv after ``python``) of every documented ``python`` command, with
    backslash continuations joined, a ``$ `` prompt and trailing comments removed."""
    commands = []
    for page in PAGES:
        text = _read(page)
        for match in SHELL_BLOCK.finditer(text):
            first_line = text[: match.start(2)].count("\n") + 1
            lines = match.group(2).replace("\\\n", " ").split("\n")
            number = first_line
            for line, raw_count in zip(lines, _raw_line_counts(match.group(2))):
                stripped = line.strip()
                if stripped.startswith("$ "):
                    stripped = stripped[2:]
                if stripped.startswith("python "):
                    argv = shlex.split(stripped, comments=True)[1:]
                    commands.append((f"{os.path.relpath(page, REPO)}:{number}", argv))
                number += raw_count
    return commands


def _raw_line_counts(block: str) -> List[int]:
    """How many source lines each joined line of ``block`` spans."""
    counts, current = [], 1
    for raw in block.split("\n"):
        if raw.endswith("\\"):
            current += 1
        else:
            counts.append(current)
            current = 1
    return counts


def python_snippet(page: str, heading: str) -> str:
    """The first ```python block after ``heading`` in ``page``."""
    text = _read(os.path.join(REPO, page))
    start = text.index(heading)
    return PYTHON_BLOCK.search(text, start).group(1)


_SCRIPTS: Dict[str, object] = {}


def script(relative: str):
    """The script module at ``relative`` (train.py, benchmarks/x.py, ...), loaded by
    path under a private name so that ``test.py`` cannot collide with Python's
    ``test``."""
    if relative not in _SCRIPTS:
        name = "docs_script_" + re.sub(r"\W", "_", relative)
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(REPO, relative)
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[relative] = module
    return _SCRIPTS[relative]


COMMANDS = documented_commands()
SCRIPT_COMMANDS = [
    (where, argv) for where, argv in COMMANDS if argv and argv[0] != "-m"
]


def test_the_pages_document_the_main_scripts():
    scripts = {argv[0] for _, argv in SCRIPT_COMMANDS}
    assert {"train.py", "test.py", "codec.py"} <= scripts
    assert any(name.startswith("benchmarks/") for name in scripts)


@pytest.mark.parametrize(
    "where, argv", SCRIPT_COMMANDS, ids=[w for w, _ in SCRIPT_COMMANDS]
)
def test_documented_command_parses(where, argv):
    path = os.path.join(REPO, argv[0])
    assert os.path.isfile(path), f"{where}: no script {argv[0]}"
    try:
        script(argv[0]).parse_args(argv[1:])
    except SystemExit as exc:
        assert exc.code == 0, f"{where}: `python {' '.join(argv)}` is a usage error"


def test_only_known_modules_are_run_with_dash_m():
    modules = {argv[1] for _, argv in COMMANDS if argv[:1] == ["-m"]}
    assert modules <= {"venv", "pytest", "utils.training.release"}, modules


def test_relative_links_point_to_files():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _read(page)):
            if "://" in target:
                continue
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), target))
            assert os.path.exists(resolved), (
                f"{os.path.relpath(page, REPO)} links {target}"
            )


def test_pages_cite_nothing_outside_the_repository():
    for page in PAGES:
        text = _read(page)
        for phrase in ("baselines_spec", "the issue", "Part B"):
            assert phrase not in text, f"{os.path.relpath(page, REPO)} cites {phrase!r}"


def test_readme_codec_commands_run_on_the_bundled_image(tmp_path, capsys):
    """The quick start's encode, and the decode it mentions, on the shipped model."""
    encode = next(
        argv
        for _, argv in COMMANDS
        if argv[:2] == ["codec.py", "encode"] and BUNDLED_IMAGE in argv
    )
    assert SHIPPED in encode
    codec = script("codec.py")
    cps = str(tmp_path / "astronaut.cps")
    argv = [
        cps
        if arg == "astronaut.cps"
        else os.path.join(REPO, arg)
        if "/" in arg
        else arg
        for arg in encode[1:]
    ]
    assert codec.main(argv) == 0
    png = str(tmp_path / "out.png")
    assert codec.main(["decode", cps, png, "-p", os.path.join(REPO, SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert "bpp" in out and "256x256" in out
    assert os.path.getsize(png) > 0


def _bdrate_rows(argv: List[str]) -> Dict[str, Dict[str, float]]:
    test_script = script("test.py")
    args = test_script.parse_args(
        [os.path.join(REPO, a) if a.startswith("assets/") else a for a in argv[1:]]
    )
    from utils.evaluation import app

    table = app.run_bdrate(args)
    return {row["name"]: row["bd-rate"] for row in table["rows"]}


def test_readme_bd_rate_table_is_what_the_documented_command_computes():
    argv = next(
        argv
        for _, argv in COMMANDS
        if argv[:2] == ["test.py", "bdrate"]
        and "assets/results/kodak/jpeg_pillow.json" in argv
    )
    computed = _bdrate_rows(argv)
    readme = _read(os.path.join(REPO, "README.md"))
    table = readme[readme.index("| Method | Points | BD-rate psnr-rgb") :]
    rows = [line for line in table.split("\n\n")[0].splitlines()[2:]]
    assert len(rows) == len(computed)
    for row in rows:
        name, _, *values = [cell.strip() for cell in row.strip("|").split("|")]
        for metric, value in zip(("psnr-rgb", "ms-ssim-rgb", "psnr-b"), values):
            got = computed[name][metric]
            if value == "-":
                assert got is None, (name, metric, got)
            else:
                assert got == pytest.approx(float(value), abs=0.006), (name, metric)


def _options(relative: str) -> Dict[str, List[argparse.Action]]:
    """{sub-command: its options (not --help)} of the script at ``relative``, read
    from its ``build_parser``. argparse lists a parser's actions only in private
    attributes."""
    [commands] = [
        action
        for action in script(relative).build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    return {
        name: [
            action
            for action in parser._actions
            if action.option_strings and not isinstance(action, argparse._HelpAction)
        ]
        for name, parser in commands.choices.items()
    }


def _flag_reference() -> Dict[str, str]:
    """{"script command": the text of every docs/evaluation.md flag-reference section
    whose heading names that command}."""
    text = _read(os.path.join(REPO, "docs", "evaluation.md"))
    reference = text[text.index("\n## Flag reference") :]
    covered: Dict[str, str] = {}
    for section in reference.split("\n### ")[1:]:
        heading = section.split("\n", 1)[0]
        for name in re.findall(r"`((?:test|codec)\.py \w+)`", heading):
            covered[name] = covered.get(name, "") + section
    return covered


DOCUMENTED_SCRIPTS = ("test.py", "codec.py")


@pytest.mark.parametrize("relative", DOCUMENTED_SCRIPTS)
def test_every_flag_is_in_the_flag_reference_of_its_command(relative):
    reference = _flag_reference()
    for command, options in _options(relative).items():
        text = reference.get(f"{relative} {command}")
        assert text, (
            f"docs/evaluation.md has no flag-reference section for {relative} {command}"
        )
        for flag in (flag for option in options for flag in option.option_strings):
            assert re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", text), (
                f"docs/evaluation.md does not document {relative} {command} {flag}"
            )


@pytest.mark.parametrize("relative", DOCUMENTED_SCRIPTS)
def test_every_flag_has_a_help_text(relative):
    for command, options in _options(relative).items():
        for option in options:
            assert option.help, (
                f"{relative} {command} {option.option_strings[0]} has no help"
            )


def _evaluation_points(argv: List[str]) -> int:
    """RD points of the results file a documented evaluation command writes: one per
    quality, or per checkpoint. A checkpoint pattern is expanded in the repository; one
    that matches nothing there names files the reader downloads (the authors' six), and
    counts as enough."""
    args = script("test.py").parse_args(
        [os.path.join(REPO, a) if a.startswith("assets/") else a for a in argv[1:]]
    )
    if args.command != "checkpoint":
        return len(args.quality)
    count = 0
    for path in args.checkpoints:
        matches = glob.glob(os.path.join(REPO, path)) if "*" in path else [path]
        count += len(matches) or rd.MIN_POINTS
    return count


def test_documented_bd_rates_have_enough_points_to_give_numbers():
    """Every curve of a documented ``bdrate`` command is a bundled file or the results
    of a documented evaluation, with at least ``MIN_POINTS`` points either way: a
    single checkpoint's results would give a table of ``-``."""
    written = {}
    for _, argv in SCRIPT_COMMANDS:
        if (
            argv[:2]
            in (
                ["test.py", "checkpoint"],
                ["test.py", "pretrained"],
                ["test.py", "codec"],
            )
            and "-d" in argv
        ):
            written[os.path.join(argv[argv.index("-d") + 1], "results.json")] = argv
    bdrates = [
        (where, argv)
        for where, argv in SCRIPT_COMMANDS
        if argv[:2] == ["test.py", "bdrate"]
    ]
    assert len(bdrates) >= 4
    for where, argv in bdrates:
        args = script("test.py").parse_args(argv[1:])
        for path in [args.anchor, *args.results]:
            if path in written:
                points = _evaluation_points(written[path])
            else:
                assert path.startswith("assets/"), (
                    f"{where}: no documented command writes {path}"
                )
                points = len(load_curve(os.path.join(REPO, path)).bpp)
            assert points >= rd.MIN_POINTS, f"{where}: {path} has {points} RD points"


@pytest.mark.slow  # an end-to-end run in a fresh process or a large image
def test_from_python_snippet_runs_from_the_repository_root(tmp_path):
    snippet = python_snippet("README.md", "**From Python**")
    decoded = tmp_path / "decoded.png"
    assert '"decoded.png"' in snippet
    code = snippet.replace('"decoded.png"', repr(str(decoded)))
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    from utils.image_io import read_image

    image, _ = read_image(os.path.join(REPO, BUNDLED_IMAGE))
    result, _ = read_image(str(decoded))
    assert result.shape == image.shape


@pytest.fixture
def registry_snapshot():
    """Leave the model registry as it was after a test registers example models (and let
    the example register its name even where a reader has added that model for real)."""
    before = dict(models.MODELS)
    models.MODELS.pop("toy-factorized", None)
    yield
    models.MODELS.clear()
    models.MODELS.update(before)


@pytest.mark.parametrize(
    "page, heading, name",
    [
        ("README.md", "## Add a model", "toy-factorized"),
        (
            "docs/architecture.md",
            "## Adding a model with its own encode and decode",
            "toy-factorized",
        ),
    ],
)
def test_add_a_model_example_registers_and_codes(
    page, heading, name, tmp_path, registry_snapshot, capsys
):
    namespace = {"__name__": "models.toy"}
    exec(compile(python_snippet(page, heading), f"{page} example", "exec"), namespace)
    torch.manual_seed(0)
    model = models.build_model(name, N=8, M=8).eval()
    model.update(force=True)
    checkpoint = tmp_path / "toy.pth.tar"
    torch.save({"architecture": name, "state_dict": model.state_dict()}, checkpoint)
    image = torch.randint(0, 256, (3, 37, 50), dtype=torch.uint8)
    plan = CodingPlan(budget_bytes=2**31)
    payload = model.encode(image, plan)
    decoded = model.decode(unpack(pack(payload)), plan)
    assert decoded.shape == image.shape and decoded.dtype == torch.uint8
    # A colour image marked grayscale would decode to the mean of its channels
    # (the contract tests refuse a model that codes it).
    with pytest.raises(ValueError, match="plan.grayscale is set"):
        model.encode(image, plan.with_(grayscale=True))
    # The header is untrusted: a forged padding and a budget too small are refused.
    with pytest.raises(BitstreamError, match="padding"):
        model.decode(
            dataclasses.replace(payload, pad_bottom=payload.pad_bottom + 64), plan
        )
    with pytest.raises(ValueError, match="memory budget"):
        model.decode(payload, plan.with_(budget_bytes=2**20))
    loaded = models.load_checkpoint(str(checkpoint))
    assert loaded.config == {"N": 8, "M": 8}
    # codec.py resolves the name through the registry, as for every model.
    source = tmp_path / "image.png"
    from utils.image_io import write_png

    write_png(str(source), image)
    codec = script("codec.py")
    assert (
        codec.main(
            ["encode", str(source), str(tmp_path / "i.cps"), "-p", str(checkpoint)]
        )
        == 0
    )
    assert (
        codec.main(
            [
                "decode",
                str(tmp_path / "i.cps"),
                str(tmp_path / "i.png"),
                "-p",
                str(checkpoint),
            ]
        )
        == 0
    )
    assert "37" in capsys.readouterr().out


@pytest.mark.parametrize(
    "page, heading",
    [
        ("README.md", "## Add a model"),
        ("docs/architecture.md", "## Adding a model with its own encode and decode"),
    ],
)
def test_add_a_model_example_passes_the_repositorys_lint(page, heading):
    # A reader saves it as models/toy.py; test_lint then checks it with the rest.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--stdin-filename",
            "models/toy.py",
            "-",
        ],
        input=python_snippet(page, heading),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_demo_runs_on_one_bundled_photograph(tmp_path):
    """``python test.py demo``, cut to one model and one photograph."""
    assert any(argv == ["test.py", "demo"] for _, argv in COMMANDS)
    test_script = script("test.py")
    assert (
        test_script.main(
            [
                "demo",
                "--images",
                "coffee",
                "--models",
                os.path.join(REPO, os.path.dirname(SHIPPED)),
                "-d",
                str(tmp_path),
            ]
        )
        == 0
    )
    for name in ("results.json", "rd.png", "crops.png"):
        assert (tmp_path / name).is_file()
