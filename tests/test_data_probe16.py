"""Data probe 16: run_summarization's seq2seq metrics (rouge1, rouge2, rougeL, rougeLsum and gen_len, against
rouge-score and the generate output), a raw PPO prompt opening as its raw training rows do, and the leftovers of probe
15 (audio markers, non-alternating sharegpt rows, the mask_history cut) against LLaMA-Factory's converter and
processor."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_stages_probe15 import _Echo, _EchoTok  # noqa: E402  (an echoing model and tokenizer)

from deltatune.data.load import Row  # noqa: E402
from deltatune.train.config import build  # noqa: E402


def _cfg(path: str = "unused", **train):
    return build({"stage": "seq2seq", "model": {"name_or_path": path},
                  "data": {"train": "rows.jsonl", "source_column": "source", "target_column": "target"},
                  "train": train})  # fmt: skip


def test_seq2seq_eval_gives_run_summarizations_rouge1_rouge2_and_rougelsum():
    """run_summarization's compute_metrics reports rouge1, rouge2, rougeL and rougeLsum (evaluate's rouge: rouge-score
    with use_stemmer=True, the texts stripped and one sentence a line); HEAD reported rougeL alone. Reference:
    rouge-score's fmeasure of each type on the texts split into lines as postprocess_text splits them (these
    sentences end at '.', '!' or '?' before a space, where nltk's punkt splits them too), averaged over rows."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

    from deltatune.train.seq2seq import generation_metrics

    pairs = [
        ("It slept well. The cats were running home!", "The cat runs home. It slept well."),  # sentences swapped
        ("Summaries generated quickly. A second line? Yes.", "A summary generation. A second line follows."),
        ("plain words here", "plain words"),
    ]
    rows = [Row({"source": s, "target": t}, f"rows.jsonl:{i}") for i, (s, t) in enumerate(pairs, 1)]
    got = generation_metrics(_Echo(), _EchoTok(), rows, _cfg(), batch_size=2)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)

    def lines(text: str) -> str:  # postprocess_text's "\n".join(nltk.sent_tokenize(text)) for these texts
        return text.strip().replace(". ", ".\n").replace("! ", "!\n").replace("? ", "?\n")

    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        want = sum(scorer.score(lines(t), lines(s))[key].fmeasure for s, t in pairs) / len(pairs)
        assert abs(got[f"eval_{key}"] - want) < 1e-12, key
    # the swapped sentences score lower by ROUGE-L than by ROUGE-Lsum, which matches each sentence on its own
    assert got["eval_rougeLsum"] > got["eval_rougeL"] + 0.05 and got["eval_rouge1"] > got["eval_rouge2"] + 0.05


@pytest.mark.parametrize("family, start", [("t5", None), ("bart", 2)])
def test_seq2seq_eval_gives_run_summarizations_gen_len(tmp_path, family, start):
    """run_summarization's gen_len: np.mean of np.count_nonzero(pred != pad_token_id) over the generated rows (the
    EOS counts; the decoder start counts unless it is the pad (T5's is); the padding after an early EOS does not);
    HEAD had no gen_len. Reference: the same count on the model's own generate output for the batch, for T5 (start =
    pad) and a BART-like config whose decoder start (id 2) is not the pad (id 0)."""
    import numpy as np
    from tiny import save_tiny
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from deltatune.train.seq2seq import generation_metrics

    path = save_tiny(tmp_path / family, family, init_std=0.5)
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    if start is not None:
        model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = start
    sources = ["the big red dog sat on the old mat", "blue house by the sea", "a quiet green tree", "cat"]
    rows = [Row({"source": s, "target": s}, f"rows.jsonl:{i}") for i, s in enumerate(sources, 1)]
    enc = tok(sources, return_tensors="pt", padding=True, padding_side="right", return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, num_beams=1).numpy()
    want = float(np.mean([np.count_nonzero(p != tok.pad_token_id) for p in out]))
    got = generation_metrics(model, tok, rows, _cfg(path, generation_max_new_tokens=6), batch_size=4)
    assert got["eval_gen_len"] == want and 0 < want <= 7
    assert (out[:, 0] == (start if start is not None else tok.pad_token_id)).all()


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_raw_ppo_prompt_opens_as_the_raw_rows_it_trained_on(stage):
    """data.template=raw: a PPO prompt opened with the BOS alone (bos_prefix), so with MiniLM's BERT tokenizer the
    policy, trained by raw SFT, DPO or KTO on ``[CLS] prompt response [SEP]`` (TRL 1.16's ``tokenizer(prompt +
    response + EOS)``, encode_lm), sampled from ``prompt`` without its [CLS]. Reference: the ids before the first
    trained label of the same row's raw DPO/KTO encoding, and TRL 1.16's GRPO ``processing_class(text=prompts)``
    without the closing [SEP] (the EOS, which would end the prompt as a finished text)."""
    from tiny import tokenizer

    from deltatune.data.encode import RAW, lm_example, prompt_ids
    from deltatune.data.formats import read_samples

    tok = tokenizer()
    prompt, answer = "The sky is", " blue today."
    row = Row({"prompt": prompt, "chosen": answer, "rejected": " green."}, "p.jsonl:1")
    s = read_samples([row], stage=stage)[0]
    ex, _ = lm_example(s, [{"role": "assistant", "content": answer}], tok, RAW, 64)
    first = next(i for i, lab in enumerate(ex["labels"]) if lab != -100)
    ppo = read_samples([Row({"prompt": prompt}, "p.jsonl:1")], stage="ppo")[0]
    got = prompt_ids(ppo, tok, RAW, 64)
    assert got == ex["input_ids"][:first] == tok(text=prompt)["input_ids"][:-1]
    assert got[0] == tok.cls_token_id and tok.bos_token_id is None


@pytest.mark.parametrize(
    "row",
    [
        {"instruction": "<audio>What is said here?", "output": "Hello."},
        {"messages": [{"role": "user", "content": "Transcribe <audio>"}, {"role": "assistant", "content": "Hi."}]},
        {"conversations": [{"from": "human", "value": "<audio>"}, {"from": "gpt", "value": "Hi."}]},
    ],
)
def test_an_audio_marker_without_audio_is_refused_naming_the_row(row):
    """LLaMA-Factory's audio placeholder: its multimodal plugins (src/llamafactory/data/mm_plugin.py,
    _validate_messages) refuse a row whose <audio> markers do not pair up with its audios ("The number of audios
    does not match the number of <audio> tokens"), and an audios column is refused here already; HEAD trained the row
    on the marker as text (its <image> and <video> markers were refused). Now one line naming the row, in the text
    stages and in caption."""
    from deltatune.data.formats import read_samples
    from deltatune.data.load import DataError
    from deltatune.data.sample import place_images, refuse_multimodal

    samples = read_samples([Row(row, "a.jsonl:3")], stage="sft")
    with pytest.raises(
        DataError, match=r"^a\.jsonl:3: an <audio> marker \(LLaMA-Factory's audio placeholder\) in a prompt turn; no"
    ):
        refuse_multimodal(samples, "sft")
    samples[0].images = ["a.png"]
    with pytest.raises(DataError, match=r"^a\.jsonl:3: an <audio> marker .*stage caption reads images only"):
        place_images(samples[0])
    refuse_multimodal(read_samples([Row({"instruction": "Say audio.", "output": "audio"}, "a.jsonl:4")]), "sft")
    # pre-training text is text (an HTML page's <audio> tag), as LLaMA-Factory's pretrain processor reads it
    page = read_samples(
        [Row({"text": "<p>Listen: <audio>Your browser has no audio.</audio></p>"}, "p.jsonl:1")], stage="pt"
    )
    assert "<audio>" in page[0].text
    refuse_multimodal(page, "pt")


@pytest.mark.parametrize(
    "stage, row",
    [
        ("sft", {"instruction": "How do I play a sound?", "output": "Use the HTML5 <audio> element."}),
        ("sft", {"messages": [{"role": "user", "content": "Tag?"}, {"role": "assistant", "content": "<audio>"}]}),
        ("dpo", {"prompt": "Which HTML tag embeds sound?", "chosen": "The <audio> tag.", "rejected": "<sound>."}),
        ("kto", {"prompt": "Which HTML tag embeds sound?", "completion": "The <audio> tag.", "label": True}),
    ],
)
def test_an_answer_about_the_html_audio_tag_trains(stage, row):
    """LLaMA-Factory's BasePlugin (the text-only models' plugin) counts no marker: an answer about the HTML5 <audio>
    element trains there as text. 23b758e refused every such row with no way round it; now an answer (assistant,
    chosen, rejected, completion) may mention the tag, and the same marker on the prompt side is still refused
    naming the row."""
    from deltatune.data.formats import read_samples
    from deltatune.data.load import DataError
    from deltatune.data.sample import refuse_multimodal

    samples = read_samples([Row(row, "web.jsonl:7")], stage=stage)
    refuse_multimodal(samples, stage)
    texts = [m["content"] for s in samples for p in (s.messages, s.completion, s.chosen, s.rejected) for m in p or []]
    assert any("<audio>" in t for t in texts)
    asked = {k: "<audio> " + v if k in ("instruction", "prompt") else v for k, v in row.items()}
    if "messages" in row:
        asked["messages"] = [{"role": "system", "content": "<audio>"}, *row["messages"]]
    with pytest.raises(DataError, match=r"^web\.jsonl:7: an <audio> marker .* in a prompt turn; no stage reads"):
        refuse_multimodal(read_samples([Row(asked, "web.jsonl:7")], stage=stage), stage)


@pytest.mark.parametrize(
    "row, why",
    [
        ({"source": "The cat sat.", "target": ""}, r"column 'target' is empty; a seq2seq row needs"),
        ({"source": "  ", "target": "A cat."}, r"column 'source' is empty; a seq2seq row needs"),
        ({"source": "The cat sat.", "target": "A cat.", "references": "A cat."}, r"column 'references' must be a "),
        ({"source": "The cat sat.", "target": "A cat.", "references": ["A cat.", 3]}, r"column 'references' must "),
    ],
)
def test_a_seq2seq_row_with_nothing_to_learn_or_bad_references_is_refused_in_one_line(row, why):
    """run_summarization's preprocess_function keeps a row only ``if examples[text_column][i] and
    examples[summary_column][i]``; HEAD trained an empty target (the EOS alone: labels [CLS] [SEP] after MiniLM's
    tokenizer) and an empty source, and its eval scored a row whose ``references`` was a string against the target
    instead, without a word. Now one line naming the row and the column; a good row encodes as before."""
    from tiny import tokenizer

    from deltatune.data.load import DataError
    from deltatune.data.tasks import encode_seq2seq

    tok = tokenizer()
    with pytest.raises(DataError, match=rf"^s\.jsonl:9: {why}"):
        encode_seq2seq([Row(row, "s.jsonl:9")], tok, "source", "target", 16, 16)
    good = {"source": "The cat sat.", "target": "A cat.", "references": ["A cat.", "The cat."]}
    ex = encode_seq2seq([Row(good, "s.jsonl:1")], tok, "source", "target", 16, 16).examples[0]
    assert (
        ex["input_ids"] == tok("The cat sat.")["input_ids"] and ex["labels"] == tok(text_target="A cat.")["input_ids"]
    )


def test_empty_references_fall_back_to_the_target_and_a_train_splits_are_not_read(tmp_path):
    """``references: []`` scored against the target before 6d3e476, which refused it: an old run's data must keep
    working, so [] is no list again (the eval scores the target, the same floats as a row without the column). A
    train split's references column is read by nothing (only the eval's generations are scored): 6d3e476 refused a
    bad one there too; now only an eval split's (or one held out by data.val_size) is checked, naming the row."""
    import json

    from tiny import tokenizer

    from deltatune.data.load import DataError
    from deltatune.data.tasks import encode_seq2seq
    from deltatune.train.seq2seq import generation_metrics, prepare_seq2seq

    tok = tokenizer()
    row = {"source": "The cat sat.", "target": "A cat sat."}
    ex = encode_seq2seq([Row({**row, "references": []}, "s.jsonl:1")], tok, "source", "target", 16, 16).examples
    assert ex == encode_seq2seq([Row(row, "s.jsonl:1")], tok, "source", "target", 16, 16).examples
    with_empty = generation_metrics(_Echo(), _EchoTok(), [Row({**row, "references": []}, "s.jsonl:1")], _cfg())
    assert with_empty == generation_metrics(_Echo(), _EchoTok(), [Row(row, "s.jsonl:1")], _cfg())
    assert 0 < with_empty["eval_rougeL"] < 1  # the target scored (an echo of the source)

    bad, good = tmp_path / "bad.jsonl", tmp_path / "good.jsonl"
    bad.write_text("".join(json.dumps({**row, "references": "A cat."}) + "\n" for _ in range(4)))
    good.write_text(json.dumps({**row, "references": ["A cat."]}) + "\n")

    def prepare(train, ev=None, val_size=0):
        cfg = build({"stage": "seq2seq", "model": {"name_or_path": "unused"},
                     "data": {"train": str(train), "eval": str(ev) if ev else None, "val_size": val_size,
                              "source_column": "source", "target_column": "target"}})  # fmt: skip
        return prepare_seq2seq(cfg, tok)

    assert len(prepare(bad, good).train) == 4
    with pytest.raises(DataError, match=r"^.*bad\.jsonl:1: column 'references' must be a non-empty list of texts"):
        prepare(good, bad)
    with pytest.raises(DataError, match=r"^.*bad\.jsonl:\d: column 'references' must be"):
        prepare(bad, val_size=1)


def test_a_t5_checkpoint_without_a_source_prefix_gets_run_summarizations_warning(tmp_path):
    """run_summarization warns "You're running a t5 model but didn't provide a source prefix" for google-t5/t5-small
    .. t5-11b run without --source_prefix; HEAD's report said nothing (recipes/e2e-seq2seq-lora.yaml is such a run).
    Now a report line; none with a prefix, nor for another model."""
    import json

    from tiny import tokenizer

    from deltatune.train.seq2seq import prepare_seq2seq

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"source": f"The cat sat {i}.", "target": "A cat."}) + "\n" for i in range(4)))

    def notes(name, prefix=""):
        cfg = build({"stage": "seq2seq", "model": {"name_or_path": name},
                     "data": {"train": str(rows), "eval": str(rows), "source_column": "source",
                              "target_column": "target", "source_prefix": prefix}})  # fmt: skip
        return [n for n in prepare_seq2seq(cfg, tokenizer()).notes if "source_prefix" in n]

    (note,) = notes("google-t5/t5-small")
    assert note.startswith("the model is T5 (google-t5/t5-small) and data.source_prefix is empty")
    assert notes("t5-base") and not notes("google-t5/t5-small", "summarize: ") and not notes("facebook/bart-base")


def test_rouge_n_and_lsum_equal_rouge_scores_on_random_multi_line_texts():
    """metrics.rouge_n and rouge_lsum against rouge-score's rouge1, rouge2 and rougeLsum (use_stemmer=True) on 300
    seeded texts of repeated words over one to three lines (Lsum's double-count guard, empty lines and texts)."""
    import random

    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

    from deltatune.train import metrics as M

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    words = [
        "the",
        "cat",
        "cats",
        "running",
        "runs",
        "ran",
        "dog",
        "a",
        "on",
        "mat",
        "sat",
        "sitting",
        "of",
        "is",
        "was",
    ]
    rnd = random.Random(0)

    def text() -> str:
        return "\n".join(
            " ".join(rnd.choice(words) for _ in range(rnd.randint(0, 7))) for _ in range(rnd.randint(1, 3))
        )

    for _ in range(300):
        p, r = text(), text()
        want = scorer.score(r, p)
        assert abs(M.rouge_n(p, r, 1, stem=True) - want["rouge1"].fmeasure) < 1e-12, (p, r)
        assert abs(M.rouge_n(p, r, 2, stem=True) - want["rouge2"].fmeasure) < 1e-12, (p, r)
        assert abs(M.rouge_lsum(p, r, stem=True) - want["rougeLsum"].fmeasure) < 1e-12, (p, r)


def test_rouge_scores_tokenize_each_text_once_and_give_the_same_floats():
    """The eval's four ROUGE figures: 1bcea2d tokenized and Porter-stemmed every text once per metric and reference
    (E2E's test split, 7.4 references a row: 9.7 s of ROUGE where rougeL alone took 2.8 s). metrics.rouge_scores
    tokenizes each text once (the stem of a word cached) and gives the floats the per-metric functions give (==, on
    300 seeded rows of one to three references of one to three sentences), and rouge-score's score_multi's within
    1e-12; porter_stem runs once per distinct word."""
    import random

    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

    from deltatune.train import metrics as M

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    words = ["The", "cat", "cats.", "running", "runs!", "ran", "dog?", "a", "on", "mat.", "sat", "sitting", "(of)"]
    rnd = random.Random(1)

    def text() -> str:
        return " ".join(rnd.choice(words) for _ in range(rnd.randint(0, 12)))

    one = {
        "rouge1": lambda p, r: M.rouge_n(p, r, 1, stem=True),
        "rouge2": lambda p, r: M.rouge_n(p, r, 2, stem=True),
        "rougeL": lambda p, r: M.rouge_l(p, r, stem=True),
        "rougeLsum": lambda p, r: M.rouge_lsum(M.sentences(p), M.sentences(r), stem=True),
    }
    M.porter_stem.cache_clear()
    for _ in range(300):
        p, refs = text(), [text() for _ in range(rnd.randint(1, 3))]
        got = M.rouge_scores(p, refs, stem=True)
        assert got == {k: max(f(p.strip(), r.strip()) for r in refs) for k, f in one.items()}, (p, refs)
        want = scorer.score_multi([M.sentences(r) for r in refs], M.sentences(p))
        assert all(abs(got[k] - want[k].fmeasure) < 1e-12 for k in got), (p, refs)
    assert M.porter_stem.cache_info().misses <= len({w.strip(".!?()").lower() for w in words})
