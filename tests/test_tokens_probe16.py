"""Token methods, probe 16: bad input of the TEXT init. Each test failed before its fix."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_inputs, tiny_model

import deltatune as dt
from deltatune.config import ConfigError


@pytest.mark.parametrize("where", ["missing", "empty", "hub"])
def test_a_tokenizer_that_does_not_load_is_refused_in_one_line_naming_the_field(where, tmp_path, monkeypatch):
    """A TEXT init whose tokenizer_name_or_path gives no tokenizer raised transformers' OSError ("Repo id must be in
    the form ...", from huggingface_hub) or a ValueError of eight lines ("Couldn't instantiate the backend tokenizer")
    naming neither the field nor the path; now one ConfigError naming both, and the model is left as it was."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = {"missing": str(tmp_path / "nowhere"), "empty": str(tmp_path), "hub": "no-such-org/no-such-tokenizer"}
    base = tiny_model("llama", "causal_lm")
    inputs = tiny_inputs("llama", "causal_lm")
    with torch.no_grad():
        before = base(**inputs).logits
    config = dt.PromptTuningConfig(
        num_virtual_tokens=3,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="the cat",
        tokenizer_name_or_path=path[where],
    )
    with pytest.raises(ConfigError) as err:
        dt.get_delta_model(base, config)
    message = str(err.value)
    assert message.startswith(
        f"tokenizer_name_or_path={path[where]!r} (for prompt_tuning_init='TEXT') gives no tokenizer"
    )
    assert "\n" not in message
    assert "virtual_tokens" not in base._modules and not base._forward_pre_hooks and not base._forward_hooks
    assert "prepare_inputs_for_generation" not in base.__dict__
    assert config.token_dim is None  # the caller's config is not filled in either
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize(
    "config", [dt.PromptTuningConfig(num_virtual_tokens=3), dt.PrefixTuningConfig(num_virtual_tokens=3)]
)
def test_a_token_file_that_does_not_fit_is_not_blamed_on_target_modules(config, tmp_path):
    """deltatune's own token adapter files leave target_modules out (peft's prompt-learning configs have none); a
    file whose prompt_embeddings do not fit was blamed on it: "adapter_config.json does not set target_modules
    (default None used), and the saved tensors do not fit that". The shape is named; target_modules is not."""
    from safetensors.torch import load_file, save_file

    base = tiny_model("llama", "causal_lm")
    dt.get_delta_model(tiny_model("llama", "causal_lm"), config).save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]
    save_file(
        {"prompt_embeddings": torch.zeros(saved.shape[0] + 1, saved.shape[1])}, tmp_path / "adapter_model.safetensors"
    )
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(4, \d+\) in the file but \(3, \d+\)") as err:
        dt.DeltaModel.from_pretrained(base, tmp_path)
    assert "target_modules" not in str(err.value)
    assert "virtual_tokens" not in base._modules and not base._forward_pre_hooks


def _tiny_hybrid(family: str) -> torch.nn.Module:
    """A tiny hybrid decoder: layer 0 keeps a recurrent state (Jamba's Mamba, RecurrentGemma's recurrent block), layer
    1 keys and values."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    if family == "jamba":
        fields.update(num_key_value_heads=2, mamba_d_state=4, attn_layer_period=2, attn_layer_offset=1,
                      expert_layer_period=2, num_experts=1, use_mamba_kernels=False)  # fmt: skip
    else:
        fields.update(lru_width=32, attention_window_size=16, block_types=["recurrent", "attention"])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **fields)).eval()


@pytest.mark.parametrize("family", ["jamba", "recurrent_gemma"])
def test_a_prefix_on_a_model_with_layers_without_keys_is_refused_when_added(family):
    """Jamba's and RecurrentGemma's caches hold a recurrent state in their Mamba / recurrent layers: the prefix was
    added, then every forward failed in transformers' cache ("'LinearAttentionLayer' object has no attribute 'update'";
    peft's: "Cannot get conv state for non linear attention layer 0"). Now one ConfigError naming the model type and
    layer 0 when the adapter is added, and the model is left as it was. Prompt tuning works there, generate included:
    RecurrentGemma's recurrent layer 0 counts no tokens in the cache, so the prompts were prepended again at every
    step (scores 0.26 off the forward's from step 2; the cache length is now its longest layer's)."""
    base = _tiny_hybrid(family)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = base(input_ids=ids).logits
    with pytest.raises(ConfigError, match=rf"model type '{family}' has layers whose cache holds no keys and values "
                                          r"\(layer 0 \(LinearAttentionLayer\)") as err:  # fmt: skip
        dt.get_delta_model(base, dt.PrefixTuningConfig(num_virtual_tokens=3))
    assert "\n" not in str(err.value)
    assert "virtual_tokens" not in base._modules and not base._forward_pre_hooks and not base._forward_hooks
    assert "prepare_inputs_for_generation" not in base.__dict__
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, before, atol=0, rtol=0)
    model = dt.get_delta_model(base, dt.PromptTuningConfig(num_virtual_tokens=3)).eval()
    _check_generate_scores(model, ids)


def _check_generate_scores(model: torch.nn.Module, ids: torch.Tensor, steps: int = 3) -> None:
    """Each step's scores of greedy generate are the adapted forward's over the sequence so far."""
    out = model.generate(input_ids=ids, max_new_tokens=steps, do_sample=False, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        for k, scores in enumerate(out.scores):
            expected = model(input_ids=out.sequences[:, : ids.shape[1] + k]).logits[:, -1]
            torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


def _tiny_mamba() -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("mamba", vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4)
    return AutoModelForCausalLM.from_config(config).eval()


MAMBA_IDS = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_prompts_on_mamba_take_the_given_heads_as_peft_and_compute_its_numbers(method, tmp_path):
    """Mamba's config has no attention heads: peft asks for num_attention_heads and then prompt-tunes it; deltatune
    refused it even given ("cannot read the layer count, hidden size and heads of model type 'mamba'"). Now the given
    value stands (prompts need only their width) and logits, loss and files equal peft's; unset, the refusal names
    the field."""
    peft = pytest.importorskip("peft")
    base = _tiny_mamba()
    with pytest.raises(ConfigError, match="cannot read num_attention_heads from the config of model type 'mamba'"):
        dt.get_delta_model(base, dt.PromptTuningConfig(num_virtual_tokens=3))
    ours_cls, theirs_cls, fields = (
        (dt.PromptTuningConfig, peft.PromptTuningConfig, {})
        if method == "prompt"
        else (dt.PTuningConfig, peft.PromptEncoderConfig, {"encoder_hidden_size": 16})
    )
    fields.update(task_type="CAUSAL_LM", num_virtual_tokens=3, num_attention_heads=1)
    theirs_base = _tiny_mamba()  # (seeds 0 itself)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(theirs_base, theirs_cls(**fields)).eval()
    torch.manual_seed(3)
    ours = dt.get_delta_model(base, ours_cls(**fields)).eval()
    with torch.no_grad():
        a, b = ours(input_ids=MAMBA_IDS, labels=MAMBA_IDS), theirs(input_ids=MAMBA_IDS, labels=MAMBA_IDS)
    torch.testing.assert_close(a.logits, b.logits[:, 3:], atol=1e-5, rtol=0)  # peft keeps the virtual rows
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=0)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = dt.DeltaModel.from_pretrained(_tiny_mamba(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=MAMBA_IDS).logits, b.logits[:, 3:], atol=1e-5, rtol=0)


def test_generate_on_mamba_with_prompts_scores_as_the_forward_loop():
    """A Mamba cache (recurrent states only) is "compileable" to transformers and was refused as a fixed-size static
    cache; now generate runs, and each step's scores are the adapted forward's over the sequence so far (peft's
    differ from its own forward by ~0.95 from the second step: it prepends nothing there but loses the state)."""
    base = _tiny_mamba()
    torch.manual_seed(3)
    model = dt.get_delta_model(base, dt.PromptTuningConfig(num_virtual_tokens=3, num_attention_heads=1))
    _check_generate_scores(model.eval(), MAMBA_IDS)


def _damaged_tokenizer(tmp_path, kind: str) -> str:
    """A tokenizer.json that is JSON but no tokenizer: without added_tokens (KeyError in transformers) or with all
    fields and an unknown model type (the tokenizers library's plain Exception, "data did not match any variant")."""
    data = {"version": "1.0", "model": {"type": "Nope"}}
    if kind == "unknown model":
        data = {"truncation": None, "padding": None, "added_tokens": [], "normalizer": None, **data}
        data.update(pre_tokenizer=None, post_processor=None, decoder=None)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    return str(tmp_path)


@pytest.mark.parametrize("kind", ["no added_tokens", "unknown model", "no tokenizer files"])
def test_a_damaged_or_absent_tokenizer_is_refused_naming_the_field_and_a_reason(kind, tmp_path):
    """A damaged tokenizer.json escaped as KeyError 'added_tokens' or a plain Exception (neither names the field nor
    the path); a folder without tokenizer files gave a reason ending on a dangling colon. Now one ConfigError with a
    whole reason, and the model and config are left as they were."""
    path = str(tmp_path) if kind == "no tokenizer files" else _damaged_tokenizer(tmp_path, kind)
    if kind == "no tokenizer files":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    base = tiny_model("llama", "causal_lm")
    config = dt.PromptTuningConfig(
        num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="the cat", tokenizer_name_or_path=path
    )
    with pytest.raises(ConfigError) as err:
        dt.get_delta_model(base, config)
    message = str(err.value)
    prefix = f"tokenizer_name_or_path={path!r} (for prompt_tuning_init='TEXT') gives no tokenizer: "
    assert message.startswith(prefix) and "\n" not in message
    reason = message[len(prefix) :]
    assert len(reason) > 10 and not reason.rstrip().endswith(":")
    if kind == "no tokenizer files":
        assert reason.startswith("no tokenizer files")
    assert "virtual_tokens" not in base._modules and config.token_dim is None


def test_prompt_tuning_without_a_hidden_size_in_the_config_takes_the_embedding_width():
    """A config without hidden_size was refused with "cannot read token_dim ...; set it in the adapter config", and
    setting token_dim did not help (the hidden size was read from the model config only); prompts take their width
    from the input embedding (as peft's prompt encoder is as wide as the word embeddings), so they need no hidden
    size: the adapter is built and its forward equals the base model's on the prompt prepended by hand."""
    base = tiny_model("llama", "causal_lm")
    real = base.config

    class NoHidden(type(real)):  # the same config, reading no hidden size (a model type that names it otherwise)
        def __getattribute__(self, name):
            if name in ("hidden_size", "n_embd", "d_model"):
                raise AttributeError(name)
            return object.__getattribute__(self, name)

    base.config = NoHidden.__new__(NoHidden)
    base.config.__dict__.update(real.__dict__)
    assert getattr(base.config, "hidden_size", None) is None
    inputs = tiny_inputs("llama", "causal_lm")
    model = dt.get_delta_model(base, dt.PromptTuningConfig(num_virtual_tokens=3))
    width = base.get_input_embeddings().weight.shape[1]
    assert model.peft_config["default"].token_dim == width
    model.eval()
    prompt = model.get_prompt_embedding_to_save("default")
    with torch.no_grad():
        got = model(**inputs).logits
        with model.disable_adapter():
            embeds = base.get_input_embeddings()(inputs["input_ids"])
            full = torch.cat([prompt.unsqueeze(0).expand(embeds.shape[0], -1, -1).to(embeds.dtype), embeds], dim=1)
            mask = torch.cat([inputs["attention_mask"].new_ones(embeds.shape[0], 3), inputs["attention_mask"]], dim=1)
            want = base(inputs_embeds=full, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("implementation", ["static", "sliding_window"])
def test_a_fixed_size_cache_refusal_does_not_claim_static_when_another_was_passed(implementation):
    """The refusal always said cache_implementation='static', also for cache_implementation='sliding_window' (which
    transformers turns into a StaticCache of sliding-window layers); the cache does not record what was passed, so
    the message names the cache's layers and the static values, and it is one line."""
    base = tiny_model("llama", "causal_lm")
    base.config.sliding_window = 4
    model = dt.get_delta_model(base, dt.PromptTuningConfig(num_virtual_tokens=3))
    ids = tiny_inputs("llama", "causal_lm")["input_ids"][:1]
    with pytest.raises(ValueError) as err:
        model.generate(input_ids=ids, max_new_tokens=2, cache_implementation=implementation, do_sample=False)
    message = str(err.value)
    assert "\n" not in message and "has no room for" in message
    assert "cache_implementation='static')" not in message
    assert "'static'" in message and "'sliding_window'" in message
