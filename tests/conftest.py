"""Test settings: one CPU thread (tiny models run faster single-threaded, and results are repeatable), and
every test seeded.

Each test starts from a seed of its own (a hash of its id, so it does not depend on which tests ran
before it), applied to Python's, NumPy's and torch's generators. A failing test prints its seed;
`XDSL_TEST_SEED=N pytest ...` replays it (or tries another seed).

Tests parametrized over the shipped specs skip a spec that names a timm model when timm (an optional
extra, in the `test` extra) is not installed: such a spec checks without its weight files, not without
timm.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def _seed_of(nodeid: str) -> int:
    return int(os.environ.get("XDSL_TEST_SEED", zlib.crc32(nodeid.encode())))


@pytest.fixture(autouse=True)
def test_seed(request) -> int:
    """The seed this test's random generators start from (also for tests that make their own generator)."""
    seed = _seed_of(request.node.nodeid)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seed = _seed_of(item.nodeid)
        report.sections.append(("random seed", f"this test ran with seed {seed}; replay: XDSL_TEST_SEED={seed} "
                                               f"pytest '{item.nodeid}'"))


SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"


@functools.cache
def _shipped_spec_needs_timm(name: str) -> bool:
    path = SPECS_DIR / name
    return path.is_file() and re.search(r"^network\b[^#\n]*\btimm\.", path.read_text(), re.M) is not None


def _timm_installed() -> bool:
    try:
        return importlib.util.find_spec("timm") is not None
    except ValueError:  # sys.modules["timm"] is None: imports of it fail
        return False


def pytest_collection_modifyitems(config, items):
    if _timm_installed():
        return
    skip = pytest.mark.skip(reason="the spec names a timm model and timm is not installed "
                                   "(pip install 'xdsl-distill[timm]')")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for value in params.values():
            if isinstance(value, (str, Path)) and str(value).endswith(".xspec") and \
                    Path(value).parent in (Path(), SPECS_DIR) and _shipped_spec_needs_timm(Path(value).name):
                item.add_marker(skip)
                break
