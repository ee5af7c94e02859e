"""What every token method hands back, as the base model would: no cache when the call asked for none, the virtual
positions dropped from a tuple output and from hidden states next to ``logits_to_keep``, the virtual tokens on a
RoBERTa's own positions when ``position_ids`` are given, and no remote code from an adapter's tokenizer_kwargs.
Each test failed before its fix."""

from __future__ import annotations

import pytest
import torch
from _token_checks import adapted
from tiny import tiny_inputs

import deltatune as dt

N = 3
PREFIX = [dt.PrefixTuningConfig(num_virtual_tokens=N), dt.PTuningConfig(num_virtual_tokens=N)]
PROMPT = [dt.PromptTuningConfig(num_virtual_tokens=N), dt.PromptEncoderConfig(num_virtual_tokens=N, encoder_hidden_size=16)]  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("config", PREFIX, ids=["prefix", "ptv2"])
def test_generate_without_the_cache_equals_generate_with_it(family, config):
    """With use_cache=False the prefix's cache came back in the output; generate fed it in again beside the whole
    input, so every token after the first was computed over the real tokens twice."""
    task = "causal_lm" if family == "llama" else "seq2seq"
    model = adapted(family, task, config)
    inputs = {k: v for k, v in tiny_inputs(family, task).items() if not k.startswith("decoder")}
    with torch.no_grad():
        out = model(**inputs, **({"decoder_input_ids": inputs["input_ids"][:, :2]} if family == "t5" else {}),
                    use_cache=False)  # fmt: skip
        assert out.past_key_values is None
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        cached = model.generate(**inputs, use_cache=True, **kw)
        torch.testing.assert_close(model.generate(**inputs, use_cache=False, **kw), cached, atol=0, rtol=0)


@pytest.mark.parametrize("config", PROMPT, ids=["prompt", "ptuning"])
def test_a_tuple_output_and_hidden_states_beside_logits_to_keep_lose_the_virtual_positions(config):
    model = adapted("llama", "causal_lm", config)
    inputs = tiny_inputs("llama")
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        as_dict = model(**inputs, output_hidden_states=True)
        as_tuple = model(**inputs, output_hidden_states=True, return_dict=False)
        last = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape[1] == length == as_dict.logits.shape[1]
    torch.testing.assert_close(as_tuple[0], as_dict.logits)
    assert all(h.shape[1] == length for h in last.hidden_states) and last.logits.shape[1] == 1
    torch.testing.assert_close(last.logits[:, -1], as_dict.logits[:, -1])


@pytest.mark.parametrize("config", PROMPT, ids=["prompt", "ptuning"])
def test_roberta_position_ids_as_roberta_computes_them_change_nothing(config):
    """The virtual tokens took positions 0, 1, 2 (1 is RoBERTa's padding row) where RoBERTa's own start after its
    padding index: passing the very position ids RoBERTa computes moved the logits (0.18)."""
    model = adapted("roberta", "seq_cls", config)
    inputs = tiny_inputs("roberta", "seq_cls")
    pad = model.config.pad_token_id
    positions = pad + 1 + torch.arange(inputs["input_ids"].shape[1]).expand_as(inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, position_ids=positions).logits, model(**inputs).logits)


def test_text_init_never_runs_remote_code_from_an_adapters_config(monkeypatch):
    """An adapter's tokenizer_kwargs {trust_remote_code: true} reached AutoTokenizer.from_pretrained (peft drops it)."""
    from transformers import AutoTokenizer

    from deltatune.train.embedded import resolve

    calls = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append(k) or real(*a, **k))
    config = dt.PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="TEXT", prompt_tuning_init_text="a b c",
                                   tokenizer_name_or_path=resolve("minilm"),
                                   tokenizer_kwargs={"trust_remote_code": True, "use_fast": True})  # fmt: skip
    with pytest.raises(dt.ConfigError, match="vocab"):  # (the tiny model's vocabulary is 128; the call is made first)
        adapted("bert", "seq_cls", config)
    assert calls and all("trust_remote_code" not in k for k in calls) and calls[-1].get("use_fast") is True


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("make", [lambda: dt.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
                                  lambda: dt.PTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)])  # fmt: skip
def test_a_decoder_classifier_reads_each_rows_last_token_in_a_right_padded_batch(family, make):
    """Given inputs_embeds (the virtual tokens prepended) a decoder's classifier reads the last position, a pad of
    every shorter right-padded row: its logits moved with the batch (peft's too; eval loss 0.467 at batch 1, 0.318
    at 8). Each row now computes as alone."""
    from tiny import tiny_model

    model = dt.get_delta_model(tiny_model(family, "seq_cls"), make()).eval()
    pad = model.config.pad_token_id
    rows = [[5, 6, 7, 8, 9], [5, 6, 7]]
    ids = torch.tensor([r + [pad] * (5 - len(r)) for r in rows])
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=(torch.arange(5) < torch.tensor([[5], [3]])).long()).logits
        for i, r in enumerate(rows):
            torch.testing.assert_close(batch[i], model(input_ids=torch.tensor([r])).logits[0], atol=1e-5, rtol=0)
