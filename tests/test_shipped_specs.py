"""Every shipped spec is built, cut and shape-inferred on the meta device (no weights, no data): `xdsl
check` accepts it, every part and adapter on the compiled graph has an output shape, the parts of a
network hold all its parameters, and every path that ends at a network's last part gives num_classes
logits."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from xdsl.cli import app
from xdsl.experiment import compile_program
from xdsl.lang import ir

SPECS = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.xspec"))


def test_the_seed_sized_specs_are_among_them():
    names = {p.stem for p in SPECS}
    assert len({n for n in names if n.endswith("tinyimagenet")}) >= 6 and "dml_cohort_resnet32_cifar100" in names


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_spec_builds_cuts_and_infers_shapes_on_meta(spec: Path):
    result = CliRunner().invoke(app, ["check", str(spec)])
    assert result.exit_code == 0 and result.output.startswith(f"ok: {spec}: "), result.output
    compiled = compile_program(spec, device="meta")
    program, graph, classes = compiled.program, compiled.graph, compiled.num_classes
    assert classes >= 10 and program.networks
    for net, module in compiled.networks.items():
        assert all(p.is_meta for p in module.parameters())  # nothing was allocated
        parts = compiled.parts[net]
        assert list(parts) == list(program.parts[net])
        in_parts = {id(p) for part in parts.values() for p in part.parameters()}
        assert in_parts == {id(p) for p in module.parameters()}, f"{net}: parts do not hold all its parameters"
    modules = [(n, d) for n, d in graph.nodes(data=True) if d["kind"] in ("part", "adapter")]
    assert modules
    for node, data in modules:
        shape = data.get("shape")
        assert shape is not None and len(shape) >= 2 and all(d > 0 for d in shape), (node, shape)
        last = data["step"]
        if isinstance(last, ir.PartStep) and last.index == len(program.parts[last.net]) - 1:
            assert tuple(shape[1:]) == (classes,), (node, shape)
