"""BD-rate tables of rate-distortion curves (:mod:`utils.evaluation.curves`).

BD-rates are computed by the ``bjontegaard`` package (FAU-LMS) with PCHIP
interpolation by default, which matches the JCT-VC spreadsheet without the cubic
fit's overshoots. A curve needs at least :data:`MIN_POINTS` points, and a row is
left empty, with a note, where the two files are known to cover other images.
"""

import warnings
from typing import List, Optional, Sequence, Tuple

import bjontegaard

from utils.evaluation.choices import INTERPOLATIONS
from utils.evaluation.curves import METRICS, Curve

MIN_POINTS = 4


def image_mismatch(anchor: Curve, test: Curve) -> Tuple[Optional[str], Optional[str]]:
    """Whether ``test`` was measured on the anchor's images: ``(refusal, caution)``.

    ``refusal`` (the row stays empty): both files give their image count and the
    counts differ, so the BD-rate would compare different content (``--max-images``
    makes this easy to do by accident). ``caution`` (the row keeps its numbers, with
    this note): nothing proves the images differ, but nothing shows they are the
    same: one file gives its count and the other does not, or the dataset names
    differ (a name may be a folder's: ``--dataset data/kodak24`` is Kodak too), or
    the counts match and a file names no dataset. Both None when the files agree or
    neither says anything. Names are compared case-insensitively."""
    ours, theirs = test.image_set, anchor.image_set
    both = f"{test.name}: measured on {ours}, the anchor on {theirs}"
    if None not in (ours.count, theirs.count) and ours.count != theirs.count:
        return f"{both}; evaluate both on the same images", None
    doubts = []
    if (ours.count is None) != (theirs.count is None):
        silent = "the anchor" if theirs.count is None else test.name
        doubts.append(f"{silent} does not say how many images it was measured on")
    if None not in (ours.dataset, theirs.dataset):
        if ours.dataset.casefold() != theirs.dataset.casefold():
            doubts.append("the datasets are named differently")
    elif ours.count is not None and ours.count == theirs.count:
        named = [
            who
            for who, image_set in (("the anchor", theirs), (test.name, ours))
            if image_set.dataset is None
        ]
        doubts.append(
            "neither file says its dataset"
            if len(named) == 2
            else f"{named[0]} does not say its dataset"
        )
    if not doubts:
        return None, None
    return None, (
        f"{both}; {' and '.join(doubts)}, so this BD-rate may compare different images"
    )


def bd_rate(
    anchor: Curve, test: Curve, metric: str = "psnr-rgb", method: str = "pchip"
) -> Optional[float]:
    """BD-rate in percent of ``test`` against ``anchor`` (negative: fewer bits).

    Returns ``None`` when the two curves' quality ranges do not overlap. Raises
    ``ValueError`` for too few points or a curve that is not monotonic.
    """
    if method not in INTERPOLATIONS:
        raise ValueError(
            f"unknown interpolation {method!r}; choose from {', '.join(INTERPOLATIONS)}"
        )
    both = []  # a list, not keyed by name: the two curves may share one
    for curve in (anchor, test):
        pairs = curve.points(metric)
        if len(pairs) < MIN_POINTS:
            raise ValueError(
                f"{curve.name}: {len(pairs)} {metric} points, a BD-rate needs "
                f"at least {MIN_POINTS}"
            )
        rates, values = zip(*pairs)
        if any(b <= a for a, b in zip(rates, rates[1:])):
            raise ValueError(
                f"{curve.name}: two {metric} points share a bpp, so the rate cannot "
                "be interpolated from the quality"
            )
        if any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(
                f"{curve.name}: {metric} does not increase strictly with bpp, "
                "so the rate cannot be interpolated from it"
            )
        both.append(pairs)
    (rate_a, dist_a), (rate_t, dist_t) = (list(zip(*pairs)) for pairs in both)
    if max(dist_a) <= min(dist_t) or max(dist_t) <= min(dist_a):
        return None
    with warnings.catch_warnings():
        # Partial overlap is normal between codecs; the package's warning is noise here.
        warnings.simplefilter("ignore", UserWarning)
        value = bjontegaard.bd_rate(
            rate_a, dist_a, rate_t, dist_t, method=method, require_matching_points=False
        )
    return float(value)


def too_few_points(curve: Curve) -> Optional[str]:
    """Why ``curve`` can have no BD-rate at all (fewer than :data:`MIN_POINTS` rates),
    or None."""
    count = sum(rate is not None for rate in curve.bpp)
    if count >= MIN_POINTS:
        return None
    return (
        f"{curve.name}: {count} RD point{'' if count == 1 else 's'}, "
        f"but a BD-rate needs at least {MIN_POINTS} per curve "
        f"(evaluate at least {MIN_POINTS} checkpoints or qualities)"
    )


def bd_rate_table(
    anchor: Curve,
    tests: Sequence[Curve],
    metrics: Sequence[str] = METRICS,
    method: str = "pchip",
) -> dict:
    """BD-rates of every test curve against ``anchor`` for each metric both have.

    A cell is ``None`` where the metric is missing, the ranges do not overlap, a
    curve has too few points or is known to be measured on other images than the
    anchor (:func:`image_mismatch`); ``notes`` says why, once for each ``None`` cell,
    or once for a curve whose every cell is ``None`` (every cell of its row, or of the
    table for the anchor). A row whose images may differ from the anchor's keeps its
    numbers and has a note saying so.

    Raises:
        ValueError: the anchor has none of ``metrics``, so the table would have no
            column; the message names the metrics it has.
    """
    rows, notes = [], []
    usable = [m for m in metrics if anchor.points(m)]
    if not usable:  # a table of names without a single column answers nothing
        held = [m for m in METRICS if anchor.points(m)]
        where = f" ({anchor.path})" if anchor.path else ""
        raise ValueError(
            f"the anchor {anchor.name}{where} has no values of "
            f"{', '.join(metrics)}, so no BD-rate can be computed; it has "
            + (f"{', '.join(held)}: choose --metrics from these" if held else "none")
        )
    anchor_problem = too_few_points(anchor)
    if anchor_problem:
        notes.append(anchor_problem)
    for test in tests:
        cells = dict.fromkeys(usable)
        refusal, caution = image_mismatch(anchor, test)
        problem = refusal or too_few_points(test)
        if problem:
            notes.append(problem)
        elif not anchor_problem:
            if caution:
                notes.append(caution)
            for metric in usable:
                cells[metric] = _bd_rate_cell(anchor, test, metric, method, notes)
        rows.append(
            {
                "name": test.name,
                "file": test.path,
                "points": len(test.bpp),
                "bd-rate": cells,
            }
        )
    return {
        "anchor": anchor.name,
        "anchor_file": anchor.path,
        "interpolation": method,
        "metrics": usable,
        "rows": rows,
        "notes": notes,
    }


def _bd_rate_cell(
    anchor: Curve, test: Curve, metric: str, method: str, notes: List[str]
) -> Optional[float]:
    """One cell of :func:`bd_rate_table`.

    A ``None`` cell adds its reason to ``notes``.
    """
    if not test.points(metric):
        where = f" in {test.path}" if test.path else ""
        notes.append(f"{test.name}: no {metric} values{where}")
        return None
    try:
        value = bd_rate(anchor, test, metric, method)
    except ValueError as exc:
        notes.append(str(exc))
        return None
    if value is None:
        notes.append(f"{test.name}: {metric} range does not overlap the anchor's")
    return value


def format_table(table: dict) -> str:
    """The BD-rate table as Markdown, like Table I of the CPS paper."""
    header = ["Method", "Points"] + [f"BD-rate {m} (%)" for m in table["metrics"]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        cells = [row["name"], str(row["points"])]
        cells += [
            "-" if row["bd-rate"][m] is None else f"{row['bd-rate'][m]:+.2f}"
            for m in table["metrics"]
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"\nAnchor: {table['anchor']} ({table['interpolation']} interpolation; "
        "negative = fewer bits than the anchor at equal quality)"
    )
    return "\n".join(lines + [f"- {note}" for note in table["notes"]])
