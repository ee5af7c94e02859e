"""Token methods, probe 22 (prompt tuning, P-tuning, prefix tuning against peft 0.21.2 and 0.22.0). Each test failed
before its fix."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import tiny_inputs, tiny_model

import deltatune as dt

peft = pytest.importorskip("peft")

N = 3


def _configs(method: str, task_type: str) -> tuple[dt.DeltaConfig, object]:
    kw = dict(task_type=task_type, num_virtual_tokens=N)
    return {
        "prompt_tuning": (dt.PromptTuningConfig(**kw), peft.PromptTuningConfig(**kw)),
        "p_tuning": (dt.PTuningConfig(**kw), peft.PromptEncoderConfig(**kw)),
        "prefix_tuning": (dt.PrefixTuningConfig(**kw), peft.PrefixTuningConfig(**kw)),
    }[method]


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
@pytest.mark.parametrize(
    "family, task, task_type", [("llama", "causal_lm", "CAUSAL_LM"), ("t5", "seq2seq", "SEQ_2_SEQ_LM")]
)
def test_a_bf16_base_gives_the_virtual_tokens_peft_s_float32_gradients(method, family, task, task_type):
    # The float32 tokens were cast to the base's bf16 and then expanded over the batch, so the rows' gradients were
    # added up in bf16; peft repeats in float32 and casts after (its sum in float32). Gradient off by up to 1.5e-5
    # (llama prompt tuning, batch 2) with equal logits and loss; now equal to the bit.
    ours_cfg, peft_cfg = _configs(method, task_type)
    ours = dt.get_delta_model(tiny_model(family, task).to(torch.bfloat16), ours_cfg)
    theirs = peft.get_peft_model(tiny_model(family, task).to(torch.bfloat16), peft_cfg)
    encoder = ours.base_model.virtual_tokens.prompt_encoder["default"]
    theirs.prompt_encoder["default"].load_state_dict(encoder.state_dict())
    inputs = tiny_inputs(family, task, batch=4)
    inputs["attention_mask"][1, :2] = 0
    inputs["labels"] = inputs.pop("decoder_input_ids") if task == "seq2seq" else inputs["input_ids"]
    got, ref = ours(**inputs), theirs(**inputs)
    assert torch.equal(got.loss, ref.loss)
    got.loss.backward()
    ref.loss.backward()
    ours_grads = {k: p.grad for k, p in encoder.named_parameters()}
    peft_grads = {k: p.grad for k, p in theirs.prompt_encoder["default"].named_parameters()}
    assert ours_grads.keys() == peft_grads.keys()
    for key, grad in peft_grads.items():
        assert grad.dtype == torch.float32 and grad.abs().max() > 0
        torch.testing.assert_close(ours_grads[key], grad, atol=1e-9, rtol=1e-6, msg=key)


def test_an_mlp_prompt_encoder_warns_that_encoder_num_layers_is_ignored_as_peft():
    # peft warns that the MLP ignores encoder_num_layers; ours built the same three layers without a word.
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_num_layers=4, encoder_hidden_size=16)
    with pytest.warns(UserWarning, match="encoder_num_layers") as theirs:
        peft.get_peft_model(tiny_model("llama"), peft.PromptEncoderConfig(**kw))
    assert any("`encoder_num_layers` is ignored" in str(w.message) for w in theirs)
    with pytest.warns(UserWarning, match=r"^encoder_num_layers=4 is ignored by the MLP prompt encoder"):
        model = dt.get_delta_model(tiny_model("llama"), dt.PTuningConfig(**kw))
    mlp = model.base_model.virtual_tokens.prompt_encoder["default"].mlp_head
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp) == 3
    with warnings.catch_warnings():  # the LSTM reads it; the default says nothing
        warnings.simplefilter("error")
        dt.get_delta_model(tiny_model("llama"), dt.PTuningConfig(**{**kw, "encoder_reparameterization_type": "LSTM"}))
        dt.get_delta_model(tiny_model("llama"), dt.PTuningConfig(**{**kw, "encoder_num_layers": 2}))


def test_a_long_init_text_on_a_seq2seq_model_warns_with_the_table_s_rows_not_as_virtual_tokens(tmp_path):
    # T5 with SEQ_2_SEQ_LM holds 2n rows (peft's num_transformer_submodules = 2); the warning said "there are 8
    # virtual tokens" for num_virtual_tokens=4. The table itself equals peft's (cut to the first 8 tokens).
    from tiny import POLICY_WORDS, word_tokenizer

    word_tokenizer().save_pretrained(tmp_path)
    kw = dict(
        task_type="SEQ_2_SEQ_LM",
        num_virtual_tokens=4,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=" ".join(POLICY_WORDS[:9]),
        tokenizer_name_or_path=str(tmp_path),
    )
    with pytest.warns(UserWarning) as caught:
        ours = dt.get_delta_model(tiny_model("t5", "seq2seq"), dt.PromptTuningConfig(**kw))
    said = [str(w.message) for w in caught if "prompt_tuning_init_text" in str(w.message)]
    assert said == [
        "prompt_tuning_init_text has 9 tokens but the table has 8 rows (num_virtual_tokens=4 x "
        "num_transformer_submodules=2); only the first 8 are used"
    ]
    theirs = peft.get_peft_model(tiny_model("t5", "seq2seq"), peft.PromptTuningConfig(**kw))
    table = ours.base_model.virtual_tokens.prompt_encoder["default"].embedding.weight
    assert torch.equal(table, theirs.prompt_encoder["default"].embedding.weight)
