"""Simple Preference Optimization (stage ``simpo``; Meng, Xia, Chen 2024, arXiv:2405.14734).

No reference model: the implicit reward of a response is its length-normalised log-likelihood,
r(x, y) = beta / |y| * log pi(y|x) (the mean token log-prob times beta), and a preference pair (chosen c, rejected r)
is pushed apart by at least a target margin gamma:

    loss = mean over pairs of -log sigmoid(beta * (avg_c - avg_r) - gamma)

with avg_y the mean token log-prob of y, beta = ``align.beta`` (the paper uses 2 to 2.5) and gamma =
``align.simpo_gamma``. Any registered method trains; the data path is DPO's.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .config import AlignArgs, RunConfig
from .logprobs import response_logprobs
from .pairs import PairTrainer
from .prepared import Prepared

_LM_KEYS = ("input_ids", "attention_mask", "labels")


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses and the implicit rewards.

    Args:
        chosen_logps: (B,) summed response log-probs of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        chosen_tokens: (B,) response token counts of the chosen responses.
        rejected_tokens: (B,) the same for the rejected responses.
        beta: the reward scale.
        gamma: the target reward margin.

    Returns:
        (losses (B,), chosen rewards (B,), rejected rewards (B,)); the rewards beta * avg_y are detached.
    """
    chosen = beta * chosen_logps / chosen_tokens.clamp(min=1)
    rejected = beta * rejected_logps / rejected_tokens.clamp(min=1)
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses, chosen.detach(), rejected.detach()


class SimPOTrainer(PairTrainer):
    """PairTrainer with the SimPO loss (no reference). Logs the ``rewards/*`` and ``logps/*`` (mean token log-probs)
    means since the last log, as TRL's CPOTrainer names them; eval predictions are (B, 2) [chosen reward, rejected
    reward]."""

    def __init__(self, *args, align: AlignArgs, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.align = align

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps, counts = response_logprobs(model, {k: inputs[k] for k in _LM_KEYS})
        (pc, pr), (nc, nr) = logps.chunk(2), counts.chunk(2)
        losses, chosen, rejected = simpo_loss(pc, pr, nc, nr, self.align.beta, self.align.simpo_gamma)
        if model.training:  # TRL's CPOTrainer's names; its logps are the mean token log-probs (loss_type simpo)
            self.log_rewards(chosen, rejected)
            self.log_stat("logps/chosen", (pc / nc.clamp(min=1)).mean().item())
            self.log_stat("logps/rejected", (pr / nr.clamp(min=1)).mean().item())
        loss = self.pair_mean(losses, model)
        return (loss, torch.stack([chosen, rejected], -1)) if return_outputs else loss


def prepare_simpo(cfg: RunConfig, tok) -> Prepared:
    """DPO's data path (preference rows -> prompt + response with labels on the response) with the SimPO trainer."""
    from functools import partial

    from .dpo import prepare_dpo

    p = prepare_dpo(cfg, tok)
    a = cfg.align
    notes = [n for n in p.notes if not n.startswith("DPO")]
    notes.append(f"SimPO: beta={a.beta}, target margin gamma={a.simpo_gamma}; no reference model")
    return dataclasses.replace(p, notes=notes, trainer_class=partial(SimPOTrainer, align=cfg.align))
