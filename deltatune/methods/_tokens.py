"""Shared bookkeeping of the token methods (prompt tuning, P-tuning, prefix tuning, P-tuning v2).

A token method adds n virtual tokens to every sequence, either as vectors prepended to the input
embeddings ("prompt" kind: prompt tuning, P-tuning) or as per-layer key/value prefixes in the attention
cache ("prefix" kind: prefix tuning, P-tuning v2). The method files only say how the virtual tokens are
computed (an embedding table, an MLP or LSTM reparametrisation); this file makes the rest of the model
account for them:

- ``VirtualTokens`` is the one ``DeltaLayer`` every token adapter of a model lives in (attached as the child
  ``virtual_tokens`` of the base model, one encoder per adapter name in ``prompt_encoder``). It registers
  forward pre-hooks (with kwargs) that rewrite the model inputs while one of its adapters is active and the
  layer is not disabled, and a forward hook that drops the virtual positions from per-token outputs.
- attention mask: n ones are prepended wherever the mask is n shorter than the keys the model attends to;
- position ids: real tokens are shifted by n (virtual tokens take positions 0..n-1);
- labels: -100 on the virtual positions (token-level labels only), so the loss is over real tokens;
- outputs: per-token ``logits`` / ``hidden_states`` lose the virtual positions (one row per real token);
- cache: prefixes go into a transformers ``Cache`` (``DynamicCache``, ``EncoderDecoderCache``) before the
  first step; prompts are prepended only while the cache is empty, so ``generate`` (greedy, beam search,
  left-padded batches) works through the base model's own loop.

Files follow PEFT: one tensor ``prompt_embeddings`` per adapter, the *folded* virtual tokens (the output of
any reparametrisation), so only the tokens are saved and served.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import ConfigError
from ..layer import DeltaLayer, checkpointing
from ..targets import model_type

ATTR = "virtual_tokens"
"""Name of the child module of the base model holding every token adapter."""
SAVED_KEY = "prompt_embeddings"
"""PEFT's key for the (folded) virtual tokens in adapter_model.safetensors."""


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
    n = config.num_virtual_tokens
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"num_virtual_tokens must be an integer >= 1, got {n!r}")
    for name in ("token_dim", "num_attention_heads", "num_layers"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
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
    layers = _first(cfg, "num_hidden_layers", "num_layers", "n_layer")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    heads = _first(cfg, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    if layers is None or hidden is None or heads is None:
        raise ConfigError(f"cannot read the layer count, hidden size and heads of model type {mtype!r}")
    token_dim = hidden
    if prefix:
        kv_heads = getattr(cfg, "num_key_value_heads", None)
        if kv_heads is not None:  # grouped-query attention: the prefix has the keys' width (PEFT #1901)
            head_dim = getattr(cfg, "head_dim", None) or hidden // heads
            token_dim, heads = head_dim * kv_heads, kv_heads
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
    if not prefix and hasattr(model, "get_input_embeddings"):
        width = model.get_input_embeddings().weight.shape[1]
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


# -- the layer ----------------------------------------------------------------------------------------------------------
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
    if prepend:
        virtual = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], n)
        shifted = torch.cat([virtual, shifted], dim=-1)
    kwargs[key] = shifted


def _prefix_pairs(flat: torch.Tensor, spec: TokenSpec, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (key, value) prefixes, each (batch, heads, n, head_dim), from the flat (n, layers * 2 * dim) tokens.

    Row 2l holds layer l's keys, row 2l + 1 its values. With two transformer submodules PEFT repeats the rows and
    splits them in fours (self-attention key, value, then cross-attention key, value, which it discards); we
    mirror that layout so that the same file means the same prefix in both libraries.

    The rows are taken apart with one ``unbind`` rather than one index per row: the backward of an index writes
    its gradient into a zero tensor of the whole stack, once per row (quadratic in the layer count), where that of
    ``unbind`` stacks the rows' gradients once.
    """
    n, heads = spec.n, spec.heads
    x = flat.view(1, n, spec.layers * 2, heads, spec.token_dim // heads).expand(batch, -1, -1, -1, -1)
    if spec.submodules == 2:
        x = torch.cat([x, x], dim=2)
    rows = x.permute(2, 0, 3, 1, 4).unbind(0)  # layers * 2 * submodules of (batch, heads, n, head_dim)
    step = 2 * spec.submodules
    return [(rows[i], rows[i + 1]) for i in range(0, spec.layers * step, step)]


class VirtualTokens(DeltaLayer):
    """Every token adapter of one model, and the hooks that make the model account for its virtual tokens.

    Args:
        model: the base model it is attached to (hooked, not held: the layer is its child).
    """

    adapter_attrs = ("prompt_encoder",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = nn.ModuleDict()
        self.specs: dict[str, TokenSpec] = {}
        self._handles: list[Any] = []
        self._pending: list[tuple[int, int] | None] = []  # root calls in flight: (n, total length) to drop, or None
        cfg = text_config(model)
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.model_type = model_type(model)
        self.absolute_positions = _absolute_positions(model, cfg)
        prefix_module = _prefix_module(model)
        self.takes_prefix = prefix_module is not None
        self.cache_key = _cache_key(prefix_module) if prefix_module is not None else None  # where the prefix goes
        self.prefix_at_root = prefix_module is model
        self._register(model, prefix_module)

    # -- set-up ----------------------------------------------------------------------------------------------------
    def _register(self, model: nn.Module, prefix_module: nn.Module | None) -> None:
        def pre(role: str, module: nn.Module) -> None:
            hook = functools.partial(self._pre_hook, role)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

        pre("root", model)
        self._handles.append(model.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True))
        if self.encoder_decoder:
            pre("encoder", model.get_encoder())
            pre("decoder", model.get_decoder())
        if prefix_module is not None and prefix_module is not model:
            pre("prefix", prefix_module)

    def add(self, name: str, encoder: nn.Module, spec: TokenSpec) -> None:
        """Add adapter ``name``: ``encoder()`` returns its virtual tokens (see the method files)."""
        if spec.kind == "prefix" and not self.takes_prefix:
            raise ConfigError(
                f"{spec.method}: model type {self.model_type!r} cannot take a key/value prefix (its forward takes no "
                "key/value cache); use prompt tuning or P-tuning instead"
            )
        self.prompt_encoder[name] = encoder
        self.specs[name] = spec

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.specs.pop(name, None)

    def unwrap(self) -> None:
        """The layer leaves nothing in its place; its hooks go with it."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return None

    def merge(self, name: str) -> None:
        method = self.specs[name].method if name in self.specs else "token"
        raise TypeError(
            f"{method} adapter {name!r} adds virtual tokens; there is nothing to merge into the base weights "
            "(keep the adapter, or unload() it)"
        )

    unmerge = merge

    # -- saving (PEFT's folded prompt_embeddings) ---------------------------------------------------------------------
    def export_state(self, name: str, prefix: str) -> dict[str, torch.Tensor]:
        return {SAVED_KEY: fold_tensor(self.prompt_encoder[name])}

    def import_state(self, name: str, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        self.prompt_encoder[name].fold(tensors[SAVED_KEY])

    # -- hooks -------------------------------------------------------------------------------------------------------
    def _active(self) -> tuple[str, TokenSpec] | None:
        if self.disabled:
            return None
        names = [n for n in self.active_adapters if n in self.specs]
        if not names:
            return None
        if len(names) > 1:
            raise ValueError(f"only one token adapter can be active at a time; active: {', '.join(names)}")
        return names[0], self.specs[names[0]]

    def _pre_hook(self, role: str, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        active = self._active()
        if role == "root":
            self._pending.append(None)  # popped by _post_hook, which runs even when forward raises
        if active is None:
            return None
        name, spec = active
        kwargs = _bind(module, args, kwargs)
        if spec.kind == "prompt":
            if role == "root" and not self.encoder_decoder:
                self._pending[-1] = self._prepend(module, name, spec, kwargs, labels=True)
            elif role == "encoder":
                self._prepend(module, name, spec, kwargs, labels=False)
            elif role == "decoder":
                states = kwargs.get("encoder_hidden_states")
                if states is not None:
                    _extend_mask(kwargs, "encoder_attention_mask", spec.n, states.shape[1])
            else:
                return None
        elif (role == "root" and self.prefix_at_root) or role == "prefix":
            self._inject_prefix(module, name, spec, kwargs)
        else:
            return None
        return (), kwargs

    def _prompts(self, name: str, spec: TokenSpec, batch: int, like: torch.Tensor) -> torch.Tensor:
        tokens = self.prompt_encoder[name]()[: spec.n]  # (n, dim): only the first n with two submodules (PEFT)
        return tokens.to(like.dtype).unsqueeze(0).expand(batch, -1, -1)

    def _prepend(
        self, module: nn.Module, name: str, spec: TokenSpec, kwargs: dict, labels: bool
    ) -> tuple[int, int] | None:
        """Prompt kind: prepend the virtual tokens to the input embeddings (while the cache is empty)."""
        n = spec.n
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        batch, length, _ = _batch_len(ids, embeds)
        past = _cache_len(_given_cache(kwargs))
        first = past == 0
        if first:
            self._check_length(n + length)
            if embeds is None:
                embeds = module.get_input_embeddings()(ids)
            kwargs["inputs_embeds"] = torch.cat([self._prompts(name, spec, batch, embeds), embeds], dim=1)
            kwargs["input_ids"] = None
            if kwargs.get("token_type_ids") is not None:
                tt = kwargs["token_type_ids"]
                kwargs["token_type_ids"] = torch.cat([tt.new_zeros(batch, n), tt], dim=1)
            lab = kwargs.get("labels")
            # token-level labels only (causal LM, tagging); not (batch,) classes nor float multi-label targets
            if (
                labels
                and lab is not None
                and lab.dim() == 2
                and lab.shape[1] == length
                and not lab.is_floating_point()
            ):
                kwargs["labels"] = torch.cat([lab.new_full((batch, n), -100), lab], dim=1)
        _extend_mask(kwargs, "attention_mask", n, past + length + (n if first else 0))
        _shift_positions(kwargs, "position_ids", n, prepend=first)
        return (n, n + length) if first else None

    def _inject_prefix(self, module: nn.Module, name: str, spec: TokenSpec, kwargs: dict) -> None:
        """Prefix kind: put the per-layer key/value prefixes into the cache before the first step."""
        seq2seq = self.encoder_decoder
        # The prefix is on the decoder's self-attention: its query length is that of the decoder inputs, which an
        # encoder-decoder model otherwise derives from the labels or the input ids (shifted right, same length).
        keys = ("decoder_input_ids", "decoder_inputs_embeds", "labels") if seq2seq else ()
        x = next((kwargs[k] for k in (*keys, "input_ids", "inputs_embeds") if kwargs.get(k) is not None), None)
        batch, length, _ = _batch_len(x, None)
        cache = _given_cache(kwargs)
        if module.training and torch.is_grad_enabled() and checkpointing(module):
            # Recomputing a checkpointed layer would append its keys to the cache a second time (PEFT refuses too).
            raise ValueError(f"{spec.method} does not work with gradient checkpointing; turn it off for this model")
        if _cache_len(cache) == 0:
            self._check_length(spec.n + length)
            cache = self._fill(module, name, spec, batch, cache)
            for key in CACHE_KEYS:
                kwargs.pop(key, None)
            kwargs[self.cache_key] = cache
        past = _cache_len(cache)
        _extend_mask(kwargs, "decoder_attention_mask" if seq2seq else "attention_mask", spec.n, past + length)
        if not seq2seq:
            _shift_positions(kwargs, "position_ids", spec.n, prepend=False)

    def _fill(self, module: nn.Module, name: str, spec: TokenSpec, batch: int, cache: Any) -> Any:
        from transformers import DynamicCache, EncoderDecoderCache

        dtype = getattr(module, "dtype", None) or next(module.parameters()).dtype
        flat = self.prompt_encoder[name]().to(dtype)
        if cache is None:
            cfg = getattr(module, "config", None)
            cache = DynamicCache(config=cfg) if cfg is not None and not self.encoder_decoder else DynamicCache()
            if self.encoder_decoder:
                cache = EncoderDecoderCache(cache, DynamicCache())
        target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        for layer, (key, value) in enumerate(_prefix_pairs(flat, spec, batch)):
            target.update(key, value, layer)
        return cache

    def _check_length(self, total: int) -> None:
        if self.absolute_positions is not None and total > self.absolute_positions:
            raise ValueError(
                f"{total} positions needed (virtual tokens + input) but model type {self.model_type!r} has only "
                f"{self.absolute_positions} position embeddings; shorten the input or use fewer virtual tokens"
            )

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        pending = self._pending.pop() if self._pending else None
        if pending is None or not hasattr(output, "keys"):
            return None
        n, total = pending
        if kwargs.get("logits_to_keep"):
            return None
        logits = output.get("logits")
        if isinstance(logits, torch.Tensor) and logits.dim() >= 3 and logits.shape[1] == total:
            output["logits"] = logits[:, n:]
        hidden = output.get("hidden_states")
        if isinstance(hidden, tuple):
            output["hidden_states"] = tuple(
                h[:, n:] if isinstance(h, torch.Tensor) and h.dim() == 3 and h.shape[1] == total else h for h in hidden
            )
        return output


def _absolute_positions(model: nn.Module, cfg: Any) -> int | None:
    """The number of learned absolute positions (GPT-2, BERT, OPT, BART), or None for relative / rotary ones."""
    names = ("wpe", "position_embeddings", "embed_positions")
    if not any(n.rsplit(".", 1)[-1] in names for n, _ in model.named_modules()):
        return None
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit is not None and model_type(model) in ("roberta", "xlm-roberta", "camembert"):
        limit -= (getattr(cfg, "pad_token_id", None) or 0) + 1  # RoBERTa's positions start after padding_idx
    return limit


def _prefix_module(model: nn.Module) -> nn.Module | None:
    """The outermost module whose forward takes a key/value cache: the model, else its backbone, else None."""
    if _cache_key(model):
        return model
    backbone = getattr(model, "base_model", None)
    if isinstance(backbone, nn.Module) and backbone is not model and _cache_key(backbone):
        return backbone
    return None


# -- inject / fold ------------------------------------------------------------------------------------------------------
def layer_of(model: nn.Module, create: bool = False) -> VirtualTokens | None:
    """The model's VirtualTokens layer (created and attached when ``create``)."""
    layer = getattr(model, ATTR, None) if ATTR in getattr(model, "_modules", {}) else None
    if layer is None and create:
        layer = VirtualTokens(model)
        model.add_module(ATTR, layer)
    return layer


def attach(model: nn.Module, adapter_name: str, encoder: nn.Module, spec: TokenSpec) -> list[nn.Module]:
    """Add a token adapter to ``model`` (the shared layer is created on first use). Returns [the layer].

    Raises:
        ConfigError: a prefix on a model whose attention cannot take one; the model is left as it was.
    """
    existing = layer_of(model)
    layer = existing or VirtualTokens(model)
    try:
        layer.add(adapter_name, encoder, spec)
    except BaseException:
        if existing is None:
            layer.unwrap()
        raise
    if existing is None:
        model.add_module(ATTR, layer)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None:
        encoder.to(param.device)
    return [layer]


def fold_tensor(encoder: nn.Module) -> torch.Tensor:
    """The encoder's virtual tokens with any reparametrisation applied (eval mode, no gradient)."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            return encoder().detach().clone()
    finally:
        encoder.train(was_training)


def fold(model: nn.Module, adapter_name: str = "default") -> None:
    """Replace a token adapter's reparametrisation (P-tuning's MLP/LSTM, prefix tuning's MLP) by its output.

    The outputs do not change; what is left trains (if it trains) as a plain table of virtual tokens, which is
    also what is saved and what a loaded adapter holds.

    Args:
        model: a DeltaModel or the base model holding the adapter.
        adapter_name: the token adapter to fold.

    Raises:
        ValueError: no token adapter of that name.
    """
    layer = layer_of(model)
    if layer is None and isinstance(getattr(model, "base_model", None), nn.Module):
        layer = layer_of(model.base_model)  # a DeltaModel
    if layer is None or adapter_name not in layer.prompt_encoder:
        raise ValueError(f"no token adapter named {adapter_name!r} in this model")
    layer.prompt_encoder[adapter_name].fold(None)


def folded_embedding(weight: torch.Tensor, like: nn.Parameter | None) -> nn.Embedding:
    """An embedding table holding ``weight``, keeping ``like``'s requires_grad."""
    table = nn.Embedding(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        table.weight.copy_(weight)
    if like is not None:
        table.weight.requires_grad_(like.requires_grad)
    return table


def warn(message: str) -> None:
    """A UserWarning attributed to the caller of inject."""
    warnings.warn(message, UserWarning, stacklevel=4)


__all__ = [
    "ATTR",
    "SAVED_KEY",
    "TokenSpec",
    "VirtualTokenFields",
    "VirtualTokens",
    "attach",
    "check_fields",
    "fill_geometry",
    "fold",
]
