"""Probe 25 of the seq2seq stage and the reward scorers (scorers.py): PPO's transformers reward model folder
checked against what TRL's PPOTrainer feeds it (the policy's token ids)."""

from __future__ import annotations

import pytest
import torch

from deltatune.config import ConfigError
from deltatune.train.scorers import TokenRewardModel, check_token_reward
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
    policy id ("its tokenizer is not the policy's (1 tokens, ...)"), where TRL's PPOTrainer takes the model and
    scores the policy's ids. Now such a folder is checked by its vocabulary, as one without a tokenizer: accepted,
    and it scores the policy's ids as TRL's get_reward (one forward of the backbone)."""
    tok = word_tokenizer()
    folder = _folder(tmp_path, len(tok) + 8)
    check_token_reward(folder, tok)  # (refused before)
    ids = torch.tensor([tok("the cat sat")["input_ids"] + [tok.pad_token_id]])
    model = TokenRewardModel(folder)
    got = model.score_ids(ids, tok.pad_token_id, context_length=1)
    # TRL's get_reward: the score head at the last token before the response's first pad
    mask = ids != tok.pad_token_id
    hidden = model.model.transformer(input_ids=ids.masked_fill(~mask, 0), attention_mask=mask,
                                     position_ids=mask.cumsum(1) - mask.long()).last_hidden_state  # fmt: skip
    want = model.model.score(hidden)[0, ids.shape[1] - 2, 0]
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


def test_a_reward_folder_without_tokenizer_files_and_too_few_ids_is_refused_by_its_vocabulary(tmp_path):
    tok = word_tokenizer()
    folder = _folder(tmp_path, len(tok) - 1)
    with pytest.raises(ConfigError, match=rf"its vocabulary of {len(tok) - 1} tokens is smaller than the policy"):
        check_token_reward(folder, tok)
