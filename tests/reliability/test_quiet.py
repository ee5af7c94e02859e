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


def test_the_diffusion_stage_imports_diffusers_quietly():
    """diffusers warns at import that torchao's old tensor classes are gone (torchao 0.16+); after deltatune, not."""
    if importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("torchao") is None:
        pytest.skip("needs diffusers and torchao")
    load = "from diffusers import UNet2DConditionModel, DDIMScheduler"
    assert "Unable to import `torchao`" in _stderr(load)  # the control: it does speak
    assert _stderr(f"import deltatune.train.t2i; {load}") == ""
