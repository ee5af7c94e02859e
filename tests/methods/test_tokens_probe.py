"""Token methods in the corners of generate and forward: continuing generation from the cache it returned, a
static cache, ``logits_to_keep`` as a tensor of indices. Each test failed before its fix."""

from __future__ import annotations

import pytest
import torch
from _token_checks import adapted
from tiny import tiny_inputs

import deltatune as dt

N = 3
CONFIGS = [dt.PromptTuningConfig(num_virtual_tokens=N), dt.PrefixTuningConfig(num_virtual_tokens=N)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("config", CONFIGS, ids=["prompt", "prefix"])
def test_generate_continued_from_its_cache_is_the_uninterrupted_generation(family, config):
    """generate sliced the inputs to (tokens - cached) counting the n virtual tokens as tokens: a second generate
    from the first one's past_key_values fed 4 of 7 tokens again (prompt tuning: other tokens, as peft's)."""
    model = adapted(family, "causal_lm", config)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (ids != 0).long()
    kw = dict(do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    whole = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **kw)
    first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, **kw)
    mask = torch.cat([mask, torch.ones_like(first.sequences[:, ids.shape[1] :])], dim=1)
    calls = []
    hook = model.base_model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape[1]), with_kwargs=True, prepend=True)  # fmt: skip
    try:
        rest = model.generate(input_ids=first.sequences, attention_mask=mask, past_key_values=first.past_key_values,
                              max_new_tokens=3, **kw)  # fmt: skip
    finally:
        hook.remove()
    assert calls == [1, 1, 1]  # the one token not yet in the cache, then one at a time
    torch.testing.assert_close(rest.sequences, whole.sequences, atol=0, rtol=0)
    torch.testing.assert_close(torch.stack(rest.scores), torch.stack(whole.scores[3:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", CONFIGS, ids=["prompt", "prefix"])
def test_a_static_cache_is_refused_in_one_line(config):
    """cache_implementation="static" sizes the cache for the inputs and new tokens: an IndexError from index_copy_."""
    model = adapted("gpt2", "causal_lm", config)
    with pytest.raises(ValueError, match="virtual tokens in the key/value cache.*fixed-size StaticCache"):
        model.generate(input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, pad_token_id=0,
                       cache_implementation="static")  # fmt: skip
    out = model.generate(input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, pad_token_id=0, do_sample=False)
    assert out.shape == (1, 7)  # the model is as it was


def test_a_static_cache_still_serves_an_encoder_decoders_prompt():
    """A T5's prompt is in its encoder input, not the decoder's cache: the static cache generates as the dynamic."""
    model = adapted("t5", "seq2seq", dt.PromptTuningConfig(num_virtual_tokens=N))
    kw = dict(input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, do_sample=False, output_scores=True,
              return_dict_in_generate=True)  # fmt: skip
    static, dynamic = model.generate(**kw, cache_implementation="static"), model.generate(**kw)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(dynamic.scores), atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", CONFIGS + [dt.PTuningConfig(num_virtual_tokens=N)], ids=["prompt", "prefix", "ptuning"])  # fmt: skip
def test_logits_to_keep_as_indices_picks_those_real_tokens(config):
    """Indices counted the virtual tokens with prompt methods: index 6 gave real token 3's logits (0.5 off), two
    indices raised 'Boolean value of Tensor ... ambiguous'."""
    model = adapted("llama", "causal_lm", config)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        full = model(**inputs).logits
        for keep in ([6], [0, 2], [-1, 1]):
            got = model(**inputs, logits_to_keep=torch.tensor(keep)).logits
            torch.testing.assert_close(got, full[:, keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,task", [("llama", "causal_lm"), ("t5", "seq2seq")])
def test_beam_search_without_the_cache_equals_beam_search_with_it(family, task):
    """With use_cache=False a prefix's output kept the cache key (set to None): beam search went to reorder it and
    raised 'cannot use beam search with a cache currently, as the cache cannot be reordered'."""
    model = adapted(family, task, dt.PrefixTuningConfig(num_virtual_tokens=N))
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    kw = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0,
              eos_token_id=None, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    cached, uncached = model.generate(input_ids=ids, **kw), model.generate(input_ids=ids, use_cache=False, **kw)
    torch.testing.assert_close(uncached.sequences, cached.sequences, atol=0, rtol=0)
    torch.testing.assert_close(torch.stack(uncached.scores), torch.stack(cached.scores), atol=1e-5, rtol=0)


def test_the_generation_wrapper_passes_no_argument_the_model_did_not_get():
    """transformers 4's generate passes no ``next_sequence_length`` (pyproject allows transformers >= 4.50), and
    its T5/BART prepare forwards unknown keywords to forward: the wrapper passed None and forward refused it."""
    from deltatune.methods._tokens import VirtualTokens

    model = adapted("llama", "causal_lm", CONFIGS[0])
    layer = next(m for m in model.modules() if isinstance(m, VirtualTokens))
    assert layer._prepare(lambda *a, **k: k, input_ids="ids", is_first_iteration=True) == {
        "input_ids": "ids", "is_first_iteration": True,
    }  # fmt: skip
    assert layer._prepare(lambda **k: k, next_sequence_length=4, is_first_iteration=False)["next_sequence_length"] == 4
