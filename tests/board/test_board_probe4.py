"""Probe 4 of ``deltatune board``: ``--serve`` given as the openai client's base URL (ending in /v1)."""

from __future__ import annotations

import json
import urllib.request

from fastapi import FastAPI
from serving import Server  # tests/serve/serving.py

from deltatune.board import create_app


def test_a_serve_url_ending_in_v1_is_forwarded_to_the_same_routes(tmp_path):
    """``--serve http://127.0.0.1:8000/v1`` (how the openai client names a server) made every playground call go
    to /v1/v1/...: the page showed serve's 404 "Not Found" and no adapter."""
    upstream = FastAPI()

    @upstream.get("/v1/models")
    async def models():
        return {"data": [{"id": "base"}]}

    serve = Server(upstream)
    try:
        for url in (serve.url, serve.url + "/", serve.url + "/v1", serve.url + "/v1/"):
            board = Server(create_app(str(tmp_path), serve_url=url))
            try:
                with urllib.request.urlopen(board.url + "/api/serve/v1/models", timeout=30) as resp:
                    assert resp.status == 200 and json.loads(resp.read()) == {"data": [{"id": "base"}]}, url
            finally:
                board.stop()
    finally:
        serve.stop()


def test_a_checkpoint_named_with_a_superscript_digit_does_not_break_the_history(tmp_path):
    """``"²".isdigit()`` and ``int("²")`` a ValueError: a run whose log is gone and that holds ``checkpoint-²``
    failed to list; its history is the numbered checkpoint's."""
    from deltatune.board.runs import history

    for name, step in (("checkpoint-²", 99), ("checkpoint-3", 3)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": step}]}))
    assert history(str(tmp_path)) == [{"step": 3}]
