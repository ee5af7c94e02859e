"""Group Relative Policy Optimization (stage ``grpo``; Shao et al. 2024, DeepSeekMath, arXiv:2402.03300), with the
Dr. GRPO options of Liu et al. 2025 (arXiv:2503.20783). Online RL without a value model.

One step: take ``train.batch_size`` prompts, sample G = ``align.num_generations`` completions of each from the
policy (base + adapter), score every completion with the reward functions (a weighted sum R_i), and give each the
advantage of its reward within its group of G:

    A_i = (R_i - mean(R_group)) / (std(R_group) + 1e-4)        (std: Bessel-corrected; without it with
                                                                 align.scale_rewards=false, as in Dr. GRPO)

A group whose rewards are all equal teaches nothing: its advantages are exactly 0. Then ``align.num_iterations``
passes over the batch (each ``align.steps_per_generation`` updates on equal shuffled slices, as TRL's) minimise,
per completion token t (every token of completion i shares A_i),

    l_t = -min(ratio_t A_i, clip(ratio_t, 1 - eps, 1 + eps) A_i) + beta * KL_t,    ratio_t = pi(o_t) / pi_old(o_t)
    KL_t = ref / pi - log(ref / pi) - 1                         (the k3 estimator of KL(pi || ref), always >= 0)

with pi_old the policy that sampled (ratio 1 at the first iteration), eps = ``align.cliprange`` and beta =
``align.beta``. The reference is the same base with the adapter off; beta = 0 skips the reference pass altogether. The
loss over the batch is a mean over each completion's tokens then over completions (``loss_norm: sequence``, the paper)
or one mean over all completion tokens (``loss_norm: token``, TRL's "dapo"; TRL's "bnpo" is the mean over each
micro-batch's, an ``align.mini_batch_size`` chunk here: long completions count by their length; Dr. GRPO divides by a
constant, completions x max tokens). Log-probs are at the sampling temperature.
TRL's other GRPO options (clip-higher, delta, GSPO, the top-entropy mask, masked truncations) are in grpo_loss.py.

Rewards follow TRL's convention so users can bring theirs: ``f(prompts, completions, **columns) -> list[float]``,
called with keyword arguments, one value per completion; ``prompts`` are the rows' prompts as written (text, or a list
of chat messages; the recipe's data.template, else the tokenizer's chat template, makes the model's input),
``completions`` the decoded texts (after chat prompts each one assistant message, as TRL's: ``[{"role":
"assistant", "content": text}]``), every other column of the rows as a list of the same length, and TRL's
``completion_ids``, ``trainer_state``, ``log_metric`` and ``log_extra`` (``grpo_rewards.trl_extras``). A reward may
also be a deltatune reward-model run (stage rm), scoring (prompt, completion) texts. Checkpoints (adapter, optimizer,
RNG) every ``train.save_steps`` steps (default: once per pass over the prompts); ``--resume`` continues from the last.
``train.precision: bf16`` samples and computes every forward under bf16 autocast (fp32 weights and optimizer).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerState

from ..config import ConfigError
from ..data.encode import prompt_text
from ..data.load import DataError, Row
from ..data.preference import bos_prefix, special_ends
from ..data.sample import AUDIO_MARKER
from ..data.tasks import Collator, csv_typed
from ..data.templates import check_markers, too_long
from .checks import check_rollout_context, resolved_precision
from .config import AlignArgs, RunConfig
from .config_align import grpo_loss_norm, grpo_policy, validate_grpo
from .config_grpo import GENERATION_IDS, check_generation_ids, grpo_sampling
from .grpo_checkpoint import STATE_FILE, _load_checkpoint, _read_state, _save_checkpoint, check_state, counted_ceil  # noqa: F401  (tests)
from .grpo_entropy import EntropyBonus, check_entropy
from .grpo_loss import check_loss_keys, gdpo_advantages, group_advantages, grpo_loss, high_entropy_mask, k3_kl  # noqa: F401
from .grpo_rewards import Reward, check_rewards, combine, load_rewards, nanstd, reward_inputs, score, trl_extras
from .grpo_stats import MicroMeans, completion_lengths, count_tokens, trl_policy_loss
from .models import resolve_path
from .ppo import adamw_groups, sample_responses
from .ppo_checkpoint import kept_start, start_key
from .prepared import Prepared, _rows
from .report import plot_panels

STATS = ("reward", "reward_std", "kl", "clipfrac", "entropy", "completion_length", "loss", "step_time_s")
"""The statistics plotted in grpo_stats.png, then each reward's mean."""


# -- the loop ------------------------------------------------------------------------------------------------


@dataclass
class PromptItem:
    """One encoded prompt with what the rewards see of its row."""

    ids: list[int]
    prompt: Any  # the row's prompt as written: text or chat messages
    columns: dict[str, Any]
    source: str


@dataclass
class Samples:
    """G completions of each of B prompts (N = B x G rows, P prompt and T completion positions)."""

    sequences: torch.Tensor  # (N, P + T): left-padded prompts, then completions (pad after EOS)
    attention_mask: torch.Tensor  # (N, P + T)
    completion_mask: torch.Tensor  # (N, T): 1 up to and including the first EOS
    prompt_length: int  # P
    completions: list[str]
    truncated: torch.Tensor  # (N,) bool: no EOS within max_new_tokens
    items: list[PromptItem] = field(default_factory=list)  # one per completion
    completion_ids: list[list[int]] = field(default_factory=list)  # up to and including the first EOS, as TRL's


class GRPOLoop:
    """GRPO on a DeltaModel policy: sample groups, score, group-relative advantages, clipped updates of the adapter.

    Args:
        model: the policy, a DeltaModel over a causal LM whose active adapter trains.
        tokenizer: the policy's tokenizer (completions are decoded with it for the rewards).
        rewards, align: the rewards (``check_rewards`` / ``load_rewards``); the recipe's ``align`` section.
        lr, weight_decay: AdamW's learning rate and weight decay (the recipe's; not on biases and norm weights, as the
            HF Trainer's and TRL's AdamW).
        max_grad_norm, seed: the gradient clipping norm (0: none); the seed of the sampling.
        scheduler: a function optimizer -> LR scheduler (default: constant).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        rewards: Sequence[Reward],
        align: AlignArgs,
        lr: float = 1e-5,
        max_grad_norm: float = 1.0,
        seed: int = 0,
        scheduler: Callable | None = None,
        bf16: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        self.model, self.tokenizer, self.rewards, self.align = model, tokenizer, list(rewards), align
        self.device = next(model.parameters()).device
        self.amp = functools.partial(torch.autocast, self.device.type, torch.bfloat16, enabled=bf16)
        torch.manual_seed(seed)
        self.optimizer = torch.optim.AdamW(adamw_groups(model, weight_decay), lr, weight_decay=weight_decay)
        self.scheduler = scheduler(self.optimizer) if scheduler else None
        self.max_grad_norm, self.seed = max_grad_norm, seed
        self.state, self.logged = TrainerState(), {}  # what rewards see as trainer_state; what they log_metric
        self.bonus = EntropyBonus(align)  # (TRL's entropy_coef, use_adaptive_entropy)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        # a completion ends at the first EOS of these, as TRL's eos_token_ids (Gemma's <end_of_turn> is only there)
        ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ends = {self.eos, *(ends if isinstance(ends, list) else [ends])} - {None}
        self.stops = torch.tensor(sorted(ends), dtype=torch.long)

    # The model runs in eval mode throughout (no dropout), so pi_old, pi and the reference are computed alike.
    def _forward(self, s: Samples, idx: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs (n, T), entropy (n, T)) of the completion tokens of rows ``idx``, at the sampling temperature."""
        P = s.prompt_length
        ids, mask = s.sequences[idx], s.attention_mask[idx]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at 0
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        logits = logits[:, P - 1 : -1].float() / self.align.temperature  # (n, T, V): predicts the completions
        logp_all = F.log_softmax(logits, -1)
        logp = logp_all.gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1)  # (n, T)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy

    def _chunks(self, n: int) -> list[slice]:
        size = self.align.mini_batch_size
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    @torch.no_grad()
    def _logprobs(self, s: Samples, reference: bool = False) -> torch.Tensor:
        """(N, T) completion log-probs under the current policy, or the reference (the adapter off)."""
        parts = []
        for idx in self._chunks(len(s.sequences)):
            with self.model.disable_adapter() if reference else contextlib.nullcontext():
                parts.append(self._forward(s, idx)[0])
        return torch.cat(parts)

    @torch.no_grad()
    def sample(self, items: Sequence[PromptItem], num: int) -> Samples:
        """``num`` sampled completions of each prompt, consecutive (N = len(items) x num)."""
        ids, mask, completion_mask, completion, truncated = sample_responses(
            self.model,
            [it.ids for it in items],
            self.pad,
            self.eos,
            self.align,
            self.align.top_p,
            num,
            grpo_sampling(self.align),
        )
        if self.stops.tolist() != [self.eos]:  # (sample_responses stops at the tokenizer's EOS only)
            stop = torch.isin(completion, self.stops.to(completion.device))
            after = (stop.cumsum(-1) - stop.long()) > 0  # strictly after the first end
            completion, truncated = completion.masked_fill(after, self.pad), ~stop.any(-1)
            completion_mask = (~after).long()
        return Samples(
            sequences=torch.cat([ids, completion], 1),
            attention_mask=torch.cat([mask, completion_mask], 1),
            completion_mask=completion_mask,
            prompt_length=ids.shape[1],
            completions=self.tokenizer.batch_decode(completion, skip_special_tokens=True),
            truncated=truncated,
            items=[it for it in items for _ in range(num)],
            completion_ids=[ids[m.bool()].tolist() for ids, m in zip(completion, completion_mask)],
        )

    def score(self, s: Samples) -> torch.Tensor:
        """(N, K) rewards of the samples; reward functions get what TRL's GRPOTrainer gives them by keyword."""
        items = s.items
        keys = sorted({k for it in items for k in it.columns})
        columns = {k: [it.columns.get(k) for it in items] for k in keys}
        if s.completion_ids:
            columns["completion_ids"] = s.completion_ids
        prompts, texts, completions = reward_inputs(items, s.completions, s.completion_ids, self.tokenizer)
        extras = trl_extras(getattr(self, "state", None), getattr(self, "logged", {}))  # (a loop built bare: none)
        return score(self.rewards, prompts, texts, completions, columns, [it.source for it in items], extras)

    def step(self, items: Sequence[PromptItem]) -> dict[str, float]:
        """One GRPO step over a batch of prompts; returns its statistics. Each forward has an autocast region of
        its own: autocast keeps bf16 copies of the trainable weights until its region ends, so none may span an update."""
        from .grpo_loss import micro_seed, trl_micro_order

        a = self.align
        G, S = a.num_generations, a.steps_per_generation
        self.logged.clear()  # (an eval's log_metric values are not this step's)
        self.state.global_step = getattr(self, "steps_done", 0) * a.num_iterations * S  # optimizer steps, as TRL's
        with self.amp():  # sampling and scoring (a reward may be a model) run under autocast, as before
            s = self.sample(items, G)
            # TRL's num_tokens, counted before the rewards see trainer_state (tokens_known: grpo_checkpoint's)
            seen = count_tokens(self.state, s, getattr(self, "tokens_known", True))
            table = self.score(s)  # (N, K)
        weights = torch.tensor([r.weight for r in self.rewards])
        rewards = combine(table, weights, [it.source for it in s.items])  # (N,)
        gdpo = getattr(a, "multi_objective_aggregation", None) == "normalize_then_sum"  # (TRL's; k3_kl: re-exported)
        advantages, summed = gdpo_advantages(table, weights, G) if gdpo else (None, rewards)  # (summed: GDPO's)
        advantages = advantages if gdpo else group_advantages(rewards, G, a.scale_rewards)
        advantages = advantages.to(self.device)
        mask = s.completion_mask.float()
        if a.mask_truncated_completions:  # (TRL's: out of every loss term and token count)
            mask = mask * (~s.truncated).float().unsqueeze(1).to(mask.device)
        n_seq, n_tok, norm = len(rewards), mask.sum().clamp(min=1), grpo_loss_norm(a)
        # TRL's steps_per_generation: the batch, shuffled once (torch's RNG, as TRL's shuffle_sequence_dict), is S
        # slices, one update each; each slice's loss is normalised over the slice (dapo, cispo: by n_tok / S, as TRL).
        # S 1: shuffled too where the chunks' split matters (TRL's micro-batches), else in order (same weights)
        chunked = a.loss_type == "bnpo" or self.bonus.on or a.top_entropy_quantile < 1
        shuffle = S > 1 or chunked and a.mini_batch_size < n_seq
        parts = (torch.randperm(n_seq) if shuffle else torch.arange(n_seq)).to(self.device).view(S, -1)
        micro = trl_micro_order(parts, shuffle, micro_seed(self.seed, self.state.global_step))  # (TRL's, for means)
        with self.amp():
            old = self._logprobs(s) if a.num_iterations > 1 or S > 1 else None
            ref = self._logprobs(s, reference=True) if a.beta > 0 else None
        sums = dict.fromkeys(("loss", "clipped", "clip_units"), 0.0)  # (deltatune's loss and clipfrac: token-weighed)
        policy: list[float] = []  # (each micro-batch's TRL policy_loss, logged with an entropy bonus as TRL's)
        means = MicroMeans(n_seq, self.device)  # (each of TRL's micro-batches' clip ratios, kl, entropy)
        for part, order in (pm for _ in range(a.num_iterations) for pm in zip(parts, micro)):
            self.optimizer.zero_grad(set_to_none=True)
            n_part = n_tok / S  # (dapo, cispo: the generation batch's tokens / S, as TRL; bnpo: per chunk, below)
            for idx in (part[c] for c in self._chunks(len(part))):
                with self.amp():
                    logp, entropy = self._forward(s, idx)
                m = mask[idx]  # bnpo: each chunk's token mean x its share of the slice (TRL's per micro-batch)
                n_chunk = m.sum().clamp(min=1) * len(part) / len(idx) if a.loss_type == "bnpo" else n_part
                q, opsm = a.top_entropy_quantile, getattr(a, "off_policy_mask_threshold", None)  # (TRL's)
                top = high_entropy_mask(entropy.detach(), m, q) if q < 1 else None
                loss, st = grpo_loss(
                    logp, logp.detach() if old is None else old[idx], advantages[idx], m, a.cliprange, a.beta,
                    None if ref is None else ref[idx], norm, len(part), n_chunk, a.bias_correction_kl,
                    cliprange_high=a.cliprange_high, delta=a.delta, max_tokens=a.max_new_tokens, token_mask=top,
                    importance_sampling_level=a.importance_sampling_level, policy=grpo_policy(a),
                    sapo_temperatures=(a.sapo_temperature_pos, a.sapo_temperature_neg), opsm=opsm,
                )  # fmt: skip
                if self.bonus.on:  # TRL's: the policy term's tokens' mean entropy, a chunk its share of the slice
                    policy.append(
                        trl_policy_loss(loss, norm == "token" and a.loss_type != "bnpo", len(part), len(idx))
                    )
                    loss = loss - self.bonus.term(entropy, m if top is None else m * top, len(idx) / len(part))
                if not torch.isfinite(loss):  # stop before the update, as the Trainer's stages do
                    from .trainer import NonFiniteLossError

                    raise NonFiniteLossError(getattr(self, "steps_done", 0) + 1, float(loss))
                loss.backward()
                sums["loss"] += loss.item() / (a.num_iterations * S)
                sums["clipped"] += st["clipped"].item()
                sums["clip_units"] += st["clip_units"].item()
                means.gather(idx, st, entropy, m)  # (each row's sums, taken over TRL's micro-batches below)
            means.take(order, self._chunks(len(part)))
            if self.max_grad_norm > 0:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self.optimizer.step()
            self.bonus.update()  # (the adaptive coefficient moves by this update's entropy)
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this update used (logged so, as the Trainer logs)
            if self.scheduler is not None:
                self.scheduler.step()
        batch = a.scale_rewards == "batch" or gdpo  # (scale_rewards batch, GDPO: the batch's std; else each group's)
        zero_std = nanstd(summed if batch else rewards.view(-1, G)).isclose(torch.zeros(()))  # (GDPO: normalised sum)
        stats = {
            "loss": sums["loss"],
            "reward": rewards.nanmean().item(),
            "reward_std": nanstd(rewards).item(),
            "frac_zero_std_groups": nanstd(rewards.view(-1, G)).isclose(torch.zeros(())).float().mean().item(),
            "frac_reward_zero_std": zero_std.float().mean().item(),  # TRL's: of the std its advantages divide by
            "clipfrac": sums["clipped"] / max(sums["clip_units"], 1.0),
            "completion_length": s.completion_mask.float().sum(-1).mean().item(),  # (masked ones too, as TRL)
            "completions/mean_length": s.completion_mask.float().sum(-1).mean().item(),  # (TRL's names of these)
            "truncated_fraction": s.truncated.float().mean().item(),
            "lr": lr,
        }
        stats.update(means.stats(grpo_policy(a)))  # (TRL's clip ratios, kl, entropy: its micro-batches' mean)
        stats.update(
            completion_lengths(s),
            **seen,
            **self.bonus.stats(),
            **({"policy_loss": sum(policy) / len(policy)} if policy else {}),
        )
        for k, r in enumerate(self.rewards):
            stats[f"rewards/{r.name}/mean"] = table[:, k].nanmean().item()  # over the rows it applies to, as TRL
            stats[f"rewards/{r.name}/std"] = nanstd(table[:, k]).item()
        return stats | {k: float(sum(v)) / len(v) for k, v in self.logged.items()}  # TRL's mean of log_metric values

    @torch.no_grad()
    def mean_reward(self, items: Sequence[PromptItem], batch_size: int) -> float:
        """Mean weighted reward of align.num_generations_eval (1 if null) sampled completions a prompt (no update)."""
        weights, n = torch.tensor([r.weight for r in self.rewards]), self.align.num_generations_eval or 1
        with self.amp():
            total = [combine(self.score(self.sample(part, n)), weights, [it.source for it in part for _ in range(n)])
                     for part in (items[i : i + batch_size] for i in range(0, len(items), batch_size))]  # fmt: skip
        return torch.cat(total).nanmean().item()  # rows some reward applies to


# -- the stage -----------------------------------------------------------------------------------------------


def encode_prompts(rows: Sequence[Row], tok, prompt_column: str, max_length: int, truncation: str, template=None):
    """(items, number truncated): each row's prompt as ids (through ``template``, the recipe's data.template, as
    generate and chat prompt the run; else chat messages through the tokenizer's chat template, text as is after the
    BOS the tokenizer adds), cut from its start to ``max_length`` tokens; the row's other columns kept for rewards
    (not ``completion`` nor ``completion_ids``, which TRL leaves out); a CSV's typed per column (``csv_typed``).

    Raises:
        DataError: a missing or empty prompt, chat messages without a chat template or under data.template=raw,
            or (truncation=refuse) an over-long prompt; the row named. A built-in ``template`` with a marker the
            tokenizer encodes as its unknown token (a word vocabulary's [UNK] for chatml's <|im_start|>user).
    """
    head = bos_prefix(tok)
    check_markers(
        tok, template
    )  # (as where answers train: rendered with the generation prompt, it is not checked there)
    items, truncated = [], 0
    for row, typed in zip(rows, csv_typed(rows)):  # (a CSV's columns typed as datasets gives them to TRL's rewards)
        prompt = row.get(prompt_column)
        chat = isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)
        if not chat and not (isinstance(prompt, str) and prompt.strip()):
            raise DataError(f"{row.source}: column {prompt_column!r} must be non-empty text or a list of messages")
        if chat and template == "raw":  # (choose_template's raw_refusal for the other stages)
            raise DataError(f"{row.source}: data.template=raw renders TRL's standard rows (a string prompt) with no "
                            f"chat template; column {prompt_column!r} holds chat messages, which need one (leave "
                            "data.template unset, or name a built-in one)")  # fmt: skip
        _refuse_media(row, prompt if chat else [{"role": "user", "content": prompt}], prompt_column)
        if chat and template is None and not getattr(tok, "chat_template", None):
            raise DataError(f"{row.source}: {prompt_column!r} holds chat messages but the tokenizer has no chat "
                            "template; give the prompt as text")  # fmt: skip
        if template is not None or chat:  # a final assistant turn continued, as TRL's maybe_apply_chat_template
            text = prompt_text(
                prompt if chat else [{"role": "user", "content": prompt}], tok, template, where=row.source
            )
            lead = special_ends(tok)[0] if template is not None else []  # (a built-in template writes no BOS)
            ids = lead + tok(text, add_special_tokens=False)["input_ids"]  # (no closing [SEP])
        else:
            ids = head + tok(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > max_length:
            if truncation == "refuse":
                raise too_long(row.source, len(ids), max_length)
            ids, truncated = ids[len(ids) - max_length :], truncated + 1
        columns = {k: v for k, v in typed.items() if k not in (prompt_column, "completion", "completion_ids")}
        items.append(PromptItem(ids, prompt, columns, row.source))
    return items, truncated


def _refuse_media(row: Row, messages: list, column: str) -> None:
    """DataError naming the row whose prompt holds media the text-only rollouts would ignore, as the other text stages
    refuse them (``sample.refuse_multimodal``): a non-empty images / videos / audios column, as theirs, or image
    (TRL's GRPOTrainer hands image and images to a vision model's processor; a video or audio column is a column, as
    in TRL and the other stages), an image, video or audio content part, an <image> or
    <video> marker, or an <audio> marker outside an assistant turn (a prefill may mention the tag)."""
    what = next((f"column {k!r}" for k in ("images", "image", "videos", "audios") if row.data.get(k)), None)
    for m in messages:
        parts = m.get("content") if isinstance(m.get("content"), list) else [m.get("content")]
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            text = str(part.get("text", "")) if kind == "text" else part if isinstance(part, str) else ""
            if kind in ("image", "image_url", "video", "audio", "input_audio"):
                what = what or f"a content part of type {kind!r} in column {column!r}"
            marks = ("<image>", "<video>") + ((AUDIO_MARKER,) if m.get("role") != "assistant" else ())
            what = what or next((f"the {mk} marker in column {column!r}" for mk in marks if mk in text), None)
    if what:
        raise DataError(f"{row.source}: a multimodal prompt ({what}); stage grpo samples and trains on text only and "
                        "would ignore the media: drop it, or the column")  # fmt: skip


def _check(cfg: RunConfig) -> None:
    a = cfg.align
    if a.num_generations < 2:
        raise ConfigError(f"align.num_generations must be >= 2 (advantages are relative to a group), got "
                          f"{a.num_generations}")  # fmt: skip
    if a.num_iterations < 1:
        raise ConfigError(f"align.num_iterations must be >= 1, got {a.num_iterations}")
    validate_grpo(a)
    check_entropy(a)
    check_loss_keys(a)
    if (cfg.train.batch_size * a.num_generations) % a.steps_per_generation:
        raise ConfigError(f"align.steps_per_generation {a.steps_per_generation} does not divide the generation batch "
                          f"of train.batch_size x align.num_generations = {cfg.train.batch_size * a.num_generations} "
                          "completions into equal slices")  # fmt: skip
    if not 0 < a.top_p <= 1:
        raise ConfigError(f"align.top_p must be in (0, 1], got {a.top_p}")


def _vocab_size(cfg: RunConfig) -> int | None:
    """The vocabulary size of the model's config (None where it does not read: the model loader says why)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            resolve_path(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError):
        return None
    return getattr(config.get_text_config(), "vocab_size", None)


def prepare_grpo(cfg: RunConfig, tok) -> Prepared:
    """Prompts, the rewards (functions imported, reward runs checked) and the loop that trains on them.

    Raises:
        ConfigError: a bad align setting (G < 2, ...), a reward that cannot be imported, or the longest prompt plus
            a token adapter's virtual tokens plus align.max_new_tokens beyond the model's context.
        DataError: a missing or empty prompt.
    """

    from .grpo_rewards import check_columns, fill_columns

    _check(cfg)
    d, a = cfg.data, cfg.align
    rewards = check_rewards(a)
    train_rows, eval_rows = _rows(cfg)
    (train, cut), (evals, cut_eval) = ((encode_prompts(rows, tok, d.prompt_column, d.max_length, d.truncation,
                                        d.template) if rows else (None, 0)) for rows in (train_rows, eval_rows))  # fmt: skip
    for items, key in [(split, key) for split, key in ((train, "train"), (evals, "eval")) if split]:
        check_columns(rewards, a.reward_funcs, items, f"data.{key} ({getattr(d, key)})")  # (step 1 or eval: fails)
        fill_columns(items)  # (each row every column of its split, None where it lacks one, as TRL's datasets rows)
    longest = max(len(it.ids) for it in train + (evals or []))
    check_rollout_context(cfg, longest, resolve_path(cfg.model.name_or_path))
    if set(a.generation_kwargs or ()) & set(GENERATION_IDS):  # ids past the vocabulary: an IndexError in generate
        check_generation_ids(a, _vocab_size(cfg))
    notes = [
        f"GRPO: {cfg.train.batch_size} prompts x {a.num_generations} completions per step, {a.max_new_tokens} new "
        f"tokens at most, {a.num_iterations * a.steps_per_generation} update(s) per generation batch, "
        f"clip {a.cliprange}, "
        + (f"KL coefficient {a.beta} (k3 estimator; reference = the base with the adapter off)" if a.beta > 0
           else "no KL term (beta 0: no reference pass)")
        + f", {grpo_loss_norm(a)} loss normalisation, advantages "
        + {"group": "scaled by the group std", "batch": "scaled by the batch std", "none": "not scaled (Dr. GRPO)"}[
            {True: "group", False: "none"}.get(a.scale_rewards, a.scale_rewards)],
        "rewards: " + ", ".join(f"{r.name} (weight {r.weight:g})" for r in rewards),
        "![GRPO statistics](grpo_stats.png)",
    ]  # fmt: skip
    notes += [f"{n} {split} prompts were longer than data.max_length={d.max_length}; their ends were kept"
              for split, n in (("train", cut), ("eval", cut_eval)) if n]  # fmt: skip

    def loop(model, tokenizer, run_cfg: RunConfig, checkpoint: str | None = None, started: Callable | None = None):
        facts = getattr(prepared, "run_facts", None)  # (run.py's: hashed for the resume check, before the model)
        return train_grpo(model, tokenizer, run_cfg, train, evals, rewards, checkpoint, started, facts)

    prepared = Prepared(train, evals, Collator(tok.pad_token_id), None, "reward", notes=notes, loop=loop)
    return prepared


def train_grpo(
    model: nn.Module,
    tokenizer,
    cfg: RunConfig,
    prompts: list[PromptItem],
    eval_prompts: list[PromptItem] | None,
    rewards: list[Reward],
    checkpoint: str | None = None,
    started: Callable[[], None] | None = None,
    facts: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run GRPO for ``train.max_steps`` steps (or ``train.epochs`` passes over the prompts) of ``train.batch_size``
    prompts; returns (metrics, per-step log history). Resumes from ``checkpoint``, or from the last checkpoint in
    ``output.dir`` (the run only keeps one there when asked to resume). ``started`` is called once the first step
    is done (a run folder's owner keeps the checkpoints of a run that fails after that)."""
    from tqdm.auto import tqdm
    from transformers import get_scheduler
    from transformers.trainer_utils import get_last_checkpoint

    from .runfolder import resume_checkpoint
    from .trainer import LOG_FILE

    t, out = cfg.train, cfg.output.dir
    if checkpoint is None and os.path.isdir(out) and get_last_checkpoint(out):
        checkpoint = resume_checkpoint(out)[0]  # the newest checkpoint that reads
    # TRL's steps a pass: its RepeatSampler drops the pass's last partial batch (its state.epoch counts so); a run
    # begun counting it (a checkpoint without the marker) keeps that count on every resume: counted_ceil
    state = _read_state(checkpoint) if checkpoint else None  # (read once: the count here, the rest once it loads)
    ceil_count = state is not None and counted_ceil(state)
    per_epoch = math.ceil(len(prompts) / t.batch_size) if ceil_count else len(prompts) // t.batch_size
    if per_epoch == 0:
        raise ConfigError(f"data.train ({cfg.data.train}) has {len(prompts)} prompt(s), fewer than train.batch_size "
                          f"{t.batch_size}, the prompts of a step: lower train.batch_size or add prompts")  # fmt: skip
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    m = cfg.model  # (the reward models: loaded with its trust_remote_code, as TRL's with args.trust_remote_code)
    shared = load_rewards(rewards, cfg.align.reward_funcs, model, m.name_or_path, tokenizer, m.trust_remote_code)
    steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * per_epoch))
    updates = steps * cfg.align.num_iterations * cfg.align.steps_per_generation
    warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * updates)
    scheduler = functools.partial(get_scheduler, t.scheduler, num_warmup_steps=warmup, num_training_steps=updates)
    bf16 = resolved_precision(t.precision) == "bf16"  # as the Trainer's stages read train.precision
    loop = GRPOLoop(
        model, tokenizer, rewards, cfg.align, t.lr, t.max_grad_norm, t.seed, scheduler, bf16, t.weight_decay
    )
    loop.state.max_steps = updates  # (optimizer steps, as TRL's trainer_state counts them)
    g = torch.Generator().manual_seed(t.seed)
    history: list[dict[str, Any]] = []
    order: list[int] = []
    start_step, key = 0, start_key(cfg, eval_prompts)  # (what eval_reward_before depends on: None, no start's eval)
    metrics: dict[str, Any] = kept_start(state["metrics"], state.get("start_key"), key) if state else {}
    if checkpoint and state:  # (a checkpoint it cannot resume: refused before the start's evaluation, not after)
        check_state(checkpoint, state, loop)
    if key and "eval_reward_before" not in metrics:  # (a resume's: under another key, by the start's policy)
        metrics["eval_reward_before"] = loop.mean_reward(eval_prompts, t.eval_batch_size or t.batch_size)
    if checkpoint:
        start_step, history, order, _ = _load_checkpoint(checkpoint, loop, g, state)
        state = None  # (its tensors, the optimizer's loaded copy, not held through the run)
        order = [i for i in order if i < len(prompts)]  # (--resume-changed onto fewer prompts: those left of the pass)
    save_every = t.save_steps or per_epoch
    if facts is None:  # (run.py passes its own; a direct caller's: the data's bytes, for --resume to compare)
        from .runfolder import run_facts

        facts = run_facts(cfg)
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, LOG_FILE)  # one line per step as it happens (the board's live curves read it)
    with open(log_path, "w", encoding="utf-8") as fh:  # a resumed run rewrites the steps its checkpoint holds
        fh.writelines(json.dumps(h) + "\n" for h in history)
    start = time.perf_counter() - metrics.pop("train_runtime_s", 0.0)  # a resumed run's: the whole run's time
    try:
        bar = tqdm(range(start_step + 1, steps + 1), desc="grpo", initial=start_step, total=steps)
        for step in bar:
            if len(order) < t.batch_size:  # (RepeatSampler drops a pass's partial batch; a ceil run carries it)
                order = (order if ceil_count else []) + torch.randperm(len(prompts), generator=g).tolist()
            batch, order = [prompts[i] for i in order[: t.batch_size]], order[t.batch_size :]
            loop.steps_done, loop.state.epoch = step - 1, (step - 1) / per_epoch  # (TRL's epoch: the same)
            tick = time.perf_counter()
            history.append(
                {
                    "step": step,
                    **loop.step(batch),
                    "epoch": step / per_epoch,  # (TRL's state.epoch at the step's log: its updates / those a pass)
                    "step_time_s": time.perf_counter() - tick,
                    "wall_time": round(time.time(), 3),
                }
            )
            bar.set_postfix(reward=f"{history[-1]['reward']:.3f}", refresh=False)
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(history[-1]) + "\n")
            if started is not None and step == start_step + 1:
                started()
            if step % save_every == 0 or step == steps:  # (the last too, as the Trainer's: a stop in eval keeps it)
                done = {**metrics, "train_runtime_s": time.perf_counter() - start}  # (as the Trainer stages keep it)
                _save_checkpoint(out, step, loop, g, history, order, done, t.save_total_limit, facts, ceil_count, key)
        tail = history[-max(1, len(history) // 10) :]  # the last tenth of the run, so one noisy batch does not decide
        metrics.update(
            train_loss=sum(h["loss"] for h in history) / len(history),
            train_steps=steps,
            train_runtime_s=round(time.perf_counter() - start, 2),
            reward_first=history[0]["reward"],
            reward_last=sum(h["reward"] for h in tail) / len(tail),
        )
        if cfg.align.beta > 0:
            metrics["kl_last"] = sum(h["kl"] for h in tail) / len(tail)
        if eval_prompts:
            metrics["eval_reward"] = loop.mean_reward(eval_prompts, t.eval_batch_size or t.batch_size)
    finally:
        for r in shared:  # the saved run holds the policy adapter only
            model.delete_adapter(r.adapter_name)
    keys = [k for k in STATS if history and k in history[0]] + [k for k in (history or [{}])[0] if k.endswith("/mean")]
    plot_panels(history, keys, os.path.join(out, "grpo_stats.png"))
    return metrics, history
