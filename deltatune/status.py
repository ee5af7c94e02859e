"""What a DeltaModel's adapters are doing: which parameters train, whether the layers act, and peft's reports of it.

Setting it: ``apply_active`` (exactly the active, trainable adapters' parameters train; run after every change of
the active adapters), peft 0.21.2's ``set_requires_grad`` and ``enable_adapter_layers`` / ``disable_adapter_layers``.
Reporting it: the parameter counts and peft's ``TunerLayerStatus`` / ``TunerModelStatus`` (the same fields, and the
same values for the same model, as ``PeftModel.get_layer_status`` / ``get_model_status``).
"""

from __future__ import annotations

import collections
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .files import KEY_PREFIX
from .layer import BASE_ROW, DeltaLayer, ModulesToSave, checkpointing, logical_numel, row_names, warn_deleted

DeltaModel = Any  # model.DeltaModel, which imports this module (not imported back: no cycle, even for type checkers)
Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """peft's ``TunerLayerStatus``: one adapter layer (``name`` as peft's, under its tuner's ``model.``)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """peft's ``TunerModelStatus``: the layers' statuses summed up ("irregular" where the layers disagree)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


# peft's module_type is its layer's repr up to "(": its LoRA layers prefix the tuner's name ("lora.Linear"), its other
# tuners' do not (IA3's "Linear"); its layer classes are named after the base layer, GPT-2's Conv1D wrapped as Linear.
_REPR_PREFIX = {"LORA": "lora."}
_PEFT_CLASS = {"Conv1D": "Linear", "DequantizedLinear": "Linear4bit"}


# -- setting ------------------------------------------------------------------------------------------------------------
def _own(layer: DeltaLayer) -> Iterable[tuple[str, torch.nn.Parameter]]:
    return ((n, p) for n in layer.adapter_names for p in layer.adapter_parameters(n).values())


def _set_grad(layer: DeltaLayer, names: Iterable[str], flag: bool) -> None:
    for name in names:
        for p in layer.adapter_parameters(name).values():
            p.requires_grad_(flag)


def apply_active(
    model: DeltaModel, keep: bool = False, new: str | None = None, inference_mode: bool | None = None
) -> None:
    """Route every layer to the active adapters; exactly the active, trainable adapters' parameters train: an active
    adapter is trainable unless its config's ``inference_mode`` (or ``inference_mode`` when given: peft's
    ``set_adapter`` argument, which overrides the config's) is True. With ``keep`` (add_adapter, and delete_adapter
    of an inactive adapter, which in peft touch no other adapter) every adapter but ``new`` keeps each parameter's
    ``requires_grad`` as it was (a set_adapter(inference_mode=True) freeze, a load_adapter(is_trainable=True) of an
    inactive one, a hand-frozen lora_A, a base bias BitFit trains); ``new``, just added, follows the rule."""
    layers = [layer for _, layer in model._layers()]
    frozen = {
        n: model.peft_config[n].inference_mode if inference_mode is None else inference_mode
        for n in model.active_adapters
    }
    kept: dict[int, bool] = {}  # id(parameter) -> its requires_grad, for the adapters keep holds as they were
    if keep:
        for name in (n for n in model.peft_config if n != new):
            own = [
                p for layer in layers if name in layer.adapter_names for p in layer.adapter_parameters(name).values()
            ]
            kept |= {id(p): p.requires_grad for p in [*own, *model._base_params(name).values()]}
    # peft's wrapper of a full copy (a head) touches two copies when the active adapter changes: the one it had active
    # is frozen, the new one follows the rule; any other copy keeps its flag (load_adapter(is_trainable=True) of an
    # inactive adapter trains its copy until it is active and then inactive again)
    before = {id(layer): list(layer.active_adapters) for layer in layers if isinstance(layer, ModulesToSave)}
    for layer in layers:
        layer.set_adapters(model.active_adapters)
    trainable: set[int] = {i for i, flag in kept.items() if flag}
    for layer in layers:
        for name in layer.adapter_names:
            untouched = id(layer) in before and name not in (*before[id(layer)], *layer.active_adapters, new)
            for p in layer.adapter_parameters(name).values():
                if id(p) in kept or untouched:
                    p.requires_grad_(kept.get(id(p), p.requires_grad))
                else:
                    p.requires_grad_(name in frozen and not frozen[name])
                trainable |= {id(p)} if p.requires_grad else set()
    for name in model.active_adapters:
        if name not in frozen or frozen[name] or (keep and name != new):
            continue
        trainable.update(map(id, model._base_params(name).values()))
    # a head's original module computes only while no copy is active: then (bias="all") it gets no gradient (peft's
    # wrapper freezes it)
    trainable -= {id(p) for m in layers if isinstance(m, ModulesToSave) and m.active_adapters
                  for p in m.original_module.parameters()}  # fmt: skip
    for p in model.base_model.parameters():
        p.requires_grad_(id(p) in trainable)
    if inference_mode is not None:  # peft 0.22's set_adapter: the active adapters' own submodules in the layer's mode
        train_modes(model, model.active_adapters, inference_mode)


def delete(model: DeltaModel, name: str) -> None:
    """``DeltaModel.delete_adapter`` past its refusals, as peft's: each adapter layer that had ``name`` active takes its
    own ``successor`` (the others active with it, else the first left there by name), the model and its heads the
    first layer's (none left there: the first adapter by name), warned once in peft's words when ``name`` was the only
    one active. Deleting an inactive adapter touches no other adapter."""
    active = name in model.active_adapters
    layers = [layer for _, layer in model._layers() if not wrapper(layer)]  # (a wrapper takes the model's choice)
    own = {id(layer): layer.successor(name) for layer in layers if name in layer._asked}
    first = layers[0].successor(name) if layers else []  # (peft's delete_adapter: the first layer's choice)
    model._remove(name)
    if active and not model.active_adapters and model.peft_config:
        model.active_adapters = [n for n in first if n in model.peft_config] or [min(model.peft_config)]
        warn_deleted(name, model.active_adapters[0], stacklevel=3)
    # peft: deleting an active adapter sets the remaining ones (trainable, the others frozen); an inactive one, nothing
    apply_active(model, inference_mode=False) if active else apply_active(model, keep=True)
    for layer in (layer for layer in layers if id(layer) in own and own[id(layer)] != layer._asked):
        layer.set_adapter(own[id(layer)])


def wrapper(layer: DeltaLayer) -> bool:
    """Whether ``layer`` is one of peft's wrappers, no tuner layer of its own: a head's (modules_to_save) or LoRA's
    ``trainable_token_indices`` rows (a TrainableTokens layer holding an adapter not of the stand-alone method)."""
    keys = getattr(layer, "keys", None) if hasattr(layer, "trainable_tokens_delta") else None
    return isinstance(layer, ModulesToSave) or (keys is not None and any(n not in keys for n in layer.adapter_names))


def train_modes(model: DeltaModel, names: list[str], frozen: bool) -> None:
    """peft 0.22's ``set_training``: the named adapters' own submodules (dropout, ...) in their layer's train/eval mode,
    eval mode when ``frozen``."""
    for _, layer in model._layers():
        for d in (d for d in layer.children() if isinstance(d, torch.nn.ModuleDict)):
            for n in (n for n in names if n in d):
                d[n].train(layer.training and not frozen)


def check_bias(configs: dict[str, Any], adapter_name: str, config: Any) -> None:
    """peft's rule (``_check_new_adapter_config``), in its words: one adapter may train the base biases (LoRA's
    ``bias`` 'all' / 'lora_only'); they are one set, so a second would overwrite the first's."""
    biased = [n for n, c in configs.items() if getattr(c, "bias", "none") != "none"]
    if biased and getattr(config, "bias", "none") != "none":
        raise ValueError(f"adapter {adapter_name!r}: deltatune supports only 1 adapter with bias ({biased[0]!r} "
                         "trains them; a second would overwrite them). When using multiple adapters, set bias "
                         "to 'none' for all adapters.")  # fmt: skip


def trains_base(config: Any, base: torch.nn.Module) -> bool:
    """Whether an adapter of ``config`` trains ``base``'s own parameters in place (LoRA's bias, BitFit, freeze, full):
    they are the base every other adapter sees, so such an adapter cannot share it (serve, a PPO / GRPO reward run)."""
    if getattr(config, "bias", "none") not in ("none", None):
        return True
    return hasattr(config, "trainable_base_parameters") and bool(config.trainable_base_parameters(base))


def base_tensors(model: DeltaModel) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Each base parameter's tensor, when an adapter trains base parameters in place (so ``check_shared_base`` may
    refuse a new adapter after its init rewrote base weights: PiSSA's, OLoRA's, LoftQ's residuals replace a weight's
    tensor); references, no copies, and none at all otherwise."""
    if not any(model._base_trainables.values()):
        return {}
    return {p: p.data for p in model.base_model.parameters()}


def put_back(tensors: dict[torch.nn.Parameter, torch.Tensor]) -> None:
    """``base_tensors``' tensors back into their parameters (a refused add_adapter)."""
    for p, data in tensors.items():
        if p.data is not data:
            p.data = data


def check_shared_base(model: DeltaModel, adapter_name: str) -> None:
    """An adapter training base parameters in place that another adapter trains (BitFit's biases, freeze's or full's
    weights, LoRA's biases beside BitFit): one set, the second would overwrite the first's; refused (add_adapter then
    takes the new adapter out, the model as it was)."""
    mine = set(model._base_trainables[adapter_name])
    for other, names in model._base_trainables.items():
        if other != adapter_name and (shared := sorted(mine.intersection(names))):
            raise ValueError(f"adapter {adapter_name!r} ({model.peft_config[adapter_name].method}) trains base "
                             f"parameters that adapter {other!r} ({model.peft_config[other].method}) trains in place "
                             f"({shared[0]}, {len(shared)} in all): they are one set, and the second would overwrite "
                             "the first's; delete one adapter first")  # fmt: skip


def set_requires_grad(model: DeltaModel, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
    """peft's ``set_requires_grad``: the adapters' own parameters in every layer (a base parameter an adapter trains in
    place, e.g. ``bias="all"``, is left as it is, as peft's). A name of no adapter is skipped, as peft's."""
    if not isinstance(requires_grad, bool):
        raise TypeError(f"requires_grad must be True or False, got {requires_grad!r}")
    listed = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if not all(isinstance(n, str) for n in listed):
        raise TypeError(f"adapter names must be a name or a list of names, got {adapter_names!r}")
    names = [n for n in listed if n in model.peft_config]
    for _, layer in model._layers():
        _set_grad(layer, [n for n in names if n in layer.adapter_names], requires_grad)


def enable_layers(model: DeltaModel, enabled: bool) -> None:
    """peft's ``enable_adapter_layers`` / ``disable_adapter_layers``: every layer acts (the active adapters' parameters
    then train, frozen or not before, the others do not) or computes as the base layer (no adapter parameter trains).
    A merged layer disabled unmerges itself at its next forward, as peft's (``unmerge_at_next_forward``): enabled
    again before one, it computes merged still."""
    if not enabled:
        for name in model.active_adapters:
            if model._base_trainables.get(name):
                warnings.warn(
                    f"adapter {name!r} changed the base model's own parameters (e.g. its biases) in place; disabling "
                    "the adapter layers leaves them, so the output is not the base model's",
                    stacklevel=3,
                )
    for _, layer in model._layers():
        layer.disabled = not enabled
        unmerge_at_next_forward(layer)
        held = layer.adapter_names
        _set_grad(layer, [n for n in held if n in model.active_adapters], enabled)
        # peft: enabling leaves a wrapper's inactive full copies (a head) alone; disabling freezes every copy
        if not enabled or not isinstance(layer, ModulesToSave):
            _set_grad(layer, [n for n in held if n not in model.active_adapters], False)
    if enabled:  # peft: enabling is set_adapter(active): their dropout in the layers' mode again
        train_modes(model, model.active_adapters, False)


@contextmanager
def adapters_frozen(model: DeltaModel) -> Iterator[None]:
    """peft's ``disable_adapter`` block freezes every adapter parameter (its ``disable_adapter_layers``): none trains
    inside it, as ``get_model_status`` says. Each gets its own flag back after it (peft's block makes the active
    adapters' trainable, one frozen by ``set_adapter(inference_mode=True)`` too; nested blocks each restore theirs)."""
    flags = {id(p): (p, p.requires_grad) for _, layer in model._layers() for _, p in _own(layer)}.values()
    active = list(model.active_adapters)
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if list(model.active_adapters) != active:  # (a set_adapter inside the block: its adapters train after it)
            apply_active(model)


def unmerge_at_next_forward(layer: DeltaLayer) -> None:
    """peft's lazy unmerge: a disabled layer holding merged adapters unmerges them at its next forward, if it is
    still disabled then (``disable_adapter_layers`` and ``merge_adapter`` leave the weights as they are, and
    ``enable_adapter_layers`` before a forward keeps them merged, as peft's LoRA forward does). A one-shot forward
    pre-hook, so an enabled layer's forward pays nothing (a module-level function: the model still pickles)."""
    if not (layer.disabled and layer.merged_adapters) or getattr(layer, "_unmerge_hook", None) is not None:
        return
    layer._unmerge_hook = layer.register_forward_pre_hook(_unmerge_if_disabled)


def _unmerge_if_disabled(module: DeltaLayer, _args: Any) -> None:
    module._unmerge_hook.remove()
    module._unmerge_hook = None
    if module.disabled:
        for name in reversed(list(module.merged_adapters)):
            module.unmerge(name)


def remap_keys(tensors: dict[str, torch.Tensor], key_mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """peft's ``key_mapping``: each key less its ``files.KEY_PREFIX`` (or a token method's ``base_model.``) prefix is rewritten by the
    first pattern (a regular expression) that matches it, then given its prefix back."""
    out = {}
    for key, value in tensors.items():
        prefix = next((p for p in (KEY_PREFIX, "base_model.") if key.startswith(p)), "")
        rest = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            new, count = re.subn(pattern, replacement, rest)
            if count:
                rest = new
                break
        out[prefix + rest] = value
    return out


def check_rows(model: DeltaModel, adapter_names: object, batch_size: int | None) -> list[str]:
    """``adapter_names`` (one per row) as a list, when the adapters' state lets each row pick its adapter: none merged,
    the layers enabled, no checkpointing in training, and every named adapter's layers able to route rows."""
    names = row_names(adapter_names, batch_size, list(model.peft_config))
    layers = [layer for _, layer in model._layers()]
    if any(layer.merged_adapters for layer in layers):
        raise ValueError(
            "adapter_names cannot be used while adapters are merged into the base weights (the merged update "
            "would reach every row); call unmerge_adapter() first"
        )
    if any(layer.disabled for layer in layers):
        raise ValueError(
            "adapter_names cannot be used while the adapter layers are disabled (disable_adapter(), "
            'disable_adapter_layers()); use "__base__" rows instead'
        )
    if model.training and torch.is_grad_enabled() and checkpointing(model.base_model):
        # The backward pass recomputes checkpointed blocks after the call, when the rows are no longer routed.
        raise ValueError("adapter_names does not work with gradient checkpointing in training; turn it off")
    for name in dict.fromkeys(n for n in names if n != BASE_ROW):
        holders = [layer for layer in layers if name in layer.adapter_names]
        method = model.peft_config[name].method
        if model._base_trainables.get(name) or not holders:
            raise ValueError(
                f"adapter {name!r} ({method}) changes the base model's own parameters (e.g. its biases), which "
                "every row shares; it cannot be mixed with others in one batch"
            )
        if unable := [layer for layer in holders if not layer.supports_row_adapters]:
            raise ValueError(
                f"adapter {name!r} ({method}) cannot be mixed with others in one batch: its "
                f"{type(unable[0]).__name__} layer does not route rows (only layers whose supports_row_adapters "
                "is True do)"
            )
    return names


def cast_mixed_precision_params(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """peft's function of that name: every frozen parameter of ``model`` (a DeltaModel or any module) cast to ``dtype``
    (float16 / bfloat16, for mixed-precision training), every trainable one to float32. Unlike peft's, a parameter
    that is not floating point (a packed 4-bit weight) is left as it is (peft's cast would destroy it)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"cast_mixed_precision_params: dtype must be a floating torch.dtype, got {dtype!r}")
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.to(torch.float32 if p.requires_grad else dtype)


# -- reporting ----------------------------------------------------------------------------------------------------------
def count_parameters(model: DeltaModel) -> tuple[int, int]:
    """(trainable parameters, all parameters), counting each shared tensor once."""
    unique = {id(p): p for p in model.base_model.parameters()}.values()
    total = sum(logical_numel(p) for p in unique)  # a packed 4-bit weight counts the parameters it stands for
    trainable = sum(logical_numel(p) for p in unique if p.requires_grad)
    return trainable, total


def _agree(values: list) -> bool | Irregular:
    if all(v is True for v in values):
        return True
    return False if all(v is False for v in values) else "irregular"


def _module_type(layer: DeltaLayer, peft_type: str) -> str:
    if isinstance(layer, ModulesToSave):
        return "ModulesToSaveWrapper"
    if peft_class := getattr(layer, "peft_class", None):  # a layer that stands for one peft class (trainable tokens)
        return peft_class
    base = getattr(layer, "base_layer", None)
    if base is None:  # a layer with no base layer of its own (virtual tokens): peft has no such layer
        return type(layer).__name__
    kind = type(base).__name__
    return _REPR_PREFIX.get(peft_type, "") + _PEFT_CLASS.get(kind, kind)


def layer_status(model: DeltaModel) -> list[TunerLayerStatus]:
    """peft's ``get_layer_status``. ValueError when the model has no adapter layer (in-place methods only)."""
    out = []
    for path, layer in model._layers():
        # a layer may report parameters it reads but does not own (a tied output embedding's rows), as peft's layer
        shown = getattr(layer, "status_parameters", layer.adapter_parameters)
        params = {n: list(shown(n).values()) for n in layer.adapter_names}
        out.append(
            TunerLayerStatus(
                name=f"model.{path}{getattr(layer, 'status_suffix', '')}",  # peft's name of the layer inside a wrapper
                module_type=_module_type(layer, model.peft_config[layer.adapter_names[0]].peft_type),
                enabled=not layer.disabled,
                # peft's adapter layers hold the list last set (the model's, or the layer's own set_adapter), held
                # there or not; its full copies the one they have
                active_adapters=list(layer.active_adapters if isinstance(layer, ModulesToSave) else layer._asked),
                merged_adapters=list(layer.merged_adapters),
                requires_grad={n: _agree([p.requires_grad for p in ps]) for n, ps in params.items() if ps},
                available_adapters=sorted(params),
                devices={n: sorted({p.device.type for p in ps}) for n, ps in params.items()},
                quantization_backend=None,  # peft's LoRA and IA3 layers name none, on a 4-bit base too
            )
        )
    if not out:
        adapters = ", ".join(model.peft_config) or "none"
        raise ValueError(f"no adapter layers in the model (adapters: {adapters}); in-place methods inject none")
    return out


def model_status(model: DeltaModel) -> TunerModelStatus:
    """peft's ``get_model_status``, summed up from ``layer_status`` as peft does."""
    layers = layer_status(model)
    trainable, total = count_parameters(model)
    kinds = sorted({type(c).__name__.removesuffix("Config") + "Model" for c in model.peft_config.values()})
    enabled = {s.enabled for s in layers}
    actives = {tuple(s.active_adapters) for s in layers}
    merged_all = {n for s in layers for n in s.merged_adapters}
    merged: list[str] | Irregular = sorted(merged_all)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_all for s in layers):
        merged = "irregular"
    grads: dict[str, list] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for key, value in s.requires_grad.items():
            grads[key].append(value)
        for key, value in s.devices.items():
            devices[key].update(value)
    return TunerModelStatus(
        base_model_type=type(model.get_base_model()).__name__,
        adapter_model_type="+".join(kinds),  # peft's tuner class ("LoraModel"); deltatune may mix methods
        peft_types={n: c.peft_type for n, c in model.peft_config.items()},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else "irregular",
        merged_adapters=merged,
        requires_grad={k: _agree(v) for k, v in grads.items()},
        # (and an adapter trained in place, with no layer: BitFit's next to a LoRA)
        available_adapters=sorted(
            {n for s in layers for n in s.available_adapters}
            | {*filter(model._base_trainables.get, model._base_trainables)}
        ),
        devices={k: sorted(v) for k, v in devices.items()},
        quantization_backend=None,
    )
