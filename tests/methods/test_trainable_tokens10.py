"""LoRA's ``trainable_token_indices`` (methods/_trainable_tokens.py) against peft 0.21.2: outputs, gradients, saved
files both ways, merging, several adapters, training only the listed rows, and the refusals.

Reference: peft's LoRA with the same config on the same tiny model, its adapter tensors set to the same random values
(deltatune's and peft's keys are one vocabulary), compared to the bit (both compute ``index_copy`` then the lookup);
and, by hand, the plain model whose embedding rows were overwritten with the adapter's rows."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_config, tiny_inputs, tiny_model
from transformers import BertForMaskedLM

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.methods._trainable_tokens import KEY, TrainableTokens

peft = pytest.importorskip("peft")
IDS = [3, 5, 9]

CASES = {  # family, task, model overrides, LoRA targets, the embedding's path, the modules the tokens wrap
    "llama": ("llama", "causal_lm", {}, ["q_proj"], "model.embed_tokens"),
    "llama-tied": ("llama", "causal_lm", {"tie_word_embeddings": True}, ["q_proj"], "model.embed_tokens"),
    "gpt2": ("gpt2", "causal_lm", {}, ["c_attn"], "transformer.wte"),
    "bert": ("bert", "seq_cls", {}, ["query"], "bert.embeddings.word_embeddings"),
}


def base(case: str):
    family, task, overrides, _, _ = CASES[case]
    return tiny_model(family, task, **overrides)


def inputs(case: str, ids=IDS) -> dict:
    family, task = CASES[case][:2]
    x = tiny_inputs(family, task)
    x["input_ids"][:, : len(ids)] = torch.tensor(ids)  # the listed tokens appear, so their rows get gradients
    return x


def fields(case: str, **extra) -> dict:
    return dict(r=2, target_modules=CASES[case][3], trainable_token_indices=IDS, init_lora_weights=False, **extra)


def ours_and_theirs(case: str, **extra):
    """(deltatune, peft) over the same base, every adapter tensor set to the same random values."""
    theirs = peft.get_peft_model(base(case), peft.LoraConfig(**fields(case, **extra)))
    ours = dt.get_delta_model(base(case), dt.LoraConfig(**fields(case, **extra)))
    mine = ours.adapter_state_dict()
    assert sorted(mine) == sorted(peft.get_peft_model_state_dict(theirs))
    g = torch.Generator().manual_seed(0)
    values = {k: torch.randn(v.shape, generator=g) for k, v in mine.items()}
    peft.set_peft_model_state_dict(theirs, values)
    with torch.no_grad():
        for k, v in mine.items():
            v.copy_(values[k])
    return ours.eval(), theirs.eval()


def peft_params(model) -> dict[str, torch.nn.Parameter]:
    """peft's trainable parameters under their saved keys (the adapter name taken out)."""
    return {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_gradients_and_counts_equal_peft(case):
    ours, theirs = ours_and_theirs(case)
    x = inputs(case)
    mine, its = ours(**x).logits, theirs(**x).logits
    assert (mine - base(case)(**x).logits).abs().max() > 1e-3  # the adapter acts
    assert torch.equal(mine, its)
    mine.square().sum().backward()
    its.square().sum().backward()
    grads, reference = ours.adapter_state_dict(), peft_params(theirs)
    assert sorted(grads) == sorted(reference)
    for key, p in grads.items():
        assert torch.equal(p.grad, reference[key].grad), key
    key = f"base_model.model.{CASES[case][4]}.{KEY}"
    assert grads[key].grad.abs().max() > 0
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_tied_output_embedding_reads_the_trained_rows_untied_does_not():
    """By hand: the plain model with rows IDS of the embedding overwritten (the output embedding too where tied, as
    the two are one tensor) gives the adapter's logits (LoRA's B = 0 at init, so only the rows act)."""
    for case in ("llama-tied", "llama"):
        ours = dt.get_delta_model(base(case), dt.LoraConfig(**{**fields(case), "init_lora_weights": True})).eval()
        assert isinstance(ours.base_model.lm_head, TrainableTokens) == (case == "llama-tied")
        rows = ours.adapter_state_dict()[f"base_model.model.model.embed_tokens.{KEY}"]
        with torch.no_grad():
            rows.normal_()
        plain = base(case)
        with torch.no_grad():
            plain.model.embed_tokens.weight[IDS] = rows
        assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == (case == "llama-tied")
        x = inputs(case)
        assert torch.equal(ours(**x).logits, plain(**x).logits)


@pytest.mark.parametrize("case", ["llama", "llama-tied", "gpt2"])
def test_files_both_ways_equal_peft(case, tmp_path):
    ours, theirs = ours_and_theirs(case)
    x = inputs(case)
    expected = theirs(**x).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine, its = (load_file(tmp_path / f"{who}/adapter_model.safetensors") for who in ("ours", "theirs"))
    assert sorted(mine) == sorted(its)
    assert all(torch.equal(mine[k], its[k]) for k in mine)
    loaded = peft.PeftModel.from_pretrained(base(case), tmp_path / "ours").eval()
    assert torch.equal(loaded(**x).logits, expected)
    back = dt.DeltaModel.from_pretrained(base(case), tmp_path / "theirs").eval()
    assert back.peft_config["default"].trainable_token_indices == IDS
    assert torch.equal(back(**x).logits, expected)


def test_peft_config_with_trainable_token_indices_is_read_not_refused_or_dropped():
    config = dt.LoraConfig.from_dict({"peft_type": "LORA", "r": 2, "trainable_token_indices": {"embed_tokens": [1]}})
    assert config.trainable_token_indices == {"embed_tokens": [1]}
    assert config.to_dict()["trainable_token_indices"] == {"embed_tokens": [1]}


@pytest.mark.parametrize("case", ["llama", "llama-tied", "bert"])
def test_merge_unmerge_and_merge_and_unload_equal_peft(case):
    ours, theirs = ours_and_theirs(case)
    x = inputs(case)
    embedding = ours.base_model.get_submodule(CASES[case][4]).base_layer.weight
    before = embedding.detach().clone()
    unmerged = ours(**x).logits
    ours.merge_adapter()
    assert torch.equal(embedding[IDS], ours.adapter_state_dict()[f"base_model.model.{CASES[case][4]}.{KEY}"])
    torch.testing.assert_close(ours(**x).logits, unmerged, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    assert torch.equal(embedding, before)  # the rows exactly (q_proj's LoRA unmerge rounds: compared closely)
    torch.testing.assert_close(ours(**x).logits, unmerged, atol=1e-5, rtol=0)
    merged, reference = ours.merge_and_unload(), theirs.merge_and_unload()
    assert not any(isinstance(m, TrainableTokens) for m in merged.modules())
    assert torch.equal(merged(**x).logits, reference(**x).logits)
    assert torch.equal(merged.get_input_embeddings().weight, reference.get_input_embeddings().weight)


def test_two_adapters_switch_merge_delete_as_peft():
    case, other = "llama", [4, 6]
    theirs = peft.get_peft_model(base(case), peft.LoraConfig(**fields(case)))
    theirs.add_adapter("b", peft.LoraConfig(**{**fields(case), "trainable_token_indices": other}))
    ours = dt.get_delta_model(base(case), dt.LoraConfig(**fields(case)))
    ours.add_adapter("b", dt.LoraConfig(**{**fields(case), "trainable_token_indices": other}))
    g = torch.Generator().manual_seed(1)
    for name in ("default", "b"):
        mine = ours.adapter_state_dict(name)
        values = {k: torch.randn(v.shape, generator=g) for k, v in mine.items()}
        peft.set_peft_model_state_dict(theirs, values, adapter_name=name)
        with torch.no_grad():
            for k, v in mine.items():
                v.copy_(values[k])
    ours.eval(), theirs.eval()
    x = inputs(case, IDS + other)
    for name in ("b", "default", "b"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        assert torch.equal(ours(**x).logits, theirs(**x).logits), name
    ours.set_adapter(["default", "b"])  # disjoint ids: both rows written in, as peft's layer computes them
    both = ours(**x).logits
    weight = ours.base_model.model.embed_tokens.base_layer.weight
    ours.merge_adapter(["default", "b"])
    assert torch.equal(weight[other], ours.adapter_state_dict("b")[f"base_model.model.model.embed_tokens.{KEY}"])
    torch.testing.assert_close(ours(**x).logits, both, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    ours.set_adapter("default")
    ours.delete_adapter("b")
    assert ours.base_model.model.embed_tokens.adapter_names == ["default"]
    theirs.delete_adapter("b")
    torch.testing.assert_close(ours(**x).logits, theirs(**x).logits, atol=1e-6, rtol=0)  # q_proj's unmerge rounds


def test_overlapping_ids_refused_together_as_peft():
    ours = dt.get_delta_model(base("llama"), dt.LoraConfig(**fields("llama")))
    ours.add_adapter("b", dt.LoraConfig(**{**fields("llama"), "trainable_token_indices": [9, 10]}))
    ours.set_adapter(["default", "b"])
    weight = ours.base_model.model.embed_tokens.base_layer.weight.detach().clone()
    for call in (lambda: ours(**inputs("llama")), lambda: ours.merge_adapter(["default", "b"])):
        with pytest.raises(ValueError, match="Token indices of adapter b are already defined"):
            call()
    assert torch.equal(ours.base_model.model.embed_tokens.base_layer.weight, weight)


@pytest.mark.parametrize("case", ["llama", "llama-tied"])
def test_one_step_changes_only_the_listed_rows(case):
    model = base(case)
    ours = dt.get_delta_model(model, dt.LoraConfig(**fields(case)))
    embedding = ours.base_model.model.embed_tokens
    frozen = embedding.base_layer.weight.detach().clone()
    effective = embedding.weight_with(["default"]).detach().clone()
    ours.train()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    ours(**inputs(case), labels=inputs(case)["input_ids"]).loss.backward()
    opt.step()
    assert torch.equal(embedding.base_layer.weight, frozen)  # the base matrix never moves
    after = embedding.weight_with(["default"]).detach()
    changed = (after != effective).any(1).nonzero().flatten().tolist()
    assert changed == IDS


BAD = [
    ({"trainable_token_indices": [3, 128]}, "token id 128 is out of range for model.embed_tokens"),
    ({"trainable_token_indices": [-1]}, "token id -1 is out of range"),
    ({"trainable_token_indices": {"o_proj": [1]}}, "o_proj is a Linear, not an embedding"),
    ({"trainable_token_indices": {"norm": [1]}}, "input_layernorm is a LlamaRMSNorm, not an embedding"),
    ({"trainable_token_indices": {"nope": [1]}}, "Target modules {'nope'} not found"),
    ({"trainable_token_indices": {"q_proj": [1]}}, "cannot be applied to model.layers.0.self_attn.q_proj"),
    ({"trainable_token_indices": {"embed_tokens": [1]}, "modules_to_save": ["embed_tokens"]}, "trained fully"),
    ({"trainable_token_indices": [1], "modules_to_save": ["embed_tokens"]}, "already adapted by ModulesToSave"),
    ({"trainable_token_indices": {"embed_tokens": [1]}, "target_modules": ["embed_tokens"]}, "already adapted by"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_targets_refused_in_one_line_model_unchanged(extra, message):
    model = base("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    ours = dt.DeltaModel(model)
    config = dt.LoraConfig(**{**fields("llama"), **extra})
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")) as info:
        ours.add_adapter("default", config)
    assert "\n" not in str(info.value)
    assert [n for n, _ in model.named_modules()] == names
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "value,message",
    [
        ([3, 3], "lists token id 3 twice"),
        ([True], "must be a list of token ids"),
        ("embed_tokens", "must be a list of token ids or a dict"),
        ({"embed_tokens": [1.5]}, r"\['embed_tokens'\] must be a list of token ids"),
    ],
)
def test_bad_values_refused_by_the_config(value, message):
    with pytest.raises(ConfigError, match=message):
        dt.LoraConfig(trainable_token_indices=value)


def test_no_token_ids_are_none_as_peft_reads_them():
    """[] (and {"embed_tokens": []}) train no token in peft, which takes them: none, as {} (a refusal until probe 23)."""
    assert dt.LoraConfig(trainable_token_indices=[]).trainable_token_indices is None


def test_untied_lm_head_in_the_dict_and_tied_keys_as_peft():
    """Untied: lm_head trains its own rows (its own tensor in the file). Tied with the same ids: peft leaves the
    lm_head key to the tying (one tensor); tied with other ids: each trains its own rows, no tying."""
    for case, spec in [
        ("llama", {"embed_tokens": IDS, "lm_head": [7, 8]}),
        ("llama-tied", {"embed_tokens": IDS, "lm_head": IDS}),
        ("llama-tied", {"embed_tokens": IDS, "lm_head": [7, 8]}),
    ]:
        theirs = peft.get_peft_model(base(case), peft.LoraConfig(**{**fields(case), "trainable_token_indices": spec}))
        ours = dt.get_delta_model(base(case), dt.LoraConfig(**{**fields(case), "trainable_token_indices": spec}))
        mine = ours.adapter_state_dict()
        assert sorted(mine) == sorted(peft.get_peft_model_state_dict(theirs)), spec
        g = torch.Generator().manual_seed(2)
        values = {k: torch.randn(v.shape, generator=g) for k, v in mine.items()}
        peft.set_peft_model_state_dict(theirs, values)
        with torch.no_grad():
            for k, v in mine.items():
                v.copy_(values[k])
        x = inputs(case, IDS + [7, 8])
        assert torch.equal(ours.eval()(**x).logits, theirs.eval()(**x).logits), (case, spec)


def test_output_embedding_bias_kept_unlike_peft():
    """BERT's MLM decoder is tied to the word embeddings and has a bias: the adapter's logits are the plain model's
    with the rows overwritten, bias included (peft 0.21's F.linear dropped the bias, 0.22 adds it: test_peft22_probe21)."""
    torch.manual_seed(0)
    plain = BertForMaskedLM(tiny_config("bert")).eval()
    with torch.no_grad():
        plain.cls.predictions.bias.normal_()
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    ours = dt.get_delta_model(plain, dt.LoraConfig(r=2, target_modules=["query"], trainable_token_indices=IDS))
    assert isinstance(ours.base_model.cls.predictions.decoder, TrainableTokens)
    rows = ours.adapter_state_dict()[f"base_model.model.bert.embeddings.word_embeddings.{KEY}"]
    with torch.no_grad():
        rows.normal_()
    reference = BertForMaskedLM(tiny_config("bert")).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        reference.bert.embeddings.word_embeddings.weight[IDS] = rows
    x = inputs("bert")
    assert torch.equal(ours(**x).logits, reference(**x).logits)


def test_unload_and_disable_give_the_base_back():
    for case in ("llama-tied", "gpt2"):
        ours, _ = ours_and_theirs(case)
        x = inputs(case)
        with ours.disable_adapter():
            assert torch.equal(ours(**x).logits, base(case)(**x).logits)
        plain = ours.unload()
        assert not any(isinstance(m, TrainableTokens) for m in plain.modules())
        assert torch.equal(plain(**x).logits, base(case)(**x).logits)
        assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight or case == "llama"


def test_layer_and_model_status_equal_peft():
    from dataclasses import asdict

    ours, theirs = ours_and_theirs("llama-tied")
    mine = [asdict(s) for s in ours.get_layer_status()]
    assert [asdict(s) for s in theirs.get_layer_status()] == mine
    assert "model.lm_head.token_adapter" in [s["name"] for s in mine]
    assert asdict(theirs.get_model_status()) == asdict(ours.get_model_status())


def test_auto_save_keeps_no_embedding_copy_when_tokens_train_as_peft(tmp_path):
    """peft's save_embedding_layers="auto": an lm_head target saves the embeddings, unless the adapter trains token
    rows (trainable_token_indices: the point is a small file)."""
    spec = dict(r=2, target_modules=["q_proj", "lm_head"], trainable_token_indices=IDS)
    ours = dt.get_delta_model(base("llama"), dt.LoraConfig(**spec))
    theirs = peft.get_peft_model(base("llama"), peft.LoraConfig(**spec))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine, its = (load_file(tmp_path / f"{who}/adapter_model.safetensors") for who in ("ours", "theirs"))
    assert sorted(mine) == sorted(its)
    assert not any(k.endswith("embed_tokens.weight") or k.endswith("embed_tokens.base_layer.weight") for k in mine)


@pytest.mark.parametrize("family,targets", [("t5", ["q"]), ("bart", ["q_proj"])])
def test_seq2seq_shared_embeddings_equal_peft(family, targets):
    """T5 and BART: the shared matrix, both stacks' embeddings (BART's scaled) and lm_head are one weight: each gets a
    layer, the rows saved once under ``shared``, as peft."""
    spec = dict(r=2, target_modules=targets, trainable_token_indices=IDS, init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_model(family, "seq2seq"), peft.LoraConfig(**spec)).eval()
    ours = dt.get_delta_model(tiny_model(family, "seq2seq"), dt.LoraConfig(**spec)).eval()
    mine = ours.adapter_state_dict()
    assert sorted(mine) == sorted(peft.get_peft_model_state_dict(theirs))
    g = torch.Generator().manual_seed(3)
    values = {k: torch.randn(v.shape, generator=g) for k, v in mine.items()}
    peft.set_peft_model_state_dict(theirs, values)
    with torch.no_grad():
        for k, v in mine.items():
            v.copy_(values[k])
    x = tiny_inputs(family, "seq2seq")
    x["input_ids"][:, :3] = x["decoder_input_ids"][:, :3] = torch.tensor(IDS)
    assert torch.equal(ours(**x).logits, theirs(**x).logits)
    assert sum(isinstance(m, TrainableTokens) for m in ours.modules()) == 4


def test_a_tied_pair_with_ids_of_their_own_is_not_merged():
    """Tied embeddings, ``{"embed_tokens": [9, 11], "lm_head": [7]}``: each layer trains its own rows, and a merge
    writes both sets into the one shared weight, so the embedding would read row 7 and the head rows 9 and 11. peft
    merges (its merged logits 34.55 off its unmerged ones); deltatune refuses, as for any shared weight, and stays
    as it was. The same ids on both (the tying) still merge (the test above). Review 10a."""
    spec = {"embed_tokens": [9, 11], "lm_head": [7]}
    ours = dt.get_delta_model(
        base("llama-tied"), dt.LoraConfig(**{**fields("llama-tied"), "trainable_token_indices": spec})
    )
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "trainable_tokens" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    x = inputs("llama-tied", ids=[9, 11, 7])
    before = ours(**x).logits.detach()
    with pytest.raises(ValueError, match="cannot merge into model.embed_tokens"):
        ours.merge_adapter()
    assert torch.equal(ours(**x).logits, before) and not any(m.merged_adapters for _, m in ours._layers())
