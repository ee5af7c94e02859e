"""What the token methods share besides their layer (that is _tokens.py): the fields every token method's config
has (PEFT's PromptLearningConfig), the model geometry they are filled from, and the plumbing of a model call's
arguments (attention mask, position ids, the key/value cache under transformers' two names).
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import ConfigError, check_positive_int
from ..targets import model_type

_PACKAGE = os.path.dirname(os.path.dirname(__file__)) + os.sep  # deltatune/: warn() skips its frames


@dataclass
class VirtualTokenFields:
    """The fields every token method shares (PEFT's PromptLearningConfig). None: read from the model at inject."""

    state_key_prefix: ClassVar[str] = "base_model."
    """PEFT saves a prompt-learning adapter's other modules (a classifier head) under "base_model.<path>"."""

    num_virtual_tokens: int = 20
    """Number of virtual tokens n added to every sequence (>= 1)."""
    token_dim: int | None = None
    """Width of a virtual token: the hidden size (prompt kind) or num_kv_heads * head_dim (prefix kind)."""
    num_transformer_submodules: int | None = None
    """1, or 2 for encoder-decoder models with task_type SEQ_2_SEQ_LM (PEFT's layout; only the first n tokens
    are used by prompt methods)."""
    num_attention_heads: int | None = None
    """Number of (key/value) attention heads the prefix is split into."""
    num_layers: int | None = None
    """Number of transformer layers (prefix kind: one key and one value prefix per layer)."""

    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json dict, without ``target_modules`` (PEFT's prompt-learning configs have none)."""
        out = super().to_dict()  # DeltaConfig's, next in the method configs' MRO
        if out.get("target_modules") is None:
            out.pop("target_modules", None)
        return out


def check_fields(config: Any) -> None:
    """Validate the shared fields (ConfigError naming the field and the value)."""
    check_positive_int("num_virtual_tokens", config.num_virtual_tokens)
    for name in ("token_dim", "num_attention_heads", "num_layers"):
        check_positive_int(name, getattr(config, name), optional=True)
    if config.num_transformer_submodules not in (None, 1, 2):
        raise ConfigError(
            f"num_transformer_submodules must be 1, 2 or None, got {config.num_transformer_submodules!r}"
        )


# -- model geometry (PEFT's _prepare_prompt_learning_config) ---------------------------------------------------------
def _first(cfg: Any, *names: str) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return None


def text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ConfigError(f"token methods need a transformers model with a config, got {type(model).__name__}")
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def fill_geometry(model: nn.Module, config: Any, prefix: bool) -> None:
    """Fill the None geometry fields from the model config, as PEFT does, and check set ones against the model.

    Raises:
        ConfigError: a field disagrees with the model (an adapter made for another base model).
    """
    cfg = text_config(model)
    mtype = model_type(model)
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    while hasattr(embedding, "base_layer") and hasattr(embedding, "adapter_names"):  # another adapter wraps it
        embedding = embedding.base_layer
    if not isinstance(embedding, nn.Embedding):  # a ViT's patch embedding: no tokens to put virtual ones beside
        raise ConfigError(
            f"model type {mtype!r} has no token embedding ({type(embedding).__name__}): prompt tuning, P-tuning and "
            "prefix tuning add virtual tokens to a text model; for a vision model use vpt (visual prompt tuning)"
        )
    layers = _first(cfg, "num_hidden_layers", "num_layers", "n_layer")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    heads = _first(cfg, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    if not prefix:  # prompts need only their width; layers and heads are recorded, a given value stands (as peft's)
        layers = layers if layers is not None else config.num_layers
        heads = heads if heads is not None else config.num_attention_heads
    # A prompt's width is the embedding's, never the hidden size: token_dim is only unread for a prefix.
    unread = [
        k
        for k, v in (("num_layers", layers), ("token_dim", hidden if prefix else 0), ("num_attention_heads", heads))
        if v is None
    ]
    if unread:
        raise ConfigError(
            f"cannot read {', '.join(unread)} from the config of model type {mtype!r}; set it in the adapter config"
        )
    token_dim = hidden if prefix else embedding.weight.shape[1]  # ALBERT's, ELECTRA-small's: narrower than hidden
    if prefix:
        kv_heads = getattr(cfg, "num_key_value_heads", None)
        if kv_heads is not None:  # grouped-query attention: the prefix has the keys' width (PEFT #1901)
            head_dim = getattr(cfg, "head_dim", None) or hidden // heads
            token_dim, heads = head_dim * kv_heads, kv_heads
        elif getattr(cfg, "is_encoder_decoder", False):
            # The prefix is on the decoder's self-attention; PEFT reads the encoder's numbers and fails where they
            # differ: a deeper decoder, other decoder heads, T5's d_kv * heads != d_model (t5-3b, t5-11b).
            layers = max(layers, _first(cfg, "num_decoder_layers", "decoder_layers") or 0)
            heads = _first(cfg, "decoder_attention_heads") or heads
            token_dim = (_first(cfg, "d_kv") or hidden // heads) * heads
        elif hidden % heads:
            raise ConfigError(f"model type {mtype!r}: hidden size {hidden} is not divisible by {heads} heads")
    # A prefix depends on the layer count and the heads; prompt tokens only on their width (the rest is recorded).
    expected = (
        {"num_layers": layers, "token_dim": token_dim, "num_attention_heads": heads}
        if prefix
        else {"token_dim": token_dim}
    )
    if not prefix and config.num_layers is None:
        config.num_layers = layers
    if not prefix:
        width = embedding.weight.shape[1]
        if width != (config.token_dim or token_dim):
            raise ConfigError(
                f"token_dim={config.token_dim or token_dim} differs from the input embedding width {width} of "
                f"model type {mtype!r}; prompts are prepended to the input embeddings"
            )
    for field_name, value in expected.items():
        have = getattr(config, field_name)
        if have is None:
            setattr(config, field_name, value)
        elif have != value:
            raise ConfigError(
                f"{field_name}={have} does not fit this model ({mtype}: {value}); the adapter was made for a "
                "different base model"
            )
    if not prefix and config.num_attention_heads is None:
        config.num_attention_heads = heads
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if max_pos is not None and config.num_virtual_tokens >= max_pos:
        raise ConfigError(
            f"num_virtual_tokens={config.num_virtual_tokens} leaves no room for real tokens: model type {mtype!r} "
            f"has max_position_embeddings={max_pos}"
        )


@dataclass
class TokenSpec:
    """What the hooks need to know about one adapter."""

    method: str
    kind: str  # "prompt" or "prefix"
    n: int  # virtual tokens
    layers: int = 0
    heads: int = 0
    token_dim: int = 0
    submodules: int = 1
    classifies: bool = False  # a sequence classifier's (SEQ_CLS): a decoder's reads the row's last token


# -- call arguments -----------------------------------------------------------------------------------------------------
def _signature(module: nn.Module) -> list[str]:
    return list(inspect.signature(module.forward).parameters)


CACHE_KEYS = ("cache", "past_key_values")
"""The names of a forward's key/value cache argument: ``cache`` from transformers 5.24 on, ``past_key_values``
before (5.24 still takes it, deprecated, and refuses a call that passes both)."""


def _cache_key(module: nn.Module) -> str | None:
    """The name ``module.forward`` gives its key/value cache, or None when it takes none."""
    names = _signature(module)
    return next((key for key in CACHE_KEYS if key in names), None)


def _given_cache(kwargs: dict) -> Any:
    """The cache a call passes, under either name."""
    return next((kwargs[key] for key in CACHE_KEYS if kwargs.get(key) is not None), None)


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional arguments of ``module.forward`` moved into kwargs, so hooks see every input by name."""
    if not args:
        return dict(kwargs)
    names = [n for n in _signature(module) if n not in ("args", "kwargs")]
    return {**dict(zip(names, args)), **kwargs}


def _batch_len(ids: torch.Tensor | None, embeds: torch.Tensor | None) -> tuple[int, int, torch.device]:
    x = ids if ids is not None else embeds
    if x is None:
        raise ValueError("token methods need input_ids or inputs_embeds")
    return x.shape[0], x.shape[1], x.device


def _cache_len(cache: Any) -> int:
    if cache is None:
        return 0
    layers = [layer for layer in getattr(cache, "layers", None) or () if hasattr(layer, "get_seq_length")]
    if layers:  # the longest layer: a hybrid's first may be a recurrent block that counts no tokens (RecurrentGemma)
        return max(int(layer.get_seq_length()) for layer in layers)
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    raise TypeError(
        f"the key/value cache (cache= or past_key_values=) must be a transformers Cache (e.g. DynamicCache), got "
        f"{type(cache).__name__}; the legacy tuple format is not supported with token methods"
    )


def _extend_mask(kwargs: dict, key: str, n: int, target: int) -> None:
    """Prepend n ones to the 2-D mask ``kwargs[key]`` when it is n shorter than ``target`` (the keys attended to)."""
    mask = kwargs.get(key)
    if mask is None or not isinstance(mask, torch.Tensor):
        return
    if mask.dim() != 2:
        raise ValueError(f"token methods take a 2-D {key} (batch, tokens); got shape {tuple(mask.shape)}")
    if mask.shape[1] == target - n:
        kwargs[key] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def _shift_positions(kwargs: dict, key: str, n: int, prepend: bool) -> None:
    pos = kwargs.get(key)
    if pos is None:
        return
    shifted = pos + n
    if prepend:  # the virtual tokens take the row's first positions (RoBERTa's start after its padding index)
        first = pos.min(dim=-1, keepdim=True).values
        virtual = first + torch.arange(n, device=pos.device, dtype=pos.dtype)
        shifted = torch.cat([virtual, shifted], dim=-1)
    kwargs[key] = shifted


def _prefix_pairs(
    flat: torch.Tensor, spec: TokenSpec, batch: int, dtype: torch.dtype | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (key, value) prefixes, each (batch, heads, n, head_dim), from the flat (n, layers * 2 * dim) tokens.

    Row 2l holds layer l's keys, row 2l + 1 its values. With two transformer submodules PEFT repeats the rows and
    splits them in fours (self-attention key, value, then cross-attention key, value, which it discards); we
    mirror that layout so that the same file means the same prefix in both libraries.

    The rows are taken apart with one ``unbind`` rather than one index per row: the backward of an index writes
    its gradient into a zero tensor of the whole stack, once per row (quadratic in the layer count), where that of
    ``unbind`` stacks the rows' gradients once.
    """
    n, heads, dtype = spec.n, spec.heads, dtype or flat.dtype
    x = flat.view(1, n, spec.layers * 2, heads, spec.token_dim // heads)
    # Cast after the expand, as peft: the gradients of the batch's copies add up in the float32 of flat.
    # With no backward the n rows are cast once, before it: the batch's copies stay views (no batch-size copy).
    x = expand_cast(x, (batch, -1, -1, -1, -1), dtype)  # (one cast of the whole: a cast per row built the
    rows = list(x.permute(2, 0, 3, 1, 4).unbind(0))  # backward's stack of the batch copies in float32, a third more)
    rows = rows * spec.submodules  # peft's cat of the rows with themselves, as the same views (no copy)
    step = 2 * spec.submodules
    return [(rows[i], rows[i + 1]) for i in range(0, spec.layers * step, step)]


def expand_cast(x: torch.Tensor, sizes: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``x.expand(*sizes).to(dtype)``: cast after the expand while a backward is recorded (as peft's repeat: the
    copies' gradients add up in x's float32), before it otherwise (the batch's copies stay views of x)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return x.expand(*sizes).to(dtype)
    return x.to(dtype).expand(*sizes)


def warn(message: str) -> None:
    """A UserWarning attributed to the first caller outside deltatune (get_delta_model's, add_adapter's, ...)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


__all__ = [
    "CACHE_KEYS",
    "TokenSpec",
    "VirtualTokenFields",
    "check_fields",
    "expand_cast",
    "fill_geometry",
    "text_config",
    "warn",
]
