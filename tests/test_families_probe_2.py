"""Loading a base model (deltatune.train.models.load_model): a path that is no model folder, or a model transformers
refuses, is one line naming the model; a body whose weights do not fit its config is refused, not drawn at random."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from tiny import save_tiny

from deltatune.config import ConfigError
from deltatune.train.models import load_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("base") / "llama", "llama")


def _copy(llama: str, folder, drop: str = "", **config) -> str:
    shutil.copytree(llama, folder)
    if drop:
        os.remove(os.path.join(folder, drop))
    if config:
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            data = json.load(f)
        with open(path, "w") as f:
            json.dump({**data, **config}, f)
    return str(folder)


def _refused(path: str, task: str = "CAUSAL_LM") -> str:
    with pytest.raises(ConfigError) as caught:
        load_model(path, task)
    message = str(caught.value)
    assert "\n" not in message and f"model {path!r}" in message, message
    return message


def test_a_folder_without_config_json_is_one_line(llama, tmp_path):
    """transformers said "Unrecognized model in ... Should have a `model_type` key in its config.json" of a folder with
    no config.json at all (a ValueError); an adapter's folder given as the model now names the base to give."""
    assert "holds no config.json" in _refused(_copy(llama, tmp_path / "noconfig", drop="config.json"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": llama}))
    assert f"is an adapter's folder (adapter_config.json), not a base model: give its base ({llama})" in _refused(
        str(adapter)
    )
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert "is a GGUF file" in _refused(str(gguf))  # was: "not a local model folder, and the hub could not provide it"


def test_transformers_refusals_are_one_line(llama, tmp_path):
    """Code the model ships (auto_map) without trust_remote_code, and a model type transformers does not know, were
    transformers' multi-line ValueErrors; a truncated weights file was safetensors' SafetensorError."""
    remote = _copy(llama, tmp_path / "remote", model_type="mything", auto_map={"AutoConfig": "c.C", "AutoModelForCausalLM": "m.M"})  # fmt: skip
    assert "set model.trust_remote_code: true" in _refused(remote)
    unknown = _copy(llama, tmp_path / "unknown", model_type="mything")
    assert "has a model type ('mything') that transformers" in _refused(unknown)
    cut = _copy(llama, tmp_path / "cut")
    weights = os.path.join(cut, "model.safetensors")
    with open(weights, "rb") as f:
        data = f.read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    assert "a weights file is unreadable" in _refused(cut)


@pytest.mark.parametrize("task", ["SEQ_CLS", "CAUSAL_LM"])
def test_weights_that_do_not_fit_the_config_are_refused(llama, tmp_path, task):
    """A classifier loads with ignore_mismatched_sizes (for its head): a config.json whose sizes are not its weights'
    drew every body tensor anew and trained a random model, with only transformers' report as a warning. The causal LM
    raised transformers' RuntimeError pointing at the report."""
    bad = _copy(llama, tmp_path / "bad", intermediate_size=64)
    message = _refused(bad, task)
    assert "its weights do not fit its config.json" in message
    if task == "SEQ_CLS":
        assert "model.layers.0.mlp.down_proj.weight is [32, 48] in the weights but [32, 64] by the config" in message
