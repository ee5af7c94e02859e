"""AdapterFusion (methods/fusion.py): stage-2 training, identity-like init, attention weights, files, errors."""

from __future__ import annotations

import pytest
import torch
from _sst2_learning import train_losses
from tiny import output_of, tiny_inputs, tiny_model
from tolerances import ATOL
from torch import nn

import deltatune as dt
from deltatune.methods.bottleneck import BottleneckLayer
from deltatune.methods.fusion import Fusion

ATOL32 = ATOL[torch.float32]


def _with_adapters(family: str = "bert", names=("a", "b", "c"), placement: str = "houlsby") -> dt.DeltaModel:
    """A tiny model with random (as if trained) bottleneck adapters ``names``."""
    model = dt.DeltaModel(tiny_model(family))
    for i, name in enumerate(names):
        torch.manual_seed(10 + i)
        model.add_adapter(name, dt.BottleneckConfig(config=placement, reduction_factor=4, init_weights=False))
    return model


def _fusions(model: nn.Module) -> list[Fusion]:
    return [m for m in model.modules() if isinstance(m, Fusion)]


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_step_changes_only_fusion_params(family):
    model = _with_adapters(family)
    model.add_fusion(["a", "b", "c"], name="fused")
    assert model.active_adapters == ["fused"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_fusion.fused." in n for n in trainable)
    n_sites = len([m for m in model.modules() if isinstance(m, BottleneckLayer)])
    d = 32
    assert model.get_nb_trainable_parameters()[0] == n_sites * (3 * d * d + 2 * d)  # query, key with biases; value
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**tiny_inputs(family)).logits.sum().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert {n for n in changed if ".value." in n}, "the value matrices must train"


def test_single_adapter_fusion_reproduces_the_adapter():
    inputs = tiny_inputs("bert")
    model = _with_adapters("bert", names=("a",))
    out_a = output_of(model, inputs)
    model.add_fusion(["a"], name="solo")
    out_fused = output_of(model, inputs)
    torch.testing.assert_close(out_fused, out_a, atol=ATOL32, rtol=0)
    with model.disable_adapter():
        assert (output_of(model, inputs) - out_a).abs().max() > ATOL32
    assert all(torch.equal(w, torch.ones(1)) for w in model.fusion_weights("solo").values())


def test_fusion_starts_as_average_of_adapter_terms():
    torch.manual_seed(0)
    layer = BottleneckLayer(nn.Linear(8, 8))
    for name in ("a", "b", "c"):
        layer.add(name, 2, "relu", False, False, 1.0, 0.0, init=False)
    layer.adapter_fusion["f"] = Fusion(8, ["a", "b", "c"], temperature=1.0)
    nn.init.zeros_(layer.adapter_fusion["f"].query.weight)  # q = 0: uniform attention, isolating the value init
    layer.set_adapters(["f"])
    x = torch.randn(3, 4, 8)
    h = layer.base_layer(x)
    expected = h + sum(layer.delta(n, h) for n in ("a", "b", "c")) / 3
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.fusion_weights("f"), torch.full((3,), 1 / 3), atol=1e-6, rtol=0)


def test_weights_per_layer_sum_to_one():
    model = _with_adapters("llama")
    model.add_fusion(["a", "b", "c"], name="fused")
    with pytest.raises(ValueError, match="no forward pass"):
        model.fusion_weights("fused")
    with torch.no_grad():
        for f in _fusions(model):  # make the attention non-uniform
            nn.init.normal_(f.query.weight, std=1.0)
    model(**tiny_inputs("llama"))
    weights = model.fusion_weights("fused")
    assert len(weights) == 4  # 2 blocks x (attention, feed-forward)
    for path, w in weights.items():
        assert w.shape == (3,)
        torch.testing.assert_close(w.sum(), torch.tensor(1.0), atol=1e-6, rtol=0, msg=path)
    assert any((w - 1 / 3).abs().max() > 1e-3 for w in weights.values())
    with pytest.raises(ValueError, match="no fusion weights"):
        model.fusion_weights("a")


def test_save_load(tmp_path):
    inputs = tiny_inputs("bert")
    model = _with_adapters("bert")
    model.add_fusion(["a", "b", "c"], name="fused", temperature=2.0)
    with torch.no_grad():
        for f in _fusions(model):
            nn.init.normal_(f.query.weight, std=1.0)
            nn.init.normal_(f.value.weight, std=0.3)
    out = output_of(model, inputs)
    model.save_pretrained(tmp_path)
    config = dt.load_config(tmp_path / "fused")
    assert config.peft_type == "ADAPTER_FUSION" and config.adapter_names == ["a", "b", "c"]
    assert config.temperature == 2.0
    keys = model.adapter_state_dict("fused").keys()
    assert all(".adapter_fusion." in k and ".fused." not in k for k in keys)

    fresh = dt.DeltaModel(tiny_model("bert"))
    with pytest.raises(dt.ConfigError, match="no bottleneck adapter named 'a'"):
        fresh.load_adapter(tmp_path / "fused", "fused")
    assert not fresh.peft_config
    for name in ("a", "b", "c"):
        fresh.load_adapter(tmp_path / name, name)
    fresh.load_adapter(tmp_path / "fused", "fused")
    fresh.set_adapter("fused")
    assert torch.equal(output_of(fresh, inputs), out)


def test_errors_leave_model_unchanged():
    model = _with_adapters("bert", names=("a", "b"))
    model.add_adapter("p", dt.BottleneckConfig(config="pfeiffer", reduction_factor=4, init_weights=False))
    model.add_adapter("lo", dt.LoraConfig(r=2, init_lora_weights=False))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    configs = dict(model.peft_config)
    cases = [
        (["a", "zzz"], ValueError, "unknown adapter 'zzz'"),
        (["a", "lo"], dt.ConfigError, r"'lo' is not a bottleneck adapter \(it lives in LoraLinear layers\)"),
        (["a", "p"], dt.ConfigError, "do not sit at the same sub-layers"),
        ([], dt.ConfigError, "adapter_names is empty: a fusion combines bottleneck adapters already in the model"),
        (["a", "a"], dt.ConfigError, "lists 'a' more than once"),
    ]
    for names, exc, match in cases:
        with pytest.raises(exc, match=match):
            model.add_fusion(names, name="f")
        assert model.peft_config == configs
        assert model.state_dict().keys() == state.keys()
        assert not _fusions(model)
    model.add_fusion(["a", "b"], name="f")
    with pytest.raises(dt.ConfigError, match="'f' is itself a fusion"):
        model.add_fusion(["a", "f"], name="g")


def test_deleting_a_fused_adapter_is_refused_until_the_fusion_goes(tmp_path):
    """It was deleted: the fusion stayed active and failed at the next forward, and its saved folder did not load."""
    model = _with_adapters("bert", names=("a", "b"))
    model.add_fusion(["a", "b"], name="f")
    model.set_adapter("f")
    before = model(**tiny_inputs("bert")).logits
    with pytest.raises(ValueError, match=r"^adapter 'b' is used by 'f' \(fusion\); delete 'f' first$"):
        model.delete_adapter("b")
    assert set(model.peft_config) == {"a", "b", "f"} and torch.equal(model(**tiny_inputs("bert")).logits, before)
    model.delete_adapter("f")
    model.delete_adapter("b")
    assert set(model.peft_config) == {"a"}


def test_hidden_size_mismatch_is_an_error():
    model = _with_adapters("bert", names=("a", "b"))
    layer = next(m for m in model.modules() if isinstance(m, BottleneckLayer))
    layer.adapter_up["b"] = nn.Linear(8, 40)  # as if made for a base with hidden size 40
    with pytest.raises(dt.ConfigError, match="hidden sizes"):
        model.add_fusion(["a", "b"], name="f")
    assert not _fusions(model)


@pytest.mark.slow
def test_learns_sst2():
    from _sst2_learning import assert_learns, minilm

    base, tokenizer = minilm()
    model = dt.DeltaModel(base)
    for i, name in enumerate(("a", "b")):  # stage 1 stand-ins: untrained adapters with random up-projections
        torch.manual_seed(i)
        model.add_adapter(name, dt.BottleneckConfig(config="pfeiffer", init_weights="houlsby"))
    model.add_fusion(["a", "b"], name="fused", task_type="SEQ_CLS")
    values = [f.value.weight.detach().clone() for f in _fusions(model)]
    assert_learns(train_losses(model, tokenizer, lr=1e-2))
    assert all(not torch.equal(f.value.weight, v) for f, v in zip(_fusions(model), values))
    for w in model.fusion_weights("fused").values():
        torch.testing.assert_close(w.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
