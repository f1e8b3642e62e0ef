"""Faults during a run: kill -9, Ctrl-C, corrupted checkpoints, a full disk, an unwritable --out, NaN.

The promise under test: whatever stops a run, `--resume` ends bit-identical to a run that was never
stopped, and whatever goes wrong is one clear message, never a traceback or a damaged checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from xdsl.checkpoint import load_checkpoint
from xdsl.cli import app
from xdsl.errors import XdslError
from xdsl.train.runner import NonFiniteLoss, RunOptions, run

STEPS_PER_EPOCH = 32  # train_size 512 / batch_size 16
EPOCHS = {"independent": 2, "dml": 4}
SPEC = """data synthetic(num_classes=4, shape=[1, 8, 8], train_size=512, test_size=64, batch_size=16)
network a, b = builtin.cnn(num_classes=4, in_channels=1, width=4)
independent(a, b, epochs=2, optimizer=adam(lr=1e-3))
dml(a, b, epochs=4, optimizer=adam(lr=1e-3))
"""


def _opts(out: Path, **kw) -> RunOptions:
    return RunOptions(out=out, quiet=True, device="cpu", **kw)


def _modules(out: Path, block: str, name: str = "final.pt") -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoints" / block / name)["modules"]


def _assert_identical(out: Path, reference: Path) -> None:
    """Every tensor of every block's final.pt equals the uninterrupted run's, bit for bit."""
    for block in EPOCHS:
        got, want = _modules(out, block), _modules(reference, block)
        assert got.keys() == want.keys()
        different = [k for k in want if not torch.equal(got[k], want[k])]
        assert not different, f"{block}: tensors differ from the uninterrupted run: {different[:5]}"


def _assert_metrics_once_per_epoch(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seen = [(r["stage"], r["epoch"], r["network"]) for r in rows]
    want = [(block, e, n) for block, epochs in EPOCHS.items() for e in range(1, epochs + 1) for n in ("a", "b")]
    assert seen == want


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "tiny.xspec"
    path.write_text(SPEC)
    return path


@pytest.fixture(scope="module")
def reference(spec: Path, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    run(spec, _opts(out))
    return out


def _count_steps(monkeypatch) -> list[int]:
    from xdsl.experiment import Experiment

    calls = [0]
    original = Experiment.train_step

    @functools.wraps(original)
    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Experiment, "train_step", counted)
    return calls


# ---- Ctrl-C ----

def test_ctrl_c_mid_epoch_checkpoints_the_batch_position_and_resume_is_exact(spec, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    stop = STEPS_PER_EPOCH + 13  # epoch 2 of the first block, after 13 batches
    with pytest.raises(KeyboardInterrupt):
        run(spec, _opts(out, stop_after_steps=stop))
    state = load_checkpoint(out / "checkpoints" / "independent" / "last.pt")
    assert (state["epoch"], state["batch"], state["done"]) == (1, 13, False)
    assert not (out / "checkpoints" / "independent" / "final.pt").exists()
    with open(out / "metrics.jsonl", "a") as f:  # a row cut short by the interruption
        f.write('{"stage": "independent", "epo')

    steps = _count_steps(monkeypatch)
    run(spec, _opts(out, resume=True))
    # the 32 + 13 batches already trained are skipped, not trained again
    assert steps[0] == sum(EPOCHS.values()) * STEPS_PER_EPOCH - stop
    _assert_identical(out, reference)
    _assert_metrics_once_per_epoch(out)


def test_ctrl_c_through_the_cli_exits_130_with_a_resume_hint(spec, tmp_path, monkeypatch):
    from xdsl.train import runner

    original = runner.RunOptions

    def stopping(**kw):
        return original(**kw, stop_after_steps=5)

    monkeypatch.setattr(runner, "RunOptions", stopping)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 130, result.output
    assert "interrupted: the last checkpoint is intact; continue with --resume" in result.output
    assert "Traceback" not in result.output
    assert load_checkpoint(out / "checkpoints" / "independent" / "last.pt")["batch"] == 5


@pytest.mark.parametrize("signals", [1, 2], ids=["one_ctrl_c", "two_ctrl_c"])
def test_ctrl_c_during_a_step_finishes_it_or_keeps_the_previous_checkpoint(spec, reference, tmp_path, monkeypatch,
                                                                          signals):
    """A real SIGINT between network a's update and network b's (alternating order). One: the step
    completes, the checkpoint is at the next batch. Two: stop at once; last.pt stays the end of epoch 1."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from xdsl.experiment import Experiment

    original, calls, updates = Experiment.train_step, [0], [0]

    def counted_step(self, x, y):
        calls[0] += 1
        return original(self, x, y)

    def before_update(optimizer, args, kwargs):
        updates[0] += 1
        if calls[0] == STEPS_PER_EPOCH + 8 and updates[0] == 2 * calls[0]:  # b's update; a's is done
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Experiment, "train_step", counted_step)
    hook = register_optimizer_step_pre_hook(before_update)
    out = tmp_path / "run"
    try:
        with pytest.raises(KeyboardInterrupt):
            run(spec, _opts(out))
    finally:
        hook.remove()
    assert calls[0] == STEPS_PER_EPOCH + 8  # no step starts after the signal
    state = load_checkpoint(out / "checkpoints" / "independent" / "last.pt")
    assert (state["epoch"], state["batch"]) == ((1, 8) if signals == 1 else (1, 0))
    monkeypatch.setattr(Experiment, "train_step", original)
    run(spec, _opts(out, resume=True))
    _assert_identical(out, reference)


# ---- kill -9 ----

def _metric_rows(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_text().count("\n")
    except OSError:
        return 0


def test_sigkill_at_a_random_point_then_resume_is_bit_identical(spec, reference, tmp_path, test_seed):
    out = tmp_path / "run"
    first = out / "checkpoints" / "independent" / "last.pt"
    rng = random.Random(test_seed)  # a different point per seed; the seed is printed on failure
    after_epochs = rng.randint(1, sum(EPOCHS.values()) - 1)  # kill in a random epoch after the first checkpoint
    delay = rng.uniform(0.0, 0.3)
    where = f"killed {delay:.2f} s after epoch {after_epochs} was logged (seed {test_seed})"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "xdsl", "run", str(spec), "--out", str(out), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while (not first.exists() or _metric_rows(out) < 2 * after_epochs) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended before it was {where}: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert first.exists()

    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "--resume", "--device", "cpu"])
    assert result.exit_code == 0, f"{where}\n{result.output}"
    assert "resumed at epoch" in result.output or "already finished" in result.output
    _assert_identical(out, reference)
    _assert_metrics_once_per_epoch(out)


def test_sigterm_checkpoints_like_ctrl_c_and_exits_130(spec, reference, tmp_path):
    """What a cluster scheduler sends before preempting a job."""
    out = tmp_path / "run"
    first = out / "checkpoints" / "independent" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "xdsl", "run", str(spec), "--out", str(out), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr.decode()[-2000:]
    assert "interrupted: the last checkpoint is intact; continue with --resume" in stderr.decode()
    assert "Traceback" not in stderr.decode()
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "--resume", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    _assert_identical(out, reference)


# ---- corrupted checkpoints ----

@pytest.fixture(scope="module")
def interrupted(spec: Path, tmp_path_factory) -> Path:
    """A run stopped in dml's 3rd epoch: last.pt = mid-epoch state, last.prev.pt = end of dml's epoch 2."""
    out = tmp_path_factory.mktemp("interrupted")
    with pytest.raises(KeyboardInterrupt):  # stop_after_steps counts per block: independent has only 64 steps
        run(spec, _opts(out, stop_after_steps=2 * STEPS_PER_EPOCH + 7))
    last = load_checkpoint(out / "checkpoints" / "dml" / "last.pt")
    previous = load_checkpoint(out / "checkpoints" / "dml" / "last.prev.pt")
    assert (last["epoch"], last["batch"], previous["epoch"], previous["batch"]) == (2, 7, 2, 0)
    return out


def _copy(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out, out / "checkpoints" / "dml" / "last.pt"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupted_last_checkpoint_falls_back_to_the_previous_one(spec, reference, interrupted, tmp_path, capsys,
                                                                  monkeypatch, damage):
    monkeypatch.setenv("COLUMNS", "100000")  # rich would wrap the warning inside its long path
    out, last = _copy(interrupted, tmp_path)
    data = last.read_bytes()
    last.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    capsys.readouterr()
    run(spec, RunOptions(out=out, resume=True, device="cpu"))
    printed = capsys.readouterr().out
    assert f"warning: checkpoint '{last}' is truncated, corrupted or not an xdsl checkpoint" in printed
    assert f"using the previous checkpoint {last.with_suffix('.prev.pt')}" in printed
    _assert_identical(out, reference)


def test_both_checkpoints_corrupted_is_a_clear_error(spec, interrupted, tmp_path):
    out, last = _copy(interrupted, tmp_path)
    last.write_bytes(b"")
    last.with_suffix(".prev.pt").write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "--resume", "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    error = next(line for line in result.output.splitlines() if line.startswith("error:"))
    assert error == (f"error: checkpoint '{last.with_suffix('.prev.pt')}' is truncated, corrupted or not an xdsl "
                     "checkpoint (not a PyTorch file)")


# ---- unwritable output, full disk ----

def test_output_under_a_regular_file_fails_before_training(spec, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    out = blocker / "run"
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines() == [f"error: cannot write to the run directory '{out}': Not a directory",
                                          "  hint: choose another --out, or free disk space"]


@pytest.mark.parametrize("call", ["mkdir", "open"])
def test_read_only_output_directory_fails_before_training(spec, tmp_path, monkeypatch, call):
    """The operating system refuses to create the run directory (mkdir) or a file in it (open) with EACCES,
    as it does for a read-only directory. Injected at the call, so it holds when the tests run as root
    (which writes into read-only directories); the real chmod case is the test below."""
    import errno
    import io

    locked = tmp_path / "locked"
    locked.mkdir()

    def refuse(real):
        def call_or_refuse(path, *args, **kwargs):
            if str(path).startswith(str(locked)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path, *args, **kwargs)
        return call_or_refuse

    if call == "mkdir":
        monkeypatch.setattr(os, "mkdir", refuse(os.mkdir))
    else:
        (locked / "run").mkdir()
        monkeypatch.setattr(io, "open", refuse(io.open))
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(locked / "run"), "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.splitlines() == [
        f"error: cannot write to the run directory '{locked / 'run'}': Permission denied",
        "  hint: choose another --out, or free disk space"]
    monkeypatch.undo()
    assert not (locked / "run" / "checkpoints").exists() and not (locked / "run" / "metrics.jsonl").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_fails_before_training_chmod(spec, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = CliRunner().invoke(app, ["run", str(spec), "--out", str(locked / "run"), "--device", "cpu"])
    finally:
        locked.chmod(0o700)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith(f"error: cannot write to the run directory '{locked / 'run'}': Permission denied")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to simulate a full disk")
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(spec, tmp_path, monkeypatch):
    """The first last.pt is written; every later one lands on /dev/full (ENOSPC from the kernel)."""
    from xdsl import checkpoint

    real_mkstemp = checkpoint.tempfile.mkstemp
    calls, temp_files = [0], []

    def mkstemp(*args, **kwargs):
        if not kwargs.get("prefix", "").startswith(".last.pt"):  # best.pt and snapshots are written as usual
            return real_mkstemp(*args, **kwargs)
        calls[0] += 1
        fd, name = real_mkstemp(*args, **kwargs)  # the real temp file beside last.pt, which must be cleaned up
        temp_files.append(Path(name))
        if calls[0] == 1:
            return fd, name
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name  # its writes fail with ENOSPC

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", mkstemp)
    out = tmp_path / "run"
    last = out / "checkpoints" / "independent" / "last.pt"
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.splitlines()
    assert lines[-2:] == [f"error: cannot write checkpoint '{last}': No space left on device",
                          "  hint: free disk space or choose another --out; the previous checkpoint is intact, "
                          "continue with --resume"]
    state = load_checkpoint(last)
    assert state["epoch"] == 1 and not state["done"]
    assert len(temp_files) == 2 and temp_files[1].parent == last.parent  # the failed write had a temp file ...
    assert not temp_files[1].exists() and not list(last.parent.glob(".*.tmp"))  # ... and it was removed


# ---- NaN / inf ----

def test_huge_learning_rate_names_the_network_and_term(tmp_path):
    spec = tmp_path / "nan.xspec"
    spec.write_text("data synthetic(num_classes=4, shape=[1, 8, 8], train_size=64, test_size=32, batch_size=16)\n"
                    "network net = builtin.cnn(num_classes=4, in_channels=1, width=4)\n"
                    "train { minimize ce(net, y) wrt net; optimizer sgd(lr=1e30); epochs 2 }\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.splitlines()
    first = next(line for line in lines if line.startswith("error:"))
    assert first.startswith("error: non-finite loss in train block 'train1', network 'net', epoch 1, step ")
    assert ": term ce(net, y, 0.0) = " in first and first.rsplit("= ", 1)[1] in ("nan", "inf", "-inf")
    assert "hint: lower the learning rate or set grad_clip; the last good checkpoint (none yet) is intact" in \
        result.output
    assert not (out / "checkpoints" / "train1" / "last.pt").exists()


def test_inf_in_the_data_stops_the_run_and_leaves_the_last_good_checkpoint(spec, tmp_path, monkeypatch):
    """A dataset that turns to inf in the second epoch: the epoch-1 checkpoint stays loadable and finite."""
    from xdsl.data import DATASETS
    from xdsl.data.datasets import synthetic

    class Poisoned(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner, self.epoch_seed = inner, 0

        def set_epoch(self, epoch_seed: int) -> None:
            self.epoch_seed = epoch_seed

        def __len__(self) -> int:
            return len(self.inner)

        def __getitem__(self, i):
            x, y = self.inner[i]
            return (torch.full_like(x, float("inf")) if self.epoch_seed >= 1 else x), y

    @functools.wraps(synthetic)
    def poisoned(ctx, **kw):
        bundle = synthetic(ctx, **kw)
        bundle.train = Poisoned(bundle.train)
        return bundle

    monkeypatch.setitem(DATASETS._items, "synthetic", poisoned)  # a registry refuses a second registration
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as err:
        run(spec, _opts(out))
    last = out / "checkpoints" / "independent" / "last.pt"
    message = err.value.message
    assert message.startswith("non-finite loss in train block 'independent', network 'a', epoch 2, step 0: term ")
    assert message.split(": term ", 1)[1].startswith("ce(a, y")
    assert err.value.hint.endswith(f"the last good checkpoint {last} is intact")
    state = load_checkpoint(last)
    assert (state["epoch"], state["batch"]) == (1, 0)
    assert all(torch.isfinite(t).all() for t in state["modules"].values() if t.is_floating_point())
    assert not (out / "checkpoints" / "independent" / "final.pt").exists()


def test_unresumable_directory_is_a_clear_error(spec, tmp_path):
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "fresh"), "--resume"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith(f"error: --resume: '{tmp_path / 'fresh'}' has no checkpoints to resume from")


def test_a_checkpoint_from_another_spec_is_refused_by_eval(spec, reference, tmp_path):
    other = tmp_path / "other.xspec"
    other.write_text(SPEC.replace("width=4", "width=8"))
    final = reference / "checkpoints" / "dml" / "final.pt"
    result = CliRunner().invoke(app, ["eval", str(other), "--checkpoint", str(final), "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith(f"error: checkpoint '{final}' does not fit the spec's modules")


def test_checkpoint_write_errors_are_xdsl_errors(tmp_path):
    from xdsl.checkpoint import save_atomic

    (tmp_path / "file.txt").write_text("x")
    target = tmp_path / "file.txt" / "sub" / "last.pt"
    with pytest.raises(XdslError) as err:
        save_atomic({"x": torch.zeros(1)}, target)
    assert err.value.message == f"cannot write checkpoint '{target}': Not a directory"


def test_resume_with_a_changed_setting_is_refused_and_leaves_the_run_as_it_was(spec, interrupted, tmp_path):
    """A --set (or an edited spec) that differs from the run being resumed would train the rest with other
    settings while spec.xspec records the new ones: a located refusal, the checkpoint and record untouched."""
    out, last = _copy(interrupted, tmp_path)
    recorded, checkpoint = (out / "spec.xspec").read_text(), last.read_bytes()
    with pytest.raises(XdslError, match=r"differ from the run being resumed[\s\S]*lr=0\.001[\s\S]*lr=0\.2"):
        run(spec, _opts(out, resume=True, overrides={"dml.lr": "0.2"}))
    assert (out / "spec.xspec").read_text() == recorded and last.read_bytes() == checkpoint
    run(spec, _opts(out, resume=True))  # the same settings resume
    assert load_checkpoint(out / "checkpoints" / "dml" / "last.pt")["done"]
