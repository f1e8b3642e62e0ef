"""Every front-end command on every spec: each shipped spec and plain user-style specs (an uncut KD,
a cohort DML, the BYOT macro, adapters) go through check, expand, compile (table, --json, --code) and
graph in every format, in-process, and each exits 0 without a traceback.

The specs are compiled once per spec and command kind (the meta-device build is the slow part):
`check --strict` builds its own, the other commands share one.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import xdsl.experiment
from xdsl.cli import app

SHIPPED = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.xspec"))

PLAIN = {
    "uncut_kd": """data digits(batch_size=32)
network teacher = builtin.cnn(num_classes=10, in_channels=1, width=16)
network student = builtin.cnn(num_classes=10, in_channels=1, width=4)
train pretrain { minimize ce(teacher, y) wrt teacher; optimizer sgd(lr=0.1, momentum=0.9); epochs 2 }
train kd after pretrain { minimize 0.9 * kl(teacher, student, T=4) + 0.1 * ce(student, y) wrt student }
evaluate accuracy, xross(teacher, student), latency(teacher, student)
""",
    "cohort_dml": """data digits(batch_size=32)
network a, b, c = builtin.cnn(num_classes=10, in_channels=1, width=4)
dml(a, b, c, epochs=2, optimizer=adam(lr=1e-3))
dml(a, b, c, teacher="ensemble", name=dml_e, order=simultaneous)
evaluate accuracy, ensemble(a, b, c), entropy(a), flatness(a, sigmas=[0.0, 0.01], draws=1)
""",
    "byot_macro": """data digits(batch_size=32)
network net = builtin.cnn(num_classes=10, in_channels=1, width=8)
cut net at "layer1", "layer2", "pool" into s1, s2, s3, fc
byot(net, epochs=2)
evaluate accuracy(net.s1 >> net_neck1 >> net_fc1, net)
""",
    "adapters": """data digits(batch_size=32)
network net1 = builtin.cnn(num_classes=10, in_channels=1, width=8)
network net2 = builtin.cnn(num_classes=10, in_channels=1, width=16)
cut net1, net2 at "layer2" into up, down
adapter a12 = conv1x1(relu=true) owner net1
adapter a21 = conv1x1(relu=true) owner net2
loss xm(s, t, ab, ba) = ce(s, y) + ce(s.up >> ab >> t.down, y) + kl(t, t.up >> ba >> s.down)
train {
    minimize xm(net1, net2, a12, a21) wrt net1
    minimize xm(net2, net1, a21, a12) wrt net2
}
evaluate xross(net1, net2), mapping(net1, net2)
""",
}

COMMANDS = {
    "check": ["check", "--strict"],
    "expand": ["expand"],
    "compile": ["compile"],
    "compile_json": ["compile", "--json"],
    "compile_code": ["compile", "--code"],
    "graph_dot": ["graph", "--format", "dot"],
    "graph_mermaid": ["graph", "--format", "mermaid"],
    "graph_svg": ["graph", "--format", "svg"],
    "graph_png": ["graph", "--format", "png"],
}


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("plain")
    for name, text in PLAIN.items():
        (d / f"{name}.xspec").write_text(text)
    return d


@pytest.fixture(scope="module", autouse=True)
def compile_once():
    """One meta-device build per spec for the commands after `check` (which builds its own)."""
    original = xdsl.experiment.compile_program
    cached = functools.lru_cache(maxsize=None)(
        lambda path, device, allow_imports, strict: original(path, device=device, allow_imports=allow_imports,
                                                              strict=strict))

    def compile_program(path, *, device="cpu", allow_imports=False, overrides=None, strict=False, **kw):
        if overrides or kw:
            return original(path, device=device, allow_imports=allow_imports, overrides=overrides, strict=strict,
                            **kw)
        return cached(Path(path).resolve(), str(device), allow_imports, strict)

    xdsl.experiment.compile_program = compile_program
    yield
    xdsl.experiment.compile_program = original


CASES = [(p.name, cmd) for p in SHIPPED for cmd in COMMANDS] + [(f"{n}.xspec", cmd) for n in PLAIN for cmd in COMMANDS]


@pytest.mark.parametrize("spec,command", CASES, ids=[f"{s}-{c}" for s, c in CASES])
def test_every_command_on_every_spec_exits_0_without_a_traceback(spec: str, command: str, plain_dir: Path,
                                                                  tmp_path: Path) -> None:
    path = next((p for p in SHIPPED if p.name == spec), plain_dir / spec)
    args = [*COMMANDS[command], str(path)]
    if command.startswith("graph_"):
        args += ["--out", str(tmp_path / f"graph.{command.split('_')[1]}")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and result.exception is None
    if command == "compile_json":
        summary = json.loads(result.output)
        for item in summary["evaluate"]:
            if item["kind"] in ("xross", "latency"):
                assert item["paths"] and all("params" in p or "status" in p for p in item["paths"])
    if command.startswith("graph_") and command not in ("graph_dot", "graph_mermaid"):
        image = tmp_path / f"graph.{command.split('_')[1]}"
        drawn = [image] if shutil.which("dot") else [image.with_suffix(".dot"), image.with_suffix(".mmd")]
        assert all(f.stat().st_size > 0 for f in drawn)  # without Graphviz: the DOT and Mermaid texts instead


def test_compile_json_lists_the_xross_combinations_with_params_and_shapes(plain_dir: Path) -> None:
    result = CliRunner().invoke(app, ["compile", "--json", str(plain_dir / "adapters.xspec")])
    summary = json.loads(result.output)
    (xross,) = [i for i in summary["evaluate"] if i["kind"] == "xross"]
    assert [p["path"] for p in xross["paths"]] == ["net1.up >> net1.down", "net1.up >> a12 >> net2.down",
                                                   "net2.up >> a21 >> net1.down", "net2.up >> net2.down"]
    assert all(p["output_shape"] == [10] and p["params"] > 0 for p in xross["paths"])
    # the adapter's parameters are counted in the path that uses it
    parts = {(p["network"], p["part"]): p["params"] for p in summary["parts"]}
    a12 = next(a["params"] for a in summary["adapters"] if a["name"] == "a12")
    assert xross["paths"][1]["params"] == parts[("net1", "up")] + a12 + parts[("net2", "down")]
