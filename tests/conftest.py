"""Shared test set-up: tiny models (tests/tiny.py), offline hub, seeded RNG, and the gpu marker."""

from __future__ import annotations

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
