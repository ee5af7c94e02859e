"""Odds Ratio Preference Optimization (stage ``orpo``; Hong, Lee, Thorne 2024, arXiv:2403.07691).

One stage instead of SFT then DPO, and no reference model. With P(y|x) = exp(mean over y's tokens of log pi) the
length-normalised likelihood of a response, and odds(y|x) = P / (1 - P), a preference pair (chosen c, rejected r)
gives

    log OR = log odds(c) - log odds(r) = (avg_c - avg_r) - (log(1 - exp(avg_c)) - log(1 - exp(avg_r)))
    loss   = NLL(c) + lambda * mean over pairs of -log sigmoid(log OR)

where avg_y is the mean token log-prob of y, NLL(c) the cross-entropy of the chosen responses (a mean over all
their tokens in the batch, as SFT computes it: with gradient accumulation, over the whole step's) and lambda =
``align.beta``. With ``align.disable_prompt_loss`` false (the ORPO authors' code's flag, off there by default) the
NLL takes the whole chosen sequences, prompt and response (every token but the first of each), as TRL's
ORPOTrainer and the authors' code compute it; true (the value read while the align section has no such key), the
responses only, as LLaMA-Factory computes it. The implicit rewards logged (and used for the eval accuracy) are
beta * avg_y. Any registered method trains; the data path is DPO's.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..data.templates import IGNORE_INDEX
from .config import AlignArgs, RunConfig
from .logprobs import model_token_logprobs, router_aux_coef
from .pairs import PairTrainer, Pooled, disable_dropout
from .prepared import Prepared

_LM_KEYS = ("input_ids", "attention_mask", "labels")


def log_odds_ratio(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor) -> torch.Tensor:
    """log odds(c) - log odds(r) from mean token log-probs (B,), with log(1 - exp(a)) computed as log(-expm1(a))
    (accurate for a near 0) and a capped at -1e-6 so a response of probability 1 gives a large finite value."""
    a_c, a_r = chosen_avg.clamp(max=-1e-6), rejected_avg.clamp(max=-1e-6)
    return (a_c - a_r) - (torch.log(-torch.expm1(a_c)) - torch.log(-torch.expm1(a_r)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 0.1,
    nll_tokens: torch.Tensor | int | None = None,
    nll_logps: torch.Tensor | None = None,
    nll_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ORPO loss of a batch of pairs (or of one micro-batch of an accumulated step: see ``nll_tokens``).

    Args:
        chosen_logps: (B,) summed response log-probs of the chosen responses under the policy.
        rejected_logps: (B,) the same for the rejected responses.
        chosen_tokens: (B,) response token counts of the chosen responses.
        rejected_tokens: (B,) the same for the rejected responses.
        beta: lambda, the weight of the odds-ratio term.
        nll_tokens: the chosen tokens the NLL is a mean over (default: this batch's), so that the NLL terms of the
            micro-batches of an accumulated step add up to the NLL of the whole step.
        nll_logps: (B,) summed log-probs of the tokens the NLL takes of each chosen sequence (the prompt's too, as
            TRL's); default ``chosen_logps``, the responses' only.
        nll_counts: (B,) their token counts; default ``chosen_tokens``.

    Returns:
        (loss (scalar), log odds ratios (B,), chosen rewards (B,), rejected rewards (B,)); rewards are detached.
    """
    chosen_avg = chosen_logps / chosen_tokens.clamp(min=1)
    rejected_avg = rejected_logps / rejected_tokens.clamp(min=1)
    log_or = log_odds_ratio(chosen_avg, rejected_avg)
    nll_logps = chosen_logps if nll_logps is None else nll_logps
    nll_counts = chosen_tokens if nll_counts is None else nll_counts
    nll = -nll_logps.sum() / (nll_counts.sum().clamp(min=1) if nll_tokens is None else nll_tokens)
    loss = nll - beta * F.logsigmoid(log_or).mean()
    return loss, log_or, beta * chosen_avg.detach(), beta * rejected_avg.detach()


class ORPOTrainer(PairTrainer):
    """PairTrainer with the ORPO loss (no reference). Logs ``nll`` and, as TRL names it, ``nll_loss`` (over the
    prompts too, but with ``align.disable_prompt_loss``), ``log_odds_ratio`` (the mean of log sigmoid(log OR)),
    ``log_odds_chosen`` (the mean of log OR; both as TRL names them), the ``rewards/*``, the ``logps/*`` (mean token
    log-probs, as TRL's) and the ``logits/*`` (the mean logit over each side's response tokens, as deltatune's and
    TRL's DPO: TRL's ORPO takes the prompt and padding positions too) means since the last log, and each evaluation
    the same as ``eval_*`` (``EvalStats``); eval predictions are (B, 2) [chosen reward, rejected reward]."""

    def __init__(self, *args, align: AlignArgs, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.align = align
        self.router_coef = router_aux_coef(self.model, when_on=True)  # (a MoE's aux loss, as TRL's ORPO adds)
        if align.disable_dropout:
            disable_dropout(self.model)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches, and the chosen responses' tokens in them all, on every process: the NLL's
        divisor (the Trainer counts nothing for a model that does not take it, and would count the rejected
        responses' tokens too)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        answers = _answers_only(self.align)
        n = sum(int((nll_labels(b, answers)[: len(b["labels"]) // 2, 1:] != IGNORE_INDEX).sum()) for b in batches)
        n = torch.tensor(n, device=device)
        return batches, self.accelerator.gather(n).sum() if self.accelerator.num_processes > 1 else n

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        stats, aux = {}, [] if self.router_coef else None
        full = nll_labels(inputs, _answers_only(self.align))
        lm = {**{k: inputs[k] for k in _LM_KEYS}, "labels": full}
        per_token = model_token_logprobs(model, lm, stats, aux)  # (2B, T - 1): every token the NLL takes
        answer = inputs["labels"][:, 1:] != IGNORE_INDEX
        logps, counts = (per_token * answer).sum(-1), answer.sum(-1)
        (pc, pr), (nc, nr) = logps.chunk(2), counts.chunk(2)
        nll_c, nll_n = per_token[: len(pc)].sum(-1), (full[: len(pc), 1:] != IGNORE_INDEX).sum(-1)
        loss, log_or, chosen, rejected = orpo_loss(pc, pr, nc, nr, self.align.beta, num_items_in_batch, nll_c, nll_n)
        if model.training and num_items_in_batch:
            # The Trainer divides each micro-batch's loss by the accumulation steps and DDP averages the processes'
            # gradients: right for the means over pairs, while the NLL, already over every chosen token of the step,
            # is taken that many times over to undo both.
            times = self.current_gradient_accumulation_steps * self.accelerator.num_processes
            loss = loss - (times - 1) * nll_c.sum() / num_items_in_batch
        odds = F.logsigmoid(log_or)
        if model.training:  # the odds-ratio term over the step's pairs, each alike (PairTrainer.pair_mean)
            loss = loss + self.align.beta * (odds.mean() - self.pair_mean(odds, model))
        # (training and evaluating, as TRL: EvalStats reports eval_nll_loss, eval_log_odds_ratio, ...; every
        # process's pairs and tokens pooled under DDP, the mean one process holding them all would log; TRL's
        # ORPOTrainer averages the processes' own means, equal only for equal batches and token counts)
        if aux:  # (TRL's ORPO: router_aux_loss_coef times the forward's aux_loss)
            loss = loss + self.router_coef * aux[0]
        pool, n = Pooled(self), len(pc)
        nll_single = lambda: (-nll_c.sum() / nll_n.sum().clamp(min=1)).item()  # noqa: E731
        # nll: deltatune's name since the start, kept for the runs' curves; nll_loss: TRL's
        pool.add("nll", -nll_c.sum(), nll_n.sum(), nll_single)
        pool.add("nll_loss", -nll_c.sum(), nll_n.sum(), nll_single)
        # TRL's names: log_odds_ratio the mean of log sigmoid(log OR), log_odds_chosen the mean of log OR
        pool.mean("log_odds_ratio", odds)
        pool.mean("log_odds_chosen", log_or)
        self.log_rewards(chosen, rejected, pool)
        pool.mean("logps/chosen", pc / nc.clamp(min=1))  # TRL's: mean token log-probs
        pool.mean("logps/rejected", pr / nr.clamp(min=1))
        pool.tokens({"mean_logits": "logits/chosen"}, stats, inputs["labels"], slice(0, n))
        pool.tokens({"mean_logits": "logits/rejected"}, stats, inputs["labels"], slice(n, None))
        pool.log()
        return (loss, torch.stack([chosen, rejected], -1)) if return_outputs else loss


def _answers_only(align: AlignArgs) -> bool:
    """``align.disable_prompt_loss``: true, the NLL over the responses only; false (TRL's), prompt and response."""
    return align.disable_prompt_loss


def nll_labels(batch: dict[str, torch.Tensor], answers_only: bool = False) -> torch.Tensor:
    """(2B, T) the labels ORPO's NLL is over: every real token of each sequence (``attention_mask`` 1), prompt and
    response, as TRL's ORPOTrainer takes them; ``answers_only``: the responses' labels only."""
    if answers_only:
        return batch["labels"]
    labels = batch["labels"]
    return torch.where(
        labels != IGNORE_INDEX, labels, batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    )


def prepare_orpo(cfg: RunConfig, tok) -> Prepared:
    """DPO's data path (preference rows -> prompt + response with labels on the response) with the ORPO trainer."""
    from functools import partial

    from .dpo import prepare_dpo

    p = prepare_dpo(cfg, tok)
    notes = [n for n in p.notes if not n.startswith("DPO")]
    nll = "responses" if _answers_only(cfg.align) else "sequences (prompt and response, as TRL)"
    notes.append(f"ORPO: NLL of the chosen {nll} + {cfg.align.beta} x odds-ratio loss; no reference model")
    return dataclasses.replace(p, notes=notes, trainer_class=partial(ORPOTrainer, align=cfg.align))
