"""Mixed-adapter batches: ``model(**inputs, adapter_names=[...])`` gives each row its own adapter.

Every row of a mixed batch must equal that row run alone with its adapter active ("__base__": the base model under
``disable_adapter``), in forward, in generate (greedy and beam search) and in the gradients of training. Each case
first checks that the adapters do change their rows, so that the equalities can fail.
"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_inputs, tiny_model
from tolerances import ATOL
from torch import nn

import deltatune as dt
from deltatune.layer import DeltaLayer, ModulesToSave

ATOL32 = ATOL[torch.float32]
NAMES = ["a", "b", "__base__", "a"]
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "dropout_rate": 0.0}


def _lora(task_type: str | None = None, **fields) -> dt.LoraConfig:
    return dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type=task_type, **fields)


def _ia3(**fields) -> dt.IA3Config:
    return dt.IA3Config(init_ia3_weights=False, **fields)


def _bottleneck(task_type: str | None = None, **fields) -> dt.BottleneckConfig:
    return dt.BottleneckConfig(reduction_factor=4, init_weights=False, task_type=task_type, **fields)


# case id -> (family, {adapter name: config maker}); "a" and "b" (and "c", for the training test) in each.
CASES = {
    "llama-lora": ("llama", {"a": _lora, "b": _lora, "c": _lora}),
    "gpt2-lora-conv1d": ("gpt2", {"a": _lora, "b": _lora}),
    "bert-lora-heads": ("bert", {n: lambda: _lora("SEQ_CLS") for n in "abc"}),
    "t5-lora": ("t5", {"a": _lora, "b": _lora}),
    "llama-lora-embedding": ("llama", {n: lambda: _lora(target_modules=["embed_tokens", "q_proj"]) for n in "ab"}),
    "llama-dora": ("llama", {n: lambda: _lora(use_dora=True) for n in "ab"}),
    "llama-ia3": ("llama", {"a": _ia3, "b": _ia3}),
    "bert-bottleneck-heads": ("bert", {"a": lambda: _bottleneck("SEQ_CLS"), "b": lambda: _bottleneck("SEQ_CLS")}),
    # Three methods in one model and one batch; the bottleneck wraps the IA3 layer at down_proj.
    "llama-lora-ia3-bottleneck": (
        "llama",
        {
            "a": _lora,
            "b": lambda: _ia3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
            "c": lambda: _bottleneck(config="pfeiffer"),
        },
    ),
}


def build(case: str) -> dt.DeltaModel:
    """The case's tiny model with its adapters, all random; heads copied per adapter are made to differ too."""
    family, makers = CASES[case]
    overrides = NO_DROPOUT if family == "bert" else {}
    model = None
    for seed, (name, make) in enumerate(makers.items(), start=1):
        torch.manual_seed(seed)
        if model is None:
            model = dt.get_delta_model(tiny_model(family, **overrides), make(), name)
        else:
            model.add_adapter(name, make())
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in layers(model):
            if isinstance(layer, ModulesToSave):
                for head in layer.modules_to_save.values():
                    for p in head.parameters():
                        p.add_(torch.randn_like(p))
    return model.eval()


def layers(model: dt.DeltaModel) -> list[DeltaLayer]:
    return [m for m in model.modules() if isinstance(m, DeltaLayer)]


def rows(inputs: dict, index: list[int]) -> dict:
    return {k: v[index] for k, v in inputs.items()}


def run_alone(model: dt.DeltaModel, name: str, fn):
    """``fn()`` with only adapter ``name`` active ("__base__": adapters disabled); the active ones are restored."""
    active = list(model.active_adapters)
    try:
        if name == "__base__":
            with model.disable_adapter():
                return fn()
        model.set_adapter(name)
        return fn()
    finally:
        model.set_adapter(active)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_rows_equal_each_adapter_alone(case):
    model = build(case)
    family = CASES[case][0]
    names = NAMES if case != "llama-lora-ia3-bottleneck" else ["a", "b", "__base__", "c"]
    inputs = tiny_inputs(family, batch=4)
    active = list(model.active_adapters)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
        with model.disable_adapter():
            base = model(**inputs).logits
        for i, name in enumerate(names):
            alone = run_alone(model, name, lambda i=i: model(**rows(inputs, [i])).logits)
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=ATOL32, rtol=0, msg=f"row {i} ({name})")
            if name != "__base__":
                assert (alone - base[i : i + 1]).abs().max() > ATOL32, f"adapter {name} does not change row {i}"
    assert (mixed[0] - run_alone(model, "b", lambda: model(**rows(inputs, [0])).logits)[0]).abs().max() > ATOL32
    # the call leaves nothing behind
    assert model.active_adapters == active
    assert all(layer.row_adapters is None and not layer.disabled for layer in layers(model))


def test_lora_conv2d_on_a_plain_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))
    model = dt.get_delta_model(net, _lora(target_modules=["0", "3"]), "a")
    torch.manual_seed(1)
    model.add_adapter("b", _lora(target_modules=["0"]))
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        mixed = model(x, adapter_names=NAMES)
        for i, name in enumerate(NAMES):
            alone = run_alone(model, name, lambda i=i: model(x[i : i + 1]))
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=ATOL32, rtol=0)
        assert (mixed[:1] - run_alone(model, "__base__", lambda: model(x[:1]))).abs().max() > ATOL32


def test_adapter_fusion_rows():
    model = build("bert-bottleneck-heads")
    model.add_fusion(["a", "b"], name="f")
    names = ["f", "a", "__base__", "f"]
    inputs = tiny_inputs("bert", batch=4)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
        for i, name in enumerate(names):
            alone = run_alone(model, name, lambda i=i: model(**rows(inputs, [i])).logits)
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=ATOL32, rtol=0, msg=f"row {i} ({name})")


@pytest.mark.parametrize(
    "case, num_beams", [("llama-lora", 1), ("llama-lora", 2), ("t5-lora", 2), ("gpt2-lora-conv1d", 1)]
)
def test_generate_rows_equal_each_adapter_alone(case, num_beams):
    model = build(case)
    inputs = tiny_inputs(CASES[case][0], batch=4)
    inputs.pop("decoder_input_ids", None)
    # min_new_tokens: no row stops early, so every row has the same length alone and in the batch
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=num_beams, pad_token_id=0)
    mixed = model.generate(**inputs, adapter_names=NAMES, **kwargs)
    assert mixed.shape[0] == len(NAMES)
    for i, name in enumerate(NAMES):
        alone = run_alone(model, name, lambda i=i: model.generate(**rows(inputs, [i]), **kwargs))
        assert torch.equal(mixed[i : i + 1], alone), f"row {i} ({name}): {mixed[i].tolist()} != {alone[0].tolist()}"
    assert all(layer.row_adapters is None for layer in layers(model))


@pytest.mark.parametrize("case", ["llama-lora", "bert-lora-heads", "llama-lora-ia3-bottleneck"])
def test_training_gradients_reach_only_each_rows_adapter(case):
    """One backward on a mixed batch: each adapter's gradient equals that of its own rows run alone.

    The loss is a sum over rows (logits times fixed weights), so the rows' contributions add up exactly. Adapter "c"
    is active (trainable) in the llama-lora and bert cases but named by no row: it must get no gradient.
    """
    model = build(case).train()
    family = CASES[case][0]
    names = NAMES if case != "llama-lora-ia3-bottleneck" else ["a", "b", "__base__", "c", "b"]
    used = sorted(set(names) - {"__base__"})
    inputs = tiny_inputs(family, batch=len(names))
    model.set_adapter(list(CASES[case][1]))
    params = {name: [p for layer in layers(model) for p in layer.adapter_parameters(name).values()] for name in "abc"}
    with torch.no_grad():  # heads: several active ones cannot compute together, only row by row
        weights = torch.randn_like(model(**inputs, adapter_names=names).logits)

    def loss(out: torch.Tensor, index: list[int]) -> torch.Tensor:
        return (out * weights[index]).sum()

    model.zero_grad()
    loss(model(**inputs, adapter_names=names).logits, list(range(len(names)))).backward()
    mixed = {name: [None if p.grad is None else p.grad.clone() for p in params[name]] for name in "abc"}
    for name in "abc":
        if name not in used:
            assert all(g is None or not g.any() for g in mixed[name]), f"adapter {name} got a gradient"
    for name in used:
        index = [i for i, n in enumerate(names) if n == name]
        model.set_adapter(name)
        model.zero_grad()
        loss(model(**rows(inputs, index)).logits, index).backward()
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in params[name])
        for p, g in zip(params[name], mixed[name]):
            assert g is not None, f"adapter {name} got no gradient"
            torch.testing.assert_close(g, p.grad, atol=ATOL32, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad), "a frozen parameter got a gradient"


# -- bad input ------------------------------------------------------------------------------------------------------
@pytest.fixture
def llama() -> dt.DeltaModel:
    return build("llama-lora")


def test_unknown_name_wrong_length_and_type(llama):
    inputs = tiny_inputs("llama", batch=4)
    with pytest.raises(ValueError, match=r"unknown adapter 'zz'.*adapters in this model: a, b, c"):
        llama(**inputs, adapter_names=["a", "zz", "b", "a"])
    with pytest.raises(ValueError, match="3 names but the batch has 4 rows"):
        llama(**inputs, adapter_names=["a", "b", "a"])
    with pytest.raises(ValueError, match="3 names but the batch has 4 rows"):
        llama.generate(**inputs, adapter_names=["a", "b", "a"], max_new_tokens=2)
    with pytest.raises(TypeError, match="one adapter name per row"):
        llama(**inputs, adapter_names="a")
    with pytest.raises(ValueError, match="empty"):
        llama(**inputs, adapter_names=[])
    with pytest.raises(ValueError, match="__base__"):
        llama.add_adapter("__base__", _lora())


def test_merged_disabled_and_checkpointing_refused(llama):
    inputs = tiny_inputs("llama", batch=4)
    llama.merge_adapter()
    with pytest.raises(ValueError, match=r"unmerge_adapter\(\)"):
        llama(**inputs, adapter_names=NAMES)
    llama.unmerge_adapter()
    with llama.disable_adapter(), pytest.raises(ValueError, match="disable_adapter"):
        llama(**inputs, adapter_names=NAMES)
    llama.gradient_checkpointing_enable()
    llama.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        llama(**inputs, adapter_names=NAMES)


def test_routing_restored_when_the_forward_raises(llama):
    ids = tiny_inputs("llama", batch=4)["input_ids"]
    with pytest.raises(TypeError, match="multiple values"):  # raised by the base model's call, inside the routing
        llama(ids, input_ids=ids, adapter_names=NAMES)
    assert all(layer.row_adapters is None and not layer.disabled for layer in layers(llama))


def test_token_methods_and_in_place_methods_refused_but_may_sit_idle(llama):
    inputs = tiny_inputs("llama", batch=2)
    llama.add_adapter("p", dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="cannot be mixed with others in one batch: its .* layer does not route rows"):
        llama(**inputs, adapter_names=["a", "p"])
    # an active token adapter no row names stays out of the call
    llama.set_adapter("p")
    with torch.no_grad():
        mixed = llama(**inputs, adapter_names=["a", "__base__"]).logits
        alone = run_alone(llama, "a", lambda: llama(**rows(inputs, [0])).logits)
        base = run_alone(llama, "__base__", lambda: llama(**rows(inputs, [1])).logits)
    torch.testing.assert_close(mixed, torch.cat([alone, base]), atol=ATOL32, rtol=0)

    bert = build("bert-lora-heads")
    bert.add_adapter("bf", dt.BitFitConfig())
    with pytest.raises(ValueError, match="'bf' .*base model's own parameters"):
        bert(**tiny_inputs("bert", batch=2), adapter_names=["a", "bf"])


def test_lora_gathered_path_equals_the_row_loop_and_falls_back_where_it_must(monkeypatch):
    """Many plain LoRAs of one rank go through one gathered bmm per layer (methods/_lora_gather.py); a batch with a
    DoRA or a LoRA of another rank, or dropout in training, goes through the row loop; both give the same rows."""
    import deltatune.methods.lora as lora_module
    from deltatune.methods import _lora_gather

    torch.manual_seed(0)
    names = [f"n{i}" for i in range(6)]
    model = dt.get_delta_model(tiny_model("llama"), _lora(), names[0])
    for name in names[1:]:
        model.add_adapter(name, _lora())
    model.add_adapter("wide", dt.LoraConfig(r=6, lora_alpha=8, init_lora_weights=False))
    model.eval()
    inputs = tiny_inputs("llama", batch=8)
    calls = []

    def counted(layer, x, result):
        out = _lora_gather.gathered(layer, x, result)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(lora_module, "gathered", counted)
    row_names = [*names, "__base__", "n2"]
    with torch.no_grad():
        fast = model(**inputs, adapter_names=row_names).logits
        assert calls and all(calls)
        monkeypatch.setattr(lora_module, "gathered", lambda *args: None)
        loop = model(**inputs, adapter_names=row_names).logits
        monkeypatch.setattr(lora_module, "gathered", counted)
        torch.testing.assert_close(fast, loop, atol=ATOL32, rtol=0)
        assert (fast[0] - fast[1]).abs().max() > ATOL32  # the rows' adapters differ
        calls.clear()
        model(**inputs, adapter_names=[*names, "wide", "n0"])
        assert calls and not any(calls)  # two ranks in one batch: the loop
    model.train()
    for layer in layers(model):
        if "n1" in getattr(layer, "lora_dropout", {}):
            layer.lora_dropout["n1"] = nn.Dropout(0.1)
    calls.clear()
    model(**inputs, adapter_names=row_names)
    assert calls and not any(calls)  # dropout draws a mask per adapter: the loop


def _two(family: str, **fields) -> dt.DeltaModel:
    torch.manual_seed(0)
    model = dt.get_delta_model(tiny_model(family), _lora(**fields), "a")
    model.add_adapter("b", _lora(**fields))
    return model.eval()


def test_a_layer_computing_on_what_rows_share_routes_one_adapter_or_refuses():
    """T5's relative_attention_bias computes on (q_len, k_len) buckets: with q_len a multiple of the rows, a mixed
    batch routed them by query position, silently wrong (2.8 off). GPT-2's wpe computes on (1, T) positions: even a
    batch whose rows all name one adapter was refused. Now one adapter (or the base) for every row computes as it
    does alone, and different adapters are refused there."""
    t5 = _two("t5", target_modules=["q", "v", "relative_attention_bias"])
    inputs = tiny_inputs("t5", batch=2, seq=8)
    with pytest.raises(ValueError, match="not the call's rows"):
        t5(**inputs, adapter_names=["a", "b"])
    gpt2 = _two("gpt2", target_modules=["c_attn", "wpe"])
    for model, inputs in ((t5, tiny_inputs("t5", batch=2, seq=8)), (gpt2, tiny_inputs("gpt2", batch=2))):
        model.set_adapter("b")
        with torch.no_grad():
            alone = model(**inputs).logits
            with model.disable_adapter():
                base = model(**inputs).logits
            assert (alone - base).abs().max() > 1e-3
            torch.testing.assert_close(model(**inputs, adapter_names=["b", "b"]).logits, alone, atol=ATOL32, rtol=0)
            torch.testing.assert_close(
                model(**inputs, adapter_names=["__base__"] * 2).logits, base, atol=ATOL32, rtol=0
            )
    with pytest.raises(ValueError, match="not the call's rows"):
        gpt2(**tiny_inputs("gpt2", batch=2), adapter_names=["a", "b"])


def test_an_adapter_named_twice_is_active_once():
    """set_adapter(["a", "a"]) counted "a" twice unmerged and once merged (0.06 apart)."""
    model = _two("llama")
    model.set_adapter(["a", "a"])
    assert model.active_adapters == ["a"]


@pytest.mark.parametrize("dora", [(True, True), (False, True)])
def test_deleting_an_adapter_merged_before_another_is_refused_and_keeps_the_base(dora):
    """delete_adapter unmerged its adapter from under a DoRA merged after it (the base 0.43 off for good); now it is
    refused while merged, as peft, and the model answers as before; unmerged first, the rest is b alone."""
    torch.manual_seed(0)
    model = dt.get_delta_model(tiny_model("llama"), _lora(use_dora=dora[0]), "a")
    model.add_adapter("b", _lora(use_dora=dora[1]))
    with torch.no_grad():  # magnitudes as training leaves them (at init DoRA's rescaling is 1)
        for n, p in model.named_parameters():
            if "magnitude" in n:
                p.mul_(1.5)
    model.eval()
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        with model.disable_adapter():
            base = model(**inputs).logits
        model.set_adapter("b")
        b_alone = model(**inputs).logits
        model.set_adapter(["a", "b"])
        model.merge_adapter()
        both = model(**inputs).logits
        with pytest.raises(ValueError, match="'a' is merged"):
            model.delete_adapter("a")
        torch.testing.assert_close(model(**inputs).logits, both, atol=0, rtol=0)
        model.unmerge_adapter()
        model.delete_adapter("a")
        model.merge_adapter()
        torch.testing.assert_close(model(**inputs).logits, b_alone, atol=1e-5, rtol=0)
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs).logits, base, atol=1e-5, rtol=0)


def test_nested_disable_adapter_blocks_each_restore_their_own():
    model = _two("llama")
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        with model.disable_adapter():
            base = model(**inputs).logits
            with model.disable_adapter():
                pass
            torch.testing.assert_close(model(**inputs).logits, base, atol=0, rtol=0)  # was the adapter's (0.48 off)
        assert (model(**inputs).logits - base).abs().max() > 1e-3
