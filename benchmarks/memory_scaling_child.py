"""One run of ``benchmarks/memory_scaling.py``: one codec on one image, in this process.

``memory_scaling.py`` starts itself again with ``--child METHOD SIZE`` for every
(codec, size), so that each peak is that run's alone, and hands the child over to
:func:`run_child`. This module is that child's side: it builds the synthetic image
and the codec, compresses and decompresses to real bytes, and prints the times, the
size and the process peak as one JSON line for the parent to read. The codec names,
shared with the driver and the report, are defined here because this is where each
one is run.
"""

import json
import time
from typing import Dict
from unittest import mock

import torch

from benchmarks.synthetic import synthetic_image
from utils.memory import parse_memory

METHODS = ("cps-budget", "cps-whole", "mbt2018", "cheng2020-anchor", "authors-cps")
AUTHORS = "authors-cps"
# CompressAI zoo models: (zoo name, quality), each at N = 192.
ZOO = {"mbt2018": ("mbt2018", 3), "cheng2020-anchor": ("cheng2020-anchor", 4)}


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_cps(
    method: str, image: torch.Tensor, args, device: torch.device
) -> Dict[str, object]:
    import models.cps.coding as codec
    import utils.stitching.planner as planner
    from benchmarks.synthetic import synthetic_model
    from models.base import CodingPlan
    from utils.coding.container import pack, unpack
    from utils.stitching.spec import PatchSpec

    model = synthetic_model(args.N, seed=0).to(device)
    transform_seconds = [0.0]
    plans = []
    run_patchwise, choose_patches = codec.run_patchwise, planner.choose_patches

    def timed_run_patchwise(*run_args, **kwargs):
        start = time.perf_counter()
        result = run_patchwise(*run_args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        transform_seconds[0] += time.perf_counter() - start
        return result

    def recorded_plan(*plan_args, **kwargs):
        plans.append(choose_patches(*plan_args, **kwargs))
        return plans[-1]

    budget = parse_memory(args.max_memory) if method == "cps-budget" else None
    coding_plan = CodingPlan(
        patch=PatchSpec(None if method == "cps-budget" else 0), budget_bytes=budget
    )
    model.measure_budget_costs(coding_plan)  # as test.py and codec.py, untimed
    with (
        mock.patch.object(codec, "run_patchwise", timed_run_patchwise),
        mock.patch.object(planner, "choose_patches", recorded_plan),
    ):
        start = time.perf_counter()
        data = pack(model.encode(image, coding_plan))
        middle = time.perf_counter()
        decoded = model.decode(unpack(data), coding_plan)
    end = time.perf_counter()
    assert decoded.shape == image.shape
    timings = {
        "encode_s": middle - start,
        "decode_s": end - middle,
        "transform_s": transform_seconds[0],
        "bytes": len(data),
    }
    if budget is None:  # no planning: one whole-image patch each way, batch 8
        return {**timings, "patch_sizes": [[0, 0], [0, 0]], "batch_sizes": [8, 8]}
    return {
        **timings,
        "patch_sizes": [list(plan.patch_size) for plan in plans],
        "batch_sizes": [plan.batch_size for plan in plans],
    }


def run_authors_cps(
    image: torch.Tensor, args, device: torch.device
) -> Dict[str, object]:
    from benchmarks.authors import authors_model, load_authors_cps, run_authors
    from benchmarks.synthetic import synthetic_model

    state_dict = synthetic_model(args.N, seed=0).state_dict()
    model = authors_model(load_authors_cps(args.authors_repo), state_dict, device)
    del state_dict
    return run_authors(model, image, args.authors_patch_size)


def run_zoo(
    method: str, image: torch.Tensor, device: torch.device
) -> Dict[str, object]:
    from compressai.zoo import image_models

    from utils.stitching.patches import pad_replicate

    name, quality = ZOO[method]
    torch.manual_seed(0)
    model = image_models[name](quality=quality, pretrained=False).eval().to(device)
    model.update(force=True)
    x = pad_replicate(image, 64).float().div_(255)[None].to(device)
    with torch.inference_mode():
        start = time.perf_counter()
        compressed = model.compress(x)
        middle = time.perf_counter()
        model.decompress(compressed["strings"], compressed["shape"])
        end = time.perf_counter()
    size = sum(len(string[0]) for string in compressed["strings"])
    return {"encode_s": middle - start, "decode_s": end - middle, "bytes": size}


def run_child(method: str, width: int, height: int, args) -> int:
    """Code a ``width`` x ``height`` image with ``method`` and print its figures
    (times, bytes, ``peak_mb``) as one JSON line on stdout."""
    device = torch.device("cuda" if args.cuda else "cpu")
    image = synthetic_image(width, height)
    if method in ZOO:
        result = run_zoo(method, image, device)
    elif method == AUTHORS:
        result = run_authors_cps(image, args, device)
    else:
        result = run_cps(method, image, args, device)
    result["peak_mb"] = peak_bytes(device) / 2**20
    print(json.dumps(result))
    return 0
