"""`map_channels <measure>` in a train block: align the networks' channels at the cut before training.

Seed 000 (XML_m): on one batch, match every other network's channels at the first cut to the first
network's by Gale–Shapley on a similarity measure, then permute that network's weights so its
channel perm[i] becomes channel i. The network computes exactly the same function afterwards;
only the cross paths (s.up >> t.down) see aligned channels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xdsl.errors import XdslError
from xdsl.lang import ir
from xdsl.mapping import channel_mapping, format_report, permute_cut_channels

__all__ = ["map_channels"]


def _halves(model: nn.Module, point: str) -> tuple[list[nn.Module], list[nn.Module]]:
    """Top-level children before/after a top-level cut point (sequential networks such as ResNets)."""
    children = list(model.named_children())
    names = [n for n, _ in children]
    if point not in names:
        raise XdslError(f"map_channels needs the cut at a top-level module (got '{point}')",
                        hint="cut at a stage such as \"layer2\", or use a ChannelPermutation adapter")
    k = names.index(point) + 1
    return [m for _, m in children[:k]], [m for _, m in children[k:]]


@torch.no_grad()
def map_channels(exp: Any, stage: ir.Stage, x: torch.Tensor, measure: str) -> list[dict[str, Any]]:
    """Permute every trained network after the first to match it at the first cut; return the reports."""
    program = exp.program
    nets = [n for n in stage.trained if n in program.cuts]
    if len(nets) < 2:
        raise XdslError(f"map_channels in train block '{stage.name}' needs two or more cut networks")
    reference, others = nets[0], nets[1:]
    modes = {n: exp.networks[n].training for n in nets}
    for n in nets:
        exp.networks[n].eval()
    try:
        first = {n: program.parts[n][0] for n in nets}
        ref_act = exp.parts[reference][first[reference]](x)
        reports = []
        for net in others:
            act = exp.parts[net][first[net]](x)
            report = channel_mapping(ref_act, act, measure)
            up, down = _halves(exp.networks[net], program.cuts[net].points[0])
            permute_cut_channels(up, down, report.perm)
            reports.append({"reference": reference, "network": net, "measure": measure,
                            "original": report.original, "random": report.random, "gale": report.gale,
                            "rounds": list(report.rounds), "text": format_report(report)})
    finally:
        for n, training in modes.items():
            exp.networks[n].train(training)
    return reports
