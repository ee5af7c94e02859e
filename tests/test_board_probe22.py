"""Probe 22 of ``deltatune board``: its HTTP layer's answers to bad queries, and the curves of a log whose steps go
back (a run restarted into the same log), against TensorBoard's reader."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("fastapi")
sys.path.insert(0, os.path.dirname(__file__))

from fastapi.testclient import TestClient  # noqa: E402
from test_board_probe11 import write_run  # noqa: E402

from deltatune.board import create_app  # noqa: E402


def test_a_bad_query_is_one_400_line_naming_the_parameter_and_value(tmp_path):
    """FastAPI answered a bad or missing query parameter with a 422 holding a list of pydantic errors ({"detail":
    [...]}): the page, which reads error.message, said "Unprocessable Entity", naming neither the parameter nor the
    value; an unknown route or a wrong method came as {"detail": "Not Found"}. Now a bad query is a 400 in the board's
    error shape, one line naming the parameter and the value given; other HTTP errors keep their status (a 405 its
    Allow header) in that shape too."""
    write_run(tmp_path, "a", [{"loss": 1.0, "step": 1}])
    client = TestClient(create_app(str(tmp_path)), base_url="http://127.0.0.1")
    cases = {
        "/api/run?name=a&points=abc": "query parameter 'points': Input should be a valid integer, unable to parse "
        "string as an integer (given 'abc')",
        "/api/run": "query parameter 'name': Field required",
        "/api/file?run=a": "query parameter 'name': Field required",
    }
    for path, line in cases.items():
        got = client.get(path)
        assert got.status_code == 400, path
        assert got.json() == {"error": {"message": line, "type": "invalid_request_error"}}
    long = client.get("/api/run", params={"name": "a", "points": "9" * 50 + "x"}).json()["error"]["message"]
    assert "\n" not in long and len(long) < 200 and "'points'" in long
    unknown = client.get("/api/nope")
    assert unknown.status_code == 404
    assert unknown.json() == {"error": {"message": "Not Found: GET /api/nope", "type": "not_found_error"}}
    wrong = client.post("/api/runs")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
    assert wrong.json()["error"]["message"] == "Method Not Allowed: POST /api/runs"
    assert client.get("/api/run?name=a&points=0").status_code == 200  # a good query is answered as before
