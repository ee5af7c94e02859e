"""LoRA-specific math and edge cases: Embedding, Conv2d, GPT-2 Conv1D, target selection, several active
adapters, torch.compile, gradient checkpointing, and the transformers Trainer."""

from __future__ import annotations

import os

import pytest
import torch
from tiny import output_of, tiny_inputs, tiny_model
from tolerances import ATOL, WEIGHT_ATOL
from torch import nn

import deltatune as dt
from deltatune.methods.lora import LoraConv2d, LoraEmbedding, LoraLinear

ATOL32 = ATOL[torch.float32]


def lora_names(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraEmbedding, LoraConv2d)))


class ConvNet(nn.Module):
    """A tiny image model: a Conv2d (odd channel counts, geometry as given) and a linear read-out."""

    def __init__(self, **conv) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, **{"kernel_size": 3, "stride": 2, "padding": 1, **conv})
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


# -- Embedding --------------------------------------------------------------------------------------------------------
def test_embedding_matches_peft_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    inputs = tiny_inputs("llama")
    fields = dict(r=4, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights=False)
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**fields))
    assert lora_names(ours) == ["base_model.model.embed_tokens"]
    expected = output_of(ours, inputs)
    assert (expected - output_of(tiny_model("llama"), inputs)).abs().max() > ATOL32
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours")
    torch.testing.assert_close(output_of(theirs, inputs), expected, atol=ATOL32, rtol=0)

    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**fields))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path / "theirs")
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=ATOL32, rtol=0)


def test_embedding_default_init_is_base_and_merges():
    inputs = tiny_inputs("llama")
    base = output_of(tiny_model("llama"), inputs)
    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, target_modules=["embed_tokens"]))
    assert torch.equal(output_of(model, inputs), base)
    layer = model.get_submodule("base_model.model.embed_tokens")
    with torch.no_grad():
        layer.lora_embedding_A["default"].normal_()  # A starts at zero for embeddings: make the update non-zero
    unmerged = output_of(model, inputs)
    assert (unmerged - base).abs().max() > ATOL32
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=ATOL32, rtol=0)


# -- Conv2d -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "geometry",
    [{}, {"kernel_size": 1, "stride": 1, "padding": 0}, {"padding": 2, "dilation": 2}, {"padding_mode": "reflect"}],
    ids=["3x3-stride2", "1x1", "dilated", "reflect-padding"],
)
def test_conv2d_forward_merge_unmerge(geometry):
    torch.manual_seed(0)
    net = ConvNet(**geometry).eval()
    x = torch.randn(2, 3, 8, 8)
    base = net(x).detach()
    w0 = net.conv.weight.detach().clone()
    model = dt.get_delta_model(net, dt.LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False)).eval()
    layer = model.get_submodule("base_model.conv")
    assert isinstance(layer, LoraConv2d)
    with torch.no_grad():
        unmerged = model(x)
        # the update is B(A(x)) with A the base kernel geometry and B 1x1, scaled by alpha / r
        direct = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * (8 / 2)
        torch.testing.assert_close(layer(x), direct, atol=ATOL32, rtol=0)
    assert (unmerged - base).abs().max() > ATOL32
    model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(x), unmerged, atol=ATOL32, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=WEIGHT_ATOL, rtol=0)


def test_conv2d_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(1)
    net = ConvNet().eval()
    theirs = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    torch.manual_seed(1)
    ours = dt.DeltaModel.from_pretrained(ConvNet().eval(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=ATOL32, rtol=0)


def test_a_pissa_adapter_loads_as_it_is_and_once_peft_converted_it(tmp_path):
    """peft's PiSSA init moves the adapter's principal part out of the base weights; loading its file as it is re-runs
    that init on the original base (as peft's load does), so both files, as they are and converted by peft (a plain
    LoRA of twice the rank), give peft's trained outputs on the original base."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    ).eval()
    theirs.save_pretrained(tmp_path / "initial")
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))  # "trained"
    theirs.save_pretrained(tmp_path / "as_is")
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    inputs = tiny_inputs("llama")
    for folder, rank in (("as_is", 4), ("converted", 8)):
        ours = dt.DeltaModel.from_pretrained(tiny_model("llama").eval(), tmp_path / folder)
        assert ours.peft_config["default"].r == rank
        with torch.no_grad():
            torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=ATOL32, rtol=0)


# -- GPT-2 Conv1D -----------------------------------------------------------------------------------------------------
def test_gpt2_conv1d_fan_in_fan_out():
    """Conv1D stores W as (d_in, d_out) and computes x W + b; the update is x A^T B^T s, merged as W + s (B A)^T."""
    model = dt.get_delta_model(tiny_model("gpt2"), dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    layer = model.get_submodule("base_model.transformer.h.0.attn.c_attn")
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out
    W, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    A, B = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    assert W.shape == (32, 96) and A.shape == (4, 32) and B.shape == (96, 4)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        expected = x @ W + b + (x @ A.T @ B.T) * 2.0
        torch.testing.assert_close(layer(x), expected, atol=ATOL32, rtol=0)
        layer.merge("default")
        torch.testing.assert_close(layer.base_layer.weight, W + 2.0 * (B @ A).T, atol=WEIGHT_ATOL, rtol=0)
        torch.testing.assert_close(layer(x), expected, atol=ATOL32, rtol=0)


# -- which modules ----------------------------------------------------------------------------------------------------
def test_target_modules_regex():
    config = dt.LoraConfig(r=2, target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj")
    model = dt.get_delta_model(tiny_model("llama"), config)
    assert lora_names(model) == [f"base_model.model.layers.1.self_attn.{p}_proj" for p in ("k", "q")]


def test_layers_to_transform_and_pattern():
    config = dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")
    model = dt.get_delta_model(tiny_model("llama"), config)
    assert lora_names(model) == [f"base_model.model.layers.1.self_attn.{p}_proj" for p in ("q", "v")]
    model = dt.get_delta_model(tiny_model("gpt2"), dt.LoraConfig(r=2, layers_to_transform=0))
    assert lora_names(model) == ["base_model.transformer.h.0.attn.c_attn"]


@pytest.mark.parametrize("family", ["t5", "bart", "bert", "gpt2", "llama"])
def test_layers_to_transform_picks_the_blocks_peft_picks(family):
    """The block index is the outermost numbered list: T5's block.1.layer.0.SelfAttention.q is in block 1."""
    peft = pytest.importorskip("peft")
    ours = dt.get_delta_model(tiny_model(family), dt.LoraConfig(r=2, layers_to_transform=[1]))
    theirs = peft.get_peft_model(tiny_model(family), peft.LoraConfig(r=2, layers_to_transform=[1]))
    names = [n.removeprefix("base_model.") for n in lora_names(ours)]
    expected = sorted(
        n.removeprefix("base_model.model.")
        for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )
    assert names and names == expected
    assert all(".1." in n for n in names)


def test_exclude_modules():
    config = dt.LoraConfig(r=2, target_modules="all-linear", exclude_modules=["q_proj", "mlp.down_proj"])
    names = lora_names(dt.get_delta_model(tiny_model("llama"), config))
    assert names and not any(n.endswith(("q_proj", "down_proj")) for n in names)
    assert any(n.endswith("k_proj") for n in names) and any(n.endswith("up_proj") for n in names)


# -- several adapters -------------------------------------------------------------------------------------------------
def test_multiple_active_adapters_add_up():
    torch.manual_seed(0)
    net = OneLinear()
    x = torch.randn(3, 7)
    base = net(x).detach()
    model = dt.get_delta_model(net, dt.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), "a")
    model.add_adapter("b", dt.LoraConfig(r=3, lora_alpha=4, target_modules=["proj"], init_lora_weights=False))
    with torch.no_grad():
        delta_a = model(x) - base
        model.set_adapter("b")
        delta_b = model(x) - base
        model.set_adapter(["a", "b"])
        both = model(x)
    assert delta_a.abs().max() > ATOL32 and delta_b.abs().max() > ATOL32
    torch.testing.assert_close(both, base + delta_a + delta_b, atol=ATOL32, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.proj.lora_{m}.{a}.weight" for m in "AB" for a in "ab"}
    model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(x), both, atol=ATOL32, rtol=0)


@pytest.mark.parametrize("first", [dt.LoraConfig(r=2, bias="all", target_modules=["q_proj"]), dt.BitFitConfig()])
def test_base_biases_an_adapter_trains_survive_other_adapters_wrapping_their_modules(first, tmp_path):
    """An adapter that trains base biases named them as they were when it was added: another adapter wrapping k_proj
    (k_proj.bias -> k_proj.base_layer.bias) froze that bias silently and made save_pretrained a KeyError, and so
    did deleting an adapter that had wrapped it."""
    model = dt.get_delta_model(tiny_model("opt"), first)
    trains = {n.replace(".base_layer.", ".") for n, p in model.named_parameters() if p.requires_grad}
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    after = {n.replace(".base_layer.", ".") for n, p in model.named_parameters() if p.requires_grad}
    assert after == trains and any("k_proj.bias" in n for n in after)
    with torch.no_grad():  # the biases as trained
        for n, p in model.named_parameters():
            if n.endswith("k_proj.base_layer.bias"):
                p.add_(1.0)
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    model.set_adapter("default")
    want = output_of(model.eval(), tiny_inputs("opt"))
    # The file names the bias as its module was wrapped then; a model without adapter "b" loads it all the same.
    loaded = dt.DeltaModel.from_pretrained(tiny_model("opt"), tmp_path).eval()
    torch.testing.assert_close(output_of(loaded, tiny_inputs("opt")), want, atol=ATOL32, rtol=0)
    model.delete_adapter("b")  # unwraps k_proj again
    model.set_adapter("default")
    assert {n.replace(".base_layer.", ".") for n, p in model.named_parameters() if p.requires_grad} == trains
    model.save_pretrained(tmp_path / "again")


@pytest.mark.parametrize("dora", [False, True])
def test_loading_weights_into_a_merged_adapter_keeps_the_base(dora, tmp_path):
    """load_adapter_weights into a merged adapter left the old update in the weights, and unmerge then took the new
    one out: the base weights stayed wrong (0.53 off)."""
    inputs = tiny_inputs("llama")
    other = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, init_lora_weights=False, use_dora=dora))
    with torch.no_grad():
        for n, p in other.named_parameters():
            if "lora_" in n:
                p.mul_(3)
    other.save_pretrained(tmp_path)
    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, init_lora_weights=False, use_dora=dora))
    model.eval().merge_adapter()
    model.load_adapter_weights(tmp_path, "default")
    torch.testing.assert_close(output_of(model, inputs), output_of(other.eval(), inputs), atol=ATOL32, rtol=0)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(
            output_of(model, inputs), output_of(tiny_model("llama"), inputs), atol=ATOL32, rtol=0
        )


# -- torch.compile ----------------------------------------------------------------------------------------------------
def test_compile_lora_linear_fullgraph():
    # aot_eager traces through dynamo and AOTAutograd like inductor does (fullgraph raises on a graph break) without
    # its C++ compile step, which takes ~45 s on this machine.
    backend = "aot_eager"
    torch.manual_seed(0)
    model = dt.get_delta_model(OneLinear(), dt.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    layer = model.get_submodule("base_model.proj")
    x = torch.randn(4, 7)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend=backend)(x)  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled, eager, atol=ATOL32, rtol=0)


# -- training ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains(entry, reentrant):
    """peft's name and transformers' current one both turn it on, without the FutureWarning transformers 5.25 gives
    for its old name."""
    import warnings

    from deltatune.layer import checkpointing

    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        getattr(model, entry)({"use_reentrant": reentrant})
    assert not [w for w in caught if "checkpointing" in str(w.message)]
    assert checkpointing(model.base_model)
    model.train()
    inputs = tiny_inputs("llama")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_hf_trainer_two_steps(tmp_path, checkpointed):
    """Also with the Trainer turning checkpointing on (it calls the model's enable with its own options)."""
    from transformers import Trainer, TrainingArguments

    from deltatune.layer import checkpointing
    from deltatune.train.run import _checkpointing

    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 128, (8, 6), generator=g)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
        **_checkpointing(checkpointed, TrainingArguments),
    )  # fmt: skip
    result = Trainer(model=model, args=args, train_dataset=rows).train()
    assert result.global_step == 2 and checkpointing(model.base_model) == checkpointed
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_deltatune_trainer_refuses_a_model_with_nothing_to_train(tmp_path):
    """An adapter loaded for inference (is_trainable=False, peft's default) has no trainable parameter: one line
    before the first step instead of torch's "element 0 of tensors does not require grad" from the backward pass."""
    from transformers import TrainingArguments

    dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4)).save_pretrained(tmp_path / "adapter")
    frozen = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True)
    rows = [{"input_ids": [3, 4, 5], "labels": [3, 4, 5]}] * 2
    with pytest.raises(ValueError, match=r"nothing to train: its adapters \(default\) .*is_trainable=True"):
        dt.Trainer(model=frozen, args=args, train_dataset=rows).train()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    trainable = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter", is_trainable=True)
    assert dt.Trainer(model=trainable, args=args, train_dataset=rows).train().global_step == 1


@pytest.mark.parametrize("family, embedding", [("gpt2", "wte"), ("t5", "shared")])
def test_merge_refused_on_tied_embedding(family, embedding):
    """Merging into an input embedding tied to the output head would change the head too (merged != unmerged)."""
    base = tiny_model(family, tie_word_embeddings=True)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    model = dt.get_delta_model(base, dt.LoraConfig(r=4, target_modules=[embedding], init_lora_weights=False))
    inputs = tiny_inputs(family)
    before = output_of(model, inputs)
    weight = base.get_input_embeddings().weight.detach().clone()
    with pytest.raises(ValueError, match=rf"{embedding}.*lm_head.*tied"):
        model.merge_adapter()
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, LoraEmbedding))
    assert torch.equal(base.get_input_embeddings().weight, weight)
    assert torch.equal(output_of(model, inputs), before)


def test_trainer_checkpoint_with_tied_weights(tmp_path):
    """transformers' Trainer saves a model that is not a PreTrainedModel as one state dict, which safetensors
    refuses for tied weights (gpt2's wte/lm_head). deltatune's Trainer subclass saves the adapter instead."""
    from transformers import TrainingArguments

    from deltatune.train.trainer import DeltaTrainer

    model = dt.get_delta_model(tiny_model("gpt2"), dt.LoraConfig(r=4))
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 128, (4, 6))]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, remove_unused_columns=False,
        report_to=[], use_cpu=True, save_strategy="steps", save_steps=1,
    )  # fmt: skip
    DeltaTrainer(model=model, args=args, train_dataset=rows).train()
    saved = sorted(os.listdir(tmp_path / "checkpoint-1"))
    assert "adapter_model.safetensors" in saved and "optimizer.pt" in saved
    reloaded = dt.DeltaModel.from_pretrained(tiny_model("gpt2"), tmp_path / "checkpoint-1")
    inputs = tiny_inputs("gpt2")
    torch.testing.assert_close(output_of(reloaded, inputs), output_of(model.eval(), inputs), atol=1e-5, rtol=0)
