"""DoRA on nn.Embedding and nn.Conv2d layers against peft 0.21.2's DoraEmbeddingLayer / DoraConv2dLayer, to the bit:
the same seed draws the same adapter (the conv's magnitude stored (1, c_out, 1, 1), the embedding's one per
dimension), files load both ways, and outputs, gradients, merge and unmerge are peft's, on fp32 and bf16 bases.
deltatune refused use_dora on these layers ("DoRA adapts full-precision nn.Linear and GPT-2 Conv1D layers")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.train.models import upcast_adapters

peft = pytest.importorskip("peft")

BF16 = torch.bfloat16
KINDS = ["embedding", "scaled-embedding", "conv2d", "conv1x1"]


class ScaledEmbedding(nn.Embedding):
    """A scaled BART's / Gemma's embedding: W[x] * embed_scale, which DoRA's update is scaled by too."""

    embed_scale = 32**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.embed_scale


class Net(nn.Module):
    def __init__(self, kind: str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = {
            "embedding": lambda: nn.Embedding(30, 20),
            "scaled-embedding": lambda: ScaledEmbedding(30, 20),
            "conv2d": lambda: nn.Conv2d(3, 6, 3, padding=1),
            "conv1x1": lambda: nn.Conv2d(3, 6, 1),  # peft's 1x1 delta is a matmul, its 3x3 one a conv
        }[kind]()
        with torch.no_grad():
            for p in self.layer.parameters():
                p.copy_(torch.randn_like(p))
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _inputs(kind: str, dtype: torch.dtype = torch.float32, rows: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind.endswith("embedding"):
        return torch.randint(0, 30, (rows, 9), generator=g)
    return torch.randn((rows, 3, 7, 7), generator=g).to(dtype)


def _config(cls, **extra):
    return cls(**{"target_modules": ["layer"], "r": 4, "lora_alpha": 8, "init_lora_weights": False, "use_dora": True,
                  **extra})  # fmt: skip


def _step(model, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    torch.manual_seed(5)  # the same dropout mask for both
    out = model(x)
    (out.float() ** 2).sum().backward()
    grads = {n.split("layer.")[1].replace(".weight", "").replace(".default", ""): p.grad
             for n, p in model.named_parameters() if p.grad is not None}  # fmt: skip
    return out, grads


def _weight(model) -> torch.Tensor:
    return next(p for n, p in model.named_parameters() if n.endswith("base_layer.weight"))


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_dora_draw_file_step_and_merge_equal_peft(kind, dtype, tmp_path):
    torch.manual_seed(3)
    theirs = peft.get_peft_model(Net(kind, dtype), _config(peft.LoraConfig), autocast_adapter_dtype=False)
    theirs.save_pretrained(tmp_path / "peft")
    torch.manual_seed(3)
    drawn = dt.get_delta_model(Net(kind, dtype), _config(dt.LoraConfig))
    want, got = peft.get_peft_model_state_dict(theirs), drawn.adapter_state_dict()
    assert want.keys() == got.keys() and len(want) == 3
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    magnitude = next(v for k, v in want.items() if "magnitude" in k)
    assert magnitude.shape == ((1, 6, 1, 1) if kind.startswith("conv") else (20,))

    ours = dt.DeltaModel.from_pretrained(Net(kind, dtype), tmp_path / "peft", is_trainable=True)
    x = _inputs(kind, dtype)
    (out, grads), (peft_out, peft_grads) = _step(ours, x), _step(theirs, x)
    assert (out.float() - Net(kind, dtype)(x).float()).abs().max() > 0.1  # the adapter does change the output
    assert torch.equal(out, peft_out) and out.dtype == dtype
    assert grads.keys() == peft_grads.keys() and len(grads) == 3
    assert all(torch.equal(grads[k], peft_grads[k]) for k in grads), [k for k in grads]

    ours.eval(), theirs.eval()
    with torch.no_grad():
        ours.merge_adapter(), theirs.merge_adapter()
        assert torch.equal(_weight(ours), _weight(theirs))
        assert torch.equal(ours(x), theirs(x))
        ours.unmerge_adapter(), theirs.unmerge_adapter()
        assert torch.equal(_weight(ours), _weight(theirs))

    drawn.save_pretrained(tmp_path / "ours")  # our file in peft
    loaded = peft.PeftModel.from_pretrained(Net(kind, dtype), tmp_path / "ours", autocast_adapter_dtype=False)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), drawn.eval()(x))


@pytest.mark.parametrize("kind", ["conv2d", "conv1x1"])
def test_conv_dora_with_dropout_trains_as_peft(kind):
    """With dropout in training peft computes the base conv again on the dropped-out input (no bias)."""
    torch.manual_seed(3)
    theirs = peft.get_peft_model(Net(kind), _config(peft.LoraConfig, lora_dropout=0.5))
    torch.manual_seed(3)
    ours = dt.get_delta_model(Net(kind), _config(dt.LoraConfig, lora_dropout=0.5))
    x = _inputs(kind)
    (out, grads), (peft_out, peft_grads) = _step(ours, x), _step(theirs, x)
    assert torch.equal(out, peft_out)
    assert grads.keys() == peft_grads.keys() and all(torch.equal(grads[k], peft_grads[k]) for k in grads)


def _pair(kind: str, tmp_path):
    """peft's default fp32 adapters "default" and "b" (rsLoRA, rank 2) on a bf16 base, and deltatune's from its files."""
    theirs = peft.get_peft_model(Net(kind, BF16), _config(peft.LoraConfig))
    torch.manual_seed(1)
    theirs.add_adapter("b", _config(peft.LoraConfig, r=2, lora_alpha=5, use_rslora=True))
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(Net(kind, BF16), tmp_path)
    ours.load_adapter(tmp_path / "b", "b")
    assert upcast_adapters(ours)  # the files' float32 values, as peft's autocast_adapter_dtype
    ours.load_adapter_weights(tmp_path, "default")
    ours.load_adapter_weights(tmp_path / "b", "b")
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_dora_adapters_on_a_bf16_base_active_together_and_merged_as_peft(kind, tmp_path):
    ours, theirs = _pair(kind, tmp_path)
    x = _inputs(kind, BF16)
    with torch.no_grad():
        for active in ("default", ["default", "b"], ["b", "default"]):
            ours.set_adapter(active)
            theirs.base_model.set_adapter(active)
            assert torch.equal(ours(x), theirs(x))
        ours.merge_adapter(), theirs.merge_adapter()  # ["b", "default"]: each norm of the unmerged base (peft's)
        assert torch.equal(_weight(ours), _weight(theirs))
        ours.unmerge_adapter(), theirs.unmerge_adapter()
        assert torch.equal(_weight(ours), _weight(theirs))


@pytest.mark.parametrize("kind", ["embedding", "scaled-embedding", "conv2d"])
def test_mixed_batch_rows_compute_as_their_dora_adapter_alone(kind, tmp_path):
    """peft refuses adapter_names with DoRA; deltatune gives each row its adapter's output alone (as on linear)."""
    ours, theirs = _pair(kind, tmp_path)
    x = _inputs(kind, BF16)
    names = ["b", "__base__", "default", "b"]
    with torch.no_grad():
        mixed = ours(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with theirs.disable_adapter():
                    alone = theirs(x[i : i + 1])
            else:
                theirs.base_model.set_adapter(name)
                alone = theirs(x[i : i + 1])
            assert torch.equal(mixed[i : i + 1], alone), (i, name)


# -- QDoRA: DoRA on 4-bit and 8-bit bases (peft's bnb Linear4bit / Linear8bitLt with use_dora) ---------------------
def _bnb_on_cpu() -> bool:
    from deltatune.methods import quant

    return quant._available("bitsandbytes") and quant._bnb_runs_on(torch.device("cpu"))


QDORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
             use_dora=True)  # fmt: skip


def _bnb_model(path, bits: int, dtype: torch.dtype, compute: torch.dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute, bnb_4bit_quant_type="nf4")
         if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu", dtype=dtype)


@pytest.mark.skipif(not _bnb_on_cpu(), reason="bitsandbytes does not run on this CPU")
@pytest.mark.parametrize(
    "bits, dtype, compute",
    [
        (4, torch.float32, torch.float32),
        (4, BF16, BF16),
        (4, torch.float32, BF16),
        (8, torch.float32, None),
        (8, BF16, None),
    ],  # fmt: skip
)
def test_qdora_on_a_bnb_base_trains_as_peft_and_files_load_both_ways(bits, dtype, compute, tmp_path):
    """W dequantised for the norm and the magnitude (peft's dequantize_module_weight); logits and every gradient
    peft's to the bit in training mode, peft's file loads in deltatune and deltatune's in peft."""
    from tiny import tiny_inputs, tiny_model

    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(_bnb_model(tmp_path / "base", bits, dtype, compute), peft.LoraConfig(**QDORA))
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.DeltaModel.from_pretrained(_bnb_model(tmp_path / "base", bits, dtype, compute), tmp_path / "peft",
                                         is_trainable=True)  # fmt: skip
    inputs = tiny_inputs("llama")
    ours.train(), theirs.train()  # (bitsandbytes repacks a 4-bit W for its CPU kernel on an eval forward)
    a, b = ours(**inputs, labels=inputs["input_ids"]), theirs(**inputs, labels=inputs["input_ids"])
    assert a.logits.dtype == dtype and torch.equal(a.logits, b.logits)
    a.loss.backward(), b.loss.backward()
    grads = {n.split("base_model.")[-1].replace(".default", "").replace(".weight", ""): p.grad
             for n, p in ours.named_parameters() if p.requires_grad}  # fmt: skip
    peft_grads = {n.replace("base_model.model.", "").replace(".default", "").replace(".weight", ""): p.grad
                  for n, p in theirs.named_parameters() if p.requires_grad}  # fmt: skip
    assert grads.keys() == peft_grads.keys() and len(grads) == 18
    assert all(torch.equal(grads[k], peft_grads[k]) for k in grads)

    ours.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(_bnb_model(tmp_path / "base", bits, dtype, compute), tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(loaded.train()(**inputs).logits, ours(**inputs).logits)


@pytest.mark.skipif(not _bnb_on_cpu(), reason="bitsandbytes does not run on this CPU")
def test_qdora_norm_reads_a_4bit_weight_bitsandbytes_repacked_for_its_cpu_kernel(tmp_path):
    """On CPU bitsandbytes repacks a 4-bit W on the first eval forward; the W DoRA's norm uses is
    read back unpacked (peft 0.21.2 dequantises the repacked bytes as they lie: W 0.13 off, eval logits 0.03)."""
    from tiny import tiny_model

    from deltatune.methods._dora_layers import base_weight

    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    ours = dt.get_delta_model(_bnb_model(tmp_path / "base", 4, torch.float32, torch.float32), dt.LoraConfig(**QDORA))
    layer = ours.base_model.model.layers[0].self_attn.q_proj.base_layer
    before = base_weight(layer).clone()
    with torch.no_grad():
        layer.eval()(torch.randn(2, 64))  # an eval forward on an input that needs no grad
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)  # repacked
    after = base_weight(layer)  # bitsandbytes' repacking keeps the block constants in bf16: W to 3e-4 (of 0.05)
    assert 0 < (after - before).abs().max() < 1e-3


@pytest.mark.parametrize("backend", ["torchao", "bitsandbytes"])
@pytest.mark.parametrize("compute", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_qdora_on_deltatune_s_4bit_layers_merges_to_its_unmerged_output(backend, compute):
    """deltatune's own 4-bit layers (dt.quantize): DoRA's norm of the dequantised W; the merge (into the dequantised
    layer, as LoRA's) computes as the adapter model, within the compute dtype's rounding."""
    from tiny import tiny_inputs, tiny_model

    if backend == "bitsandbytes" and not _bnb_on_cpu():
        pytest.skip("bitsandbytes does not run on this CPU")
    pytest.importorskip("torchao") if backend == "torchao" else None
    torch.manual_seed(0)
    model, _ = dt.quantize(tiny_model("llama", hidden_size=64, intermediate_size=128), backend=backend,
                           compute_dtype=compute)  # fmt: skip
    ours = dt.get_delta_model(model, dt.LoraConfig(**QDORA)).eval()
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        plain = tiny_model("llama", hidden_size=64, intermediate_size=128)(**inputs).logits
        y = ours(**inputs).logits
        assert (y.float() - plain.float()).abs().max() > 0.05  # the adapter changes the output
        ours.merge_adapter()
        tol = 1e-6 if compute == torch.float32 else 1e-2
        torch.testing.assert_close(ours(**inputs).logits.float(), y.float(), atol=tol, rtol=0)


@pytest.mark.skipif(not _bnb_on_cpu(), reason="bitsandbytes does not run on this CPU")
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [BF16, torch.float32], ids=["bf16-base", "fp32-base"])
def test_an_adapter_drawn_on_a_bnb_4bit_base_with_bf16_compute_is_peft_s(dtype, dora, tmp_path):
    """peft moves a new adapter to a bnb 4-bit layer's compute dtype (rounding the fp32 draw to bf16, m computed from
    it) before autocast_adapter_dtype takes it back to fp32; deltatune kept the unrounded draw (A 2.4e-4 off)."""
    from tiny import tiny_model

    torch.manual_seed(0)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    config = {**QDORA, "use_dora": dora}
    model = _bnb_model(tmp_path / "base", 4, dtype, BF16)
    torch.manual_seed(3)
    want = peft.get_peft_model_state_dict(peft.get_peft_model(model, peft.LoraConfig(**config)))
    model = _bnb_model(tmp_path / "base", 4, dtype, BF16)
    torch.manual_seed(3)
    got = dt.get_delta_model(model, dt.LoraConfig(**config)).adapter_state_dict()
    assert want.keys() == got.keys() and len(want) == 12 + 6 * dora, len(want)
    assert all(got[k].dtype == want[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)


class GroupedNet(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        with torch.no_grad():
            for p in self.layer.parameters():
                p.copy_(torch.randn_like(p))
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a_grouped_conv_is_adapted_as_peft_and_not_merged(dora, dtype, tmp_path):
    """peft adapts a grouped Conv2d (B a grouped 1x1 conv; DoRA's norm from its B A reshaped, as peft's) and refuses
    to merge it; deltatune refused the layer ("grouped Conv2d (groups=2); not supported")."""
    kw = dict(target_modules=["layer"], r=4, lora_alpha=8, init_lora_weights=False, use_dora=dora, lora_dropout=0.5)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(GroupedNet(dtype), peft.LoraConfig(**kw), autocast_adapter_dtype=False)
    torch.manual_seed(3)
    ours = dt.get_delta_model(GroupedNet(dtype), dt.LoraConfig(**kw))
    want, got = peft.get_peft_model_state_dict(theirs), ours.adapter_state_dict()
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
    (out, grads), (peft_out, peft_grads) = _step(ours, x), _step(theirs, x)
    assert torch.equal(out, peft_out)
    assert grads.keys() == peft_grads.keys() and all(torch.equal(grads[k], peft_grads[k]) for k in grads)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        before = ours(x)
        with pytest.raises(TypeError, match="^adapter 'default' is on a grouped Conv2d, which peft cannot merge"):
            ours.merge_adapter()
        assert torch.equal(ours(x), before) and torch.equal(before, theirs(x))


def test_a_grouped_conv_needs_a_rank_that_groups_divide():
    net = GroupedNet()
    with pytest.raises(dt.ConfigError, match=r"^lora: layer is a Conv2d with groups=2; r=3 must be a multiple of it"):
        dt.get_delta_model(net, dt.LoraConfig(target_modules=["layer"], r=3))
    assert type(net.layer) is nn.Conv2d


def test_conv_dora_with_dropout_pads_the_recomputed_base_as_the_base_conv():
    """Training with dropout, DoRA's W x is computed again on the dropped-out input: padded as the base pads (here
    reflect; as A pads, so the update stays the merged weight's). peft's F.conv2d pads with zeros there."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"))
    model = dt.get_delta_model(net, dt.LoraConfig(target_modules=["0"], r=4, init_lora_weights=False, use_dora=True,
                                                  lora_dropout=0.5)).train()  # fmt: skip
    layer = model.base_model[0]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(1.5)  # m / ||W + s B A|| = 1 at the start: W x would not count
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)
    dropped = layer.lora_dropout["default"](x)
    with torch.no_grad():
        base, s = layer.base_layer, layer.scaling["default"]
        delta = layer.delta_weight("default")
        norm = (base.weight + delta).flatten(1).norm(dim=1).view(1, -1, 1, 1)
        scale = layer.lora_magnitude_vector["default"] / norm
        w_dropped = base._conv_forward(dropped, base.weight, None)  # reflect-padded
        lora = layer.lora_B["default"](layer.lora_A["default"](dropped)) * s
        want = base(x) + (scale - 1) * w_dropped + scale * lora
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", [*KINDS, "grouped"])
def test_dora_on_embeddings_and_convs_under_bf16_autocast_trains_as_peft(kind):
    def net() -> nn.Module:
        return GroupedNet() if kind == "grouped" else Net(kind)

    torch.manual_seed(3)
    theirs = peft.get_peft_model(net(), _config(peft.LoraConfig, lora_dropout=0.3))
    torch.manual_seed(3)
    ours = dt.get_delta_model(net(), _config(dt.LoraConfig, lora_dropout=0.3))
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1)) if kind == "grouped" else _inputs(kind)
    with torch.autocast("cpu", dtype=BF16):
        (out, grads), (peft_out, peft_grads) = _step(ours, x), _step(theirs, x)
    assert torch.equal(out, peft_out)
    assert grads.keys() == peft_grads.keys() and all(torch.equal(grads[k], peft_grads[k]) for k in grads)
