"""Probe round 6 of the non-LoRA weight methods: freeze tuning per stack and LLaMA-Factory's fields, BitFit's bias
terms beyond ``.bias``."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import output_of, tiny_inputs, tiny_model
from torch import nn
from transformers.activations import get_activation

import deltatune as dt
from deltatune.methods.bottleneck import BottleneckLayer


def _trainable(model) -> set[str]:
    return {n for n, p in model.base_model.named_parameters() if p.requires_grad}


def _blocks(names: set[str]) -> set[str]:
    return {".".join(n.split(".")[:3]) for n in names}


@pytest.mark.parametrize("n, expected", [(1, {"encoder.block.1", "decoder.block.2"}), (-1, {"encoder.block.0", "decoder.block.0"}),
                                         (3, {"encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1", "decoder.block.2"})])  # fmt: skip
def test_freeze_takes_the_last_n_blocks_of_each_stack_of_unequal_depth(n, expected):
    # a 2-block encoder and a 3-block decoder: the last block of each is encoder.block.1 and decoder.block.2
    # (before: decoder.block.2 alone, the encoder frozen whole); n beyond a stack's depth takes all of it
    model = dt.get_delta_model(
        tiny_model("t5", num_layers=2, num_decoder_layers=3), dt.FreezeConfig(freeze_trainable_layers=n)
    )
    assert _blocks(_trainable(model)) == expected


def test_freeze_all_and_extra_modules_as_llama_factory():
    plain = _trainable(dt.get_delta_model(tiny_model("llama"), dt.FreezeConfig(freeze_trainable_layers=1)))
    for modules in ("all", ["all"]):
        config = dt.FreezeConfig(freeze_trainable_layers=1, freeze_trainable_modules=modules)
        assert _trainable(dt.get_delta_model(tiny_model("llama"), config)) == plain
    config = dt.FreezeConfig(freeze_trainable_layers=1, freeze_extra_modules=["norm", "embed_tokens"])
    model = dt.get_delta_model(tiny_model("llama"), config)
    # "norm" is model.norm only, not every block's input_layernorm (LLaMA-Factory's substring test takes those too)
    assert _trainable(model) == plain | {"model.norm.weight", "model.embed_tokens.weight"}
    assert dt.FreezeConfig.from_dict(config.to_dict()).freeze_extra_modules == ["norm", "embed_tokens"]


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(freeze_trainable_modules=["mlp", "mpl"]), r"'mpl' is not a module of the chosen blocks; their "
         r"modules: input_layernorm, mlp, post_attention_layernorm, self_attn"),
        (dict(freeze_extra_modules=["lm_haed"]), r"freeze_extra_modules: 'lm_haed' is not a module outside the "
         r"blocks; those modules: embed_tokens, lm_head, norm"),
    ],
)  # fmt: skip
def test_freeze_a_misspelt_module_is_refused_not_skipped(fields, match):
    # before: ["mlp", "mpl"] trained the MLP alone, silently, and freeze_extra_modules was an unknown field
    base = tiny_model("llama")
    with pytest.raises(dt.ConfigError, match=match):
        dt.get_delta_model(base, dt.FreezeConfig(freeze_trainable_layers=1, **fields))
    assert all(p.requires_grad for p in base.parameters())


def test_freeze_module_list_is_anchored_at_the_block():
    # T5's feed-forward sits at block.N.layer.1 in the encoder, block.N.layer.2 in the decoder: the list entry
    # "DenseReluDense" is no module directly under a block (it used to match the encoder's alone, by its
    # "layer.1." prefix); the regex form reaches both
    with pytest.raises(dt.ConfigError, match="matches no parameter in blocks"):
        dt.get_delta_model(
            tiny_model("t5"), dt.FreezeConfig(freeze_trainable_layers=1, freeze_trainable_modules=["DenseReluDense"])
        )
    model = dt.get_delta_model(
        tiny_model("t5"), dt.FreezeConfig(freeze_trainable_layers=1, freeze_trainable_modules=r"\.DenseReluDense\.")
    )
    assert _blocks(_trainable(model)) == {"encoder.block.1", "decoder.block.1"}
    assert len(_trainable(model)) == 4  # wi and wo of each


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, add_bias_kv=True)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(5, 2))
        self.norm = nn.LayerNorm(8)


def test_bitfit_trains_multihead_attention_biases_not_position_tables():
    # nn.MultiheadAttention keeps its input projection's bias as in_proj_bias (SigLIP's pooling head uses one);
    # before, BitFit trained out_proj.bias and the LayerNorm's bias and silently left it frozen
    names = dt.BitFitConfig().trainable_base_parameters(_Attention())
    assert sorted(names) == ["mha.bias_k", "mha.bias_v", "mha.in_proj_bias", "mha.out_proj.bias", "norm.bias"]


def _ia3_vectors(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.rand(p.shape, generator=g))


@pytest.mark.parametrize(
    "family, targets, written",
    [("llama", ["k_proj", "v_proj"], []), ("gpt2", ["c_attn", "c_proj"], r"transformer\.h\.0\.mlp\.c_proj|transformer\.h\.1\.mlp\.c_proj")],
)  # fmt: skip
def test_ia3_targets_without_the_family_feedforward_save_and_load_in_peft(family, targets, written, tmp_path):
    # Before: the family default (Llama's ["down_proj"]) was written as feedforward_modules beside target_modules
    # ["k_proj", "v_proj"], and save_pretrained raised "feedforward_modules must be a subset of target_modules"
    # (PEFT writes the same and then cannot load its own file). Now the layers it made feed-forward are written.
    peft = pytest.importorskip("peft")

    inputs = tiny_inputs(family)
    ours = dt.get_delta_model(tiny_model(family), dt.IA3Config(target_modules=targets))
    theirs = peft.get_peft_model(tiny_model(family), peft.IA3Config(target_modules=targets)).eval()
    _ia3_vectors(ours, 1)
    _ia3_vectors(theirs, 1)
    ref = output_of(theirs, inputs)
    assert torch.equal(output_of(ours, inputs), ref)
    ours.save_pretrained(tmp_path)
    assert dt.load_config(tmp_path).feedforward_modules == written
    loaded = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path).eval()
    assert torch.equal(output_of(loaded, inputs), ref)
    assert torch.equal(output_of(dt.DeltaModel.from_pretrained(tiny_model(family), tmp_path), inputs), ref)


def _adapters_library_init(d: int, m: int, init: str) -> tuple[nn.Linear, nn.Linear]:
    """The adapters library's Adapter.__init__ draws, in its order (LayerNorms draw nothing)."""
    down, up = nn.Linear(d, m), nn.Linear(m, d)
    with torch.no_grad():
        if init == "bert":  # Adapter.init_bert_weights applied to adapter_down, then adapter_up
            down.weight.normal_(mean=0.0, std=0.02)
            down.bias.zero_()
            up.weight.normal_(mean=0.0, std=0.02)
            up.bias.zero_()
        else:  # "mam_adapter"
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
    return down, up


@pytest.mark.parametrize("init", ["bert", "mam_adapter"])
def test_bottleneck_init_weights_of_the_adapters_library(init):
    # before: init_weights="bert" (the adapters library's default) and "mam_adapter" were refused
    layer = BottleneckLayer(nn.Linear(12, 24))
    torch.manual_seed(3)
    layer.add("a", 6, "relu", True, False, 1.0, 0.0, dt.BottleneckConfig(init_weights=init).init_weights)
    torch.manual_seed(3)
    down, up = _adapters_library_init(24, 6, init)
    for ours, theirs in ((layer.adapter_down["a"], down), (layer.adapter_up["a"], up)):
        assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    assert (up.weight.abs().sum() > 0) == (init == "bert")  # "bert" does not start as the base


def test_fusion_regularization_loss_is_the_adapters_librarys():
    # adapters' get_fusion_regularization_loss: 0.01 * sum over fusion layers of ((I - W_v) ** 2).sum(); absent before
    model = dt.DeltaModel(tiny_model("bert"))
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(10 + i)
        model.add_adapter(name, dt.BottleneckConfig(reduction_factor=4, init_weights=False))
    model.add_fusion(["a", "b"], name="fused")
    assert model.fusion_regularization_loss("fused").item() == 0.0  # W_v = I exactly at the start
    values = [m.adapter_fusion["fused"].value.weight for m in model.modules() if isinstance(m, BottleneckLayer)]
    assert len(values) == 4  # two blocks, Houlsby: attention and feed-forward
    with torch.no_grad():
        for k, w in enumerate(values):
            w.fill_diagonal_(1.0 + 0.5 * k)  # off the identity by 0.5 k on each of d = 32 diagonal entries
    expected = 0.01 * 32 * sum((0.5 * k) ** 2 for k in range(4))  # 0.01 * 32 * 3.5 = 1.12
    loss = model.fusion_regularization_loss("fused")
    torch.testing.assert_close(loss, torch.tensor(expected))
    torch.testing.assert_close(model.fusion_regularization_loss(), loss)  # None: every fusion that trains
    loss.backward()
    assert values[1].grad is not None
    with pytest.raises(ValueError, match="'a' is not an AdapterFusion in this model"):
        model.fusion_regularization_loss("a")


class _VisionLanguage(nn.Module):
    """A vision tower of 3 blocks beside a language model of 2 (a VLM's layout, Linear layers as blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.vision_tower = nn.Module()
        self.vision_tower.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.language_model = nn.Module()
        self.language_model.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))


@pytest.mark.parametrize("n", [1, -1])
def test_freeze_leaves_a_vision_tower_frozen(n):
    # LLaMA-Factory freezes the vision tower (freeze_vision_tower) and counts the language model's layers
    names = dt.FreezeConfig(freeze_trainable_layers=n).trainable_base_parameters(_VisionLanguage())
    block = 1 if n > 0 else 0
    assert names == [f"language_model.layers.{block}.weight", f"language_model.layers.{block}.bias"]


def test_freeze_comma_separated_names_as_llama_factory_writes_them():
    # LLaMA-Factory's YAML writes lists as "mlp,self_attn"; as a regex that string matched nothing (ConfigError)
    config = dt.FreezeConfig(
        freeze_trainable_layers=1, freeze_trainable_modules="mlp, self_attn", freeze_extra_modules="embed_tokens,norm"
    )
    assert config.freeze_trainable_modules == ["mlp", "self_attn"]
    assert config.freeze_extra_modules == ["embed_tokens", "norm"]
    names = config.trainable_base_parameters(tiny_model("llama"))
    assert {n.split(".")[3] for n in names if ".layers." in n} == {"mlp", "self_attn"}
    assert {n for n in names if ".layers." not in n} == {"model.embed_tokens.weight", "model.norm.weight"}


@pytest.mark.parametrize("name", ["LeakyReLU", "gelu_new", "Swish"])
def test_bottleneck_takes_the_adapters_librarys_non_linearities(name):
    # adapters lower-cases the name, maps "leakyrelu" to F.leaky_relu and asks transformers' get_activation for the
    # rest; "leakyrelu" and "gelu_new" were refused, "Swish" too (case)
    config = dt.BottleneckConfig(non_linearity=name, init_weights=False)
    layer = BottleneckLayer(nn.Linear(8, 8))
    layer.add("a", 4, config.non_linearity, False, False, 1.0, 0.0, False)
    f = nn.functional.leaky_relu if name == "LeakyReLU" else get_activation(name.lower())
    h = torch.randn(3, 8)
    down, up = layer.adapter_down["a"], layer.adapter_up["a"]
    torch.testing.assert_close(layer.delta("a", h), up(f(down(h))), rtol=0, atol=0)
