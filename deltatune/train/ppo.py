"""PPO against a reward model, with a KL penalty to the reference (stage ``ppo``; Ziegler et al. 2019,
Ouyang et al. 2022; clipped objective of Schulman et al. 2017, GAE of Schulman et al. 2016).

One step: sample responses to a batch of prompts from the policy (base + adapter); score each (prompt, response)
text with the reward model; per response token t the reward is

    r_t = -kl_coef * (log pi(y_t) - log ref(y_t))   (+ the reward model's score on the last token)

where the reference is the same base with the adapter switched off, so the policy, the reference and the value
head (a linear layer on the policy's last hidden state) share one copy of the base weights. GAE turns rewards and
values into advantages A_t (whitened) and returns R_t; then ``ppo_epochs`` passes over mini-batches minimise

    policy loss = mean_t max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps)),  ratio_t = pi / pi_old
    value loss  = 0.5 mean_t max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -eps_v, eps_v) - R_t)^2)
    loss        = policy loss + vf_coef * value loss

The KL coefficient is fixed, or adapted towards ``target_kl`` (Ziegler et al.'s proportional controller).
PPO does not fit the HF Trainer's loop; this file has its own small one (a torch optimizer), and the run saves
the adapter and writes the report as for every stage. The value head is saved next to it
(``value_head.safetensors``). Checkpoints (``checkpoint-<step>/``: adapter, value head, optimizer, KL coefficient,
data order, random states and the history so far) are written every ``train.save_steps`` steps (default: at the
end of each pass over the prompts) and after the last step (as the Trainer's), published whole by a rename and
rotated to ``train.save_total_limit``; ``--resume`` continues from one and ends where the uninterrupted run would.
The math (GAE, the losses, whitening, the KL controller, sampling) lives in ppo_math.py; this file re-exports it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..data.tasks import Collator
from ..data.templates import check_markers
from .checks import check_rollout_context
from .config import AlignArgs, RunConfig
from .config_align import ppo_micro_batches
from .ppo_checks import encode_prompts
from .ppo_math import (  # noqa: F401  (re-exported: the names other modules and tests import from here)
    KLController,
    RewardError,
    adamw_groups,
    gae,
    masked_mean,
    policy_loss,
    ppo_advantages,
    ppo_rewards,
    reward_values,
    sample_responses,
    value_clipfrac,
    value_loss,
    whiten,
)
from .ppo_reward import call_reward, import_reward
from .prepared import Prepared, read_splits
from .report import plot_panels

RewardFn = Callable[[Sequence[str], Sequence[str]], Any]
"""(prompts, responses) texts -> one reward per pair (a list or a (N,) tensor)."""


# -- the statistics --------------------------------------------------------------------------------------------


STATS = ("reward", "kl", "policy_loss", "value_loss", "clipfrac", "entropy", "response_length", "kl_coef")
"""The statistics plotted in ppo_stats.png."""


# -- the loop ------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One batch of sampled responses with what PPO needs of them (B rollouts, P prompt and R response positions)."""

    sequences: torch.Tensor  # (B, P + R): left-padded prompts, then responses (pad after EOS)
    attention_mask: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor  # (B, R): 1 up to and including the first EOS
    prompt_length: int  # P
    logprobs: torch.Tensor | None  # (B, R) under the sampling policy (set once scored, as are the next three)
    ref_logprobs: torch.Tensor | None  # (B, R) under the reference (adapter off)
    values: torch.Tensor | None  # (B, R)
    scores: torch.Tensor | None  # (B,) reward model scores
    prompts: list[str]
    responses: list[str]
    truncated: torch.Tensor | None = None  # (B,) True where the response has no EOS (align.missing_eos_penalty)


class PPOLoop:
    """PPO on a DeltaModel policy: rollouts, rewards, GAE, clipped updates of the adapter and the value head.

    Args:
        model: the policy, a DeltaModel over a causal LM whose active adapter trains.
        tokenizer: the policy's tokenizer (responses are decoded with it for the reward function).
        reward_fn: (prompts, responses) texts -> rewards; a ``scorers.RewardScorer`` or any Python function.
        align: PPO settings (the ``align`` section of the recipe).
        lr: AdamW learning rate for the adapter and the value head.
        max_grad_norm: gradient clipping norm (0: none).
        seed: seeds the value head's init and the sampling.
        weight_decay: AdamW's weight decay (the recipe's ``train.weight_decay``; torch's own default is 0.01).
        scheduler: a function optimizer -> LR scheduler, stepped once per PPO step (TRL's); default: constant.
        grad_accum: equal micro-batches per mini-batch, their gradients summed (each loss / grad_accum) before the
            step; it must divide every mini-batch (``config_align.ppo_micro_batches``), else ConfigError.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        reward_fn: RewardFn,
        align: AlignArgs,
        lr: float = 1e-5,
        max_grad_norm: float = 1.0,
        seed: int = 0,
        weight_decay: float = 0.0,
        scheduler: Callable | None = None,
        grad_accum: int = 1,
    ) -> None:
        self.model, self.tokenizer, self.reward_fn, self.align = model, tokenizer, reward_fn, align
        self.device = next(model.parameters()).device
        torch.manual_seed(seed)
        hidden = model.get_base_model().config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1).to(self.device)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: no spurious advantages at the first step
        nn.init.zeros_(self.value_head.bias)
        both = nn.ModuleDict({"policy": model, "value_head": self.value_head})
        self.optimizer = torch.optim.AdamW(adamw_groups(both, weight_decay), lr=lr, weight_decay=weight_decay)
        self.scheduler = scheduler(self.optimizer) if scheduler else None
        self.max_grad_norm, self.grad_accum = max_grad_norm, grad_accum
        self.kl_ctl = KLController(align.init_kl_coef, align.adaptive_kl, align.target_kl, align.kl_horizon)
        self.steps_done, self.runtime_s = 0, 0.0  # (runtime_s: the training time before a resume)
        # align.stop_token_id (TRL's): sampling stops at it and the response ends with it, in place of the EOS
        self.eos = tokenizer.eos_token_id if align.stop_token_id is None else align.stop_token_id
        check_stop_token(align, model.get_input_embeddings().num_embeddings)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # The model runs in eval mode throughout (no dropout), so pi_old, pi and the reference are computed alike.
    def _forward(self, r: Rollout, with_values: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs (B, R), values (B, R), entropy (B, R)) of the rollout's response tokens."""
        P = r.prompt_length
        position_ids = (r.attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at 0
        out = self.model(
            input_ids=r.sequences,
            attention_mask=r.attention_mask,
            position_ids=position_ids,
            output_hidden_states=with_values,
        )
        logits = out.logits[:, P - 1 : -1].float() / self.align.temperature  # (B, R, V): predicts the responses
        logp_all = F.log_softmax(logits, -1)
        logp = logp_all.gather(-1, r.sequences[:, P:].unsqueeze(-1)).squeeze(-1)  # (B, R)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        values = self.value_head(out.hidden_states[-1][:, P - 1 : -1].float()).squeeze(-1) if with_values else None
        return logp, values, entropy

    @torch.no_grad()
    def reference_logprobs(self, r: Rollout) -> torch.Tensor:
        """log ref(y_t) of the response tokens: the same model with the adapter switched off."""
        with self.model.disable_adapter():
            return self._forward(r, with_values=False)[0]

    @torch.no_grad()
    def rollout(self, prompts: Sequence[Sequence[int]], forwards: bool = True) -> Rollout:
        """Sample one response per prompt (token ids, no padding) and score it; ``forwards`` False leaves out the
        policy's, the value head's and the reference's forwards (log-probs, values: None), which an evaluation does
        not read."""
        from ..targets import context_length

        context = context_length(self.model.get_base_model().config)
        longest = max(len(p) for p in prompts)
        # a token adapter's virtual tokens take positions too, as the stage's checks.check_rollout_context counts them
        virtual = getattr(self.model.active_peft_config, "num_virtual_tokens", 0) or 0
        if context is not None and longest + virtual + self.align.max_new_tokens > context:  # (generate's IndexError)
            also = f" and the adapter's {virtual} virtual tokens" if virtual else ""
            raise ConfigError(f"align.max_new_tokens={self.align.max_new_tokens} plus the longest prompt ({longest} "
                              f"tokens){also} is more than the model's context of {context}; lower "
                              "align.max_new_tokens or shorten the prompts")  # fmt: skip
        ids, mask, response_mask, response, truncated = sample_responses(
            self.model, prompts, self.pad, self.eos, self.align
        )
        decode = self.tokenizer.batch_decode
        r = Rollout(
            torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1), response_mask, ids.shape[1],
            None, None, None, None,  # (logprobs, ref_logprobs, values, scores: below)
            decode([list(p) for p in prompts], skip_special_tokens=True), decode(response, skip_special_tokens=True),
        )  # fmt: skip
        if forwards:
            self._score_tokens(r)
        # One finite number per response, or one line naming the reward and the response (None, NaN, text...).
        names = [f"the response {t[:40]!r} to {p[:40]!r}" for p, t in zip(r.prompts, r.responses)]
        name = self.align.reward_model or "function"
        score_ids = getattr(self.reward_fn, "score_ids", None)  # (a transformers reward model: TRL's, on the ids)
        if score_ids:
            out = score_ids(r.sequences, self.pad, r.prompt_length)
        else:  # (a function that raises: one line naming it and the response, ppo_reward.call_reward)
            out = call_reward(self.reward_fn, name, r.prompts, r.responses)
        scores = reward_values(out, name, len(prompts), names)
        r.scores = torch.tensor(scores, dtype=torch.float32, device=self.device)
        r.truncated = truncated
        return r

    @torch.no_grad()
    def _score_tokens(self, r: Rollout) -> None:
        """Set ``r``'s log-probs, values and reference log-probs: the no-grad forwards, each over
        align.local_rollout_forward_batch_size rows (TRL's; left out: the update's micro-batch): the (rows, length,
        vocab) logits of a whole batch at once are the memory the update splits."""
        step = getattr(self.align, "local_rollout_forward_batch_size", None)  # (a key config_align may lack)
        step, parts, response_mask = step or max(1, self.align.mini_batch_size // self.grad_accum), [], r.response_mask
        for i in range(0, len(r.sequences), step):
            part = Rollout(r.sequences[i : i + step], r.attention_mask[i : i + step], response_mask[i : i + step],
                           r.prompt_length, None, None, None, None, [], [])  # fmt: skip
            logp, values, _ = self._forward(part)
            parts.append((logp, values, self.reference_logprobs(part)))
        logp, values, ref = (torch.cat(x) for x in zip(*parts))
        r.logprobs, r.values, r.ref_logprobs = logp * response_mask, values * response_mask, ref * response_mask

    def step(self, prompts: Sequence[Sequence[int]]) -> dict[str, float]:
        """One PPO step: a batch of rollouts, then ``ppo_epochs`` passes of clipped updates. Returns statistics."""
        return self.update(self.rollout(prompts))

    def update(self, r: Rollout) -> dict[str, float]:
        """The optimisation half of a step on a scored rollout: rewards, GAE, then ``ppo_epochs`` passes over
        mini-batches (``grad_accum`` micro-batches each, one optimizer step per mini-batch), as TRL's loop.

        Returns the step's statistics: deltatune's keys and TRL's (objective/kl, policy/approxkl_avg, ...); TRL's
        per-token averages are over response tokens (TRL's also count the padding after an EOS)."""
        a = self.align
        m = r.response_mask.float()
        scores = r.scores
        if a.missing_eos_penalty is not None and r.truncated is not None:
            scores = scores - a.missing_eos_penalty * r.truncated.float()
        t = ppo_rewards(r.logprobs, r.ref_logprobs, scores, m, self.kl_ctl.value, a.kl_estimator, a.whiten_rewards)
        advantages, returns = gae(t["rewards"], r.values, m, a.gamma, a.lam)  # (as ppo_math.ppo_advantages)
        advantages = whiten(advantages, m)
        B = len(r.sequences)
        mini = ppo_micro_batches(a, B, self.grad_accum)
        keys = ("policy_loss", "value_loss", "clipfrac", "entropy", "approxkl", "vf_clipfrac", "ratio")
        logs: dict[str, list[float]] = {k: [] for k in keys}
        for _ in range(a.ppo_epochs):
            for idx in torch.randperm(B).split(mini):
                self.optimizer.zero_grad(set_to_none=True)
                for sub_idx in idx.split(len(idx) // self.grad_accum):  # (grad_accum equal ones)
                    sub = _select(r, sub_idx)
                    logp, values, entropy = self._forward(sub)
                    mm = m[sub_idx]
                    pl, clipfrac = policy_loss(logp, r.logprobs[sub_idx], advantages[sub_idx], mm, a.cliprange)
                    vl = value_loss(values, r.values[sub_idx], returns[sub_idx], mm, a.cliprange_value)
                    loss = pl + a.vf_coef * vl
                    if not torch.isfinite(loss):  # stop before the update, as the Trainer's stages do
                        from .trainer import NonFiniteLossError

                        raise NonFiniteLossError(self.steps_done + 1, float(loss))
                    (loss / self.grad_accum).backward()  # (accelerate's backward divides so under accumulation)
                    with torch.no_grad():
                        diff = (logp - r.logprobs[sub_idx]) * mm
                        vc = value_clipfrac(values, r.values[sub_idx], returns[sub_idx], mm, a.cliprange_value)
                        stats = (pl, vl, clipfrac, masked_mean(entropy, mm), 0.5 * masked_mean(diff**2, mm), vc,
                                 masked_mean(diff.exp(), mm))  # fmt: skip
                    for key, v in zip(keys, stats):
                        logs[key].append(v.item())
                if self.max_grad_norm > 0:
                    params = [p for g in self.optimizer.param_groups for p in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's updates used (logged so, as the Trainer logs)
        if self.scheduler is not None:
            self.scheduler.step()
        stats = {k: sum(v) / len(v) for k, v in logs.items()}
        ratios = torch.tensor(logs["ratio"])
        mean_kl = t["kl"].sum(-1).mean().item()
        non_score = t["non_score_reward"].sum(-1).mean().item()
        stats.update(lr=lr, reward=r.scores.mean().item(), kl=mean_kl, kl_coef=self.kl_ctl.value)
        stats.update(response_length=m.sum(-1).mean().item())
        stats["loss"] = stats["policy_loss"] + a.vf_coef * stats["value_loss"]
        stats.update({  # TRL's PPO trainer's names
            "objective/kl": mean_kl, "objective/entropy": (-r.logprobs * m).sum(-1).mean().item(),
            "objective/non_score_reward": non_score, "objective/rlhf_reward": non_score + scores.mean().item(),
            "objective/scores": scores.mean().item(), "policy/approxkl_avg": stats["approxkl"],
            "policy/clipfrac_avg": stats["clipfrac"], "loss/policy_avg": stats["policy_loss"],
            "loss/value_avg": stats["value_loss"], "val/clipfrac_avg": stats["vf_clipfrac"],
            "policy/entropy_avg": stats["entropy"], "val/ratio": stats["ratio"],
            "val/ratio_var": ratios.var().item() if len(ratios) > 1 else 0.0,
            "val/num_eos_tokens": num_eos_tokens(r, self.tokenizer.eos_token_id),
        })  # fmt: skip
        for key in ("approxkl", "vf_clipfrac", "ratio"):
            del stats[key]
        self.kl_ctl.update(mean_kl, B)
        self.steps_done += 1
        return stats

    @torch.no_grad()
    def mean_reward(self, prompts: Sequence[Sequence[int]], batch_size: int) -> float:
        """Mean reward of sampled responses to ``prompts`` (no update; sampled and scored only: the rollout's
        forwards of policy, values and reference, which nothing here reads, are left out)."""
        parts = range(0, len(prompts), batch_size)
        scores = [self.rollout(prompts[i : i + batch_size], forwards=False).scores for i in parts]
        return torch.cat(scores).mean().item()


def num_eos_tokens(r: Rollout, eos: int | None) -> int:
    """TRL's val/num_eos_tokens: the tokenizer's EOS tokens in the responses, with align.stop_token_id too (TRL
    counts processing_class.eos_token_id, not the stop token), up to each response's end (TRL's raw responses hold
    only padding after it; a pad that is the EOS is not counted here)."""
    if eos is None:
        return 0
    return int((r.sequences[:, r.prompt_length :] == eos).logical_and(r.response_mask > 0).sum())


def _select(r: Rollout, idx: torch.Tensor) -> Rollout:
    return Rollout(
        r.sequences[idx], r.attention_mask[idx], r.response_mask[idx], r.prompt_length,
        r.logprobs[idx], r.ref_logprobs[idx], r.values[idx], r.scores[idx], [], [],
    )  # fmt: skip


# -- the stage -----------------------------------------------------------------------------------------------


def reward_function(
    spec: str | None,
    device: str | torch.device = "cpu",
    policy: nn.Module | None = None,
    policy_name: str | None = None,
    tokenizer=None,
    adapter_name: str = "reward",
    trust_remote_code: bool = False,
) -> RewardFn:
    """The reward named by ``align.reward_model``: a reward run folder (stage rm), a transformers
    sequence-classification folder (``scorers.TokenRewardModel``: TRL's PPOTrainer's reward model, scoring the
    policy's token ids) or ``module:function`` (or ``path/to/file.py:function``, as GRPO's reward_funcs).

    A reward run trained on the policy's own base (its ``model.name_or_path`` equals ``policy_name``) is loaded into
    ``policy`` as a second, frozen adapter with its head (``scorers.AdapterReward``: one copy of the base); any other
    reward run is loaded as a model of its own (``scorers.RewardScorer``) and scores re-tokenised text.

    Raises:
        ConfigError: not set, not a reward run, or the function cannot be imported.
    """
    if not spec:
        raise ConfigError(
            "align.reward_model is not set: give a reward-model run folder (stage rm) or module:function"
        )
    from .grpo_reward_model import is_model_folder

    if os.path.isdir(spec) and is_model_folder(spec):
        from .scorers import TokenRewardModel

        return TokenRewardModel(spec, device, trust_remote_code)
    if os.path.isdir(spec):
        from .scorers import AdapterReward, RewardScorer, reward_run, trains_base

        same_base = reward_run(spec).get("model", {}).get("name_or_path") == policy_name
        if policy is not None and same_base and not trains_base(spec, policy):
            return AdapterReward(policy, spec, tokenizer, adapter_name)  # (adapter_name: its name in the policy)
        return RewardScorer(spec, device=device)
    module = spec.rpartition(":")[0]
    if not module:
        raise ConfigError(f"align.reward_model {spec!r} is neither a folder nor of the form module:function")
    return import_reward(spec, "align.reward_model")  # (a module or a file, as GRPO's reward_funcs: names file:line)


def check_stop_token(align: AlignArgs, vocab: int) -> None:
    """ConfigError when align.stop_token_id is not a token of a vocabulary of ``vocab`` (generate's IndexError)."""
    if align.stop_token_id is not None and align.stop_token_id >= vocab:
        raise ConfigError(f"align.stop_token_id {align.stop_token_id} is not a token id (the vocabulary has {vocab} "
                          "tokens)")  # fmt: skip


def _check_reward_model(spec: str | None, tokenizer, longest: int = 0, cfg: RunConfig | None = None) -> None:
    """Fail before any model is loaded when align.reward_model names nothing usable (or, given the longest prompt
    and the run's ``cfg``, a transformers reward model too short for a prompt and its response)."""
    from .grpo_reward_model import is_model_folder

    if spec and os.path.isdir(spec) and is_model_folder(spec):
        from .ppo_checks import check_reward_context
        from .scorers import check_token_reward

        check_token_reward(spec, tokenizer)
        if cfg is not None:
            check_reward_context(spec, longest, cfg.align.max_new_tokens, cfg.model.trust_remote_code)
    elif spec and os.path.isdir(spec):
        from .scorers import reward_run

        reward_run(spec)
    else:
        reward_function(spec)


def prepare_ppo(cfg: RunConfig, tok) -> Prepared:
    """Prompts (left-truncated to data.max_length), the reward function, and the loop that trains on them.

    Raises:
        ConfigError: the longest prompt plus align.max_new_tokens exceeds the model's context, or the reward
            model cannot be found.
        DataError: a prompt is missing or empty, or over data.max_length under data.truncation=refuse.
    """
    from .models import resolve_path

    d, a = cfg.data, cfg.align
    from ..data.sample import as_written

    train_s, eval_s, template, data_notes = read_splits(cfg, tok)
    check_markers(tok, template)  # (rendered with the generation prompt: not checked there)

    (train, cut), (evals, cut_eval) = (  # each keeps the prompt's end (data.truncation=refuse: refused)
        encode_prompts(s, tok, template, d.max_length, d.truncation) if s else (None, 0) for s in (train_s, eval_s)
    )
    # The reward function reads a one-message prompt as the user's own words (as a reward run was trained on
    # them, and as a Python reward expects), not as the decoded chat template the policy samples after.
    plain = {
        tok.decode(ids, skip_special_tokens=True): as_written(s.messages[0])
        for ids, s in zip(train + (evals or []), train_s + (eval_s or []))
        if len(s.messages) == 1 and s.messages[0]["role"] == "user"
    }
    longest = max(len(p) for p in train + (evals or []))
    check_rollout_context(cfg, longest, resolve_path(cfg.model.name_or_path))
    _check_reward_model(a.reward_model, tok, longest, cfg)
    check_stop_token(a, len(tok))
    mini = ppo_micro_batches(a, cfg.train.batch_size, cfg.train.grad_accum)  # (before the model loads)
    notes = [
        f"PPO: {a.ppo_epochs} epochs of mini-batches of {mini} per batch of {cfg.train.batch_size} "
        f"rollouts, {a.max_new_tokens} new tokens each; KL coefficient {a.init_kl_coef}"
        + (f" adapted towards {a.target_kl}" if a.adaptive_kl else " (fixed)")
        + "; reference = the base with the adapter off"
        + (
            f"; responses stop at token id {a.stop_token_id} (align.stop_token_id)"
            if a.stop_token_id is not None
            else ""
        ),
        "![PPO statistics](ppo_stats.png)",
        *data_notes,
        *(f"{n} {split} prompts were longer than data.max_length={d.max_length}; their ends were kept"
          for split, n in (("train", cut), ("eval", cut_eval)) if n),
    ]  # fmt: skip

    def loop(
        model, tokenizer, run_cfg: RunConfig, checkpoint: str | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from .scorers import AdapterReward

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        reward_fn = reward_function(a.reward_model, device, model, run_cfg.model.name_or_path, tokenizer,
                                    trust_remote_code=run_cfg.model.trust_remote_code)  # fmt: skip
        shared, on_ids = isinstance(reward_fn, AdapterReward), hasattr(reward_fn, "score_ids")

        def rewards(prompts: Sequence[str], responses: Sequence[str]) -> Any:
            return reward_fn([plain.get(p, p) for p in prompts], responses)

        if on_ids:
            rewards = reward_fn  # (it scores the rollout's token ids, as TRL's PPOTrainer)
            prepared.notes.append(f"reward model {a.reward_model}: a transformers sequence classifier scoring the "
                                  "policy's token ids (TRL's PPOTrainer's reward model)")  # fmt: skip
        elif shared or os.path.isdir(a.reward_model or ""):
            # prepared.notes, not notes: the run may have replaced the list with a longer one since (run.py adds notes)
            prepared.notes.append(
                f"reward model {a.reward_model}: "
                + ("a second adapter on the policy's base (one copy of the weights)" if shared else
                   "a separate model scoring re-tokenised text")
            )  # fmt: skip
        try:
            # (run.py's facts: the data's bytes it hashed for the resume check, before the model loaded)
            facts = getattr(prepared, "run_facts", None)
            return train_ppo(model, tokenizer, run_cfg, train, evals, rewards, checkpoint, facts)
        finally:
            if shared:  # the saved run holds the policy adapter only
                model.delete_adapter(reward_fn.adapter_name)

    prepared = Prepared(train, evals, Collator(tok.pad_token_id), None, "reward", notes=notes, loop=loop)
    return prepared


def train_ppo(
    model: nn.Module,
    tokenizer,
    cfg: RunConfig,
    prompts: list[list[int]],
    eval_prompts: list[list[int]] | None,
    reward_fn: RewardFn,
    checkpoint: str | None = None,
    facts: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run PPO for ``train.max_steps`` steps (or ``train.epochs`` over the prompts) of ``train.batch_size``
    rollouts; returns (metrics, per-step log history). Saves the value head into ``output.dir``, and checkpoints
    as the module docstring says; with ``checkpoint`` the run continues from that one. ``facts``: the run's
    (runfolder.run_facts, as run.py read them before the model loaded), recorded in each checkpoint; None: read
    here."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    t = cfg.train
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    per_epoch = math.ceil(len(prompts) / t.batch_size)
    # TRL's count: num_total_batches = ceil(int(epochs * prompts) / batch_size) (only the count: TRL's batches do not
    # carry across passes, its repeat_generator drops a pass's last partial batch; here the data order carries on).
    # A run begun counting epochs * per_epoch (its first checkpoints hold no max_steps) keeps that count on every
    # resume: its later checkpoints record counted_per_pass.
    steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(int(t.epochs * len(prompts)) / t.batch_size))
    per_pass = False
    if checkpoint is not None and t.max_steps <= 0:
        from . import ppo_checkpoint

        per_pass = ppo_checkpoint.counted_per_pass(checkpoint)
        if per_pass:
            steps = max(1, math.ceil(t.epochs * per_epoch))
    warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * steps)

    def scheduler(opt):
        from transformers import get_scheduler

        return get_scheduler(t.scheduler, opt, num_warmup_steps=warmup, num_training_steps=steps)

    loop = PPOLoop(
        model, tokenizer, reward_fn, cfg.align, t.lr, t.max_grad_norm, t.seed, t.weight_decay, scheduler, t.grad_accum
    )
    g = torch.Generator().manual_seed(t.seed)
    metrics: dict[str, Any] = {}
    from . import ppo_checkpoint

    key = ppo_checkpoint.start_key(cfg, eval_prompts)  # (what eval_reward_before depends on: None, no start's eval)
    if checkpoint is not None and key:  # (kept by the checkpoint under this key: not sampled again)
        metrics.update(ppo_checkpoint.saved_metrics(checkpoint, key))
    if key and "eval_reward_before" not in metrics:
        metrics["eval_reward_before"] = loop.mean_reward(eval_prompts, t.eval_batch_size or t.batch_size)
    history: list[dict[str, Any]] = []
    order: list[int] = []
    first = 1
    if checkpoint is not None:
        first, order, history = ppo_checkpoint.load(checkpoint, loop, g)
        first += 1
        order = [i for i in order if i < len(prompts)]  # (--resume-changed onto fewer prompts: those left of the pass)
    every = t.save_steps or per_epoch
    if facts is None:  # (a direct caller's: the data's bytes as the run began, each checkpoint records them)
        from .runfolder import run_facts

        facts = run_facts(cfg)
    start = time.perf_counter() - loop.runtime_s  # a resumed run's: the whole run's time, as the Trainer stages'
    log = ppo_checkpoint.live_log(
        cfg.output.dir, history
    )  # one line per step as it happens (the board's live curves), as GRPO's
    bar = tqdm(range(first, steps + 1), desc="ppo", initial=first - 1, total=steps)
    for step in bar:
        if len(order) < t.batch_size:
            order += torch.randperm(len(prompts), generator=g).tolist()
        batch, order = [prompts[i] for i in order[: t.batch_size]], order[t.batch_size :]
        # TRL's episode (rollouts so far), epoch (episode / prompts) and eps (rollouts a second), as it logs them
        # (a running total: a run resumed with another batch size (--resume-changed) adds its own to the last row's)
        before = (step - 1) * t.batch_size  # (a first row, or a row of a checkpoint written before episode was)
        episode = (history[-1].get("episode", before) if history else before) + t.batch_size
        row = {"step": step, **loop.step(batch), "episode": episode, "epoch": episode / len(prompts)}
        row["eps"] = int(episode / max(time.perf_counter() - start, 1e-9))
        history.append({**row, "wall_time": round(time.time(), 3)})
        log([history[-1]])
        bar.set_postfix(reward=f"{history[-1]['reward']:.3f}", kl=f"{history[-1]['kl']:.2f}", refresh=False)
        if step % every == 0 or step == steps:  # (the last too, as the Trainer's: a stop in the eval keeps the run)
            loop.runtime_s = time.perf_counter() - start
            ppo_checkpoint.save(
                cfg.output.dir, step, loop, g, order, history, t.save_total_limit, facts, steps, per_pass, metrics, key
            )
    tail = history[-max(1, len(history) // 10) :]  # the last tenth of the run, so one noisy batch does not decide
    metrics.update(
        train_loss=sum(h["loss"] for h in history) / len(history),
        train_steps=steps,
        train_runtime_s=round(time.perf_counter() - start, 2),
        reward_first=history[0]["reward"],
        reward_last=sum(h["reward"] for h in tail) / len(tail),
        kl_last=sum(h["kl"] for h in tail) / len(tail),
    )
    if eval_prompts:
        metrics["eval_reward"] = loop.mean_reward(eval_prompts, t.eval_batch_size or t.batch_size)
    out = cfg.output.dir
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in loop.value_head.state_dict().items()},
        os.path.join(out, "value_head.safetensors"),
    )
    plot_panels(history, list(STATS), os.path.join(out, "ppo_stats.png"))
    return metrics, history
