"""PiSSA, pissa_niter_K and OLoRA inits (methods/_lora_init.py) against peft 0.21.2 on the same seeds: A, B, the
residual base and the logits to the bit; peft's plain save and reload; peft's conversion to a plain LoRA of rank 2r
(save_pretrained(path_initial_model_for_weight_conversion=...)), which loads on the original base."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny import output_of, tiny_inputs, tiny_model
from torch import nn

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.methods._lora_init import convert_to_plain_lora

warnings.filterwarnings("ignore", module="peft")


def _pair(family: str, dtype: torch.dtype = torch.float32, **kw):
    kw = {"r": 4, "lora_alpha": 8, **kw}
    torch.manual_seed(3)
    p = peft.get_peft_model(tiny_model(family).to(dtype), peft.LoraConfig(**kw), autocast_adapter_dtype=False)
    torch.manual_seed(3)
    d = dt.get_delta_model(tiny_model(family).to(dtype), dt.LoraConfig(**kw))
    return p, d


def _tensors(model, prefix: str) -> dict[str, torch.Tensor]:
    return {k.replace(".default", "").removeprefix(prefix): v for k, v in model.state_dict().items()}


def _train(model) -> None:
    """The same made-up training step on either library's adapter (the parameters in name order)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, q in sorted((n, q) for n, q in model.named_parameters() if "lora_" in n and q.requires_grad):
            q.add_(torch.randn(q.shape, generator=g).to(q.dtype) * 0.05)


@pytest.mark.parametrize(
    "family,init,dtype",
    [
        ("llama", "pissa", torch.float32),
        ("llama", "pissa_niter_2", torch.bfloat16),
        ("llama", "olora", torch.float32),
        ("llama", "olora", torch.bfloat16),
        ("gpt2", "pissa", torch.bfloat16),
        ("gpt2", "pissa_niter_1", torch.float32),
        ("llama", "orthogonal", torch.float32),  # B A = 0, the base left alone
        ("gpt2", "orthogonal", torch.bfloat16),
    ],
)
def test_init_is_peft_to_the_bit(family, init, dtype):
    targets = ["q_proj", "v_proj", "embed_tokens"] if family == "llama" else None  # an embedding: drawn as True
    p, d = _pair(family, dtype, init_lora_weights=init, target_modules=targets)
    theirs, ours = _tensors(p, "base_model.model."), _tensors(d, "base_model.")
    assert theirs.keys() == ours.keys()
    assert [k for k in theirs if not torch.equal(theirs[k], ours[k])] == []  # A, B and the residual base weights
    inputs = tiny_inputs(family)
    assert torch.equal(output_of(d, inputs), output_of(p, inputs))
    base = output_of(tiny_model(family).to(dtype), inputs)
    assert (output_of(d, inputs).float() - base.float()).abs().max() < (0.01 if dtype == torch.bfloat16 else 1e-5)


def test_dora_on_a_pissa_residual_is_peft():
    p, d = _pair("llama", init_lora_weights="olora", use_dora=True)
    inputs = tiny_inputs("llama")
    assert torch.equal(output_of(d, inputs), output_of(p, inputs))


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize(
    "model,kw,words",
    [
        (_Conv, dict(init_lora_weights="pissa", target_modules=["conv"]), "conv (Conv2d)"),  # peft: "Unknown init"
        (lambda: tiny_model("gpt2"), dict(init_lora_weights="olora"), "GPT-2 Conv1D"),  # peft: a shape error
        (lambda: tiny_model("llama"), dict(init_lora_weights="pissa", r=40), "r=40"),  # q_proj is 32 x 32
        (lambda: tiny_model("llama").double(), dict(init_lora_weights="olora"), "torch.float64"),  # peft: TypeError
        (lambda: tiny_model("llama"), dict(init_lora_weights="orthogonal", r=3), "even rank, got r=3"),  # peft too
        (_Conv, dict(init_lora_weights="orthogonal", target_modules=["conv"]), "conv (Conv2d)"),
    ],
)
def test_refused_in_one_line_before_the_model_changes(model, kw, words):
    base = model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        dt.get_delta_model(base, dt.LoraConfig(r=kw.pop("r", 4), **kw))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_tied_output_weight_is_refused(init):
    """peft writes the residual into GPT-2's lm_head, which is its token embedding too: its model starts 0.24 off the
    base. Refused in one line, the model unchanged."""
    base = tiny_model("gpt2")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match=r"lm_head, whose weight is also transformer\.wte\.weight \(tied"):
        dt.get_delta_model(base, dt.LoraConfig(r=4, init_lora_weights=init, target_modules=["lm_head"]))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_a_residual_beside_another_adapter_is_refused():
    """peft warns ("PiSSA changes the base weights of the model and should thus not be used with other adapters") and
    the other adapter's outputs change; refused both ways, the model unchanged."""
    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, init_lora_weights=False))
    inputs = tiny_inputs("llama")
    before = output_of(model, inputs)
    with pytest.raises(ConfigError, match=r"writes a residual into the base weights, which adapter 'default' on"):
        model.add_adapter("pissa", dt.LoraConfig(r=4, init_lora_weights="pissa"))
    assert torch.equal(output_of(model, inputs), before) and list(model.peft_config) == ["default"]
    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, init_lora_weights="olora"))
    with pytest.raises(ConfigError, match=r"adapter 'default' was initialised from the base \(PiSSA / OLoRA\)"):
        model.add_adapter("plain", dt.LoraConfig(r=4))


def test_a_4bit_base_is_refused():
    """peft: TypeError 'Please initialize PiSSA under float32, float16, or bfloat16'."""
    from deltatune.methods import quant

    if not any(quant._available(b) for b in quant.BACKENDS):
        pytest.skip("no 4-bit backend installed")
    model, _ = dt.quantize(tiny_model("llama", hidden_size=64, intermediate_size=128))
    with pytest.raises(ConfigError, match=r"q_proj is Linear4bit \(torch.uint8\): initialise on the full-precision"):
        dt.get_delta_model(model, dt.LoraConfig(r=4, init_lora_weights="pissa"))


@pytest.mark.parametrize("init", ["corda", "pissa_niter_x", "pissa_niter_-1"])  # loftq: tests/methods/test_loftq10.py
def test_other_inits_refused(init):
    with pytest.raises(ConfigError, match="init_lora_weights"):
        dt.LoraConfig(init_lora_weights=init)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_plain_save_is_peft_and_reloads_as_peft_on_the_original_base(init, tmp_path):
    """peft's plain save keeps init_lora_weights='pissa'; loading it re-runs the init on the base it is given, so
    the file gives the trained model on the ORIGINAL base (on the residual base peft subtracts twice)."""
    p, d = _pair("llama", init_lora_weights=init)
    _train(p), _train(d)
    inputs = tiny_inputs("llama")
    trained = output_of(p, inputs)
    p.save_pretrained(tmp_path / "p"), d.save_pretrained(tmp_path / "d")
    theirs = load_file(tmp_path / "p" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "d" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert json.loads((tmp_path / "d" / "adapter_config.json").read_text())["init_lora_weights"] == init
    for folder in ("p", "d"):
        theirs = output_of(peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / folder), inputs)
        ours = output_of(dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path / folder), inputs)
        assert torch.equal(ours, theirs) and torch.equal(ours, trained)


@pytest.mark.parametrize(
    "init,dtype,rslora",
    [("pissa", torch.float32, False), ("olora", torch.bfloat16, False), ("pissa", torch.float32, True)],
)
def test_conversion_is_peft_and_loads_on_the_original_base(init, dtype, rslora, tmp_path):
    p, d = _pair("llama", dtype, init_lora_weights=init, use_rslora=rslora, lora_alpha=6)
    p.save_pretrained(tmp_path / "p" / "init"), d.save_pretrained(tmp_path / "d" / "init")
    _train(p), _train(d)
    p.save_pretrained(tmp_path / "p" / "out", path_initial_model_for_weight_conversion=str(tmp_path / "p" / "init"))
    d.convert_to_plain_lora(tmp_path / "d" / "init", tmp_path / "d" / "out")  # lora.py MODEL_FUNCTIONS
    theirs = load_file(tmp_path / "p" / "out" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "d" / "out" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert next(iter(ours.values())).shape[0] == 8  # rank 2r
    for name in ("out", "init"):
        their_config = json.loads((tmp_path / "p" / name / "adapter_config.json").read_text())
        our_config = json.loads((tmp_path / "d" / name / "adapter_config.json").read_text())
        for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
            assert our_config[key] == their_config[key], (name, key)
    inputs = tiny_inputs("llama")
    trained = output_of(d, inputs)
    for folder in ("p", "d"):  # on the original base, as a plain LoRA (no init re-run)
        kw = dict(autocast_adapter_dtype=False)
        theirs = output_of(
            peft.PeftModel.from_pretrained(tiny_model("llama").to(dtype), tmp_path / folder / "out", **kw), inputs
        )
        ours = output_of(
            dt.DeltaModel.from_pretrained(tiny_model("llama").to(dtype), tmp_path / folder / "out"), inputs
        )
        assert torch.equal(ours, theirs)
        assert (ours.float() - trained.float()).abs().max() < (0.02 if dtype == torch.bfloat16 else 1e-5)


def test_conversion_keeps_an_embedding_adapter(tmp_path):
    """peft's conversion drops lora_embedding_A / B (its file then reloads the embedding untrained: 0.48 off the
    trained logits here); deltatune pads them to rank 2r with zeros."""
    _, d = _pair("llama", init_lora_weights="pissa", target_modules=["q_proj", "embed_tokens"])
    initial = {k: v.clone() for k, v in d.adapter_state_dict().items()}
    _train(d)
    inputs = tiny_inputs("llama")
    trained = output_of(d, inputs)
    convert_to_plain_lora(d, initial, tmp_path)
    theirs = output_of(peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path), inputs)
    ours = output_of(dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path), inputs)
    assert torch.equal(ours, theirs) and (ours - trained).abs().max() < 1e-5


def test_conversion_refuses_rslora_with_patterns_as_peft(tmp_path):
    _, d = _pair("llama", init_lora_weights="pissa", use_rslora=True, rank_pattern={"v_proj": 2})
    with pytest.raises(ConfigError, match="rank_pattern or alpha_pattern"):
        convert_to_plain_lora(d, d.adapter_state_dict(), tmp_path)


# -- lora_bias ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,init,dtype",
    [("gpt2", True, torch.float32), ("qwen2", False, torch.float32), ("qwen2", True, torch.bfloat16)],
)
def test_lora_bias_is_peft(family, init, dtype, tmp_path):
    """A bias on lora_B (drawn by nn.Linear, zeroed unless init is False), scaled with the update, saved as
    lora_B.bias and merged into the base bias: peft's to the bit, files both ways."""
    p, d = _pair(family, dtype, init_lora_weights=init, lora_bias=True)
    inputs = tiny_inputs(family)
    assert torch.equal(output_of(d, inputs), output_of(p, inputs))
    _train(p), _train(d)
    assert torch.equal(output_of(d, inputs), output_of(p, inputs))
    p.save_pretrained(tmp_path / "p"), d.save_pretrained(tmp_path / "d")
    theirs = load_file(tmp_path / "p" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "d" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert any(k.endswith("lora_B.bias") for k in ours)
    loaded = dt.DeltaModel.from_pretrained(tiny_model(family).to(dtype), tmp_path / "p")
    assert torch.equal(output_of(loaded, inputs), output_of(d, inputs))
    merged_p, merged_d = p.merge_and_unload().state_dict(), d.merge_and_unload().state_dict()
    assert merged_p.keys() == merged_d.keys() and all(torch.equal(merged_p[k], merged_d[k]) for k in merged_p)


def test_lora_bias_unmerges_and_routes_rows_as_each_adapter_alone():
    _, d = _pair("qwen2", init_lora_weights=False, lora_bias=True)
    d.add_adapter("other", dt.LoraConfig(r=4, init_lora_weights=False, lora_bias=True))
    before = {k: v.clone() for k, v in d.state_dict().items()}
    inputs = tiny_inputs("qwen2")
    alone = []
    for name in ("default", "other"):
        d.set_adapter(name)
        alone.append(output_of(d, inputs))
    with torch.no_grad():  # each row through its own adapter: the batched path has no biases, the loop has
        mixed = d(**inputs, adapter_names=["default", "other"]).logits
    torch.testing.assert_close(mixed, torch.stack([alone[0][0], alone[1][1]]), atol=1e-6, rtol=0)
    d.merge_adapter(), d.unmerge_adapter()
    after = d.state_dict()
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_lora_bias_merge_refused_without_a_base_bias():
    """peft: RuntimeError 'Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.'"""
    _, d = _pair("llama", init_lora_weights=False, lora_bias=True)
    before = {k: v.clone() for k, v in d.state_dict().items()}
    with pytest.raises(TypeError, match="Impossible to merge LoRA with `lora_bias=True`"):
        d.merge_adapter()
    assert all(torch.equal(before[k], v) for k, v in d.state_dict().items())


@pytest.mark.parametrize(
    "kw,words",
    [
        (dict(target_modules=["embed_tokens"]), "embed_tokens, an embedding"),
        (dict(init_lora_weights="pissa"), "only supported with init_lora_weights=True or False"),
        (dict(use_dora=True), "not supported with use_dora"),
        (dict(lora_bias="true"), "lora_bias must be a bool"),
    ],
)
def test_lora_bias_refusals_as_peft(kw, words):
    with pytest.raises(ConfigError, match=words):
        dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, **{"lora_bias": True, **kw}))


def test_a_refused_pissa_load_leaves_the_base_as_it_was(tmp_path):
    """Loading runs the init (the base's residual) before the file's tensors are checked: a refused file left the
    base 0.047 off on a tiny Llama. The replaced weights are kept until the tensors are in, then dropped."""
    from safetensors.torch import save_file

    dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, init_lora_weights="pissa")).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    model = dt.DeltaModel(tiny_model("llama"))
    model.load_adapter(tmp_path, "good")
    assert not any(getattr(m, "_pre_init", None) for m in model.modules())  # nothing kept once loaded
    key = next(iter(tensors))
    save_file({**tensors, key: tensors[key][:, :-1].contiguous()}, tmp_path / "adapter_model.safetensors")
    base = tiny_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(dt.AdapterLoadError):
        dt.DeltaModel(base).load_adapter(tmp_path, "bad")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_lora_bias_on_a_conv_is_peft():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(r=2, lora_alpha=4, target_modules=["conv"], lora_bias=True, init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(_Conv(), peft.LoraConfig(**kw))
    torch.manual_seed(0)
    ours = dt.get_delta_model(_Conv(), dt.LoraConfig(**kw))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        merged_p, merged_d = theirs.merge_and_unload(), ours.merge_and_unload()
        assert torch.equal(merged_d.conv.bias, merged_p.conv.bias) and torch.equal(merged_d(x), merged_p(x))
