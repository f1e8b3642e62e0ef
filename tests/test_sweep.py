"""`xdsl sweep`: a grid of --set values x seeds, one run directory each, checked before anything runs,
finished runs skipped on --resume, mean +/- std over seeds per configuration and block, best marked."""

from __future__ import annotations

import csv
import importlib.util
import json
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xdsl.cli import app
from xdsl.errors import XdslError
from xdsl.sweep.grid import configurations, parse_grid, read_grid_file

SPEC = """data digits(batch_size=32, train_fraction=0.2)
network a, b = builtin.cnn(num_classes=10, in_channels=1, width=4)
independent(a, b, epochs=1, optimizer=adam(lr=3e-3))
dml(a, b, epochs=1, optimizer=adam(lr=3e-3))
"""
LRS = ["1e-3", "1e-2"]
HAS_SUBMITIT = importlib.util.find_spec("submitit") is not None
runner = CliRunner(env={"COLUMNS": "200"})


def test_grid_values_split_on_commas_outside_brackets() -> None:
    grid = parse_grid(["lr=1e-3, 3e-3", "ms=[30,60],[60,90]", "data.batch_size=32"])
    assert grid == {"lr": ["1e-3", "3e-3"], "ms": ["[30,60]", "[60,90]"], "data.batch_size": ["32"]}
    names = [c.name for c in configurations(grid)]
    assert names == ["lr=1e-3,ms=_30,60_,data.batch_size=32", "lr=1e-3,ms=_60,90_,data.batch_size=32",
                     "lr=3e-3,ms=_30,60_,data.batch_size=32", "lr=3e-3,ms=_60,90_,data.batch_size=32"]


@pytest.mark.parametrize("item", ["lr", "=1,2", "lr=1,,2", "lr=1,1"])
def test_malformed_grid_option_is_a_clear_error(item: str) -> None:
    with pytest.raises(XdslError):
        parse_grid([item])


def test_grid_file_as_lines_or_json(tmp_path: Path) -> None:
    lines = tmp_path / "grid.txt"
    lines.write_text("# learning rates\nlr=1e-3,3e-3\nepochs=2  # short\n")
    as_json = tmp_path / "grid.json"
    as_json.write_text('{"lr": [0.001, 0.003], "epochs": 2}')
    assert read_grid_file(lines) == {"lr": ["1e-3", "3e-3"], "epochs": ["2"]}
    assert read_grid_file(as_json) == {"lr": ["0.001", "0.003"], "epochs": ["2"]}


@pytest.mark.parametrize("grid, message", [
    (["lr=1e-3,-1"], "configuration lr=-1: lr must be a number > 0, got -1"),
    (["bogus=1,2"], "unknown train setting 'bogus'"),
    (["data.colour=1"], "dataset 'digits' has no parameter 'colour'"),
])
def test_bad_grid_value_fails_before_any_run(tmp_path: Path, grid: list[str], message: str) -> None:
    spec = tmp_path / "s.xspec"
    spec.write_text(SPEC)
    out = tmp_path / "sweep"
    args = ["sweep", str(spec), "--out", str(out)] + [x for g in grid for x in ("--grid", g)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()  # checked before the sweep directory is even made


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory) -> tuple[Path, Path, str]:
    """2 learning rates x 2 seeds on the local launcher, 2 at a time: (spec, sweep directory, output)."""
    home = tmp_path_factory.mktemp("sweep")
    spec = home / "tiny.xspec"
    spec.write_text(SPEC)
    out = home / "sweep"
    result = runner.invoke(app, ["sweep", str(spec), "--grid", "lr=" + ",".join(LRS), "--seeds", "2",
                                 "--jobs", "2", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return spec, out, result.output


def _accuracy(results: dict, block: str) -> dict[str, float]:
    item = next(i for i in results["stages"][block]["evaluate"]["items"] if i["kind"] == "accuracy")
    return {r["label"]: r["accuracy"] for r in item["rows"]}


def test_every_configuration_and_seed_is_its_own_run_with_its_settings(local_sweep) -> None:
    _, out, _ = local_sweep
    for lr in LRS:
        for seed in (0, 1):
            run = out / f"lr={lr}" / f"seed{seed}"
            results = json.loads((run / "results.json").read_text())
            assert results["seed"] == seed
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert {r["lr"] for r in rows} == {float(lr)}  # the grid value reached the optimiser


def test_sweep_table_is_mean_and_std_over_seeds_with_the_best_marked(local_sweep) -> None:
    _, out, output = local_sweep
    data = json.loads((out / "sweep.json").read_text())
    assert [(r["config"], r["block"]) for r in data["rows"]] == [
        (f"lr={lr}", block) for block in ("independent", "dml") for lr in LRS]
    for row in data["rows"]:
        per_seed = [_accuracy(json.loads((out / row["config"] / f"seed{s}" / "results.json").read_text()),
                              row["block"]) for s in (0, 1)]
        for net in ("a", "b"):
            values = [p[net] for p in per_seed]
            assert row["cells"][net]["mean"] == pytest.approx(100 * statistics.mean(values))
            assert row["cells"][net]["std"] == pytest.approx(100 * statistics.stdev(values))
        assert row["score"] == pytest.approx(statistics.mean(row["cells"][n]["mean"] for n in "ab") / 100)
    for block in ("independent", "dml"):
        rows = [r for r in data["rows"] if r["block"] == block]
        assert [r["best"] for r in rows] == [r["score"] == max(x["score"] for x in rows) for r in rows]
    with open(out / "sweep.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 4 and {ln["lr"] for ln in lines} == set(LRS)
    assert float(lines[0]["a mean"]) == pytest.approx(data["rows"][0]["cells"]["a"]["mean"], abs=1e-4)
    first = data["rows"][0]
    cell = f"{first['cells']['a']['mean']:.2f} ± {first['cells']['a']['std']:.2f}"
    assert cell in output and "* = best configuration" in output


def test_existing_sweep_directory_needs_resume(local_sweep) -> None:
    spec, out, _ = local_sweep
    result = runner.invoke(app, ["sweep", str(spec), "--grid", "lr=" + ",".join(LRS), "--out", str(out)])
    assert result.exit_code == 2 and "pass --resume" in result.output


@pytest.mark.skipif(not HAS_SUBMITIT, reason="submitit is not installed (pip install 'xdsl-distill[sweep]')")
def test_resume_skips_finished_runs_and_submitit_runs_the_rest(local_sweep) -> None:
    spec, out, _ = local_sweep
    missing = out / f"lr={LRS[1]}" / "seed1" / "results.json"
    before = json.loads(missing.read_text())
    missing.unlink()
    result = runner.invoke(app, ["sweep", str(spec), "--grid", "lr=" + ",".join(LRS), "--seeds", "2",
                                 "--out", str(out), "--resume", "--launcher", "submitit", "--cluster", "local",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "3 finished (skipped)" in result.output and f"[1/1] lr={LRS[1]}/seed1 done" in result.output
    assert list((out / "submitit").glob("*_result.pkl"))  # it went through submitit's executor
    again = json.loads(missing.read_text())  # resumed from its finished checkpoint: same numbers
    assert _accuracy(again, "dml") == _accuracy(before, "dml")


def test_local_launcher_gives_each_process_its_own_gpus(tmp_path: Path, monkeypatch) -> None:
    """With 4 visible GPUs and 2-process runs, two runs at a time, each on its own pair."""
    import threading
    import time

    from xdsl.sweep import launch

    seen: list[str] = []
    running, most = set(), [0]
    lock = threading.Lock()

    def fake_run(cmd, log, env=None):
        with lock:
            gpus = env["CUDA_VISIBLE_DEVICES"]
            assert gpus not in running  # never two runs on the same GPUs
            running.add(gpus)
            seen.append(gpus)
            most[0] = max(most[0], len(running))
        time.sleep(0.2)
        with lock:
            running.discard(gpus)
        return 0

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setattr(launch, "_run_logged", fake_run)
    jobs = [launch.Job(f"c{i}", tmp_path / f"c{i}", ["spec"], nproc=2) for i in range(4)]
    codes = launch.launch_local(jobs, parallel=8, on_done=lambda job, code: None)
    assert codes == {f"c{i}": 0 for i in range(4)}
    assert sorted(seen) == ["0,1", "0,1", "2,3", "2,3"] and most[0] == 2
    assert launch.run_command(jobs[0])[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
