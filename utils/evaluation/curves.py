"""Rate-distortion curves read from results files (CompressAI's schema), for plots
(:mod:`utils.evaluation.rd_plot`) and BD-rate tables (:mod:`utils.evaluation.rd`).

Results files hold ``{"name", "description", "results": {"bpp": [...], "psnr-rgb":
[...], ...}}``; the older keys ``psnr`` and ``ms-ssim`` found in some published files
are read as ``psnr-rgb`` and ``ms-ssim-rgb``. Points are sorted by rate and those with
a missing value (``null``) are left out of each curve. Every value is checked when the
file is read, so a bad file is one line naming it, never a wrong curve.

MS-SSIM is handled in decibels, ``-10 log10(1 - MS-SSIM)``, both in plots and in
BD-rates, because its linear scale squeezes all good reconstructions against 1.
"""

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, replace
from typing import Dict, List, NamedTuple, Optional, Sequence

METRICS = ("psnr-rgb", "ms-ssim-rgb", "psnr-b", "psnr-b-y")
AXIS_LABELS = {
    "psnr-rgb": "PSNR-RGB (dB)",
    "ms-ssim-rgb": "MS-SSIM-RGB (dB)",
    "psnr-b": "PSNR-B, RGB mean (dB)",
    "psnr-b-y": "PSNR-B on luma Y (dB)",
}
_ALIASES = {"psnr": "psnr-rgb", "ms-ssim": "ms-ssim-rgb"}


class ImageSet(NamedTuple):
    """The images a results file says it was measured on: its dataset's name and its
    image count, None where it does not say. ``test.py`` writes both in its ``meta``
    (the name from ``datasets.yaml``, or of the ``--dataset`` folder); a published
    anchor gives them at its top level."""

    dataset: Optional[str] = None
    count: Optional[int] = None

    def __str__(self) -> str:
        """``24 images of Kodak``, ``1 image``, ``an unknown number of images``."""
        if self.count is None:
            counted = "an unknown number of images"
        else:
            counted = f"{self.count} image{'s' * (self.count != 1)}"
        return counted + (f" of {self.dataset}" if self.dataset is not None else "")


@dataclass
class Curve:
    """One method's RD points, sorted by bpp.

    ``metrics`` maps a metric to its values.
    """

    name: str
    bpp: List[float]
    metrics: Dict[str, List[Optional[float]]]
    path: str = ""
    image_set: ImageSet = ImageSet()  # what the file says it was measured on

    def points(self, metric: str) -> List[tuple]:
        """(bpp, value) pairs of ``metric`` without missing values; MS-SSIM in dB."""
        values = self.metrics.get(metric, [])
        pairs = [
            (rate, value)
            for rate, value in zip(self.bpp, values)
            if rate is not None and value is not None and _is_finite(value)
        ]
        if metric == "ms-ssim-rgb":
            pairs = [
                (rate, -10 * math.log10(1 - value))
                for rate, value in pairs
                if value < 1
            ]
        return pairs


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    """Finite as a float: JSON integers have no bound, and one past float's range is
    not a rate or a quality either."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_values(path: str, results: dict) -> None:
    """Every value a curve reads is a number or null (a metric an image was too small
    for); rates are positive and finite; layers are integers. Anything else would fail
    deep inside matplotlib or the BD-rate fit, or be drawn as a category."""
    for index, rate in enumerate(results["bpp"]):
        if rate is not None and not (
            _is_number(rate) and _is_finite(rate) and rate > 0
        ):
            raise ValueError(
                f"results file {path}: bpp[{index}] = {rate!r} is not a positive "
                "finite number"
            )
    for key, values in results.items():
        if _ALIASES.get(key, key) in METRICS and isinstance(values, list):
            for index, value in enumerate(values):
                if value is not None and not _is_number(value):
                    raise ValueError(
                        f"results file {path}: {key}[{index}] = {value!r} is not "
                        "a number"
                    )
                # Outside it, the dB form is negative or undefined: a wrong curve,
                # or a point silently left out.
                if (
                    _ALIASES.get(key, key) == "ms-ssim-rgb"
                    and value is not None
                    and not 0 <= value <= 1
                ):
                    raise ValueError(
                        f"results file {path}: {key}[{index}] = {value!r} is not an "
                        "MS-SSIM (between 0 and 1)"
                    )
    layers = results.get("layer")
    if isinstance(layers, list) and any(
        not (isinstance(k, int) and not isinstance(k, bool)) for k in layers
    ):
        raise ValueError(f"results file {path}: results.layer must hold integers")


def _read_results(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except OSError as exc:
        raise ValueError(f"cannot read results file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"results file {path} is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        # Bad syntax, a 4300-digit number, deep nesting.
        raise ValueError(f"results file {path} is not valid JSON: {exc}") from None
    results = document.get("results") if isinstance(document, dict) else None
    if not isinstance(results, dict) or not isinstance(results.get("bpp"), list):
        raise ValueError(
            f"results file {path} has no results.bpp list (CompressAI format expected)"
        )
    _check_values(path, results)
    return document


def _curve(
    document: dict, path: str, keep=None, suffix: str = "", name: Optional[str] = None
) -> Curve:
    """The points of ``document`` (those at indexes ``keep``, default all) as a Curve,
    named ``name``, else the file's ``name`` field, else the file name."""
    results = document["results"]
    bpp = results["bpp"]
    keep = list(range(len(bpp))) if keep is None else keep
    metrics = {}
    for key, values in results.items():
        metric = _ALIASES.get(key, key)
        if metric in METRICS and isinstance(values, list):
            if len(values) != len(bpp):
                raise ValueError(
                    f"results file {path}: {key} has {len(values)} values "
                    f"but bpp has {len(bpp)}"
                )
            metrics[metric] = values
    order = sorted(keep, key=lambda i: (bpp[i] is None, bpp[i]))
    name = name or document.get("name") or os.path.splitext(os.path.basename(path))[0]
    return Curve(
        name=str(name) + suffix,
        bpp=[bpp[i] for i in order],
        metrics={m: [v[i] for i in order] for m, v in metrics.items()},
        path=path,
        image_set=_image_set(document),
    )


def _image_set(document: dict) -> ImageSet:
    """The :class:`ImageSet` of a results file: ``meta`` first, else the top level. A
    count that is not a whole number (``Infinity``, ``NaN``, ``2.5``) is not given,
    and is not replaced by the other place's."""
    meta = document.get("meta")
    places = [meta, document] if isinstance(meta, dict) else [document]
    dataset = next(
        (p["dataset"] for p in places if isinstance(p.get("dataset"), str)), None
    )
    count = None
    for place in places:
        images = place.get("images")
        if images is not None:
            if _is_number(images) and _is_finite(images) and images == int(images):
                count = int(images)
            break
    return ImageSet(dataset, count)


def load_curve(path: str, name: Optional[str] = None) -> Curve:
    """Read a results JSON file into a :class:`Curve` (named ``name`` if given)."""
    return _curve(_read_results(path), path, name=name)


def load_curves(path: str, name: Optional[str] = None) -> List[Curve]:
    """Like :func:`load_curve`, but a file of a scalable model (a ``results.layer``
    list) gives one curve per layer, each through that layer's points."""
    document = _read_results(path)
    layers = document["results"].get("layer")
    if not isinstance(layers, list) or len(layers) != len(document["results"]["bpp"]):
        return [_curve(document, path, name=name)]
    return [
        _curve(
            document,
            path,
            [i for i, k in enumerate(layers) if k == layer],
            f" layer {layer}",
            name,
        )
        for layer in sorted(set(layers))
    ]


def distinct_names(curves: Sequence[Curve]) -> List[Curve]:
    """``curves`` with every shared name followed by its file, ``cps (a.json)``: results
    files are named after their model, so two runs of one model share a name, and a
    table or legend would show one of them twice, or once for both."""
    counts = Counter(curve.name for curve in curves)
    stems = Counter((curve.name, os.path.basename(curve.path)) for curve in curves)
    renamed = []
    for curve in curves:
        if counts[curve.name] == 1:
            renamed.append(curve)
            continue
        where = os.path.basename(curve.path)
        if stems[curve.name, where] > 1:
            where = curve.path
        renamed.append(replace(curve, name=f"{curve.name} ({where})"))
    return renamed


def parse_labels(items: Sequence[str], paths: Sequence[str]) -> Dict[str, str]:
    """``FILE=NAME`` items as {path in ``paths``: NAME}.

    FILE may be written differently from the path it names (``./a.json`` for
    ``a.json``); it is matched by its resolved location. A FILE that is not among
    ``paths`` is an error, so a typo cannot leave a curve silently unlabelled, and so
    is a second label for one file. FILE ends at the first ``=`` before which the
    text names one of ``paths``, so a FILE or a NAME may hold ``=`` too.
    """
    by_location = {os.path.realpath(path): path for path in paths}
    labels = {}
    for item in items:
        splits = [i for i, char in enumerate(item) if char == "="]
        if not splits or not item[: splits[0]]:
            raise ValueError(f"--label {item!r}: expected FILE=NAME")
        named = [
            (by_location[os.path.realpath(item[:i])], item[i + 1 :])
            for i in splits
            if os.path.realpath(item[:i]) in by_location
        ]
        if not named:
            file = item[: splits[0]]
            raise ValueError(
                f"--label {item!r}: {file} is not one of the results files"
            )
        path, name = named[0]
        if not name:
            raise ValueError(f"--label {item!r}: expected FILE=NAME")
        if path in labels:
            raise ValueError(f"--label: {path} is labelled twice")
        labels[path] = name
    return labels
