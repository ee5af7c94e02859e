"""Shared test set-up: tiny models (tests/tiny.py), offline hub, seeded RNG, and the gpu marker."""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
sys.path.insert(0, os.path.dirname(__file__))
# Tiny models gain nothing from intra-op threads; on a shared 2-core machine the threads' spinning made the
# test matrix ~7x slower (218 s -> 29 s for 50 matrix tests under load).
torch.set_num_threads(1)

from tolerances import ATOL, WEIGHT_ATOL  # noqa: E402,F401  (re-exported for older imports; import from tolerances)

_module = [""]


def pytest_runtest_setup(item):
    """At each test file's first test: collect, then freeze what survives (imports, session caches) out of the cyclic
    collector's sight. Every full collection walked all ~0.5 M objects of torch / transformers (0.1-0.2 s each; every
    Trainer.train() runs one through accelerate's free_memory): 17% of a trainer-heavy file's time, 2% with this.
    Objects freed by reference counting are freed as before; only cycles that form among frozen objects stay."""
    path = str(item.path)
    if path != _module[0]:
        _module[0] = path
        gc.collect()
        gc.freeze()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
