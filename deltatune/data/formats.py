"""The data formats users bring, detected from the rows and mapped to one structure, ``Sample``.

Formats (the name is what ``data.format`` forces; by default each row's fields decide, and one file holds one):

- ``alpaca``: ``instruction``, ``input``, ``output`` (+ ``system``, + ``history`` of [user, assistant] pairs).
- ``alpaca_preference``: LLaMA-Factory's ranking rows: ``instruction``, ``input``, ``chosen``, ``rejected`` (+
  ``system``, ``history``); the prompt is the alpaca one.
- ``sharegpt``: ``conversations`` of ``{from, value}`` with LLaMA-Factory's roles (human, gpt, system,
  function_call, observation), renamed by ``data.tags`` as in its ``dataset_info.json``; ``system`` and ``tools``
  columns.
- ``messages``: OpenAI / TRL ``messages`` of ``{role, content}`` (system, user, assistant, tool; ``tool_calls``),
  with an optional ``tools`` column of JSON schemas.
- ``prompt_completion``: TRL's ``prompt`` + ``completion``, as strings (standard) or message lists
  (conversational); only the completion is trained.
- ``prompt``: TRL's prompt-only rows (PPO).
- ``preference``: TRL's ``prompt`` + ``chosen`` + ``rejected`` (explicit prompt), standard or conversational.
- ``preference_implicit``: TRL's ``chosen`` + ``rejected`` holding the whole conversation; the prompt is their
  common beginning (whole messages; for strings, up to the last whitespace they share).
- ``sharegpt_preference``: LLaMA-Factory's ``conversations`` + ``chosen`` + ``rejected`` messages.
- ``unpaired``: KTO's ``prompt`` + ``completion`` + ``label`` (true: desirable).
- ``text``: plain ``text`` for pre-training.

As LLaMA-Factory reads them, a conversation (alpaca, sharegpt, messages) with a label (its ``kto_tag``) is an
``unpaired`` row in stage kto (the last turn the completion), and any conversation a ``prompt`` row in stage ppo
(the turns before the last answer); ``data.columns`` takes its dataset_info.json keys (``LLAMAFACTORY_COLUMNS``), and
``data.format`` its formatting (alpaca, sharegpt: their ranking rows too; openai: messages in its converter's order).

A standard (string) prompt becomes one user message and a string response one assistant message, so every stage renders
the same chat template for the same pair whatever its shape. Images and videos (``images``/``videos`` columns, markers
``<image>``/``<video>``) are paths in ``Sample.images``/``.videos``: text stages refuse them, caption trains on them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from .formats_messages import (
    SharegptRoles,
    _a,
    _check_calls,
    _check_renames,
    _col,
    _conversation_column,
    _media,
    _message_list,
    _not_text,
    _nulled,
    _openai_order,
    _system_message,
    _template_kwargs,
    _text,
    _turn,
    message_keys,
    openai_tags,
    tag_roles,
)
from .load import DataError, Row
from .sample import AS_WRITTEN, REASONING, Message, Sample, says_something
from .tools import row_tools

FORMATS: dict[str, str] = {
    "alpaca": "instruction, input, output (+ system, history)",
    "alpaca_preference": "instruction, input, chosen, rejected (+ system, history)",
    "sharegpt": "conversations of {from, value}",
    "messages": "messages of {role, content}",
    "prompt_completion": "prompt + completion",
    "prompt": "prompt only",
    "preference": "prompt + chosen + rejected",
    "preference_implicit": "chosen + rejected (the prompt is their common beginning)",
    "sharegpt_preference": "conversations + chosen + rejected",
    "unpaired": "prompt + completion + label",
    "text": "text",
}

STAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("alpaca", "sharegpt", "messages", "prompt_completion"),
    "rm": ("preference", "preference_implicit", "sharegpt_preference", "alpaca_preference"),
    "dpo": ("preference", "preference_implicit", "sharegpt_preference", "alpaca_preference"),
    "orpo": ("preference", "preference_implicit", "sharegpt_preference", "alpaca_preference"),
    "simpo": ("preference", "preference_implicit", "sharegpt_preference", "alpaca_preference"),
    "cpo": ("preference", "preference_implicit", "sharegpt_preference", "alpaca_preference"),
    "ppo": (
        "prompt",
        "preference",
        "preference_implicit",
        "sharegpt_preference",
        "alpaca_preference",
        "prompt_completion",
        "unpaired",
    ),
    "kto": ("unpaired", "preference", "preference_implicit", "sharegpt_preference", "alpaca_preference"),
    "pt": ("text",),
}
"""The formats each stage reads."""

# LLaMA-Factory's sharegpt tags (dataset_info.json "tags"), overridable by data.tags.
SHAREGPT_TAGS: dict[str, str] = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
FIELDS = ("instruction", "input", "output", "system", "history", "conversations", "messages", "prompt", "completion",
          "chosen", "rejected", "label", "text", "tools", "images", "videos", "audios",
          "chat_template_kwargs")  # fmt: skip
"""The fields ``data.columns`` may rename (field -> the file's column)."""


# -- detection ----------------------------------------------------------------------------------------------


def _has(row: Row, column: str) -> bool:
    return row.get(column, required=False) is not None  # (NaN, pandas' missing value, counts as missing)


def detect(row: Row, columns: dict[str, str] | None = None) -> str:
    """The format of one row, from the fields it has (``columns`` renames them: {prompt: question, ...}).

    Raises:
        DataError: the row's fields match no format (the message lists them).
    """
    c = columns or {}
    has = {k: _has(row, _col(c, k)) for k in ("prompt", "chosen", "rejected", "completion", "label", "text")}
    conv = _has(row, _col(c, "conversations"))
    msgs = _has(row, _col(c, "messages"))
    if has["chosen"] and has["rejected"]:
        if conv or msgs and not has["prompt"]:
            return "sharegpt_preference"
        if has["prompt"]:
            return "preference"
        # LLaMA-Factory's alpaca ranking rows: the prompt is the instruction (and input), not a common beginning
        return "alpaca_preference" if _has(row, _col(c, "instruction")) else "preference_implicit"
    if has["prompt"] and has["completion"]:
        return "unpaired" if has["label"] else "prompt_completion"
    if has["prompt"] and isinstance(row.data.get("completions"), list) and isinstance(row.data.get("labels"), list):
        raise DataError(
            f"{row.source}: a stepwise-supervision row (prompt, completions, labels: TRL's process-reward data) is "
            "read by no stage (TRL 1.16 has no PRM trainer either); data.format=prompt reads its prompt (ppo)"
        )
    if conv or msgs:
        items = row.data.get(_col(c, "conversations") if conv else _col(c, "messages"))
        first = items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else {}
        return "sharegpt" if conv and "role" not in first or "from" in first else "messages"
    if _has(row, _col(c, "instruction")) or _has(row, _col(c, "output")):
        return "alpaca"  # (a missing one of the two is then named by the alpaca reader)
    if has["prompt"]:
        return "prompt"
    if has["text"]:
        return "text"
    fields = ", ".join(sorted(k for k in row.data if _has(row, k))) or "none"
    nulls = sorted(k for k in row.data if not _has(row, k))
    fields += f"; null: {', '.join(nulls)}" if nulls else ""
    raise DataError(
        f"{row.source}: the row's fields ({fields}) match no known data format; formats: "
        + "; ".join(f"{k} ({v})" for k, v in FORMATS.items())
        + " (data.columns renames fields, data.format forces a format)"
    )


def read_samples(
    rows: Sequence[Row],
    columns: dict[str, str] | None = None,
    data_format: str | None = None,
    tags: dict[str, str] | None = None,
    stage: str | None = None,
    skipped: list[str] | None = None,
) -> list[Sample]:
    """Detect the file's format (or use ``data_format``) and map every row to a ``Sample``.

    Args:
        rows: the rows of one file.
        columns: renamed fields, e.g. ``{"prompt": "question", "messages": "conversations"}``.
        data_format: force this format (a key of ``FORMATS``); None detects it from the first row.
        tags: sharegpt tag names overriding ``SHAREGPT_TAGS`` (LLaMA-Factory's dataset_info.json ``tags``).
        stage: when given, a format the stage does not read is refused, SFT conversations end with an answer.
        skipped: when given, preference rows with chosen == rejected are left out and their ``file:line``
            appended here instead of raising.

    Raises:
        DataError: one line naming file:line and the field: mixed formats in one file, an unknown role, turns out of
            LLaMA-Factory's order (sharegpt; openai), an empty assistant turn, an SFT conversation not ending with an
            answer, chosen == rejected, a tool call without a schema, a format the stage does not read.
    """
    c = dict(columns or {})
    _check_renames((c, FIELDS + tuple(LLAMAFACTORY_COLUMNS), "data.columns"), (tags or {}, SHAREGPT_TAGS, "data.tags"))
    openai, data_format = data_format == "openai", "messages" if data_format == "openai" else data_format
    c = _llamafactory_columns(c, rows, data_format)
    if data_format is not None and data_format not in FORMATS:
        raise DataError(f"data.format={data_format!r} is not a known format; formats: {', '.join(FORMATS)}")
    if data_format in ("sharegpt", "sharegpt_preference"):
        c.setdefault("conversations", c.get("messages", "conversations"))
    t = openai and openai_tags(tags) or {**SHAREGPT_TAGS, **(tags or {})}
    out: list[Sample] = []
    first: tuple[str, str, str, Row] | None = None
    for row in rows:
        try:
            fmt = data_format or detect(row, c)
        except DataError:  # (its format's column null, where the first row has it: named so)
            if not (first and _nulled(first[3], row, c, first[2])):
                raise
            raise DataError(f"{row.source}: {_nulled(first[3], row, c, first[2])}{first[1]} began the file in the {first[2]} "
                            f"format ({FORMATS[first[2]]}); one file holds one format") from None  # fmt: skip
        if tags and fmt == "messages" and not data_format:  # role/content messages with tags: LLaMA-Factory's sharegpt
            fmt = "sharegpt"
        ranking = _has(row, _col(c, "chosen")) and _has(row, _col(c, "rejected"))
        if fmt in ("alpaca", "sharegpt", "messages") and ranking:
            # (LLaMA-Factory's formatting, forced, with its ranking rows; openai's messages read as its converter)
            fmt = "alpaca_preference" if fmt == "alpaca" else "sharegpt_preference"
        inner = _conversation_to_reshape(row, c, fmt, data_format, stage, tags)
        written = inner or fmt  # the row's own format, before a stage reshapes it (one file holds one)
        if inner:
            fmt = "prompt" if stage == "ppo" and data_format != "unpaired" else "unpaired"
        if first is None:
            first = (fmt, row.source, written, row)
            if stage and stage in STAGE_FORMATS and fmt not in STAGE_FORMATS[stage]:
                raise StageFormatError(
                    f"{row.source}: the data is in the {fmt} format ({FORMATS[fmt]}), which stage {stage} does not "
                    f"read; stage {stage} reads: {', '.join(STAGE_FORMATS[stage])}{_stage_hint(fmt, stage, c)}"
                )
        elif fmt != first[0] or written != first[2]:
            was, now = (first[2], written) if written != first[2] else (first[0], fmt)
            lead = _nulled(first[3], row, c, first[2]) or f"this row is in the {now} format ({FORMATS[now]}) but "
            raise DataError(
                f"{row.source}: {lead}{first[1]} began the file in the {was} format ({FORMATS[was]}); one file holds "
                "one format"
            )
        try:
            if not inner:
                sample = _PARSERS[fmt](row, c, t)
            else:
                sample = (
                    _unpaired_turn(_PARSERS[inner](row, c, t), row, c) if fmt == "unpaired" else _ppo(inner, row, c, t)
                )
        except _BadPair as exc:
            if stage == "ppo" and fmt == "preference":  # PPO reads the prompt alone: an empty answer is no fault
                sample = _prompt(row, c, t)
            elif skipped is None:
                raise DataError(str(exc)) from None
            else:
                skipped.append(row.source)
                continue
        _check(sample, stage)
        if openai:  # (LLaMA-Factory's formatting: its converter's turn order)
            _openai_order(row, c, t, ranking, ranking or stage == "ppo")
        sample.written, sample.template_kwargs = inner, _template_kwargs(row, c)
        out.append(sample)
    return out


LLAMAFACTORY_COLUMNS = {"query": "input", "response": "output", "kto_tag": "label"}
"""LLaMA-Factory's dataset_info.json column keys that ``data.columns`` takes beside its own fields (its ``prompt``
is the alpaca instruction when ``query`` or ``response`` is given too, or the format is alpaca's)."""


def _llamafactory_columns(c: dict[str, str], rows: Sequence[Row], data_format: str | None) -> dict[str, str]:
    """``data.columns`` with LLaMA-Factory's keys as ours: query -> input, response -> output, kto_tag -> label, and,
    beside query or response or in a forced alpaca format (its alpaca vocabulary), prompt -> instruction."""
    lf = {k: c.pop(k) for k in LLAMAFACTORY_COLUMNS if k in c}
    if "query" in lf or "response" in lf or data_format in ("alpaca", "alpaca_preference"):
        prompt = c.pop("prompt", "instruction")
        # ("prompt" may be data.prompt_column's default, not the user's: LLaMA-Factory's default is "instruction")
        if prompt == "prompt" and rows and (_has(rows[0], "instruction") or not _has(rows[0], "prompt")):
            prompt = "instruction"
        c.setdefault("instruction", prompt)
    for key, value in lf.items():
        c[LLAMAFACTORY_COLUMNS[key]] = value
    return c


def _conversation_to_reshape(
    row: Row, c: dict[str, str], fmt: str, data_format: str | None, stage: str | None, tags: dict[str, str] | None
) -> str | None:
    """The conversation format (alpaca, sharegpt or messages) of a row LLaMA-Factory reads otherwise than SFT
    does: a KTO row (with a label: its ``kto_tag``) in stage kto or under data.format=unpaired, and any conversation
    in stage ppo (a prompt); None for any other row."""
    if fmt == "unpaired" and data_format and not (_has(row, _col(c, "prompt")) and _has(row, _col(c, "completion"))):
        fmt = detect(row, c)
        fmt = "sharegpt" if tags and fmt == "messages" else fmt
    elif not (stage == "kto" and _has(row, _col(c, "label")) or stage == "ppo"):
        return None
    return fmt if fmt in ("alpaca", "sharegpt", "messages") else None


def _ppo(fmt: str, row: Row, c: dict[str, str], t: dict[str, str]) -> Sample:
    """A conversation as PPO's prompt: every turn before its last answer (LLaMA-Factory's converter; PPO samples
    the answer itself, so an alpaca output may be empty or missing)."""
    if fmt == "alpaca":
        return Sample(row.source, "prompt", _alpaca_prompt(row, c), conversational=False,
                      tools=row_tools(row, _col(c, "tools")), **_media(row, c))  # fmt: skip
    s = _PARSERS[fmt](row, c, t)
    s.messages = s.messages[:-1] if s.messages[-1]["role"] == "assistant" else s.messages
    if not any(m["role"] != "system" for m in s.messages):
        raise DataError(f"{s.source}: the conversation holds no prompt before its answer")
    s.format = "prompt"
    return s


def _unpaired_turn(s: Sample, row: Row, c: dict[str, str]) -> Sample:
    """A conversation with a label as KTO's unpaired row: the last turn is the completion the label judges, the
    rest its prompt (LLaMA-Factory's KTO converter)."""
    conversation, _ = s.sft()
    if conversation[-1]["role"] != "assistant":
        raise DataError(
            f"{s.source}: the conversation's last message is a {conversation[-1]['role']} turn; KTO reads the last "
            f"assistant turn as the completion that column {_col(c, 'label')!r} labels"
        )
    s.messages, s.completion = conversation[:-1], conversation[-1:]
    s.format, s.label = "unpaired", _label(row, _col(c, "label"))
    return s


def _stage_hint(fmt: str, stage: str, c: dict[str, str]) -> str:
    """What would read ``fmt`` rows, where something would, for the refusal of a format the stage does not read."""
    if stage == "kto" and fmt in ("alpaca", "sharegpt", "messages"):
        return f" (or {fmt} rows with a {_col(c, 'label')!r} column: data.columns' label, LLaMA-Factory's kto_tag)"
    return " (stage pt trains on text, as TRL's SFT on a text dataset does)" if fmt == "text" else ""


class StageFormatError(DataError):
    """The file's first row is in a format the stage does not read (``data inspect`` words it for its options)."""


class _BadPair(Exception):
    """An empty or non-assistant response, chosen == rejected, a ranking row LLaMA-Factory drops (``bad_pairs``)."""


# -- one parser per format ----------------------------------------------------------------------------------


def _alpaca_prompt(row: Row, c: dict[str, str]) -> list[Message]:
    """An alpaca row's system, history and instruction (+ input on the next line, as LLaMA-Factory joins them)."""
    instruction = row.text(_col(c, "instruction"))
    extra = row.text(_col(c, "input"), required=False)
    prompt = "\n".join(part for part in (instruction, extra) if part)  # an empty instruction: the input alone
    history = row.get(_col(c, "history"), required=False) or []  # (None for pandas' NaN, a missing value)
    messages = _system_message(row, c)
    h = _col(c, "history")
    if not isinstance(history, list):
        raise DataError(f"{row.source}: column {h!r} must be a list of [instruction, response]")
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise DataError(f"{row.source}: {h}[{i}] must be a pair [instruction, response]")
        for k, value in enumerate(turn):
            if _not_text(value):
                raise DataError(f"{row.source}: {h}[{i}][{k}] must be text, got {_not_text(value)}")
        messages += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
    return messages + [{"role": "user", "content": prompt}]


def _alpaca(row: Row, c: dict[str, str], _t: dict[str, str]) -> Sample:
    media = _media(row, c)
    messages = _alpaca_prompt(row, c)
    output = row.text(_col(c, "output"))
    if not output.strip():
        raise DataError(f"{row.source}: column {_col(c, 'output')!r} is empty")
    messages.append({"role": "assistant", "content": output})
    tools = row_tools(row, _col(c, "tools"))  # (LLaMA-Factory's alpaca rows may name tools too)
    return Sample(row.source, "alpaca", messages, conversational=False, tools=tools, **media)


def _alpaca_preference(row: Row, c: dict[str, str], _t: dict[str, str]) -> Sample:
    media = _media(row, c)
    messages = _alpaca_prompt(row, c)
    chosen, conv_c = _turn(row.get(_col(c, "chosen")), row, _col(c, "chosen"), "assistant", media)
    rejected, conv_r = _turn(row.get(_col(c, "rejected")), row, _col(c, "rejected"), "assistant", media)
    s = Sample(row.source, "alpaca_preference", messages, chosen=chosen, rejected=rejected,
               conversational=conv_c or conv_r, tools=row_tools(row, _col(c, "tools")), **media)  # fmt: skip
    return _pair_check(s, c)


def _sharegpt_roles(t: dict[str, str]) -> dict[str, str]:
    return SharegptRoles(tag_roles(t))


def _sharegpt(row: Row, c: dict[str, str], t: dict[str, str]) -> Sample:
    media = _media(row, c)
    column = _conversation_column(row, c, "conversations", "messages")
    messages = _message_list(
        row.get(column), row.source, column, t["role_tag"], t["content_tag"], _sharegpt_roles(t), media
    )
    tools = row_tools(row, _col(c, "tools"))
    for i, m in enumerate(messages):  # a call with no schema named by the row's field (``_check`` names messages[i])
        _check_calls(m, tools, f"{row.source}: {column}[{i}].{t['content_tag']}")
    first = row.get(column)[0] if isinstance(row.get(column), list) else row.get(column)
    if messages[0]["role"] != "system" and first.get(t["role_tag"]) != t["system_tag"]:  # (an empty system turn: none,
        messages = _system_message(row, c) + messages  # and the system column unread, as LLaMA-Factory reads it)
    return Sample(row.source, "sharegpt", messages, tools=tools, **media)


def _messages(row: Row, c: dict[str, str], t: dict[str, str]) -> Sample:
    media = _media(row, c)
    column = _conversation_column(row, c, "messages", "conversations")  # role/content
    role, content, roles = message_keys(t)
    messages = _message_list(row.get(column), row.source, column, role, content, roles, media)
    if messages[0]["role"] != "system":  # a system column, as sharegpt's (LLaMA-Factory's openai converter reads it)
        messages = _system_message(row, c) + messages
    return Sample(row.source, "messages", messages, tools=row_tools(row, _col(c, "tools")), **media)


def _prompt_completion(row: Row, c: dict[str, str], _t: dict[str, str]) -> Sample:
    media = _media(row, c)
    prompt, conv = _turn(row.get(_col(c, "prompt")), row, _col(c, "prompt"), "user", media)
    completion, conv_c = _turn(row.get(_col(c, "completion")), row, _col(c, "completion"), "assistant", media)
    return Sample(row.source, "prompt_completion", prompt, completion=completion, conversational=conv or conv_c,
                  tools=row_tools(row, _col(c, "tools")), **media)  # fmt: skip


def _prompt(row: Row, c: dict[str, str], _t: dict[str, str]) -> Sample:
    media = _media(row, c)
    prompt, conv = _turn(row.get(_col(c, "prompt")), row, _col(c, "prompt"), "user", media)
    return Sample(row.source, "prompt", prompt, conversational=conv, tools=row_tools(row, _col(c, "tools")), **media)


NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", re.ASCII)
"""A number as pandas (datasets' CSV reader) types one (fullmatch): ASCII digits; '1_000', '٣', '\xa02' are text."""


def _label(row: Row, column: str) -> bool:
    value = row.get(column)
    if isinstance(value, str):  # text (CSV): true / false, or 1 / 0 / 1.0 / 0.0, as datasets types them for TRL
        s = value.strip(" \t")  # (word and number alike: '\xa0true' and '\xa01' are text, as in pandas)
        value = {"true": True, "false": False}.get(s.lower(), float(s) if NUMBER.fullmatch(s) else value)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise DataError(f"{row.source}: column {column!r} must be true or false (desirable or not), got {value!r}")


def _unpaired(row: Row, c: dict[str, str], t: dict[str, str]) -> Sample:
    s = _prompt_completion(row, c, t)
    s.format, s.label = "unpaired", _label(row, _col(c, "label"))
    return s


def _pair_check(s: Sample, c: dict[str, str]) -> Sample:
    for key, msgs in (("chosen", s.chosen), ("rejected", s.rejected)):
        if msgs and not any(m["role"] == "assistant" for m in msgs):  # (a sharegpt response of the human tag)
            got = ", ".join(m["role"] for m in msgs)
            raise _BadPair(f"{s.source}: column {_col(c, key)!r}: a response must be an assistant turn, got {got} "
                           "(data.bad_pairs=skip leaves such rows out)")  # fmt: skip
        if not any(says_something(m) for m in msgs if m["role"] == "assistant"):
            raise _BadPair(
                f"{s.source}: column {_col(c, key)!r} is empty; a preference pair needs two responses "
                "(data.bad_pairs=skip leaves such rows out)"
            )

    def flat(ms: list[Message]) -> str:
        thought = [[(m.get(k) or "").strip() for k in REASONING] for m in ms]  # the same answer, reasoned otherwise
        return json.dumps(
            [(m["role"], m["content"].strip(), m.get("tool_calls")) for m in ms] + thought, sort_keys=True
        )

    if flat(s.chosen) == flat(s.rejected):
        raise _BadPair(
            f"{s.source}: {_col(c, 'chosen')!r} and {_col(c, 'rejected')!r} are identical; a preference pair needs "
            "two different responses (data.bad_pairs=skip leaves such rows out)"
        )
    return s


def _preference(row: Row, c: dict[str, str], _t: dict[str, str]) -> Sample:
    media = _media(row, c)
    prompt, conv = _turn(row.get(_col(c, "prompt")), row, _col(c, "prompt"), "user", media)
    chosen, conv_c = _turn(row.get(_col(c, "chosen")), row, _col(c, "chosen"), "assistant", media)
    rejected, conv_r = _turn(row.get(_col(c, "rejected")), row, _col(c, "rejected"), "assistant", media)
    if not conv and conv_c and conv_r and chosen[0]["role"] != "assistant" and chosen[:1] == rejected[:1]:
        # A text prompt beside conversations that hold it (ultrafeedback_binarized): the prompt is the one they
        # share, as TRL's maybe_extract_prompt takes it (else the user turn would be rendered twice).
        return _preference_implicit(row, c, _t)
    s = Sample(row.source, "preference", prompt, chosen=chosen, rejected=rejected,
               conversational=conv or conv_c or conv_r, tools=row_tools(row, _col(c, "tools")), **media)  # fmt: skip
    return _pair_check(s, c)


def _preference_implicit(row: Row, c: dict[str, str], _t: dict[str, str]) -> Sample:
    media = _media(row, c)
    cc, rc = _col(c, "chosen"), _col(c, "rejected")
    chosen_raw, rejected_raw = row.get(cc), row.get(rc)
    if isinstance(chosen_raw, str) and isinstance(rejected_raw, str):
        if chosen_raw.strip() == rejected_raw.strip():
            raise _BadPair(
                f"{row.source}: {cc!r} and {rc!r} are identical; a preference pair needs two different responses "
                "(data.bad_pairs=skip leaves such rows out)"
            )
        # The prompt is the common beginning, cut back to the last whitespace both share (so a shared first word
        # of the two answers stays in the answers).
        n = 0
        while n < min(len(chosen_raw), len(rejected_raw)) and chosen_raw[n] == rejected_raw[n]:
            n += 1
        while n > 0 and not chosen_raw[n - 1].isspace():
            n -= 1
        prompt = chosen_raw[:n].strip()
        if not prompt:
            raise DataError(f"{row.source}: {cc!r} and {rc!r} share no beginning, so they hold no implicit prompt")
        # As written, for rendering without a chat template: the whitespace between prompt and answer goes with
        # the answers (TRL's extract_prompt), so prompt + answer is the file's text.
        m = len(chosen_raw[:n].rstrip())

        def turn(role: str, text: str, written: str) -> Message:
            return {"role": role, "content": text.strip(), AS_WRITTEN: written}

        s = Sample(row.source, "preference_implicit", [turn("user", prompt, chosen_raw[:m])],
                   chosen=[turn("assistant", chosen_raw[n:], chosen_raw[m:])],
                   rejected=[turn("assistant", rejected_raw[n:], rejected_raw[m:])],
                   conversational=False, tools=row_tools(row, _col(c, "tools")), **media)  # fmt: skip
        return _pair_check(s, c)
    chosen, _ = _turn(chosen_raw, row, cc, "assistant", media)
    rejected, _ = _turn(rejected_raw, row, rc, "assistant", media)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(f"{row.source}: {cc!r} and {rc!r} share no first message, so they hold no implicit prompt")
    if n == len(chosen) == len(rejected):
        raise _BadPair(
            f"{row.source}: {cc!r} and {rc!r} are identical; a preference pair needs two different responses "
            "(data.bad_pairs=skip leaves such rows out)"
        )
    s = Sample(row.source, "preference_implicit", chosen[:n], chosen=chosen[n:], rejected=rejected[n:],
               tools=row_tools(row, _col(c, "tools")), **media)  # fmt: skip
    return _pair_check(s, c)


def _sharegpt_preference(row: Row, c: dict[str, str], t: dict[str, str]) -> Sample:
    column = _conversation_column(row, c, "conversations", "messages")
    items = row.data.get(column)
    items = [items] if isinstance(items, dict) else items  # (one message alone, as _message_list reads it)
    head = items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else {}
    if t.get("formatting") or t["role_tag"] not in head and "role" in head:  # OpenAI messages (LLaMA-Factory's openai
        s, (role, content, roles) = _messages(row, c, t), message_keys(t)  # ranking rows; data.tags read under openai)
    else:
        s, (role, content, roles) = _sharegpt(row, c, t), (t["role_tag"], t["content_tag"], _sharegpt_roles(t))
    if s.messages[-1]["role"] not in ("user", "tool"):  # LLaMA-Factory's ranking rows: the prompt side ends them
        side = " or ".join(_a(tag) for tag, ours in roles.items() if ours in ("user", "tool"))
        raise _BadPair(
            f"{row.source}: {column}[{len(items) - 1}].{role}: the conversation ends with {_a(items[-1].get(role))} "
            f"turn before its responses; a ranking row's conversation ends with {side} turn (LLaMA-Factory drops "
            "the row; data.bad_pairs=skip leaves such rows out)"
        )
    media = {"images": s.images, "videos": s.videos}
    for key in ("chosen", "rejected"):
        col = _col(c, key)
        msgs = _message_list(row.get(col), row.source, col, role, content, roles, media, False)
        setattr(s, key, msgs)
    s.format = "sharegpt_preference"
    return _pair_check(s, c)


def _plain(row: Row, c: dict[str, str], _t: dict[str, str]) -> Sample:
    _media(row, c)  # (an audios column refused as in the other formats)
    return Sample(row.source, "text", [], text=_text(row, _col(c, "text")), conversational=False)


_PARSERS = {
    "alpaca": _alpaca,
    "alpaca_preference": _alpaca_preference,
    "sharegpt": _sharegpt,
    "messages": _messages,
    "prompt_completion": _prompt_completion,
    "prompt": _prompt,
    "preference": _preference,
    "preference_implicit": _preference_implicit,
    "sharegpt_preference": _sharegpt_preference,
    "unpaired": _unpaired,
    "text": _plain,
}


# -- checks -------------------------------------------------------------------------------------------------


def _check(s: Sample, stage: str | None) -> None:
    """Empty assistant turns, tool calls without a schema, and (SFT) the last turn."""
    parts = [("messages", s.messages), ("completion", s.completion), ("chosen", s.chosen), ("rejected", s.rejected)]
    for part, msgs in parts:
        for i, m in enumerate(msgs or []):
            if m["role"] == "assistant" and not says_something(m):
                raise DataError(f"{s.source}: {part}[{i}].content: the assistant turn is empty")
            _check_calls(m, s.tools, f"{s.source}: {part}[{i}].tool_calls[{{k}}].function.name")
    for part, msgs in (("chosen", s.chosen), ("rejected", s.rejected), ("completion", s.completion)):
        if msgs is not None and (not msgs or msgs[-1]["role"] != "assistant"):
            raise DataError(f"{s.source}: {part}: the response must end with an assistant message")
    if stage == "sft" or stage is None and s.format in STAGE_FORMATS["sft"]:
        conversation, start = s.sft()
        if not any(m["role"] == "assistant" for m in conversation[start:]):
            raise DataError(f"{s.source}: the conversation has no assistant message to learn from")
        if stage == "sft" and conversation[-1]["role"] != "assistant":
            raise DataError(
                f"{s.source}: the conversation's last message is a {conversation[-1]['role']} turn; SFT needs it to "
                "end with an assistant turn"
            )
