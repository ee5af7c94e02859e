"""PPO probe 23: the prompts PPO samples after (rendered with the generation prompt) are checked for template markers
the tokenizer cannot write, as training rows are; the start evaluation's key reads the weights it samples with
(model.dtype, model.quantization). Reference: TRL's PPOTrainer (``trl/experimental/ppo/ppo_trainer.py``,
huggingface/trl 0062ee10a9bc; TRL 1.16 no longer ships it)."""

from __future__ import annotations

import json

import pytest

from deltatune.data.load import DataError
from deltatune.train import build


def _raw(tmp_path, **data):
    from tiny import save_tiny

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(4)))
    return {"stage": "ppo", "model": {"name_or_path": save_tiny(tmp_path / "llama", vocab_size=45, pad_token_id=0, bos_token_id=2,
                                                          eos_token_id=3)},
            "data": {"train": str(prompts), **data}, "train": {"batch_size": 4},
            "align": {"reward_model": "operator:add"}}  # fmt: skip


def test_ppo_prompts_with_template_markers_the_tokenizer_cannot_write_are_refused_before_the_model_loads(tmp_path):
    """A word vocabulary reads chatml's '<|im_start|>user' as [UNK]: SFT refuses the template in one line
    (templates._check_markers), but PPO's prompts, rendered with the generation prompt, skipped the check, so the
    policy sampled after [UNK]s ([UNK] w0 w1 w2 [UNK] [UNK]). Now prepare_ppo refuses it as the training rows are."""
    from tiny import word_tokenizer

    from deltatune.train.ppo import prepare_ppo

    tok = word_tokenizer()
    ok = prepare_ppo(build(_raw(tmp_path, template="plain")), tok)  # (plain writes no marker: passes)
    assert tok.unk_token_id not in ok.train[0] and tok.decode(ok.train[0]).split()[-3:] == ["w0", "w1", "w2"]
    for template, marker in (("chatml", "<|im_start|>system"), ("alpaca", "### Instruction:")):
        with pytest.raises(DataError, match=rf"^data.template={template}: the tokenizer has no tokens for the "
                           rf"template's marker '{marker}'"):  # fmt: skip
            prepare_ppo(build(_raw(tmp_path, template=template)), tok)


def _key(**model):
    from deltatune.train.ppo_checkpoint import start_key

    raw = {"stage": "ppo", "model": {"name_or_path": "org/policy", **model},
           "data": {"train": "p.jsonl", "eval": "e.jsonl"}, "train": {"batch_size": 4, "eval_on_start": True},
           "align": {"reward_model": "operator:add"}}  # fmt: skip
    return start_key(build(raw), [[1, 2, 3], [4, 5]])


def test_the_start_key_reads_the_weights_dtype_and_quantization_and_keeps_the_old_key_for_the_defaults():
    """The start evaluation samples with the weights as loaded: a --resume-changed onto model.dtype bfloat16 or a
    4-bit base kept eval_reward_before of the float32 weights (the key read train.precision, not these). A run of
    the defaults keeps the key its checkpoints recorded (the digest HEAD computed), so it does not sample again."""
    default = _key()
    assert default == "1ef16c2b8989e642845be89a661d7fbf92e6e817d4984a38995ede782cdb1395"  # (HEAD b2f9a45's)
    assert _key(dtype="float32") == default
    others = {_key(dtype="bfloat16"), _key(quantization={"bits": 4}), _key(quantization={"bits": 8})}
    assert default not in others and len(others) == 3


def test_a_reward_file_path_imports_as_grpos_reward_funcs_do(tmp_path, monkeypatch):
    """align.reward_model 'rewards/mine.py:score' (a file, as GRPO's align.reward_funcs take one and recipes/rewards/
    holds them) failed: "could not be imported: ModuleNotFoundError: No module named 'rewards/mine'". Now it imports
    as the file run as a script, relative to the current folder; a missing file or function is one line naming
    align.reward_model."""
    from deltatune.config import ConfigError
    from deltatune.train.ppo import _check_reward_model, reward_function

    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "helper_ppo_probe23.py").write_text("def n(r):\n    return float(len(r.split()))\n")
    (tmp_path / "rewards" / "mine.py").write_text(
        "from helper_ppo_probe23 import n\n\n\ndef score(prompts, responses):\n    return [n(r) for r in responses]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))  # (the reward's folder joins a copy)
    _check_reward_model("rewards/mine.py:score", None)  # (prepare_ppo's check, before any model loads)
    assert reward_function("rewards/mine.py:score")(["p", "q"], ["a b c", "d"]) == [3.0, 1.0]
    for spec, says in (("rewards/none.py:score", "ImportError: no file rewards/none.py"),
                       ("rewards/mine.py:other", "AttributeError: module ")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"^align.reward_model {spec!r} could not be imported: {says}") as info:
            reward_function(spec)
        assert "\n" not in str(info.value)


def test_ppo_reads_data_truncation_and_counts_the_prompts_it_cut_as_grpo(tmp_path):
    """PPO cut every prompt over data.max_length to its end whatever data.truncation said (refuse was ignored, and
    no key notice named it), and the report did not count them ('truncate': counted in the report). Now refuse
    names the row, and truncate keeps the same ids as before and notes the count, as GRPO's encode_prompts do."""
    from tiny import tokenizer

    from deltatune.data.encode import prompt_ids
    from deltatune.train.ppo import prepare_ppo
    from deltatune.train.prepared import read_splits

    tok, raw = tokenizer(), _raw(tmp_path, max_length=28)
    prompts = tmp_path / "prompts.jsonl"
    words = ["hi", "tell me about the big old cat and the small dog", "a b", "what is the cat"]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in words))
    with pytest.raises(DataError, match=rf"^{prompts}:2: the prompt is 34 tokens, more than data.max_length=28 "
                       r"\(set data.truncation=truncate to keep its end\)$"):  # fmt: skip
        prepare_ppo(build({**raw, "data": {**raw["data"], "truncation": "refuse"}}), tok)
    cfg = build(raw)
    prepared = prepare_ppo(cfg, tok)
    samples, _, template, _ = read_splits(cfg, tok)
    whole = [prompt_ids(s, tok, template, 1000) for s in samples]
    assert [len(ids) > 28 for ids in whole] == [False, True, False, False]  # (the guard: one prompt over)
    assert prepared.train == [ids[-28:] for ids in whole]  # (the same ids as before: the end kept)
    assert "1 train prompts were longer than data.max_length=28; their ends were kept" in prepared.notes
