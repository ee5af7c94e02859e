"""Model families beyond tests/tiny.py: the modules a task adds to a base, trained and saved with the adapter.

Each adapter is checked the way a user meets it: the base checkpoint holds no head, every load of it draws the new
modules at random, and a saved adapter must give the same logits on any such load, in deltatune and in peft.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tolerances import ATOL
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

import deltatune as dt

peft = pytest.importorskip("peft")

ATOL32 = ATOL[torch.float32]
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=128,
             max_position_embeddings=64, pad_token_id=0)  # fmt: skip
FAMILIES = {"deberta-v2": {}, "modernbert": {"global_attn_every_n_layers": 1, "bos_token_id": 1, "eos_token_id": 2,
                                             "cls_token_id": 1, "sep_token_id": 2}}  # fmt: skip
AUTO = {"SEQ_CLS": AutoModelForSequenceClassification, "TOKEN_CLS": AutoModelForTokenClassification}


def _loader(family: str, task: str, folder):
    """A function giving the task model over one saved base (no head), its new modules drawn from ``seed``."""
    config = AutoConfig.for_model(family, **SIZES, **FAMILIES[family])
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)

    def load(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return AUTO[task].from_pretrained(folder, num_labels=3).eval()

    return load


@pytest.mark.parametrize(
    "family, task, new",
    [("deberta-v2", "SEQ_CLS", "pooler")],
)
@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_a_family_s_new_modules_beside_the_classifier_are_trained_and_saved(family, task, new, method, tmp_path):
    """DeBERTa's sequence classifier reads a new ContextPooler (``pooler``; DeBERTa's masked-LM checkpoints have
    none): outside the base, random at every load. It was neither trained nor saved (as in peft), so a saved adapter
    reloaded gave other logits (0.085 off). Now it trains in full as the classifier does, and the file gives the
    same logits in deltatune and in peft on a fresh load. (ModernBERT's classifiers read a ``head`` too, but its
    masked-LM checkpoints hold it: loaded pretrained, frozen, as peft keeps it.)"""
    load = _loader(family, task, tmp_path / "base")
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if method == "lora":
        target = ["query_proj", "value_proj"] if family == "deberta-v2" else ["Wqkv"]
        config = dt.LoraConfig(task_type=task, r=4, target_modules=target, init_lora_weights=False)
    else:
        config = dt.PromptTuningConfig(task_type=task, num_virtual_tokens=3)
    ours = dt.get_delta_model(load(1), config).eval()
    assert new in ours.peft_config["default"].modules_to_save
    with torch.no_grad():  # a trained adapter: every trainable tensor moved
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    with torch.no_grad():
        want = ours(**inputs).logits
    ours.save_pretrained(tmp_path / "ours")
    for lib in (dt.DeltaModel, peft.PeftModel):
        again = lib.from_pretrained(load(2), tmp_path / "ours").eval()
        with torch.no_grad():
            got = again(**inputs).logits
        torch.testing.assert_close(got[:, -want.shape[1] :], want, atol=ATOL32, rtol=0, msg=lib.__name__)


MOE = {
    "mixtral": dict(num_local_experts=2, num_experts_per_tok=1),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16
    ),
}


def _moe(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=48, head_dim=8, vocab_size=128,
                                  **MOE[family])  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("targets", [["q_proj", "down_proj"]])
def test_targets_reaching_only_fused_experts_are_refused_naming_them(family, targets):
    """transformers 5 keeps a mixture of experts' experts as 3-D parameters (``mlp.experts.gate_up_proj`` /
    ``down_proj``), which deltatune cannot adapt: ["q_proj", "down_proj"] adapted only q_proj, silently. Now one line
    names the experts' parameter, and the model is left as it was."""
    base = _moe(family)
    before = {n: p.clone() for n, p in base.named_parameters()}
    experts = "model.layers.0.mlp.experts." + ("down_proj" if isinstance(targets, list) else "gate_up_proj")
    for cfg in (dt.LoraConfig(r=2, target_modules=targets), dt.IA3Config(target_modules=targets,
                feedforward_modules=[])):  # fmt: skip
        with pytest.raises(dt.ConfigError, match=rf"reaches {experts}, a 3-D parameter of \w+Experts \(the fused"):
            dt.get_delta_model(base, cfg)
    assert [n for n, _ in base.named_parameters()] == list(before)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    # the attention alone, named, is no error: as peft adapts it
    model = dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert len([n for n, _ in model.named_parameters() if "lora_A" in n]) == 4


def test_a_name_reaching_a_linear_layer_beside_the_experts_adapts_it_as_peft():
    """Qwen2-MoE's shared expert is a linear ``down_proj`` beside the fused experts' 3-D ``down_proj``: peft adapts
    the shared expert's (and, with "all-linear", the linear layers alone); so does deltatune, and "all-linear" warns
    that the experts are left out."""
    peft = pytest.importorskip("peft")
    ours = dt.get_delta_model(_moe("qwen2_moe"), dt.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    theirs = peft.get_peft_model(_moe("qwen2_moe"), peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    adapted = [{n.split(".lora_A")[0].split("layers.0.")[1] for n, _ in m.named_parameters() if "lora_A" in n}
               for m in (ours, theirs)]  # fmt: skip
    if tuple(int(v) for v in peft.__version__.split(".")[:2]) >= (0, 22):
        # peft 0.22 (#3945) adapts the routed experts' fused down_proj too (target_parameters), which deltatune cannot
        assert "mlp.experts" in adapted[1]
        adapted[1].discard("mlp.experts")
    assert adapted[0] == adapted[1] == {"self_attn.q_proj", "mlp.shared_expert.down_proj"}
    with pytest.warns(
        UserWarning, match=r"leaves out model\.layers\.0\.mlp\.experts\.\w+ and the other fused experts"
    ):
        model = dt.get_delta_model(_moe("mixtral"), dt.LoraConfig(r=2, target_modules="all-linear"))
    assert not [n for n, _ in model.named_parameters() if "experts" in n and "lora" in n]


BOTTLENECK_SITES = {  # (family, task, config sizes, the two sites of block 0 as the model names them)
    "phi": ("causal_lm", {}, ["model.layers.0.self_attn.dense", "model.layers.0.mlp.fc2"]),
    "gptj": ("causal_lm", {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4},
             ["transformer.h.0.attn.out_proj", "transformer.h.0.mlp.fc_out"]),
    "distilbert": ("seq_cls", {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 48},
                   ["distilbert.transformer.layer.0.attention.out_lin", "distilbert.transformer.layer.0.ffn.lin2"]),
    "modernbert": ("seq_cls", FAMILIES["modernbert"], ["model.layers.0.attn.Wo", "model.layers.0.mlp.Wo"]),
}  # fmt: skip


@pytest.mark.parametrize("family", list(BOTTLENECK_SITES))
def test_bottleneck_adapters_find_the_blocks_of_more_families(family, tmp_path):
    """Phi's and GPT-J's parallel blocks, DistilBERT's and ModernBERT's encoder blocks had no bottleneck layout: every
    bottleneck config was refused ("sub-layers not found"). Now Houlsby's two sites per block (attention output,
    feed-forward output), Pfeiffer's one; zero-initialised up projections leave the model as it was."""
    from transformers import AutoModelForCausalLM

    task, sizes, sites = BOTTLENECK_SITES[family]
    sizes = sizes or {k: v for k, v in SIZES.items() if k != "pad_token_id"}
    config = AutoConfig.for_model(family, **{**SIZES, **sizes} if family != "gptj" else {**sizes, "vocab_size": 128})
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    torch.manual_seed(0)
    base = auto.from_config(config).eval()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = base(input_ids=ids).logits
    task_type = "CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS"
    for placement, n in (("houlsby", 2), ("pfeiffer", 1)):
        model = dt.get_delta_model(copy.deepcopy(base), dt.BottleneckConfig(config=placement, task_type=task_type))
        placed = [name.removeprefix("base_model.") for name, m in model.named_modules() if type(m).__name__ ==
                  "BottleneckLayer"]  # fmt: skip
        assert len(placed) == 2 * n and placed[:n] == sites[2 - n :]
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, want, atol=0, rtol=0)
