"""Features of a path at a named layer, for `retrieval(...)` (the DML paper's Market-1501 evaluation).

    evaluate retrieval(net1, net2, net1.up >> net2.down, feature="pool")

A path runs up to the named feature: a module path or fx node name of the path's *last* network (the
last part on the path that contains it is split there with the cut machinery, so any valid cut point
works, crossed paths included). Without `feature` it is that network's last pooling layer, "the feature
of the last pooling layer" of the paper.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from xdsl.compile.cut import cut_model
from xdsl.errors import XdslError
from xdsl.lang import ir

__all__ = ["POOLING", "FeaturePaths", "default_feature"]

POOLING = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool1d)


def default_feature(network: nn.Module) -> str:
    """The last pooling layer of a network (module order), e.g. `avgpool` of a ResNet, `pool.0` of MobileNet."""
    pools = [name for name, m in network.named_modules() if isinstance(m, POOLING)]
    if not pools:
        raise XdslError(f"{type(network).__name__} has no pooling layer to take the retrieval feature from",
                        hint='name one with feature="<module path or fx node name>"')
    return pools[-1]


class FeaturePaths:
    """Modules that run a path up to a named feature; truncated parts are built once and reused.

    `module_of(step)` gives the module of a path step (the compiled root's part or adapter);
    `networks` the whole networks, for the default feature.
    """

    def __init__(self, module_of: Callable[[ir.Step], nn.Module], networks: dict[str, nn.Module]):
        self.module_of = module_of
        self.networks = networks
        self._heads: dict[tuple[int, str], nn.Module | None] = {}

    def feature_name(self, path: ir.Path, feature: str) -> str:
        last = [s for s in path.steps if isinstance(s, ir.PartStep)]
        if not last:
            raise XdslError(f"path {path} has no network part to take a feature from")
        return feature or default_feature(self.networks[last[-1].net])

    def modules(self, path: ir.Path, feature: str) -> list[nn.Module]:
        """The path's modules, the last one cut right after `feature` (searched from the path's end)."""
        k, head = self.head(path, feature)
        return [self.module_of(s) for s in path.steps[:k]] + [head]

    def head(self, path: ir.Path, feature: str) -> tuple[int, nn.Module]:
        """(index of the step holding `feature`, that step's module cut right after it); an XdslError when
        the path's last network has no such layer on the path."""
        name = self.feature_name(path, feature)
        net = [s for s in path.steps if isinstance(s, ir.PartStep)][-1].net
        for k in range(len(path.steps) - 1, -1, -1):
            step = path.steps[k]
            if isinstance(step, ir.PartStep) and step.net == net:
                head = self._head(self.module_of(step), name)
                if head is not None:
                    return k, head
        raise XdslError(f"feature '{name}' is not in {net}'s part(s) on path {path}",
                        hint="name a module path or fx node name of the path's last network (a valid cut point)")

    def _head(self, part: nn.Module, name: str) -> nn.Module | None:
        """`part` up to and including `name`; the part itself when `name` ends it; None when absent."""
        key = (id(part), name)
        if key not in self._heads:
            try:
                head = cut_model(part, [name], ["head", "tail"])["head"]
            except XdslError as e:
                if e.message.startswith("unknown cut point") or "is not a step" in e.message:
                    head = None
                elif "is at the end of the network" in e.message:
                    head = part
                else:
                    raise XdslError(f"retrieval feature '{name}': {e.message}", e.hint) from None
            self._heads[key] = head
        return self._heads[key]
