"""The prompt of a request: a chat's messages rendered with the tokenizer's chat template and vLLM's rendering fields
(``add_generation_prompt``, ``continue_final_message``, ``add_special_tokens``, ``chat_template_kwargs``,
``documents``; ``tools`` under ``tool_choice: "none"``), or with the built-in template an adapter's run trained with; a completion's prompt
text or token ids. Split from app.py in session 46, at its limit."""

from __future__ import annotations

import inspect
import json
from typing import Any

from ..data.templates import ChatTemplateError, apply_chat_template
from .engine import RequestError, shown
from .fields import flag

ROLES = ("system", "developer", "user", "assistant", "tool")


# vLLM's chat fields that change how the prompt is rendered, with vLLM's defaults.
RENDERING: dict[str, Any] = {
    "add_generation_prompt": True,
    "continue_final_message": False,
    "add_special_tokens": False,
    "chat_template_kwargs": {},
    "tools": None,  # OpenAI's tools, rendered into the prompt under tool_choice "none" (_tools)
    "documents": None,  # vLLM's: [{"title": ..., "text": ...}] handed to the chat template (RAG templates)
}


def _named(template: str) -> str:
    """A run's built-in template as a 400 names it (raw is no template: the texts as they are)."""
    return (
        "data.template=raw (plain text, no chat template)"
        if template == "raw"
        else f"the built-in template {template!r}"
    )


def _rendering(body: dict, template: str | None) -> dict[str, Any]:
    """vLLM's rendering fields of a chat request, checked: the tokenizer's chat template takes them (its own
    variables, such as Qwen3's ``enable_thinking``, in ``chat_template_kwargs``); a run's built-in template only
    their defaults, and the continuation of a final assistant message (``continue_final_message`` with
    ``add_generation_prompt`` false)."""
    out = {key: body.get(key, default) for key, default in RENDERING.items()}
    out = {key: default if out[key] is None else out[key] for key, default in RENDERING.items()}
    out["tools"] = _tools(body)
    documents = out["documents"]
    if documents is not None and not (
        isinstance(documents, list)
        and all(isinstance(d, dict) and all(isinstance(v, str) for v in d.values()) for d in documents)
    ):  # vLLM's list[dict[str, str]]
        raise RequestError("documents must be a list of objects of strings ({title, text})", param="documents")
    for key in ("add_generation_prompt", "continue_final_message", "add_special_tokens"):
        flag(out, key)
    kwargs = out["chat_template_kwargs"]
    if not isinstance(kwargs, dict):
        raise RequestError(
            f"chat_template_kwargs must be an object, got {shown(kwargs)}", param="chat_template_kwargs"
        )
    if out["add_generation_prompt"] and out["continue_final_message"]:  # as vLLM answers
        raise RequestError(
            "continue_final_message continues the last message: set add_generation_prompt to false with it",
            param="continue_final_message",
        )
    changed = [key for key, default in RENDERING.items() if out[key] != default]
    if template is not None and out["continue_final_message"]:  # (a built-in template continues a final answer too)
        changed = [key for key in changed if key not in ("add_generation_prompt", "continue_final_message")]
    if template is not None and changed:
        raise RequestError(
            f"{changed[0]} is not served for this model: its chat requests are rendered with {_named(template)} "
            "its run trained with",
            code="unsupported",
            param=changed[0],
        )
    return out


def _tools(body: dict) -> list[dict] | None:
    """A chat request's ``tools`` as vLLM hands them to the chat template (None: none), checked as vLLM checks
    them: a ``tool_choice`` other than "none" needs tools (a 400 naming it); with tools, only "none" is served
    (the tools rendered into the prompt, the answer plain text: vLLM's answer without --enable-auto-tool-choice
    is a 400 for "auto", its default with tools when the key is left out, while an explicit null is no choice and
    the tools are rendered; "required" and a named tool need guided decoding, which this server does not do). Each tool as pydantic dumps vLLM's ChatCompletionToolsParam: ``{"type": "function",
    "function": {"name", "description", "parameters", ...its other keys}, ...the tool's other keys}``, a key left out
    null (vLLM's OpenAIBaseModel allows extra keys and dumps them after its own)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:  # [] asks for nothing (vLLM refuses an empty list; deltatune lets it pass)
        if choice is not None and choice != "none":
            if tools == []:  # vLLM's words (it refuses [] even without a choice; deltatune lets that pass)
                raise RequestError("`tools` must not be an empty array. Either provide at least one tool or omit "
                                   "the field entirely.", param="tools")  # fmt: skip
            raise RequestError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
        return None
    if not isinstance(tools, list):  # vLLM's pydantic checks the type before the choice
        raise RequestError(f"tools must be a list of {{type, function}}, got {shown(tools)}", param="tools")
    if "tool_choice" not in body or choice not in ("none", None):  # vLLM: only a left-out choice defaults to auto
        raise RequestError(
            f"tool_choice {'auto' if choice is None else shown(choice)}{' (the default with tools)' * (choice is None)} "
            'is not supported by this server, which parses no tool calls; send tool_choice "none" to have the '
            "tools rendered into the prompt",
            code="unsupported",
            param="tool_choice",
        )
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            raise RequestError(f'tools[{i}] must be {{"type": "function", "function": {{name, ...}}}}', param="tools")
        name, about, parameters = function.get("name"), function.get("description"), function.get("parameters")
        if not isinstance(name, str) or not isinstance(about, (str, type(None))):
            raise RequestError(f"tools[{i}].function needs a string name (and description)", param="tools")
        if not isinstance(parameters, (dict, type(None))):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON Schema object", param="tools")
        rest = {k: v for k, v in function.items() if k not in ("name", "description", "parameters")}
        outer = {k: v for k, v in tool.items() if k not in ("type", "function")}  # extra="allow": kept, after them
        function = {"name": name, "description": about, "parameters": parameters, **rest}
        out.append({"type": "function", "function": function, **outer})
    return out


def _chat_ids(
    tokenizer: Any, messages: Any, template: str | None = None, rendering: dict[str, Any] | None = None
) -> list[int]:
    """The prompt of a chat request, the assistant's turn opened (or a final one continued, with
    ``continue_final_message``): rendered with ``template`` (the built-in one the adapter's run trained with) as
    ``deltatune chat`` renders it, else with the tokenizer's chat template (with ``rendering``'s options, vLLM's:
    ``RENDERING``)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content}", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'", param="messages")
        if m["role"] not in ROLES:
            raise RequestError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, got {shown(m['role'])}", param="messages"
            )
        calls = _tool_calls(m, i, template)
        content = "" if m.get("content") is None and calls else m.get("content")
        if isinstance(content, list):  # the parts form: [{"type": "text", "text": ...}, ...]
            content = part_text(content, i)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", param="messages")
        _utf8(content, f"messages[{i}].content", "messages")
        clean.append({"role": m["role"], "content": content})
        for key in ("name", "tool_call_id"):  # vLLM's message types: name: str (pydantic coerces no number)
            if m.get(key) is not None and not isinstance(m[key], str):
                raise RequestError(f"messages[{i}].{key} must be a string, got {shown(m[key])}", param="messages")
        for key in ("name", "tool_call_id") if template is None else ():  # vLLM hands them to the chat template
            if isinstance(m.get(key), str) and (key == "name" or m["role"] == "tool"):
                _utf8(m[key], f"messages[{i}].{key}", "messages")
                clean[-1][key] = m[key]
        if calls:
            clean[-1]["tool_calls"] = calls
        # An earlier turn's reasoning: vLLM reads `reasoning` ("" as is); deltatune also the older name
        # `reasoning_content` where `reasoning` is null or left out (vLLM does not: vllm-project/vllm#38488)
        key = "reasoning" if m.get("reasoning") is not None else "reasoning_content"
        reasoning = m.get(key) if m["role"] == "assistant" else None
        if reasoning is not None and template is None:  # handed to the chat template under both names
            if not isinstance(reasoning, str):
                raise RequestError(f"messages[{i}].{key} must be a string, got {shown(reasoning)}",
                                   param="messages")  # fmt: skip
            _utf8(reasoning, f"messages[{i}].{key}", "messages")
            clean[-1].update(reasoning=reasoning, reasoning_content=reasoning)
    source = getattr(tokenizer, "chat_template", None) if template is None else None
    if "developer" not in (source if isinstance(source, str) else ""):  # OpenAI's newer name for the system role
        clean = [{**m, "role": "system"} if m["role"] == "developer" else m for m in clean]
    options = {**RENDERING, **(rendering or {})}
    if template is not None:
        from ..train.chat import prompt_ids

        # Else, as vLLM's default (add_generation_prompt): a final answer closed and a new one opened
        go_on = options["continue_final_message"]
        if go_on and clean[-1]["role"] != "assistant":
            raise RequestError(f"continue_final_message: {_named(template)} continues a final assistant message, and "
                               f"the last is a {clean[-1]['role']} message", code="unsupported",
                               param="continue_final_message")  # fmt: skip
        try:
            return prompt_ids(tokenizer, clean, template=template, continue_final=go_on)
        except ValueError as exc:  # DataError, ConfigError: a conversation the template cannot render
            raise RequestError(str(exc), param="messages") from None
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model's tokenizer has no chat template; use /v1/completions", code="no_chat_template")
    kwargs = options["chat_template_kwargs"]
    named = inspect.signature(tokenizer.apply_chat_template).parameters
    taken = [k for k in kwargs if not isinstance(k, str) or (k in named and k != "kwargs") or k == "messages"]
    if taken:  # apply_chat_template's own arguments (tokenize, tools, ...), not the template's variables
        raise RequestError(f"chat_template_kwargs may not set {shown(taken[0])}", param="chat_template_kwargs")

    def render(fields: dict[str, Any]) -> str:
        return apply_chat_template(
            tokenizer,
            clean,
            tokenize=False,
            add_generation_prompt=options["add_generation_prompt"],
            continue_final_message=options["continue_final_message"],
            tools=fields["tools"],
            documents=fields["documents"],
            **fields["chat_template_kwargs"],
        )

    fields = {key: options[key] for key in ("tools", "documents", "chat_template_kwargs")}
    try:
        text = render(fields)
    except ChatTemplateError as exc:  # a 400 naming the template's reason, not a 500
        raise RequestError(str(exc), param="messages") from None
    except RecursionError:  # (a body nested too deep for transformers' rendering, though JSON read it)
        raise RequestError("JSON nested too deep to render with the chat template", param="messages") from None
    except ValueError as exc:  # continue_final_message without a final message to continue, or one left out
        from ..data.encode import final_refusal

        why = final_refusal(exc, f"messages[{len(clean) - 1}]")  # (transformers' many lines: one)
        raise RequestError(str(why) if why is not exc else f"continue_final_message: {exc}",
                           param="continue_final_message") from None  # fmt: skip
    if not _is_utf8(text):  # else a 500; named by the field whose surrogates the template rendered (not messages)
        key = next((k for k in fields if _rendered_from(render, fields, k, text)), None)
        _utf8(text, key or "the rendered chat (a tool call's arguments)", key or "messages")
    return list(tokenizer(text, add_special_tokens=options["add_special_tokens"])["input_ids"])


# vLLM's text parts (chat_utils' MM_PARSER_MAP): each type with the key holding its text
_TEXT_PARTS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}


def part_text(content: list, i: int) -> str:
    """A message's content parts as vLLM joins them for a template that reads a string: a plain string part as it is,
    a ``text`` / ``input_text`` / ``output_text`` part's text, a ``refusal`` part's refusal, a ``thinking`` part's
    thinking; a null or empty one skipped (vLLM keeps the truthy parts), the rest joined by newlines. Any other part
    (an image) is a 400: this server reads text alone."""
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(part, str) and kind not in _TEXT_PARTS:
            raise RequestError(f"messages[{i}].content: only text parts are served", param="messages")
        text = part if isinstance(part, str) else part.get(_TEXT_PARTS[kind])
        if not isinstance(text, (str, type(None))):
            raise RequestError(f"messages[{i}].content: a {kind} part's {_TEXT_PARTS[kind]} must be a string",
                               param="messages")  # fmt: skip
        if text:
            texts.append(text)
    return "\n".join(texts)


def _tool_calls(m: dict, i: int, template: str | None) -> list | None:
    """An assistant message's ``tool_calls`` (None: none), as vLLM hands them to the chat template: each function's
    JSON ``arguments`` parsed into an object. A run's built-in template renders none: there they are a 400."""
    calls = m.get("tool_calls")
    if not calls or m["role"] != "assistant":  # vLLM reads them on assistant messages only
        return None
    if template is not None:
        raise RequestError(f"messages[{i}].tool_calls: {_named(template)} renders no tool calls",
                           code="unsupported", param="messages")  # fmt: skip
    if not isinstance(calls, list) or not all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls
    ):
        raise RequestError(f"messages[{i}].tool_calls must be a list of {{id, type, function}}", param="messages")
    out = []
    for call in calls:
        function = dict(call["function"])
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"] or "{}")
            except (ValueError, RecursionError):
                raise RequestError(f"messages[{i}].tool_calls: arguments is not JSON", param="messages") from None
        out.append({**call, "function": function})
    return out


def _utf8(text: str, what: str, param: str) -> None:
    """A 400 for a lone surrogate (a client cutting a string mid-emoji writes valid JSON the tokenizer refuses)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{what} holds a lone surrogate (\\ud800-\\udfff), not UTF-8 text", param=param) from None


def _rendered_from(render: Any, fields: dict[str, Any], key: str, text: str) -> bool:
    """Whether the lone surrogates of ``text`` come (some of them) from ``fields[key]``: rendered again with that
    field's surrogates replaced, the text holds fewer (a field holding some that the template leaves out is not it)."""
    try:
        again = render({**fields, key: _mended(fields[key])})
    except Exception:  # noqa: BLE001 (a template that reads the text it was given otherwise: not named by it)
        return False
    return _surrogates(again) < _surrogates(text)


def _mended(value: Any) -> Any:
    """``value`` with each string's lone surrogates replaced (by "?"), its lists' and objects' too."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [_mended(v) for v in value]
    if isinstance(value, dict):
        return {_mended(k): _mended(v) for k, v in value.items()}
    return value


def _surrogates(text: str) -> int:
    return sum(0xD800 <= ord(c) <= 0xDFFF for c in text)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _prompt_ids(tokenizer: Any, prompt: Any, special: bool = True, vocab: int = 0) -> list[int]:
    """The prompt of a completion request: a string (tokenized as ``deltatune generate`` does, the tokenizer's
    special tokens added unless ``special`` is false, vLLM's ``add_special_tokens``) or token ids, each below the
    tokenizer's length or ``vocab`` (the model's, which may be larger: vLLM's bound is the larger of the two; one
    past the model's own is refused by ``fields.to_request``)."""
    if isinstance(prompt, str):
        _utf8(prompt, "prompt", "prompt")
        ids = list(tokenizer(prompt, add_special_tokens=special)["input_ids"]) if prompt else []
        if not ids:  # an empty string (also where the tokenizer would add a BOS: nothing to continue)
            raise RequestError("prompt is empty; give some text (or token ids) to continue", param="prompt")
        return ids
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = max(len(tokenizer), vocab)
        if any(t < 0 or t >= vocab for t in prompt):
            raise RequestError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return prompt
    raise RequestError("prompt must be a string or a list of token ids, or a list of those", param="prompt")
