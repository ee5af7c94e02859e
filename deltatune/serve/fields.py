"""A completion request's sampling fields, each checked as OpenAI and vLLM check it (a 400 naming the field), and
turned into an engine ``Request``: the limits on ``max_tokens``, ``n``, ``stop``, ``seed``, the sampling settings
(applied by ``sampling``: vLLM's penalties, ``top_k``, ``min_p`` and ``min_tokens`` too), log-probabilities, and the
fields this server does not compute (refused, not ignored)."""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any

from .engine import Request, RequestError, shown
from .sampling import MAX_TEMP


class _Off(dict):
    """An object field's value that asks for nothing: each of these keys left out or at this value."""


# OpenAI fields this server does not compute, with the value that asks for nothing: any other value is a 400, since
# ignoring it would answer something other than what was asked (tools, a JSON format). The first three are served
# where their endpoint defines them (_logprobs): chat's logprobs and top_logprobs, echo on both.
UNSUPPORTED: dict[str, Any] = {
    "logprobs": False,
    "top_logprobs": 0,
    "echo": False,
    "best_of": 1,
    "response_format": {"type": "text"},
    "modalities": ["text"],  # ["text", "audio"] asks for spoken output too
    # vLLM's fields (and OpenAI's tool_choice without tools), with the values that ask for nothing
    "tool_choice": ("none", "auto"),
    "use_beam_search": False,
    "length_penalty": 1,
    **dict.fromkeys(  # the fields whose nothing is null (one name a line would take 17 lines)
        "suffix tools functions audio prediction chat_template "  # noqa: SIM905
        "guided_json guided_regex guided_choice "
        "guided_grammar structured_outputs structural_tag "
        # vLLM's: custom logits processors, prompt embeddings (each off by default there)
        "logits_processors prompt_embeds".split()
    ),
    # vLLM's thinking budget and repetition detection change the answer: refused unless off (-1: no budget, vLLM's
    # validate_thinking_token_budget; max_pattern_size 0: disabled, vLLM's RepetitionDetectionParams)
    "thinking_token_budget": (-1,),
    # vLLM's priority: refused unless 0 where its scheduler is first come, first served (its default; "Got priority
    # 1 but Priority scheduling is not enabled."); this engine has no other order
    "priority": (0,),
    "repetition_detection": _Off(max_pattern_size=0, min_pattern_size=0),
}


class Limits:
    """What a request may ask: ``max_tokens`` up to ``max_tokens``, prompt + completion within ``context``; left
    unset, at most ``default`` too (the generation config's ``max_new_tokens``, as generate and vLLM take it);
    ``vocab``, the logits' width, bounds ``logit_bias``'s token ids."""

    def __init__(self, max_tokens: int, context: int, default: int | None = None, vocab: int = 2**31) -> None:
        self.max_tokens, self.context, self.default, self.vocab = max_tokens, context, default, vocab


def _asks_nothing(value: Any, default: Any) -> bool:
    """Whether an unsupported field's value asks for nothing: absent, empty, or its default (``logprobs: 0`` asks
    for the chosen tokens' log-probabilities, so a flag's default is matched as a flag, not as the number 0)."""
    if value is None or value in ({}, [], ""):
        return True
    if isinstance(default, _Off) and isinstance(value, dict):  # repetition_detection: the keys that switch it on
        return all(value.get(k, v) == v and not isinstance(value.get(k), bool) for k, v in default.items())
    if isinstance(default, tuple):  # several values ask for nothing
        return not isinstance(value, bool) and value in default
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default
    return bool(value == default)


def flag(body: dict, key: str, param: str | None = None) -> bool:
    """A true-or-false field (left out: false); anything else is a 400 naming it (``param``, else ``key``)."""
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"{param or key} must be true or false, got {shown(value)}", param=param or key)
    return bool(value)


def _number(
    body: dict, key: str, default: float | None, low: float, high: float, open_low: bool = False
) -> float | None:
    """The body's number ``key`` in [low, high] ((low, high] with ``open_low``), else a 400 naming it."""
    value = body.get(key)
    if value is None:
        return default
    # inf is no bound a value may reach (vLLM: repetition_penalty "must be a finite number"), nor an integer past
    # float's range (float() of it raised OverflowError: a 500)
    inside = isinstance(value, (int, float)) and (low < value if open_low else low <= value) and value <= high
    if isinstance(value, bool) or not inside or not _finite(value):
        where = (
            f"in {'(' if open_low else '['}{low}, {high}]" if high < float("inf") else f"greater than {low} and finite"
        )
        raise RequestError(f"{key} must be a number {where}, got {shown(value)}", param=key)
    return float(value)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of 309 digits or more
        return False


def _top_k(body: dict) -> int | None:
    """vLLM's ``top_k``: a positive integer, or -1 or 0 for no top-k (0 then, whatever the generation config says);
    None: the config's."""
    k = body.get("top_k")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < -1):
        raise RequestError(f"top_k must be -1 or 0 (no top-k) or a positive integer, got {shown(k)}", param="top_k")
    return None if k is None else max(k, 0)


def _min_tokens(body: dict, max_tokens: int, key: str) -> int:
    """vLLM's ``min_tokens``: an integer in [0, max_tokens] (``key``: the field that set it, or max_tokens)."""
    n = body.get("min_tokens")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise RequestError(f"min_tokens must be an integer of at least 0, got {shown(n)}", param="min_tokens")
    if n is not None and n > max_tokens:
        raise RequestError(f"min_tokens must be at most {key} ({max_tokens}), got {shown(n)}", param="min_tokens")
    return n or 0


def _temperature(body: dict) -> float | None:
    """The request's temperature (None: the generation config's, ``default_temperature``), in [0, 2] as vLLM's
    SamplingParams checks it (and OpenAI's API): 0 is greedy, and one in (0, 0.01) samples at 0.01, as vLLM raises it
    (logits / 1e-300 overflow to inf and NaN)."""
    t = _number(body, "temperature", None, 0.0, 2.0)
    return t if not t else max(t, MAX_TEMP)


# vLLM's request models are pydantic in lax mode: a numeric string is the number it spells, each field read as vLLM
# types it (a float: "0.5", " 1e3 ", "inf"; an int: "16", "16.00", or a whole float, 16.0, within int64); anything
# else stays as sent, for the field's own check to refuse. True and false in a number field stay refused, where
# pydantic reads them as 1 and 0: a client bug, not a count.
_FLOATS = "temperature top_p min_p frequency_penalty presence_penalty repetition_penalty length_penalty".split()  # noqa: SIM905
_INTS = "max_tokens max_completion_tokens n seed top_k min_tokens truncate_prompt_tokens prompt_logprobs".split()  # noqa: SIM905
_INTS.append("best_of")  # vLLM's before 0.10 (ignored since): "1" asks for nothing
_INTS.append("priority")  # vLLM's int: "0" and 0.0 are its 0
_INT_TEXT = re.compile(r"[+-]?[0-9](?:_?[0-9])*(?:\.0+)?")  # pydantic's int from a string: "16.0" yes, "16." no
# The blanks pydantic strips from a numeric string (Rust's char::is_whitespace, Unicode's White_Space: "\xa07" is 7;
# Python's strip() drops "\x1c"-"\x1f" too, which pydantic refuses)
_BLANKS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_INT_DIGITS = 4300  # pydantic's int_parsing_size (Python's int-string limit), leading zeros not counted


def lax_numbers(body: dict, chat: bool) -> dict:
    """The body with its numeric fields read as vLLM's pydantic models read them (lax mode): numeric strings, and
    whole floats for integer fields, become numbers; every other value is left for its field's check (a 400).
    ``chat``: a chat's ``logprobs`` is a flag and its ``top_logprobs`` a count; a completion's ``logprobs`` a count
    (its ``top_logprobs`` and both ``best_of``, fields vLLM ignores or older vLLMs typed int, read so "0" and "1" ask
    for nothing) and its ``prompt`` token ids (vLLM's smart union: [1, "2"] and [1.0, 2] are [1, 2])."""
    out = dict(body)
    for key in [*_INTS, "top_logprobs", *([] if chat else ["logprobs"])]:
        if key in out:
            out[key] = _lax_int(out[key])
    # pydantic's lax int takes a bool (false: 0, true: 1) for every int field, vLLM's too; deltatune refuses a bool
    # for the others (max_tokens, n, seed, top_k, ...: a 400), priority the exception (false is the 0 vLLM takes)
    if isinstance(out.get("priority"), bool):
        out["priority"] = int(out["priority"])
    for key in _FLOATS:
        if isinstance(out.get(key), str):
            out[key] = _lax_float(out[key])
    for key in ("stop_token_ids", "allowed_token_ids"):  # vLLM's list[int]: each id as an int field reads it
        if key in out:
            out[key] = lax_ids(out[key], partial=True)
    prompt = out.get("prompt")
    if not chat and isinstance(prompt, list) and prompt and not all(isinstance(p, str) for p in prompt):
        lists = all(isinstance(p, list) for p in prompt)  # list[int] | list[list[int]] | str | list[str]
        out["prompt"] = [lax_ids(p) for p in prompt] if lists else lax_ids(prompt)
    return out


def lax_ids(ids: Any, partial: bool = False) -> Any:
    """A list of token ids as vLLM's pydantic ``list[int]`` reads it: each numeric string or whole float its int; the
    list as sent unless every id reads as an int (``partial``: each id that reads, for the field's check)."""
    if not isinstance(ids, list):
        return ids
    read = [_lax_int(t) for t in ids]
    whole = all(isinstance(t, int) for t in read)
    return read if partial or whole else ids


def _lax_float(value: str) -> float | str:
    """pydantic's lax float of a string (surrounding blanks dropped; "inf" and "nan" too), else the string."""
    text = value.strip(_BLANKS)
    if text.isascii() and text == text.strip():
        with contextlib.suppress(ValueError):
            return float(text or "x")
    return value


def _lax_int(value: Any) -> Any:
    """pydantic's lax int of a string or a whole float within int64, else the value as sent (a string past 4,300
    digits too: pydantic's int_parsing_size, where int() raised ValueError, a 500)."""
    if isinstance(value, float) and value.is_integer() and -(2**63) <= value < 2**63:
        return int(value)
    text = value.strip(_BLANKS) if isinstance(value, str) else ""
    if text.isascii() and _INT_TEXT.fullmatch(text):
        sign, digits = ("-" if text[0] == "-" else ""), text.lstrip("+-").partition(".")[0].replace("_", "")
        digits = digits.lstrip("0") or "0"
        return int(sign + digits) if len(digits) <= _INT_DIGITS else value
    return value


def to_request(body: dict, prompt_ids: list[int], limits: Limits, model: str, chat: bool = True) -> Request:
    """A Request from the body's sampling fields, each checked (a 400 naming the field)."""
    prompt_ids = _truncated(body, prompt_ids, limits.context)  # first, as vLLM: a long prompt cut to fit is served
    if len(prompt_ids) >= limits.context:
        raise RequestError(
            f"the prompt has {len(prompt_ids)} tokens; the context holds {limits.context} with this model "
            "(a token adapter's virtual tokens take room too)",
            code="context_length_exceeded",
            param="messages" if "messages" in body else "prompt",
        )
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    room = limits.context - len(prompt_ids)
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = min(limits.max_tokens, room, limits.default or room)
        if not chat and "max_tokens" not in body:  # vLLM's CompletionRequest, OpenAI's legacy API: 16 (null: none)
            max_tokens = min(max_tokens, 16)
    low = 0 if not chat and body.get("echo") is True else 1  # 0: the echoed prompt alone (vLLM's, OpenAI's)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < low:
        raise RequestError(f"{key} must be an integer of at least {low}, got {shown(max_tokens)}", param=key)
    if max_tokens > limits.max_tokens:
        raise RequestError(f"{key} is {shown(max_tokens)}; this server allows at most {limits.max_tokens}", param=key)
    if max_tokens > room:
        raise RequestError(
            f"the prompt ({len(prompt_ids)} tokens) plus {key} ({max_tokens}) exceeds this model's context "
            f"({limits.context})",
            code="context_length_exceeded",
            param=key,
        )
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop  # "" is a 400, as [""] (vLLM's)
    # Any number of them, as vLLM (OpenAI's API takes up to 4)
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a non-empty string or a list of non-empty strings", param="stop")
    seed = body.get("seed")  # vLLM's int64 (Field(ge=_LONG_INFO.min, le=_LONG_INFO.max)): 2**63 is a 400 there too
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63):
        raise RequestError(f"seed must be an integer in [-2**63, 2**63 - 1], got {shown(seed)}", param="seed")
    seed = None if seed == -1 else seed  # vLLM's SamplingParams: -1 is no seed (each answer drawn anew)
    if not isinstance(body.get("user", ""), (str, type(None))):  # OpenAI's end-user id, a string (both APIs check)
        raise RequestError(f"user must be a string, got {shown(body['user'])}", param="user")
    priority = body.get("priority", 0)  # vLLM's int (pydantic's lax reading: lax_numbers); any but 0 refused below
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise RequestError(f"priority must be an integer, got {shown(priority)}", param="priority")
    # chat's tools and tool_choice are checked where the prompt is rendered (prompts._tools)
    served = ("logprobs", "top_logprobs", "tools", "tool_choice", "echo") if chat else ("logprobs", "echo")
    for name, default in UNSUPPORTED.items():
        # best_of == n: n candidates, n answers, as without it; vLLM's V0 engine served it (and best_of > n), its V1
        # refused best_of > 1, and current vLLM dropped the field (ignored as an extra one)
        if name == "best_of" and _asks_nothing(body.get(name), choices_of(body)):
            continue
        if name not in served and not _asks_nothing(body.get(name), default):
            why = f"{name} is not supported by this server; leave it out"
            kind = body[name].get("type") if name == "response_format" and isinstance(body[name], dict) else None
            if isinstance(kind, str):  # json_object, json_schema: vLLM's guided decoding, which is not served here
                why = (
                    f'response_format {shown(kind)} is not supported by this server (no guided decoding); send "text"'
                )
            raise RequestError(why, code="unsupported", param=name)
    request = Request(
        prompt_ids=prompt_ids,
        adapter=model,
        max_tokens=max_tokens,
        emit=lambda text, finish: None,
        # Each left unset is the base's generation config's, as generate and vLLM take them.
        temperature=_temperature(body),
        top_p=_number(body, "top_p", None, 0.0, 1.0, open_low=True),  # vLLM's (0, 1]: the top token always stays
        # min_p 0, top_k -1 or 0 and repetition_penalty 1 ask for none of it, whatever the config says (as vLLM)
        top_k=_top_k(body),
        min_p=_number(body, "min_p", None, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", None, 0.0, float("inf"), open_low=True),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),  # OpenAI's and vLLM's range
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        min_tokens=_min_tokens(body, max_tokens, key),
        logit_bias=_logit_bias(body, limits.vocab),
        stop=stop,
        stop_token_ids=_token_ids(body, "stop_token_ids", limits.vocab),
        allowed_token_ids=_token_ids(body, "allowed_token_ids", limits.vocab, empty=False) or None,
        include_stop_str_in_output=flag(body, "include_stop_str_in_output"),
        skip_special_tokens=body.get("skip_special_tokens") is None or flag(body, "skip_special_tokens"),
        spaces_between_special_tokens=body.get("spaces_between_special_tokens") is None
        or flag(body, "spaces_between_special_tokens"),
        seed=seed,
        ignore_eos=flag(body, "ignore_eos"),
        logprobs=_logprobs(body, chat),
        prompt_top=_prompt_logprobs(body, chat),
        token_ids_as_names=flag(body, "return_tokens_as_token_ids"),  # vLLM's logprobs names, "token_id:123"
    )
    # vLLM's engine's "out of vocabulary", after every field (an id past the embeddings failed its whole batch)
    top = max(prompt_ids, default=0)
    if top >= limits.vocab:  # (a tokenizer with more tokens than the model: prompt ids, a chat's added tokens)
        raise RequestError(f"token id {top} is out of this model's vocabulary [0, {limits.vocab})",
                           param="messages" if "messages" in body else "prompt")  # fmt: skip
    return request


def bad_words_ids(tokenizer: Any, body: dict) -> list[list[int]]:
    """vLLM's ``bad_words``: each word's token ids, as written and after a space (where that is another first token of
    as many tokens), as vLLM's SamplingParams.update_from_tokenizer tokenizes them; a 400 unless a list of strings."""
    words = body.get("bad_words")
    if words is None:
        return []
    if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
        raise RequestError("bad_words must be a list of non-empty strings", param="bad_words")
    out: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if not plain:  # vLLM's 400 (a word the tokenizer drops, such as a zero-width space, was a 500)
            raise RequestError(f"bad_words entry {shown(word)} tokenizes to no token", param="bad_words")
        out.append(plain)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out


def _truncated(body: dict, prompt_ids: list[int], context: int) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: the prompt's last k tokens (-1: the context's worth), else a 400."""
    k = body.get("truncate_prompt_tokens")
    if k is None:
        return prompt_ids
    if isinstance(k, bool) or not isinstance(k, int) or not (k == -1 or k >= 1):
        raise RequestError(
            f"truncate_prompt_tokens must be -1 (the context) or a positive integer, got {shown(k)}",
            param="truncate_prompt_tokens",
        )
    if k > context:  # vLLM's _validate_truncation_size
        raise RequestError(
            f"truncate_prompt_tokens ({shown(k)}) is greater than this model's context ({context}); select a smaller "
            "truncation size",
            param="truncate_prompt_tokens",
        )
    return prompt_ids[-(context if k == -1 else k) :]


def _token_ids(body: dict, key: str, vocab: int, empty: bool = True) -> list[int]:
    """vLLM's ``stop_token_ids`` and ``allowed_token_ids``: a list of token ids in [0, vocab) (null: none; ``empty``
    False: [] is a 400 too, as vLLM refuses an empty allowed_token_ids), else a 400 naming it."""
    ids = body.get(key)
    if ids is None:
        return []
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RequestError(f"{key} must be a list of token ids, got {shown(ids)}", param=key)
    if not ids and not empty:
        raise RequestError(f"{key} is empty: no token could be generated", param=key)
    if any(not 0 <= t < vocab for t in ids):
        raise RequestError(f"{key} holds {next(t for t in ids if not 0 <= t < vocab)}, not a token id in [0, {vocab})",
                           param=key)  # fmt: skip
    return ids


def _logit_bias(body: dict, vocab: int) -> dict[int, float] | None:
    """OpenAI's ``logit_bias``: {token id as a string: a number (or a numeric string, as vLLM's pydantic model reads
    it)}, clamped to [-100, 100] as vLLM clamps it, added to that token's logit before the penalties and sampling
    (vLLM's order); an id outside the vocabulary is a 400."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):  # vLLM's dict type: [] is a 400 too
        raise RequestError(
            f"logit_bias must be an object of token ids to numbers, got {shown(bias)}", param="logit_bias"
        )
    parsed: dict[int, float] = {}
    for key, value in bias.items():
        try:  # vLLM's int(token): " 5" and "+5" are token 5
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab:
            raise RequestError(f"logit_bias key {shown(key)} is not a token id in [0, {vocab})", param="logit_bias")
        if isinstance(value, str) and value.isascii():  # vLLM's pydantic float: "5", " 5 ", "1e3", "inf" (lax mode)
            with contextlib.suppress(ValueError):  # not a number: the 400 below
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(f"logit_bias[{shown(key)}] must be a number, got {shown(value)}", param="logit_bias")
        # vLLM's from_optional: clamped to [-100, 100] (its expression: NaN becomes -100), not refused
        parsed[token] = float(min(100.0, max(-100.0, value)))  # "5" and "05": the last one, as vLLM reads them
    return parsed or None


def _prompt_logprobs(body: dict, chat: bool) -> int | None:
    """vLLM's ``prompt_logprobs``: the alternatives to report with each prompt token's log-probability, 0 to 20
    (vLLM's default max_logprobs; its -1, the whole vocabulary, is refused here too); with ``stream`` 0 only (vLLM's)."""
    k = body.get("prompt_logprobs")
    if k is None:  # vLLM's to_sampling_params: echo scores the prompt with the answer's k (a chat's top_logprobs,
        # 0 left out, none sent null; a completion's logprobs, none left out), not sent in a stream (checked by
        # _logprobs before: an int in [0, 20] or false, which is 0)
        top = body.get("top_logprobs", 0)
        k = (None if top is None else int(top)) if chat else _logprobs(body, chat)
        return k if body.get("echo") is True and body.get("stream") is not True else None
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 20:
        raise RequestError(f"prompt_logprobs must be an integer in [0, 20], got {shown(k)}", param="prompt_logprobs")
    if body.get("stream") is True:  # vLLM's check_logprobs: 0 streams (no prompt log-probabilities sent), as vLLM
        if k:
            raise RequestError("prompt_logprobs is not available when stream is enabled", param="prompt_logprobs")
        return None
    return k


def choices_of(body: dict) -> int:
    """``n``, the choices to answer: 1 to 128 (OpenAI's limit)."""
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128):
        raise RequestError(f"n must be an integer in [1, 128], got {shown(n)}", param="n")
    return n or 1


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token a request asks for with each token's log-probability (None: none): chat's
    ``top_logprobs`` under ``logprobs: true``, a completion's ``logprobs``; at most 20 (vLLM's and OpenAI's)."""
    key = "top_logprobs" if chat else "logprobs"
    k = None if body.get(key) is False else body.get(key)  # false asks for nothing, as before
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 20):
        raise RequestError(f"{key} must be an integer in [0, 20], got {shown(k)}", param=key)
    if not chat:
        return k
    if not flag(body, "logprobs"):
        if k:  # as OpenAI and vLLM answer
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    # vLLM's: top_logprobs left out is 0 (the chosen tokens' alone), null asks for none (its to_sampling_params and
    # serving_chat read "logprobs and top_logprobs is not None"); they were given here
    return None if key in body and body[key] is None else k or 0
