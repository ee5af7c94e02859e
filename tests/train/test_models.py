"""Loading the base for a stage's task: transformers' weight-loading report only when it is news."""

from __future__ import annotations

import logging

import pytest
from safetensors.torch import load_file, save_file
from tiny import save_tiny, tiny_model

from deltatune.config import ConfigError
from deltatune.train.models import load_model


@pytest.fixture
def reports():
    """The LOAD REPORT warnings that reach transformers' modeling_utils logger's handlers."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "LOAD REPORT" in record.getMessage():
                seen.append(record.getMessage())

    logger, handler = logging.getLogger("transformers.modeling_utils"), Keep(logging.WARNING)
    level = logger.level  # an earlier test may have set transformers' verbosity to errors (the benchmark scripts do)
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_new_head_is_not_reported(tmp_path, reports):
    # A causal LM's checkpoint under a scalar head (its lm_head unused, score new), and a 2-class classifier's
    # under a 5-class token head (the classifier re-made): what loading a base for a head means.
    score = load_model(save_tiny(tmp_path / "llama", "llama", "causal_lm"), "SEQ_CLS", num_labels=1)
    tags = load_model(save_tiny(tmp_path / "bert", "bert", "seq_cls"), "TOKEN_CLS", num_labels=5)
    assert score.score.out_features == 1 and tags.classifier.out_features == 5
    assert reports == []


def test_a_missing_base_weight_is_reported(tmp_path, reports):
    path = save_tiny(tmp_path / "llama", "llama", "causal_lm")
    weights = load_file(f"{path}/model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    load_model(path, "SEQ_CLS", num_labels=1)
    assert len(reports) == 1 and "model.norm.weight" in reports[0] and "score.weight" in reports[0]
    # the same checkpoint for its own task: transformers' report as it is
    load_model(path, "CAUSAL_LM")
    assert len(reports) == 2 and "model.norm.weight" in reports[1]


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
def test_the_label_map_sets_the_heads_classes_without_a_warning(tmp_path, task):
    """A 3-class checkpoint (its own label names) loaded for 5 named classes, for 1 unnamed output, and for its own
    3: the head has that many outputs with those names, and transformers says nothing (passed num_labels beside the
    checkpoint's map, it warned that the two are "incompatible", and a map beside num_labels overrode its count)."""
    checkpoint = tiny_model("bert", "seq_cls")  # 3 classes
    checkpoint.config.id2label = {0: "p", 1: "q", 2: "r"}
    checkpoint.config.label2id = {"p": 0, "q": 1, "r": 2}
    path = str(tmp_path / "bert")
    checkpoint.save_pretrained(path)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger, handler = logging.getLogger("transformers.configuration_utils"), Keep(logging.WARNING)
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        names = {i: f"class {i}" for i in range(5)}
        five = load_model(path, task, num_labels=5, id2label=names)
        one = load_model(path, task, num_labels=1)
        three = load_model(path, task, id2label={0: "x", 1: "y", 2: "z"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert five.classifier.out_features == 5 and five.config.id2label == names
    assert five.config.label2id == {v: k for k, v in names.items()}
    assert one.classifier.out_features == 1 and one.config.id2label == {0: "LABEL_0"}
    assert three.classifier.out_features == 3 and three.config.id2label == {0: "x", 1: "y", 2: "z"}
    assert seen == []
    with pytest.raises(ConfigError, match="num_labels is 7 but id2label names 5 classes"):
        load_model(path, task, num_labels=7, id2label=names)


@pytest.mark.parametrize(
    "family, task, words",
    [
        ("llama", "SEQ_2_SEQ_LM", "is a Llama model, which transformers' AutoModelForSeq2SeqLM does not load"),
        ("vit", "SEQ_CLS", "is a ViT model, which transformers' AutoModelForSequenceClassification does not load"),
        ("bert", "IMAGE_CLS", "is a Bert model, which transformers' AutoModelForImageClassification does not load"),
    ],
)
def test_a_model_of_another_kind_is_one_line(tmp_path, family, task, words):
    """A Llama named for seq2seq (or a ViT for text classification) was transformers' ValueError listing every
    config class it knows; now a ConfigError naming the model, its kind and the auto class."""
    path = save_tiny(tmp_path / family, family)
    with pytest.raises(ConfigError, match=rf"^model '{path}' {words}: task {task} needs another kind of model"):
        load_model(path, task)


def test_a_tokenizer_that_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    """A model folder without tokenizer files was transformers' "You need to have sentencepiece or tiktoken
    installed" (a ValueError); a hub name the hub could not provide (offline, gated, misspelt) was its OSError with
    a traceback, where the model's own loading said it in one line. Now one line each, naming the model."""
    import shutil

    import transformers

    from deltatune.train.models import load_processor, load_tokenizer

    full = save_tiny(tmp_path / "llama", "llama")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "llama" / name, bare / name)
    with pytest.raises(ConfigError, match=rf"^model '{bare}' holds no tokenizer \(tokenizer.json, tokenizer_config"):
        load_processor(str(bare), "sft")
    assert load_processor(full, "sft").pad_token is not None

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ConfigError, match=r"^model 'org/model' could not be loaded: not a local model folder, and "
                                          r"the hub could not provide it \(We couldn't connect .* files.\)$"):  # fmt: skip
        load_processor("org/model", "sft")
    with pytest.raises(ConfigError, match=r"^model 'org/model' could not be loaded: not a local model folder"):
        load_tokenizer("org/model")  # as serve and board --model load it


def test_a_decoder_classifier_finds_its_last_token_by_the_tokenizers_pad_id(tmp_path):
    """A config whose pad id (100) is not the tokenizer's (0, the id the batches are padded with): the classifier
    read a pad token of every shorter row, so a run's eval moved with its batch size. A causal LM keeps its own."""
    import torch

    folder = save_tiny(tmp_path / "llama", "llama", "causal_lm", pad_token_id=100)
    model = load_model(folder, "SEQ_CLS", num_labels=2, pad_token_id=0).eval()
    assert model.config.pad_token_id == 0
    short, padded = torch.tensor([[5, 6, 7]]), torch.tensor([[5, 6, 7, 0, 0]])
    with torch.no_grad():
        alone = model(input_ids=short).logits
        in_batch = model(input_ids=padded, attention_mask=(padded != 0).long()).logits
    torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=0)
    assert load_model(folder, "CAUSAL_LM", pad_token_id=0).config.pad_token_id == 100


@pytest.mark.parametrize("family", ["bert", "roberta", "llama"])
def test_a_causal_lm_never_sees_the_tokens_it_predicts(tmp_path, family):
    """An encoder (MiniLM, the default model) loaded for a causal-LM stage read every token both ways: the logits at
    position 2 moved by 2.9 when token 5 changed, and pt/sft reported the loss it fell to as learning."""
    import torch

    model = load_model(save_tiny(tmp_path / family, family), "CAUSAL_LM").eval()
    x = torch.tensor([[5, 6, 7, 8, 9]])
    y = x.clone()
    y[0, 4] = 10
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits[0, :4], model(input_ids=y).logits[0, :4])
