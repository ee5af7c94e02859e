"""The lead's mends in session 57 (probe 22), each shown failing on the file before."""

from __future__ import annotations

import builtins
import json

import pytest

from deltatune.config import ConfigError
from tests.tiny import save_tiny


def _own_code_folder(tmp_path) -> str:
    """A tiny Llama folder whose config names code of its own (auto_map), as a hub model with custom code."""
    folder = save_tiny(tmp_path / "own")
    config = json.loads((tmp_path / "own" / "config.json").read_text())
    config.update(model_type="mymodel", auto_map={"AutoConfig": "cfg.MyConfig"})
    (tmp_path / "own" / "config.json").write_text(json.dumps(config))
    (tmp_path / "own" / "cfg.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass MyConfig(LlamaConfig):\n    model_type = 'mymodel'\n"
    )
    return folder


@pytest.fixture
def questions(monkeypatch):
    """What transformers asked on stdin (trust_remote_code left None asks "[y/N]" and waits 15 s)."""
    asked: list[str] = []
    monkeypatch.setattr(builtins, "input", lambda q="": asked.append(q) or "n")
    return asked


def test_caption_model_kind_of_a_remote_code_folder_asks_nothing(tmp_path, questions):
    from deltatune.train.caption import model_kind

    assert model_kind(_own_code_folder(tmp_path)) == "encoder-decoder"  # (unread: the model loader names the problem)
    assert questions == []


def test_info_of_a_remote_code_folder_is_one_line_without_asking(tmp_path, questions):
    from deltatune.info import describe

    with pytest.raises(ConfigError, match="custom code"):
        describe(_own_code_folder(tmp_path))
    assert questions == []
