"""Chat and instruction formatting, with the loss on assistant tokens only.

Rows come in the alpaca shape (instruction, input, output), the chat shape (a list of
{"role", "content"} messages) or the sharegpt shape ({"from", "value"} with human/gpt roles).
They become a list of messages, rendered with the tokenizer's own chat template when it has one,
else with a named built-in template. The labels are the token ids inside assistant turns (their
end-of-turn marker included, so the model learns to stop) and -100 everywhere else; a multi-turn
conversation trains on every assistant turn.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from .load import DataError, Row
from .sample import REASONING, as_written

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Template:
    """A built-in chat format: one pattern per role (``{content}`` is replaced) and the assistant prefix."""

    system: str
    user: str
    assistant: str
    generation_prefix: str
    """What precedes the assistant's content; a prompt for generation ends with it."""
    suffix_trains: bool = False
    """Whether what the assistant pattern writes after the content trains with it: chatml's ``<|im_end|>\n``, as
    the model's own chat template (a turn is what it renders, through the line break) and TRL train it; only where
    the tokenizer has no EOS or the suffix opens with it (an answer ends at its EOS: nothing after it trains)."""
    default_system: str = ""
    """The system text written where the conversation has none, or an empty one (LLaMA-Factory's
    ``system or default_system``), through the system pattern."""


ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
"""LLaMA-Factory's ``alpaca`` default_system."""
OLD_ALPACA = "alpaca_v0"

TEMPLATES: dict[str, Template] = {
    "chatml": Template(
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
        generation_prefix="<|im_start|>assistant\n",
        suffix_trains=True,
    ),
    "alpaca": Template(  # LLaMA-Factory's: its default system ends with the blank line, a row's own system has none
        system="{content}",
        user="### Instruction:\n{content}\n\n",
        assistant="### Response:\n{content}\n\n",
        generation_prefix="### Response:\n",
        default_system=ALPACA_SYSTEM,
    ),
    "plain": Template(system="{content}\n", user="{content}\n", assistant="{content}\n", generation_prefix=""),
    OLD_ALPACA: Template(
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        assistant="### Response:\n{content}\n\n",
        generation_prefix="### Response:\n",
    ),
}
"""``OLD_ALPACA`` is alpaca as deltatune wrote it until 2026-12-08 (no default system; a system prompt then a blank
line): what a run folder begun before then trained with (``runs.trained_template``), or a recipe names."""


def stop_ids(tokenizer, template: str | None) -> list[int]:
    """The token ids generation stops on for a model trained with ``template`` (``data.template``; None: the
    tokenizer's own, whose stops are the generation config's): the tokenizer's EOS, and where the built-in template's
    end marker trains in its place (chatml's ``<|im_end|>`` with a tokenizer that has no EOS), that marker's id,
    when it is one token."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    t = TEMPLATES.get(template or "")
    if t is None or eos or not t.suffix_trains:
        return eos
    marker = t.assistant.split("{content}")[1].strip()
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return list(ids) if len(ids) == 1 else []


def to_messages(row: Row, columns: dict[str, str]) -> list[dict[str, str]]:
    """The row (alpaca, sharegpt or messages) as chat messages. ``columns`` maps fields (messages, instruction,
    input, output, system) to the row's column names. ``formats.read_samples`` is the full reader."""
    from .formats import _PARSERS, SHAREGPT_TAGS, detect

    fmt = detect(row, columns)
    if fmt not in ("alpaca", "sharegpt", "messages"):
        raise DataError(f"{row.source}: a {fmt} row is not a conversation")
    messages = _PARSERS[fmt](row, columns, SHAREGPT_TAGS).messages
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{row.source}: the conversation has no assistant message to learn from")
    return messages


def has_tool_support(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tool schemas and tool calls (it reads ``tools`` or
    ``tool_calls``)."""
    source = getattr(tokenizer, "chat_template", None) or ""
    source = source if isinstance(source, str) else " ".join(dict(source).values())
    return "tool_calls" in source or "tools" in source


class ChatTemplateError(DataError):
    """The tokenizer's chat template refused a conversation (its own ``raise_exception``: Gemma's "System role not
    supported", Mistral's "roles must alternate user/assistant"), or renders it unlike the row (a reasoning trace or
    tool call left out, a turn that cannot be located); ``encode`` puts the row's file:line before it."""


def apply_chat_template(tokenizer, messages: list[dict], where: str = "", **kwargs: Any) -> Any:
    """``tokenizer.apply_chat_template``, a template's refusal raised as ``ChatTemplateError`` (one line, after
    ``where``: the row's file:line) instead of jinja2's exception."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TemplateError as exc:
        why = f"the model's chat template refuses this conversation: {exc}"
        raise ChatTemplateError(f"{where}: {why}" if where else why) from None
    except TypeError as exc:  # inside the template: DeepSeek-V3's joins a tool call's arguments as a string
        if not any(f.filename.endswith("<template>") or "jinja" in f.filename for f in _frames(exc)):
            raise
        texts = _arguments_as_text(messages)
        if texts is not None:  # as OpenAI sends them (and transformers renders them so): the arguments' JSON text
            return apply_chat_template(tokenizer, texts, where, **kwargs)
        why = f"the model's chat template fails on this conversation ({exc})"
        raise ChatTemplateError(f"{where}: {why}" if where else why) from None


def _arguments_as_text(messages: list[dict]) -> list[dict] | None:
    """The conversation with its tool calls' arguments written as JSON text, OpenAI's string (a template that joins
    them to text, DeepSeek-V3's, reads no dict); None where no call has arguments as a dict."""
    import json

    def text(call: dict) -> dict:
        args = call.get("function", {}).get("arguments")
        return {**call, "function": {**call["function"], "arguments": json.dumps(args, ensure_ascii=False)}}

    if not any(
        isinstance(c.get("function", {}).get("arguments"), dict) for m in messages for c in m.get("tool_calls") or []
    ):
        return None
    return [{**m, "tool_calls": [text(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]


def _frames(exc: BaseException) -> list:
    import traceback

    return traceback.extract_tb(exc.__traceback__)


def render(
    messages: list[dict],
    tokenizer,
    template: str | None,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    train_from: int = 0,
    train_stop: bool = False,
    kwargs: dict[str, Any] | None = None,
    scored: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character spans [start, end) of every assistant turn from message
    ``train_from`` on.

    ``kwargs``: the row's ``chat_template_kwargs`` (variables the tokenizer's chat template reads, as TRL passes
    them); a built-in template reads none, as a jinja template ignores a variable it never names.

    ``train_stop`` (SFT): where the tokenizer's template ends an assistant turn with no marker of its own (GLM's),
    each span also covers the token the model stops on, as TRL's training template marks it (``_glm_stops``).
    ``scored``: a reward model's input, which generates nothing: a built-in template on a tokenizer without an EOS is
    not refused there (it is where answers train, as the model would never learn to stop).

    With ``template`` None the tokenizer's own chat template renders it (with ``tools`` schemas; spans found by
    rendering each prefix, which must be a prefix of the whole); otherwise the named built-in template, which
    has no tool support.
    """
    if template is None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"the tokenizer has no chat template; set data.template to one of {', '.join(TEMPLATES)}")
        kw = {**(kwargs or {}), **({"tools": tools} if tools else {})}

        def apply(ms: list[dict], gen: bool = False) -> str:
            return apply_chat_template(tokenizer, ms, tokenize=False, add_generation_prompt=gen, **kw)

        text = apply(messages, add_generation_prompt)
        spans = []

        def header() -> str:  # the generation prompt after the first user turn (the assistant header), per template
            key = (str(tokenizer.chat_template), bool(tools), repr(sorted((kwargs or {}).items())))
            if key not in _HEADERS:
                k = next((k for k, m in enumerate(messages) if m["role"] == "user"), -1)
                if k < 0:
                    return ""
                _HEADERS[key] = apply(messages[: k + 1], True)[len(apply(messages[: k + 1])) :]
            return _HEADERS[key]

        for i, m in enumerate(messages):
            if m["role"] != "assistant" or i < train_from or m.get("weight") == 0:
                continue
            if i == 0:  # an opening answer (a sharegpt greeting): no conversation before it renders, so it is
                spans.append(_opening(text, messages, apply, add_generation_prompt, _specials(tokenizer)))
                continue  # found where the whole conversation writes its content, as TRL's assistant masks train it
            before = apply(messages[:i], True)
            through = apply(messages[: i + 1])
            _check_reasoning(m, through, i)
            if m.get("tool_calls"):  # (the common prefix is a sweep of the whole text: only where there are calls)
                _check_calls(m, through[len(os.path.commonprefix([before, through])) :], i)
            # A generation prompt that opens a think block the turn then renders without (DeepSeek-R1's "<think>\n",
            # Nemotron 3's) is not a prefix of the turn: the turn is then located as an earlier one is.
            span = (
                (len(before), len(through))
                if text.startswith(through) and through.startswith(before)
                else _relocated(
                    text, before, through, m, partial(apply, messages[:i]), _specials(tokenizer), _is_glm(tokenizer)
                )  # fmt: skip
            )
            if span is None and i + 1 < len(messages):
                span = _placed(text, messages, i, apply, add_generation_prompt, _specials(tokenizer))
            if span is None:
                raise ChatTemplateError(
                    f"messages[{i}]: the tokenizer's chat template renders this assistant turn unlike the same turn "
                    "ending the conversation, so it cannot be located; set data.template to a built-in template"
                )
            if text.startswith(header(), span[0]):
                span = _without_header(span, text, before, apply(messages[:i]), header())
            spans.append(span)
        if train_stop and not add_generation_prompt and _is_glm(tokenizer):
            return _glm_stops(text, spans, messages[-1])
        return text, spans
    if template == "raw":  # data.template=raw (``raw.py``): the texts as they are, each answer closed by the EOS
        return _raw_render(messages, tokenizer, tools, train_from)
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; built-in templates: {', '.join(TEMPLATES)}, raw")
    bad = next(
        (i for i, m in enumerate(messages) if not isinstance(m.get("content"), str) and not m.get("tool_calls")), None
    )
    if bad is not None:  # (a TypeError joining it to the text before: the Python API's rows; files' are read to text)
        raise ChatTemplateError(
            f"messages[{bad}].content: data.template={template} renders text, not "
            f"{type(messages[bad].get('content')).__name__} (a list of parts is a vision-language chat template's)"
        )
    for i, m in enumerate(messages):
        _check_reasoning(m, "", i, template)
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        raise ChatTemplateError(
            f"data.template={template} has no tool support; tool calls need a tokenizer whose chat template renders "
            "them (leave data.template unset)"
        )
    bad = next((i for i, m in enumerate(messages) if m["role"] not in ("system", "user", "assistant")), None)
    if bad is not None:  # (an AttributeError on the Template before: the Python API's rows; files' roles are read)
        raise ChatTemplateError(
            f"messages[{bad}].role: data.template={template} renders system, user and assistant turns, not "
            f"{messages[bad]['role']!r}"
        )
    t = TEMPLATES[template]
    eos = tokenizer.eos_token or ""
    if not add_generation_prompt:  # (training: a prompt for chat or serve renders as an old run's model read it)
        _check_markers(tokenizer, template, t)
    text, spans = "", []
    if t.default_system and not (messages and messages[0]["role"] == "system" and messages[0]["content"]):
        text = t.system.format(content=t.default_system)  # (LLaMA-Factory's system or default_system)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prefix, suffix = t.assistant.split("{content}")
            text += prefix
            start = len(text)
            # The end-of-sequence token closes each answer, so generation learns where to stop; once, where the
            # template's own end marker is that token (chatml with Qwen's or SmolLM2's <|im_end|>).
            text += m["content"] + eos
            # The suffix trains only where it goes on from that token (or there is none): with another EOS (MiniLM's
            # [SEP]) the answer ends at it, as TRL's completion does (its add_eos), and nothing after it trains.
            trains = t.suffix_trains and (not eos or suffix.startswith(eos))
            if eos and suffix.startswith(eos):
                suffix = suffix[len(eos) :]
            end = len(text) + (len(suffix) if trains else 0)
            if i >= train_from and m.get("weight") != 0:
                spans.append((start, end))
            text += suffix
        elif m["role"] != "system" or m["content"]:  # an empty system prompt writes none, as LLaMA-Factory's
            text += getattr(t, m["role"]).format(content=m["content"])  # templates read system "" (no empty block)
    if add_generation_prompt:
        text += t.generation_prefix
    elif spans and not eos and not t.suffix_trains and not scored:  # (chatml trains its <|im_end|> there; a reward
        # model's input, ``scored``, generates nothing: BERT's closing [SEP] comes with its special tokens)
        raise DataError(
            f"data.template={template} closes each answer with the tokenizer's EOS token, and the tokenizer has none, "
            "so the model would never learn to stop (LLaMA-Factory adds <|endoftext|> and resizes the embeddings); "
            "use a tokenizer with an eos_token, or data.template=chatml, whose <|im_end|> trains in its place"
        )
    return text, spans


def check_markers(tokenizer, template: str | None) -> None:
    """``_check_markers`` for a prompt rendered with the generation prompt (PPO's and GRPO's, ``data inspect``'s),
    which ``render`` does not check (chat and serve read an old run's prompts): a built-in ``template`` only (None, the
    tokenizer's own chat template, and raw write no marker of deltatune's)."""
    if template in TEMPLATES:
        _check_markers(tokenizer, template, TEMPLATES[template])


def too_long(source: str, n: int, max_length: int) -> DataError:
    """PPO's and GRPO's refusal of an over-long prompt under data.truncation=refuse."""
    return DataError(f"{source}: the prompt is {n} tokens, more than data.max_length={max_length} (set "
                     "data.truncation=truncate to keep its end)")  # fmt: skip


def _check_markers(tokenizer, template: str, t: Template) -> None:
    """Refuse a built-in template whose markers the tokenizer cannot write: one it encodes as its unknown token (a
    word-level vocabulary reads ``<|im_start|>user`` or ``### Instruction:`` as [UNK], and the words a marker touches
    with it), which would train on [UNK]s in the conversation's place. A marker written in several pieces (chatml's
    ``<|im_start|>`` with MiniLM's WordPiece) is the tokenizer's to learn, and passes."""
    unk = getattr(tokenizer, "unk_token_id", None)
    key = (template, unk)
    try:  # (once per tokenizer: tokenizing the markers cost more than the row's own encoding)
        checked = _MARKERS_CHECKED.setdefault(tokenizer, set())
    except TypeError:  # (a tokenizer that cannot be weakly referenced: checked each time)
        checked = set()
    if unk is None or key in checked:
        return
    pieces = [p for pattern in (t.system, t.user, t.assistant) for p in pattern.split("{content}")]
    for piece in dict.fromkeys(p.strip() for p in pieces if p.strip()):
        if unk in tokenizer(piece, add_special_tokens=False)["input_ids"]:
            raise DataError(
                f"data.template={template}: the tokenizer has no tokens for the template's marker {piece!r} (it "
                f"encodes it as its unknown token {tokenizer.unk_token}), so training would read {tokenizer.unk_token}"
                " in its place; use a tokenizer whose vocabulary writes it, or data.template=plain"
            )
    checked.add(key)


_MARKERS_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""The (template, unknown token id) pairs ``_check_markers`` passed, per tokenizer."""


def _raw_render(
    messages: list[dict], tokenizer, tools: list[dict] | None = None, train_from: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """``render`` for ``raw`` (``raw.py``): the messages' texts joined as they are, each answer closed by the EOS
    (TRL's add_eos), its span trained from message ``train_from`` on; what ``chat`` and ``generate`` prompt a raw
    run's model with (the prompt's text alone: no generation prompt to add)."""
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        raise ChatTemplateError("data.template=raw has no tool support; leave data.template unset")
    if any(m["role"] == "system" for m in messages):  # (it would be joined to the prompt: "Be brief.Hello")
        raise ChatTemplateError(
            "data.template=raw renders plain text with no chat template, which has no place for a system prompt; "
            "leave the system prompt out, or data.template unset"
        )
    eos, text, spans = tokenizer.eos_token or "", "", []
    for i, m in enumerate(messages):
        content = as_written(m)
        if m["role"] != "assistant":
            text += content
            continue
        start = len(text)
        text += content if not eos or content.endswith(eos) else content + eos
        if i >= train_from and m.get("weight") != 0:
            spans.append((start, len(text)))
    return text, spans


def _without_header(span: tuple[int, int], text: str, before: str, plain: str, header: str) -> tuple[int, int]:
    """``span`` less the assistant ``header`` (the generation prompt the template writes after a user turn) it opens
    with, where the generation prompt before the turn wrote none (``before`` is the conversation before it, ``plain``):
    DiffusionGemma's after a tool response ends at ``<tool_response|>`` while the answer that follows opens
    ``<|turn>model\n``; TRL's ``diffusion_gemma_training`` leaves that header untrained, as a generation prompt is."""
    start, end = span
    if header and text.startswith(header, start) and start == len(before) and before == plain:
        return start + len(header), end
    return span


_HEADERS: dict[tuple[str, bool, str], str] = {}
"""The assistant header each chat template's generation prompt writes (``render``'s ``header``)."""


GLM_STOPS = ("<|observation|>", "<|user|>", "<|system|>")
"""The role markers GLM-4/4.5/4.6 write after an assistant turn, which the model generates to end it."""


def _is_glm(tokenizer) -> bool:
    """Whether the tokenizer's chat template is GLM's, which writes no end-of-turn marker after an answer."""
    source = tokenizer.chat_template
    source = source if isinstance(source, str) else " ".join(dict(source).values())
    return all(marker in source for marker in ("<|assistant|>", *GLM_STOPS[:2]))


def _glm_stops(text: str, spans: list[tuple[int, int]], last: dict) -> tuple[str, list[tuple[int, int]]]:
    """Each GLM answer's span through the role marker that follows it (<|observation|> after a tool call, else
    <|user|> or <|system|>), that marker written after a conversation that ends with an answer (``last``): what
    TRL's ``glm4moe_training`` template trains, so the model learns to stop (GLM's generation config stops on those)."""
    if last["role"] == "assistant":
        text += GLM_STOPS[0] if last.get("tool_calls") else GLM_STOPS[1]
    out = []
    for start, end in spans:
        stop = next((m for m in GLM_STOPS if text.startswith(m, end)), "")
        out.append((start, end + len(stop)))
    return text, out


def _check_reasoning(m: dict, rendered: str, i: int, template: str | None = None) -> None:
    """Refuse a reasoning trace the template leaves out (the model would learn to answer without reasoning)."""
    for key in REASONING:
        if m.get(key) and m[key].strip() not in rendered:
            how = f"data.template={template}" if template else "the model's chat template"
            raise ChatTemplateError(
                f"messages[{i}].{key}: {how} does not render reasoning traces, so training would drop it; use a "
                f"model whose chat template reads {key!r} (Qwen3, gpt-oss), or remove the field"
            )
    thought = _thought(m["content"])
    if template is None and thought and thought not in rendered:  # DeepSeek-R1's cuts it off every turn
        raise ChatTemplateError(
            f"messages[{i}].content: the model's chat template leaves out the think block written in the content, "
            "even on the last turn, so training would drop the reasoning; use a chat template that renders it"
        )


def _check_calls(m: dict, turn: str, i: int) -> None:
    """Refuse a tool call the template leaves out of the turn it renders (``turn``): DeepSeek-R1's writes calls only
    for a null content, LFM2's only the content; the model would learn to answer with nothing in its place."""
    for k, call in enumerate(m.get("tool_calls") or []):
        name = call["function"]["name"]
        if name not in turn:
            raise ChatTemplateError(
                f"messages[{i}].tool_calls[{k}]: the model's chat template does not render this call to {name!r}, "
                "so training would drop it; use a model whose chat template renders tool_calls"
            )


def _thought(content: str) -> str:
    """The reasoning of a think block written in the content (stripped), or ""."""
    return content.split("</think>")[0].split("<think>")[-1].strip() if "</think>" in content else ""


def _specials(tokenizer) -> list[str]:
    """The tokenizer's special tokens, longest first (the end markers a template may write)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found = {t.content for t in added.values() if getattr(t, "special", False)}
    return sorted(found | set(getattr(tokenizer, "all_special_tokens", None) or []), key=len, reverse=True)


def _relocated(
    text: str, before: str, through: str, m: dict, plain, specials: Sequence[str] = (), glm: bool = False
) -> tuple[int, int] | None:
    """An earlier assistant turn's span where the template renders a turn followed by others unlike the same turn
    ending the conversation (Qwen3 leaves out an earlier turn's think block, and Qwen3.5's generation prompt opens
    one; Phi-3 writes its end-of-sequence after the last turn only): the turn's content after the same prompt,
    through the end marker both renderings write after it (cut after its last line break, so no piece of the next
    turn's marker trains), or, where each writes a special token of its own there (``specials``: gpt-oss ends a
    turn with <|end|> and the last with <|return|>), the one the conversation writes; else None. ``plain()``
    renders the conversation before the turn, without a generation prompt: where ``before`` is not a prefix of
    ``text``, they must part inside the generation prompt (DeepSeek-R1's and Nemotron 3's open a think block).
    ``glm``: GLM's template, which writes no end marker after a turn (any other template must write one)."""
    content = m["content"]
    if not isinstance(content, str):  # a vision-language row's parts: their text is what the template writes of it
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    start = len(os.path.commonprefix([before, text]))
    if start < len(before) and start < len(os.path.commonprefix([before, plain()])):
        return None
    if "</think>" in content and content not in text[start:]:  # a think block written in the content, which Qwen3
        content = content.split("</think>")[-1].lstrip("\n")  # leaves out of an earlier turn, as reasoning_content
    if content not in through[start:]:  # Qwen3.5's and Nemotron 3's write it trimmed
        content = content.strip()
    if content:  # each place the content could sit (it may occur in what the template writes before it: "think")
        places = [k for k in range(start, len(through)) if through.startswith(content, k)]
    else:  # a turn that only reasons (dropped here): its empty content sits where the end marker both write begins
        first = text[start : start + 1]
        ends = (j for j in range(start, len(through)) if through[j] == first and text.startswith(through[j:], start))
        places = [next(ends, -1)]
    # GLM writes an earlier turn's think block empty (<think></think>): its lead is then the lead without the reasoning
    thought = next((m[key].strip() for key in REASONING if m.get(key)), "") or _thought(m["content"])
    for k in places:
        lead = through[start:k]  # what the template writes between the generation prompt and the content
        opened = lead.find("<think>") + len("<think>") if "<think>" in lead else 0  # (a thought "think", "k")
        at = lead.find(thought, opened) if thought else -1  # the reasoning inside the think block
        bare = lead[:at] + lead[at + len(thought) :] if at >= 0 else None
        if text.startswith(lead + content, start):
            end = start + len(lead) + len(content)
        elif text.startswith(content, start):
            end = start + len(content)
        elif bare is not None and text.startswith(bare + content, start):
            end = start + len(bare) + len(content)
        else:
            continue
        tail, rest = through[k + len(content) :], text[end:]
        marker = _end_marker(tail, rest, specials)
        if (marker or (glm and not tail)) and k >= 0:  # GLM's template ends a turn with no marker: no tail
            return start, end + len(marker)
    return None


def _end_marker(tail: str, rest: str, specials: Sequence[str]) -> str:
    """The end marker of a turn: what the template writes after it ending the conversation (``tail``) and in the
    conversation (``rest``) alike, cut after its last line break (so no piece of the next turn's marker trains); or,
    where each writes a special token of its own there (gpt-oss: <|end|> mid-conversation, <|return|> last), the one
    the conversation writes; else ""."""
    n = len(os.path.commonprefix([tail, rest]))
    marker = tail[:n] if n == len(tail) else tail[: tail.rfind("\n", 0, n) + 1]
    markers = [next((t for t in specials if x.startswith(t)), "") for x in (tail, rest)]
    return markers[1] if not marker and all(markers) else marker


def _opening(text: str, messages: list[dict], apply, gen: bool, specials: Sequence[str]) -> tuple[int, int]:
    """The span of an assistant turn that opens the conversation (``_placed``'s), its reasoning and calls checked;
    refused where the template writes it so that it cannot be located."""
    m = messages[0]
    through = apply(messages[:1])
    _check_reasoning(m, through, 0)
    _check_calls(m, through, 0)
    span = _placed(text, messages, 0, apply, gen, specials)
    if span is None:
        raise ChatTemplateError(
            "messages[0].role: the conversation opens with an assistant turn, which the model's chat template "
            "renders so that it cannot be located; start it with a user (or system) turn, or drop the opening turn"
        )
    return span


def _placed(
    text: str, messages: list[dict], i: int, apply, gen: bool, specials: Sequence[str]
) -> tuple[int, int] | None:
    """An earlier assistant turn's span where the conversation before it renders otherwise than the conversation cut
    after it (Qwen3.5 and 3.6 write a think block on each turn after the last user query, which a later user turn
    moves: ``user, call, tool, answer, user, answer`` renders the call bare, the conversation cut at the answer
    with the block): the turn's content where the whole conversation writes it, found by rendering it with the
    content swapped for a mark, through the end marker the turn ending the conversation writes; else None."""
    m, content = messages[i], messages[i]["content"]
    mark = next(x for x in ("\u2603", "\u2604", "\u2605") if x not in (content[:1], content[-1:]))  # (3 > 2 ends)
    swapped = [*messages[:i], {**m, "content": mark}, *messages[i + 1 :]]
    other = apply(swapped, gen)
    start = len(os.path.commonprefix([text, other]))
    end = len(text) - len(os.path.commonprefix([text[start:][::-1], other[start:][::-1]]))
    through, marked = apply(messages[: i + 1]), apply(swapped[: i + 1])
    k = len(os.path.commonprefix([through, marked]))
    written = text[start:end]  # (Qwen3.5's and Nemotron 3's trim it)
    if written not in (content, content.strip()) or through[k : k + len(written)] != written:
        return None
    marker = _end_marker(through[k + len(written) :], text[end:], specials)
    calls = [call["function"]["name"] for call in m.get("tool_calls") or []]
    if not marker or any(name not in text[start : end + len(marker)] for name in calls):
        return None  # (DiffusionGemma writes the call, then the tool's response, then the content)
    thought = next((m[key].strip() for key in REASONING if m.get(key)), "") or _thought(content)
    if thought and thought in text:  # a reasoning the conversation writes, outside the span: not left untrained
        return None
    return start, end + len(marker)


def encode_chat(
    messages: list[dict],
    tokenizer,
    template: str | None,
    tools: list[dict] | None = None,
    train_from: int = 0,
    train_stop: bool = False,
    kwargs: dict[str, Any] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside the assistant turns from message ``train_from`` on), untruncated;
    ``train_stop`` and ``kwargs`` as ``render``'s."""
    text, spans = render(messages, tokenizer, template, tools=tools, train_from=train_from, train_stop=train_stop,
                         kwargs=kwargs)  # fmt: skip
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("SFT masking needs a fast tokenizer (with offset mapping)")
    enc = tokenizer(text, add_special_tokens=template is not None, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels, k, spans = [], 0, sorted(spans)
    for tok_id, (start, end) in zip(ids, enc["offset_mapping"]):
        # Every token overlapping a span trains, as transformers' assistant mask marks it: a token that opens the answer
        # with the last character of the prompt (" Hello" after "Assistant: ") is the answer's first word. (The spans
        # and the offsets both ascend: one sweep, not every span per token, for a row of hundreds of turns.)
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        inside = k < len(spans) and start < spans[k][1] and end > spans[k][0]
        labels.append(tok_id if inside else IGNORE_INDEX)
    return ids, labels
