"""Which modules a method adapts, against peft 0.22: an adapter file peft writes on a mixture of experts whose
target list names an expert projection that peft leaves alone (Mixtral's and GPT-OSS's fused ``down_proj``: peft
adapts the other targets, and its file holds them alone) loads and computes as in peft."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from packaging.version import Version

import deltatune as dt
from deltatune.config import ConfigError

peft = pytest.importorskip("peft")

_SIZES = dict(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
)  # fmt: skip


def _moe(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "mixtral":
        return T.MixtralForCausalLM(T.MixtralConfig(**_SIZES)).eval()
    config = T.GptOssConfig(**_SIZES, head_dim=8, layer_types=["full_attention"] * 2)
    return T.GptOssForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_a_peft_file_naming_an_expert_projection_peft_left_alone_loads_as_peft(family, tmp_path):
    """peft 0.22 on Mixtral / GPT-OSS with target_modules=['down_proj', 'q_proj'] adapts q_proj alone (the fused
    experts' down_proj is a 3-D parameter its v4-to-v5 conversion does not reach here) and saves no
    target_parameters; deltatune refused the file (ConfigError: reaches ...experts.down_proj), where peft loads it."""
    base = _moe(family)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["down_proj", "q_proj"], init_lora_weights=False)
    )
    theirs.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
    with pytest.warns(UserWarning, match=r"reaches model\.layers\.0\.mlp\.experts\.down_proj.*loads without"):
        ours = dt.DeltaModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    assert (want - base(input_ids=ids).logits).abs().max() > 1e-3  # (the adapter changes the output)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_new_adapter_naming_a_fused_expert_projection_is_still_refused():
    """A new adapter naming the fused experts' down_proj still is (deltatune cannot adapt what it names)."""
    with pytest.raises(ConfigError, match=r"reaches model\.layers\.0\.mlp\.experts\.down_proj, a 3-D parameter"):
        dt.get_delta_model(_moe("mixtral"), dt.LoraConfig(r=2, target_modules=["down_proj", "q_proj"]))


@pytest.mark.parametrize(("family", "router"), [("mixtral", "gate"), ("gpt_oss", "router")])
def test_a_target_naming_the_router_is_refused_as_peft_s_target_parameters(family, router):
    """A mixture of experts' router (transformers 5's ...TopKRouter, a bare 2-D weight) is no layer deltatune adapts;
    peft 0.22 moves Mixtral's "gate" to target_parameters ("gate.weight"). deltatune refused it as any other module
    type ("is a MixtralTopKRouter; LoRA adapts nn.Linear, ..."), not saying what peft does nor which targets to keep,
    as it says for the fused experts."""
    base = _moe(family)
    if family == "mixtral" and Version(peft.__version__) >= Version("0.22"):  # (its v4-to-v5 conversion)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=[router, "q_proj"]))
        assert theirs.peft_config["default"].target_parameters == {"gate.weight"}
    with pytest.raises(
        ConfigError, match=rf"reaches model\.layers\.0\.mlp\.{router}, the router .*target_parameters.*: \['q_proj'\]"
    ):
        dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=[router, "q_proj"]))


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = {k: v for k, v in _SIZES.items() if k not in ("num_local_experts", "num_experts_per_tok")}
    return T.LlamaForCausalLM(T.LlamaConfig(**sizes)).eval()


def test_ia3_leaves_a_module_in_modules_to_save_out_of_its_targets_as_peft():
    """peft never adapts a module it trains in full (check_target_module_exists: modules_to_save excludes it); IA3
    with target_modules=['q_proj', 'k_proj'] and modules_to_save=['q_proj'] scales k_proj and copies q_proj there.
    deltatune refused it ("q_proj is already adapted by ModulesToSave; IA3 cannot wrap it")."""
    base = _llama()
    kw = dict(target_modules=["q_proj", "k_proj"], feedforward_modules=[], modules_to_save=["q_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kw))
    ours = dt.get_delta_model(copy.deepcopy(base), dt.IA3Config(**kw))
    names = {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n.removeprefix("base_model.") for n, p in ours.named_parameters() if p.requires_grad} == names
    assert any(".k_proj.ia3_l." in n for n in names) and any(".q_proj.modules_to_save." in n for n in names)


@pytest.mark.parametrize("config", [dt.LoraConfig, dt.IA3Config])
def test_targets_that_are_all_in_modules_to_save_are_refused_as_peft(config):
    """peft refuses an adapter whose every target is in modules_to_save (NoMatchingPeftModuleError: no modules were
    targeted), and so refuses to load such a file; deltatune's LoRA saved one (full copies of q_proj, no LoRA layer)
    that peft could not load, and its IA3 refused naming ModulesToSave as an adapter."""
    kw = dict(target_modules=["q_proj"], modules_to_save=["q_proj"])
    with pytest.raises(peft.utils.error.NoMatchingPeftModuleError):
        peft.get_peft_model(_llama(), peft.LoraConfig(**kw))
    with pytest.raises(ConfigError, match=r"every module target_modules=\['q_proj'\] matches is in modules_to_save"):
        dt.get_delta_model(_llama(), config(**kw, **({"feedforward_modules": []} if config is dt.IA3Config else {})))
