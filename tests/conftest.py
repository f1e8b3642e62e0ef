"""Test settings: one CPU thread (tiny models run faster single-threaded, and results are repeatable), and
every test seeded.

Each test starts from a seed of its own (a hash of its id, so it does not depend on which tests ran
before it), applied to Python's, NumPy's and torch's generators. A failing test prints its seed;
`XDSL_TEST_SEED=N pytest ...` replays it (or tries another seed).
"""

from __future__ import annotations

import os
import random
import zlib

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
