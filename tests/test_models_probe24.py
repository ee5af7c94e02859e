"""Probe 24: loading the base model a recipe names, against transformers' from_pretrained (revision,
attn_implementation, dtype names) and its sharded checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import tiny
import torch
import transformers
from huggingface_hub.errors import StrictDataclassError

from deltatune.config import ConfigError
from deltatune.train import embedded
from deltatune.train.config_read import validate_model
from deltatune.train.models import load_model, load_processor, load_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.save_tiny(tmp_path_factory.mktemp("llama"), "llama")


def _one_line(exc: pytest.ExceptionInfo, *words: str) -> str:
    text = str(exc.value)
    assert "\n" not in text and all(w in text for w in words), text
    return text


def test_a_revision_on_a_local_folder_is_refused_not_ignored(folder):
    # transformers ignores revision= for a local folder (the folder's files load whatever the revision says)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, revision="v1.0")
    assert ref is not None
    with pytest.raises(ConfigError) as exc:
        load_model(folder, "CAUSAL_LM", revision="v1.0")
    _one_line(exc, "model.revision", "'v1.0'", "local folder")
    with pytest.raises(ConfigError) as exc:
        load_tokenizer(folder, revision="v1.0")
    _one_line(exc, "model.revision")
    with pytest.raises(ConfigError) as exc:  # (the hub id of an embedded model loads its local copy)
        load_tokenizer("sentence-transformers/all-MiniLM-L6-v2", revision="v1.0")
    _one_line(exc, "model.revision", "embedded copy")


def test_revision_and_attn_implementation_reach_from_pretrained_for_a_hub_id(folder, monkeypatch):
    seen = {}
    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)

    def record(what, value):
        def from_pretrained(name, **kwargs):
            seen[what] = (name, kwargs)
            return value

        return from_pretrained

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", record("config", config))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record("model", model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("tok", tok))
    load_tokenizer("org/some-model", revision="abc123")
    load_model("org/some-model", "CAUSAL_LM", revision="abc123", attn_implementation="eager")
    assert seen["tok"][1]["revision"] == "abc123" and "attn_implementation" not in seen["tok"][1]
    assert seen["model"][1]["revision"] == "abc123" and seen["model"][1]["attn_implementation"] == "eager"
    assert seen["config"][1]["revision"] == "abc123"  # (the config read for the model's kind: the same revision)


def test_an_image_stages_processor_loads_the_same_revision(monkeypatch):
    seen = {}

    def from_pretrained(name, **kwargs):
        seen[name] = kwargs
        return transformers.ViTImageProcessorPil()

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", from_pretrained)
    load_processor("org/some-vit", "image_cls", revision="abc123")
    assert seen["org/some-vit"]["revision"] == "abc123"  # (the model loads that revision: its processor with it)
    with pytest.raises(ConfigError) as exc:
        load_processor(tiny.minilm_path(), "image_cls", revision="abc123")
    _one_line(exc, "model.revision")


def test_eager_and_sdpa_give_the_same_logits(folder):
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 2023, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    out = {}
    for impl in ("eager", "sdpa"):
        model = load_model(folder, "CAUSAL_LM", attn_implementation=impl)
        assert model.config._attn_implementation == impl
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation=impl)
        with torch.no_grad():
            out[impl] = model(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(out[impl], ref(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    torch.testing.assert_close(out["eager"][mask.bool()], out["sdpa"][mask.bool()], rtol=0, atol=1e-5)


def test_an_unknown_attn_implementation_is_one_line_at_load_and_at_recipe_read(folder):
    with pytest.raises(ConfigError) as exc:
        load_model(folder, "CAUSAL_LM", attn_implementation="bogus")
    _one_line(exc, "model.attn_implementation", "'bogus'")
    with pytest.raises(ConfigError) as exc:
        validate_model(SimpleNamespace(revision=None, attn_implementation="bogus", dtype="float32"))
    _one_line(exc, "model.attn_implementation", "'bogus'", "eager", "sdpa")
    validate_model(SimpleNamespace(revision="v1.0", attn_implementation="flash_attention_2", dtype="auto"))


@pytest.mark.skipif(transformers.utils.is_flash_attn_2_available(), reason="flash-attn is installed here")
def test_flash_attention_2_without_its_package_is_one_line(folder):
    with pytest.raises(ConfigError) as exc:
        load_model(folder, "CAUSAL_LM", attn_implementation="flash_attention_2")
    _one_line(exc, "model.attn_implementation", "flash_attention_2")


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("dtype", "bf16", ("model.dtype", "'bf16'", "bfloat16")),
        ("dtype", "fp16", ("model.dtype", "'fp16'", "float16")),
        ("revision", "", ("model.revision",)),
        ("revision", 3, ("model.revision",)),
    ],
)
def test_model_keys_are_checked_at_recipe_read(key, value, words):
    # transformers takes dtype names torch knows ("bfloat16", "float16", "float32") or "auto"; "bf16" is train.precision's
    assert not isinstance(getattr(torch, str(value), None), torch.dtype)  # (transformers' getattr(torch, dtype))
    keys = {"revision": None, "attn_implementation": None, "dtype": "float32", key: value}
    with pytest.raises(ConfigError) as exc:
        validate_model(SimpleNamespace(**keys))
    _one_line(exc, *words)


def test_sharded_safetensors_load_as_transformers_and_a_missing_shard_is_named(folder, tmp_path):
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ref.save_pretrained(tmp_path, max_shard_size="200KB")
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    ids = torch.tensor([[101, 2023, 2003, 102]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path), "CAUSAL_LM")(ids).logits, ref(ids).logits)
    os.remove(tmp_path / shards[1])
    with pytest.raises(ConfigError) as exc:
        load_model(str(tmp_path), "CAUSAL_LM")
    _one_line(exc, shards[1])


@pytest.mark.parametrize(
    "index, words",
    [
        ({"metadata": {}}, ("'weight_map'",)),
        ({"metadata": {}, "weight_map": []}, ("'weight_map'", "list")),
        ({"weight_map": "KEEP"}, ("'metadata'",)),
    ],
)
def test_a_shard_index_transformers_cannot_read_is_one_line(folder, tmp_path, index, words):
    transformers.AutoModelForCausalLM.from_pretrained(folder).save_pretrained(tmp_path, max_shard_size="200KB")
    file = tmp_path / "model.safetensors.index.json"
    kept = json.loads(file.read_text())["weight_map"]
    file.write_text(json.dumps({k: kept if v == "KEEP" else v for k, v in index.items()}))
    with pytest.raises((KeyError, AttributeError)):  # transformers' get_checkpoint_shard_files: index["metadata"]
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with pytest.raises(ConfigError) as exc:
        load_model(str(tmp_path), "CAUSAL_LM")
    _one_line(exc, "model.safetensors.index.json", *words)


def test_a_config_value_of_the_wrong_type_is_one_line(folder, tmp_path):
    for name in os.listdir(folder):
        shutil.copy(os.path.join(folder, name), tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": "32"}))
    with pytest.raises(StrictDataclassError):  # transformers refuses it too (its configs are strict dataclasses)
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with pytest.raises(ConfigError) as exc:
        load_model(str(tmp_path), "CAUSAL_LM")
    _one_line(exc, "config.json", "hidden_size")


def test_a_tokenizer_without_pad_token_pads_with_eos(folder, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == tok.eos_token is not None


def test_embedded_short_names_and_their_hub_ids():
    assert embedded.hub_id("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert embedded.hub_id("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert embedded.resolve("sentence-transformers/all-MiniLM-L6-v2") == embedded.resolve("minilm")
    assert embedded.hub_id("org/other") == "org/other" and embedded.resolve("org/other") == "org/other"


def test_a_runs_attn_implementation_is_recorded_and_loaded_back(tmp_path):
    import sys

    import yaml

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "reliability"))
    from reliability_helpers import ROWS, cli, write_recipe

    from deltatune.train.run_load import load_adapter_model

    model = tiny.save_tiny(tmp_path / "bert", "bert", "seq_cls")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    recipe = write_recipe(
        tmp_path / "r.yaml", model, str(tmp_path / "train.jsonl"), str(tmp_path / "run"), max_steps=1
    )
    code, _, err = cli("train", recipe, "model.attn_implementation=eager")
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["model"]["attn_implementation"] == "eager"
    delta, _ = load_adapter_model(str(tmp_path / "run"))
    assert delta.get_base_model().config._attn_implementation == "eager"
    code, _, err = cli("train", recipe, "--overwrite", "model.revision=v1.0")
    assert code != 0 and "model.revision" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("train", recipe, "--overwrite", "model.attn_implementation=bogus")
    assert code != 0 and "model.attn_implementation" in err and len(err.strip().splitlines()) == 1, err


# review of probe 24 (/tmp/rev24/models.md): the revision an adapter records, t2i, refusals before the data


@pytest.fixture
def hub_adapter(folder, tmp_path, monkeypatch):
    """A plain adapter folder saved with get_delta_model(revision="abc123") over a hub id, and every from_pretrained
    of transformers recording (what, name, revision) instead of reaching the hub."""
    from deltatune import LoraConfig, get_delta_model

    config = transformers.AutoConfig.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    delta = get_delta_model(
        transformers.AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"),
        revision="abc123",
    )  # fmt: skip
    out = tmp_path / "adapter"
    delta.save_pretrained(str(out))
    saved = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**saved, "base_model_name_or_path": "org/some-model"}))
    seen: list = []

    def recording(what, make):
        def from_pretrained(name, *args, **kwargs):
            seen.append((what, str(name), kwargs.get("revision")))
            return make()

        return staticmethod(from_pretrained)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", recording("config", lambda: config))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording("tok", lambda: tok))
    make = recording("model", lambda: transformers.AutoModelForCausalLM.from_config(config))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", make)
    from deltatune.train import checks, run_load

    for module in (checks, run_load):  # (the hub id is not cached here: offline, its check refuses it)
        monkeypatch.setattr(module, "check_model_path", lambda *args: None)
    return str(out), seen


def _model_revisions(seen: list) -> list:
    return [revision for what, _, revision in seen if what == "model"]


def test_serve_and_generate_load_a_plain_adapters_revision_as_peft(hub_adapter):
    from peft import AutoPeftModelForCausalLM

    from deltatune.serve import build_engine
    from deltatune.train.run_load import load_adapter_model

    out, seen = hub_adapter
    AutoPeftModelForCausalLM.from_pretrained(out)  # peft: base_model_revision = peft_config.revision
    reference = _model_revisions(seen)
    assert reference == ["abc123"]
    for model, expected in ((None, reference), ("org/some-model", reference), ("org/other", [None])):
        seen.clear()
        build_engine(model, {"a": out}).close()
        assert _model_revisions(seen) == expected and {r for w, _, r in seen if w == "tok"} == set(expected), seen
        seen.clear()
        load_adapter_model(out, model)
        assert _model_revisions(seen) == expected, (model, seen)


def test_a_plain_adapters_revision_over_a_local_base_loads_the_folder_as_peft(folder):
    from deltatune.train.run_load import recorded_load

    # peft passes it to from_pretrained, which ignores it for a local folder: not a refusal naming model.revision
    assert recorded_load(SimpleNamespace(base_model_name_or_path=folder, revision="abc123"), None) == (None, None)
    assert recorded_load(SimpleNamespace(base_model_name_or_path="org/m", revision="abc123"), None) == ("abc123", None)


def test_a_run_folder_keeps_its_revision_for_the_same_model_given_again(hub_adapter):
    import yaml

    from deltatune.serve import build_engine
    from deltatune.train.run_load import load_adapter_model

    out, seen = hub_adapter
    model = {"name_or_path": "org/some-model", "revision": "abc123", "attn_implementation": "eager"}
    recipe = {"stage": "sft", "model": model, "data": {"train": "train.jsonl"}, "method": {"name": "lora"}}
    with open(os.path.join(out, "run.yaml"), "w", encoding="utf-8") as fh:
        yaml.safe_dump(recipe, fh)
    for given, expected in (("org/some-model", "abc123"), ("org/other", None)):
        seen.clear()
        delta, _ = load_adapter_model(out, given)
        assert _model_revisions(seen) == [expected], (given, seen)
        seen.clear()
        build_engine(given, {"a": out}).close()
        assert _model_revisions(seen) == [expected], (given, seen)


def test_t2i_reads_no_revision_nor_attn_implementation(folder, monkeypatch):
    from deltatune.train import t2i

    monkeypatch.setattr(t2i, "load_denoiser", lambda path, dtype: ("denoiser", path))
    # a local folder: refused for any other stage, ignored by t2i as ignored_keys reports it (was refused at load)
    loaded = load_model(folder, "TEXT_TO_IMAGE", revision="v1.0", attn_implementation="flash_attention_2")
    assert loaded == ("denoiser", folder)
    from deltatune.train.config_read import check_load, load_revision

    model = SimpleNamespace(name_or_path=folder, revision="v1.0", attn_implementation="flash_attention_2")
    check_load(SimpleNamespace(stage="t2i", model=model))
    assert load_revision(SimpleNamespace(stage="t2i", model=model)) is None  # (adapter_config.json records none)
    assert load_revision(SimpleNamespace(stage="sft", model=model)) == "v1.0"
    with pytest.raises(ConfigError) as exc:
        check_load(SimpleNamespace(stage="sft", model=model))
    _one_line(exc, "model.revision", "local folder")


@pytest.mark.skipif(transformers.utils.is_flash_attn_2_available(), reason="flash-attn is installed here")
def test_flash_attention_without_its_package_is_refused_before_the_data(folder, monkeypatch):
    from deltatune.train.config_read import check_load

    monkeypatch.setattr(transformers.utils, "is_kernels_available", lambda: False)  # (no kernels fallback either)
    for impl in ("flash_attention_2", "flash_attention_3"):
        model = SimpleNamespace(name_or_path=folder, revision=None, attn_implementation=impl)
        with pytest.raises(ConfigError) as exc:
            check_load(SimpleNamespace(stage="sft", model=model))
        _one_line(exc, f"model.attn_implementation={impl}", "sdpa")
    check_load(SimpleNamespace(stage="sft", model=SimpleNamespace(name_or_path=folder, revision=None,
                                                                   attn_implementation="sdpa")))  # fmt: skip


def test_a_vlms_processor_loads_the_revision_and_a_local_vlm_is_refused_first(monkeypatch):
    from deltatune.train import caption

    seen = {}

    def from_pretrained(name, **kwargs):
        seen[name] = kwargs.get("revision")
        raise ValueError("stop here")

    monkeypatch.setattr(caption, "model_kind", lambda path: "decoder-only")
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", staticmethod(from_pretrained))
    with pytest.raises(ConfigError):
        load_processor("org/some-vlm", "caption", revision="abc123")
    assert seen == {"org/some-vlm": "abc123"}  # (the model loads that revision)
    with pytest.raises(ConfigError) as exc:  # (was loaded as it is, the model refused only after the data)
        load_processor(tiny.minilm_path(), "caption", revision="abc123")
    _one_line(exc, "model.revision")


def test_a_revision_the_hub_could_not_provide_is_named(monkeypatch):
    def offline(name, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(offline))
    with pytest.raises(ConfigError) as exc:
        load_tokenizer("org/some-model", revision="v2")
    _one_line(exc, "'org/some-model'", "'v2'")


def test_an_import_error_of_the_model_is_not_blamed_on_attn_implementation(folder, monkeypatch):
    from deltatune.train import config_read, models

    def needs(name, **kwargs):
        raise ImportError("This modeling file requires the following packages that were not found: einops")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(needs))
    with pytest.raises(ImportError, match="einops"):
        load_model(folder, "CAUSAL_LM", attn_implementation="eager")
    assert models.DTYPES is config_read.DTYPES


def test_recipe_read_names_model_revision_and_quoting():
    from deltatune.train.config import build

    recipe = {"stage": "sft", "model": {"name_or_path": "org/x", "revision": 1234567}, "data": {"train": "x.jsonl"}}
    with pytest.raises(ConfigError) as exc:
        build(recipe)
    _one_line(exc, "model.revision", "quote it", "'1234567'")
    recipe = {"stage": "sft", "model": {"name_or_path": "org/x"}, "method": {"name": "lora", "revision": "v1"}}
    with pytest.raises(ConfigError) as exc:
        build({**recipe, "data": {"train": "x.jsonl"}})
    _one_line(exc, "method.revision", "model.revision")


def test_a_train_run_refuses_the_models_keys_before_its_data_is_prepared(tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "reliability"))
    from reliability_helpers import ROWS, cli, write_recipe

    from deltatune.train import run

    def prepare(cfg, tok):
        raise ConfigError("the data was prepared")

    monkeypatch.setattr(run, "prepare", prepare)
    monkeypatch.setattr(transformers.utils, "is_kernels_available", lambda: False)
    model = tiny.save_tiny(tmp_path / "bert", "bert", "seq_cls")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", model, str(tmp_path / "train.jsonl"), str(tmp_path / "run"))
    for key in ("model.attn_implementation=flash_attention_2", "model.revision=v1.0"):
        code, _, err = cli("train", recipe, "--overwrite", key)
        assert code != 0 and key.split("=")[0] in err and "the data was prepared" not in err, err
