"""Probe 19 (adapters): bottleneck adapters and AdapterFusion against the adapters library's rules (its
methods/modeling.py Adapter / BertFusion, read through the code search tool; the library is not installed)."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from tests.tiny import tiny_inputs, tiny_model


def _two_adapters(family: str = "bert") -> dt.DeltaModel:
    torch.manual_seed(0)
    model = dt.get_delta_model(tiny_model(family), dt.BottleneckConfig(init_weights=False), adapter_name="a")
    model.add_adapter("b", dt.BottleneckConfig(init_weights=False, reduction_factor=4))
    return model


def _bert_fusion(fusion, h: torch.Tensor, deltas: torch.Tensor, dropout=None) -> torch.Tensor:
    """The adapters library's BertFusion.forward with its default ("dynamic") config, transcribed: query, key, value
    (bias-free, value_before_softmax) on, residual_before and temperature off (T = 1), ``dropout`` its
    ``self.dropout`` on the scores; returns the fused term (its context_layer before ``+= residual``)."""
    query_layer = fusion.query(h)
    key_layer = fusion.key(deltas)
    value_layer = deltas @ fusion.value.weight.T  # nn.Linear(d, d, bias=False)
    scores = torch.squeeze(torch.matmul(query_layer.unsqueeze(2), key_layer.transpose(-2, -1)), dim=2)
    scores = dropout(scores) if dropout is not None else scores
    probs = torch.softmax(scores / 1.0, dim=-1)
    return torch.squeeze(torch.matmul(probs.unsqueeze(2), value_layer), dim=2)


def test_fusion_value_projection_has_no_bias_as_bert_fusion():
    """BertFusion's value is nn.Linear(d, d, bias=False): a fusion trains W_q, b_q, W_k, b_k and W_v, 3 d^2 + 2 d per
    sub-layer. Ours had a trainable b_v too (3 (d^2 + d)), a term added at every sub-layer that the library's
    fusion cannot express. Its names and shapes are now BertFusion's, and with b_v set as a trained one would be, the
    fused term is still the library's."""
    model = _two_adapters()
    model.add_fusion(["a", "b"], name="f")
    model.eval()  # (BERT's fusion drops its logits out while training)
    layer = model.base_model.bert.encoder.layer[0].output.dense
    fusion = layer.adapter_fusion["f"]
    assert sorted(n for n, _ in fusion.named_parameters()) == [
        "key.bias",
        "key.weight",
        "query.bias",
        "query.weight",
        "value.weight",
    ]
    d = 32
    trained = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n}
    assert all(".adapter_fusion.f." in n for n in trained), "only the fusion's own parameters train"
    assert sum(trained.values()) == 2 * 2 * (3 * d * d + 2 * d)  # 2 blocks, 2 Houlsby sites each
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_(0, 0.3)
    h = torch.randn(2, 5, d)
    deltas = torch.stack([layer.delta("a", h), layer.delta("b", h)], dim=-2)
    with torch.no_grad():
        torch.testing.assert_close(fusion(h, deltas), _bert_fusion(fusion, h, deltas), atol=1e-6, rtol=0)


def test_a_fusion_saved_with_a_value_bias_still_loads(tmp_path):
    """A fusion saved when W_v always had a bias and no dropout (its config has neither value_bias nor dropout_prob,
    its file holds value.bias) loads as it was saved, the bias kept, no dropout; a new fusion's file has no
    value.bias and round-trips too."""
    model = _two_adapters()
    model.add_fusion(["a", "b"], name="old", value_bias=True)
    model.add_fusion(["a", "b"], name="new")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter_fusion." in n and n.endswith("value.bias"):
                p.normal_(0, 0.5)
    model.eval()
    inputs = tiny_inputs("bert")
    want = {}
    for name in ("old", "new"):
        model.set_adapter(name)
        with torch.no_grad():
            want[name] = model(**inputs).logits
    model.save_pretrained(str(tmp_path))
    old_config = tmp_path / "old" / "adapter_config.json"
    data = json.loads(old_config.read_text())
    assert data.pop("value_bias") is True and data.pop("dropout_prob") is None
    old_config.write_text(json.dumps(data))
    assert json.loads((tmp_path / "new" / "adapter_config.json").read_text())["value_bias"] is False

    fresh = dt.DeltaModel(tiny_model("bert")).eval()
    for name in ("a", "b", "old", "new"):
        fresh.load_adapter(str(tmp_path / name), name)
    for name in ("old", "new"):
        fresh.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(fresh(**inputs).logits, want[name], atol=1e-6, rtol=0)
    assert not torch.equal(want["old"], want["new"])
    dropout = {f.dropout.p for n, f in fresh.named_modules() if n.endswith("adapter_fusion.old")}
    assert dropout == {0.0}, "a fusion saved before dropout_prob trained without dropout, and trains on so"
    dropout = {f.dropout.p for n, f in fresh.named_modules() if n.endswith("adapter_fusion.new")}
    assert dropout == {0.1}


def test_fusion_drops_its_logits_out_while_training_as_bert_fusion():
    """BertFusion applies nn.Dropout(dropout_prob or the model's attention_probs_dropout_prob) to the logits
    q . k_i before the softmax; ours had none, so a fusion trained on BERT (0.1) saw other attention weights. Now
    the same mask (same seed) gives the library's term in training, none in eval; dropout_prob overrides, and a
    Llama (no attention_probs_dropout_prob) gets none."""
    model = _two_adapters()
    model.add_fusion(["a", "b"], name="f", init_weights=False)
    layer = model.base_model.bert.encoder.layer[1].attention.output.dense
    fusion = layer.adapter_fusion["f"]
    assert fusion.dropout.p == 0.1 == model.base_model.config.attention_probs_dropout_prob
    assert not fusion.training, "added to a model in eval mode, it is in eval mode (its dropout off), as the library's"
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        deltas = torch.stack([layer.delta("a", h), layer.delta("b", h)], dim=-2)
        fusion.train()
        torch.manual_seed(3)
        ours = fusion(h, deltas)
        torch.manual_seed(3)
        theirs = _bert_fusion(fusion, h, deltas, torch.nn.Dropout(0.1))
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
        assert not torch.allclose(ours, _bert_fusion(fusion, h, deltas), atol=1e-4)  # the dropout did something
        fusion.eval()
        torch.testing.assert_close(fusion(h, deltas), _bert_fusion(fusion, h, deltas), atol=2e-5, rtol=0)
    model.add_fusion(["a", "b"], name="g", dropout_prob=0.3)
    assert layer.adapter_fusion["g"].dropout.p == 0.3
    llama = _two_adapters("llama")
    llama.add_fusion(["a", "b"], name="f")
    assert {m.dropout.p for m in llama.modules() if type(m).__name__ == "Fusion"} == {0.0}


class _LibraryAdapter(torch.nn.Module):
    """The adapters library's Adapter (methods/modeling.py), transcribed for ln_before/ln_after off, a float scaling,
    init_weights='bert', use_gating=True, dropout 0: its modules made in its order, then its init drawn in its order."""

    def __init__(self, d: int, m: int, scaling: float) -> None:
        super().__init__()
        self.adapter_down = torch.nn.Sequential(torch.nn.Linear(d, m), torch.nn.SiLU())
        self.adapter_up = torch.nn.Linear(m, d)
        self.scaling = scaling
        self.gate = torch.nn.Linear(d, 1)
        for module in (self.adapter_down[0], self.adapter_up, self.gate):  # Adapter.init_bert_weights
            module.weight.data.normal_(mean=0.0, std=0.02)
            module.bias.data.zero_()

    def forward(self, x: torch.Tensor, residual_input: torch.Tensor) -> torch.Tensor:
        up = self.adapter_up(self.adapter_down(x)) * self.scaling
        output = up  # self.dropout(up), p = 0
        gate = torch.sigmoid(self.gate(x))
        gate = torch.mean(gate, dim=1).unsqueeze(-1)
        output = output * gate
        return output + residual_input


def test_use_gating_is_the_adapters_librarys():
    """use_gating (the library's, UniPELT's gate) was refused as an unknown field. Now: g = mean over positions of
    sigmoid(W_g h + b_g), one per sequence, multiplies the term; drawn in the library's order (a seeded 'bert'
    adapter has its weights) and computing its output."""
    model = _two_adapters()
    config = dt.BottleneckConfig(reduction_factor=16, non_linearity="swish", init_weights="bert", use_gating=True)
    config = config.replace(scaling=0.5)
    torch.manual_seed(7)
    model.add_adapter("g", config)
    torch.manual_seed(7)
    ref = _LibraryAdapter(32, 2, 0.5)
    layer = model.base_model.bert.encoder.layer[0].attention.output.dense  # the first site made
    assert torch.equal(layer.adapter_down["g"].weight, ref.adapter_down[0].weight)
    assert torch.equal(layer.adapter_up["g"].weight, ref.adapter_up.weight)
    assert torch.equal(layer.adapter_gate["g"].weight, ref.gate.weight)
    h = torch.randn(3, 6, 32) * 3
    with torch.no_grad():
        torch.testing.assert_close(h + layer.delta("g", h), ref(h, h), atol=1e-6, rtol=0)
        gate = torch.sigmoid(ref.gate(h)).mean(1)  # (3, 1): one gate per sequence, not per position
        assert (gate.max() - gate.min()) > 1e-4
    model.set_adapter("g")
    trained = {n.split(".adapter_")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"down.g.weight", "down.g.bias", "up.g.weight", "up.g.bias", "gate.g.weight", "gate.g.bias"}


def test_a_gated_adapter_starts_as_the_base_and_round_trips(tmp_path):
    """W_up = 0 (init True): the gated adapter is exactly the base at the start; saved and loaded it computes the
    same, its gate among the file's tensors."""
    base = tiny_model("llama")
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        plain = base(**inputs).logits
    model = dt.get_delta_model(base, dt.BottleneckConfig(use_gating=True), adapter_name="g").eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)
        for n, p in model.named_parameters():
            if ".adapter_" in n:
                p.normal_(0, 0.2)
        want = model(**inputs).logits
    assert not torch.allclose(want, plain, atol=1e-3)
    model.save_pretrained(str(tmp_path))
    loaded = dt.DeltaModel.from_pretrained(tiny_model("llama"), str(tmp_path / "g"), adapter_name="g").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda v: dt.BottleneckConfig(ln_before=v), "ln_before"),
        (lambda v: dt.BottleneckConfig(ln_after=v), "ln_after"),
        (lambda v: dt.BottleneckConfig(use_gating=v), "use_gating"),
        (lambda v: dt.AdapterFusionConfig(adapter_names=["a"], value_bias=v), "value_bias"),
        (lambda v: dt.AdapterFusionConfig(adapter_names=["a"], init_weights=v), "init_weights"),
    ],
)
def test_a_string_for_a_switch_is_one_line_naming_it(make, key):
    """ln_before="false" (a recipe's quoted word) was taken as True: a LayerNorm the user turned off. Now one line
    naming the field, as LoRA's switches; the model is not touched (the config never exists)."""
    with pytest.raises(dt.ConfigError, match=rf"^{key} must be a bool, got 'false'$"):
        make("false")


@pytest.mark.parametrize("saved", ["false", 1])
@pytest.mark.parametrize("key", ["ln_before", "ln_after"])
def test_a_saved_switch_given_as_text_loads_as_it_trained(tmp_path, key, saved):
    """Before 6e49933 BottleneckConfig(ln_before="false") was taken, ran with the LayerNorm (a non-empty string is
    true) and saved the text; 6e49933's check refused such a file (ConfigError). It loads as it trained, as
    prefix tuning's text prefix_projection: logits equal to the saving model's, one warning naming the file."""
    torch.manual_seed(0)
    model = dt.get_delta_model(tiny_model("bert"), dt.BottleneckConfig(init_weights=False, **{key: True}), "a")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter_ln_" in n:
                p.normal_(0.5, 0.3)
    model.eval()
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        want = model(**inputs).logits
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: saved}))  # as the old code saved it (1: too)
    with pytest.warns(UserWarning, match=rf"adapter_config\.json: {key}={saved!r} \(read as True\)") as caught:
        loaded = dt.DeltaModel.from_pretrained(tiny_model("bert"), str(tmp_path / "a"), adapter_name="a").eval()
    assert len([w for w in caught if "read as" in str(w.message)]) == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, want, atol=1e-6, rtol=0)
    assert any(f".adapter_{key}." in n for n, _ in loaded.named_parameters())


def test_a_saved_fusion_switch_given_as_text_loads_as_it_trained(tmp_path):
    """The fusion's value_bias and init_weights given as text (value_bias="false" made W_v with a bias) load as they
    ran: b_v kept, the same logits, one warning naming both."""
    model = _two_adapters()
    model.add_fusion(["a", "b"], name="f", value_bias=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter_fusion." in n and n.endswith("value.bias"):
                p.normal_(0, 0.5)
    model.eval()
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        want = model(**inputs).logits
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "f" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "value_bias": "false", "init_weights": "false"}))
    fresh = dt.DeltaModel(tiny_model("bert")).eval()
    for name in ("a", "b"):
        fresh.load_adapter(str(tmp_path / name), name)
    with pytest.warns(UserWarning, match=r"value_bias='false' \(read as True\), init_weights='false'") as caught:
        fresh.load_adapter(str(tmp_path / "f"), "f")
    assert len([w for w in caught if "read as" in str(w.message)]) == 1
    fresh.set_adapter("f")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, want, atol=1e-6, rtol=0)


def test_a_fusion_over_a_gated_adapter_fuses_its_gated_term():
    """What a fusion fuses (documented as a difference): each adapter's term as it adds it, its gate included, where
    the adapters library fuses up * scaling (ungated). Pinned against a hand computation."""
    model = _two_adapters()
    model.add_adapter("g", dt.BottleneckConfig(init_weights=False, use_gating=True, scaling=0.5))
    model.add_fusion(["a", "g"], name="f", init_weights=False)
    model.eval()
    layer = model.base_model.bert.encoder.layer[0].output.dense
    fusion = layer.adapter_fusion["f"]
    with torch.no_grad():
        layer.adapter_gate["g"].bias.fill_(-1.0)  # g well away from 1
        h = torch.randn(2, 5, 32)

        def up(name):
            return layer.adapter_up[name](torch.relu(layer.adapter_down[name](h))) * layer.scaling[name]

        gate = torch.sigmoid(layer.adapter_gate["g"](h)).mean(1, keepdim=True)  # (2, 1, 1): one per sequence
        ours = layer._term("f", h)
        torch.testing.assert_close(
            ours, _bert_fusion(fusion, h, torch.stack([up("a"), up("g") * gate], -2)), atol=1e-6, rtol=0
        )
        ungated = _bert_fusion(fusion, h, torch.stack([up("a"), up("g")], -2))  # the library's
        assert not torch.allclose(ours, ungated, atol=1e-3)


def test_a_bottleneck_added_to_an_eval_model_is_in_eval_mode():
    """A new BottleneckLayer started in train mode on an eval-mode base (the library's add_adapter does
    adapter.train(self.training)), so adapter_dropout ran at inference: two forwards differed. Also a second adapter
    added to a layer already there; train mode still drops out."""
    inputs = tiny_inputs("bert")
    config = dt.BottleneckConfig(init_weights=False, adapter_dropout=0.5)
    model = dt.get_delta_model(tiny_model("bert").eval(), config, adapter_name="a")
    model.add_adapter("b", config)
    assert not any(m.training for m in model.base_model.modules())
    for name in ("a", "b"):
        model.set_adapter(name)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, model(**inputs).logits)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, model(**inputs).logits)
