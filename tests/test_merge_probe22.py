"""Probe 22 (merging and combining): merges, unmerges and add_weighted_adapter against peft on tiny models, the
same weights on both sides."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.tiny import output_of, tiny_inputs, tiny_model

peft = pytest.importorskip("peft")


def _base_weights(model) -> dict[str, torch.Tensor]:
    """The base model's tensors (no adapter's), keyed alike for peft's model and ours."""
    return {
        k.replace("base_layer.", ""): v.detach().clone()
        for k, v in model.get_base_model().named_parameters()
        if "lora_" not in k and "ia3_" not in k
    }


def _ia3_pair(dtype: torch.dtype):
    """peft's (IA)^3 model and ours on a ``dtype`` llama, the vectors float32 on both (peft's autocast_adapter_dtype)
    and equal: ours loaded from peft's state dict."""
    from peft.utils import get_peft_model_state_dict

    kwargs = dict(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    theirs = peft.get_peft_model(tiny_model("llama").to(dtype), peft.IA3Config(**kwargs))
    ours = dt.get_delta_model(tiny_model("llama").to(dtype), dt.IA3Config(**kwargs), autocast_adapter_dtype=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(theirs.named_parameters()):
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    dt.set_peft_model_state_dict(ours, get_peft_model_state_dict(theirs))
    return theirs, ours


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ia3_unmerge_in_half_precision_is_peft_s_and_does_not_drift(dtype):
    """A float32 (IA)^3 vector on a bf16 / fp16 base: peft divides W by l + 1e-8 in float32 and rounds once (the same
    weights as deltatune's W / l wherever the 1e-8 changes no rounded quotient, as for these l near 1; an fp16 GPT-2
    l of 9.5e-5 gives one weight 7.6e-6 apart). deltatune
    rounded l to W's dtype first, so each merge / unmerge cycle took off another l than went in: after ten cycles
    W was 5.4e-3 (bf16) / 4.3e-4 (fp16) off the base, peft's 2.4e-4 / 3.1e-5 (one cycle's rounding, no more)."""
    theirs, ours = _ia3_pair(dtype)
    before = _base_weights(ours)
    for _ in range(10):
        theirs.base_model.merge_adapter(["default"])
        ours.merge_adapter(["default"])
        merged = _base_weights(ours)
        for k, v in _base_weights(theirs).items():
            torch.testing.assert_close(merged[k], v, atol=0, rtol=0)
        with pytest.warns(UserWarning):  # peft's "Unmerge result can be inaccurate"
            theirs.unmerge_adapter()
        ours.unmerge_adapter()
    after, ref = _base_weights(ours), _base_weights(theirs)
    for k, v in ref.items():
        torch.testing.assert_close(after[k], v, atol=0, rtol=0)
    assert max((after[k].float() - before[k].float()).abs().max().item() for k in before) > 0  # (rounded, as peft)


def _lora_pair():
    """peft's model and ours with LoRA adapters "a" (r 4) and "b" (r 2, other targets too), equal weights."""
    from peft.utils import get_peft_model_state_dict

    configs = {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj"]),
        "b": dict(r=2, target_modules=["q_proj", "v_proj"]),
    }
    theirs = ours = None
    for name, kwargs in configs.items():
        p, d = peft.LoraConfig(init_lora_weights=False, **kwargs), dt.LoraConfig(init_lora_weights=False, **kwargs)
        if theirs is None:
            theirs = peft.get_peft_model(tiny_model("llama"), p, adapter_name=name)
            ours = dt.get_delta_model(tiny_model("llama"), d, adapter_name=name)
        else:
            theirs.add_adapter(name, p)
            ours.add_adapter(name, d)
        dt.set_peft_model_state_dict(ours, get_peft_model_state_dict(theirs, adapter_name=name), adapter_name=name)
    return theirs, ours


@pytest.mark.parametrize("driver", ["gesvd", "qr"])
def test_svd_driver_off_cuda_is_one_line_naming_it_and_changes_nothing(driver):
    """peft passes svd_driver to torch.linalg.svd inside the first layer's combination; on CPU tensors (or with a
    driver torch does not know) torch raises from there: 'keyword argument `driver=` is only supported on CUDA
    inputs', naming no argument of add_weighted_adapter. deltatune says so before adding anything."""
    theirs, ours = _lora_pair()
    with pytest.raises(RuntimeError, match="driver= is only supported on CUDA|driver"):
        theirs.add_weighted_adapter(["a", "b"], [1.0, 0.5], "mix", combination_type="svd", svd_driver=driver)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    want = "svd_driver=.gesvd. is a cuSOLVER option for CUDA tensors; adapter 'a' at .*q_proj is on cpu"
    if driver != "gesvd":
        want = "svd_driver must be None, 'gesvd', 'gesvdj' or 'gesvda', got 'qr'"
    with pytest.raises(ValueError, match=want):
        ours.add_weighted_adapter(["a", "b"], [1.0, 0.5], "mix", combination_type="svd", svd_driver=driver)
    assert list(ours.peft_config) == ["a", "b"]
    after = ours.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    # a combination without an SVD ignores the driver, as peft's
    for model in (theirs, ours):
        model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "cat", combination_type="cat", svd_driver=driver)
        model.set_adapter("cat")
    inputs = tiny_inputs("llama")
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs.eval(), inputs), atol=1e-6, rtol=0)


def test_merging_a_merged_adapter_again_warns_as_peft_and_changes_nothing():
    """peft's check_adapters_to_merge warns 'All adapters are already merged, nothing to do.' (or names the ones
    merged already when others join them) and merges nothing twice; deltatune merged nothing twice without a word."""
    import warnings

    theirs, ours = _lora_pair()
    for model in (theirs.base_model, ours):
        model.merge_adapter(["a"])
    weights = _base_weights(ours)
    seen = {}
    for lib, model in (("peft", theirs.base_model), ("ours", ours)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.merge_adapter(["a", "b"])
        seen[lib] = [str(w.message) for w in caught if "merged" in str(w.message)]
    assert (
        seen["peft"] and seen["ours"] == ["adapter 'a' is already merged, nothing to do"] * 2
    )  # (two layers hold it)
    want = {k: v + ours.get_base_model().get_submodule(k.rsplit(".", 1)[0]).delta_weight("b", merging=True)
            if k.endswith(("q_proj.weight", "v_proj.weight")) else v for k, v in weights.items()}  # fmt: skip
    ref, after = _base_weights(theirs), _base_weights(ours)
    for k in ref:
        torch.testing.assert_close(after[k], ref[k], atol=0, rtol=0)
        torch.testing.assert_close(after[k], want[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("combination_type", ["svd", "dare_ties_svd"])
def test_svd_combination_of_fp32_embedding_adapters_on_a_bf16_base_is_peft_s(combination_type):
    """peft's SVD combinations read get_delta_weight, in the adapters' dtype. deltatune's read the delta its
    embedding merge adds, rounded to a bf16 table's dtype: with float32 adapters (peft's autocast_adapter_dtype) the
    combined embedding's B was 0.049 off peft's (the linear layers' were equal)."""
    from peft.utils import get_peft_model_state_dict

    configs = {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"]), "b": dict(r=4)}
    configs["b"]["target_modules"] = ["embed_tokens", "v_proj"]
    theirs = ours = None
    for name, kwargs in configs.items():
        p, d = peft.LoraConfig(init_lora_weights=False, **kwargs), dt.LoraConfig(init_lora_weights=False, **kwargs)
        if theirs is None:
            theirs = peft.get_peft_model(tiny_model("llama").to(torch.bfloat16), p, adapter_name=name)
            ours = dt.get_delta_model(tiny_model("llama").to(torch.bfloat16), d, adapter_name=name,
                                      autocast_adapter_dtype=True)  # fmt: skip
        else:
            theirs.add_adapter(name, p)
            ours.add_adapter(name, d, autocast_adapter_dtype=True)
        dt.set_peft_model_state_dict(ours, get_peft_model_state_dict(theirs, adapter_name=name), adapter_name=name)
    for model in (theirs, ours):
        torch.manual_seed(0)  # (DARE's masks)
        model.add_weighted_adapter(["a", "b"], [1.0, -0.6], "mix", combination_type=combination_type, density=0.5)
    ref = get_peft_model_state_dict(theirs, adapter_name="mix")
    got = dt.get_peft_model_state_dict(ours, adapter_name="mix")
    assert set(got) == set(ref) and any("embed_tokens" in k for k in ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype == (torch.bfloat16 if "base_layer" in k else torch.float32)
        torch.testing.assert_close(got[k], v, atol=0, rtol=0)


def _unmerge_warnings(model) -> list[str]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.unmerge_adapter()
    return [str(w.message) for w in caught if "(IA)^3" in str(w.message)]


def test_ia3_unmerge_warns_where_l_rounds_to_zero_in_w_dtype():
    """An fp32 l of 1e-9 is 0 in float16: the merge zeroes that row of an fp16 W, which the unmerge names and keeps."""
    model = dt.get_delta_model(tiny_model("llama").to(torch.float16), dt.IA3Config(target_modules=["q_proj"]),
                               autocast_adapter_dtype=True)  # fmt: skip
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.ia3_l["default"][0] = 1e-9  # 0 in float16, not in float32: the merge zeroes that row
    model.merge_adapter()
    with pytest.warns(UserWarning, match="1 entries of its vector are 0"):
        model.unmerge_adapter()
    assert layer.base_layer.weight.isfinite().all() and (layer.base_layer.weight[0] == 0).all()


def test_ia3_unmerge_keeps_what_it_warns_about_where_l_rounds_to_zero():
    """The warning counted l rounded to W's dtype, but only l's exact zeros were kept from the division: an fp32 l of
    5e-13 (0 in float16) on a float16 W of 60000 merged to 6e-8 (not 0), which the unmerge divided by 5e-13 into inf
    while saying that entry stays. Now the entries it names are left as merged (finite), the others divided; the
    warning said they "stay 0" where this one is kept at 6e-8 (second review): "are left as merged"."""
    lin = torch.nn.Linear(2, 2, bias=False).half()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[60000.0, 1.0], [2.0, 3.0]]))
    model = dt.get_delta_model(
        torch.nn.Sequential(lin), dt.IA3Config(target_modules=["0"]), autocast_adapter_dtype=True
    )
    layer = model.get_base_model()[0]
    with torch.no_grad():
        layer.ia3_l["default"].copy_(torch.tensor([[5e-13], [2.0]]))
    model.merge_adapter()
    merged = layer.base_layer.weight.detach().clone()
    assert merged[0, 0] > 0  # (60000 * 5e-13 rounds up to float16's smallest subnormal)
    assert _unmerge_warnings(model) == [
        "unmerging (IA)^3 adapter 'default': 1 entries of its vector are 0, so the weights the merge scaled by them "
        "cannot be restored and are left as merged (zeros stay 0, as with PEFT)"
    ]
    w = layer.base_layer.weight
    assert w.isfinite().all()
    torch.testing.assert_close(w[0], merged[0], atol=0, rtol=0)
    torch.testing.assert_close(w[1], torch.tensor([2.0, 3.0], dtype=torch.float16), atol=0, rtol=0)


def test_ia3_unmerge_on_a_grouped_feed_forward_conv_counts_l_s_zeros_once():
    """A grouped feed-forward conv takes l per group, expanded to (C_out, C_in / groups): one zero in l was counted as
    C_out / groups zeros (4 here). peft's l (1, C_in, 1, 1) holds one."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(4, 8, 3, groups=2)

    model = dt.get_delta_model(M(), dt.IA3Config(target_modules=["c1"], feedforward_modules=["c1"]))
    layer = model.get_base_model().c1
    with torch.no_grad():
        layer.ia3_l["default"].fill_(2.0)
        layer.ia3_l["default"].view(-1)[0] = 0
    before = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    assert [m.split(":")[1].split(" of")[0] for m in _unmerge_warnings(model)] == [" 1 entries"]
    w = layer.base_layer.weight
    assert w.isfinite().all() and (w[:4, 0] == 0).all()  # group 0's first input channel: zeroed, kept 0
    torch.testing.assert_close(w[:, 1:], before[:, 1:], atol=0, rtol=0)
    torch.testing.assert_close(w[4:], before[4:], atol=0, rtol=0)


def test_lora_embedding_get_delta_weight_is_peft_s_in_the_adapter_s_dtype():
    """peft's Embedding.get_delta_weight returns s (B A)^T in the adapters' dtype; its merge rounds it to W's. deltatune's
    returned the merge's rounded delta: fp32 adapters on a bf16 llama, bf16 and 0.06 off peft's. The merge and unmerge
    still round it, as peft's (bit-equal weights)."""
    from peft.utils import get_peft_model_state_dict

    kw = dict(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_model("llama").to(torch.bfloat16), peft.LoraConfig(**kw))
    ours = dt.get_delta_model(tiny_model("llama").to(torch.bfloat16), dt.LoraConfig(**kw), autocast_adapter_dtype=True)
    dt.set_peft_model_state_dict(ours, get_peft_model_state_dict(theirs))
    for name in ("model.embed_tokens", "model.layers.0.self_attn.q_proj"):
        want = theirs.base_model.model.get_submodule(name).get_delta_weight("default")
        got = ours.get_base_model().get_submodule(name).get_delta_weight("default")
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    for safe in (False, True):
        theirs.base_model.merge_adapter(["default"], safe_merge=safe)
        ours.merge_adapter(safe_merge=safe)
        for k, v in _base_weights(theirs).items():
            torch.testing.assert_close(_base_weights(ours)[k], v, atol=0, rtol=0)
        theirs.unmerge_adapter()
        ours.unmerge_adapter()
        for k, v in _base_weights(theirs).items():
            torch.testing.assert_close(_base_weights(ours)[k], v, atol=0, rtol=0)


def test_merging_a_name_listed_twice_merges_it_once_without_an_already_merged_warning():
    """merge_adapter(["a", "a"]) on a fresh model: peft merges "a" twice (W + 2 s B A, no word); deltatune merged it
    once but warned "adapter 'a' is already merged" at the second listing of a call that merged it. Once, silently."""
    import warnings

    theirs, ours = _lora_pair()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours.merge_adapter(["a", "a"])
    assert [str(w.message) for w in caught if "merged" in str(w.message)] == []
    theirs.base_model.merge_adapter(["a"])  # (peft's once: its twice doubles the update)
    ref, after = _base_weights(theirs), _base_weights(ours)
    for k in ref:
        torch.testing.assert_close(after[k], ref[k], atol=0, rtol=0)
