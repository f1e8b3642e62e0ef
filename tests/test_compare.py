"""`xdsl compare`: one table across run and sweep directories, blocks and columns aligned, blanks where a
run lacks a column; `--plot` draws their learning curves on shared axes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from typer.testing import CliRunner

from xdsl.cli import app

runner = CliRunner()


def _block(accs: dict[str, float], cross: dict[str, float] | None = None) -> dict:
    items = [{"kind": "accuracy", "rows": [{"path": n, "label": n, "accuracy": a} for n, a in accs.items()]}]
    if cross:
        items.append({"kind": "xross", "parts": ["up", "down"], "networks": ["net1", "net2"], "rows": [
            {"networks": k.split(">>"), "accuracy": v, "params": 10} for k, v in cross.items()]})
    return {"best": {}, "evaluate": {"items": items}}


def _run(path: Path, stages: dict[str, dict], seed: int = 0) -> None:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"spec": "s.xspec", "seed": seed, "stages": stages}))
    rows = [{"stage": s, "epoch": e, "network": n, "train_loss": 1.0 / e, "test_acc": 0.3 * e, "trained": True}
            for s in stages for e in (1, 2, 3) for n in ("net1", "net2")]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_aligns_blocks_and_columns_and_leaves_missing_cells_blank(tmp_path: Path) -> None:
    _run(tmp_path / "xml_run", {"dml": _block({"net1": 0.9, "net2": 0.8}),
                                "xml": _block({"net1": 0.95, "net2": 0.85}, {"net1>>net2": 0.7})})
    seeds = tmp_path / "seeds_run"
    _run(seeds / "seed0", {"dml": _block({"net1": 0.90, "net2": 0.70})})
    _run(seeds / "seed1", {"dml": _block({"net1": 0.92, "net2": 0.72}, {"net1>>net2": 0.1})}, seed=1)
    (seeds / "results.json").write_text(json.dumps({"seeds": [
        json.loads((seeds / f"seed{s}" / "results.json").read_text()) for s in (0, 1)]}))
    plot = tmp_path / "curves.png"
    result = runner.invoke(app, ["compare", str(tmp_path / "xml_run"), str(seeds), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    lines = {tuple(c.strip() for c in ln.split("│")[1:-1]) for ln in result.output.splitlines() if "│" in ln}
    header = next(ln for ln in result.output.splitlines() if "┃" in ln)
    assert [c.strip() for c in header.split("┃")[1:-1]] == ["run", "train block", "seeds", "net1", "net2",
                                                             "net1>>net2"]
    assert ("xml_run", "dml", "1", "90.00", "80.00", "") in lines       # no xross in that block: blank
    assert ("xml_run", "xml", "1", "95.00", "85.00", "70.00") in lines
    assert ("seeds_run", "dml", "2", "91.00 ± 1.41", "71.00 ± 1.41", "10.00") in lines  # one seed has it
    if importlib.util.find_spec("matplotlib"):
        assert plot.read_bytes()[:4] == b"\x89PNG"


def test_compare_of_a_directory_that_is_no_run_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["compare", str(tmp_path)])
    assert result.exit_code == 2
    assert "is neither a finished run directory (results.json) nor a sweep (plan.json)" in result.output
