"""Imports run one way: nouns -> lang -> compile -> eval/experiment -> train -> cli, with no cycle.

Read from the source with `ast` (every import, including those inside functions; imports under
`if TYPE_CHECKING:` are type hints, not run-time dependencies), so the structure is checked, not
eyeballed. ARCHITECTURE.md describes the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1] / "xdsl"

# module-name prefixes, lowest layer first; the longest matching prefix decides a module's layer
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("nouns", ("xdsl.errors", "xdsl.registry", "xdsl.losses", "xdsl.models", "xdsl.mapping", "xdsl.data",
               "xdsl.adapters", "xdsl.shapes", "xdsl.rundir", "xdsl.distributed", "xdsl.console", "xdsl.checkpoint",
               "xdsl")),  # the package root (`__version__`, errors) is imported before any module

    # evaluate items are language vocabulary like loss primitives: the checker reads their signatures
    ("lang", ("xdsl.lang", "xdsl.overrides", "xdsl.eval.item", "xdsl.eval.items", "xdsl.eval.paths",
              "xdsl.eval.table", "xdsl.eval.dynamic")),
    ("compile", ("xdsl.compile",)),
    ("eval/experiment", ("xdsl.eval", "xdsl.experiment", "xdsl.viz")),
    ("train", ("xdsl.train", "xdsl.report", "xdsl.trackers", "xdsl.sweep")),
    ("cli", ("xdsl.cli", "xdsl.__main__", "xdsl.compare")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer"
    return rank


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(path: Path) -> set[str]:
    """xdsl modules `path` imports at run time (a `from pkg import name` of a submodule counts as it)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("xdsl")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xdsl"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if _exists(sub) else node.module)
    return found


def _exists(module: str) -> bool:
    base = ROOT.parent.joinpath(*module.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        g.add_node(name)
        for target in _imports(path):
            if target != name:
                g.add_edge(name, target)
    return g


# the package root re-exports `xdsl.load` from inside a function: the API facade, not a dependency
FACADE = {("xdsl", "xdsl.experiment")}


def test_imports_never_run_up_a_layer():
    upward = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
              for a, b in _graph().edges if _layer(b) > _layer(a) and (a, b) not in FACADE]
    assert upward == []


def test_modules_import_each_other_in_no_cycle():
    g = _graph()
    g.remove_edges_from(FACADE)
    assert list(nx.simple_cycles(g)) == []


def test_the_checker_and_the_evaluate_items_do_not_reach_the_compiler():
    g = _graph()
    for start in ("xdsl.lang.check", "xdsl.eval.items"):
        reached = nx.descendants(g, start)
        assert not [m for m in reached if m.startswith(("xdsl.compile", "xdsl.eval.engine", "xdsl.experiment"))], start


def test_experiment_does_not_import_train_so_train_may_import_experiment():
    assert not [m for m in nx.descendants(_graph(), "xdsl.experiment") if m.startswith("xdsl.train")]


def test_no_module_of_the_package_imports_the_repository_only_benchmarks():
    offenders = [str(p) for p in ROOT.rglob("*.py")
                 if any(isinstance(n, ast.Import | ast.ImportFrom) and
                        ((getattr(n, "module", None) or "").startswith("benchmarks")
                         or any(a.name.startswith("benchmarks") for a in n.names))
                        for n in ast.walk(ast.parse(p.read_text())))]
    assert offenders == []


def test_the_grammar_sits_beside_its_parser_and_grammar_dir_links_to_it():
    from xdsl.lang.parser import grammar_path

    packaged = ROOT / "lang" / "xspec.lark"
    assert grammar_path() == packaged.resolve() and packaged.is_file() and not packaged.is_symlink()
    top = ROOT.parent / "grammar" / "xspec.lark"
    assert top.is_symlink() and top.resolve() == packaged.resolve()


def test_no_module_over_800_lines_and_no_function_over_80():
    """ARCHITECTURE.md's size rule: long modules and functions are split, not grown."""
    too_long = []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 800:
            too_long.append(f"{path.relative_to(ROOT.parent)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    too_long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, "\n".join(too_long)
