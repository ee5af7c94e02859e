"""Reward model (stage ``rm``): a scalar head on a causal LM or encoder, trained on preference pairs.

The model is ``AutoModelForSequenceClassification`` with one output (the head is saved with the adapter, as
modules_to_save of task type SEQ_CLS). For each pair it scores (prompt, chosen) and (prompt, rejected) and
minimises the Bradley-Terry ranking loss (Stiennon et al. 2020; Ouyang et al. 2022):

    loss = mean over pairs of -log sigmoid(r_chosen - r_rejected)

Eval: pairwise accuracy (the share of pairs with r_chosen > r_rejected) and the mean margin r_chosen - r_rejected.
``scorers.RewardScorer`` loads a finished reward run to score text for PPO and GRPO.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.preference import PairCollator
from .config import RunConfig
from .pairs import PairTrainer, encode_pair_splits, pair_metrics
from .prepared import Prepared
from .scorers import is_encoder_config


def pairwise_losses(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry ranking loss of each pair: -log sigmoid(chosen - rejected), (B,) from the (B,) rewards of the
    preferred and the dispreferred responses."""
    return -F.logsigmoid(chosen.float() - rejected.float())


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """The mean of ``pairwise_losses``; log 2 when every margin is 0."""
    return pairwise_losses(chosen, rejected).mean()


class RewardTrainer(PairTrainer):
    """PairTrainer with the pairwise loss on the model's scalar scores."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        scores = model(**inputs).logits.squeeze(-1)  # (2B,): the B chosen, then the B rejected
        chosen, rejected = scores.chunk(2)
        loss = self.pair_mean(pairwise_losses(chosen, rejected), model)
        return (loss, torch.stack([chosen, rejected], -1)) if return_outputs else loss


def _is_encoder(cfg: RunConfig) -> bool:
    """Whether the base is an encoder (a masked-LM family such as BERT), which scores (prompt, response) through
    its pair template rather than a chat template."""
    from transformers import AutoConfig

    from .models import resolve_path

    try:
        config = AutoConfig.from_pretrained(
            resolve_path(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError):
        return False  # the model loader reports this more clearly
    return is_encoder_config(config)


def prepare_rm(cfg: RunConfig, tok) -> Prepared:
    """Preference rows -> (prompt, response) pairs for a one-output sequence classifier.

    Raises:
        ConfigError: model.num_labels is set to anything but 1.
    """
    from ..config import ConfigError

    if cfg.model.num_labels not in (None, 1):
        raise ConfigError(f"stage rm trains a scalar reward: model.num_labels must be 1, got {cfg.model.num_labels}")
    cfg.model.num_labels = 1  # recorded in run.yaml, so eval and PPO rebuild the same head
    train, ev, notes = encode_pair_splits(cfg, tok, causal=False, pair_scorer=_is_encoder(cfg))

    def compute(p) -> dict[str, float]:
        return pair_metrics(np.asarray(p.predictions))

    return Prepared(
        train.examples,
        ev.examples if ev else None,
        PairCollator(tok.pad_token_id),
        compute,
        "eval_accuracy",
        notes=notes,
        trainer_class=RewardTrainer,
    )
