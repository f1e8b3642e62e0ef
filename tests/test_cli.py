"""The command line: check / expand / compile / graph on the shipped quickstart spec."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xdsl.cli import app
from xdsl.lang.check import check
from xdsl.lang.parser import parse

QUICKSTART = str(Path(__file__).resolve().parent.parent / "specs" / "quickstart.xspec")
runner = CliRunner()


def test_check_reports_what_it_found():
    result = runner.invoke(app, ["check", QUICKSTART])
    assert result.exit_code == 0, result.output
    assert "2 networks, 4 parts" in result.output and "3 train blocks" in result.output


def test_expand_prints_a_spec_that_checks_clean():
    result = runner.invoke(app, ["expand", QUICKSTART])
    assert result.exit_code == 0
    assert "train independent {" in result.output and "loss dml(s, T) =" in result.output
    program = check(parse(result.output))
    assert [s.name for s in program.stages] == ["independent", "dml", "xml"]


def test_compile_json_lists_parts_paths_and_terms():
    result = runner.invoke(app, ["compile", "--json", QUICKSTART])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    parts = {(p["network"], p["part"]): p for p in data["parts"]}
    assert parts[("net1", "up")]["output_shape"] == [32, 4, 4]
    assert parts[("net1", "up")]["params"] + parts[("net1", "down")]["params"] == 75_002
    paths = {p["path"]: p for p in data["paths"]}
    assert paths["net1.up >> net2.down"]["output_shape"] == [10]
    xml = next(s for s in data["train"] if s["name"] == "xml")
    assert len(xml["objectives"]["net1"]["terms"]) == 6


def test_compile_code_shows_the_generated_objectives():
    result = runner.invoke(app, ["compile", "--code", QUICKSTART])
    assert result.exit_code == 0
    assert "def forward(self, x, y" in result.output and "xdsl_losses_kl" in result.output
    assert "call_detached" not in result.output
    separable = runner.invoke(app, ["compile", "--code", "--separable", QUICKSTART])
    assert separable.exit_code == 0 and "xdsl_compile_lower_call_detached" in separable.output


def test_graph_formats(tmp_path):
    dot = runner.invoke(app, ["graph", QUICKSTART])
    assert dot.exit_code == 0 and dot.output.startswith("digraph xdsl {")
    mermaid = runner.invoke(app, ["graph", QUICKSTART, "--format", "mermaid"])
    assert mermaid.output.startswith("flowchart LR")
    png = tmp_path / "g.png"
    result = runner.invoke(app, ["graph", QUICKSTART, "--format", "png", "--out", str(png)])
    assert result.exit_code == 0, result.output
    if shutil.which("dot"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # no Graphviz: it says so and writes the texts instead of an unreadable drawing
        assert "Graphviz is not installed" in result.output and not png.exists()
        assert (tmp_path / "g.dot").read_text().startswith("digraph xdsl {")
        assert (tmp_path / "g.mmd").read_text().startswith("flowchart LR")


def test_graph_image_is_never_written_beside_the_spec(tmp_path, monkeypatch):
    spec = tmp_path / "specs" / "q.xspec"
    spec.parent.mkdir()
    spec.write_text(Path(QUICKSTART).read_text())
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["graph", str(spec), "--format", "svg"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in spec.parent.iterdir()} == {"q.xspec"}
    assert list((tmp_path / "runs").glob("q-graph.*"))


def test_spec_errors_exit_with_code_2_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.xspec"
    bad.write_text("network a = builtin.cnn()\ntrain { minimize ce(b, y) wrt a }\n")
    result = runner.invoke(app, ["check", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:2:21: error: undefined name 'b'" in result.output
    assert "Traceback" not in result.output


def test_unknown_compile_mode_is_a_clear_error_before_training(tmp_path):
    result = runner.invoke(app, ["run", "specs/quickstart.xspec", "--compile", "--compile-mode", "fastest",
                                 "--out", str(tmp_path / "run"), "--epochs", "1", "-q"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "unknown torch.compile mode 'fastest'" in result.output and "max-autotune" in result.output
    assert not list((tmp_path / "run").glob("**/*.pt"))


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed"), (["--seed", str(2**32)], "--seed"), (["--seeds", "0"], "--seeds"),
    (["--threads", "0"], "--threads"), (["--nproc", "-1"], "--nproc"),
    (["--device", "tpu"], "--device tpu: not a device torch knows"),
])
def test_out_of_range_run_flags_are_clear_errors_before_anything_runs(flags, message, tmp_path):
    """Each once ended in a traceback (numpy's seed range, torch.device) or ran nothing and exited 0."""
    spec = tmp_path / "s.xspec"
    spec.write_text("data digits(batch_size=32)\nnetwork a = builtin.mlp(num_classes=10, in_features=64)\n"
                    "independent(a, epochs=1)\n")
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "run"), "-q", *flags])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "results.json").exists()
