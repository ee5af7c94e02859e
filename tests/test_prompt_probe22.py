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


@pytest.mark.parametrize("words", [9, 6])
def test_a_long_init_text_on_a_seq2seq_model_warns_with_the_table_s_rows_not_as_virtual_tokens(words, tmp_path):
    # T5 with SEQ_2_SEQ_LM holds 2n rows (peft's num_transformer_submodules = 2); the warning said "there are 8
    # virtual tokens" for num_virtual_tokens=4. The table itself equals peft's (cut to the first 8 tokens).
    from tiny import POLICY_WORDS, word_tokenizer

    word_tokenizer().save_pretrained(tmp_path)
    kw = dict(
        task_type="SEQ_2_SEQ_LM",
        num_virtual_tokens=4,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=" ".join(POLICY_WORDS[:words]),
        tokenizer_name_or_path=str(tmp_path),
    )
    with pytest.warns(UserWarning) as caught:
        ours = dt.get_delta_model(tiny_model("t5", "seq2seq"), dt.PromptTuningConfig(**kw))
    said = [(str(w.message), w.filename) for w in caught if "prompt_tuning_init_text" in str(w.message)]
    assert said == [  # (the table's second half is peft's too; its model reads only the first n rows)
        (
            f"prompt_tuning_init_text has {words} tokens but num_virtual_tokens is 4 (peft's seq2seq table holds 8 "
            "rows, the model reads the first 4); only the first 4 are used",
            __file__,
        )
    ]
    theirs = peft.get_peft_model(tiny_model("t5", "seq2seq"), peft.PromptTuningConfig(**kw))
    table = ours.base_model.virtual_tokens.prompt_encoder["default"].embedding.weight
    assert torch.equal(table, theirs.prompt_encoder["default"].embedding.weight)


@pytest.mark.parametrize(
    "family, task, task_type", [("llama", "causal_lm", "CAUSAL_LM"), ("t5", "seq2seq", "SEQ_2_SEQ_LM")]
)
def test_a_prefix_without_a_backward_is_cast_once_not_copied_per_batch_row(family, task, task_type):
    # The prefix was cast to the base's bf16 after its expand over the batch also under no_grad (generate): every
    # layer's keys and values copied batch times (key storage 0.5 -> 32 MiB on a batch of 64). peft's float32 sum
    # needs the cast after the expand only when gradients flow; without them the n rows are cast once.
    from deltatune.methods._token_geometry import _prefix_pairs

    model = dt.get_delta_model(tiny_model(family, task).to(torch.bfloat16), _configs("prefix_tuning", task_type)[0])
    virtual = model.base_model.virtual_tokens
    spec, encoder, batch = virtual.specs["default"], virtual.prompt_encoder["default"], 8
    with torch.no_grad():
        flat = encoder()
        pairs = _prefix_pairs(flat, spec, batch, torch.bfloat16)
    trained = _prefix_pairs(encoder(), spec, batch, torch.bfloat16)  # the path whose gradients equal peft's
    assert len(pairs) == len(trained) == spec.layers
    for got, ref in zip((t for p in pairs for t in p), (t for p in trained for t in p)):
        assert got.dtype == torch.bfloat16 and torch.equal(got, ref.detach())
        assert got.untyped_storage().nbytes() == flat.numel() * 2  # the n rows in bf16, not batch copies
    prompt = dt.get_delta_model(tiny_model(family, task).to(torch.bfloat16), _configs("prompt_tuning", task_type)[0])
    virtual = prompt.base_model.virtual_tokens
    like = torch.zeros(1, 1, spec.token_dim, dtype=torch.bfloat16)
    trained = virtual._prompts("default", virtual.specs["default"], batch, like)
    with torch.no_grad():
        prompts = virtual._prompts("default", virtual.specs["default"], batch, like)
    assert prompts.dtype == torch.bfloat16 and torch.equal(prompts, trained.detach())
    assert prompts.untyped_storage().nbytes() <= virtual.prompt_encoder["default"].embedding.weight.numel() * 2


@pytest.mark.parametrize("deep", [False, True])
def test_visual_prompts_on_a_bf16_vit_add_their_batch_gradients_in_float32(deep):
    # The float32 prompts were cast to bf16 and then expanded, so their gradient was summed over the batch in bf16
    # (as the token methods' before e0b85b8); now in float32: the sum of the bf16 gradients the inserted rows get.
    from deltatune.methods import vpt

    torch.manual_seed(0)
    model = dt.get_delta_model(
        tiny_model("vit", "image_cls").to(torch.bfloat16), vpt.VisualPromptConfig(num_virtual_tokens=4, deep=deep)
    )
    layer = model.base_model.visual_prompts
    seen = []

    def keep(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.retain_grad()
        seen.append(hidden)

    for block in model.base_model.vit.layers:
        block.register_forward_pre_hook(keep, with_kwargs=True)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tiny_inputs("vit", batch=16).items()}
    model(**inputs).logits.float().pow(2).sum().backward()
    grad = layer.prompt_embeddings["default"].grad
    assert grad.dtype == torch.float32 and grad.shape[0] == (len(seen) if deep else 1)
    for i in range(grad.shape[0]):
        ref = seen[i].grad[:, layer.lead : layer.lead + 4].float().sum(0)
        assert ref.abs().max() > 0
        torch.testing.assert_close(grad[i], ref, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_a_trainable_load_of_a_p_tuning_adapter_says_nothing_of_encoder_num_layers(tmp_path, how):
    # The warning is for a new MLP encoder; on a trainable load (resume) the saved table is folded right after. peft
    # loads such a file for inference only (it refuses is_trainable=True for prompt learning), without the warning.
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_num_layers=4, encoder_hidden_size=16)
    with pytest.warns(UserWarning, match="encoder_num_layers"):
        dt.get_delta_model(tiny_model("llama"), dt.PTuningConfig(**kw)).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "from_pretrained":
            dt.DeltaModel.from_pretrained(tiny_model("llama"), str(tmp_path), is_trainable=True)
        else:
            lora = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(target_modules=["q_proj"]))
            lora.load_adapter(str(tmp_path), "p", is_trainable=True)
    assert [str(w.message) for w in caught if "encoder_num_layers" in str(w.message)] == []


def test_the_token_methods_warnings_point_at_the_user_s_call():
    # The two warnings came from different depths (stacklevel=4): one named deltatune's model.py, not the caller.
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_num_layers=4, encoder_hidden_size=16)
    with pytest.warns(UserWarning, match="encoder_num_layers") as caught:
        dt.get_delta_model(tiny_model("llama"), dt.PTuningConfig(**kw))
    lora = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="encoder_num_layers") as added:
        lora.add_adapter("p", dt.PTuningConfig(**kw))
    files = {w.filename for w in [*caught, *added] if "encoder_num_layers" in str(w.message)}
    assert files == {__file__}
