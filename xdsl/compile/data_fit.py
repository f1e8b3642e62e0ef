"""Do the networks fit the data? Known only once the data is built (its class count, its sample shape).

`xdsl check` shapes the networks from the data statement alone; a run then builds the data and learns how
many classes it has. A network with fewer outputs than classes makes `ce` index past its logits (a
traceback at the first step, or on CUDA an assert); with mixup/cutmix the soft labels have one column per
class, so the outputs must match exactly. Both are errors located at the loss term that meets the labels,
before training; a network whose class outputs never meet the labels (a teacher used for its features) is free.
More outputs than classes trains, but the extra logits take softmax mass no label asks for: a located warning.
"""

from __future__ import annotations

import warnings

from xdsl.compile.assemble import Compiled
from xdsl.compile.graph import path_node
from xdsl.data.bundle import DataBundle
from xdsl.errors import SpecError, SpecErrors, SpecWarning, XdslWarning
from xdsl.lang import ir
from xdsl.losses import primitive_spec

__all__ = ["check_data_fit", "check_ranked_k"]


def _labelled_logits(compiled: Compiled):
    """(path, its output width, the loss term) for every path whose class outputs meet the labels `y` in a loss
    term: networks used only for features (a teacher's body) or only evaluated are free to have other widths."""
    seen = set()
    for stage in compiled.program.stages:
        for term in stage.objectives.values():
            for prim in ir.term_leaves(term):
                if not any(isinstance(a, ir.Labels) for a in prim.args):
                    continue
                spec = primitive_spec(prim)
                kinds = [p.kind for p in spec.params] if spec is not None else ["logits"] * len(prim.args)
                paths = [m for k, a in zip(kinds, prim.args) if k == "logits"  # features (crd's) are free
                         for m in (a.members if isinstance(a, ir.Ensemble) else (a,)) if isinstance(m, ir.Path)]
                for path in paths:
                    shape = compiled.graph.nodes[path_node(path)].get("shape") if path_node(path) in compiled.graph \
                        else None
                    if shape is not None and len(shape) == 2 and (str(path), prim.pos) not in seen:
                        seen.add((str(path), prim.pos))
                        yield path, int(shape[-1]), prim


def check_data_fit(compiled: Compiled, bundle: DataBundle) -> None:
    """Raise located errors for loss terms whose class outputs cannot take the data's labels."""
    classes = int(bundle.num_classes)
    soft = bundle.batch_mix is not None
    errors: list[SpecError] = []
    for path, outputs, prim in _labelled_logits(compiled):
        if outputs > classes and not soft:  # trains, but not the classifier the data asks for
            net = path.steps[-1].net if isinstance(path.steps[-1], ir.PartStep) else str(path)
            warnings.warn(XdslWarning(SpecWarning(
                f"{prim.name}(): {path} has {outputs} class outputs, but data "
                f"{bundle.name or compiled.program.data.name} has {classes} classes: {outputs - classes} of them "
                "never see a label, yet share the softmax", prim.pos,
                f"build {net} with num_classes={classes} (a pretrained head: new_head=true)").render()), stacklevel=2)
        if outputs < classes or (soft and outputs != classes):
            why = ("mixup/cutmix labels have one column per class" if soft and outputs > classes
                   else f"labels go up to {classes - 1}")
            net = path.steps[-1].net if isinstance(path.steps[-1], ir.PartStep) else str(path)
            errors.append(SpecError(
                f"{prim.name}(): {path} has {outputs} class outputs, but data "
                f"{bundle.name or compiled.program.data.name} has {classes} classes ({why})", prim.pos,
                f"build {net} with num_classes={classes}"))
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise SpecErrors(errors)


def check_ranked_k(compiled: Compiled) -> None:
    """`ranked(k=K)` asks for the K largest class probabilities; more than the networks' class outputs would
    be silently cut to their number while the tables and results still said K."""
    classes = compiled.num_classes
    for item in compiled.program.evaluate:
        k = item.kwargs.get("k", 5) if item.kind == "ranked" else 0
        if classes and k > classes:
            raise SpecError(f"ranked(): k={k} is more than the {classes} classes the networks output", item.pos,
                            f"k={classes} shows the whole posterior, e.g. ranked(k={min(5, classes)})")
