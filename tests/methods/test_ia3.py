"""(IA)^3 (methods/ia3.py): PEFT's semantics, merge/unmerge, file interchange with peft both ways, counts."""

from __future__ import annotations

import pytest
import torch
from _sst2_learning import check_learns
from tiny import output_of, tiny_inputs, tiny_model
from tolerances import ATOL, WEIGHT_ATOL
from torch import nn

import deltatune as dt
from deltatune.methods.ia3 import IA3Layer
from deltatune.targets import IA3_FEEDFORWARD, IA3_TARGETS

FAMILIES = ["llama", "gpt2", "bert", "t5", "bart"]
ATOL32 = ATOL[torch.float32]


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial vectors around 1 (never near 0, so that unmerging divides by safe values)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.rand(p.shape, generator=g) * torch.sign(torch.randn(p.shape, generator=g)))


def _plain_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n.replace(".base_layer.", "."): p.detach().clone() for n, p in model.named_parameters() if "ia3_l" not in n
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_init_is_base_and_count(family):
    inputs = tiny_inputs(family)
    base = tiny_model(family)
    ref = output_of(base, inputs)
    model = dt.get_delta_model(tiny_model(family), dt.IA3Config())
    assert torch.equal(output_of(model, inputs), ref)
    expected = 0
    for name, module in base.named_modules():
        if any(name == t or name.endswith("." + t) for t in IA3_TARGETS[family]):
            d0, d1 = module.weight.shape
            d_in, d_out = (d0, d1) if type(module).__name__ == "Conv1D" else (d1, d0)
            expected += d_in if any(name.endswith(f) for f in IA3_FEEDFORWARD[family]) else d_out
    assert model.get_nb_trainable_parameters()[0] == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.endswith("ia3_l.default")
    }
    _randomize(model)
    assert (output_of(model, inputs) - ref).abs().max() > ATOL32


def test_semantics_feedforward_scales_input_others_output():
    torch.manual_seed(0)
    lin = nn.Linear(4, 6)
    x = torch.randn(3, 4)
    out_layer = IA3Layer(lin, is_feedforward=False, fan_in_fan_out=False)
    out_layer.add("a", init=False)
    out_layer.set_adapters(["a"])
    torch.testing.assert_close(out_layer(x), lin(x) * out_layer.ia3_l["a"].flatten())
    assert out_layer.ia3_l["a"].shape == (6, 1)
    ff_layer = IA3Layer(lin, is_feedforward=True, fan_in_fan_out=False)
    ff_layer.add("a", init=False)
    ff_layer.set_adapters(["a"])
    torch.testing.assert_close(ff_layer(x), lin(x * ff_layer.ia3_l["a"].flatten()))
    assert ff_layer.ia3_l["a"].shape == (1, 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_unmerge_exact(family):
    inputs = tiny_inputs(family)
    model = dt.get_delta_model(tiny_model(family), dt.IA3Config())
    _randomize(model)
    unmerged = output_of(model, inputs)
    w0 = _plain_weights(model)
    model.merge_adapter()
    w1 = _plain_weights(model)
    assert any(not torch.equal(w1[n], w0[n]) for n in w0)
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=ATOL32, rtol=0)
    model.merge_adapter()  # idempotent
    assert all(torch.equal(w, w1[n]) for n, w in _plain_weights(model).items())
    model.unmerge_adapter()
    for n, w in _plain_weights(model).items():
        torch.testing.assert_close(w, w0[n], atol=WEIGHT_ATOL, rtol=0, msg=n)
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=ATOL32, rtol=0)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, IA3Layer) for m in plain.modules())
    torch.testing.assert_close(output_of(plain, inputs), unmerged, atol=ATOL32, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_interchange_both_ways(family, tmp_path):
    peft = pytest.importorskip("peft")
    inputs = tiny_inputs(family)

    # peft -> deltatune
    theirs = peft.get_peft_model(tiny_model(family), peft.IA3Config()).eval()
    _randomize(theirs, seed=1)
    ref = output_of(theirs, inputs)
    theirs.save_pretrained(tmp_path / "from_peft")
    ours = dt.DeltaModel.from_pretrained(tiny_model(family), tmp_path / "from_peft")
    assert (ref - output_of(tiny_model(family), inputs)).abs().max() > ATOL32
    torch.testing.assert_close(output_of(ours, inputs), ref, atol=ATOL32, rtol=0)

    # deltatune -> peft
    ours = dt.get_delta_model(tiny_model(family), dt.IA3Config())
    _randomize(ours, seed=2)
    ref = output_of(ours, inputs)
    ours.save_pretrained(tmp_path / "from_dt")
    theirs = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path / "from_dt").eval()
    torch.testing.assert_close(output_of(theirs, inputs), ref, atol=ATOL32, rtol=0)
    from peft.utils import get_peft_model_state_dict

    assert set(get_peft_model_state_dict(theirs)) == set(ours.adapter_state_dict())


def test_step_changes_only_vectors():
    model = dt.get_delta_model(tiny_model("llama"), dt.IA3Config()).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**tiny_inputs("llama")).logits.sum().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith("ia3_l.default") for n in changed)


def test_errors():
    with pytest.raises(dt.ConfigError, match=r"feedforward_modules must be a subset of target_modules, but \['fc2'\]"):
        dt.IA3Config(target_modules=["q_proj"], feedforward_modules=["fc2"])
    base = tiny_model("llama")
    keys = set(dict(base.named_modules()))
    with pytest.raises(dt.ConfigError, match="ia3: target model.embed_tokens is a Embedding"):
        dt.get_delta_model(base, dt.IA3Config(target_modules=["q_proj", "embed_tokens"], feedforward_modules=[]))
    assert set(dict(base.named_modules())) == keys


@pytest.mark.slow
def test_learns_sst2():
    check_learns(dt.IA3Config(task_type="SEQ_CLS"), lr=5e-2)
