"""Which layers of a decoder's key/value cache can hold a prefix (prefix tuning, P-tuning v2).

transformers builds a model's cache from its config, one cache layer per transformer layer: key/value layers for
attention (full, sliding, chunked, and the hybrid layers that carry attention beside a recurrent state), and layers
that hold no keys and values: a linear-attention or state-space block's recurrent state (Jamba's Mamba layers,
RecurrentGemma's recurrent blocks, Qwen3-Next's linear attention) and the placeholder of a layer that reads another
layer's cache. A prefix puts keys and values into every layer, so a model with any such layer is refused when the
adapter is added, in one line (the forward failed deep in transformers' cache, as peft's does). Prompts need no
key/value layer: a Mamba model takes them, and its cache of recurrent states is not a fixed-size one.
"""

from __future__ import annotations

from torch import nn

from ..config import ConfigError
from ..targets import model_type


def kv_free_layers(model: nn.Module) -> list[str]:
    """``"index (cache layer type)"`` for each layer of ``model``'s cache that holds no keys and values; empty for an
    encoder-decoder model (its prefix goes into the decoder's self-attention cache, built without a config) or where
    transformers has no per-layer cache types (older versions)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return []
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = list(getattr(DynamicCache(config=cfg), "layers", None) or [])
    except (ImportError, AttributeError, TypeError, ValueError, KeyError):  # no per-layer types: nothing to tell
        return []
    return [f"{i} ({type(layer).__name__})" for i, layer in enumerate(layers) if not isinstance(layer, DynamicLayer)]


def fixed_size(cache: object) -> bool:
    """Whether ``cache`` has a key/value layer of a fixed size (``cache_implementation="static"``), which has no room
    for virtual tokens. A Mamba model's cache of recurrent states only is not one, though transformers calls it
    compileable (that flag is what older transformers, without per-layer caches, are read by)."""
    layers = getattr(cache, "layers", None)
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:
        layers = None
    if layers is None:
        return bool(getattr(cache, "is_compileable", False))
    return any(isinstance(layer, StaticLayer) for layer in layers)


def refuse_fixed_size(cache: object, method: str, n: int) -> None:
    """Raise a ValueError if ``cache`` has a fixed size. generate builds a StaticCache for any of its static
    cache_implementation values ('static', 'offloaded_static', and the deprecated 'sliding_window', 'hybrid', ...);
    the cache does not record which was passed, so the message names the cache and its layers' kind."""
    if not fixed_size(cache):
        return
    layers = getattr(cache, "layers", None) or []
    kinds = sorted({type(layer).__name__ for layer in layers}) or [type(cache).__name__]
    raise ValueError(
        f"{method} puts {n} virtual tokens in the key/value cache, which a fixed-size {type(cache).__name__} "
        f"({', '.join(kinds)}; from a static cache_implementation such as 'static', 'offloaded_static' or "
        "'sliding_window') has no room for; use the default dynamic cache"
    )


def refuse_kv_free(model: nn.Module, method: str) -> None:
    """Raise a ConfigError naming the model type and its layers without keys and values, if it has any."""
    free = kv_free_layers(model)
    if free:
        shown = ", ".join(free[:4]) + (f" and {len(free) - 4} more" if len(free) > 4 else "")
        raise ConfigError(
            f"{method}: model type {model_type(model)!r} has layers whose cache holds no keys and values (layer "
            f"{shown}: linear attention, a state-space block or a shared cache); a key/value prefix needs them in "
            "every layer; use prompt tuning or P-tuning instead"
        )


__all__ = ["fixed_size", "kv_free_layers", "refuse_fixed_size", "refuse_kv_free"]
