"""Probe 24 of the cls / tag / seq2seq stages and ``deltatune eval`` against transformers' run_ner.py (its label list,
its reuse of a trained head's label2id, its tokenize_and_align_labels) and the routing of a plain adapter folder's
image rows."""

from __future__ import annotations

import copy
import json

import torch
from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

from deltatune.train.config import build
from deltatune.train.evaluation import _recipe
from deltatune.train.tag import prepare_tag
from tests.tiny import minilm_path

ROWS = [
    {"tokens": ["EU", "rejects", "German", "callisthenics", "lamb"], "ner_tags": ["B-ORG", "O", "B-MISC", "O", "O"]},
    {"tokens": ["Peter", "Blackburnshire", "went", "to", "Paris"], "ner_tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]},
    {"tokens": ["the", "New", "York", "Times"], "ner_tags": ["O", "B-ORG", "I-ORG", "I-ORG"]},
]
# dslim/bert-base-NER's id2label: a NER model's head order, which run_ner keeps when the data's tags are its tags
HEAD_ORDER = ["O", "B-MISC", "I-MISC", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]


def _tag_cfg(tmp_path, rows, model=None):
    path = tmp_path / "tags.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"train": str(path), "eval": str(path), "tokens_column": "tokens", "tags_column": "ner_tags"}
    return build({"stage": "tag", "model": {"name_or_path": model or minilm_path()}, "data": data})


def _run_ner(tok, rows, label_list, label_to_id):
    """run_ner's tokenize_and_align_labels (label_all_tokens off): the first sub-token of a word carries its tag."""
    enc = tok([r["tokens"] for r in rows], truncation=True, max_length=128, is_split_into_words=True)
    labels = []
    for i, r in enumerate(rows):
        previous, ids = None, []
        for word in enc.word_ids(batch_index=i):
            ids.append(-100 if word is None or word == previous else label_to_id[r["ner_tags"][word]])
            previous = word
        labels.append(ids)
    return enc["input_ids"], labels


def test_lowercase_bio_tags_are_the_classes_run_ner_reads_with_no_unused_class(tmp_path):
    # run_ner's label list is the tags seen (sorted); before, b-per / i-per / o gained B-per and I-per, two classes
    # no row named (a head of 9 outputs for 5 tags)
    rows = [{"tokens": ["x", "y", "z"], "ner_tags": ["b-per", "i-per", "o"]}, {"tokens": ["w"], "ner_tags": ["b-loc"]}]
    tok = AutoTokenizer.from_pretrained(minilm_path())
    prepared = prepare_tag(_tag_cfg(tmp_path, rows), tok)
    seen = sorted({t for r in rows for t in r["ner_tags"]})  # (+ i-loc: deltatune's B-/I- pair of each type)
    assert sorted(prepared.labels) == sorted([*seen, "i-loc"])
    assert prepared.labels[0] == "o"
    label_to_id = {name: i for i, name in enumerate(prepared.labels)}
    ids, labels = _run_ner(tok, rows, prepared.labels, label_to_id)
    assert [ex["input_ids"] for ex in prepared.train] == ids
    assert [ex["labels"] for ex in prepared.train] == labels


def test_a_base_trained_on_the_tags_keeps_its_heads_order_as_run_ner_does(tmp_path):
    # run_ner: "Model has labels -> use them": a base whose id2label holds the data's tags keeps its order. Before,
    # deltatune's order (O, B-LOC, I-LOC, B-MISC, ...) renamed the trained head's classes: its loss on the rows
    # was another tag's for 8 of the 9 outputs.
    tok = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=37, id2label=dict(enumerate(HEAD_ORDER)),
                        label2id={t: i for i, t in enumerate(HEAD_ORDER)})  # fmt: skip
    torch.manual_seed(0)
    model = BertForTokenClassification(config).eval()
    with torch.no_grad():  # a head that scores each of its tags (HEAD_ORDER's id i) where that tag is true
        model.classifier.weight.normal_()
    model.save_pretrained(tmp_path / "ner")
    tok.save_pretrained(tmp_path / "ner")
    prepared = prepare_tag(_tag_cfg(tmp_path, ROWS, str(tmp_path / "ner")), tok)
    assert prepared.labels == HEAD_ORDER

    # run_ner's label ids over the model's order, and its loss (the model's own) on the same rows
    label_to_id = {t: i for i, t in enumerate(HEAD_ORDER)}
    ids, labels = _run_ner(tok, ROWS, HEAD_ORDER, label_to_id)
    assert [ex["input_ids"] for ex in prepared.train] == ids
    assert [ex["labels"] for ex in prepared.train] == labels
    batch = prepared.collator(prepared.train)
    width = max(len(x) for x in ids)
    ref = {
        "input_ids": torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
    }
    with torch.no_grad():
        ours = model(**{k: v for k, v in batch.items() if k != "token_type_ids"}).loss
        theirs = model(**ref).loss
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_a_base_with_other_tags_keeps_deltatunes_order(tmp_path):
    # run_ner warns and keeps the data's classes when the model's labels are not the data's
    tok = AutoTokenizer.from_pretrained(minilm_path())
    other = ["O", "B-X", "I-X"]
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=37, id2label=dict(enumerate(other)))  # fmt: skip
    BertForTokenClassification(config).save_pretrained(tmp_path / "other")
    prepared = prepare_tag(_tag_cfg(tmp_path, ROWS, str(tmp_path / "other")), tok)
    assert prepared.labels == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def test_eval_of_a_plain_adapter_routes_image_rows_by_the_columns_the_overrides_name(tmp_path):
    # peft saves no task_type for an image classifier: rows with an image and a label column are image_cls's. Before,
    # only columns named image and label were seen: data.image_column=img rows went to sft (a text stage)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": None,
                                                             "base_model_name_or_path": "some/vit"}))  # fmt: skip
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"img": "a.png", "y": 1}) + "\n")
    overrides = ["data.image_column=img", "data.label_column=y"]
    raw, _ = _recipe(str(adapter), str(data), False, overrides)
    assert raw["stage"] == "image_cls"
    raw, _ = _recipe(str(adapter), str(data), False, ['data.image_column="img"', "data.label_column=y"])
    assert raw["stage"] == "image_cls"
    raw, _ = _recipe(str(adapter), str(data), False, [])  # (no override: the columns are not an image row's)
    assert raw["stage"] != "image_cls"


def _byte_level_folder(path, config, tokenizer_class="RobertaTokenizer"):
    """A tiny byte-level BPE model folder (vocab.json, merges.txt; ``tokenizer_class`` in tokenizer_config.json):
    "ĠEU" and "EU" are tokens, so the prefix space shows in the ids."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path.mkdir()
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *chars, "ĠE", "ĠEU", "EU"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\nĠ E\nĠE U\nE U\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class}))
    config.save_pretrained(path)
    return str(path)


def _roberta(tmp_path, name="roberta"):
    from transformers import RobertaConfig

    config = RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=37)  # fmt: skip
    return _byte_level_folder(tmp_path / name, config)


def test_a_roberta_base_reads_its_words_as_run_ner_does_and_the_run_saves_that_tokenizer(tmp_path):
    # run_ner: AutoTokenizer.from_pretrained(d, add_prefix_space=True) for a roberta model, then its
    # tokenize_and_align_labels: the first word is "ĠEU", as every other word. The run saves that tokenizer (run_ner
    # saves its own): before, the folder's tokenizer read "EU" (add_prefix_space false), not as the run trained.
    from deltatune.train.models import load_tokenizer

    folder = _roberta(tmp_path)
    tok = load_tokenizer(folder)  # (as deltatune loads a base: no add_prefix_space)
    prepared = prepare_tag(_tag_cfg(tmp_path, ROWS, folder), tok)
    reference = AutoTokenizer.from_pretrained(folder, add_prefix_space=True)
    label_to_id = {t: i for i, t in enumerate(prepared.labels)}
    ids, labels = _run_ner(reference, ROWS, prepared.labels, label_to_id)
    assert reference.convert_ids_to_tokens(ids[0])[1] == "ĠEU"
    assert [ex["input_ids"] for ex in prepared.train] == ids
    assert [ex["labels"] for ex in prepared.train] == labels
    tok.save_pretrained(tmp_path / "run")  # (run.py saves the tokenizer prepare read with)
    reference.save_pretrained(tmp_path / "run_ner")
    saved = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert _run_ner(saved, ROWS, prepared.labels, label_to_id) == (ids, labels)
    ours, theirs = (json.loads((tmp_path / d / "tokenizer.json").read_text()) for d in ("run", "run_ner"))
    for key in ("pre_tokenizer", "post_processor", "model", "decoder"):  # (truncation: the last call's)
        assert ours[key] == theirs[key]
    ours, theirs = (json.loads((tmp_path / d / "tokenizer_config.json").read_text()) for d in ("run", "run_ner"))
    assert ours["add_prefix_space"] is theirs["add_prefix_space"] is True


def test_a_gpt2_base_with_a_tokenizers_backend_tokenizer_reads_as_run_ner_does_without_the_prefix_space(tmp_path):
    # transformers 5's TokenizersBackend (bloom's tokenizer, or a gpt2 model whose tokenizer_config names
    # PreTrainedTokenizerFast) ignores run_ner's add_prefix_space=True: "EU". Before, deltatune added the space.
    from transformers import GPT2Config

    folder = _byte_level_folder(tmp_path / "g", GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=4),
                                "GPT2Tokenizer")  # fmt: skip
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)  # (its tokenizer.json, read by the backend)
    (tmp_path / "g" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    tok = AutoTokenizer.from_pretrained(folder)
    reference = AutoTokenizer.from_pretrained(folder, add_prefix_space=True)
    assert type(reference).__name__ == "TokenizersBackend"
    tok.pad_token = "<pad>"
    prepared = prepare_tag(_tag_cfg(tmp_path, ROWS, folder), tok)
    ids, _ = _run_ner(reference, ROWS, prepared.labels, {t: i for i, t in enumerate(prepared.labels)})
    assert reference.convert_ids_to_tokens(ids[0])[0] == "EU"
    assert (
        prepared.train[0]["input_ids"][0] == ids[0][0]
    )  # (the later words: read from the text, _splits_words_as_text)
    ours, theirs = (
        json.loads(t.backend_tokenizer.to_str()) for t in (tok, reference)
    )  # (truncation: the last call's)
    assert (ours["pre_tokenizer"], ours["post_processor"]) == (theirs["pre_tokenizer"], theirs["post_processor"])


def test_a_llama_base_reads_its_words_unchanged(tmp_path):
    # run_ner loads a llama model's tokenizer as it is: deltatune's ids are its tokenize_and_align_labels'
    from transformers import LlamaConfig

    from tests.tiny import smollm2_tokenizer

    tok = smollm2_tokenizer()
    LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                intermediate_size=37).save_pretrained(tmp_path / "llama")  # fmt: skip
    reference = copy.deepcopy(tok)
    prepared = prepare_tag(_tag_cfg(tmp_path, ROWS, str(tmp_path / "llama")), tok)
    assert tok.backend_tokenizer.to_str() == reference.backend_tokenizer.to_str()
    assert tok.init_kwargs == reference.init_kwargs
    assert [ex["input_ids"] for ex in prepared.train] == [
        ex["input_ids"] for ex in _encoded(reference, prepared, tmp_path)
    ]


def _encoded(tok, prepared, tmp_path):
    """The rows as the tag stage encodes them with ``tok`` as it is (what a run begun before the prefix space read)."""
    from deltatune.data.load import read_rows
    from deltatune.data.tasks import encode_tag

    mapping = {t: i for i, t in enumerate(prepared.labels)}
    return encode_tag(read_rows(str(tmp_path / "tags.jsonl")), tok, "tokens", "ner_tags", mapping, 512).examples


def _run_folder(tmp_path, base, marked):
    """A tag run folder as deltatune train leaves it: run.yaml, the base's tokenizer as loaded, and the marks of
    today's runs (``marked``) or of a run begun before the prefix space (theirs then, no tag_prefix_space)."""
    from deltatune.train.runs import mark_run

    run = tmp_path / ("new" if marked else "old")
    run.mkdir()
    (run / "run.yaml").write_text("stage: tag\n")
    (run / "checkpoint-10").mkdir()
    if marked:
        mark_run(str(run))
    else:
        (run / "deltatune_marks.json").write_text(json.dumps({"quant_skip_rule": 2, "alpaca_system": 1}))
    AutoTokenizer.from_pretrained(base).save_pretrained(run)
    return str(run)


def test_a_run_begun_before_the_prefix_space_evaluates_and_resumes_with_the_ids_it_trained_with(tmp_path):
    # an unmarked roberta tag run trained on "EU" (its saved tokenizer reads so): deltatune eval (its tokenizer
    # from the run folder) and --resume (output.dir the run, trained_run set) encode as it trained. Before, both
    # added the prefix space: the reviewer's old run evaluated to eval_loss 0.52540 where it trained 0.52447.
    from deltatune.train.models import load_tokenizer

    base = _roberta(tmp_path)
    old = _run_folder(tmp_path, base, marked=False)
    plain = AutoTokenizer.from_pretrained(base)  # (what the old run trained with)
    for folder, run_dir in ((old, None), (base, old)):  # eval's tokenizer; a resume's (the base's) into the folder
        cfg = _tag_cfg(tmp_path, ROWS, base)
        if run_dir:
            cfg.output.dir, cfg.trained_run = run_dir, True
        prepared = prepare_tag(cfg, load_tokenizer(folder))
        ids = [ex["input_ids"] for ex in _encoded(plain, prepared, tmp_path)]
        assert plain.convert_ids_to_tokens(ids[0])[1] == "EU"
        assert [ex["input_ids"] for ex in prepared.train] == ids

    # a run begun now (marked) resumes with the prefix space; a fresh run into an old folder (--overwrite) too
    new = _run_folder(tmp_path, base, marked=True)
    reference = AutoTokenizer.from_pretrained(base, add_prefix_space=True)
    for run_dir, resumed in ((new, True), (old, False)):
        cfg = _tag_cfg(tmp_path, ROWS, base)
        cfg.output.dir = run_dir
        if resumed:
            cfg.trained_run = True
        prepared = prepare_tag(cfg, load_tokenizer(base))
        ids, _ = _run_ner(reference, ROWS, prepared.labels, {t: i for i, t in enumerate(prepared.labels)})
        assert [ex["input_ids"] for ex in prepared.train] == ids


def test_the_tag_base_config_is_read_at_model_revision(tmp_path, monkeypatch):
    # the model, tokenizer and processor load at model.revision (fcfed8f): the config tag reads its model type and
    # head order from loads there too. Before, it read the main revision's.
    import transformers

    from deltatune.train.tag import _base_config

    asked = {}

    def from_pretrained(name, **kwargs):
        asked.update(kwargs, name=name)
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    cfg = build({"stage": "tag", "model": {"name_or_path": "org/ner-model", "revision": "v2"},
                 "data": {"train": str(tmp_path / "x.jsonl")}})  # fmt: skip
    assert _base_config(cfg) is None
    assert asked["revision"] == "v2" and asked["name"] == "org/ner-model"


def _unfinished(tmp_path, base, marked):
    """A tag run killed before its end (review 2, bugs A and B): a full run.yaml, the marks, a checkpoint, and no
    tokenizer files (a run saves its tokenizer at its end only)."""
    import yaml

    data = tmp_path / "tags.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run = tmp_path / ("new_k" if marked else "old_k")
    (run / "checkpoint-2").mkdir(parents=True)
    recipe = {"stage": "tag", "model": {"name_or_path": base}, "output": {"dir": str(run)},
              "data": {"train": str(data), "eval": str(data), "tokens_column": "tokens", "tags_column": "ner_tags"}}  # fmt: skip
    (run / "run.yaml").write_text(yaml.safe_dump(recipe))
    lora = {"peft_type": "LORA", "task_type": "TOKEN_CLS", "r": 4, "target_modules": ["query", "value"]}
    (run / "checkpoint-2" / "adapter_config.json").write_text(json.dumps({**lora, "base_model_name_or_path": base}))
    marks = {"tag_prefix_space": 1} if marked else {"quant_skip_rule": 2, "alpaca_system": 1}
    (run / "deltatune_marks.json").write_text(json.dumps(marks))
    return str(run / "checkpoint-2")


def test_eval_of_an_unfinished_old_runs_checkpoint_encodes_as_it_trained(tmp_path, monkeypatch):
    # eval of an old (unmarked) run's checkpoint loads the base's tokenizer (none saved yet): its words read as the
    # run trained, "EU" (the old code's, run_ner's without add_prefix_space). Before, the prefix space was added:
    # the reviewer's old_k/checkpoint-2 evaluated to eval_loss 2.2764401 where the old code gave 2.2543652.
    from deltatune.train import evaluation

    class Prepared(Exception):
        pass

    def prepare(cfg, tok):
        raise Prepared(evaluation.prepare.__wrapped__(cfg, tok))

    prepare.__wrapped__ = evaluation.prepare
    monkeypatch.setattr(evaluation, "prepare", prepare)
    base = _roberta(tmp_path)
    plain = AutoTokenizer.from_pretrained(base)
    reference = AutoTokenizer.from_pretrained(base, add_prefix_space=True)
    for marked in (False, True):
        try:
            evaluation.evaluate(_unfinished(tmp_path, base, marked))
        except Prepared as e:
            prepared = e.args[0]
        if marked:  # (run_ner's)
            ids, _ = _run_ner(reference, ROWS, prepared.labels, {t: i for i, t in enumerate(prepared.labels)})
        else:  # (the tag stage's without the prefix space, as the old run trained)
            ids = [ex["input_ids"] for ex in _encoded(plain, prepared, tmp_path)]
        assert plain.convert_ids_to_tokens(ids[0])[1] == ("ĠEU" if marked else "EU")
        assert [ex["input_ids"] for ex in prepared.train] == ids  # (the eval file, read as a train file)


def test_merge_of_an_unfinished_new_runs_checkpoint_saves_the_tokenizer_it_trained_with(tmp_path, monkeypatch):
    # load_adapter_model (merge, serve, generate) of a checkpoint of a marked run killed before its end: no tokenizer
    # saved, the base's loaded; it reads the words as the run did (run_ner's add_prefix_space=True) and merge saves
    # that. Before: the base's, "EU" where the run trained on "ĠEU" (mk_out's add_prefix_space false).
    from transformers import RobertaForTokenClassification

    from deltatune.train import run_load

    base = _roberta(tmp_path)
    from transformers import AutoConfig

    model = RobertaForTokenClassification(AutoConfig.from_pretrained(base))
    monkeypatch.setattr(run_load, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(run_load.DeltaModel, "from_pretrained", lambda model, folder: model)
    monkeypatch.setattr(run_load, "reload_as_trained", lambda *a: None)
    for marked in (True, False):  # (an old run's: as it trained, without)
        _, tok = run_load.load_adapter_model(_unfinished(tmp_path, base, marked))
        tok.save_pretrained(tmp_path / f"merged_{marked}")
        saved = AutoTokenizer.from_pretrained(tmp_path / f"merged_{marked}")
        reference = AutoTokenizer.from_pretrained(base, add_prefix_space=marked)
        assert saved("EU rejects")["input_ids"] == reference("EU rejects")["input_ids"]
        assert saved.convert_ids_to_tokens(saved("EU")["input_ids"])[1] == ("ĠEU" if marked else "EU")
