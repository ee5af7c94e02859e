"""The ``align`` section of a recipe: the alignment stages' keys (dpo, ppo, grpo, kto, orpo, simpo) and their checks.

Split from train/config.py (which re-exports every name here) when that file reached its line limit.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field, fields
from typing import Any

from ..config import ConfigError
from .config_grpo import _validate_sampling  # (the generation checks: split for room)


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002  (the dataclass field's help text)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                  "aot", "aot_unpaired", "apo_down", "discopop", "sft", "sigmoid_norm")  # fmt: skip
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")  # (stage kto; its default sigmoid, DPO's, reads as kto)
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")  # the DPO losses that read label_smoothing
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
GRPO_LOSS_TYPES = {"grpo": "sequence", "bnpo": "token", "dapo": "token", "dr_grpo": "dr_grpo", "cispo": "token",
                   "sapo": "sequence", "luspo": "luspo"}  # fmt: skip
"""TRL's GRPO loss_type names deltatune has, and the align.loss_norm each means (bnpo: the token mean of each
align.mini_batch_size chunk, as TRL's of each device micro-batch; dapo: over the slice's share of the generation
batch); cispo and sapo also change the policy term (``grpo_loss.POLICY_TERMS``)."""
GRPO_REFUSED = ("vespo",)  # TRL's other GRPO losses: refused by name
UNBUILT_TRL_DEFAULTS = {"truncation_mode": "keep_start", "padding_free": False}
"""TRL 1.16 DPOConfig's defaults of the ``ALIGN_UNBUILT`` keys: what deltatune does, so a recipe (a DPOConfig's
to_dict) setting one of them to exactly that value is taken, the key dropped (``unbuilt_default``)."""
ALIGN_UNBUILT = {
    k: f"align.{k} (TRL's DPOConfig) is not built: {why} (or set TRL's default, {str(UNBUILT_TRL_DEFAULTS[k]).lower()})"
    for k, why in {
        "truncation_mode": "the causal stages keep each side's first data.max_length tokens (TRL 1.16's keep_start; "
        "its keep_end is deprecated); drop it",
        "padding_free": "data.packing is sft's and pt's; TRL 1.16's DPOTrainer falls back to padding too; drop it",
    }.items()
}
"""TRL DPOConfig keys the align section does not take, each with why: the unknown-key error names it."""


def unbuilt_default(key: str, value: Any) -> bool:
    """Whether ``align.key: value`` is an ``ALIGN_UNBUILT`` key at TRL's default (``UNBUILT_TRL_DEFAULTS``)."""
    d = UNBUILT_TRL_DEFAULTS.get(key, ...)
    return type(value) is type(d) and value == d or type(d) is float and type(value) is int and value == d


F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


@dataclass
class AlignArgs:
    """The alignment stages' settings (dpo, ppo, grpo, kto, orpo, simpo); other stages ignore this section."""

    beta: float = _f(0.1, "DPO, KTO, SimPO: temperature of the implicit reward; ORPO: weight of the odds-ratio "
                     "term; GRPO: KL coefficient (0: no reference pass).")  # fmt: skip
    loss_type: str | list = _f("sigmoid", "DPO loss: one of " + ", ".join(DPO_LOSS_TYPES) + ", each as TRL's "
                               "loss_type of that name; or a list of them, summed by align.loss_weights. KTO: kto "
                               "(the default) or apo_zero_unpaired, as TRL's KTO loss_type. GRPO: grpo, dapo, bnpo or "
                               "dr_grpo, cispo, sapo or luspo, as TRL's (sets align.loss_norm; the default, sigmoid: loss_norm decides). "
                               "CPO: sigmoid, hinge, ipo or simpo, as TRL's CPO loss_type.")  # fmt: skip
    loss_weights: list | None = _f(None, "DPO: one weight per align.loss_type in the list (default: 1 each).")
    discopop_tau: float = _f(0.05, "DPO discopop: temperature of the mixing coefficient (TRL's discopop_tau).")
    f_divergence_type: str = _f("reverse_kl", "DPO: f-DPO's divergence, " + ", ".join(F_DIVERGENCES) + " (TRL's).")
    f_alpha_divergence_coef: float = _f(0.5, "DPO f_divergence_type alpha_divergence: its alpha (TRL's default).")
    label_smoothing: float = _f(
        0.0, "DPO sigmoid, robust, exo_pair, aot, aot_unpaired: assumed fraction of flipped labels, in [0, 0.5)."
    )
    ld_alpha: float | None = _f(None, "DPO: LD-DPO's alpha in [0, 1] (TRL's ld_alpha): each pair's response tokens "
                                "beyond the shorter one's count weigh alpha in the summed log-probs; null: off.")  # fmt: skip
    precompute_ref: bool = _f(False, "DPO, KTO: compute the reference log-probs once before training (one pass, no "
                              "reference forward per step).")  # fmt: skip
    precompute_ref_log_probs: bool = _f(False, "DPO, KTO: TRL's name for align.precompute_ref (either one turns it "
                                        "on).")  # fmt: skip
    precompute_ref_batch_size: int | None = _f(None, "DPO, KTO: pairs (rows) per forward of the precomputed "
                                               "reference (TRL's); null: train.batch_size for the train split, "
                                               "train.eval_batch_size for the eval split, as TRL's).")  # fmt: skip
    sync_ref_model: bool = _f(False, "DPO, KTO: TR-DPO (TRL's sync_ref_model): with a method that trains the base in "
                              "place (full, freeze, bitfit) the reference is a copy of the starting policy, mixed "
                              "toward it; refused with an adapter and with precompute_ref, as TRL refuses them.")  # fmt: skip
    ref_model_mixup_alpha: float = _f(0.6, "DPO, KTO: TR-DPO's alpha in [0, 1]: every ref_model_sync_steps the "
                                      "reference becomes alpha * policy + (1 - alpha) * reference.")  # fmt: skip
    ref_model_sync_steps: int = _f(512, "DPO, KTO: TR-DPO's tau: the optimizer steps between two mixings.")
    use_weighting: bool = _f(False, "DPO: WPO's weighting (TRL's use_weighting): each pair's loss times its responses' "
                             "length-normalised probabilities under the policy, no gradient through them.")  # fmt: skip
    disable_dropout: bool = _f(True, "DPO, KTO, ORPO, SimPO, CPO, RM: every dropout module of the model (the "
                               "adapter's lora_dropout too) set to 0 on the model, not restored after training, as "
                               "TRL's disable_dropout (its default).")  # fmt: skip
    reward_model: str | None = _f(None, "PPO: a reward-model run folder (stage rm), a transformers "
                                  "sequence-classification folder with the policy's tokenizer (TRL's reward_model), "
                                  "or 'module:function' (or 'path/to/file.py:function') scoring (prompts, "
                                  "responses) -> rewards.")  # fmt: skip
    max_new_tokens: int = _f(32, "PPO, GRPO: response tokens generated per prompt (left out on stage ppo: 53, TRL's "
                             "PPOConfig response_length).")  # fmt: skip
    temperature: float = _f(1.0, "PPO, GRPO: sampling temperature of the rollouts (left out on stage ppo: 0.7, TRL's "
                            "PPOConfig temperature; GRPO's is 1).")  # fmt: skip
    ppo_epochs: int = _f(4, "PPO: optimisation passes over each batch of rollouts.")
    mini_batch_size: int = _f(4, "PPO: rollouts per gradient step within a PPO epoch (left out, with "
                              "num_mini_batches: train.batch_size, TRL's num_mini_batches 1); GRPO: completions per "
                              "forward.")  # fmt: skip
    cliprange: float = _f(0.2, "PPO, GRPO: clip range of the policy ratio.")
    cliprange_value: float = _f(0.2, "PPO: clip range of the value update.")
    vf_coef: float = _f(0.1, "PPO: weight of the value loss.")
    gamma: float = _f(1.0, "PPO: discount factor.")
    lam: float = _f(0.95, "PPO: GAE lambda.")
    init_kl_coef: float = _f(0.05, "PPO: coefficient of the per-token KL penalty against the reference (TRL's "
                             "PPOConfig kl_coef default; its old PPOv1 init_kl_coef was 0.2).")  # fmt: skip
    adaptive_kl: bool = _f(False, "PPO: adapt the KL coefficient towards target_kl (Ziegler et al. 2019).")
    target_kl: float = _f(6.0, "PPO: target KL per rollout for the adaptive controller.")
    kl_horizon: int = _f(10000, "PPO: horizon of the adaptive KL controller.")
    kl_estimator: str = _f("k1", "PPO: the per-token KL estimate, k1 (log pi - log ref) or k3 ((ref / pi - 1) - "
                           "log(ref / pi), lower variance), as TRL's kl_estimator.")  # fmt: skip
    missing_eos_penalty: float | None = _f(None, "PPO: subtracted from the score of a response with no EOS (or no "
                                           "align.stop_token_id) within max_new_tokens (TRL's missing_eos_penalty); "
                                           "null: none.")  # fmt: skip
    stop_token: str | None = _f(None, "PPO: TRL's stop_token: eos, or null; both stop the responses at the EOS here "
                                "(TRL's null samples past it).")  # fmt: skip
    stop_token_id: int | None = _f(None, "PPO: responses stop at this token id, not the EOS, and end with it (TRL's "
                                   "stop_token_id); null: the tokenizer's EOS.")  # fmt: skip
    whiten_rewards: bool = _f(False, "PPO: whiten the per-token rewards (scale to variance 1 over the batch's response "
                              "tokens, mean kept) before GAE, as TRL's whiten_rewards.")  # fmt: skip
    kl_coef: float | None = _f(None, "PPO: TRL's name for align.init_kl_coef (set one of them).")
    num_ppo_epochs: int | None = _f(None, "PPO: TRL's name for align.ppo_epochs (set one of them).")
    response_length: int | None = _f(None, "PPO: TRL's name for align.max_new_tokens (set one of them).")
    num_mini_batches: int | None = _f(None, "PPO: TRL's: mini-batches per batch of rollouts; sets align."
                                      "mini_batch_size to train.batch_size / num_mini_batches (a "
                                      "different mini_batch_size set beside it is refused).")  # fmt: skip
    local_rollout_forward_batch_size: int | None = _f(None, "PPO: rows per no-grad forward of a batch's rollouts "
                                                      "(policy, values, reference; TRL's); null: the update's "
                                                      "micro-batch, align.mini_batch_size / train.grad_accum. "
                                                      "Unlike TRL, generation still runs on the whole batch (only "
                                                      "the no-grad forwards are chunked).")  # fmt: skip
    num_generations: int = _f(8, "GRPO: completions sampled per prompt (the group; G >= 2).")
    num_generations_eval: int | None = _f(None, "GRPO: completions sampled per eval prompt for eval_reward, their "
                                          "mean (TRL's; null: 1, where TRL's null is num_generations).")  # fmt: skip
    top_p: float = _f(1.0, "GRPO: nucleus sampling of the completions (1: sample from the whole distribution).")
    top_k: int = _f(0, "GRPO: sample from the k likeliest tokens only (0: all), as TRL's top_k.")
    min_p: float | None = _f(None, "GRPO: drop tokens less likely than min_p times the likeliest (TRL's; null: off).")
    repetition_penalty: float = _f(1.0, "GRPO: generate's repetition penalty while sampling (TRL's; 1: none). The "
                                   "log-probs stay the policy's own, as TRL's.")  # fmt: skip
    generation_kwargs: dict | None = _f(None, "GRPO: more transformers GenerationConfig settings for the sampling, "
                                        "over the keys above (TRL's generation_kwargs).")  # fmt: skip
    num_iterations: int = _f(
        1, "GRPO: optimisation steps per generation batch (mu); above 1 the importance ratio pi / pi_old matters."
    )
    steps_per_generation: int | None = _f(1, "GRPO: optimizer steps per generation batch (TRL's; null: 1): its "
                                          "train.batch_size x num_generations completions, shuffled, split into that "
                                          "many equal slices, one update each (every num_iterations pass); old "
                                          "log-probs kept from the sampling.")  # fmt: skip
    scale_rewards: bool | str = _f(True, "GRPO: divide advantages by the reward std of their group (true, 'group'), "
                                   "of the whole batch ('batch') or not at all (false, 'none': Dr. GRPO), as TRL's.")  # fmt: skip
    loss_norm: str = _f("sequence", "GRPO: 'sequence' (each completion's token mean, then their mean; TRL's grpo), "
                        "'token' (TRL's dapo) or 'dr_grpo' (token sum / (completions x max_new_tokens)).")  # fmt: skip
    cliprange_high: float | None = _f(None, "GRPO: upper clip range, ratio <= 1 + cliprange_high (DAPO's clip-higher, "
                                      "TRL's epsilon_high); null: align.cliprange.")  # fmt: skip
    delta: float | None = _f(None, "GRPO: two-sided clip (INTELLECT-2, TRL's delta): the unclipped ratio is capped at "
                             "delta (> 1; TRL recommends > 1 + cliprange); null: off.")  # fmt: skip
    importance_sampling_level: str = _f("token", "GRPO: 'token' (a ratio per token) or 'sequence' (GSPO: one per "
                                        "completion, the exp of its mean log-ratio), as TRL's.")  # fmt: skip
    mask_truncated_completions: bool = _f(False, "GRPO: completions with no EOS within max_new_tokens count in no "
                                          "loss term (DAPO; TRL's).")  # fmt: skip
    top_entropy_quantile: float = _f(1.0, "GRPO: the policy term counts on the top rho of completion tokens by "
                                     "entropy, over each forward's chunk (TRL's; 1: all).")  # fmt: skip
    entropy_coef: float = _f(0.0, "GRPO: minus this times the mean token entropy (of the tokens the policy term "
                             "counts on) is added to each update's loss, TRL's entropy bonus (0: none).")  # fmt: skip
    use_adaptive_entropy: bool = _f(False, "GRPO: TRL's adaptive entropy control (Skywork-OR1): entropy_coef moves by "
                                    "entropy_coef_delta after each update, up while the entropy is at most "
                                    "entropy_target, else down; applied only then.")  # fmt: skip
    entropy_coef_min: float = _f(0.0, "GRPO use_adaptive_entropy: the coefficient's floor (TRL's).")
    entropy_coef_max: float = _f(1.0, "GRPO use_adaptive_entropy: the coefficient's ceiling (TRL's).")
    entropy_coef_delta: float = _f(0.005, "GRPO use_adaptive_entropy: the coefficient's step per update (TRL's).")
    entropy_target: float = _f(0.2, "GRPO use_adaptive_entropy: the mean token entropy (nats) to hold (TRL's).")
    multi_objective_aggregation: str = _f("sum_then_normalize", "GRPO: 'sum_then_normalize' (the rewards' weighted "
                                          "sum, then scale_rewards) or 'normalize_then_sum' (GDPO: each reward "
                                          "normalised in its group, the sum over the batch), as TRL's.")  # fmt: skip
    off_policy_mask_threshold: float | None = _f(None, "GRPO: a completion with a negative advantage whose mean "
                                                 "KL(pi_old || pi) is above this counts in no policy term (TRL's, "
                                                 "DeepSeek-V3.2's off-policy sequence mask; null: off).")  # fmt: skip
    sapo_temperature_pos: float = _f(1.0, "GRPO loss_type sapo: the gate's temperature where the advantage is > 0.")
    sapo_temperature_neg: float = _f(1.05, "GRPO loss_type sapo: the gate's temperature where the advantage is <= 0.")
    bias_correction_kl: bool = _f(False, "GRPO: weight each token's KL by pi / pi_old (TRL's default; off: paper's).")
    reward_funcs: list = _f([], "GRPO: rewards, each 'module:function' or 'file.py:function' f(prompts, completions, "
                            "**columns) or a rm run.")  # fmt: skip
    reward_weights: list | None = _f(None, "GRPO: the weight of each reward in the sum (default: 1 each).")
    desirable_weight: float = _f(1.0, "KTO: weight of the loss on desirable rows (lambda_D).")
    undesirable_weight: float = _f(1.0, "KTO: weight of the loss on undesirable rows (lambda_U).")
    simpo_gamma: float = _f(0.5, "SimPO: target reward margin gamma (the loss wants beta * margin > gamma).")
    cpo_alpha: float = _f(0.0, "SimPO, CPO: weight of the chosen responses' NLL added to the loss (TRL's CPO "
                          "cpo_alpha; TRL's default 1 on stage cpo, 0 on simpo: the SimPO paper's loss).")  # fmt: skip
    alpha: float = _f(0.0, "SimPO, CPO: AlphaPO's alpha (TRL's CPO alpha): rewards (1 - p^-alpha) / alpha of each "
                      "response's (length-normalised) likelihood p; 0: log p.")  # fmt: skip
    answer_eos: bool = _f(True, "ORPO, SimPO, CPO: each answer ends with a trained EOS unless its last token is one, "
                          "as TRL's CPO and ORPO trainers (add_eos_token_if_needed); a run.yaml written before "
                          "bac51df lacks the key and ran with false.")  # fmt: skip
    disable_prompt_loss: bool = _f(False, "ORPO: the NLL over the chosen responses only (the ORPO authors' flag); "
                                   "false: over prompt and response, as TRL's ORPOTrainer and the authors' code; a "
                                   "run.yaml written before it lacks the key and ran with true.")  # fmt: skip
    center_rewards_coefficient: float = _f(0.0, "rm: weight c of TRL's reward centring term c * mean((r_c + r_r)^2).")


def _recording(init: Any) -> Any:
    """AlignArgs' __init__, keeping the names of the keys it was given (``given``): a key of the recipe set to its
    default is told apart from one left out (TRL's names set beside deltatune's, align.mini_batch_size)."""

    @functools.wraps(init)
    def __init__(self: AlignArgs, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._given = frozenset([f.name for f in fields(AlignArgs)][: len(args)]) | frozenset(kwargs)

    return __init__


AlignArgs.__init__ = _recording(AlignArgs.__init__)  # type: ignore[method-assign]
_FIELD_DEFAULTS = {f.name: f.default for f in fields(AlignArgs)}  # (the list and dict fields: MISSING, unused)


def given(a: AlignArgs, key: str) -> bool:
    """Whether ``key`` was set when ``a`` was built (a recipe's align section names it), even to its default."""
    return key in getattr(a, "_given", ())


def precomputes_ref(a: AlignArgs) -> bool:
    """Whether DPO's reference log-probs are computed once before training: ``align.precompute_ref`` or TRL's name
    for it, ``align.precompute_ref_log_probs``."""
    return bool(a.precompute_ref or a.precompute_ref_log_probs)


def validate_align(a: AlignArgs, stage: str, batch_size: int | None = None) -> None:
    """ConfigError naming the key, in one line, for a bad ``align`` value for ``stage``. ``batch_size`` (the recipe's
    train.batch_size): PPO's align.num_mini_batches sets align.mini_batch_size from it."""
    kinds = [a.loss_type] if isinstance(a.loss_type, str) else a.loss_type
    if stage == "kto" and a.loss_type not in ("sigmoid", *KTO_LOSS_TYPES):
        raise ConfigError(f"align.loss_type for stage kto must be kto or apo_zero_unpaired, got {a.loss_type!r}")
    if a.sync_ref_model and stage not in ("dpo", "kto"):
        raise ConfigError(f"align.sync_ref_model (TR-DPO) is for stages dpo and kto, not {stage}")
    if stage == "grpo":
        validate_grpo(a)
    validate_ppo(a, stage, batch_size)  # (first: it copies TRL's names onto the keys checked below)
    if stage == "simpo" and a.loss_type not in ("sigmoid", "simpo"):
        raise ConfigError(f"align.loss_type for stage simpo must be simpo (TRL's CPO loss_type simpo; the default "
                          f"sigmoid reads as simpo; stage cpo has the others): TRL's CPO losses sigmoid, hinge and ipo "
                          f"are not built, got {a.loss_type!r}")  # fmt: skip
    if stage == "cpo":
        validate_cpo(a)
    if a.alpha and stage not in ("simpo", "cpo"):
        raise ConfigError(f"align.alpha (AlphaPO, TRL's CPO alpha) is for stages simpo and cpo only, got {a.alpha} on "
                          f"{stage}")  # fmt: skip
    kinds = ["sigmoid"] if stage in ("kto", "grpo", "simpo", "cpo") else kinds  # (the DPO checks: DPO's default)
    if not kinds or not set(kinds) <= set(DPO_LOSS_TYPES):
        raise ConfigError(f"align.loss_type must be one of {', '.join(DPO_LOSS_TYPES)} (or a list of them), got "
                          f"{a.loss_type!r}")  # fmt: skip
    weights = kinds if a.loss_weights is None else a.loss_weights
    finite = lambda w: abs(w) <= sys.float_info.max  # noqa: E731 (NaN, inf, and an int past a float: 10**400)
    numbers = a.loss_weights and not ({type(w) for w in weights} - {int, float}) and all(map(finite, weights))
    if stage == "dpo" and (len(weights) != len(kinds) or a.loss_weights and not numbers):  # (a NaN weight: a NaN loss)
        raise ConfigError(f"align.loss_weights must be {len(kinds)} numbers, one per align.loss_type, got "
                          f"{a.loss_weights!r}")  # fmt: skip
    if not 0.0 <= a.label_smoothing < 0.5 or (a.label_smoothing == 0 and "exo_pair" in kinds):
        raise ConfigError(f"align.label_smoothing must be in {'(' * ('exo_pair' in kinds) or '['}0, 0.5) for "
                          f"{a.loss_type}, got {a.label_smoothing}")  # fmt: skip
    others = set(kinds) - set(F_DIVERGENCE_LOSSES) if a.f_divergence_type != "reverse_kl" else set()
    if a.f_divergence_type not in F_DIVERGENCES or others:
        raise ConfigError(f"align.f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, other than reverse_kl "
                          f"only with the {', '.join(F_DIVERGENCE_LOSSES)} losses; got {a.f_divergence_type}")  # fmt: skip
    if a.use_weighting and stage == "dpo" and set(kinds) & {"aot", "aot_unpaired"}:
        raise ConfigError("align.use_weighting (WPO) does not apply to align.loss_type aot or aot_unpaired: they sort "
                          "the batch's pairs, which would misalign the per-pair weights (TRL refuses it too)")  # fmt: skip
    if a.precompute_ref_batch_size is not None and a.precompute_ref_batch_size < 1:
        raise ConfigError(f"align.precompute_ref_batch_size must be >= 1 (or null), got {a.precompute_ref_batch_size}")
    if a.ld_alpha is not None and not 0 <= a.ld_alpha <= 1:
        raise ConfigError(f"align.ld_alpha must be in [0, 1] (or null: off), got {a.ld_alpha}")
    if a.label_smoothing and not set(kinds) & set(SMOOTHED):
        raise ConfigError(f"align.label_smoothing is for the sigmoid and robust losses; align.loss_type is "
                          f"{a.loss_type}: drop one of them (exo_pair, aot, aot_unpaired read it too)")  # fmt: skip
    for key in ("temperature", "cliprange", "cliprange_value", "target_kl", "discopop_tau"):
        if getattr(a, key) <= 0:
            raise ConfigError(f"align.{key} must be > 0, got {getattr(a, key)}")
    for key in ("max_new_tokens", "ppo_epochs", "mini_batch_size", "kl_horizon"):
        if getattr(a, key) < 1:
            raise ConfigError(f"align.{key} must be >= 1, got {getattr(a, key)}")
    for key in ("gamma", "lam"):  # a discount and GAE's lambda above 1 grow advantages without bound
        if not 0 <= getattr(a, key) <= 1:
            raise ConfigError(f"align.{key} must be in [0, 1], got {getattr(a, key)}")
    nonnegative = ("vf_coef", "init_kl_coef", "desirable_weight", "undesirable_weight", "center_rewards_coefficient",
                   "cpo_alpha")  # fmt: skip
    for key in nonnegative:
        if getattr(a, key) < 0:  # a negative weight turns its loss term into one to maximise
            raise ConfigError(f"align.{key} must be >= 0, got {getattr(a, key)}")
    if a.desirable_weight == a.undesirable_weight == 0:  # every KTO loss term weighted 0: nothing trains
        raise ConfigError("align.desirable_weight and align.undesirable_weight are both 0; at least one must be > 0")


def validate_cpo(a: AlignArgs) -> None:
    """Stage cpo's keys: align.loss_type one of TRL's CPO losses, label_smoothing only with the two that read it; and
    align.cpo_alpha, left out, set to TRL's default 1 (the CPO paper's loss; stage simpo's default is 0)."""
    if a.loss_type not in ("sigmoid", "hinge", "ipo", "simpo"):
        raise ConfigError(f"align.loss_type for stage cpo must be sigmoid, hinge, ipo or simpo (TRL's CPO loss_type), "
                          f"got {a.loss_type!r}")  # fmt: skip
    if a.label_smoothing and a.loss_type in ("hinge", "ipo"):
        raise ConfigError(f"align.label_smoothing is for CPO's sigmoid and simpo losses; align.loss_type is "
                          f"{a.loss_type}: drop one of them")  # fmt: skip
    if not given(a, "cpo_alpha"):
        a.cpo_alpha = 1.0


PPO_TRL_NAMES = {"kl_coef": "init_kl_coef", "num_ppo_epochs": "ppo_epochs", "response_length": "max_new_tokens"}
"""TRL's PPOConfig names a recipe may use for deltatune's align keys; ``validate_ppo`` moves them over (the TRL name
is then null, so run.yaml holds deltatune's name alone)."""
_TRL_READ_BY = {"kl_coef": ("ppo",), "num_ppo_epochs": ("ppo",), "response_length": ("ppo", "grpo")}
_TRL_LEAST = {"kl_coef": 0, "num_ppo_epochs": 1, "response_length": 1}
PPO_DEFAULTS: dict[str, Any] = {"temperature": 0.7, "max_new_tokens": 53}
"""Stage ppo's defaults of the keys it shares with grpo, where TRL's PPOConfig (temperature 0.7, response_length 53)
differs from the GRPOConfig values the dataclass holds; ``validate_ppo`` sets them on a ppo recipe that leaves the key
(and TRL's name for it) out."""


def validate_ppo(a: AlignArgs, stage: str = "ppo", batch_size: int | None = None) -> None:
    """PPO's keys. On stage ppo a key of ``PPO_DEFAULTS`` left out takes TRL's PPOConfig value (on a stage that reads
    neither, one at that value goes back to the dataclass default: a ppo run.yaml reused there names no ignored key).
    TRL's names (``PPO_TRL_NAMES``) are checked under their own names and copied onto deltatune's
    where ``stage`` reads them; both given (``given``), to different values, is an error. On stage ppo with
    ``batch_size``, align.num_mini_batches sets align.mini_batch_size to batch_size / num_mini_batches (and is then
    null: a saved run.yaml holds the size it ran with, reusable with another train.batch_size)."""
    if a.kl_estimator not in ("k1", "k3"):
        raise ConfigError(f"align.kl_estimator must be k1 or k3 (TRL's), got {a.kl_estimator!r}")
    if a.missing_eos_penalty is not None and a.missing_eos_penalty < 0:
        raise ConfigError(f"align.missing_eos_penalty must be >= 0 (or null: none), got {a.missing_eos_penalty}")
    if a.stop_token not in (None, "eos") or a.stop_token is not None and a.stop_token_id is not None:
        why = "not both (TRL's rule)" if a.stop_token == "eos" else f"got {a.stop_token!r}"
        raise ConfigError(f"align.stop_token must be eos or null (align.stop_token_id names another token), {why}")
    if a.stop_token_id is not None and (type(a.stop_token_id) is not int or a.stop_token_id < 0):
        raise ConfigError(f"align.stop_token_id must be a token id >= 0 (or null: the EOS), got {a.stop_token_id!r}")
    if a.num_mini_batches is not None and a.num_mini_batches < 1:
        raise ConfigError(f"align.num_mini_batches must be >= 1 (or null: align.mini_batch_size), got "
                          f"{a.num_mini_batches}")  # fmt: skip
    if a.local_rollout_forward_batch_size is not None and a.local_rollout_forward_batch_size < 1:
        raise ConfigError(f"align.local_rollout_forward_batch_size must be >= 1 (or null: the update's micro-batch), "
                          f"got {a.local_rollout_forward_batch_size}")  # fmt: skip
    for key, value in PPO_DEFAULTS.items():
        if stage == "ppo" and not given(a, key) and getattr(a, key) == _FIELD_DEFAULTS[key]:
            setattr(a, key, value)  # (a key left out; TRL's name for it, given, overrides it below)
        elif stage not in ("ppo", "grpo") and getattr(a, key) == value:
            setattr(a, key, _FIELD_DEFAULTS[key])  # (unread here: a ppo run.yaml's default is no key set by hand)
    mini = a.mini_batch_size == _FIELD_DEFAULTS["mini_batch_size"] and not given(a, "mini_batch_size")
    if stage == "ppo" and mini and a.num_mini_batches is None:
        a.num_mini_batches = 1  # (TRL's PPOConfig default: one mini-batch, the whole batch of rollouts)
    elif stage not in ("ppo", "grpo") and batch_size is not None and a.mini_batch_size == batch_size:
        a.mini_batch_size = _FIELD_DEFAULTS["mini_batch_size"]  # (as above: what a ppo run.yaml's default wrote)
    for trl, ours in PPO_TRL_NAMES.items():
        value = getattr(a, trl)
        if value is None:
            continue
        if value < _TRL_LEAST[trl]:
            raise ConfigError(f"align.{trl} must be >= {_TRL_LEAST[trl]}, got {value}")
        if stage not in _TRL_READ_BY[trl]:
            continue  # (ignored_keys names the key as written)
        if given(a, ours) and getattr(a, ours) != value:
            raise ConfigError(f"align.{trl} (TRL's name) and align.{ours} are both set, to {value} and "
                              f"{getattr(a, ours)}; set one of them")  # fmt: skip
        setattr(a, ours, value)
        setattr(a, trl, None)  # run.yaml keeps deltatune's name alone: reused with one of the two changed, no clash
    if stage == "ppo" and batch_size is not None:
        a.mini_batch_size = ppo_mini_batch(a, batch_size)
        a.num_mini_batches = None  # (as TRL's names: run.yaml keeps the size, reusable with another batch_size)


def ppo_mini_batch(a: AlignArgs, batch_size: int) -> int:
    """PPO's rollouts per mini-batch: train.batch_size / align.num_mini_batches where that is set (a different
    align.mini_batch_size given beside it, or a batch it does not divide, is a ConfigError), else
    align.mini_batch_size."""
    if a.num_mini_batches is None:
        return a.mini_batch_size
    if batch_size % a.num_mini_batches:
        raise ConfigError(f"train.batch_size {batch_size} is not a multiple of align.num_mini_batches "
                          f"{a.num_mini_batches}")  # fmt: skip
    mini = batch_size // a.num_mini_batches
    if given(a, "mini_batch_size") and a.mini_batch_size != mini:
        raise ConfigError(f"align.mini_batch_size {a.mini_batch_size} and align.num_mini_batches {a.num_mini_batches} "
                          f"(mini-batches of train.batch_size {batch_size} / {a.num_mini_batches} = {mini}) are both "
                          "set; set one of them")  # fmt: skip
    return mini


def ppo_micro_batches(a: AlignArgs, batch_size: int, grad_accum: int) -> int:
    """PPO's mini-batch size (``ppo_mini_batch``), checked against train.grad_accum: every mini-batch of a batch of
    ``batch_size`` rollouts (the last one too) splits into ``grad_accum`` equal micro-batches, or ConfigError."""
    mini = ppo_mini_batch(a, batch_size)
    first, last = min(mini, batch_size), batch_size % mini
    if first % grad_accum or last % grad_accum:
        size = first if first % grad_accum else last
        where = "mini-batch" if size == first else f"last mini-batch (train.batch_size {batch_size})"
        raise ConfigError(f"train.grad_accum {grad_accum} does not divide PPO's {where} of {size} rollouts "
                          f"(align.mini_batch_size / num_mini_batches): each mini-batch is split into grad_accum "
                          "equal micro-batches; set train.grad_accum to a divisor of it")  # fmt: skip
    return mini


def grpo_loss_norm(a: AlignArgs) -> str:
    """The GRPO loss normalisation: align.loss_type's, as TRL names it, where set; else align.loss_norm."""
    return GRPO_LOSS_TYPES.get(a.loss_type, a.loss_norm) if isinstance(a.loss_type, str) else a.loss_norm


def grpo_policy(a: AlignArgs) -> str:
    """The GRPO policy term (``grpo_loss.POLICY_TERMS``): align.loss_type cispo or sapo, else PPO's clip."""
    return a.loss_type if a.loss_type in ("cispo", "sapo") else "clip"


def validate_grpo(a: AlignArgs) -> None:
    _validate_sampling(a)
    if a.loss_type in GRPO_REFUSED:
        raise ConfigError(f"align.loss_type {a.loss_type} (TRL's GRPO) is not in deltatune; use one of "
                          f"{', '.join(GRPO_LOSS_TYPES)}")  # fmt: skip
    if not isinstance(a.loss_type, str) or a.loss_type != "sigmoid" and a.loss_type not in GRPO_LOSS_TYPES:
        raise ConfigError(f"align.loss_type for stage grpo must be one of {', '.join(GRPO_LOSS_TYPES)}, got "
                          f"{a.loss_type!r}")  # fmt: skip
    if a.delta is not None and a.loss_type in ("cispo", "sapo"):
        raise ConfigError(f"align.delta caps the clipped losses' ratio; align.loss_type {a.loss_type} has no such "
                          "term (TRL ignores delta there): drop one of them")  # fmt: skip
    for key in ("sapo_temperature_pos", "sapo_temperature_neg"):
        if getattr(a, key) <= 0:
            raise ConfigError(f"align.{key} must be > 0, got {getattr(a, key)}")
    if (
        isinstance(a.loss_type, str)
        and a.loss_type in GRPO_LOSS_TYPES
        and a.loss_norm != "sequence"
        and a.loss_norm != GRPO_LOSS_TYPES[a.loss_type]
    ):
        raise ConfigError(f"align.loss_type {a.loss_type} and align.loss_norm {a.loss_norm} disagree; set one of them")
    if a.loss_norm not in ("sequence", "token", "dr_grpo"):
        raise ConfigError(f"align.loss_norm must be sequence or token, or dr_grpo, got {a.loss_norm!r}")
    if a.scale_rewards not in (True, False, "group", "batch", "none"):
        raise ConfigError(f"align.scale_rewards must be group, batch or none (or true / false), got "
                          f"{a.scale_rewards!r}")  # fmt: skip
    if a.cliprange_high is not None and a.cliprange_high <= 0:
        raise ConfigError(f"align.cliprange_high must be > 0 (or null: align.cliprange), got {a.cliprange_high}")
    if a.delta is not None and a.delta <= 1:
        raise ConfigError(f"align.delta must be > 1 (the cap of the unclipped ratio; null: off), got {a.delta}")
    if a.importance_sampling_level not in ("token", "sequence"):
        raise ConfigError(f"align.importance_sampling_level must be token or sequence, got "
                          f"{a.importance_sampling_level!r}")  # fmt: skip
    if not 0 <= a.top_entropy_quantile <= 1:
        raise ConfigError(f"align.top_entropy_quantile must be in [0, 1], got {a.top_entropy_quantile}")
    if a.num_generations_eval is not None and (type(a.num_generations_eval) is not int or a.num_generations_eval < 1):
        raise ConfigError(f"align.num_generations_eval must be an integer >= 1 (or null: 1), got "
                          f"{a.num_generations_eval!r}")  # fmt: skip
    if a.steps_per_generation is None:  # (null: 1; an old bnpo run's mark, runs.old_run_data: eval builds it)
        a.steps_per_generation = 1
    if type(a.steps_per_generation) is not int or a.steps_per_generation < 1:
        raise ConfigError(f"align.steps_per_generation must be an integer >= 1, got {a.steps_per_generation!r}")


BEFORE_KEY: dict[str, tuple[Any, str]] = {
    "disable_dropout": (False, "dpo kto orpo simpo cpo rm"),  # (a388979; rm since cf33061)
    "init_kl_coef": (0.2, "ppo"),
    "answer_eos": (False, "orpo simpo cpo"),  # (bac51df)
    "disable_prompt_loss": (True, "orpo"),  # (ff34681)
}
"""An align key that a run.yaml written before it existed lacks: what that run trained with instead (dropout kept),
on the stages that read it; ``old_run_align`` fills it in, so that a --resume compares like with like."""
DEFAULT_WAS: dict[str, tuple[Any, str]] = {
    "init_kl_coef": (0.2, "805dd7e (TRL's PPOConfig kl_coef)"),
    "temperature": (1.0, "5cc3d64 on stage ppo (TRL's PPOConfig temperature; grpo's stays 1.0)"),
    "max_new_tokens": (32, "5cc3d64 on stage ppo (TRL's PPOConfig response_length; grpo's stays 32)"),
    "mini_batch_size": (4, "8fba9a4 on stage ppo: train.batch_size (TRL's PPOConfig num_mini_batches 1)"),
    "disable_dropout": (False, "a388979, rm's since cf33061 (TRL's disable_dropout: the model's dropout off)"),
    "answer_eos": (False, "bac51df (TRL's CPO and ORPO trainers end each answer with EOS)"),
    "disable_prompt_loss": (True, "ff34681 (TRL's ORPOTrainer takes the prompt into its NLL)"),
}
"""An align key whose default changed: its default before, and when and why."""
_CHANGED_ON = {"init_kl_coef": "ppo", "temperature": "ppo", "max_new_tokens": "ppo", "mini_batch_size": "ppo",
               "disable_dropout": "dpo kto orpo simpo cpo rm", "answer_eos": "orpo simpo cpo",
               "disable_prompt_loss": "orpo"}  # fmt: skip
"""The stages on which each ``DEFAULT_WAS`` key's default changed (grpo's temperature stayed 1.0)."""
BNPO_BEFORE = "a bnpo run before d727363 normalised over the slice"
"""A grpo run.yaml without align.steps_per_generation (f39a879, never released before d727363), loss_type bnpo and
align.mini_batch_size below the slice: ``runs.old_run_data`` marks its steps_per_generation null, and a --resume names
the change with this note (its weights would differ: 0.142 off a straight run)."""
ENTROPY_BEFORE = "a top_entropy_quantile < 1 run before 2f11afa took its align.mini_batch_size chunks in order"
"""Such a run.yaml with align.top_entropy_quantile < 1 instead (runs.old_run_data marks it alike): its chunks, each
taking its own top-entropy mask, were in order; since 2f11afa shuffled, as TRL's micro-batches (6.0e-3 apart)."""


def _grpo_before(old_run: dict | None) -> str:
    """The causes of an old grpo run's null steps_per_generation that ``old_run`` (flattened; None: not known) had,
    as runs.old_run_data tells them: loss_type bnpo, align.top_entropy_quantile < 1."""
    bnpo = f"{BNPO_BEFORE}; bnpo is each align.mini_batch_size chunk's token mean now, as TRL's per micro-batch"
    entropy = f"{ENTROPY_BEFORE}, shuffled now as TRL's micro-batches"
    if old_run is None:
        return f"{bnpo}; {entropy}"
    q = old_run.get("align.top_entropy_quantile", 1.0)
    had = [bnpo] if old_run.get("align.loss_type") == "bnpo" else []
    had += [entropy] if type(q) in (int, float) and q < 1 else []
    return "; ".join(had)  # (neither: a null written by hand, no cause to name)


def old_run_align(align: dict[str, Any], stage: str | None, batch_size: Any = None) -> dict[str, Any]:
    """A run's run.yaml ``align`` section as today's ``validate_align`` writes it: a key it lacks at its
    ``BEFORE_KEY`` behaviour on ``stage``; TRL's names (``PPO_TRL_NAMES``), which a run.yaml written before 805dd7e
    kept beside the deltatune names they were copied to, moved over as ``validate_ppo`` moves them (null), and, on
    ppo with ``batch_size`` (the run's train.batch_size), align.num_mini_batches null beside the
    align.mini_batch_size it set. A new dict; anything but a mapping is returned as it is (the comparison names it)."""
    if not isinstance(align, dict):
        return align
    out = dict(align)
    for key, (before, stages) in BEFORE_KEY.items():
        if key not in out and stage in stages.split():
            out[key] = before
    for trl, ours in PPO_TRL_NAMES.items():
        if out.get(trl) is not None and stage in _TRL_READ_BY[trl]:
            out[ours], out[trl] = out[trl], None
    n = out.get("num_mini_batches")
    if stage == "ppo" and type(batch_size) is int and type(n) is int and n >= 1 and batch_size % n == 0:
        out["mini_batch_size"], out["num_mini_batches"] = batch_size // n, None
    return out


def default_changed(
    key: str, old: Any, new: Any, stage: str | None = None, batch_size: Any = None, old_run: dict | None = None
) -> str:
    """A note for a resume's ``align.key: old -> new`` where ``old`` was the key's default before it changed and
    ``new`` is today's (``DEFAULT_WAS``) on ``stage`` (the recipe's; ppo's align.mini_batch_size: ``batch_size``, the
    recipe's train.batch_size); "" otherwise. Without ``stage``, any stage's default today counts. ``old_run``: the
    old run's recipe flattened (``align.loss_type`` keys): an old grpo run's note names only the causes it had."""
    name = key.removeprefix("align.")
    if key == "align.steps_per_generation" and old is None and stage in ("grpo", None):  # (runs.old_run_data's mark)
        before = _grpo_before(old_run)
        return f" ({before})" if before else ""
    if not key.startswith("align.") or name not in DEFAULT_WAS or old != DEFAULT_WAS[name][0]:
        return ""
    if stage is None:
        if new not in (_FIELD_DEFAULTS[name], PPO_DEFAULTS.get(name)) and name != "mini_batch_size":
            return ""  # (ppo's mini_batch_size left out is train.batch_size: any size)
    elif stage not in _CHANGED_ON[name].split():
        return ""  # (the default did not change on this stage: a change made by hand)
    elif name == "mini_batch_size":
        if type(batch_size) is int and new != batch_size:
            return ""  # (ppo's default is the whole batch of rollouts)
    elif new != (PPO_DEFAULTS.get(name, _FIELD_DEFAULTS[name]) if stage == "ppo" else _FIELD_DEFAULTS[name]):
        return ""
    was, why = DEFAULT_WAS[name]
    was, new = (str(v).lower() if isinstance(v, bool) else v for v in (was, new))  # (as a recipe spells them)
    return f" (its default was {was}, {new} since {why}; set {key}: {was} to continue as the run began)"
