"""LoRA's arithmetic against peft's to the bit, on the same weights: float32 adapters on a bf16 base (what a run and
peft's autocast_adapter_dtype give), bf16 adapters on it, several adapters active at once and mixed-adapter batches.

peft adds each active adapter's float32 update to the running result and rounds once at the end; deltatune rounded
after each adapter's add (1,210 of 1,792 tiny-llama logits a bf16 ulp off peft's). A bf16 adapter computes
peft's B(A x) * s, then adds; deltatune scaled A x first and fused B with the add. An embedding's float
embed_scale (a scaled BART's) multiplies peft's update rounded to the base's dtype; deltatune's was exact.
"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_inputs, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
import deltatune.methods.lora as lora_module
from deltatune.train.models import upcast_adapters

peft = pytest.importorskip("peft")

BF16 = torch.bfloat16
KINDS = ["linear", "conv1d", "embedding", "scaled-embedding", "conv2d"]


class ScaledEmbedding(nn.Embedding):
    """A scaled BART's embedding: a Python float scale, which peft rounds to the weight's dtype (5.657 -> 5.656)."""

    embed_scale = 32**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.embed_scale


class Net(nn.Module):
    """One layer to adapt, its base weights and bias drawn at random (transformers zeroes biases)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = {
            "linear": lambda: nn.Linear(24, 20),
            "conv1d": lambda: Conv1D(20, 24),  # GPT-2's: weight (d_in, d_out), fan_in_fan_out
            "embedding": lambda: nn.Embedding(30, 20),
            "scaled-embedding": lambda: ScaledEmbedding(30, 20),
            "conv2d": lambda: nn.Conv2d(3, 6, 3, padding=1),
        }[kind]()
        with torch.no_grad():
            for p in self.layer.parameters():
                p.copy_(torch.randn_like(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _inputs(kind: str, rows: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind.endswith("embedding"):
        return torch.randint(0, 30, (rows, 9), generator=g)
    shape = (rows, 3, 7, 7) if kind == "conv2d" else (rows, 9, 24)
    return torch.randn(shape, generator=g).to(BF16)


def _pair(kind: str, tmp_path, upcast: bool = True, dora: bool = False, ranks=(4, 2), base_dtype=BF16):
    """peft's model and deltatune's on the same bf16 base, each with adapters "default" and "b" (peft's weights)."""
    kw = dict(target_modules=["layer"], init_lora_weights=False, use_dora=dora, fan_in_fan_out=kind == "conv1d")
    theirs = peft.get_peft_model(
        Net(kind).to(base_dtype), peft.LoraConfig(r=ranks[0], lora_alpha=8, **kw), autocast_adapter_dtype=upcast
    )
    torch.manual_seed(1)
    theirs.add_adapter(
        "b", peft.LoraConfig(r=ranks[1], lora_alpha=5, use_rslora=True, **kw), autocast_adapter_dtype=upcast
    )
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(Net(kind).to(base_dtype), tmp_path)
    ours.load_adapter(tmp_path / "b", "b")
    if upcast and upcast_adapters(ours):  # the files' float32 values, not their bf16 roundings
        ours.load_adapter_weights(tmp_path, "default")
        ours.load_adapter_weights(tmp_path / "b", "b")
    dtype = next(p.dtype for n, p in theirs.named_parameters() if "lora_" in n)
    assert dtype == (torch.float32 if upcast else BF16)
    assert all(p.dtype == dtype for n, p in ours.named_parameters() if "lora_" in n)
    return ours.eval(), theirs.eval()


def _equal(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype == BF16
    assert torch.equal(ours, theirs), f"{(ours != theirs).sum().item()} of {ours.numel()} differ"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("upcast", [True, False], ids=["fp32-adapters", "bf16-adapters"])
def test_adapters_active_together_and_alone_compute_as_peft(kind, upcast, tmp_path):
    ours, theirs = _pair(kind, tmp_path, upcast)
    x = _inputs(kind)
    with torch.no_grad():
        base = ours(x)
        for active in ("default", ["default", "b"]):
            ours.set_adapter(active)
            theirs.base_model.set_adapter(active)
            _equal(ours(x), theirs(x))
        assert (ours(x) - base).abs().max() > 0.5  # the adapters do change the output


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_adapters_active_together_compute_as_peft(kind, tmp_path):
    """DoRA subtracts the bias from the bf16 base output in bf16 (peft's), then scales in float32."""
    ours, theirs = _pair(kind, tmp_path, dora=True)
    x = _inputs(kind)
    with torch.no_grad():
        for active in ("default", ["default", "b"], ["b", "default"]):
            ours.set_adapter(active)
            theirs.base_model.set_adapter(active)
            _equal(ours(x), theirs(x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("upcast", [True, False], ids=["fp32-adapters", "bf16-adapters"])
@pytest.mark.parametrize("ranks", [(4, 2), (3, 3)], ids=["row-loop", "same-rank"])
def test_mixed_batch_rows_compute_as_peft_s_adapter_alone(kind, upcast, ranks, tmp_path, monkeypatch):
    """Rows of "default", "b" and "__base__" in one batch (adapters of one rank: the gathered path on linear layers)
    give peft's output of each row with its adapter alone, and bf16 adapters peft's mixed batch too. peft's
    _mixed_batch_forward rounds an fp32 update to bf16 before adding it, where its forward rounds the sum: deltatune
    keeps each row its adapter's alone (tests/test_merge_probe6.py)."""
    ours, theirs = _pair(kind, tmp_path, upcast, ranks=ranks)
    x = _inputs(kind)
    names = ["b", "__base__", "default", "b"]
    calls = []
    gathered = lora_module.gathered
    monkeypatch.setattr(lora_module, "gathered", lambda *a: calls.append(out := gathered(*a)) or out)
    with torch.no_grad():
        mixed = ours(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with theirs.disable_adapter():
                    alone = theirs(x[i : i + 1])
            else:
                theirs.base_model.set_adapter(name)
                alone = theirs(x[i : i + 1])
            _equal(mixed[i : i + 1], alone)
        if not upcast:
            _equal(mixed, theirs(x, adapter_names=names))
    assert any(c is not None for c in calls) == (kind in ("linear", "conv1d") and ranks[0] == ranks[1])


def test_gradients_of_two_active_adapters_equal_peft_s(tmp_path):
    """Training both at once: the logits and every adapter gradient are peft's to the bit."""
    ours, theirs = _pair("linear", tmp_path)
    x = _inputs("linear")
    grads = []
    for model, setter in ((ours, ours.set_adapter), (theirs, theirs.base_model.set_adapter)):
        setter(["default", "b"])
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        model.train()
        out = model(x)
        (out.float() ** 2).mean().backward()
        grads.append((out, sorted((n.replace(".weight", "").replace(".default", "."), p.grad) for n, p in
                                  model.named_parameters() if p.grad is not None)))  # fmt: skip
    _equal(grads[0][0], grads[1][0])
    assert len(grads[0][1]) == len(grads[1][1]) == 4
    for (_, g1), (_, g2) in zip(grads[0][1], grads[1][1]):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize(
    "family, targets, dora",
    [
        ("llama", ["q_proj", "v_proj", "embed_tokens"], False),
        ("llama", ["q_proj", "v_proj"], True),
        ("gpt2", ["c_attn"], True),
    ],
)
def test_adapters_drawn_on_a_bf16_base_are_peft_s_for_the_same_seed(init, family, targets, dora):
    """peft draws A and B in float32 and rounds them to the base's dtype; deltatune drew in bf16, where a draw just
    under the bound came out as -bound (0.5 -> -0.5 in 3 of 12 tensors), and took DoRA's norm of W + s B A in float32
    where peft sums it in bf16 (magnitudes a bf16 ulp off)."""
    kw = dict(r=4, lora_alpha=8, init_lora_weights=init, target_modules=targets, use_dora=dora)
    weights = []
    for lib, prefix in ((peft, "base_model.model."), (dt, "base_model.")):
        torch.manual_seed(7)
        model = (peft.get_peft_model if lib is peft else dt.get_delta_model)(
            tiny_model(family).to(BF16), lib.LoraConfig(**kw)
        )
        if lib is dt:
            upcast_adapters(model)  # a run's fp32 adapters, as peft's autocast_adapter_dtype
        names = ((n.replace(prefix, "", 1).removesuffix(".weight"), p) for n, p in model.named_parameters())
        weights.append({n: p for n, p in names if "lora_" in n})
    theirs, ours = weights
    assert ours.keys() == theirs.keys() and len(ours) == {"llama": 10 + 2 * dora, "gpt2": 6}[family]
    for name, peft_s in theirs.items():
        assert ours[name].dtype == peft_s.dtype == torch.float32
        assert torch.equal(ours[name], peft_s), name


def test_lora_on_a_bitsandbytes_4bit_base_computes_as_peft_s_qlora_layer(tmp_path):
    """peft's bitsandbytes layer rounds each adapter's fp32 update to the bf16 compute dtype before adding it (outside
    autocast); deltatune added first and rounded once (1,355 of 1,792 logits a bf16 ulp off). A mixed batch's rows
    are each adapter's alone, on the gathered path too."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from deltatune.methods.quant import BACKENDS

    if "bitsandbytes" not in BACKENDS:
        pytest.skip("bitsandbytes does not run on this CPU")
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=BF16)

    def base() -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=quant, device_map="cpu", dtype=BF16
        )

    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(base(), peft.LoraConfig(**kw))
    theirs.add_adapter("b", peft.LoraConfig(**{**kw, "lora_alpha": 5}))
    theirs.save_pretrained(tmp_path / "adapters")
    ours = dt.DeltaModel.from_pretrained(base(), tmp_path / "adapters")
    ours.load_adapter(tmp_path / "adapters" / "b", "b")
    assert type(ours.base_model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "lora_" in n)
    inputs = tiny_inputs("llama", batch=3)
    with torch.no_grad():
        for active in ("default", ["default", "b"]):
            ours.set_adapter(active)
            theirs.base_model.set_adapter(active)
            _equal(ours(**inputs).logits, theirs(**inputs).logits)
        names = ["b", "__base__", "default"]
        mixed = ours(**inputs, adapter_names=names).logits
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            if name == "__base__":
                with theirs.disable_adapter():
                    _equal(mixed[i : i + 1], theirs(**row).logits)
            else:
                theirs.base_model.set_adapter(name)
                _equal(mixed[i : i + 1], theirs(**row).logits)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "conv2d"])
def test_merge_then_unmerge_leaves_peft_s_weights(kind, tmp_path):
    """peft's unmerge rounds each fp32 delta to bf16 before subtracting it; deltatune subtracted it unrounded (97 of
    480 weights a bf16 ulp off peft's after the round trip)."""
    ours, theirs = _pair(kind, tmp_path)
    ours.set_adapter(["default", "b"])
    theirs.base_model.set_adapter(["default", "b"])
    x = _inputs(kind)
    with torch.no_grad():
        ours.merge_adapter()
        theirs.merge_adapter()
        _equal(ours(x), theirs(x))
        ours.unmerge_adapter()
        theirs.unmerge_adapter()
        _equal(ours.base_model.layer.base_layer.weight, theirs.base_model.model.layer.base_layer.weight)
        _equal(ours(x), theirs(x))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_under_bf16_autocast_computes_as_peft(kind, tmp_path):
    """On a float32 base under bf16 autocast peft casts B A (a bf16 product) to float32 before scaling it for DoRA's
    norm; deltatune scaled it in bf16 (norms 7e-4 off where s = 5 / sqrt(2)). Logits and gradients now peft's."""
    ours, theirs = _pair(kind, tmp_path, dora=True, base_dtype=torch.float32)
    x = _inputs(kind).float()
    results = []
    for model, setter in ((ours, ours.set_adapter), (theirs, theirs.base_model.set_adapter)):
        setter(["default", "b"])
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        model.train()
        with torch.autocast("cpu", dtype=BF16):
            out = model(x)
        (out.float() ** 2).mean().backward()
        grads = [p.grad for n, p in sorted(model.named_parameters()) if p.grad is not None]
        results.append((out, grads))
    (out, grads), (peft_out, peft_grads) = results
    _equal(out, peft_out)
    assert len(grads) == len(peft_grads) == 6
    for mine, peft_s in zip(grads, peft_grads):
        assert torch.equal(mine, peft_s)
