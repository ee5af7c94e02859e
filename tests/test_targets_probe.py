"""Target matching against peft 0.21.2: layers_pattern lists, exact full names with layers_to_transform, an empty
layers_to_transform, "all-linear" beside nn.MultiheadAttention; bottleneck adapters on mixture-of-experts models."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_inputs, tiny_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, SiglipVisionConfig, SiglipVisionModel

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.methods.bottleneck import BottleneckLayer
from deltatune.methods.lora import LoraLinear

peft = pytest.importorskip("peft")


def _ours(model: nn.Module) -> list[str]:
    return sorted(n.split("base_model.", 1)[1].removeprefix("model.") for n, m in model.named_modules()
                  if isinstance(m, LoraLinear))  # fmt: skip


def _theirs(model: nn.Module) -> list[str]:
    return sorted(n.removeprefix("base_model.model.").removeprefix("model.") for n, m in model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))  # fmt: skip


def _block() -> nn.Module:
    return nn.ModuleDict({"layers": nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(4, 4)}) for _ in range(3))})


class Nested(nn.Module):
    """Blocks in two numbered lists: body.stack.N.layers.M.proj."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.ModuleDict({"stack": nn.ModuleList(_block() for _ in range(3))})

    def forward(self, x):
        for block in self.body["stack"]:
            for layer in block["layers"]:
                x = layer["proj"](x)
        return x


@pytest.mark.parametrize(
    "pattern", [["layers", "stack"], ["stack", "layers"], "layers", "stack", None, ["nothing", "layers"]]
)
def test_layers_pattern_picks_the_blocks_peft_picks(pattern):
    """peft takes the first pattern, in list order, that the name has; deltatune took the outermost match: with
    ["layers", "stack"] and layers_to_transform [1] it adapted stack.1.layers.* instead of stack.*.layers.1."""
    kw = dict(r=2, target_modules=["proj"], layers_to_transform=[1], layers_pattern=pattern)
    ours = _ours(dt.get_delta_model(Nested(), dt.LoraConfig(**kw)))
    theirs = _theirs(peft.get_peft_model(Nested(), peft.LoraConfig(**kw)))
    assert ours and ours == theirs
    if pattern == ["layers", "stack"]:
        assert ours == [f"body.stack.{i}.layers.1.proj" for i in range(3)]


def test_exact_full_name_ignores_layers_to_transform():
    """peft adapts a target given as the module's full name whatever layers_to_transform says (its ``key in
    target_modules`` early return); deltatune dropped it."""
    targets = ["model.layers.0.self_attn.q_proj", "v_proj"]
    ours = _ours(
        dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=targets, layers_to_transform=[1]))
    )
    theirs = _theirs(peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=targets, layers_to_transform=[1])))  # fmt: skip
    assert ours == theirs == ["layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj"]


def test_empty_layers_to_transform_keeps_every_block():
    """peft reads layers_to_transform=[] as no restriction; deltatune matched nothing and refused."""
    kw = dict(r=2, target_modules=["q_proj"], layers_to_transform=[])
    ours = _ours(dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**kw)))
    theirs = _theirs(peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**kw)))
    assert ours == theirs == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]


def test_bad_layers_pattern_is_one_clear_error():
    config = dt.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="lay(ers")
    with pytest.raises(ConfigError, match=r"layers_pattern 'lay\(ers' is not a valid"):
        dt.get_delta_model(tiny_model("llama"), config)


def _siglip() -> nn.Module:
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                image_size=16, patch_size=4)  # fmt: skip
    torch.manual_seed(0)
    return SiglipVisionModel(config).eval()


def test_all_linear_leaves_out_multihead_attention_out_proj():
    """SigLIP's pooling head is an nn.MultiheadAttention, which reads out_proj.weight itself: a LoRA there did
    nothing in the forward, and merging it moved the pooled output by ~1.4 (init_lora_weights=False). peft's
    all-linear takes it; deltatune's takes everything else peft takes."""
    config = dt.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
    model = dt.get_delta_model(_siglip(), config)
    theirs = _theirs(peft.get_peft_model(_siglip(), peft.LoraConfig(r=2, target_modules="all-linear")))
    assert _ours(model) == [n for n in theirs if n != "head.attention.out_proj"]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(pixel_values=x).pooler_output
        merged = model.merge_and_unload()(pixel_values=x).pooler_output
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-5)


def _moe(kind: str, **overrides) -> nn.Module:
    kw = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, num_experts_per_tok=2)  # fmt: skip
    if kind in ("mixtral", "gpt_oss", "granitemoe"):
        kw.update(num_local_experts=4, **({"head_dim": 8} if kind == "gpt_oss" else {}))
    else:
        kw.update(num_experts=4, moe_intermediate_size=24)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **kw, **overrides)).eval()


@pytest.mark.parametrize(
    ("kind", "overrides"), [("mixtral", {}), ("qwen3_moe", {"mlp_only_layers": [0]}), ("gpt_oss", {})]
)
def test_bottleneck_on_mixture_of_experts_wraps_each_feed_forward_block(kind, overrides, tmp_path):
    """Houlsby / Pfeiffer adapters on MoE models were refused with a dozen patterns (Qwen3-MoE with a dense first
    layer got one on that layer's MLP only, silently; GPT-OSS's block returns a tuple). The feed-forward
    adapter now sits on each block's whole MLP output: checked against forward hooks adding h + up(relu(down(h))) by
    hand, router aux loss included."""
    config = dt.BottleneckConfig(config="pfeiffer", reduction_factor=4, init_weights=False)
    model = dt.get_delta_model(_moe(kind, **overrides), config)
    layers = {n.removeprefix("base_model."): m for n, m in model.named_modules() if isinstance(m, BottleneckLayer)}
    assert list(layers) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    reference = _moe(kind, **overrides)
    for name, layer in layers.items():
        down, up = layer.adapter_down["default"], layer.adapter_up["default"]
        add = lambda h, d=down, u=up: h + u(torch.relu(d(h)))  # noqa: E731
        hook = lambda _m, _i, h, add=add: (add(h[0]), *h[1:]) if isinstance(h, tuple) else add(h)  # noqa: E731
        reference.get_submodule(name).register_forward_hook(hook)
    ids = tiny_inputs("llama")["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids, labels=ids, output_router_logits=True)
        want = reference(input_ids=ids, labels=ids, output_router_logits=True)
    assert (ours.logits - _moe(kind, **overrides)(ids).logits).abs().max() > 1e-2  # the adapters do something
    torch.testing.assert_close(ours.logits, want.logits)
    torch.testing.assert_close(ours.aux_loss, want.aux_loss)
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(_moe(kind, **overrides), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours.logits)


def test_bottleneck_houlsby_on_mixtral_adapts_attention_and_moe_block():
    model = dt.get_delta_model(_moe("mixtral"), dt.BottleneckConfig(config="houlsby"))
    names = sorted(n.removeprefix("base_model.") for n, m in model.named_modules() if isinstance(m, BottleneckLayer))
    assert names == [f"model.layers.{i}.{s}" for i in (0, 1) for s in ("mlp", "self_attn.o_proj")]
    layer = model.get_submodule("base_model.model.layers.0.mlp")
    assert layer.out_features == 32 and layer.adapter_down["default"].weight.shape == (2, 32)


def test_bottleneck_on_an_unknown_moe_layout_is_one_clear_line():
    with pytest.raises(ConfigError, match=r"^bottleneck \(houlsby\): model type 'granitemoe' is a mixture of experts"):
        dt.get_delta_model(_moe("granitemoe"), dt.BottleneckConfig())


def test_all_linear_in_any_case_as_peft():
    """peft reads target_modules="ALL-LINEAR" as "all-linear"; deltatune took it for a regex matching nothing."""
    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules="ALL-LINEAR"))
    theirs = _theirs(peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules="ALL-LINEAR")))
    assert len(_ours(model)) == 14 and _ours(model) == theirs
    saved = model.peft_config["default"].target_modules  # the resolved names, as peft saves them
    assert sorted(n.removeprefix("model.") for n in saved) == theirs


class Gated(nn.Module):
    """A block without a weight of its own whose last linear layer (a gate, 1 wide) is not its output (4 wide)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.gate = nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.proj(x) * torch.sigmoid(self.gate(x))


def test_bottleneck_on_a_block_of_unguessable_width_is_one_clear_error():
    """A whole block targeted by name gets its width from its last linear layer (a dense MLP's down projection, as
    in Qwen3-MoE's dense layers); where that guess is wrong the forward says so instead of a matmul shape error."""
    model = dt.get_delta_model(nn.Sequential(Gated()), dt.BottleneckConfig(target_modules=["0"], bottleneck_size=2))
    with pytest.raises(ValueError, match=r"^bottleneck: Gated returns size 4, not the 1 its adapters were made for"):
        model(torch.randn(2, 4))


@pytest.mark.parametrize("pattern", [None, "layers"])
def test_a_regex_target_with_layers_to_transform_saves_a_file_peft_loads(tmp_path, pattern):
    """peft's LoraConfig refuses a str target_modules with layers_to_transform (or layers_pattern); deltatune adapts
    the blocks asked for and saved the regex and the blocks as given, a file peft refused to load. Now the file names
    the modules adapted, and peft loads it to the same outputs."""
    from peft import PeftModel

    regex = r".*\.(q_proj|v_proj)"
    with pytest.raises(ValueError, match="cannot be used when `target_modules` is a str"):
        peft.LoraConfig(target_modules=regex, layers_to_transform=[1])
    torch.manual_seed(0)
    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=regex, layers_to_transform=[1],
                                                           layers_pattern=pattern, init_lora_weights=False))  # fmt: skip
    assert _ours(model) == ["layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    model.save_pretrained(tmp_path)
    theirs = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    assert _theirs(theirs) == _ours(model)
    inputs = tiny_inputs("llama")
    torch.testing.assert_close(theirs(**inputs).logits, model.eval()(**inputs).logits)
