"""Prefix tuning (Li & Liang, 2021; arXiv:2101.00190) and P-tuning v2 (Liu et al., 2022; arXiv:2110.07602).

Every attention layer l gets n trainable key and value vectors in front of the keys and values computed
from the input: attention(Q, [P_k^l ; K], [P_v^l ; V]). The virtual tokens are not fed through the layers;
they only act as extra keys/values (a prefix in the attention cache). Only the prefixes train.

Prefix tuning reparametrises them for stable training (``prefix_projection=True``): a table E (n x d) and
an MLP, [P_k^1, P_v^1, ..., P_k^L, P_v^L] = W2 tanh(W1 E + b1) + b2, with W1 (h x d), W2 (2 L d x h). After
training the MLP is folded away: only the flat prefixes (n x 2 L d) are saved (PEFT's ``prompt_embeddings``)
and served, and ``fold`` does it in memory with the same outputs.
P-tuning v2 ("deep prompt tuning", ``prefix_projection=False``) trains the flat prefixes directly; it is the
same computation on the same prefixes and works for classification and tagging as well as generation.

Init: E and the flat table ~ N(0, 1), the MLP as torch initialises it (as PEFT); ``init_weights="zero"``
starts the prefixes at zero. Here d is num_key_value_heads * head_dim (grouped-query attention keeps its
narrower keys). Nothing to merge. The cache, mask, positions and generation are handled in ``_tokens.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, DeltaConfig, check_positive_int
from ._folding import Reparametrised, fold_tensor
from ._token_geometry import TokenSpec, VirtualTokenFields, check_fields, fill_geometry
from ._tokens import VirtualTokens, attach, layer_of
from ._tokens_layout import refuse_kv_free


@dataclass
class PrefixTuningConfig(VirtualTokenFields, DeltaConfig):
    """Prefix tuning (prefix_projection=True) or P-tuning v2 (False): per-layer key/value prefixes."""

    method = "prefix_tuning"
    peft_type = "PREFIX_TUNING"
    virtual_tokens_in = "cache"
    no_targets = "it adds virtual tokens and adapts no module (peft's config has no target_modules)"

    prefix_projection: bool = False
    """True: prefix tuning's MLP reparametrisation during training; False: P-tuning v2 (the prefixes train directly)."""
    encoder_hidden_size: int | None = None
    """Hidden width h of the MLP; None uses token_dim."""
    init_weights: str | None = None
    """None: random init (as PEFT); "zero": the prefixes start at zero (the MLP's last layer, or the table)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self)
        check_positive_int("encoder_hidden_size", self.encoder_hidden_size, optional=True)
        if not isinstance(value := self.prefix_projection, bool):  # "false" would be a true (non-empty) string
            was = " (text was read as true before: such a run trained with the MLP)"
            was = was if isinstance(value, str) and value else ""
            raise ConfigError(f"prefix_projection must be true or false, got {value!r}{was}")
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be None or 'zero', got {self.init_weights!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> PrefixTuningConfig:
        """As ``DeltaConfig.from_dict``; a file whose prefix_projection is text (deltatune saved the text as given
        before cabfaeb, and peft loads it) is read as it ran: bool(text), so "false" trained with the MLP (one
        warning). A config made in Python still refuses text."""
        if isinstance(value := data.get("prefix_projection"), str):
            warnings.warn(f"{source}: prefix_projection={value!r} (text, as older deltatune saved it) is read as "
                          f"{bool(value)}, as it trained", stacklevel=3)  # fmt: skip
            data = dict(data, prefix_projection=bool(value))
        return super().from_dict(data, source)


class PrefixEncoder(Reparametrised):
    """The prefixes, with PEFT's module names (``embedding``, ``transform``).

    Args:
        n: virtual tokens.
        dim: prefix width d per layer and per key/value.
        layers: number of layers L.
        hidden: MLP width h (with ``projection``).
        projection: reparametrise through the MLP (prefix tuning) rather than train the flat table (P-tuning v2).
        zero: start the prefixes at zero.
    """

    kind = "prefix"
    reparametrisation = ("transform",)

    def __init__(self, n: int, dim: int, layers: int, hidden: int, projection: bool, zero: bool = False) -> None:
        super().__init__()
        out = layers * 2 * dim
        self.transform: nn.Sequential | None = None
        if projection:
            self.embedding = nn.Embedding(n, dim)
            self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out))
            if zero:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, out)
            if zero:
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        return self.transform(x) if self.transform is not None else x  # (n, layers * 2 * dim)


def inject(model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> list[nn.Module]:
    """Add a prefix adapter: fill the geometry (layers, key/value heads and width) from the model and attach it.

    Raises:
        ConfigError: the model's attention cannot take a prefix (or some layers keep no keys and values), or the
            geometry fields do not fit the model.
    """
    method = "prefix_tuning" if config.prefix_projection else "prefix_tuning (P-tuning v2)"
    refuse_kv_free(model, method)  # Jamba's Mamba layers, RecurrentGemma's recurrent blocks: no keys to prefix
    fill_geometry(model, config, prefix=True)
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if config.token_dim % config.num_attention_heads:
        raise ConfigError(
            f"token_dim={config.token_dim} is not divisible by num_attention_heads={config.num_attention_heads}"
        )
    # A loaded adapter (inference_mode) holds the folded prefixes only, as PEFT does.
    projection = config.prefix_projection and not config.inference_mode
    encoder = PrefixEncoder(
        config.num_virtual_tokens,
        config.token_dim,
        config.num_layers,
        config.encoder_hidden_size,
        projection,
        zero=config.init_weights == "zero",
    )
    spec = TokenSpec(
        method,
        "prefix",
        config.num_virtual_tokens,
        config.num_layers,
        config.num_attention_heads,
        config.token_dim,
        config.num_transformer_submodules,
    )
    return attach(model, adapter_name, encoder, spec)


# -- peft's PeftModel.get_prompt / get_prompt_embedding_to_save, for every token method (the registry finds them here) --
def _token_adapter(model: nn.Module, adapter_name: str, caller: str) -> tuple[VirtualTokens, TokenSpec]:
    layer = layer_of(model.get_base_model())
    if adapter_name not in model.peft_config:
        raise ValueError(f"{caller}: no adapter named {adapter_name!r} (adapters: {', '.join(model.peft_config)})")
    if layer is None or adapter_name not in layer.specs:
        method = model.peft_config[adapter_name].method
        raise ValueError(f"{caller}: adapter {adapter_name!r} is a {method} adapter; only the token methods (prompt "
                         "tuning, P-tuning, prefix tuning) have virtual tokens")  # fmt: skip
    return layer, layer.specs[adapter_name]


def get_prompt(model: nn.Module, batch_size: int, task_ids: torch.Tensor | None = None,
               max_cache_len: int | None = None) -> torch.Tensor | object:  # fmt: skip
    """peft's ``get_prompt``: the active adapter's virtual tokens for a batch of ``batch_size``. Prompt tuning and
    P-tuning: (batch, n, d), the (reparametrised) prompts each row gets; prefix tuning: the transformers cache of
    per-layer key/value prefixes a forward starts from (in the base model's dtype). ``task_ids`` and
    ``max_cache_len`` (peft's, for multitask prompts and old transformers' hybrid caches) change nothing here."""
    layer, spec = _token_adapter(model, model.active_adapter, "get_prompt")
    if spec.kind == "prefix":
        return layer._fill(model.get_base_model(), model.active_adapter, spec, batch_size, None)
    return layer.prompt_encoder[model.active_adapter]().unsqueeze(0).repeat(batch_size, 1, 1)  # (batch, n, d)


def get_prompt_embedding_to_save(model: nn.Module, adapter_name: str) -> torch.Tensor:
    """peft's: adapter ``adapter_name``'s virtual tokens as its file holds them (any reparametrisation folded in),
    detached, on the CPU: (n, d) for prompts, (n, layers * 2 * d) for prefixes."""
    layer, _ = _token_adapter(model, adapter_name, "get_prompt_embedding_to_save")
    return fold_tensor(layer.prompt_encoder[adapter_name]).cpu()


MODEL_FUNCTIONS = {"get_prompt": get_prompt, "get_prompt_embedding_to_save": get_prompt_embedding_to_save}
CONFIG, INJECT = PrefixTuningConfig, inject

__all__ = ["PrefixEncoder", "PrefixTuningConfig"]
