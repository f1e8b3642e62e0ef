"""Smoke test of the input-pipeline benchmark: it runs, times both paths, and reports every row.

It never checks a time (the machine is shared); BENCHMARKS.md has the measured numbers.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.data import main


@pytest.mark.slow
def test_data_benchmark_reports_both_paths_for_every_configuration(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = main(["--rounds", "1", "--images", "64", "--sizes", "32,64", "--batches", "32", "--threads", "1",
                   "--epoch-images", "100", "--epoch-rounds", "1", "--json", str(out)])
    rows = result["rows"]
    # 2 sizes x 1 batch x 1 thread, then the 2-worker per-sample row and the resized-crop row
    assert [(r["size"], r["crop"], r["per_sample_workers"]) for r in rows] == [
        (32, "pad", 0), (64, "pad", 0), (32, "pad", 2), (64, "resized", 0)]
    assert all(r["per_sample"] > 0 and r["batched"] > 0 and r["ratio"] > 0 for r in rows)
    assert [e["per_sample_workers"] for e in result["epochs"]] == [0, 2]
    assert all(e["per_sample_s"] > 0 and e["batched_s"] > 0 for e in result["epochs"])
    assert json.loads(out.read_text()) == result
    report = capsys.readouterr().out
    assert report.count("| 32x32 | pad |") == 2 and "| 64x64 | resized |" in report and "tiny-model epoch" in report
