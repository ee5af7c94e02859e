"""Simple Preference Optimization (stage ``simpo``; Meng, Xia, Chen 2024, arXiv:2405.14734).

No reference model: the implicit reward of a response is its length-normalised log-likelihood,
r(x, y) = beta / |y| * log pi(y|x) (the mean token log-prob times beta), and a preference pair (chosen c, rejected r)
is pushed apart by at least a target margin gamma:

    loss = mean over pairs of -log sigmoid(beta * (avg_c - avg_r) - gamma)

with avg_y the mean token log-prob of y, beta = ``align.beta`` (the paper uses 2 to 2.5) and gamma =
``align.simpo_gamma``. Any registered method trains; the data path is DPO's.

As TRL's ``CPOTrainer`` with ``loss_type="simpo"``: ``align.label_smoothing`` eps gives the conservative form
-(1 - eps) log sigmoid(x) - eps log sigmoid(-x) of the same x, and ``align.cpo_alpha`` adds alpha times the NLL of
the chosen responses (the mean over their tokens in the micro-batch, as CPO's cross-entropy; CPO's default is 1,
deltatune's 0, the SimPO paper's loss), and ``align.alpha`` is AlphaPO's reward shape (``simpo_loss``).
``align.loss_type`` is simpo (or the default sigmoid, read as simpo); CPO's
own sigmoid, hinge and ipo losses (``cpo_loss``, here beside the trainer that runs them) are stage cpo's (cpo.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .config import AlignArgs, RunConfig
from .logprobs import response_logprobs, router_aux_coef
from .pairs import PairTrainer, Pooled, disable_dropout
from .prepared import Prepared

_LM_KEYS = ("input_ids", "attention_mask", "labels")


def alphapo(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape (Gupta et al. 2025, arXiv:2501.03884): (1 - p^-alpha) / alpha of p = exp(logps), as
    TRL's CPO; alpha 0: the log-probs themselves."""
    return logps if alpha == 0 else -torch.expm1(-alpha * logps) / alpha


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair CPO losses of ``loss_type`` sigmoid, hinge or ipo (module docstring), as TRL's ``cpo_loss``.

    Args:
        chosen_logps: (B,) the chosen responses' log-probs under the policy (summed; per-token means for ipo).
        rejected_logps: (B,) the same for the rejected responses.
        beta: the temperature (IPO's regularisation tau).
        loss_type: sigmoid, hinge or ipo.
        label_smoothing: eps of the sigmoid loss.
        alpha: AlphaPO's alpha (``alphapo``).

    Returns:
        (losses (B,), chosen rewards (B,), rejected rewards (B,)); the rewards beta * l are detached.

    Raises:
        ValueError: another loss_type.
    """
    chosen, rejected = alphapo(chosen_logps, alpha), alphapo(rejected_logps, alpha)
    u = chosen - rejected
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * u) - label_smoothing * F.logsigmoid(-beta * u)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * u)
    elif loss_type == "ipo":
        losses = (u - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be sigmoid, hinge or ipo (simpo: simpo_loss), got {loss_type!r}")
    return losses, beta * chosen.detach(), beta * rejected.detach()


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses and the implicit rewards.

    Args:
        chosen_logps: (B,) summed response log-probs of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        chosen_tokens: (B,) response token counts of the chosen responses.
        rejected_tokens: (B,) the same for the rejected responses.
        beta: the reward scale.
        gamma: the target reward margin.
        label_smoothing: eps, the assumed fraction of flipped labels (TRL's CPO simpo form).
        alpha: AlphaPO's alpha (Gupta et al. 2025, arXiv:2501.03884; TRL's CPO ``alpha``): each mean token log-prob
            a becomes (1 - exp(a)^-alpha) / alpha before the scaling by beta; 0: SimPO's a itself.

    Returns:
        (losses (B,), chosen rewards (B,), rejected rewards (B,)); the rewards beta * avg_y are detached.
    """

    chosen = beta * alphapo(chosen_logps / chosen_tokens.clamp(min=1), alpha)
    rejected = beta * alphapo(rejected_logps / rejected_tokens.clamp(min=1), alpha)
    x = chosen - rejected - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)
    return losses, chosen.detach(), rejected.detach()


class SimPOTrainer(PairTrainer):
    """PairTrainer with the SimPO loss (no reference). Logs the ``rewards/*``, ``logps/*`` (mean token log-probs),
    ``logits/*`` (the mean logit over each side's response tokens, as deltatune's DPO) and ``nll_loss`` (the chosen
    responses' mean token NLL, whatever ``align.cpo_alpha``: TRL logs 0 where cpo_alpha is 0) means since the last
    log, as TRL's CPOTrainer names them; eval predictions are (B, 2) [chosen reward, rejected reward].
    ``loss_type``: simpo, or stage cpo's sigmoid, hinge or ipo (``cpo.cpo_loss``; ``logps/*`` then the summed
    log-probs, the means for ipo, as TRL's)."""

    def __init__(self, *args, align: AlignArgs, loss_type: str = "simpo", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.align, self.loss_type = align, loss_type
        self.router_coef = router_aux_coef(self.model, when_on=True)  # (a MoE's aux loss, as TRL's CPO adds)
        if align.disable_dropout:
            disable_dropout(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        a, stats, aux = self.align, {}, [] if self.router_coef else None
        logps, counts = response_logprobs(model, {k: inputs[k] for k in _LM_KEYS}, stats, aux)
        (pc, pr), (nc, nr) = logps.chunk(2), counts.chunk(2)
        mean = self.loss_type in ("simpo", "ipo")  # (TRL's CPO: per-token means for these two, else sums)
        lc, lr = (pc / nc.clamp(min=1), pr / nr.clamp(min=1)) if mean else (pc, pr)
        if self.loss_type == "simpo":
            losses, chosen, rejected = simpo_loss(pc, pr, nc, nr, a.beta, a.simpo_gamma, a.label_smoothing, a.alpha)
        else:
            losses, chosen, rejected = cpo_loss(lc, lr, a.beta, self.loss_type, a.label_smoothing, a.alpha)
        nll = -pc.sum() / nc.sum().clamp(min=1)  # (CPO's cross-entropy: a mean over the micro-batch's chosen tokens)
        # TRL's CPOTrainer's names, training and evaluating (EvalStats: eval_logps/chosen, ...); its logps are the
        # mean token log-probs (loss_type simpo); every process's pairs and tokens pooled under DDP (TRL averages
        # the processes' own means: equal for equal batches and token counts)
        pool, n = Pooled(self), len(pc)
        self.log_rewards(chosen, rejected, pool)
        pool.mean("logps/chosen", lc)
        pool.mean("logps/rejected", lr)
        pool.tokens({"mean_logits": "logits/chosen"}, stats, inputs["labels"], slice(0, n))
        pool.tokens({"mean_logits": "logits/rejected"}, stats, inputs["labels"], slice(n, None))
        pool.add("nll_loss", -pc.sum(), nc.sum(), nll.item)
        pool.log()
        loss = self.pair_mean(losses, model)
        if a.cpo_alpha:
            loss = loss + a.cpo_alpha * nll
        if aux:  # (TRL's CPO: router_aux_loss_coef times the forward's aux_loss, over chosen and rejected rows)
            loss = loss + self.router_coef * aux[0]
        return (loss, torch.stack([chosen, rejected], -1)) if return_outputs else loss


def prepare_simpo(cfg: RunConfig, tok) -> Prepared:
    """DPO's data path (preference rows -> prompt + response with labels on the response) with the SimPO trainer."""
    from functools import partial

    from .dpo import prepare_dpo

    p = prepare_dpo(cfg, tok)
    a = cfg.align
    notes = [n for n in p.notes if not n.startswith("DPO")]
    notes.append(f"SimPO: beta={a.beta}, target margin gamma={a.simpo_gamma}"
                 + (f", label_smoothing={a.label_smoothing}" if a.label_smoothing else "")
                 + (f", AlphaPO alpha={a.alpha}" if a.alpha else "")
                 + (f", + {a.cpo_alpha} x NLL of the chosen responses (CPO's cpo_alpha)" if a.cpo_alpha else "")
                 + "; no reference model")  # fmt: skip
    return dataclasses.replace(p, notes=notes, trainer_class=partial(SimPOTrainer, align=cfg.align))
