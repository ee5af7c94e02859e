"""The OpenAI-compatible HTTP API over an ``Engine`` (FastAPI on uvicorn).

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` answers with
server-sent events as the OpenAI clients expect), vLLM's ``POST /tokenize`` and ``/detokenize``, ``POST /v1/adapters`` and ``DELETE /v1/adapters/{name}`` (load and
unload at run time, from inside ``adapter_dir`` only; vLLM's ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` too), and ``GET /health`` (rows running and waiting). Errors are
OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for a bad request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import time
import uuid
from typing import Any

from fastapi import Request as HttpRequest  # at module level: FastAPI reads the routes' annotations by name

from .engine import BASE, UNLOADED, Engine, Request, RequestError, shown
from .fields import Limits, _asks_nothing, bad_words_ids, choices_of, flag, lax_ids, lax_numbers, to_request
from .guard import refusal
from .logprob_names import logprobs_json, prompt_logprobs_json
from .prompts import _chat_ids, _prompt_ids, _rendering, _utf8, part_text
from .sampling import default_temperature

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# OpenAI's: a wrong key (401) and an unknown model (404) are an invalid_request_error too, told apart by their code.
_TYPES = {403: "permission_error"}
# The fields vLLM's answers (ChatCompletionResponse, CompletionResponse, ChatMessage: model_dump, defaults kept) carry
# as null or empty where this server computes nothing for them: a client reading them finds them, as from vLLM
# (vllm-project/vllm d5dba2d7, the protocol serve mirrors: ChatMessage's ``reasoning``, not the older
# ``reasoning_content``).
_NO_ANSWER = {"service_tier": None, "system_fingerprint": None, "kv_transfer_params": None}


def _no_message() -> dict:
    """A chat message's fields vLLM's ChatMessage dumps as null, and its ``tool_calls`` [] (a new list per answer,
    as its default_factory builds one)."""
    return {"refusal": None, "annotations": None, "audio": None, "function_call": None, "tool_calls": [],
            "reasoning": None}  # fmt: skip


def _error(status: int, message: str, code: str, param: str | None = None):
    from fastapi.responses import JSONResponse

    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status
    )


def model_vocab(config, tokenizer) -> int:
    """The logits' width (logit_bias's ids; with the tokenizer's length, the prompt ids' bound, as vLLM's
    get_vocab_size): the text config's vocab_size (a vision-language config holds none of its own), else the
    tokenizer's length."""
    text = getattr(config, "get_text_config", lambda: config)()
    return int(getattr(text, "vocab_size", None) or len(tokenizer))


def create_app(
    engine: Engine,
    adapter_dir: str | None = None,
    api_key: str | None = None,
    max_tokens: int = 1024,
) -> Any:
    """The FastAPI application serving ``engine``.

    Args:
        engine: the engine holding the model and its adapters.
        adapter_dir: the folder runtime loads may read from (None: runtime loading refused).
        api_key: when set, every ``/v1`` route needs ``Authorization: Bearer <api_key>``.
        max_tokens: the largest ``max_tokens`` a request may ask for.
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    from ..targets import context_length

    app = FastAPI(title="deltatune serve", docs_url=None, redoc_url=None)
    config = engine.model.config
    context = context_length(config) or 2048
    limits = Limits(max_tokens, int(context), vocab=model_vocab(config, engine.tokenizer))
    app.state.engine = engine

    @app.middleware("http")
    async def _auth(request: HttpRequest, call_next):
        refused = refusal(request.headers, api_key)
        if refused:
            return _error(403, refused, "cross_site_request")
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                message = "missing API key" if not given else "wrong API key"
                return _error(401, f"{message}: send the header 'Authorization: Bearer <key>'", "invalid_api_key")
        return await call_next(request)

    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def _http_error(_: HttpRequest, exc: HTTPException):  # unknown routes, wrong methods: OpenAI's shape too
        return _error(exc.status_code, f"{exc.detail}", "not_found" if exc.status_code == 404 else "bad_request")

    @app.exception_handler(RequestError)
    async def _request_error(_: HttpRequest, exc: RequestError):
        return _error(exc.status, str(exc), exc.code, exc.param)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "running": engine.running,
            "waiting": engine.pending.qsize(),
            "batches": engine.batches,
            "cancelled": engine.cancelled,
        }

    base_path = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None

    @app.get("/v1/models")
    async def models() -> dict:
        """vLLM's model cards: the base's ``root`` is its path and ``max_model_len`` its context; an adapter's
        ``root`` is its folder and ``parent`` the base (``max_model_len`` null, as vLLM's LoRA cards); ``method``
        is deltatune's own."""
        data = []
        for name in engine.adapters():
            base = name == BASE
            card = {"id": name, "object": "model", "created": 0, "owned_by": "deltatune"}
            card.update(root=base_path if base else engine.paths.get(name), parent=None if base else BASE)
            card.update(max_model_len=int(context) if base else None)
            data.append({**card, "method": "base" if base else engine.model.peft_config[name].method})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        body = lax_numbers(await _body(http), chat=True)  # vLLM's pydantic reading
        model = _served(body)  # a 404 before the messages are read, as vLLM checks the model first
        template = engine.templates.get(model)  # the run's data.template
        rendering = _rendering(body, template)
        prompt_ids = _chat_ids(engine.tokenizer, body.get("messages"), template, rendering)
        # vLLM's get_chat_request_role: without a generation prompt, the answer goes on in the last message's role
        role = "assistant" if rendering["add_generation_prompt"] else body["messages"][-1]["role"]
        echo = [_echoed(body["messages"][-1], role)] if flag(body, "echo") else None
        end = engine.turn_end() if template is None else None  # the tokenizer's template framed the prompt
        ends = frozenset() if end is None else frozenset({end})
        return await _complete(http, body, [prompt_ids], chat=True, echo=echo, role=role, ends=ends)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = lax_numbers(await _body(http), chat=False)
        _served(body)
        special = flag(body, "add_special_tokens") if body.get("add_special_tokens") is not None else True
        prompts = body.get("prompt")  # one, or a batch: a list of strings or of token id lists
        batch = isinstance(prompts, list) and prompts and all(isinstance(p, (str, list)) for p in prompts)
        prompts = prompts if batch else [prompts]
        ids = [_prompt_ids(engine.tokenizer, p, special, limits.vocab) for p in prompts]
        echo = None
        if flag(body, "echo"):  # the prompt as given, or its token ids decoded (as vLLM echoes them)
            echo = [p if isinstance(p, str) else engine.tokenizer.decode(i) for p, i in zip(prompts, ids)]
            if flag(body, "return_token_ids"):  # vLLM's: the prompt comes back as prompt_token_ids alone
                echo = ["" for _ in echo]
        return await _complete(http, body, ids, chat=False, echo=echo)

    # vLLM's tokenizer routes (outside /v1, as vLLM's): a served model's prompt as its requests would tokenize it
    @app.post("/tokenize")
    async def tokenize(http: HttpRequest):
        """vLLM's: a completion's ``prompt`` (``add_special_tokens`` default true) or a chat's ``messages`` (rendered
        as a chat request is, vLLM's rendering fields included; ``tools`` rendered as under tool_choice "none") into
        ``{count, max_model_len, tokens, token_strs}``; ``token_strs`` the tokens' pieces with ``return_token_strs``,
        else null."""
        body = await _body(http)
        model = _served(body)
        if "messages" in body:
            if not _asks_nothing(body.get("chat_template"), None):  # as a chat request answers it (was ignored)
                raise RequestError(
                    "chat_template is not supported by this server; leave it out", code="unsupported",
                    param="chat_template",
                )  # fmt: skip
            template = engine.templates.get(model)
            # vLLM's TokenizeChatRequest has tools and no tool_choice: the tools are rendered (tool_choice "none")
            rendering = _rendering({**body, "tool_choice": "none"}, template)
            ids = _chat_ids(engine.tokenizer, body.get("messages"), template, rendering)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):  # vLLM's TokenizeCompletionRequest: a string ("" too)
                raise RequestError(f"prompt must be a string (or send messages), got {shown(prompt)}", param="prompt")
            _utf8(prompt, "prompt", "prompt")
            special = flag(body, "add_special_tokens") if body.get("add_special_tokens") is not None else True
            ids = list(engine.tokenizer(prompt, add_special_tokens=special)["input_ids"])
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if flag(body, "return_token_strs") else None
        return {"count": len(ids), "max_model_len": int(context), "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(http: HttpRequest):
        """vLLM's: ``tokens`` (ids in the vocabulary) decoded, special tokens kept: ``{prompt}``."""
        body = await _body(http)
        _served(body)
        tokens = lax_ids(body.get("tokens"))  # vLLM's list[int]: ["5", "6"] and [5.0] are [5, 6] and [5]
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise RequestError(f"tokens must be a list of token ids, got {shown(tokens)}", param="tokens")
        if any(not 0 <= t < len(engine.tokenizer) for t in tokens):
            raise RequestError(f"tokens must lie in [0, {len(engine.tokenizer)})", param="tokens")
        return {"prompt": engine.tokenizer.decode(tokens)}

    async def _load(name: Any, path: Any, keys: tuple[str, str] = ("name", "path")) -> None:
        """Load adapter ``name`` from ``path`` (inside ``adapter_dir``); ``keys`` name the body's two fields. A
        failed load is a 400 ``adapter_load_failed``; its ``missing`` is true where the folder has no
        ``adapter_config.json`` (vLLM's route answers that alone a 404)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RequestError(f"{keys[0]} must be 1-64 letters, digits, '-' or '_', got {shown(name)}", param=keys[0])
        if not isinstance(path, str) or not path:
            raise RequestError(f"{keys[1]} must be a folder inside the server's --adapter-dir", param=keys[1])
        folder = _inside(adapter_dir, path, keys[1])
        from fastapi.concurrency import run_in_threadpool

        try:
            await run_in_threadpool(engine.load_adapter, name, folder)
        except RequestError:
            raise
        except (OSError, ValueError, TypeError) as exc:  # FileNotFoundError, AdapterLoadError, ConfigError
            # the reason with the folder (and the path as sent) cut as the path is: a 4,000-character one came back whole
            reason = str(exc).replace(folder, _cut(folder)).replace(path, _cut(path))
            error = RequestError(
                f"adapter {shown(name)} could not be loaded from {shown(path)}: {reason}", 400, "adapter_load_failed"
            )
            # vLLM's 404 is its FileNotFoundError alone: PEFTHelper.from_local_dir finding no adapter_config.json; a
            # config without weights is its ValueError "<dir> doesn't contain tensors", a 400
            # (a file, not a folder: vLLM's read of <file>/adapter_config.json is NotADirectoryError, its 400)
            error.missing = not os.path.isfile(folder) and not os.path.isfile(
                os.path.join(folder, "adapter_config.json")
            )
            raise error from None

    @app.post("/v1/adapters")
    async def load(http: HttpRequest):
        body = await _body(http)
        await _load(body.get("name"), body.get("path"))
        name = body["name"]
        return {"id": name, "object": "model", "method": engine.model.peft_config[name].method}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        from fastapi.concurrency import run_in_threadpool

        await run_in_threadpool(engine.unload_adapter, name)
        return {"id": name, "object": "model", "deleted": True}

    # vLLM's runtime LoRA routes (its VLLM_ALLOW_RUNTIME_LORA_UPDATING; here --adapter-dir): any method's adapter,
    # a plain-text answer, a name served already a 400 and an unknown one a 404, as vLLM answers them.
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(http: HttpRequest):
        body = await _body(http)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            raise RequestError("Both 'lora_name' and 'lora_path' must be provided.", param="lora_name")
        if flag(body, "load_inplace"):
            raise RequestError("load_inplace is not supported by this server; unload the adapter first",
                               code="unsupported", param="load_inplace")  # fmt: skip
        if name in engine.adapters():  # vLLM checks the name before the path
            raise RequestError(
                f"The lora adapter '{name}' has already been loaded.", 400, "adapter_exists", "lora_name"
            )
        try:
            await _load(name, path, ("lora_name", "lora_path"))
        except RequestError as exc:
            if exc.code == "adapter_exists":  # vLLM's 400 (deltatune's own route answers 409)
                raise RequestError(
                    f"The lora adapter '{name}' has already been loaded.", 400, exc.code, "lora_name"
                ) from None
            if getattr(exc, "missing", False):  # vLLM's 404 NotFoundError, its words with the raw values
                raise RequestError(
                    f"Loading lora {name} failed: No adapter found for {_cut(path)}", 404, "adapter_not_found",
                    "lora_path",
                ) from None  # fmt: skip
            raise
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(http: HttpRequest):
        name = (await _body(http)).get("lora_name")
        if not isinstance(name, str) or not name:
            raise RequestError("'lora_name' needs to be provided to unload a LoRA adapter.", param="lora_name")
        from fastapi.concurrency import run_in_threadpool

        try:
            await run_in_threadpool(engine.unload_adapter, name)
        except RequestError as exc:  # vLLM's words for a name not served (the base's too: no LoRA of that name)
            gone = f"The lora adapter '{_cut(name)}' cannot be found." if exc.code == "model_not_found" else str(exc)
            raise RequestError(gone, exc.status, exc.code, "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    def _served(body: dict) -> str:
        """The served model a request names; left out (null or ""), the base, as vLLM serves it."""
        model = body.get("model")
        if model is None or model == "":
            return BASE
        if not isinstance(model, str):
            raise RequestError("model must name a served model (GET /v1/models lists them)", param="model")
        if model not in engine.adapters():
            known = ", ".join(engine.adapters())
            raise RequestError(
                f"model {shown(model)} is not served; served models: {known}", 404, "model_not_found", "model"
            )
        return model

    async def _complete(
        http: HttpRequest,
        body: dict,
        prompts: list[list[int]],
        chat: bool,
        echo: list | None = None,
        role: str = "",
        ends: frozenset[int] = frozenset(),
    ):
        model = _served(body)
        # A token adapter's virtual tokens take room in the context too.
        virtual = 0 if model == BASE else getattr(engine.model.peft_config[model], "num_virtual_tokens", 0) or 0
        default = getattr(engine.gen, "max_new_tokens", None)  # the config's, for a request that sets none
        default = default if isinstance(default, int) and default > 0 else None
        # n choices per prompt: n rows, a seeded one's i-th drawn with seed + i (as vLLM's); choice p * n + i
        n, room = choices_of(body), Limits(limits.max_tokens, limits.context - virtual, default, limits.vocab)
        requests = [to_request(body, ids, room, model, chat) for ids in prompts for _ in range(n)]
        if requests and requests[0].temperature is None:  # the generation config's, checked as a request's is
            try:
                unset = default_temperature(engine.gen)
            except ValueError as exc:  # a config temperature past 2: a 400 naming it, as vLLM refuses it
                raise RequestError(str(exc), param="temperature") from None
            for r in requests:
                r.temperature = unset
        banned = bad_words_ids(engine.tokenizer, body)
        for r in requests:
            r.bad_words_ids, r.end_ids = banned, ends
        first = requests[0] if requests else None
        if first is not None and first.allowed_token_ids:
            _first_token_possible(first, banned, engine.eos_of(model) | ends)
        echoes = [None if echo is None else echo[k // n] for k in range(len(requests))]
        stream = flag(body, "stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise RequestError(f"stream_options must be an object, got {shown(options)}", param="stream_options")
        if options and not stream:  # as OpenAI's API answers
            raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
        # vLLM's StreamOptions: include_usage left out of a given object is true (null: false)
        include_usage = options is not None and (
            "include_usage" not in options or flag(options, "include_usage", "stream_options.include_usage")
        )
        options = options or {}
        # vLLM's: with include_usage, every chunk counts its choice's tokens so far
        every = flag(options, "continuous_usage_stats", "stream_options.continuous_usage_stats") and include_usage
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, str, str | None, int, int]] = asyncio.Queue()
        ids = flag(body, "return_token_ids")  # vLLM's: the prompt's and each choice's token ids with the text
        for i, r in enumerate(requests):
            if r.seed is not None:  # at most 2**63 - 1 + 127: within torch's generators' [-2**63, 2**64)
                r.seed += i % n
            r.prompt_logprobs = echo is not None and r.logprobs is not None and not chat  # a chat echoes text alone
            if chat and i:  # a chat's prompt_logprobs come once, from its first row: the others' would be dropped
                r.prompt_top = None
            # The engine thread appends to logprob_rows and output_ids: each event says how many go with its text.
            put = lambda text, finish, i=i, r=r: (i, text, finish, len(r.logprob_rows), len(r.output_ids))  # noqa: E731
            r.emit = lambda text, finish, put=put: loop.call_soon_threadsafe(events.put_nowait, put(text, finish))
            engine.submit(r)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "created": int(time.time()), "model": model}
        if stream:
            usage = 2 if every else int(include_usage)
            out = _stream(requests, n, events, head, chat, usage, echoes, engine.tokenizer, role, ids)
            return StreamingResponse(out, media_type="text/event-stream")
        # Pieces joined at the end; the choices left counted down, not searched for (a scan of every choice per
        # event was quadratic in prompts x n).
        pieces, finish, counts = [[e or ""] for e in echoes], [None] * len(requests), [0] * len(requests)
        left = len(requests)
        try:
            while left:
                try:
                    i, piece, reason, counts[i], _ = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return JSONResponse({}, status_code=499)  # the finally cancels every row
                    continue
                pieces[i].append(piece)
                if reason is None:
                    continue
                left -= finish[i] is None
                finish[i] = reason
                failed = reason if reason.startswith("error") else None
                if failed and failed.endswith(UNLOADED):
                    return _error(404, failed.removeprefix("error: "), "model_not_found", "model")
                if failed:
                    return _error(500, failed, "generation_failed")
        finally:
            for r in requests:
                r.cancelled.set()  # a finished row is gone already
        choices, texts = [], ["".join(p) for p in pieces]
        for i, r in enumerate(requests):
            logprobs = (
                None
                if r.logprobs is None
                else logprobs_json(engine.tokenizer, r.logprob_rows[: counts[i]], chat, as_ids=r.token_ids_as_names)
            )
            choices.append(
                {"index": i, "finish_reason": finish[i], "stop_reason": r.stop_reason, "logprobs": logprobs}
            )
            choices[-1].update({"message": {"role": role, "content": texts[i], **_no_message()}} if chat else
                               {"text": texts[i], "prompt_logprobs": None, "prompt_token_ids": None})  # fmt: skip
            # vLLM's return_token_ids: a completion's prompt per choice, a chat's once at the top (else null)
            choices[-1]["token_ids"] = list(r.output_ids) if ids else None
            if ids and not chat:
                choices[-1]["prompt_token_ids"] = r.prompt_ids
            if r.prompt_top is not None and not chat:  # vLLM's, per choice of a completion
                choices[-1]["prompt_logprobs"] = prompt_logprobs_json(engine.tokenizer, r.prompt_rows)
        kind = "chat.completion" if chat else "text_completion"
        answer = {**head, "object": kind, "choices": choices, **_NO_ANSWER, "usage": _usage(requests, n)}
        if chat:
            answer.update(prompt_logprobs=None, prompt_token_ids=requests[0].prompt_ids if ids else None)
        if chat and requests[0].prompt_top is not None:  # vLLM's, once for a chat's one prompt
            answer["prompt_logprobs"] = prompt_logprobs_json(engine.tokenizer, requests[0].prompt_rows)
        return answer

    return app


async def _stream(
    requests: list[Request],
    n: int,
    events,
    head,
    chat: bool,
    include_usage: int,
    echoes,
    tokenizer,
    role: str = "",
    ids: bool = False,
):
    """Server-sent events: one chunk per piece of text of a choice (the echoed prompt first), with its tokens'
    log-probabilities where asked, a last chunk per choice with its finish reason, then ``[DONE]``. Usage:
    ``include_usage`` 1 in a last chunk, 2 in every chunk too (the choice's tokens up to that chunk: 0 in a chat's
    role and echo chunks). ``ids`` (vLLM's
    return_token_ids): each chunk's new token ids, the prompt's in a choice's first chunk (a chat's: at the top).

    When the client goes away the generator is closed; the ``finally`` cancels the requests, and the engine drops
    their rows at the next step, freeing the slots.
    """
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    done, offset, states = [0] * len(requests), [0] * len(requests), [{} for _ in requests]
    sent = [-1] * len(requests)  # the choice's token ids sent so far (-1: no chunk yet)

    def chunk(
        i: int, text: str | None, finish: str | None, first: bool = False, n: int = 0, t: int = 0, echo: bool = False
    ) -> str:
        logprobs = None
        if requests[i].logprobs is not None and n > done[i]:
            rows, as_ids = requests[i].logprob_rows[done[i] : n], requests[i].token_ids_as_names
            logprobs = logprobs_json(tokenizer, rows, chat, offset[i], states[i], as_ids)
            offset[i] += sum(len(t) for t in logprobs.get("tokens", []))
            done[i] = n
        if chat:
            delta: dict[str, Any] = {"role": role, "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        choice["stop_reason"] = requests[i].stop_reason if finish is not None else None  # vLLM's, in every chunk
        data = {**head, "choices": [choice]}
        if ids and sent[i] < 0:
            (data if chat else choice)["prompt_token_ids"] = requests[i].prompt_ids
        if ids and not first and not echo:  # vLLM's chat echo chunk and role chunk carry no token_ids
            choice["token_ids"] = requests[i].output_ids[max(sent[i], 0) : t]
        sent[i] = max(sent[i], t)
        if include_usage == 2:  # the choice's tokens up to this chunk (the engine may be further on), as vLLM's
            p = len(requests[i].prompt_ids)
            data["usage"] = {"prompt_tokens": p, "completion_tokens": t, "total_tokens": p + t}
        elif include_usage:
            data["usage"] = None
        return f"data: {json.dumps(data)}\n\n"

    left = len(requests)
    try:
        for i in range(len(requests) if chat else 0):
            yield chunk(i, None, None, first=True)
        for i in range(len(requests) if chat else 0):  # vLLM's: a chat's echo in a chunk of its own, after the roles
            if echoes[i]:
                yield chunk(i, echoes[i], None, echo=True)
            echoes[i] = None
        while left:
            i, piece, finish, count, tokens = await events.get()
            if finish is not None and finish.startswith("error"):
                error = {"message": finish, "type": "server_error", "param": None, "code": "generation_failed"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            piece, echoes[i] = (echoes[i] or "") + piece, None
            left -= finish is not None
            if piece or finish is not None:
                yield chunk(i, piece, finish, n=count, t=tokens)
        else:  # every choice finished (after an error, vLLM's stream sends no usage either)
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(requests, n)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for r in requests:
            r.cancelled.set()  # a finished row is gone already


def _first_token_possible(r: Request, banned: list[list[int]], eos: set[int]) -> None:
    """A 400 naming allowed_token_ids where the settings mask every allowed token at the first step: one-token
    bad_words, and under min_tokens the stop tokens (EOS even under ignore_eos, and stop_token_ids: vLLM's
    all_stop_token_ids). Sampling over nothing was a 500."""
    allowed = set(r.allowed_token_ids or ())
    words = {w[0] for w in banned if len(w) == 1}
    stops = (set(r.stop_token_ids or ()) | eos) if r.min_tokens else set()
    if not allowed - words - stops:
        why = [*(["one-token bad_words"] if allowed & words else []), *(["stop tokens (EOS or stop_token_ids), which "
               f"min_tokens {r.min_tokens} masks"] if allowed & stops else [])]  # fmt: skip
        raise RequestError(
            f"allowed_token_ids are all {' or '.join(why)}, so no token could be generated", param="allowed_token_ids"
        )


def _echoed(last: dict, role: str) -> str:
    """vLLM's chat ``echo``: the last message's text (its text parts joined as the prompt joins them), where its role
    is the answer's (an assistant message answered by the assistant, say), else nothing."""
    content = last.get("content")
    if last["role"] != role or content is None:
        return ""
    return content if isinstance(content, str) else part_text(content, -1)


def _usage(requests: list[Request], n: int) -> dict[str, int]:
    """Each prompt counted once, every choice's tokens (as OpenAI and vLLM count ``n`` choices per prompt)."""
    prompt, completion = sum(len(r.prompt_ids) for r in requests[::n]), sum(len(r.output_ids) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _body(http: HttpRequest) -> dict:
    try:
        body = json.loads(await http.body())
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested past Python's stack, 5,000 digits
        why = "nested too deep" if isinstance(exc, RecursionError) else exc
        raise RequestError(f"the request body is not valid JSON: {why}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    return body


def _cut(text: str) -> str:
    """A value vLLM's words quote raw (no repr), cut as ``shown`` cuts a long one."""
    return text if len(text) <= 50 else f"{text[:25]}...{text[-24:]}"


def _inside(adapter_dir: str | None, path: str, param: str = "path") -> str:
    """``path`` (relative to ``adapter_dir``, or absolute) resolved, if it lies inside ``adapter_dir``; ``param``
    names the body's field in the errors."""
    if not adapter_dir:
        raise RequestError(
            "loading adapters at run time is off; start the server with --adapter-dir",
            403,
            "adapter_dir_unset",
            param,
        )
    root = os.path.realpath(adapter_dir)
    try:
        folder = os.path.realpath(os.path.join(root, path))
    except ValueError:  # an embedded NUL byte: a 500 without the error's JSON
        raise RequestError(f"{param} holds a NUL byte", param=param) from None
    if os.path.commonpath([root, folder]) != root:
        raise RequestError(
            f"{param} {shown(path)} lies outside the server's --adapter-dir", 403, "path_outside_adapter_dir", param
        )
    return folder
