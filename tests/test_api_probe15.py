"""Probe 15 (api): peft's public API corners, deltatune against peft 0.21.2 on a tiny Llama (hidden 32).

get_delta_model's positional order is get_peft_model's (``fused_loss`` keyword-only), ``revision=``,
``inject_adapter_in_model(state_dict=...)``, ``get_prompt`` / ``get_prompt_embedding_to_save`` for the token methods,
and the model card ``save_pretrained`` writes.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import deltatune as dt
from deltatune.loss import causal_lm_loss
from deltatune.targets import matches

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.tensor([[3, 5, 7, 9, 11], [2, 4, 6, 8, 10]])


# -- 1. get_delta_model: peft's positional order ---------------------------------------------------------------------
def test_fourth_positional_is_peft_mixed_not_fused_loss() -> None:
    """get_peft_model(model, config, "default", True) means mixed=True; deltatune's HEAD read it as fused_loss."""
    base = _llama()
    model = dt.get_delta_model(base, dt.LoraConfig(target_modules=["q_proj"]), "default", True)
    assert vars(base).get("_loss_function") is not causal_lm_loss  # the user's loss is left alone
    fused = dt.get_delta_model(_llama(), dt.LoraConfig(target_modules=["q_proj"]), fused_loss=True)
    assert vars(fused.get_base_model()).get("_loss_function") is causal_lm_loss  # the keyword still turns it on
    assert model.active_adapter == "default"


def test_delta_model_takes_fused_loss_by_keyword_only() -> None:
    """PeftModel(model, config, "default", True) means autocast_adapter_dtype=True; a bool fourth is no fused_loss."""
    base = _llama()
    with pytest.raises(TypeError, match="positional argument"):
        dt.DeltaModel(base, dt.LoraConfig(target_modules=["q_proj"]), "default", True)
    assert vars(base).get("_loss_function") is not causal_lm_loss
    model = dt.DeltaModel(base, dt.LoraConfig(target_modules=["q_proj"]), "default", fused_loss=True)
    assert vars(model.get_base_model()).get("_loss_function") is causal_lm_loss


def test_peft_positional_order_up_to_low_cpu_mem_usage() -> None:
    """(model, config, adapter_name, mixed, autocast_adapter_dtype, revision, low_cpu_mem_usage), as peft's."""
    model = dt.get_delta_model(_llama(), dt.LoraConfig(target_modules=["q_proj"]), "a", False, True, "v1", False)
    want = peft.get_peft_model(_llama(), peft.LoraConfig(target_modules=["q_proj"]), "a", False, True, "v1", False)
    assert list(model.peft_config) == list(want.peft_config) == ["a"]
    with pytest.raises(TypeError, match="mixed must be True or False"):
        dt.get_delta_model(_llama(), dt.LoraConfig(target_modules=["q_proj"]), "a", "yes")


# -- 2. revision --------------------------------------------------------------------------------------------------------
def test_revision_is_recorded_where_the_config_has_the_field(tmp_path) -> None:
    """peft records get_peft_model's revision in the config (saved in adapter_config.json); from_pretrained /
    load_adapter take revision= for the hub and accept it on a local folder."""
    config = dt.LoraConfig(target_modules=["q_proj"])
    model = dt.get_delta_model(_llama(), config, revision="v1")
    with pytest.raises(TypeError, match="revision must be a string"):
        dt.get_delta_model(_llama(), dt.LoraConfig(target_modules=["q_proj"]), revision=3)
    assert model.peft_config["default"].revision == "v1" and config.revision is None  # recorded, as peft's
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["revision"] == "v1"
    assert peft.PeftConfig.from_pretrained(tmp_path).revision == "v1"
    loaded = dt.DeltaModel.from_pretrained(_llama(), tmp_path, revision="v1")
    loaded.load_adapter(tmp_path, "other", revision="v1")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model.eval()(IDS).logits)


# -- 3. inject_adapter_in_model(state_dict=...) -------------------------------------------------------------------------
def _lora_names(model: torch.nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "LoraLinear") and
                  hasattr(m, "lora_A"))  # fmt: skip


def test_inject_with_state_dict_targets_the_modules_its_keys_name() -> None:
    """The state dict (keys of layer 0's q_proj and layer 1's v_proj) decides the targets, not the config's
    q_proj/v_proj/k_proj; after loading the same tensors, logits equal peft's."""
    source = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["q_proj", "v_proj"]), _llama(1))
    for n, p in source.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    full = peft.get_peft_model_state_dict(source)
    sd = {k: v for k, v in full.items() if "0.self_attn.q_proj" in k or "1.self_attn.v_proj" in k}
    assert len(sd) == 4

    config = dict(target_modules=["q_proj", "v_proj", "k_proj"], r=8)
    with pytest.warns(RuntimeWarning) as theirs:  # peft says the config and the state dict differ
        want = peft.inject_adapter_in_model(peft.LoraConfig(**config), _llama(), state_dict=sd)
    peft.set_peft_model_state_dict(want, sd)
    with pytest.warns(RuntimeWarning) as ours:
        got = dt.inject_adapter_in_model(dt.LoraConfig(**config), _llama(), state_dict=sd)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]  # peft's words and module lists
    dt.set_peft_model_state_dict(got, sd)
    assert (
        _lora_names(got) == _lora_names(want) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    )
    with torch.no_grad():
        diff = (got(IDS).logits - want(IDS).logits).abs().max().item()
        base = (_llama()(IDS).logits - want(IDS).logits).abs().max().item()
    assert diff < 1e-6 and base > 1e-3  # the adapter does change the output, and both change it alike


def test_inject_state_dict_naming_no_module_is_one_clear_line() -> None:
    model = _llama()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="no key of state_dict names an adapter on a module of the model"):
        dt.inject_adapter_in_model(dt.LoraConfig(), model, state_dict={"nowhere.lora_A.weight": torch.zeros(1)})
    assert sorted(model.state_dict()) == sorted(before) and not hasattr(model, "_deltatune_model")


def test_inject_state_dict_with_trainable_tokens_loads_as_peft() -> None:
    """A LoRA + trainable_token_indices adapter's own state dict: its token delta's key names no LoRA target (peft
    takes the module before the last ".lora_"); HEAD made embed_tokens a LoRA target and refused the token adapter."""
    fields = dict(target_modules=["q_proj"], trainable_token_indices=[1, 2])
    source = peft.inject_adapter_in_model(peft.LoraConfig(**fields), _llama(1))
    for n, p in source.named_parameters():
        if "lora_B" in n or "trainable_tokens_delta" in n:
            torch.nn.init.normal_(p)
    sd = peft.get_peft_model_state_dict(source)
    assert "model.embed_tokens.token_adapter.trainable_tokens_delta" in sd
    want = peft.inject_adapter_in_model(peft.LoraConfig(**fields), _llama(), state_dict=sd)
    peft.set_peft_model_state_dict(want, sd)
    got = dt.inject_adapter_in_model(dt.LoraConfig(**fields), _llama(), state_dict=sd)
    dt.set_peft_model_state_dict(got, sd)
    assert _lora_names(got) == _lora_names(want) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert not any("lora" in n for n, _ in got.get_submodule("model.embed_tokens").named_parameters())
    with torch.no_grad():
        diff = (got(IDS).logits - want(IDS).logits).abs().max().item()
        base = (_llama()(IDS).logits - want(IDS).logits).abs().max().item()
    assert diff < 1e-6 and base > 1e-3


@pytest.mark.parametrize(
    "extra",
    [
        {"lm_head.modules_to_save.default.weight": torch.zeros(1)},  # a raw modules_to_save copy
        {"lm_head.weight": torch.zeros(1)},  # a saved modules_to_save key
        {"model.layers.1.self_attn.v_proj.ia3_l": torch.zeros(1)},  # another method's key
        {"model.layers.1.self_attn.v_proj.weight": torch.zeros(1)},  # a base weight
    ],
)
def test_inject_state_dict_keys_without_the_lora_prefix_name_no_target(extra: dict) -> None:
    """Only keys with ".lora_" name a LoRA target, as peft's: HEAD added a LoRA on lm_head for its copy's key, and on
    v_proj for an ia3_l key."""
    sd = {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1)} | extra
    want = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["q_proj"]), _llama(), state_dict=sd)
    got = dt.inject_adapter_in_model(dt.LoraConfig(target_modules=["q_proj"]), _llama(), state_dict=sd)
    assert _lora_names(got) == _lora_names(want) == ["model.layers.0.self_attn.q_proj"]
    assert got.peft_config["default"].target_modules == ["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_inject_state_dict_warns_as_peft_for_default_and_all_linear(targets: str | None) -> None:
    """peft resolves target_modules None (the family default) and "all-linear" and warns that the state dict
    differs; HEAD skipped the warning for both."""
    sd = {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1)}
    with pytest.warns(RuntimeWarning) as theirs:
        peft.inject_adapter_in_model(peft.LoraConfig(target_modules=targets), _llama(), state_dict=sd)
    with pytest.warns(RuntimeWarning) as ours:
        dt.inject_adapter_in_model(dt.LoraConfig(target_modules=targets), _llama(), state_dict=sd)
    mine = [str(w.message) for w in ours if "inconsistency" in str(w.message)]
    assert mine == [str(w.message) for w in theirs if "inconsistency" in str(w.message)] and len(mine) == 1


# -- 4. get_prompt / get_prompt_embedding_to_save ----------------------------------------------------------------------
TOKEN_CONFIGS = {
    "prompt_tuning": (dict(num_virtual_tokens=4), "PromptTuningConfig", "PromptTuningConfig"),
    "p_tuning": (dict(num_virtual_tokens=4, encoder_hidden_size=16), "PTuningConfig", "PromptEncoderConfig"),
    "p_tuning_lstm": (dict(num_virtual_tokens=4, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"),
                      "PTuningConfig", "PromptEncoderConfig"),
    "prefix_tuning": (dict(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16),
                      "PrefixTuningConfig", "PrefixTuningConfig"),
    "p_tuning_v2": (dict(num_virtual_tokens=4), "PrefixTuningConfig", "PrefixTuningConfig"),
}  # fmt: skip


def _pair(method: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    fields, ours, theirs = TOKEN_CONFIGS[method]
    want = peft.get_peft_model(_llama(), getattr(peft, theirs)(task_type="CAUSAL_LM", **fields))
    got = dt.get_delta_model(_llama(), getattr(dt, ours)(task_type="CAUSAL_LM", **fields))
    encoder = got.get_base_model().virtual_tokens.prompt_encoder["default"]
    encoder.load_state_dict(want.prompt_encoder["default"].state_dict())  # the same init (peft's module names)
    return got, want


@pytest.mark.parametrize("method", list(TOKEN_CONFIGS))
def test_get_prompt_equals_peft(method: str) -> None:
    got, want = _pair(method)
    with torch.no_grad():
        ours, theirs = got.get_prompt(3), want.get_prompt(3)
    if method.startswith("prefix") or method == "p_tuning_v2":
        assert len(ours.layers) == len(theirs.layers) == 2
        for a, b in zip(ours.layers, theirs.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            assert a.keys.shape == (3, 2, 4, 8)  # (batch, key/value heads, virtual tokens, head_dim)
    else:
        assert ours.shape == theirs.shape == (3, 4, 32) and torch.equal(ours, theirs)
    saved = got.get_prompt_embedding_to_save("default")
    assert saved.device.type == "cpu" and not saved.requires_grad
    assert torch.allclose(saved, want.get_prompt_embedding_to_save("default"), atol=1e-6, rtol=0)


def test_get_prompt_after_loading_is_the_saved_table(tmp_path) -> None:
    """Loaded for inference (peft: the folded table, ``embedding.weight``): equal to peft's loaded model's.
    peft's ``get_prompt_embedding_to_save`` on a loaded P-tuning adapter raises (its folded encoder has no
    ``mlp_head`` to call); deltatune's returns the table, which is what the file holds (a difference on purpose)."""
    got, want = _pair("p_tuning")
    want.save_pretrained(tmp_path)
    loaded_peft = peft.PeftModel.from_pretrained(_llama(), tmp_path)
    loaded = dt.DeltaModel.from_pretrained(_llama(), tmp_path)
    assert torch.equal(loaded.get_prompt(2), loaded_peft.get_prompt(2))
    table = loaded_peft.prompt_encoder["default"].embedding.weight.detach()
    assert torch.equal(loaded.get_prompt_embedding_to_save("default"), table)
    with pytest.raises(AttributeError, match="mlp_head"):
        loaded_peft.get_prompt_embedding_to_save("default")


def test_get_prompt_on_a_lora_adapter_is_one_clear_line() -> None:
    model = dt.get_delta_model(_llama(), dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="get_prompt: adapter 'default' is a lora adapter"):
        model.get_prompt(2)
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        model.get_prompt_embedding_to_save("x")


# -- 5. save_pretrained writes peft's model card ------------------------------------------------------------------------
def test_save_pretrained_writes_the_model_card_as_peft(tmp_path) -> None:
    from huggingface_hub import ModelCard

    want = peft.get_peft_model(_llama(), peft.LoraConfig(target_modules=["q_proj"]))
    want.add_adapter("b", peft.LoraConfig(target_modules=["v_proj"]))
    got = dt.get_delta_model(_llama(), dt.LoraConfig(target_modules=["q_proj"]))
    got.add_adapter("b", dt.LoraConfig(target_modules=["v_proj"]))
    want.save_pretrained(tmp_path / "peft")
    got.save_pretrained(tmp_path / "ours")
    for sub in ("", "b"):
        assert sorted(os.listdir(tmp_path / "ours" / sub)) == sorted(os.listdir(tmp_path / "peft" / sub))
    assert "README.md" in os.listdir(tmp_path / "ours")
    card, peft_card = ModelCard.load(tmp_path / "ours" / "README.md"), ModelCard.load(tmp_path / "peft" / "README.md")
    assert card.data.library_name == peft_card.data.library_name == "peft"
    assert card.data.tags == peft_card.data.tags
    got.save_pretrained(tmp_path / "none", is_main_process=False)
    assert not (tmp_path / "none").exists()


# -- 6. an old GPT-2 LoRA file (fan_in_fan_out false) ------------------------------------------------------------------
def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("init", [False, "eva"])
def test_old_gpt2_lora_file_loads_saying_fan_in_fan_out_true_as_peft(tmp_path, init: bool | str) -> None:
    """A GPT-2 LoRA file whose config says fan_in_fan_out false (deltatune before _say_fan_in_fan_out): peft's load
    sets the kept config true (its Conv1D dispatch), so a re-save says true; HEAD set it on the load's copy only."""
    model = dt.get_delta_model(_gpt2(), dt.LoraConfig(target_modules=["c_attn"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    assert saved["fan_in_fan_out"] is True
    config_file.write_text(json.dumps(saved | {"fan_in_fan_out": False, "init_lora_weights": init}))
    want = peft.PeftModel.from_pretrained(_gpt2(), tmp_path / "a")
    got = dt.DeltaModel.from_pretrained(_gpt2(), tmp_path / "a")
    assert got.peft_config["default"].fan_in_fan_out is want.peft_config["default"].fan_in_fan_out is True
    with torch.no_grad():
        assert (got(IDS).logits - want(IDS).logits).abs().max().item() < 1e-5
        assert (got(IDS).logits - model(IDS).logits).abs().max().item() == 0.0
    got.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


@pytest.mark.parametrize("feedforward", [["down_proj"], None])
def test_inject_ia3_state_dict_keeps_feedforward_modules_as_peft(feedforward: list[str] | None) -> None:
    """IA3's state dict (ia3_l keys): the targets by path, feedforward_modules with them (HEAD refused the names
    list as no subset of the paths); logits equal peft's."""
    fields = dict(target_modules=["q_proj", "down_proj"], feedforward_modules=feedforward)
    source = peft.inject_adapter_in_model(peft.IA3Config(**fields), _llama(1))
    for n, p in source.named_parameters():
        if "ia3_l" in n:
            torch.nn.init.normal_(p)
    sd = peft.get_peft_model_state_dict(source)
    want = peft.inject_adapter_in_model(peft.IA3Config(**fields), _llama(), state_dict=sd)
    peft.set_peft_model_state_dict(want, sd)
    got = dt.inject_adapter_in_model(dt.IA3Config(**fields), _llama(), state_dict=sd)
    dt.set_peft_model_state_dict(got, sd)
    paths = sorted(
        n for n, _ in _llama().named_modules() if matches(n, got.peft_config["default"].feedforward_modules)
    )
    assert paths == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]  # (None: the family default, as a regex)
    with torch.no_grad():
        diff = (got(IDS).logits - want(IDS).logits).abs().max().item()
        base = (_llama()(IDS).logits - want(IDS).logits).abs().max().item()
    assert diff < 1e-6 and base > 1e-3
