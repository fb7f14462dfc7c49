"""RD curves, BD-rate tables, plots and the shipped Kodak anchors."""

import glob
import json
import math
import os

import pytest

import test as test_script
from utils.evaluation.curves import METRICS, load_curve, load_curves, parse_labels
from utils.evaluation.rd import MIN_POINTS, bd_rate, bd_rate_table, format_table
from utils.evaluation.rd_plot import curve_styles, rd_figure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANCHORS = os.path.join(REPO, "assets", "anchors", "kodak")
# What test.py measured here (assets/results/<dataset>/): not third-party anchors.
MEASURED_HERE = sorted(
    glob.glob(os.path.join(REPO, "assets", "results", "*", "*.json"))
)


def write_results(path, name, bpp, psnr, **more):
    results = {"bpp": bpp, "psnr-rgb": psnr, **more}
    path.write_text(json.dumps({"name": name, "description": "", "results": results}))
    return str(path)


BPP = [0.1, 0.2, 0.4, 0.8, 1.6]
PSNR = [28.0, 30.5, 33.0, 35.5, 38.0]


def test_a_curve_has_zero_bd_rate_against_itself(tmp_path):
    curve = load_curve(write_results(tmp_path / "a.json", "a", BPP, PSNR))
    assert bd_rate(curve, curve) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("factor", [0.9, 1.25])
def test_scaling_every_rate_gives_that_bd_rate(tmp_path, factor):
    anchor = load_curve(write_results(tmp_path / "a.json", "a", BPP, PSNR))
    test = load_curve(
        write_results(tmp_path / "t.json", "t", [b * factor for b in BPP], PSNR)
    )
    assert bd_rate(anchor, test) == pytest.approx((factor - 1) * 100, abs=1e-6)


def test_old_keys_are_read_and_points_sorted_by_rate(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(
        json.dumps(
            {
                "name": "old",
                "results": {
                    "bpp": [0.8, 0.1, 0.4],
                    "psnr": [35.0, 28.0, 32.0],
                    "ms-ssim": [0.99, 0.9, 0.97],
                },
            }
        )
    )
    curve = load_curve(str(path))
    assert curve.bpp == [0.1, 0.4, 0.8]
    assert curve.metrics["psnr-rgb"] == [28.0, 32.0, 35.0]
    assert curve.metrics["ms-ssim-rgb"] == [0.9, 0.97, 0.99]


def test_missing_values_are_left_out_of_a_curve(tmp_path):
    curve = load_curve(
        write_results(
            tmp_path / "a.json",
            "a",
            BPP,
            PSNR,
            **{"ms-ssim-rgb": [None, 0.95, 0.97, 0.98, 0.99]},
        )
    )
    assert len(curve.points("ms-ssim-rgb")) == 4
    # 0.95 in dB.
    assert curve.points("ms-ssim-rgb")[0][1] == pytest.approx(13.0103, abs=1e-4)


def test_too_few_points_and_non_monotonic_curves_are_refused(tmp_path):
    anchor = load_curve(write_results(tmp_path / "a.json", "a", BPP, PSNR))
    short = load_curve(
        write_results(
            tmp_path / "s.json", "s", BPP[: MIN_POINTS - 1], PSNR[: MIN_POINTS - 1]
        )
    )
    wavy = load_curve(
        write_results(tmp_path / "w.json", "w", BPP, [28, 31, 30, 35, 38])
    )
    with pytest.raises(ValueError, match="a BD-rate needs at least"):
        bd_rate(anchor, short)
    with pytest.raises(ValueError, match="does not increase strictly"):
        bd_rate(anchor, wavy)


def test_curves_that_do_not_overlap_give_no_number_and_a_note(tmp_path):
    anchor = load_curve(write_results(tmp_path / "a.json", "a", BPP, PSNR))
    far = load_curve(
        write_results(tmp_path / "f.json", "far", BPP, [p + 20 for p in PSNR])
    )
    table = bd_rate_table(anchor, [far], metrics=["psnr-rgb"])
    assert table["rows"][0]["bd-rate"]["psnr-rgb"] is None
    assert "does not overlap" in table["notes"][0]
    assert "| far | 5 | - |" in format_table(table)


def test_bdrate_command_prints_the_table_json_for_the_shipped_anchors(capsys, tmp_path):
    markdown = tmp_path / "table.md"
    code = test_script.main(
        [
            "bdrate",
            "--anchor",
            os.path.join(ANCHORS, "hm.json"),
            os.path.join(ANCHORS, "vtm.json"),
            os.path.join(ANCHORS, "jpeg.json"),
            "-o",
            str(markdown),
        ]
    )
    out = capsys.readouterr()
    assert code == 0
    table = json.loads(out.out)
    rates = {row["name"]: row["bd-rate"]["psnr-rgb"] for row in table["rows"]}
    # VVC saves bits over HEVC, JPEG costs.
    assert rates["VTM"] < -15 and rates["JPEG"] > 100
    assert "| VTM |" in markdown.read_text() and "| VTM |" in out.err


def test_plot_command_writes_one_panel_per_available_metric(capsys, tmp_path):
    output = tmp_path / "rd.png"
    first = write_results(
        tmp_path / "a.json", "a", BPP, PSNR, **{"psnr-b": [p - 1 for p in PSNR]}
    )
    code = test_script.main(
        ["plot", first, os.path.join(ANCHORS, "hm.json"), "-o", str(output)]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["metrics"] == ["psnr-rgb", "ms-ssim-rgb", "psnr-b"]
    assert output.read_bytes().startswith(b"\x89PNG")


def test_plot_labels_rename_two_files_that_carry_the_same_name(capsys, tmp_path):
    first = write_results(tmp_path / "a.json", "cps", BPP, PSNR)
    second = write_results(tmp_path / "b.json", "cps", BPP, [p + 0.5 for p in PSNR])
    code = test_script.main(
        [
            "plot",
            first,
            second,
            "-o",
            str(tmp_path / "rd.png"),
            "--label",
            f"{first}=CPS P=128",
            "--label",
            f"{tmp_path}/./b.json=CPS P=256",
        ]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["curves"] == ["CPS P=128", "CPS P=256"]


def test_runs_of_one_model_are_told_apart_by_their_files(capsys, tmp_path):
    """Every test.py checkpoint file is named 'cps': keyed by name, the test curve
    replaced the anchor and every BD-rate read +0.00, and the plot's legend showed one
    entry for two curves."""
    anchor = write_results(tmp_path / "old.json", "cps", BPP, PSNR)
    other = write_results(tmp_path / "new.json", "cps", [b * 0.8 for b in BPP], PSNR)
    code = test_script.main(
        ["bdrate", "--anchor", anchor, other, "--metrics", "psnr-rgb"]
    )
    table = json.loads(capsys.readouterr().out)
    assert code == 0 and (table["anchor"], table["rows"][0]["name"]) == (
        "cps (old.json)",
        "cps (new.json)",
    )
    assert table["rows"][0]["bd-rate"]["psnr-rgb"] == pytest.approx(-20.0, abs=1e-6)
    code = test_script.main(["plot", anchor, other, "-o", str(tmp_path / "rd.png")])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["curves"] == [
        "cps (old.json)",
        "cps (new.json)",
    ]
    # Same file names in two folders: the paths tell them apart.
    (tmp_path / "b").mkdir()
    twin = write_results(tmp_path / "b" / "old.json", "cps", BPP, PSNR)
    assert (
        test_script.main(["plot", anchor, twin, "-o", str(tmp_path / "rd2.png")]) == 0
    )
    assert json.loads(capsys.readouterr().out)["curves"] == [
        f"cps ({anchor})",
        f"cps ({twin})",
    ]


@pytest.mark.parametrize("command", ["plot", "bdrate"])
def test_a_metric_named_twice_is_a_usage_error(capsys, tmp_path, command):
    """It drew its panel, or its column, twice."""
    first = write_results(tmp_path / "a.json", "a", BPP, PSNR)
    argv = (
        [command, first, "-o", str(tmp_path / "x.png")]
        if command == "plot"
        else [command, "--anchor", first, first]
    )
    with pytest.raises(SystemExit) as exit_info:
        test_script.main(argv + ["--metrics", "psnr-rgb, psnr-rgb"])
    assert exit_info.value.code == 2
    assert "psnr-rgb is given twice in 'psnr-rgb, psnr-rgb'" in capsys.readouterr().err


def test_a_bdrate_output_named_empty_is_refused(capsys, tmp_path):
    anchor = write_results(tmp_path / "a.json", "a", BPP, PSNR)
    assert test_script.main(["bdrate", "--anchor", anchor, anchor, "-o", ""]) == 1
    assert capsys.readouterr().err.strip() == "test.py: error: the output name is empty"


def test_bdrate_labels_rename_the_anchor_and_a_row(capsys, tmp_path):
    anchor = write_results(tmp_path / "a.json", "cps", BPP, PSNR)
    other = write_results(tmp_path / "b.json", "cps", [b * 0.9 for b in BPP], PSNR)
    code = test_script.main(
        [
            "bdrate",
            "--anchor",
            anchor,
            other,
            "--metrics",
            "psnr-rgb",
            "--label",
            f"{anchor}=old",
            "--label",
            f"{other}=new",
        ]
    )
    table = json.loads(capsys.readouterr().out)
    assert code == 0 and table["anchor"] == "old" and table["rows"][0]["name"] == "new"


@pytest.mark.parametrize(
    "label, message",
    [
        ("nameless.json", "expected FILE=NAME"),
        ("other.json=x", "is not one of the results"),
    ],
)
def test_a_bad_label_is_one_line_on_stderr(capsys, tmp_path, label, message):
    first = write_results(tmp_path / "a.json", "a", BPP, PSNR)
    assert (
        test_script.main(
            ["plot", first, "-o", str(tmp_path / "x.png"), "--label", label]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_labels_may_hold_equals_signs_and_a_file_is_labelled_once(tmp_path):
    """``--label a=b.json=X`` could not name the file ``a=b.json``, and a second
    label for one file silently replaced the first."""
    odd = write_results(tmp_path / "a=b.json", "a", BPP, PSNR)
    plain = write_results(tmp_path / "c.json", "c", BPP, PSNR)
    assert parse_labels([f"{odd}=λ=0.01", f"{plain}=x="], [odd, plain]) == {
        odd: "λ=0.01",
        plain: "x=",
    }
    with pytest.raises(ValueError, match="labelled twice"):
        parse_labels([f"{plain}=x", f"{plain}=y"], [odd, plain])


@pytest.mark.parametrize("value", [-5.0, 1.5])
def test_an_ms_ssim_outside_0_to_1_is_refused_not_drawn_or_dropped(tmp_path, value):
    path = tmp_path / "m.json"
    values = [0.9, 0.95, value, 0.99]
    path.write_text(json.dumps({"results": {"bpp": BPP[:4], "ms-ssim-rgb": values}}))
    with pytest.raises(ValueError, match=r"ms-ssim-rgb\[2\] = .* is not an MS-SSIM"):
        load_curve(str(path))


def test_points_sharing_a_bpp_give_no_bd_rate(tmp_path):
    anchor = load_curve(write_results(tmp_path / "a.json", "a", BPP, PSNR))
    flat = load_curve(write_results(tmp_path / "f.json", "f", [0.5] * 5, PSNR))
    with pytest.raises(ValueError, match="share a bpp"):
        bd_rate(anchor, flat)


def test_mathtext_that_cannot_be_drawn_is_named_with_its_flag(capsys, tmp_path):
    """matplotlib's bare 'Unknown symbol: \\bad' did not say which text held it."""
    first = write_results(tmp_path / "a.json", "a", BPP, PSNR)
    out = str(tmp_path / "x.png")
    argv = ["plot", first, "-o", out]
    assert test_script.main(argv + ["--label", f"{first}=$\\bad$"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "test.py: error: the curve name '$\\bad$' (--label, or its file's name) "
        "holds mathtext matplotlib cannot draw"
    )
    assert test_script.main(argv + ["--title", "$\\bad$"]) == 1
    assert "the title (--title)" in capsys.readouterr().err
    # As matplotlib reads it, line by line: one $ on each line is plain text, and
    # math that parses is drawn.
    title = "cost $5\nand $x"
    label = f"{first}=$\\lambda$"
    assert test_script.main(argv + ["--title", title, "--label", label]) == 0
    assert os.path.isfile(out)


def test_twenty_curve_styles_differ_in_colour_and_in_marker():
    styles = curve_styles(20)
    assert len({style["color"] for style in styles}) == 20
    assert len({style["marker"] for style in styles}) == 20


def test_fourteen_curves_are_told_apart_and_the_legend_sits_outside_the_panels(
    tmp_path,
):
    curves = [
        load_curve(
            write_results(
                tmp_path / f"c{i}.json",
                f"method {i}",
                BPP,
                [p + i * 0.3 for p in PSNR],
                **{"psnr-b-y": [p - 1 for p in PSNR]},
            )
        )
        for i in range(14)
    ]
    figure, shown = rd_figure(curves, title="fourteen")
    assert shown == ["psnr-rgb", "psnr-b-y"]
    for axis in figure.axes:
        lines = axis.get_lines()
        assert len(lines) == 14
        assert len({(line.get_color(), line.get_marker()) for line in lines}) == 14
        assert len({line.get_marker() for line in lines}) == 14
    legend = figure.legends[0]
    assert [text.get_text() for text in legend.get_texts()] == [
        f"method {i}" for i in range(14)
    ]
    renderer = figure.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    assert all(box.x0 >= axis.get_window_extent(renderer).x1 for axis in figure.axes)


@pytest.mark.parametrize(
    "text", ["{not json", "[" * 100000, '{"a": 1' + "0" * 5000 + "}"]
)
def test_a_broken_results_file_is_one_line_on_stderr(capsys, tmp_path, text):
    broken = tmp_path / "broken.json"
    broken.write_text(text)
    assert test_script.main(["plot", str(broken), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"results file {broken} is not valid JSON" in err[0], err


@pytest.mark.parametrize("command", ["plot", "bdrate"])
@pytest.mark.parametrize(
    "results, message",
    [
        (
            {
                "bpp": [0.1, 0.2, 0.4, 0.8],
                "psnr-rgb": [28, 30, 32, 34],
                "layer": [None, 1, 1, 2],
            },
            "results.layer must hold integers",
        ),
        (
            {"bpp": [0.1, 0.2, 0.4, 0.8], "psnr-rgb": ["28", "30", "32", "34"]},
            "psnr-rgb[0] = '28' is not a number",
        ),
        (
            {"bpp": ["0.1", 0.2, 0.4, 0.8], "psnr-rgb": [28, 30, 32, 34]},
            "bpp[0] = '0.1'",
        ),
        (
            {"bpp": [0.1, 0.0, 0.4, 0.8], "psnr-rgb": [28, 30, 32, 34]},
            "bpp[1] = 0.0 is not a",
        ),
        (
            {"bpp": [[0.1], [0.2], [0.4], [0.8]], "psnr-rgb": [28, 30, 32, 34]},
            "bpp[0] = [0.1]",
        ),
        # JSON integers have no bound: one past float's range is not a positive finite
        # rate.
        (
            {"bpp": [10**400, 0.2, 0.4, 0.8], "psnr-rgb": [28, 30, 32, 34]},
            "bpp[0] = 1000",
        ),
    ],
)
def test_malformed_values_are_one_line_errors_naming_file_and_field(
    capsys, tmp_path, command, results, message
):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": results}))
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps(
            {"results": {"bpp": [0.1, 0.2, 0.4, 0.8], "psnr-rgb": [27, 29, 31, 33]}}
        )
    )
    argv = (
        ["plot", str(bad), "-o", str(tmp_path / "x.png")]
        if command == "plot"
        else ["bdrate", "--anchor", str(good), str(bad)]
    )
    assert test_script.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and message in err[0]


def test_an_output_that_is_one_of_the_results_files_is_refused(capsys, tmp_path):
    results = tmp_path / "ours.json"
    results.write_text(
        json.dumps(
            {"results": {"bpp": [0.1, 0.2, 0.4, 0.8], "psnr-rgb": [27, 29, 31, 33]}}
        )
    )
    before = results.read_text()
    assert (
        test_script.main(
            ["bdrate", "--anchor", str(results), str(results), "-o", str(results)]
        )
        == 1
    )
    assert "refusing to overwrite" in capsys.readouterr().err
    assert results.read_text() == before


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ANCHORS, "*.json"))))
def test_every_shipped_anchor_cites_its_source_and_is_sorted(path):
    with open(path) as handle:
        document = json.load(handle)
    assert document["source"]["url"].startswith("https://github.com/")
    assert document["dataset"] == "kodak"
    curve = load_curve(path)
    assert curve.bpp == sorted(curve.bpp)
    assert len(curve.points("psnr-rgb")) == len(curve.bpp) >= 3


def test_results_measured_here_are_found():
    assert len(MEASURED_HERE) >= 3  # the shipped models, JPEG and WebP on Kodak


@pytest.mark.parametrize(
    "path", MEASURED_HERE, ids=[os.path.basename(p) for p in MEASURED_HERE]
)
def test_every_result_measured_here_has_every_metric_test_py_writes(path):
    """A shipped file of test.py's is complete: every distortion metric test.py
    writes (psnr-b-y included, so a BD-rate on it against JPEG or WebP is possible),
    a value for every point, and the meta that says which images it covers. The
    published anchors (assets/anchors/) may lack metrics and are not checked here."""
    with open(path) as handle:
        document = json.load(handle)
    results, meta = document["results"], document["meta"]
    for key in ("bpp", *METRICS, "encoding_time", "decoding_time", "peak_memory_mb"):
        assert key in results, f"{path} has no {key}"
        assert len(results[key]) == len(results["bpp"]), f"{path}: {key}"
        assert all(_is_finite_number(v) for v in results[key]), f"{path}: {key}"
    assert isinstance(meta["dataset"], str) and meta["images"] > 0
    assert len(meta["runs"]) == len(results["bpp"])
    for metric in ("psnr-b", "psnr-b-y"):  # how each PSNR-B was computed
        assert meta[metric], f"{path}: meta says nothing of {metric}"


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_lossless_and_non_finite_points_are_left_out_of_a_curve(tmp_path):
    # MS-SSIM 1 is infinite in dB, like a lossless PSNR: neither can be drawn or fitted.
    curve = load_curve(
        write_results(
            tmp_path / "a.json",
            "a",
            BPP,
            [28.0, 30.5, float("inf"), float("nan"), 38.0],
            **{"ms-ssim-rgb": [0.9, 0.95, 0.97, 0.99, 1.0]},
        )
    )
    assert curve.points("psnr-rgb") == [(0.1, 28.0), (0.2, 30.5), (1.6, 38.0)]
    assert [rate for rate, _ in curve.points("ms-ssim-rgb")] == [0.1, 0.2, 0.4, 0.8]


def test_a_curve_with_a_flat_step_is_refused(tmp_path):
    # Equal qualities at two rates: the rate is no function of the quality there.
    anchor = load_curve(write_results(tmp_path / "a.json", "a", BPP, PSNR))
    flat = load_curve(
        write_results(tmp_path / "f.json", "f", BPP, [28, 30, 30, 35, 38])
    )
    with pytest.raises(ValueError, match="does not increase strictly"):
        bd_rate(anchor, flat)


def test_exactly_min_points_points_give_a_bd_rate(tmp_path):
    anchor = load_curve(
        write_results(tmp_path / "a.json", "a", BPP[:MIN_POINTS], PSNR[:MIN_POINTS])
    )
    test = load_curve(
        write_results(
            tmp_path / "t.json",
            "t",
            [b * 1.25 for b in BPP[:MIN_POINTS]],
            PSNR[:MIN_POINTS],
        )
    )
    assert bd_rate(anchor, test) == pytest.approx(25.0, abs=1e-6)


@pytest.mark.parametrize("shift", [-20.0, -10.0, 10.0])
def test_curves_below_above_or_touching_the_anchor_give_no_number(tmp_path, shift):
    # A shift of exactly one range (PSNR spans 10 dB) leaves one shared value, no
    # interval: the fit would return NaN, not a BD-rate.
    anchor = load_curve(write_results(tmp_path / "a.json", "a", BPP, PSNR))
    other = load_curve(
        write_results(tmp_path / "o.json", "o", BPP, [p + shift for p in PSNR])
    )
    assert bd_rate(anchor, other) is None


def test_table_lists_only_the_metrics_of_the_anchor_and_signs_every_number(tmp_path):
    anchor = load_curve(write_results(tmp_path / "a.json", "a", BPP, PSNR))
    costly = load_curve(
        write_results(
            tmp_path / "c.json",
            "costly",
            [b * 1.25 for b in BPP],
            PSNR,
            **{"psnr-b": [p - 1 for p in PSNR]},
        )
    )
    table = bd_rate_table(anchor, [costly])
    assert table["metrics"] == ["psnr-rgb"]
    assert table["rows"][0]["bd-rate"] == {"psnr-rgb": pytest.approx(25.0, abs=1e-6)}
    assert "| costly | 5 | +25.00 |" in format_table(table)


def test_a_metric_list_shorter_than_bpp_is_a_clear_error(tmp_path):
    path = write_results(tmp_path / "a.json", "a", BPP, PSNR[:3])
    with pytest.raises(ValueError, match="psnr-rgb has 3 values but bpp has 5"):
        load_curve(path)


def test_a_nameless_results_file_is_named_after_its_file(tmp_path):
    path = tmp_path / "jpeg.json"
    path.write_text(json.dumps({"results": {"bpp": BPP, "psnr-rgb": PSNR}}))
    assert load_curve(str(path)).name == "jpeg"
    assert load_curve(str(path), name="JPEG (libjpeg)").name == "JPEG (libjpeg)"


def test_a_scalable_results_file_gives_one_curve_per_layer(tmp_path):
    path = write_results(
        tmp_path / "s.json",
        "scalable",
        [0.3, 0.1, 0.4, 0.2],
        [31, 28, 33, 30],
        layer=[1, 0, 1, 0],
    )
    curves = load_curves(path)
    assert [curve.name for curve in curves] == ["scalable layer 0", "scalable layer 1"]
    assert [curve.bpp for curve in curves] == [[0.1, 0.2], [0.3, 0.4]]
    assert curves[1].metrics["psnr-rgb"] == [31, 33]
    # A layer list that does not match the points is not a scalable file.
    mismatched = write_results(tmp_path / "m.json", "m", BPP, PSNR, layer=[0, 1])
    assert [curve.bpp for curve in load_curves(mismatched)] == [BPP]


def test_every_dash_in_a_table_has_a_note_saying_why(tmp_path):
    anchor = load_curve(
        write_results(
            tmp_path / "a.json", "a", BPP, PSNR, **{"psnr-b": [p - 1 for p in PSNR]}
        )
    )
    single = load_curve(
        write_results(
            tmp_path / "s.json", "single", BPP[:1], PSNR[:1], **{"psnr-b": PSNR[:1]}
        )
    )
    no_psnr_b = load_curve(write_results(tmp_path / "n.json", "plain", BPP, PSNR))
    table = bd_rate_table(anchor, [single, no_psnr_b], metrics=["psnr-rgb", "psnr-b"])
    assert table["rows"][0]["bd-rate"] == {"psnr-rgb": None, "psnr-b": None}
    assert table["rows"][1]["bd-rate"]["psnr-b"] is None
    assert table["notes"] == [
        f"single: 1 RD point, but a BD-rate needs at least {MIN_POINTS} per curve "
        f"(evaluate at least {MIN_POINTS} checkpoints or qualities)",
        f"plain: no psnr-b values in {tmp_path / 'n.json'}",
    ]
    assert format_table(table).endswith("\n- " + "\n- ".join(table["notes"]))


def test_an_anchor_with_too_few_points_is_one_note_for_the_whole_table(tmp_path):
    anchor = load_curve(write_results(tmp_path / "a.json", "a", BPP[:2], PSNR[:2]))
    tests = [
        load_curve(write_results(tmp_path / f"{k}.json", k, BPP, PSNR)) for k in "tu"
    ]
    table = bd_rate_table(anchor, tests, metrics=["psnr-rgb"])
    assert [row["bd-rate"] for row in table["rows"]] == [{"psnr-rgb": None}] * 2
    assert len(table["notes"]) == 1 and table["notes"][0].startswith("a: 2 RD points")


@pytest.mark.parametrize("command", ["plot", "bdrate"])
def test_an_existing_output_is_refused_unless_forced(capsys, tmp_path, command):
    results = write_results(tmp_path / "a.json", "a", BPP, PSNR)
    output = tmp_path / ("out.png" if command == "plot" else "out.md")
    output.write_text("earlier")
    argv = (
        ["plot", results]
        if command == "plot"
        else ["bdrate", "--anchor", results, results]
    )
    assert test_script.main(argv + ["-o", str(output)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"test.py: error: {output} exists; pass --force to overwrite"
    )
    assert output.read_bytes() == b"earlier"
    assert test_script.main(argv + ["-o", str(output), "--force"]) == 0
    assert output.read_bytes() != b"earlier"


def _with_images(path, dataset, images):
    document = json.loads(path.read_text())
    document["meta"] = {"dataset": dataset, "images": images}
    path.write_text(json.dumps(document))
    return str(path)


def test_results_on_other_images_than_the_anchor_give_no_number_and_a_note(tmp_path):
    """Evaluated with --max-images 1 against an anchor of 2 images: the BD-rate would
    compare different pictures, so its cells stay empty and the note says why."""
    write_results(tmp_path / "a.json", "anchor", BPP, PSNR)
    write_results(tmp_path / "t.json", "few", BPP, PSNR)
    write_results(tmp_path / "s.json", "same", [b * 0.9 for b in BPP], PSNR)
    anchor = load_curve(_with_images(tmp_path / "a.json", "Kodak", 2))
    few = load_curve(_with_images(tmp_path / "t.json", "Kodak", 1))
    same = load_curve(_with_images(tmp_path / "s.json", "Kodak", 2))
    table = bd_rate_table(anchor, [few, same], metrics=["psnr-rgb"])
    assert table["rows"][0]["bd-rate"] == {"psnr-rgb": None}
    assert table["rows"][1]["bd-rate"]["psnr-rgb"] == pytest.approx(-10, abs=1e-6)
    assert table["notes"] == [
        "few: measured on 1 image of Kodak, the anchor on 2 images of Kodak; "
        "evaluate both on the same images"
    ]


def test_a_dataset_named_by_config_or_by_folder_is_the_same_set_of_images(tmp_path):
    """--dataset Kodak records "Kodak", --dataset data/kodak the folder's "kodak": the
    same 24 images, so no note; a different count still gets one."""
    write_results(tmp_path / "a.json", "anchor", BPP, PSNR)
    write_results(tmp_path / "t.json", "folder", BPP, PSNR)
    write_results(tmp_path / "f.json", "few", BPP, PSNR)
    anchor = load_curve(_with_images(tmp_path / "a.json", "Kodak", 24))
    folder = load_curve(_with_images(tmp_path / "t.json", "kodak", 24))
    few = load_curve(_with_images(tmp_path / "f.json", "kodak", 1))
    table = bd_rate_table(anchor, [folder, few], metrics=["psnr-rgb"])
    assert table["rows"][0]["bd-rate"]["psnr-rgb"] == pytest.approx(0, abs=1e-9)
    assert table["rows"][1]["bd-rate"] == {"psnr-rgb": None}
    assert table["notes"] == [
        "few: measured on 1 image of kodak, the anchor on 24 images of Kodak; "
        "evaluate both on the same images"
    ]


@pytest.mark.parametrize("images", [float("inf"), float("nan"), 2.5])
def test_an_image_count_that_is_not_a_whole_number_is_unknown(tmp_path, images):
    """json reads Infinity and NaN: int() of them raised OverflowError or a ValueError
    that named no file. Such a count says nothing, as if the file had none."""
    anchor = load_curve(write_results(tmp_path / "a.json", "anchor", BPP, PSNR))
    write_results(tmp_path / "t.json", "t", BPP, PSNR)
    test = load_curve(_with_images(tmp_path / "t.json", "Kodak", images))
    assert test.image_set == ("Kodak", None)
    table = bd_rate_table(anchor, [test], metrics=["psnr-rgb"])
    assert table["rows"][0]["bd-rate"]["psnr-rgb"] == pytest.approx(0, abs=1e-9)
    assert table["notes"] == []  # neither file gives a count: nothing to tell


def _published(path, name, bpp, psnr, **top):
    """A results file like the shipped anchors: ``dataset`` at top level, no meta."""
    document = {"name": name, "results": {"bpp": bpp, "psnr-rgb": psnr}, **top}
    path.write_text(json.dumps(document))
    return str(path)


@pytest.mark.parametrize(
    "anchor_set, ours, note",
    [
        (  # a file with no count at all, against ours of 1 image
            {},
            ("Kodak", 1),
            "t: measured on 1 image of Kodak, the anchor on an unknown number of "
            "images; the anchor does not say how many images it was measured on, so "
            "this BD-rate may compare different images",
        ),
        (  # test.py --dataset /data/Kodak24 names its results after the folder
            {"dataset": "kodak", "images": 24},
            ("Kodak24", 24),
            "t: measured on 24 images of Kodak24, the anchor on 24 images of kodak; "
            "the datasets are named differently, so this BD-rate may compare "
            "different images",
        ),
    ],
)
def test_images_that_may_differ_from_the_anchors_keep_the_number_with_a_note(
    tmp_path, anchor_set, ours, note
):
    """Nothing proves the images differ, nothing shows they are the same: the row
    says so instead of giving a silent number (or, for a folder's name, no number)."""
    anchor = load_curve(_published(tmp_path / "a.json", "A", BPP, PSNR, **anchor_set))
    write_results(tmp_path / "t.json", "t", BPP, PSNR)
    test = load_curve(_with_images(tmp_path / "t.json", *ours))
    table = bd_rate_table(anchor, [test], metrics=["psnr-rgb"])
    assert table["rows"][0]["bd-rate"]["psnr-rgb"] == pytest.approx(0, abs=1e-9)
    assert table["notes"] == [note]
    assert f"- {note}" in format_table(table)


def test_a_published_anchors_top_level_image_set_is_read(tmp_path):
    """hm.json names its image set at top level only; meta (test.py's) wins over it."""
    assert load_curve(os.path.join(ANCHORS, "hm.json")).image_set == ("kodak", 24)
    both = _published(tmp_path / "b.json", "B", BPP, PSNR, dataset="x", images=9)
    assert load_curve(_with_images(tmp_path / "b.json", "Kodak", 2)).image_set == (
        "Kodak",
        2,
    )
    assert load_curve(both).image_set == ("Kodak", 2)


@pytest.mark.parametrize("name", sorted(os.listdir(ANCHORS)))
def test_every_shipped_anchor_names_its_dataset_and_image_count(name):
    """Without both, a BD-rate of a --max-images subset against it cannot be
    refused."""
    image_set = load_curve(os.path.join(ANCHORS, name)).image_set
    assert image_set is not None and None not in image_set


def test_a_subset_against_a_published_anchor_is_never_a_silent_number(capsys, tmp_path):
    """The walkthrough's case: `test.py checkpoint --max-images 2` against hm.json
    gave a number and no note. Its row is now empty, with a note naming both sides,
    while two published anchors compare as before."""
    hm = os.path.join(ANCHORS, "hm.json")
    with open(os.path.join(ANCHORS, "vtm.json")) as handle:
        vtm = json.load(handle)
    ours = tmp_path / "results.json"
    ours.write_text(
        json.dumps(
            {
                "name": "cps",
                "meta": {"dataset": "Kodak", "images": 2},
                "results": vtm["results"],
            }
        )
    )
    argv = ["bdrate", "--anchor", hm, str(ours), os.path.join(ANCHORS, "vtm.json")]
    assert test_script.main(argv + ["--metrics", "psnr-rgb"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [row["bd-rate"]["psnr-rgb"] is not None for row in table["rows"]] == [
        False,
        True,
    ]
    assert table["notes"] == [
        "cps: measured on 2 images of Kodak, the anchor on 24 images of kodak; "
        "evaluate both on the same images"
    ]


def test_an_anchor_known_to_cover_other_images_blanks_the_row(tmp_path):
    """A top-level count counts as the file saying so: a different count (whatever
    the dataset) gives no number; a different dataset name alone (it may be a
    folder's) keeps the number, with a note."""
    counted = load_curve(
        _published(tmp_path / "a.json", "A", BPP, PSNR, dataset="kodak", images=3)
    )
    clic = load_curve(_published(tmp_path / "c.json", "C", BPP, PSNR, dataset="CLIC"))
    write_results(tmp_path / "t.json", "few", BPP, PSNR)
    few = load_curve(_with_images(tmp_path / "t.json", "Kodak", 2))
    write_results(tmp_path / "s.json", "same", BPP, PSNR)
    same = load_curve(_with_images(tmp_path / "s.json", "Kodak", 3))
    table = bd_rate_table(counted, [few, same], metrics=["psnr-rgb"])
    assert table["rows"][0]["bd-rate"] == {"psnr-rgb": None}
    assert table["rows"][1]["bd-rate"]["psnr-rgb"] == pytest.approx(0, abs=1e-9)
    assert table["notes"] == [
        "few: measured on 2 images of Kodak, the anchor on 3 images of kodak; "
        "evaluate both on the same images"
    ]
    table = bd_rate_table(clic, [same], metrics=["psnr-rgb"])
    assert table["rows"][0]["bd-rate"]["psnr-rgb"] == pytest.approx(0, abs=1e-9)
    assert table["notes"] == [
        "same: measured on 3 images of Kodak, the anchor on an unknown number of "
        "images of CLIC; the anchor does not say how many images it was measured on "
        "and the datasets are named differently, so this BD-rate may compare "
        "different images"
    ]


def test_a_row_whose_count_or_dataset_is_unknown_against_ours_has_a_note(tmp_path):
    """Our file as the anchor and a published one as the row, or equal counts where a
    file names no dataset: the number stays, with a note saying what is unknown."""
    write_results(tmp_path / "a.json", "ours", BPP, PSNR)
    ours = load_curve(_with_images(tmp_path / "a.json", "Kodak", 3))
    published = load_curve(
        _published(tmp_path / "p.json", "P", BPP, PSNR, dataset="kodak")
    )
    nameless = load_curve(_published(tmp_path / "n.json", "N", BPP, PSNR, images=3))
    table = bd_rate_table(ours, [published, nameless], metrics=["psnr-rgb"])
    assert [row["bd-rate"]["psnr-rgb"] for row in table["rows"]] == [
        pytest.approx(0, abs=1e-9),
        pytest.approx(0, abs=1e-9),
    ]
    assert table["notes"] == [
        "P: measured on an unknown number of images of kodak, the anchor on 3 "
        "images of Kodak; P does not say how many images it was measured on, so "
        "this BD-rate may compare different images",
        "N: measured on 3 images, the anchor on 3 images of Kodak; N does not say "
        "its dataset, so this BD-rate may compare different images",
    ]
