"""Probe 25 of stage rm and PPO's math: a CSV preference file's margin column (read as TRL reads it, through
datasets' CSV builder) and PPO's rewards, GAE and whitening against TRL's PPO trainer's steps 4-6."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tiny import save_tiny

from deltatune.train import build
from deltatune.train.models import load_tokenizer
from deltatune.train.ppo_math import ppo_advantages
from deltatune.train.reward import pairwise_losses
from deltatune.train.table import prepare


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("rm25") / "llama")


def test_a_csv_margin_column_trains_as_trls_reward_trainer_reads_it(base, tmp_path):
    """A CSV's fields are text: HEAD refused every margin of a .csv or .tsv file ("must be a finite number, got
    '0.5'"), which TRL's RewardTrainer (datasets' CSV builder: a float column) trains on. Now read as the number it
    writes; an empty field (datasets: None) is still refused naming the row."""
    from deltatune.data.load import DataError

    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected,margin\nhello there, hi, go away,0.5\ntell me, a story, no,-1.25\n"
                    "what is it, a cat, a dog, 2e-1\n")  # fmt: skip
    tok = load_tokenizer(base)
    recipe = {"stage": "rm", "model": {"name_or_path": base}, "train": {"report_to": ["none"]},
              "data": {"train": str(path), "max_length": 32}, "output": {"dir": str(tmp_path / "r")}}  # fmt: skip
    prepared = prepare(build(recipe), tok)
    theirs = Dataset.from_csv(str(path))["margin"]  # (TRL's load_dataset("csv"))
    batch = prepared.collator(prepared.train)
    assert batch["margin"].tolist() == pytest.approx(theirs)
    chosen, rejected = torch.tensor([0.3, -0.2, 1.0]), torch.tensor([0.1, 0.4, 0.9])
    trl = -torch.nn.functional.logsigmoid(chosen - rejected - torch.tensor(theirs, dtype=torch.float))
    assert torch.allclose(pairwise_losses(chosen, rejected, batch["margin"]), trl)

    path.write_text("prompt,chosen,rejected,margin\nhello there, hi, go away,0.5\ntell me, a story, no,\n")
    with pytest.raises(DataError, match=r"pairs.csv:3: column 'margin' must be a finite number"):
        prepare(build(recipe), tok)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_ppo_rewards_gae_and_whitening_equal_trls_loop_on_responses_without_eos(estimator):
    """TRL's PPOTrainer's steps 4-6 written out (its loop, on responses with no padding: where the score goes and the
    masks of the two agree): KL penalty, the score on the last token, whiten_rewards, GAE, the whitened advantages."""
    g = torch.Generator().manual_seed(0)
    B, R, coef, gamma, lam = 3, 6, 0.05, 0.9, 0.8
    (lp, ref, values), scores = (torch.randn(B, R, generator=g) for _ in range(3)), torch.randn(B, generator=g)
    for whiten_rewards in (False, True):
        ours = ppo_advantages(lp, ref, values, scores, torch.ones(B, R), coef, gamma, lam, estimator, whiten_rewards)
        logr = ref - lp
        kl = -logr if estimator == "k1" else (logr.exp() - 1) - logr
        rewards = -coef * kl
        rewards[:, -1] += scores
        if whiten_rewards:  # masked_whiten(shift_mean=False): the unbiased variance, the mean added back
            rewards = (rewards - rewards.mean()) * torch.rsqrt(rewards.var() + 1e-8) + rewards.mean()
        last, advs = 0.0, []
        for t in reversed(range(R)):
            nextvalues = values[:, t + 1] if t < R - 1 else 0.0
            delta = rewards[:, t] + gamma * nextvalues - values[:, t]
            last = delta + gamma * lam * last
            advs.append(last)
        advantages = torch.stack(advs[::-1], 1)
        returns = advantages + values
        advantages = (advantages - advantages.mean()) * torch.rsqrt(advantages.var() + 1e-8)
        assert torch.allclose(ours["rewards"], rewards, atol=1e-6)
        assert torch.allclose(ours["returns"], returns, atol=1e-6)
        assert torch.allclose(ours["advantages"], advantages, atol=1e-5)


def _datasets_row(tmp_path, texts: list[str]) -> list:
    """Each text as datasets' CSV builder reads it alone in a column (TRL's load_dataset("csv"))."""
    path = tmp_path / "one.csv"
    path.write_text(",".join(f"c{i}" for i in range(len(texts))) + "\n" + ",".join(texts) + "\n", encoding="utf-8")
    row = Dataset.from_csv(str(path)).to_list()[0]
    return [row[f"c{i}"] for i in range(len(texts))]


def test_one_strict_number_grammar_as_datasets_csv_builder_reads_a_field(tmp_path):
    """HEAD read a CSV field with Python's float(): '1_000' -> 1000.0, Arabic '٣' / full-width '２' -> 3.0 / 2.0,
    '\\xa02' -> 2.0, which datasets (pandas) reads as text (TRL's collator then fails); a CSV margin of '1_000' trained
    as 1000.0, a regression label too, a class id '1_000' was class 1000, and the config's number grammar (\\d) took
    '٣' on the command line as 3.0. Now one ASCII grammar, equal to datasets' on each text."""
    from deltatune.data.load import DataError, Row, read_rows
    from deltatune.data.tasks import class_id, regression_target
    from deltatune.train.config import _coerce
    from deltatune.train.reward import _margins

    path = tmp_path / "m.csv"  # the review's reproducer
    path.write_text("prompt,chosen,rejected,margin\na,b,c,0.5\nd,e,f,1_000\n")
    cfg = build({"stage": "rm", "model": {"name_or_path": "x"}, "data": {"train": str(path)}})
    assert Dataset.from_csv(str(path))["margin"] == ["0.5", "1_000"]  # (text: TRL's collator fails on it)
    with pytest.raises(DataError, match=r"m.csv:3: column 'margin' must be a finite number .*got '1_000'"):
        _margins(str(path), cfg)
    assert read_rows(str(path))[0].data["margin"] == "0.5"  # (the reader keeps text; the stages type it)
    for text in ("1_000", "\xa02", "٣"):
        with pytest.raises(DataError, match="is not a finite number"):
            regression_target(Row({"label": text}, "r.csv:2"), "label")
    assert _coerce("٣") == "٣" and _coerce("5e-4") == 5e-4
    assert [class_id(t) for t in ("1_000", "٣", "1.0", " 3 ")] == [None, None, 1, 3]
    from deltatune.data.tasks import csv_number

    texts = ["0.5", " 2 ", "\t7\t", "+.5", "-0", "1e-400", "1e400", "2e-1", "1.", "1_000", "٣", "２", "\xa02", "nan"]
    theirs = _datasets_row(tmp_path, texts)
    assert [csv_number(t) for t in texts] == [None if isinstance(v, str) else v for v in theirs]


def test_ordinary_labels_read_as_before_and_as_datasets_reads_them(tmp_path):
    """An existing cls / regression run's CSV of ordinary numbers gives the labels it trained on: class ids and
    regression targets equal float() of the text (HEAD's reading) and datasets' values."""
    from deltatune.data.load import Row
    from deltatune.data.tasks import label_map, regression_target

    texts = ["1", "2", "10", " 3 ", "-1", "0", "+4"]
    theirs = _datasets_row(tmp_path, texts)
    rows = [Row({"label": t}, f"c.csv:{i + 2}") for i, t in enumerate(texts)]
    assert [regression_target(r, "label") for r in rows] == [float(t) for t in texts] == theirs
    mapping = label_map(rows, "label", None)
    assert mapping == {v: k for k, v in enumerate(sorted(theirs))}  # (run_glue: label_list sorted)
    floats = [Row({"label": t}, "c.csv:2") for t in ("0.25", "-1.5e2", ".5")]
    assert [regression_target(r, "label") for r in floats] == [0.25, -150.0, 0.5]


def test_kto_csv_labels_read_as_trls_kto_reads_datasets_columns(tmp_path):
    """HEAD refused a KTO CSV's label 1.0 / 0.0 ("must be true or false ..., got '1.0'"), which datasets reads as
    float64 and TRL's KTO trains on (torch.as_tensor(labels, dtype=torch.bool)). 1 / 0 and true / false as before."""
    from deltatune.data.formats import _label
    from deltatune.data.load import DataError, read_rows

    for labels in (["1.0", "0.0", "1.0"], ["1", "0", "0"], ["true", "false", "True"], [" 1.0", "0.0 ", "1e0"]):
        path = tmp_path / "k.csv"
        path.write_text("prompt,completion,label\n" + "".join(f"p,c,{x}\n" for x in labels))
        theirs = torch.as_tensor(Dataset.from_csv(str(path))["label"], dtype=torch.bool).tolist()
        assert [_label(r, "label") for r in read_rows(str(path))] == theirs
    path.write_text("prompt,completion,label\np,c,0.5\n")  # (TRL: True; refused here, as before)
    with pytest.raises(DataError, match=r"k.csv:2: column 'label' must be true or false"):
        _label(read_rows(str(path))[0], "label")


def test_grpo_reward_columns_from_a_csv_typed_as_datasets_gives_them_to_trls_rewards(base, tmp_path):
    """HEAD gave GRPO reward functions a CSV's columns as text ({'answer': '42', 'score': ''}); TRL's, read through
    datasets' CSV builder, get {'answer': 42, 'score': None}: a reward written for TRL (a == 42) was always 0."""
    from deltatune.data.load import read_rows
    from deltatune.train.grpo import encode_prompts

    path = tmp_path / "g.csv"  # the review's reproducer
    path.write_text("prompt,answer,score\nwhat is 6*7,42,0.5\nwhat is 1+1,2,\n")
    items, _ = encode_prompts(read_rows(str(path)), load_tokenizer(base), "prompt", 32, "keep_end")
    theirs = [{k: v for k, v in r.items() if k != "prompt"} for r in Dataset.from_csv(str(path)).to_list()]
    assert [it.columns for it in items] == theirs == [{"answer": 42, "score": 0.5}, {"answer": 2, "score": None}]

    from deltatune.data.tasks import csv_typed

    path = tmp_path / "t.tsv"  # per column: ints, ints with a gap, floats, bools, inf, missing values, text
    path.write_text("a\tb\tc\td\te\tf\tg\th\ti\tj\tk\n"
                    "42\t1\t0.5\ttrue\tinf\tNA\tx\t1_000\t1.\t 5\tTRUE\n"
                    "-2\t\t1e5\tFALSE\t-Infinity\tNone\tNone\t2\t\xa02\t6 \t false\n"
                    "7\t3\t+4\tTrue\t1\t\tnull\tn/a\t#N/A\t+7\tTrue\n")  # fmt: skip
    rows = read_rows(str(path))
    ours = csv_typed(rows)
    want = Dataset.from_csv(str(path), sep="\t").to_list()
    assert ours == want and [type(v) for v in ours[0].values()] == [type(v) for v in want[0].values()]
    json_row = [r for r in read_rows(str(path))[:1]]
    json_row[0].source = "x.jsonl:1"  # (a row of another file: as it is)
    assert csv_typed(json_row) == [json_row[0].data]


def test_csv_typed_bools_in_any_case_and_ints_past_int64_as_datasets_reads_them(tmp_path):
    """Second review of d4025e5: csv_typed kept 'TrUe' / 'tRUE' as text (pandas reads true / false in any case:
    datasets gives bools), and typed whole numbers past int64 as Python ints where datasets gives text (mixed signs,
    or a missing value: the missing values stay text too); a column that fits uint64 stays ints."""
    from deltatune.data.load import read_rows
    from deltatune.data.tasks import csv_typed

    path = tmp_path / "b.csv"
    path.write_text("prompt,a,b,c,d,e,f\n"
                    "p,TrUe,tRUE,9223372036854775808,9223372036854775808,9223372036854775808,42\n"
                    "q,false,true,1,-1,NA,\n"
                    "r,FALSE,TRUE,18446744073709551615,5,3,7\n")  # fmt: skip
    ours, want = csv_typed(read_rows(str(path))), Dataset.from_csv(str(path)).to_list()
    assert ours == want and [type(v) for v in ours[0].values()] == [type(v) for v in want[0].values()]
    assert [r["a"] for r in ours] == [True, False, False] and ours[1]["e"] == "NA"


def test_kto_label_word_and_number_stripped_alike_and_score_note_reads_csv_numbers():
    """_label stripped a word with str.strip() ('\\xa0true' accepted) but a number with ASCII spaces only ('\\xa01'
    refused); datasets reads both as text (TRL's torch.as_tensor refuses it): both refused now, ' true ' and ' 1 '
    still read. cls's fraction note read a class with float(): '1_000' and '٣', which pandas reads as text, were
    'fractions' (run_glue trains only a float column as a regression)."""
    from deltatune.data.formats import _label
    from deltatune.data.load import DataError, Row
    from deltatune.train.cls import _score_note

    assert [_label(Row({"label": t}, "k.csv:2"), "label") for t in (" true ", "\tFalse", " 1 ", "0.0")] == [
        True, False, True, False]  # fmt: skip
    for text in ("\xa0true", "\xa01"):
        with pytest.raises(DataError, match=r"k.csv:2: column 'label' must be true or false"):
            _label(Row({"label": text}, "k.csv:2"), "label")
    assert _score_note(["1_000", "2", "abc"]) == [] and _score_note(["٣", "x"]) == []
    assert _score_note(["0.5", "1", "2.25"])[0].startswith("2 of the 3 classes are fractions (0.5, 2.25)")
