"""Seed experiments as shipped specs: each seed-sized spec has a CPU twin, both check on the meta device,
the twins train every block, and the README's seed table names them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from xdsl.experiment import compile_program
from xdsl.train.runner import RunOptions, run

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"

# seed-sized spec -> its CPU twin (digits or synthetic), for the experiments this table covers
TWINS = {
    "xml_adapters_resnext50_resnet18_tinyimagenet": "xml_adapters_regimes_digits",
    "xml_multicut_3parts_resnet34_resnet18_tinyimagenet": "xml_multicut_baselines_digits",
    "xml_m_channel_mapping_resnet34_resnet18_tinyimagenet": "xml_m_channel_mapping_digits",
    "xml_m_cohort3_wrn50_resnet50_resnext50_tinyimagenet": "xml_m_cohort3_digits",
    "byot_resnet18_cifar100": "byot_digits",
    "born_again_wrn_cifar100": "born_again_digits",
    "dml_variants_resnet32_wrn_cifar100": "dml_variants_digits",
    "dml_cohort_sizes_resnet32_cifar100": "dml_cohort_sizes_synthetic",
    "born_again_cifar10": "born_again_cifar10_digits",
}


@pytest.mark.parametrize("name", sorted(set(TWINS) | set(TWINS.values())))
def test_seed_spec_and_twin_check_on_the_meta_device(name):
    compiled = compile_program(SPECS / f"{name}.xspec", device="meta")
    assert compiled.program.stages


@pytest.mark.parametrize(("seed_spec", "twin"), sorted(TWINS.items()))
def test_twin_has_the_seed_specs_train_blocks(seed_spec, twin):
    """A twin runs the same experiment: the same blocks (the seed spec may add a pretraining block)."""
    big = [s.name for s in compile_program(SPECS / f"{seed_spec}.xspec", device="meta").program.stages]
    small = [s.name for s in compile_program(SPECS / f"{twin}.xspec", device="meta").program.stages]
    if seed_spec == "born_again_cifar10":  # two of the table's eight networks
        big = [b for b in big if b.startswith(("wrn28_1_", "dense112_33_"))]
        small = [b.replace("wrn_", "wrn28_1_").replace("dense_", "dense112_33_") for b in small]
    assert set(small) <= set(big) and len(big) - len(small) <= 1, (big, small)


@pytest.mark.parametrize("twin", ["xml_adapters_regimes_digits", "xml_multicut_baselines_digits",
                                  "xml_m_cohort3_digits", "byot_digits", "born_again_cifar10_digits"])
def test_twin_trains_every_block(twin, tmp_path):
    out = tmp_path / "run"
    torch.manual_seed(0)
    run(SPECS / f"{twin}.xspec", RunOptions(out=out, quiet=True, epochs=1, device="cpu"))
    results = json.loads((out / "results.json").read_text())
    stages = [s.name for s in compile_program(SPECS / f"{twin}.xspec", device="meta").program.stages]
    assert list(results["stages"]) == stages
    for name in stages:
        assert (out / "checkpoints" / name / "final.pt").exists()


def test_readme_seed_table_names_shipped_specs():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Seed experiments", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w]+\.xspec)`", table))
    assert named, "the README has a seed-experiment table"
    assert all((SPECS / n).exists() for n in named), sorted(n for n in named if not (SPECS / n).exists())
    assert {f"{n}.xspec" for n in TWINS} | {f"{n}.xspec" for n in TWINS.values()} <= named
