"""Prompt tuning (Lester, Al-Rfou, Constant, 2021; arXiv:2104.08691).

Prepends n trainable vectors P (n x d) to the input embeddings: h0 = [P ; E(x)], where E is the frozen
word embedding and d the hidden size. Only P trains; the base stays frozen. Nothing to merge.
Init: RANDOM (N(0, 1), as PEFT's nn.Embedding), SAMPLE_VOCAB (rows of E for random token ids), or TEXT
(E of the tokenized init text: truncated to n tokens with a warning when longer, repeated when shorter).

Encoder-decoder models get P in front of the encoder input. With task_type SEQ_2_SEQ_LM the table holds
2n rows (PEFT's num_transformer_submodules = 2) of which the first n are used, so files match PEFT's.
Saved as PEFT's ``prompt_embeddings`` (rows x d). The attention mask, position ids, labels, per-token
outputs and generation are handled in ``_tokens.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, DeltaConfig
from ._token_geometry import TokenSpec, VirtualTokenFields, check_fields, fill_geometry, warn
from ._tokens import attach

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig(VirtualTokenFields, DeltaConfig):
    """Prompt tuning: n trainable vectors prepended to the input embeddings."""

    method = "prompt_tuning"
    peft_type = "PROMPT_TUNING"
    no_targets = "it adds virtual tokens and adapts no module (peft's config has no target_modules)"

    prompt_tuning_init: str = "RANDOM"
    """How P starts: "RANDOM" (N(0, 1)), "SAMPLE_VOCAB" (embeddings of random tokens) or "TEXT"."""
    prompt_tuning_init_text: str | None = None
    """The init text for "TEXT": truncated to the first rows with a warning when longer, repeated when shorter."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer (local folder or hub id) that tokenizes the init text."""
    tokenizer_kwargs: dict | None = None
    """Keyword arguments for ``AutoTokenizer.from_pretrained`` (TEXT init only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self)
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)  # PEFT's str enum
        if init not in INITS:
            raise ConfigError(f"prompt_tuning_init must be one of {INITS}, got {self.prompt_tuning_init!r}")
        self.prompt_tuning_init = init
        text = self.prompt_tuning_init_text
        if text is not None and not isinstance(text, str):  # (method.prompt_tuning_init_text=Classify this: -> dict)
            colon = isinstance(text, Mapping) and list(text.values()) == [None]  # (what a trailing ':' makes)
            hint = " (quote it: YAML read the text's trailing ':' as a mapping)" if colon else ""
            raise ConfigError(f"prompt_tuning_init_text must be a string, got {text!r}{hint}")
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, Mapping):
            raise ConfigError(
                f"tokenizer_kwargs must be a mapping of AutoTokenizer.from_pretrained arguments, got "
                f"{self.tokenizer_kwargs!r}"
            )
        if self.tokenizer_kwargs is not None:  # any Mapping, kept as the dict adapter_config.json holds
            self.tokenizer_kwargs = dict(self.tokenizer_kwargs)
        if init == "TEXT" and not self.prompt_tuning_init_text:
            raise ConfigError(
                f"prompt_tuning_init='TEXT' needs prompt_tuning_init_text, got {self.prompt_tuning_init_text!r}"
            )
        if init == "TEXT" and not self.tokenizer_name_or_path:
            raise ConfigError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path, got None")
        if self.tokenizer_kwargs and init != "TEXT":
            raise ConfigError(f"tokenizer_kwargs is only used with prompt_tuning_init='TEXT', got {init!r}")

    def for_loading(self) -> PromptTuningConfig:
        # The file holds the table: the TEXT init's tokenizer (perhaps on another machine) is not needed.
        return self.replace(prompt_tuning_init="RANDOM", tokenizer_kwargs=None)


class PromptEmbedding(nn.Module):
    """The table P of virtual tokens (PEFT's ``PromptEmbedding`` layout: ``embedding.weight``)."""

    kind = "prompt"

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, dim)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (rows, dim)

    def fold(self, weight: torch.Tensor | None) -> None:
        """Load saved tokens (prompt tuning has no reparametrisation to fold)."""
        if weight is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(weight)


def _init_ids(config: PromptTuningConfig, rows: int, vocab: int) -> torch.Tensor | None:
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab, (rows,))
    if config.prompt_tuning_init != "TEXT":
        return None
    from transformers import AutoTokenizer

    # Never remote code from an adapter's config (a file someone sends you), as peft drops it too.
    kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except Exception as err:  # a missing folder, an offline hub id, no tokenizer files, a damaged tokenizer.json
        # (tokenizers raises a plain Exception or a KeyError for a tokenizer.json that is JSON but no tokenizer)
        reason = " ".join(str(err).split()) or type(err).__name__
        reason = (
            f"a tokenizer file lacks the field {err.args[0]!r}" if isinstance(err, KeyError) and err.args else reason
        )
        if reason.startswith("Couldn't instantiate the backend tokenizer"):  # its list of three ways says little
            reason = "no tokenizer files in it that load (tokenizer.json or a slow tokenizer's vocabulary)"
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise ConfigError(
            f"tokenizer_name_or_path={config.tokenizer_name_or_path!r} (for prompt_tuning_init='TEXT') gives no "
            f"tokenizer: {reason}"
        ) from err
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ConfigError("prompt_tuning_init_text tokenizes to no tokens")
    if len(ids) > (n := config.num_virtual_tokens):  # seq2seq: peft's table has 2n rows; the model reads the first n
        table = f" (peft's seq2seq table holds {rows} rows, the model reads the first {n})" if rows > n else ""
        warn(f"prompt_tuning_init_text has {len(ids)} tokens but num_virtual_tokens is {n}{table}; only the first "
             f"{n} are used")  # fmt: skip
    ids = (ids * math.ceil(rows / len(ids)))[:rows]  # repeated when shorter, as PEFT does
    if max(ids) >= vocab:
        raise ConfigError(
            f"tokenizer {config.tokenizer_name_or_path!r} gives token id {max(ids)} >= the model's vocab {vocab}"
        )
    return torch.tensor(ids)


def inject(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> list[nn.Module]:
    """Add a prompt-tuning adapter: fill the geometry from the model, build and initialise P, attach it."""
    fill_geometry(model, config, prefix=False)
    words: nn.Embedding = model.get_input_embeddings()
    rows = config.num_virtual_tokens * config.num_transformer_submodules
    encoder = PromptEmbedding(rows, config.token_dim)
    ids = None if config.inference_mode else _init_ids(config, rows, words.weight.shape[0])
    if ids is not None:
        with torch.no_grad():
            # float32 like PEFT, whatever the base dtype: the prompt is the only thing that trains.
            encoder.embedding.weight.copy_(words(ids.to(words.weight.device)).float())
    spec = TokenSpec("prompt_tuning", "prompt", config.num_virtual_tokens, classifies=config.task_type == "SEQ_CLS")
    return attach(model, adapter_name, encoder, spec)


CONFIG, INJECT = PromptTuningConfig, inject

__all__ = ["PromptEmbedding", "PromptTuningConfig"]
