"""`xdsl eval SPEC --checkpoint FILE`: load saved weights into the spec's modules, run its evaluate clause."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xdsl.checkpoint import load_checkpoint
from xdsl.compile.pretrained import without_pretrained_files
from xdsl.compile.stateful import adopt_term_sizes
from xdsl.compile.weights import state_mismatch
from xdsl.console import make_console, print_table
from xdsl.data import build_data
from xdsl.errors import SpecError, XdslError
from xdsl.eval.evaluate import default_items, evaluate_items
from xdsl.eval.tables import render_results
from xdsl.experiment import Experiment, compile_program
from xdsl.train.device import pick_device

__all__ = ["evaluate_checkpoint"]


def _run_seed(state: dict[str, Any], checkpoint: Path) -> int:
    """The seed of the run that wrote the checkpoint: it fixes the validation split (`val_fraction`), so the
    training set `split="train"` scores is the one that run trained on. Older checkpoints do not record it;
    their run directory's environment.json does."""
    if isinstance(state.get("seed"), int):
        return int(state["seed"])
    env = Path(checkpoint).resolve().parents[2] / "environment.json" if len(Path(checkpoint).resolve().parents) > 2 \
        else None
    try:
        return int(json.loads(env.read_text())["seed"]) if env is not None else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def evaluate_checkpoint(spec: Path, checkpoint: Path, *, device: str = "auto",
                        allow_imports: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint written by `xdsl run` and print the tables; return the results."""
    dev = pick_device(device)
    with without_pretrained_files():  # the checkpoint replaces them: no ImageNet file needed to evaluate
        compiled = compile_program(spec, device=dev, allow_imports=allow_imports)
    state = load_checkpoint(checkpoint, dev)
    modules = state.get("modules") if isinstance(state, dict) else None
    if isinstance(modules, dict):
        adopt_term_sizes(compiled.terms, modules)  # memory banks sized by the data the run trained on
    problem = "it is not an xdsl checkpoint (no 'modules')" if not isinstance(modules, dict) else \
        state_mismatch(compiled.root.state_dict(), modules)
    if problem:
        raise XdslError(f"checkpoint '{checkpoint}' does not fit the spec's modules: {problem}",
                        hint="evaluate a checkpoint with the spec that wrote it (its run directory's spec.xspec)")
    compiled.root.load_state_dict(modules)
    exp = Experiment(compiled)
    if state.get("stage") in {s.name for s in compiled.program.stages}:
        exp.use_stage(state["stage"])  # evaluate as that block left things (e.g. which adapters link parts)
    program = compiled.program
    if program.data is None:
        raise SpecError("the spec has no 'data' statement, so it cannot be evaluated", None)
    bundle = build_data(program.data.name, program.data.kwargs, spec_dir=Path(spec).resolve().parent,
                        seed=_run_seed(state, checkpoint), allow_imports=allow_imports)
    items = program.evaluate or default_items(bundle)
    results = evaluate_items(exp, bundle.test_loader(), items, device=dev, data=bundle)
    console = make_console()
    for table in render_results(results):
        print_table(console, table)
    return results
