"""utils.training.config: the authors' YAML layout, defaults, validation and --set overrides."""

import glob
import os

import pytest

from utils.training.config import SCHEMA, load_config, parse_config, to_plain_dict

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
    assert "training_modality" not in cfg.train_params  # read by nothing: accepted, dropped
    assert cfg.train_params.distortion_metric == "mse"
    assert cfg.model.name == "cps" and cfg.model.kwargs == {}
    assert cfg.lr_schedule.type == "plateau"
    assert set(cfg) == set(SCHEMA)
    for block, keys in SCHEMA.items():
        assert set(cfg[block]) == set(keys)


def test_shipped_configs_are_the_six_paper_lambdas_with_n_192():
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "cps_*_lambda*.yaml")))
    names = [os.path.basename(p) for p in paths]
    assert names == ["cps_1_lambda00018.yaml", "cps_2_lambda00035.yaml",
                     "cps_3_lambda000625.yaml", "cps_4_lambda0013.yaml",
                     "cps_5_lambda0025.yaml", "cps_6_lambda00483.yaml"]
    configs = [load_config(p) for p in paths]
    assert [c.train_params.lmbda for c in configs] == [0.0018, 0.0035, 0.00625, 0.013,
                                                         0.025, 0.0483]
    assert {c.train_params.N for c in configs} == {192}
    assert len({c.train_data.experiment_path for c in configs}) == 6


@pytest.mark.parametrize("edit, message", [
    (("train_params:", "train_params:\n  lmdba: 0.1"), "unknown key train_params.lmdba"),
    (("train_data:", "extra_block:\n  a: 1\ntrain_data:"), "unknown block 'extra_block'"),
    (("batch_size: 32", "batch_size: 32.5"), "train_data.batch_size must be int"),
    (("batch_size: 32", "batch_size: 0"), "train_data.batch_size must be > 0"),
    (("cuda: True", "cuda: 1"), "train_data.cuda must be bool"),
    (("N: 192", "N: 1923"), "train_params.N must be in [1, 1536]"),
    (("lmbda: 0.0018", "lmbda: fast"), "train_params.lmbda must be float"),
    (("lmbda: 0.0018", "lmbda: .nan"), "train_params.lmbda must be finite"),
    (("  lmbda: 0.0018\n", ""), "missing required key train_params.lmbda"),
    (('training_modality: "patch"', 'training_modality: "full"'),
     "train_params.training_modality must be 'patch'"),
    # The acl block is checked in open-loop mode too (training_mode defaults to open_loop).
    (("N: 192", "N: 192\nacl:\n  thresholds: [1]"), "unknown key acl.thresholds"),
    (("N: 192", "N: 192\nacl:\n  max_iterations: '8'"), "acl.max_iterations must be int"),
    (("N: 192", "N: 192\nacl:\n  count_thresholds: [3, -1]"),
     "acl.count_thresholds must be a non-empty list of integers >= 0"),
    (("N: 192", "N: 192\n  distortion_metric: ms-ssim\n  crop_size: 128"),
     "too small for ms-ssim"),
    (("N: 192", "N: 192\n  crop_size: 128"),
     "set only one of train_params.crop_size and train_params.patch_size"),
    (('use_checkpoint_path: ""', 'use_checkpoint_path: a\n  init_checkpoint_path: b'),
     "set only one of"),
])
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
    cfg = load_config(path, ["train_params.lmbda=0.025", "lr_schedule.type=multistep",
                             "lr_schedule.milestones=[100, 200]", "train_data.cuda=false",
                             "model.kwargs={}"])
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
        load_config(path, ["lr_schedule.type=multistep", "lr_schedule.milestones=[9, 3]"])
    with pytest.raises(ValueError, match="needs lr_schedule.milestones"):
        load_config(path, ["lr_schedule.type=multistep"])


def test_unreadable_files_give_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match=r"not valid YAML \(line 2\)"):
        load_config(write(tmp_path, "train_data:\n  a: b: c\n"))
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_plain_dict_round_trip_keeps_every_value(tmp_path):
    cfg = load_config(write(tmp_path, AUTHORS_YAML), ["lr_schedule.milestones=[5]"])
    plain = to_plain_dict(cfg)
    assert type(plain) is dict and type(plain["train_params"]) is dict
    assert parse_config(plain) == cfg
