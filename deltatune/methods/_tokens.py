"""Shared bookkeeping of the token methods (prompt tuning, P-tuning, prefix tuning, P-tuning v2).

A token method adds n virtual tokens to every sequence, either as vectors prepended to the input embeddings
("prompt" kind: prompt tuning, P-tuning) or as per-layer key/value prefixes in the attention cache ("prefix" kind:
prefix tuning, P-tuning v2). The method files only say how the virtual tokens are computed; this file makes the
rest of the model account for them. ``VirtualTokens`` is the one ``DeltaLayer`` every token adapter of a model
lives in (the child ``virtual_tokens`` of the base model, one encoder per adapter in ``prompt_encoder``). While one
of its adapters is active its forward pre-hooks rewrite the model inputs and a forward hook its outputs:

- attention mask: n ones are prepended wherever the mask is n shorter than the keys the model attends to;
- position ids: real tokens are shifted by n (virtual tokens take positions 0..n-1);
- labels: -100 on the virtual positions (token-level labels only), so the loss is over real tokens;
- outputs: per-token ``logits``, ``last_hidden_state``, ``hidden_states`` lose the virtual positions (a row a token);
- cache: prefixes go into a transformers ``Cache`` before the first step; prompts are prepended only while the
  cache is empty, so ``generate`` works through the base model's own loop (its input slicing, when it restarts
  from a cache it returned, counts the n virtual tokens: see ``_prepare``).

Files follow PEFT: one ``prompt_embeddings`` per adapter, the folded virtual tokens. Shared fields: _token_geometry.py.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..layer import DeltaLayer, NotMergeable, checkpointing
from ..targets import model_type
from ._folding import fold_tensor
from ._token_geometry import (
    CACHE_KEYS,
    TokenSpec,
    _batch_len,
    _bind,
    _cache_key,
    _cache_len,
    _extend_mask,
    _given_cache,
    _prefix_pairs,
    _shift_positions,
    expand_cast,
    text_config,
)
from ._tokens_layout import refuse_fixed_size

ATTR = "virtual_tokens"
"""Name of the child module of the base model holding every token adapter."""
SAVED_KEY = "prompt_embeddings"
"""PEFT's key for the (folded) virtual tokens in adapter_model.safetensors."""


# -- the layer ----------------------------------------------------------------------------------------------------------
class VirtualTokens(DeltaLayer):
    """Every token adapter of one model, and the hooks that make the model account for its virtual tokens; ``model``
    is the base model it is attached to (hooked, not held: the layer is its child)."""

    adapter_attrs = ("prompt_encoder",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = nn.ModuleDict()
        self.specs: dict[str, TokenSpec] = {}
        self._handles: list[Any] = []
        self._pending: list[tuple[int, int] | None] = []  # root calls in flight: (n, total length) to drop, or None
        self._tuples: list[bool] = []  # root calls in flight: whether the caller asked for a tuple (return_dict=False)
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
        prepare = getattr(model, "prepare_inputs_for_generation", None)
        if prepare is not None:  # generate continued from a cache: it counts the virtual tokens as inputs already fed
            model.prepare_inputs_for_generation = functools.wraps(prepare)(functools.partial(self._prepare, prepare))
            self._handles.append(functools.partial(_unpatch, model))

    def _prepare(self, prepare: Any, *args: Any, next_sequence_length: int | None = None, **kwargs: Any) -> Any:
        """generate restarting from a cache feeds the last (inputs - cached) tokens; the cache holds n virtual tokens
        besides the inputs (not an encoder-decoder's prompts: those are in its encoder)."""
        active = self._active() if next_sequence_length is not None and kwargs.get("is_first_iteration") else None
        if active and _cache_len(_given_cache(kwargs)) and (active[1].kind == "prefix" or not self.encoder_decoder):
            next_sequence_length += active[1].n
        if next_sequence_length is not None:  # (transformers 4 has no such argument: its prepare gets none)
            kwargs["next_sequence_length"] = next_sequence_length
        return prepare(*args, **kwargs)

    def add(self, name: str, encoder: nn.Module, spec: TokenSpec) -> None:
        """Add adapter ``name``: ``encoder()`` returns its virtual tokens (see the method files)."""
        if spec.kind == "prefix" and not self.takes_prefix:
            raise ConfigError(
                f"{spec.method}: model type {self.model_type!r} cannot take a key/value prefix (its forward takes no "
                "key/value cache); use prompt tuning or P-tuning instead"
            )
        self.prompt_encoder[name] = encoder
        self.specs[name] = spec

    def successor(self, name: str) -> list[str]:  # peft's prompt learning: the first left in the order added
        return [n for n in self._asked if n != name] or [n for n in self.adapter_names if n != name][:1]

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.specs.pop(name, None)

    def unwrap(self) -> None:
        """The layer leaves nothing in its place; its hooks go with it."""
        for handle in self._handles:
            handle() if callable(handle) else handle.remove()
        self._handles.clear()
        return None

    def merge(self, name: str | bool | None = None, *args, **kwargs) -> None:
        """Named or not (the active), as every layer's: refused, virtual tokens have nothing to merge."""
        names = [name] if isinstance(name, str) else self.active_adapters or self.adapter_names
        method = self.specs[names[0]].method if names and names[0] in self.specs else "token"
        what = f"{method} adapter {', '.join(map(repr, names))} adds virtual tokens"
        raise NotMergeable(f"{what}; there is nothing to merge into the base weights")

    unmerge = merge

    # -- saving (PEFT's folded prompt_embeddings) ---------------------------------------------------------------------
    def export_state(self, name: str, prefix: str) -> dict[str, torch.Tensor]:
        return {SAVED_KEY: fold_tensor(self.prompt_encoder[name])}

    def import_state(self, name: str, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        self.prompt_encoder[name].fold(tensors[SAVED_KEY])

    def training_state(self, name: str) -> dict[str, torch.Tensor]:
        return getattr(self.prompt_encoder[name], "training_state", dict)()

    def stage_training_state(self, name: str, state: dict[str, torch.Tensor] | None) -> None:
        if name in self.prompt_encoder and hasattr(self.prompt_encoder[name], "stage"):
            self.prompt_encoder[name].stage(state)
        elif state:
            raise ValueError(f"token adapter {name!r} keeps no training state")

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
            self._tuples.append(False)
        if active is None:
            return None
        name, spec = active
        kwargs = _bind(module, args, kwargs)
        if role == "root" and kwargs.get("return_dict") is False:  # trimmed as a dict, handed back as the tuple
            kwargs["return_dict"], self._tuples[-1] = True, True
        if spec.kind == "prompt":
            if role == "root" and not self.encoder_decoder:
                if spec.classifies and hasattr(module, "score"):  # a decoder's classifier (an encoder's: classifier)
                    _pads_first(kwargs)
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
        # Cast after the expand, as peft's repeat: the rows' gradients add up in float32, not in a bf16 base's dtype.
        return expand_cast(tokens.unsqueeze(0), (batch, -1, -1), like.dtype)

    def _prepend(
        self, module: nn.Module, name: str, spec: TokenSpec, kwargs: dict, labels: bool
    ) -> tuple[int, int] | None:
        """Prompt kind: prepend the virtual tokens to the input embeddings (while the cache is empty)."""
        n = spec.n
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        batch, length, _ = _batch_len(ids, embeds)
        past = _cache_len(_growing(spec, _given_cache(kwargs)))
        first = past == 0
        self._check_length(past + length + (n if first else 0))  # generated tokens count too
        if first:
            if embeds is None:
                embeds = module.get_input_embeddings()(ids)
            kwargs["inputs_embeds"] = torch.cat([self._prompts(name, spec, batch, embeds), embeds], dim=1)
            kwargs["input_ids"] = None
            keep = kwargs.get("logits_to_keep")
            if isinstance(keep, torch.Tensor):  # indices of real tokens (negative ones count from the end)
                kwargs["logits_to_keep"] = torch.where(keep >= 0, keep + n, keep)
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
        cache = _growing(spec, _given_cache(kwargs))
        if module.training and torch.is_grad_enabled() and checkpointing(module):
            # Recomputing a checkpointed layer would append its keys to the cache a second time (PEFT refuses too).
            raise ValueError(f"{spec.method} does not work with gradient checkpointing; turn it off for this model")
        if _cache_len(cache) == 0:
            cache = self._fill(module, name, spec, batch, cache)
            for key in CACHE_KEYS:
                kwargs.pop(key, None)
            kwargs[self.cache_key] = cache
        past = _cache_len(cache)
        self._check_length(past + length)  # the virtual tokens, the generated tokens and the input
        _extend_mask(kwargs, "decoder_attention_mask" if seq2seq else "attention_mask", spec.n, past + length)
        if not seq2seq:
            _shift_positions(kwargs, "position_ids", spec.n, prepend=False)

    def _fill(self, module: nn.Module, name: str, spec: TokenSpec, batch: int, cache: Any) -> Any:
        from transformers import DynamicCache, EncoderDecoderCache

        dtype = getattr(module, "dtype", None) or next(module.parameters()).dtype
        flat = self.prompt_encoder[name]()  # cast per row in _prefix_pairs (after the expand while gradients flow)
        if cache is None:
            cfg = getattr(module, "config", None)
            cache = DynamicCache(config=cfg) if cfg is not None and not self.encoder_decoder else DynamicCache()
            if self.encoder_decoder:
                cache = EncoderDecoderCache(cache, DynamicCache())
        target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        for layer, (key, value) in enumerate(_prefix_pairs(flat, spec, batch, dtype)):
            target.update(key, value, layer)
        return cache

    def _check_length(self, total: int) -> None:
        if self.absolute_positions is not None and total > self.absolute_positions:
            raise ValueError(
                f"{total} positions needed (virtual tokens + input so far) but model type {self.model_type!r} has only "
                f"{self.absolute_positions} position embeddings; shorten the input or max_new_tokens, or use fewer "
                "virtual tokens"
            )

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        pending = self._pending.pop() if self._pending else None
        as_tuple = self._tuples.pop() if self._tuples else False
        if not hasattr(output, "keys"):
            return None
        if kwargs.get("use_cache") is False and any(output.get(k) is not None for k in CACHE_KEYS):
            # the prefix's cache is ours and the caller asked for none: no key (beam search reorders one it finds)
            output = type(output)(**{k: v for k, v in output.items() if k not in CACHE_KEYS})
        if pending is not None:
            n, total = pending
            keep = torch.is_tensor(kwargs.get("logits_to_keep"))  # indices of real positions: logits has those only
            for key in ("last_hidden_state",) if keep else ("logits", "last_hidden_state"):  # a backbone's: its own
                value = output.get(key)
                if torch.is_tensor(value) and value.dim() >= 3 and value.shape[1] == total:
                    output[key] = value[:, n:]
            hidden = output.get("hidden_states")
            if isinstance(hidden, tuple):
                output["hidden_states"] = tuple(
                    h[:, n:] if isinstance(h, torch.Tensor) and h.dim() == 3 and h.shape[1] == total else h
                    for h in hidden
                )
        return output.to_tuple() if as_tuple else output


def _growing(spec: TokenSpec, cache: Any) -> Any:
    """``cache``, refused when it has a fixed size (a static cache is sized for the inputs and new tokens only)."""
    refuse_fixed_size(cache, spec.method, spec.n)
    return cache


def _unpatch(model: nn.Module) -> None:
    model.__dict__.pop("prepare_inputs_for_generation", None)


def _absolute_positions(model: nn.Module, cfg: Any) -> int | None:
    """The number of learned absolute positions (GPT-2, BERT, OPT, BART), or None for relative / rotary ones."""
    names = ("wpe", "position_embeddings", "embed_positions")
    table = next((m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names), None)
    if table is None:
        return None
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    pad = getattr(table, "padding_idx", None)  # RoBERTa's family (MPNet, data2vec-text, ...): positions start after it
    rows = getattr(table, "num_embeddings", None) or limit  # FSMT's table: max + pad + 1 rows; M2M100's has none
    return rows - pad - 1 if rows is not None and pad is not None else limit


def _prefix_module(model: nn.Module) -> nn.Module | None:
    """The outermost module whose forward takes a key/value cache: the model, else its backbone, else None."""
    if _cache_key(model):
        return model
    backbone = getattr(model, "base_model", None)
    if isinstance(backbone, nn.Module) and backbone is not model and _cache_key(backbone):
        return backbone
    return None


# -- inject / fold ------------------------------------------------------------------------------------------------------
def layer_of(model: nn.Module) -> VirtualTokens | None:
    """The model's VirtualTokens layer, or None."""
    return getattr(model, ATTR, None) if ATTR in getattr(model, "_modules", {}) else None


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


def fold(model: nn.Module, adapter_name: str = "default") -> None:
    """Replace a token adapter's reparametrisation (P-tuning's MLP/LSTM, prefix tuning's MLP) by its output.

    The outputs do not change; what is left trains (if it trains) as a plain table of virtual tokens, which is
    also what is saved and what a loaded adapter holds. ``model``: a DeltaModel or the base model holding it.

    Raises:
        ValueError: no token adapter of that name.
    """
    layer = layer_of(model)
    if layer is None and isinstance(getattr(model, "base_model", None), nn.Module):
        layer = layer_of(model.base_model)  # a DeltaModel
    if layer is None or adapter_name not in layer.prompt_encoder:
        raise ValueError(f"no token adapter named {adapter_name!r} in this model")
    layer.prompt_encoder[adapter_name].fold(None)


__all__ = ["ATTR", "SAVED_KEY", "VirtualTokens", "attach", "fold"]


def _pads_first(kwargs: dict) -> None:
    """A decoder's classifier finds each row's last token in input_ids; given inputs_embeds (the virtual tokens) it
    reads the last position, a pad of right-padded rows (as peft's does). Pads go first, positions from the mask."""
    ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    if ids is None or not isinstance(mask, torch.Tensor) or mask.shape != ids.shape or bool(mask[:, -1].all()):
        return
    if kwargs.get("position_ids") is None:  # as the unpadded rows count them
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    order = torch.argsort(mask.long(), dim=1, stable=True)  # pads first, the tokens in their order
    for key in ("input_ids", "attention_mask", "token_type_ids", "position_ids"):
        if isinstance(kwargs.get(key), torch.Tensor) and kwargs[key].shape == ids.shape:
            kwargs[key] = kwargs[key].gather(1, order)
