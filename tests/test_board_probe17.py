"""Probe 17 of ``deltatune board``: recipes holding values JSON has no type for, files nested past the parsers'
depth, and the cost of one poll of a list of many runs."""

from __future__ import annotations

import json
import os
import struct
import sys

import pytest

pytest.importorskip("fastapi")
sys.path.insert(0, os.path.dirname(__file__))

from fastapi.testclient import TestClient  # noqa: E402
from test_board_probe11 import write_run  # noqa: E402

from deltatune.board import create_app, runs  # noqa: E402


def client(root) -> TestClient:
    return TestClient(create_app(str(root)), base_url="http://127.0.0.1", raise_server_exceptions=False)


def test_a_recipe_holding_a_date_key_or_binary_bytes_leaves_the_list_and_its_page_whole(tmp_path):
    """A run.yaml is any YAML: a date as a key made its page a 500 (json.dumps takes no date key); ``!!binary`` bytes
    that are not UTF-8 as its stage made the whole run list a 500 (FastAPI decodes bytes as UTF-8). Each is shown
    as its str, as the page's ``default=str`` already showed a date or bytes value."""
    write_run(tmp_path, "ok")
    (write_run(tmp_path, "dated") / "run.yaml").write_text("stage: sft\ntrain:\n  2024-01-01: x\n", encoding="utf-8")
    (write_run(tmp_path, "binary") / "run.yaml").write_text(
        "stage: !!binary /w==\nmethod: {name: lora, seed: !!binary aGk=}\n", encoding="utf-8"
    )
    c = client(tmp_path)
    listed = c.get("/api/runs")
    assert listed.status_code == 200
    assert {r["name"]: r["stage"] for r in listed.json()["runs"]} == {
        "ok": "sft",
        "dated": "sft",
        "binary": "b'\\xff'",
    }
    dated, binary = c.get("/api/run?name=dated"), c.get("/api/run?name=binary")
    assert (dated.status_code, binary.status_code) == (200, 200)
    assert dated.json()["recipe"]["train"] == {"2024-01-01": "x"}
    assert binary.json()["recipe"]["method"] == {"name": "lora", "seed": "b'hi'"}


def test_files_nested_past_the_parsers_depth_leave_the_run_listed_and_its_page_whole(tmp_path):
    """A run.yaml or metrics.json nested 5,000 / 100,000 deep: the parser's RecursionError (neither a YAMLError nor a
    ValueError) hid the run from the list and made its page a 500; a log row nested 600 deep parsed, then made the
    page a 500 (the walk that blanks NaN recursed past the limit); a safetensors header alike hid the run. Each file
    is now taken as unreadable (the row as no row), and the run's other files are shown."""
    deep_yaml = write_run(tmp_path, "deep-yaml", [{"loss": 0.5, "step": 1}])
    (deep_yaml / "run.yaml").write_text("stage: sft\nx: " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    deep_metrics = write_run(tmp_path, "deep-metrics", [{"loss": 0.5, "step": 1}])
    (deep_metrics / "metrics.json").write_text("[" * 100_000, encoding="utf-8")
    deep_row = write_run(tmp_path, "deep-row")
    nested = "[" * 600 + "]" * 600
    (deep_row / "log_history.jsonl").write_text(
        f'{{"loss": 0.5, "step": 1}}\n{{"loss": 0.4, "x": {nested}, "step": 2}}\n{{"loss": 0.3, "step": 3}}\n',
        encoding="utf-8",
    )
    deep_header = write_run(tmp_path, "deep-header", [{"loss": 0.5, "step": 1}])
    header = b"[" * 100_000
    (deep_header / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    names = {"deep-yaml", "deep-metrics", "deep-row", "deep-header"}
    assert {r["name"] for r in runs.list_runs(str(tmp_path))} == names
    c = client(tmp_path)
    pages = {name: c.get(f"/api/run?name={name}") for name in names}
    assert {name: page.status_code for name, page in pages.items()} == dict.fromkeys(names, 200)
    assert pages["deep-yaml"].json()["recipe"] == {} and pages["deep-metrics"].json()["all_metrics"] == {}
    assert [r["loss"] for r in pages["deep-row"].json()["history"]] == [0.5, 0.3]
    assert pages["deep-header"].json()["trainable_params"] is None


def test_a_poll_of_many_runs_parses_one_log_line_and_no_adapter_header_per_unchanged_run(tmp_path, monkeypatch):
    """500 runs of 2,000 log rows, polled each second: the list parsed every line in the last 64 KiB of each log
    for its last step (about 500 a run, 250,000 a poll: 2.5 s here) and read and parsed each adapter's header again.
    Now the lines are parsed from the end until the last row with a step (one, or two past a cut last line), and a
    header is read again only when its file changed; the steps and counts are the same."""
    header = json.dumps({"__metadata__": {"format": "pt"}, "a.lora_A.weight": {"shape": [4, 32]},
                         "a.lora_B.weight": {"shape": [32, 4]}}).encode()  # fmt: skip
    for k in range(40):
        folder = write_run(tmp_path, f"r{k:02d}", [{"loss": 1.0 / i, "step": i} for i in range(1, 1001 + k)])
        (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with open(tmp_path / "r00" / "log_history.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"loss": 0.1, "st')  # a run writing: its last line cut
    first = runs.list_runs(str(tmp_path))
    assert {r["name"]: (r["steps"], r["trainable_params"]) for r in first} == {
        f"r{k:02d}": (1000 + k, 4 * 32 + 32 * 4) for k in range(40)
    }
    parsed, headers, row, unpack = [], [], runs._row, struct.unpack
    monkeypatch.setattr(runs, "_row", lambda line: parsed.append(line) or row(line))
    monkeypatch.setattr(runs.struct, "unpack", lambda *a: headers.append(a) or unpack(*a))
    assert runs.list_runs(str(tmp_path)) == first
    assert len(parsed) == 40 + 1 and headers == []
    (tmp_path / "r05" / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    assert {r["name"]: r["trainable_params"] for r in runs.list_runs(str(tmp_path))}["r05"] == 0
    assert len(headers) == 1


def test_the_pages_files_are_revalidated_on_each_load(tmp_path):
    """index.html, app.js and style.css came with Last-Modified and an ETag but no Cache-Control: a browser may keep
    them fresh for a tenth of their age (RFC 9111, 4.2.2) and, after deltatune is upgraded, run the old app.js
    against the new API on a reload. Now ``no-cache``: asked again each load, answered 304 while unchanged."""
    c = client(tmp_path)
    for path in ("/", "/static/index.html", "/static/app.js", "/static/style.css"):
        first = c.get(path)
        assert first.status_code == 200 and first.headers["cache-control"] == "no-cache", path
        again = c.get(path, headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 304 and again.content == b"", path


def test_if_none_match_compares_weakly_reads_every_line_and_takes_a_star(tmp_path):
    """RFC 9110, 13.1.2: If-None-Match is ``*`` or a list of tags, compared weakly (``W/`` ignored), its commas with
    or without spaces, over every line of the header. Only ``", "`` was split, one line read, a tag compared as it
    came: each of these got the whole file again (200). A miss is still the file, a missing asset still a 404."""
    c = client(tmp_path)
    first = c.get("/static/app.js")
    etag = first.headers["etag"]
    hit = {
        "weak": [("If-None-Match", f"W/{etag}")],
        "star": [("If-None-Match", "*")],
        "no spaces": [("If-None-Match", f'"x",{etag}')],
        "wide spaces": [("If-None-Match", f'"x"  ,\t W/{etag} ')],
        "a comma in a tag": [("If-None-Match", f'"a, b", {etag}')],
        "second line": [("If-None-Match", '"x"'), ("If-None-Match", etag)],
    }
    for case, headers in hit.items():
        again = c.get("/static/app.js", headers=headers)
        assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag), case
    for miss in ('"x"', 'W/"x"', f'"{etag}"', etag.strip('"'), ""):  # (a tag unquoted, or quoted twice: no tag)
        again = c.get("/static/app.js", headers={"If-None-Match": miss})
        assert (again.status_code, again.content) == (200, first.content), miss
    assert c.get("/static/nope.js", headers={"If-None-Match": "*"}).status_code == 404


def test_a_recipes_omap_and_pairs_are_lists_of_pairs(tmp_path):
    """PyYAML reads ``!!omap`` and ``!!pairs`` as lists of tuples: since the walk that makes a recipe sendable showed
    any other type as its str, they were shown as "('lr', 1)"; before it, json.dumps sent them as lists."""
    (write_run(tmp_path, "omap") / "run.yaml").write_text(
        "stage: sft\ntrain: !!omap [{lr: 1}, {seed: 2}]\ndata: !!pairs [{a: x}, {a: 2024-01-01}]\n", encoding="utf-8"
    )
    page = client(tmp_path).get("/api/run?name=omap")
    assert page.status_code == 200
    assert page.json()["recipe"] == {
        "stage": "sft",
        "train": [["lr", 1], ["seed", 2]],
        "data": [["a", "x"], ["a", "2024-01-01"]],
    }


def test_a_yaml_alias_bomb_leaves_the_run_listed_and_is_walked_once(tmp_path, monkeypatch):
    """A "billion laughs": 6 levels of 10 aliases are 10^6 values from a few hundred bytes; the walk that makes a recipe
    sendable expanded them twice on each poll of the list (seconds; 9 levels hung the board). Now a run.yaml holding
    more than MAX_NODES values is unreadable (as one nested too deep): walked up to the limit once, kept as such
    until the file changes; its run is listed (no recipe) and its page answers."""
    bomb = "stage: sft\na: &a [" + ", ".join(["lol"] * 10) + "]\n"
    bomb += "".join(f"{b}: &{b} [" + ", ".join([f"*{a}"] * 10) + "]\n" for a, b in zip("abcde", "bcdef"))
    (write_run(tmp_path, "bomb", [{"loss": 0.5, "step": 1}]) / "run.yaml").write_text(bomb, encoding="utf-8")
    write_run(tmp_path, "ok")
    walked, finite = [], runs._finite
    monkeypatch.setattr(runs, "_finite", lambda *a: walked.append(1) or finite(*a))
    listed = {r["name"]: (r["stage"], r["steps"]) for r in runs.list_runs(str(tmp_path))}
    assert listed == {"bomb": (None, 1), "ok": ("sft", 0)}
    assert runs.MAX_NODES < len(walked) <= runs.MAX_NODES + 100  # (the "ok" run's recipe and files: a few dozen)
    walked.clear()
    assert {r["name"] for r in runs.list_runs(str(tmp_path))} == {"bomb", "ok"}
    page = client(tmp_path).get("/api/run?name=bomb")
    assert len(walked) < 100 and page.status_code == 200
    assert (page.json()["recipe"], [r["loss"] for r in page.json()["history"]]) == ({}, [0.5])
    (tmp_path / "bomb" / "run.yaml").write_text("stage: sft\n", encoding="utf-8")  # mended: read again, not cached
    assert {r["name"]: r["stage"] for r in runs.list_runs(str(tmp_path))}["bomb"] == "sft"
