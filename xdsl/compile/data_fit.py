"""Do the networks fit the data? Known only once the data is built (its class count, its sample shape).

`xdsl check` shapes the networks from the data statement alone; a run then builds the data and learns how
many classes it has. A network with fewer outputs than classes makes `ce` index past its logits (a
traceback at the first step, or on CUDA an assert); with mixup/cutmix the soft labels have one column per
class, so the outputs must match exactly. Both are errors located at the network statement, before training.
"""

from __future__ import annotations

from xdsl.compile.assemble import Compiled
from xdsl.compile.graph import path_node
from xdsl.data.bundle import DataBundle
from xdsl.errors import SpecError, SpecErrors

__all__ = ["check_data_fit", "check_ranked_k"]


def check_data_fit(compiled: Compiled, bundle: DataBundle) -> None:
    """Raise located errors for networks whose class outputs cannot take the data's labels."""
    program = compiled.program
    classes = int(bundle.num_classes)
    soft = bundle.batch_mix is not None
    errors: list[SpecError] = []
    for net, decl in program.networks.items():
        node = path_node(program.natural_path(net))
        shape = compiled.graph.nodes[node].get("shape") if node in compiled.graph else None
        if shape is None or len(shape) != 2:  # not class logits (a feature extractor)
            continue
        outputs = int(shape[-1])
        if outputs < classes or (soft and outputs != classes):
            why = ("mixup/cutmix labels have one column per class" if soft and outputs > classes
                   else f"labels go up to {classes - 1}")
            errors.append(SpecError(
                f"network '{net}' has {outputs} class outputs, but data {bundle.name or program.data.name} has "
                f"{classes} classes ({why})", decl.pos, f"build it with num_classes={classes}"))
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
