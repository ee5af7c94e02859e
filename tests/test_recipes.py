"""Every recipe in recipes/ runs as is for two steps, on a tiny model of the kind it names, on its real data.

The alignment recipes (rm, dpo, ppo) need preference data and a reward run; tests/train/test_{reward,dpo,ppo}.py
run them the same way. This file covers the rest and checks that no recipe is left without a run test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny import save_tiny

from deltatune.cli import main

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
TINY = {"cls": ("bert", "seq_cls"), "tag": ("bert", "token_cls"), "sft": ("llama", "causal_lm"),
        "pt": ("llama", "causal_lm"), "seq2seq": ("t5", "seq2seq")}  # fmt: skip
ELSEWHERE = {"rm": "tests/train/test_reward.py", "dpo": "tests/train/test_dpo.py", "ppo": "tests/train/test_ppo.py",
             "image_cls": "tests/vision/test_image_cls.py", "grpo": "tests/train/test_grpo.py",
             "kto": "tests/train/test_kto.py", "orpo": "tests/train/test_orpo.py",
             "simpo": "tests/train/test_simpo.py", "caption": "tests/vision/test_caption.py",
             "t2i": "tests/diffusion/test_t2i.py", "cpo": "tests/test_recipes.py (ALSO)"}  # fmt: skip


def _stage(path: Path) -> str:
    return yaml.safe_load(path.read_text())["stage"]


def test_every_recipe_has_a_run_test():
    for path in RECIPES:
        assert _stage(path) in TINY or _stage(path) in ELSEWHERE, f"{path.name}: no test runs stage {_stage(path)!r}"


# Recipes of an ELSEWHERE stage whose test there runs another recipe: run here on a tiny model of their kind.
ALSO = {"hh-rlhf-rm-smollm2": ("llama", "seq_cls"), "cpo": ("llama", "causal_lm")}


def test_causal_lm_recipes_run_offline_on_the_embedded_llm():
    """Every recipe that trains a causal LM names `smollm2` (runs here as written); hub ids go in the comments."""
    for path in RECIPES:
        raw = yaml.safe_load(path.read_text())
        if raw["stage"] in ("pt", "sft", "dpo", "ppo", "grpo", "kto", "orpo", "simpo", "cpo"):
            assert raw["model"]["name_or_path"] == "smollm2", path.name


@pytest.mark.parametrize("path", [p for p in RECIPES if _stage(p) in TINY or p.stem in ALSO], ids=lambda p: p.stem)
def test_recipe_runs_two_steps(path, tmp_path, monkeypatch, capsys):
    # Recipes name data relative to the repository root (../shared/data/...), as a user runs them from there.
    monkeypatch.chdir(path.parent.parent)
    family, task = ALSO.get(path.stem) or TINY[_stage(path)]
    model = save_tiny(tmp_path / "model", family, task)
    out = tmp_path / "run"
    overrides = [f"model.name_or_path={model}", "model.dtype=float32", "model.gradient_checkpointing=false",
                 "train.max_steps=2", "train.report_to=[none]", "data.limit=16", "data.max_length=96",
                 "train.batch_size=4", f"output.dir={out}"]  # fmt: skip
    assert main(["train", str(path), *overrides]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["train_steps"] == 2
    assert (out / "adapter_model.safetensors").is_file() and (out / "report.md").is_file()


def test_seq2seq_generates_eval_batch_size_rows_at_a_time(tmp_path, monkeypatch, capsys):
    """The greedy generations behind eval_bleu and eval_rougeL go train.eval_batch_size rows at a time (16 when the
    recipe sets none), in training's final evaluation and in deltatune eval."""
    from deltatune.train import seq2seq

    monkeypatch.chdir(RECIPES[0].parent.parent)
    sizes, real = [], seq2seq.generation_metrics

    def spy(model, tok, rows, cfg, batch_size=16):
        sizes.append(batch_size)
        return real(model, tok, rows, cfg, batch_size)

    monkeypatch.setattr(seq2seq, "generation_metrics", spy)
    model, out = save_tiny(tmp_path / "model", "t5", "seq2seq"), tmp_path / "run"
    overrides = [f"model.name_or_path={model}", "train.max_steps=1", "train.report_to=[none]", "data.limit=4",
                 "data.max_length=32", "data.max_target_length=8", "train.batch_size=2", f"output.dir={out}"]  # fmt: skip
    assert main(["train", "recipes/e2e-seq2seq-lora.yaml", *overrides, "train.eval_batch_size=3"]) == 0
    assert main(["eval", "--adapter", str(out)]) == 0
    assert main(["eval", "--adapter", str(out), "train.eval_batch_size=null"]) == 0
    assert sizes == [3, 3, 16]
    capsys.readouterr()
