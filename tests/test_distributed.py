"""Data-parallel training under torchrun (gloo, CPU): 2 processes == 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SPEC = """data synthetic(num_classes=10, shape=[1, 8, 8], train_size=128, test_size=64, batch_size=32)
network net1, net2 = builtin.mlp(num_classes=10, in_features=64, hidden=32)
cut net1, net2 at "layer1" into up, down
xml(net1, net2, epochs=2, optimizer=sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4))
dml(net1, net2, epochs=1, order=simultaneous, optimizer=sgd(lr=0.1))
evaluate accuracy, xross(net1, net2), ensemble(net1, net2), entropy, flatness(sigmas=[0.0, 0.1], draws=2)
"""


def _torchrun(nproc: int, spec, out, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "xdsl", "run", str(spec), "--out", str(out), "--quiet", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_processes_match_one_process_losses_and_weights(tmp_path):
    spec = tmp_path / "ddp.xspec"
    spec.write_text(SPEC)
    one, two = tmp_path / "one", tmp_path / "two"
    for nproc, out in ((1, one), (2, two)):
        proc = _torchrun(nproc, spec, out)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for block in ("xml", "dml"):  # alternating (DDP-wrapped objectives) and simultaneous (all_reduce)
        a = torch.load(one / "checkpoints" / block / "final.pt", weights_only=True)["modules"]
        b = torch.load(two / "checkpoints" / block / "final.pt", weights_only=True)["modules"]
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    import json

    rows_one = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_one) == len(rows_two)  # rank 0 alone writes metrics
    for a, b in zip(rows_one, rows_two):  # test accuracy gathered over both processes' shards
        assert (a["stage"], a["epoch"], a["network"]) == (b["stage"], b["epoch"], b["network"])
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1 / 64)
    # the evaluate clause: shard-evaluated items merged across processes equal the 1-process numbers
    res_one = json.loads((one / "results.json").read_text())["stages"]
    res_two = json.loads((two / "results.json").read_text())["stages"]
    for block in ("xml", "dml"):
        items_one, items_two = res_one[block]["evaluate"]["items"], res_two[block]["evaluate"]["items"]
        assert [i["kind"] for i in items_one] == [i["kind"] for i in items_two]
        for a, b in zip(items_one, items_two):
            for ra, rb in zip(a.get("rows", []) + a.get("members", []), b.get("rows", []) + b.get("members", [])):
                assert ra["path"] == rb["path"]
                assert ra["accuracy"] == pytest.approx(rb["accuracy"], abs=1 / 64)
                assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-5)
            if a["kind"] == "ensemble":
                assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1 / 64)
    assert not list(two.glob("**/*rank1*"))


def test_nproc_option_relaunches_under_torchrun():
    from xdsl.train.distributed import launch_torchrun

    calls = []
    import xdsl.train.distributed as d

    original = d.subprocess.call
    d.subprocess.call = lambda cmd: calls.append(cmd) or 0
    try:
        assert launch_torchrun(2, ["xdsl", "run", "s.xspec", "--nproc", "2", "--epochs", "1"]) == 0
    finally:
        d.subprocess.call = original
    cmd = calls[0]
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5:] == ["-m", "xdsl", "run", "s.xspec", "--epochs", "1"]
