"""No noise: importing deltatune and the libraries a command loads prints nothing from optional backends
(torchao, torch's pytree registry, bitsandbytes' CPU kernels) that transformers imports when they are installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
LOAD = "from transformers import Trainer; import transformers.integrations; import deltatune.train.run"


def _stderr(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300).stderr


def test_import_prints_nothing():
    assert _stderr(f"import deltatune; {LOAD}") == ""


def test_without_deltatune_first_the_backends_do_speak():
    """The control, where torchao is installed: the same imports without deltatune first print its warnings, so
    the silence above is deltatune's doing."""
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed: nothing here would speak")
    assert "torchao" in _stderr(LOAD.replace("; import deltatune.train.run", ""))
