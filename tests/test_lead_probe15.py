"""The lead's fixes of session 50 from the agents' reports: IA3's saved fan_in_fan_out on GPT-2 (peft's dispatch sets
it at a Conv1D), and the NaN message of a merged nn.MultiheadAttention (its parameters are in_proj_weight and
out_proj.weight, not "weight")."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from test_methods_probe15 import Attn, _gpt2, saved_gpt2_pair

import deltatune as dt


def test_an_ia3_gpt2_adapter_saves_fan_in_fan_out_true_as_peft(tmp_path):
    kw = dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], init_ia3_weights=False)
    ours, _, _ = saved_gpt2_pair(tmp_path, "IA3Config", kw, "fan_in_fan_out")
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        loaded = peft.PeftModel.from_pretrained(_gpt2(), tmp_path / "ours").eval()
        assert (loaded(input_ids=ids).logits - ours.eval()(input_ids=ids).logits).abs().max() < 1e-5


def test_a_linear_ia3_target_sets_fan_in_fan_out_false_as_peft():
    kw = dict(target_modules=["head"], feedforward_modules=[], fan_in_fan_out=True)
    model = dt.get_delta_model(Attn(), dt.IA3Config(**kw))
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        theirs = peft.get_peft_model(Attn(), peft.IA3Config(**kw))
    assert model.peft_config["default"].fan_in_fan_out is theirs.peft_config["default"].fan_in_fan_out is False


def test_a_nan_merged_into_an_mha_names_the_weights():
    torch.manual_seed(0)
    model = dt.get_delta_model(Attn(), dt.LoraConfig(target_modules=["mha"], r=4, init_lora_weights=False))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default"):
        model.merge_adapter(safe_merge=True)


@pytest.mark.parametrize(("value", "said"), [(0, "must be >= 1, got 0"), (2.5, "must be int, got 2.5")])
def test_generation_num_beams_is_a_whole_number_of_at_least_one(value, said):
    from deltatune.config import ConfigError
    from deltatune.train.config import build

    recipe = {"stage": "seq2seq", "data": {"train": "rows.jsonl"}, "train": {"generation_num_beams": value}}
    with pytest.raises(ConfigError, match=f"train.generation_num_beams {said}"):
        build(recipe)


def test_grpos_new_align_keys_are_named_as_ignored_on_another_stage():
    from deltatune.train.config import build, ignored_keys

    recipe = {"stage": "dpo", "data": {"train": "p.jsonl"}, "align": {"steps_per_generation": 2, "entropy_coef": 0.1,
              "num_generations_eval": 2}}  # fmt: skip
    named = {key for key, _ in ignored_keys(build(recipe))}
    assert {"align.steps_per_generation", "align.entropy_coef", "align.num_generations_eval"} <= named


def test_kto_renders_a_rows_chat_template_kwargs(tmp_path):
    """Stage kto passed no chat_template_kwargs to the template (7c7755d built them for sft, dpo, rm and ppo)."""
    from test_data_probe15 import KW, KW_TEMPLATE
    from tiny import smollm2_tokenizer

    from deltatune.train.config import build
    from deltatune.train.kto import prepare_kto

    tok = smollm2_tokenizer()
    tok.chat_template = KW_TEMPLATE
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}],
             "label": good, "chat_template_kwargs": KW} for q, a, good in (("Lemon?", "Yellow.", True),
                                                                          ("Lime?", "Purple.", False))]  # fmt: skip
    (tmp_path / "k.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    train = prepare_kto(build({"stage": "kto", "data": {"train": str(tmp_path / "k.jsonl")}}), tok).train
    want = tok.apply_chat_template(rows[0]["prompt"] + rows[0]["completion"], tokenize=False, **KW)
    assert tok.decode(train[0]["input_ids"]) == want and "Be terse." in want and "<think>" in want


def test_orpos_disable_prompt_loss_is_named_as_ignored_on_dpo():
    from deltatune.train.config import build, ignored_keys

    cfg = build({"stage": "dpo", "data": {"train": "p.jsonl"}, "align": {"disable_prompt_loss": True}})
    assert ("align.disable_prompt_loss", "orpo") in ignored_keys(cfg)


def test_method_revision_is_no_recipe_key():
    """DeltaConfig.revision (e332957) records get_delta_model(revision=); a recipe's method.revision was accepted and
    written to adapter_config.json while the base loaded at its default revision."""
    from deltatune.config import ConfigError
    from deltatune.train.config import build

    recipe = {"stage": "sft", "model": {"name_or_path": "x"}, "method": {"name": "lora", "revision": "v2"}}
    with pytest.raises(ConfigError, match="method.revision is not a recipe key"):
        build(recipe)
    build({**recipe, "method": {"name": "lora", "revision": None}})  # (null: as a run.yaml may hold it)


def test_serve_names_a_raw_run_as_data_template_raw_not_a_built_in_template():
    from deltatune.serve.prompts import _named

    assert _named("raw") == "data.template=raw (plain text, no chat template)"
    assert _named("chatml") == "the built-in template 'chatml'"


@pytest.mark.parametrize("stage", ["orpo", "simpo", "cpo"])
def test_raw_orpo_simpo_cpo_rows_are_trls_with_a_bert_tokenizer(stage, tmp_path):
    """ff34681 gave raw rows the tokenizer's own [CLS] ... [SEP] [SEP] (right for DPO and KTO, as TRL's); TRL's ORPO
    and CPO trainers add none of their own: p r [SEP] (review V). Ids and labels equal TRL 1.16's."""
    import warnings

    from datasets import Dataset
    from test_align_probe11 import PAIRS
    from test_dpo_probe12 import _lora
    from test_pref_probe14 import CPOConfig, CPOTrainer, ORPOConfig, ORPOTrainer
    from tiny import save_tiny

    from deltatune.train import build
    from deltatune.train.models import load_tokenizer
    from deltatune.train.table import prepare

    base = save_tiny(str(tmp_path / "llama"))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    tok = load_tokenizer(base)
    config, trainer = (ORPOConfig, ORPOTrainer) if stage == "orpo" else (CPOConfig, CPOTrainer)
    args = config(str(tmp_path / "trl"), per_device_train_batch_size=2, report_to=[], use_cpu=True, max_length=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dt.trl_trainer(trainer)(model=_lora(base), args=args, processing_class=tok,
                                         train_dataset=Dataset.from_list(PAIRS)).train_dataset  # fmt: skip
    cfg = build({"stage": stage, "model": {"name_or_path": base}, "output": {"dir": str(tmp_path / "run")},
                 "data": {"train": str(tmp_path / "p.jsonl"), "max_length": 64, "template": "raw"}})  # fmt: skip
    ours = prepare(cfg, tok).train
    for ex, mine in zip(theirs, ours):
        for side in ("chosen", "rejected"):
            assert ex[f"{side}_input_ids"] == mine[side]["input_ids"] and ex[f"{side}_labels"] == mine[side]["labels"]


def test_resume_of_an_image_cls_run_takes_the_head_the_stage_added(tmp_path):
    """image_cls adds the new head to method.modules_to_save where the recipe leaves it out, and run.yaml records it:
    --resume with the same recipe was refused ("method.modules_to_save: ['classifier'] -> None"; review Y, since
    before session 50). A recipe naming another list is still a change."""
    import yaml

    from deltatune.config import ConfigError
    from deltatune.train.config import build
    from deltatune.train.run import _check_resume_recipe, _recipe_dict

    recipe = _recipe_dict(build({"stage": "image_cls", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}))
    recorded = {**recipe, "method": {**recipe["method"], "modules_to_save": ["classifier"]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(recorded))
    assert _check_resume_recipe(str(tmp_path), recipe, False) is False
    other = {**recipe, "method": {**recipe["method"], "modules_to_save": ["pooler"]}}
    with pytest.raises(ConfigError, match=r"method.modules_to_save: \['classifier'\] -> \['pooler'\]"):
        _check_resume_recipe(str(tmp_path), other, False)


def test_the_chat_loop_refuses_a_system_prompt_in_raw_mode_as_prompt_ids_does():
    """chat --raw --system dropped the system prompt without a word (ebaa2e3 refused it in prompt_ids, which the
    loop's raw path calls without it)."""
    import io

    from deltatune.config import ConfigError
    from deltatune.train.chat import repl

    with pytest.raises(ConfigError, match="--system: the prompt goes as plain text \\(--raw\\)"):
        repl(None, None, system="Be brief.", raw=True, stdin=io.StringIO("hi\n"), stdout=io.StringIO())


@pytest.mark.parametrize(
    ("method", "family", "accepted"),
    [("full", "llama", True), ("freeze", "llama", True), ("bitfit", "gpt2", True), ("lora", "llama", False),
     ("lora_bias_all", "gpt2", False), ("ia3", "llama", False)],
)  # fmt: skip
def test_tr_dpo_takes_a_method_by_what_it_trains_not_by_its_name(method, family, accepted):
    """check_sync_ref asked the method's name (a trainer must not: DESIGN.md); it now asks whether every trainable
    parameter is a base parameter the method trains in place (full, freeze, bitfit) or an adapter's own weight."""
    from types import SimpleNamespace

    from tiny import tiny_model

    from deltatune import registry
    from deltatune.config import ConfigError
    from deltatune.train.pairs import check_sync_ref

    configs = {"full": lambda: registry.get("full").config_class(),
               "freeze": lambda: registry.get("freeze").config_class(freeze_trainable_layers=1),
               "bitfit": lambda: registry.get("bitfit").config_class(),
               "lora": lambda: dt.LoraConfig(target_modules=["q_proj"]),
               "lora_bias_all": lambda: dt.LoraConfig(target_modules=["c_attn"], bias="all"),
               "ia3": lambda: dt.IA3Config(target_modules=["q_proj"], feedforward_modules=[])}  # fmt: skip
    model = dt.get_delta_model(tiny_model(family), configs[method]())
    align = SimpleNamespace(sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5,
                            precompute_ref=False, precompute_ref_log_probs=False)  # fmt: skip
    if accepted:
        check_sync_ref(align, model.peft_config["default"], model.base_model, "dpo")
    else:
        with pytest.raises(ConfigError, match="align.sync_ref_model \\(TR-DPO\\)"):
            check_sync_ref(align, model.peft_config["default"], model.base_model, "dpo")
