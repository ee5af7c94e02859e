"""Probe 19 of adapter files against peft 0.21.2: peft's ``safe_serialization=False`` save written as atomically as
the safetensors one, and ``auto_mapping`` in the adapter_config.json of an adapter with no task type (peft's
``AutoPeftModel`` reads it to build the base model)."""

from __future__ import annotations

import errno
import json
import os
import re

import pytest
import torch
from tiny import output_of, tiny_inputs, tiny_model

import deltatune as dt

peft = pytest.importorskip("peft")


def _files(root) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def _two_adapters() -> dt.DeltaModel:
    model = dt.get_delta_model(
        tiny_model("llama"), dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM")
    )
    model.add_adapter("other", dt.LoraConfig(r=2, init_lora_weights=False, task_type="CAUSAL_LM"))
    return model


def _bump(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)


@pytest.mark.parametrize("first_safe", [True, False])
def test_a_bin_save_that_fails_leaves_every_adapter_file_as_it_was(tmp_path, monkeypatch, first_safe):
    """safe_serialization=False (peft's torch.save file) on a full disk: the save is refused in one line naming the
    file, and the folder holds the earlier save byte for byte. Before, the safetensors files were written and moved in
    first, then converted: a failed torch.save left the new adapter in adapter_model.safetensors (which loaders
    prefer), the raised error notwithstanding."""
    model = _two_adapters()
    model.save_pretrained(tmp_path, safe_serialization=first_safe)
    before = _files(tmp_path)
    _bump(model)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="adapter_model.bin") as caught:
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert "\n" not in str(caught.value) and caught.value.errno == errno.ENOSPC
    assert ".saving-" not in str(caught.value)
    assert _files(tmp_path) == before


def test_a_bin_save_loads_in_peft_and_replaces_the_safetensors_file(tmp_path):
    """A .bin save (both adapters) loads in peft with the same logits, and no older adapter_model.safetensors is left
    beside it (peft leaves one, which its loading then prefers over the new .bin)."""
    model = _two_adapters()
    model.save_pretrained(tmp_path)
    _bump(model)
    x = tiny_inputs("llama")
    want = {name: (model.set_adapter(name), output_of(model, x))[1] for name in ("other", "default")}
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(_files(tmp_path)) == [
        "README.md", "adapter_config.json", "adapter_model.bin", "other/adapter_config.json", "other/adapter_model.bin"
    ]  # fmt: skip
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    loaded.load_adapter(tmp_path, "other", subfolder="other")
    for name in ("default", "other"):
        loaded.set_adapter(name)
        assert torch.equal(output_of(loaded, x), want[name])


def _no_task_configs():
    return [
        pytest.param(
            dt.TrainableTokensConfig(token_indices=[3, 5], init_weights=False),
            peft.TrainableTokensConfig(token_indices=[3, 5], init_weights=False),
            id="trainable-tokens",
        ),
        pytest.param(
            dt.LoraConfig(r=2, init_lora_weights=False), peft.LoraConfig(r=2, init_lora_weights=False), id="lora"
        ),
    ]


@pytest.mark.parametrize("ours, theirs", _no_task_configs())
def test_an_adapter_with_no_task_type_loads_in_peft_s_auto_peft_model(tmp_path, ours, theirs):
    """peft writes ``auto_mapping`` (the base model's class and module) into the config of an adapter with no task
    type, and ``peft.AutoPeftModel.from_pretrained(folder)`` builds the base from it; deltatune wrote none, so peft
    refused deltatune's folder ("Cannot infer the auto class from the config")."""
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "base")
    x = tiny_inputs("llama")
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), ours)
    model.save_pretrained(tmp_path / "ours")
    reference = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), theirs)
    reference.save_pretrained(tmp_path / "theirs")

    def config(name):
        return json.loads((tmp_path / name / "adapter_config.json").read_text())

    assert config("ours")["auto_mapping"] == config("theirs")["auto_mapping"] is not None
    loaded = peft.AutoPeftModel.from_pretrained(tmp_path / "ours")
    assert type(loaded.get_base_model()) is type(model.get_base_model())
    assert torch.equal(output_of(loaded, x), output_of(model, x))
    again = dt.DeltaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "ours")
    assert torch.equal(output_of(again, x), output_of(model, x))  # (deltatune reads the field back: ignored)


def test_an_adapter_with_a_task_type_writes_no_auto_mapping_as_peft(tmp_path):
    """With a task type peft's file has ``auto_mapping`` null (the task's class is used); deltatune's has none."""
    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text()).get("auto_mapping") is None


def _tied_head_trained_in_full(tmp_path):
    """peft's LoRA with the tied lm_head trained in full (modules_to_save), saved; the same file in deltatune."""
    reference = peft.get_peft_model(
        tiny_model("llama", tie_word_embeddings=True),
        peft.LoraConfig(r=4, init_lora_weights=False, modules_to_save=["lm_head"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        reference.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    reference.save_pretrained(tmp_path / "adapter")
    ours = dt.DeltaModel.from_pretrained(tiny_model("llama", tie_word_embeddings=True), tmp_path / "adapter")
    return reference, ours


def _reloaded_by_config(folder):
    """The merged folder read as a loader that ties by config.json does: the model built from the config, then the
    saved weights put in (a tied head takes the last of the two tensors written into it)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=False)
    return model.eval()


def test_untie_diverged_sets_the_config_as_peft_s_merge_does(tmp_path):
    """peft's merge_and_unload sets tie_word_embeddings False when the merged output embedding is no longer the input
    one's tensor (the lm_head trained in full); deltatune's merged model kept True, so a model built from its saved
    config.json tied the trained head away (logits 15.7 off)."""
    from deltatune import adapter_io

    reference, ours = _tied_head_trained_in_full(tmp_path)
    x = tiny_inputs("llama")
    theirs = reference.merge_and_unload()
    with pytest.warns(UserWarning, match="no longer tied"):
        merged = adapter_io.untie_diverged(ours.merge_and_unload())
    assert theirs.config.tie_word_embeddings is merged.config.tie_word_embeddings is False
    theirs.save_pretrained(tmp_path / "theirs")
    merged.save_pretrained(tmp_path / "ours")
    want = output_of(_reloaded_by_config(tmp_path / "theirs"), x)
    assert (output_of(_reloaded_by_config(tmp_path / "ours"), x) - want).abs().max() < 1e-5


def test_untie_diverged_leaves_a_still_tied_model_as_it_is():
    """A tied model whose merge left the two embeddings one tensor (a LoRA on attention only) keeps its config."""
    from deltatune import adapter_io

    model = dt.get_delta_model(
        tiny_model("llama", tie_word_embeddings=True), dt.LoraConfig(r=2, task_type="CAUSAL_LM")
    )
    merged = adapter_io.untie_diverged(model.merge_and_unload())
    assert merged.config.tie_word_embeddings is True
    assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_merge_and_unload_unties_diverged_embeddings_as_peft(tmp_path):
    """DeltaModel.merge_and_unload (not untie_diverged alone) on the tied model with its head trained in full: the
    config says untied, as peft's, and the merged model's logits are peft's merged model's."""
    reference, ours = _tied_head_trained_in_full(tmp_path)
    x = tiny_inputs("llama")
    with pytest.warns(UserWarning, match="no longer tied"):
        merged = ours.merge_and_unload()
    theirs = reference.merge_and_unload()
    assert merged.config.tie_word_embeddings is theirs.config.tie_word_embeddings is False
    assert (output_of(merged, x) - output_of(theirs, x)).abs().max() < 1e-5


@pytest.mark.parametrize(
    "method, tie",
    [("lora", False), ("lora", True), ("trainable_tokens", False), ("trainable_tokens", True)],
    ids=["lora-token-indices", "lora-token-indices-tied", "trainable-tokens", "trainable-tokens-tied"],
)
def test_missing_token_rows_are_named_as_peft_names_them(method, tie):
    """set_peft_model_state_dict without the token rows: ``missing_keys`` names them by peft's names in the model.
    LoRA's rows sit in peft's ``token_adapter`` (deltatune said ``embed_tokens.trainable_tokens_delta.default``), and
    a tied output layer's rows are its own (deltatune named the input embedding's twice; with LoRA's
    trainable_token_indices it left out peft's ``lm_head.token_adapter`` row, which peft's model holds too)."""
    if method == "lora":
        ours, theirs = (
            dt.LoraConfig(r=2, trainable_token_indices=[3, 5]),
            peft.LoraConfig(r=2, trainable_token_indices=[3, 5]),
        )
    else:
        ours, theirs = dt.TrainableTokensConfig(token_indices=[3, 5]), peft.TrainableTokensConfig(token_indices=[3, 5])
    model = dt.get_delta_model(tiny_model("llama", tie_word_embeddings=tie), ours)
    reference = peft.get_peft_model(tiny_model("llama", tie_word_embeddings=tie), theirs)
    saved = dt.get_peft_model_state_dict(model)
    assert sorted(saved) == sorted(peft.get_peft_model_state_dict(reference))
    with pytest.warns(UserWarning, match="missing"):
        result = dt.set_peft_model_state_dict(model, {k: v for k, v in saved.items() if "trainable_tokens" not in k})
    assert sorted(result.missing_keys) == sorted(k for k in reference.state_dict() if "trainable_tokens_delta" in k)


def _read_only(monkeypatch, folder) -> None:
    """``folder`` as a read-only folder behaves for a user other than root (the tests may run as root, who writes
    anywhere): access says so, and making or moving anything into it fails with EACCES."""
    folder = os.path.realpath(folder)
    access, mkdir, replace = os.access, os.mkdir, os.replace

    def refused(path) -> bool:
        return os.path.dirname(os.path.realpath(path)) == folder

    def fake_access(path, mode, *args, **kwargs):
        return False if os.path.realpath(path) == folder and mode & os.W_OK else access(path, mode, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if refused(path):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return mkdir(path, *args, **kwargs)

    def fake_replace(src, dst, *args, **kwargs):
        if refused(dst):
            raise PermissionError(errno.EACCES, "Permission denied", src, None, dst)
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "access", fake_access)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "replace", fake_replace)


@pytest.mark.parametrize("where", ["top", "other"])
def test_a_save_into_a_read_only_folder_is_one_line_naming_it_and_changes_nothing(tmp_path, monkeypatch, where):
    """A save over an earlier one whose folder (the top, or an adapter's sub-folder) is read-only: refused in one line
    naming that folder, every file as it was. Before, the top folder's refusal named the hidden .saving- folder, and a
    read-only sub-folder was found only after the default adapter's new files had been moved in."""
    model = _two_adapters()
    model.save_pretrained(tmp_path)
    before = _files(tmp_path)
    _bump(model)
    folder = tmp_path if where == "top" else tmp_path / "other"
    _read_only(monkeypatch, folder)
    with pytest.raises(OSError) as caught:
        model.save_pretrained(tmp_path)
    message = str(caught.value)
    assert str(folder) in message and ".saving-" not in message and "\n" not in message
    assert isinstance(caught.value, PermissionError) and caught.value.errno == errno.EACCES  # (except PermissionError)
    assert caught.value.filename == str(folder) and "read-only folder" in message
    monkeypatch.undo()
    assert _files(tmp_path) == before


def test_a_weight_conversion_reads_an_initial_adapter_saved_as_bin_as_peft(tmp_path):
    """path_initial_model_for_weight_conversion naming an initial OLoRA adapter saved with safe_serialization=False:
    peft reads its adapter_model.bin (load_adapter); deltatune raised safetensors' FileNotFoundError."""
    x = tiny_inputs("llama")
    model = dt.get_delta_model(
        tiny_model("llama"), dt.LoraConfig(r=4, init_lora_weights="olora", task_type="CAUSAL_LM")
    )
    model.save_pretrained(tmp_path / "init", safe_serialization=False)
    _bump(model)
    model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "out")
    assert (output_of(loaded, x) - output_of(model, x)).abs().max() < 1e-5


@pytest.mark.parametrize("bad", ["unknown adapter", "folder is a file", "sub-folder is a file"])
def test_a_process_other_than_the_main_one_refuses_bad_arguments_as_peft(tmp_path, bad):
    """save_pretrained(is_main_process=False) writes nothing, but peft checks selected_adapters and the folder on every
    process first, so every rank of a DDP job stops on the mistake; deltatune's other ranks returned silently while
    the main one raised (they went on to the next collective and waited for it)."""
    folder, selected = tmp_path / "out", None
    if bad == "unknown adapter":
        selected = ["nope"]
    elif bad == "folder is a file":
        folder.write_text("not a folder")
    else:  # an adapter's sub-folder is a file: peft's os.makedirs(out/other) raises on every process
        folder.mkdir()
        (folder / "other").write_text("not a folder")
    reference = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2))
    reference.add_adapter("other", peft.LoraConfig(r=2))
    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2))
    model.add_adapter("other", dt.LoraConfig(r=2))
    before = _files(tmp_path)
    with pytest.raises((ValueError, FileExistsError)):
        reference.save_pretrained(folder, selected_adapters=selected, is_main_process=False)
    with pytest.raises(ValueError, match="nope" if selected else "is a file"):
        model.save_pretrained(folder, selected_adapters=selected, is_main_process=False)
    assert _files(tmp_path) == before and (not selected or not folder.exists())  # (nothing written)


def test_a_weight_conversion_with_no_task_type_loads_in_peft_s_auto_peft_model(tmp_path):
    """path_initial_model_for_weight_conversion on an OLoRA adapter with no task type: peft writes auto_mapping into
    the converted folder's config too; deltatune's conversion wrote none, so AutoPeftModel refused the folder
    ("Cannot infer the auto class from the config")."""
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "base")
    x = tiny_inputs("llama")
    model = dt.get_delta_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), dt.LoraConfig(r=4, init_lora_weights="olora")
    )
    model.save_pretrained(tmp_path / "init")
    _bump(model)
    model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    mapping = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["auto_mapping"]
    assert mapping == {"base_model_class": "LlamaForCausalLM", "parent_library": type(model.base_model).__module__}
    loaded = peft.AutoPeftModel.from_pretrained(tmp_path / "out")
    assert (output_of(loaded, x) - output_of(model, x)).abs().max() < 1e-5


def test_a_move_that_fails_puts_back_the_files_already_moved_in(tmp_path, monkeypatch):
    """A move refused after others went in (a sticky folder whose file another user owns: os.access says writable,
    os.replace fails with EPERM): every adapter's files as they were, the default adapter's new files taken out
    again and its old ones put back, and the error one line naming the file. Before, the default adapter's new files
    stayed in beside the other adapter's old ones."""
    model = _two_adapters()
    model.save_pretrained(tmp_path)
    (tmp_path / "other" / "training_state.pt").write_bytes(b"old")  # (an old file a save removes, put back too)
    before = _files(tmp_path)
    _bump(model)
    replace, calls = os.replace, []

    def sticky(src, dst, *args, **kwargs):
        if os.path.dirname(os.fspath(dst)) == str(tmp_path / "other") and ".saving-" in os.fspath(src):
            calls.append(dst)
            if len(calls) == 2:  # the second adapter's second file
                raise PermissionError(errno.EPERM, "Operation not permitted", src, None, dst)
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", sticky)
    with pytest.raises(PermissionError) as caught:
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert caught.value.errno == errno.EPERM and str(tmp_path / "other") in str(caught.value)
    assert ".saving-" not in str(caught.value) and "\n" not in str(caught.value)
    assert _files(tmp_path) == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    model.save_pretrained(tmp_path)  # (and a save after it goes through)
    assert _files(tmp_path) != before


@pytest.mark.parametrize("kept_by", ["rename", "copy"])
def test_an_earlier_file_that_cannot_be_put_back_is_kept_beside_and_named(tmp_path, monkeypatch, kept_by):
    """A move into other/ refused (EPERM) after the default adapter's new files went in, and putting the default
    adapter's earlier files back fails too (EIO): each earlier file is kept beside its destination as
    <file>.before-save (renamed, or copied where renaming fails) and the one-line error names it. Before, the earlier
    files sat only in the hidden folder, which the save then deleted: the last copy of the old weights was lost."""
    model = _two_adapters()
    model.save_pretrained(tmp_path)
    before = _files(tmp_path)
    _bump(model)
    replace = os.replace

    def failing(src, dst, *args, **kwargs):
        src, dst = os.fspath(src), os.fspath(dst)
        if f"{os.sep}.before{os.sep}" in src and (kept_by == "copy" or not dst.endswith(".before-save")):
            raise OSError(errno.EIO, "Input/output error", src)  # (the put-back)
        if os.path.dirname(dst) == str(tmp_path / "other") and ".saving-" in src:
            raise PermissionError(errno.EPERM, "Operation not permitted", src, None, dst)
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(PermissionError) as caught:
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    message = str(caught.value)
    assert caught.value.errno == errno.EPERM and "\n" not in message and ".saving-" not in message
    kept = re.findall(r"earlier file kept at (\S+?\.before-save)\b", message)
    after = _files(tmp_path)
    changed = sorted(name for name in before if after.get(name) != before[name])
    assert "adapter_model.safetensors" in changed and not any(name.startswith("other") for name in changed)
    assert set(changed) <= {os.path.relpath(path, tmp_path)[: -len(".before-save")] for path in kept}  # (config too)
    for path in kept:  # the old weights recoverable at the path the error names
        assert (
            after[os.path.relpath(path, tmp_path)] == before[os.path.relpath(path, tmp_path)[: -len(".before-save")]]
        )
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
