"""Reward model (stage ``rm``): a scalar head on a causal LM or encoder, trained on preference pairs.

The model is ``AutoModelForSequenceClassification`` with one output (the head is saved with the adapter, as
modules_to_save of task type SEQ_CLS). For each pair it scores (prompt, chosen) and (prompt, rejected) and
minimises the Bradley-Terry ranking loss (Stiennon et al. 2020; Ouyang et al. 2022):

    loss = mean over pairs of -log sigmoid(r_chosen - r_rejected)

Eval: pairwise accuracy (the share of pairs with r_chosen > r_rejected) and the mean margin r_chosen - r_rejected.
``RewardScorer`` loads a finished reward run to score text for PPO.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.encode import score_inputs, scorer_template
from ..data.preference import PairCollator
from ..data.tasks import Encoded
from .config import RunConfig
from .prepared import Prepared, _note_truncated, read_splits
from .trainer import DeltaTrainer


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry ranking loss: mean of -log sigmoid(chosen - rejected).

    Args:
        chosen: (B,) rewards of the preferred responses.
        rejected: (B,) rewards of the dispreferred responses.

    Returns:
        The scalar mean loss; log 2 when every margin is 0.
    """
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


def pair_metrics(scores: np.ndarray) -> dict[str, float]:
    """Pairwise accuracy (strictly r_chosen > r_rejected) and mean margin from (N, 2) [chosen, rejected] scores."""
    margin = scores[:, 0] - scores[:, 1]
    return {"accuracy": float((margin > 0).mean()), "margin": float(margin.mean())}


class PairTrainer(DeltaTrainer):
    """DeltaTrainer for preference pairs (rm, dpo): ``compute_loss(..., return_outputs=True)`` gives
    (loss, (B, 2) [chosen, rejected] scores), and those scores are the eval predictions (labels are dummies)."""

    def log_rewards(self, chosen: torch.Tensor, rejected: torch.Tensor, margins: bool = True) -> None:
        """Log the means of the chosen and rejected rewards (their margin), and how often chosen wins."""
        self.log_stat("rewards/chosen", chosen.mean().item())
        self.log_stat("rewards/rejected", rejected.mean().item())
        if margins:
            self.log_stat("rewards/margins", (chosen - rejected).mean().item())
        self.log_stat("rewards/accuracies", (chosen > rejected).float().mean().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, scores = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), scores.detach().float(), torch.zeros(scores.shape[0], device=scores.device)


class RewardTrainer(PairTrainer):
    """PairTrainer with the pairwise loss on the model's scalar scores."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        scores = model(**inputs).logits.squeeze(-1)  # (2B,): the B chosen, then the B rejected
        chosen, rejected = scores.chunk(2)
        loss = pairwise_loss(chosen, rejected)
        return (loss, torch.stack([chosen, rejected], -1)) if return_outputs else loss


def encode_pair_splits(
    cfg: RunConfig, tok, causal: bool, pair_scorer: bool = False
) -> tuple[Encoded, Encoded | None, list[str]]:
    """The train and (optional) eval preference rows (any preference format, ``formats.read_samples``) rendered
    with the chat template and encoded (``encode.encode_pair_samples``), and the report notes (format, first rows
    as rendered, pairs skipped under data.bad_pairs=skip, rows truncated)."""
    from ..data.encode import encode_pair_samples

    d = cfg.data
    train_s, eval_s, template, notes = read_splits(cfg, tok, pair_scorer=pair_scorer)

    def enc(samples) -> Encoded:
        return encode_pair_samples(samples, tok, template, d.max_length, d.truncation, causal=causal)

    train = enc(train_s)
    ev = enc(eval_s) if eval_s else None
    _note_truncated(notes, "train", train.truncated, d.max_length)
    _note_truncated(notes, "eval", ev.truncated if ev else 0, d.max_length)
    return train, ev, notes


def _is_encoder(cfg: RunConfig) -> bool:
    """Whether the base is an encoder (a masked-LM family such as BERT), which scores (prompt, response) through
    its pair template rather than a chat template."""
    from transformers import AutoConfig

    from .models import resolve_path

    try:
        config = AutoConfig.from_pretrained(
            resolve_path(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError):
        return False  # the model loader reports this more clearly
    return _is_encoder_config(config)


def _is_encoder_config(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def prepare_rm(cfg: RunConfig, tok) -> Prepared:
    """Preference rows -> (prompt, response) pairs for a one-output sequence classifier.

    Raises:
        ConfigError: model.num_labels is set to anything but 1.
    """
    from ..config import ConfigError

    if cfg.model.num_labels not in (None, 1):
        raise ConfigError(f"stage rm trains a scalar reward: model.num_labels must be 1, got {cfg.model.num_labels}")
    cfg.model.num_labels = 1  # recorded in run.yaml, so eval and PPO rebuild the same head
    train, ev, notes = encode_pair_splits(cfg, tok, causal=False, pair_scorer=_is_encoder(cfg))

    def compute(p) -> dict[str, float]:
        return pair_metrics(np.asarray(p.predictions))

    return Prepared(
        train.examples,
        ev.examples if ev else None,
        PairCollator(tok.pad_token_id),
        compute,
        "eval_accuracy",
        notes=notes,
        trainer_class=RewardTrainer,
    )


class RewardScorer:
    """Scores (prompt, response) texts with a finished reward run (a folder written by ``deltatune train`` with
    stage rm). Text goes in, so the reward model's own tokenizer encodes it: a policy with another tokenizer is
    scored correctly (its ids are decoded to text first, then re-tokenised here).

    Args:
        run_dir: the reward run folder.
        max_length: longest scored input in tokens (default: the reward run's data.max_length).
        device: where the reward model runs.
    """

    def __init__(self, run_dir: str, max_length: int | None = None, device: str | torch.device = "cpu") -> None:
        from .run import load_adapter_model

        recipe = reward_run(run_dir)
        self.model, self.tokenizer = load_adapter_model(run_dir)
        self.model.to(device).eval()
        self.max_length = max_length or int(recipe.get("data", {}).get("max_length", 512))
        self.device = torch.device(device)
        self.template = scorer_template(recipe, self.tokenizer, _is_encoder_config(self.model.config))

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """One reward per (prompt, response): (N,) float tensor, the pair rendered as the reward run rendered it."""
        examples = [
            score_inputs(self.tokenizer, self.template, p, r, self.max_length) for p, r in zip(prompts, responses)
        ]
        from ..data.tasks import Collator

        batch = Collator(self.tokenizer.pad_token_id)(examples)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return self.model(**batch).logits.squeeze(-1).float().cpu()


def reward_run(run_dir: str) -> dict:
    """The recipe of a finished reward run (its run.yaml).

    Raises:
        ConfigError: the folder holds no run.yaml, or the run is not stage rm.
    """
    import yaml

    from ..config import ConfigError
    from .run import RUN_FILE

    path = os.path.join(run_dir, RUN_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"reward model {run_dir!r} holds no {RUN_FILE}; give a folder written by a stage rm run")
    with open(path, encoding="utf-8") as fh:
        recipe = yaml.safe_load(fh) or {}
    if recipe.get("stage") != "rm":
        raise ConfigError(f"reward model {run_dir!r} is a stage {recipe.get('stage')!r} run, not a reward model (rm)")
    return recipe


class AdapterReward:
    """A reward run trained on the policy's own base, loaded into the policy as a second adapter (frozen) plus its
    scalar head: scoring switches to that adapter for one forward pass and back, so the policy, the reference and
    the reward model share one copy of the base weights.

    The score is the head applied to the last hidden state of the last non-padding token, as
    ``AutoModelForSequenceClassification`` computes it on a decoder.

    Args:
        model: the policy (a DeltaModel over a causal LM of the base the reward run was trained on).
        run_dir: the reward run folder.
        tokenizer: the policy's tokenizer (the same base, so the reward run's tokenizer too).
        adapter_name: the name the reward adapter gets in ``model``.
    """

    def __init__(self, model, run_dir: str, tokenizer, adapter_name: str = "reward") -> None:
        from ..files import key_prefix, read_weights, split_heads
        from ..registry import from_pretrained

        recipe = reward_run(run_dir)
        config = from_pretrained(run_dir)
        tensors, _ = read_weights(run_dir, None, None, allow_pickle=False)
        _, heads = split_heads(tensors, config.modules_to_save, key_prefix(config))
        head = {k.rpartition(".")[2]: v for k, v in heads.items()}
        if "weight" not in head or head["weight"].shape[0] != 1:
            raise ValueError(f"{run_dir}: no scalar head among the adapter's tensors (modules_to_save)")
        device = next(model.parameters()).device
        self.head = torch.nn.Linear(head["weight"].shape[1], 1, bias="bias" in head).to(device)
        with torch.no_grad():
            for key, value in head.items():
                getattr(self.head, key).copy_(value)
        self.template = scorer_template(recipe, tokenizer, encoder=False)  # the policy's base: a decoder
        self.head.requires_grad_(False)
        # The backbone part of the adapter fits the causal LM as it is (same module paths): load it without the head.
        model.load_adapter(run_dir, adapter_name, modules_to_save=False)
        self.model, self.tokenizer, self.adapter_name = model, tokenizer, adapter_name
        self.max_length = int(recipe.get("data", {}).get("max_length", 512))

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """One reward per (prompt, response): (N,) float tensor."""
        from ..data.tasks import Collator

        examples = [
            score_inputs(self.tokenizer, self.template, p, r, self.max_length) for p, r in zip(prompts, responses)
        ]
        batch = Collator(self.tokenizer.pad_token_id)(examples)  # right padding
        device = next(self.head.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        active = list(self.model.active_adapters)
        self.model.set_adapter(self.adapter_name)
        try:
            hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        finally:
            self.model.set_adapter(active)
        last = mask.sum(-1) - 1  # (N,): the last real token of each row
        return self.head(hidden[torch.arange(len(last), device=device), last].float()).squeeze(-1).cpu()
