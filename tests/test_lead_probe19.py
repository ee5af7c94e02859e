"""The lead's tests of session 54 for edits made outside a helper's files."""

from __future__ import annotations

import json

import pytest
from test_targets_probe19 import _names

import deltatune as dt


def test_a_resume_whose_recipe_now_names_a_regex_reaching_fused_experts_is_refused_as_a_new_run(tmp_path):
    """start_model reads a checkpoint's targets as a file's only where the recipe still names what it saved: a new
    run's checkpoint saved the list [q_proj]; resumed with --resume-changed and a regex that reaches Qwen3-MoE's fused
    experts, it is refused as a fresh run with that regex is (it warned that the file loads without the experts, as
    it was saved; review of 7f9f703)."""
    from test_targets_probe import _moe as moe
    from tiny import tokenizer

    from deltatune.train.config import build
    from deltatune.train.run import start_model

    tok = tokenizer()
    base = moe("qwen3_moe", pad_token_id=tok.pad_token_id)
    base.resize_token_embeddings(len(tok))
    base.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    saved = dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    saved.save_pretrained(tmp_path / "checkpoint-2")

    def recipe(targets):
        method = {"name": "lora", "r": 2, "target_modules": targets}
        model = {"name_or_path": str(tmp_path / "moe"), "dtype": "float32"}
        return build({"stage": "sft", "model": model, "method": method, "data": {"train": str(tmp_path / "r.jsonl")}})

    with pytest.raises(dt.ConfigError, match=r"experts\.down_proj, a 3-D parameter"):
        start_model(recipe(r".*\.(q_proj|down_proj)"), tok, None, str(tmp_path / "checkpoint-2"))
    delta, _ = start_model(recipe(["q_proj"]), tok, None, str(tmp_path / "checkpoint-2"))  # as saved: builds
    assert _names(delta) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]


def test_a_resumed_best_whose_global_step_saved_no_checkpoint_is_the_recorded_one_in_this_folder(tmp_path):
    """eval_steps 5 below save_steps 10: step 15's evaluation improved but saved nothing, so best_global_step is 15
    and the recorded best checkpoint-10. Resumed with the folder spelled otherwise (relative at the start), the best
    is this folder's checkpoint-10 (the rotation keeps it by string); a copy holding checkpoint-10, the original
    still there, keeps its own (it was set to None: 'not in' the copy; review of 271c1b3 / 5476af8)."""
    import os
    from types import SimpleNamespace as NS

    from transformers.trainer_utils import sort_checkpoints

    from deltatune.train.trainer_callbacks import BestInThisFolder

    for run in ("orig", "copy"):
        for step in (10, 20, 30):
            (tmp_path / run / f"checkpoint-{step}").mkdir(parents=True)

    def best(recorded, out):
        state = NS(global_step=20, best_model_checkpoint=recorded, best_global_step=15, is_world_process_zero=True)
        BestInThisFolder().on_train_begin(NS(output_dir=out), state, None)
        return state.best_model_checkpoint

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        mine = best("orig/checkpoint-10", str(tmp_path / "orig"))
    finally:
        os.chdir(here)
    assert mine == str(tmp_path / "orig" / "checkpoint-10")
    assert sort_checkpoints(str(tmp_path / "orig"), best_model_checkpoint=mine)[0].endswith("checkpoint-20")
    assert best(str(tmp_path / "orig" / "checkpoint-10"), str(tmp_path / "copy")) == str(
        tmp_path / "copy" / "checkpoint-10"
    )


def test_the_quote_hint_is_only_for_what_a_trailing_colon_makes():
    """`key=Classify this:` on the command line is {'Classify this': None}: the hint says to quote it; a mapping
    written on purpose for a text key ({'path': 't.jsonl'}) gets the plain type error (review of 98be7e8)."""
    from deltatune.train.config import build

    with pytest.raises(dt.ConfigError, match=r"quote it: YAML read"):
        build({"model": {"name_or_path": {"Classify this": None}}, "data": {"train": "t.jsonl"}})
    with pytest.raises(dt.ConfigError) as err:
        build({"model": {"name_or_path": "m"}, "data": {"train": {"path": "t.jsonl"}}})
    assert "must be str" in str(err.value) and "quote it" not in str(err.value)
    with pytest.raises(dt.ConfigError) as err:
        dt.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text={"a": 1})
    assert "quote it" not in str(err.value)


def test_eval_of_a_moved_new_qlora_run_prints_no_old_rule_note(tmp_path, capsys):
    """eval passes the run's folder for its marks (deltatune_marks.json), not run.yaml's output.dir: a run trained
    under the module rule, moved, then evaluated printed the note meant for runs from before it (e238f46's gap)."""
    import shutil

    from tiny import save_tiny

    from deltatune.train import run as run_mod
    from deltatune.train.config import build
    from deltatune.train.evaluation import evaluate

    base = save_tiny(tmp_path / "base", "llama", hidden_size=64, intermediate_size=128)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} of a small text"}) + "\n" for i in range(4)))
    quantization = {"bits": 4, "backend": "bitsandbytes", "skip_modules": ["model.layers.0"]}
    recipe = {"stage": "pt", "model": {"name_or_path": base, "quantization": quantization},
              "method": {"name": "lora", "r": 4, "target_modules": ["q_proj"]},
              "data": {"train": str(data), "max_length": 16},
              "train": {"batch_size": 4, "max_steps": 1, "lr": 0.01, "report_to": ["none"]},
              "output": {"dir": str(tmp_path / "run")}}  # fmt: skip
    run_mod.train(build(recipe))
    shutil.move(tmp_path / "run", tmp_path / "moved")
    capsys.readouterr()
    metrics = evaluate(str(tmp_path / "moved"), data=str(data))
    assert "eval_loss" in metrics
    assert [line for line in capsys.readouterr().err.splitlines() if "note: skip_modules" in line] == []


@pytest.mark.parametrize("lib", ["peft", "deltatune"])
def test_the_boards_count_of_a_reparametrised_run_with_a_head_keeps_the_head_as_peft(tmp_path, lib):
    """A SEQ_CLS prefix_projection / P-tuning run saves the folded prefixes and the head (modules_to_save): the board
    replaced the file's whole count with the encoder's (760 where peft says 856: the head's 96 dropped); only the
    prefixes' count is replaced now. And a count polled between the tensors' write and the config's is not kept
    (it stayed the folded 192 for good; review of 56c0780)."""
    import os
    import warnings

    import peft
    from test_board_probe11 import write_run
    from tiny import tiny_model

    from deltatune.board import runs

    module = peft if lib == "peft" else dt
    for i, (cls, extra) in enumerate(
        (("PrefixTuningConfig", {"prefix_projection": True}), ("PromptEncoderConfig", {}))
    ):
        config = getattr(module, cls)(task_type="SEQ_CLS", num_virtual_tokens=3, encoder_hidden_size=8, **extra)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = (peft.get_peft_model if lib == "peft" else dt.get_delta_model)(
                tiny_model("llama", "seq_cls"), config
            )
        folder = write_run(tmp_path, f"r{i}")
        model.save_pretrained(str(folder))
        want = model.get_nb_trainable_parameters()[0]
        os.rename(folder / "adapter_config.json", folder / "config.later")  # polled mid-save: tensors, no config yet
        runs.trainable_parameters(str(folder))
        os.rename(folder / "config.later", folder / "adapter_config.json")
        assert runs.trainable_parameters(str(folder)) == want
