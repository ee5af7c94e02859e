"""Reward model (stage ``rm``): a scalar head on a causal LM or encoder, trained on preference pairs.

The model is ``AutoModelForSequenceClassification`` with one output (the head is saved with the adapter, as
modules_to_save of task type SEQ_CLS). For each pair it scores (prompt, chosen) and (prompt, rejected) and
minimises the Bradley-Terry ranking loss (Stiennon et al. 2020; Ouyang et al. 2022):

    loss = mean over pairs of -log sigmoid(r_chosen - r_rejected - m)

where m is the row's ``margin`` column when the data has one (how much better chosen is: TRL's ``RewardTrainer``
reads the same column into the same loss, as in Llama 2's reward model), else 0.

Eval: pairwise accuracy (the share of pairs with r_chosen > r_rejected) and the mean margin r_chosen - r_rejected.
``scorers.RewardScorer`` loads a finished reward run to score text for PPO and GRPO.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.preference import PairCollator
from ..data.tasks import csv_number
from .config import RunConfig
from .pairs import PairTrainer, count_tokens, encode_pair_splits, every_process, pair_metrics
from .pairs import disable_dropout as _disable_dropout
from .prepared import Prepared
from .scorers import is_encoder_config

MARGIN_COLUMN = "margin"
"""The column of a pair's required reward margin (TRL's name)."""


def pairwise_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry ranking loss of each pair: -log sigmoid(chosen - rejected - margin), (B,) from the (B,) rewards
    of the preferred and the dispreferred responses and the (B,) margins (None: 0)."""
    diff = chosen.float() - rejected.float()
    return -F.logsigmoid(diff if margin is None else diff - margin.float().to(diff.device))


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """The mean of ``pairwise_losses``; log 2 when every margin is 0."""
    return pairwise_losses(chosen, rejected).mean()


class RewardTrainer(PairTrainer):
    """PairTrainer with the pairwise loss on the model's scalar scores, plus, with ``center_rewards_coefficient``
    c, c (r_chosen + r_rejected)^2 per pair (TRL's term of that name, after Eisenstein et al. 2023: it keeps the
    rewards centred on 0). Logs ``accuracy``, ``margin`` and ``min_reward``, ``mean_reward``, ``max_reward`` (means
    since the last log; every process's pairs under DDP, ``_score_stats``) and ``num_tokens`` (the training tokens so
    far; in evaluation too), as TRL's RewardTrainer.
    With ``disable_dropout`` (align.disable_dropout, true by default as TRL's RewardConfig) every nn.Dropout of the model,
    the adapter's lora_dropout too, is set to 0 on the model."""

    def __init__(
        self, *args, center_rewards_coefficient: float | None = None, disable_dropout: bool = True, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.center_rewards_coefficient = center_rewards_coefficient
        if disable_dropout:
            _disable_dropout(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        margin = inputs.get(MARGIN_COLUMN)
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        scores = model(**inputs).logits.squeeze(-1)  # (2B,): the B chosen, then the B rejected
        chosen, rejected = scores.chunk(2)
        losses = pairwise_losses(chosen, rejected, margin)
        if self.center_rewards_coefficient:
            losses = losses + self.center_rewards_coefficient * (chosen.float() + rejected.float()) ** 2
        if model.training:  # TRL's RewardTrainer's names
            for key, value in _score_stats(self, chosen.detach(), rejected.detach()).items():
                self.log_stat(key, value)
            count_tokens(self, inputs["attention_mask"])  # TRL's num_tokens: the training tokens seen so far
        loss = self.pair_mean(losses, model)
        return (loss, torch.stack([chosen, rejected], -1)) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """An evaluation's logs (and the metrics ``evaluate`` returns) get ``eval_num_tokens``: the training tokens
        so far, as TRL's RewardTrainer logs it in evaluation too (0 before the first step)."""
        if not self.model.training and any(k.startswith("eval_") for k in logs):
            logs["eval_num_tokens"] = float(getattr(self, "train_tokens", 0))
        super().log(logs, start_time)


def _score_stats(trainer, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """A training micro-batch's ``accuracy``, ``margin`` and ``min_reward``, ``mean_reward``, ``max_reward``, as TRL's
    RewardTrainer logs them: under DDP every process's pairs (one all-gather of a (1, 6) tensor of sums, count,
    min and max; TRL gathers the scores for the min, mean and max, and averages the processes' accuracies and margins:
    the same for equal batches); rank 0's pairs alone were logged before."""
    scores = torch.cat([chosen, rejected])
    gather = every_process(trainer)
    if gather is None:  # (the values one process always logged)
        return {"accuracy": (chosen > rejected).float().mean().item(),
                "margin": (chosen - rejected).float().mean().item(),
                "min_reward": scores.min().item(), "mean_reward": scores.float().mean().item(),
                "max_reward": scores.max().item()}  # fmt: skip
    s = scores.float()
    row = torch.stack([(chosen > rejected).float().sum(), (chosen.float() - rejected.float()).sum(), s.sum(), s.min(),
                       s.max(), s.new_tensor(float(len(chosen)))])  # fmt: skip
    rows = gather(row[None])
    pairs = rows[:, 5].sum()
    return {"accuracy": (rows[:, 0].sum() / pairs).item(), "margin": (rows[:, 1].sum() / pairs).item(),
            "min_reward": rows[:, 3].min().item(), "mean_reward": (rows[:, 2].sum() / (2 * pairs)).item(),
            "max_reward": rows[:, 4].max().item()}  # fmt: skip


def _base_config(cfg: RunConfig):
    """The base model's config; None when it does not load (the model loader reports that more clearly)."""
    from transformers import AutoConfig

    from .models import resolve_path

    try:
        return AutoConfig.from_pretrained(
            resolve_path(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError):
        return None


def _check_eos(config, splits: dict[str, list[dict]]) -> None:
    """An encoder-decoder's sequence classifier (T5, BART) scores the hidden state of each input's last EOS token,
    and transformers refuses a batch whose inputs do not all hold the same number of them, at least one.

    Raises:
        DataError: an encoded input breaks that rule.
    """
    from ..data.load import DataError

    eos = getattr(config, "eos_token_id", None)
    if config is None or not getattr(config, "is_encoder_decoder", False) or not isinstance(eos, int):
        return
    first = None
    for split, examples in splits.items():
        for i, ex in enumerate(examples):
            for side in ("chosen", "rejected"):
                n = ex[side]["input_ids"].count(eos)
                first = n if first is None else first
                if n != first or n == 0:
                    raise DataError(
                        f"stage rm on {config.model_type}: its classifier scores the last EOS token (id {eos}), so "
                        f"every input needs the same number of them, at least one; {split} pair {i + 1}'s {side} "
                        f"has {n}{'' if n == first else f', the first input {first}'} (plain-string rows with no "
                        "chat template get the tokenizer's own, one per text; or set data.template)"
                    )


def _margins(spec: str | None, cfg: RunConfig) -> dict[str, float] | None:
    """file:line -> the ``margin`` of each row of the data file ``spec``; None when no row has the column.

    A CSV or TSV file's fields are text: one that writes a number is that number (``_number``).

    Raises:
        DataError: some rows have the column and this one has none, or not a finite number.
    """
    from ..data.load import DataError, read_rows

    if not spec:
        return None
    rows = read_rows(spec, cfg.data.text_column, cfg.data.limit)
    if not any(MARGIN_COLUMN in r.data for r in rows):
        return None
    out = {}
    for r in rows:
        value = _number(r.data.get(MARGIN_COLUMN), r.source)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(
                f"{r.source}: column {MARGIN_COLUMN!r} must be a finite number (the pair's reward margin; other rows "
                f"have one), got {value!r}"
            )
        out[r.source] = float(value)
    return out


def _number(value, source: str):
    """A CSV or TSV field's text as the number it writes (TRL reads such a file through datasets' CSV builder, which
    types a column of numbers as floats: ``csv_number``'s grammar, '1_000' or '\xa02' text); any other value as it
    is. Text of a JSON row stays text (refused)."""
    if isinstance(value, str) and source.rpartition(":")[0].lower().endswith((".csv", ".tsv")):
        number = csv_number(value)
        return value if number is None else number
    return value


_SOURCE = "_source"
"""A pair's row (file:line) while it is prepared; removed before the collator sees it."""


class _Sources(dict):
    """``encode_pair_splits``' extra values of the ``_SOURCE`` column: each row's own file:line."""

    def __missing__(self, key: str) -> str:
        return key


EVALUATING = "evaluating"
"""The config attribute ``deltatune eval`` sets on the recipe it prepares (true): ties are scored, not refused."""


def _drop_ties(examples: list[dict], split: str, cfg: RunConfig, notes: list[str], scoring: bool) -> None:
    """Refuse (data.bad_pairs=skip: leave out, noted) the train pairs whose two sides encode to the same ids: a tie
    the pairwise loss learns nothing from (the two sides' gradients cancel). Either data.max_length cut off where they
    differ (TRL's RewardTrainer drops every pair longer than its max_length) or the tokenizer does not tell them apart
    (an uncased one). An eval split (``scoring``: every split of ``deltatune eval``) keeps its ties, noted: each
    counts as a lost pair in the accuracy, as every run scored them before 8df0ee9. The truncation note of the
    split then counts the kept pairs only.

    Raises:
        DataError: such a train pair under data.bad_pairs=refuse, or every train pair is one.
    """
    from ..data.load import DataError

    max_length, ties, kept = cfg.data.max_length, [], []
    for ex in examples:
        source = ex.pop(_SOURCE)
        sides = ex["chosen"]["input_ids"], ex["rejected"]["input_ids"]
        if sides[0] == sides[1]:
            ties.append((source, max(len(ids) for ids in sides) >= max_length))
        else:
            kept.append(ex)
    if not ties:
        return
    first, cut = ties[0]
    why = (
        f"are identical once cut to data.max_length={max_length} tokens (they differ past it)"
        if cut
        else "encode to the same ids (the tokenizer does not tell them apart)"
    )
    if scoring:
        notes.append(f"{len(ties)} {split} pairs tie: chosen and rejected {why}, "
                     f"each a lost pair in the accuracy (first: {first})")  # fmt: skip
        return
    if cfg.data.bad_pairs != "skip":
        raise DataError(f"{first}: 'chosen' and 'rejected' {why}, a tie the pairwise loss learns nothing from"
                        f"{'; raise data.max_length' if cut else ''} (data.bad_pairs=skip leaves such rows out)")  # fmt: skip
    if not kept:
        raise DataError(f"every {split} pair ({len(ties)}) is such a tie, nothing left to train on under "
                        f"data.bad_pairs=skip (first: {first}: 'chosen' and 'rejected' {why})")  # fmt: skip
    examples[:] = kept
    notes.append(f"{len(ties)} {split} pairs were left out (data.bad_pairs=skip): chosen and rejected "
                 f"{why} (first: {first})")  # fmt: skip
    _recount_truncated(notes, split, sum(c for _, c in ties), max_length)


def _recount_truncated(notes: list[str], split: str, dropped: int, max_length: int) -> None:
    """The split's truncation note (``prepared._note_truncated``) less ``dropped`` pairs left out; gone at 0."""
    from .prepared import _note_truncated

    head = f" {split} rows were longer than data.max_length={max_length} tokens and were truncated"
    for i, note in enumerate(notes):
        count, sep, rest = note.partition(head)
        if sep and count.isdigit():
            del notes[i]
            tail: list[str] = []
            _note_truncated(tail, split, int(count) - dropped, max_length, rest)
            notes[i:i] = tail
            return


def rm_metrics(p) -> dict[str, float]:
    """The rm stage's eval metrics: ``pair_metrics`` of the (N, 2) scores, and TRL's ``min_reward``, ``mean_reward``,
    ``max_reward`` over all of them (TRL averages its eval batches' values: the same over one batch)."""
    scores = np.asarray(p.predictions)
    extremes = {f"{k}_reward": float(f(scores)) for k, f in (("min", np.min), ("mean", np.mean), ("max", np.max))}
    return {**pair_metrics(scores), **extremes}


def prepare_rm(cfg: RunConfig, tok) -> Prepared:
    """Preference rows -> (prompt, response) pairs for a one-output sequence classifier.

    Raises:
        ConfigError: model.num_labels is set to anything but 1.
        DataError: a bad row, or (T5, BART) an input without the EOS tokens the classifier reads.
    """
    from functools import partial

    from ..config import ConfigError

    if cfg.model.num_labels not in (None, 1):
        raise ConfigError(f"stage rm trains a scalar reward: model.num_labels must be 1, got {cfg.model.num_labels}")
    cfg.model.num_labels = 1  # recorded in run.yaml, so eval and PPO rebuild the same head
    margins = {split: _margins(getattr(cfg.data, split), cfg) for split in ("train", "eval")}
    extra = {split: {_SOURCE: _Sources(), **({MARGIN_COLUMN: m} if m else {})} for split, m in margins.items()}
    config = _base_config(cfg)
    pair_scorer = config is not None and is_encoder_config(config)
    train, ev, notes = encode_pair_splits(cfg, tok, causal=False, pair_scorer=pair_scorer, extra=extra)
    scoring = getattr(cfg, EVALUATING, False) is True  # (deltatune eval: the figures as the run's own evaluation)
    for split, encoded in (("train", train), ("eval", ev)):
        if encoded is not None:
            _drop_ties(encoded.examples, split, cfg, notes, scoring or split == "eval")
    _check_eos(config, {"train": train.examples, "eval": ev.examples if ev else []})
    for split, m in margins.items():
        if m:
            notes.append(f"{split}: loss -log sigmoid(r_chosen - r_rejected - margin), margin the rows' column "
                         f"{MARGIN_COLUMN!r} (as TRL's RewardTrainer)")  # fmt: skip

    return Prepared(
        train.examples,
        ev.examples if ev else None,
        PairCollator(tok.pad_token_id),
        rm_metrics,
        "eval_accuracy",
        notes=notes,
        trainer_class=partial(
            RewardTrainer,
            center_rewards_coefficient=cfg.align.center_rewards_coefficient,
            disable_dropout=cfg.align.disable_dropout,
        ),
    )
