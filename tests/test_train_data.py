"""datasets/: crops of image folders and the resumable, rank-sharded sampler.

Also holds the small image-folder and config writers that the other training tests
import (``from test_train_data import make_image_folder, write_train_config``).
"""

import io
import os
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from conftest import data_dir, run_python
from PIL import Image
from torch.utils.data import DistributedSampler

from datasets import CropImageFolder, EpochSampler
from datasets.image_folder import REPLACEMENTS, UnreadableImage, list_split, open_rgb
from utils.evaluation.runs import list_images


def make_image_folder(root, n_train=4, n_test=2, size=(72, 80), small=(40, 48)):
    """Write smooth random RGB PNGs to ``root/train`` and ``root/test``.

    The first image of each split is ``small`` (W, H), smaller than a 64 crop; the
    others are ``size``. Smooth images (a bilinear upsampling of 4x4 noise) let a
    tiny model learn in a handful of steps.
    """
    rng = np.random.default_rng(0)
    for split, count in (("train", n_train), ("test", n_test)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for i in range(count):
            w, h = small if i == 0 else size
            coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
            coarse.resize((w, h), Image.BILINEAR).save(
                os.path.join(root, split, f"{i:02d}.png")
            )
    return str(root)


def write_train_config(tmp_path, data, experiment, **blocks):
    """A tiny CPU config (N=8, 64x64 crops, batch 2, no workers) as a YAML file.

    ``blocks`` update the defaults, e.g. ``train_params={"max_steps": 3}``.
    """
    cfg = {
        "train_data": {
            "data_path": str(data),
            "batch_size": 2,
            "test_batch_size": 2,
            "epochs": 100,
            "num_workers": 0,
            "cuda": False,
            "experiment_path": str(experiment),
        },
        "train_params": {"crop_size": 64, "lmbda": 0.01, "N": 8, "learning_rate": 1e-3},
        "logging": {"progress": False, "tensorboard": False, "log_interval": 1},
    }
    for block, values in blocks.items():
        cfg.setdefault(block, {}).update(values)
    path = tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_missing_or_empty_folders_are_one_line_errors(tmp_path):
    with pytest.raises(
        ValueError, match=r"missing image folder .*train \(data_path must hold"
    ):
        CropImageFolder(str(tmp_path), "train", 64, True)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "README.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images in"):
        CropImageFolder(str(tmp_path), "train", 64, True)


def test_training_and_evaluation_list_the_same_image_files(tmp_path):
    # A TGA and an upper-case JPEG are images; a README, an HDF5 file (Pillow only
    # identifies those) and a file without a suffix are not, for either listing.
    folder = tmp_path / "train"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.tga")
    Image.new("RGB", (8, 8)).save(folder / "b.JPG", format="JPEG")
    Image.new("RGB", (8, 8)).save(folder / "c.png")
    for name in ("README.txt", "features.h5", "noext"):
        (folder / name).write_bytes(b"not an image")
    trained_on = sorted(p.name for p in list_split(str(tmp_path), "train").samples)
    evaluated = [os.path.basename(p) for p in list_images(str(folder))]
    assert trained_on == evaluated == ["a.tga", "b.JPG", "c.png"]
    for name in ("a.tga", "b.JPG", "c.png"):
        (folder / name).unlink()
    with pytest.raises(ValueError, match="no images in"):
        list_split(str(tmp_path), "train")
    with pytest.raises(ValueError, match="no images .* in"):
        list_images(str(folder))


def test_small_images_are_edge_padded_or_skipped(tmp_path):
    root = make_image_folder(tmp_path, n_train=3)
    padded = CropImageFolder(root, "train", 64, random_crop=False, small_images="pad")
    assert len(padded) == 3
    crop, skipped = padded[(0, 0)]  # image 0 is 40 wide, 48 high
    assert skipped.tolist() == [-1] * REPLACEMENTS
    assert crop.shape == (3, 64, 64)
    original = torch.from_numpy(np.array(Image.open(padded.samples[0]))).permute(
        2, 0, 1
    )
    original = original.float() / 255
    # A centre crop of the padded 64x64 image is the whole padded image.
    assert torch.allclose(crop[:, :48, :40], original)
    assert torch.equal(crop[:, :48, 40:], crop[:, :48, 39:40].expand(-1, -1, 24))
    assert torch.equal(crop[:, 48:, :], crop[:, 47:48, :].expand(-1, 16, -1))

    skipped = CropImageFolder(root, "train", 64, random_crop=True, small_images="skip")
    assert len(skipped) == 2 and skipped.skipped == 1
    assert padded.samples[0] not in skipped.samples


def test_the_run_says_which_split_lost_how_many_small_images(tmp_path):
    """Both splits said "skipped 1 images smaller than 64 px", naming neither."""
    from utils.training.config import load_config
    from utils.training.distributed import DistContext
    from utils.training.images import RunImages

    data = make_image_folder(tmp_path / "data", n_train=3, n_test=3)
    cfg = load_config(
        write_train_config(
            tmp_path, data, tmp_path / "exp", train_data={"small_images": "skip"}
        )
    )
    lines = []
    RunImages(
        cfg.train_data,
        cfg.train_params,
        DistContext(0, 1, torch.device("cpu")),
        lines.append,
    )
    assert lines == [
        "skipped 1 training images smaller than 64 px",
        "skipped 1 validation images smaller than 64 px",
    ]


def write_broken_images(folder):
    """Four unusable files: a truncated JPEG, text named .jpg, a PNG whose data chunk
    fails its checksum, and a 12000x12000 PNG (a few kB of zlib data)."""
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(
        buffer.getvalue()[: len(buffer.getvalue()) // 2]
    )
    (folder / "text.jpg").write_text("<html>404 not found</html>")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    at = data.index(b"IDAT")
    data[at + 4 + int.from_bytes(data[at - 4 : at], "big")] ^= 0xFF  # the IDAT checksum
    (folder / "bad_crc.png").write_bytes(bytes(data))
    Image.new("L", (12000, 12000)).save(folder / "huge.png")
    return ["bad_crc.png", "huge.png", "text.jpg", "truncated.jpg"]


def test_unusable_images_are_refused_with_a_reason_before_decoding(tmp_path):
    write_broken_images(tmp_path)
    reasons = {}
    for name in ("bad_crc.png", "huge.png", "text.jpg", "truncated.jpg"):
        with pytest.raises(UnreadableImage) as info:
            open_rgb(tmp_path / name, max_pixels=64_000_000)
        reasons[name] = str(info.value)
    assert "checksum" in reasons["bad_crc.png"]
    assert reasons["huge.png"] == (
        "12000x12000 pixels is more than train_data.max_image_pixels=64000000"
    )
    assert reasons["text.jpg"] == "not an image file of a format PIL reads"
    assert "truncated" in reasons["truncated.jpg"]
    assert all("\n" not in r for r in reasons.values())


def test_deep_samples_are_read_for_training_as_for_evaluation(tmp_path):
    """PIL's convert("RGB") made a 16-bit grayscale PNG nearly white, a 16-bit
    colour TIFF noise and a float TIFF black, silently; training now reads them as
    read_image does."""
    from test_codec_cli import _png16

    from utils.image_io import read_image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 65536, (40, 48), dtype=np.uint16)).save(
        tmp_path / "g16.png"
    )
    _png16(tmp_path / "c16.png", rng.integers(0, 65536, (40, 48, 3)).astype(np.uint16))
    names = ["g16.png", "c16.png"]
    tifffile = pytest.importorskip("tifffile")
    colour = rng.integers(0, 65536, (40, 48, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "c16.tif", colour, photometric="rgb")
    names.append("c16.tif")  # PIL alone keeps one byte of each sample
    for name in names:
        expected, _ = read_image(str(tmp_path / name))
        trained = np.asarray(open_rgb(tmp_path / name))
        assert np.array_equal(trained, expected.permute(1, 2, 0).numpy()), name
        assert 100 < trained.mean() < 155  # uniform noise stays mid-grey
    Image.fromarray(rng.random((40, 48), dtype=np.float32)).save(tmp_path / "f.tif")
    samples = np.full((40, 48), 1000, np.int32)
    samples[0, 0] = 70000
    Image.fromarray(samples).save(tmp_path / "i32.tif")
    for name, reason in (
        ("f.tif", "floating-point images are not supported"),
        ("i32.tif", "integer samples from 1000 to 70000 do not fit 16 bits"),
    ):
        with pytest.raises(UnreadableImage) as info:
            open_rgb(tmp_path / name)
        assert str(info.value).startswith(reason), info.value


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_training_crops_come_from_the_image_turned_upright_as_evaluation_reads_it(
    tmp_path, suffix
):
    """A photo with an EXIF orientation was trained on lying on its side, while
    evaluation, ACL training and 16-bit images were turned upright."""
    from utils.image_io import read_image

    (tmp_path / "test").mkdir()
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        photo.save(tmp_path / "test" / f"{orientation}.{suffix}", exif=exif)
    folder = CropImageFolder(str(tmp_path), "test", 16, random_crop=False)
    for index, path in enumerate(folder.samples):
        upright, _ = read_image(str(path))
        height, width = upright.shape[1:]
        top, left = (height - 16) // 2, (width - 16) // 2
        centre = upright[:, top : top + 16, left : left + 16].float() / 255
        assert torch.equal(folder[index, 0][0], centre), path.name


def test_an_unusable_image_is_replaced_by_the_next_and_reported(tmp_path):
    root = make_image_folder(tmp_path, n_train=3)
    broken = write_broken_images(tmp_path / "train")
    ds = CropImageFolder(root, "train", 64, random_crop=False, max_pixels=64_000_000)
    # The names: 00.png 01.png 02.png bad_crc huge text truncated.
    names = [p.name for p in ds.samples]
    crop, skipped = ds[(names.index("bad_crc.png"), 0)]
    assert skipped.tolist() == [names.index(n) for n in broken] + [-1] * (
        REPLACEMENTS - 4
    )
    assert torch.equal(crop, ds[(0, 0)][0])  # the index wrapped around to 00.png
    assert ds.why_unusable(names.index("huge.png")).startswith("12000x12000")
    assert ds.why_unusable(0) == ""
    # Five unusable images in a row: the sample gives up with one line.
    (tmp_path / "train" / "zz.jpg").write_text("not an image either")
    ds = CropImageFolder(root, "train", 64, random_crop=False, max_pixels=64_000_000)
    with pytest.raises(
        RuntimeError,
        match=r"^5 images in a row cannot be used, the last "
        r".*zz\.jpg \(not an image file",
    ):
        ds[(names.index("bad_crc.png"), 0)]


@pytest.mark.parametrize(
    "max_pixels, limit",
    [(64_000_000, "train_data.max_image_pixels=64000000"), (None, "PIL's limit of ")],
)
def test_an_image_past_pils_own_limit_is_named_by_the_setting_it_breaks(
    tmp_path, max_pixels, limit
):
    """PIL refuses to open it before its size is read, in words of its own: 'could
    be decompression bomb DOS attack'."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(UnreadableImage) as error:
        open_rgb(path, max_pixels)
    assert str(error.value).startswith(f"more pixels than {limit}")


def test_a_panorama_wider_than_the_cps_format_still_gives_training_crops(tmp_path):
    """Open-loop training only crops an image: a side over 65535 pixels, which no
    .cps file holds, is no reason to skip it (ACL, which reads images whole, does)."""
    Image.new("RGB", (70000, 20), (10, 20, 30)).save(tmp_path / "wide.png")
    with open_rgb(tmp_path / "wide.png") as image:
        assert image.size == (70000, 20)


def test_an_image_gone_since_listing_is_named_once(tmp_path):
    """The OS's message repeated the path the warning already names."""
    path = tmp_path / "gone.png"
    with pytest.raises(UnreadableImage) as error:
        open_rgb(path)
    assert str(error.value) == "FileNotFoundError: No such file or directory"


def test_a_folder_with_fewer_images_than_replacements_says_none_can_be_used(tmp_path):
    """Two unusable images were tried five times over and reported as '5 images in a
    row cannot be used'."""
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (root / "train" / name).write_text("not an image")
    ds = CropImageFolder(root, "train", 64, random_crop=False, max_pixels=64_000_000)
    with pytest.raises(
        RuntimeError, match=r"^none of the 2 images can be used, the last .*a\.png \("
    ):
        ds[(1, 0)]


def test_skip_mode_sets_aside_unreadable_headers_while_listing(tmp_path):
    root = make_image_folder(tmp_path, n_train=3)
    write_broken_images(tmp_path / "train")
    ds = CropImageFolder(
        root, "train", 64, random_crop=True, small_images="skip", max_pixels=64_000_000
    )
    # 00.png is too small; text.jpg and huge.png fail at the header; the truncated
    # JPEG and the bad checksum only show when decoded.
    assert ds.skipped == 1 and ds.total == 7
    assert sorted(p.name for p, _ in ds.unusable) == ["huge.png", "text.jpg"]
    assert [p.name for p in ds.samples] == [
        "01.png",
        "02.png",
        "bad_crc.png",
        "truncated.jpg",
    ]


def test_random_crop_depends_only_on_its_seed(tmp_path):
    root = make_image_folder(tmp_path, size=(200, 150))
    ds = CropImageFolder(root, "train", 64, random_crop=True)
    a, b = ds[(1, 123)][0], ds[(1, 123)][0]
    assert torch.equal(a, b)
    crops = {tuple(ds[(1, s)][0].flatten()[:50].tolist()) for s in range(8)}
    assert len(crops) > 1  # different seeds, different positions
    image = torch.from_numpy(np.array(Image.open(ds.samples[1]))).permute(2, 0, 1) / 255
    windows = image.unfold(1, 64, 1).unfold(2, 64, 1)  # (3, 87, 137, 64, 64)
    match = (windows - a[:, None, None]).abs().amax(dim=(0, 3, 4)) < 1e-6
    assert match.sum() >= 1  # the crop is a real 64x64 window of the image


def test_sampler_shards_an_epoch_across_ranks_and_resumes_mid_epoch():
    n, world = 10, 3
    samplers = [EpochSampler(n, seed=5, rank=r, world_size=world) for r in range(world)]
    assert all(
        isinstance(s, DistributedSampler) and s.num_replicas == world for s in samplers
    )
    shards = [list(s) for s in samplers]
    assert all(len(s) == 4 for s in shards)  # padded to 12 so all ranks step together
    counts = Counter(i for s in shards for i, _ in s)
    assert set(counts) == set(range(n)) and sum(counts.values()) == 12

    sampler = EpochSampler(n, seed=5, rank=1, world_size=world)
    sampler.set_epoch(0, start=3)
    assert list(sampler) == shards[1][3:] and len(sampler) == 1
    sampler.set_epoch(1)
    assert list(sampler) != shards[1]  # a new epoch, a new order and new crop seeds
    with pytest.raises(ValueError, match="cannot start at sample 5"):
        sampler.set_epoch(0, start=5)


def test_the_largest_config_seed_gives_a_valid_order():
    sampler = EpochSampler(5, seed=2**63 - 1)
    sampler.set_epoch(7)
    assert sorted(i for i, _ in sampler) == [0, 1, 2, 3, 4]


def test_validation_sampler_visits_every_image_exactly_once():
    shards = [
        list(EpochSampler(5, shuffle=False, rank=r, world_size=2, pad=False))
        for r in range(2)
    ]
    assert sorted(i for s in shards for i, _ in s) == [0, 1, 2, 3, 4]
    assert [i for i, _ in shards[0]] == [0, 2, 4]


def test_real_training_folder_gives_256_crops():
    root = data_dir("CPS_TRAIN_DATA")
    train = CropImageFolder(root, "train", 256, random_crop=True)
    test = CropImageFolder(root, "test", 256, random_crop=False)
    assert len(train) > 0 and len(test) > 0
    sampler = EpochSampler(len(train), seed=0)
    for key in list(sampler)[:2]:
        x = train[key][0]
        assert x.shape == (3, 256, 256) and 0 <= x.min() and x.max() <= 1
    assert test[(0, 0)][0].shape == (3, 256, 256)


def test_images_of_exactly_the_crop_size_are_kept_and_cropped_whole(tmp_path):
    root = make_image_folder(tmp_path, n_train=3, size=(64, 64))
    kept = CropImageFolder(root, "train", 64, random_crop=True, small_images="skip")
    assert [p.name for p in kept.samples] == ["01.png", "02.png"] and kept.skipped == 1
    # The only 64x64 window of a 64x64 image is the image, whatever the seed.
    whole = (
        torch.from_numpy(np.array(Image.open(kept.samples[0]))).permute(2, 0, 1) / 255
    )
    for crop_seed in (0, 1, 2):
        assert torch.allclose(kept[(0, crop_seed)][0], whole)


def test_validation_crops_the_centre_of_the_image(tmp_path):
    root = make_image_folder(tmp_path, size=(200, 150))  # 200 wide, 150 high
    ds = CropImageFolder(root, "test", 64, random_crop=False)
    image = torch.from_numpy(np.array(Image.open(ds.samples[1]))).permute(2, 0, 1) / 255
    top, left = (150 - 64) // 2, (200 - 64) // 2
    assert torch.allclose(ds[(1, 0)][0], image[:, top : top + 64, left : left + 64])


def test_an_image_of_exactly_max_pixels_is_read(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert open_rgb(tmp_path / "a.png", max_pixels=64).size == (8, 8)
    with pytest.raises(UnreadableImage, match="8x8 pixels is more than"):
        open_rgb(tmp_path / "a.png", max_pixels=63)


def test_neighbouring_seeds_and_epochs_do_not_share_an_order():
    # seed + epoch would give seed 1 at epoch 0 the draws of seed 0 at epoch 1.
    later = EpochSampler(50, seed=0)
    later.set_epoch(1)
    assert list(EpochSampler(50, seed=1)) != list(later)


def test_every_image_of_an_epoch_gets_its_own_crop_seed():
    pairs = list(EpochSampler(50, seed=3))
    assert len({crop_seed for _, crop_seed in pairs}) == 50


def test_a_run_resumed_at_the_end_of_an_epoch_sees_nothing_more_of_it():
    sampler = EpochSampler(10, seed=5, rank=1, world_size=3)
    sampler.set_epoch(0, start=4)
    assert len(sampler) == 0 and list(sampler) == []


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        EpochSampler(5, rank=2, world_size=2)


def test_more_ranks_than_samples_still_give_every_rank_one_sample():
    shards = [list(EpochSampler(2, seed=0, rank=r, world_size=5)) for r in range(5)]
    assert [len(shard) for shard in shards] == [1] * 5
    assert {index for shard in shards for index, _ in shard} == {0, 1}


def test_workers_beyond_the_cpus_are_not_started_and_the_run_says_so(
    tmp_path, monkeypatch, recwarn
):
    """Four workers asked for on one CPU: one loads the images, one line says so, and
    PyTorch's warning about too many workers never comes."""
    from utils.training.config import load_config
    from utils.training.distributed import DistContext
    from utils.training.images import RunImages

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    data = make_image_folder(tmp_path / "data")
    cfg = load_config(
        write_train_config(
            tmp_path, data, tmp_path / "exp", train_data={"num_workers": 4}
        )
    )
    lines = []
    images = RunImages(
        cfg.train_data,
        cfg.train_params,
        DistContext(0, 1, torch.device("cpu")),
        lines.append,
    )
    loaders = images.loaders()
    assert [loader.num_workers for loader in loaders] == [1, 1]
    assert lines[-1] == (
        "train_data.num_workers is 4, more than the 1 CPUs this process may use: "
        "1 workers load the images"
    )
    assert not [w for w in recwarn if "worker" in str(w.message)]


# Both worker checks in one fresh process (importing PyTorch there takes seconds):
# the worker tests fork, which a pytest process with threads must not. A forked
# child has one thread, as a DataLoader worker has when it starts, so a blocked
# signal waits for it instead of going to another thread.
_WORKER_SIGNALS = """
import os, signal, time
from datasets.workers import STOP_SIGNALS, leave_process_group

# A stop signal sent to the group while the worker starts: dropped.
signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
child = os.fork()
if child == 0:
    os.kill(os.getpid(), signal.SIGTERM)  # pending, as in a new worker
    leave_process_group(0)
    own_group = os.getpgid(0) == os.getpid()
    unblocked = not signal.pthread_sigmask(signal.SIG_BLOCK, set())
    os._exit(0 if own_group and unblocked else 3)
_, status = os.waitpid(child, 0)
print("alive" if status == 0 else f"status {status}")
signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

# PyTorch's SIGTERM to a worker it shuts down, under the trainer's handler.
signal.signal(signal.SIGTERM, lambda *_: None)
child = os.fork()
if child == 0:
    leave_process_group(0)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    os._exit(3)
_, status = os.waitpid(child, 0)
print(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM)
"""


@pytest.fixture(scope="module")
def worker_signals():
    """The lines the worker-signal script prints, one per check."""
    done = run_python(_WORKER_SIGNALS, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_worker_stops_at_sigterm_whatever_handler_the_trainer_had(worker_signals):
    """Workers inherited the trainer's SIGTERM handler, which only sets a flag: the
    SIGTERM PyTorch sends a worker it shuts down was swallowed."""
    assert worker_signals[1] == "True"


def test_a_worker_started_as_the_group_was_signalled_drops_the_signal_and_lives(
    worker_signals,
):
    """A stop signal sent to the process group while a DataLoader worker was still in
    it killed the worker (and the run, without a checkpoint). GroupSafeDataLoader
    starts workers with the signals blocked; leaving the group discards them."""
    assert worker_signals[0] == "alive"
