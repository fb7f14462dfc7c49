"""Asymptotic closed-loop training (utils/training/acl.py).

Runs on a tiny model and generated images.
"""

import copy
import glob
import json
import math
import os
import shutil

import pytest
import torch
from compressai.losses import RateDistortionLoss
from easydict import EasyDict
from PIL import Image

import models
from datasets.context_pairs import ContextPairs
from models.kamisli2024.network import Kamisli2024
from utils.image_io import read_image
from utils.training.acl import (
    ACLState,
    count_threshold,
    finish_iteration,
    next_learning_rate,
    train_epoch,
)
from utils.training.acl_run import STATE_NAME, run_acl
from utils.training.config import SCHEMA, load_config, parse_config
from utils.training.schema import unread_by_acl

PRESETS = sorted(
    glob.glob(
        os.path.join(os.path.dirname(__file__), "..", "configs", "kamisli_*.yaml")
    )
)


def acl_defaults():
    """The ``acl`` block of a config that sets none of its keys."""
    return EasyDict(
        {key: copy.deepcopy(spec.default) for key, spec in SCHEMA["acl"].items()}
    )


def write_images(folder, count, size, seed):
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        low = torch.rand(3, 3, 3, generator=g)
        picture = torch.nn.functional.interpolate(
            low[None], size=size, mode="bilinear", align_corners=False
        )[0]
        array = picture.mul(255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(os.path.join(folder, f"img{i}.png"))


def config(tmp_path, **acl):
    data = tmp_path / "data"
    write_images(data / "train", 4, (20, 24), seed=0)
    write_images(data / "test", 2, (16, 20), seed=1)
    settings = {
        "itr0_threshold": 1e9,
        "count_thresholds": [0],
        "max_iterations": 2,
        "max_epochs_per_iteration": 2,
        "closed_loop_every": 1,
        "closed_loop_tile": 2,
    }
    settings.update(acl)
    return parse_config(
        {
            "train_data": {
                "data_path": str(data),
                "experiment_path": str(tmp_path / "exp"),
                "batch_size": 2,
                "num_workers": 0,
                "use_checkpoint_path": "",
                "init_checkpoint_path": "",
            },
            "train_params": {
                "crop_size": 16,
                "learning_rate": 1e-3,
                "lmbda": 0.01,
                "distortion_metric": "mse",
                "seed": 0,
                "N": 8,
            },
            "model": {
                "name": "kamisli2024",
                "kwargs": {"block_size": 4, "M": 4, "kernel_sizes": [3, 1, 1, 1]},
            },
            "lr_schedule": {
                "type": "plateau",
                "factor": 0.8,
                "patience": 4,
                "min_lr": 4e-5,
            },
            "acl": settings,
        }
    )


def test_a_tiny_acl_run_completes_two_iterations_and_regenerates_the_context(tmp_path):
    cfg = config(tmp_path)
    log = []
    state = run_acl(cfg, torch.device("cpu"), log.append)
    exp = cfg["train_data"]["experiment_path"]
    assert state.iteration == 1 and state.phase == "regenerate"
    # itr 0 stops at its threshold.
    assert [r["iteration"] for r in state.history] == [0, 1, 1]
    assert all(
        math.isfinite(r["open_loop"]) and "closed_loop" in r for r in state.history
    )
    assert os.path.exists(os.path.join(exp, STATE_NAME))
    best = os.path.join(exp, "model_best_acl_0.pth.tar")
    assert state.selected in ("model_best_acl_1.pth.tar", "model_best_acl_1rr.pth.tar")
    # the selected models are ordinary coding checkpoints
    model = models.load_checkpoint(best)
    assert isinstance(model, Kamisli2024) and model.config["block_size"] == 4
    # z_1 = 8-bit clamp(f(x, x)) of the model selected after iteration 0, eval mode
    contexts = sorted(os.listdir(os.path.join(exp, "acl", "contexts_1", "train")))
    assert len(contexts) == 4
    assert len(os.listdir(os.path.join(exp, "acl", "contexts_1", "val"))) == 2
    x = (
        read_image(str(tmp_path / "data" / "train" / "img0.png"))[0]
        .float()
        .div(255)[None]
    )
    with torch.no_grad():
        expected = model(x)["x_hat"].clamp(0, 1).mul(255).round().byte()[0]
    stored = read_image(os.path.join(exp, "acl", "contexts_1", "train", contexts[0]))[0]
    assert contexts[0].endswith("img0.png") and torch.equal(stored, expected)
    assert any("wrote 4 train context images" in line for line in log)


def test_an_interrupted_acl_run_resumes_to_the_same_result(tmp_path):
    straight = run_acl(config(tmp_path / "a"), torch.device("cpu"), lambda _: None)
    first = config(tmp_path / "b", max_iterations=1)
    run_acl(first, torch.device("cpu"), lambda _: None)
    with pytest.raises(ValueError, match="--resume"):
        run_acl(first, torch.device("cpu"), lambda _: None)
    resumed_cfg = config(tmp_path / "b")
    resumed_cfg["train_data"]["use_checkpoint_path"] = os.path.join(
        resumed_cfg["train_data"]["experiment_path"], STATE_NAME
    )
    resumed = run_acl(resumed_cfg, torch.device("cpu"), lambda _: None)
    assert resumed.history == straight.history
    assert resumed.learning_rate == straight.learning_rate


@pytest.mark.parametrize(
    "change, message",
    [
        ({"blok_size": 4}, "rejects its kwargs"),
        ({"block_size": 3}, "must be a multiple of 3"),
    ],
)
def test_a_model_config_acl_cannot_build_is_refused_as_in_open_loop(
    tmp_path, change, message
):
    """Both training modes build the model through one function.

    Its errors are one line each.
    """
    cfg = config(tmp_path)
    kwargs = {k: v for k, v in cfg["model"]["kwargs"].items() if k != "block_size"}
    cfg["model"]["kwargs"] = dict(kwargs, **change)
    with pytest.raises(ValueError, match=message):
        run_acl(cfg, torch.device("cpu"), lambda _: None)


def test_acl_refuses_a_model_without_the_closed_loop_contract(tmp_path):
    cfg = config(tmp_path)
    cfg["model"] = {"name": "cps", "kwargs": {}}
    cfg["train_params"]["crop_size"] = 64
    with pytest.raises(
        ValueError,
        match="ACL training needs a block-based model that "
        "implements models.base.ClosedLoopTrainable",
    ):
        run_acl(cfg, torch.device("cpu"), lambda _: None)


def test_context_pairs_crop_on_the_block_grid_and_flip_both_images(tmp_path):
    write_images(tmp_path / "x", 1, (20, 28), seed=2)
    original = str(tmp_path / "x" / "img0.png")
    inverted = read_image(original)[0]
    Image.fromarray((255 - inverted).permute(1, 2, 0).numpy()).save(tmp_path / "z.png")
    whole_x = read_image(original)[0].float() / 255
    same = ContextPairs([original], None, 0, 4)
    x, z = same[0]
    assert torch.equal(x, z) and torch.equal(x, whole_x)  # iteration 0: z = x
    pairs = ContextPairs([original], [str(tmp_path / "z.png")], 8, 4, seed=3)
    seen = set()
    for epoch in range(12):
        pairs.set_epoch(epoch)
        x, z = pairs[0]
        # Same crop, same flips.
        assert x.shape == (3, 8, 8) and torch.allclose(z, 1 - x)
        found = [
            (t, left, fh, fv)
            for t in range(0, 13)
            for left in range(0, 21)
            for fh in (False, True)
            for fv in (False, True)
            if torch.equal(_flip(whole_x[:, t : t + 8, left : left + 8], fh, fv), x)
        ]
        assert found and all(t % 4 == 0 and left % 4 == 0 for t, left, _, _ in found)
        seen.update((fh, fv) for _, _, fh, fv in found)
        pairs.set_epoch(epoch)
        assert torch.equal(pairs[0][0], x)  # a pure function of (seed, epoch, index)
    assert len(seen) > 1


def test_context_pair_crops_of_neighbouring_seeds_are_not_shifted_epochs(tmp_path):
    # Seeding with seed + epoch gave seed 4 at epoch e the crops of seed 3 at
    # epoch e + 1.
    write_images(tmp_path, 1, (20, 28), seed=2)
    original = str(next(tmp_path.glob("*.png")))

    def crops(seed, epochs):
        pairs = ContextPairs([original], None, 8, 4, seed=seed)
        out = []
        for epoch in epochs:
            pairs.set_epoch(epoch)
            out.append(pairs[0][0])
        return torch.stack(out)

    assert not torch.equal(crops(3, range(1, 9)), crops(4, range(0, 8)))
    assert torch.equal(crops(3, range(1, 9)), crops(3, range(1, 9)))


def _flip(t, horizontal, vertical):
    if horizontal:
        t = t.flip(2)
    if vertical:
        t = t.flip(1)
    return t


def test_the_chained_loss_averages_two_passes_and_trains_through_the_first():
    torch.manual_seed(0)
    model = Kamisli2024(block_size=4, N=8, M=4)
    x, z = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    criterion = RateDistortionLoss(0.01)

    def gradient(chained, detach=False):
        net = copy.deepcopy(model)
        optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
        torch.manual_seed(5)
        if detach:  # reference: the second pass sees a detached first output
            out = net(x, z)
            second = net(x, out["x_hat"].detach())
            loss = 0.5 * criterion(out, x)["loss"] + 0.5 * criterion(second, x)["loss"]
            loss.backward()
            return net.g_a_source.weight.grad.clone()
        before = net.g_a_source.weight.detach().clone()
        train_epoch(
            net, [(x, z)], optimizer, criterion, torch.device("cpu"), chained, 0.0
        )
        return before - net.g_a_source.weight.detach()

    torch.manual_seed(5)
    out = model(x, z)
    manual = (
        0.5 * criterion(out, x)["loss"]
        + 0.5 * criterion(model(x, out["x_hat"]), x)["loss"]
    )
    manual.backward()
    assert torch.allclose(gradient(True), model.g_a_source.weight.grad, atol=1e-6)
    assert not torch.allclose(gradient(True), gradient(True, detach=True), atol=1e-6)
    assert not torch.allclose(gradient(True), gradient(False), atol=1e-6)


def test_learning_rate_reset_and_switch_rule():
    assert next_learning_rate(1e-4, 5e-5, 1) == pytest.approx(0.4 * 1e-4 + 0.6 * 5e-5)
    assert next_learning_rate(1e-4, 5e-5, 4) == pytest.approx(0.1 * 1e-4 + 0.9 * 5e-5)
    assert next_learning_rate(1e-4, 5e-5, 7) == 5e-5
    settings = acl_defaults()
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-4)
    # iteration 2, closed-loop loss improved by more than 1 %: stay open loop
    state = ACLState(iteration=2, best_cl=0.90, best_cl_previous=1.0)
    finish_iteration(state, settings, optimizer)
    assert (state.mode, state.chained) == ("ol_loss", False)
    assert state.selected == "model_best_acl_2.pth.tar"
    assert state.best_cl_previous == 0.90 and state.learning_rate == 1e-4
    # less than 1 %: switch to closed-loop convergence, chained loss, LR x 0.66
    state = ACLState(iteration=2, best_cl=0.995, best_cl_previous=1.0)
    finish_iteration(state, settings, optimizer)
    assert (state.mode, state.chained) == ("cl_loss", True)
    assert state.selected == "model_best_acl_2rr.pth.tar"
    assert state.learning_rate == pytest.approx(0.66e-4) and state.phase == "regenerate"
    # before iteration 2 the rule never switches
    state = ACLState(iteration=1, best_cl=1.0, best_cl_previous=1.0)
    finish_iteration(state, settings, optimizer)
    assert state.mode == "ol_loss"


def test_the_switch_rule_waits_for_a_measured_iteration_after_the_loss_changed():
    """Forgotten bests (a resume with another lambda) are both infinite, and
    ``not inf < 0.99 * inf`` switched to closed-loop mode, selecting a closed-loop
    model the new loss had not chosen, and cut the learning rate."""
    settings = acl_defaults()
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-4)
    state = ACLState(iteration=3, best_cl=0.9, best_cl_previous=1.0)
    state.forget_best_losses()
    finish_iteration(state, settings, optimizer)
    assert (state.mode, state.chained) == ("ol_loss", False)
    assert state.selected == "model_best_acl_3.pth.tar"
    assert state.learning_rate == 1e-4


def test_count_thresholds_hold_their_last_entry_for_later_iterations():
    settings = acl_defaults()
    settings.count_thresholds = [9, 4]
    assert [count_threshold(settings, k) for k in range(4)] == [9, 4, 4, 4]


def test_closed_loop_validation_equals_block_by_block_recursion():
    """One pass per wavefront gives what the authors' one pass per block gives."""
    torch.manual_seed(0)
    model = Kamisli2024(block_size=4, N=8, M=4, kernel_sizes=[3, 3, 1, 1]).eval()
    x = torch.rand(1, 3, 20, 24)
    fast = model.closed_loop(x, tile_blocks=0, context_bits=8)
    context = torch.full_like(x, 0.5)
    with torch.no_grad():
        for i in range(5):
            for j in range(6):
                out = model(x, context)
                block = out["x_hat"][:, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].clamp(
                    0, 1
                )
                context[:, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = (
                    block.mul(255).round() / 255
                )
    assert torch.allclose(fast["x_hat"], out["x_hat"].clamp(0, 1), atol=1e-6)
    assert torch.allclose(fast["likelihoods"]["y"], out["likelihoods"]["y"], rtol=1e-5)
    # tiles: a 2x2-block tile sees mid-grey outside itself, so tiling changes the result
    tiled = model.closed_loop(x, tile_blocks=2, context_bits=8)
    assert tiled["x_hat"].shape == x.shape and not torch.allclose(
        tiled["x_hat"], fast["x_hat"]
    )


def test_a_broken_training_image_is_skipped_with_a_warning_and_too_many_stop_the_run(
    tmp_path,
):
    cfg = config(tmp_path)
    broken = os.path.join(cfg["train_data"]["data_path"], "train", "img9.png")
    with open(broken, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n truncated")
    cfg["train_data"]["max_bad_fraction"] = 0.25
    log = []
    run_acl(cfg, torch.device("cpu"), log.append)
    warnings = [line for line in log if line.startswith("warning: skipping")]
    assert len(warnings) == 1 and "img9.png" in warnings[0] and "1 of 5" in warnings[0]
    assert (
        len(
            os.listdir(
                os.path.join(
                    cfg["train_data"]["experiment_path"], "acl", "contexts_1", "train"
                )
            )
        )
        == 4
    )
    cfg["train_data"]["max_bad_fraction"] = 0.1
    cfg["train_data"]["experiment_path"] = str(tmp_path / "exp2")
    with pytest.raises(RuntimeError, match="1 of 5 train images are unusable"):
        run_acl(cfg, torch.device("cpu"), log.append)


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_acl_run_with_no_usable_image_in_a_split_is_a_one_line_error(
    tmp_path, split
):
    """With max_bad_fraction 1, a split of broken images left no image: the run
    ended in a ZeroDivisionError traceback."""
    cfg = config(tmp_path)
    folder = os.path.join(cfg["train_data"]["data_path"], split)
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(b"not an image")
    cfg["train_data"]["max_bad_fraction"] = 1.0
    name = {"train": "train", "test": "val"}[split]
    with pytest.raises(
        RuntimeError, match=f"^none of the [0-9]+ {name} images in {folder} is usable"
    ):
        run_acl(cfg, torch.device("cpu"), lambda line: None)


def test_an_image_too_wide_to_read_is_left_out_of_an_acl_run_instead_of_ending_it(
    tmp_path,
):
    """A 70000x1 image passed the check at the start, then read_image refused it
    and the run stopped."""
    from utils.training.bad_images import usable_images

    cfg = config(tmp_path)
    train = os.path.join(cfg["train_data"]["data_path"], "train")
    Image.new("RGB", (70000, 1)).save(os.path.join(train, "wide.png"))
    paths = sorted(glob.glob(os.path.join(train, "*.png")))
    log = []
    kept = usable_images(paths, "train", 0.25, None, log.append)
    assert kept == [p for p in paths if not p.endswith("wide.png")]
    assert len(log) == 1 and "a 70000x1 image does not fit" in log[0], log
    for path in kept:
        read_image(path)


def test_an_acl_run_is_refused_in_a_folder_another_run_holds(tmp_path):
    from utils.training.run_lock import lock_experiment

    cfg = config(tmp_path)
    exp = cfg["train_data"]["experiment_path"]
    os.makedirs(exp)
    other = lock_experiment(exp)  # as another train.py would
    with pytest.raises(
        ValueError,
        match=f"^train_data.experiment_path {exp} is in use by another training run",
    ):
        run_acl(cfg, torch.device("cpu"), lambda _: None)
    other.release()
    cfg["acl"]["max_iterations"] = 1
    run_acl(cfg, torch.device("cpu"), lambda _: None)
    assert not os.path.exists(os.path.join(exp, ".train.lock"))


class _Stop(Exception):
    """Raised from the log to stop a run, as Ctrl-C would, between epochs."""


@pytest.mark.parametrize(
    "change",
    [
        {"train_params": {"lmbda": 1.0}},
        {"acl": {"closed_loop_tile": 1}},
        {"acl": {"validation_path": "other"}},
    ],
)
def test_an_acl_run_resumed_with_another_loss_forgets_the_best_losses_before_it(
    tmp_path, change
):
    """Losses of another lambda, closed-loop tiling or validation set do not
    compare: the best checkpoints and the plateau schedule start again after the
    resume."""
    cfg = config(
        tmp_path,
        itr0_threshold=1e-9,
        max_iterations=1,
        max_epochs_per_iteration=3,
        closed_loop_every=1,
    )
    write_images(tmp_path / "other", 2, (20, 16), seed=2)

    def stop_in_epoch_2(line):
        if line.startswith("acl iteration 0 epoch 2"):
            raise _Stop

    with pytest.raises(_Stop):
        run_acl(cfg, torch.device("cpu"), stop_in_epoch_2)
    exp = cfg["train_data"]["experiment_path"]
    before = torch.load(os.path.join(exp, STATE_NAME), weights_only=True)
    assert before["acl_state"]["epoch"] == 1
    for block, values in change.items():
        cfg[block].update(values)
    if cfg["acl"]["validation_path"]:
        cfg["acl"]["validation_path"] = str(tmp_path / "other")
    cfg["train_data"]["use_checkpoint_path"] = os.path.join(exp, STATE_NAME)
    log = []
    state = run_acl(cfg, torch.device("cpu"), log.append)
    new = state.history[1:]
    assert [r["epoch"] for r in new] == [2, 3]
    assert state.best_ol == min(r["open_loop"] for r in new)
    assert state.best_cl == min(r["closed_loop"] for r in new)
    for name, best in (("0", state.best_ol), ("0rr", state.best_cl)):
        saved = torch.load(
            os.path.join(exp, f"model_best_acl_{name}.pth.tar"), weights_only=True
        )
        assert saved["loss"] == best
    schedule = torch.load(os.path.join(exp, STATE_NAME), weights_only=True)
    assert schedule["lr_scheduler"]["best"] in [r["open_loop"] for r in new]
    (key,) = [f"{block}.{name}" for block, kv in change.items() for name in kv]
    assert any(
        line.startswith(f"warning: config changed since the checkpoint: {key}: ")
        for line in log
    )
    assert any("earlier validation losses do not compare" in line for line in log)


def test_acl_weights_that_do_not_fit_the_run_are_refused_naming_the_file(tmp_path):
    """As in open-loop training: a resume names the checkpoint, and --init-from
    names both architectures, or the size to set."""
    cfg = config(tmp_path, max_iterations=1)
    run_acl(cfg, torch.device("cpu"), lambda _: None)
    exp = cfg["train_data"]["experiment_path"]
    last = os.path.join(exp, STATE_NAME)
    cfg["model"]["kwargs"]["M"] = 6
    cfg["train_data"]["use_checkpoint_path"] = last
    with pytest.raises(
        ValueError, match=f"^cannot resume from {last}: checkpoint does not fit"
    ):
        run_acl(cfg, torch.device("cpu"), lambda _: None)
    cfg["train_data"]["use_checkpoint_path"] = ""
    cfg["train_data"]["experiment_path"] = str(tmp_path / "tuned")
    cfg["train_data"]["init_checkpoint_path"] = last
    with pytest.raises(
        ValueError,
        match=r"its weights have M=4, this run's model M=6 \(set model.kwargs.M",
    ):
        run_acl(cfg, torch.device("cpu"), lambda _: None)
    other = str(tmp_path / "cps.pth.tar")
    cps = models.build_model("cps", N=8)
    torch.save({"architecture": "cps", "state_dict": cps.state_dict()}, other)
    cfg["train_data"]["init_checkpoint_path"] = other
    with pytest.raises(
        ValueError,
        match=f"^cannot initialise a 'kamisli2024' model from {other}: it holds a "
        "'cps' model",
    ):
        run_acl(cfg, torch.device("cpu"), lambda _: None)


def test_a_released_acl_model_says_how_it_was_trained(tmp_path):
    """model_best_acl_<k>[rr] are the models to use, and to ship: their release's
    training.json records the run's lambda and the model's epoch and loss, as a
    release of an open-loop run's best checkpoint does."""
    from utils.training.release import INFO_NAME, build_release

    cfg = config(tmp_path, max_iterations=1)
    state = run_acl(cfg, torch.device("cpu"), lambda _: None)
    model = os.path.join(cfg["train_data"]["experiment_path"], state.selected)
    files, _ = build_release(model)
    info = json.loads(files[INFO_NAME])
    assert info["train_params"]["lmbda"] == 0.01
    assert info["batch_size"] == 2
    assert info["epoch"] == state.epoch
    assert info["validation_loss"] == state.best_ol
    # The model files now store the config, but they are still no state to resume,
    # which is said before the images are listed and checked (none are left here).
    cfg["train_data"]["use_checkpoint_path"] = model
    shutil.rmtree(os.path.join(cfg["train_data"]["data_path"], "train"))
    with pytest.raises(
        ValueError,
        match=f"^cannot resume from {model}: it holds no ACL state .*--init-from",
    ):
        run_acl(cfg, torch.device("cpu"), lambda _: None)


def test_an_acl_run_warns_of_the_settings_it_does_not_read(tmp_path):
    """max_steps, amp or logging settings had no effect on an ACL run, silently."""
    cfg = config(tmp_path, max_iterations=1)
    cfg.train_params.max_steps = 5
    cfg.train_params.amp = True
    cfg.logging.tensorboard = False
    log = []
    run_acl(cfg, torch.device("cpu"), log.append)
    [warning] = [line for line in log if "does not read" in line]
    assert warning == (
        "warning: ACL training does not read train_params.max_steps = 5, "
        "train_params.amp = True, logging.tensorboard = False; its acl block sets "
        "its epochs, stopping, clipping and validation"
    )


@pytest.mark.parametrize("preset", PRESETS)
def test_the_acl_presets_set_only_what_acl_reads(preset):
    cfg = load_config(preset)
    assert cfg.train_params.training_mode == "acl"
    assert unread_by_acl(cfg) == []
