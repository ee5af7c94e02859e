"""peft 0.22 migration (probe 21): modules_to_save by whole names for new adapters, old-rule files as they trained.

peft 0.22 matches a ``modules_to_save`` name as the whole path or a dotted suffix ("norm" is ``model.norm`` alone);
peft < 0.22 (and deltatune before) took a plain suffix ("norm" was every ``*_layernorm`` too). Each test runs under
the installed peft, 0.21 or 0.22.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import output_of, tiny_inputs, tiny_model

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.files import AdapterLoadError
from deltatune.targets import from_file

peft = pytest.importorskip("peft")
PEFT_022 = tuple(int(v) for v in peft.__version__.split(".")[:2]) >= (0, 22)
NORMS = ("input_layernorm", "post_attention_layernorm")


def _trained_copies(model) -> set[str]:
    """The paths (under the transformer's own) of the full copies that train."""
    paths = {n.split(".modules_to_save")[0] for n, p in model.named_parameters() if p.requires_grad and
             "modules_to_save" in n}  # fmt: skip
    return {p.removeprefix("base_model.").removeprefix("model.").removeprefix("model.") for p in paths}


def _new_rule_folder(tmp_path):
    """A deltatune adapter of ``modules_to_save=["norm"]`` (model.norm trained) saved; its model."""
    torch.manual_seed(0)
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, target_modules=["q_proj"],
                              init_lora_weights=False, modules_to_save=["norm"]))  # fmt: skip
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.5)
    ours.save_pretrained(tmp_path / "new")
    return tmp_path / "new", ours.eval()


def _old_rule_folder(tmp_path):
    """The same adapter as a file of the old rule holds it (peft < 0.22, deltatune before): every *_layernorm's
    trained copy too. Returns the folder and those copies by module path."""
    new, _ = _new_rule_folder(tmp_path)
    tensors = load_file(new / "adapter_model.safetensors")
    base = tiny_model("llama")
    torch.manual_seed(1)
    norms = {n: torch.randn_like(m.weight) * 0.5 + 1 for n, m in base.named_modules() if n.endswith(NORMS)}
    tensors.update({f"base_model.model.{n}.weight": w for n, w in norms.items()})
    (tmp_path / "old").mkdir()
    save_file(tensors, tmp_path / "old" / "adapter_model.safetensors")
    config = json.loads((new / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.norm"]  # (a new adapter saves the name peft 0.21 reads alike)
    config["modules_to_save"] = ["norm"]  # as the old rule saved it
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(config))
    return tmp_path / "old", norms


def _with_norms(norms):
    """The base model with the layernorm weights an old-rule file trained put in by hand."""
    base = tiny_model("llama")
    with torch.no_grad():
        for n, w in norms.items():
            base.get_submodule(n).weight.copy_(w)
    return base


def test_a_new_adapter_trains_model_norm_alone_as_peft_022(tmp_path):
    """modules_to_save=["norm"] is model.norm (peft 0.22's whole-name rule); peft 0.21's plain suffix also trained
    every *_layernorm. The saved file loads in the installed peft with equal logits (0.21 copies its extra layernorms
    from the base)."""
    folder, ours = _new_rule_folder(tmp_path)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                 modules_to_save=["norm"]))  # fmt: skip
    assert _trained_copies(ours) == {"norm"}
    assert _trained_copies(theirs) == ({"norm"} if PEFT_022 else {"norm"} | {
        f"layers.{i}.{k}" for i in range(2) for k in NORMS})  # fmt: skip
    again = peft.PeftModel.from_pretrained(tiny_model("llama"), folder).eval()
    inputs = tiny_inputs("llama")
    torch.testing.assert_close(output_of(again, inputs), output_of(ours, inputs), atol=1e-5, rtol=0)


def test_an_old_rule_file_loads_its_layernorm_copies_as_trained(tmp_path):
    """A file of the old rule (its *_layernorm copies beside model.norm's) loads with every copy it holds: its logits
    are the new-rule adapter's on a base holding those layernorm weights; the base itself is untouched
    (disable_adapter); saved again it holds them again. Was: a new-rule build refused the file's extra tensors."""
    old, norms = _old_rule_folder(tmp_path)
    inputs = tiny_inputs("llama")
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama"), old).eval()
    want = dt.DeltaModel.from_pretrained(_with_norms(norms), tmp_path / "new").eval()
    torch.testing.assert_close(output_of(ours, inputs), output_of(want, inputs), atol=1e-6, rtol=0)
    with ours.disable_adapter():
        torch.testing.assert_close(output_of(ours, inputs), output_of(tiny_model("llama"), inputs), atol=0, rtol=0)
    ours.save_pretrained(tmp_path / "again")
    assert load_file(tmp_path / "again" / "adapter_model.safetensors").keys() == load_file(
        old / "adapter_model.safetensors").keys()  # fmt: skip
    if not PEFT_022:  # peft 0.21 itself reads the file so (its plain suffix)
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), old).eval()
        torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=1e-5, rtol=0)


def test_an_old_rule_checkpoint_resumes_training_its_layernorm_copies(tmp_path):
    """A run's checkpoint of the old rule read into an adapter built as new (load_adapter_weights, as a resume does):
    the layernorm copies are wrapped, loaded and trained as before; a refused read puts the modules back."""
    old, norms = _old_rule_folder(tmp_path)
    with from_file():  # as train.run.start_model builds a resumed run's adapter
        ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, target_modules=["q_proj"],
                                  modules_to_save=["norm"]))  # fmt: skip
    ours.load_adapter_weights(str(old), "default")
    assert _trained_copies(ours) == {"norm"} | {f"layers.{i}.{k}" for i in range(2) for k in NORMS}
    want = dt.DeltaModel.from_pretrained(_with_norms(norms), tmp_path / "new").eval()
    torch.testing.assert_close(output_of(ours.eval(), tiny_inputs("llama")), output_of(want, tiny_inputs("llama")),
                               atol=1e-6, rtol=0)  # fmt: skip

    with from_file():
        fresh = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, target_modules=["q_proj"],
                                   modules_to_save=["norm"]))  # fmt: skip
    tensors = load_file(old / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key][:2]
    (tmp_path / "bad").mkdir()
    save_file(tensors, tmp_path / "bad" / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError):
        fresh.load_adapter_weights(str(tmp_path / "bad"), "default")
    assert _trained_copies(fresh) == {"norm"}
    assert type(fresh.get_base_model().model.layers[0].input_layernorm).__name__ == "LlamaRMSNorm"


def test_a_name_reaching_only_by_the_old_rule_is_refused_naming_it():
    """A new adapter's modules_to_save name that only a plain suffix reaches trains nothing in peft 0.22 (silently):
    refused in one line naming the rule and a module the old rule reached."""
    with pytest.raises(ConfigError, match=r"'layernorm' matches no module .*plain suffix reached 'model\.layers\.0\."):
        dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=4, target_modules=["q_proj"],
                           modules_to_save=["layernorm"]))  # fmt: skip


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
def test_distilbert_pre_classifier_is_trained_as_peft(task):
    """DistilBERT's pre_classifier (new, random) is a task head by name as in peft 0.22 (peft < 0.22 reached it by
    the plain suffix "classifier" for SEQ_CLS; its token classifier has none)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    config = AutoConfig.for_model("distilbert", dim=32, n_layers=1, n_heads=4, hidden_dim=48, vocab_size=128,
                                  max_position_embeddings=64, pad_token_id=0, num_labels=3)  # fmt: skip
    auto = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForTokenClassification
    trained = []
    for lib in (dt, peft):
        torch.manual_seed(0)
        model = (dt.get_delta_model if lib is dt else peft.get_peft_model)(
            auto.from_config(config), lib.LoraConfig(task_type=task, r=2, target_modules=["q_lin"]))  # fmt: skip
        trained.append(_trained_copies(model))
    assert trained[0] == trained[1]
    assert "pre_classifier" in trained[0] or task == "TOKEN_CLS"


def _mha_saved(tmp_path):
    """deltatune's LoRA on an nn.MultiheadAttention (test_methods_probe15's model) saved; the model."""
    from test_methods_probe15 import Attn

    torch.manual_seed(0)
    ours = dt.get_delta_model(Attn(), dt.LoraConfig(target_modules=["mha"], r=4, init_lora_weights=False)).eval()
    ours.save_pretrained(tmp_path / "mha")
    return tmp_path / "mha", ours


def _attn():
    """test_methods_probe15's model with the base weights ``_mha_saved``'s has (seed 0)."""
    from test_methods_probe15 import Attn

    torch.manual_seed(0)
    return Attn()


def _set_version(folder, version):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.pop("peft_version", None)
    (folder / "adapter_config.json").write_text(json.dumps(config | ({"peft_version": version} if version else {})))


def test_an_mha_file_says_its_out_proj_update_is_added_once(tmp_path):
    """deltatune adds MultiheadAttention's out_proj update once, as peft 0.22: its file says peft_version 0.22.0, so
    peft 0.22 loads it as it computes (without it peft 0.22 took it for a file of peft < 0.22 and doubled its out_proj
    lora_B: 0.389 off). A LoRA file without MultiheadAttention writes no peft_version, as before."""
    from test_methods_probe15 import _x

    folder, ours = _mha_saved(tmp_path)
    assert json.loads((folder / "adapter_config.json").read_text())["peft_version"] == "0.22.0"
    dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "q"
    )
    assert "peft_version" not in json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    if PEFT_022:
        theirs = peft.PeftModel.from_pretrained(_attn(), folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(_x()), ours(_x()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("version", ["0.21.2", "0.17.0", None, "0.22.0"])
def test_an_mha_file_of_peft_before_022_is_doubled_as_peft_022_loads_it(tmp_path, version):
    """A file peft < 0.22 wrote (its peft_version) added out_proj's update twice: deltatune doubles its lora_B on load,
    as peft 0.22 does, so it computes as it trained; a file without peft_version is deltatune's own (it wrote none
    before) and loads as it is (peft 0.22 doubles that one too: a file of peft < 0.18 it takes it for)."""
    from test_methods_probe15 import _x

    folder, ours = _mha_saved(tmp_path)
    _set_version(folder, version)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        again = dt.DeltaModel.from_pretrained(_attn(), folder).eval()
    doubled = version in ("0.21.2", "0.17.0")
    assert any("twice" in str(w.message) for w in said) is doubled
    saved = load_file(folder / "adapter_model.safetensors")
    got = {k: v for k, v in again.adapter_state_dict().items() if ".out_proj.lora_B" in k}
    want = [2 * v if doubled else v for k, v in saved.items() if ".out_proj.lora_B" in k]
    assert len(got) == len(want) == 1 and torch.equal(next(iter(got.values())), want[0])
    if PEFT_022 and version is not None:  # peft 0.22 loads the same file alike
        theirs = peft.PeftModel.from_pretrained(_attn(), folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(_x()), again(_x()), atol=1e-6, rtol=0)


def test_a_tied_output_embeddings_bias_is_added_as_peft_022():
    """BERT's MLM decoder (tied to the word embeddings, with a bias) under trainable tokens: deltatune adds the bias,
    as peft 0.22's TrainableTokensLayer now does (peft 0.21's F.linear dropped it)."""
    from tiny import tiny_config
    from transformers import BertForMaskedLM

    ids = [1, 5]
    torch.manual_seed(0)
    plain = BertForMaskedLM(tiny_config("bert")).eval()
    with torch.no_grad():
        plain.cls.predictions.bias.normal_()
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    made = []
    for lib in (dt, peft):
        base = BertForMaskedLM(tiny_config("bert")).eval()
        base.load_state_dict(state)
        config = lib.LoraConfig(r=2, target_modules=["query"], trainable_token_indices=ids)
        made.append((dt.get_delta_model if lib is dt else peft.get_peft_model)(base, config).eval())
    rows = torch.randn(len(ids), plain.config.hidden_size)
    with torch.no_grad():
        for model in made:
            for n, p in model.named_parameters():
                if "trainable_tokens_delta" in n:
                    p.copy_(rows)
    x = tiny_inputs("bert")
    x.pop("labels", None)
    with torch.no_grad():
        ours, theirs = (m(**x).logits for m in made)
    assert torch.allclose(ours, theirs, atol=1e-5) is PEFT_022
