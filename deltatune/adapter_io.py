"""Saving and loading a DeltaModel's adapters: PEFT's files, and peft's state-dict functions.

The DeltaModel methods ``adapter_state_dict``, ``save_pretrained``, ``load_adapter`` and ``load_adapter_weights`` are
these functions (the class binds them), and ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` are peft's
module-level functions of the same names over a DeltaModel. Split from model.py in session 46 (model.py was at its
limit); it reads the model through its attributes and never imports model.py.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from contextlib import nullcontext
from typing import Any

import torch

from . import heads_rule, registry, status, targets
from .config import CONFIG_NAME, ConfigError, DeltaConfig
from .files import (
    HUB_KWARGS,
    KEY_PREFIX,
    AdapterLoadError,
    _head_echo,
    atomic_write,
    base_key,
    check_adapter_name,
    dora_weight_name,
    embedding_copies,
    explain_missing_fields,
    key_prefix,
    match_tensors,
    pick_tensors,
    read_weights,
    resolve,
    split_heads,
    stage_training_state,
    tied_output_rows,
    upcast_adapter,
)
from .files_save import check_folders, save_adapters
from .layer import base_parameters, unwrapped_name
from .load_options import split_load_kwargs
from .methods._lora_conv import settled_after
from .targets import HEADS_BY_TASK, IA3_TARGETS, LORA_TARGETS, _all_linear, all_linear_names, matches, model_type

DeltaModel = Any  # model.DeltaModel, which imports this module


def adapter_state_dict(model: DeltaModel, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """An adapter's tensors with PEFT's keys (``<files.KEY_PREFIX><path>.<the layer's own names>``)."""
    name = adapter_name or model.active_adapter
    model._check_names([name])
    out: dict[str, torch.Tensor] = {}
    prefix = key_prefix(model.peft_config[name])
    for path, layer in model._layers():
        if name in layer.adapter_names:
            out.update(layer.export_state(name, f"{prefix}{path}."))
    for pname, p in model._base_params(name).items():
        out[prefix + base_key(pname, name)] = p
    for pname, p in base_parameters(model.base_model, model._copies.get(name, [])).items():
        out.setdefault(prefix + pname, p)  # (peft's save_embedding_layers: resized vocabularies; named as peft)
    return out


def import_tensors(model: DeltaModel, name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    prefix = key_prefix(model.peft_config[name])
    with heads_rule.old_copies(model, name, tensors, prefix), settled_after(model, name):  # (old copies; OLoRA bases)
        expected = adapter_state_dict(model, name)
        # a base parameter saved under another wrapping of its module (x.bias, x.base_layer.bias) is this one
        alias = {unwrapped_name(k): k for k in expected}
        tensors = {k if k in expected else alias.get(unwrapped_name(k), k): v for k, v in tensors.items()}
        base_params = {prefix + n: p for n, p in model.base_model.named_parameters(remove_duplicate=False)}
        _check_class_count(model, tensors, expected, source)
        full_copies = match_tensors(tensors, expected, base_params, source)
        copies = {k: tensors[k] for k in full_copies}
        tensors = {k: v.to(expected[k].dtype) for k, v in tensors.items() if k in expected}
        for path, layer in [(path, layer) for path, layer in model._layers() if name in layer.adapter_names]:
            layer.import_state(name, f"{prefix}{path}.", tensors)
        # a copy replaces the base weight: one merged into (another adapter's update) is unmerged first, merged after
        with torch.no_grad(), model._unmerged(full_copies.values()) if full_copies else nullcontext():
            for pname, p in model._base_params(name).items():
                p.copy_(tensors[prefix + base_key(pname, name)])
            for key, target in full_copies.items():
                target.copy_(copies[key])
        model._copies[name] = [unwrapped_name(key.removeprefix(prefix)) for key in full_copies]


def _check_class_count(model: DeltaModel, tensors: dict, expected: dict, source: str) -> None:
    """Refuse a classification head whose rows (one per class) differ from this model's ``num_labels``, naming the
    class count, not the base model: the file was trained on other classes (another ``data.labels``)."""
    n = getattr(getattr(model.base_model, "config", None), "num_labels", None)
    heads = {h for task in ("SEQ_CLS", "TOKEN_CLS") for h in HEADS_BY_TASK[task]}
    for key, target in expected.items():
        if key not in tensors or not heads & set(key.split(".")):
            continue
        got, want = tuple(tensors[key].shape), tuple(target.shape)
        if got != want and want and want[0] == n and got[1:] == want[1:]:
            raise AdapterLoadError(
                f"{source}: {key} has {got[0]} rows (one per class) in the file but {want[0]} in this model: the "
                f"class count differs (the adapter was trained on {got[0]} classes); set data.labels to the classes "
                "it was trained with (its run.yaml records them)"
            )


def save_pretrained(model: DeltaModel, save_directory: str | os.PathLike[str], selected_adapters: list[str] | None = None,
                    safe_serialization: bool = True, *args: Any, is_main_process: bool = True,
                    save_embedding_layers: bool | str = "auto", **kwargs: Any) -> None:  # fmt: skip
    """Write each adapter's ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's layout): "default" in
    ``save_directory``, any other in ``save_directory/<name>``, each file renamed into place once written (a crash
    never leaves a half-written file); nothing where ``is_main_process`` is False, and no adapter but the folder
    for ``selected_adapters=[]`` (as peft). ``safe_serialization=False`` (peft's): ``adapter_model.bin`` (``torch.save``)
    instead of ``adapter_model.safetensors``, which it replaces.
    ``save_embedding_layers``: peft's (``files.embedding_copies``), the embedding matrices beside the adapter;
    ``path_initial_model_for_weight_conversion``: peft's, the adapter's change since that initial save;
    ``state_dict``: peft's, the tensors taken from it (``files.pick_tensors``). peft's positional order
    (``save_pretrained(folder, safe_serialization, selected_adapters, save_embedding_layers, is_main_process,
    path_initial_model_for_weight_conversion)``) is taken too, told apart by the bool second; in deltatune's order
    (selected_adapters second) the arguments after safe_serialization are keyword-only, so no call means the other."""
    if isinstance(selected_adapters, bool):  # peft's positional order: (save_directory, safe_serialization, selected)
        selected_adapters, safe_serialization = (None if safe_serialization is True else safe_serialization), (
            selected_adapters)  # fmt: skip
        rest = ("save_embedding_layers", "is_main_process", "path_initial_model_for_weight_conversion")
        if len(args) > len(rest):
            raise TypeError(f"save_pretrained() takes at most {len(rest) + 3} positional arguments in peft's order "
                            f"(save_directory, safe_serialization, selected_adapters, {', '.join(rest)})")  # fmt: skip
        given = dict(zip(rest, args))
        save_embedding_layers = given.pop("save_embedding_layers", save_embedding_layers)
        is_main_process = given.pop("is_main_process", is_main_process)
        kwargs.update(given)
    elif args:
        raise TypeError("save_pretrained(): in deltatune's order (save_directory, selected_adapters, "
                        "safe_serialization) the rest is keyword-only: pass is_main_process=, save_embedding_layers= "
                        "by name, or use peft's order (save_directory, safe_serialization, selected_adapters, "
                        "save_embedding_layers, is_main_process)")  # fmt: skip
    names = model._check_names(list(model.peft_config) if selected_adapters is None else selected_adapters)
    check_folders(save_directory, names)  # (a file there refused; all on every process, as peft checks them)
    if not is_main_process:
        return
    card = _model_card(model, save_directory)  # an unreadable README.md refused before any file is written, as peft
    # (safe_serialization False: peft's torch.save file, staged and moved in as the safetensors one; an older
    # adapter_model.safetensors removed, which peft leaves and its loading then prefers)
    save_adapters(model, save_directory, names, save_embedding_layers, safe_serialization=safe_serialization, **kwargs)
    atomic_write(os.path.join(save_directory, "README.md"), card.save)  # peft's, once the adapters are in place


def create_or_update_model_card(model: DeltaModel, output_dir: str | os.PathLike[str]) -> None:
    """peft's: write or update ``output_dir/README.md``, a Hugging Face model card with peft's metadata
    (``library_name: peft``, as the files load with peft; ``base_model``; the tags ``transformers``, ``lora`` for a
    LoRA, ``base_model:adapter:<base>`` and the base model's ``model_tags``; ``pipeline_tag: text-generation`` for a
    causal-LM task type) and deltatune's version under "Framework versions". An existing card keeps its text and its
    other fields. ``save_pretrained`` writes it in the folder it saves into, as peft's does."""
    card = _model_card(model, output_dir)
    os.makedirs(output_dir, exist_ok=True)
    atomic_write(os.path.join(output_dir, "README.md"), card.save)  # never half-written


def _model_card(model: DeltaModel, output_dir: str | os.PathLike[str]) -> Any:
    """``create_or_update_model_card``'s card, read and updated, not written; a README.md that is no model card
    (not UTF-8, its --- block not YAML or not a mapping) refused in one line naming it."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData
    from transformers import PreTrainedModel

    from . import __version__

    filename = os.path.join(output_dir, "README.md")
    try:
        card = ModelCard.load(filename) if os.path.exists(filename) else ModelCard.from_template(ModelCardData())
    except yaml.YAMLError as exc:  # (huggingface_hub's own: the parser's paragraphs, no file named)
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{filename}{at}: the model card's metadata (its --- block) is not valid YAML") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{filename} is not UTF-8 text (byte {exc.start}); a model card is markdown") from None
    except ValueError as exc:  # (huggingface_hub's "repo card metadata block should be a dict", no file named)
        raise ValueError(f"{filename}: {exc}") from None
    card.data["library_name"] = "peft"
    base = model.get_base_model()
    config = model.active_peft_config if model.active_adapters else None
    tags = set(getattr(base, "model_tags", None) or [])
    tags |= {"transformers"} if isinstance(base, PreTrainedModel) else set()
    tags |= {"lora"} if config is not None and config.peft_type == "LORA" else set()
    tags |= {f"base_model:adapter:{base.name_or_path}"} if hasattr(base, "name_or_path") else set()
    if tags:
        card.data["tags"] = sorted(tags)
    if not card.data.pipeline_tag and config is not None and config.task_type == "CAUSAL_LM":
        card.data.pipeline_tag = "text-generation"
    base_config = getattr(base, "config", None)
    if callable(getattr(base_config, "to_dict", None)) and "_name_or_path" in base_config.to_dict():
        card.data["base_model"] = base_config.to_dict()["_name_or_path"]
    lines, heading = card.text.splitlines(), "### Framework versions"
    if f"- deltatune {__version__}" not in lines:
        if heading in lines:
            lines.insert(lines.index(heading) + 2, f"- deltatune {__version__}")
        else:
            lines.append(f"{heading}\n\n- deltatune {__version__}")
    card.text = "\n".join(lines)
    return card


def load_adapter(
    model: DeltaModel,
    model_id: str | os.PathLike[str],
    adapter_name: str,
    is_trainable: bool = False,
    torch_device: str | torch.device | None = None,  # peft's order of the arguments up to key_mapping
    autocast_adapter_dtype: bool = False,
    ephemeral_gpu_offload: bool = False,
    low_cpu_mem_usage: bool = False,
    key_mapping: dict[str, str] | None = None,
    allow_pickle: bool = True,
    subfolder: str | None = None,
    revision: str | None = None,
    modules_to_save: bool = True,
    *,
    _config: DeltaConfig | None = None,
    _caller: str = "load_adapter",  # (the call an unknown argument is named as: from_pretrained's too)
    **kwargs: Any,
) -> Any:
    """Load a saved adapter (deltatune's or PEFT's) as ``adapter_name``; the model is unchanged on error. Returns
    torch's ``_IncompatibleKeys``, as peft's, with no key in it (a missing or unknown tensor is refused).

    Args:
        model_id: a local folder, or a hub repo id when the hub is reachable.
        adapter_name: the name to give it in this model. An adapter of that name already there gets the file's
            tensors (its config, activity and trainability stay; a config with other shapes is refused), as peft's.
        is_trainable: False (the default, as in PEFT) freezes it for inference and puts the model in eval mode.
        allow_pickle: read an ``adapter_model.bin`` (``save_pretrained(safe_serialization=False)``'s, peft's) when
            there is no safetensors file, as peft does: ``torch.load(weights_only=True)``, whose unpickler builds
            tensors and plain containers only. False refuses such a file.
        subfolder: a folder inside ``model_id`` holding the adapter.
        revision: hub revision.
        modules_to_save: False loads the body alone: the heads it trained in full (its ``modules_to_save``,
            e.g. a classifier with another number of labels) are left out, and so is a task type that adds one.
        torch_device, low_cpu_mem_usage, autocast_adapter_dtype: peft's. The file is read onto ``torch_device``
            (the adapter then sits on its base layers' devices, as peft's); ``low_cpu_mem_usage`` draws no
            initial weights (the random state is left as it was; peft's still draws an embedding's); ``autocast_adapter_dtype=True`` keeps a
            half-precision base's adapter in float32 (peft's default; deltatune's, False, the base's dtype).
        ephemeral_gpu_offload: peft's; no effect (deltatune keeps no module offloaded to move to the GPU).
        key_mapping: peft's: {regex: replacement} rewriting the file's keys, less their prefix (``status.remap_keys``).
        kwargs: peft's hub arguments (``files.HUB_KWARGS``: token, cache_dir, local_files_only, ...), for a hub repo;
            peft's dispatch arguments (device_map, max_memory, offload_folder, offload_dir, offload_index) and
            use_safetensors (peft reads adapter_model.safetensors whenever there is one) are accepted with no effect;
            peft 0.22's strict_adapter_check is checked, and a missing or unknown tensor is refused whichever value.

    Raises:
        FileNotFoundError: no adapter there.
        AdapterLoadError: a file is truncated or corrupt, or the adapter does not fit this model.
    """
    hub = split_load_kwargs(kwargs, _caller)  # (peft's: hub, dispatch, strict_adapter_check; an unknown one refused)
    check_adapter_name(adapter_name)
    if adapter_name in model.peft_config:  # peft's: the file's tensors into that adapter; its config and flags stay
        tensors, source = read_weights(model_id, subfolder, revision, allow_pickle, torch_device, hub)
        tensors = status.remap_keys(tensors, key_mapping) if key_mapping else tensors
        if not modules_to_save:  # which of the file's tensors are heads is its config's to say, not this adapter's
            raise AdapterLoadError(f"{model_id}: load_adapter(modules_to_save=False) onto the existing adapter "
                                   f"{adapter_name!r} is not supported; load it under a new name, or with its heads")  # fmt: skip
        with model._unmerged():  # a merged adapter's old update comes out of the weights before the new one goes in
            import_tensors(model, adapter_name, tensors, source)
            if autocast_adapter_dtype and upcast_adapter([layer for _, layer in model._layers()], adapter_name):
                import_tensors(model, adapter_name, tensors, source)  # the file's values again, unrounded
        if not is_trainable:
            model.eval()
        return _no_incompatible_keys()
    config_file = (
        "" if _config is not None else resolve(model_id, CONFIG_NAME, subfolder, revision, hub)
    )  # from_pretrained's
    config = (registry.from_pretrained(config_file) if _config is None else _config).replace(
        inference_mode=not is_trainable
    )
    tensors, source = read_weights(model_id, subfolder, revision, allow_pickle, torch_device, hub, _config is not None)
    tensors = status.remap_keys(tensors, key_mapping) if key_mapping else tensors
    if not modules_to_save:
        tensors = split_heads(tensors, config.modules_to_save, key_prefix(config))[0]
        task = None if config.task_type in HEADS_BY_TASK else config.task_type
        config = config.replace(modules_to_save=None, task_type=task)
    try:
        with targets.from_file(), torch.random.fork_rng(devices=[]) if low_cpu_mem_usage else nullcontext():
            model.add_adapter(adapter_name, config, _tensors=tensors, _source=source)
    except AdapterLoadError as exc:
        raise explain_missing_fields(exc, config_file, config) from None
    except ConfigError as exc:  # the file's config does not fit this model (e.g. its target_modules): name the file
        if not config_file or str(exc).startswith(config_file):
            raise
        raise ConfigError(f"{config_file}: {exc}") from None
    if autocast_adapter_dtype and upcast_adapter([layer for _, layer in model._layers()], adapter_name):
        import_tensors(model, adapter_name, tensors, source)  # the file's values again, unrounded
    if is_trainable:  # its parameters train though it is not active, as peft's (until set_adapter picks others)
        status.set_requires_grad(model, adapter_name)
    else:  # inference: no dropout (PEFT's load_adapter does so too)
        model.eval()
    return _no_incompatible_keys()


def _no_incompatible_keys() -> Any:
    """What peft's ``load_adapter`` / ``set_peft_model_state_dict`` return (torch's ``_IncompatibleKeys``): empty
    lists, since deltatune refuses a file with a missing or unknown tensor instead of loading the rest."""
    return torch.nn.modules.module._IncompatibleKeys([], [])


def load_adapter_weights(model: DeltaModel, model_id: str | os.PathLike[str], adapter_name: str) -> None:
    """Copy saved weights into the existing adapter ``adapter_name`` (resuming: with its training state).

    Raises:
        AdapterLoadError: the file is missing, corrupt or does not fit the adapter; nothing is changed.
    """
    model._check_names([adapter_name])
    tensors, source = read_weights(model_id, None, None, allow_pickle=True)  # (torch.load(weights_only=True))
    stage_training_state(dict(model._layers()), model_id, adapter_name)
    with model._unmerged():  # a merged adapter's old update comes out of the weights before the new one goes in
        import_tensors(model, adapter_name, tensors, source)


def get_peft_model_state_dict(
    model: DeltaModel | torch.nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """peft's function of that name over a DeltaModel: adapter ``adapter_name``'s tensors as ``save_pretrained``
    writes them (peft's keys, no adapter name in them; the embedding copies ``save_embedding_layers`` asks for). On a
    model given to ``inject_adapter_in_model`` the keys are its module paths, without peft's ``base_model.model.``.

    ``unwrap_compiled`` is accepted (a DeltaModel is never a compiled wrapper). ``state_dict=`` (peft's): the tensors
    are picked out of that state dict (keyed as the model's own ``state_dict`` or as peft's, ``files.pick_tensors``),
    e.g. one gathered from sharded (FSDP / ZeRO-3) parameters; the embedding copies too, as peft's. Prompt learning's
    ``prompt_embeddings`` (no parameter of their own) are the live value, as peft's, which ignores the state dict there.
    """
    model, strip = _delta_of(model, "get_peft_model_state_dict")
    model._check_names([adapter_name])
    config = model.peft_config[adapter_name]
    given = adapter_state_dict(model, adapter_name)
    for pname, p in embedding_copies(model.base_model, config, save_embedding_layers).items():
        given.setdefault(key_prefix(config) + pname, p)
    given = given if state_dict is None else pick_tensors(model, adapter_name, state_dict, given, injected=strip)
    out = {k: v.detach() for k, v in given.items()}
    return {k.removeprefix(key_prefix(config)) if strip else k: v for k, v in out.items()}


def set_peft_model_state_dict(
    model: DeltaModel | torch.nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> Any:
    """peft's function of that name over a DeltaModel (or a model given to ``inject_adapter_in_model``): the tensors
    (``get_peft_model_state_dict``'s keys, or an ``adapter_model.safetensors`` file's) into the existing adapter
    ``adapter_name``.

    As peft's, the load is not strict: a tensor the adapter does not have is left out and an adapter tensor the dict
    lacks keeps its value; both are named in the returned ``_IncompatibleKeys`` (torch's, as peft's:
    ``unexpected_keys`` as given, ``missing_keys`` the adapter's parameters by their names in the model, adapter name
    included, as peft's: ``base_model.model.<path>.lora_A.default.weight``) and in a warning. peft's ``missing_keys``
    also lists every base weight and every other adapter's tensors, which a state dict for one adapter never holds and
    which peft's own ``load_adapter`` and transformers filter out (``"lora_" in k and adapter_name in k``); they are
    left out here on purpose. ``ignore_mismatched_sizes=True`` (peft's) keeps the adapter's own value for each tensor
    of another shape, with a warning naming it (and in ``missing_keys``, as peft's); without it a shape that differs
    is refused (AdapterLoadError) and the model is unchanged. ``low_cpu_mem_usage`` is accepted (the adapter's tensors exist).
    """
    model, strip = _delta_of(model, "set_peft_model_state_dict")
    model._check_names([adapter_name])
    prefix = key_prefix(model.peft_config[adapter_name])
    given = {(prefix + k if strip else k): k for k in peft_model_state_dict}
    tensors = {k: peft_model_state_dict[v] for k, v in given.items()}
    expected = adapter_state_dict(model, adapter_name)
    alias = {unwrapped_name(k): k for k in expected}
    # a base weight by its name in the model as it is (peft's): ``q_proj.weight`` of a wrapped q_proj is unexpected
    base = {prefix + n for n, _ in model.base_model.named_parameters(remove_duplicate=False)}
    known = [k for k in tensors if alias.get(unwrapped_name(k), k) in expected or k in base]
    unexpected = [given[k] for k in tensors if k not in known and not _head_echo(k, expected)]
    tensors = {k: v for k, v in tensors.items() if k in known}
    present = {alias.get(unwrapped_name(k), k) for k in tensors}
    missing = [k for k in expected if k not in present]
    tensors.update({k: expected[k].detach().clone() for k in missing})  # kept as they are
    kept: set[str] = set()  # mismatched, the model's value kept: in missing_keys too, as peft's
    if ignore_mismatched_sizes:
        for key, value in list(tensors.items()):
            key = alias.get(unwrapped_name(key), key)
            if key in expected and tuple(value.shape) != tuple(expected[key].shape):
                warnings.warn(
                    f"{key}: shape {tuple(value.shape)} in the state dict, {tuple(expected[key].shape)} in the "
                    "model; the model's value is kept (ignore_mismatched_sizes)",
                    stacklevel=2,
                )
                tensors[key] = expected[key].detach().clone()
                kept.add(key)
    with model._unmerged():  # a merged adapter's old update comes out of the weights before the new one goes in
        import_tensors(model, adapter_name, tensors, "state dict")
    if missing or unexpected:
        first = missing[0].removeprefix(prefix) if strip and missing else (missing or [""])[0]
        warnings.warn(
            f"set_peft_model_state_dict (adapter {adapter_name!r}): {len(unexpected)} unexpected key(s) left out"
            f"{f' (first {unexpected[0]!r})' if unexpected else ''}, {len(missing)} adapter tensor(s) missing, kept as "
            f"they were{f' (first {first!r})' if missing else ''}",
            stacklevel=2,
        )
    return torch.nn.modules.module._IncompatibleKeys(
        _in_model_names(
            model, adapter_name, expected, [k for k in expected if k in kept or k in missing], prefix, strip
        ),
        unexpected,
    )


def _in_model_names(
    model: DeltaModel, adapter_name: str, expected: dict, keys: list[str], prefix: str, strip: bool
) -> list[str]:
    """Saved keys as peft's ``missing_keys`` names them: the parameter's name in the model, adapter name included
    (``base_model.model.<path>.lora_A.default.weight``; on an injected model ``<path>.lora_A.default.weight``), so
    the filter peft's ``load_adapter`` and transformers apply (``"lora_" in k and adapter_name in k``) keeps them. A
    tensor saved in a folded form (no parameter of its own) keeps its saved key. Token rows are their saved key and
    the adapter name, as peft's (LoRA's in its ``token_adapter``; a tied output layer's its own, though one tensor)."""
    names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    out = []
    for key in keys:
        name = names.get(id(expected[key]))
        if key.endswith(".trainable_tokens_delta"):
            out.append(key.removeprefix(prefix) if strip else KEY_PREFIX + key.removeprefix(prefix))
            out[-1] += f".{adapter_name}"
            out += tied_output_rows(model.base_model, out[-1])  # (LoRA's on a tied model: peft's lm_head row too)
        elif name is None:
            out.append(key.removeprefix(prefix) if strip else key)
        elif name.startswith("base_model."):
            out.append(name.removeprefix("base_model.") if strip else KEY_PREFIX + name[len("base_model.") :])
        else:
            out.append(name)
        out[-1] = dora_weight_name(out[-1], adapter_name)  # e.g. DoRA's magnitude, a module's .weight in peft
    return out


def untie_diverged(model: torch.nn.Module) -> torch.nn.Module:
    """peft's ``merge_and_unload`` ending: a merged model whose config ties the output embedding to the input one
    (``tie_word_embeddings``) but whose two weights no longer are one tensor (a head trained in full,
    ``modules_to_save=["lm_head"]``) gets ``tie_word_embeddings = False``, with peft's warning, so a loader that
    ties by the config (a model built from config.json, vLLM) keeps the trained head. Returns ``model``."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return model
    try:
        weights = [getattr(m, "weight", None) for m in (model.get_output_embeddings(), model.get_input_embeddings())]
    except (NotImplementedError, AttributeError):
        return model
    if None not in weights and weights[0].data_ptr() != weights[1].data_ptr():
        config.tie_word_embeddings = False
        warnings.warn("Input and output embeddings are no longer tied after merging. Setting "
                      "`tie_word_embeddings=False` in the model config.", stacklevel=3)  # fmt: skip
    return model


def load_peft_weights(
    model_id: str | os.PathLike[str],
    device: str | torch.device | None = None,
    key_mapping: dict[str, str] | None = None,
    **hf_hub_download_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """peft's: the tensors of the adapter saved at ``model_id`` as the file keys them (peft's keys, no adapter name):
    ``adapter_model.safetensors``, else ``adapter_model.bin`` (``torch.load(weights_only=True)``), read onto ``device``
    (None: CUDA when there is one, else the CPU, as peft's picks the accelerator). ``key_mapping`` as
    ``load_adapter``'s; ``hf_hub_download_kwargs``: ``subfolder``, ``revision`` and the hub arguments
    (``files.HUB_KWARGS``; peft's ``user_agent`` is accepted with no effect).

    Raises:
        FileNotFoundError: no adapter file there.
        AdapterLoadError: the file is truncated or corrupt.
    """
    options = dict(hf_hub_download_kwargs)
    subfolder, revision = options.pop("subfolder", None), options.pop("revision", None)
    hub = {k: options.pop(k) for k in HUB_KWARGS if k in options}
    options.pop("user_agent", None)
    if options:
        raise TypeError(f"load_peft_weights() got an unexpected keyword argument {next(iter(options))!r}")
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    tensors, _ = read_weights(model_id, subfolder, revision, True, device, hub)
    return status.remap_keys(tensors, key_mapping) if key_mapping else tensors


def get_layer_status(model: DeltaModel | torch.nn.Module) -> list[status.TunerLayerStatus]:
    """peft's function: ``model.get_layer_status()`` of a DeltaModel, or of a model given to
    ``inject_adapter_in_model`` (each layer then named by its path in that model, as peft's)."""
    delta, injected = _delta_of(model, "get_layer_status")
    found = delta.get_layer_status()
    return [dataclasses.replace(s, name=s.name.removeprefix("model.")) for s in found] if injected else found


def get_model_status(model: DeltaModel | torch.nn.Module) -> status.TunerModelStatus:
    """peft's function: ``model.get_model_status()`` of a DeltaModel or of a model given to
    ``inject_adapter_in_model`` (there with the method and ``peft_types`` named, where peft's says None and {})."""
    return _delta_of(model, "get_model_status")[0].get_model_status()


def _delta_of(model: Any, caller: str) -> tuple[Any, bool]:
    """The DeltaModel that ``model`` is, or that ``inject_adapter_in_model`` made of it (then True: keys without
    peft's prefix, as peft's on an injected model)."""
    if isinstance(getattr(model, "peft_config", None), dict) and hasattr(model, "adapter_state_dict"):
        return model, False
    injected = getattr(model, "__dict__", {}).get(INJECTED)
    if injected is None:
        raise TypeError(f"{caller}: {type(model).__name__} is neither a DeltaModel nor a model given to "
                        "deltatune.inject_adapter_in_model")  # fmt: skip
    return injected, True


def with_revision(config: DeltaConfig, revision: str | None) -> DeltaConfig:
    """peft's ``get_peft_model(revision=...)``: the base model's revision recorded in the config's ``revision`` field
    (a copy; peft warns when it replaces another one): every config has the field, as every peft config."""
    if revision is None:
        return config
    if not isinstance(revision, str):
        raise TypeError(f"revision must be a string (a branch, tag or commit of the base model), got {revision!r}")
    if config.revision is not None and config.revision != revision:
        warnings.warn(f"peft config has already set base model revision to {config.revision}, overwriting with "
                      f"revision {revision}", stacklevel=3)  # fmt: skip
    return config.replace(revision=revision)


# peft's PEFT_TYPE_TO_PREFIX_MAPPING for the methods deltatune shares with it: the name part its layers' tensors begin with
PEFT_PREFIXES = {"LORA": "lora_", "IA3": "ia3_", "TRAINABLE_TOKENS": "trainable_tokens_"}


def targets_of_state_dict(model: torch.nn.Module, config: DeltaConfig, state_dict: dict[str, Any]) -> DeltaConfig:
    """peft's ``inject_adapter_in_model(state_dict=...)``: the modules the state dict's keys name (only its keys are
    read) are the targets, in place of the config's own selection; a copy of the config naming them by path.

    As peft's, a key names the module before its last ``.lora_`` (the method's prefix, ``PEFT_PREFIXES``):
    ``q_proj.lora_A.weight`` names ``q_proj``; a base ``q_proj.weight``, a ``modules_to_save`` copy or a
    ``trainable_token_indices`` delta names none. A method peft lacks takes the longest module path a key starts with
    whose next part is none of that module's own tensors. Modules inside an adapter layer already there are passed
    over, as peft's. peft's ``_orig_mod.`` (torch.compile) and a PeftModel's ``base_model.model.`` in front of the
    keys are left out."""
    if config.no_targets:  # (a method that adapts no module by name: its own rule picks what it trains)
        return config
    from .layer import DeltaLayer

    modules = dict(model.named_modules())
    inner = tuple(n + "." for n, m in modules.items() if isinstance(m, DeltaLayer))
    prefix = PEFT_PREFIXES.get(config.peft_type)
    names: set[str] = set()
    for key in state_dict:
        key = key.removeprefix("_orig_mod.").removeprefix(KEY_PREFIX)
        if prefix is not None:
            path = key.rsplit("." + prefix, 1)[0]
            names |= {path} if path and path in modules and not path.startswith(inner) else set()
            continue
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            path = ".".join(parts[:i])
            if path in modules and not path.startswith(inner):
                own = dict(modules[path].named_parameters(recurse=False)) | dict(
                    modules[path].named_buffers(recurse=False)
                )
                names |= set() if parts[i] in own else {path}
                break
    if not names:
        first = next(iter(state_dict), None)
        raise ConfigError(f"inject_adapter_in_model: no key of state_dict names an adapter on a module of the model "
                          f"(the first: {first!r})")  # fmt: skip
    _warn_disagreement(model, modules, inner, config, names)
    narrowing: dict[str, Any] = {
        f.name: None for f in dataclasses.fields(config) if f.name in ("exclude_modules", "layers_to_transform")
    }
    feedforward = getattr(config, "feedforward_modules", None)  # IA3's: by path too, a subset of the targets
    if isinstance(feedforward, list):
        narrowing["feedforward_modules"] = [n for n in sorted(names) if matches(n, feedforward)]
    return config.replace(target_modules=sorted(names), **narrowing)


def _warn_disagreement(
    model: torch.nn.Module, modules: dict[str, Any], inner: tuple[str, ...], config: DeltaConfig, names: set[str]
) -> None:
    """peft's RuntimeWarning (its words) when the config's own target_modules (a list, a regex, "all-linear", or None:
    the family default) would have picked other modules than the state dict's keys name (a family with no default:
    no warning)."""
    given = _all_linear(config.target_modules)
    if given is None:
        table = {"LORA": LORA_TARGETS, "IA3": IA3_TARGETS}.get(config.peft_type, {})
        given = table.get(model_type(model) or "")
        if given is None:
            return
    candidates = set(all_linear_names(model)) if given == "all-linear" else set(modules)
    given = ".*" if given == "all-linear" else given
    layers, pattern = getattr(config, "layers_to_transform", None), getattr(config, "layers_pattern", None)
    picked = {n for n in candidates if n and not n.startswith(inner) and matches(n, given, layers, pattern)}
    extra_config, extra_dict = sorted(picked - names), sorted(names - picked)
    if not extra_config and not extra_dict:
        return
    message = (
        "While injecting the PEFT adapters, an inconsistency was discovered between the PEFT config and the provided "
        "state_dict. This is not necessarily an issue and can be ignored if this was the intent. "
    )
    message += f"The PEFT config contained these additional target modules: {extra_config}. " if extra_config else ""
    message += f"The state_dict contained these additional target modules: {extra_dict}. " if extra_dict else ""
    warnings.warn(message, RuntimeWarning, stacklevel=4)


INJECTED = "_deltatune_model"  # where inject_adapter_in_model keeps the DeltaModel, out of the module tree
