"""Stateful loss terms (xdsl.compile.stateful): the name `i`, checking, ownership, the data's indices,
checkpoints and resume, `xdsl compile`. CRD's own math is tests/test_crd.py."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import xdsl
from xdsl.checkpoint import load_checkpoint
from xdsl.cli import app
from xdsl.data import build_data
from xdsl.errors import SpecError, XdslError
from xdsl.lang.check import check
from xdsl.lang.parser import parse
from xdsl.train.runner import RunOptions, run

torch.set_num_threads(1)

HEAD = """data synthetic(num_classes=4, shape=[1, 8, 8], train_size=96, test_size=32, batch_size=16)
network t = builtin.cnn(num_classes=4, in_channels=1, width=8)
network s = builtin.cnn(num_classes=4, in_channels=1, width=4)
cut t, s at "pool" into body, head
"""
CRD = HEAD + """train distil {
    minimize ce(s, y) + 0.8 * crd(t.body, s.body, i, y, feat_dim=8, nce_k=16) wrt s
    optimizer sgd(lr=0.05, momentum=0.9, weight_decay=5e-4)
    epochs 3
}
"""


def _spec(tmp_path: Path, text: str, name: str = "s.xspec") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _check(text: str):
    return check(parse(text, "t.xspec"))


# ---------------------------------------------------------------------------------------- checking


@pytest.mark.parametrize(("objective", "message"), [
    ("crd(t.body, s.body, y)", "crd(): 'i' takes the sample indices i, got the labels y"),
    ("crd(t.body, s.body, i, i)", "crd(): 'y' takes the labels y, got the sample indices i"),
    ("crd(t.body, i, i)", "crd(): 's' takes a path, got the sample indices i"),
    ("crd(t.body, s.body)", "crd() is missing argument(s): i"),
    ("crd(t.body, s.body, i, nce_k=0.5)", "crd(): nce_k must be a whole number >= 1, got 0.5"),
    ("crd(t.body, s.body, i, nce_m=1)", "crd(): nce_m must be in [0, 1), got 1.0"),
    ("crd(t.body, s.body, i, nce_t=0.1 * epoch)", "crd(): 'nce_t' takes a number, got a number that changes"),
    ("ce(s, i)", "ce(): 'y' takes the labels y, got the sample indices i"),
    ("ce(s, y) + i", "'+' needs losses or numbers, but its right side is the sample indices i"),
])
def test_misuse_of_i_and_crd_is_a_located_error(objective: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        _check(HEAD + f"train b {{ minimize {objective} wrt s }}")
    assert message in err.value.message and err.value.pos.line == 5


def test_i_is_a_reserved_name() -> None:
    with pytest.raises(SpecError, match="'i' is already defined as a built-in name"):
        _check(HEAD + "network i = builtin.cnn(num_classes=4, in_channels=1)")


@pytest.mark.filterwarnings("ignore::xdsl.errors.XdslWarning")  # crd minimised for its teacher: a dead term too
def test_a_stateful_term_has_one_owner(tmp_path: Path) -> None:
    text = HEAD + """train b {
    minimize ce(s, y) + crd(t.body, s.body, i) wrt s
    minimize ce(t, y) + crd(t.body, s.body, i) wrt t
}"""
    with pytest.raises(SpecError) as err:
        xdsl.load(_spec(tmp_path, text))
    assert "minimised for 's' and for 't'" in err.value.message and err.value.pos.line == 7
    assert "own term" in err.value.hint


def test_swapped_crd_arguments_are_a_dead_term(tmp_path: Path) -> None:
    """crd's teacher is detached, as every target: crd(s, t) minimised for s sends no gradient into s."""
    with pytest.raises(SpecError, match="sends no gradient into 's'"):
        _check(HEAD + "train b { minimize crd(s.body, t.body, i) wrt s }")


# ------------------------------------------------------------------------------ ownership, stepping


def _loaded(tmp_path: Path, text: str = CRD) -> xdsl.Experiment:
    torch.manual_seed(0)
    exp = xdsl.load(_spec(tmp_path, text))
    exp.bind_data(torch.arange(96) % 4, seed=0)
    return exp


def test_the_owner_optimises_the_term_parameters_with_its_settings(tmp_path: Path) -> None:
    exp = _loaded(tmp_path)
    crd = exp.compiled.terms["crd0"]
    assert exp.term_owners == {"crd0": "s"}
    head_ids = {id(p) for p in crd.parameters()}
    group = exp.optimizers["s"].param_groups[0]
    assert head_ids <= {id(p) for p in group["params"]} and group["weight_decay"] == 5e-4
    assert all(p.requires_grad for p in crd.parameters())
    assert crd.memory_s.shape == (96, 8) and crd.embed_t.linear.in_features == 32  # cnn width 8: 4w channels


def test_a_step_needs_i_updates_the_heads_and_the_memory(tmp_path: Path) -> None:
    exp = _loaded(tmp_path)
    crd = exp.compiled.terms["crd0"]
    x, y, i = torch.randn(16, 1, 8, 8), torch.arange(16) % 4, torch.arange(16) * 2
    with pytest.raises(XdslError, match="reads the sample indices i"):
        exp.train_step(x, y)
    before = {k: v.clone() for k, v in crd.state_dict().items()}
    exp.objectives(x, y, i)  # no update: the memory is put back
    assert all(torch.equal(v, before[k]) for k, v in crd.state_dict().items())
    exp.train_step(x, y, i)
    after = crd.state_dict()
    assert not torch.equal(after["embed_s.linear.weight"], before["embed_s.linear.weight"])
    assert not torch.equal(after["embed_t.linear.weight"], before["embed_t.linear.weight"])
    assert not torch.equal(after["memory_s"][i], before["memory_s"][i])
    untouched = torch.ones(96, dtype=torch.bool)
    untouched[i] = False
    assert torch.equal(after["memory_s"][untouched], before["memory_s"][untouched])
    assert (after["z"] > 0).all()


def test_under_bf16_autocast_the_term_runs_in_float32(tmp_path: Path) -> None:
    from xdsl.experiment import Experiment, compile_program

    exp = Experiment(compile_program(_spec(tmp_path, CRD)), amp=torch.bfloat16)
    exp.bind_data(torch.arange(96) % 4, seed=0)
    losses = exp.train_step(torch.randn(16, 1, 8, 8), torch.arange(16) % 4, torch.arange(16))
    crd_value = next(v for t, v in exp.last_terms["s"].items() if t.startswith("crd("))
    assert crd_value.dtype == torch.float32 and torch.isfinite(losses["s"])
    assert exp.compiled.terms["crd0"].memory_s.dtype == torch.float32


def test_the_generated_objective_calls_the_term_module(tmp_path: Path) -> None:
    exp = _loaded(tmp_path)
    code = exp._single["s"].module.code
    assert "def forward(self, x, y, clock = None, i = None)" in code
    assert "self.terms.crd0(" in code


# ------------------------------------------------------------------------------------- data, runs


def _cifar_dir(root: Path, per_batch: int = 16) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*[(f"data_batch_{k}", per_batch) for k in range(1, 6)], ("test_batch", 8)]:
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 4, size=n)]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


@pytest.mark.parametrize("pipeline", ["per_sample", "batched"])
def test_loaders_with_index_yield_the_same_batches_and_each_samples_position(tmp_path: Path, pipeline: str) -> None:
    bundle = build_data("cifar10", {"root": str(_cifar_dir(tmp_path / "c")), "batch_size": 12, "num_workers": 0,
                                    "pipeline": pipeline}, seed=3)
    bundle.use_device(torch.device("cpu"))
    assert bundle.batched == (pipeline == "batched")
    plain, indexed = list(bundle.train_loader(5)), list(bundle.train_loader(5, with_index=True))
    assert len(plain) == len(indexed) == 7
    seen = []
    for (x0, y0), (x1, y1, i) in zip(plain, indexed, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert torch.equal(bundle.train.labels[i], y1)
        seen += i.tolist()
    assert sorted(seen) == list(range(80))


def _final(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoints" / "distil" / "final.pt")["modules"]


def test_resume_mid_epoch_equals_an_uninterrupted_run_memory_and_optimiser_included(tmp_path: Path) -> None:
    spec = _spec(tmp_path, CRD)
    whole = tmp_path / "whole"
    run(spec, RunOptions(out=whole, quiet=True, device="cpu"))
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run(spec, RunOptions(out=cut, quiet=True, device="cpu", stop_after_steps=9))  # epoch 2, batch 3
    state = load_checkpoint(cut / "checkpoints" / "distil" / "last.pt")
    assert (state["epoch"], state["batch"]) == (1, 3)
    assert state["modules"]["terms.crd0.memory_s"].shape == (96, 8)
    run(spec, RunOptions(out=cut, quiet=True, device="cpu", resume=True))
    got, want = _final(cut), _final(whole)
    assert got.keys() == want.keys() and {"terms.crd0.memory_s", "terms.crd0.embed_s.linear.weight"} <= got.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    last_got = load_checkpoint(cut / "checkpoints" / "distil" / "last.pt")["optimizers"]["s"]
    last_want = load_checkpoint(whole / "checkpoints" / "distil" / "last.pt")["optimizers"]["s"]
    owned = xdsl.load(spec).owned_params("s")  # the student's parameters and the two heads' weights and biases
    assert len(last_want["state"]) == len(last_got["state"]) == len(owned)
    for k, v in last_want["state"].items():
        assert torch.equal(last_got["state"][k]["momentum_buffer"], v["momentum_buffer"])
    # xdsl eval takes the checkpoint although the spec's modules were built before the data sized the memory
    from xdsl.train.eval_checkpoint import evaluate_checkpoint

    results = evaluate_checkpoint(spec, whole / "checkpoints" / "distil" / "final.pt", device="cpu")
    assert results
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    terms = [r["terms"] for r in rows if r["network"] == "s"]
    crd_text = next(t for t in terms[0] if t.startswith("crd("))
    assert all(np.isfinite(t[crd_text]) and t[crd_text] > 0 for t in terms)


def test_mixup_soft_labels_train_with_crd(tmp_path: Path) -> None:
    """Under mixup y is soft; crd takes each sample's dominant class for its negatives."""
    root = _cifar_dir(tmp_path / "c")
    text = CRD.replace(HEAD.splitlines()[0], f'data cifar10(root="{root}", batch_size=16, num_workers=0, '
                       'augment=[random_crop(32, padding=4), hflip, mixup(alpha=0.2)])')
    text = text.replace("in_channels=1", "in_channels=3").replace("num_classes=4", "num_classes=10")
    text = text.replace("epochs 3", "epochs 1")
    run(_spec(tmp_path, text), RunOptions(out=tmp_path / "run", quiet=True, device="cpu"))
    assert _final(tmp_path / "run")["terms.crd0.memory_s"].shape == (80, 8)


def test_compile_lists_the_module_owner_parameters_and_buffers(tmp_path: Path) -> None:
    spec = _spec(tmp_path, CRD)
    result = CliRunner().invoke(app, ["compile", str(spec), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)["terms"]
    # heads: 32 -> 8 (teacher, width 8) and 16 -> 8 (student, width 4), weights and biases
    assert row == {"name": "crd0", "term": "crd(t.body, s.body, i, y, feat_dim=8, nce_k=16)", "owner": "s",
                   "params": 32 * 8 + 8 + 16 * 8 + 8,
                   "buffers": {"memory_s": [0, 8], "memory_t": [0, 8], "z": [2], "labels": [0]}}
    result = CliRunner().invoke(app, ["compile", str(spec)])
    assert "stateful loss terms" in result.output
    assert "memory_s (N, 8)" in result.output and "labels (N)" in result.output


# ------------------------------------------------------------------------------------------ torchrun


def _two_rank_step(rank: int, port: int, out: str) -> None:
    """One CRD forward on each of 2 gloo processes, each with its own half of a batch of 8."""
    import torch.distributed as dist

    from xdsl.contrastive import CRD

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        crd = CRD(6, 5, feat_dim=4, nce_k=3)
        crd.bind_data(torch.arange(20) % 2, seed=1)
        g = torch.Generator().manual_seed(9)
        t, s, i = torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g), torch.randperm(20, generator=g)[:8]
        half = slice(4 * rank, 4 * rank + 4)
        crd(t[half], s[half], i[half])
        torch.save({"memory_s": crd.memory_s, "memory_t": crd.memory_t, "z": crd.z}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_under_torchrun_every_process_updates_its_memory_with_every_processs_batch(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    from xdsl.contrastive import CRD

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_two_rank_step, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # the banks stay identical across processes
    # ... and equal one process's update on the whole batch of 8 (memory rows; z is the mean of the halves')
    torch.manual_seed(0)
    one = CRD(6, 5, feat_dim=4, nce_k=3)
    one.bind_data(torch.arange(20) % 2, seed=1)
    g = torch.Generator().manual_seed(9)
    t, s, i = torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g), torch.randperm(20, generator=g)[:8]
    one(t, s, i)
    torch.testing.assert_close(r0["memory_s"], one.memory_s)
    torch.testing.assert_close(r0["memory_t"], one.memory_t)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_a_two_process_run_moves_every_memory_row_in_one_epoch(tmp_path: Path) -> None:
    """End to end under torchrun (DDP over the objective, the heads owned): after one epoch the saved (rank 0)
    memory has moved every sample's row, the half rank 1 saw included."""
    import os
    import subprocess
    import sys

    from xdsl.contrastive import CRD as CRDModule

    spec = _spec(tmp_path, CRD)
    out = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "xdsl", "run",
           str(spec), "--out", str(out), "--device", "cpu", "--epochs", "1", "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    memory = _final(out)["terms.crd0.memory_s"]
    initial = CRDModule(32, 16, feat_dim=8, nce_k=16)
    initial.bind_data(torch.zeros(96, dtype=torch.long), seed=0)  # the run's seed 0 draws the initial banks
    moved = (memory != initial.memory_s).any(dim=1)
    assert moved.all(), f"{int(moved.sum())} of 96 rows moved"
