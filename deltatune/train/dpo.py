"""Direct Preference Optimization (stage ``dpo``; Rafailov et al. 2023, arXiv:2305.18290).

With pi the policy (base + adapter) and ref the reference, and log-probs summed over the response tokens only
(prompt tokens are masked), a preference pair (chosen c, rejected r) gives

    h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))
    sigmoid:  loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label_smoothing; cDPO)
    ipo:      loss = (h_avg - 1 / (2 beta))^2                                    (Azar et al. 2023, arXiv:2310.12036)
    hinge:    loss = max(0, 1 - beta h)                                          (SLiC; Zhao et al. 2023)
    robust:   loss = (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)   (rDPO, 2403.00409)
    apo_zero: loss = 1 - sigmoid(beta hc) + sigmoid(beta hr), hc, hr the chosen and rejected log-ratios (2408.06266)

where IPO's h_avg is h with each response's log-ratio divided by its token count (per-token averages: the form the
IPO authors' results use, and TRL's; over sums the squared target would scale with response length). Every loss
equals TRL's ``DPOTrainer`` of the same ``loss_type`` (``tests/train/test_trl_losses.py``), and so do TRL 1.16's
others (exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_down, discopop, sft, sigmoid_norm: their
formulas in docs/training.md) and its weighted lists of loss types (``tests/train/test_dpo_losses7.py``).

The implicit rewards are beta (log pi - log ref) of each response. The reference is the same base model with the
adapter switched off (``DeltaModel.disable_adapter``) and no dropout, so it costs no second copy of the weights; with
``align.precompute_ref`` (TRL's name: ``precompute_ref_log_probs``) its log-probs are computed once before training
instead of at every step.
``align.sync_ref_model`` (TR-DPO, Gorbatovski et al. 2024, arXiv:2404.09656; TRL's keys): with a method that trains the
base in place the reference is a frozen copy of the starting policy, mixed toward it every ``ref_model_sync_steps``
steps by ``ref_model_mixup_alpha`` (``pairs.synced_reference``; refused with an adapter, as TRL refuses a PEFT model).
``align.ld_alpha`` (LD-DPO, Liu et al. 2024, arXiv:2409.06411; TRL's ld_alpha) weighs each pair's response tokens
beyond the shorter response's count by alpha in the summed log-probs of the policy and the reference (precomputed
too), so the longer response's verbose tail counts less; the sft loss keeps the plain sums, as TRL's.
``use_weighting`` (WPO, Zhou et al. 2024, arXiv:2406.11827; TRL's) multiplies each pair's loss by ``wpo_weights``.
At initialisation (adapter = identity) pi = ref, so h = 0 and the sigmoid loss is log 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.preference import PairCollator
from ..data.templates import IGNORE_INDEX
from .config import DPO_LOSS_TYPES, F_DIVERGENCE_LOSSES, F_DIVERGENCES, AlignArgs, RunConfig
from .config_align import precomputes_ref
from .logprobs import (
    model_token_logprobs,
    reference_logprobs,
    router_aux_coef,
    sequence_logprobs,
    summed,
)
from .pairs import (
    PairTrainer,
    Pooled,
    SyncedRefCheckpoints,
    count_tokens,
    disable_dropout,
    encode_pair_splits,
    pair_metrics,
    synced_reference,
)
from .prepared import Prepared

_LM_KEYS = ("input_ids", "attention_mask", "labels")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    loss_weights: Sequence[float] | None = None,
    discopop_tau: float = 0.05,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    sft_chosen: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards.

    Args:
        policy_chosen: (B,) summed response log-probs of the chosen responses under the policy.
        policy_rejected: (B,) the same for the rejected responses.
        ref_chosen: (B,) chosen log-probs under the reference.
        ref_rejected: (B,) rejected log-probs under the reference.
        beta: the temperature of the implicit reward.
        loss_type: one of ``DPO_LOSS_TYPES`` (module docstring), or a list of them: the sum of their losses
            weighted by ``loss_weights`` (TRL's multi-loss, e.g. MPO's sigmoid, bco_pair, sft).
        label_smoothing: assumed probability that a preference label is flipped (sigmoid, robust, exo_pair, aot,
            aot_unpaired).
        chosen_tokens: (B,) response token counts of the chosen responses (ipo, sigmoid_norm, sft).
        rejected_tokens: (B,) the same for the rejected responses.
        loss_weights: one weight per loss type (default 1 each).
        discopop_tau: the temperature of DiscoPOP's mixing coefficient.
        f_divergence: f-DPO's divergence (Wang et al. 2023, arXiv:2309.16240): reverse_kl (DPO's), forward_kl,
            js_divergence or alpha_divergence (of ``f_alpha``); it replaces each log-ratio u by f'(exp u) in the
            losses of ``F_DIVERGENCE_LOSSES``, as TRL's ``f_divergence_type``.
        f_alpha: the alpha of alpha_divergence.
        sft_chosen: (B,) the chosen responses' plain summed log-probs for the sft loss, where ``policy_chosen`` holds
            LD-DPO's weighted ones (default: ``policy_chosen``).
        weights: (B,) WPO's pair weights (``wpo_weights``) multiplying each pair's loss; None: unweighted.

    Returns:
        (losses (B,), chosen rewards (B,), rejected rewards (B,)); the rewards are detached.

    Raises:
        ValueError: an unknown loss_type, or a per-token loss without the token counts.
    """
    kinds = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    loss_w = [1.0] * len(kinds) if loss_weights is None else list(loss_weights)
    if len(loss_w) != len(kinds):
        raise ValueError(f"loss_weights has {len(loss_w)} weights for {len(kinds)} loss types")
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if f_divergence != "reverse_kl" and set(kinds) - set(F_DIVERGENCE_LOSSES):
        raise ValueError(f"f_divergence {f_divergence} is for the {', '.join(F_DIVERGENCE_LOSSES)} losses only")
    scores = _f_scores(chosen, f_divergence, f_alpha), _f_scores(rejected, f_divergence, f_alpha)
    pairs = (policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, *scores)
    sft = pairs if sft_chosen is None else (sft_chosen, *pairs[1:])
    losses = sum(w * _losses_of(k, *(sft if k == "sft" else pairs), beta, label_smoothing, discopop_tau)
                 for k, w in zip(kinds, loss_w))  # fmt: skip
    if weights is not None:
        losses = losses * weights
    return losses, beta * chosen.detach(), beta * rejected.detach()


def wpo_weights(per_token: torch.Tensor, labels: torch.Tensor, log_sum_sq_probs: torch.Tensor) -> torch.Tensor:
    """WPO's pair weights (Zhou et al. 2024, arXiv:2406.11827, eq. 2; TRL's ``use_weighting``), no gradient: each
    response's exp(mean over its tokens of log p(y_t) - log sum_v p_v^2) (how likely the policy's own sampling, sharpened
    by sum_v p_v^2, makes it, per token), the chosen response's times the rejected one's.

    Args:
        per_token: (2B, T - 1) ``token_logprobs`` of B chosen then B rejected responses under the policy.
        labels: (2B, T) their labels (-100 outside the responses).
        log_sum_sq_probs: (2B, T - 1) log sum_v p_v^2 at each position (``token_logprobs``' stats).

    Returns:
        (B,) the weights.
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    mean = ((per_token.detach() - log_sum_sq_probs) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    chosen, rejected = mean.exp().chunk(2)
    return chosen * rejected


def _f_scores(u: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f'(exp u) of the log-ratios u, as TRL's DPOTrainer computes it (alpha's exponent clamped as there)."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return u
    if kind == "forward_kl":
        return 1 - torch.exp(-u)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(u)
    if kind == "alpha_divergence":
        clamp = {torch.float16: 11.0, torch.bfloat16: 80.0}.get(u.dtype, 80.0)
        return (torch.exp(torch.clamp(((alpha - 1.0) * u).float(), max=clamp)) - 1.0).to(u.dtype) / (alpha - 1.0)
    raise ValueError(f"f_divergence must be one of {', '.join(F_DIVERGENCES)}, got {kind!r}")


def _losses_of(kind, pc, pr, rc, rr, nc, nr, sc, sr, beta, eps, tau) -> torch.Tensor:
    """One loss type's per-pair losses, as TRL 1.16's DPOTrainer computes them; sc, sr: the f-DPO scores of the
    chosen and rejected log-ratios (the log-ratios themselves under reverse_kl)."""
    chosen, rejected = pc - rc, pr - rr
    h = sc - sr

    def smoothed(x):  # cDPO's form (Mitchell 2023): eps of the labels flipped
        return -(1 - eps) * F.logsigmoid(beta * x) - eps * F.logsigmoid(-beta * x)

    if kind in ("ipo", "sigmoid_norm", "sft") and (nc is None or nr is None):
        raise ValueError(f"the {kind} loss takes per-token means: pass chosen_tokens and rejected_tokens")
    if kind == "sigmoid":
        return smoothed(h)
    if kind == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if kind == "hinge":
        return torch.relu(1 - beta * h)
    if kind == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)
    if kind == "apo_down":
        return torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))
    if kind in ("ipo", "sigmoid_norm"):
        h_avg = sc / nc.clamp(min=1) - sr / nr.clamp(min=1)
        return (h_avg - 1 / (2 * beta)) ** 2 if kind == "ipo" else -F.logsigmoid(beta * h_avg)
    if kind == "exo_pair":  # KL(softmax(beta [hc, hr]) || [1 - eps, eps]) (Ji et al. 2024, eq. 16)
        e, q, q_r = torch.tensor(eps, device=h.device), torch.sigmoid(beta * h), torch.sigmoid(-beta * h)
        return q * (F.logsigmoid(beta * h) - torch.log1p(-e)) + q_r * (F.logsigmoid(-beta * h) - torch.log(e))
    if kind == "nca_pair":
        return -F.logsigmoid(beta * chosen) - 0.5 * F.logsigmoid(-beta * chosen) - 0.5 * F.logsigmoid(-beta * rejected)
    if kind == "bco_pair":
        return -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)
    if kind == "sppo_hard":  # SPPO with hard preference probabilities 1 and 0
        return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    if kind == "aot":  # the batch's policy margins against its reference margins, each sorted
        return smoothed(torch.sort(pc - pr, dim=0)[0] - torch.sort(rc - rr, dim=0)[0])
    if kind == "aot_unpaired":  # the batch's chosen log-ratios against its rejected ones, each sorted
        return smoothed(torch.sort(chosen, dim=0)[0] - torch.sort(rejected, dim=0)[0])
    if kind == "discopop":  # logistic and exponential losses mixed by sigmoid(beta h / tau)
        m = torch.sigmoid(beta * h / tau)
        return -F.logsigmoid(beta * h) * (1 - m) + torch.exp(-beta * h) * m
    if kind == "sft":  # the chosen responses' mean token NLL over the batch, the same for every pair
        return (-pc.sum() / nc.sum().clamp(min=1)).expand(len(pc))
    raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {kind!r}")


class DPOTrainer(SyncedRefCheckpoints, PairTrainer):
    """PairTrainer with the DPO loss against the adapter-disabled base.

    Logs ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
    ``logps/rejected``, ``logits/chosen``, ``logits/rejected`` (the mean logit over the vocabulary, over each side's
    response tokens), ``entropy`` and ``mean_token_accuracy`` (means since the last log, as TRL's DPOTrainer) with the
    loss. Eval predictions are (B, 2) [chosen reward, rejected reward].
    """

    def __init__(self, *args, align: AlignArgs, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.align = align
        if align.disable_dropout:  # (before the precomputed reference: TRL's order)
            disable_dropout(self.model)
        self.wpo, self.router_coef = _use_weighting(align), router_aux_coef(self.model)
        self.ref_model = synced_reference(self, align, "dpo")  # (TR-DPO's copy; None: the adapter-off base)
        if _precompute(align) and self.train_dataset is not None:  # (deltatune eval builds one with no train data)
            given = align.precompute_ref_batch_size  # (else each split's batch size, as TRL's)
            self.train_dataset = self._with_ref(self.train_dataset, given or self.args.per_device_train_batch_size)
            if self.eval_dataset is not None:
                self.eval_dataset = self._with_ref(self.eval_dataset, given or self.args.per_device_eval_batch_size)

    @torch.no_grad()
    def _with_ref(self, examples: list[dict], size: int) -> list[dict]:
        """The examples with the reference's summed log-probs of both responses added (one pass, adapter off, ``size``
        pairs per forward), under the run's autocast: the policy's forwards run in it, and an fp32 reference would start
        the implicit rewards off zero by the rounding of bf16."""
        from tqdm.auto import tqdm

        model = self._delta_model()
        was_training = model.training
        model.eval()  # no dropout in the reference
        device = next(model.parameters()).device
        out = []
        starts = tqdm(range(0, len(examples), size), desc="reference log-probs", disable=self.args.disable_tqdm)
        with model.disable_adapter(), self.accelerator.autocast():
            for i in starts:
                chunk = examples[i : i + size]
                batch = {k: v.to(device) for k, v in self.data_collator(chunk).items() if k in _LM_KEYS}
                ref_c, ref_r = sequence_logprobs(model, batch, ld_alpha=self.align.ld_alpha).chunk(2)
                for ex, c, r in zip(chunk, ref_c.tolist(), ref_r.tolist()):
                    out.append({**ex, "ref_chosen_logp": c, "ref_rejected_logp": r})
        model.train(was_training)
        return out

    def _losses(self, model, inputs, stats: dict | None = None, aux: list | None = None) -> tuple[torch.Tensor, ...]:
        lm, a = {k: inputs[k] for k in _LM_KEYS}, self.align
        stats = {} if stats is None and self.wpo else stats
        per_token = model_token_logprobs(model, lm, stats, aux)
        logps, counts = summed(per_token, lm["labels"], a.ld_alpha), (lm["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
        (policy_c, policy_r), (n_c, n_r) = logps.chunk(2), counts.chunk(2)
        if "ref_chosen_logp" in inputs:
            ref_c, ref_r = inputs["ref_chosen_logp"], inputs["ref_rejected_logp"]
        else:
            ref_c, ref_r = reference_logprobs(model, self._delta_model(), lm, a.ld_alpha, self.ref_model).chunk(2)
        plain = per_token[: len(policy_c)].sum(-1) if a.ld_alpha is not None else None
        losses, chosen, rejected = dpo_loss(policy_c, policy_r, ref_c, ref_r, a.beta, a.loss_type, a.label_smoothing,
                                            n_c, n_r, a.loss_weights, a.discopop_tau, a.f_divergence_type,
                                            a.f_alpha_divergence_coef, plain,
                                            wpo_weights(per_token, lm["labels"], stats["log_sum_sq_probs"])
                                            if self.wpo else None)  # fmt: skip
        return losses, chosen, rejected, logps.detach()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        stats, aux = {}, [] if self.router_coef else None
        losses, chosen, rejected, logps = self._losses(model, inputs, stats, aux)
        # as TRL, training and evaluating (EvalStats: eval_logps/chosen, ...): the rewards, the policy's summed
        # log-probs of each side and its token stats
        # (every process's pairs and tokens under DDP, as TRL gathers them)
        pool, labels, n = Pooled(self), inputs["labels"], len(chosen)
        self.log_rewards(chosen, rejected, pool)
        pool.mean("logps/chosen", logps[:n])
        pool.mean("logps/rejected", logps[n:])
        pool.tokens({"mean_logits": "logits/chosen"}, stats, labels, slice(0, n))
        pool.tokens({"mean_logits": "logits/rejected"}, stats, labels, slice(n, None))
        pool.tokens({"entropy": "entropy"}, stats, labels)
        pool.tokens({"top1": "mean_token_accuracy"}, stats, labels, slice(0, n))  # (of the chosen responses' tokens)
        loss = self.pair_mean(losses, model)
        if aux:  # a Mixture-of-Experts model's load-balancing loss over the step's sequences, as TRL adds it
            loss = loss + self.router_coef * aux[0]
            pool.add("aux_loss", aux[0], 1)  # (the processes' mean under DDP, as TRL's gather_for_metrics(aux_loss))
        pool.log()
        count_tokens(self, inputs["attention_mask"], model.training)
        return (loss, torch.stack([chosen, rejected], -1)) if return_outputs else loss


def _precompute(align: AlignArgs) -> bool:
    """Whether the reference log-probs are computed once (``config_align.precomputes_ref``: check_reference reads
    the same)."""
    return precomputes_ref(align)


def _use_weighting(align: AlignArgs) -> bool:
    """Whether ``align.use_weighting`` (WPO) is on; refused with aot and aot_unpaired, as TRL refuses them (they sort
    the batch's pairs, so a pair's weight would meet another pair's loss)."""
    from ..config import ConfigError

    on = align.use_weighting
    kinds = {align.loss_type} if isinstance(align.loss_type, str) else set(align.loss_type)
    if on and kinds & {"aot", "aot_unpaired"}:
        raise ConfigError("align.use_weighting (WPO) does not apply to align.loss_type aot or aot_unpaired: they sort "
                          "the batch's pairs, which would misalign the per-pair weights (TRL refuses it too)")  # fmt: skip
    return on


def _metrics(p) -> dict[str, float]:
    """The eval metrics of dpo, orpo and simpo: ``pair_metrics``, the mean rewards, and the same under TRL's eval
    names (``eval_rewards/chosen``, ``/rejected``, ``/margins``, ``/accuracies``: over all the eval pairs, where TRL
    averages its batches' means)."""
    rewards = np.asarray(p.predictions)  # (N, 2): implicit rewards of [chosen, rejected]
    chosen, rejected = float(rewards[:, 0].mean()), float(rewards[:, 1].mean())
    return {
        **pair_metrics(rewards),
        "reward_chosen": chosen,
        "reward_rejected": rejected,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": float((rewards[:, 0] - rewards[:, 1]).mean()),
        "rewards/accuracies": float((rewards[:, 0] > rewards[:, 1]).mean()),
    }


def prepare_dpo(cfg: RunConfig, tok) -> Prepared:
    """Preference rows -> (prompt + response, labels on the response) for chosen and rejected."""
    from functools import partial

    from ..data.load import DataError

    d = cfg.data
    train, ev, notes = encode_pair_splits(cfg, tok, causal=True)
    for split, e in (("train", train), ("eval", ev)):
        for ex in e.examples if e else []:
            if all(lab == -100 for lab in ex["chosen"]["labels"][1:]) or all(
                lab == -100 for lab in ex["rejected"]["labels"][1:]
            ):
                raise DataError(f"a {split} pair has no response token within data.max_length={d.max_length}")
    from .kto import reference_named

    a = cfg.align
    wpo = _use_weighting(a)
    notes.append(
        f"DPO loss {a.loss_type if isinstance(a.loss_type, str) else ' + '.join(a.loss_type)} with beta={a.beta}"
        + (f", label_smoothing={a.label_smoothing}" if a.label_smoothing else "")
        + f"; reference = {reference_named(cfg)}"
        + (", log-probs precomputed once" if _precompute(a) else "")
        + (f"; LD-DPO ld_alpha={a.ld_alpha}" if a.ld_alpha is not None else "")
        + ("; WPO weighting" if wpo else "")
    )
    return Prepared(
        train.examples,
        ev.examples if ev else None,
        PairCollator(tok.pad_token_id),
        _metrics,
        "eval_accuracy",
        notes=notes,
        trainer_class=partial(DPOTrainer, align=cfg.align),
    )
