"""A transformers sequence-classification model as a GRPO reward (an ``align.reward_funcs`` entry naming its folder),
as TRL 1.16's GRPOTrainer takes a reward model: loaded with ``AutoModelForSequenceClassification`` (one label) and its
own tokenizer (its pad token the EOS where it has none), each completion scored as its prompt and completion joined
(chat prompts: the messages through the reward tokenizer's chat template), right-padded, without special tokens
added; the reward is the logit. A deltatune reward run (stage rm) is scored by ``scorers`` instead."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..config import ConfigError


def is_model_folder(spec: str) -> bool:
    """Whether ``spec`` is a folder holding a transformers model (config.json) that is no deltatune run (run.yaml)."""
    return os.path.isfile(os.path.join(spec, "config.json")) and not os.path.isfile(os.path.join(spec, "run.yaml"))


def check_model_folder(spec: str) -> None:
    """ConfigError, one line naming the align.reward_funcs folder, unless its config.json is a one-label sequence
    classifier (TRL loads it with num_labels=1: a causal LM folder would score with a random head, silently; a
    checkpoint of another number of labels fails in transformers on its score head's size); read before any model
    loads."""
    try:
        with open(os.path.join(spec, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"align.reward_funcs: {spec!r}'s config.json cannot be read ({exc})") from None
    archs = config.get("architectures") if isinstance(config, dict) else None
    auto = config.get("auto_map") if isinstance(config, dict) else None
    remote = isinstance(auto, dict) and "AutoModelForSequenceClassification" in auto  # (TRL's load follows it)
    if not remote and not (
        isinstance(archs, list) and any(str(x).endswith("ForSequenceClassification") for x in archs)
    ):
        raise ConfigError(f"align.reward_funcs: {spec!r} is no sequence-classification model (config.json's "
                          f"architectures: {archs!r}): a reward model folder is one, as TRL's GRPOTrainer loads it "
                          "with AutoModelForSequenceClassification (its score head would be random)")  # fmt: skip
    id2label = config.get("id2label")
    labels = len(id2label) if isinstance(id2label, dict) and id2label else config.get("num_labels", 2)
    if labels != 1:  # (transformers' default, with neither key saved: 2)
        raise ConfigError(f"align.reward_funcs: {spec!r} is a classifier of {labels} labels (config.json's "
                          "id2label / num_labels): a reward model scores with one logit (TRL loads it with "
                          "num_labels=1, which its score head's weights do not fit)")  # fmt: skip


def check_model_tokenizer(spec: str) -> None:
    """ConfigError, one line naming the align.reward_funcs folder, unless it holds a tokenizer with its vocabulary
    (``models.load_tokenizer``'s check): TRL's GRPOTrainer loads AutoTokenizer from the folder, and transformers 5
    builds a GPT-2 or BERT tokenizer of its defaults from a folder without its files (GPT-2's: every text [], the
    first reward call fails; BERT's: every word [UNK], near-constant rewards, silently) where 4.x raised; read
    before the policy loads. A tokenizer of its own code (auto_map) is left to the load, under the recipe's
    model.trust_remote_code."""
    from .models import load_tokenizer

    try:
        load_tokenizer(spec)
    except ConfigError as exc:
        if "runs its own code" in str(exc):
            return
        raise ConfigError(f"align.reward_funcs: {exc}") from None


class SequenceClassifierReward:
    """TRL's reward model: ``f(prompts, completions, **columns) -> list[float]``, as a reward function is called."""

    def __init__(self, path: str, device: str | torch.device = "cpu", trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, trust_remote_code=trust_remote_code
        )
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.get_text_config().pad_token_id = self.tokenizer.pad_token_id  # (the last token not a pad)
        self.model.to(device).eval().requires_grad_(False)

    @torch.inference_mode()
    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        """One reward per (prompt, completion); [] for an empty batch (the model is not called).

        Raises:
            ValueError: the two lists differ in length (zip scored the shorter one's pairs and dropped the rest).
        """
        if not paired(prompts, completions):
            return []
        if isinstance(prompts[0], list):  # (TRL asks the batch's first prompt)
            texts = [self.tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        batch = self.tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right",
                               add_special_tokens=False).to(device)  # fmt: skip
        return self.model(**batch).logits[:, 0].float().tolist()


def paired(prompts: Sequence[str], responses: Sequence[str]) -> int:
    """How many (prompt, response) pairs a reward call scores (0: an empty batch, (0,) rewards; the model is not
    called, which fails on no rows).

    Raises:
        ValueError: the two lists differ in length (zip scored the shorter one's pairs and dropped the rest).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"reward model: {len(prompts)} prompts but {len(responses)} responses; one response per "
                         "prompt")  # fmt: skip
    return len(prompts)
