"""Probe 19 (adapters): bottleneck adapters and AdapterFusion against the adapters library's rules (its
methods/modeling.py Adapter / BertFusion, read through the code search tool; the library is not installed)."""

from __future__ import annotations

import json

import torch

import deltatune as dt
from tests.tiny import tiny_inputs, tiny_model


def _two_adapters(family: str = "bert") -> dt.DeltaModel:
    torch.manual_seed(0)
    model = dt.get_delta_model(tiny_model(family), dt.BottleneckConfig(init_weights=False), adapter_name="a")
    model.add_adapter("b", dt.BottleneckConfig(init_weights=False, reduction_factor=4))
    return model


def _bert_fusion(fusion, h: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """The adapters library's BertFusion.forward with its default ("dynamic") config, transcribed: query, key, value
    (bias-free, value_before_softmax) on, residual_before and temperature off (T = 1), eval (no score dropout);
    returns the fused term (its context_layer before ``+= residual``)."""
    query_layer = fusion.query(h)
    key_layer = fusion.key(deltas)
    value_layer = deltas @ fusion.value.weight.T  # nn.Linear(d, d, bias=False)
    scores = torch.squeeze(torch.matmul(query_layer.unsqueeze(2), key_layer.transpose(-2, -1)), dim=2)
    probs = torch.softmax(scores / 1.0, dim=-1)
    return torch.squeeze(torch.matmul(probs.unsqueeze(2), value_layer), dim=2)


def test_fusion_value_projection_has_no_bias_as_bert_fusion():
    """BertFusion's value is nn.Linear(d, d, bias=False): a fusion trains W_q, b_q, W_k, b_k and W_v, 3 d^2 + 2 d per
    sub-layer. Ours had a trainable b_v too (3 (d^2 + d)), a term added at every sub-layer that the library's
    fusion cannot express. Its names and shapes are now BertFusion's, and with b_v set as a trained one would be, the
    fused term is still the library's."""
    model = _two_adapters()
    model.add_fusion(["a", "b"], name="f")
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
    """A fusion saved when W_v always had a bias (its config has no value_bias, its file holds value.bias) loads as
    it was saved, the bias kept; a new fusion's file has no value.bias and round-trips too."""
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
    assert data.pop("value_bias") is True
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
