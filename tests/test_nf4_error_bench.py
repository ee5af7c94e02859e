"""benchmarks/nf4_error.py on a small random weight: the figures it reports are what they claim to be."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
nf4_error = pytest.importorskip("nf4_error")


def _backend() -> str:
    from deltatune.methods.quant import resolve_backend

    try:
        return resolve_backend("auto", torch.device("cpu"))
    except ImportError:
        pytest.skip("no 4-bit backend installed")


def test_nf4_error_figures():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.02
    backend = _backend()
    low = nf4_error.nf4_error(w, rank=4, rounds=3, backend=backend)
    assert 0.01 < low["nf4"] < 0.2  # 4 bits: about a tenth of the weight's norm
    assert 0 < low["top_r"] < 1 and low["loftq"] < 1  # a rank-4 correction removes some error, not all
    full = nf4_error.nf4_error(w, rank=64, rounds=1, backend=backend)  # full rank: the SVD holds all the error
    assert full["top_r"] == pytest.approx(1.0) and full["loftq"] < 1e-4


def test_the_gaussian_control_and_the_distinct_values_per_block():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.02
    backend = _backend()
    plain = nf4_error.nf4_error(w, rank=4, rounds=1, backend=backend)
    assert plain["distinct"] == 32  # a random weight: every value in a block of 32 differs
    assert abs(plain["gaussian"] - plain["nf4"]) < 0.01  # a Gaussian weight is its own control
    # a Q4_1-like weight: each block of 32 on a 16-level grid between its min and max
    blocks = w.reshape(-1, 32)
    lo, hi = blocks.min(1, keepdim=True).values, blocks.max(1, keepdim=True).values
    grid = (lo + torch.round((blocks - lo) / (hi - lo) * 15) * (hi - lo) / 15).reshape(w.shape)
    assert nf4_error.nf4_error(grid, rank=4, rounds=1, backend=backend)["distinct"] <= 16
    heavy = torch.distributions.StudentT(3.0).sample((64, 128)) * 0.02  # heavy tails: NF4 does worse than on N(0, s)
    tails = nf4_error.nf4_error(heavy, rank=4, rounds=1, backend=backend)
    assert tails["nf4"] > tails["gaussian"] + 0.01
