"""Review 14 of the alignment stages: align.answer_eos records how orpo/simpo/cpo encoded their answers (an old
run.yaml, written before bac51df, resumes and evaluates as it ran); align.generation_kwargs checked at build as
transformers' generate would check it at the first rollout; the changed-default resume note only on the stage whose
default changed; TRL DPOConfig keys at TRL's defaults taken."""

import dataclasses
import json

import pytest
import transformers.generation.logits_process as lp
import yaml
from tiny import save_tiny
from transformers import GenerationConfig
from trl import DPOConfig

from deltatune.config import ConfigError
from deltatune.train.config import build
from deltatune.train.config_align import AlignArgs, default_changed, old_run_align, validate_align
from deltatune.train.models import load_tokenizer
from deltatune.train.pairs import encode_pair_splits

ROWS = [{"prompt": f"q{i} a b", "chosen": f"good answer {i}", "rejected": f"bad {i} c d"} for i in range(3)]
RAW = {"model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"}, "train": {"batch_size": 8}}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


def _sides(base, tmp_path, stage: str, align: dict) -> list[list[int]]:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = build({"stage": stage, "model": {"name_or_path": base}, "data": {"train": str(path)}, "align": align})
    train, _, _ = encode_pair_splits(cfg, load_tokenizer(base), causal=True)
    return [ex[k][f] for ex in train.examples for k in ("chosen", "rejected") for f in ("input_ids", "labels")]


@pytest.mark.parametrize("stage", ["orpo", "simpo", "cpo"])
def test_answer_eos_recorded_and_read(base, tmp_path, stage):
    """align.answer_eos true (the default since bac51df) appends the trained EOS TRL's CPO/ORPO trainers append;
    false encodes as before bac51df: the same ids and labels without that last token. HEAD has no such key (build
    refused align.answer_eos), so an old run could not be resumed or evaluated on its own tokens."""
    eos = load_tokenizer(base).eos_token_id
    new, old = _sides(base, tmp_path, stage, {}), _sides(base, tmp_path, stage, {"answer_eos": False})
    assert build({**RAW, "stage": stage}).align.answer_eos is True
    assert all(n == o + [eos] for n, o in zip(new, old, strict=True)) and all(o[-1] != eos for o in old)
    assert _sides(base, tmp_path, "dpo", {"answer_eos": True}) == _sides(base, tmp_path, "dpo", {"answer_eos": False})


def test_old_run_yaml_resumes_as_it_ran(tmp_path):
    """A run.yaml without align.answer_eos (before bac51df) is read as false on orpo/simpo/cpo (BEFORE_KEY), not on
    dpo; a resume with today's default names the change in one line and how to continue as the run began; the same
    recipe with answer_eos: false resumes with no change."""
    from deltatune.train.run import _check_resume_recipe, _recipe_dict

    recipe = {**RAW, "stage": "orpo", "output": {"dir": str(tmp_path)}}
    written = _recipe_dict(build(recipe))
    del written["align"]["answer_eos"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(written))
    assert old_run_align(written["align"], "orpo")["answer_eos"] is False
    assert "answer_eos" not in old_run_align(written["align"], "dpo")
    with pytest.raises(ConfigError, match=r"align.answer_eos: False -> True \(its default was false, true since "
                       r"bac51df .*set align.answer_eos: false to continue as the run began\)"):  # fmt: skip
        _check_resume_recipe(str(tmp_path), _recipe_dict(build(recipe)), False)
    same = _recipe_dict(build({**recipe, "align": {"answer_eos": False}}))
    assert _check_resume_recipe(str(tmp_path), same, False) is False


GRPO = {**RAW, "stage": "grpo", "align": {"num_generations": 2, "max_new_tokens": 4}}


def _grpo(kw) -> None:
    build({**GRPO, "align": {**GRPO["align"], "generation_kwargs": kw}})


@pytest.mark.parametrize(
    "kw, warper, value",
    [({"temperature": 0}, "TemperatureLogitsWarper", 0), ({"typical_p": 2.0}, "TypicalLogitsWarper", 2.0),
     ({"top_k": -3}, "TopKLogitsWarper", -3), ({"epsilon_cutoff": 5}, "EpsilonLogitsWarper", 5)],
)  # fmt: skip
def test_generation_kwargs_values_checked_as_generate(kw, warper, value):
    """Each value transformers' logits processor refuses (at the first rollout, or never: typical_p 2.0 read as off
    and trained) is one ConfigError at build naming the key; HEAD built them all."""
    with pytest.raises(ValueError):
        getattr(lp, warper)(value)  # (the reference refuses it)
    with pytest.raises(ConfigError, match=rf"^align.generation_kwargs {next(iter(kw))}: transformers' generate"):
        _grpo(kw)


def test_generation_kwargs_keys_checked():
    """A key that is no GenerationConfig setting (transformers keeps it, ignores it) is refused with did-you-mean;
    stop_strings (generate needs the tokenizer, which the loop does not pass) is the loop's; valid settings build
    and are the GenerationConfig that sampling builds."""
    assert not hasattr(GenerationConfig(), "typcal_p") and GenerationConfig(typcal_p=0.9).typcal_p == 0.9
    with pytest.raises(ConfigError, match="'typcal_p' is not a GenerationConfig setting; did you mean 'typical_p'"):
        _grpo({"typcal_p": 0.9})
    with pytest.raises(ConfigError, match="'no_such_key' is not a GenerationConfig setting"):
        _grpo({"no_such_key": 1})
    with pytest.raises(ConfigError, match="generation_kwargs sets stop_strings, which the GRPO loop sets itself"):
        _grpo({"stop_strings": ["a"]})
    with pytest.raises(ConfigError, match="align.top_p"):
        build({**GRPO, "align": {**GRPO["align"], "top_p": 2.0}})
    _grpo({"typical_p": 0.9, "no_repeat_ngram_size": 2, "epsilon_cutoff": 3e-4})
    assert build(GRPO).align.generation_kwargs is None


def test_default_changed_note_per_stage():
    """The note only where the new value is that stage's default today (note.py): grpo's mini_batch_size,
    temperature and max_new_tokens did not change (HEAD noted 4 -> 2, 1.0 -> 0.7, 32 -> 53 there); ppo's
    mini_batch_size default is train.batch_size (HEAD noted 4 -> 2 with batch 8)."""
    assert default_changed("align.mini_batch_size", 4, 2, "grpo", 8) == ""
    assert default_changed("align.temperature", 1.0, 0.7, "grpo", 8) == ""
    assert default_changed("align.max_new_tokens", 32, 53, "grpo", 8) == ""
    assert default_changed("align.mini_batch_size", 4, 2, "ppo", 8) == ""
    assert default_changed("align.temperature", 1.0, 0.5, "ppo", 8) == ""
    assert "set align.mini_batch_size: 4 to continue" in default_changed("align.mini_batch_size", 4, 8, "ppo", 8)
    assert "set align.temperature: 1.0 to continue" in default_changed("align.temperature", 1.0, 0.7, "ppo", 8)
    assert "set align.answer_eos: false" in default_changed("align.answer_eos", False, True, "cpo", 2)
    assert default_changed("align.answer_eos", False, True, "dpo", 2) == ""
    assert default_changed("align.disable_dropout", False, True, "rm", 2) != ""
    a = AlignArgs()
    validate_align(a, "ppo", 8)
    assert a.mini_batch_size == 8 and a.temperature == 0.7  # (ppo's defaults today, which the note tests against)


def test_unbuilt_trl_keys_at_trl_default_taken():
    """sync_ref_model, its pacing keys, truncation_mode and padding_free at TRL 1.16 DPOConfig's defaults (what
    deltatune does) build; HEAD refused them ('drop it'). Other values are still refused."""
    keys = ("sync_ref_model", "ref_model_sync_steps", "ref_model_mixup_alpha", "truncation_mode", "padding_free")
    trl = {f.name: f.default for f in dataclasses.fields(DPOConfig) if f.name in keys}
    assert trl == {"sync_ref_model": False, "ref_model_sync_steps": 512, "ref_model_mixup_alpha": 0.6,
                   "truncation_mode": "keep_start", "padding_free": False}  # fmt: skip
    cfg = build({**RAW, "stage": "dpo", "align": trl})
    assert cfg.align == build({**RAW, "stage": "dpo"}).align
    for key, value in [("truncation_mode", "keep_end"), ("padding_free", True), ("padding_free", 0)]:
        with pytest.raises(ConfigError, match=f"align.{key} .TRL's DPOConfig. is not built"):
            build({**RAW, "stage": "dpo", "align": {key: value}})


@pytest.mark.parametrize("kw", [{"temperature": 1}, {"repetition_penalty": 1}, {"typical_p": 1}, {"epsilon_cutoff": 0},
                                {"eta_cutoff": 0}, {"output_scores": True}, {"do_sample": True}])  # fmt: skip
def test_generation_kwargs_values_generate_takes_are_taken(kw):
    """Whole numbers at a processor's off value (temperature 1, YAML's int) and flags transformers only warns about
    were refused (review O): generate builds no processor for them and samples."""
    _grpo(kw)


def test_generation_kwargs_do_sample_false_is_one_line_naming_it():
    with pytest.raises(ConfigError, match=r"^align.generation_kwargs do_sample: GRPO samples each prompt's group"):
        _grpo({"do_sample": False})
