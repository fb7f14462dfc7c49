"""The Markdown table and the plot of ``benchmarks/memory_scaling.py``'s results.

``memory_scaling.py`` runs the codecs and collects one entry per (codec, image):
measured (peak and times), skipped (a predicted peak) or failed. This module turns
those entries, new or merged with an earlier results file, into what a reader sees:
the table it prints and stores, with the authors' peak and time as ratios of
``cps-budget``'s (:func:`authors_ratios`, also stored in the JSON), and the
memory/time plot saved beside the JSON file.
"""

import os
from typing import Dict, List, Optional, Sequence

from benchmarks.authors import NOT_MEASURED
from benchmarks.memory_scaling_child import AUTHORS
from utils.figures import save_figure
from utils.memory import parse_memory


def _entry(entries: List[Dict[str, object]], size: str, method: str) -> Optional[dict]:
    return next(
        (e for e in entries if e["image"] == size and e["method"] == method), None
    )


def authors_ratios(entries: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Per image: the authors' peak and time over ``cps-budget``'s, where both ran."""
    ratios = []
    for size in dict.fromkeys(entry["image"] for entry in entries):
        ours, theirs = (
            _entry(entries, size, "cps-budget"),
            _entry(entries, size, AUTHORS),
        )
        if ours and theirs and "peak_mb" in ours and "peak_mb" in theirs:
            ratios.append(
                {
                    "image": size,
                    "peak_ratio": theirs["peak_mb"] / ours["peak_mb"],
                    "time_ratio": (theirs["encode_s"] + theirs["decode_s"])
                    / (ours["encode_s"] + ours["decode_s"]),
                }
            )
    return ratios


def format_table(entries: List[Dict[str, object]], methods: Sequence[str]) -> str:
    """Peak and time per image and method; the authors' columns are always shown."""
    shown = list(methods) + ([AUTHORS] if AUTHORS not in methods else [])
    header = "| image | " + " | ".join(f"{m} peak (MB) | {m} time (s)" for m in shown)
    lines = [
        header + " | authors / cps-budget peak, time |",
        "|" + "---|" * (2 + 2 * len(shown)),
    ]
    ratios = {ratio["image"]: ratio for ratio in authors_ratios(entries)}
    for size in dict.fromkeys(entry["image"] for entry in entries):
        cells = [size]
        for method in shown:
            entry = _entry(entries, size, method)
            if entry is None and method == AUTHORS:
                cells += [NOT_MEASURED, NOT_MEASURED]
            elif entry is None:
                cells += ["", ""]
            elif entry.get("skipped"):
                cells += [f"(~{entry['predicted_peak_mb']:.0f}, not run)", ""]
            elif entry.get("failed"):
                cells += ["failed", ""]
            else:
                time_text = f"{entry['encode_s'] + entry['decode_s']:.1f}"
                if "transform_s" in entry:
                    time_text += f" ({entry['transform_s']:.1f} transforms)"
                cells += [f"{entry['peak_mb']:.0f}", time_text]
        ratio = ratios.get(size)
        cells.append(
            NOT_MEASURED
            if ratio is None
            else f"{ratio['peak_ratio']:.2f}x, {ratio['time_ratio']:.2f}x"
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    entries: List[Dict[str, object]], methods: Sequence[str], path: str, budget: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for method in methods:
        done = [e for e in entries if e["method"] == method and "peak_mb" in e]
        if not done:
            continue
        megapixels = [e["megapixels"] for e in done]
        memory_axis.plot(
            megapixels, [e["peak_mb"] / 1024 for e in done], "o-", label=method
        )
        time_axis.plot(
            megapixels,
            [e["encode_s"] + e["decode_s"] for e in done],
            "o-",
            label=method,
        )
    memory_axis.axhline(
        parse_memory(budget) / 2**30,
        color="grey",
        linestyle=":",
        label=f"budget {budget}",
    )
    memory_axis.set(
        xscale="log",
        yscale="log",
        xlabel="megapixels",
        ylabel="peak memory of the process (GB)",
    )
    time_axis.set(
        xscale="log", yscale="log", xlabel="megapixels", ylabel="encode + decode (s)"
    )
    for axis in (memory_axis, time_axis):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_figure(figure, path, dpi=110)
