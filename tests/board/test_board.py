"""The board's JSON API over run folders: every stage listed with its status, metrics and trainable count; a file
being written while the board reads it is never an error; nothing outside the runs folder is ever served."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
import yaml
from fastapi import FastAPI, Request  # at module level: FastAPI resolves the routes' annotations by name
from safetensors.torch import save_file
from serving import Server  # tests/serve/serving.py

from deltatune.board import create_app
from deltatune.train.config import STAGES


def write_run(root, name: str, stage: str, metrics: dict | None = None, method: str = "lora") -> str:
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    recipe = {"stage": stage, "model": {"name_or_path": "tiny"}, "method": {"name": method, "r": 4},
              "train": {"lr": 0.01}, "output": {"dir": folder}}  # fmt: skip
    with open(os.path.join(folder, "run.yaml"), "w") as fh:
        yaml.safe_dump(recipe, fh)
    if metrics is not None:
        with open(os.path.join(folder, "metrics.json"), "w") as fh:
            json.dump(metrics, fh)
    return folder


def get(server: Server, path: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as resp:
            body = resp.read()
            return resp.status, json.loads(body) if resp.headers["content-type"].startswith(
                "application/json"
            ) else body
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def raw_get(server: Server, path: str, host: str = "127.0.0.1", headers: str = "") -> int:
    """GET with the path sent as is (no client-side normalisation of '..')."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n".encode())
        return int(s.recv(64).split()[1])


@pytest.fixture
def board(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    server = Server(create_app(str(root)))
    yield str(root), server
    server.stop()


def test_lists_runs_of_every_stage_with_status_metrics_and_trainable_count(board):
    root, server = board
    for stage in STAGES:
        write_run(root, f"{stage}-run", stage, {"train_loss": 1.5, "eval_loss": 1.25})
    folder = write_run(root, "group/live", "sft")  # a run in a sub-folder, still training: no metrics yet
    save_file(
        {"a": torch.zeros(4, 8), "b": torch.zeros(3), "c": torch.zeros(2, 2, 5)}, f"{folder}/adapter_model.safetensors"
    )
    with open(os.path.join(folder, "log_history.jsonl"), "w") as fh:
        fh.write('{"loss": 2.0, "step": 1}\n{"loss": 1.5, "step": 2}\n{"loss": 1.2, "st')  # a partial last line
    write_run(root, "dead", "dpo")
    with open(os.path.join(root, ".dead.lock"), "w") as fh:  # the lock of a training process that is gone
        json.dump({"pid": 2**22 + 12345, "host": socket.gethostname()}, fh)
    old = write_run(root, "old", "pt")
    os.utime(os.path.join(old, "run.yaml"), (time.time() - 3600, time.time() - 3600))  # silent for an hour
    status, data = get(server, "/api/runs")
    assert status == 200
    runs = {r["name"]: r for r in data["runs"]}
    assert set(runs) == {f"{s}-run" for s in STAGES} | {"group/live", "dead", "old"}
    assert {runs[f"{s}-run"]["stage"] for s in STAGES} == set(STAGES)
    assert runs["cls-run"]["status"] == "finished" and runs["cls-run"]["metrics"] == {
        "train_loss": 1.5,
        "eval_loss": 1.25,
    }
    assert runs["group/live"]["status"] == "running"
    assert runs["group/live"]["trainable_params"] == 4 * 8 + 3 + 2 * 2 * 5
    assert runs["group/live"]["steps"] == 2
    assert runs["dead"]["status"] == "failed" and runs["old"]["status"] == "failed"
    status, run = get(server, "/api/run?name=group/live")
    assert status == 200 and [h["loss"] for h in run["history"]] == [2.0, 1.5]
    assert run["recipe"]["stage"] == "sft" and run["method"] == "lora"


def test_a_file_written_while_the_board_reads_is_never_an_error(board):
    root, server = board
    folder = write_run(root, "busy", "cls")
    text = json.dumps({"eval_accuracy": 0.75, "train_loss": 0.5, "eval_loss": 0.25})
    stop = threading.Event()

    def writer() -> None:  # rewrites metrics.json and run.yaml in place, leaving them half-written for a while
        with open(os.path.join(folder, "run.yaml")) as fh:
            recipe = fh.read()
        while not stop.is_set():
            for name, body in (("metrics.json", text), ("run.yaml", recipe)):
                with open(os.path.join(folder, name), "w") as fh:
                    fh.write(body[: len(body) // 2])
                    fh.flush()
                    time.sleep(0.002)
                    fh.write(body[len(body) // 2 :])

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    try:
        for _ in range(150):
            for path in ("/api/runs", "/api/run?name=busy"):
                status, data = get(server, path)
                assert status == 200, data
                row = data["runs"][0] if "runs" in data else data
                seen.add(json.dumps(row["metrics"], sort_keys=True))
                assert row["metrics"] in ({}, {"eval_accuracy": 0.75, "train_loss": 0.5, "eval_loss": 0.25})
    finally:
        stop.set()
        thread.join()
    assert len(seen) == 2  # the reads did catch the file half-written, and whole


def test_never_serves_a_file_outside_the_runs_folder(board, tmp_path):
    root, server = board
    secret = tmp_path / "secret"
    secret.mkdir()
    write_run(str(tmp_path), "secret", "cls", {"eval_loss": 9.0})
    (secret / "training_curve.png").write_bytes(b"\x89PNG secret")
    os.symlink(secret, os.path.join(root, "linked"))  # a run folder that is a symlink to outside
    inner = write_run(root, "inner", "cls", {"eval_loss": 1.0})
    os.symlink(secret / "training_curve.png", os.path.join(inner, "training_curve.png"))
    status, data = get(server, "/api/runs")
    assert [r["name"] for r in data["runs"]] == ["inner"]
    for name in ("../secret", "linked", str(secret), "inner/../../secret", "%2e%2e/secret"):
        status, _ = get(server, "/api/run?name=" + urllib.request.quote(name))
        assert status == 404, name
    for query in ("run=inner&name=training_curve.png", "run=../secret&name=training_curve.png",
                  "run=linked&name=training_curve.png", "run=inner&name=../../secret/training_curve.png",
                  "run=inner&name=run.yaml"):  # fmt: skip
        status, _ = get(server, "/api/file?" + query)
        assert status == 404, query
    for path in (
        "/static/../../pyproject.toml",
        "/static/%2e%2e%2f__init__.py",
        "/static/runs.py",
        "/../secret/run.yaml",
    ):
        assert raw_get(server, path) == 404, path
    status, page = get(server, "/")
    assert status == 200 and b"deltatune board" in page
    # DNS rebinding: a page of evil.example whose name resolves to 127.0.0.1 is same-origin for the browser; its
    # requests still name its host, and the board answers local names only.
    for host in ("evil.example:8000", "evil.example", "127.0.0.1.evil.example", ""):
        assert raw_get(server, "/api/runs", host=host) == 403, host
    for host in ("localhost:7860", "127.0.0.1", "[::1]:7860"):
        assert raw_get(server, "/api/runs", host=host) == 200, host
    assert raw_get(server, "/api/runs", headers="Sec-Fetch-Site: cross-site\r\n") == 403
    # a link to the board followed from another site: a top-level navigation, whose answer only the user sees
    assert raw_get(server, "/", headers="Sec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: navigate\r\n") == 200
    status, js = get(server, "/static/app.js")
    assert status == 200 and b"function chart" in js


def test_files_inside_a_run_linked_to_outside_are_not_read(board, tmp_path):
    """A run folder inside the runs folder whose report.md, metrics.json or log are symlinks to files elsewhere: the
    report was served (any file the board's user could read), now each is read as missing; a run.yaml linked out
    makes it no run."""
    root, server = board
    secret = tmp_path / "secret.md"
    secret.write_text("SECRET", encoding="utf-8")
    outside = write_run(str(tmp_path), "outside", "cls", {"eval_loss": 9.0})
    inner = write_run(root, "inner", "cls")
    for name, target in (("report.md", secret), ("metrics.json", os.path.join(outside, "metrics.json")),
                         ("log_history.jsonl", secret)):  # fmt: skip
        os.symlink(target, os.path.join(inner, name))
    linked = os.path.join(root, "linked")
    os.makedirs(linked)
    os.symlink(os.path.join(outside, "run.yaml"), os.path.join(linked, "run.yaml"))
    status, data = get(server, "/api/run?name=inner")
    assert status == 200 and data["report"] is None and data["all_metrics"] == {} and data["history"] == []
    assert "SECRET" not in json.dumps(data)
    assert [r["name"] for r in get(server, "/api/runs")[1]["runs"]] == ["inner"]
    assert get(server, "/api/run?name=linked")[0] == 404


def test_a_run_file_that_is_not_text_is_skipped_not_an_error(board):
    """Bytes that are not UTF-8 in one run's log_history.jsonl made /api/runs a 500 for every run; now the bad
    lines are skipped and the good ones kept."""
    root, server = board
    write_run(root, "fine", "cls", {"eval_loss": 1.0})
    bad = write_run(root, "bad", "cls")
    with open(os.path.join(bad, "log_history.jsonl"), "wb") as fh:
        fh.write(b'{"step": 1, "loss": 2.0}\n\xff\xfe\x00garbage\n{"step": 2, "loss": 1.5}\n')
    with open(os.path.join(bad, "metrics.json"), "wb") as fh:
        fh.write(b"\xff\xfe")
    status, data = get(server, "/api/runs")
    assert status == 200 and sorted(r["name"] for r in data["runs"]) == ["bad", "fine"]
    status, data = get(server, "/api/run?name=bad")
    assert status == 200 and [r["loss"] for r in data["history"]] == [2.0, 1.5] and data["all_metrics"] == {}


def test_one_odd_run_leaves_the_list_and_the_pages_whole(board):
    """Each of these made /api/runs (every run) or a run's page a 500: a folder name that is not UTF-8, NaN nested
    in metrics.json or run.yaml, an adapter header that is a list, a log line nested past the JSON parser's depth,
    a NUL byte in a run name."""
    root, server = board
    write_run(root, "fine", "cls", {"eval_loss": 1.0})
    write_run(os.fsencode(root).decode(), os.fsdecode(b"caf\xe9"), "cls")  # a Latin-1 name from an old archive
    nested = write_run(root, "nested", "cls", {"eval_per_class": {"a": float("nan")}, "eval_loss": float("inf")})
    with open(os.path.join(nested, "run.yaml"), "a") as fh:
        fh.write("extra: {x: .inf}\n")
    with open(os.path.join(nested, "log_history.jsonl"), "w") as fh:
        fh.write('{"step": 1, "loss": 2.0, "per": [NaN]}\n' + "[" * 100_000 + "\n")
    with open(os.path.join(nested, "adapter_model.safetensors"), "wb") as fh:
        header = b"[1, 2]"
        fh.write(len(header).to_bytes(8, "little") + header)
    status, data = get(server, "/api/runs")
    assert status == 200 and sorted(r["name"] for r in data["runs"]) == ["fine", "nested"]
    status, run = get(server, "/api/run?name=nested")
    assert status == 200 and run["all_metrics"] == {"eval_per_class": {"a": None}, "eval_loss": None}
    assert run["recipe"]["extra"] == {"x": None} and run["history"] == [{"step": 1, "loss": 2.0, "per": [None]}]
    assert run["steps"] == 1 and run["trainable_params"] == 0
    assert get(server, "/api/run?name=a%00b")[0] == 404 and get(server, "/api/file?run=a%00b&name=report.md")[0] == 404


def test_the_listing_reads_a_long_logs_last_step_from_its_end(board, monkeypatch):
    """The list parsed every line of every run's log for its last step, again on each poll of the page."""
    from deltatune.board import runs

    root, server = board
    folder = write_run(root, "long", "sft")
    with open(os.path.join(folder, "log_history.jsonl"), "w") as fh:
        fh.writelines(json.dumps({"loss": 1.0 / (i + 1), "step": i + 1}) + "\n" for i in range(20_000))
        fh.write('{"loss": 0.1, "st')  # a partial last line
    parsed, row = [], runs._row
    monkeypatch.setattr(runs, "_row", lambda line: parsed.append(line) or row(line))
    assert runs.summary(root, "long")["steps"] == 20_000
    assert len(parsed) < 2_000


def test_the_charts_range_is_found_without_spreading_the_points():
    """Math.min(...points) overflowed the browser's call stack past about 120,000 points (a long GRPO log)."""
    from pathlib import Path

    import deltatune.board

    source = (Path(deltatune.board.__file__).parent / "static" / "app.js").read_text(encoding="utf-8")
    assert "Math.min(..." not in source and "Math.max(..." not in source


def test_playground_calls_are_forwarded_to_the_serve_process_with_its_key(tmp_path):
    """With --serve URL the page talks to /api/serve/v1/...; the board adds the key, the page never holds it."""
    seen = []
    upstream = FastAPI()

    @upstream.post("/v1/chat/completions")
    async def chat(request: Request):
        seen.append((request.headers.get("authorization"), await request.json()))
        return {"choices": [{"message": {"content": "hi"}}]}

    @upstream.get("/v1/models")
    async def models():
        return {"data": [{"id": "base"}]}

    serve = Server(upstream)
    board = Server(create_app(str(tmp_path), serve_url=serve.url, serve_key="sekret"))
    try:
        status, config = get(board, "/api/config")
        assert config["playground"] == "/api/serve/v1" and "sekret" not in json.dumps(config)
        assert get(board, "/api/serve/v1/models") == (200, {"data": [{"id": "base"}]})
        body = {"model": "base", "messages": [{"role": "user", "content": "x"}]}
        req = urllib.request.Request(board.url + "/api/serve/v1/chat/completions", data=json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["choices"][0]["message"]["content"] == "hi"
        assert seen == [("Bearer sekret", body)]
        # A page on another site cannot make the user's browser use the board (and the key it holds): a cross-site
        # POST (text/plain needs no CORS preflight, so the browser sends it) is refused before it is forwarded.
        evil = urllib.request.Request(
            board.url + "/api/serve/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "text/plain", "Origin": "https://evil.example"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(evil, timeout=30)
        assert refused.value.code == 403 and b"another web origin (https://evil.example)" in refused.value.read()
        assert len(seen) == 1
        same = urllib.request.Request(  # the board's own page: its origin is the board's
            board.url + "/api/serve/v1/chat/completions", data=json.dumps(body).encode(), headers={"Origin": board.url}
        )
        with urllib.request.urlopen(same, timeout=30) as resp:
            assert resp.status == 200 and len(seen) == 2
    finally:
        board.stop()
        serve.stop()


def test_stages_with_their_own_loop_leave_a_log_history_for_the_board(tmp_path):
    """report.write writes the history a loop stage returns (PPO, GRPO, ...) unless the Trainer wrote it live."""
    from deltatune.board.runs import history
    from deltatune.train import report

    recipe = {"stage": "ppo", "method": {"name": "lora"}, "model": {"name_or_path": "tiny"}}
    rows = [{"step": 1, "reward": 0.5, "loss": 2.0}, {"step": 2, "reward": float("nan"), "loss": 1.5}]
    report.write(str(tmp_path), recipe, {"reward": 0.75}, rows, [], None)
    assert history(str(tmp_path)) == [rows[0], {"step": 2, "reward": None, "loss": 1.5}]
    live = tmp_path / "live"
    live.mkdir()
    (live / "log_history.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    report.write(str(live), recipe, {}, rows, [], None)
    assert history(str(live)) == [{"step": 1, "loss": 3.0}]


def test_the_live_log_restarts_with_a_run_and_keeps_the_steps_a_resumed_run_keeps(tmp_path):
    import copy
    from types import SimpleNamespace

    from deltatune.board.runs import history
    from deltatune.train.trainer_callbacks import LogFile

    args, log = SimpleNamespace(output_dir=str(tmp_path)), LogFile()
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, log_history=[])

    def trainer_log(logs: dict) -> None:  # as Trainer.log: the row joins state.log_history, then the callbacks run
        state.log_history.append({**logs, "step": state.global_step})
        log.on_log(args, state, None, logs=logs)

    (tmp_path / "log_history.jsonl").write_text('{"step": 9, "loss": 9.0}\n')  # an older run's
    log.on_train_begin(args, state, None)
    for step in (1, 2, 3, 4):
        state.global_step = step
        trainer_log({"loss": float(step)})
    rows = history(str(tmp_path))
    times = [r["wall_time"] for r in rows]
    assert all(isinstance(t, float) for t in times)  # each row's time (the board's time axes)
    assert [t["wall_time"] for t in state.log_history] == times  # kept in trainer_state.json's rows too
    assert [{k: v for k, v in r.items() if k != "wall_time"} for r in rows] == [
        {"loss": float(s), "step": s} for s in (1, 2, 3, 4)
    ]
    state.global_step = 2  # resumed from checkpoint-2: its history (with its times); steps 3 and 4 are redone
    state.log_history = copy.deepcopy(state.log_history[:2])
    log.on_train_begin(args, state, None)
    state.global_step = 3
    trainer_log({"loss": 0.5})
    rows = history(str(tmp_path))
    assert [r["wall_time"] for r in rows[:2]] == times[:2]  # the earlier rows keep their times
    assert isinstance(rows[2].pop("wall_time"), float)
    assert [{k: v for k, v in r.items() if k != "wall_time"} for r in rows] == [
        {"loss": 1.0, "step": 1},
        {"loss": 2.0, "step": 2},
        {"loss": 0.5, "step": 3},
    ]
