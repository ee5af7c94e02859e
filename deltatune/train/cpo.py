"""Contrastive Preference Optimization (stage ``cpo``; Xu et al. 2024, arXiv:2401.08417), as TRL 1.16's CPOTrainer.

No reference model: with l_c, l_r the policy's log-probs of the chosen and rejected responses (summed over their
tokens; the per-token means for ipo and simpo) and u = l_c - l_r,

    sigmoid:  loss = -(1 - eps) log sigmoid(beta u) - eps log sigmoid(-beta u)   (the CPO paper's eq. 3; eps =
              ``align.label_smoothing``)
    hinge:    loss = max(0, 1 - beta u)                                          (SLiC)
    ipo:      loss = (u - 1 / (2 beta))^2                                        (IPO's eq. 17, on mean log-probs)
    simpo:    loss = SimPO's (stage simpo's loss: ``simpo.simpo_loss``, margin ``align.simpo_gamma``)

plus ``align.cpo_alpha`` times the chosen responses' NLL (the behaviour-cloning term; its mean over the micro-batch's
chosen tokens, as CPO's cross-entropy). On this stage ``align.cpo_alpha`` defaults to TRL's 1 (the CPO paper's loss);
stage simpo keeps the SimPO paper's 0. ``align.alpha`` (AlphaPO) turns each l into (1 - exp(l)^-alpha) / alpha, as
TRL's. The rewards logged (and scored at eval) are beta times those l. The data path and the trainer are SimPO's
(``simpo.SimPOTrainer`` with the loss type); ``align.loss_type`` is sigmoid (the default), hinge, ipo or simpo.
"""

from __future__ import annotations

import dataclasses

from .config import RunConfig
from .prepared import Prepared
from .simpo import SimPOTrainer, alphapo, cpo_loss

__all__ = ["alphapo", "cpo_loss", "prepare_cpo"]  # (the loss lives with SimPO's trainer, which runs this stage)


def prepare_cpo(cfg: RunConfig, tok) -> Prepared:
    """DPO's data path (preference rows -> prompt + response with labels on the response) with SimPO's trainer
    taking CPO's ``align.loss_type``."""
    from functools import partial

    from .dpo import prepare_dpo

    p = prepare_dpo(cfg, tok)
    a = cfg.align
    kind = a.loss_type
    notes = [n for n in p.notes if not n.startswith("DPO")]
    notes.append(f"CPO loss {kind} with beta={a.beta}"
                 + (f", target margin gamma={a.simpo_gamma}" if kind == "simpo" else "")
                 + (f", label_smoothing={a.label_smoothing}" if a.label_smoothing else "")
                 + (f", AlphaPO alpha={a.alpha}" if a.alpha else "")
                 + (f", + {a.cpo_alpha} x NLL of the chosen responses" if a.cpo_alpha else "")
                 + "; no reference model")  # fmt: skip
    trainer = partial(SimPOTrainer, align=cfg.align, loss_type=kind)
    return dataclasses.replace(p, notes=notes, trainer_class=trainer)
