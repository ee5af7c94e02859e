"""The lead's tests of session 55 for edits made outside a helper's files."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vision"))
from test_trainer_probe11 import files, recipe  # noqa: E402, F401  (files: a tiny llama and rows)
from tiny_vlm import save_vlm  # noqa: E402

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")


@pytest.mark.parametrize("saved, trains_vision", [({}, True), ({"freeze_vision_tower": True}, False)])
def test_a_resumed_full_vlm_run_goes_on_with_the_towers_its_checkpoint_trained(tmp_path, saved, trains_vision):
    """full now freezes a VLM's vision tower and projector for a new adapter (LLaMA-Factory's default, 6c8bd43); a run
    begun before (its checkpoint's adapter_config.json without the switches) resumed training every tower: start_model
    rebuilt the adapter from the recipe as a new one and froze them mid-run. A later run's checkpoint keeps its own."""
    from deltatune.train.config import build
    from deltatune.train.models import load_processor
    from deltatune.train.run import start_model

    save_vlm(tmp_path / "llava", "llava")
    (tmp_path / "checkpoint-2").mkdir()
    config = {"peft_type": "FULL", "task_type": "CAUSAL_LM", **saved}
    (tmp_path / "checkpoint-2" / "adapter_config.json").write_text(json.dumps(config))
    cfg = build({"stage": "caption", "model": {"name_or_path": str(tmp_path / "llava")}, "method": {"name": "full"},
                 "data": {"train": str(tmp_path / "c.jsonl")}})  # fmt: skip
    proc = load_processor(str(tmp_path / "llava"), "caption")
    delta, _ = start_model(cfg, proc, None, str(tmp_path / "checkpoint-2"))
    vision = [p.requires_grad for n, p in delta.named_parameters() if "vision_tower" in n]
    assert vision and all(vision) is trains_vision and any(vision) is trains_vision
    fresh, _ = start_model(cfg, proc)  # (a new run: frozen, as LLaMA-Factory)
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if "vision_tower" in n)


def test_check_vocab_checks_a_tokenizer_that_holds_a_tokenizer_of_its_own():
    """check_vocab unwraps a caption processor's ``.tokenizer`` (2dc14c2) but took a real tokenizer's too:
    transformers' MistralCommonBackend is a PreTrainedTokenizerBase whose ``.tokenizer`` is mistral_common's, and the
    check passed it by for every text stage (review of 2dc14c2)."""
    from tiny import tiny_model, tokenizer

    from deltatune.config import ConfigError
    from deltatune.train.models import check_vocab

    tok = tokenizer()
    model = tiny_model("llama", vocab_size=len(tok) - 5)
    tok.tokenizer = object()  # (as MistralCommonBackend holds mistral_common's tokenizer)
    with pytest.raises(ConfigError, match=r"its tokenizer has 30522 tokens but its embeddings hold 30517"):
        check_vocab("m", model, tok)


def test_the_ema_warmup_keys_are_recipe_keys_read_by_t2i_alone():
    """t2i_ema reads EMAModel's warm-up settings (4c5ca57) but the recipe's train section did not have them: a recipe
    naming one was refused as an unknown key (review of 732649a). They reach ema_options, and another stage names
    them ignored."""
    from deltatune.train.config import ignored_keys, load_recipe
    from deltatune.train.t2i_ema import ema_options

    keys = ["train.use_ema=true", "train.use_ema_warmup=true", "train.ema_inv_gamma=2.0", "train.ema_power=0.75",
            "train.ema_min_decay=0.1", "train.ema_update_after_step=1"]  # fmt: skip
    cfg = load_recipe(os.path.join(RECIPES, "digits-t2i-lora.yaml"), keys)
    assert ema_options(cfg.train) == {"decay": 0.9999, "use_warmup": True, "inv_gamma": 2.0, "power": 0.75,
                                      "min_decay": 0.1, "update_after_step": 1}  # fmt: skip
    assert ignored_keys(cfg) == []
    sft = load_recipe(os.path.join(RECIPES, "quickstart.yaml"), ["train.use_ema_warmup=true"])
    assert ("train.use_ema_warmup", "t2i") in ignored_keys(sft)


def test_eval_steps_with_val_size_on_a_stage_that_holds_none_out_is_refused_where_a_run_starts(files, tmp_path):  # noqa: F811
    """sft reads no data.val_size: train.eval_steps beside it scheduled evaluations run.py silently dropped
    (eval_strategy "no"). Refused as a run starts, before the folder is made (trainer20's diff B); such a finished
    run's run.yaml still builds."""
    from deltatune.config import ConfigError
    from deltatune.train import build, train

    raw = recipe(files, tmp_path / "out", max_steps=2, eval_steps=1)
    raw["data"]["val_size"] = 0.25
    raw["data"].pop("eval", None)
    cfg = build(raw)  # (loads, as a finished run's would)
    with pytest.raises(ConfigError, match=r"^train\.eval_steps schedules an evaluation, but data\.eval is not set "
                       r"\(stage sft holds no data\.val_size rows out"):  # fmt: skip
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_the_served_vocabulary_of_a_vision_language_model_is_its_text_configs():
    """serve bounds prompt ids and logit_bias ids by the model's vocabulary (9a1110f), read as config.vocab_size, which
    a transformers 5 vision-language config does not hold (LLaVA's, Qwen2.5-VL's are in text_config): the bound fell
    back to the tokenizer's length (review of 9a1110f)."""
    from tiny import tokenizer
    from transformers import LlamaConfig, LlavaConfig, Qwen2_5_VLConfig

    from deltatune.serve.app import model_vocab

    tok = tokenizer()
    assert model_vocab(LlavaConfig(), tok) == 32000
    assert model_vocab(Qwen2_5_VLConfig(), tok) == 152064
    assert model_vocab(LlamaConfig(vocab_size=77), tok) == 77


def test_a_prompt_id_out_of_vocabulary_is_named_after_the_fields_as_vllms_engine_does():
    """vLLM checks a request's fields before its engine finds an id out of vocabulary: a bad temperature beside such
    an id is named as the temperature (it was the id; review of cd49657)."""
    from test_serve_probe11 import _call, _smol
    from test_serve_probe20 import _narrow_engine

    tok = _smol()
    engine, app = _narrow_engine(tok, len(tok) - 100)
    try:
        status, answer = _call(app, "/v1/completions", {"prompt": [1, len(tok) - 50], "temperature": -1})
        assert status == 400 and answer["error"]["param"] == "temperature", answer
        status, answer = _call(app, "/v1/completions", {"prompt": [1, len(tok) - 50], "max_tokens": 2})
        assert status == 400 and answer["error"]["param"] == "prompt", answer
    finally:
        engine.close()


def test_a_null_optional_alpaca_input_is_not_named_as_the_format_difference():
    """_nulled names a null column of the first row's format as the difference (3d34812), but alpaca's ``input`` is
    optional: a later text row with a null input was blamed on it (review of e1278a1)."""
    from deltatune.data.formats import read_samples
    from deltatune.data.load import DataError, Row

    first = Row({"instruction": "a", "input": "x", "output": "b"}, "t.jsonl:1")
    for later in ({"text": "t", "input": None}, {"prompt": "p", "completion": "c", "input": None}):
        with pytest.raises(DataError, match=r"^t\.jsonl:2: this row is in the (text|prompt_completion) format"):
            read_samples([first, Row(later, "t.jsonl:2")])


def test_no_row_left_pickles_and_copies_with_its_counts():
    """sft's NoRowLeft took two arguments and no __reduce__: pickling or copying it (a process pool, Ray) raised a
    TypeError in place of the data's message (review of 1c972cf)."""
    import copy
    import pickle

    from deltatune.train.sft import NoRowLeft

    e = pickle.loads(pickle.dumps(NoRowLeft("no eval row", "2 with none")))
    assert (str(e), e.why) == ("no eval row", "2 with none")
    assert copy.copy(e).why == "2 with none"
