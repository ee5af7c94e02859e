"""Probe 15 of ``deltatune serve`` and ``deltatune board`` against vLLM's OpenAI server: numeric fields sent as
numeric strings (vLLM's pydantic request models read them in lax mode: "0.5", "16", "16.0", and 16.0 for an integer
field; they were a 400), vLLM's temperature bounds (its SamplingParams: a temperature in (0, 0.01) is raised to
0.01 and sampled, above 2 a 400; below 1e-5 was greedy and above 2 sampled), and the board's polling reads (report.md
was read whole on every poll, a log's unterminated last line re-read and re-parsed on every poll). Through the app
in process (the ASGI helpers of test_serve_probe11), on a tiny random llama with SmolLM2's tokenizer."""

from __future__ import annotations

import json

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
    from typing import Annotated

    from pydantic import BaseModel, Field

    int64 = {"ge": -(2**63), "le": 2**63 - 1}  # vLLM's _INT64_MIN, _INT64_MAX

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
        n: int = 1  # ChatCompletionRequest's n is int | None; null is left to choices_of (1)
        seed: int | None = Field(None, **int64)
        top_k: int | None = None
        min_tokens: int = 0
        truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=2**63 - 1)] | None = None
        best_of: int | None = None  # vLLM before 0.10 (now an ignored field)
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
           True, None, "9" * 4301, "0" * 4400 + "7", "1" + "0" * 400, "\xa07", "\u3000 7\u2028", "\x1c7", "7\x1f",
           "\u20037.5"]  # fmt: skip


def _field_refuses(field: str, value, chat: bool) -> bool:
    """Whether this server's own check of ``field`` refuses ``value`` (a 400 naming it)."""
    from deltatune.serve.engine import RequestError
    from deltatune.serve.fields import Limits, choices_of, to_request

    body = {field: value, **({"logprobs": True} if chat and field == "top_logprobs" else {})}
    try:
        choices_of(body)
        to_request(body, [1, 2], Limits(16, 128), "base", chat)
    except RequestError as exc:
        return exc.param == field
    return False


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
                except ValidationError:  # as sent (NaN aside), or a number past the field's range its check refuses
                    assert ours == value or ours != ours or _field_refuses(field, ours, chat), (field, sample, ours)
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


INT_FIELDS = ["max_tokens", "max_completion_tokens", "n", "seed", "top_k", "min_tokens", "truncate_prompt_tokens",
              "prompt_logprobs", "stop_token_ids"]  # fmt: skip


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_integer_string_past_4300_digits_is_a_400_naming_its_field(smol, path):
    """int() of a string past 4,300 digits raises ValueError (Python's int-string limit): each integer field sent so
    was a 500. pydantic refuses it (int_parsing_size), so vLLM answers a 400; here the field's own check does."""
    from pydantic import BaseModel, ValidationError

    from deltatune.serve.fields import lax_numbers

    class Count(BaseModel):
        k: int | None = None

    with pytest.raises(ValidationError, match="int_parsing_size"):
        Count(k="9" * 4301)
    assert Count(k="0" * 4400 + "7").k == 7 and lax_numbers({"n": "0" * 4400 + "7"}, chat=True)["n"] == 7
    assert lax_numbers({"n": "-" + "9" * 4300}, chat=True)["n"] == Count(k="-" + "9" * 4300).k
    engine, app = smol
    head = {"prompt": "hi"} if "chat" not in path else {"messages": [{"role": "user", "content": "hi"}]}
    fields = [*INT_FIELDS, "logprobs" if "chat" not in path else "top_logprobs"]
    for field in fields:
        huge = "9" * 4301 if field != "seed" else "1" + "0" * 5000
        value = [huge] if field == "stop_token_ids" else huge
        extra = {"logprobs": True} if field == "top_logprobs" else {}
        status, answer = _call(app, path, {**head, "max_tokens": 2, **extra, field: value})
        assert status == 400 and answer["error"]["param"] == field, (field, status, answer)


def test_prompt_token_lists_and_detokenize_read_numeric_strings_as_vllms_smart_union(smol):
    """vLLM's CompletionRequest.prompt is list[int] | list[list[int]] | str | list[str] (pydantic's smart union, lax
    mode): [1, "2"] and [1.0, 2] are the token ids [1, 2], ["1", "2"] two text prompts; DetokenizeRequest.tokens is
    list[int]. They were a 400 here. A bool stays refused (pydantic reads True as 1)."""
    from typing import Annotated

    from pydantic import BaseModel, Field, ValidationError

    from deltatune.serve.fields import lax_numbers

    ids = Annotated[int, Field(ge=0)]

    class Prompt(BaseModel):
        prompt: list[ids] | list[list[ids]] | str | list[str] | None = None

    samples = [[1, "2"], [1.0, 2], ["1", 2], [[1, "2"], [3.0]], ["1", "2"], [1, "x"], [1.5, 2], [[1], "a"],
               ["\xa01", "2 "], [True, 2], [1, "9" * 4301], [[1, "x"]]]  # fmt: skip
    for sample in samples:
        ours = lax_numbers({"prompt": sample}, chat=False)["prompt"]
        try:
            want = Prompt(prompt=sample).prompt
        except ValidationError:
            assert ours == sample, sample
            continue
        if any(x is True for x in sample):  # refused on purpose: kept for the prompt's check
            assert ours == sample and ours[0] is True
            continue
        assert ours == want and repr(ours) == repr(want), (sample, ours, want)
    engine, app = smol
    body = {"max_tokens": 3, "seed": 1, "temperature": 0.8}
    want = _call(app, "/v1/completions", {**body, "prompt": [1, 2]})
    assert want[0] == 200
    for prompt in ([1, "2"], [1.0, 2], ["\xa01", 2], [[1, " 2 "]]):
        status, got = _call(app, "/v1/completions", {**body, "prompt": prompt})
        assert status == 200 and got["choices"][0]["text"] == want[1]["choices"][0]["text"], (prompt, got)
        assert got["usage"] == want[1]["usage"]
    status, batch = _call(app, "/v1/completions", {**body, "prompt": ["1", "2"]})  # two text prompts, as vLLM
    assert status == 200 and len(batch["choices"]) == 2
    for prompt in ([1, "x"], [True, 2], [1.5, 2], [-1, "2"]):
        status, answer = _call(app, "/v1/completions", {**body, "prompt": prompt})
        assert status == 400 and answer["error"]["param"] == "prompt", prompt
    assert _call(app, "/detokenize", {"tokens": ["5", 6.0]}) == _call(app, "/detokenize", {"tokens": [5, 6]})
    assert _call(app, "/detokenize", {"tokens": [5, 6]})[0] == 200
    assert _call(app, "/detokenize", {"tokens": ["5", "x"]})[0] == 400


def test_completion_top_logprobs_and_best_of_numeric_strings_ask_for_nothing(smol):
    """A completion's top_logprobs (vLLM ignores it) and best_of (an int in vLLM before 0.10): "0" and "1" ask for
    nothing, as 0 and 1 do; they were a 400 here."""
    engine, app = smol
    body = {"prompt": "the cat", "max_tokens": 3, "seed": 2, "temperature": 0.9}
    status, want = _call(app, "/v1/completions", body)
    assert status == 200
    for extra in ({"top_logprobs": "0"}, {"best_of": "1"}, {"best_of": " 1.0 "}):
        status, got = _call(app, "/v1/completions", {**body, **extra})
        assert status == 200 and got["choices"][0]["text"] == want["choices"][0]["text"], (extra, got)
    assert _call(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                "best_of": "1"})[0] == 200  # fmt: skip
    status, answer = _call(app, "/v1/completions", {**body, "best_of": "2"})
    assert status == 400 and answer["error"]["param"] == "best_of"


def test_the_generation_configs_temperature_follows_a_requests_rules(smol):
    """vLLM fills an unset temperature from the generation config into SamplingParams, which raises one in (0, 0.01)
    to 0.01 and refuses one past 2. Here a config's 1e-6 was greedy, its 0.005 sampled at 0.005 and its 3.0 at 3.0.
    Now 0 stays greedy, (0, 0.01) samples at 0.01, and past 2 a request leaving temperature unset is a 400 naming
    temperature and the generation config (one that sets it is served)."""
    from types import SimpleNamespace

    from deltatune.serve.sampling import default_temperature

    for config, served in ((0.0, 0.0), (1e-6, 0.01), (0.005, 0.01), (0.01, 0.01), (0.7, 0.7), (2.0, 2.0), (None, 1.0)):
        assert default_temperature(SimpleNamespace(temperature=config)) == served, config
    assert default_temperature(SimpleNamespace(temperature=3.0, do_sample=False)) == 0.0  # generate's greedy
    for config in (3.0, -0.5, float("nan"), "abc"):  # ("abc": float's own error, naming no config, before)
        with pytest.raises(ValueError, match=f"generation config sets {config!r}, not a number in"):
            default_temperature(SimpleNamespace(temperature=config))
    engine, app = smol
    body = {"prompt": "the cat", "max_tokens": 8, "seed": 5, "ignore_eos": True, "logprobs": 0,
            "return_tokens_as_token_ids": True}  # fmt: skip

    def tokens(extra):
        status, answer = _call(app, "/v1/completions", {**body, **extra})
        assert status == 200, answer
        return answer["choices"][0]["logprobs"]["tokens"]

    at_floor, greedy = tokens({"temperature": 0.01}), tokens({"temperature": 0})
    assert at_floor != greedy  # the floor samples: the check below can tell them apart
    saved = engine.gen.temperature, engine.gen.do_sample
    try:
        engine.gen.do_sample = True
        for config, want in ((1e-6, at_floor), (0.005, at_floor), (0.0, greedy)):
            engine.gen.temperature = config
            assert tokens({}) == want, config
        engine.gen.temperature = 3.0
        for path, head in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": [
                {"role": "user", "content": "hi"}]})):  # fmt: skip
            status, answer = _call(app, path, {**head, "max_tokens": 2})
            assert status == 400 and answer["error"]["param"] == "temperature", answer
            assert "generation config" in answer["error"]["message"] and "3.0" in answer["error"]["message"]
            assert _call(app, path, {**head, "max_tokens": 2, "temperature": 0.7})[0] == 200
    finally:
        engine.gen.temperature, engine.gen.do_sample = saved


def test_the_board_drops_a_cached_half_row_when_a_resumed_run_rewrites_the_log(tmp_path, monkeypatch):
    """The log cache kept the unterminated last line between polls but checked only the bytes before it. A resumed
    run rewrites the log ("w", the same inode) with the checkpoint's rows byte for byte, then appends its own: the old
    run's half row, cached, was joined to the new bytes (a wrong wall_time, or a row lost as invalid JSON). Now the
    check covers the bytes last read, the half row included, and a rewritten one restarts the read."""
    from deltatune.board import runs

    monkeypatch.setattr(runs, "_LOGS", {})
    log = tmp_path / runs.LOG_FILE
    rows = b"".join(json_line({"loss": 1 / i, "step": i, "wall_time": 1796590000.5 + i}) for i in range(1, 4))
    old4 = json_line({"loss": 0.25, "step": 4, "wall_time": 1796590004.5})  # the crashed run's row 4, half written
    new4 = json_line({"loss": 0.25, "step": 4, "wall_time": 1796599999.125})
    old4b = json_line({"step": 4, "loss": 0.25, "note": "aaaaaaaaaaaa"})
    for half, new in ((old4[: old4.index(b"17965900") + 7], new4), (old4b[:30], json_line({"step": 4, "loss": 0.5}))):
        log.write_bytes(rows + half)
        assert len(runs._log_rows(str(log))) == 3
        log.write_bytes(rows + new + json_line({"step": 5, "loss": 0.2}))
        polled = runs._log_rows(str(log))
        runs._LOGS.clear()
        fresh = runs._log_rows(str(log))
        assert polled == fresh and fresh[3] == json.loads(new) and len(fresh) == 5, polled[3:]


def test_the_board_measures_a_log_line_in_bytes_whether_polled_whole_or_half_written(tmp_path, monkeypatch):
    """MAX_LINE was counted in bytes for the unterminated last line but in decoded characters (\\r dropped) for a
    whole one: a line of 1.2 MB of "é" (600,000 characters) was a row when read whole and dropped when a poll had
    seen it half written; a line of exactly MAX_LINE bytes ended by \\r\\n was dropped when polled before its \\n.
    Now both count bytes, a trailing \\r not counted: the rows do not depend on when the board polled."""
    from deltatune.board import runs

    monkeypatch.setattr(runs, "_LOGS", {})
    head = b"".join(json_line({"step": i, "loss": 1 / i}) for i in range(1, 3))
    wide = json.dumps({"step": 3, "note": "\u00e9" * 600_000}, ensure_ascii=False).encode()
    pad = b'{"step": 3, "note": "'
    exact = pad + b"x" * (runs.MAX_LINE - len(pad) - 2) + b'"}'
    assert len(wide) > runs.MAX_LINE and len(wide.decode()) < runs.MAX_LINE and len(exact) == runs.MAX_LINE
    for line, kept, cut in ((wide, False, len(wide) - 3), (exact + b"\r", True, len(exact) + 1)):
        log = tmp_path / f"{kept}.jsonl"
        whole = head + line + b"\n" + json_line({"step": 4, "loss": 0.1})
        log.write_bytes(whole[: len(head) + cut])
        runs._log_rows(str(log))  # the board polls while the long line is being written
        log.write_bytes(whole)
        polled = runs._log_rows(str(log))
        runs._LOGS.clear()
        assert polled == runs._log_rows(str(log)), kept
        assert [r["step"] for r in polled] == ([1, 2, 3, 4] if kept else [1, 2, 4])


def test_a_report_cut_at_report_max_ends_at_a_whole_character(tmp_path, monkeypatch):
    """report.md past REPORT_MAX (1 MiB) is cut at a byte count: a cut inside a UTF-8 character showed U+FFFD before
    the note line. Now the cut backs off to the last whole character; a stray byte inside still shows as U+FFFD."""
    from deltatune.board import runs

    monkeypatch.setattr(runs, "_REPORTS", {})
    folder = _run_folder(tmp_path)
    report = folder / "report.md"
    body = "\u2615" * ((runs.REPORT_MAX // 3) + 10)  # 3 bytes each: byte REPORT_MAX falls inside one (2**20 % 3)
    report.write_bytes(body.encode())
    text = runs.detail(str(tmp_path), "r")["report"]
    shown = text.split("\n\n*(report.md")[0]
    assert "\ufffd" not in text and shown == body[: runs.REPORT_MAX // 3]
    assert len(shown.encode()) <= runs.REPORT_MAX < len(shown.encode()) + 3
    report.write_bytes(b"a\xffb" + b"c" * runs.REPORT_MAX)
    assert runs.detail(str(tmp_path), "r")["report"].startswith("a\ufffdbc")
