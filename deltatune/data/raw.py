"""``data.template: raw``: TRL's rendering of standard (string) rows, no chat template. SFT's prompt-completion rows
are ``prompt + completion + EOS`` as TRL's SFTTrainer tokenizes them (the completion from where the tokenized prompt
and the whole part); the preference stages read such rows as ``encode.RAW`` always did (``preference.encode_lm``).
"""

from __future__ import annotations

from .sample import Sample, as_written
from .templates import IGNORE_INDEX


def raw_refusal(s: Sample, stage: str, plain_pair: bool) -> str | None:
    """Why ``s`` cannot be rendered raw in ``stage`` (one line naming the row), or None. SFT takes standard
    prompt-completion rows only (TRL's plain SFT of a text row is stage pt); other stages TRL's standard pairs."""
    if stage == "sft":
        ok = s.format == "prompt_completion" and not s.conversational and not s.tools
        ok = ok and len(s.messages) == 1 and len(s.completion or []) == 1
    else:
        ok = plain_pair
    if ok:
        return None
    shape = "standard prompt + completion strings" if stage == "sft" else "a string prompt and string responses"
    return (
        f"{s.source}: data.template=raw renders TRL's standard rows ({shape}) with no chat template; this "
        f"{'conversational ' if s.conversational else ''}{s.format} row needs a chat template (leave data.template "
        "unset, or name a built-in one)"
    )


def raw_text(s: Sample, tokenizer) -> tuple[str, str]:
    """(prompt, prompt + completion + EOS): TRL's add_eos appends the EOS where the completion does not end with it."""
    prompt, completion = as_written(s.messages[0]), as_written((s.completion or [])[0])
    eos = tokenizer.eos_token
    if eos and not completion.endswith(eos):
        completion += eos
    return prompt, prompt + completion


def raw_sft(s: Sample, tokenizer, train_on_prompt: bool = False) -> tuple[list[int], list[int], list[int]]:
    """Ids, labels and the answers' labels of a standard prompt-completion row as TRL 1.16's SFTTrainer makes them:
    ``tokenizer(prompt + completion + EOS)``, trained from where it and ``tokenizer(prompt)`` part (its
    ``common_prefix_length``); ``train_on_prompt`` trains every token."""
    prompt, text = raw_text(s, tokenizer)
    head = tokenizer(prompt)["input_ids"]
    ids = list(tokenizer(text)["input_ids"])
    n = 0
    while n < min(len(head), len(ids)) and head[n] == ids[n]:
        n += 1
    answers = [IGNORE_INDEX] * n + ids[n:]
    return ids, list(ids) if train_on_prompt else answers, answers
