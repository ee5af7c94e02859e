"""Probe 10 of ``deltatune serve``: the non-stream answer gathers its choices in time linear in prompts x n, and
what vLLM's OpenAI server does that deltatune did otherwise (each test names vLLM's code it follows)."""

from __future__ import annotations

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
