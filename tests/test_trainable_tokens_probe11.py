"""The stand-alone trainable-tokens method (methods/trainable_tokens.py) against peft 0.21.2's TRAINABLE_TOKENS, and
the token layer's items left last session (its ``.weight``, mixed-adapter batches, T5's tied merge).

Reference: peft's TrainableTokensConfig (and LoraConfig with trainable_token_indices) on the same tiny model, every
adapter tensor set to the same random values (one key vocabulary), compared to the bit: both compute
``index_copy`` then the lookup (or the tied output projection)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_inputs, tiny_model

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.methods.trainable_tokens import KEY, TrainableTokensConfig
from deltatune.train.config import apply_overrides, build

peft = pytest.importorskip("peft")
IDS = [3, 5, 9]

CASES = {  # family, task, model overrides, the input embedding's path
    "llama": ("llama", "causal_lm", {}, "model.embed_tokens"),
    "llama-tied": ("llama", "causal_lm", {"tie_word_embeddings": True}, "model.embed_tokens"),
    "gpt2": ("gpt2", "causal_lm", {}, "transformer.wte"),
    "bert": ("bert", "seq_cls", {}, "bert.embeddings.word_embeddings"),
    "t5": ("t5", "seq2seq", {}, "shared"),
}


def base(case: str):
    family, task, overrides, _ = CASES[case]
    return tiny_model(family, task, **overrides)


def inputs(case: str, ids=IDS) -> dict:
    family, task = CASES[case][:2]
    x = tiny_inputs(family, task)
    x["input_ids"][:, : len(ids)] = torch.tensor(ids)  # the listed tokens appear, so their rows get gradients
    if "decoder_input_ids" in x:
        x["decoder_input_ids"][:, : len(ids)] = torch.tensor(ids)
    return x


def same_values(ours: dt.DeltaModel, theirs, name: str = "default", keys: bool = True) -> None:
    """Both adapters' tensors set to one draw (peft's state dict and deltatune's share their keys); every token-rows
    key gets the same draw (a tied layer's key is its source's tensor)."""
    mine, its = ours.adapter_state_dict(name), peft.get_peft_model_state_dict(theirs, adapter_name=name)
    assert sorted(mine) == sorted(its) or not keys
    g = torch.Generator().manual_seed(len(name))
    values = {k: torch.randn(v.shape, generator=g) for k, v in {**its, **mine}.items()}
    rows = [k for k in sorted(values) if k.endswith("trainable_tokens_delta")]
    values.update(dict.fromkeys(rows, values[rows[0]]) if rows else {})
    peft.set_peft_model_state_dict(theirs, values, adapter_name=name)
    with torch.no_grad():
        for k, v in mine.items():
            v.copy_(values[k])


def pair(case: str, keys: bool = True, **fields):
    """(deltatune, peft) with the same trainable-tokens adapter, rows set to one random draw."""
    config = dict(token_indices=IDS, **fields)
    theirs = peft.get_peft_model(base(case), peft.TrainableTokensConfig(**config))
    ours = dt.get_delta_model(base(case), TrainableTokensConfig(**config))
    same_values(ours, theirs, keys=keys)
    return ours.eval(), theirs.eval()


def logits(model, x) -> torch.Tensor:
    return model(**x).logits


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_gradients_counts_and_keys_equal_peft(case):
    ours, theirs = pair(case)
    x = inputs(case)
    mine, its = logits(ours, x), logits(theirs, x)
    assert (mine - logits(base(case), x)).abs().max() > 1e-3  # the rows act
    assert torch.equal(mine, its)
    mine.square().sum().backward()
    its.square().sum().backward()
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    reference = [p.grad for p in theirs.parameters() if p.requires_grad]
    assert len(grads) == len(reference) == 1 and torch.equal(grads[0], reference[0])
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert f"base_model.model.{CASES[case][3]}.{KEY}" in ours.adapter_state_dict()


@pytest.mark.parametrize("case", list(CASES))
def test_files_move_both_ways(case, tmp_path):
    ours, theirs = pair(case)
    x = inputs(case)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "TRAINABLE_TOKENS"
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    )
    in_peft = peft.PeftModel.from_pretrained(base(case), tmp_path / "ours").eval()
    in_ours = dt.DeltaModel.from_pretrained(base(case), str(tmp_path / "theirs")).eval()
    assert torch.equal(logits(in_peft, x), logits(theirs, x))
    assert torch.equal(logits(in_ours, x), logits(ours, x))
    assert isinstance(dt.load_config(str(tmp_path / "theirs")), TrainableTokensConfig)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_unmerge_and_unload_equal_peft(case):
    """T5 ties four modules to one weight (shared, encoder and decoder embed_tokens, lm_head): all read one rows."""
    ours, theirs = pair(case)
    x = inputs(case)
    before, plain = logits(ours, x), logits(base(case), x)
    ours.merge_adapter()
    theirs.merge_adapter()
    emb, its_emb = ours.get_input_embeddings(), theirs.get_input_embeddings()
    assert torch.equal(emb.base_layer.weight, its_emb.base_layer.weight)
    assert torch.equal(logits(ours, x), logits(theirs, x))
    assert (logits(ours, x) - before).abs().max() < 1e-5
    ours.unmerge_adapter()
    assert torch.equal(emb.base_layer.weight, base(case).get_input_embeddings().weight)
    assert torch.equal(logits(ours, x), before)
    with ours.disable_adapter(), theirs.disable_adapter():  # (T5: both 1e-6 off the plain model's, as peft)
        assert torch.equal(logits(ours, x), logits(theirs, x)) and (logits(ours, x) - plain).abs().max() < 1e-5
    merged, its_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    assert type(merged.get_input_embeddings()) is torch.nn.Embedding
    assert torch.equal(logits(merged, x), logits(its_merged, x))


def test_lora_tokens_merge_on_t5_equals_peft():
    """LoRA's trainable_token_indices on T5 (three tied layers read the shared rows) merges as peft: failed on HEAD
    (check_not_shared: the encoder's tied layer did not agree with the decoder's)."""
    spec = dict(r=2, target_modules=["q"], trainable_token_indices=IDS, init_lora_weights=False)
    theirs = peft.get_peft_model(base("t5"), peft.LoraConfig(**spec))
    ours = dt.get_delta_model(base("t5"), dt.LoraConfig(**spec))
    same_values(ours, theirs)
    x = inputs("t5")
    assert torch.equal(logits(ours.eval(), x), logits(theirs.eval(), x))
    merged, its_merged = ours.merge_and_unload(), theirs.merge_and_unload()
    assert (logits(merged, x) - logits(its_merged, x)).abs().max() < 1e-5


@pytest.mark.parametrize("case", ["llama", "llama-tied"])
def test_one_step_moves_only_the_listed_rows_as_peft(case):
    ours, theirs = pair(case)
    x = inputs(case)
    for model in (ours, theirs):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        logits(model, x).square().mean().backward()
        opt.step()
    (rows,) = [p for p in ours.parameters() if p.requires_grad]
    (its_rows,) = [p for p in theirs.parameters() if p.requires_grad]
    assert torch.equal(rows, its_rows)
    weight = base(case).get_input_embeddings().weight
    emb = ours.get_input_embeddings()
    assert torch.equal(emb.base_layer.weight, weight)  # the base stays frozen
    moved = (emb.weight_with(["default"]) != weight).any(dim=1).nonzero().flatten().tolist()
    assert moved == IDS


def test_several_adapters_switching_and_deleting_as_peft():
    """On the untied Llama (peft's second adapter on a tied model nests a layer in lm_head.base_layer); both active
    on the tied one, against the plain model with both adapters' rows written in."""
    ours, theirs = pair("llama")
    other = dict(token_indices=[4, 6], init_weights=False)
    torch.manual_seed(1)
    theirs.add_adapter("b", peft.TrainableTokensConfig(**other))
    ours.add_adapter("b", TrainableTokensConfig(**other))
    same_values(ours, theirs, "b")
    x = inputs("llama", [4, 6, 3])
    for name in ("b", "default", "b"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        assert torch.equal(logits(ours, x), logits(theirs, x)), name
    ours.delete_adapter("b")
    theirs.delete_adapter("b")
    assert torch.equal(logits(ours, x), logits(theirs, x)) and list(ours.peft_config) == ["default"]
    ours, _ = pair("llama-tied")
    ours.add_adapter("b", TrainableTokensConfig(**other))
    ours.set_adapter("default")
    first = logits(ours, x)
    ours.set_adapter(["default", "b"])  # disjoint ids compute together (peft's set_adapter takes one name here)
    both = logits(ours, x)
    by_hand = base("llama-tied")
    with torch.no_grad():
        for name in ("default", "b"):
            rows = ours.adapter_state_dict(name)[f"base_model.model.model.embed_tokens.{KEY}"]
            by_hand.model.embed_tokens.weight[ours.peft_config[name].token_indices] = rows
    assert (both - logits(by_hand, x)).abs().max() < 1e-5 and (both - first).abs().max() > 1e-3


@pytest.mark.parametrize(
    "case, targets",
    [
        ("llama", ["lm_head"]),  # an untied output embedding alone
        ("llama", ["embed_tokens", "lm_head"]),  # both, each with its own rows
        ("llama", r"model\.embed_tokens"),  # a regex, matched against the whole name
    ],
)
def test_target_modules_as_peft(case, targets):
    ours, theirs = pair(case, target_modules=targets, init_weights=False)
    x = inputs(case)
    assert torch.equal(logits(ours, x), logits(theirs, x))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_both_tied_modules_named_read_one_set_of_rows():
    """Naming embed_tokens and lm_head on a tied model is the default (lm_head tied to the embedding's rows), saved
    alike. peft 0.21 nests a tied layer inside lm_head's and its forward fails ("wraps an unknown layer type"):
    deltatune differed on purpose; peft 0.22 runs it, as deltatune."""
    named = dt.get_delta_model(
        base("llama-tied"),
        TrainableTokensConfig(token_indices=IDS, target_modules=["embed_tokens", "lm_head"], init_weights=False),
    )
    default, _ = pair("llama-tied")
    with torch.no_grad():
        for k, v in named.adapter_state_dict().items():
            v.copy_(default.adapter_state_dict()[k])
    x = inputs("llama-tied")
    assert torch.equal(logits(named.eval(), x), logits(default, x))
    assert named.get_nb_trainable_parameters() == default.get_nb_trainable_parameters()
    theirs = peft.get_peft_model(
        base("llama-tied"), peft.TrainableTokensConfig(token_indices=IDS, target_modules=["embed_tokens", "lm_head"])
    )
    if tuple(int(v) for v in peft.__version__.split(".")[:2]) < (0, 22):
        with pytest.raises(ValueError, match="wraps an unknown layer type"):
            theirs(**x)
        return
    with torch.no_grad():  # peft 0.22 runs it: its rows, moved, read into ours give its logits
        for p in theirs.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1 * p.requires_grad)
    dt.set_peft_model_state_dict(named, peft.get_peft_model_state_dict(theirs))
    assert torch.equal(logits(named.eval(), x), logits(theirs.eval(), x))


@pytest.mark.parametrize("case", list(CASES))
def test_init_weights_true_starts_as_the_base(case):
    """Exactly, but on T5, where both deltatune and peft are 1e-6 off the plain model (and equal to each other)."""
    x = inputs(case)
    ours = dt.get_delta_model(base(case), TrainableTokensConfig(token_indices=IDS)).eval()
    theirs = peft.get_peft_model(base(case), peft.TrainableTokensConfig(token_indices=IDS)).eval()
    assert torch.equal(logits(ours, x), logits(theirs, x))
    diff = (logits(ours, x) - logits(base(case), x)).abs().max()
    assert diff == 0 if case != "t5" else diff < 1e-5


def test_weight_shows_what_peft_shows():
    """LoRA's TrainableTokensWrapper.weight in peft has the active rows written in, the base weight when disabled
    (failed on HEAD: deltatune showed the base weight for both)."""
    spec = dict(r=2, target_modules=["q_proj"], trainable_token_indices=IDS, init_lora_weights=False)
    theirs = peft.get_peft_model(base("llama"), peft.LoraConfig(**spec))
    ours = dt.get_delta_model(base("llama"), dt.LoraConfig(**spec))
    same_values(ours, theirs)
    mine, its = ours.get_input_embeddings(), theirs.get_input_embeddings()
    assert torch.equal(mine.weight, its.weight)
    assert not torch.equal(mine.weight, base("llama").get_input_embeddings().weight)
    with ours.disable_adapter(), theirs.disable_adapter():
        assert torch.equal(mine.weight, its.weight)


def test_stand_alone_weight_is_the_base_weight_as_peft():
    ours, theirs = pair("llama")
    assert torch.equal(ours.get_input_embeddings().weight, theirs.get_input_embeddings().weight)
    assert torch.equal(ours.get_input_embeddings().weight, base("llama").get_input_embeddings().weight)


def test_mixed_adapter_batch_through_the_token_layer():
    """LoRA with trainable_token_indices in a mixed batch equals peft's (its wrapper routes rows; deltatune refused on
    HEAD). The stand-alone method routes too; peft's TRAINABLE_TOKENS ignores adapter_names (every row gets the
    active adapter): deltatune differs on purpose, each row equal to that adapter's own run."""
    spec = dict(r=2, target_modules=["q_proj"], trainable_token_indices=IDS, init_lora_weights=False)
    theirs = peft.get_peft_model(base("llama-tied"), peft.LoraConfig(**spec)).eval()
    ours = dt.get_delta_model(base("llama-tied"), dt.LoraConfig(**spec)).eval()
    same_values(ours, theirs)
    x = inputs("llama-tied")
    rows = ["default", "__base__"]
    assert torch.equal(ours(**x, adapter_names=rows).logits, theirs(**x, adapter_names=rows).logits)
    ours, _ = pair("llama-tied")
    ours.add_adapter("b", TrainableTokensConfig(token_indices=[3, 4], init_weights=False))
    mixed = ours(**x, adapter_names=["b", "__base__"]).logits
    ours.set_adapter("b")
    assert torch.equal(mixed[0], logits(ours, x)[0])
    with ours.disable_adapter():
        assert torch.equal(mixed[1], logits(ours, x)[1])


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(token_indices=[]), "token_indices is empty"),
        (dict(token_indices=[3, 3]), "token_indices lists token id 3 twice"),
        (dict(token_indices=[3, "a"]), "token_indices must be a list of token ids"),
        (dict(token_indices=[3, 10_000]), "token_indices: token id 10000 is out of range for model.embed_tokens"),
        (dict(token_indices=[3], target_modules=["q_proj"]), "is a Linear, not an embedding"),
        (dict(token_indices=[3], target_modules=["nowhere"]), "Target modules ['nowhere'] not found"),
    ],
)
def test_bad_input_is_one_line_and_leaves_the_model_alone(fields, words):
    model = base("llama")
    with pytest.raises(ConfigError) as info:
        dt.get_delta_model(model, TrainableTokensConfig(**fields))
    assert words in str(info.value) and "\n" not in str(info.value)
    assert type(model.model.embed_tokens) is torch.nn.Embedding


def test_recipe_method_trainable_tokens():
    raw = apply_overrides(
        {"stage": "sft", "model": {"name_or_path": "x"}, "method": {"name": "trainable_tokens"}},
        ["method.token_indices=[3, 5, 9]", "method.init_weights=false"],
    )
    config = build(raw).method_config("CAUSAL_LM")
    assert isinstance(config, TrainableTokensConfig)
    assert (config.token_indices, config.init_weights, config.task_type) == (IDS, False, "CAUSAL_LM")
    model = dt.get_delta_model(base("llama"), config)
    assert model.get_nb_trainable_parameters()[0] == 3 * 32
    with pytest.raises(ConfigError, match="unknown key 'method.token_ids'"):
        build({"stage": "sft", "method": {"name": "trainable_tokens", "token_ids": [3]}}).method_config()


def test_status_as_peft():
    theirs = peft.get_peft_model(base("llama-tied"), peft.TrainableTokensConfig(token_indices=IDS))
    ours = dt.get_delta_model(base("llama-tied"), TrainableTokensConfig(token_indices=IDS))
    from dataclasses import asdict

    assert asdict(ours.get_model_status()) == asdict(theirs.get_model_status())
    assert [asdict(s) for s in ours.get_layer_status()] == [asdict(s) for s in theirs.get_layer_status()]


def test_cli_trains_saves_and_merges_method_trainable_tokens(tmp_path):
    """``method: {name: trainable_tokens}`` through ``deltatune train`` and ``deltatune merge``: the merged model's
    embedding differs from the base in the listed rows alone, which are the saved rows."""
    from safetensors.torch import load_file
    from tiny import save_tiny
    from transformers import AutoModelForCausalLM

    from deltatune.cli import main

    model = save_tiny(tmp_path / "m", "llama", "causal_lm")
    rows = [{"prompt": "hi", "completion": "hello there"}, {"prompt": "bye", "completion": "see you"}] * 4
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = [101, 102, 7592]  # [CLS], [SEP] (not in the rendered rows: no gradient), "hello" in the MiniLM vocabulary
    (tmp_path / "r.yaml").write_text(
        f"stage: sft\nmodel: {{name_or_path: {model}}}\nmethod: {{name: trainable_tokens, token_indices: {ids}}}\n"
        f"data: {{train: {tmp_path / 't.jsonl'}, max_length: 32}}\ntrain: {{batch_size: 4}}\n"
    )
    out = tmp_path / "run"
    args = ["train.max_steps=2", "train.report_to=[none]", "train.lr=1e-1", f"output.dir={out}"]
    assert main(["train", str(tmp_path / "r.yaml"), *args]) == 0
    adapter = next(out.rglob("adapter_config.json")).parent
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "TRAINABLE_TOKENS"
    saved = load_file(adapter / "adapter_model.safetensors")[f"base_model.model.model.embed_tokens.{KEY}"]
    assert main(["merge", "--adapter", str(adapter), "--model", model, "--out", str(tmp_path / "merged")]) == 0
    before = AutoModelForCausalLM.from_pretrained(model).get_input_embeddings().weight
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").get_input_embeddings().weight
    assert (after != before).any(dim=1).nonzero().flatten().tolist() == [7592]
    assert torch.equal(after[ids], saved)


def test_overlapping_adapters_refused_in_peft_words_naming_no_lora_field():
    ours = dt.get_delta_model(base("llama"), TrainableTokensConfig(token_indices=IDS))
    ours.add_adapter("b", TrainableTokensConfig(token_indices=[9, 11]))
    with pytest.raises(ValueError, match="Token indices of adapter b are already defined") as info:
        ours.set_adapter(["default", "b"])
        ours(**inputs("llama"))
    assert "trainable_token_indices" not in str(info.value) and "\n" not in str(info.value)


def test_seq_cls_trains_the_new_head_where_peft_leaves_it_frozen():
    """A difference kept on purpose: task_type SEQ_CLS trains (and saves) the classifier beside the rows, as every
    deltatune method does; peft's TrainableTokensConfig has no modules_to_save, so its new head stays random and frozen
    (and peft, loading deltatune's file, ignores the head, with a warning about modules_to_save)."""
    config = dict(token_indices=IDS, task_type="SEQ_CLS")
    theirs = peft.get_peft_model(base("bert"), peft.TrainableTokensConfig(**config))
    ours = dt.get_delta_model(base("bert"), TrainableTokensConfig(**config))
    assert theirs.get_nb_trainable_parameters()[0] == 3 * 32
    assert ours.get_nb_trainable_parameters()[0] == 3 * 32 + 32 * 3 + 3
    assert ours.peft_config["default"].modules_to_save == ["classifier"]


@pytest.mark.parametrize("targets", [["lm_head"], ["embed_tokens", "lm_head"]])
def test_an_lm_head_target_saves_no_embedding_copy_as_peft(targets, tmp_path):
    """peft's save_embedding_layers="auto" writes no embedding matrix beside a TRAINABLE_TOKENS adapter (failed on
    HEAD's file: deltatune wrote lm_head.base_layer.weight and embed_tokens.base_layer.weight)."""
    from safetensors.torch import load_file

    config = dict(token_indices=IDS, target_modules=targets)
    peft.get_peft_model(base("llama"), peft.TrainableTokensConfig(**config)).save_pretrained(tmp_path / "theirs")
    dt.get_delta_model(base("llama"), TrainableTokensConfig(**config)).save_pretrained(tmp_path / "ours")
    keys = [sorted(load_file(tmp_path / side / "adapter_model.safetensors")) for side in ("ours", "theirs")]
    assert (
        keys[0]
        == keys[1]
        == sorted(
            f"base_model.model.{t}.{KEY}" for t in ("model.embed_tokens", "lm_head") if t.endswith(tuple(targets))
        )
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_init_weights_false_draws_peft_rows_from_one_seed(dtype):
    """The random rows (init_weights=False) are peft's to the bit from the same seed: drawn in the base's dtype, kept
    in float32 with autocast_adapter_dtype=True (get_peft_model's default; deltatune's default keeps the base's)."""
    spec = TrainableTokensConfig(token_indices=IDS, init_weights=False)
    torch.manual_seed(7)
    theirs = peft.get_peft_model(
        base("llama").to(dtype), peft.TrainableTokensConfig(token_indices=IDS, init_weights=False)
    )
    torch.manual_seed(7)
    ours = dt.get_delta_model(base("llama").to(dtype), spec, autocast_adapter_dtype=True)
    torch.manual_seed(7)
    kept = dt.get_delta_model(base("llama").to(dtype), spec)
    (mine,), (its,), (own,) = (
        m.values()
        for m in (ours.adapter_state_dict(), peft.get_peft_model_state_dict(theirs), kept.adapter_state_dict())
    )
    assert mine.dtype == its.dtype == torch.float32 and torch.equal(mine, its)
    assert own.dtype == dtype and torch.equal(own.float(), its)


# A second adapter on a tied model (review 11d): the tied output embedding was found by ``m.weight is weight``, and
# an active LoRA adapter's ``.weight`` is a fresh tensor, so lm_head.base_layer matched and a second token layer was
# nested inside the first (every forward then failed: 'TrainableTokens' object has no attribute 'bias').
TIED = ["llama-tied", "gpt2", "t5"]
LORA_TARGETS = {"llama-tied": ["q_proj"], "gpt2": ["c_attn"], "t5": ["q"]}


def two_lora(case: str, how: str, tmp_path):
    """(deltatune, peft) with LoRA adapters "a" ([3, 5]) and "b" ([4, 9]) training token rows, tensors set to one
    draw; ``how``: added (add_adapter) or loaded from peft's files (from_pretrained + load_adapter, as serve does)."""

    def spec(ids):
        return dict(r=2, target_modules=LORA_TARGETS[case], trainable_token_indices=ids, init_lora_weights=False)

    torch.manual_seed(0)
    theirs = peft.get_peft_model(base(case), peft.LoraConfig(**spec([3, 5])), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(**spec([4, 9])))
    if how == "add":
        ours = dt.get_delta_model(base(case), dt.LoraConfig(**spec([3, 5])), adapter_name="a")
        ours.add_adapter("b", dt.LoraConfig(**spec([4, 9])))
        for name in ("a", "b"):
            same_values(ours, theirs, name)
    else:
        for name in ("a", "b"):
            theirs.set_adapter(name)
            theirs.save_pretrained(tmp_path / name, selected_adapters=[name])
        folder = (lambda n: tmp_path / n / n) if (tmp_path / "b" / "b").is_dir() else (lambda n: tmp_path / n)
        ours = dt.DeltaModel.from_pretrained(base(case), str(folder("a")), adapter_name="a")
        ours.load_adapter(str(folder("b")), adapter_name="b")
    return ours.eval(), theirs.eval()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding (LoRA's mixed-batch paths sum in another order, T5 a row alone or in a pair 5e-6 apart): 1e-5 of the largest logit."""
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max())


def tokens_layers(model) -> list[str]:
    from deltatune.methods._trainable_tokens import TrainableTokens

    return [n for n, m in model.named_modules() if isinstance(m, TrainableTokens)]


@pytest.mark.parametrize("how", ["add", "load"])
@pytest.mark.parametrize("case", TIED)
def test_second_lora_token_adapter_on_a_tied_model_equals_peft(case, how, tmp_path):
    ours, theirs = two_lora(case, how, tmp_path)
    assert not [n for n in tokens_layers(ours) if ".base_layer" in n]  # no token layer nested in another
    x = inputs(case, [3, 5, 9, 4])
    outs = {}
    for name in ("a", "b", "a"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        outs[name] = logits(ours, x)
        assert close(outs[name], logits(theirs, x)), name
    assert (outs["a"] - outs["b"]).abs().max() > 1e-3
    n = x["input_ids"].shape[0]
    rows = (["b", "a", "__base__"] * n)[:n]
    mixed = ours(**x, adapter_names=rows).logits
    assert close(mixed, theirs(**x, adapter_names=rows).logits)
    assert close(mixed[0], outs["b"][0])
    ours.set_adapter("b")
    theirs.set_adapter("b")
    ours.merge_adapter()
    theirs.merge_adapter()
    merged = theirs.get_input_embeddings().token_adapter.base_layer.weight
    assert torch.equal(ours.get_input_embeddings().base_layer.weight, merged)
    assert (logits(ours, x) - logits(theirs, x)).abs().max() < 1e-5
    ours.unmerge_adapter()
    assert torch.equal(ours.get_input_embeddings().base_layer.weight, base(case).get_input_embeddings().weight)
    assert close(logits(ours, x), outs["b"])


@pytest.mark.parametrize("case", TIED)
def test_two_stand_alone_token_adapters_on_a_tied_model(case):
    """The stand-alone method's second adapter on a tied model: one token layer each (none nested), each adapter's
    logits those of the plain model with its rows written in, the pair together both rows."""
    ours, _ = pair(case)
    torch.manual_seed(1)
    ours.add_adapter("b", TrainableTokensConfig(token_indices=[4, 6], init_weights=False))
    ours.add_adapter("c", dt.LoraConfig(r=2, target_modules=LORA_TARGETS[case], trainable_token_indices=[7]))
    assert not [n for n in tokens_layers(ours) if ".base_layer" in n]
    x = inputs(case, [4, 6, 3, 7])
    key = f"base_model.model.{CASES[case][3]}."
    for names in (["default"], ["b"], ["default", "b"]):
        ours.set_adapter(names if len(names) > 1 else names[0])
        by_hand = base(case)
        with torch.no_grad():
            for name in names:
                ids = ours.peft_config[name].token_indices
                by_hand.get_input_embeddings().weight[ids] = ours.adapter_state_dict(name)[key + KEY]
        assert (logits(ours, x) - logits(by_hand, x)).abs().max() < 1e-5, names


@pytest.mark.parametrize(
    "fields", [{}, {"padding_idx": 5}, {"padding_idx": 7}, {"max_norm": 1.0}, {"scale_grad_by_freq": True}]
)
def test_lookup_builds_no_vocab_copy_and_equals_peft_formula(fields, monkeypatch):
    """The token layer's lookup swaps the listed tokens' rows into the base's lookup instead of building E' (a
    vocab x d copy per forward: 22x slower on a 32000 x 64 embedding); values and gradients equal peft's
    F.embedding(x, E.index_copy(0, ids, V)) to the bit. A padding id among the listed ones (no gradient in peft),
    max_norm (renorms the looked-up rows) and scale_grad_by_freq take peft's path."""
    from deltatune.methods._trainable_tokens import TrainableTokens

    torch.manual_seed(0)
    emb = torch.nn.Embedding(40, 8, **fields).requires_grad_(False)
    layer = TrainableTokens(emb)
    layer.add("a", [3, 5, 9], init_weights=False)
    layer.add("b", [4, 6], init_weights=False)
    layer.set_adapters(["a", "b"])
    x = torch.tensor([[3, 5, 1, 9, 9], [4, 6, 7, 0, 3]])
    copies = []
    monkeypatch.setattr(TrainableTokens, "weight_with", lambda s, n: copies.append(n) or s.base_layer.weight)
    mine = layer(x)
    monkeypatch.undo()
    assert len(copies) == (0 if fields in ({}, {"padding_idx": 7}) else 1)
    if copies:
        mine = layer(x)
    W = emb.weight.detach().clone()
    V = {n: layer.trainable_tokens_delta[n].detach().clone().requires_grad_(True) for n in ("a", "b")}
    ref = W.index_copy(0, torch.tensor([3, 5, 9]), V["a"]).index_copy(0, torch.tensor([4, 6]), V["b"])
    its = torch.nn.functional.embedding(x, ref, emb.padding_idx, None, 2.0, emb.scale_grad_by_freq)
    if emb.max_norm is None:
        assert torch.equal(mine, its)
    else:  # peft renorms its copy; ours renorms the copy too: the base stays as it was
        assert torch.equal(emb.weight, W) and (mine.norm(dim=-1) <= 1.0 + 1e-6).all()
    w = torch.randn(mine.shape, generator=torch.Generator().manual_seed(1))
    (mine * w).sum().backward()
    (its * w).sum().backward()
    for n in ("a", "b"):
        assert torch.equal(layer.trainable_tokens_delta[n].grad, V[n].grad), n
