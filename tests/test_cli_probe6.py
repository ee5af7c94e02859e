"""``deltatune generate`` and ``chat`` on a seq2seq run: the prompt goes as the run trained on it."""

from __future__ import annotations

import io
import sys

import torch
from test_cli import _jsonl, _run
from tiny import save_tiny
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from deltatune.cli import main
from deltatune.model import DeltaModel


def test_generate_on_a_seq2seq_run_sends_the_plain_source_text(capsys, tmp_path):
    """A T5 run trains and evaluates on the plain source text; its tokenizer here has a chat template (as T5Gemma's
    has), which generate applied to the prompt: another input, another answer ('hackett ...' for 'kellan ...')."""
    model = save_tiny(tmp_path / "t5", "t5")
    rows = [{"source": f"translate {w} now", "target": f"{w} done"} for w in ["cat", "dog", "tree", "house"]]
    data = _jsonl(tmp_path / "pairs.jsonl", rows)
    recipe = tmp_path / "s2s.yaml"
    recipe.write_text(
        f"stage: seq2seq\nmodel: {{name_or_path: {model}}}\nmethod: {{name: lora, r: 4, init_lora_weights: false}}\n"
        f"data: {{train: {data}, max_length: 32, source_column: source, target_column: target}}\n"
        "train: {batch_size: 2}\n",
        encoding="utf-8",
    )
    run = _run(tmp_path, str(recipe), "train.max_steps=1")
    tok = AutoTokenizer.from_pretrained(run)
    assert tok.chat_template
    capsys.readouterr()
    assert main(["generate", "--adapter", run, "--prompt", "translate cat now", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    delta = DeltaModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(model), run).eval()
    enc = tok("translate cat now", return_tensors="pt", return_token_type_ids=False)  # as encode_seq2seq reads it
    with torch.no_grad():
        out = delta.generate(**enc, max_new_tokens=8, do_sample=False)
    expected = tok.decode(out[0], skip_special_tokens=True).strip()
    assert expected and printed == expected
    # chat: each line alone, as the run saw its sources (no history, no template)
    old = sys.stdin
    sys.stdin = io.StringIO("translate cat now\n/quit\n")
    try:
        assert main(["chat", "--adapter", run, "--max-new-tokens", "8"]) == 0
    finally:
        sys.stdin = old
    assert expected in capsys.readouterr().out


def test_seq2seq_generation_metrics_pad_the_sources_as_training_does(tmp_path):
    """A tokenizer that pads on the left (Gemma's, T5Gemma's) moved a shorter source's tokens to later positions in
    the eval's batched generation, so BART's learned positions read other inputs than training's right-padded
    batches: four rows scored against their own one-by-one generations gave ROUGE-L 0.34, not 1."""
    from deltatune.data.load import Row
    from deltatune.train.config import build
    from deltatune.train.seq2seq import generation_metrics

    path = save_tiny(tmp_path / "bart", "bart", init_std=0.5)  # wide enough that the answers follow the input
    model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    sources = ["cat", "the big red dog sat on the old mat under a tree", "blue house", "a quiet green tree by a house"]
    alone = []
    for source in sources:
        enc = tok(source, return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=8, do_sample=False, num_beams=1)
        alone.append(tok.decode(out[0], skip_special_tokens=True))
    assert len(set(alone)) == len(alone)
    rows = [Row({"source": s, "target": a}, f"rows.jsonl:{i + 1}") for i, (s, a) in enumerate(zip(sources, alone))]
    cfg = build({"stage": "seq2seq", "model": {"name_or_path": path}, "method": {"name": "lora"},
                 "data": {"train": "rows.jsonl", "source_column": "source", "target_column": "target", "max_length": 32},
                 "train": {"generation_max_new_tokens": 8}})  # fmt: skip
    got = generation_metrics(model, tok, rows, cfg, batch_size=4)
    perfect = {k: 1.0 for k in ("eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_bleu")}
    # gen_len: 8 new ids a row, no EOS; the decoder start is the pad (save_tiny's), not counted
    assert got == {**perfect, "eval_gen_len": 8.0}
