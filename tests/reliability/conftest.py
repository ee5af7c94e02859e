"""Fixtures of the reliability tests: a tiny classifier, its data and one finished run to copy (helpers in
reliability_helpers.py)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from reliability_helpers import ROWS, cli, write_recipe
from tiny import save_tiny


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A tiny BERT classifier (dropout off), its training data, a recipe, and one finished 2-step run."""
    tmp = tmp_path_factory.mktemp("reliability")
    model = save_tiny(tmp / "bert", "bert", "seq_cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    run = str(tmp / "finished")
    recipe = write_recipe(tmp / "recipe.yaml", model, str(data), run, max_steps=2)
    code, _, err = cli("train", recipe)
    assert code == 0, err
    return SimpleNamespace(tmp=tmp, model=model, data=str(data), recipe=recipe, run=run)


@pytest.fixture
def run_copy(base, tmp_path):
    """A private copy of the finished run (at tmp_path/run) and a recipe pointing at it."""
    out = tmp_path / "run"
    shutil.copytree(base.run, out, symlinks=True)
    recipe = write_recipe(tmp_path / "recipe.yaml", base.model, base.data, str(out), max_steps=2)
    return SimpleNamespace(dir=str(out), recipe=recipe, tmp=tmp_path)
