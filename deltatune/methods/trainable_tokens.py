"""Trainable tokens, stand-alone (peft 0.21.2's TRAINABLE_TOKENS: TrainableTokensConfig / TrainableTokensModel).

Only the listed rows of an embedding matrix E (vocab x d) train, nothing else: each adapter keeps their values
V (k x d), started as E[ids] (init_weights=True, so the model starts as the base) or drawn from N(0, 1), and the
layer computes with E' = E with rows ``ids`` replaced by V (``index_copy``: the gradient reaches V only). Merging
writes V into E's rows and unmerging writes the kept originals back. Useful to train new (added) tokens or retrain a
few existing ones at the memory cost of k rows.

Targets: ``target_modules`` None is the model's input embedding (peft's ``get_input_embeddings`` name); a list of
names matches a module named so or ending with ``.<name>``, a string is a regex matched against the whole name
(peft's rules). Where the model ties its output embedding to the input one (``tie_word_embeddings``) and the input
embedding is adapted, the output embedding (and every module sharing the weight: T5's encoder and decoder
``embed_tokens``) reads the input layer's rows: the logits see them too, and nothing there trains on its own.

Saved as peft saves it: ``base_model.model.<path>.trainable_tokens_delta`` for each wrapped module, the tied ones
included (their tensor is the input layer's). The layer is LoRA's ``trainable_token_indices`` layer
(``methods/_trainable_tokens.py``), so refusals and differences from peft are its: ids out of range, negative,
repeated or none are a ConfigError naming ``token_indices``; a target that is not an embedding (or the untied
output embedding) is refused; an output embedding's bias is kept (a BERT MLM decoder's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import ConfigError, DeltaConfig
from ..targets import matches
from ._trainable_tokens import TrainableTokens, check_ids, place_tokens

KEY = "trainable_tokens_delta"
"""An adapter's saved tensor, relative to its layer (peft's TrainableTokensLayer layout, no wrapper)."""


@dataclass
class TrainableTokensConfig(DeltaConfig):
    """Trainable tokens: only the listed rows of the embedding train (peft's TrainableTokensConfig)."""

    method = "trainable_tokens"
    peft_type = "TRAINABLE_TOKENS"

    token_indices: list[int] = field(default_factory=list)
    """The token ids whose embedding rows train (a tokenizer's ``input_ids`` for the tokens); at least one."""
    init_weights: bool = True
    """True: the rows start as the embedding's (the model starts as the base). False: drawn from N(0, 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.token_indices = check_ids(self.token_indices, "", "token_indices", integral=True)  # numpy's: as ints
        if not isinstance(value := self.init_weights, bool):  # "false" would be a true (non-empty) string
            was = " (text was read as true before: such a run started from the embedding's rows)"
            raise ConfigError(
                f"init_weights must be true or false, got {value!r}{was if isinstance(value, str) and value else ''}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> TrainableTokensConfig:
        """As ``DeltaConfig.from_dict``; init_weights saved as text (taken before session 55, and run as true) reads as
        it ran (``bottleneck.read_text_switches``), with a warning."""
        from .bottleneck import read_text_switches

        return super().from_dict(read_text_switches(data, ("init_weights",), source), source)

    @property
    def trainable_token_indices(self) -> list[int]:
        """The rows it trains, under LoRA's field name, for code asking whether an adapter trains embedding rows
        (peft's ``save_embedding_layers="auto"``, files.embedding_copies: no embedding copy beside such an adapter)."""
        return self.token_indices


def inject(model: nn.Module, config: TrainableTokensConfig, adapter_name: str) -> list[nn.Module]:
    """Wrap the target embeddings (and the output embedding tied to the input one) and add ``adapter_name``.

    Raises:
        ConfigError: no module matches ``target_modules``; a target that is not an embedding; an id out of range.
    """
    targets = config.target_modules
    if targets is None:  # peft: the input embedding's name, else "embed_tokens"
        embedding = getattr(model, "get_input_embeddings", lambda: None)()
        targets = [next((n for n, m in model.named_modules() if m is embedding and n), "embed_tokens")]
    paths = [n for n, m in model.named_modules() if n and matches(n, targets) and not _inside_token_layer(model, n)]
    if not paths:
        named = isinstance(targets, str) and any(matches(n, [targets]) for n, _ in model.named_modules() if n)
        raise ConfigError(
            f"trainable_tokens: Target modules {targets!r} not found in the base model. "
            "Please check the target modules and try again."
            + (
                f" (a string is a regex matched against the full module name, as in peft; for the modules named "
                f"{targets!r} give a list: [{targets!r}])"
                if named
                else ""
            )
        )
    spec = dict.fromkeys(paths, list(config.token_indices))
    return place_tokens(model, spec, adapter_name, "token_indices", config.init_weights, save_tied=True, saved_as=KEY)


def _inside_token_layer(model: nn.Module, name: str) -> bool:
    """``name`` is the base layer a token layer wraps (matched again once wrapped: ``embed_tokens.base_layer``)."""
    parent = name.rpartition(".")[0]
    return name.endswith("base_layer") and isinstance(model.get_submodule(parent), TrainableTokens)


CONFIG, INJECT = TrainableTokensConfig, inject
