"""Which modules a method adapts, against peft 0.22: an adapter file peft writes on a mixture of experts whose
target list names an expert projection that peft leaves alone (Mixtral's and GPT-OSS's fused ``down_proj``: peft
adapts the other targets, and its file holds them alone) loads and computes as in peft."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as T
from packaging.version import Version
from safetensors.torch import save_file

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


def _classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = {k: v for k, v in _SIZES.items() if k not in ("num_local_experts", "num_experts_per_tok")}
    return T.LlamaForSequenceClassification(T.LlamaConfig(**sizes, num_labels=3, pad_token_id=0)).eval()


def test_an_old_file_whose_targets_are_all_in_modules_to_save_loads_as_it_trained(tmp_path):
    """deltatune before 40e5442 saved LoRA target_modules=['score'] on a SEQ_CLS model (score in modules_to_save) as
    its full copy of score alone (no LoRA layer): 40e5442 refused to load that file (ConfigError: nothing is left to
    adapt), and eval / serve / merge load through it. It loads, warning, and computes as the transformers model whose
    head is the saved copy; merged as well."""
    head = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    config = dt.LoraConfig(r=2, target_modules=["score"], modules_to_save=["score"], task_type="SEQ_CLS").to_dict()
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.score.weight": head}, tmp_path / "adapter_model.safetensors")
    want_model = _classifier()
    with torch.no_grad():
        want_model.score.weight.copy_(head)
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=r"modules_to_save=\['score'\]: the file loads its full copies alone"):
        ours = dt.DeltaModel.from_pretrained(_classifier(), tmp_path)
    with torch.no_grad():
        want, got = want_model(input_ids=ids).logits, ours(input_ids=ids).logits
        assert (want - _classifier()(input_ids=ids).logits).abs().max() > 1e-3  # (the copy changes the output)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.merge_and_unload()(input_ids=ids).logits, want, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="nothing is left to adapt"):  # (a new adapter so is still refused)
        dt.get_delta_model(_classifier(), dt.LoraConfig(r=2, target_modules=["score"], task_type="SEQ_CLS"))


def _tiny_moe(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = {**_SIZES, "num_experts_per_tok": 1} if family == "llama4" else _SIZES
    if family == "phimoe":
        return T.PhimoeForCausalLM(T.PhimoeConfig(**sizes)).eval()
    text = T.Llama4TextConfig(**sizes, intermediate_size_mlp=48, head_dim=8, moe_layers=[0, 1], no_rope_layers=[1, 1])
    return T.Llama4ForCausalLM(text).eval()


@pytest.mark.parametrize(("family", "path"), [("phimoe", "mlp"), ("llama4", "feed_forward")])
def test_a_router_that_is_an_nn_linear_is_refused_naming_what_peft_does(family, path):
    """Phimoe's and Llama 4's routers are nn.Linear subclasses whose forward returns a tuple: peft wraps them as linear
    layers and its first forward fails ('tuple' object has no attribute 'dtype'). cd386f8's message called them a
    bare 2-D weight for peft's target_parameters, which peft does not do there."""
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    theirs = peft.get_peft_model(_tiny_moe(family), peft.LoraConfig(r=2, target_modules=["router", "q_proj"]))
    assert theirs.peft_config["default"].target_parameters is None
    with pytest.raises(AttributeError, match="tuple"), torch.no_grad():
        theirs(input_ids=ids)
    with pytest.raises(ConfigError, match=rf"{path}\.router, the router \(\w+Router: an nn.Linear whose forward "
                       r"returns a tuple\), which a LoRA layer cannot wrap \(peft wraps it.*: \['q_proj'\]"):  # fmt: skip
        dt.get_delta_model(_tiny_moe(family), dt.LoraConfig(r=2, target_modules=["router", "q_proj"]))


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_a_peft_ia3_file_with_modules_to_save_among_its_targets_loads_as_peft(tmp_path):
    """peft (0.21 and 0.22) IA3 with target_modules=[q_proj, k_proj, down_proj], modules_to_save=[q_proj]: its file
    holds k_proj's and down_proj's vectors and q_proj's copy; deltatune loads it and computes as peft."""
    kw = dict(target_modules=["q_proj", "k_proj", "down_proj"], feedforward_modules=["down_proj"])
    theirs = _perturbed(peft.get_peft_model(_llama(), peft.IA3Config(**kw, modules_to_save=["q_proj"])))
    theirs.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    ours = dt.DeltaModel.from_pretrained(_llama(), tmp_path)
    with torch.no_grad():
        want, got = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
        assert (want - _llama()(input_ids=ids).logits).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_ia3_on_seq_cls_never_scales_the_score_head_as_peft(tmp_path):
    """IA3 SEQ_CLS with target_modules=[v_proj, score]: peft trains score in full (the task's head) and scales v_proj
    alone; deltatune as well, and its file loads in peft with the same output."""
    kw = dict(target_modules=["v_proj", "score"], feedforward_modules=[], task_type="SEQ_CLS")
    theirs = peft.get_peft_model(_classifier(), peft.IA3Config(**kw))
    ours = _perturbed(dt.get_delta_model(_classifier(), dt.IA3Config(**kw)))
    names = {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n.removeprefix("base_model.") for n, p in ours.named_parameters() if p.requires_grad} == names
    assert not any("score.ia3" in n for n in names) and any("score.modules_to_save" in n for n in names)
    ours.save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(_classifier(), tmp_path)
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", [peft.LoraConfig, peft.IA3Config])
def test_targets_inside_a_module_in_modules_to_save_are_left_out_as_peft(config, tmp_path):
    """modules_to_save=['self_attn'] with target_modules=[q_proj, v_proj, down_proj]: peft copies each self_attn whole
    and adapts down_proj alone (q_proj / v_proj sit inside a copy); deltatune as well, and loads peft's file so."""
    kw = dict(target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["self_attn"])
    kw |= {"feedforward_modules": ["down_proj"]} if config is peft.IA3Config else {"init_lora_weights": False}
    theirs = _perturbed(peft.get_peft_model(_llama(), config(**kw)))
    ours = dt.get_delta_model(_llama(), getattr(dt, config.__name__)(**kw))
    names = {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n.removeprefix("base_model.") for n, p in ours.named_parameters() if p.requires_grad} == names
    assert not any(".q_proj.lora" in n or ".q_proj.ia3" in n for n in names)
    theirs.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = dt.DeltaModel.from_pretrained(_llama(), tmp_path)(input_ids=ids).logits
        torch.testing.assert_close(got, theirs(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["phimoe", "llama4"])
def test_all_linear_leaves_an_nn_linear_router_alone_and_its_file_computes_in_peft(family, tmp_path):
    """all-linear wrapped Phimoe's / Llama 4's router (an nn.Linear returning a tuple) and the first forward failed
    ('tuple' object has no attribute 'dtype'; peft's all-linear fails so too). It leaves the router out, saying so;
    the file it saves (the linear layers it adapted) loads in peft with the same output."""
    with pytest.warns(
        UserWarning, match=r"and the routers \(model\.layers\.0\.\w+\.router, \.\.\.: nn\.Linear returning a tuple"
    ):
        ours = dt.get_delta_model(_tiny_moe(family), dt.LoraConfig(r=2, target_modules="all-linear"))
    assert not any(n.endswith("router") for n in ours.peft_config["default"].target_modules)
    ours = _perturbed(ours)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    ours.save_pretrained(tmp_path)
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(_tiny_moe(family), tmp_path)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_token_cls_target_naming_the_head_copies_it_and_the_file_computes_in_peft(tmp_path):
    """peft's TOKEN_CLS model refuses target_modules naming its head (TypeError: modules_to_save cannot be applied to
    a module already targeted), as it adds the head after injecting; deltatune trains the head in full, as peft's
    SEQ_CLS does, and the file it saves loads in peft with the same output (kept on purpose)."""

    def bert() -> torch.nn.Module:
        torch.manual_seed(0)
        sizes = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
        return T.BertForTokenClassification(T.BertConfig(**sizes, num_labels=3)).eval()

    kw = dict(r=2, target_modules=["query", "classifier"], task_type="TOKEN_CLS")
    with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
        peft.get_peft_model(bert(), peft.LoraConfig(**kw))
    ours = _perturbed(dt.get_delta_model(bert(), dt.LoraConfig(**kw, init_lora_weights=False)))
    assert not any("classifier.lora" in n for n, _ in ours.named_parameters())
    ours.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(bert(), tmp_path)(input_ids=ids).logits
        assert (want - bert()(input_ids=ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=0, atol=1e-5)
