"""Probe 25 of the reward scorers (scorers.py, grpo_reward_model.py): PPO's transformers reward model folder checked
against what TRL's PPOTrainer feeds it (the policy's token ids); GRPO's checked for the tokenizer TRL's GRPOTrainer
loads from it; models.load_tokenizer on a tokenizer.json without its keys."""

from __future__ import annotations

import pytest
import torch

from deltatune.config import ConfigError
from deltatune.train.scorers import check_token_reward
from tests.tiny import word_tokenizer


def _folder(tmp_path, vocab: int) -> str:
    """A GPT-2 one-label classifier saved without tokenizer files (as a trained reward model's weights alone)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, num_labels=1, pad_token_id=0,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    return str(tmp_path)


def test_a_reward_folder_without_tokenizer_files_is_checked_by_its_vocabulary(tmp_path):
    """transformers 5 builds GPT-2's (Qwen2's) tokenizer of its defaults, one token, from a folder without its
    files: check_token_reward read that as the reward's tokenizer and refused a folder whose vocabulary holds every
    policy id ("its tokenizer is not the policy's (1 tokens, ...)"), where TRL's PPOTrainer takes the model (loaded
    as below) and scores the policy's ids. Now such a folder is checked by its vocabulary, as one without a
    tokenizer: accepted (its scores equal TRL's get_reward: test_rl_probe17)."""
    from transformers import AutoModelForSequenceClassification

    tok = word_tokenizer()
    folder = _folder(tmp_path, len(tok) + 8)
    assert AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).score.out_features == 1  # (TRL's)
    check_token_reward(folder, tok)  # (refused before)


def test_a_reward_folder_without_tokenizer_files_and_too_few_ids_is_refused_by_its_vocabulary(tmp_path):
    tok = word_tokenizer()
    folder = _folder(tmp_path, len(tok) - 1)
    with pytest.raises(ConfigError, match=rf"its vocabulary of {len(tok) - 1} tokens is smaller than the policy"):
        check_token_reward(folder, tok)


@pytest.fixture(scope="module")
def bare_classifiers(tmp_path_factory):
    """A one-label GPT-2 and a one-label BERT classifier saved without tokenizer files (weights alone)."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

    gpt2, bert = tmp_path_factory.mktemp("gpt2-rm"), tmp_path_factory.mktemp("bert-rm")
    GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, num_labels=1,
                                             pad_token_id=0)).save_pretrained(gpt2)  # fmt: skip
    BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, num_labels=1)).save_pretrained(bert)  # fmt: skip
    return str(gpt2), str(bert)


def test_a_grpo_reward_folder_without_tokenizer_files_is_one_line_before_the_policy_loads(bare_classifiers):
    """GRPO's align.reward_funcs naming a transformers classifier folder without tokenizer files passed
    check_rewards; TRL's GRPOTrainer (and SequenceClassifierReward, as it) loads AutoTokenizer from the folder,
    which transformers 5 builds of its defaults: GPT-2's of one token (every text [], the first reward call failed
    in a reshape, after the policy had loaded), BERT's of 5 (every word [UNK]: near-constant rewards, silently).
    check_rewards now refuses both in one line naming align.reward_funcs and the folder, as models.load_tokenizer
    refuses such a base model."""
    from transformers import AutoTokenizer

    from deltatune.train.config import AlignArgs
    from deltatune.train.grpo_rewards import check_rewards

    gpt2, bert = bare_classifiers
    assert AutoTokenizer.from_pretrained(gpt2)("the cat sat", add_special_tokens=False)["input_ids"] == []  # (TRL's)
    unk = AutoTokenizer.from_pretrained(bert)
    assert set(unk("the cat sat", add_special_tokens=False)["input_ids"]) == {unk.unk_token_id}
    for folder in (gpt2, bert):
        with pytest.raises(ConfigError) as err:
            check_rewards(AlignArgs(reward_funcs=[folder], num_generations=2))
        line = str(err.value)
        assert "\n" not in line and line.startswith(f"align.reward_funcs: model {folder!r} holds no tokenizer vocab")


def test_a_tokenizer_json_without_its_keys_is_one_line_and_a_ppo_reward_folder_with_one_is_checked_by_vocabulary(
    tmp_path,
):
    """A tokenizer.json of {} (valid JSON, no tokenizers file): transformers' KeyError 'added_tokens' came as a
    traceback from models.load_tokenizer and from check_token_reward. load_tokenizer now says it in one line naming
    the file; check_token_reward (which reuses it) checks such a reward folder by its vocabulary, as one whose
    tokenizer.json is no JSON at all: TRL's PPOTrainer reads no tokenizer of the reward folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.train.models import load_tokenizer

    tok = word_tokenizer()
    folder = _folder(tmp_path, len(tok) + 8)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(KeyError):
        AutoTokenizer.from_pretrained(folder)  # (what both called)
    with pytest.raises(ConfigError) as err:
        load_tokenizer(folder)
    assert "\n" not in str(err.value) and "tokenizer.json has no 'added_tokens'" in str(err.value)
    AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)  # (TRL's: the model alone)
    check_token_reward(folder, tok)
    (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text().replace(f'"vocab_size": {len(tok) + 8}',
                                                                                       f'"vocab_size": {len(tok) - 1}'))  # fmt: skip
    with pytest.raises(ConfigError, match=rf"its vocabulary of {len(tok) - 1} tokens is smaller than the policy"):
        check_token_reward(folder, tok)


def test_a_bpe_vocabulary_without_its_merges_is_one_line(tmp_path):
    """A folder holding vocab.json without merges.txt (or the reverse): transformers refuses it (tokenizers' ValueError
    "`vocab` and `merges` must be both be from memory or both filenames"), which models.load_tokenizer let through as
    a traceback naming neither file; now one line naming the file it holds and its missing pair."""
    from transformers import AutoTokenizer

    from deltatune.train.models import load_tokenizer

    folder = _folder(tmp_path, 8)
    for have, content in (("vocab.json", '{"a": 0, "b": 1}'), ("merges.txt", "#version: 0.2\na b\n")):
        for f in ("vocab.json", "merges.txt"):
            (tmp_path / f).unlink(missing_ok=True)
        (tmp_path / have).write_text(content)
        with pytest.raises(ValueError, match="merges"):
            AutoTokenizer.from_pretrained(folder)  # (the reference refuses it too)
        with pytest.raises(ConfigError) as err:
            load_tokenizer(folder)
        assert "\n" not in str(err.value) and f"holds {have} without its pair" in str(err.value)
