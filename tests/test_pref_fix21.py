"""Fixes after the review of pref probe 21: align.loss_weights past a float refused in one line; a resumed dpo / kto
run training the base in place keeps the base (scored before its first step) as its reference; the report names
that reference."""

import functools
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from test_align_probe11 import ROWS
from tiny import save_tiny, tokenizer

from deltatune.config import ConfigError
from deltatune.train.config import build


@pytest.mark.parametrize("weights", [[10**400], [1, -(10**400)]])
def test_dpo_loss_weights_past_a_float_are_one_line(weights, tmp_path):
    """An int too large for a float (YAML reads 1000...0 as one) gave OverflowError from math.isfinite, deep in the
    check meant to refuse it: refused naming the key, as NaN and inf are; the largest float still passes."""
    kinds = ["sigmoid", "sft"][: len(weights)]
    recipe = {"stage": "dpo", "model": {"name_or_path": "x"}, "data": {"train": str(tmp_path / "p.jsonl")}}
    with pytest.raises(ConfigError, match=r"^align\.loss_weights must be \d numbers, one per align\.loss_type"):
        build({**recipe, "align": {"loss_type": kinds, "loss_weights": weights}})
    largest = [int(sys.float_info.max)] * len(kinds)  # (exactly a float: not refused)
    assert build({**recipe, "align": {"loss_type": kinds, "loss_weights": largest}}).align.loss_weights == largest


PAIRS = [{"prompt": g["prompt"], "chosen": g["completion"], "rejected": b["completion"]} for g, b in
         [(ROWS[0], ROWS[1]), (ROWS[2], ROWS[3]), (ROWS[2], ROWS[1]), (ROWS[0], ROWS[3])]]  # fmt: skip


def _history(folder: str) -> list[dict]:
    rows = map(json.loads, Path(folder, "log_history.jsonl").read_text().splitlines())
    return [{k: v for k, v in h.items() if "loss" in k} for h in rows if "loss" in h or "eval_loss" in h]


@pytest.mark.parametrize("method", ["full", "freeze"])
@pytest.mark.parametrize("stage", ["kto", "dpo"])
def test_resumed_in_place_run_keeps_the_base_as_its_reference(stage, method, tmp_path):
    """A dpo / kto run whose method trains the base in place scores its reference once, before the first step
    (align.precompute_ref): resumed from checkpoint-2 it must still be the base's, not the loaded trained weights'.
    The resumed run's train and eval losses (eval on start and every 2 steps) equal the uninterrupted run's exactly;
    a reference recomputed from the checkpoint's weights gave step 3's loss 0.5 for 0.5033 (kto full)."""
    from deltatune.train.run import train

    base = save_tiny(str(tmp_path / "llama"))
    rows = ROWS if stage == "kto" else PAIRS
    for name, n in (("t.jsonl", 2), ("e.jsonl", 1)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows * n))
    knobs = {"freeze_trainable_layers": 1} if method == "freeze" else {}

    def recipe(out: str) -> dict:
        return {"stage": stage, "model": {"name_or_path": base}, "method": {"name": method, **knobs},
                "data": {"train": str(tmp_path / "t.jsonl"), "eval": str(tmp_path / "e.jsonl"), "max_length": 64,
                         "template": "raw"},
                "align": {"beta": 0.3, "precompute_ref": True},
                "train": {"batch_size": 2, "lr": 1e-2, "seed": 0, "max_steps": 4, "save_steps": 2, "eval_steps": 2,
                          "eval_on_start": True, "logging_steps": 1, "report_to": ["none"]},
                "output": {"dir": out}}  # fmt: skip

    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    first = train(build(recipe(whole)))
    os.makedirs(resumed)
    shutil.copytree(os.path.join(whole, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    for name in ("run.yaml", "log_history.jsonl"):
        shutil.copy(os.path.join(whole, name), resumed)
    second = train(build(recipe(resumed)), resume=True)
    history = _history(whole)
    assert [h for h in history if "loss" in h] and len([h for h in history if "eval_loss" in h]) == 3
    assert _history(resumed) == history  # (steps 3, 4 and the eval at 4 are the resumed run's own)
    assert second["eval_loss"] == first["eval_loss"]
    assert "; reference = the starting weights, log-probs precomputed once" in Path(whole, "report.md").read_text()


_tokenizer = functools.cache(tokenizer)


@pytest.mark.parametrize("stage", ["dpo", "kto"])
@pytest.mark.parametrize(
    "method, named",
    [({"name": "lora"}, "the base with the adapter off"), ({"name": "lora", "bias": "lora_only"}, "the starting weights"),
     ({"name": "ia3"}, "the base with the adapter off"), ({"name": "bitfit"}, "the starting weights"),
     ({"name": "full"}, "the starting weights"), ({"name": "freeze"}, "the starting weights"),
     ({"name": "full", "sync": True}, "a copy of the starting weights, mixed in every 512 steps with alpha 0.6 (TR-DPO)")],
)  # fmt: skip
def test_report_names_the_reference_a_run_has(stage, method, named, tmp_path):
    """The report's note said 'reference = the base with the adapter off' for a full (freeze, BitFit, LoRA bias) run
    too, whose reference is the starting weights scored before the first step (the base is trained in place)."""
    from deltatune.train.table import prepare

    rows = ROWS if stage == "kto" else PAIRS
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    method = dict(method)
    align = {"precompute_ref": not method.pop("sync", False)}
    align = align if align["precompute_ref"] else {"sync_ref_model": True}
    cfg = build({"stage": stage, "model": {"name_or_path": "x"}, "method": method, "align": align,
                 "data": {"train": str(tmp_path / "t.jsonl"), "template": "raw", "max_length": 64},
                 "train": {"batch_size": 2}})  # fmt: skip
    notes = [n for n in prepare(cfg, _tokenizer()).notes if "; reference = " in n]
    assert len(notes) == 1 and f"; reference = {named}" in notes[0]
    assert ("log-probs precomputed once" in notes[0]) == bool(align.get("precompute_ref"))
