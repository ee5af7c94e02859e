"""Token methods, probe 19 (prompt tuning, P-tuning, prefix tuning, VPT against peft 0.21.2). Each test failed before
its fix."""

from __future__ import annotations

import pytest
import torch
from tiny import minilm_path, tiny_model

import deltatune as dt
from deltatune.config import ConfigError


@pytest.mark.parametrize("value", ["false", "no", 0, 1, None])
def test_prefix_projection_that_is_not_a_boolean_is_refused_naming_the_field(value):
    # "false" was taken as true (a non-empty string): the MLP reparametrisation was built against the user's word.
    with pytest.raises(ConfigError, match=r"^prefix_projection must be true or false, got "):
        dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=value)


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"tokenizer_kwargs": "use_fast=False"}, "tokenizer_kwargs"),
        ({"tokenizer_kwargs": ["use_fast"]}, "tokenizer_kwargs"),
        ({"prompt_tuning_init_text": 123}, "prompt_tuning_init_text"),
        ({"prompt_tuning_init_text": ["the cat"]}, "prompt_tuning_init_text"),
    ],
)
def test_a_text_init_field_of_the_wrong_type_is_refused_in_one_line_and_the_model_is_left_as_it_was(fields, key):
    # Before: the config was accepted and inject failed deep inside (AttributeError "'str' object has no attribute
    # 'items'", tokenizers' ValueError listing its input types, TypeError "'>=' not supported ... 'list' and 'int'").
    base = dict(
        task_type="CAUSAL_LM",
        num_virtual_tokens=3,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="the cat",
        tokenizer_name_or_path=minilm_path(),  # a real tokenizer: the failure was past it
    )
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"^{key} must be "):
        dt.get_delta_model(model, dt.PromptTuningConfig(**{**base, **fields}))
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "virtual_tokens" not in dict(model.named_children())


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_a_backbone_last_hidden_state_loses_the_virtual_positions_as_its_hidden_states_do(family, method):
    # A feature-extraction model (AutoModel): peft returns n + L rows everywhere; ours gives one row per real token
    # in hidden_states, and last_hidden_state kept the n virtual rows (10 rows beside hidden_states[-1]'s 7), so a
    # mean pooling with the attention mask failed on the shapes.
    peft = pytest.importorskip("peft")
    from tiny import tiny_config, tiny_inputs
    from transformers import AutoModel

    def backbone():
        torch.manual_seed(0)
        return AutoModel.from_config(tiny_config(family)).eval()

    n = 3
    ours_cls, theirs_cls = {
        "prompt_tuning": (dt.PromptTuningConfig, peft.PromptTuningConfig),
        "p_tuning": (dt.PTuningConfig, peft.PromptEncoderConfig),
    }[method]
    ours = dt.get_delta_model(backbone(), ours_cls(task_type="FEATURE_EXTRACTION", num_virtual_tokens=n)).eval()
    theirs = peft.get_peft_model(backbone(), theirs_cls(task_type="FEATURE_EXTRACTION", num_virtual_tokens=n)).eval()
    theirs.prompt_encoder["default"].load_state_dict(
        ours.base_model.virtual_tokens.prompt_encoder["default"].state_dict()
    )
    inputs = tiny_inputs(family, "seq_cls")
    inputs["attention_mask"][1, :2] = 0
    with torch.no_grad():
        got = ours(**inputs, output_hidden_states=True)
        ref = theirs(**inputs, output_hidden_states=True)
    assert ref.last_hidden_state.shape[1] == n + inputs["input_ids"].shape[1]
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state[:, n:], atol=1e-6, rtol=0)
    torch.testing.assert_close(got.last_hidden_state, got.hidden_states[-1], atol=0, rtol=0)
    mask = inputs["attention_mask"].unsqueeze(-1)
    pooled = (got.last_hidden_state * mask).sum(1) / mask.sum(1)  # what a sentence embedder does
    torch.testing.assert_close(pooled, (ref.last_hidden_state[:, n:] * mask).sum(1) / mask.sum(1), atol=1e-6, rtol=0)


def test_an_adapter_config_holding_prefix_projection_as_text_loads_as_it_trained_with_the_mlp(tmp_path):
    # Before cabfaeb a config took prefix_projection="false" (a non-empty string: true) and saved the text: that run
    # trained with the MLP, and its file holds the MLP-folded prefixes. cabfaeb's check made from_dict refuse the
    # file (ConfigError) while peft loads it; it reads as it ran now, with a warning naming the file.
    import json

    peft = pytest.importorskip("peft")
    from tiny import tiny_inputs

    config = dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True)
    trained = dt.get_delta_model(tiny_model("llama"), config).eval()
    with torch.no_grad():  # a trained MLP (not the zero-free init alone): the fold must be what is served
        for p in trained.base_model.virtual_tokens.prompt_encoder["default"].parameters():
            p.add_(0.1 * torch.randn_like(p))
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        want = trained(**inputs).logits
    trained.save_pretrained(tmp_path)
    file = tmp_path / "adapter_config.json"
    data = json.loads(file.read_text())
    assert data["prefix_projection"] is True
    file.write_text(json.dumps({**data, "prefix_projection": "false"}))  # what the old code wrote for "false"
    with pytest.warns(UserWarning, match=r"adapter_config\.json: prefix_projection='false' \(text.*read as True"):
        loaded = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    assert loaded.peft_config["default"].prefix_projection is True
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    with torch.no_grad():
        got, ref = loaded(**inputs).logits, theirs(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match=r"^adapter config: prefix_projection=''"):
        assert dt.PrefixTuningConfig.from_dict({"prefix_projection": ""}).prefix_projection is False  # as it ran
    with pytest.raises(ConfigError, match=r"got 'false' \(text was read as true before: such a run trained with"):
        dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection="false")


@pytest.mark.parametrize("kind", ["mapping", "dict"])
def test_tokenizer_kwargs_as_any_mapping_is_taken_as_a_dict(kind):
    # The message said "a mapping" but only a dict passed: a MappingProxyType (or any Mapping) was refused.
    import types

    value = {"use_fast": True}
    kwargs = types.MappingProxyType(value) if kind == "mapping" else value
    config = dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="TEXT",
                                   prompt_tuning_init_text="the cat", tokenizer_name_or_path=minilm_path(),
                                   tokenizer_kwargs=kwargs)  # fmt: skip
    assert type(config.tokenizer_kwargs) is dict and config.tokenizer_kwargs == value
    assert config.to_dict()["tokenizer_kwargs"] == value


def test_an_init_text_yaml_read_as_a_mapping_says_to_quote_it():
    # method.prompt_tuning_init_text=Classify this: -> YAML {'Classify this': None}: the one line says why.
    import yaml

    text = yaml.safe_load("Classify this:")
    assert text == {"Classify this": None}
    with pytest.raises(ConfigError, match=r"^prompt_tuning_init_text must be a string, got \{'Classify this': None\} "
                                          r"\(quote it: YAML read the text's trailing ':' as a mapping\)$"):  # fmt: skip
        dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="TEXT",
                              prompt_tuning_init_text=text, tokenizer_name_or_path=minilm_path())  # fmt: skip


def _prompt_tuned_pair(make, task_type, n):
    """The same base twice: ours and peft's prompt tuning on it, with our prompts copied into peft's."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours = dt.get_delta_model(make(), dt.PromptTuningConfig(task_type=task_type, num_virtual_tokens=n)).eval()
    torch.manual_seed(0)
    theirs = peft.get_peft_model(make(), peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=n)).eval()
    theirs.prompt_encoder["default"].load_state_dict(
        ours.base_model.virtual_tokens.prompt_encoder["default"].state_dict()
    )
    return ours, theirs


def test_a_backbone_pooler_output_reads_virtual_token_0_as_peft_and_its_tuple_is_trimmed_as_its_dict():
    # Pins what docs/methods-token.md says after 2496635: last_hidden_state[:, 0] is the first REAL token (peft's
    # row n), while BERT's pooler ran inside the model on the untrimmed rows: pooler_output is peft's (virtual 0).
    from tiny import tiny_config, tiny_inputs
    from transformers import AutoModel

    n = 3
    ours, theirs = _prompt_tuned_pair(
        lambda: AutoModel.from_config(tiny_config("bert")).eval(), "FEATURE_EXTRACTION", n
    )
    inputs = tiny_inputs("bert", "seq_cls")
    with torch.no_grad():
        got, ref = ours(**inputs), theirs(**inputs)
        as_tuple = ours(**inputs, return_dict=False)
        pooled_virtual_0 = ours.get_base_model().pooler(ref.last_hidden_state)  # BERT's pooler reads row 0
    torch.testing.assert_close(got.pooler_output, ref.pooler_output, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.pooler_output, pooled_virtual_0, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.last_hidden_state[:, 0], ref.last_hidden_state[:, n], atol=1e-6, rtol=0)
    assert not torch.allclose(got.last_hidden_state[:, 0], ref.last_hidden_state[:, 0], atol=1e-3)  # CLS differs
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape[1] == inputs["input_ids"].shape[1]
    torch.testing.assert_close(as_tuple[0], got.last_hidden_state, atol=0, rtol=0)
    torch.testing.assert_close(as_tuple[1], got.pooler_output, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_a_seq2seq_prompt_tuned_model_keeps_the_virtual_rows_in_its_encoder_outputs_as_peft(family):
    # The decoder cross-attends to the n prompts: encoder_last_hidden_state keeps n + L rows, equal to peft's.
    from tiny import tiny_inputs

    n = 3
    ours, theirs = _prompt_tuned_pair(lambda: tiny_model(family, "seq2seq"), "SEQ_2_SEQ_LM", n)
    inputs = tiny_inputs(family, "seq2seq")
    inputs["attention_mask"][1, -2:] = 0
    with torch.no_grad():
        got, ref = ours(**inputs, output_hidden_states=True), theirs(**inputs, output_hidden_states=True)
    assert got.encoder_last_hidden_state.shape[1] == n + inputs["input_ids"].shape[1]
    torch.testing.assert_close(got.encoder_last_hidden_state, ref.encoder_last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.encoder_hidden_states, ref.encoder_hidden_states, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=0)


def test_an_init_text_with_a_trailing_colon_on_the_command_line_says_to_quote_it():
    # method.prompt_tuning_init_text=Classify this: -> YAML's {'Classify this': None}; the recipe's type check
    # (_typed) refuses it before PromptTuningConfig's own hint is reached: "must be str or null, got {...}".
    from deltatune.train.config import apply_overrides, build

    raw = {"model": {"name_or_path": "x"}, "method": {"name": "prompt_tuning", "prompt_tuning_init": "TEXT"}}
    raw = apply_overrides(raw, ["method.prompt_tuning_init_text=Classify this:"])
    assert raw["method"]["prompt_tuning_init_text"] == {"Classify this": None}
    with pytest.raises(ConfigError, match=r"^method\.prompt_tuning_init_text must be .*, got \{'Classify this': "
                                          r"None\} \(quote it: YAML read the text's trailing ':' as a mapping\)$"):  # fmt: skip
        build(raw).method_config("CAUSAL_LM")
