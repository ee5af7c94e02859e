"""LoftQ (methods/_loftq.py) against peft 0.21.2 on the CPU.

peft's ``loftq_init`` and ``_loftq_init_new`` send their bitsandbytes calls to "cuda" (or "xpu"); the reference here
is their own source with that device name set to "cpu": the same operations on the same tensors.
"""

from __future__ import annotations

import inspect
import json

import peft
import peft.tuners.lora.layer as peft_layer
import peft.utils.loftq_utils as loftq_utils
import pytest
import torch
from tiny import output_of, save_tiny, tiny_inputs, tiny_model

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.methods import _loftq, quant
from deltatune.methods._lora_init import convert_to_plain_lora

pytestmark = pytest.mark.skipif(not quant._available("bitsandbytes"), reason="LoftQ quantises with bitsandbytes")


def _on_cpu(fn):
    """peft's function ``fn`` with its compute device "cuda" read as "cpu"."""
    namespace = dict(vars(loftq_utils))
    exec(inspect.getsource(fn).replace('"cuda"', '"cpu"'), namespace)
    return namespace[fn.__name__]


def _tensors(model, prefix: str) -> dict[str, torch.Tensor]:
    return {k.replace(".default", "").removeprefix(prefix): v for k, v in model.state_dict().items()}


def _pair(family: str, monkeypatch, **kw):
    monkeypatch.setattr(peft_layer, "loftq_init", _on_cpu(loftq_utils.loftq_init))
    torch.manual_seed(3)
    p = peft.get_peft_model(tiny_model(family), peft.LoraConfig(**kw))
    torch.manual_seed(3)
    d = dt.get_delta_model(tiny_model(family), dt.LoraConfig(**kw))
    return p, d


@pytest.mark.parametrize(("bits", "rounds"), [(4, 1), (4, 2), (8, 1), (8, 2)])
def test_loftq_init_is_peft_to_the_bit(bits, rounds, monkeypatch):
    """Tiny Llama, q and v, r 4, alpha 4 (s = 1): every A, B and replaced base weight equal, so are the outputs."""
    loftq = peft.LoftQConfig(loftq_bits=bits, loftq_iter=rounds)
    p, d = _pair("llama", monkeypatch, r=4, lora_alpha=4, init_lora_weights="loftq", loftq_config=loftq)
    theirs, ours = _tensors(p, "base_model.model.model."), _tensors(d, "base_model.model.")
    adapted = [k for k in theirs if ".lora_" in k or ".base_layer." in k]
    assert len(adapted) == 12 and all(torch.equal(theirs[k], ours[k]) for k in adapted)
    plain = tiny_model("llama").state_dict()
    changed = [
        k
        for k in adapted
        if "base_layer" in k and not torch.equal(ours[k], plain["model." + k.replace("base_layer.", "")])
    ]
    assert len(changed) == 4  # the base weights are Q now, not W
    inputs = tiny_inputs("llama")
    assert torch.equal(output_of(p, inputs), output_of(d, inputs))


def test_scaling_is_split_so_the_model_starts_near_the_base(monkeypatch):
    """alpha 8, r 4 (s = 2): Q is peft's to the bit; peft's B A is the error itself, so Q + s B A overshoots; ours is
    the error / s (B A equal to peft's / 2 up to rounding), and the start is nearer W than Q alone."""
    kw = {"r": 4, "lora_alpha": 8, "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}
    p, d = _pair("llama", monkeypatch, **kw)
    theirs, ours = _tensors(p, "base_model.model.model."), _tensors(d, "base_model.model.")
    W = tiny_model("llama").state_dict()["model.layers.0.self_attn.q_proj.weight"]
    key = "layers.0.self_attn.q_proj."
    Q = ours[key + "base_layer.weight"]
    assert torch.equal(Q, theirs[key + "base_layer.weight"])
    ba_ours = ours[key + "lora_B.weight"] @ ours[key + "lora_A.weight"]
    ba_theirs = theirs[key + "lora_B.weight"] @ theirs[key + "lora_A.weight"]
    torch.testing.assert_close(2 * ba_ours, ba_theirs, rtol=1e-5, atol=1e-6)
    error = (W - Q).norm()
    assert (W - Q - 2 * ba_ours).norm() < 0.9 * error < (W - Q - 2 * ba_theirs).norm()


def test_gpt2_conv1d_is_factored_as_the_weight_it_stands_for(monkeypatch):
    """GPT-2's c_attn (stored d_in x d_out): ours is peft's loftq_init on the (d_out, d_in) weight, the base Q stored
    back transposed; peft 0.21's own factors the stored weight and its forward fails on the non-square layer (peft
    0.22's factors the transposed one, as ours)."""
    reference = _on_cpu(loftq_utils.loftq_init)
    model = tiny_model("gpt2")
    W = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    d = dt.get_delta_model(model, dt.LoraConfig(r=4, lora_alpha=4, init_lora_weights="loftq",
                                                loftq_config={"loftq_bits": 4, "loftq_iter": 2}))  # fmt: skip
    layer = d.base_model.transformer.h[0].attn.c_attn
    Q, A, B = reference(W.T.contiguous(), 4, 4, 2)
    assert torch.equal(layer.base_layer.weight, Q.T) and torch.equal(layer.lora_A["default"].weight, A)
    assert torch.equal(layer.lora_B["default"].weight, B)
    monkeypatch.setattr(peft_layer, "loftq_init", reference)
    p = peft.get_peft_model(tiny_model("gpt2"), peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="loftq",
                                                                 loftq_config={"loftq_bits": 4, "loftq_iter": 2}))  # fmt: skip
    if tuple(int(v) for v in peft.__version__.split(".")[:2]) < (0, 22):
        with pytest.raises(RuntimeError):
            p(**tiny_inputs("gpt2"))
        return
    # peft 0.22 factors the transposed weight too (fan_in_fan_out): its layer and logits are ours
    theirs = p.base_model.model.transformer.h[0].attn.c_attn
    assert torch.equal(theirs.base_layer.weight, Q.T) and torch.equal(theirs.lora_A["default"].weight, A)
    assert torch.equal(theirs.lora_B["default"].weight, B)
    with torch.no_grad():
        assert torch.allclose(p(**tiny_inputs("gpt2")).logits, d(**tiny_inputs("gpt2")).logits, atol=1e-5)


@pytest.mark.parametrize(
    ("loftq_config", "words"),
    [
        (None, "`loftq_config` must be specified"),
        ({}, "`loftq_config` must be specified"),
        ({"loftq_bits": 2, "loftq_iter": 1}, r"loftq_bits'\] must be 4 \(nf4\) or 8"),
        ({"loftq_bits": 4, "loftq_iter": 0}, r"loftq_iter'\] must be an int >= 1"),
        ({"bits": 4}, "takes the keys 'loftq_bits' and 'loftq_iter'"),
    ],
)
def test_bad_loftq_config_is_one_line_and_changes_nothing(loftq_config, words):
    """peft: "`loftq_config` must be specified when `init_lora_weights` is 'loftq'." (its LoraConfig), "Only nf4 and
    int8 quantization is supported", "Number of iterations must be greater than 0" (its loftq_init)."""
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=words):  # at the config, as peft's LoraConfig, or at the model (None)
        dt.get_delta_model(model, dt.LoraConfig(r=4, init_lora_weights="loftq", loftq_config=loftq_config))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_embedding_quantized_base_and_conversion_are_refused(tmp_path):
    """peft's Embedding and Conv2d call loftq_init without the config (TypeError); a 4-bit base has no W to quantise;
    a LoftQ adapter is no PiSSA residual for convert_to_plain_lora."""
    loftq = {"loftq_bits": 4, "loftq_iter": 1}
    with pytest.raises(ConfigError, match=r"not defined for model.embed_tokens \(Embedding\)"):
        dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, init_lora_weights="loftq", loftq_config=loftq,
                                                              target_modules=["embed_tokens"]))  # fmt: skip
    small, _ = dt.quantize(tiny_model("llama", hidden_size=64, intermediate_size=128), backend="bitsandbytes")
    with pytest.raises(ConfigError, match="initialise on the full-precision base"):
        dt.get_delta_model(small, dt.LoraConfig(r=4, init_lora_weights="loftq", loftq_config=loftq))
    d = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, init_lora_weights="loftq",
                                                              loftq_config=peft.LoftQConfig()))  # fmt: skip
    d.save_pretrained(tmp_path / "init")
    saved = json.loads((tmp_path / "init" / "adapter_config.json").read_text())
    assert saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}  # peft's LoftQConfig saved as peft's dict
    with pytest.raises(ConfigError, match="is LoftQ: its base is the quantised Q"):
        convert_to_plain_lora(d, tmp_path / "init", tmp_path / "out")


def test_saved_loftq_adapter_loads_on_the_original_base_as_peft(monkeypatch, tmp_path):
    """peft's load runs loftq_init again on the base it is given (the file's A and B then replace the drawn ones)."""
    kw = {"r": 4, "lora_alpha": 4, "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 8, "loftq_iter": 1}}
    _, d = _pair("llama", monkeypatch, **kw)
    with torch.no_grad():
        d.base_model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(0.01)
    d.save_pretrained(tmp_path)
    inputs = tiny_inputs("llama")
    theirs = output_of(peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path), inputs)
    assert torch.equal(output_of(dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path), inputs), theirs)
    assert torch.equal(output_of(d, inputs), theirs)


def _quantized_delta(path, backend: str, alpha: float = 4):
    from transformers import AutoModelForCausalLM

    model, _ = dt.quantize(AutoModelForCausalLM.from_pretrained(path), backend=backend)
    return dt.get_delta_model(model, dt.LoraConfig(r=4, lora_alpha=alpha, target_modules="all-linear"))


def test_replace_lora_weights_loftq_is_peft_on_a_bitsandbytes_base(tmp_path):
    """deltatune's 4-bit layers (bitsandbytes, double quantisation), W read from model.safetensors: A and B equal
    peft's _loftq_init_new on the same 4-bit weight to the bit (s = 1)."""
    path = save_tiny(tmp_path / "m", "llama", hidden_size=64, intermediate_size=128)
    d = _quantized_delta(path, "bitsandbytes")
    reference = _on_cpu(loftq_utils._loftq_init_new)
    from safetensors.torch import load_file

    W = load_file(f"{path}/model.safetensors")
    expected = {}
    for name, layer in d.base_model.named_modules():
        if hasattr(layer, "lora_A"):
            expected[name] = reference(layer.base_layer.weight, W[f"{name}.weight"], 4, 4)
    assert len(expected) == 14  # 2 blocks x (q, k, v, o, gate, up, down); lm_head stays full precision
    _loftq.replace_lora_weights_loftq(d, path)
    for name, (A, B) in expected.items():
        layer = d.base_model.get_submodule(name)
        assert torch.equal(layer.lora_A["default"].weight, A) and torch.equal(layer.lora_B["default"].weight, B)


@pytest.mark.parametrize("backend", ["bitsandbytes", "torchao"])
def test_replace_lora_weights_loftq_brings_the_start_near_w(backend, tmp_path):
    """Either backend, s = 2 (alpha 8, r 4): the model starts nearer the full-precision one than Q alone; a callback
    returning False puts a layer's A and B back, as peft's."""
    if not quant._available(backend):
        pytest.skip(f"{backend} is not installed")
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / "m", "llama", hidden_size=64, intermediate_size=128)
    inputs = tiny_inputs("llama")
    inputs["input_ids"] = inputs["input_ids"] % 1000
    full = output_of(AutoModelForCausalLM.from_pretrained(path), inputs)
    d = _quantized_delta(path, backend, alpha=8)
    start = output_of(d, inputs)
    seen = []
    kept = d.base_model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.clone()
    _loftq.replace_lora_weights_loftq(
        d, path, callback=lambda m, n: seen.append(n) or n != "model.layers.0.self_attn.q_proj"
    )
    assert len(seen) == 14 and torch.equal(
        d.base_model.model.layers[0].self_attn.q_proj.lora_A["default"].weight, kept
    )
    assert (output_of(d, inputs) - full).abs().mean() < 0.9 * (start - full).abs().mean()


def test_replace_lora_weights_loftq_refusals(tmp_path):
    path = save_tiny(tmp_path / "m", "llama", hidden_size=64, intermediate_size=128)
    with pytest.raises(ValueError, match="no LoRA layer of adapter 'default' on a 4-bit base"):
        _loftq.replace_lora_weights_loftq(dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4)), path)
    d = _quantized_delta(path, "bitsandbytes")
    before = {k: v.clone() for k, v in d.state_dict().items() if ".lora_" in k}
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        _loftq.replace_lora_weights_loftq(d, tmp_path / "nowhere")
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in before.items())


def test_dora_with_loftq_is_peft(monkeypatch):
    """peft refuses neither: DoRA's magnitude is taken after LoftQ, on Q + s B A."""
    kw = {"r": 4, "lora_alpha": 4, "use_dora": True, "init_lora_weights": "loftq", "loftq_config": peft.LoftQConfig()}
    p, d = _pair("llama", monkeypatch, **kw)
    theirs, ours = _tensors(p, "base_model.model.model."), _tensors(d, "base_model.model.")
    keys = [k for k in theirs if "magnitude" in k]
    assert len(keys) == 4 and all(torch.equal(theirs[k], ours[k.removesuffix(".weight")]) for k in keys)
    inputs = tiny_inputs("llama")
    assert torch.equal(output_of(p, inputs), output_of(d, inputs))


def test_check_init_refuses_a_missing_loftq_config_when_the_config_passes_it():
    """LoraConfig.__post_init__ passing its loftq_config makes the refusal peft's config-time one."""
    from deltatune.methods._lora_init import check_init

    with pytest.raises(ConfigError, match="`loftq_config` must be specified"):
        check_init("loftq", loftq_config={})
    check_init("loftq", loftq_config={"loftq_bits": 8, "loftq_iter": 3})
    check_init("loftq")  # (not passed: the check waits for get_delta_model)
    with pytest.raises(ConfigError, match="`loftq_config` must be specified"):  # the config passes it, as peft's
        dt.LoraConfig(init_lora_weights="loftq")
    assert dt.LoraConfig(init_lora_weights="loftq", loftq_config=dt.LoftQConfig(loftq_bits=8)).loftq_config
