"""The DeltaModel API against peft 0.21.2's PeftModel / LoraModel: ``add_weighted_adapter`` (every combination type,
the same weights, config and logits as peft's, dare's random masks included under one seed), ``delete_adapter`` of a
merged adapter, ``load_adapter``'s torch_device / low_cpu_mem_usage / autocast_adapter_dtype and
``save_pretrained(selected_adapters=[])``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_merge_probe5 import _convs
from tiny import tiny_inputs, tiny_model

import deltatune as dt

peft = pytest.importorskip("peft")
PEFT_OLD = tuple(int(v) for v in peft.__version__.split(".")[:2]) < (0, 22)  # peft 0.21: the pinned reference

ALL = ["svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
       "magnitude_prune", "magnitude_prune_svd"]  # fmt: skip
BASES = {
    "llama": lambda: tiny_model("llama"),
    "gpt2": lambda: tiny_model("gpt2"),
    "conv": lambda: _convs(torch.float32),
}


def _pair(tmp_path, a: dict, b: dict, base: str = "llama"):
    """Adapters "a" and "b" (random, different alphas) saved by peft, loaded into peft and into deltatune."""
    make = BASES[base]
    torch.manual_seed(0)
    src = peft.get_peft_model(make(), peft.LoraConfig(init_lora_weights=False, **a), adapter_name="a")
    src.add_adapter("b", peft.LoraConfig(init_lora_weights=False, **b))
    src.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", "b")
    ours = dt.DeltaModel.from_pretrained(make(), tmp_path / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "b", "b")
    return ours, theirs


def _inputs(base: str):
    return (torch.manual_seed(1), torch.randn(2, 3, 6, 6))[1] if base == "conv" else tiny_inputs(base)


def _out(model, inputs):
    with torch.no_grad():
        out = model(inputs) if isinstance(inputs, torch.Tensor) else model(**inputs)
    return getattr(out, "logits", out)


def _combine_both(ours, theirs, base, names, weights, pad_to=None, **kw):
    """Both combine under one seed; the new adapters' tensors, configs, logits and the random state after agree."""
    torch.manual_seed(7)
    theirs.add_weighted_adapter(names, weights, "new", **kw)
    if PEFT_OLD and theirs.peft_config["new"].use_rslora:  # peft 0.22's fix: use_rslora off, scaling 1 (r / r)
        theirs.peft_config["new"].use_rslora = False
        for m in theirs.modules():
            if isinstance(getattr(m, "scaling", None), dict) and "new" in m.scaling:
                m.scaling["new"] = 1.0
    after_theirs = torch.rand(4)
    torch.manual_seed(7)
    ours.add_weighted_adapter(names, weights, "new", **kw)
    torch.testing.assert_close(torch.rand(4), after_theirs, rtol=0, atol=0)
    want, got = theirs.peft_config["new"], ours.peft_config["new"]
    assert (got.r, got.lora_alpha, got.use_rslora) == (want.r, want.lora_alpha, want.use_rslora)
    targets = want.target_modules
    assert got.target_modules == (targets if isinstance(targets, str) else sorted(targets))
    assert got.rank_pattern == {} and got.alpha_pattern == {}
    theirs_state = {
        k.replace(".new", ""): v for k, v in peft.get_peft_model_state_dict(theirs, adapter_name="new").items()
    }
    ours_state = {k: v for k, v in ours.adapter_state_dict("new").items() if "lora_" in k}
    assert set(ours_state) == {k for k in theirs_state if "lora_" in k}
    for key, value in ours_state.items():
        expected = theirs_state[key]
        if value.shape != expected.shape:  # peft leaves a smaller rank's factor smaller; here zero-padded
            assert pad_to and value.shape[0 if "lora_A" in key else 1] == pad_to
            value = value[: expected.shape[0]] if "lora_A" in key else value[:, : expected.shape[1]]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    theirs.set_adapter("new")
    ours.set_adapter("new")
    tol = 1e-6 if pad_to else 0  # zero rows add terms to the matmul's sums: the last bit may differ
    torch.testing.assert_close(_out(ours, _inputs(base)), _out(theirs, _inputs(base)), rtol=0, atol=tol)


@pytest.mark.parametrize("kind", ALL)
def test_every_combination_type_is_peft_s_to_the_bit(kind, tmp_path):
    """add_weighted_adapter did not exist on a DeltaModel (an AttributeError for peft's call)."""
    ours, theirs = _pair(
        tmp_path, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=4, lora_alpha=5, target_modules=["v_proj", "o_proj"]),
    )  # fmt: skip
    _combine_both(ours, theirs, "llama", ["a", "b"], [0.7, -1.3], combination_type=kind, density=0.5)


@pytest.mark.parametrize("kind", ["svd", "cat", "linear", "dare_ties", "magnitude_prune_svd"])
@pytest.mark.parametrize(
    "base, a, b",
    [
        ("gpt2", dict(target_modules=["c_attn"]), dict(target_modules=["c_attn", "c_proj"])),  # Conv1D, fan_in_fan_out
        ("llama", dict(target_modules=["embed_tokens", "q_proj"]), dict(target_modules=["embed_tokens"])),
        ("conv", dict(target_modules=["conv", "point"]), dict(target_modules=["conv"])),  # 3x3 and 1x1 kernels
    ],
)
def test_conv1d_embedding_and_conv2d_layers_combine_as_peft(base, a, b, kind, tmp_path):
    ours, theirs = _pair(tmp_path, dict(r=4, lora_alpha=8, **a), dict(r=4, lora_alpha=5, **b), base)
    _combine_both(ours, theirs, base, ["a", "b"], [0.7, -1.3], combination_type=kind, density=0.6)


@pytest.mark.parametrize(
    "a, b, kw",
    [  # ranks that differ (cat: their sum; svd: svd_rank or the largest), rsLoRA, svd options, regex targets
        (dict(r=4, use_rslora=True, target_modules=["q_proj"]), dict(r=6, target_modules=["q_proj", "k_proj"]),
         dict(combination_type="cat")),
        (dict(r=4, target_modules=["q_proj"]), dict(r=6, target_modules=["q_proj", "k_proj"]),
         dict(combination_type="svd", svd_rank=3, svd_clamp=0.9, svd_full_matrices=False)),
        (dict(r=4, target_modules=".*q_proj"), dict(r=4, target_modules=".*v_proj"),
         dict(combination_type="ties_svd", density=0.3, majority_sign_method="frequency")),
        (dict(r=4, target_modules=["q_proj"], use_dora=True), dict(r=4, target_modules=["q_proj"]),
         dict(combination_type="dare_linear", density=0.4)),
    ],
)  # fmt: skip
def test_ranks_rslora_svd_options_regexes_and_dora_as_peft(a, b, kw, tmp_path):
    if a.get("use_dora") and not PEFT_OLD:
        pytest.skip("peft 0.22 refuses add_weighted_adapter with DoRA ('does not support DoRA')")
    ours, theirs = _pair(tmp_path, dict(lora_alpha=8, **a), dict(lora_alpha=5, **b))
    _combine_both(ours, theirs, "llama", ["a", "b"], [1.0, 0.5], **kw)


def test_a_rank_pattern_s_smaller_factors_are_padded_to_the_rank_with_peft_s_logits(tmp_path):
    """peft writes a rank-2 module's combined factors at rank 2 into a rank-4 adapter (a file that then does not fit
    it); here they are padded with zeros: the same update and logits."""
    pattern = {"layers.0.self_attn.q_proj": 2}
    ours, theirs = _pair(
        tmp_path, dict(r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern=pattern),
        dict(r=4, lora_alpha=5, target_modules=["q_proj"], rank_pattern=pattern, alpha_pattern={"q_proj": 3}),
    )  # fmt: skip
    _combine_both(ours, theirs, "llama", ["a", "b"], [1.0, 0.5], pad_to=4, combination_type="ties", density=0.5)
    ours.save_pretrained(tmp_path / "ours", selected_adapters=["new"])
    again = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path / "ours" / "new")
    torch.testing.assert_close(_out(again, tiny_inputs("llama")), _out(ours, tiny_inputs("llama")))


def test_one_adapter_alone_is_combined_linearly_and_the_new_one_is_not_active(tmp_path):
    ours, theirs = _pair(tmp_path, dict(r=4, target_modules=["q_proj"]), dict(r=6, target_modules=["q_proj"]))
    _combine_both(ours, theirs, "llama", ["b"], [2.0], combination_type="svd")
    ours.set_adapter("a")
    ours.add_weighted_adapter(["a"], [1.0], "more")
    assert ours.active_adapters == ["a"]
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".more" in n)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.add_weighted_adapter(["a", "b"], [1, 1], "n", "linear"),
         r"combination_type 'linear' needs equal ranks; 'a' has r=4, 'b' has r=8"),
        (lambda m: m.add_weighted_adapter(["a", "c"], [1, 1], "n"), r"'c' gives target_modules as a regex, 'a' as a"),
        (lambda m: m.add_weighted_adapter(["a", "i"], [1, 1], "n"),
         r"\(IA\)\^3 and LoRA adapters cannot be combined together \('i' is ia3, 'a' is lora\)"),
        (lambda m: m.add_weighted_adapter(["a", "b"], [1], "n"), r"2 adapters and 1 weights"),
        (lambda m: m.add_weighted_adapter(["a", "b"], [1, 1], "b"), r"an adapter named 'b' exists already"),
        (lambda m: m.add_weighted_adapter(["a", "b"], [1, 1], "n", "dare_ties_svd"), r"needs a density >= 0, got None"),
        (lambda m: m.add_weighted_adapter(["a", "b"], [1, 1], "n", "sum"), r"invalid combination_type 'sum'"),
        (lambda m: m.add_weighted_adapter(["a", "x"], [1, 1], "n"), r"unknown adapter 'x'"),
        (lambda m: m.add_weighted_adapter(["a", "h"], [1, 1], "n", "cat"),
         r"adapters 'a' and 'h' each train their own copy of lm_head"),
    ],
)  # fmt: skip
def test_what_peft_refuses_is_refused_in_one_line_naming_the_adapter(call, message):
    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, target_modules=["q_proj"]), "a")
    model.add_adapter("b", dt.LoraConfig(r=8, target_modules=["q_proj"]))
    model.add_adapter("c", dt.LoraConfig(r=4, target_modules=r".*v_proj"))
    model.add_adapter("i", dt.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    model.add_adapter("h", dt.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model.peft_config["a"].modules_to_save = ["lm_head"]
    model.get_base_model().lm_head.add("a")  # "a" holds its own copy of lm_head too
    before = set(model.peft_config)
    with pytest.raises(ValueError, match=message) as info:
        call(model)
    assert "\n" not in str(info.value) and set(model.peft_config) == before


def test_deleting_a_merged_adapter_is_refused_as_peft(tmp_path):
    """deltatune unmerged it and deleted it; peft refuses ("Cannot delete adapter(s) ['a'] while they are merged")."""
    ours, theirs = _pair(tmp_path, dict(r=4, target_modules=["q_proj"]), dict(r=4, target_modules=["v_proj"]))
    for model in (ours, theirs):
        (model if model is ours else model.base_model).set_adapter(["a", "b"])
        model.merge_adapter()
        with pytest.raises(ValueError, match="merged"):
            model.delete_adapter("a")
    assert set(ours.peft_config) == {"a", "b"}
    ours.unmerge_adapter()
    ours.delete_adapter("a")
    assert set(ours.peft_config) == {"b"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(tiny_model("llama"), config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("low", [False, True])
def test_low_cpu_mem_usage_leaves_the_random_state_as_peft_s_load_does(saved, low):
    """low_cpu_mem_usage (peft's: the adapter made on the meta device, no initial draw) was refused (TypeError)."""
    torch.manual_seed(5)
    peft.PeftModel.from_pretrained(tiny_model("llama"), saved, low_cpu_mem_usage=low)
    want = torch.rand(3)
    torch.manual_seed(5)
    dt.DeltaModel.from_pretrained(tiny_model("llama"), saved, low_cpu_mem_usage=low)
    torch.testing.assert_close(torch.rand(3), want, rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_autocast_adapter_dtype_keeps_a_bf16_base_s_adapter_in_fp32_as_peft(saved, autocast):
    """autocast_adapter_dtype was refused (TypeError); True now keeps the file's fp32 values unrounded, as peft."""
    base = lambda: tiny_model("llama").to(torch.bfloat16)  # noqa: E731
    theirs = peft.PeftModel.from_pretrained(base(), saved, autocast_adapter_dtype=autocast)
    ours = dt.DeltaModel.from_pretrained(base(), saved, autocast_adapter_dtype=autocast, torch_device="cpu")
    want = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters() if "lora_" in n}
    got = {n.removeprefix("base_model."): p for n, p in ours.named_parameters() if "lora_" in n}
    assert set(got) == set(want)
    for name, p in got.items():
        assert p.dtype == (torch.float32 if autocast else torch.bfloat16)
        torch.testing.assert_close(p, want[name], rtol=0, atol=0)
    torch.testing.assert_close(_out(ours, tiny_inputs("llama")), _out(theirs, tiny_inputs("llama")), rtol=0, atol=0)


def test_save_pretrained_of_no_selected_adapter_writes_none(saved, tmp_path):
    """selected_adapters=[] saved every adapter (an empty list read as None); peft saves none (only its model card)."""
    model = dt.DeltaModel.from_pretrained(tiny_model("llama"), saved)
    model.save_pretrained(tmp_path / "out", selected_adapters=[])
    assert os.listdir(tmp_path / "out") == ["README.md"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        model.save_pretrained(tmp_path / "file", selected_adapters=[])


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind", ["svd", "cat", "ties"])
def test_a_bf16_base_s_adapters_combine_as_peft_s_in_either_dtype(kind, autocast, tmp_path):
    """bf16 adapters (deltatune's default, peft's autocast_adapter_dtype=False) or fp32 ones: peft's dtypes and values."""
    make = lambda: tiny_model("llama").to(torch.bfloat16)  # noqa: E731
    torch.manual_seed(0)
    src = peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "a"
    )
    src.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=5, target_modules=["q_proj"], init_lora_weights=False))
    src.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "a", "a", autocast_adapter_dtype=autocast)
    theirs.load_adapter(tmp_path / "b", "b", autocast_adapter_dtype=autocast)
    ours = dt.DeltaModel.from_pretrained(make(), tmp_path / "a", "a", autocast_adapter_dtype=autocast)
    ours.load_adapter(tmp_path / "b", "b", autocast_adapter_dtype=autocast)
    _combine_both(ours, theirs, "llama", ["a", "b"], [1.0, 0.5], combination_type=kind, density=0.5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_save_pretrained_converts_from_the_initial_adapter_as_peft(init, tmp_path):
    """save_pretrained(path_initial_model_for_weight_conversion=...) was swallowed: the PiSSA / OLoRA file was written
    (it loads only by redoing the init on the original base) where peft writes the plain LoRA of rank 2r."""
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**config))
    torch.manual_seed(3)
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**config))
    for model, side in ((theirs, "p"), (ours, "d")):
        model.save_pretrained(tmp_path / side / "init")
        with torch.no_grad():  # the same made-up training step on both
            g = torch.Generator().manual_seed(5)
            for _, q in sorted((n, q) for n, q in model.named_parameters() if "lora_" in n and q.requires_grad):
                q.add_(torch.randn(q.shape, generator=g) * 0.05)
        model.save_pretrained(
            tmp_path / side / "out", path_initial_model_for_weight_conversion=tmp_path / side / "init"
        )
    want = load_file(tmp_path / "p" / "out" / "adapter_model.safetensors")
    got = load_file(tmp_path / "d" / "out" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert next(iter(got.values())).shape[0] == 8  # rank 2r
    for name in ("out", "init"):
        want_config = json.loads((tmp_path / "p" / name / "adapter_config.json").read_text())
        got_config = json.loads((tmp_path / "d" / name / "adapter_config.json").read_text())
        assert [got_config[k] for k in ("r", "lora_alpha", "init_lora_weights")] == [
            want_config[k] for k in ("r", "lora_alpha", "init_lora_weights")
        ]
    plain = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path / "d" / "out")
    torch.testing.assert_close(_out(plain, tiny_inputs("llama")), _out(ours, tiny_inputs("llama")))
    ia3 = dt.get_delta_model(tiny_model("llama"), dt.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), "i")
    with pytest.raises(ValueError, match="adapter 'i' \\(ia3\\): path_initial_model_for_weight_conversion converts"):
        ia3.save_pretrained(tmp_path / "i", path_initial_model_for_weight_conversion=tmp_path / "d" / "init")


@pytest.mark.parametrize("kind", ["cat", "linear", "svd"])
def test_a_module_no_adapter_holds_gets_a_zero_update_where_peft_stops(kind, tmp_path):
    """b's exclude_modules is not copied into the new config (a's is), so the union targets a module none holds:
    peft stops ("No matching LoRAs found" / IndexError); its combined update there is zero."""
    ours, _ = _pair(
        tmp_path, dict(r=4, target_modules=["q_proj"]),
        dict(r=4, target_modules=["v_proj"], exclude_modules=["model.layers.1.self_attn.v_proj"]),
    )  # fmt: skip
    ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", combination_type=kind)
    state = ours.adapter_state_dict("new")
    assert all(not v.any() for k, v in state.items() if ".layers.1.self_attn.v_proj." in k)
    assert all(v.any() for k, v in state.items() if ".layers.1.self_attn.v_proj." not in k)


def test_an_svd_rank_beyond_the_layer_s_size_is_padded_and_exact(tmp_path):
    """svd_rank 40 on 32-wide layers: 32 singular values, padded with zeros to rank 40 (peft keeps rank-32 factors
    in its rank-40 adapter: the same logits, but its saved file does not load); B A is 0.7 dW_a - 1.3 dW_b."""
    ours, _ = _pair(tmp_path, dict(r=4, target_modules=["q_proj"]), dict(r=4, lora_alpha=5, target_modules=["q_proj"]))
    ours.add_weighted_adapter(["a", "b"], [0.7, -1.3], "new", svd_rank=40, svd_full_matrices=False)
    layer = ours.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.lora_A["new"].weight.shape[0] == 40 and layer.lora_B["new"].weight.shape[1] == 40
    want = 0.7 * layer.delta_weight("a") - 1.3 * layer.delta_weight("b")
    torch.testing.assert_close(layer.delta_weight("new"), want, rtol=0, atol=1e-5)
    ours.save_pretrained(tmp_path / "ours", selected_adapters=["new"])
    again = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path / "ours" / "new")
    ours.set_adapter("new")
    torch.testing.assert_close(_out(again, tiny_inputs("llama")), _out(ours, tiny_inputs("llama")), rtol=0, atol=0)


def test_ranks_that_differ_at_one_module_are_refused_and_the_model_kept():
    """peft checks the largest ranks (4 and 4) and then stops in torch.stack at the module where a rank_pattern made
    one of them 2; refused here in one line naming the module, and no half-made adapter is left."""
    pattern = {"layers.0.self_attn.q_proj": 2}
    model = dt.get_delta_model(
        tiny_model("llama"), dt.LoraConfig(r=4, target_modules=["q_proj"], rank_pattern=pattern), "a"
    )
    model.add_adapter("b", dt.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"at model.layers.0.self_attn.q_proj 'a' has r=2, 'b' has r=4"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "n", "linear")
    assert list(model.peft_config) == ["a", "b"] and not any(".n." in k for k in model.state_dict())
