"""benchmarks/paired_bleu.py: sacrebleu's paired tests on two rows of llm_quality.py's answers, and the answers file
that llm_quality.py writes for it (its workers replaced by canned rows: the real runs take minutes)."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")
paired_bleu = pytest.importorskip("paired_bleu")
llm_quality = pytest.importorskip("llm_quality")

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "dogs",
    "ran",
    "in",
    "parks",
    "near",
    "blue",
    "rivers",
    "under",
    "old",
    "trees",
]
REFS = [[" ".join(WORDS[i : i + 8]), " ".join(WORDS[i + 1 : i + 9])] for i in range(8)] * 4  # 32 rows, 2 refs each
GOOD = [refs[0] for refs in REFS]
BAD = [" ".join(WORDS[i : i + 3]) + " zebra quietly" for i in range(8)] * 4


def test_a_row_against_itself_differs_by_nothing():
    r = paired_bleu.paired(BAD, BAD, REFS, resamples=200)
    assert r["diff"] == 0 and r["baseline"] == r["system"] == llm_quality.score(BAD, REFS)["bleu"]
    assert r["baseline_ci"] == r["system_ci"]
    # sacrebleu counts only differences larger than the real one (multeval's convention: a system against itself
    # is not "different by chance"), so the p-values are their floor, 1 / (trials + 1)
    assert r["p_bootstrap"] == pytest.approx(1 / 201) and r["p_randomization"] == pytest.approx(1 / 2001)


def test_the_references_beat_a_bad_row_far_beyond_the_noise():
    r = paired_bleu.paired(BAD, GOOD, REFS, resamples=200)
    assert r["system"] == pytest.approx(100.0) and r["baseline"] == pytest.approx(llm_quality.score(BAD, REFS)["bleu"])
    assert r["diff"] > 50 and r["p_bootstrap"] < 0.01 and r["p_randomization"] < 0.01
    half = [good if i % 2 else bad for i, (good, bad) in enumerate(zip(GOOD, BAD))]
    r = paired_bleu.paired(half, GOOD, REFS, resamples=200)
    assert r["system_ci"] == 0 < r["baseline_ci"] < r["diff"]  # only a row that varies varies; the half-width in BLEU


def test_rows_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="differ in length: 32, 31, 32"):
        paired_bleu.paired(BAD, GOOD[:-1], REFS)


def _answers(tmp_path):
    path = tmp_path / "x.answers.json"
    path.write_text(
        json.dumps({"command": "test", "references": REFS, "answers": {"a/deltatune": BAD, "b/peft": GOOD}})
    )
    return str(path)


def test_the_cli_prints_both_rows_and_the_p_values(tmp_path, capsys):
    assert paired_bleu.main([_answers(tmp_path), "a/deltatune", "b/peft", "--resamples", "100"]) == 0
    out = capsys.readouterr().out
    assert "32 eval rows, from: test" in out and "- b/peft: BLEU 100.00" in out
    assert "(paired bootstrap, 100 resamples)" in out and "(approximate randomization, 1000 trials)" in out


def test_identical_answers_are_said_to_be_so_not_tested(tmp_path, capsys):
    path = tmp_path / "same.answers.json"
    path.write_text(json.dumps({"references": REFS, "answers": {"a/deltatune": BAD, "a/peft": list(BAD)}}))
    assert paired_bleu.main([str(path), "a/deltatune", "a/peft"]) == 0
    assert capsys.readouterr().out == "a/deltatune and a/peft gave the same answers on all 32 rows: nothing to test\n"


ROWS = {"a/deltatune": BAD, "b/peft": GOOD}


@pytest.mark.parametrize(
    ("saved", "args", "message"),
    [
        (
            {"references": REFS, "answers": ROWS},
            ["c/peft"],
            "x.answers.json has no row 'c/peft'; it has a/deltatune, b/peft",
        ),
        (None, ["b/peft"], "x.answers.json: No such file or directory"),
        ({"references": REFS[:-1], "answers": ROWS}, ["b/peft"], "the two rows and the references differ in length"),
        ({"answers": ROWS}, ["b/peft"], "x.answers.json: not an answers file (no 'references')"),
        (
            {"references": REFS, "answers": ROWS},
            ["b/peft", "--resamples", "0"],
            "--resamples must be at least 1, got 0",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, saved, args, message):
    path = tmp_path / "x.answers.json"
    if saved is not None:
        path.write_text(json.dumps(saved))
    assert paired_bleu.main([str(path), "a/deltatune", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.skipif(not os.path.isdir(llm_quality.DATA), reason="../shared/data is not beside the repository")
def test_llm_quality_writes_every_rows_answers_beside_its_report(tmp_path, monkeypatch):
    def canned(jobs, parallel):
        return [{"method": m, "side": s, "answers": [f"{m} {s} {i}" for i in range(3)]} for m, s, _ in jobs]

    monkeypatch.setattr(llm_quality, "_run", canned)
    monkeypatch.setattr(llm_quality, "_table", lambda results: "")
    out = tmp_path / "run.md"
    llm_quality.main(["--methods", "lora", "--sides", "deltatune,peft", "--eval-rows", "3", "--out", str(out)])
    saved = json.loads((tmp_path / "run.answers.json").read_text())
    assert list(saved["answers"]) == ["base/deltatune", "lora/deltatune", "lora/peft"]
    assert saved["answers"]["lora/peft"] == ["lora peft 0", "lora peft 1", "lora peft 2"]
    assert len(saved["references"]) == 3 and all(isinstance(r, list) and r for r in saved["references"])


def test_the_system_row_can_come_from_another_run_on_the_same_rows(tmp_path, capsys):
    one = _answers(tmp_path)
    later = tmp_path / "later.answers.json"
    later.write_text(json.dumps({"command": "later", "references": REFS, "answers": {"a/deltatune": GOOD}}))
    # the same row name in both files: the baseline from the first, the system from the second
    assert (
        paired_bleu.main([one, "a/deltatune", "a/deltatune", "--system-from", str(later), "--resamples", "100"]) == 0
    )
    out = capsys.readouterr().out
    assert "from: test and later" in out and "- a/deltatune: BLEU 100.00" in out
    bad = llm_quality.score(BAD, REFS)["bleu"]
    assert f"- a/deltatune: BLEU {bad:.2f}" in out and f"difference {100 - bad:+.2f}" in out


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        (
            {"references": REFS[::-1], "answers": ROWS},
            "other.answers.json scored different eval rows (their references differ)",
        ),
        (
            {"references": REFS, "answers": {"b/peft": GOOD}},
            "other.answers.json has no row 'a/deltatune'; it has b/peft",
        ),
        (None, "other.answers.json: No such file or directory"),
        (  # a row shorter than its own references: both files are named, since either may be at fault
            {"references": REFS, "answers": {"a/deltatune": GOOD[:-1]}},
            "x.answers.json and ",  # then other.answers.json's path
        ),
        (
            {"references": REFS, "answers": {"a/deltatune": GOOD[:-1]}},
            "other.answers.json: the two rows and the references differ in length: 32, 31, 32",
        ),
    ],
)
def test_a_system_row_from_another_run_is_checked_first(tmp_path, capsys, saved, message):
    other = tmp_path / "other.answers.json"
    if saved is not None:
        other.write_text(json.dumps(saved))
    assert paired_bleu.main([_answers(tmp_path), "b/peft", "a/deltatune", "--system-from", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
