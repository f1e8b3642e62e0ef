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
    from xdsl.distributed import launch_torchrun

    calls = []
    import xdsl.distributed as d

    original = d.subprocess.call
    d.subprocess.call = lambda cmd: calls.append(cmd) or 0
    try:
        assert launch_torchrun(2, ["xdsl", "run", "s.xspec", "--nproc", "2", "--epochs", "1"]) == 0
    finally:
        d.subprocess.call = original
    cmd = calls[0]
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5:] == ["-m", "xdsl", "run", "s.xspec", "--epochs", "1"]


# ---- `xdsl run --nproc 2` end to end: BatchNorm, a frozen teacher, unequal test shards, SIGKILL + resume ----

BN_SPEC = """data synthetic(num_classes=4, shape=[1, 8, 8], train_size=128, test_size=61, batch_size=16)
network teacher = builtin.cnn(num_classes=4, in_channels=1, width=4)
network s1, s2 = builtin.cnn(num_classes=4, in_channels=1, width=4)
cut s1, s2 at "layer2" into up, down
train pre { minimize ce(teacher, y) wrt teacher; optimizer sgd(lr=0.05, momentum=0.9); epochs 2 }
train kd after pre {
    minimize kd(teacher, s1, y, T=2.0, alpha=0.5) wrt s1
    minimize kd(teacher, s2, y, T=2.0, alpha=0.5) + kl(s1, s2) wrt s2
    optimizer sgd(lr=0.05, momentum=0.9)
    epochs 3
    eval_train true
}
evaluate accuracy, xross(s1, s2), ensemble(s1, s2), entropy, accuracy(s1, split="train")
"""  # builtin.cnn has BatchNorm; the teacher is frozen in `kd`; 61 test samples: shards of 31 and 30
BN_BLOCKS = ("pre", "kd")


def _xdsl_nproc2(spec, out, *extra: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "xdsl", "run", str(spec), "--out", str(out), "--device", "cpu",
                             "--quiet", "--nproc", "2", *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


@pytest.fixture(scope="module")
def nproc2_run(tmp_path_factory):
    """One uninterrupted `xdsl run --nproc 2` (the option itself launching torchrun)."""
    home = tmp_path_factory.mktemp("nproc2")
    spec = home / "bn.xspec"
    spec.write_text(BN_SPEC)
    out = home / "run"
    proc = _xdsl_nproc2(spec, out)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    return spec, out


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_nproc_2_evaluation_merged_over_unequal_shards_equals_the_saved_model_on_the_whole_test_set(nproc2_run):
    """Sample-weighted and exact: the merged numbers of 2 processes (shards of 31 and 30 samples, each
    process with its own BatchNorm statistics during training) are those of rank 0's saved weights
    evaluated by one process over all 61 samples."""
    import json

    from xdsl.train.eval_checkpoint import evaluate_checkpoint  # what `xdsl eval` runs

    spec, out = nproc2_run
    results = json.loads((out / "results.json").read_text())["stages"]["kd"]["evaluate"]
    assert results["processes"] == 2 and results["num_samples"] == 61
    whole = evaluate_checkpoint(spec, out / "checkpoints" / "kd" / "final.pt", device="cpu")
    assert [i["kind"] for i in results["items"]] == [i["kind"] for i in whole["items"]]
    for merged, single in zip(results["items"], whole["items"]):
        for a, b in zip(merged.get("rows", []) + merged.get("members", []),
                        single.get("rows", []) + single.get("members", [])):
            assert a["path"] == b["path"]
            assert a["accuracy"] * 61 == pytest.approx(b["accuracy"] * 61, abs=1e-9), a["path"]  # same count
            for key in ("loss", "entropy"):
                if b.get(key) is not None:
                    assert a[key] == pytest.approx(b[key], rel=1e-5), (a["path"], key)
        if merged["kind"] == "ensemble":
            assert merged["accuracy"] == pytest.approx(single["accuracy"], abs=1e-12)
    # the per-epoch test accuracy (counts added over the shards) of the last epoch is the same number
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracy = {r["label"]: r["accuracy"] for r in whole["items"][0]["rows"]}
    for net in ("s1", "s2", "teacher"):
        last = [r for r in rows if r["stage"] == "kd" and r["network"] == net][-1]
        assert last["epoch"] == 3 and last["test_acc"] == pytest.approx(accuracy[net], abs=1e-12), net
    # the training set (split="train", eval_train): scored whole by rank 0 / in shards added up, the same numbers
    on_train = whole["items"][-1]
    (merged_row,), (single_row,) = results["items"][-1]["rows"], on_train["rows"]
    assert on_train["split"] == "train" and merged_row["accuracy"] == single_row["accuracy"]
    assert merged_row["loss"] == pytest.approx(single_row["loss"], rel=1e-6)
    last = [r for r in rows if r["stage"] == "kd" and r["network"] == "s1"][-1]
    assert last["train_acc"] == pytest.approx(on_train["rows"][0]["accuracy"], abs=1e-12)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_sigkill_of_a_2_process_run_then_resume_ends_bit_identical(nproc2_run, tmp_path, test_seed):
    """kill -9 of torchrun and both workers at a random epoch boundary (+ a random delay), then
    `xdsl run --nproc 2 --resume`: every block's final.pt equals the uninterrupted 2-process run's."""
    import random
    import signal
    import time

    spec, reference = nproc2_run
    out = tmp_path / "run"
    rng = random.Random(test_seed)
    rows_before_kill = rng.randint(1, 5) * 3  # 3 rows (networks) an epoch; 5 epochs in all
    delay = rng.uniform(0.0, 0.3)
    where = f"killed {delay:.2f} s after metrics row {rows_before_kill} (seed {test_seed})"
    proc = _xdsl_nproc2(spec, out, start_new_session=True)  # its own process group: torchrun and workers
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline and not (
                metrics.exists() and metrics.read_text().count("\n") >= rows_before_kill):
            time.sleep(0.01)
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended before it was {where}: {proc.stdout.read()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    resumed = _xdsl_nproc2(spec, out, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, f"{where}\n{output[-4000:]}"
    for block in BN_BLOCKS:
        got = torch.load(out / "checkpoints" / block / "final.pt", weights_only=True)["modules"]
        want = torch.load(reference / "checkpoints" / block / "final.pt", weights_only=True)["modules"]
        assert got.keys() == want.keys()
        different = [k for k in want if not torch.equal(got[k], want[k])]
        assert not different, f"{where}: {block}: {different[:5]}"
    import json

    def keys(run_dir):
        return [(r["stage"], r["epoch"], r["network"]) for r in
                map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]

    assert keys(out) == keys(reference) and len(set(keys(out))) == 5 * 3  # each epoch's row once, in order
