"""Tool calls and tool schemas in data rows, as transformers' chat templates read them (formats.py's helpers)."""

from __future__ import annotations

import json
from typing import Any

from .load import DataError, Row

TOO_DEEP = "JSON nested too deep to read"
"""A JSON text nested past Python's recursion limit (json raises RecursionError; serve answers it with a 400)."""


def refusal(exc: Exception, sample: Any = None) -> str | None:
    """A chat template's refusal (encode.py's ``_named``) in words: a row nested too deep for transformers' rendering
    (its template data is copied recursively) raised a bare RecursionError naming nothing. None for a RecursionError
    of a row that is not deep (``sample``'s fields under 100 levels): deltatune's own, raised as it is."""
    if not isinstance(exc, RecursionError):
        return str(exc)
    if sample is not None and _depth([getattr(sample, f, None) for f in ("messages", "completion", "chosen",
                                                                          "rejected", "tools", "template_kwargs")]) < 100:  # fmt: skip
        return None
    return "JSON nested too deep to render with the chat template"


def _depth(value: Any) -> int:
    """How deep lists and dicts nest in ``value`` (a stack of its own: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def tool_calls(value: Any, where: str) -> list[dict]:
    """Tool calls as transformers' chat templates read them, arguments parsed to a dict."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except RecursionError:
            raise DataError(f"{where}: {TOO_DEEP}") from None
        except ValueError:  # (JSONDecodeError)
            raise DataError(
                f"{where}: a function call must be JSON ({{name, arguments}}), got {value[:40]!r}"
            ) from None
    listed = isinstance(value, list)
    out = []
    for i, call in enumerate(value if listed else [value]):
        at = f"{where}[{i}]" if listed else where  # (a single call is the field itself: no [0] the row lacks)
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            got = json.dumps(call)[:60] if isinstance(call, (dict, list, type(None))) else repr(call)[:60]
            raise DataError(f"{at}: a tool call needs a function name, got {got}")
        if fn.get("arguments") in (None, "", {}) and fn.get("parameters"):  # (Llama 3's shape): read as none, it was
            raise DataError(  # trained as a call with none; LLaMA-Factory's FunctionFormatter reads "arguments" only
                f"{at}: the call writes its arguments under 'parameters'; write them under 'arguments' (as OpenAI "
                "and the chat templates read a tool call)"
            )
        args = fn.get("arguments", {})
        for _ in range(2):  # (arguments written as JSON text, then encoded again as a JSON string: decoded twice)
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except RecursionError:
                    raise DataError(f"{at}.arguments: {TOO_DEEP}") from None
                except ValueError:
                    raise DataError(f"{at}.arguments: not valid JSON") from None
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise DataError(
                f"{at}.arguments: must be a JSON object of the call's parameters, got {type(args).__name__}"
            )
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and call.get("id"):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def row_tools(row: Row, column: str) -> list[dict] | None:
    """The row's tool schemas (its ``column``; else OpenAI's deprecated ``functions`` column), as transformers' chat
    templates read them; None when it has none."""
    value = row.get(column, required=False)
    if (value is None or value == "" or value == []) and column == "tools":
        column, value = "functions", row.get("functions", required=False)
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except RecursionError:
            raise DataError(f"{row.source}: column {column!r}: {TOO_DEEP}") from None
        except ValueError:
            raise DataError(f"{row.source}: column {column!r} is not valid JSON") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{row.source}: column {column!r} must be a list of tool schemas")
    for i, v in enumerate(value):
        if not isinstance(v, dict):
            raise DataError(
                f"{row.source}: {column}[{i}] must be a tool schema (a JSON object), got {type(v).__name__}"
            )
    # A flat schema ({name, parameters}, LLaMA-Factory's; OpenAI's Responses API writes its "type": "function" beside
    # them) is wrapped as chat completions send it: its "type" is the wrapper's, not a key of the function.
    schemas = [
        v if "function" in v else {"type": "function", "function": {k: x for k, x in v.items() if k != "type"}}
        for v in value
    ]
    for i, v in enumerate(schemas):
        if not isinstance(v["function"], dict) or not isinstance(v["function"].get("name"), str):
            raise DataError(f"{row.source}: {column}[{i}]: a tool schema needs a function name")
        schemas[i] = _checked(v, f"{row.source}: {column}[{i}]")
    return [_as_served(v) for v in schemas]


def _checked(tool: dict, where: str) -> dict:
    """``tool`` with its parameters written as JSON text read as the object they hold, checked as vLLM (and deltatune
    serve) check a request's tools: a text description, an object (JSON Schema) for parameters. A row's schema the
    server would refuse trained a prompt no request gets (a quoted text or a list where the schema goes)."""
    if tool.get("type", "function") != "function":  # (vLLM's ChatCompletionToolsParam: Literal["function"])
        raise DataError(f"{where}: the tool's type must be 'function' (as vLLM and serve take), got {tool['type']!r}")
    fn = dict(tool["function"])
    about, params = fn.get("description"), fn.get("parameters")
    if not isinstance(about, (str, type(None))):
        raise DataError(f"{where}: the description must be a text, got {type(about).__name__}")
    if isinstance(params, str):
        try:
            params = json.loads(params) if params.strip() else None
        except RecursionError:
            raise DataError(f"{where}: the parameters: {TOO_DEEP}") from None
        except ValueError:
            raise DataError(f"{where}: the parameters are not valid JSON") from None
    if not isinstance(params, (dict, type(None))):
        raise DataError(f"{where}: the parameters must be a JSON Schema object, got {type(params).__name__}")
    if "parameters" in fn:
        fn["parameters"] = params
    return {**tool, "function": fn}


def _as_served(tool: dict) -> dict:
    """A tool schema as vLLM (and deltatune serve) hands it to the chat template, pydantic's dump of its
    ChatCompletionToolsParam: the function's name, description and parameters first (one left out null), then its
    other keys; the tool's other keys after "type" and "function". A template that prints the schema (Qwen2.5's and
    Llama 3.1's tojson) then trains on the prompt a served request with the same tools gets."""
    fn = tool["function"]
    rest = {k: v for k, v in fn.items() if k not in ("name", "description", "parameters")}
    function = {"name": fn["name"], "description": fn.get("description"), "parameters": fn.get("parameters"), **rest}
    outer = {k: v for k, v in tool.items() if k not in ("type", "function")}
    return {"type": tool.get("type", "function"), "function": function, **outer}
