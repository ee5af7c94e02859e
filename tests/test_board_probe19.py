"""Probe 19 of ``deltatune board``: the trainable-parameter figure of a run against peft's
print_trainable_parameters."""

from __future__ import annotations

import os
import shutil
import sys
import warnings

import pytest

pytest.importorskip("fastapi")
peft = pytest.importorskip("peft")
sys.path.insert(0, os.path.dirname(__file__))

from test_board_probe11 import run_js, write_run  # noqa: E402
from tiny import tiny_model  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.board import runs  # noqa: E402

PROMPT = dict(num_virtual_tokens=3, encoder_hidden_size=8)
REPARAMETRISED = {
    "prefix-projection": ("llama", "PrefixTuningConfig", dict(prefix_projection=True)),
    "p-tuning-mlp": ("llama", "PromptEncoderConfig", {}),
    "p-tuning-lstm": ("llama", "PromptEncoderConfig", dict(encoder_reparameterization_type="LSTM")),
    "p-tuning-lstm-3": (
        "llama",
        "PromptEncoderConfig",
        dict(encoder_reparameterization_type="LSTM", encoder_num_layers=3),
    ),
    "p-tuning-t5": ("t5", "PromptEncoderConfig", {}),  # two transformer submodules: twice the table's rows
    "prefix-projection-t5": ("t5", "PrefixTuningConfig", dict(prefix_projection=True)),
    "prefix-plain": ("llama", "PrefixTuningConfig", {}),  # no reparametrisation: the file's count is peft's
}


@pytest.mark.parametrize("lib", ["peft", "deltatune"])
def test_trainable_params_of_a_reparametrised_prompt_method_are_peft_print_trainable_parameters(tmp_path, lib):
    """Prefix tuning with prefix_projection and P-tuning save only the folded prefixes (peft's prompt_embeddings):
    the board counted the file's values, 192 for a prefix run whose print_trainable_parameters said 760 (P-tuning:
    96 for 720, its LSTM encoder 96 for 5,264). The figure is now peft's, for either library's saved adapter."""
    want = {}
    for name, (family, cls, extra) in REPARAMETRISED.items():
        task = "SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM"
        module = peft if lib == "peft" else dt
        config = getattr(module, cls)(task_type=task, **PROMPT, **extra)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = (peft.get_peft_model if lib == "peft" else dt.get_delta_model)(tiny_model(family), config)
            want[name] = model.get_nb_trainable_parameters()[0]
            model.save_pretrained(str(write_run(tmp_path, name)))
    listed = {r["name"]: r["trainable_params"] for r in runs.list_runs(str(tmp_path))}
    assert listed == want
    assert want["prefix-projection"] == 760 and want["p-tuning-lstm"] == 5264  # (hand-checked, see the docstring)


def test_a_config_naming_no_sizes_keeps_the_files_count(tmp_path):
    """An adapter_config.json without the sizes (or with text for them) leaves the count of the file's values."""
    folder = write_run(tmp_path, "r")
    model = dt.get_delta_model(tiny_model("llama"), dt.PromptEncoderConfig(task_type="CAUSAL_LM", **PROMPT))
    model.save_pretrained(str(folder))
    (folder / "adapter_config.json").write_text('{"peft_type": "P_TUNING", "token_dim": "32"}', encoding="utf-8")
    assert runs.trainable_parameters(str(folder)) == 3 * 32


def test_the_pages_files_answer_if_modified_since_as_rfc_9110_says(tmp_path):
    """RFC 9110, 13.1.3: without If-None-Match, an If-Modified-Since at or after the file's Last-Modified is a 304
    (``curl -z``, a proxy revalidating on the date alone got the whole file each time); an earlier date, one that does
    not parse or two of them get the file; an If-None-Match present decides alone."""
    from email.utils import formatdate, parsedate_to_datetime

    from fastapi.testclient import TestClient

    from deltatune.board import create_app

    c = TestClient(create_app(str(tmp_path)), base_url="http://127.0.0.1")
    for path in ("/", "/static/app.js", "/static/style.css"):
        first = c.get(path)
        modified = first.headers["last-modified"]
        earlier = formatdate(parsedate_to_datetime(modified).timestamp() - 1, usegmt=True)
        later = formatdate(parsedate_to_datetime(modified).timestamp() + 3600, usegmt=True)
        cases = {
            "same": ([("If-Modified-Since", modified)], 304),
            "later": ([("If-Modified-Since", later)], 304),
            "earlier": ([("If-Modified-Since", earlier)], 200),
            "not a date": ([("If-Modified-Since", "yesterday")], 200),
            "two values": ([("If-Modified-Since", modified), ("If-Modified-Since", later)], 200),
            "etag decides": ([("If-None-Match", '"other"'), ("If-Modified-Since", modified)], 200),
        }
        for case, (headers, status) in cases.items():
            got = c.get(path, headers=headers)
            assert (got.status_code, len(got.content) if status == 200 else got.content) == (
                status,
                len(first.content) if status == 200 else b"",
            ), (path, case)
            if status == 304:
                assert got.headers["etag"] == first.headers["etag"] and got.headers["cache-control"] == "no-cache"


def _adapter(folder, shapes: dict[str, list[int]]) -> None:
    import json
    import struct

    header = json.dumps({k: {"dtype": "F32", "shape": v, "data_offsets": [0, 0]} for k, v in shapes.items()}).encode()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)


def test_a_training_run_shows_its_newest_checkpoints_trainable_params(tmp_path):
    """A run writes adapter_model.safetensors at its end: while it trained (hours beside checkpoint-500's adapter)
    the page said "trainable parameters: when saved". The newest checkpoint's adapter (by step: checkpoint-10 after
    checkpoint-2) counts until then; one still being written is passed over, one linked out of the run not read."""
    run = write_run(tmp_path, "r")
    assert runs.trainable_parameters(str(run)) is None
    _adapter(run / "checkpoint-2", {"a": [2, 3]})
    _adapter(run / "checkpoint-10", {"a": [2, 3], "b": [4]})
    assert runs.trainable_parameters(str(run)) == 10
    (run / "checkpoint-12").mkdir()
    (run / "checkpoint-12" / "adapter_model.safetensors").write_bytes(b"\x40\x00")  # its header not yet written
    _adapter(tmp_path / "elsewhere", {"a": [1000]})
    (run / "checkpoint-99").symlink_to(tmp_path / "elsewhere")
    assert {r["name"]: r["trainable_params"] for r in runs.list_runs(str(tmp_path))} == {"r": 10}
    _adapter(run, {"a": [7]})  # the run's own, at its end
    assert runs.trainable_parameters(str(run)) == 7


def test_a_preference_runs_headline_holds_its_reward_accuracy(tmp_path):
    """A DPO run's metrics.json holds TRL's ``eval_rewards/accuracies`` (deltatune.train.dpo); the list's headline
    looked for ``eval_reward_accuracy``, which no stage writes, and showed the DPO run's loss alone."""
    import json

    run = write_run(tmp_path, "dpo", recipe={"stage": "dpo"})
    metrics = {"eval_loss": 0.61, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.4, "train_loss": 0.65}
    (run / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (row,) = runs.list_runs(str(tmp_path))
    assert row["metrics"] == {"eval_rewards/accuracies": 0.75, "eval_loss": 0.61, "train_loss": 0.65}


def test_a_runs_page_is_a_304_while_the_run_is_unchanged(tmp_path):
    """The page polls /api/run every second: the whole thinned history (hundreds of KB) was sent each time, with no
    validator, a run finished days ago too. It now comes with an ETag of its text and ``no-cache``: the same poll with
    If-None-Match is a 304 until a line is logged, then the new text with a new tag."""
    import json

    from fastapi.testclient import TestClient

    from deltatune.board import create_app

    run = write_run(tmp_path, "r", rows=[{"loss": 2.0, "step": 1, "epoch": 0.5}])
    c = TestClient(create_app(str(tmp_path)), base_url="http://127.0.0.1")
    first = c.get("/api/run", params={"name": "r"})
    tag = first.headers["etag"]
    assert first.status_code == 200 and first.headers["cache-control"] == "no-cache"
    assert [h["loss"] for h in first.json()["history"]] == [2.0]
    for sent in (tag, f"W/{tag}", f'"x", {tag}'):
        again = c.get("/api/run", params={"name": "r"}, headers={"If-None-Match": sent})
        assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", tag)
    with open(run / "log_history.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"loss": 1.5, "step": 2, "epoch": 1.0}) + "\n")
    grown = c.get("/api/run", params={"name": "r"}, headers={"If-None-Match": tag})
    assert grown.status_code == 200 and grown.headers["etag"] != tag
    assert [h["loss"] for h in grown.json()["history"]] == [2.0, 1.5]
    assert c.get("/api/run", params={"name": "nope"}, headers={"If-None-Match": "*"}).status_code == 404
    listed = c.get("/api/runs")  # the list, polled as often, alike
    assert [r["steps"] for r in listed.json()["runs"]] == [2] and listed.headers["cache-control"] == "no-cache"
    assert c.get("/api/runs", headers={"If-None-Match": listed.headers["etag"]}).status_code == 304
    write_run(tmp_path, "second")
    assert len(c.get("/api/runs", headers={"If-None-Match": listed.headers["etag"]}).json()["runs"]) == 2


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node")
def test_a_small_metric_is_shown_in_significant_digits():
    """The run list's headline, the final metrics and the compare table showed every value to 4 decimals: a train_loss
    of 3.2e-05 (metrics.json) read 0.0000, 2e-07 as well, -0.0004 kept one digit of four."""
    got = run_js("[3.2e-05, -4e-4, 2e-07, 0.5, 1234.56789, 7, 0.001].map(fmt)")
    assert got == ["3.200e-5", "-4.000e-4", "2.000e-7", "0.5000", "1234.5679", "7", "0.0010"]
