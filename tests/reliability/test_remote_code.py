"""No code runs because a run folder says so. A run folder whose run.yaml says ``trust_remote_code: true`` over a
base model that ships Python code (config.json ``auto_map``) is evaluated, merged and loaded without running that
code; only the caller's explicit ``trust_remote_code=True`` (the CLI's ``--trust-remote-code``) runs it, which the
last test shows does happen, so the first ones could fail."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml
from reliability_helpers import cli, snapshot

# Importing this module is the "code run": it writes the marker file named in the environment.
EVIL = """
import os, pathlib
pathlib.Path(os.environ["DELTATUNE_TEST_MARKER"]).write_text("remote code ran")
from transformers import BertConfig, BertForSequenceClassification
class EvilConfig(BertConfig):
    model_type = "bert"
class EvilModel(BertForSequenceClassification):
    config_class = EvilConfig
"""


@pytest.fixture
def evil_run(base, tmp_path, monkeypatch):
    """The finished run, its run.yaml pointing at a copy of the base that carries code, trust_remote_code: true."""
    model = tmp_path / "evil-model"
    shutil.copytree(base.model, model)
    (model / "evil.py").write_text(EVIL)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForSequenceClassification": "evil.EvilModel",
    }
    (model / "config.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    shutil.copytree(base.run, run)
    recipe = yaml.safe_load((run / "run.yaml").read_text())
    recipe["model"].update(name_or_path=str(model), trust_remote_code=True)
    (run / "run.yaml").write_text(yaml.safe_dump(recipe))
    marker = tmp_path / "MARKER"
    monkeypatch.setenv("DELTATUNE_TEST_MARKER", str(marker))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    return run, marker


def test_eval_does_not_run_the_folders_code(evil_run, base):
    """... nor write into the run folder (a folder someone sends you may be read-only)."""
    run, marker = evil_run
    before = snapshot(run)
    code, out, err = cli("eval", "--adapter", str(run), "--data", base.data)
    assert code == 0, err
    assert "eval_accuracy" in out.splitlines()[-1]
    assert not marker.exists()
    assert snapshot(run) == before


def test_merge_and_load_do_not_run_the_folders_code(evil_run, tmp_path):
    from deltatune.train.run import load_adapter_model

    run, marker = evil_run
    load_adapter_model(str(run))
    code, _, err = cli("merge", "--adapter", str(run), "--out", str(tmp_path / "merged"))
    assert code == 0, err
    assert not marker.exists()
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_explicit_trust_runs_it(evil_run):
    """The control: the same folder with the caller's trust_remote_code=True does run the model's code."""
    from deltatune.train.run import load_adapter_model

    run, marker = evil_run
    load_adapter_model(str(run), trust_remote_code=True)
    assert marker.read_text() == "remote code ran"
    assert os.path.isdir(os.environ["HF_MODULES_CACHE"])
