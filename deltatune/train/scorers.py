"""Finished reward runs as reward functions for the online stages (ppo, grpo): ``RewardScorer`` loads the reward
model on its own; ``AdapterReward`` loads it into the policy as a second, frozen adapter (one copy of the base).
Both score (prompt, response) texts rendered as the reward run rendered them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.encode import score_inputs, scorer_template
from .grpo_reward_model import paired
from .runs import read_recipe


def is_encoder_config(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


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
        self.template = scorer_template(recipe, self.tokenizer, is_encoder_config(self.model.config))

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """One reward per (prompt, response): (N,) float tensor, the pair rendered as the reward run rendered it.

        Raises:
            ValueError: the two lists differ in length.
        """
        if not paired(prompts, responses):
            return torch.zeros(0)
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
        ConfigError: the folder holds no run.yaml, the run is not stage rm, or it holds no adapter yet.
    """
    import os

    from ..config import ConfigError

    recipe = read_recipe(run_dir, "give a folder written by a stage rm run")
    if recipe.get("stage") != "rm":
        raise ConfigError(f"reward model {run_dir!r} is a stage {recipe.get('stage')!r} run, not a reward model (rm)")
    if not os.path.isfile(os.path.join(run_dir, "adapter_config.json")):  # (else a FileNotFoundError once loaded)
        raise ConfigError(f"reward model {run_dir!r} holds no adapter yet (no adapter_config.json): a stage rm run "
                          "that has not finished (it saves its adapter at the end); finish it first")  # fmt: skip
    return recipe


def trains_base(run_dir: str, policy) -> bool:
    """Whether the reward run's adapter trains base parameters in place (LoRA's bias, BitFit, freeze, full): loaded
    into the policy beside its adapter, its weights would overwrite the policy's own and the KL reference's (the
    adapter switched off), so it is loaded as a model of its own (``RewardScorer``) instead."""
    from .. import load_config
    from ..status import trains_base as in_place

    return in_place(load_config(run_dir), policy.get_base_model())


class AdapterReward:
    """A reward run trained on the policy's own base, loaded into the policy as a second adapter (frozen) plus its
    scalar head: scoring switches to that adapter for one forward pass and back, so the policy, the reference and
    the reward model share one copy of the base weights.

    The score is the head applied to the last hidden state of the last token that is not the pad token, as
    ``AutoModelForSequenceClassification`` computes it on a decoder (and as the reward run trained it).

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
        """One reward per (prompt, response): (N,) float tensor.

        Raises:
            ValueError: the two lists differ in length.
        """
        from ..data.tasks import Collator

        if not paired(prompts, responses):
            return torch.zeros(0)

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
        # (N,): the last token of each row that is not the pad token, as the classifier picks it; where the pad is
        # the end-of-turn token that closes the rendered pair (Llama 3's), the mask's last token scored that instead.
        pad = self.tokenizer.pad_token_id
        real = mask.bool() if pad is None else ids != pad
        last = (torch.arange(ids.shape[-1], device=device) * real).argmax(-1)
        return self.head(hidden[torch.arange(len(last), device=device), last].float()).squeeze(-1).cpu()


class TokenRewardModel:
    """A transformers sequence-classification folder (one label, no deltatune run) as PPO's reward model, as TRL's
    PPOTrainer takes one: it scores the policy's own token ids, so it must share the policy's tokenizer. As TRL's
    ``get_reward``: the left-padded prompt and the response (padded after its end) with the attention mask
    ``ids != pad`` (pads at 0), positions the exclusive cumsum of that mask, the score head on the backbone's last
    hidden state at the response's last token before its first pad (where the pad is the EOS, the token before it).

    Args:
        path: the folder (config.json, weights).
        device: where it runs.
        trust_remote_code: the recipe's model.trust_remote_code.
    """

    def __init__(self, path: str, device: str | torch.device = "cpu", trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForSequenceClassification

        from ..config import ConfigError

        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, trust_remote_code=trust_remote_code
            )
        except ValueError as exc:  # (transformers' multi-line refusal of a folder of its own code, untrusted)
            if trust_remote_code or "trust_remote_code" not in str(exc):
                raise
            raise ConfigError(f"align.reward_model {path!r} runs its own code (auto_map in its config.json): set "
                              "model.trust_remote_code: true (trust_remote_code=True) only if you trust that "
                              "code") from None  # fmt: skip
        if not hasattr(self.model, "score") or not hasattr(self.model, self.model.base_model_prefix):
            raise ConfigError(f"align.reward_model {path!r}: a {type(self.model).__name__} has no score head on a "
                              "decoder backbone (TRL's PPOTrainer scores with model.score); train a reward run "
                              "(stage rm) instead")  # fmt: skip
        self.model.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def score_ids(self, query_responses: torch.Tensor, pad: int, context_length: int) -> torch.Tensor:
        """(B,) scores of (B, P + R) left-padded prompts and their responses (TRL's get_reward)."""
        device = next(self.model.parameters()).device
        query_responses = query_responses.to(device)
        mask = query_responses != pad
        backbone = getattr(self.model, self.model.base_model_prefix)
        out = backbone(input_ids=query_responses.masked_fill(~mask, 0), attention_mask=mask,
                       position_ids=mask.cumsum(1) - mask.long(), use_cache=False)  # fmt: skip
        logits = self.model.score(out.last_hidden_state).squeeze(-1).float()  # (B, P + R)
        is_pad = query_responses[:, context_length:] == pad
        first = torch.where(is_pad.any(-1), is_pad.float().argmax(-1), is_pad.shape[1])  # (no pad: the row's end)
        return logits[torch.arange(len(logits), device=device), first - 1 + context_length].cpu()


def check_token_reward(spec: str, tokenizer) -> None:
    """ConfigError, one line naming align.reward_model, unless the folder ``spec`` is a one-label sequence classifier
    on a decoder backbone (TokenRewardModel's, as TRL's get_reward: an encoder's has no ``score`` head) whose
    tokenizer reads the policy's ids alike (each policy token at its id; tokens added after them are fine; a folder
    without a tokenizer: a vocabulary of at least the policy's): TRL's PPOTrainer feeds it the policy's token ids.
    Reads files only; loads no model."""
    from transformers import AutoConfig

    from ..config import ConfigError
    from .grpo_reward_model import check_model_folder
    from .models import load_tokenizer

    try:
        check_model_folder(spec)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("align.reward_funcs", "align.reward_model", 1)) from None
    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=False)  # (None: asks on stdin)
    except (OSError, ValueError):  # (a remote config: loaded, and checked, with the model)
        config = None
    if config is not None and is_encoder_config(config):  # (TokenRewardModel's refusal, before the policy loads)
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as NAMES

        name = NAMES.get(config.model_type, f"{config.model_type} model")
        raise ConfigError(f"align.reward_model {spec!r}: a {name} has no score head on a decoder backbone (TRL's "
                          "PPOTrainer scores with model.score); train a reward run (stage rm) instead")  # fmt: skip
    # A folder whose tokenizer does not load (none, only its options, damaged, of its own code) is checked by its
    # vocabulary: TRL's PPOTrainer reads no tokenizer of it. load_tokenizer refuses too the one transformers 5 builds
    # of its defaults from a folder without its vocabulary files, where 4.x raised (GPT-2's, OPT's, Qwen2's of one
    # token, BERT's, RoBERTa's, Gemma's, GPT-NeoX's, T5's of a few)
    try:
        theirs = load_tokenizer(spec).get_vocab()
    except (ConfigError, ValueError, TypeError, AttributeError, KeyError):
        theirs = None
    ours = tokenizer.get_vocab()
    moved = sorted((i, t) for t, i in ours.items() if theirs.get(t) != i) if theirs is not None else []
    other = moved[0][1] if moved else None  # (the lowest id: the same token named every time)
    # (a reward tokenizer that only adds tokens, a [PAD] as TRL's examples add, reads the policy's ids alike)
    if other is not None:
        raise ConfigError(f"align.reward_model {spec!r}: its tokenizer is not the policy's ({len(theirs)} tokens, the "
                          f"policy's {len(ours)}; the policy's token {other!r} is id {ours[other]}, there "
                          f"{theirs.get(other, 'none')}); a transformers reward model scores the policy's token "
                          "ids, as TRL's PPOTrainer (a reward run, stage rm, scores re-tokenised text)")  # fmt: skip
    if theirs is not None or config is None:
        return
    vocab = config.get_text_config().vocab_size
    if vocab < len(ours):
        raise ConfigError(f"align.reward_model {spec!r}: its vocabulary of {vocab} tokens is smaller than the policy "
                          f"tokenizer's {len(ours)}; a transformers reward model scores the policy's token ids, as "
                          "TRL's PPOTrainer")  # fmt: skip
