"""Token methods on encoder-decoder models against peft 0.21.2: the prefix geometry of the decoder it goes into."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import tiny_inputs, tiny_model
from tolerances import ATOL

import deltatune as dt

ATOL32 = ATOL[torch.float32]
PREFIX = dt.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)
PTV2 = dt.PrefixTuningConfig(num_virtual_tokens=3)
# Decoders PEFT's geometry (read from the encoder) does not fit: it fails in the attention on each of them.
UNLIKE_THE_ENCODER = [
    pytest.param("t5", dict(d_kv=16), id="t5-d_kv-times-heads-not-d_model"),  # as t5-3b, t5-11b
    pytest.param("t5", dict(num_decoder_layers=3), id="t5-deeper-decoder"),  # its own generate fails (transformers)
    pytest.param("bart", dict(decoder_attention_heads=2), id="bart-fewer-decoder-heads"),
    pytest.param("bart", dict(decoder_layers=3), id="bart-deeper-decoder"),
]


def _adapted(family: str, overrides: dict, config: dt.PrefixTuningConfig) -> dt.DeltaModel:
    torch.manual_seed(0)
    model = dt.get_delta_model(tiny_model(family, "seq2seq", **overrides), config.replace(task_type="SEQ_2_SEQ_LM"))
    return model.eval()


def _peft_from(path, family: str, overrides: dict):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(tiny_model(family, "seq2seq", **overrides), path).eval()


@pytest.mark.parametrize("config", [pytest.param(PREFIX, id="prefix"), pytest.param(PTV2, id="ptv2")])
@pytest.mark.parametrize(("family", "overrides"), UNLIKE_THE_ENCODER)
def test_a_prefix_takes_the_decoders_geometry_and_its_file_computes_the_same_in_peft(
    family, overrides, config, tmp_path
):
    model = _adapted(family, overrides, config)
    inputs = tiny_inputs(family, "seq2seq")
    with torch.no_grad():
        ours = model(**inputs, labels=inputs["decoder_input_ids"])
        base = tiny_model(family, "seq2seq", **overrides)(**inputs).logits
    assert torch.isfinite(ours.loss)
    assert not torch.allclose(ours.logits, base, atol=1e-3), "the prefix should change the outputs"
    model.save_pretrained(tmp_path)
    theirs = _peft_from(tmp_path, family, overrides)  # peft builds the prefix from the saved geometry
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, ours.logits, atol=ATOL32, rtol=0)
    if overrides.get("num_decoder_layers"):
        return  # transformers 5.25 sizes T5's generation cache by the encoder's layers: the base model fails too
    steps, start = 3, model.base_model.config.decoder_start_token_id
    dec = torch.full((inputs["input_ids"].shape[0], 1), start, dtype=torch.long)
    enc = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
        for _ in range(steps):  # greedy by full forwards
            dec = torch.cat([dec, model(**enc, decoder_input_ids=dec).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, dec)


@pytest.mark.parametrize(
    ("family", "overrides"), [("t5", dict(num_decoder_layers=1)), ("bart", dict(decoder_layers=1))]
)
def test_a_shallower_decoder_keeps_pefts_geometry(family, overrides, tmp_path):
    """As distilbart-12-6: PEFT's prefix has the encoder's layer count, the decoder reads the first ones."""
    peft = pytest.importorskip("peft")
    model = _adapted(family, overrides, PTV2)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            tiny_model(family, "seq2seq", **overrides),
            peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_2_SEQ_LM"),
        ).eval()
    ours_cfg, their_cfg = model.peft_config["default"], theirs.peft_config["default"]
    for field in ("num_layers", "token_dim", "num_attention_heads", "num_transformer_submodules"):
        assert getattr(ours_cfg, field) == getattr(their_cfg, field), field
    inputs = tiny_inputs(family, "seq2seq")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, theirs(**inputs).logits, atol=ATOL32, rtol=0)


@pytest.mark.parametrize("model_type", ["mpnet", "data2vec-text", "roberta-prelayernorm"])
def test_positions_after_the_padding_index_are_counted_for_robertas_whole_family(model_type):
    """Their positions start after padding_idx (as RoBERTa's): 66 embeddings, pad 1 -> 64 positions for n + input."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        model_type, vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=66, pad_token_id=1, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(config).eval()
    model = dt.get_delta_model(base, dt.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    with torch.no_grad():
        assert model(input_ids=torch.full((1, 61), 5)).logits.shape == (1, 3)  # 64 positions: the whole table
        with pytest.raises(ValueError, match=f"65 positions needed .* model type '{model_type}' has only 64"):
            model(input_ids=torch.full((1, 62), 5))


SEEDED = {
    "prompt": (dt.PromptTuningConfig(num_virtual_tokens=3), "PromptTuningConfig", {}),
    "lstm": (
        dt.PTuningConfig(num_virtual_tokens=3, encoder_reparameterization_type="LSTM", encoder_hidden_size=8,
                         encoder_dropout=0.3),
        "PromptEncoderConfig",
        dict(encoder_reparameterization_type="LSTM", encoder_hidden_size=8, encoder_dropout=0.3),
    ),
    "prefix": (PREFIX, "PrefixTuningConfig", dict(prefix_projection=True, encoder_hidden_size=16)),
}  # fmt: skip
TASKS = {"seq2seq": "SEQ_2_SEQ_LM", "seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS"}


@pytest.mark.parametrize("method", list(SEEDED))
@pytest.mark.parametrize(("family", "task"), [("t5", "seq2seq"), ("bart", "seq2seq"), ("bert", "seq_cls")])
def test_the_same_seed_starts_the_same_tokens_as_peft_and_a_training_step_has_its_loss(family, task, method):
    """Same seed: the same initial tensors as peft, and in train mode (dropout on) the same loss and gradients."""
    peft = pytest.importorskip("peft")
    ours_cfg, name, fields = SEEDED[method]
    overrides = dict(dropout_rate=0.2) if family == "t5" else {}
    torch.manual_seed(0)
    ours = dt.get_delta_model(tiny_model(family, task, **overrides), ours_cfg.replace(task_type=TASKS[task]))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            tiny_model(family, task, **overrides),
            getattr(peft, name)(num_virtual_tokens=3, task_type=TASKS[task], **fields),
        )
    if task == "seq_cls":
        from _token_checks import _peft_cache_shim

        _peft_cache_shim(theirs)

    def tensors(model) -> dict:
        return {
            k.split("prompt_encoder.default.")[-1]: p for k, p in model.named_parameters() if "prompt_encoder" in k
        }

    a, b = tensors(ours), tensors(theirs)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    inputs = tiny_inputs(family, task)
    inputs["attention_mask"][1, :2] = 0
    labels = inputs.pop("decoder_input_ids") if task == "seq2seq" else torch.tensor([0, 2])
    losses = []
    for model in (ours.train(), theirs.train()):
        torch.manual_seed(3)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)
    for key in a:
        torch.testing.assert_close(a[key].grad, b[key].grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("family", "task", "config", "length", "steps"),
    [
        ("gpt2", "causal_lm", dt.PromptTuningConfig(num_virtual_tokens=3), 50, 14),
        ("gpt2", "causal_lm", PTV2, 50, 14),
        ("bart", "seq2seq", PTV2, 10, 63),  # the prefix takes decoder positions
    ],
    ids=["gpt2-prompt", "gpt2-ptv2", "bart-ptv2"],
)
def test_generating_past_the_position_table_is_refused_in_one_line(family, task, config, length, steps):
    """The base model generates these 64 positions; n more do not fit (it failed inside torch's embedding)."""
    torch.manual_seed(0)
    model = dt.get_delta_model(tiny_model(family, task), config.replace(task_type="CAUSAL_LM" if task == "causal_lm"
                                                                         else "SEQ_2_SEQ_LM")).eval()  # fmt: skip
    ids = torch.randint(3, 100, (1, length), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        with model.disable_adapter():
            model.generate(input_ids=ids, **kwargs)
        with pytest.raises(ValueError, match=f"65 positions needed .* model type '{family}' has only 64"):
            model.generate(input_ids=ids, **kwargs)
        model.generate(input_ids=ids, **{**kwargs, "max_new_tokens": steps - 2})  # 64 positions: the whole table


def test_the_position_limit_is_read_off_the_table_fsmt_holding_pad_plus_one_more_rows():
    """FSMT's position table has max_position_embeddings + padding_idx + 1 rows, positions after the pad: the
    limit was taken as max - pad - 1 (2 positions short at pad 1); RoBERTa's table (max rows) keeps max - pad - 1."""
    from types import SimpleNamespace

    from torch import nn

    from deltatune.methods._tokens import _absolute_positions

    class Model(nn.Module):
        def __init__(self, rows: int, pad: int) -> None:
            super().__init__()
            self.embed_positions = nn.Embedding(rows, 4, padding_idx=pad)

    cfg = SimpleNamespace(max_position_embeddings=64)
    assert _absolute_positions(Model(64 + 1 + 1, 1), cfg) == 64  # FSMT
    assert _absolute_positions(Model(64, 1), cfg) == 62  # RoBERTa: 514 rows hold 512 positions

    class Sinusoidal(nn.Module):  # M2M100's, NLLB's, XGLM's: a padding index and no num_embeddings (it grows)
        padding_idx = 1

    model = nn.Module()
    model.embed_positions = Sinusoidal()
    assert _absolute_positions(model, cfg) == 62  # was an AttributeError in every forward
