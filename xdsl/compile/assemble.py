"""ir.Program -> real modules: build every network, cut it into parts, infer shapes, create adapters.

Errors from these stages are re-raised as SpecErrors at the statement that caused them.
Runs on the meta device for `xdsl check` (no memory, no compute) and on the real device to train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch
from torch import nn

from xdsl.adapters import make_adapter
from xdsl.compile.build import build_model
from xdsl.compile.cut import cut_model
from xdsl.compile.features import FeaturePaths
from xdsl.compile.graph import build_graph, path_node
from xdsl.compile.stateful import build_term_modules
from xdsl.compile.weights import load_network_weights, split_selector
from xdsl.data.params import resolve_spec_path
from xdsl.errors import SpecError, SpecErrors, XdslError
from xdsl.lang import ir
from xdsl.lang.terms import WHOLE
from xdsl.shapes import infer_shapes

__all__ = ["Compiled", "assemble", "input_shape_of"]

DEFAULT_INPUT_SHAPE = (3, 224, 224)  # ImageNet-sized, for specs with no `data` statement


def input_shape_of(program: ir.Program, spec_dir: Path | None = None, allow_imports: bool = False
                   ) -> tuple[int, ...]:
    """The shape of one input sample, from the `data` statement alone (a user data function is called for it)."""
    if program.data is None:
        return DEFAULT_INPUT_SHAPE
    from xdsl.data import input_shape

    try:
        shape = input_shape(program.data.name, program.data.kwargs, spec_dir=spec_dir, allow_imports=allow_imports)
    except XdslError as e:
        raise SpecError(e.message, program.data.pos, e.hint) from None
    return shape or DEFAULT_INPUT_SHAPE


@dataclass
class Compiled:
    """Modules and graph of a spec. `root.parts[net][part]` and `root.adapters[name]` share parameters
    with `networks[net]`; `graph` nodes of kind part/adapter carry their output `shape`."""

    program: ir.Program
    networks: dict[str, nn.Module]
    root: nn.Module
    graph: nx.DiGraph
    input_shape: tuple[int, ...]
    num_classes: int
    device: torch.device
    notes: list[str] = field(default_factory=list)  # pretrained weights loaded or missing, heads replaced

    @property
    def parts(self) -> dict[str, dict[str, nn.Module]]:
        return {net: dict(parts.items()) for net, parts in self.root.parts.items()}

    @property
    def adapters(self) -> dict[str, nn.Module]:
        return dict(self.root.adapters.items())

    @property
    def terms(self) -> dict[str, nn.Module]:
        """Stateful loss terms' modules by name (`xdsl.compile.stateful`)."""
        terms = getattr(self.root, "terms", None)
        return dict(terms.items()) if terms is not None else {}


def _located(e: XdslError, pos) -> SpecError:
    return SpecError(e.message, pos, e.hint)


def _build_networks(program: ir.Program, device: str, spec_dir: Path | None, allow_imports: bool,
                    notes: list[str]) -> tuple[dict[str, nn.Module], nn.ModuleDict]:
    networks: dict[str, nn.Module] = {}
    parts = nn.ModuleDict()
    errors: list[SpecError] = []
    for name, decl in program.networks.items():
        try:
            said: list[str] = []
            model = build_model(decl.ref, decl.kwargs, device=device, spec_dir=spec_dir, allow_imports=allow_imports,
                                notes=said)
            notes += [f"network {name}: {line}" for line in said]
            if decl.weights:
                file, _ = split_selector(decl.weights)
                weights = resolve_spec_path(file, spec_dir, "weights file") if spec_dir is not None else Path(file)
                if not weights.is_file():
                    raise XdslError(f"weights file '{weights}' does not exist",
                                    hint="give a state_dict file (torch.save(net.state_dict(), path)) or a run's "
                                         "checkpoints/<block>/final.pt")
                load_network_weights(model, decl.weights, weights, name, decl.ref, device)
        except XdslError as e:
            error = _located(e, decl.pos)
            if not any(str(seen) == str(error) for seen in errors):  # a cohort `a, b = ...` fails once, not per copy
                errors.append(error)
            continue
        networks[name] = model
        if name in program.cuts:
            cut = program.cuts[name]
            try:
                parts[name] = nn.ModuleDict(cut_model(model, list(cut.points), list(cut.parts)))
            except XdslError as e:
                errors.append(SpecError(f"cannot cut {name} ({decl.ref}): {e.message}", cut.pos, e.hint))
        else:
            parts[name] = nn.ModuleDict({WHOLE: model})
    if errors:
        raise errors[0] if len(errors) == 1 else SpecErrors(errors)
    return networks, parts


def _check_retrieval_features(program: ir.Program, networks: dict[str, nn.Module], parts: nn.ModuleDict) -> None:
    """Every `retrieval(...)` path has its feature layer (a located error at the item otherwise)."""
    features = FeaturePaths(lambda step: parts[step.net][step.part], networks)
    for item in program.evaluate:
        if item.kind != "retrieval":
            continue
        paths = [a for a in item.args if isinstance(a, ir.Path)] or [program.natural_path(n) for n in networks]
        for path in paths:
            try:
                features.head(path, str(item.kwargs.get("feature", "")))
            except XdslError as e:
                raise SpecError(f"retrieval(): {e.message}", item.pos, e.hint) from None


def _use_pos(g: nx.DiGraph, node: str, program: ir.Program | None = None):
    """Where in the spec a path is used: the first loss term reaching it, else the evaluate item
    naming it, else the declaration of its last network or adapter (so every error is located)."""
    for succ in nx.descendants(g, node):
        prim = g.nodes[succ].get("prim")
        if prim is not None:
            return prim.pos
    if program is None:
        return None
    path, step = g.nodes[node].get("path"), g.nodes[node].get("step")
    for item in program.evaluate:
        for arg in item.args:
            if isinstance(arg, ir.Path) and path is not None and arg.steps[: len(path.steps)] == path.steps:
                return item.pos
    if isinstance(step, ir.AdapterStep) and step.name in program.adapters:
        return program.adapters[step.name].pos
    if isinstance(step, ir.PartStep) and step.net in program.networks:
        return program.networks[step.net].pos
    return None


def _adapter_out_shape(g: nx.DiGraph, node: str, shapes: dict[str, torch.Size], program: ir.Program,
                       num_classes: int) -> tuple[torch.Size | None, int | None]:
    """What an adapter must output: the input of the part after it, or the other side of a feature loss."""
    for succ in g.successors(node):
        data = g.nodes[succ]
        if data["kind"] == "part":
            step: ir.PartStep = data["step"]
            return shapes[path_node(program.natural_path(step.net, step.index))], None
        if data["kind"] == "term":
            prim: ir.Prim = data["prim"]
            for arg in prim.args:
                if isinstance(arg, ir.Path) and path_node(arg) != node and path_node(arg) in shapes:
                    return shapes[path_node(arg)], None
    return None, num_classes


def _natural_chains(program: ir.Program, graph: nx.DiGraph) -> list[str]:
    """Add every network's own chain of parts to `graph` (their shapes say what each part expects as
    input, so they are shaped first) and return their nodes in order."""
    natural: list[str] = []
    for net in program.networks:
        for k in range(len(program.parts[net])):
            path = program.natural_path(net, k + 1)
            if path_node(path) not in graph:
                graph.add_node(path_node(path), kind="part", path=path, step=path.steps[-1], owner=net, owners=(net,),
                               target=f"parts.{net}.{path.steps[-1].part}", label=str(path.steps[-1]))
                graph.add_edge(path_node(path.prefix(k)) if k else "x", path_node(path))
            natural.append(path_node(path))
    return natural


def _out_shape(module: nn.Module, in_shape: torch.Size, cache: dict, graph: nx.DiGraph, node: str,
               program: ir.Program) -> torch.Size:
    """Output shape of `module` on `in_shape` (meta device, cached: a part meets one shape in many paths)."""
    data = graph.nodes[node]
    try:
        key = (id(module), tuple(in_shape))
        if key not in cache:
            (cache[key],) = infer_shapes([module], torch.empty(in_shape, device="meta"))
        return cache[key]
    except XdslError as e:
        raise SpecError(f"{data['path']}: {e.message}", _use_pos(graph, node, program), e.hint) from None
    except Exception as e:  # a part that cannot take this input at all
        raise SpecError(f"{data['path']}: {data['step']} cannot take an input of shape {tuple(in_shape)} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                        _use_pos(graph, node, program) or program.networks[data['owner']].pos) from None


def assemble(program: ir.Program, *, device: str | torch.device = "cpu", spec_dir: Path | None = None,
             allow_imports: bool = False, input_shape: tuple[int, ...] | None = None) -> Compiled:
    """Build, cut and shape-check every network and adapter of a checked program."""
    device = torch.device(device)
    input_shape = tuple(input_shape or input_shape_of(program, spec_dir, allow_imports))
    notes: list[str] = []
    networks, parts = _build_networks(program, "meta" if device.type == "meta" else "cpu", spec_dir, allow_imports,
                                      notes)
    _check_retrieval_features(program, networks, parts)
    graph = build_graph(program)
    natural = _natural_chains(program, graph)
    shapes: dict[str, torch.Size] = {"x": torch.Size((2, *input_shape))}
    adapters = nn.ModuleDict()
    adapter_io: dict[str, tuple[torch.Size, torch.Size]] = {}
    modules_device = "meta" if device.type == "meta" else "cpu"
    num_classes = 0
    shape_cache: dict[tuple[int, tuple[int, ...]], torch.Size] = {}
    rest = [n for n in nx.topological_sort(graph) if n not in set(natural)]
    try:
        for node in natural + rest:
            data = graph.nodes[node]
            if data["kind"] not in ("part", "adapter"):
                continue
            (parent,) = graph.predecessors(node)
            in_shape = shapes[parent]
            step = data["step"]
            if isinstance(step, ir.PartStep):
                module = parts[step.net][step.part]
                if step.index > 0:
                    expected = shapes.get(path_node(program.natural_path(step.net, step.index)))
                    if expected is not None and tuple(expected) != tuple(in_shape):
                        raise SpecError(
                            f"shape mismatch in path {data['path']}: "
                            f"{data['path'].prefix(len(data['path'].steps) - 1)} "
                            f"gives {tuple(in_shape)}, but {step} expects {tuple(expected)}",
                            _use_pos(graph, node, program),
                            f"put an adapter between them, e.g. `adapter a = conv1x1(relu=true) owner {step.net}`")
            else:
                decl = program.adapters[step.name]
                if step.name not in adapters:
                    out_shape, classes = _adapter_out_shape(graph, node, shapes, program, num_classes)
                    try:
                        with torch.device(modules_device):
                            adapters[step.name] = make_adapter(decl.kind, decl.kwargs, in_shape, out_shape, classes)
                    except XdslError as e:
                        raise SpecError(f"adapter '{step.name}': {e.message}", decl.pos, e.hint) from None
                module = adapters[step.name]
            out_shape = _out_shape(module, in_shape, shape_cache, graph, node, program)
            if isinstance(step, ir.AdapterStep):
                seen = adapter_io.setdefault(step.name, (in_shape, out_shape))
                if tuple(seen[0]) != tuple(in_shape):
                    raise SpecError(f"adapter '{step.name}' is used on inputs of shapes {tuple(seen[0])} and "
                                    f"{tuple(in_shape)}; an adapter has one shape", _use_pos(graph, node, program))
            shapes[node] = out_shape
            data["shape"] = tuple(out_shape)
            data["params"] = sum(p.numel() for p in module.parameters())
            if isinstance(step, ir.PartStep) and step.index == len(program.parts[step.net]) - 1 and not num_classes:
                num_classes = int(out_shape[-1])
    except SpecError as e:
        if program.data is not None:
            raise
        raise SpecError(f"{e.message} (the spec has no 'data' statement, so the input shape is unknown and "
                        f"{tuple(input_shape)} was assumed)", e.pos,
                        "add the data statement, e.g. data digits(batch_size=64), to check with its input shape") \
            from None
    root = nn.Module()
    root.parts = parts
    root.adapters = adapters
    root.terms = build_term_modules(program, graph, shapes, modules_device)
    if device.type != "meta":
        root.to(device)
        for model in networks.values():
            model.to(device)
    return Compiled(program, networks, root, graph, input_shape, num_classes, device, notes)
