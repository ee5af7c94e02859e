"""Probe 16 of ``deltatune serve`` against vLLM's OpenAI server: a seed past int64 (vLLM's field: a 400; served
here), a huge value quoted whole in a 400 (pydantic cuts its input_value), the fields vLLM's answers carry as null
(left out here), vLLM's runtime LoRA routes' 404s (a missing adapter folder was a 400; an unknown name's words), and
greedy answers under vLLM's penalties with their log-probabilities against a hand loop over the transformers model.
Through the app in process (test_serve_probe11's ASGI helper), on a tiny llama with MiniLM's tokenizer."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("fastapi")

from test_serve_probe11 import _call  # noqa: E402
from tiny import tokenizer  # noqa: E402

import deltatune as dt  # noqa: E402

KEEP = [1000, 1001, 1002, 1003, 1996, 2003]  # the tokens the model favours, so answers repeat and penalties matter


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.model import DeltaModel
    from deltatune.serve.app import create_app
    from deltatune.serve.engine import Engine

    tok = tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
                         eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        w, keep = model.lm_head.weight, torch.zeros(len(tok), dtype=torch.bool)
        keep[KEEP] = True
        w[~keep] *= 0.01
        w[keep] *= 3
    root = tmp_path_factory.mktemp("adapters")
    lora = dt.LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    dt.get_delta_model(copy.deepcopy(model), lora).save_pretrained(os.path.join(root, "a"))
    reference = copy.deepcopy(model)
    engine = Engine(DeltaModel(model, fused_loss=False), tok, max_wait_s=0.001)
    app = create_app(engine, adapter_dir=str(root), max_tokens=64)
    app.state.root = str(root)  # the adapter dir, for the tests that write folders in it
    yield engine, app, reference, tok
    engine.close()


def _text(app, path: str, body: dict):
    """POST for a plain-text answer (vLLM's LoRA routes): (status, text or the error JSON)."""
    import json

    try:
        return _call(app, path, body)
    except json.JSONDecodeError as exc:
        return 200, exc.doc


def test_a_seed_past_int64_is_a_400_as_vllms_field(served):
    """vLLM's seed is Field(ge=-2**63, le=2**63 - 1): 2**63 was served here (up to 2**64 - 1)."""
    from pydantic import BaseModel, Field, ValidationError

    class Seed(BaseModel):  # vLLM's ChatCompletionRequest / CompletionRequest seed
        seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)

    _, app, _, _ = served
    body = {"prompt": "hello", "max_tokens": 1, "temperature": 1}
    for seed in (2**63, 2**64 - 1, -(2**63) - 1):
        with pytest.raises(ValidationError):
            Seed(seed=seed)
        status, answer = _call(app, "/v1/completions", {**body, "seed": seed})
        assert status == 400 and answer["error"]["param"] == "seed", seed
    for seed in (2**63 - 1, -(2**63)):  # the ends vLLM takes; n=2 draws the second with seed + 1, as vLLM
        assert Seed(seed=seed).seed == seed
        assert _call(app, "/v1/completions", {**body, "seed": seed, "n": 2})[0] == 200


def test_a_huge_value_is_cut_in_the_error_as_pydantic_cuts_it(served):
    """A 5,000-character max_tokens came back whole in the 400 (vLLM's pydantic error shows 25 + ... + 24)."""
    from pydantic import BaseModel, ValidationError

    class MaxTokens(BaseModel):
        max_tokens: int | None = None

    _, app, _, _ = served
    huge = "x" * 5000
    with pytest.raises(ValidationError) as caught:
        MaxTokens(max_tokens=huge)
    cut = str(caught.value).split("input_value=")[1].split(", input_type")[0]
    status, answer = _call(app, "/v1/completions", {"prompt": "hi", "max_tokens": huge})
    assert status == 400 and cut in answer["error"]["message"] and len(answer["error"]["message"]) < 120
    for body, param in [
        ({"prompt": "hi", "max_tokens": int("9" * 4300)}, "max_tokens"),  # an int JSON reads, past --max-tokens
        ({"prompt": "hi", "model": "m" * 5000}, "model"),
        ({"prompt": "hi", "logit_bias": {"k" * 5000: 1}}, "logit_bias"),
        ({"prompt": "hi", "stop_token_ids": [1] * 3000 + ["x"]}, "stop_token_ids"),
        ({"messages": [{"role": "r" * 5000, "content": "hi"}]}, "messages"),
    ]:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, answer = _call(app, path, body)
        assert status in (400, 404) and answer["error"]["param"] == param, body.keys()
        assert len(answer["error"]["message"]) < 300, answer["error"]["message"][:100]
    status, answer = _call(app, "/v1/unload_lora_adapter", {"lora_name": "n" * 5000})
    assert status == 404 and len(answer["error"]["message"]) < 120


def test_answers_carry_the_fields_vllm_sends_as_null(served):
    """vLLM's non-stream answers are its response models' model_dump (protocol.py): every field there, null or []
    where nothing is computed; they were left out here."""
    _, app, _, _ = served
    status, chat = _call(
        app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )
    assert status == 200
    # ChatCompletionResponse, ChatCompletionResponseChoice, ChatMessage
    assert {"service_tier", "system_fingerprint", "prompt_logprobs", "kv_transfer_params", "prompt_token_ids"} <= set(
        chat
    )
    assert all(chat[k] is None for k in ("service_tier", "system_fingerprint", "prompt_logprobs", "prompt_token_ids"))
    choice = chat["choices"][0]
    assert choice["token_ids"] is None and choice["logprobs"] is None and choice["stop_reason"] is None
    message = choice["message"]
    assert message["tool_calls"] == [] and message["role"] == "assistant" and isinstance(message["content"], str)
    assert all(message[k] is None for k in ("refusal", "annotations", "audio", "function_call", "reasoning"))
    status, completion = _call(app, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200 and all(
        completion[k] is None for k in ("service_tier", "system_fingerprint", "kv_transfer_params")
    )
    choice = completion["choices"][0]
    assert all(
        choice[k] is None for k in ("logprobs", "prompt_logprobs", "prompt_token_ids", "token_ids", "stop_reason")
    )
    status, asked = _call(app, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "return_token_ids": True})
    assert len(asked["choices"][0]["token_ids"]) == 2 and asked["choices"][0]["prompt_token_ids"]  # still given


def test_vllms_lora_routes_answer_a_missing_adapter_and_an_unknown_name_as_vllm(served):
    """vLLM's load_lora_adapter answers an adapter folder it cannot find a 404 NotFoundError ("No adapter found";
    a 400 here), and unload_lora_adapter an unknown name "The lora adapter '<name>' cannot be found." (404)."""
    engine, app, _, _ = served
    before = engine.adapters()
    status, answer = _text(app, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "nothere"})
    assert status == 404 and "No adapter found" in answer["error"]["message"] and engine.adapters() == before
    assert answer["error"]["param"] == "lora_path"
    for name in ("zz", "base"):  # the base is no LoRA adapter vLLM could unload
        status, answer = _text(app, "/v1/unload_lora_adapter", {"lora_name": name})
        assert status == 404 and answer["error"]["message"] == f"The lora adapter '{name}' cannot be found."
    assert engine.adapters() == before
    assert _text(app, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "a"}) == (
        200, "Success: LoRA adapter 'a' added successfully.")  # fmt: skip
    card = next(c for c in _call_get_models(app) if c["id"] == "a")
    assert card["parent"] == "base" and card["root"].endswith("a") and card["max_model_len"] is None
    assert _text(app, "/v1/unload_lora_adapter", {"lora_name": "a"})[0] == 200 and engine.adapters() == before


def _call_get_models(app) -> list[dict]:
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        return client.get("/v1/models", headers={"host": "127.0.0.1"}).json()["data"]


def _hand_greedy(model, prompt: list[int], steps: int, fp: float, pp: float, rp: float):
    """vLLM's penalties by hand over transformers' logits (sampler.apply_penalties: repetition over prompt and output,
    then logits -= frequency * count + presence * (count > 0) over the output) and greedy picks: (ids, log_softmax)."""
    ids, out, rows = list(prompt), [], []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
        rows.append(torch.log_softmax(logits, -1))
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[ids] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).double()
        logits = logits - fp * counts - pp * (counts > 0).double()
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out, rows


@pytest.mark.parametrize("fp,pp,rp", [(1.5, 0.0, 1.0), (0.0, 0.0, 1.8), (-1.0, 0.5, 1.3)])
def test_greedy_penalties_and_logprobs_equal_a_hand_loop_over_transformers(served, fp, pp, rp):
    _, app, reference, tok = served
    prompt = tok("hello world the cat", add_special_tokens=False)["input_ids"]
    want, rows = _hand_greedy(reference, prompt, 10, fp, pp, rp)
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "logprobs": 1,
            "frequency_penalty": fp, "presence_penalty": pp, "repetition_penalty": rp, "return_token_ids": True}  # fmt: skip
    status, answer = _call(app, "/v1/completions", body)
    got = answer["choices"][0]["token_ids"]
    assert status == 200 and got == want != _hand_greedy(reference, prompt, 10, 0.0, 0.0, 1.0)[0]  # they matter
    values = answer["choices"][0]["logprobs"]["token_logprobs"]
    assert max(abs(v - float(r[t])) for v, r, t in zip(values, rows, got)) < 1e-4


def test_best_of_equal_to_n_is_served(served):
    """best_of: n asks for n candidates and n answers, what n alone asks (a 400 here for n > 1; vLLM's V0 engine served
    it, its V1 refused best_of > 1, current vLLM ignores the field); best_of above n (the best of more candidates)
    stays a 400 unsupported."""
    _, app, _, _ = served
    body = {"prompt": "hello", "max_tokens": 3, "temperature": 1, "seed": 5, "n": 2}
    status, plain = _call(app, "/v1/completions", body)
    status2, same = _call(app, "/v1/completions", {**body, "best_of": 2})
    assert status == status2 == 200 and [c["text"] for c in same["choices"]] == [c["text"] for c in plain["choices"]]
    status, answer = _call(app, "/v1/completions", {**body, "best_of": 3})
    assert status == 400 and answer["error"]["code"] == "unsupported" and answer["error"]["param"] == "best_of"


def test_a_huge_tool_choice_is_cut_in_its_400(served):
    """tool_choice was quoted whole (its repr) in the 400 unsupported."""
    _, app, _, _ = served
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools, "tool_choice": "t" * 5000}
    status, answer = _call(app, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == "tool_choice" and len(answer["error"]["message"]) < 250


def test_chat_logprobs_with_top_logprobs_null_gives_none_as_vllm(served):
    """vLLM's chat computes and answers logprobs only where ``logprobs and top_logprobs is not None``: an explicit
    null gives logprobs null (they were given here); left out, top_logprobs is 0 and the chosen tokens come back."""
    _, app, _, _ = served
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0, "logprobs": True}
    status, left_out = _call(app, "/v1/chat/completions", body)
    assert status == 200 and [len(c["top_logprobs"]) for c in left_out["choices"][0]["logprobs"]["content"]] == [0, 0]
    status, null = _call(app, "/v1/chat/completions", {**body, "top_logprobs": None})
    assert status == 200 and null["choices"][0]["logprobs"] is None
    assert null["choices"][0]["message"]["content"] == left_out["choices"][0]["message"]["content"]
    _, chunks = _call(app, "/v1/chat/completions", {**body, "top_logprobs": None, "stream": True})
    assert all(c["choices"][0]["logprobs"] is None for c in chunks if c["choices"])


# -- serve-fix: the reviewer's findings on 2f3cc7b / aedc8fa -------------------------------------------------------
def _weightless(app_root: str, name: str) -> str:
    """A folder under the adapter dir with a LoRA adapter_config.json and no weights file."""
    import shutil

    folder = os.path.join(app_root, name)
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(app_root, "a", "adapter_config.json"), folder)
    return folder


def test_a_folder_with_a_config_and_no_weights_is_vllms_400_not_its_404(served):
    """vLLM's 404 ("No adapter found") comes only from a FileNotFoundError, raised when PEFTHelper.from_local_dir
    finds no adapter_config.json; a config without tensors is LoRAModel.from_local_checkpoint's ValueError
    "<dir> doesn't contain tensors", a 400 BadRequestError with that reason (serving_models.load_lora_adapter).
    It was a 404 "No adapter found" here; deltatune's own route answered adapter_not_found (it was
    adapter_load_failed before 2f3cc7b) with its 400."""
    engine, app, _, _ = served
    _weightless(app.state.root, "noweights")
    before = engine.adapters()
    status, answer = _text(app, "/v1/load_lora_adapter", {"lora_name": "w", "lora_path": "noweights"})
    assert status == 400 and "No adapter found" not in answer["error"]["message"], answer
    assert "noweights" in answer["error"]["message"] and engine.adapters() == before
    status, answer = _call(app, "/v1/adapters", {"name": "w", "path": "noweights"})
    assert status == 400 and answer["error"]["code"] == "adapter_load_failed" and engine.adapters() == before
    # no folder at all: vLLM's 404 on its route with its words (raw values, no repr quotes); a 400 on deltatune's
    status, answer = _text(app, "/v1/load_lora_adapter", {"lora_name": "w", "lora_path": "nothere"})
    assert (status, answer["error"]["message"]) == (404, "Loading lora w failed: No adapter found for nothere")
    status, answer = _call(app, "/v1/adapters", {"name": "w", "path": "nothere"})
    assert status == 400 and answer["error"]["code"] == "adapter_load_failed" and engine.adapters() == before
    # a file, not a folder: vLLM reads <file>/adapter_config.json, a NotADirectoryError, its 400 (not the 404)
    with open(os.path.join(app.state.root, "a-file"), "w") as fh:
        fh.write("{}")
    status, answer = _text(app, "/v1/load_lora_adapter", {"lora_name": "w", "lora_path": "a-file"})
    assert status == 400 and "No adapter found" not in answer["error"]["message"] and engine.adapters() == before


def test_vllms_lora_words_carry_raw_values_and_a_huge_path_is_cut(served):
    """vLLM's messages put the values in raw: "Loading lora {name} failed: No adapter found for {path}", "The lora
    adapter '{name}' cannot be found." (repr quotes were added here: 'x' for x). A failed load's 400 put the loader's
    text whole: a 4,000-character path came back whole."""
    engine, app, _, _ = served
    before = engine.adapters()
    status, answer = _text(app, "/v1/unload_lora_adapter", {"lora_name": "it's"})  # its repr: "it's"
    assert (status, answer["error"]["message"]) == (404, "The lora adapter 'it's' cannot be found.")
    status, answer = _text(app, "/v1/load_lora_adapter", {"lora_name": "base", "lora_path": "a"})
    assert (status, answer["error"]["message"]) == (400, "The lora adapter 'base' has already been loaded.")
    huge = "q/" * 2000
    status, answer = _call(app, "/v1/adapters", {"name": "h", "path": huge})
    assert len(answer["error"]["message"]) < 400 and engine.adapters() == before, len(answer["error"]["message"])
    assert status == 400 and answer["error"]["code"] == "adapter_load_failed", answer
    status, answer = _text(app, "/v1/load_lora_adapter", {"lora_name": "h", "lora_path": huge})
    assert status == 404 and len(answer["error"]["message"]) < 120 and engine.adapters() == before


def test_a_chat_message_carries_vllms_chatmessage_fields_reasoning_not_reasoning_content(served):
    """vLLM's ChatMessage (vllm-project/vllm d5dba2d7, chat_completion/protocol.py): role, content, refusal,
    annotations, audio, function_call, tool_calls (default_factory=list) and reasoning; ``reasoning_content`` was its
    older name (sent here, and ``reasoning`` left out). Each choice's tool_calls is a list of its own."""
    _, app, _, _ = served
    vllm_fields = {"role", "content", "refusal", "annotations", "audio", "function_call", "tool_calls", "reasoning"}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 2, "temperature": 1, "seed": 1}
    status, chat = _call(app, "/v1/chat/completions", body)
    assert status == 200 and [set(c["message"]) for c in chat["choices"]] == [vllm_fields] * 2
    assert all(c["message"]["reasoning"] is None and c["message"]["tool_calls"] == [] for c in chat["choices"])
    from deltatune.serve import app as served_app

    one, two = served_app._no_message(), served_app._no_message()
    one["tool_calls"].append("x")
    assert two["tool_calls"] == [] == served_app._no_message()["tool_calls"]
