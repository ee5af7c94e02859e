"""Same weights -> same logits as PEFT, and adapter files that move both ways between deltatune and PEFT.

Two base models with identical weights come from the same seed (tiny_model). Every adapter is non-zero
(init_lora_weights=False), so a key, scaling or layout mismatch shows in the logits.
"""

from __future__ import annotations

import pytest
import torch
from matrix import task_type
from tiny import output_of, tiny_inputs, tiny_model
from tolerances import ATOL

import deltatune as dt
from deltatune.config import ConfigError

peft = pytest.importorskip("peft")

ATOL32 = ATOL[torch.float32]

CASES = [
    pytest.param("llama", {}, id="llama"),
    pytest.param("qwen2", {}, id="qwen2"),
    pytest.param("gpt2", {}, id="gpt2"),
    pytest.param("opt", {}, id="opt"),
    pytest.param("bert", {}, id="bert-seq-cls"),  # SEQ_CLS: the classifier is added to modules_to_save
    pytest.param("roberta", {"modules_to_save": ["classifier"]}, id="roberta-seq-cls-modules-to-save"),
    pytest.param("t5", {}, id="t5"),
    pytest.param("bart", {}, id="bart"),
    pytest.param("llama", {"use_dora": True}, id="llama-dora"),
    pytest.param("gpt2", {"use_dora": True}, id="gpt2-dora"),
    pytest.param("bert", {"use_dora": True}, id="bert-dora"),
    pytest.param("llama", {"target_modules": "all-linear"}, id="llama-all-linear"),
    pytest.param("bert", {"target_modules": "all-linear"}, id="bert-all-linear"),  # PEFT's all-linear has the pooler
    # "dense" also names a layer inside the classifier head, which trains in full and is no LoRA target
    pytest.param("roberta", {"target_modules": ["query", "dense"]}, id="roberta-target-inside-head"),
    pytest.param("roberta", {"target_modules": "all-linear"}, id="roberta-all-linear"),
    pytest.param("qwen2", {"use_rslora": True}, id="qwen2-rslora"),
    pytest.param("qwen2", {"bias": "lora_only"}, id="qwen2-bias-lora-only"),
    pytest.param("gpt2", {"bias": "all"}, id="gpt2-bias-all"),
    # every bias trains, the classifier's copy and its frozen original too: PEFT's file names the copy's without the
    # adapter's name (classifier.modules_to_save.bias), beside the copy's own classifier.bias
    pytest.param("bert", {"bias": "all"}, id="bert-seq-cls-bias-all"),
    pytest.param(
        "llama",
        {
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"v_proj": 2, "down_proj": 6},
            "alpha_pattern": {"q_proj": 16},
        },
        id="llama-rank-alpha-pattern",
    ),
]


def _fields(family: str, extra: dict) -> dict:
    return {"r": 4, "lora_alpha": 8, "task_type": task_type(family), "init_lora_weights": False, **extra}


def _peft_state(model) -> dict[str, torch.Tensor]:
    return peft.get_peft_model_state_dict(model)


@pytest.mark.parametrize("family, extra", CASES)
def test_deltatune_file_loads_in_peft(family, extra, tmp_path):
    inputs = tiny_inputs(family)
    ours = dt.get_delta_model(tiny_model(family), dt.LoraConfig(**_fields(family, extra))).eval()
    expected = output_of(ours, inputs)
    assert (expected - output_of(tiny_model(family), inputs)).abs().max() > ATOL32
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path).eval()
    assert set(_peft_state(theirs)) == set(ours.adapter_state_dict())
    torch.testing.assert_close(output_of(theirs, inputs), expected, atol=ATOL32, rtol=0)


@pytest.mark.parametrize("family, extra", CASES)
def test_peft_file_loads_in_deltatune(family, extra, tmp_path):
    inputs = tiny_inputs(family)
    theirs = peft.get_peft_model(tiny_model(family), peft.LoraConfig(**_fields(family, extra))).eval()
    expected = output_of(theirs, inputs)
    assert (expected - output_of(tiny_model(family), inputs)).abs().max() > ATOL32
    theirs.save_pretrained(tmp_path)

    ours = dt.DeltaModel.from_pretrained(tiny_model(family), tmp_path).eval()
    assert set(ours.adapter_state_dict()) == set(_peft_state(theirs))
    torch.testing.assert_close(output_of(ours, inputs), expected, atol=ATOL32, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_merged_weights_match_peft(family, tmp_path):
    """merge_and_unload gives the same plain weights as PEFT's (same adapter, loaded from one file)."""
    theirs = peft.get_peft_model(
        tiny_model(family), peft.LoraConfig(**_fields(family, {"use_dora": family == "gpt2"}))
    )
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(tiny_model(family), tmp_path)
    a = theirs.merge_and_unload().state_dict()
    b = ours.merge_and_unload().state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=ATOL32, rtol=0, msg=key)


def test_modules_to_save_match_by_plain_suffix_as_in_peft(tmp_path):
    """peft matches modules_to_save by a plain suffix: "norm" is also every *_layernorm, and SEQ_CLS's "classifier"
    is DistilBERT's (new, random) pre_classifier too. deltatune took a dotted suffix: peft's trained layernorm copies
    were written into deltatune's base weights (disable_adapter 0.25 off the base), deltatune's own file crashed
    peft's loader, and DistilBERT's pre_classifier trained nothing and was not saved."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                 init_lora_weights=False, modules_to_save=["norm"])).eval()  # fmt: skip
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "modules_to_save.default" in n:
                p.add_(torch.randn_like(p) * 0.5)
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path / "peft").eval()
    inputs, base = tiny_inputs("llama"), output_of(tiny_model("llama"), tiny_inputs("llama"))
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=ATOL32, rtol=0)
    with ours.disable_adapter():
        torch.testing.assert_close(output_of(ours, inputs), base, atol=0, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours").eval()
    torch.testing.assert_close(output_of(again, inputs), output_of(theirs, inputs), atol=ATOL32, rtol=0)

    config = AutoConfig.for_model("distilbert", dim=32, n_layers=1, n_heads=4, hidden_dim=48, vocab_size=128,
                                  max_position_embeddings=64, pad_token_id=0, num_labels=3)  # fmt: skip
    trained = []
    for lib in (dt, peft):
        torch.manual_seed(0)
        model = (dt.get_delta_model if lib is dt else peft.get_peft_model)(
            AutoModelForSequenceClassification.from_config(config), lib.LoraConfig(task_type="SEQ_CLS", r=2,
            target_modules=["q_lin"]))  # fmt: skip
        trained.append(sorted(n.split(".modules_to_save")[0].split("model.")[-1] for n, p in model.named_parameters()
                              if p.requires_grad and "lora_" not in n))  # fmt: skip
    assert trained[0] == trained[1] and "pre_classifier" in trained[0]


def test_bart_classification_head_is_trained_and_saved(tmp_path):
    """BART's (and T5's) sequence classifier is a new, random classification_head: it was neither trained nor saved
    (all-linear even put LoRA on it), so the saved adapter gave other logits on every fresh load of the base. A peft
    adapter of such a model (no head in its file) still loads as peft saved it."""
    from tiny import tiny_config
    from transformers import AutoModel, AutoModelForSequenceClassification

    AutoModel.from_config(tiny_config("bart", pad_token_id=1)).save_pretrained(tmp_path / "base")

    def load(seed: int):  # the head drawn anew at every load, as from a base checkpoint
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3).eval()

    inputs = tiny_inputs("bart", "seq_cls")
    inputs["input_ids"][:, -1] = 2  # BART classifies at its end-of-sequence token
    model = dt.get_delta_model(load(1), dt.LoraConfig(task_type="SEQ_CLS", r=2, init_lora_weights=False))
    assert model.peft_config["default"].modules_to_save == ["classification_head"]
    model.save_pretrained(tmp_path / "ours")
    for lib in (dt.DeltaModel, peft.PeftModel):
        again = lib.from_pretrained(load(2), tmp_path / "ours").eval()
        torch.testing.assert_close(output_of(again, inputs), output_of(model, inputs), atol=ATOL32, rtol=0)
    theirs = peft.get_peft_model(load(3), peft.LoraConfig(task_type="SEQ_CLS", r=2, init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.DeltaModel.from_pretrained(load(3), tmp_path / "peft").eval()
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=ATOL32, rtol=0)


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_lora_on_a_scaled_embedding_scales_its_update(family, tmp_path):
    """Gemma's embedding returns W[x] * sqrt(hidden) (and BART's with scale_embedding): the LoRA term was added
    unscaled, W[x] s + dW[x] for (W + dW)[x] s, so peft's adapter computed otherwise here (logits 0.04-0.17 off) and
    merging changed the logits. Now as peft, and as merged."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=48, vocab_size=128, head_dim=8, tie_word_embeddings=False)  # fmt: skip
    sizes |= {"query_pre_attn_scalar": 8} if family != "gemma" else {}

    def base():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **sizes)).eval()

    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["embed_tokens", "q_proj"])
    theirs = peft.get_peft_model(base(), config).eval()
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(base(), tmp_path).eval()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        assert (want - base()(input_ids=ids).logits).abs().max() > 0.1
        torch.testing.assert_close(ours(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.merge_and_unload()(input_ids=ids).logits, want, atol=1e-5, rtol=0)


def test_two_adapters_with_their_own_heads_cannot_compute_together():
    """Each adapter's copy of the classifier replaces the module, so two cannot add up: peft refuses them active
    together, and deltatune refuses a forward or a merge with both (it used the first one's head silently). Both
    may be active to train in one mixed batch, where each row picks its own."""
    models = []
    for lib in (dt, peft):
        config = lib.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj"])
        model = (dt.get_delta_model if lib is dt else peft.get_peft_model)(tiny_model("llama", "seq_cls"), config)
        model.add_adapter("b", lib.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj"]))
        models.append(model)
    ours, theirs = models
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        theirs.base_model.set_adapter(["default", "b"])
    inputs = tiny_inputs("llama", "seq_cls", batch=2)
    ours.set_adapter(["default", "b"])
    said = r"adapters '(default|b)' and '(default|b)' each have their own copy of {} \(modules_to_save\)"
    with pytest.raises(ValueError, match=said.format("Linear")):
        ours(**inputs)
    with pytest.raises(ValueError, match=said.format("'score'")):
        ours.merge_and_unload(["b", "default"])
    assert not ours._merged()
    with torch.no_grad():
        ours.base_model.score.modules_to_save["b"].weight.add_(1.0)  # b's head differs from default's
    rows = ours(**inputs, adapter_names=["b", "default"]).logits
    for i, name in enumerate(["b", "default"]):
        ours.set_adapter(name)
        alone = ours(**{k: v[i : i + 1] for k, v in inputs.items()}).logits
        torch.testing.assert_close(rows[i : i + 1], alone, atol=ATOL32, rtol=0)
    assert (alone - ours(**inputs, adapter_names=["b", "b"]).logits[1:]).abs().max() > 0.1


@pytest.mark.parametrize("dora", [(False, True), (True, True), (True, False)])
def test_stacked_adapters_with_dora_merge_to_their_unmerged_output_and_peft(dora, tmp_path):
    """Two adapters active on one layer, one or both DoRA: the merged model computes as the unmerged one and as
    peft's merge. DoRA's norm was taken of a weight already holding the adapter merged before it (7e-3 off)."""
    ours = dt.get_delta_model(
        tiny_model("llama"), dt.LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"], use_dora=dora[0])
    ).eval()
    ours.add_adapter("b", dt.LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"], use_dora=dora[1]))
    ours.set_adapter(["default", "b"])
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    theirs.load_adapter(tmp_path / "b", "b")
    theirs.base_model.set_adapter(["default", "b"])
    inputs = tiny_inputs("llama")
    unmerged = output_of(ours, inputs)
    torch.testing.assert_close(output_of(theirs, inputs), unmerged, atol=ATOL32, rtol=0)
    ours.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(output_of(ours, inputs), unmerged, atol=ATOL32, rtol=0)
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=ATOL32, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(output_of(ours, inputs), unmerged, atol=ATOL32, rtol=0)


def _peft_key(name: str) -> str:  # PEFT's file key of a parameter
    return name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


@pytest.mark.parametrize("family, dora", [("llama", False), ("llama", True), ("gpt2", True)])
def test_training_step_matches_peft(family, dora, tmp_path):
    """In train mode with dropout (same seed, same masks) the logits and every adapter gradient match PEFT's."""
    fields = _fields(family, {"lora_dropout": 0.5, "use_dora": dora})
    no_dropout = {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0} if family == "gpt2" else {}
    theirs = peft.get_peft_model(tiny_model(family, **no_dropout), peft.LoraConfig(**fields))
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(tiny_model(family, **no_dropout), tmp_path, is_trainable=True)
    theirs.train()
    ours.train()
    inputs = tiny_inputs(family)
    torch.manual_seed(5)
    expected = theirs(**inputs).logits
    torch.manual_seed(5)
    logits = ours(**inputs).logits
    torch.testing.assert_close(logits, expected, atol=ATOL32, rtol=0)
    expected.sum().backward()
    logits.sum().backward()

    their_grads = {_peft_key(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {k: p.grad for k, p in ours.adapter_state_dict().items()}
    assert our_grads.keys() == their_grads.keys()
    for key, grad in their_grads.items():
        torch.testing.assert_close(our_grads[key], grad, atol=ATOL32, rtol=0, msg=key)


def _dora_step(model, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train-mode logits of one seeded forward (under autocast to ``dtype``) and the adapter's gradients after it."""
    model.train()
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits = model(**tiny_inputs("llama")).logits
    (logits.float() ** 2).mean().backward()
    if isinstance(model, dt.DeltaModel):
        return logits, {k: p.grad for k, p in model.adapter_state_dict().items()}
    return logits, {_peft_key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_dora_gradients_equal_peft_to_the_bit(dropout, tmp_path):
    """In fp32 DoRA (whose backward recomputes the LoRA output instead of keeping it, `methods/_dora.py`) gives
    PEFT's logits and gradients exactly, with and without dropout, on every linear layer."""
    fields = _fields("llama", {"lora_dropout": dropout, "use_dora": True, "target_modules": "all-linear"})
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**fields))
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    (expected, their_grads), (logits, our_grads) = _dora_step(theirs, torch.float32), _dora_step(ours, torch.float32)
    assert torch.equal(logits, expected)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) == 2 * 7 * 3  # layers x linears x (A, B, m)
    for key, grad in their_grads.items():
        assert torch.equal(our_grads[key], grad), key


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_backward_equals_the_plain_graph_to_the_bit(dtype, dropout, tmp_path, monkeypatch):
    """The recomputing backward against autograd over the same expression (what it replaces), also under bf16
    autocast (where deltatune's rounding differs from PEFT's: the backward must recompute under the same autocast)."""
    from deltatune.methods import _dora

    config = dt.LoraConfig(**_fields("llama", {"lora_dropout": dropout, "use_dora": True}))
    logits, grads = _dora_step(dt.get_delta_model(tiny_model("llama"), config), dtype)
    monkeypatch.setattr(_dora.DoraUpdate, "apply", _dora._update)
    plain_logits, plain_grads = _dora_step(dt.get_delta_model(tiny_model("llama"), config), dtype)
    assert torch.equal(logits, plain_logits)
    assert grads.keys() == plain_grads.keys()
    for key, grad in plain_grads.items():
        assert torch.equal(grads[key], grad), key


def test_dora_keeps_no_lora_output_for_the_backward():
    """Between the passes a DoRA layer keeps W x, the rank-r A x and the input (for A's gradient), not the
    (tokens, d_out) LoRA output autograd would keep: the saved bytes are the plain graph's less one output."""
    from deltatune.methods import _dora

    def saved_numel(layer, x) -> int:
        numel = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: numel.append((t.shape[0], t.numel())) or t, lambda t: t
        ):
            layer(x)
        return sum(n for rows, n in numel if rows == len(x))  # activations: not the weights, nor the (d_out,) scale

    base = torch.nn.Sequential(torch.nn.Linear(16, 24))
    config = dt.LoraConfig(r=2, target_modules=["0"], use_dora=True, init_lora_weights=False)
    layer = dt.get_delta_model(base, config).train().get_submodule("base_model.0")
    x = torch.randn(32, 16, requires_grad=True)
    ours = saved_numel(layer, x)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_dora.DoraUpdate, "apply", _dora._update)
        plain = saved_numel(layer, x)
    assert ours == 32 * (24 + 2 + 16) and plain - ours == 32 * 24


@pytest.mark.parametrize(("family", "extra"), [("gemma3_text", {"query_pre_attn_scalar": 8}),
                                               ("mixtral", {"num_local_experts": 2, "num_experts_per_tok": 1}),
                                               ("starcoder2", {})])  # fmt: skip
def test_default_targets_of_families_peft_knows(family, extra, tmp_path):
    """Gemma 3 and Mixtral had no IA3 default here (refused) where peft has one; Mixtral's and Starcoder2's
    bottleneck entries named an MLP they do not have (Starcoder2's is c_fc/c_proj; Mixtral's experts are fused)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=48, vocab_size=128, head_dim=8, **extra)  # fmt: skip

    def base():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **sizes)).eval()

    if family == "starcoder2":
        placed = dt.get_delta_model(base(), dt.BottleneckConfig())
        assert {n.rsplit(".", 1)[-1] for n, m in placed.named_modules() if hasattr(m, "adapter_names")} == {
            "c_proj", "o_proj"}  # fmt: skip
        return
    theirs = peft.get_peft_model(base(), peft.IA3Config(init_ia3_weights=False)).eval()
    theirs.save_pretrained(tmp_path)
    ours = dt.get_delta_model(base(), dt.IA3Config(init_ia3_weights=False))
    adapted = {n.rsplit(".", 1)[-1] for n, m in ours.named_modules() if hasattr(m, "adapter_names")}
    assert adapted == {n.rsplit(".", 1)[-1] for n, m in theirs.named_modules() if type(m).__name__ == "Linear"
                       and hasattr(m, "ia3_l")}  # fmt: skip
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        again = dt.DeltaModel.from_pretrained(base(), tmp_path).eval()
        torch.testing.assert_close(again(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=ATOL32, rtol=0)


def test_a_target_also_in_modules_to_save_is_trained_in_full_as_in_peft(tmp_path):
    """peft skips a target that modules_to_save names (the copy trains in full); deltatune refused such a config, so
    peft's adapter with target_modules [q_proj, lm_head] and modules_to_save [lm_head] did not load."""
    config = dict(r=4, init_lora_weights=False, target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"])
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**config)).eval()
    with torch.no_grad():
        theirs.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    inputs = tiny_inputs("llama")
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=ATOL32, rtol=0)
    made = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**config))
    assert not any("lm_head.lora" in n or "lora_A" in n and "lm_head" in n for n, _ in made.named_parameters())


@pytest.mark.parametrize("init", ["orthogonal", "mica"])
def test_an_adapter_peft_drew_with_an_init_that_leaves_the_base_loads(init, tmp_path):
    """peft's orthogonal and MiCA inits leave the base as it is, so the file is a plain LoRA (peft reloads it onto
    the plain base exactly); deltatune refused to read its config. Drawing a new MiCA adapter stays refused."""
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                 init_lora_weights=init)).eval()  # fmt: skip
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True).eval()
    inputs = tiny_inputs("llama")
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=ATOL32, rtol=0)
    assert ours.peft_config["default"].init_lora_weights == init  # saved again as peft wrote it
    if init == "mica":  # (orthogonal is drawn as peft draws it: tests/methods/test_lora_init9.py)
        with pytest.raises(ConfigError, match=rf"^init_lora_weights='{init}' is peft's; deltatune draws True, False"):
            dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(init_lora_weights=init))


def test_a_peft_lora_on_a_tied_lm_head_loads_with_peft_s_outputs(tmp_path):
    """peft saves `lm_head.base_layer.weight` (the tied embedding) with a LoRA on a tied lm_head; a tied parameter
    is one module's parameter under two names, both of which a file may use."""
    x = tiny_inputs("qwen2")
    torch.manual_seed(0)
    kw = dict(target_modules=["lm_head"], init_lora_weights=False, r=4)
    theirs = peft.get_peft_model(tiny_model("qwen2", tie_word_embeddings=True), peft.LoraConfig(**kw)).eval()
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(tiny_model("qwen2", tie_word_embeddings=True), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, theirs(**x).logits, rtol=0, atol=0)
