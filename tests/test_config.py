"""utils.training.config: the authors' YAML layout, defaults and validation.

Also the --set overrides.
"""

import glob
import os

import pytest

from utils.training.config import SCHEMA, load_config, parse_config, to_plain_dict
from utils.yaml_io import load_yaml_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Verbatim layout of the CPS authors' configs/cps_1_lambda00018.yaml (SPL-CPS).
AUTHORS_YAML = """\
train_data:
  data_path: "/mnt/hdd3/zzf/flicker_2W_patch"
  use_checkpoint_path: ""
  batch_size: 32
  test_batch_size: 4
  epochs: 200
  num_workers: 4
  cuda: True
  experiment_path: "./experiment/cps_lambda00018_v4"

train_params:
  patch_size: 256
  training_modality: "patch"
  learning_rate: 0.0001
  aux_learning_rate: 0.001
  lmbda: 0.0018
  clip_max_norm: 1.0
  N: 192
"""


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_authors_layout_loads_unchanged_and_new_keys_get_defaults(tmp_path):
    cfg = load_config(write(tmp_path, AUTHORS_YAML))
    assert cfg.train_data.batch_size == 32 and cfg.train_data.cuda is True
    assert cfg.train_params.lmbda == 0.0018 and cfg.train_params.N == 192
    assert cfg.train_params.crop_size == 256 and "patch_size" not in cfg.train_params
    # Read by nothing: accepted, dropped.
    assert "training_modality" not in cfg.train_params
    assert cfg.train_params.distortion_metric == "mse"
    assert cfg.model.name == "cps" and cfg.model.kwargs == {}
    assert cfg.lr_schedule.type == "plateau"
    assert set(cfg) == set(SCHEMA)
    for block, keys in SCHEMA.items():
        assert set(cfg[block]) == set(keys)


def test_shipped_configs_are_the_six_paper_lambdas_with_n_192():
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "cps_*_lambda*.yaml")))
    names = [os.path.basename(p) for p in paths]
    assert names == [
        "cps_1_lambda00018.yaml",
        "cps_2_lambda00035.yaml",
        "cps_3_lambda000625.yaml",
        "cps_4_lambda0013.yaml",
        "cps_5_lambda0025.yaml",
        "cps_6_lambda00483.yaml",
    ]
    configs = [load_config(p) for p in paths]
    assert [c.train_params.lmbda for c in configs] == [
        0.0018,
        0.0035,
        0.00625,
        0.013,
        0.025,
        0.0483,
    ]
    assert {c.train_params.N for c in configs} == {192}
    assert len({c.train_data.experiment_path for c in configs}) == 6


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            ("train_params:", "train_params:\n  lmdba: 0.1"),
            "unknown key train_params.lmdba",
        ),
        (
            ("train_data:", "extra_block:\n  a: 1\ntrain_data:"),
            "unknown block 'extra_block'",
        ),
        (("batch_size: 32", "batch_size: 32.5"), "train_data.batch_size must be int"),
        (
            ("batch_size: 32", "batch_size: 0"),
            "train_data.batch_size must be in [1, 4096]",
        ),
        (("cuda: True", "cuda: 1"), "train_data.cuda must be bool"),
        (
            ("N: 192", "N: 1923"),
            "train_params.N must be in [1, 1536] (CPS uses 192, kamisli2024 up to "
            "1280), got 1923",
        ),
        (("lmbda: 0.0018", "lmbda: fast"), "train_params.lmbda must be float"),
        (("lmbda: 0.0018", "lmbda: .nan"), "train_params.lmbda must be finite"),
        (("  lmbda: 0.0018\n", ""), "missing required key train_params.lmbda"),
        (
            ('training_modality: "patch"', 'training_modality: "full"'),
            "train_params.training_modality must be 'patch'",
        ),
        # The acl block is checked in open-loop mode too (training_mode defaults to
        # open_loop).
        (("N: 192", "N: 192\nacl:\n  thresholds: [1]"), "unknown key acl.thresholds"),
        (
            ("N: 192", "N: 192\nacl:\n  max_iterations: '8'"),
            "acl.max_iterations must be int",
        ),
        (
            ("N: 192", "N: 192\nacl:\n  count_thresholds: [3, -1]"),
            "acl.count_thresholds must be a list of 1 to 1000 integers in [0, ",
        ),
        (
            ("N: 192", "N: 192\n  distortion_metric: ms-ssim\n  crop_size: 128"),
            "too small for ms-ssim",
        ),
        (
            ("N: 192", "N: 192\n  crop_size: 128"),
            "set only one of train_params.crop_size and train_params.patch_size",
        ),
        (
            (
                'use_checkpoint_path: ""',
                "use_checkpoint_path: a\n  init_checkpoint_path: b",
            ),
            "set only one of",
        ),
        (
            (
                'experiment_path: "./experiment/cps_lambda00018_v4"',
                'experiment_path: " "',
            ),
            "train_data.experiment_path must not be empty",
        ),
    ],
)
def test_bad_configs_fail_with_a_message_naming_the_key(tmp_path, edit, message):
    text = AUTHORS_YAML.replace(*edit)
    if "ms-ssim" in text:
        text = text.replace("  patch_size: 256\n", "")
    with pytest.raises(ValueError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_float_written_without_a_dot_is_accepted(tmp_path):
    # PyYAML reads 1e-4 as the string "1e-4"; a float key takes it anyway.
    cfg = load_config(write(tmp_path, AUTHORS_YAML.replace("0.0001", "1e-4")))
    assert cfg.train_params.learning_rate == pytest.approx(1e-4)


def test_overrides_change_values_and_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, AUTHORS_YAML)
    cfg = load_config(
        path,
        [
            "train_params.lmbda=0.025",
            "lr_schedule.type=multistep",
            "lr_schedule.milestones=[100, 200]",
            "train_data.cuda=false",
            "model.kwargs={}",
        ],
    )
    assert cfg.train_params.lmbda == 0.025
    assert cfg.lr_schedule.milestones == [100, 200]
    assert cfg.train_data.cuda is False
    with pytest.raises(ValueError, match="unknown key train_params.lambda"):
        load_config(path, ["train_params.lambda=0.1"])
    with pytest.raises(ValueError, match="must look like block.key=value"):
        load_config(path, ["train_params.lmbda"])
    with pytest.raises(ValueError, match="train_data.batch_size must be int"):
        load_config(path, ["train_data.batch_size=big"])
    with pytest.raises(ValueError, match="milestones must be strictly increasing"):
        load_config(
            path, ["lr_schedule.type=multistep", "lr_schedule.milestones=[9, 3]"]
        )
    with pytest.raises(ValueError, match="needs lr_schedule.milestones"):
        load_config(path, ["lr_schedule.type=multistep"])


def test_unreadable_files_give_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match=r"not valid YAML: .* \(line 2\)"):
        load_config(write(tmp_path, "train_data:\n  a: b: c\n"))
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    # It said "config file not found: /dev/null".
    with pytest.raises(ValueError, match="/dev/null is not a regular file"):
        load_config("/dev/null")


def test_plain_dict_round_trip_keeps_every_value(tmp_path):
    cfg = load_config(write(tmp_path, AUTHORS_YAML), ["lr_schedule.milestones=[5]"])
    plain = to_plain_dict(cfg)
    assert type(plain) is dict and type(plain["train_params"]) is dict
    assert parse_config(plain) == cfg


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "a: &x [1, 2]\nb: *x\n",
            "YAML anchor &x is not allowed (write the value out) (line 1)",
        ),
        ("a: [1]\nb: *x\n", "YAML alias *x is not allowed"),
        (
            "train_data:\n  batch_size: 2\n  batch_size: 3\n",
            "duplicate key 'batch_size' (first on line 2) (line 3)",
        ),
    ],
)
def test_yaml_aliases_anchors_and_duplicate_keys_are_refused_with_the_line(
    tmp_path, text, message
):
    with pytest.raises(ValueError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    with pytest.raises(ValueError, match="YAML anchor &a0 is not allowed"):
        load_yaml_file(write(tmp_path, "\n".join(lines) + "\n"))


def test_an_oversized_file_is_refused_unread(tmp_path):
    with pytest.raises(ValueError, match="more than the 1048576 a config may have"):
        load_config(write(tmp_path, "# " + "x" * (1 << 20) + "\n"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            ("  patch_size: 256", "  patch_size: 64000"),
            "train_params.crop_size must be in [8, 4096]",
        ),
        (
            ("N: 192", "N: 192\n  seed: 1180591620717411303424"),
            "train_params.seed must be in [0, 9223372036854775807]",
        ),
        (("N: 192", "N: 192\n  seed: -1"), "train_params.seed must be in [0, "),
        (
            ("batch_size: 32", "batch_size: 100000"),
            "train_data.batch_size must be in [1, 4096]",
        ),
        (
            ("num_workers: 4", "num_workers: 1000"),
            "train_data.num_workers must be in [0, 256]",
        ),
        (
            ("learning_rate: 0.0001", "learning_rate: 5"),
            "learning_rate must be in (0.0, 1.0]",
        ),
        (
            ("N: 192", "N: 192\nlogging:\n  num_images: 1000"),
            "logging.num_images must be in",
        ),
        (
            ("N: 192", "N: 192\nlr_schedule:\n  milestones: [1, 99999999999999999999]"),
            "lr_schedule.milestones must be a list of 0 to 10000 integers in [1, ",
        ),
    ],
)
def test_numbers_out_of_their_sane_range_are_one_line_errors(tmp_path, edit, message):
    with pytest.raises(ValueError) as info:
        load_config(write(tmp_path, AUTHORS_YAML.replace(*edit)))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_every_problem_of_a_file_and_its_overrides_is_reported_at_once(tmp_path):
    text = AUTHORS_YAML.replace("batch_size: 32", "batch_size: 0").replace(
        "N: 192", "N: 1923\n  lmdba: 2\nacl:\n  max_iterations: 0"
    )
    with pytest.raises(ValueError) as info:
        load_config(
            write(tmp_path, text), ["train_params.seed=-5", "logging.nope=1", "bad"]
        )
    message = str(info.value)
    assert "7 problems" in message and "\n" not in message
    for part in (
        "train_data.batch_size must be in",
        "train_params.N must be in",
        "unknown key train_params.lmdba",
        "acl.max_iterations must be in",
        "train_params.seed must be in",
        "unknown key logging.nope",
        "must look like block.key=value",
    ):
        assert part in message, part


def test_overrides_use_our_key_names(tmp_path):
    with pytest.raises(
        ValueError, match="train_params.patch_size is called train_params.crop_size"
    ):
        load_config(write(tmp_path, AUTHORS_YAML), ["train_params.patch_size=128"])
    cfg = load_config(write(tmp_path, AUTHORS_YAML), ["train_params.crop_size=128"])
    assert cfg.train_params.crop_size == 128


def test_paths_in_a_file_are_relative_to_its_folder_and_in_overrides_to_the_cwd(
    tmp_path, monkeypatch
):
    (tmp_path / "configs").mkdir()
    path = write(
        tmp_path / "configs",
        AUTHORS_YAML.replace('"/mnt/hdd3/zzf/flicker_2W_patch"', '"../data"'),
    )
    monkeypatch.chdir(REPO)
    cfg = load_config(path)
    assert cfg.train_data.data_path == str(tmp_path / "data")
    assert cfg.train_data.experiment_path == str(
        tmp_path / "configs" / "experiment" / "cps_lambda00018_v4"
    )
    cfg = load_config(path, ["train_data.data_path=elsewhere"])
    assert cfg.train_data.data_path == os.path.join(REPO, "elsewhere")


def test_bundled_configs_point_at_the_repository_data_and_experiment_folders():
    paths = glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    paths.remove(os.path.join(REPO, "configs", "datasets.yaml"))
    assert any(os.sep + "ablation" + os.sep in path for path in paths)
    for path in paths:
        cfg = load_config(path)
        for key in ("data_path", "experiment_path"):
            folder = os.path.relpath(cfg.train_data[key], REPO).split(os.sep)[0]
            assert folder == ("experiment" if key == "experiment_path" else "data"), (
                path
            )


def test_every_key_is_documented_in_docs_training_md():
    with open(os.path.join(REPO, "docs", "training.md"), encoding="utf-8") as f:
        text = f.read()
    for block, keys in SCHEMA.items():
        section = text.split(f"### `{block}`\n", 1)[1].split("\n### ", 1)[0]
        rows = {
            line.split("|")[1].strip().strip("`")
            for line in section.splitlines()
            if line.startswith("| `")
        }
        assert rows == set(keys), block


def _minimal(**blocks):
    """The smallest valid raw config (the three required keys), plus ``blocks``."""
    raw = {
        "train_data": {"data_path": "/d", "experiment_path": "/e"},
        "train_params": {"lmbda": 0.01},
    }
    for block, keys in blocks.items():
        raw[block] = dict(raw.get(block, {}), **keys)
    return raw


@pytest.mark.parametrize(
    "block, keys",
    [
        ("train_params", {"lmbda": 1e-9}),  # just above an open lower bound
        ("train_params", {"learning_rate": 1.0}),  # closed upper bounds are inclusive
        ("train_data", {"batch_size": 4096, "max_bad_fraction": 0.0}),
        ("train_params", {"N": 1, "crop_size": 8}),
        # 5 scales fit
        ("train_params", {"distortion_metric": "ms-ssim", "crop_size": 161}),
        ("lr_schedule", {"milestones": [1, 2]}),
    ],
)
def test_values_on_the_edge_of_their_range_are_accepted(block, keys):
    cfg = parse_config(_minimal(**{block: keys}))
    for key, value in keys.items():
        assert cfg[block][key] == value


@pytest.mark.parametrize(
    "block, keys, message",
    [
        (
            "train_params",
            {"lmbda": 0},
            "train_params.lmbda must be in (0.0, 10000.0], got 0.0",
        ),
        ("train_params", {"learning_rate": 0.0}, "learning_rate must be in (0.0, 1.0]"),
        ("train_params", {"N": 0}, "train_params.N must be in [1, 1536]"),
        (
            "train_params",
            {"distortion_metric": "msssim"},
            "train_params.distortion_metric must be one of ['mse', 'ms-ssim'], "
            "got 'msssim'",
        ),
        # bool is an int subclass in Python: `batch_size: true` must not mean 1.
        (
            "train_data",
            {"batch_size": True},
            "train_data.batch_size must be int, got True",
        ),
        (
            "lr_schedule",
            {"milestones": [5, 5]},
            "lr_schedule.milestones must be strictly increasing",
        ),
        (
            "lr_schedule",
            {"milestones": [True]},
            "lr_schedule.milestones must be a list of",
        ),
        (
            "acl",
            {"count_thresholds": []},
            "acl.count_thresholds must be a list of 1 to 1000",
        ),
        (
            "model",
            {"kwargs": {"N": 64}},
            "set the model width with train_params.N, not model.kwargs.N",
        ),
    ],
)
def test_values_just_outside_their_range_or_choices_are_refused(block, keys, message):
    with pytest.raises(ValueError) as info:
        parse_config(_minimal(**{block: keys}))
    assert message in str(info.value)


def test_a_single_problem_is_reported_without_a_count_or_a_doubled_source():
    with pytest.raises(ValueError) as info:
        parse_config(_minimal(train_data={"batch_size": 0}), source="run.yaml")
    assert str(info.value) == (
        "run.yaml: config key train_data.batch_size must be in [1, 4096], got 0"
    )
    with pytest.raises(ValueError) as info:
        parse_config(
            _minimal(train_params={"training_modality": "full"}), source="run.yaml"
        )
    assert str(info.value).startswith(
        "run.yaml: train_params.training_modality must be"
    )


def test_a_problem_with_the_authors_key_names_is_reported_with_the_others(tmp_path):
    # Both names of the crop side, a training_modality other than "patch", a width
    # out of range and an unknown key: one run shows all four.
    path = write(
        tmp_path,
        AUTHORS_YAML.replace('"patch"', '"full"').replace("N: 192", "N: 1923")
        + "  crop_size: 128\n  lmdba: 1\n",
    )
    with pytest.raises(ValueError) as info:
        load_config(path, ["train_data.batch_size=0"])
    message = str(info.value)
    assert "5 problems" in message
    for problem in (
        "train_params.training_modality must be 'patch'",
        "set only one of train_params.crop_size and train_params.patch_size",
        "train_params.N must be in [1, 1536]",
        "unknown key train_params.lmdba",
        "train_data.batch_size must be in [1, 4096]",
    ):
        assert problem in message


def test_a_config_that_is_not_a_mapping_is_a_value_error():
    with pytest.raises(ValueError, match="expected a mapping of blocks, got list"):
        parse_config([1, 2])


def test_an_integer_for_a_float_key_and_empty_blocks_and_kwargs_are_accepted(tmp_path):
    # `lmbda: 1` is an int in YAML; an empty `logging:` block or `kwargs:` is null.
    cfg = load_config(
        write(
            tmp_path,
            AUTHORS_YAML.replace("lmbda: 0.0018", "lmbda: 1")
            + "logging:\nmodel:\n  kwargs:\n",
        )
    )
    assert cfg.train_params.lmbda == 1.0 and type(cfg.train_params.lmbda) is float
    assert cfg.logging.log_interval == 100 and cfg.model.kwargs == {}


def test_an_empty_file_reports_the_missing_required_keys(tmp_path):
    with pytest.raises(ValueError) as info:
        load_config(write(tmp_path, "# nothing yet\n"))
    message = str(info.value)
    assert "3 problems" in message
    for key in (
        "train_data.data_path",
        "train_data.experiment_path",
        "train_params.lmbda",
    ):
        assert f"missing required key {key}" in message


def test_a_long_value_is_cut_in_the_message():
    with pytest.raises(ValueError) as info:
        parse_config(_minimal(train_params={"seed": "x" * 500}))
    # repr() cut to 60 characters: the quote, 56 letters and "...".
    assert str(info.value).endswith("got '" + "x" * 56 + "...")


def test_defaults_are_fresh_copies_that_a_run_cannot_change(tmp_path):
    path = write(tmp_path, AUTHORS_YAML)
    first = load_config(path)
    first.lr_schedule.milestones.append(7)
    first.model.kwargs["depth"] = 3
    second = load_config(path)
    assert second.lr_schedule.milestones == [] and second.model.kwargs == {}
    assert SCHEMA["lr_schedule"]["milestones"].default == []


def test_overrides_do_not_change_the_stored_config_they_start_from():
    stored = to_plain_dict(parse_config(_minimal()))
    cfg = load_config(
        None, ["train_params.lmbda=0.5", "logging.progress=false"], base=stored
    )
    assert cfg.train_params.lmbda == 0.5 and cfg.logging.progress is False
    assert (
        stored["train_params"]["lmbda"] == 0.01
        and stored["logging"]["progress"] is True
    )


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("lmbda=0.1", "override 'lmbda=0.1' must look like block.key=value"),
        (
            "train.lmbda=0.1",
            "override 'train.lmbda=0.1': unknown block 'train'; known blocks: "
            "train_data, train_params, model, lr_schedule, acl, logging",
        ),
        # A typo in a key lists the block's keys, as the same typo in a file does.
        (
            "logging.val_intervall=5",
            "unknown key logging.val_intervall; known in logging: "
            "log_interval, val_interval,",
        ),
    ],
)
def test_malformed_override_names_are_one_line_value_errors(
    tmp_path, assignment, message
):
    with pytest.raises(ValueError) as info:
        load_config(write(tmp_path, AUTHORS_YAML), [assignment])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_key_overridden_twice_is_refused_as_in_a_file(tmp_path):
    """The last value won silently, while a file with a repeated key is refused."""
    with pytest.raises(ValueError) as info:
        load_config(
            write(tmp_path, AUTHORS_YAML),
            ["train_params.lmbda=0.01", " train_params.lmbda =0.02"],
        )
    assert (
        "override ' train_params.lmbda =0.02': train_params.lmbda is set twice"
        in str(info.value)
    )


def test_override_names_may_be_padded_and_an_empty_value_clears_a_path(tmp_path):
    text = AUTHORS_YAML.replace(
        'use_checkpoint_path: ""', "use_checkpoint_path: old.pth"
    )
    cfg = load_config(
        write(tmp_path, text),
        [" train_params.lmbda = 0.5", "train_data.use_checkpoint_path="],
    )
    assert cfg.train_params.lmbda == 0.5
    # Not resumed, not the current folder.
    assert cfg.train_data.use_checkpoint_path == ""


def test_empty_paths_stay_empty_and_a_home_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(
        tmp_path, AUTHORS_YAML.replace('"/mnt/hdd3/zzf/flicker_2W_patch"', '"~/flickr"')
    )
    cfg = load_config(path)
    assert cfg.train_data.data_path == str(tmp_path / "home" / "flickr")
    # An empty path means "none" (no resume), not the config's folder.
    assert cfg.train_data.use_checkpoint_path == "" and cfg.acl.validation_path == ""


def test_every_default_matches_the_table_in_docs_training_md():
    import yaml

    from utils.training.schema import REQUIRED

    with open(os.path.join(REPO, "docs", "training.md"), encoding="utf-8") as f:
        text = f.read()
    for block, keys in SCHEMA.items():
        section = text.split(f"### `{block}`\n", 1)[1].split("\n### ", 1)[0]
        for line in section.splitlines():
            if not line.startswith("| `"):
                continue
            cells = [cell.strip() for cell in line.split("|")[1:-1]]
            key, shown = cells[0].strip("`"), cells[2].strip("`")
            default = keys[key].default
            if default is REQUIRED:
                assert shown == "required", key
            elif isinstance(default, float):
                assert float(shown) == default, key
            else:
                assert yaml.safe_load(shown) == default, key
