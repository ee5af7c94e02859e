"""Probe 10 of ``deltatune serve``: the non-stream answer gathers its choices in time linear in prompts x n, and
what vLLM's OpenAI server does that deltatune did otherwise (each test names vLLM's code it follows)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from test_serve_probe7 import _post

CHAT = [{"role": "user", "content": "the small dog sat"}]


class _Counted(str):
    """A finish reason that counts how often it is compared: the wait loop's scans of the finished choices."""

    compared = 0

    def __eq__(self, other):
        _Counted.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_the_non_stream_wait_is_linear_in_the_choices(served, monkeypatch):
    """The answer waited ``while None in finish``: every event scanned the choices finished so far, so 40 prompts x
    n 8 (320 choices, finishing in order) made 51,360 comparisons. Now the choices left are counted down: none.
    A fake engine answers each row at once, with a finish reason that counts its comparisons."""
    engine, server, _, _ = served

    def submit(r):
        r.output_ids = [7]
        r.emit("x", _Counted("length"))

    monkeypatch.setattr(engine, "submit", submit)
    _Counted.compared = 0
    prompts, n = [[5, 6, 7 + k] for k in range(40)], 8
    status, answer = _post(server, "/v1/completions", {"model": "lora", "prompt": prompts, "n": n, "max_tokens": 1})
    assert status == 200 and [c["text"] for c in answer["choices"]] == ["x"] * 320
    assert [c["finish_reason"] for c in answer["choices"]] == ["length"] * 320
    assert answer["usage"] == {"prompt_tokens": 120, "completion_tokens": 320, "total_tokens": 440}
    assert _Counted.compared <= len(prompts) * n  # was 51,360


def test_a_request_without_a_model_is_served_by_the_base_and_an_unknown_one_is_a_404_first(served):
    """vLLM's ``model`` is optional: left out (or null, or ""), the base model answers (``check_model`` passes an
    empty name); deltatune answered a 400. And vLLM checks the model before it renders the messages: an unknown
    model with messages the template cannot take was a 400 about the messages, not the 404."""
    body = {"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}
    status, want = _post(server := served[1], "/v1/completions", {**body, "model": "base"})
    for model in ({}, {"model": None}, {"model": ""}):
        status, answer = _post(server, "/v1/completions", {**body, **model})
        assert status == 200 and answer["model"] == "base", model
        assert answer["choices"] == want["choices"] and answer["usage"] == want["usage"]
    chat = {"messages": CHAT, "max_tokens": 2, "temperature": 0}
    status, answer = _post(server, "/v1/chat/completions", chat)
    assert status == 200 and answer["model"] == "base"
    status, answer = _post(server, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "wizard"}]})
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    status, answer = _post(server, "/v1/chat/completions", {"model": 5, "messages": CHAT})
    assert status == 400 and answer["error"]["param"] == "model"


def test_stream_options_given_include_usage_unless_it_says_false(served):
    """vLLM's StreamOptions defaults ``include_usage`` to true: ``{"continuous_usage_stats": true}`` alone puts the
    usage in every chunk and in a last one, ``{}`` in a last one (vLLM's ``should_include_usage``); deltatune
    gave none. ``include_usage`` false or null, or no ``stream_options``, still give none."""
    server = served[1]
    body = {"model": "lora", "prompt": "the cat", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    body["stream"] = True
    status, chunks = _post(server, "/v1/completions", {**body, "stream_options": {"continuous_usage_stats": True}})
    assert status == 200 and chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is not None for c in chunks) and chunks[-2]["usage"]["completion_tokens"] == 3
    status, chunks = _post(server, "/v1/completions", {**body, "stream_options": {}})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 3
    assert all(c["usage"] is None for c in chunks[:-1])
    for off in ({"stream_options": {"include_usage": False, "continuous_usage_stats": True}},
                {"stream_options": {"include_usage": None}}, {"stream_options": None}, {}):  # fmt: skip
        status, chunks = _post(server, "/v1/completions", {**body, **off})
        assert status == 200 and all(c["choices"] and "usage" not in c for c in chunks), off


def test_models_list_root_parent_and_max_model_len_as_vllm(served):
    """vLLM's model cards: the base's ``root`` is the model's path and ``max_model_len`` its context; a LoRA's
    ``root`` is its folder and ``parent`` the base's id (vLLM's ``show_available_models``). deltatune gave none of
    the three. An adapter loaded at run time is listed with its folder, and gone once unloaded."""
    engine, server, base, folders = served
    from urllib.request import urlopen

    with urlopen(server.url + "/v1/models", timeout=30) as answer:
        cards = {c["id"]: c for c in json.loads(answer.read())["data"]}
    context = engine.model.config.max_position_embeddings
    assert (cards["base"]["root"], cards["base"]["parent"], cards["base"]["max_model_len"]) == (base, None, context)
    for name, folder in folders.items():
        assert os.path.realpath(cards[name]["root"]) == os.path.realpath(folder) and cards[name]["parent"] == "base"
        assert cards[name]["max_model_len"] is None


def _post_text(server, path: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(
        server.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def test_vllm_runtime_lora_routes_load_and_unload(served, tmp_path):
    """vLLM's ``POST /v1/load_lora_adapter`` {lora_name, lora_path} and ``POST /v1/unload_lora_adapter``
    {lora_name} (behind VLLM_ALLOW_RUNTIME_LORA_UPDATING) were 404s. Now: plain-text success as vLLM answers it,
    a name loaded already a 400 and an unknown one a 404 (vLLM's ``_check_*_lora_adapter_request``), a missing
    field a 400; deltatune's --adapter-dir fence holds (a 403 outside it)."""
    engine, server, _, _ = served
    status, text = _post_text(server, "/v1/load_lora_adapter", {"lora_name": "lora3", "lora_path": "lora"})
    assert (status, text) == (200, "Success: LoRA adapter 'lora3' added successfully.")
    kw = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
    assert (
        _post(server, "/v1/completions", {**kw, "model": "lora3"})[1]["choices"]
        == _post(server, "/v1/completions", {**kw, "model": "lora"})[1]["choices"]
    )
    status, text = _post_text(server, "/v1/load_lora_adapter", {"lora_name": "lora3", "lora_path": "lora"})
    assert status == 400 and "has already been loaded" in json.loads(text)["error"]["message"]
    for body in (
        {"lora_name": "x"},
        {"lora_path": "lora"},
        {"lora_name": "x", "lora_path": "lora", "load_inplace": True},
    ):
        assert _post_text(server, "/v1/load_lora_adapter", body)[0] == 400, body
    status, text = _post_text(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)})
    assert status == 403 and "x" not in engine.adapters()
    status, text = _post_text(server, "/v1/unload_lora_adapter", {"lora_name": "lora3"})
    assert (status, text) == (200, "Success: LoRA adapter 'lora3' removed successfully.")
    assert "lora3" not in engine.adapters()
    status, text = _post_text(server, "/v1/unload_lora_adapter", {"lora_name": "lora3"})
    assert status == 404 and json.loads(text)["error"]["param"] == "lora_name"
    assert _post_text(server, "/v1/unload_lora_adapter", {})[0] == 400


def test_tools_under_tool_choice_none_reach_the_chat_template_as_vllm_renders_them(served, monkeypatch):
    """vLLM renders a request's ``tools`` into the prompt under ``tool_choice: "none"`` (each tool as pydantic dumps
    its ChatCompletionToolsParam, a left-out description or parameters null) and answers plain text; deltatune
    refused tools. A ``tool_choice`` other than "none" without tools is vLLM's 400 naming it (deltatune passed
    "auto"); tools under "auto" (the default with tools), "required" or a named tool stay a 400 (vLLM's answer
    without --enable-auto-tool-choice; guided decoding). Checked on Qwen2.5's template, which prints each tool."""
    from tiny import trl_template

    engine, server, _, _ = served
    tok = engine.tokenizer
    monkeypatch.setattr(tok, "chat_template", trl_template("qwen2_5"))
    seen = []
    monkeypatch.setattr(engine, "submit", lambda r: (seen.append(r.prompt_ids), r.emit("ok", "stop")))
    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    tools = [{"type": "function", "function": weather}, {"function": {"name": "now", "description": "the time"}}]
    body = {"model": "lora", "messages": CHAT, "max_tokens": 2, "tools": tools, "tool_choice": "none"}
    status, answer = _post(server, "/v1/chat/completions", body)
    assert status == 200 and answer["choices"][0]["message"]["content"] == "ok"
    dumped = [  # vLLM's tool.model_dump()
        {
            "type": "function",
            "function": {"name": "get_weather", "description": None, "parameters": weather["parameters"]},
        },
        {"type": "function", "function": {"name": "now", "description": "the time", "parameters": None}},
    ]
    text = tok.apply_chat_template(CHAT, tools=dumped, add_generation_prompt=True, tokenize=False)
    assert '"description": null' in text and seen == [tok(text, add_special_tokens=False)["input_ids"]]
    refused = {
        "auto without tools": ({"tool_choice": "auto", "tools": None}, "tool_choice", "invalid_request"),
        "required without tools": ({"tool_choice": "required", "tools": None}, "tool_choice", "invalid_request"),
        "tools under the default auto": ({"tool_choice": "<left out>"}, "tool_choice", "unsupported"),
        "auto with an empty tools": ({"tool_choice": "auto", "tools": []}, "tools", "invalid_request"),
        "tools under required": ({"tool_choice": "required"}, "tool_choice", "unsupported"),
        "a tool without a name": ({"tools": [{"function": {"description": "x"}}]}, "tools", "invalid_request"),
    }
    for what, (change, param, code) in refused.items():
        sent = {k: v for k, v in {**body, **change}.items() if v != "<left out>"}
        status, answer = _post(server, "/v1/chat/completions", sent)
        assert status == 400 and (answer["error"]["param"], answer["error"]["code"]) == (param, code), what
        if what == "auto with an empty tools":  # not "must be set": they were, as an empty list
            assert "`tools` must not be an empty array" in answer["error"]["message"]
    assert len(seen) == 1
    # vLLM defaults tool_choice to "auto" only where the key is left out: an explicit null is no choice, and the
    # tools are rendered as under "none" (review 10b)
    status, answer = _post(server, "/v1/chat/completions", {**body, "tool_choice": None})
    assert status == 200 and seen[1] == seen[0]


def test_a_json_response_format_is_refused_naming_the_format(served):
    """vLLM serves ``response_format`` json_object and json_schema by guided decoding, which deltatune does not do:
    the 400 said "response_format is not supported; leave it out", as if the field itself were unknown. It now
    names the format refused and what passes ("text", which the existing tests already let through)."""
    server = served[1]
    for kind in ("json_object", "json_schema"):
        body = {"model": "lora", "messages": CHAT, "max_tokens": 1, "response_format": {"type": kind}}
        status, answer = _post(server, "/v1/chat/completions", body)
        assert status == 400 and answer["error"]["code"] == "unsupported"
        assert f"response_format '{kind}'" in answer["error"]["message"] and '"text"' in answer["error"]["message"]
    body["response_format"] = {"type": "text"}
    assert _post(server, "/v1/chat/completions", body)[0] == 200


def test_without_a_generation_prompt_the_answer_takes_the_last_messages_role(served):
    """vLLM's ``get_chat_request_role``: with ``add_generation_prompt: false`` the model goes on in the last
    message's turn, and the answer's (and the stream's first delta's) role is that message's; deltatune always said
    "assistant". With the generation prompt (the default) it stays "assistant"."""
    server = served[1]
    body = {"model": "lora", "messages": CHAT, "max_tokens": 2, "temperature": 0}
    for extra, role in (({}, "assistant"), ({"add_generation_prompt": False}, "user")):
        status, answer = _post(server, "/v1/chat/completions", {**body, **extra})
        assert status == 200 and answer["choices"][0]["message"]["role"] == role, extra
        status, chunks = _post(server, "/v1/chat/completions", {**body, **extra, "stream": True})
        assert chunks[0]["choices"][0]["delta"] == {"role": role, "content": ""}, extra
    prefill = [*CHAT, {"role": "assistant", "content": "it"}]
    extra = {"messages": prefill, "add_generation_prompt": False, "continue_final_message": True}
    assert _post(server, "/v1/chat/completions", {**body, **extra})[1]["choices"][0]["message"]["role"] == "assistant"


def test_vllm_load_route_checks_the_name_first_and_names_its_own_fields(served, tmp_path):
    """vLLM's load route answers a name loaded already with its 400 before it looks at the path (deltatune checked
    the --adapter-dir fence first: a 403), and its errors name the route's field ``lora_path``, not ``path``; an
    unusable ``continuous_usage_stats`` is a 400 even when ``include_usage`` is false (vLLM's request model checks
    it; it was read only with usage on). Review 10b."""
    engine, server, _, _ = served
    status, text = _post_text(server, "/v1/load_lora_adapter", {"lora_name": "lora", "lora_path": str(tmp_path)})
    assert status == 400 and "has already been loaded" in json.loads(text)["error"]["message"]
    status, text = _post_text(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)})
    error = json.loads(text)["error"]
    assert status == 403 and error["param"] == "lora_path" and error["message"].startswith("lora_path ")
    assert "x" not in engine.adapters()
    body = {"model": "lora", "prompt": "the cat", "max_tokens": 2, "stream": True}
    body["stream_options"] = {"include_usage": False, "continuous_usage_stats": "junk"}
    status, answer = _post(server, "/v1/completions", body)
    assert status == 400 and answer["error"]["param"] == "stream_options.continuous_usage_stats"
