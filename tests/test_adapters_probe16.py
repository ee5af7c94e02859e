"""Probe 16 (adapters): combining LoRA adapters (add_weighted_adapter) against peft 0.21.2; bottleneck adapters and
AdapterFusion against the adapters library's rules."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch

import deltatune as dt
from tests.tiny import tiny_inputs, tiny_model

TARGETS = ["q_proj", "v_proj", "up_proj"]  # v_proj is 32 -> 16 (2 kv heads of 8), up_proj 32 -> 48: wide and tall


def _pair(r: int = 4, model_type: str = "llama", targets: list | None = None, **extra) -> tuple:
    """deltatune and peft models with the same two random LoRA adapters t1 and t2."""
    out = []
    for lib, make in ((dt, dt.get_delta_model), (peft, peft.get_peft_model)):
        kw = dict(init_lora_weights=False, r=r, lora_alpha=8, target_modules=targets or TARGETS, **extra)
        torch.manual_seed(1)
        model = make(tiny_model(model_type), lib.LoraConfig(**kw), adapter_name="t1")
        torch.manual_seed(2)
        model.add_adapter("t2", lib.LoraConfig(**kw))
        out.append(model.eval())
    return tuple(out)


def _logits(model, name: str, model_type: str = "llama") -> torch.Tensor:
    model.set_adapter(name)
    with torch.no_grad():
        return model(**tiny_inputs(model_type)).logits


def test_svd_rank_past_a_modules_smaller_side_gives_the_exact_update():
    """svd_rank 40 is past v_proj's 16 singular values (wide, 32 -> 16) and up_proj's 32 (tall, 32 -> 48). With
    full_matrices (the default) the wide case kept Vh's 40 rows against U's 16 columns, so B and A did not multiply
    at the first forward; the tall case kept U's 48 columns against S's 32 values and failed inside torch at
    U @ diag(S) (peft fails both ways). Now the factors stop at the singular values and are zero-padded: a truncation
    past the full rank is the whole update, equal to peft's exact 'cat' combination."""
    ours, theirs = _pair()
    ours.add_weighted_adapter(["t1", "t2"], [0.7, -0.4], "m", combination_type="svd", svd_rank=40)
    theirs.add_weighted_adapter(["t1", "t2"], [0.7, -0.4], "m", combination_type="cat")
    layer = ours.base_model.model.layers[0]
    v_proj, up_proj = layer.self_attn.v_proj, layer.mlp.up_proj
    assert v_proj.lora_A["m"].weight.shape == (40, 32) and v_proj.lora_B["m"].weight.shape == (16, 40)
    assert up_proj.lora_A["m"].weight.shape == (40, 32) and up_proj.lora_B["m"].weight.shape == (48, 40)
    peft_up = theirs.base_model.model.model.layers[0].mlp.up_proj
    torch.testing.assert_close(up_proj.delta_weight("m"), peft_up.get_delta_weight("m"), atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(ours, "m"), _logits(theirs, "m"), atol=2e-5, rtol=0)


def test_svd_rank_past_a_tall_fan_in_fan_out_module_gives_the_exact_update():
    """GPT-2's c_attn is a Conv1D, 32 -> 96, stored (in, out) (fan_in_fan_out): its update, transposed for the SVD,
    is tall. svd_rank 40 failed inside torch at U @ diag(S) (U 96 x 96, S 32 values); now it is peft's 'cat'."""
    ours, theirs = _pair(model_type="gpt2", targets=["c_attn"], fan_in_fan_out=True)
    ours.add_weighted_adapter(["t1", "t2"], [0.7, -0.4], "m", combination_type="svd", svd_rank=40)
    theirs.add_weighted_adapter(["t1", "t2"], [0.7, -0.4], "m", combination_type="cat")
    torch.testing.assert_close(_logits(ours, "m", "gpt2"), _logits(theirs, "m", "gpt2"), atol=2e-5, rtol=0)


def test_a_numpy_svd_rank_and_zero_are_peft_s():
    """peft takes svd_rank np.int64(6) (numpy's integers slice as Python's) and 0 (its `svd_rank or max(r)`: the
    largest rank); deltatune refused np.int64 as not an integer. Now both are peft's adapter, r an int in the file."""
    for rank, r in ((np.int64(6), 6), (0, 4)):
        ours, theirs = _pair()
        for model in (ours, theirs):
            torch.manual_seed(0)
            model.add_weighted_adapter(["t1", "t2"], [0.7, -0.4], "m", combination_type="svd", svd_rank=rank)
        assert type(ours.peft_config["m"].r) is int and ours.peft_config["m"].r == theirs.peft_config["m"].r == r
        torch.testing.assert_close(_logits(ours, "m"), _logits(theirs, "m"), atol=2e-5, rtol=0)


def test_numpy_and_tensor_weights_combine_as_peft():
    """peft multiplies whatever weights it gets; deltatune refused np.float32 and 0-d tensors as not numbers."""
    for weights in ([np.float32(0.5), np.float32(-0.25)], torch.tensor([0.5, -0.25])):
        ours, theirs = _pair()
        for model in (ours, theirs):
            model.add_weighted_adapter(["t1", "t2"], weights, "m", combination_type="linear")
        torch.testing.assert_close(_logits(ours, "m"), _logits(theirs, "m"), atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(combination_type="svd", svd_clamp=2), ValueError, r"svd_clamp is a quantile, a number in \[0, 1\]"),
        (
            dict(combination_type="svd", svd_rank=2.5),
            ValueError,
            r"svd_rank must be a whole number >= 0 \(0 or None: the adapters' largest rank\), got 2.5$",
        ),
        (dict(combination_type="svd", svd_rank=-1), ValueError, "svd_rank must be a whole number >= 0"),
        (dict(combination_type="svd", svd_rank=True), ValueError, "svd_rank must be a whole number >= 0"),
        (dict(combination_type="ties", density="0.5"), ValueError, "'ties' needs a density >= 0, got '0.5'"),
        (dict(combination_type="dare_linear", density=0.0), ValueError, "'dare_linear' needs a density > 0"),
        (
            dict(combination_type="linear", weights=[float("nan"), 0.5]),
            ValueError,
            r"weights must be finite, got \[nan, 0.5\]",
        ),
    ],
)
def test_bad_combination_arguments_are_one_line_and_change_nothing(kwargs, error, match):
    """svd_clamp 2 and density '0.5' failed deep in torch (quantile) and Python (str >= int); DARE at density 0 and a
    NaN weight (peft takes both) wrote an adapter of NaNs (kept values / 0). Now one line, the model as it was."""
    ours, _ = _pair()
    before = _logits(ours, "t1")
    kwargs = {"weights": [0.5, 0.5], **kwargs}
    with pytest.raises(error, match=match) as err:
        ours.add_weighted_adapter(["t1", "t2"], adapter_name="m", **kwargs)
    assert "\n" not in str(err.value) and set(ours.peft_config) == {"t1", "t2"}
    assert torch.equal(_logits(ours, "t1"), before)


def _bottleneck(scaling, seed: int = 3, **kw):
    torch.manual_seed(seed)
    model = dt.get_delta_model(tiny_model("bert"), dt.BottleneckConfig(init_weights=False, scaling=scaling, **kw))
    return model.eval()


def _bert_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs("bert")).logits


def test_learned_and_channel_scaling_are_the_adapters_librarys(tmp_path):
    """The adapters library's BnConfig scaling 'learned' (a trainable scalar) and 'channel' (a trainable vector of the
    sub-layer's size), both starting at 1, were refused ("scaling must be a finite number"). Hand-worked: at the
    start they are scaling=1.0; a learned s of 2.5 is scaling=2.5; a channel vector c is W_up and b_up scaled by c."""
    plain = _bert_logits(_bottleneck(1.0))
    for kind, shape in (("learned", (1,)), ("channel", (32,))):
        model = _bottleneck(kind)
        layer = model.base_model.bert.encoder.layer[0].output.dense
        assert layer.adapter_scale["default"].shape == shape and layer.adapter_scale["default"].requires_grad
        torch.testing.assert_close(_bert_logits(model), plain, atol=0, rtol=0)
        model(**tiny_inputs("bert")).logits.sum().backward()
        assert layer.adapter_scale["default"].grad.abs().sum() > 0
    model, scaled = _bottleneck("learned"), _bottleneck(2.5)
    with torch.no_grad():
        for p in model.parameters():
            if p.shape == (1,):
                p.fill_(2.5)
    torch.testing.assert_close(_bert_logits(model), _bert_logits(scaled), atol=1e-6, rtol=0)
    model, folded = _bottleneck("channel"), _bottleneck(1.0)
    c = torch.linspace(-1.0, 3.0, 32)
    with torch.no_grad():
        for layer, twin in zip(model.base_model.modules(), folded.base_model.modules()):
            if hasattr(layer, "adapter_scale") and "default" in layer.adapter_scale:
                layer.adapter_scale["default"].copy_(c)
                twin.adapter_up["default"].weight.mul_(c[:, None])
                twin.adapter_up["default"].bias.mul_(c)
    torch.testing.assert_close(_bert_logits(model), _bert_logits(folded), atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path)
    torch.manual_seed(9)
    loaded = dt.DeltaModel.from_pretrained(tiny_model("bert"), tmp_path).eval()
    torch.testing.assert_close(_bert_logits(loaded), _bert_logits(model), atol=0, rtol=0)


def test_learned_scaling_with_ln_after_scales_before_the_layernorm():
    """The adapters library multiplies the up-projection by its scaling (fixed, learned or channel) and runs
    adapter_norm_after on the result: a learned s of 2.5 with ln_after is scaling=2.5 with ln_after, LN(2.5 z), not
    2.5 LN(z). With LN's ones-and-zeros start LN(2.5 z) is LN(z) but for eps: the learned s then barely moves the
    output, 2.5 LN(z) would move it by more than 1e-3."""
    model, scaled = _bottleneck("learned", ln_after=True), _bottleneck(2.5, ln_after=True)
    with torch.no_grad():
        for layer in model.base_model.modules():
            if hasattr(layer, "adapter_scale") and "default" in layer.adapter_scale:
                layer.adapter_scale["default"].fill_(2.5)
    torch.testing.assert_close(_bert_logits(model), _bert_logits(scaled), atol=1e-6, rtol=0)
    torch.testing.assert_close(_bert_logits(model), _bert_logits(_bottleneck(1.0, ln_after=True)), atol=1e-4, rtol=0)
    after = _bottleneck(1.0, ln_after=True)
    with torch.no_grad():
        for layer in after.base_model.modules():
            if hasattr(layer, "adapter_ln_after") and "default" in layer.adapter_ln_after:
                layer.adapter_ln_after["default"].weight.mul_(2.5)  # 2.5 LN(z), the wrong placement
    assert (_bert_logits(after) - _bert_logits(model)).abs().max() > 1e-3


@pytest.mark.parametrize("scaling", ["learnt", float("nan"), True])
def test_a_misspelled_scaling_is_one_line_naming_the_words(scaling):
    """'learnt' was told "scaling must be a finite number", not that 'learned' and 'channel' are the words taken."""
    with pytest.raises(
        dt.ConfigError, match=rf"^scaling must be a finite number, 'learned' or 'channel', got {scaling!r}$"
    ):
        dt.BottleneckConfig(scaling=scaling)
