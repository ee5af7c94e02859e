"""The board over a temporary runs folder, served on 127.0.0.1 in a thread of the test process."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "serve"))
