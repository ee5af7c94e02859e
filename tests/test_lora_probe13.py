"""LoRA config fields against peft 0.21.2: layers_pattern without layers_to_transform (peft's ValueError), a
rank_pattern / alpha_pattern key that matches no target (peft's RuntimeWarning naming it), ensure_weight_tying (peft
warns where nothing tied is adapted; deltatune refused the field) and target_parameters (refused, one clear line)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import tiny_inputs, tiny_model

import deltatune as dt
from deltatune.config import ConfigError

peft = pytest.importorskip("peft")


def _warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


def test_layers_pattern_needs_layers_to_transform():
    with pytest.raises(ValueError, match="must also be specified"):
        peft.LoraConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(ConfigError, match=r"layers_pattern='layers' needs layers_to_transform"):
        dt.LoraConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(ConfigError, match=r"adapter config: layers_pattern=\['h'\] needs layers_to_transform"):
        dt.LoraConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj"], "layers_pattern": ["h"]})
    # with it, both adapt the same blocks
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(target_modules=["q_proj"], layers_to_transform=[1],
                                                                 layers_pattern="layers"))  # fmt: skip
    config = peft.LoraConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    theirs = peft.get_peft_model(tiny_model("llama"), config)
    names = [n.split("layers.")[1] for n, _ in ours.named_parameters() if "lora_" in n]
    assert names == [n.split("layers.")[1] for n, _ in theirs.named_parameters() if "lora_" in n] and len(names) == 2


@pytest.mark.parametrize("attr", ["rank_pattern", "alpha_pattern"])
def test_unmatched_pattern_key_warns(attr):
    patterns = {"nowhere": 2, "q_proj": 4, "v_pr": 3}
    _, theirs = _warnings(lambda: peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
        target_modules=["q_proj", "v_proj"], **{attr: patterns})))  # fmt: skip
    ours_model, ours = _warnings(lambda: dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(
        target_modules=["q_proj", "v_proj"], **{attr: patterns})))  # fmt: skip
    assert [m for m in theirs if attr in m and "['nowhere', 'v_pr']" in m], theirs
    hits = [m for m in ours if attr in m]
    assert len(hits) == 1 and "['nowhere', 'v_pr']" in hits[0], ours
    layer = ours_model.base_model.model.layers[0].self_attn.q_proj
    assert (
        (layer.lora_A["default"].out_features == 4) if attr == "rank_pattern" else (layer.scaling["default"] == 4 / 8)
    )


def test_ensure_weight_tying_untied_warns_and_matches_peft(tmp_path):
    """peft accepts ensure_weight_tying=True on an untied model and warns; its file loads here with the same logits."""
    torch.manual_seed(0)
    config = peft.LoraConfig(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True, r=4,
                             init_lora_weights=False)  # fmt: skip
    theirs, warned = _warnings(lambda: peft.get_peft_model(tiny_model("llama", tie_word_embeddings=False), config))
    assert any("no tied modules were found" in m for m in warned), warned
    theirs.save_pretrained(tmp_path)
    inputs = tiny_inputs("llama")
    ours, warned = _warnings(lambda: dt.DeltaModel.from_pretrained(tiny_model("llama", tie_word_embeddings=False),
                                                                   tmp_path))  # fmt: skip
    assert any("no tied modules were found" in m for m in warned), warned
    with torch.no_grad():
        diff = (ours(**inputs).logits - theirs(**inputs).logits).abs().max().item()
    assert diff == 0.0
    assert ours.peft_config["default"].ensure_weight_tying is True
    # ours saves it; peft reads ours
    made = dt.get_delta_model(tiny_model("llama", tie_word_embeddings=False), dt.LoraConfig(
        target_modules=["q_proj"], ensure_weight_tying=True))  # fmt: skip
    made.save_pretrained(tmp_path / "ours")
    assert peft.PeftConfig.from_pretrained(tmp_path / "ours").ensure_weight_tying is True


def test_ensure_weight_tying_tied():
    """Tied model: nothing tied adapted warns as peft; a tied embedding adapted is refused (peft ties the adapters)."""
    _, theirs = _warnings(lambda: peft.get_peft_model(tiny_model("llama", tie_word_embeddings=True), peft.LoraConfig(
        target_modules=["q_proj"], ensure_weight_tying=True)))  # fmt: skip
    _, ours = _warnings(lambda: dt.get_delta_model(tiny_model("llama", tie_word_embeddings=True), dt.LoraConfig(
        target_modules=["q_proj"], ensure_weight_tying=True)))  # fmt: skip
    assert any("no tied modules are added" in m for m in theirs), theirs
    assert any("no tied modules are in modules_to_save or target_modules" in m for m in ours), ours
    base = tiny_model("llama", tie_word_embeddings=True)
    before = {n: p.clone() for n, p in base.state_dict().items()}
    with pytest.raises(ConfigError, match="ensure_weight_tying with model.embed_tokens adapted"):
        dt.get_delta_model(base, dt.LoraConfig(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True))
    assert all(torch.equal(before[n], p) for n, p in base.state_dict().items())
    assert type(base.model.embed_tokens) is torch.nn.Embedding


def test_target_parameters_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"target_parameters=\['mlp.experts.down_proj'\] \(peft's LoRA on"):
        dt.LoraConfig(target_modules=[], target_parameters=["mlp.experts.down_proj"])
    peft.LoraConfig(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"]).save_pretrained(
        tmp_path
    )
    with pytest.raises(ConfigError, match="target_parameters="):
        dt.LoraConfig.from_pretrained(tmp_path)
    assert dt.LoraConfig(target_parameters=None).target_parameters is None


@pytest.mark.parametrize("exclude", [["nothing"], "nothing", ["k_proj"]])
def test_exclude_modules_that_excludes_nothing_warns_as_peft(exclude):
    """peft warns when exclude_modules matches no module of the model (one it excludes from the targets or not)."""
    _, theirs = _warnings(lambda: peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
        target_modules=["q_proj"], exclude_modules=exclude)))  # fmt: skip
    model, ours = _warnings(lambda: dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(
        target_modules=["q_proj"], exclude_modules=exclude)))  # fmt: skip
    warned = exclude != ["k_proj"]
    assert any("no modules were excluded" in m for m in theirs) == warned, theirs
    assert [m for m in ours if "exclude_modules" in m] == ([f"lora: exclude_modules={exclude!r} excludes no module of "
                                                            "the model"] if warned else [])  # fmt: skip
    assert sum(type(m).__name__ == "LoraLinear" for m in model.modules()) == 2


def test_a_file_saved_with_layers_pattern_alone_still_loads_as_it_ran(tmp_path):
    """deltatune saved layers_pattern without layers_to_transform before the config refused it (b2dcbc3); alone it
    narrowed nothing, so such a file reads without it (one warning naming the file) and gives the same outputs as
    the adapter saved without it. (peft refuses such a file: it never wrote one.)"""
    import json

    torch.manual_seed(0)
    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "layers_pattern": "layers"}))
    loaded, caught = _warnings(lambda: dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path))
    assert [m for m in caught if "layers_pattern='layers' without layers_to_transform narrowed nothing" in m]
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    assert dt.LoraConfig.from_pretrained(tmp_path).layers_pattern is None
