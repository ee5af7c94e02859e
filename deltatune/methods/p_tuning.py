"""P-tuning (Liu, Zheng, Du, Ding, Qian, Yang, Tang, 2021; arXiv:2103.10385), "GPT Understands, Too".

Like prompt tuning, n virtual tokens are prepended to the input embeddings, h0 = [P ; E(x)], but P is
produced by a small trainable prompt encoder from a trainable table T (n x d): P = f(T), with f an MLP
(Linear d->h, ReLU, Linear h->h, ReLU, Linear h->d) or a bidirectional LSTM (hidden h) followed by an MLP
(2h->2h, ReLU, 2h->d). The reparametrisation eases optimisation; only T and f train. Nothing to merge.
Init: T ~ N(0, 1), f as torch initialises it (as PEFT).

After training f is folded away: the saved form is P itself (PEFT's ``prompt_embeddings``, rows x d), and a
loaded adapter holds P as a plain table (trainable if loaded with is_trainable=True). ``fold`` does the same in
memory. Mask, positions, labels, outputs and generation are handled in ``_tokens.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import targets
from ..config import ConfigError, DeltaConfig, check_positive_int, check_range
from ._folding import Reparametrised
from ._token_geometry import TokenSpec, VirtualTokenFields, check_fields, fill_geometry, warn
from ._tokens import attach

ENCODERS = ("MLP", "LSTM")


@dataclass
class PTuningConfig(VirtualTokenFields, DeltaConfig):
    """P-tuning: virtual tokens produced by a trainable prompt encoder (PEFT's PromptEncoderConfig)."""

    method = "p_tuning"
    peft_type = "P_TUNING"
    no_targets = "it adds virtual tokens and adapts no module (peft's config has no target_modules)"

    encoder_reparameterization_type: str = "MLP"
    """The prompt encoder f: "MLP" (three linear layers) or "LSTM" (bidirectional LSTM + two linear layers)."""
    encoder_hidden_size: int | None = None
    """Hidden width h of f; None uses token_dim."""
    encoder_num_layers: int = 2
    """LSTM layers (the MLP always has PEFT's fixed three linear layers)."""
    encoder_dropout: float = 0.0
    """Dropout between LSTM layers, in [0, 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self)
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        if kind not in ENCODERS:
            raise ConfigError(f"encoder_reparameterization_type must be one of {ENCODERS}, got {kind!r}")
        self.encoder_reparameterization_type = kind
        check_positive_int("encoder_hidden_size", self.encoder_hidden_size, optional=True)
        check_positive_int("encoder_num_layers", self.encoder_num_layers)
        check_range("encoder_dropout", self.encoder_dropout, 0.0, 1.0)


PromptEncoderConfig = PTuningConfig
"""PEFT's name for the P-tuning config."""


class PromptEncoder(Reparametrised):
    """T and the encoder f, with PEFT's module names (``embedding``, ``mlp_head``, ``lstm_head``).

    Args:
        rows: number of virtual tokens (times the transformer submodules).
        dim: token width d.
        hidden: encoder width h.
        kind: "MLP" or "LSTM".
        lstm_layers: LSTM depth.
        dropout: LSTM dropout.
        folded: build only the table (a loaded, folded adapter).
    """

    kind = "prompt"
    reparametrisation = ("lstm_head", "mlp_head")

    def __init__(
        self,
        rows: int,
        dim: int,
        hidden: int,
        kind: str = "MLP",
        lstm_layers: int = 2,
        dropout: float = 0.0,
        folded: bool = False,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, dim)
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if folded:
            return
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(
                dim, hidden, num_layers=lstm_layers, dropout=dropout, bidirectional=True, batch_first=True
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
            )

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight  # (rows, dim)
        if self.lstm_head is not None:
            x = self.lstm_head(x.unsqueeze(0))[0][0]  # (rows, 2 * hidden)
        return self.mlp_head(x) if self.mlp_head is not None else x


def inject(model: nn.Module, config: PTuningConfig, adapter_name: str) -> list[nn.Module]:
    """Add a P-tuning adapter: fill the geometry from the model, build T and f, attach them."""
    fill_geometry(model, config, prefix=False)
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    rows = config.num_virtual_tokens * config.num_transformer_submodules
    mlp = config.encoder_reparameterization_type == "MLP"
    if mlp and config.encoder_num_layers != 2 and not config.inference_mode and not targets._FROM_FILE.get():
        # as peft's PromptEncoder warns, for a new encoder only (a trainable load folds the saved one right after)
        warn(f"encoder_num_layers={config.encoder_num_layers} is ignored by the MLP prompt encoder: it always has "
             "three linear layers (the LSTM reads encoder_num_layers)")  # fmt: skip
    encoder = PromptEncoder(
        rows,
        config.token_dim,
        config.encoder_hidden_size,
        config.encoder_reparameterization_type,
        config.encoder_num_layers,
        config.encoder_dropout,
        folded=config.inference_mode,
    )
    spec = TokenSpec("p_tuning", "prompt", config.num_virtual_tokens, classifies=config.task_type == "SEQ_CLS")
    return attach(model, adapter_name, encoder, spec)


CONFIG, INJECT = PTuningConfig, inject

__all__ = ["PTuningConfig", "PromptEncoder", "PromptEncoderConfig"]
