"""PPO's checks of the reward model and of the prompts (their template's markers, data.truncation) before any model
loads (split from ppo.py, near its line limit)."""

from __future__ import annotations

from ..config import ConfigError


def check_reward_context(spec: str, longest: int, max_new_tokens: int, trust_remote_code: bool = False) -> None:
    """ConfigError naming align.reward_model when a transformers reward folder (``scorers.TokenRewardModel``, which
    scores the policy's prompt and response ids whole, as TRL's get_reward) has fewer positions than the longest
    prompt (``longest`` tokens) plus align.max_new_tokens: its forward failed inside torch's embedding mid-run (GPT-2's
    learned positions), after the policy had loaded and sampled. A RoPE model would score past its positions (out of
    the lengths it was built for), but it is held to them as the policy is (``checks.check_rollout_context``), and
    the message says what they are. An unreadable config is left to the model loader."""
    from transformers import AutoConfig

    from ..targets import context_length

    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return
    context = context_length(config)
    if context is not None and longest + max_new_tokens > context:
        raise ConfigError(
            f"align.reward_model {spec!r} was built for at most {context} positions, fewer than the longest prompt "
            f"({longest} tokens) plus align.max_new_tokens={max_new_tokens} ({longest + max_new_tokens}); lower "
            "align.max_new_tokens or data.max_length, or use a reward model of a longer context"
        )


def encode_prompts(samples, tokenizer, template: str | None, max_length: int, truncation: str) -> tuple[list, int]:
    """(ids, how many were cut): each sample's prompt as ``encode.prompt_ids`` encodes it (the end kept past
    ``max_length``); under data.truncation=refuse an over-long one is a DataError naming its row, as GRPO's
    ``encode_prompts`` (PPO cut every one whatever the key said, and the report counted none)."""
    from ..data.encode import prompt_ids
    from ..data.templates import too_long

    out, cut = [], 0
    for s in samples:
        ids = prompt_ids(s, tokenizer, template, 1 << 62)  # (whole: cut below only where it is over)
        if len(ids) > max_length:
            if truncation == "refuse":
                raise too_long(s.source, len(ids), max_length)
            ids, cut = prompt_ids(s, tokenizer, template, max_length), cut + 1
        out.append(ids)
    return out, cut
