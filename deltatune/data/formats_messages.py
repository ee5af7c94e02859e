"""Reading messages out of a row: OpenAI / TRL message lists, sharegpt turns, content parts with images, TRL's
string-or-messages fields, the media columns. ``formats.py`` maps each format's row to a ``Sample`` with these.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from .load import DataError, Row
from .sample import REASONING, Message, says_something
from .tools import tool_calls as _tool_calls

_MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool", "function": "tool"}
"""OpenAI's roles (``function``: the result of a deprecated ``function_call``, a tool message)."""
ROLE_TAGS = {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system", "observation_tag": "tool",
             "function_tag": "function"}  # fmt: skip
"""LLaMA-Factory's role tags (``data.tags``) and the roles they name ('function': an answer that is a tool call)."""


OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}  # fmt: skip
"""data.tags' defaults under ``data.format: openai`` where data.tags is given: OpenAI's names (LLaMA-Factory's openai
datasets set these tags in dataset_info.json), its function_tag. Without data.tags OpenAI's roles are read
(``_MESSAGE_ROLES``)."""


class SharegptRoles(dict):
    """Roles named by sharegpt tags: its turns follow LLaMA-Factory's sharegpt order (``_sharegpt_order``), whether
    or not a function tag is given (a null one names no role: reading a sharegpt list by its 'function' value let a
    null function_tag switch the order off)."""


class _TaggedRoles(dict):
    """Roles named by data.tags under data.format=openai: a 'function' tag is an answer holding a call, as in
    sharegpt, but the turn order is LLaMA-Factory's openai one (``_openai_order``), not sharegpt's."""


def tag_roles(t: dict[str, str | None]) -> dict[str, str]:
    """The row's role names -> ours, by the tags ``t``; a null tag names no role (LLaMA-Factory's: no such tag)."""
    return {t[k]: ours for k, ours in ROLE_TAGS.items() if t.get(k) is not None}


def openai_tags(tags: dict[str, str] | None) -> dict[str, str] | None:
    """The tags ``read_samples`` reads with under data.format=openai: data.tags over ``OPENAI_TAGS`` (marked
    'formatting'), None without data.tags."""
    return {**OPENAI_TAGS, **tags, "formatting": "openai"} if tags else None


def message_keys(t: dict[str, str]) -> tuple[str, str, dict[str, str]]:
    """The role key, content key and roles of an OpenAI messages list: OpenAI's, or data.tags' under
    data.format=openai (``openai_tags``), as LLaMA-Factory's OpenAIDatasetConverter reads them."""
    if t.get("formatting") != "openai":
        return "role", "content", _MESSAGE_ROLES
    return t["role_tag"], t["content_tag"], _TaggedRoles(tag_roles(t))


def _col(columns: dict[str, str], key: str) -> str:
    return columns.get(key, key)


def _check_renames(*renames: tuple[dict, Sequence[str], str]) -> None:
    """``data.columns`` and ``data.tags`` (each ``(given, known keys, name)``): known keys, each renamed to a text (a
    list was a TypeError deep in the reader, a number a renaming silently unread, a null tag a role of None)."""
    from ..config import ConfigError

    for given, known, what in renames:
        unknown = [k for k in given if k not in known]
        if unknown:
            raise ConfigError(f"{what}: unknown key {unknown[0]!r}; it renames {', '.join(known)}")
        columns = what == "data.columns"  # (a null column: a *_column key unset, named when the row lacks it)
        # (a null role tag: LLaMA-Factory's "no such tag", matched by no role; role_tag and content_tag read every turn)
        nulls = () if columns else ("role_tag", "content_tag")
        bad = next((k for k, v in given.items() if not isinstance(v, str) and (v is not None or k in nulls)), None)
        if bad is not None:
            name = "a column name" if columns else "a tag (a role or field name of the rows)"
            raise ConfigError(f"{what}.{bad}: must be {name}, got {given[bad]!r}")


def _conversation_column(row: Row, c: dict[str, str], field: str, other: str) -> str:
    """The column a conversation format reads: its own ``field`` (sharegpt's conversations, messages' messages), the
    ``other`` where only that one is given; a row with neither is told of ``field`` missing, not of ``other``."""
    own, alt = _col(c, field), _col(c, other)
    return alt if row.get(own, required=False) is None and row.get(alt, required=False) is not None else own


def _a(tag: Any) -> str:
    """``tag`` quoted after its article: "an 'observation'", "a 'gpt'", "a 'user'"."""
    word = str(tag).lower()
    return f"{'an' if word[:1] in ('a', 'e', 'i', 'o') or word[:1] == 'u' and word[:2] != 'us' else 'a'} {tag!r}"


def _content(value: Any, where: str, sample_media: dict[str, list[str]]) -> str:
    """Text content; OpenAI content parts are joined (their images noted)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        texts = []
        for part in value:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")  # (a list or null trained as its Python repr: "['a']", "None")
                if not isinstance(text, str):
                    raise DataError(f"{where}: a text content part's 'text' must be text, got "
                                    f"{'null' if text is None else type(text).__name__}")  # fmt: skip
                texts.append(text)
            elif isinstance(part, dict) and part.get("type") in ("image", "image_url", "video"):
                kind = "videos" if part["type"] == "video" else "images"
                # The first field given (the datasets library writes the others as null); none at all is a
                # placeholder ({"type": "image"}, TRL's and LLaVA's) for an image of the row's images column.
                keys = ("image_url", "image", "video", "url", "path")
                ref = next((part[k] for k in keys if part.get(k) not in (None, "")), None)
                if ref is not None:  # (an object without a url read as the path "", a number as its digits)
                    if isinstance(ref, dict) and ref.get("bytes") not in (None, b"", ""):  # datasets' {bytes, path}
                        # (its bytes first, as datasets' Image.decode_example and images.image_value read it: the
                        # path read instead trained on whatever local file it names; no stage carries bytes from here)
                        raise DataError(f"{where}: {_a(part['type'])} content part's embedded image bytes are not "
                                        "read; give a path, or the image in data.image_column")  # fmt: skip
                    path = (ref.get("url") or ref.get("path")) if isinstance(ref, dict) else ref
                    if not isinstance(path, str) or not path.strip():
                        got = json.dumps(ref, default=repr)[:60]
                        raise DataError(f"{where}: {_a(part['type'])} content part must name a path or URL, got {got}")
                    sample_media[kind].append(path)
                texts.append("<video>" if kind == "videos" else "<image>")
            else:
                raise DataError(f"{where}: content part {part!r} is neither text nor an image")
        return "".join(texts)
    raise DataError(f"{where}: content must be text, got {type(value).__name__}")


def _message_list(
    value: Any,
    source: str,
    column: str,
    role_key: str,
    content_key: str,
    roles: dict[str, str],
    media,
    conversation: bool = True,
) -> list[Message]:
    """A list of message objects -> Messages; ``roles`` maps the row's role names to ours ('function' for a
    sharegpt function_call, whose value is the call). An empty assistant turn is refused here, where the file's
    field is known, unless the list is one response of a pair (``conversation`` False: data.bad_pairs decides).
    Sharegpt turns (``roles`` naming a 'function' tag) follow LLaMA-Factory's order or are refused: ``_sharegpt_order``."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        if isinstance(value, str) and value.lstrip().startswith(
            "["
        ):  # (a CSV cell, or a column saved with json.dumps)
            got += " (JSON text: a CSV cell holds text, as the datasets library reads it; give the rows as .jsonl)"
        raise DataError(f"{source}: column {column!r} must be a non-empty list of messages, got {got}")
    out: list[Message] = []
    sharegpt, previous = isinstance(roles, SharegptRoles), None
    for i, m in enumerate(value):
        where = f"{source}: {column}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: a message must be an object, got {type(m).__name__}")
        given = m
        if any(isinstance(v, float) and math.isnan(v) for v in m.values()):  # (pandas' NaN: missing; copied only so)
            m = {k: v for k, v in m.items() if not (isinstance(v, float) and math.isnan(v))}
        role = _role(m, role_key)
        if not isinstance(role, str) or role not in roles:  # (a list or an object: a TypeError, unhashable)
            role = given.get(role_key, given.get("role", given.get("from")))  # (a NaN one named so, not None)
            raise DataError(
                f"{where}.{role_key}: unknown role={role!r} (known roles: {', '.join(map(repr, roles))}; "
                "data.tags renames sharegpt roles)"
            )
        ours = roles[role]
        if sharegpt:
            _sharegpt_order(role, ours, previous, i, f"{where}.{role_key}", roles)
            previous = role
        raw = m.get(content_key, m.get("content", m.get("value")))
        if ours == "function":
            calls = _tool_calls(raw, f"{where}.{content_key}")
            if not calls:  # (was "messages[i].content: the assistant turn is empty", a field the row does not have)
                raise DataError(
                    f"{where}.{content_key}: the {role} turn holds no call ([]); write {{name, arguments}}"
                )
            out.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        if raw is None and ours != "assistant":  # (null beside an assistant's tool calls is OpenAI's own shape)
            raise DataError(f"{where}.{content_key}: the {ours} message has no content (null or missing)")
        msg: Message = {"role": ours, "content": _content(raw, f"{where}.{content_key}", media)}
        weight = m.get("weight") if ours == "assistant" and conversation else None  # OpenAI's fine-tuning format
        if weight is not None:
            if weight not in (0, 1) or isinstance(weight, bool):
                raise DataError(f"{where}.weight: must be 0 (the turn is not trained) or 1, got {weight!r}")
            if weight == 0:
                msg["weight"] = 0
        if ours == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if ours == "assistant" and m.get("function_call"):  # OpenAI's deprecated single call
            if msg.get("tool_calls"):
                raise DataError(f"{where}: both tool_calls and function_call; write the call in one of them")
            msg["tool_calls"] = _tool_calls(m["function_call"], f"{where}.function_call")
        for key in REASONING if ours == "assistant" else ():  # a reasoning trace, for the templates that read it
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise DataError(f"{where}.{key}: a reasoning trace must be text, got {type(m[key]).__name__}")
                msg[key] = m[key]
        if ours == "assistant" and conversation and not says_something(msg):
            raise DataError(f"{where}.{content_key}: the assistant turn is empty")
        if ours == "tool":
            for key in ("name", "tool_call_id"):
                value = m.get(key)  # (a list or an object written out as its Python repr by a template; a number as
                if isinstance(value, (int, float)) and not isinstance(value, bool):  # its digits, as here)
                    value = str(value)
                if value and not isinstance(value, str):
                    raise DataError(
                        f"{where}.{key}: the tool message's {key} must be text, got {type(value).__name__}"
                    )
                if value:
                    msg[key] = value
        if sharegpt and ours == "system" and msg["content"] == "":  # LLaMA-Factory's system "": none (the template's
            continue  # default, as for a row without one), not an empty system block
        out.append(msg)
    if not out:
        raise DataError(f"{source}: column {column!r} holds an empty system turn alone; a conversation needs turns")
    return out


def _sharegpt_order(role: str, ours: str, previous: str | None, i: int, where: str, roles: dict[str, str]) -> None:
    """LLaMA-Factory's sharegpt order: a system tag first or nowhere, then turns alternating between a prompt side
    (the user and observation tags) and an answer side (the assistant and function_call tags). Its converter drops a
    row out of order with a warning ('Invalid role tag'); here the row is refused naming the turn. Kept on purpose: a
    conversation may open with an answer (a greeting, which LLaMA-Factory drops too; see ``templates``)."""
    if ours == "system":
        if i:
            raise DataError(
                f"{where}: a system turn ({role!r}) after the first message; LLaMA-Factory reads the system tag only "
                "as a conversation's first turn and drops the row (move it to the front or to the system column)"
            )
        return
    side = {"user": 0, "tool": 0, "assistant": 1, "function": 1}
    if previous is not None and roles[previous] != "system" and side[roles[previous]] == side[ours]:
        tags = {s: " or ".join(repr(t) for t, o in roles.items() if o in side and side[o] == s) for s in (0, 1)}
        raise DataError(
            f"{where}: {_a(role)} turn after {_a(previous)} turn; sharegpt turns alternate between {tags[0]} and "
            f"{tags[1]} (LLaMA-Factory drops the row)"
        )


def _check_calls(m: Message, tools: list[dict] | None, where: str) -> None:
    """Each tool call of ``m`` names a schema in ``tools``; ``where`` (its ``{k}``: the call's index) names it."""
    names = {t["function"]["name"] for t in tools or [] if isinstance(t.get("function"), dict)}
    for k, call in enumerate(m.get("tool_calls") or []):
        if (name := call["function"]["name"]) not in names:
            raise DataError(
                f"{where.replace('{k}', str(k))}: the call to {name!r} has no matching schema in the row's "
                f"'tools' column (tools given: {', '.join(sorted(names)) or 'none'})"
            )


_MADE_OF = {"alpaca": ("instruction", "output"), "alpaca_preference": ("instruction", "chosen", "rejected"),
            "sharegpt": ("conversations", "messages"), "messages": ("messages", "conversations"),
            "prompt_completion": ("prompt", "completion"), "prompt": ("prompt",), "text": ("text",),
            "preference": ("prompt", "chosen", "rejected"), "preference_implicit": ("chosen", "rejected"),
            "sharegpt_preference": ("conversations", "messages", "chosen", "rejected"),
            "unpaired": ("prompt", "completion", "label")}  # fmt: skip
"""The fields each format (``formats.FORMATS``) is made of."""


def _nulled(first: Row, row: Row, c: dict[str, str], fmt: str) -> str | None:
    """ "column 'x' is null (a missing value), and " where a field of ``fmt`` (the format ``first`` was read in) is
    null or NaN in ``row`` but given in ``first`` (the datasets library writes a row's missing value as null): a later
    row so read as a row of another format ("this row is in the prompt format"), or of none. A null column of no part
    in ``fmt`` (a preference file's extra 'text') is not named: it is not why the formats differ."""
    for key in _MADE_OF.get(fmt, ()):
        col = _col(c, key)
        if col in row.data and row.get(col, required=False) is None and first.get(col, required=False) is not None:
            return f"column {col!r} is {'null' if row.data[col] is None else 'NaN'} (a missing value), and "
    return None


def _media(row: Row, c: dict[str, str]) -> dict[str, list[str]]:
    """The row's images and videos; audio (LLaMA-Factory's ``audios`` column) is refused: no stage reads it."""
    if row.get(_col(c, "audios"), required=False):
        raise DataError(f"{row.source}: column {_col(c, 'audios')!r}: an audio row; no stage reads audio (the vision "
                        "stages read images)")  # fmt: skip
    media: dict[str, list[str]] = {"images": [], "videos": []}
    for kind in media:
        value = row.get(_col(c, kind), required=False)
        if value:
            media[kind] = [
                _media_path(v, row.source, _col(c, kind)) for v in (value if isinstance(value, list) else [value])
            ]
    return media


def _media_path(value: Any, source: str, column: str) -> str:
    """One entry of an images or videos column: a path, or datasets' ``{bytes, path}`` object read as
    ``images.image_value`` reads it (its path; its bytes refused: no stage carries them from here)."""
    if not isinstance(value, dict):
        return str(value)
    from .images import image_value

    data, path = image_value(value, source, column)
    if data is not None:
        raise DataError(f"{source}: column {column!r}: an image's embedded bytes are not read; give image paths, or "
                        "the image in data.image_column")  # fmt: skip
    return path


def _text(row: Row, column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise DataError(f"{row.source}: column {column!r} must be text, got {type(value).__name__}")
    return value


def _not_text(value: Any) -> str | None:
    """What an alpaca history entry holds where it is no text ("empty", "NaN", "a list"); None for a string or a
    number (written out)."""
    if isinstance(value, str) or value is None:
        return None if value and value.strip() else "empty"
    if isinstance(value, float) and math.isnan(value):  # (pandas' missing value: it trained as the text 'nan')
        return "NaN"
    return None if isinstance(value, (int, float)) and not isinstance(value, bool) else f"a {type(value).__name__}"


def _turn(value: Any, row: Row, column: str, role: str, media) -> tuple[list[Message], bool]:
    """A TRL field: a string (one ``role`` message) or a list of messages; and whether it was a list."""
    if isinstance(value, str):
        if role == "user" and not value.strip():
            raise DataError(f"{row.source}: column {column!r} is empty")
        return [{"role": role, "content": value}], False
    if not isinstance(value, (list, dict)):
        raise DataError(
            f"{row.source}: column {column!r} must be text or a list of messages, got {type(value).__name__}"
        )
    roles = _MESSAGE_ROLES
    return _message_list(value, row.source, column, "role", "content", roles, media, role != "assistant"), True


def _system_message(row: Row, c: dict[str, str]) -> list[Message]:
    """The row's system column (LLaMA-Factory's ``system``) as a system message; none where it is empty or null."""
    system = row.get(_col(c, "system"), required=False)
    if system is None or (isinstance(system, float) and math.isnan(system)):
        return []
    if not isinstance(system, str):  # (a list or an object was written out as its Python repr)
        raise DataError(f"{row.source}: column {_col(c, 'system')!r} must be text, got {type(system).__name__}")
    return [{"role": "system", "content": system}] if system else []


TEMPLATE_KWARGS_TAKEN = ("conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                         "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                         "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")  # fmt: skip
"""``apply_chat_template``'s own arguments, which the stages set: a row's ``chat_template_kwargs`` may not (with those
of the installed transformers' signature: 5's ``sanitize_control_tokens``; ``_taken``)."""


def _taken() -> set[str]:
    import inspect

    from transformers import PreTrainedTokenizerBase

    params = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters.values()
    own = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
    return {*TEMPLATE_KWARGS_TAKEN, *own}


def _template_kwargs(row: Row, c: dict[str, str]) -> dict[str, Any] | None:
    """The row's ``chat_template_kwargs`` column (TRL's: extra variables for the chat template, e.g. Qwen3's
    ``enable_thinking``), an object or its JSON text; None where the row has none."""
    column = _col(c, "chat_template_kwargs")
    value = row.get(column, required=False)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            raise DataError(f"{row.source}: column {column!r} must be a JSON object, got {value[:40]!r}") from None
        except RecursionError:
            raise DataError(f"{row.source}: column {column!r}: JSON nested too deep to read") from None
        if value is None:  # (JSON's null, as a real null: no variables)
            return None
    if not isinstance(value, dict):
        raise DataError(f"{row.source}: column {column!r} must be an object of template variables, got "
                        f"{type(value).__name__}")  # fmt: skip
    taken = next((k for k in value if not isinstance(k, str) or k in _taken()), None) if value else None
    if taken is not None:
        raise DataError(f"{row.source}: {column}.{taken}: the stage sets this argument of apply_chat_template; a row "
                        "may set the template's own variables only")  # fmt: skip
    return value or None


def _role(m: dict, role_key: str) -> Any:
    """A message's role as ``_message_list`` reads it."""
    return m.get(role_key, m.get("role", m.get("from")))


def _openai_order(row: Row, c: dict[str, str], t: dict[str, str], ranking: bool, lost: bool) -> None:
    """LLaMA-Factory's order for its openai formatting (``data.format: openai``): a system message first or nowhere,
    then turns alternating between a prompt side (user; tool results, several in a row merged into one) and an answer
    side (assistant; with data.tags, the function tag too: a call), the roles read by ``message_keys`` as its
    converter reads them. Its converter drops a row out of order with a warning ('Invalid role tag'); here the row is
    refused naming the turn, as a sharegpt row is (``_sharegpt_order``; an opening answer kept as there). Tool results
    that end a conversation are never read by it (merged only before a later message): lost, a ranking row then
    ending on the call and dropped; refused here too where it reads the row (``lost``: a ranking row, PPO's prompt;
    other stages, which LLaMA-Factory's openai formatting has not, read them as a prompt's end)."""
    column = _conversation_column(row, c, "messages", "conversations")
    items, (role_key, _, roles) = row.data.get(column), message_keys(t)
    if not isinstance(items, list):
        return
    side, previous = {"user": 0, "tool": 0, "assistant": 1, "function": 1}, None
    for i, m in enumerate(items):  # (each message read by _message_list: an object with a known role)
        role = _role(m, role_key)
        where, ours = f"{row.source}: {column}[{i}].{role_key}", roles.get(role)
        if ours == "system" and i:
            raise DataError(f"{where}: a system message after the first; data.format=openai (LLaMA-Factory's "
                            "formatting) reads it only as the first message and drops the row")  # fmt: skip
        if ours not in side:
            continue
        answered = previous is not None and side[roles[previous]] == 1
        end = ours == "tool" and all(roles.get(_role(n, role_key)) == "tool" for n in items[i:])
        if end and (lost or previous is not None and not answered):  # (after the user: out of order as well)
            dropped = ranking and answered
            raise DataError(
                f"{where}: the conversation ends with tool results, which data.format=openai (LLaMA-Factory's "
                "formatting) reads only before a later message (its converter leaves them out"
                f"{'; a ranking row then ends on the call, and is dropped' if dropped else ''}); give them before a "
                f"{'user' if ranking else 'later'} message"
            )
        tools = previous is not None and roles[previous] == ours == "tool"  # (merged: one observation)
        if previous is not None and side[roles[previous]] == side[ours] and not tools:
            sides = [" or ".join(repr(r) for r, o in roles.items() if o in side and side[o] == k) for k in (0, 1)]
            raise DataError(
                f"{where}: {_a(role)} message after {_a(previous)} message; data.format=openai (LLaMA-Factory's "
                f"formatting) reads messages alternating between {sides[0]} and {sides[1]} (LLaMA-Factory drops the "
                "row)"
            )
        previous = role
