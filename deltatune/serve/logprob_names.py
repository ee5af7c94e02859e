"""Log-probabilities as OpenAI and vLLM report them: each step's row (the chosen token's log-probability and the
``k`` most likely tokens') and the JSON of a chat choice's or a completion's ``logprobs``, with each token named as
vLLM names it (decoded alone; a character split over byte-level or byte-fallback tokens named in context)."""

from __future__ import annotations

import os
from typing import Any

import torch

FLOOR = -9999.0  # OpenAI's JSON for -inf


def logprob_row(logits: torch.Tensor, token: int, k: int) -> tuple[int, float, list[tuple[int, float]]]:
    """``token``'s log-probability and the ``k`` most likely tokens', of the model's own distribution (vLLM's default
    ``logprobs_mode``, raw_logprobs: before penalties, temperature, top-k, top-p), -inf as OpenAI's -9999. The top
    ``k`` are chosen before the floor, as vLLM does: below -9999 they are still ordered by their logits."""
    inf = torch.isposinf(logits)  # the limit: the +inf tokens share all the mass (greedy picks one of them)
    lp = torch.log_softmax(torch.where(inf, 0.0, -torch.inf) if inf.any() else logits.float(), -1)
    top = lp.topk(k) if k else None
    floor = lambda v: max(v, FLOOR) if v == v else v  # noqa: E731 (NaN stays NaN, a failed row)
    pairs = [] if top is None else [(i, floor(v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    return token, floor(float(lp[token])), pairs


def prompt_row(logits: torch.Tensor, token: int, k: int) -> dict[int, tuple[float, int]]:
    """vLLM's ``prompt_logprobs`` entry of one prompt token: {token id: (log-probability, rank)} for the prompt's
    token (its rank: the tokens at least as likely, itself included, vLLM's ``>=`` count) and the ``k`` most likely (ranks 1 to k), of the model's own
    log-softmax, -inf as -9999 (vLLM's clamp_prompt_logprobs)."""
    lp = torch.log_softmax(logits.float(), -1)
    top = lp.topk(k) if k else None
    ids = [token] + ([] if top is None else top.indices.tolist())
    ranks = [int((lp >= lp[token]).sum())] + list(range(1, k + 1))  # vLLM's batched_count_greater_than: >=
    return {t: (max(float(lp[t]), FLOOR), rank) for t, rank in zip(ids, ranks)}  # a top one overwrites, as vLLM


def prompt_logprobs_json(tokenizer: Any, rows: list) -> list:
    """``Request.prompt_rows`` as vLLM answers ``prompt_logprobs``: null for the first token, then for each prompt
    token {"token id": {"logprob", "rank", "decoded_token"}}, each token decoded alone; one that decodes to an
    incomplete character named in the context of the prompt tokens scored before it (``_in_context``: "" for a
    character's first pieces, the whole character for its last), as vLLM's LogprobsProcessor corrects them (the
    last 4 of those prompt tokens, the first prompt token, whose row is null, not among them)."""
    out: list = []
    context: list[int] = []
    for row in rows:
        if row is None:
            out.append(None)
            continue
        named = {}
        for t, (v, rank) in row.items():
            name = tokenizer.decode([t])
            name = _in_context(tokenizer, t, context[-4:]) if name.endswith("\ufffd") else name
            named[str(t)] = {"logprob": v, "rank": rank, "decoded_token": name}
        out.append(named)
        context.append(next(iter(row)))  # the prompt's own token comes first in its row (prompt_row)
    return out


def logprobs_json(
    tokenizer: Any, rows: list, chat: bool, offset: int = 0, state: dict | None = None, as_ids: bool = False
) -> dict:
    """``rows`` (``Request.logprob_rows``) as OpenAI's ``logprobs``: a chat choice's ``content``, or a completion's
    ``tokens``, ``token_logprobs``, ``top_logprobs`` (the chosen token's among them) and ``text_offset`` (from
    ``offset``). Each token is decoded alone, as vLLM shows it (``_token_text``); the chosen tokens' names add up to
    the text (``_chosen_names``), and an alternative that decodes alone to an incomplete character is named in the
    context of the tokens chosen before it (``_in_context``), as vLLM's LogprobsProcessor names every candidate;
    ``state`` carries a stream's earlier chunks (a character left incomplete, the tokens chosen last). ``as_ids``
    (vLLM's return_tokens_as_token_ids): every token named "token_id:<id>" instead."""
    state = {} if state is None else state
    every = {t for row in rows for t in (row[0], *(i for i, _ in row[2]))}
    name = {t: f"token_id:{t}" if as_ids else _token_text(tokenizer, t) for t in every}
    if as_ids:
        chosen = [name[row[0]] for row in rows]
    else:
        chosen = _chosen_names(tokenizer, [row[0] for row in rows], name, state)
    context, named = state.setdefault("context", []), []
    for (token, _, top), own in zip(rows, chosen):
        ctx = context[-4:]  # a UTF-8 character spans at most 4 bytes
        split = not as_ids  # a name "token_id:<id>" is never a piece of a character
        at = {a: own if a == token else _in_context(tokenizer, a, ctx) if split and name[a].endswith("\ufffd") else name[a]
              for a, _ in top}  # fmt: skip
        named.append(at | {token: own})
        context.append(token)
    del context[:-4]
    if chat:
        item = lambda token, lp: {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}  # noqa: E731
        top_items = [[item(at[a], v) for a, v in top] for (_, _, top), at in zip(rows, named)]
        return {"content": [{**item(n, row[1]), "top_logprobs": t} for row, n, t in zip(rows, chosen, top_items)]}
    tokens = chosen
    offsets = [offset + sum(len(x) for x in tokens[:i]) for i in range(len(tokens))]
    tops = [
        None if lp is None else dict(sorted({**dict(top), t: lp}.items(), key=lambda a: -a[1])) for t, lp, top in rows
    ]
    tops = [None if d is None else {at[i]: lp for i, lp in d.items()} for d, at in zip(tops, named)]
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in rows],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _chosen_names(tokenizer: Any, ids: list[int], name: dict[int, str], state: dict) -> list[str]:
    """Each token's own name, except a character split over byte-level or byte-fallback tokens (its pieces decode to
    U+FFFD alone): "" for the pieces before the last, the whole character for the last, so that the names add up to
    the text as vLLM's LogprobsProcessor corrects them (a bad byte sequence gives up after 4 pieces)."""
    out, pending = [], state.setdefault("pending", [])
    for t in ids:
        if not pending and "\ufffd" not in name[t]:
            out.append(name[t])
            continue
        pending.append(t)
        text = tokenizer.decode(pending)
        complete = not text.endswith("\ufffd") or len(pending) == 4
        out.append(text if complete else "")
        if complete:
            pending.clear()
    return out


def _in_context(tokenizer: Any, token: int, context: list[int]) -> str:
    """What ``token`` adds after the tokens ``context`` (the last chosen, oldest first), as vLLM's
    ``_correct_decoded_token`` names a candidate that decodes alone to U+FFFD: the text that the shortest context
    completing a character decodes to with it, less that context's clean prefix; "" where none completes one."""
    for n in range(1, min(len(context), 4) + 1):
        ctx = context[-n:]
        full = tokenizer.decode(ctx + [token])
        if full.endswith("\ufffd"):
            continue
        clean = len(ctx)  # the context's own incomplete pieces (named "") count as this token's
        while clean and tokenizer.decode([ctx[clean - 1]]).endswith("\ufffd"):
            clean -= 1
        prefix = tokenizer.decode(ctx[:clean]) if clean else ""
        return full[len(os.path.commonprefix([prefix, full])) :]
    return ""


def _token_text(tokenizer: Any, token: int) -> str:
    """``token`` decoded alone, with the leading spaces a SentencePiece piece's "▁" stands for, which decode drops
    at the start of a text ("▁the" decodes to "the"): vLLM restores them, OpenAI shows them (" the")."""
    text, piece = tokenizer.decode([token]), tokenizer.convert_ids_to_tokens(token)
    marks = len(piece) - len(piece.lstrip("\u2581")) if isinstance(piece, str) else 0
    return " " * (marks - (len(text) - len(text.lstrip(" ")))) + text
