"""Shared constants of the board tests (imported from here, never from ``conftest``: with several conftest.py files
in the tree, the module named conftest is whichever pytest imported last)."""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
ARTEFACTS = os.environ.get(
    "DELTATUNE_TEST_ARTEFACTS", os.path.join(os.path.dirname(os.path.dirname(HERE)), "test-artefacts")
)
"""Where the browser tests keep their screenshots (kept after the run, for a person to look at)."""
