"""The benchmark harness runs end to end on tiny models and produces its report (no timing assertions)."""

from __future__ import annotations

import json
import statistics

import pytest

from benchmarks.run import RATIOS, VARIANTS, Config, main, run

TINY = ["--width", "4", "--batch", "4", "--steps", "1", "--rounds", "2", "--warmup", "1",
        "--specs", "specs/quickstart.xspec", "--spec-repeats", "1", "--no-cold"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One tiny run of every variant through the command-line entry point, with its JSON and markdown."""
    out = tmp_path_factory.mktemp("bench") / "report.json"
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        returned = main([*TINY, "--variants", ",".join(VARIANTS), "--json", str(out)])
    return returned, json.loads(out.read_text()), text.getvalue()


def test_report_has_every_variant_with_times_memory_and_flops(bench):
    _, report, _ = bench
    assert set(report["variants"]) == set(VARIANTS)
    for name, row in report["variants"].items():
        assert row["samples"] == 2, name
        assert 0 < row["q1_s"] <= row["median_s"] <= row["q3_s"], name
        assert row["median_s"] == pytest.approx(statistics.median(row["wall_samples_s"])), name
        assert row["steps_per_s"] == pytest.approx(1 / row["median_s"])
        assert row["samples_per_s"] == pytest.approx(4 / row["median_s"])
        assert row["peak_mem_mib"] is not None and row["flops_per_step"] > 0, name
    # the same computation on both sides: equal FLOPs per step
    flops = {n: r["flops_per_step"] for n, r in report["variants"].items()}
    assert flops["xml-xdsl-alternating"] == flops["xml-hand-alternating"]
    assert flops["xml-xdsl-simultaneous"] < flops["xml-hand-alternating"]  # one shared forward


def test_xdsl_and_hand_written_steps_were_verified_equal(bench):
    _, report, _ = bench
    checked = {v["xdsl"]: v for v in report["verification"]}
    assert set(checked) == {n for n, v in VARIANTS.items() if v.author == "xdsl" and not v.eager}
    for name, v in checked.items():
        assert v["equal"], f"{name}: {v['error']}"
        assert v["checked"] > 0


def test_ratios_and_spec_compile_times_are_reported(bench):
    returned, report, text = bench
    assert [r["label"] for r in report["ratios"]] == [label for label, *_ in RATIOS]
    targets = {label: target for label, _, _, target in RATIOS}
    for r in report["ratios"]:  # each ratio is recomputed from the variants' own per-round samples
        wall = report["variants"]
        per_round = [a / b for a, b in zip(wall[r["numerator"]]["wall_samples_s"],
                                           wall[r["denominator"]]["wall_samples_s"])]
        assert r["median"] == pytest.approx(statistics.median(per_round))
        assert r["q1"] <= r["median"] <= r["q3"] and r["cpu_median"] > 0
        assert r["target"] == targets[r["label"]]
        assert r["met"] == (None if r["target"] is None else r["median"] <= r["target"])
    (row,) = report["spec_compile"]
    assert row["spec"] == "specs/quickstart.xspec" and row["warm_total_s"] > 0 and row["cold_s"] is None
    assert returned["config"] == report["config"] and report["machine"]["torch"]
    for heading in ("| variant | median ms/step", "| ratio (per round, side by side)", "| spec -> graph"):
        assert heading in text


def test_the_harness_command_line_times_the_named_variants_and_writes_its_report(tmp_path, capsys):
    """`python -m benchmarks.run ARGS` (the harness lives in the repository, not in the installed `xdsl`):
    the named variants are timed and reported."""
    out = tmp_path / "report.json"
    args = ["--width", "2", "--batch", "4", "--steps", "1", "--rounds", "1", "--warmup", "1",
            "--specs", "none", "--no-memory", "--no-flops", "--no-verify",
            "--variants", "dml-xdsl-alternating,dml-hand-alternating", "--json", str(out)]
    main(args)
    output = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"dml-xdsl-alternating", "dml-hand-alternating"}
    assert report["config"]["batch"] == 4 and report["config"]["width"] == 2
    (ratio,) = report["ratios"]
    assert ratio["label"] == "DML alternating: xdsl / hand-written" and ratio["median"] > 0
    assert "| DML alternating: xdsl / hand-written |" in output


def test_the_installed_command_has_no_bench():
    from typer.testing import CliRunner

    from xdsl.cli import app

    result = CliRunner().invoke(app, ["bench"])
    assert result.exit_code != 0 and "No such command" in result.output


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variants"):
        run(Config(variants=("xml-nope",), specs=()))


def _without_views(ops: dict[str, int]) -> dict[str, int]:
    """Op counts less `detach` (a view: xdsl's loss primitives detach their targets unconditionally)."""
    return {op: n for op, n in ops.items() if op != "aten.detach"}


def test_generated_steps_run_the_same_aten_ops_as_hand_written(bench):
    _, report, _ = bench
    ops = {n: r["aten_ops"] for n, r in report["variants"].items()}
    for xdsl, hand in (("xml-xdsl-alternating", "xml-hand-alternating"),
                       ("dml-xdsl-alternating", "dml-hand-alternating")):
        assert _without_views(ops[xdsl]) == _without_views(ops[hand])


def test_torchvision_parts_add_residuals_in_place_like_the_model(tmp_path):
    """fx records `out += identity` as an out-of-place add unless told otherwise: 48 extra tensors a step."""
    import torch

    from benchmarks.run import build_runners, count_work

    cfg = Config(model="torchvision.resnet18", input=(3, 16, 16), batch=2)
    names = ["xml-xdsl-alternating", "xml-hand-alternating"]
    runners = build_runners(cfg, names, torch.device("cpu"), tmp_path)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    _, ops = count_work(runners, x, y)
    assert ops[names[0]]["aten.add_"] == ops[names[1]]["aten.add_"] > 0
    assert _without_views(ops[names[0]]) == _without_views(ops[names[1]])


@pytest.mark.slow
def test_compiled_run_reports_compiles_and_no_recompilation_while_timing(tmp_path):
    """--compile --fullgraph: each xdsl objective compiles once in warm-up, nothing recompiles in the
    timed loop, and the eager twin gives the compile speedup ratio."""
    import contextlib
    import io

    variants = "xml-xdsl-alternating,xml-xdsl-alternating-eager"
    with contextlib.redirect_stdout(io.StringIO()):
        report = main(["--width", "2", "--batch", "4", "--steps", "1", "--rounds", "2", "--warmup", "2",
                       "--specs", "none", "--no-memory", "--no-flops", "--compile", "--fullgraph",
                       "--variants", variants])
    warm = report["compile"]["warmup"]
    assert warm["xml-xdsl-alternating"]["graphs"] == 2  # one generated objective per network
    assert warm["xml-xdsl-alternating-eager"]["graphs"] == 0
    assert report["compile"]["during_timing"] == {"frames_compiled": 0, "graphs": 0, "graph_breaks": 0}
    labels = {r["label"] for r in report["ratios"]}
    assert "XML alternating, xdsl: torch.compile / eager" in labels
    (checked,) = report["verification"]
    assert checked["equal"]


def test_profile_writes_a_chrome_trace_per_variant_and_lists_top_ops(tmp_path):
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        report = main(["--width", "2", "--batch", "4", "--steps", "1", "--rounds", "1", "--warmup", "1",
                       "--specs", "none", "--no-memory", "--no-flops", "--no-verify",
                       "--variants", "xml-xdsl-alternating,xml-hand-alternating", "--profile", str(tmp_path)])
    for name in ("xml-xdsl-alternating", "xml-hand-alternating"):
        prof = report["profile"][name]
        trace = json.loads((tmp_path / f"{name}.json").read_text())
        assert trace["traceEvents"] and prof["trace"] == str(tmp_path / f"{name}.json")
        ops = [t["op"] for t in prof["top"]]
        assert any("convolution" in op for op in ops)
        assert all(t["self_ms_per_step"] >= 0 and t["calls"] > 0 for t in prof["top"])
        assert f"Profile of {name}" in text.getvalue()
