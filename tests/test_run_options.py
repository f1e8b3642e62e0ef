"""Run options and outputs not covered elsewhere, through the command line and the Python API:
`--amp bf16` on CPU, channels_last, `--no-compile`, `--debug`, `graph --format svg`, `Experiment.graph`,
TensorBoard events, `net@N` snapshots, the flatness noise's distribution, and `map_channels` in a run."""

from __future__ import annotations

import importlib.util
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import xdsl
from xdsl.cli import app

QUICKSTART = Path(__file__).resolve().parent.parent / "specs" / "quickstart.xspec"
DATA = "data synthetic(num_classes=4, shape=[1, 8, 8], train_size=64, test_size=32, batch_size=16)\n"
TWO = DATA + """network net1, net2 = builtin.cnn(num_classes=4, in_channels=1, width=4)
cut net1, net2 at "layer2" into up, down
"""


def _spec(tmp_path: Path, text: str, name: str = "s.xspec") -> Path:
    spec = tmp_path / name
    spec.write_text(text)
    return spec


def _run(spec: Path, out: Path, *extra: str):
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "--device", "cpu", *extra])
    assert result.exit_code == 0, result.output
    return result


def _modules(out: Path, block: str, name: str = "final.pt") -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / block / name, weights_only=True)["modules"]


# ---- --amp bf16, channels_last, --no-compile ----

@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("none", torch.float32)])
def test_amp_bf16_runs_the_forward_passes_in_bfloat16_on_cpu(tmp_path, amp, dtype):
    spec = _spec(tmp_path, TWO + "dml(net1, net2, epochs=1, optimizer=adam(lr=1e-3))\n")
    seen: set[torch.dtype] = set()

    def record(module, args, output):
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear) and torch.is_grad_enabled():
            seen.add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        _run(spec, tmp_path / "run", "--amp", amp, "-q")
    finally:
        hook.remove()
    assert seen == {dtype}  # every training forward of a conv / linear layer
    weights = _modules(tmp_path / "run", "dml")
    assert all(t.dtype == torch.float32 for k, t in weights.items() if t.is_floating_point())  # fp32 master weights


def test_channels_last_trains_like_contiguous_memory(tmp_path):
    from xdsl.experiment import Experiment, compile_program

    spec = _spec(tmp_path, TWO + "xml(net1, net2, optimizer=sgd(lr=0.1))\n")
    torch.manual_seed(0)
    plain = Experiment(compile_program(spec))
    torch.manual_seed(0)
    last = Experiment(compile_program(spec), channels_last=True)
    convs = [m.weight for m in last.networks["net1"].modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # (one input channel: both layouts are the same)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    for _ in range(2):
        a = plain.train_step(x, y)
        b = last.train_step(x.contiguous(memory_format=torch.channels_last), y)
        for net in a:
            torch.testing.assert_close(b[net], a[net], rtol=1e-5, atol=1e-6)
    for p, q in zip(plain.compiled.root.parameters(), last.compiled.root.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_no_compile_runs_eager_without_compiling_a_graph(tmp_path):
    from torch._dynamo.utils import counters

    spec = _spec(tmp_path, TWO + "dml(net1, net2, epochs=1, optimizer=adam(lr=1e-3))\n")
    counters.clear()
    result = _run(spec, tmp_path / "run", "--no-compile")
    assert "torch.compile" not in result.output
    assert not counters["stats"]["unique_graphs"] and not counters["frames"]["ok"]


def test_debug_shows_the_traceback_that_is_otherwise_hidden(tmp_path):
    bad = _spec(tmp_path, "network a = builtin.cnn()\ntrain { minimize ce(b, y) wrt a }\n", "bad.xspec")
    plain = CliRunner().invoke(app, ["check", str(bad)])
    assert plain.exit_code == 2 and isinstance(plain.exception, SystemExit)
    debug = CliRunner().invoke(app, ["--debug", "check", str(bad)])
    assert isinstance(debug.exception, xdsl.SpecError) and debug.exit_code == 1
    assert "undefined name 'b'" in str(debug.exception.render())
    assert debug.exc_info[2] is not None  # the Python traceback of the error


# ---- the graph: svg and the networkx DiGraph ----

def test_graph_svg_is_an_svg_document_naming_the_networks_and_objectives(tmp_path):
    import shutil

    if shutil.which("dot") is None:
        pytest.skip("graphviz's dot is not installed (without it xdsl writes .dot and .mmd files instead)")
    out = tmp_path / "g.svg"
    result = CliRunner().invoke(app, ["graph", str(QUICKSTART), "--format", "svg", "--out", str(out)])
    assert result.exit_code == 0 and result.output == f"wrote {out}\n", result.output
    root = ET.fromstring(out.read_bytes())
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = {"".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert any("net1" in t for t in texts) and any("net2" in t for t in texts), texts
    assert len(list(root.iter())) > 50  # nodes and edges were drawn


def test_experiment_graph_has_every_sub_result_once_and_every_term_of_each_objective():
    exp = xdsl.load(QUICKSTART)
    g = exp.graph
    kinds = {n: d["kind"] for n, d in g.nodes(data=True)}
    assert kinds["x"] == "input" and kinds["y"] == "labels"
    # the xml block: 6 terms per network, each feeding its objective; paths hang off x by their parts
    for net, peer in (("net1", "net2"), ("net2", "net1")):
        terms = list(g.predecessors(f"objective xml/{net}"))
        assert len(terms) == 6 and all(kinds[t] == "term" for t in terms)
        cross = f"{net}.up >> {peer}.down"
        assert kinds[cross] == "part" and list(g.predecessors(cross)) == [f"{net}.up"]
        assert list(g.predecessors(f"{net}.up")) == ["x"]
    assert sum(1 for n in g if n == "net1.up") == 1  # one node, however many terms use it
    assert {n for n, k in kinds.items() if k == "objective"} == {
        f"objective {b}/{n}" for b in ("independent", "dml", "xml") for n in ("net1", "net2")}
    assert all(kinds[s] in ("term",) for s, t in g.edges if kinds[t] == "objective")


# ---- run outputs: TensorBoard events, net@N snapshots ----

def test_tensorboard_events_hold_the_metrics(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed (pip install 'xdsl-distill[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = _spec(tmp_path, TWO + "dml(net1, net2, epochs=2, optimizer=adam(lr=1e-3))\n")
    out = tmp_path / "run"
    _run(spec, out, "-q")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for net in ("net1", "net2"):
        for key in ("train_loss", "test_acc", "lr"):
            got = [(e.step, e.value) for e in events.Scalars(f"dml/{net}/{key}")]
            want = [(r["epoch"], r[key]) for r in rows if r["network"] == net]
            assert [s for s, _ in got] == [1, 2] and [v for _, v in got] == pytest.approx([v for _, v in want])


def test_net_at_epoch_is_evaluated_from_that_epochs_snapshot(tmp_path):
    from xdsl.data import build_data

    spec = _spec(tmp_path, TWO + "dml(net1, net2, epochs=2, optimizer=adam(lr=1e-2))\n"
                 "evaluate accuracy(net1@1, net1)\n")
    out = tmp_path / "run"
    _run(spec, out, "-q")
    snapshots = out / "checkpoints" / "dml"
    assert {p.name for p in snapshots.glob("epoch*.pt")} == {"epoch1.pt", "epoch2.pt"}
    first = torch.load(snapshots / "epoch1.pt", weights_only=True)
    final = _modules(out, "dml")
    assert first["epoch"] == 1
    parts = {f"parts.{k}": v for k, v in first["modules"]["parts"].items()}
    assert any(not torch.equal(parts[k], final[k]) for k in parts)  # epoch 1's weights, not the final ones
    last = torch.load(snapshots / "epoch2.pt", weights_only=True)["modules"]["parts"]
    assert all(torch.equal(v, final[f"parts.{k}"]) for k, v in last.items())
    # by hand: net1 with epoch 1's weights on the test set
    exp = xdsl.load(spec)
    exp.compiled.root.parts.load_state_dict(first["modules"]["parts"])
    exp.set_train_mode(False)
    data = build_data(exp.program.data.name, exp.program.data.kwargs)
    correct = n = 0
    with torch.no_grad():
        for x, y in data.test_loader():
            correct += int((exp.forward("net1", x).argmax(1) == y).sum())
            n += len(y)
    rows = json.loads((out / "results.json").read_text())["stages"]["dml"]["evaluate"]["items"][0]["rows"]
    assert [r["label"] for r in rows] == ["net1@1", "net1"]
    assert rows[0]["accuracy"] == pytest.approx(correct / n)


# ---- flatness: the weight noise is N(0, sigma^2) ----

PROBE = '''
import torch
from torch import nn

SEEN = []


class Probe(nn.Module):
    """Records its (zero-initialised) parameter at every forward: under flatness noise, the noise itself."""

    def __init__(self, num_classes):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(20_000))
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        if not self.w.is_meta:
            SEEN.append(self.w.detach().clone())
        return self.head(x.flatten(1)) + 0 * self.w.sum()


def make(num_classes=4):
    return Probe(num_classes)
'''


def test_flatness_noise_is_gaussian_with_standard_deviation_sigma(tmp_path):
    from scipy import stats

    (tmp_path / "flatness_probe_model.py").write_text(PROBE)
    spec = _spec(tmp_path, "data synthetic(num_classes=4, shape=[1, 8, 8], train_size=16, test_size=16, "
                           "batch_size=16)\n"
                           'network n = "flatness_probe_model:make"(num_classes=4)\n'
                           "evaluate flatness(sigmas=[0.5], draws=3)\n")
    try:
        _run(spec, tmp_path / "run", "-q")
        seen = sys.modules["flatness_probe_model"].SEEN
    finally:
        sys.modules.pop("flatness_probe_model", None)
    noisy = [w for w in seen if type(w) is torch.Tensor and bool(w.any())]  # not shape inference's fakes
    assert len(noisy) == 3  # one batch, three draws
    for draw in noisy:
        n = draw.numel()
        assert abs(float(draw.mean())) < 5 * 0.5 / n ** 0.5  # mean 0 (5 standard errors)
        assert float(draw.std()) == pytest.approx(0.5, abs=5 * 0.5 / (2 * n) ** 0.5)  # std sigma
        assert stats.kstest(draw.double().numpy(), "norm", args=(0, 0.5)).pvalue > 1e-4  # and Gaussian
    assert not torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[1], noisy[2])  # a new draw each time


# ---- map_channels in a run ----

MAPPED = TWO.replace("width=4", "width=8") + """train xml_m {
    minimize ce(net1, y) wrt net1
    minimize ce(net2, y) wrt net2
    optimizer sgd(lr=1e-30)
    epochs 1
    MAP
}
evaluate accuracy, xross(net1, net2)
"""


def test_map_channels_in_a_run_permutes_net2_and_keeps_every_network_s_function(tmp_path):
    """lr 1e-30: training leaves the weights as they started (BatchNorm statistics follow each network's
    own batches), so a run with `map_channels` differs from one without only by the mapping: net2's
    channels at the cut are permuted, its function is not."""
    runs = {}
    for name, setting in (("mapped", "map_channels bmm_std"), ("plain", "")):
        spec = _spec(tmp_path, MAPPED.replace("MAP", setting), f"{name}.xspec")
        _run(spec, tmp_path / name, "-q")
        runs[name] = spec
    (report,) = json.loads((tmp_path / "mapped" / "checkpoints" / "xml_m" / "mapping.json").read_text())
    assert (report["reference"], report["network"], report["measure"]) == ("net1", "net2", "bmm_std")
    assert report["gale"] >= report["original"]
    assert not (tmp_path / "plain" / "checkpoints" / "xml_m" / "mapping.json").exists()
    mapped, plain = _modules(tmp_path / "mapped", "xml_m"), _modules(tmp_path / "plain", "xml_m")
    net1 = [k for k in plain if k.startswith("parts.net1.") and plain[k].is_floating_point()]
    net2 = [k for k in plain if k.startswith("parts.net2.up.") and k.endswith("weight")]
    assert all(torch.allclose(mapped[k], plain[k], atol=1e-6) for k in net1)
    assert any(not torch.allclose(mapped[k], plain[k], atol=1e-3) for k in net2)  # permuted
    exps = {}
    for name in runs:
        exps[name] = xdsl.load(runs["plain"])
        exps[name].compiled.root.load_state_dict(_modules(tmp_path / name, "xml_m"))
        exps[name].set_train_mode(False)
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        for net in ("net1", "net2"):
            torch.testing.assert_close(exps["mapped"].forward(net, x), exps["plain"].forward(net, x),
                                       rtol=1e-4, atol=1e-5)
        cross = [e.forward("net1.up >> net2.down", x) for e in (exps["mapped"], exps["plain"])]
    assert not torch.allclose(*cross, rtol=1e-3, atol=1e-4)  # the cross path sees net2's channels reordered
