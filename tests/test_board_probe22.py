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

from deltatune.board import create_app, runs  # noqa: E402


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


AXES = ("step", "epoch", "wall_time")  # a row's x; each other key is a TensorBoard tag


def tensorboard_scalars(folder, rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard's EventAccumulator shows of ``rows`` written as events (one event per row, a value per
    non-axis key), read by its own reader: (step, value) per tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "events.out.tfevents.1.probe"), "wb") as fh:
        writer = RecordWriter(fh)  # (no file_version event: TensorBoard purges by out-of-order steps)
        for row in rows:
            values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in row.items() if k not in AXES]
            event = event_pb2.Event(step=row["step"], wall_time=1.0, summary=summary_pb2.Summary(value=values))
            writer.write(event.SerializeToString())
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0}, purge_orphaned_data=True)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def board_scalars(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for k, v in row.items():
            if k not in AXES:
                out.setdefault(k, []).append((row["step"], v))
    return out


def test_a_log_that_goes_back_in_steps_is_read_as_tensorboard_purges_it(tmp_path):
    """A log written on after a restart from an earlier checkpoint (without being rewritten, as another tool's or an
    older deltatune's) holds steps 1..10, then 6..8 again. The board sent every row: the curve ran to step 10, went
    back to 6 and drew the lost steps beside the new ones. TensorBoard's reader drops, for each value of a row behind
    the highest step, that value's earlier points at that step or later; the run's page now holds exactly its points
    (an eval value logged at other steps is purged alike, a value the later rows do not log is kept)."""
    pytest.importorskip("tensorboard")
    rows = [{"loss": 10.0 - s, "learning_rate": 0.1 * s, "step": s, "epoch": s / 10} for s in range(1, 11)]
    rows[4]["grad_norm"] = 7.0  # (step 5: a value only this row holds)
    rows.insert(9, {"eval_loss": 3.0, "step": 9})  # an eval row at step 9, and one at 4 after the restart
    rows += [{"loss": 20.0 + s, "learning_rate": 1.0 + s, "step": s, "epoch": s / 10} for s in (6, 7, 8)]
    rows += [{"eval_loss": 2.5, "step": 4}, {"loss": 1.0, "learning_rate": 2.0, "step": 9, "epoch": 0.9}]
    run = write_run(tmp_path / "runs", "r", rows)
    want = tensorboard_scalars(tmp_path / "tb", rows)
    assert want["loss"] == [(s, 10.0 - s) for s in range(1, 6)] + [(6, 26.0), (7, 27.0), (8, 28.0), (9, 1.0)]
    assert want["eval_loss"] == [(4, 2.5)] and want["grad_norm"] == [(5, 7.0)]
    client = TestClient(create_app(str(tmp_path / "runs")), base_url="http://127.0.0.1")
    got = client.get("/api/run", params={"name": "r", "points": 0}).json()
    assert board_scalars(got["history"]) == {k: [(s, pytest.approx(v)) for s, v in p] for k, p in want.items()}
    assert [h["step"] for h in got["history"]] == [1, 2, 3, 4, 5, 6, 7, 8, 4, 9] and got["history_rows"] == 10
    steps = [h["step"] for h in runs.history(str(run))]
    assert steps == [r["step"] for r in rows]  # (the file itself is read whole, as before; the page's rows are purged)
    in_order = rows[:11]
    assert runs.purged(in_order) is in_order  # a log in order: sent as it is, nothing copied
