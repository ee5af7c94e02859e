"""LoRA's ``layer_replication``: a deeper model from the base's own decoder layers (peft's ``replicate_layers``).

The map is a list of [start, end) ranges of the base's layers, stacked in order: on a 5-layer base
``[[0, 4], [2, 5]]`` gives the layers [0, 1, 2, 3, 2, 3, 4]. Every copy is a new module that shares its parameters
with the base layer it copies (memory stays close to the base's); LoRA then adapts each copy on its own, so the
copies of one layer differ by their adapters alone. The copies' ``layer_idx`` attributes (attention's, which the KV
cache reads) are renumbered to their new places and ``config.num_hidden_layers`` becomes the new depth, as peft.
Unlike peft, ``config.layer_types`` (one attention type per layer) follows the copies too: transformers 5's Qwen2 and
Mistral read it per layer, and peft's replicated Qwen2 fails its first forward (IndexError past the old depth).

Where the layers are is peft's rule, not ``targets``' family table: below every ``.model`` (and a ``.bert``), a
``layers`` list (Llama, Qwen2, Mistral, ...), an ``encoder.layer`` list (BERT) or an ``h`` list (a bare Falcon, GPT-2
or Bloom base model); any other model is refused naming its model type. Unlike peft, a map that is not a list of
[start, end) pairs with 0 <= start < end <= the number of layers is refused (peft indexes past the end, wraps a
negative start and skips an empty range), and so is a second map on a model already replicated by another one.

Merging: copies of one layer share one weight, so folding one copy's update into it would change the others too.
``DeltaModel.merge_adapter`` refuses a layer whose weight another module holds (``layer.check_not_shared``);
peft 0.21.2 means to refuse (``_check_merge_allowed``) but looks the key up in its dict of adapters, never finds
it, and merges every copy's update into the shared weight (the merged model computes something else).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from ..config import ConfigError

_MAP_ATTR = "_layer_replication"  # set on the ModuleList the map built: the map, so a second adapter can share it


def check_map(layer_map: Any) -> list[list[int]] | None:
    """The map as a list of [start, end] lists, or None for no replication (None or [], as peft's falsy check).

    Raises:
        ConfigError: not a list of [start, end] integer pairs with 0 <= start < end.
    """
    if layer_map is None or (isinstance(layer_map, (list, tuple)) and not layer_map):
        return None
    shape = f"layer_replication must be a list of [start, end) pairs of layer indices, got {layer_map!r}"
    if not isinstance(layer_map, (list, tuple)):
        raise ConfigError(shape)
    for pair in layer_map:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(type(i) is int for i in pair)):
            raise ConfigError(shape)
        if not 0 <= pair[0] < pair[1]:
            raise ConfigError(f"layer_replication: range {list(pair)} must have 0 <= start < end, got {layer_map!r}")
    return [list(pair) for pair in layer_map]


def locate_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the block list and the list's attribute path (peft's search, in its order).

    Raises:
        ConfigError: no such list; the message names the model type.
    """
    inner = model
    while hasattr(inner, "model"):
        inner = inner.model
    if hasattr(inner, "bert"):  # some BERT variants nest the main model under .bert
        inner = inner.bert
    if hasattr(inner, "layers"):
        path = "layers"
    elif hasattr(inner, "encoder") and hasattr(inner.encoder, "layer"):
        path = "encoder.layer"
    elif hasattr(inner, "h"):
        path = "h"
    else:
        path = ""
    if not path or not isinstance(_get(inner, path), nn.ModuleList):
        kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise ConfigError(
            f"layer_replication is not supported for model type {kind!r}: no block list at .layers, "
            ".encoder.layer or .h below .model (peft's Llama, BERT and Falcon layouts)"
        )
    return inner, path


def clone_shared(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are the original's own tensors (peft's ``clone_module``)."""
    clone = copy.deepcopy(module)
    for name, sub in module.named_modules():
        for pname, param in sub.named_parameters(recurse=False):
            clone.get_submodule(name).register_parameter(pname, param)
    return clone


def replicate(model: nn.Module, config: Any) -> Callable[[], None]:
    """Stack the base's layers as ``config.layer_replication`` says, before LoRA is injected; returns the undo.

    Everything is checked before the model changes. A model already replicated by the same map is left as it is (a
    second adapter of the same deeper model); peft would replicate the replicated list again.

    Raises:
        ConfigError: a bad map, a range past the last layer, an unsupported model, or a model whose layers already
            hold adapters or another map. The model is unchanged.
    """
    layer_map = check_map(getattr(config, "layer_replication", None))
    if layer_map is None:
        return _nothing
    inner, path = locate_layers(model)
    layers = _get(inner, path)
    done = getattr(layers, _MAP_ATTR, None)
    if done is not None:
        if done == layer_map:
            return _nothing
        raise ConfigError(f"layer_replication {layer_map} on a model already replicated by {done}; load a fresh base")
    for start, end in layer_map:
        if end > len(layers):
            raise ConfigError(
                f"layer_replication: range [{start}, {end}) goes past the last of the model's {len(layers)} layers"
            )
    if any(getattr(m, "adapter_names", None) for m in model.modules()):  # prefix / prompt ones sit outside the layers
        raise ConfigError("layer_replication must come with the model's first adapter: the model holds adapters")
    new: list[nn.Module] = []
    for start, end in layer_map:
        for i in range(start, end):
            new.append(clone_shared(layers[i]))
            for sub in new[-1].modules():  # the attention's index into the KV cache: its new place (peft's fix)
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = len(new) - 1
    replicated = nn.ModuleList(new)
    setattr(replicated, _MAP_ATTR, layer_map)
    cfg = getattr(inner, "config", None)
    depth, types = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "layer_types", None)
    _set(inner, path, replicated)
    if depth is not None:
        cfg.num_hidden_layers = len(new)
    if isinstance(types, list) and len(types) == len(layers):  # each copy's attention type (peft leaves them)
        cfg.layer_types = [types[i] for start, end in layer_map for i in range(start, end)]

    def undo() -> None:
        _set(inner, path, layers)
        if depth is not None:
            cfg.num_hidden_layers = depth
        if isinstance(types, list):
            cfg.layer_types = types

    return undo


def _nothing() -> None:
    return None


def _get(inner: nn.Module, path: str) -> Any:
    for name in path.split("."):
        inner = getattr(inner, name)
    return inner


def _set(inner: nn.Module, path: str, layers: nn.ModuleList) -> None:
    parent, _, name = path.rpartition(".")
    setattr(inner.get_submodule(parent) if parent else inner, name, layers)


PREPARE = replicate
"""What DeltaModel.add_adapter runs on the base model before LoRA's inject (lora.py imports it): a callable
(model, config) -> undo."""
