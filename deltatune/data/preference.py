"""Preference rows (prompt, chosen, rejected) -> token ids, for reward models, DPO and PPO prompts.

Two encodings of a (prompt, response) text pair:

- ``encode_scored`` for a scoring model (the reward model): an encoder's tokenizer's own pair template,
  ``[CLS] prompt [SEP] response [SEP]`` with token types; a decoder's, ``encode_lm``'s ids (the response closed by
  EOS, where the score is read, as TRL's RewardTrainer appends it).
- ``encode_lm`` for a causal LM (DPO, KTO): ``tokenizer(prompt + response + EOS)`` split where the tokenized prompt
  and the whole part, as TRL 1.16 splits standard rows, labels -100 on the prompt, so summed label log-probs are
  the response's log-probability given the prompt.

Both keep the response and cut the prompt from its start (the end of a dialogue is what the response answers).
A row with an empty response, or the same text chosen and rejected, is refused with its file and line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .load import DataError, Row
from .tasks import Collator, Encoded
from .templates import IGNORE_INDEX


@dataclass
class Pair:
    """One checked preference row."""

    prompt: str
    chosen: str
    rejected: str
    source: str


def read_pairs(
    rows: Sequence[Row],
    prompt_column: str,
    chosen_column: str,
    rejected_column: str,
    skipped: list[str] | None = None,
) -> list[Pair]:
    """Check and unpack preference rows.

    Args:
        rows: the rows read from the data file.
        prompt_column: column of the prompt text.
        chosen_column: column of the preferred response.
        rejected_column: column of the dispreferred response.
        skipped: when given, a row with an empty response or chosen == rejected is left out and its ``file:line``
            appended here, instead of raising.

    Raises:
        DataError: a column is missing or not text, or (unless ``skipped`` is given) a response is empty or chosen
            equals rejected; the message names file and line.
    """
    out = []
    for row in rows:
        try:
            pair = _pair(row, prompt_column, chosen_column, rejected_column)
        except _BadPair as exc:
            if skipped is None:
                raise DataError(str(exc)) from None
            skipped.append(row.source)
            continue
        out.append(pair)
    return out


class _BadPair(Exception):
    """A well-formed row that is no preference (an empty response, or the same response twice)."""


def _pair(row: Row, prompt_column: str, chosen_column: str, rejected_column: str) -> Pair:
    texts = []
    for column in (prompt_column, chosen_column, rejected_column):
        value = row.get(column)
        if not isinstance(value, str):
            raise DataError(f"{row.source}: column {column!r} must be text, got {type(value).__name__}")
        texts.append(value)
    prompt, chosen, rejected = texts
    for column, text in ((chosen_column, chosen), (rejected_column, rejected)):
        if not text.strip():
            raise _BadPair(
                f"{row.source}: column {column!r} is empty; a preference pair needs two responses "
                "(data.bad_pairs=skip leaves such rows out)"
            )
    if chosen.strip() == rejected.strip():
        raise _BadPair(
            f"{row.source}: {chosen_column!r} and {rejected_column!r} are identical; a preference pair needs two "
            "different responses (data.bad_pairs=skip leaves such rows out)"
        )
    return Pair(prompt, chosen, rejected, row.source)


def skipped_note(split: str, skipped: list[str]) -> str:
    """The report line for the ``split`` rows left out by ``data.bad_pairs=skip``."""
    shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    why = "an empty or non-assistant response, chosen == rejected, or a ranking conversation LLaMA-Factory drops"
    return f"{len(skipped)} {split} rows skipped (bad pairs: {why}): {shown}"


def read_prompts(rows: Sequence[Row], prompt_column: str) -> list[tuple[str, str]]:
    """(prompt, file:line) per row; DataError for a missing or empty prompt."""
    out = []
    for row in rows:
        value = row.get(prompt_column)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{row.source}: column {prompt_column!r} must be non-empty text")
        out.append((value, row.source))
    return out


def _cut_prompt(tokenizer, prompt: str, drop: int) -> str:
    """``prompt`` without its first ``drop`` tokens (cut at a token boundary, by character offsets)."""
    offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if drop >= len(offsets):
        return ""
    return prompt[offsets[drop][0] :]


def encode_scored(tokenizer, prompt: str, response: str, max_length: int) -> tuple[dict[str, list[int]], bool]:
    """Model inputs for scoring ``response`` to ``prompt``, and whether it was cut.

    An encoder's tokenizer (one that ends its encodings with EOS: BERT's [SEP], T5's and BART's </s>) gives its
    pair template. Over-long inputs lose the start of the prompt first; a response that alone exceeds
    ``max_length`` is cut at its end. A decoder's (GPT-2, Llama, Qwen) gives ``encode_lm``'s ids: its pair template
    joined the texts with no EOS (Llama's with a second BOS), so the score was read at the response's last word
    where TRL's RewardTrainer, which appends the EOS, reads it at the EOS.
    """
    if tokenizer.eos_token_id is not None and _no_eos_after(tokenizer):
        enc, cut = encode_lm(tokenizer, prompt, response, max_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, cut

    def enc(p: str, **kw: Any) -> dict[str, list[int]]:
        out = tokenizer(p, response, **kw) if p else tokenizer(response, **kw)
        return {k: list(v) for k, v in out.items()}

    ids = enc(prompt)
    if len(ids["input_ids"]) <= max_length:
        return ids, False
    over = len(ids["input_ids"]) - max_length
    prompt = _cut_prompt(tokenizer, prompt, over) if prompt else prompt
    ids = enc(prompt)
    if len(ids["input_ids"]) > max_length:  # the response alone is too long, or offsets merged at the cut
        ids = enc(prompt, truncation="longest_first" if prompt else True, max_length=max_length)
    return ids, True


def _no_eos_after(tokenizer) -> bool:
    """Whether the tokenizer ends its encodings with no EOS (a decoder's: GPT-2, Llama, Qwen)."""
    probe = tokenizer("a")["input_ids"]
    return not probe or probe[-1] != tokenizer.eos_token_id


def bos_prefix(tokenizer) -> list[int]:
    """The BOS id when the tokenizer starts its encodings with one (Llama), else nothing (GPT-2, Qwen)."""
    bos = tokenizer.bos_token_id
    probe = tokenizer("a")["input_ids"]
    return [bos] if bos is not None and probe and probe[0] == bos else []


def special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text of its own accord: ([BOS], []) for Llama's,
    ([CLS], [SEP]) for BERT's, ([], []) for GPT-2's and Qwen's."""
    core, full = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    for i in range(len(full) - len(core) + 1):
        if core and full[i : i + len(core)] == core:
            return full[:i], full[i + len(core) :]
    return bos_prefix(tokenizer), []


def encode_lm(
    tokenizer, prompt: str, response: str, max_length: int, own_specials: bool = True
) -> tuple[dict[str, list[int]], bool]:
    """Causal-LM inputs of a prompt and response text as TRL 1.16's DPO, KTO and Reward trainers tokenize standard
    rows: ``tokenizer(prompt + response + EOS)`` (the EOS appended only where the response does not already end with
    it), the answer from where it and ``tokenizer(prompt)`` part (TRL's ``common_prefix_length``: a word split
    across the boundary, ``"The sky is " + "blue."``, trains from the merged token), labels -100 before; whether it
    was cut. The special tokens the tokenizer adds of its own accord are kept: BERT's [CLS] leads and its closing
    [SEP] follows the EOS [SEP], both trained. ``own_specials=False`` (ORPO, SimPO, CPO, as TRL 1.16's ORPO and CPO
    trainers): the text without them, the BOS (where the tokenizer has one) put before it: BERT's ``p r [SEP]``.

    Over-long rows keep the leading special tokens, the end of the prompt and as much of the response as fits (at
    least half of ``max_length`` when the response is that long).
    """
    eos = tokenizer.eos_token
    text = response if not eos or response.endswith(eos) else response + eos
    kw = {} if own_specials else {"add_special_tokens": False}
    head_ids = list(tokenizer(prompt, **kw)["input_ids"])
    ids = list(tokenizer(prompt + text, **kw)["input_ids"])
    bos = tokenizer.bos_token_id
    lead = [bos] if not own_specials and bos is not None and ids[:1] != [bos] else []
    head_ids, ids = lead + head_ids, lead + ids
    n = 0
    while n < min(len(head_ids), len(ids)) and head_ids[n] == ids[n]:
        n += 1
    head = special_ends(tokenizer)[0] if own_specials else lead
    head = head if ids[: len(head)] == head and len(head) <= n else []
    ex = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * n + ids[n:]}
    return cut_lm(ex, max_length, len(head))


def cut_lm(ex: dict[str, list[int]], max_length: int, head: int = 0) -> tuple[dict[str, list[int]], bool]:
    """Causal-LM inputs ``ex`` cut to ``max_length`` (and whether they were): the first ``head`` tokens (leading
    special tokens) kept, then the end of the prompt (the tokens before the first trained label) and as much of the
    answer as fits (at least half of what is left when the answer is that long)."""
    ids, labels = ex["input_ids"], ex["labels"]
    if len(ids) <= max_length:
        return ex, False
    first = max(head, next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(ids)))
    p, r, r_labels = ids[head:first], ids[first:], labels[first:]
    budget = max_length - head
    keep_r = min(len(r), max(budget - len(p), budget // 2))
    keep_p = budget - keep_r
    p = p[len(p) - keep_p :] if keep_p > 0 else []
    ids = ids[:head] + p + r[:keep_r]
    labels = labels[:head] + [IGNORE_INDEX] * len(p) + r_labels[:keep_r]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, True


def encode_pairs(pairs: Sequence[Pair], tokenizer, max_length: int, truncation: str, causal: bool) -> Encoded:
    """Each pair as ``{"chosen": inputs, "rejected": inputs}`` (``encode_lm`` when ``causal``, else
    ``encode_scored``); rows cut to ``max_length`` are counted, or refused with ``truncation="refuse"``."""
    encode = encode_lm if causal else encode_scored
    out, truncated = [], 0
    for pair in pairs:
        chosen, cut_c = encode(tokenizer, pair.prompt, pair.chosen, max_length)
        rejected, cut_r = encode(tokenizer, pair.prompt, pair.rejected, max_length)
        if (cut_c or cut_r) and truncation == "refuse":
            raise DataError(
                f"{pair.source}: longer than data.max_length={max_length} tokens "
                "(set data.truncation=truncate to cut such rows)"
            )
        truncated += cut_c or cut_r
        out.append({"chosen": chosen, "rejected": rejected})
    return Encoded(out, truncated)


@dataclass
class PairCollator:
    """A batch of B pairs as one batch of 2B sequences: the B chosen first, then the B rejected (so one forward
    pass scores both; ``.chunk(2)`` splits them). Scalar fields (e.g. precomputed reference log-probs) are
    stacked as (B,) tensors."""

    pad_token_id: int
    _pad: Collator = field(init=False)

    def __post_init__(self) -> None:
        self._pad = Collator(self.pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self._pad([e["chosen"] for e in examples] + [e["rejected"] for e in examples])
        for key in examples[0]:
            if key not in ("chosen", "rejected"):
                batch[key] = torch.tensor([e[key] for e in examples])
        return batch
