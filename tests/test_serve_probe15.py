"""Probe 15 of ``deltatune serve`` and ``deltatune board`` against vLLM's OpenAI server: numeric fields sent as
numeric strings (vLLM's pydantic request models read them in lax mode: "0.5", "16", "16.0", and 16.0 for an integer
field; they were a 400), vLLM's temperature bounds (its SamplingParams: a temperature in (0, 0.01) is raised to
0.01 and sampled, above 2 a 400; below 1e-5 was greedy and above 2 sampled), and the board's polling reads (report.md
was read whole on every poll, a log's unterminated last line re-read and re-parsed on every poll). Through the app
in process (the ASGI helpers of test_serve_probe11), on a tiny random llama with SmolLM2's tokenizer."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from test_serve_probe11 import _call, _serve, _smol  # noqa: E402


@pytest.fixture(scope="module")
def smol():
    engine, app = _serve(_smol())
    yield engine, app
    engine.close()


def _vllm_models():
    """The numeric fields of vLLM's ChatCompletionRequest and CompletionRequest, typed as vLLM's protocol.py types
    them (pydantic, lax mode, as FastAPI validates a body)."""
    from pydantic import BaseModel

    class Numbers(BaseModel):
        temperature: float | None = None
        top_p: float | None = None
        min_p: float | None = None
        frequency_penalty: float | None = None
        presence_penalty: float | None = None
        repetition_penalty: float | None = None
        length_penalty: float = 1.0
        max_tokens: int | None = None
        max_completion_tokens: int | None = None
        n: int | None = 1
        seed: int | None = None
        top_k: int | None = None
        min_tokens: int = 0
        truncate_prompt_tokens: int | None = None
        prompt_logprobs: int | None = None
        stop_token_ids: list[int] | None = None
        allowed_token_ids: list[int] | None = None

    class Chat(Numbers):
        logprobs: bool | None = False
        top_logprobs: int | None = 0

    class Completion(Numbers):
        logprobs: int | None = None

    return Chat, Completion


SAMPLES = ["0.5", " 0.5 ", "1e3", "inf", "-inf", "16", "16.0", "16.00", "+16", " 16\n", "00016", "1_000", "-0",
           "16.", ".5", "16.5", "1__0", "_1", "0x10", "16 .0", "", " ", "abc", "\uff15", 16.0, 16.5, 2.0**70, 3,
           True, None]  # fmt: skip


def test_numeric_strings_are_read_field_by_field_as_vllms_pydantic_models():
    """Each sample in each numeric field: where vLLM's pydantic model takes it, lax_numbers gives the same number;
    where pydantic refuses it, the value stays as sent (the field's own check answers the 400). True stays true: a
    bool in a number field is refused here on purpose, where pydantic reads it as 1."""
    from pydantic import ValidationError

    from deltatune.serve.fields import lax_numbers

    for model, chat in zip(_vllm_models(), (True, False)):
        fields = [f for f, info in model.model_fields.items() if info.annotation not in (bool, bool | None)]
        compared = 0
        for field in fields:
            for sample in SAMPLES:
                value = [sample, 7] if field.endswith("token_ids") else sample
                ours = lax_numbers({field: value}, chat=chat)[field]
                try:
                    want = getattr(model(**{field: value}), field)
                except ValidationError:
                    assert ours == value or ours != ours, (field, sample, ours)  # as sent (NaN aside)
                    continue
                if sample is True:
                    assert ours == value and (ours[0] if isinstance(ours, list) else ours) is True, (
                        field
                    )  # kept for the field's check: refused on purpose
                    continue
                if isinstance(want, float) and type(ours) is int:  # an int in a float field: the same number
                    ours = float(ours)
                assert type(ours) is type(want) and (ours == want or (ours != ours and want != want)), (field, sample)
                assert not isinstance(want, list) or [type(x) for x in ours] == [type(x) for x in want]
                compared += 1
        assert compared > 10 * len(fields)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_request_of_numeric_strings_answers_as_its_numbers(smol, path):
    """vLLM answers {"max_tokens": "4", "temperature": "0.7", "seed": "3", ...} as the numbers; it was a 400 here."""
    engine, app = smol
    head = {"prompt": "the cat"} if "chat" not in path else {"messages": [{"role": "user", "content": "hi"}]}
    numbers = {**head, "max_tokens": 4, "temperature": 0.7, "seed": 3, "top_k": 20, "top_p": 0.9, "n": 2,
               "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [5], "frequency_penalty": 0.5}  # fmt: skip
    strings = {**head, "max_tokens": "4", "temperature": "0.7", "seed": " 3 ", "top_k": "20.0", "top_p": "9e-1",
               "n": 2.0, "min_tokens": "2", "ignore_eos": True, "stop_token_ids": ["5"], "frequency_penalty": "0.5"}  # fmt: skip
    status, want = _call(app, path, numbers)
    assert status == 200, want
    status, got = _call(app, path, strings)
    assert status == 200, got
    key = "text" if "chat" not in path else "message"
    assert [c[key] for c in got["choices"]] == [c[key] for c in want["choices"]] and len(got["choices"]) == 2
    assert got["usage"] == want["usage"]
    for bad in ({"max_tokens": "4.5"}, {"max_tokens": "1e3"}, {"max_tokens": True}, {"temperature": "warm"},
                {"temperature": True}, {"seed": "0x10"}, {"n": 2.5}):  # fmt: skip
        status, answer = _call(app, path, {**numbers, **bad})
        assert status == 400 and answer["error"]["param"] == next(iter(bad)), (bad, answer)


def test_temperature_is_bounded_and_raised_as_vllms_sampling_params(smol):
    """vLLM's SamplingParams (sampling_params.py): ``0 < temperature < _MAX_TEMP`` (1e-2) is raised to 1e-2 and
    sampled; above 2 it is refused ("temperature must be in [0, 2]", as OpenAI's API). Here 1e-6 was greedy and 3.5
    sampled."""
    from deltatune.serve.fields import Limits, to_request

    limits = Limits(16, 128)
    for sent, served in ((0, 0.0), (1e-300, 0.01), (1e-6, 0.01), (0.005, 0.01), (0.01, 0.01), (0.5, 0.5), (2, 2.0)):
        assert to_request({"temperature": sent}, [1, 2], limits, "base").temperature == served, sent
    engine, app = smol
    body = {"prompt": "the cat", "max_tokens": 6, "seed": 5, "ignore_eos": True, "logprobs": 0,
            "return_tokens_as_token_ids": True}  # fmt: skip
    _, at_floor = _call(app, "/v1/completions", {**body, "temperature": 0.01})
    status, tiny = _call(app, "/v1/completions", {**body, "temperature": 1e-6})
    assert status == 200 and tiny["choices"][0]["logprobs"]["tokens"] == at_floor["choices"][0]["logprobs"]["tokens"]
    for t in (2.0000001, 3.5, 1e39):
        status, answer = _call(app, "/v1/completions", {**body, "temperature": t})
        assert status == 400 and answer["error"]["param"] == "temperature", (t, answer)
        assert "[0.0, 2.0]" in answer["error"]["message"]
    assert _call(app, "/v1/completions", {**body, "temperature": 2})[0] == 200


class _Counted:
    """Counts the bytes read from each path opened through the board's ``open``."""

    def __init__(self) -> None:
        self.read: dict[str, int] = {}

    def open(self, path, mode="r", *args, **kwargs):
        import builtins

        fh = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115 (the caller closes it)
        counter, name, real = self, str(path), fh.read

        def read(*a):
            out = real(*a)
            counter.read[name] = counter.read.get(name, 0) + len(out)
            return out

        fh.read = read
        return fh


def _run_folder(tmp_path, name: str = "r"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "run.yaml").write_text("stage: sft\nmethod:\n  name: lora\n")
    return folder


def test_the_board_reads_only_what_is_new_of_a_log_with_a_huge_unterminated_last_line(tmp_path, monkeypatch):
    """A log whose last line is 5 MB with no newline yet: each poll read those 5 MB again and parsed them (50 MB
    took seconds a poll). Now a poll of an unchanged log reads none of it (the check of the last line read: at most
    256 bytes), a grown one only the bytes added, and the rows equal those of a fresh read."""
    from deltatune.board import runs

    folder = _run_folder(tmp_path)
    log = folder / runs.LOG_FILE
    rows = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(1, 4)]
    big = b'{"step": 99, "note": "' + b"x" * (5 << 20)  # unterminated, past MAX_LINE
    log.write_bytes(b"".join(json_line(r) for r in rows) + big)
    counted = _Counted()
    monkeypatch.setattr(runs, "open", counted.open, raising=False)
    monkeypatch.setattr(runs, "_LOGS", {})
    assert runs.history(str(folder)) == rows
    first = counted.read[str(log)]
    assert first >= len(big)  # the first read takes the file once
    for _ in range(3):
        assert runs.history(str(folder)) == rows
    assert counted.read[str(log)] - first <= 3 * 256, counted.read  # HEAD: 3 x 5 MB more
    with open(log, "ab") as fh:  # the long line ends, a row follows, then half of another
        fh.write(b'"}\n' + json_line({"step": 4, "loss": 0.2}) + b'{"step": 5, "lo')
    before = counted.read[str(log)]
    assert runs.history(str(folder)) == [*rows, {"step": 4, "loss": 0.2}]
    assert counted.read[str(log)] - before <= 256 + 3 + 40  # the check, then the new bytes alone
    with open(log, "ab") as fh:
        fh.write(b'ss": 0.1}')  # a whole last line without its newline is a row, as before
    assert runs.history(str(folder))[-1] == {"step": 5, "loss": 0.1}
    monkeypatch.setattr(runs, "_LOGS", {})  # a fresh read gives the same rows
    assert runs.history(str(folder)) == [*rows, {"step": 4, "loss": 0.2}, {"step": 5, "loss": 0.1}]


def test_the_board_reads_report_md_again_only_when_it_changes_and_caps_it(tmp_path, monkeypatch):
    """detail() read report.md whole on every poll. Now an unchanged report is not read again, a changed one is, and
    one past REPORT_MAX (1 MiB) is sent cut, with a line saying how long it is."""
    from deltatune.board import runs

    folder = _run_folder(tmp_path)
    report = folder / "report.md"
    report.write_text("# Run r\n\nloss 0.5\n")
    counted = _Counted()
    monkeypatch.setattr(runs, "open", counted.open, raising=False)
    monkeypatch.setattr(runs, "_REPORTS", {}, raising=False)
    assert runs.detail(str(tmp_path), "r")["report"] == "# Run r\n\nloss 0.5\n"
    for _ in range(3):
        assert runs.detail(str(tmp_path), "r")["report"] == "# Run r\n\nloss 0.5\n"
    assert counted.read[str(report)] == len("# Run r\n\nloss 0.5\n")  # HEAD: 4 times that
    report.write_text("# Run r\n\nloss 0.25, longer now\n")
    assert runs.detail(str(tmp_path), "r")["report"] == "# Run r\n\nloss 0.25, longer now\n"
    report.write_bytes(b"a" * (3 << 20))
    before = counted.read[str(report)]
    text = runs.detail(str(tmp_path), "r")["report"]
    assert text.startswith("a" * runs.REPORT_MAX) and "3,145,728 bytes" in text.splitlines()[-1]
    assert counted.read[str(report)] - before == runs.REPORT_MAX + 1  # HEAD: 3 MiB
    report.unlink()
    assert runs.detail(str(tmp_path), "r")["report"] is None


def json_line(row: dict) -> bytes:
    import json

    return (json.dumps(row) + "\n").encode()
