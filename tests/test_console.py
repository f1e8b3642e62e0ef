"""Terminal output that survives a log file: off a terminal, tables print whole (no `…`, no wrapped
rows) and epoch lines stay one line; `-q` still prints the final results table."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from xdsl.cli import app
from xdsl.eval.summary import print_run_summary

LONG = "a_network_with_a_rather_long_descriptive_name"
SPEC = f"""data digits(batch_size=64, train_fraction=0.1)
network {LONG}, other_network_with_a_long_name = builtin.cnn(num_classes=10, in_channels=1, width=4)
dml({LONG}, other_network_with_a_long_name, epochs=1, optimizer=adam(lr=3e-3))
"""


def _results(seed: int, acc: float) -> dict:
    rows = [{"path": f"{LONG}{i}", "label": f"{LONG}{i}", "accuracy": acc} for i in range(6)]
    return {"seed": seed, "stages": {f"block_{b}": {"best": {}, "evaluate": {"items": [
        {"kind": "accuracy", "rows": rows}]}} for b in range(2)}}


def test_a_wide_table_prints_whole_when_stdout_is_not_a_terminal(capsys) -> None:
    print_run_summary([_results(0, 0.9499), _results(1, 0.9312)])
    out = capsys.readouterr().out
    assert "…" not in out
    header = next(ln for ln in out.splitlines() if "┃" in ln)
    assert all(f"{LONG}{i}" in header for i in range(6))
    row = [ln for ln in out.splitlines() if "block_0" in ln]
    assert len(row) == 1 and row[0].count("94.06 ± 1.32") == 6  # a row is one line, every cell whole


def test_epoch_lines_are_not_wrapped_and_quiet_keeps_the_results_table(tmp_path: Path) -> None:
    spec = tmp_path / "long.xspec"
    spec.write_text(SPEC)
    runner = CliRunner(env={"COLUMNS": "80"})
    result = runner.invoke(app, ["run", str(spec), "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    epoch = [ln for ln in result.output.splitlines() if "epoch 1/1" in ln]
    assert len(epoch) == 1 and epoch[0].endswith("s)") and "other_network_with_a_long_name acc" in epoch[0]
    quiet = runner.invoke(app, ["run", str(spec), "--out", str(tmp_path / "q"), "--device", "cpu", "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert "epoch 1/1" not in quiet.output
    table = [ln for ln in quiet.output.splitlines() if ln.startswith("│ dml")]
    assert len(table) == 1 and f"{LONG} best" in quiet.output
