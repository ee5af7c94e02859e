"""What the preference-pair stages share (rm, dpo, orpo, simpo): pairs encoded with the chat template, the
trainer base whose eval predictions are (chosen, rejected) scores, and the pairwise metrics."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch
from transformers import TrainerCallback

from ..data.tasks import Encoded
from ..data.templates import IGNORE_INDEX
from .config import RunConfig
from .prepared import _note_truncated, read_splits
from .trainer import DeltaTrainer


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the chance of a split at least as uneven as wins:losses if each non-tied pair
    were a fair coin (ties are left out, as the test does). 1.0 when there is no non-tied pair."""
    n, k = wins + losses, min(wins, losses)
    term = tail = 1  # C(n, 0); then C(n, i) from C(n, i - 1), exact in integers
    for i in range(1, k + 1):
        term = term * (n - i + 1) // i
        tail += term
    return min(1.0, 2 * tail / 2**n)


def paired_change(start: np.ndarray, now: np.ndarray) -> dict[str, int | float]:
    """How the same pairs' ranking changed between two evaluations, from their (N, 2) scores: ``gained`` (pairs won
    now and not at the start), ``lost`` (the reverse) and ``paired_p``, the exact McNemar test: the sign test over
    the pairs whose outcome changed. The accuracy changes by exactly (gained - lost) / N, and the test is of that
    change with each pair its own control: much tighter than two unpaired accuracies when the two evaluations
    agree on most pairs, about as tight when they do not."""
    won_start, won_now = start[:, 0] > start[:, 1], now[:, 0] > now[:, 1]
    gained, lost = int((won_now & ~won_start).sum()), int((won_start & ~won_now).sum())
    return {"gained": gained, "lost": lost, "paired_p": sign_test(gained, lost)}


def pair_metrics(scores: np.ndarray) -> dict[str, float]:
    """Pairwise metrics from (N, 2) [chosen, rejected] scores: accuracy (strictly r_chosen > r_rejected, so a tie
    is not a win), the mean margin and its standard error, and the sign test's p-value of wins against losses
    (whether the ranking beats a coin on these pairs)."""
    margin = scores[:, 0] - scores[:, 1]
    n = len(margin)
    return {
        "accuracy": float((margin > 0).mean()),
        "margin": float(margin.mean()),
        "margin_se": float(margin.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "sign_p": sign_test(int((margin > 0).sum()), int((margin < 0).sum())),
    }


def gather_stats(stats: dict[str, list[float]], accelerator) -> dict[str, list[float]]:
    """Every process's per-batch values of ``stats`` (rank 0's first), as TRL gathers each batch's statistics across
    the processes before its mean: each process averaging its own batches reported a different ``eval_logps/chosen``
    on each, and a metric_for_best_model naming one could keep a different best checkpoint on each. Every process
    must call it (``gather_object``: a collective)."""
    if accelerator.num_processes <= 1:
        return stats
    from accelerate.utils import gather_object

    merged: dict[str, list[float]] = {}
    for part in gather_object([stats]):
        for key, values in part.items():
            merged.setdefault(key, []).extend(values)
    return merged


class EvalStats:
    """A trainer mixin (before DeltaTrainer): what ``log_stat`` gets while evaluating is the evaluation's own, each
    added to its metrics as ``<prefix>_<name>`` (the mean of its batches' values, every process's: ``gather_stats``),
    as TRL's DPO, KTO, CPO and ORPO trainers report ``eval_logps/chosen``, ``eval_logits/chosen``, ``eval_entropy``
    and the rest of their training log's names; a name the metrics already hold (``eval_rewards/*`` of
    ``compute_metrics``, over all the pairs) keeps that value. The training log's means are not touched."""

    _eval_stats: dict[str, list[float]] | None = None

    def log_stat(self, key: str, value: float) -> None:
        if self._eval_stats is None:
            super().log_stat(key, value)
        else:
            self._eval_stats.setdefault(key, []).append(float(value))

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._eval_stats = {}
        try:
            out = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            for key, values in gather_stats(self._eval_stats, self.accelerator).items():
                out.metrics.setdefault(f"{metric_key_prefix}_{key}", sum(values) / len(values))
        finally:
            self._eval_stats = None
        return out


class PairTrainer(EvalStats, DeltaTrainer):
    """DeltaTrainer for preference pairs (rm, dpo): ``compute_loss(..., return_outputs=True)`` gives
    (loss, (B, 2) [chosen, rejected] scores), and those scores are the eval predictions (labels are dummies).

    The scores of an evaluation before the first step (``train.eval_on_start``) are kept, and every later
    evaluation of the same rows adds ``paired_change`` against them (``eval_gained``, ``eval_lost``,
    ``eval_paired_p``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start_scores: dict[str, np.ndarray] = {}
        """metric prefix -> the (N, 2) scores of an evaluation before the first step (``deltatune eval --compare``
        gives a trainer of the trained adapter those of the run's start)."""

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        out = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if out.predictions is None:
            return out
        scores, start = np.asarray(out.predictions), self.start_scores.get(metric_key_prefix)
        if self.state.global_step == 0:
            self.start_scores[metric_key_prefix] = scores
            self._keep_start_scores()
        elif start is None:  # a resumed run: its start's, kept in the run folder (a fresh run's folder has none)
            start = self._kept_start_scores().get(metric_key_prefix)
            if start is not None:
                self.start_scores[metric_key_prefix] = start
        if self.state.global_step and start is not None and start.shape == scores.shape:
            change = paired_change(start, scores)
            out.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in change.items()})
        return out

    START_SCORES = "eval_start_scores.npz"
    """The run folder's copy of ``start_scores``: a --resume'd run pairs its evaluations with them (they were kept in
    memory only, so a resumed run's evaluations lacked gained/lost/paired_p, and a metric_for_best_model naming one
    failed at its first evaluation)."""

    def _keep_start_scores(self) -> None:
        if not self.args.eval_on_start or not self.is_world_process_zero():  # (deltatune eval: no eval_on_start)
            return
        from ..files import atomic_write

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # (a file, not its name: np.savez would add .npz to the name)
                np.savez(fh, **self.start_scores)

        atomic_write(os.path.join(self.args.output_dir, self.START_SCORES), write)

    def _kept_start_scores(self) -> dict[str, np.ndarray]:
        path = os.path.join(self.args.output_dir, self.START_SCORES)
        if not os.path.isfile(path):
            return {}
        with np.load(path) as kept:
            return {k: kept[k] for k in kept.files}

    _step_pairs: torch.Tensor | None = None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches (and the Trainer's item count), counting the step's pairs on every process
        for ``pair_mean``."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        pairs = torch.tensor(sum(len(b["input_ids"]) // 2 for b in batches), device=device)
        self._step_pairs = self.accelerator.gather(pairs).sum() if self.accelerator.num_processes > 1 else pairs
        return batches, num_items

    def pair_mean(self, losses: torch.Tensor, model) -> torch.Tensor:
        """The mean of a micro-batch's per-pair losses while evaluating; while training, their sum over the pairs
        of the whole step (every micro-batch, every process), taken back against the Trainer's division by the
        accumulation steps and DDP's averaging. Equal micro-batches get their mean either way; an epoch's last
        step, cut unequally, weighs every pair alike (a mean per micro-batch weighed a pair of a short one more)."""
        if not model.training or self._step_pairs is None or not int(self._step_pairs):
            return losses.mean()
        times = self.current_gradient_accumulation_steps * self.accelerator.num_processes
        return losses.sum() * times / self._step_pairs

    def log_rewards(self, chosen: torch.Tensor, rejected: torch.Tensor, pool: Pooled) -> None:
        """Add to ``pool`` the means of the chosen and rejected rewards, their margin, and how often chosen wins
        (TRL's names), over every process's pairs under DDP, as TRL gathers them."""
        pool.mean("rewards/chosen", chosen)
        pool.mean("rewards/rejected", rejected)
        pool.mean("rewards/margins", chosen - rejected)
        pool.mean("rewards/accuracies", (chosen > rejected).float())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, scores = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), scores.detach().float(), torch.zeros(scores.shape[0], device=scores.device)


def every_process(trainer) -> Callable | None:
    """The all-gather of a tensor over the processes (concatenated in rank order) under DDP, else None. TRL's
    preference trainers gather each micro-batch's rewards, log-probs and token sums before taking the logged means;
    without it, the log would show only rank 0's pairs. A collective: every process must call it, in the same order.
    """
    return trainer.accelerator.gather if trainer.accelerator.num_processes > 1 else None


class Pooled:
    """The means a trainer logs for one micro-batch, gathered together: under DDP each is a sum over every process's
    rows divided by their count, all the sums and counts in one all-gather of a (1, k) tensor (k the same on every
    process, whatever its batch size; TRL gathers the same statistics, each on its own, and averages the processes'
    own means where these pool tokens and pairs: equal for equal batches and token counts); in a single process each is
    computed as the trainer always did (``single``), so the numbers logged there are unchanged. ``log`` logs them."""

    def __init__(self, trainer) -> None:
        self.trainer, self.gather = trainer, every_process(trainer)
        self.items: list[tuple] = []  # (key, value or None) in one process, (key, index of the sum, empty) under DDP
        self.sums: list[torch.Tensor] = []

    def add(self, key: str, total: torch.Tensor, count, single: Callable | None = None, empty: float | None = 0.0):
        """``key`` the mean ``total`` / ``count``; ``empty`` where count is 0 (None: not logged); ``single()``: the
        single process's value (default total / count as Python floats)."""
        if self.gather is None:
            if single is not None:
                self.items.append((key, single()))
            else:
                n = float(count)
                self.items.append((key, float(total) / n if n else empty))
            return
        self.items.append((key, len(self.sums), empty))
        self.sums += [
            total.detach().float().reshape(()),
            torch.as_tensor(count, device=total.device).float().reshape(()),
        ]

    def mean(self, key: str, values: torch.Tensor) -> None:
        """``key`` the mean of the per-row ``values``."""
        self.add(key, values.sum(), values.numel(), lambda: values.mean().item())

    def tokens(self, names: dict[str, str], stats: dict, labels: torch.Tensor, rows=slice(None), empty=0.0) -> None:
        """For each ``names`` stat -> key: the mean of ``stats`` (``logprobs.token_logprobs``) over the label tokens
        of ``rows`` (all of them pooled, as TRL pools its logits/*, entropy and mean_token_accuracy)."""
        mask = (labels[:, 1:] != IGNORE_INDEX)[rows].float()
        for stat, key in names.items():
            self.add(key, (stats[stat][rows] * mask).sum(), mask.sum(), empty=empty)

    def values(self) -> dict[str, float]:
        """The means, those not ``empty`` None (one collective under DDP: every process calls it alike)."""
        if self.gather is None:
            out = dict(self.items)
        else:
            sums = self.gather(torch.stack(self.sums)[None]).sum(0).tolist() if self.sums else []
            out = {key: sums[i] / sums[i + 1] if sums[i + 1] else empty for key, i, empty in self.items}
        self.items, self.sums = [], []
        return {key: value for key, value in out.items() if value is not None}

    def log(self) -> None:
        """Log the means (``values``)."""
        for key, value in self.values().items():
            self.trainer.log_stat(key, value)


def disable_dropout(model: torch.nn.Module) -> None:
    """Every ``nn.Dropout`` of ``model`` set to p = 0 (the adapter's own, LoRA's lora_dropout, included): the policy's
    forwards then match its reference's, which runs without dropout. As TRL's ``disable_dropout_in_model``, which its
    DPO, KTO, CPO and ORPO trainers apply by default (``disable_dropout=True``); a model's functional dropout (the
    attention's ``attention_dropout``) is left as TRL leaves it. ``align.disable_dropout`` turns it on (the default)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def count_tokens(trainer: DeltaTrainer, attention_mask: torch.Tensor, training: bool = True) -> None:
    """TRL's ``num_tokens`` (its DPO and KTO trainers): the training tokens seen so far, every process's (the real
    ones of ``attention_mask``, a training micro-batch's), logged as the latest total rather than a mean. While
    evaluating (``training`` false) nothing is counted: the evaluation reports the total so far (``EvalStats``), as
    TRL's ``eval_num_tokens``. The total is the trainer's, not the checkpoint's: a --resume'd run counts again from 0,
    as TRL's (its ``_total_train_tokens`` is not saved either); ``deltatune eval`` reports none (``evaluation``)."""
    if not training:
        trainer.log_stat("num_tokens", float(getattr(trainer, "train_tokens", 0)))
        return
    n = attention_mask.sum()
    if trainer.accelerator.num_processes > 1:
        n = trainer.accelerator.gather(n.reshape(1)).sum()
    trainer.train_tokens = getattr(trainer, "train_tokens", 0) + int(n)
    trainer._stats["num_tokens"] = [float(trainer.train_tokens)]


def encode_pair_splits(
    cfg: RunConfig, tok, causal: bool, pair_scorer: bool = False, extra: dict | None = None
) -> tuple[Encoded, Encoded | None, list[str]]:
    """The train and (optional) eval preference rows (any preference format, ``formats.read_samples``) rendered
    with the chat template and encoded (``encode.encode_pair_samples``), and the report notes (format, first rows
    as rendered, pairs skipped under data.bad_pairs=skip, rows truncated). ``extra``: split -> {column: {file:line:
    value}} (or None), a number per row added to each of its pairs under that column name."""
    from ..data.encode import _lead, encode_pair_samples
    from ..data.preference import cut_lm

    d = cfg.data
    train_s, eval_s, template, notes = read_splits(cfg, tok, pair_scorer=pair_scorer)

    # The causal stages (dpo, orpo, simpo, cpo) keep each side's first max_length tokens, as TRL's DPOTrainer (its
    # default keep_start) and its CPO and ORPO trainers (the prompt whole, the answer cut) do; dpo splits the two
    # sides at their shared prompt first, as TRL's DPOTrainer; ORPO's and CPO's split each side at its own.
    dpo, fell_back = cfg.stage == "dpo", {}

    def enc(samples, split: str) -> Encoded:
        # (causal: whole, so that the cut keeps the start; dpo: both sides split at the shared prompt before the cut)
        out = encode_pair_samples(
            samples, tok, template, _WHOLE if causal else d.max_length, d.truncation, causal, dpo
        )
        for column, values in ((extra or {}).get(split) or {}).items():
            for s, ex in zip(samples, out.examples, strict=True):
                ex[column] = values[s.source]
        if not causal:
            return out
        if not dpo and cfg.align.answer_eos:  # orpo, simpo, cpo: TRL's CPO and ORPO trainers end answers with EOS
            _end_with_eos(out.examples, tok.eos_token_id)

        def end_kept(s, whole: dict) -> dict:  # (the cut of the other stages: the prompt's end, each answer's start)
            # dpo: the whole pair is already split at the shared prompt, so its cut is encode_pair_samples' at
            # max_length without encoding the pair again (a third of hh_rlhf's encoding time went to that)
            lead = _lead if dpo else _bos_lead
            return {
                k: cut_lm(whole[k], d.max_length, lead(tok, template, whole[k]))[0] for k in ("chosen", "rejected")
            }

        out, fell_back[split] = keep_start(samples, out, d.max_length, d.truncation, end_kept)
        return out

    train = enc(train_s, "train")
    ev = enc(eval_s, "eval") if eval_s else None
    for split, e in (("train", train), ("eval", ev)):
        _note_truncated(notes, split, e.truncated if e else 0, d.max_length)
        if fell_back.get(split):
            notes.append(f"{fell_back[split]} {split} pairs have a prompt that alone fills data.max_length="
                         f"{d.max_length}, which TRL drops (DPO) or trains with an empty answer (ORPO, CPO): they keep "
                         "the prompt's end and the answers' start")  # fmt: skip
    return train, ev, notes


_WHOLE = 1 << 62  # a max_length that cuts nothing


def _end_with_eos(examples: list[dict], eos: int | None) -> None:
    """Each side of each pair, encoded whole, given a trained EOS after its last token unless that is EOS already, as
    TRL 1.16's CPO and ORPO trainers tokenize (``add_eos_token_if_needed``, before their cut): a chat template that
    ends the turn with another token (ChatML's ``<|im_end|>`` then a newline) gets one more EOS there."""
    if eos is None:
        return
    for ex in examples:
        for side in (ex["chosen"], ex["rejected"]):
            if not side["input_ids"] or side["input_ids"][-1] != eos:
                side["input_ids"].append(eos)
                side["attention_mask"].append(1)
                side["labels"].append(eos)


def _bos_lead(tok, template: str | None, side: dict[str, list[int]]) -> int:
    """How many leading tokens a cut of an orpo / simpo / cpo side keeps: the BOS ``encode_lm`` put before a raw row
    (``own_specials=False``, as TRL's CPO and ORPO trainers), none through a chat template (``encode._lm``'s)."""
    from ..data.encode import RAW

    bos = tok.bos_token_id
    return int(
        template == RAW and bos is not None and side["input_ids"][:1] == [bos] and side["labels"][:1] == [IGNORE_INDEX]
    )


def keep_start(samples, encoded: Encoded, max_length: int, truncation: str, end_kept: Callable) -> tuple[Encoded, int]:
    """The causal stages' pairs, encoded whole (DPO's split at their shared prompt), cut as TRL 1.16's DPOTrainer cuts
    them: each side's first ``max_length`` tokens (its collator's ``keep_start``, its default; TRL's CPO and ORPO keep
    the prompt whole and cut the answer: the same tokens). A pair whose prompt alone fills ``max_length``, which TRL's
    DPO dataset filter drops (nothing of its answers would train), is ``end_kept(sample, whole pair)``
    instead (the prompt's end and each answer's start; orpo, simpo, cpo: of the whole pair, its answer EOS kept); how
    many, with the pairs. ``truncation="refuse"``: a pair with a side longer than ``max_length`` is
    refused, naming its file and line."""
    from ..data.load import DataError

    kept, cut, fell_back = [], 0, 0
    for s, ex in zip(samples, encoded.examples, strict=True):
        if max(len(ex[k]["input_ids"]) for k in ("chosen", "rejected")) <= max_length:
            kept.append(ex)
            continue
        if truncation == "refuse":
            raise DataError(f"{s.source}: longer than data.max_length={max_length} tokens "
                            "(set data.truncation=truncate to cut such rows)")  # fmt: skip
        firsts = [next((i for i, lab in enumerate(ex[k]["labels"]) if lab != IGNORE_INDEX), _WHOLE)
                  for k in ("chosen", "rejected")]  # fmt: skip
        cut += 1
        if min(firsts) < max_length:
            kept.append({**ex, **{k: {f: v[:max_length] for f, v in ex[k].items()} for k in ("chosen", "rejected")}})
        else:
            kept.append({**ex, **end_kept(s, ex)})
            fell_back += 1
        for k in ("chosen", "rejected"):  # (each side split at its own prompt: one may start past the other's cut)
            if all(lab == IGNORE_INDEX for lab in kept[-1][k]["labels"][1:]):
                raise DataError(f"{s.source}: the {k} answer has no token within data.max_length={max_length} (its "
                                "prompt fills it); raise data.max_length or shorten the prompt")  # fmt: skip
    return Encoded(kept, cut), fell_back


SYNCED_REF = "sync_ref_model.safetensors"  # a checkpoint's TR-DPO reference copy


class SyncRef(TrainerCallback):
    """TR-DPO's reference update (Gorbatovski et al. 2024, arXiv:2404.09656; TRL's ``SyncRefModelCallback``): after
    every ``steps``-th optimizer step, each reference parameter becomes (1 - alpha) ref + alpha policy."""

    def __init__(self, ref_model: torch.nn.Module, alpha: float, steps: int, accelerator) -> None:
        self.ref_model, self.alpha, self.steps, self.accelerator = ref_model, alpha, steps, accelerator

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        if state.global_step % self.steps == 0 and model is not None:
            policy = self.accelerator.unwrap_model(model).parameters()
            for ref, p in zip(self.ref_model.parameters(), policy, strict=True):
                ref.mul_(1.0 - self.alpha).add_(p.to(ref.dtype), alpha=self.alpha)


def check_sync_ref(align, config, base_model: torch.nn.Module, stage: str) -> None:
    """ConfigError in one line when ``align.sync_ref_model`` (TR-DPO) cannot apply: an adapter (``config``, on
    ``base_model``; any method but full, freeze and bitfit, also LoRA training biases, whose copy would be a LoRA
    model mixed lora_A and lora_B apart), whose reference is the base with the adapter off and no copy (TRL refuses
    sync_ref_model with a PEFT model too), a precomputed reference, or a bad alpha or tau. Nothing when off."""
    from ..config import ConfigError
    from .config_align import precomputes_ref

    if not align.sync_ref_model:
        return
    trained = {name for name, p in base_model.named_parameters() if p.requires_grad}
    if not trained or trained != set(config.trainable_base_parameters(base_model)):  # (an adapter's own weights train)
        raise ConfigError(
            f"align.sync_ref_model (TR-DPO) with method.name={config.method}: the {stage} reference is the base with "
            "the adapter off, no copy to sync (TRL refuses sync_ref_model with a PEFT model too); use a method that "
            "trains the base in place (full, freeze, bitfit) or drop sync_ref_model"
        )
    if precomputes_ref(align):
        raise ConfigError(
            "align.sync_ref_model (TR-DPO) moves the reference while training, so align.precompute_ref's log-probs "
            "would go stale (TRL refuses the two together too); drop one of them"
        )
    steps, alpha = align.ref_model_sync_steps, align.ref_model_mixup_alpha
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"align.ref_model_sync_steps must be a whole number >= 1, got {steps!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"align.ref_model_mixup_alpha must be in [0, 1], got {alpha!r}")


def synced_reference(trainer: DeltaTrainer, align, stage: str) -> torch.nn.Module | None:
    """TR-DPO (``align.sync_ref_model``, TRL's DPOConfig and KTOConfig name): a frozen copy of the policy as it
    starts, no dropout, mixed toward the policy by ``SyncRef`` (``ref_model_mixup_alpha``, every
    ``ref_model_sync_steps`` steps), which the trainer then scores the reference with. None when the key is off.

    TRL keeps such a copy only for a model that is no PEFT model and refuses the rest, and so does deltatune: an
    adapter's reference is the base with the adapter switched off, and only a method that trains the base's own
    weights in place (full, freeze, BitFit) has a copy to sync.

    Raises:
        ConfigError: see ``check_sync_ref``.
    """
    import copy

    if not align.sync_ref_model:
        return None
    delta = trainer._delta_model()
    check_sync_ref(align, delta.peft_config[delta.active_adapter], delta.base_model, stage)
    ref = copy.deepcopy(trainer.model)
    ref.eval()  # no dropout, as TRL's reference
    ref.requires_grad_(False)
    alpha, steps = float(align.ref_model_mixup_alpha), align.ref_model_sync_steps
    trainer.add_callback(SyncRef(ref, alpha, steps, trainer.accelerator))
    return ref


class SyncedRefCheckpoints:
    """A trainer mixin (before DeltaTrainer) for TR-DPO's reference copy (``self.ref_model``, ``synced_reference``):
    each checkpoint also holds the copy's parameters (``SYNCED_REF``, written with the optimizer's state into the
    checkpoint's staging folder, so it appears with the rest or not at all), and resuming from a checkpoint loads
    them, so a resumed run scores against the reference the uninterrupted run had (TRL keeps no such file: its
    resumed run restarts the copy from the policy it loads)."""

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if getattr(self, "ref_model", None) is not None and self.args.should_save:
            from safetensors.torch import save_file

            tensors = {k: p.detach().contiguous().cpu() for k, p in self.ref_model.named_parameters()}
            save_file(tensors, os.path.join(output_dir, SYNCED_REF), {"format": "pt"})

    def _load_best_model(self) -> None:
        self._loading_best = True  # the best checkpoint's policy only: the reference stays as training left it
        try:
            super()._load_best_model()
        finally:
            self._loading_best = False

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if getattr(self, "ref_model", None) is not None and not getattr(self, "_loading_best", False):
            load_synced_ref(self.ref_model, resume_from_checkpoint, self.align.ref_model_sync_steps)


@torch.no_grad()
def load_synced_ref(ref_model: torch.nn.Module, checkpoint: str, sync_steps: int) -> None:
    """Copy a checkpoint's ``SYNCED_REF`` into ``ref_model``. Without the file, a checkpoint of a step before the
    first mixing needs none (the copy is still the starting policy); a later one is a ConfigError naming it."""
    import json

    from safetensors.torch import load_file

    from ..config import ConfigError

    path = os.path.join(checkpoint, SYNCED_REF)
    if not os.path.isfile(path):
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as fh:
            step = json.load(fh).get("global_step", 0)
        if step >= sync_steps:
            raise ConfigError(
                f"{path} is missing: align.sync_ref_model (TR-DPO) mixed its reference copy by step {step}, and "
                "this checkpoint (written before the copy was kept, or with train.save_only_model) cannot restore it; "
                "resume from a checkpoint that has it, or train again from the start"
            )
        return
    saved = load_file(path)
    params = dict(ref_model.named_parameters())
    if saved.keys() != params.keys():
        raise ConfigError(f"{path} holds other parameters than this run's reference copy (another model or method)")
    for k, p in params.items():
        p.copy_(saved[k].to(p.dtype))
