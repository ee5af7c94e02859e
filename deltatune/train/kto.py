"""Kahneman-Tversky Optimization (stage ``kto``; Ethayarajh et al. 2024, arXiv:2402.01306).

Unpaired data: each row is a prompt x, a completion y and a label saying whether y is desirable (preference rows
with chosen and rejected columns give one desirable and one undesirable row each). With
r(x, y) = log pi(y|x) - log ref(y|x) (log-probs summed over the completion's tokens; the reference is the same base
with the adapter switched off, no dropout) and the reference point

    z0 = max(0, mean over the batch of r(x_i, y'_i))     (mismatched pairs: the KL(pi || ref) estimate; no gradient)

(under DDP the mean of every process's mean, as TRL gathers it; the policy's forward of the mismatched pairs runs
under no_grad, as TRL's). y'_i is the completion of the row before, within
each training batch (shuffled rows: its mismatched completions are the batch's own); eval rows are read in order, and
each is paired, as TRL pairs it when preparing the data, with the row before in its block of ``train.batch_size``
rows (the block's first with its last), whatever ``train.eval_batch_size`` is. Each row's loss is a value function
of its
reward relative to z0:

    desirable:    lambda_D * (1 - sigmoid(beta * (r(x, y) - z0)))
    undesirable:  lambda_U * (1 - sigmoid(beta * (z0 - r(x, y))))

and the batch loss is the mean over rows. beta = ``align.beta``, lambda_D / lambda_U = ``align.desirable_weight`` /
``align.undesirable_weight``. The paper recommends lambda_D n_D / (lambda_U n_U) in [1, 4/3] (n_D, n_U the numbers of
desirable and undesirable rows); outside that range training goes on with a warning that says which desirable_weight
brings it in. The implicit reward beta * r is logged per label; eval reports its mean per label and the margin.

``align.loss_type: apo_zero_unpaired`` (TRL's; the unpaired APO-zero of D'Oosterlinck et al. 2024, arXiv:2408.06266)
drops the reference point: desirable lambda_D * (1 - sigmoid(beta * r)), undesirable lambda_U * sigmoid(beta * r), with
no mismatched pairs (no KL pass; ``kl`` logs 0) and so any train.batch_size.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..data.encode import _lead, encode_prompt_response
from ..data.load import DataError
from ..data.preference import cut_lm
from ..data.sample import unpaired_examples
from ..data.tasks import Collator
from ..data.templates import IGNORE_INDEX
from .config import AlignArgs, RunConfig
from .config_align import precomputes_ref
from .logprobs import reference_logprobs, router_aux_coef, sequence_logprobs
from .pairs import EvalStats, Pooled, SyncedRefCheckpoints, count_tokens, disable_dropout, synced_reference
from .prepared import Prepared, _note_truncated, read_splits
from .trainer import DeltaTrainer

_LM_KEYS = ("input_ids", "attention_mask", "labels")


def kl_reference_point(
    policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, gather: Callable | None = None
) -> torch.Tensor:
    """z0 = max(0, mean(log pi - log ref)) over mismatched (prompt, completion) pairs, detached (a scalar).

    ``gather``: with several processes, the all-gather of a (1,) tensor: z0 is then the mean of every process's
    mean, clamped after (as TRL gathers it), the same on every process; each process's own z0 clamped a negative
    mean of one process to 0 that the others' would have outweighed."""
    kl = (policy_kl_logps - ref_kl_logps).mean().detach()
    if gather is not None:
        kl = gather(kl.reshape(1)).mean()
    return kl.clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KTO losses and implicit rewards.

    Args:
        policy_logps: (B,) summed completion log-probs under the policy.
        ref_logps: (B,) the same under the reference.
        desirable: (B,) bool, True for desirable rows.
        kl: the reference point z0 (see ``kl_reference_point``).
        beta: temperature of the implicit reward.
        desirable_weight: lambda_D.
        undesirable_weight: lambda_U.
        loss_type: "kto", or "apo_zero_unpaired" (``kl`` unused: 1 - sigmoid(beta r) and sigmoid(beta r)).

    Returns:
        (losses (B,), rewards beta * (log pi - log ref) (B,), detached).
    """
    logratio = policy_logps - ref_logps
    if loss_type == "apo_zero_unpaired":
        kl = 0.0  # (its undesirable loss sigmoid(beta r) is KTO's 1 - sigmoid(beta (0 - r)))
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable.bool(), good, bad), beta * logratio.detach()


def _completion(e: dict[str, Any]) -> list[int]:
    """A row's completion for another row's mismatched pair: whole, as TRL's (cut after its new prompt)."""
    return e["completion_ids"] if "completion_ids" in e else e["input_ids"][e["n_prompt"] :]


def pair_in_blocks(rows: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """The rows, each with ``kl_completion``: the completion of the row before it within its block of ``size`` rows
    (the block's first row takes its last's), as TRL's KTOTrainer pairs a dataset in blocks of the train batch size
    when preparing it."""
    out = []
    for start in range(0, len(rows), size):
        block = rows[start : start + size]
        out += [{**e, "kl_completion": _completion(block[i - 1])} for i, e in enumerate(block)]
    return out


class KTOCollator:
    """B rows -> one batch of 2B sequences: the B (prompt, completion) rows, then the B mismatched pairs that
    estimate the reference point (prompt i with a row's ``kl_completion`` where it has one, else with completion
    i-1 of the batch); ``desirable`` (B,) holds the labels. A mismatched completion is cut to fit ``max_length``
    after its new prompt. ``kl=False`` (apo_zero_unpaired): the B rows alone."""

    def __init__(self, pad_token_id: int, max_length: int, kl: bool = True) -> None:
        self._pad, self.max_length, self.kl = Collator(pad_token_id), max_length, kl

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [{k: e[k] for k in _LM_KEYS} for e in examples]
        for i, e in enumerate(examples if self.kl else []):
            prompt = e["input_ids"][: e["n_prompt"]]
            completion = e["kl_completion"] if "kl_completion" in e else _completion(examples[i - 1])
            completion = completion[: max(0, self.max_length - len(prompt))]
            ids = prompt + completion
            seqs.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [IGNORE_INDEX] * len(prompt) + completion})  # fmt: skip
        batch = self._pad(seqs)
        batch["desirable"] = torch.tensor([bool(e["desirable"]) for e in examples])
        for key in ("ref_logp", "ref_kl_logp"):  # (the precomputed reference's, ``KTOTrainer._with_ref``)
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples])
        return batch


class KTOTrainer(SyncedRefCheckpoints, EvalStats, DeltaTrainer):
    """DeltaTrainer with the KTO loss against the adapter-disabled base. Logs ``kl`` (z0), the mean rewards,
    policy log-probs and logits (over the vocabulary and the completion tokens) of each label, their reward margin
    and the completions' ``entropy``, as TRL names them (``rewards/chosen``: the desirable rows);
    eval predictions are (B, 2) [reward, desirable]."""

    def __init__(self, *args, align: AlignArgs, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.align, self.router_coef = align, router_aux_coef(self.model)
        if align.disable_dropout:
            disable_dropout(self.model)
        self.ref_model = synced_reference(self, align, "kto")  # (TR-DPO's copy; None: the adapter-off base)
        if precomputes_ref(align) and self.train_dataset is not None:  # (deltatune eval builds one with no train data)
            size, given_size = self.args.per_device_train_batch_size, align.precompute_ref_batch_size
            self.train_dataset = self._with_ref(self._paired(self.train_dataset), given_size or size)
            if self.eval_dataset is not None:
                eval_size = given_size or self.args.per_device_eval_batch_size
                self.eval_dataset = self._with_ref(self._paired(self.eval_dataset), eval_size)

    def _paired(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows, each with its mismatched pair's completion fixed (``pair_in_blocks`` of the train batch size, as
        TRL's KTOTrainer pairs them), so that the pair's reference log-prob can be precomputed; apo_zero_unpaired
        (no pairs) and rows already paired (eval's) as they are."""
        if kto_loss_type(self.align) != "kto" or all("kl_completion" in e for e in rows):
            return rows
        return pair_in_blocks(rows, self.args.per_device_train_batch_size)

    @torch.no_grad()
    def _with_ref(self, rows: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
        """The rows with the reference's summed completion log-probs of each (``ref_logp``) and of its mismatched
        pair (``ref_kl_logp``, kto only) added, ``size`` rows per forward, adapter off, no dropout, under the run's
        autocast (as ``DPOTrainer._with_ref``); TRL's ``precompute_ref_log_probs`` (``ref_logps``, ``ref_KL_logps``)."""
        from tqdm.auto import tqdm

        model = self._delta_model()
        device, out = next(model.parameters()).device, []
        starts = tqdm(range(0, len(rows), size), desc="reference log-probs", disable=self.args.disable_tqdm)
        with self.accelerator.autocast():
            for i in starts:
                chunk = rows[i : i + size]
                batch = {k: v.to(device) for k, v in self.data_collator(chunk).items() if k in _LM_KEYS}
                ref = reference_logprobs(model, model, batch).tolist()
                for j, e in enumerate(chunk):
                    kl = {"ref_kl_logp": ref[len(chunk) + j]} if len(ref) > len(chunk) else {}
                    out.append({**e, "ref_logp": ref[j], **kl})
        return out

    def _losses(self, model, inputs, stats: dict | None = None, aux: list | None = None) -> tuple[torch.Tensor, ...]:
        lm, a = {k: inputs[k] for k in _LM_KEYS}, self.align
        n = len(inputs["desirable"])
        if "ref_logp" in inputs:  # (precomputed: align.precompute_ref_log_probs)
            ref = torch.cat([inputs["ref_logp"], inputs.get("ref_kl_logp", inputs["ref_logp"][:0])])
        else:
            ref = reference_logprobs(model, self._delta_model(), lm, ref_model=self.ref_model)
        rows, mismatched = _halves(lm, n)
        if kto_loss_type(a) == "apo_zero_unpaired":  # (TRL logs kl 0 for it)
            kl = torch.zeros((), device=ref.device)
        else:  # the mismatched pairs only set z0, which takes no gradient: their forward builds no graph (as TRL's)
            with torch.no_grad():
                policy_kl = sequence_logprobs(model, mismatched)
            gather = self.accelerator.gather if self.accelerator.num_processes > 1 else None
            kl = kl_reference_point(policy_kl, ref[n:], gather)
        policy = sequence_logprobs(model, rows, stats, aux=aux)
        losses, rewards = kto_loss(policy, ref[:n], inputs["desirable"], kl, a.beta, a.desirable_weight,
                                   a.undesirable_weight, kto_loss_type(a))  # fmt: skip
        return losses, rewards, kl, policy.detach()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        stats, aux = {}, [] if self.router_coef else None
        losses, rewards, kl, policy = self._losses(model, inputs, stats, aux)
        good = inputs["desirable"].bool()
        # TRL's names, training and evaluating (EvalStats: eval_kl, ...): chosen the desirable rows, rejected the
        # undesirable
        # (every process's rows and tokens under DDP, as TRL gathers them: the same collectives on every process)
        self.log_stat("kl", kl.item())
        labels, pool = inputs["labels"][: len(good)], Pooled(self)  # (the rows', as their stats)
        pool.tokens({"entropy": "entropy"}, stats, labels)
        for side, rows in (("chosen", good), ("rejected", ~good)):  # (logged where some process has such rows)
            pool.add(f"rewards/{side}", rewards[rows].sum(), rows.sum(), empty=None)
            pool.add(f"logps/{side}", policy[rows].sum(), rows.sum(), empty=None)
            pool.tokens({"mean_logits": f"logits/{side}"}, stats, labels, rows)
        loss = losses.mean()
        if aux:  # a Mixture-of-Experts model's load-balancing loss over the rows (not their mismatched pairs), as TRL
            loss = loss + self.router_coef * aux[0]
            pool.add("aux_loss", aux[0], 1)  # (the processes' mean under DDP, as TRL's gather_for_metrics(aux_loss))
        means = pool.values()
        self.log_stat("entropy", means["entropy"])
        count_tokens(self, inputs["attention_mask"][: len(good)], model.training)
        for side in ("chosen", "rejected"):
            if f"rewards/{side}" in means:
                for key in ("rewards", "logps", "logits"):
                    self.log_stat(f"{key}/{side}", means[f"{key}/{side}"])
        if "rewards/chosen" in means and "rewards/rejected" in means:
            self.log_stat("rewards/margins", means["rewards/chosen"] - means["rewards/rejected"])
        if aux:
            self.log_stat("aux_loss", means["aux_loss"])
        return (loss, torch.stack([rewards, good.float()], -1)) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), out.detach().float(), torch.zeros(out.shape[0], device=out.device)


def _halves(batch: dict[str, torch.Tensor], n: int) -> tuple[dict[str, torch.Tensor], ...]:
    """A ``KTOCollator`` batch's first ``n`` rows (the rows) and the rest (their mismatched pairs, if any)."""
    return {k: v[:n] for k, v in batch.items()}, {k: v[n:] for k, v in batch.items()}


def kto_loss_type(align: AlignArgs) -> str:
    """The KTO loss of ``align.loss_type``: apo_zero_unpaired, or kto (its default, the DPO default sigmoid)."""
    return "apo_zero_unpaired" if align.loss_type == "apo_zero_unpaired" else "kto"


def _metrics(p) -> dict[str, float]:
    out = np.asarray(p.predictions)  # (N, 2): [implicit reward, desirable]
    good = out[:, 1] > 0.5
    d = float(out[good, 0].mean()) if good.any() else 0.0
    u = float(out[~good, 0].mean()) if (~good).any() else 0.0
    # (and under TRL's eval names: rewards/chosen the desirable rows', rewards/rejected the undesirable rows')
    return {"reward_desirable": d, "reward_undesirable": u, "margin": d - u, "rewards/chosen": d,
            "rewards/rejected": u, "rewards/margins": d - u}  # fmt: skip


def balance_note(n_desirable: int, n_undesirable: int, align: AlignArgs, source: str) -> str | None:
    """A warning when lambda_D n_D / (lambda_U n_U) is outside the paper's [1, 4/3], naming the desirable_weight
    range that brings it in and the undesirable_weight range that does (TRL's KTOTrainer names both); None when
    inside. Data of one label (TRL's KTOTrainer trains it, its note counting max(n, 1)): a note that only that
    label's loss trains.

    Raises:
        ConfigError: data of one label whose weight is 0 (every row's loss weighted 0: nothing would train, as both
            weights 0 is refused).
    """
    from ..config import ConfigError

    if not (n_desirable or n_undesirable):  # (no rows: nothing to weigh)
        return None
    if not (n_desirable and n_undesirable):
        kind = "desirable" if n_desirable else "undesirable"
        if getattr(align, f"{kind}_weight") == 0:
            raise ConfigError(f"align.{kind}_weight is 0 and {source} has only {kind} rows "
                              f"({n_desirable + n_undesirable}): nothing would train")  # fmt: skip
        return (f"{source}: {n_desirable} desirable and {n_undesirable} undesirable rows: only the {kind} loss "
                "trains")  # fmt: skip
    for kind in ("desirable", "undesirable"):
        if getattr(align, f"{kind}_weight") == 0:
            return f"align.{kind}_weight is 0: the {kind} rows of {source} teach nothing"
    ratio = align.desirable_weight * n_desirable / (align.undesirable_weight * n_undesirable)
    if 1.0 <= ratio <= 4 / 3:
        return None
    low = align.undesirable_weight * n_undesirable / n_desirable
    high = align.desirable_weight * n_desirable / n_undesirable  # (the undesirable_weight that gives 1)
    return (
        f"{source}: {n_desirable} desirable and {n_undesirable} undesirable rows give lambda_D n_D / (lambda_U n_U) = "
        f"{ratio:.2f}, outside the recommended [1, 4/3]; align.desirable_weight in [{low:.3g}, {low * 4 / 3:.3g}] "
        f"brings it in, or align.undesirable_weight in [{high * 3 / 4:.3g}, {high:.3g}] (one of them, as TRL's "
        "KTOTrainer advises)"
    )


def _unpaired_in_order(samples: list) -> list[tuple[Any, tuple]]:
    """(sample, (prompt, completion, desirable)) of each row in TRL's order: its ``unpair_preference_dataset`` (a
    batched map of 1000 rows) gives each 1000 preference rows' chosen completions, then their rejected ones. So the
    mismatched neighbour (row i - 1) of a sequential batch, as eval reads them, holds another prompt's completion;
    interleaved, each rejected row's neighbour was its own prompt's chosen answer, a matched pair in z0."""
    out = []
    for start in range(0, len(samples), 1000):
        rows = [[(s, t) for t in unpaired_examples([s])] for s in samples[start : start + 1000]]
        out += [r[0] for r in rows] + [r[1] for r in rows if len(r) > 1]
    return out


def reference_named(cfg: RunConfig) -> str:
    """The report's words for a dpo / kto run's reference: the base with the adapter off, or the starting weights
    where the method trains the base's own weights in place (full, freeze, BitFit, LoRA biases; ``check_reference``
    then asks for them precomputed, or TR-DPO's copy)."""
    from ..config import DeltaConfig

    config, a = cfg.method_config(), cfg.align
    own = type(config).trainable_base_parameters is not DeltaConfig.trainable_base_parameters  # (LoRA's: its bias)
    if not (getattr(config, "bias", "none") not in ("none", None) if hasattr(config, "bias") else own):
        return "the base with the adapter off"
    if a.sync_ref_model:
        return (f"a copy of the starting weights, mixed in every {a.ref_model_sync_steps} steps with alpha "
                f"{a.ref_model_mixup_alpha} (TR-DPO)")  # fmt: skip
    return "the starting weights"


def prepare_kto(cfg: RunConfig, tok) -> Prepared:
    """Unpaired rows (prompt, completion, label) -> prompt + completion with labels on the completion.

    Raises:
        ConfigError: train.batch_size < 2 (the reference point needs mismatched pairs within a batch; an eval batch
            of one is fine: eval rows are paired in blocks of train.batch_size, as TRL pairs them), unless
            align.loss_type is apo_zero_unpaired (no reference point; TRL refuses it only where it computes one);
            training data of one label whose align.*_weight is 0 (``balance_note``: nothing would train).
        DataError: a bad row, or an eval file without both desirable and undesirable rows (training data of one
            label trains, as TRL's, with a warning).
    """
    from functools import partial

    from ..config import ConfigError

    d, kl = cfg.data, kto_loss_type(cfg.align) == "kto"
    if cfg.train.batch_size < 2 and kl:
        raise ConfigError(
            "stage kto needs train.batch_size >= 2 (its reference point comes from mismatched pairs within a batch), "
            f"got {cfg.train.batch_size}"
        )
    # Every data format with a prompt and labelled completions (or preference pairs, unpaired as TRL does) is read
    # through data/formats.py and rendered with the chat template, the loss on the completion's assistant tokens.
    train_samples, eval_samples, template, notes = read_splits(cfg, tok, "kto")

    def enc(samples: list, split: str) -> list[dict[str, Any]]:
        # As TRL 1.16's KTOTrainer: a row's first max_length tokens (its collator's cut), its whole completion the
        # mismatched pair's; a row whose prompt alone fills max_length, which TRL drops, keeps the prompt's end.
        out, truncated, fell_back = [], 0, 0
        for s, (prompt, completion, good) in _unpaired_in_order(samples):
            ex, _ = encode_prompt_response(prompt, completion, tok, template, 1 << 62, s.tools, s.template_kwargs)
            n_prompt = next((i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX), len(ex["labels"]))
            whole, cut = ex["input_ids"][n_prompt:], len(ex["input_ids"]) > d.max_length
            if cut and d.truncation == "refuse":
                raise DataError(f"{s.source}: longer than data.max_length={d.max_length} tokens "
                                "(set data.truncation=truncate to cut such rows)")  # fmt: skip
            if cut and n_prompt < d.max_length:
                ex = {k: v[: d.max_length] for k, v in ex.items()}
            elif cut:  # (encode_prompt_response's cut at max_length, of the encoding in hand: no second encoding)
                ex = cut_lm(ex, d.max_length, _lead(tok, template, ex))[0]
                fell_back += 1
            if all(lab == IGNORE_INDEX for lab in ex["labels"][1:]):
                raise DataError(f"{s.source}: no completion token within data.max_length={d.max_length}")
            truncated += cut
            n_prompt = next(i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX)
            out.append({**ex, "n_prompt": n_prompt, "desirable": good, "completion_ids": whole})
        _note_truncated(notes, split, truncated, d.max_length)
        if fell_back:
            notes.append(f"{fell_back} {split} rows have a prompt that alone fills data.max_length={d.max_length}, "
                         "which TRL's KTOTrainer drops: they keep the prompt's end and the completion's start")  # fmt: skip
        return out

    train = enc(train_samples, "train")
    ev = enc(eval_samples, "eval") if eval_samples else None
    ev = pair_in_blocks(ev, cfg.train.batch_size) if ev and kl else ev
    # (training data of one label trains, as TRL's KTOTrainer trains it, with balance_note's warning; eval's margin,
    # the desirable rows' mean reward less the undesirable rows', needs both)
    n_good = sum(e["desirable"] for e in ev or [])
    if ev and (n_good == 0 or n_good == len(ev)):
        raise DataError(
            f"{cfg.data.eval}: KTO needs both desirable and undesirable rows to evaluate (column {d.label_column!r}; "
            "its margin is the desirable rows' mean reward less the undesirable rows'); found "
            f"{n_good} desirable and {len(ev) - n_good} undesirable"
        )
    n_good = sum(e["desirable"] for e in train)
    warning = balance_note(n_good, len(train) - n_good, cfg.align, cfg.data.train)
    if warning:
        warnings.warn(warning, UserWarning, stacklevel=2)
        notes.append(warning)
    a = cfg.align
    blocks = f"blocks of train.batch_size={cfg.train.batch_size} rows"
    point = (f"reference point from mismatched pairs fixed in {blocks} of the data, train and eval, as TRL pairs them"
             if precomputes_ref(a) else f"reference point from mismatched pairs within each batch (eval: within "
             f"{blocks}, as TRL pairs them)")  # fmt: skip
    notes.append(
        f"KTO ({kto_loss_type(a)}): beta={a.beta}, lambda_D={a.desirable_weight}, lambda_U={a.undesirable_weight}; "
        f"reference = {reference_named(cfg)}{', log-probs precomputed once' if precomputes_ref(a) else ''}; "
        f"{point if kl else 'no reference point (apo_zero_unpaired)'}"
    )
    return Prepared(
        train,
        ev,
        KTOCollator(tok.pad_token_id, d.max_length, kl),
        _metrics,
        "eval_margin",
        notes=notes,
        trainer_class=partial(KTOTrainer, align=cfg.align),
    )
