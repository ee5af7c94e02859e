"""Stage grpo against TRL 1.16's GRPOTrainer (probe 15): steps_per_generation and num_iterations > 1 after real
optimizer updates (the weights, each update's loss and clip ratio, the old log-probs kept from the sampling), TRL's
entropy bonus (entropy_coef), and generation token ids outside the model's vocabulary refused before the model loads.

The reference is the .venv's TRL 1.16: GRPOTrainer._prepare_inputs (one generation per steps_per_generation x
num_iterations steps, ``shuffle_sequence_dict`` then ``split_tensor_dict`` into steps_per_generation slices, reused
every iteration), _generate_and_score_completions (old_per_token_logps when gradient_accumulation_steps %
(steps_per_generation x num_iterations) != 0) and _compute_loss (grpo: each slice's sequence mean; bnpo: each
micro-batch's token mean, / gradient_accumulation_steps; dapo: the generation batch's tokens / steps_per_generation;
the entropy bonus: each micro-batch's mean); malformed bad_words_ids / sequence_bias refused at build as transformers'
logits processors refuse them at the first rollout."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from deltatune.config import ConfigError
from deltatune.train.config import build
from deltatune.train.config_align import AlignArgs, validate_align

TEMPERATURE, G, T, LR, SHUFFLE_SEED = 0.7, 4, 4, 0.003, 7
REWARDS = [1.0, 0.0, 2.5, 0.5, 2.0, 1.0, 2.0, 3.0]
RAW = {"model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"}}


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from tiny import save_tiny
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    base = save_tiny(tmp_path_factory.mktemp("tiny") / "llama")
    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():  # a trained-looking adapter; a head that makes token entropies differ (not all ln V)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        model.get_base_model().lm_head.weight.mul_(20)
    return model.eval(), base


def _completions(tok):
    a_id, eos = tok.convert_tokens_to_ids("a"), tok.eos_token_id
    body = [[a_id + i] * (1 + i % 3) + [eos] for i in range(8)]
    body[2] = [a_id + 7, a_id + 8, a_id + 9, a_id + 10]  # truncated
    return body


def _trl_run(model, tmp_path, monkeypatch, S: int, mu: int, loss_type: str, keys: dict, ga: int = 1):
    """TRL trains ``model`` for S x mu optimizer steps on one generation batch of the eight fixed completions, each
    step ``ga`` accumulated micro-batches (gradient_accumulation_steps): (each micro-batch's (loss, clip ratio), the
    old log-probs of the generation, in its order)."""
    import trl
    import trl.trainer.grpo_trainer as gt
    from datasets import Dataset
    from tiny import tokenizer

    import deltatune as dt

    tok = tokenizer()
    body, prompt = _completions(tok), tok("hi")["input_ids"]

    def rollout(prompts, trainer):
        return {"prompt_ids": [prompt] * len(prompts), "completion_ids": body,
                "logprobs": [[0.0] * len(c) for c in body]}  # fmt: skip

    real_shuffle = gt.shuffle_sequence_dict

    def shuffle(batch):  # the same permutation as the loop's: torch's RNG seeded alike just before it
        torch.manual_seed(SHUFFLE_SEED)
        return real_shuffle(batch)

    monkeypatch.setattr(gt, "shuffle_sequence_dict", shuffle)
    args = trl.GRPOConfig(str(tmp_path), per_device_train_batch_size=8 // S // ga, steps_per_generation=S * ga,
                          gradient_accumulation_steps=ga,
                          num_iterations=mu, max_steps=S * mu, learning_rate=LR, lr_scheduler_type="constant",
                          logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                          num_generations=G, max_completion_length=T, temperature=TEMPERATURE, beta=0.0,
                          loss_type=loss_type, epsilon=0.2, **keys)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = dt.trl_trainer(trl.GRPOTrainer)(
            model=model, args=args, train_dataset=Dataset.from_list([{"prompt": "hi"}] * 8), processing_class=tok,
            reward_funcs=lambda completions, **_: list(REWARDS), rollout_func=rollout,
        )  # fmt: skip
    steps, olds = [], []
    real_generate, real_loss = trainer._generate_and_score_completions, trainer._compute_loss

    def generate(inputs):
        out = real_generate(inputs)
        olds.append(out.get("old_per_token_logps"))
        return out

    def compute_loss(model, inputs):
        loss = real_loss(model, inputs)
        metrics = trainer._metrics["train"]  # (policy_loss: the loss before the entropy bonus)
        steps.append((metrics["policy_loss"][-1] if "policy_loss" in metrics else loss.item(),
                      (metrics.get("clip_ratio/region_mean") or [0.0])[-1], loss.item()))  # fmt: skip
        return loss

    trainer._generate_and_score_completions, trainer._compute_loss = generate, compute_loss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert len(olds) == 1 and len(steps) == S * mu * ga
    return steps, olds[0]


def _ours(model, S: int, mu: int, loss_type: str, keys: dict, monkeypatch, mini_batch_size: int = 8):
    """The loop's one step (S x mu updates) on the same completions: (the step's stats, each update's (loss, clip
    ratio), the old log-probs it kept)."""
    from tiny import tokenizer

    import deltatune.train.grpo as grpo
    from deltatune.train.grpo import GRPOLoop, PromptItem, Samples
    from deltatune.train.grpo_rewards import Reward

    tok = tokenizer()
    body, prompt, pad = _completions(tok), tok("hi")["input_ids"], tok.pad_token_id
    completion = torch.tensor([c + [pad] * (T - len(c)) for c in body])
    cmask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in body])
    ids = torch.tensor([prompt] * 8)
    item = PromptItem(prompt, "hi", {}, "p.jsonl:1")
    samples = Samples(torch.cat([ids, completion], 1), torch.cat([torch.ones_like(ids), cmask], 1), cmask,
                      len(prompt), tok.batch_decode(completion, skip_special_tokens=True),
                      torch.tensor([tok.eos_token_id not in c for c in body]), [item] * 8, body)  # fmt: skip
    align = AlignArgs(num_generations=G, max_new_tokens=T, temperature=TEMPERATURE, beta=0.0,
                      mini_batch_size=mini_batch_size, steps_per_generation=S, num_iterations=mu, loss_type=loss_type, **keys)  # fmt: skip
    validate_align(align, "grpo")
    loop = GRPOLoop(model, tok, [Reward("fixed", lambda completions, **_: list(REWARDS))], align, lr=LR)

    def sample(items, num):
        torch.manual_seed(SHUFFLE_SEED)  # (nothing draws from torch's RNG between this and the shuffle)
        return samples

    steps, olds = [], []
    real_loss, real_logprobs = grpo.grpo_loss, loop._logprobs

    def loss_of(*args, **kw):
        loss, st = real_loss(*args, **kw)
        steps.append((loss.item(), (st["clipped"] / st["clip_units"]).item()))
        return loss, st

    def logprobs(s, reference=False):
        out = real_logprobs(s, reference)
        olds.append(out.clone())
        return out

    monkeypatch.setattr(grpo, "grpo_loss", loss_of)
    monkeypatch.setattr(loop, "sample", sample)
    monkeypatch.setattr(loop, "_logprobs", logprobs)
    stats = loop.step([item, item])
    return stats, steps, olds


CASES = [(2, 2, "grpo", {}), (2, 2, "dapo", {}), (4, 1, "bnpo", {}), (2, 2, "grpo", {"entropy_coef": 0.05}),
         (2, 1, "dapo", {"entropy_coef": 0.1, "top_entropy_quantile": 0.5})]  # fmt: skip


@pytest.mark.parametrize("S, mu, loss_type, keys", CASES)
def test_steps_per_generation_and_iterations_train_as_trls(policy, tmp_path, monkeypatch, S, mu, loss_type, keys):
    """S x mu AdamW updates (lr 0.01: the later ones clip) on one generation batch of 8 completions: each update's
    loss and clip ratio, the old log-probs kept from the sampling, and the adapter weights after them equal TRL's
    GRPOTrainer trained for S x mu steps with steps_per_generation S and num_iterations mu; with TRL's entropy_coef
    (its entropy bonus, over the top_entropy_quantile tokens where that is set) too."""
    model, _ = policy
    ours_model, trl_model = copy.deepcopy(model), copy.deepcopy(model)
    trl_steps, trl_old = _trl_run(trl_model, tmp_path, monkeypatch, S, mu, loss_type, keys)
    stats, steps, olds = _ours(ours_model, S, mu, loss_type, keys, monkeypatch)
    assert len(olds) == 1 and olds[0].shape == trl_old.shape
    from tiny import tokenizer

    mask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in _completions(tokenizer())]).bool()
    assert (olds[0] - trl_old)[mask].abs().max().item() < 1e-5  # (after the EOS: pad tokens nobody reads)
    assert len(steps) == len(trl_steps) == S * mu
    for (loss, clip), (want_loss, want_clip, _) in zip(steps, trl_steps):
        assert loss == pytest.approx(want_loss, rel=1e-5, abs=2e-5)
        assert clip == pytest.approx(want_clip, abs=1e-6)

    assert mu == 1 or any(clip > 0 for _, clip in steps)  # (the updates did move the policy past the clip)
    assert stats["loss"] == pytest.approx(sum(total for *_, total in trl_steps) / (S * mu), abs=2e-5)
    bonus = sum(total - loss for loss, _, total in trl_steps)
    assert (abs(bonus) > 1e-3) == bool(keys.get("entropy_coef"))  # (TRL's bonus is in its loss, and in ours)
    theirs = dict(trl_model.named_parameters())
    diffs = [(p - theirs[n]).abs().max().item() for n, p in ours_model.named_parameters() if p.requires_grad]
    moved = max((p - q).abs().max().item() for p, q in zip(ours_model.parameters(), model.parameters()))
    assert max(diffs) < 1e-6 and moved > 1e-3  # (seen: 3.3e-7)


GA_CASES = [(2, 1, "grpo", {"entropy_coef": 0.1}), (2, 1, "dapo", {"entropy_coef": 0.1, "top_entropy_quantile": 0.5}),
            (2, 1, "bnpo", {}), (2, 2, "bnpo", {"entropy_coef": 0.1}), (1, 1, "bnpo", {}),
            (1, 2, "grpo", {"entropy_coef": 0.1}), (1, 1, "dapo", {"top_entropy_quantile": 0.5})]  # fmt: skip


@pytest.mark.parametrize("S, mu, loss_type, keys", GA_CASES)
def test_mini_batches_within_a_slice_train_as_trls_gradient_accumulation(
    policy, tmp_path, monkeypatch, S, mu, loss_type, keys
):
    """align.mini_batch_size smaller than the slice (8 / S completions) is TRL's per-device micro-batch under
    gradient_accumulation_steps 2: the entropy bonus is each chunk's token mean, weighed 1/2, and bnpo's loss is each
    chunk's token mean (TRL's per micro-batch; it was the slice's: 4.9e-3 off TRL's weights); the weights after the
    updates, and each micro-batch's loss equal TRL's (S 2: both shuffle the generation batch alike)."""
    model, _ = policy
    ga = 2
    ours_model, trl_model = copy.deepcopy(model), copy.deepcopy(model)
    trl_steps, _ = _trl_run(trl_model, tmp_path, monkeypatch, S, mu, loss_type, keys, ga=ga)
    _, steps, _ = _ours(ours_model, S, mu, loss_type, keys, monkeypatch, mini_batch_size=8 // S // ga)
    assert len(steps) == len(trl_steps) == S * mu * ga
    scale = ga if keys.get("entropy_coef") and loss_type != "dapo" else 1  # (TRL's policy_loss, logged with a bonus:
    # grpo's and bnpo's before the division by the accumulation steps; dapo's is over the window's tokens)
    for (loss, _), (want_loss, *_) in zip(steps, trl_steps):
        assert loss * scale == pytest.approx(want_loss, rel=1e-5, abs=2e-5)
    theirs = dict(trl_model.named_parameters())
    diffs = [(p - theirs[n]).abs().max().item() for n, p in ours_model.named_parameters() if p.requires_grad]
    moved = max((p - q).abs().max().item() for p, q in zip(ours_model.parameters(), model.parameters()))
    assert max(diffs) < 1e-6 and moved > 1e-3


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_s1_without_chunk_dependent_terms_trains_in_order_as_before(policy, monkeypatch, loss_type):
    """steps_per_generation 1 shuffles the generation batch (as TRL) only where the chunks' split changes the loss
    (bnpo, the entropy bonus, top_entropy_quantile < 1; mini_batch_size below the batch): a plain grpo/dapo/dr_grpo
    step draws nothing from torch's RNG, and its weights equal (torch.equal) those of the step with the shuffle
    replaced by the batch in order, the code path before the S=1 shuffle."""
    model, _ = policy
    ours, ordered = copy.deepcopy(model), copy.deepcopy(model)
    _ours(ours, 1, 2, loss_type, {}, monkeypatch, mini_batch_size=2)
    after = torch.random.get_rng_state()
    torch.manual_seed(SHUFFLE_SEED)
    assert torch.equal(after, torch.random.get_rng_state())  # (nothing drawn after the rollouts)
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: torch.arange(n))
    _ours(ordered, 1, 2, loss_type, {}, monkeypatch, mini_batch_size=2)
    theirs = dict(ordered.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in ours.named_parameters())
    assert max((p - q).abs().max().item() for p, q in zip(ours.parameters(), model.parameters())) > 1e-3


@pytest.mark.parametrize("loss_type, keys, changes", [
    ("grpo", {}, False), ("dapo", {}, False), ("grpo", {"entropy_coef": 0.1}, True), ("bnpo", {}, True),
])  # fmt: skip
def test_mini_batch_size_changes_the_weights_only_where_trl_micro_batches_do(policy, monkeypatch, loss_type, keys,
                                                                             changes):  # fmt: skip
    """align.mini_batch_size is memory only for grpo and dapo (the same weights with 8 and 2); with an entropy bonus
    or under bnpo, each a per-chunk mean as TRL's per micro-batch, it changes them (seen 6.0e-3 for entropy_coef)."""
    model, _ = policy
    m8, m2 = copy.deepcopy(model), copy.deepcopy(model)
    _ours(m8, 1, 1, loss_type, keys, monkeypatch, mini_batch_size=8)
    _ours(m2, 1, 1, loss_type, keys, monkeypatch, mini_batch_size=2)
    diff = max((p - q).abs().max().item() for p, q in zip(m8.parameters(), m2.parameters()))
    assert diff > 1e-4 if changes else diff < 1e-6


def test_steps_per_generation_that_does_not_divide_the_generation_batch_is_one_line(policy, tmp_path):
    """TRL splits the generation batch into steps_per_generation equal slices: 3 slices of 2 prompts x 2 completions
    are refused before the model loads, naming the key; 2 and 4 prepare."""
    from tiny import tokenizer

    from deltatune.train.grpo import prepare_grpo

    _, base = policy
    (tmp_path / "p.jsonl").write_text('{"prompt": "hello there"}\n{"prompt": "hi"}\n')
    (tmp_path / "rewards.py").write_text("def zero(completions, **kw):\n    return [0.0] * len(completions)\n")
    for spg in (3, 2, 4):
        align = {"num_generations": 2, "max_new_tokens": 3, "reward_funcs": [f"{tmp_path / 'rewards.py'}:zero"],
                 "steps_per_generation": spg}  # fmt: skip
        cfg = build({"stage": "grpo", "model": {"name_or_path": base}, "method": {"name": "lora"}, "align": align,
                     "data": {"train": str(tmp_path / "p.jsonl")}, "output": {"dir": str(tmp_path / f"run{spg}")},
                     "train": {"batch_size": 2}})  # fmt: skip
        if spg == 3:
            with pytest.raises(ConfigError, match="^align.steps_per_generation 3 does not divide the generation "
                               "batch of train.batch_size x align.num_generations = 4 completions") as err:  # fmt: skip
                prepare_grpo(cfg, tokenizer())
            assert "\n" not in str(err.value)
        else:
            assert prepare_grpo(cfg, tokenizer()).loop is not None


@pytest.mark.parametrize("align, words", [
    ({"steps_per_generation": 0}, "^align.steps_per_generation must be an integer >= 1, got 0$"),
    ({"steps_per_generation": 1.5}, "^align.steps_per_generation must be int or null, got 1.5$"),
])  # fmt: skip
def test_steps_per_generation_bad_input_is_one_line_naming_the_key(align, words):
    with pytest.raises(ConfigError, match=words) as err:
        build({**RAW, "stage": "grpo", "align": align})
    assert "\n" not in str(err.value)


# -- generation token ids outside the vocabulary ---------------------------------------------------------------------


def _prepare(tmp_path, base: str, generation_kwargs: dict):
    from tiny import tokenizer

    from deltatune.train.grpo import prepare_grpo

    (tmp_path / "p.jsonl").write_text('{"prompt": "hello there"}\n{"prompt": "hi"}\n')
    (tmp_path / "rewards.py").write_text("def zero(completions, **kw):\n    return [0.0] * len(completions)\n")
    align = {"num_generations": 2, "max_new_tokens": 3, "reward_funcs": [f"{tmp_path / 'rewards.py'}:zero"],
             "generation_kwargs": generation_kwargs}  # fmt: skip
    cfg = build({"stage": "grpo", "model": {"name_or_path": base}, "method": {"name": "lora"}, "align": align,
                 "data": {"train": str(tmp_path / "p.jsonl")}, "output": {"dir": str(tmp_path / "run")},
                 "train": {"batch_size": 2}})  # fmt: skip
    return prepare_grpo(cfg, tokenizer())


@pytest.mark.parametrize("kwargs, shown", [
    ({"bad_words_ids": [[5], [7, 30530]]}, "bad_words_ids: 30530"),
    ({"bad_words_ids": [[30522]]}, "bad_words_ids: 30522"),
    ({"sequence_bias": [[[3, 40000], -1.0]]}, "sequence_bias: 40000"),
    ({"forced_eos_token_id": [2, 50000]}, "forced_eos_token_id: 50000"),
])  # fmt: skip
def test_generation_ids_past_the_vocabulary_are_one_line_before_the_model_loads(policy, tmp_path, kwargs, shown):
    """A token id past the model's vocabulary (30,522 ids here) in align.generation_kwargs bad_words_ids,
    sequence_bias or forced_eos_token_id failed at the first rollout, inside torch (IndexError) or a logits processor
    (ValueError); it is one line naming the key when the stage prepares its prompts, before the model loads. Ids
    inside the vocabulary prepare as before."""
    from tiny import tokenizer

    from deltatune.train.grpo import GRPOLoop, PromptItem
    from deltatune.train.grpo_rewards import Reward

    model, base = policy
    words = f"^align.generation_kwargs {shown} is no token id \\(the model's vocabulary is 0 to 30521\\); the first"
    with pytest.raises(ConfigError, match=words + " rollout fails on it$") as err:
        _prepare(tmp_path, base, kwargs)
    assert "\n" not in str(err.value)
    assert (
        _prepare(tmp_path, base, {"bad_words_ids": [[5], [7, 30521]], "sequence_bias": [[[30521], -1.0]]}).loop
        is not None
    )
    tok = tokenizer()  # the guard: generate does fail on such an id
    align = AlignArgs(num_generations=2, max_new_tokens=2, generation_kwargs=kwargs)
    loop = GRPOLoop(model, tok, [Reward("zero", lambda completions, **_: [0.0] * len(completions))], align)
    with pytest.raises((IndexError, ValueError)):
        loop.sample([PromptItem(tok("hi")["input_ids"], "hi", {}, "p:1")], 2)


@pytest.mark.parametrize("kwargs, shown", [
    ({"bad_words_ids": [[-3]]}, "bad_words_ids: -3"),
    ({"sequence_bias": [[[1, "x"], 1.0]]}, "sequence_bias: 'x'"),
    ({"forced_eos_token_id": 2.5}, "forced_eos_token_id: 2.5"),
])  # fmt: skip
def test_generation_ids_that_are_no_ids_are_one_line_at_build(kwargs, shown):
    """Ids that no vocabulary holds (negative, not whole numbers) are refused when the recipe builds."""
    with pytest.raises(ConfigError, match=f"^align.generation_kwargs {shown} is no token id \\(ids are whole "
                       "numbers >= 0\\)") as err:  # fmt: skip
        build({**RAW, "stage": "grpo", "align": {"generation_kwargs": kwargs}})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, shown", [
    ({"bad_words_ids": [[-1], [5, -2]]}, "bad_words_ids: -1"),
    ({"bad_words_ids": [[4, 2.5, -7]]}, "bad_words_ids: 2.5"),
    ({"sequence_bias": [[[7, -4], -1.0], [[-5], 1.0]]}, "sequence_bias: -4"),
    ({"forced_eos_token_id": [3, -8, -9]}, "forced_eos_token_id: -8"),
])  # fmt: skip
def test_the_first_bad_id_as_written_is_named(kwargs, shown):
    """Several bad ids: the error names the first one as written (it named the last: -2 for [[-1], [5, -2]])."""
    with pytest.raises(ConfigError, match=f"^align.generation_kwargs {shown} is no token id"):
        build({**RAW, "stage": "grpo", "align": {"generation_kwargs": kwargs}})


@pytest.mark.parametrize("key, value, words", [
    ("sequence_bias", 5, "must be a mapping"),
    ("sequence_bias", True, "must be a mapping"),
    ("sequence_bias", 1.5, "must be a mapping"),
    ("sequence_bias", "x", "must be a mapping"),
    ("sequence_bias", [[]], "must be a mapping"),
    ("sequence_bias", [5], "must be a mapping"),
    ("sequence_bias", [[[3], -1.0, 7]], "must be a mapping"),
    ("sequence_bias", [[3, -1.0]], "transformers' generate refuses it"),
    ("sequence_bias", [[[3, 4], "x"]], "transformers' generate refuses it"),
    ("sequence_bias", [[[3, 4], -1]], "transformers' generate refuses it at the first rollout \\(each bias a float, -1.0 not -1\\)"),
    ("sequence_bias", [], "transformers' generate refuses it"),
    ("sequence_bias", {}, "transformers' generate refuses it"),
    ("bad_words_ids", [5, 7], "transformers' generate refuses it"),
    ("bad_words_ids", [[5, [7]]], "transformers' generate refuses it"),
    ("bad_words_ids", [], "transformers' generate refuses it"),
    ("bad_words_ids", 5, "transformers' generate refuses it at the first rollout: "),
    ("forced_eos_token_id", [], "transformers' generate refuses it at the first rollout: "),
    ("forced_eos_token_id", [[2], [3, 4]], "transformers' generate refuses it at the first rollout: "),
])  # fmt: skip
def test_malformed_bad_words_ids_and_sequence_bias_are_one_line_at_build(key, value, words):
    """A sequence_bias that is no mapping or list of [ids, bias] pairs crashed the build with Python's own error
    ("'int' object is not iterable" for 5, an IndexError for [[]]); bad_words_ids and sequence_bias that transformers'
    logits processors refuse ([5, 7], an integer bias) built and failed at the first rollout. Each is one ConfigError
    naming the key when the recipe builds. The guard: transformers' own processor, which generate builds from the
    value, refuses each of them too (a ValueError, or Python's error where its check indexes a non-pair)."""
    import transformers.generation.logits_process as lp

    with pytest.raises(ConfigError, match=f"^align.generation_kwargs {key}:? {words}") as err:
        build({**RAW, "stage": "grpo", "align": {"generation_kwargs": {key: value}}})
    assert "\n" not in str(err.value)
    assert key == "sequence_bias" or "each bias a float" not in str(err.value)  # (the hint: sequence_bias's only)
    processor = {"sequence_bias": lp.SequenceBiasLogitsProcessor, "bad_words_ids": lp.NoBadWordsLogitsProcessor,
                 "forced_eos_token_id": lambda v: lp.ForcedEOSTokenLogitsProcessor(1, v)}[key]  # fmt: skip
    if value != [[[3], -1.0, 7]]:  # (transformers ignores a pair's third item; refused here as no pair)
        with pytest.raises((ValueError, TypeError, IndexError)):
            processor(value)


@pytest.mark.parametrize("bias", [float("inf"), float("nan")])
def test_a_sequence_bias_of_inf_or_nan_is_one_line_at_build(bias):
    """A bias of +inf or nan built and failed at the first rollout (torch.multinomial: "probability tensor contains
    either inf, nan or element < 0"); one line at build now. -inf (the sequence banned) still builds."""
    with pytest.raises(ConfigError, match=f"^align.generation_kwargs sequence_bias: bias {bias} makes every") as err:
        build({**RAW, "stage": "grpo", "align": {"generation_kwargs": {"sequence_bias": [[[3], bias]]}}})
    assert "\n" not in str(err.value)
    build({**RAW, "stage": "grpo", "align": {"generation_kwargs": {"sequence_bias": [[[3], float("-inf")]]}}})


@pytest.mark.parametrize("kwargs", [
    {"bad_words_ids": [[]]},
    {"bad_words_ids": [[5], [7, 8]]},
    {"sequence_bias": [[[3, 4], -1.0], [[5], 2.0]]},
    {"sequence_bias": {(3, 4): -1.0}},
    {"forced_eos_token_id": [[2]]},
])  # fmt: skip
def test_well_formed_generation_ids_build_and_generate_as_transformers(policy, kwargs):
    """What transformers' generate takes still builds (a mapping with tuple keys from Python too), and samples as
    it: bad_words_ids also bans the ids the same draw picks without them (absent now), forced_eos_token_id [[2]] ends
    each completion with 2 (at max_new_tokens)."""
    from tiny import tokenizer

    from deltatune.train.grpo import GRPOLoop, PromptItem
    from deltatune.train.grpo_rewards import Reward

    model, _ = policy
    tok = tokenizer()

    def sample(kw):
        align = AlignArgs(num_generations=2, max_new_tokens=2, generation_kwargs=kw)
        validate_align(align, "grpo")
        loop = GRPOLoop(model, tok, [Reward("zero", lambda completions, **_: [0.0] * len(completions))], align)
        torch.manual_seed(1)
        out = loop.sample([PromptItem(tok("hi")["input_ids"], "hi", {}, "p:1")], 2)
        return [[int(t) for t, m in zip(c, k) if m] for c, k in zip(out.completion_ids, out.completion_mask)]

    plain = sample(None)
    banned = sorted({c[0] for c in plain})
    if "bad_words_ids" in kwargs:
        kwargs = {**kwargs, "bad_words_ids": [*kwargs["bad_words_ids"], *[[t] for t in banned]]}
    got = sample(kwargs)
    assert len(got) == 2 and all(len(c) == 2 for c in got)
    if "bad_words_ids" in kwargs:
        single = {w[0] for w in kwargs["bad_words_ids"] if len(w) == 1}
        assert single >= set(banned) and not single & {t for c in got for t in c}
    if "forced_eos_token_id" in kwargs:
        assert [c[-1] for c in got] == [2, 2] and [c[-1] for c in plain] != [2, 2]


# -- num_generations_eval ----------------------------------------------------------------------------------------------


def test_num_generations_eval_samples_that_many_completions_per_eval_prompt_and_averages_them(policy):
    """TRL's num_generations_eval: eval_reward is the mean reward over that many sampled completions of each eval
    prompt (here 3 of each of 3 prompts, in batches of 2 prompts; the reward a function of the completion's ids, so
    the mean is worked from the completions sampled). Left out (null): one completion a prompt, as before."""
    from tiny import tokenizer

    from deltatune.train.grpo import GRPOLoop, PromptItem
    from deltatune.train.grpo_rewards import Reward

    model, _ = policy
    tok = tokenizer()
    items = [PromptItem(tok(text)["input_ids"], text, {}, f"p:{i}") for i, text in enumerate(["hi", "a b", "c"])]
    for n, want in ((3, 9), (None, 3)):
        align = AlignArgs(num_generations=2, max_new_tokens=4, num_generations_eval=n)
        validate_align(align, "grpo")
        ids_sum = lambda completion_ids, **_: [float(sum(c) % 11) for c in completion_ids]  # noqa: E731
        loop = GRPOLoop(model, tok, [Reward("ids", ids_sum)], align, seed=1)
        seen, real = [], loop.sample
        loop.sample = lambda part, num, seen=seen, real=real: (
            seen.append((len(part), num, real(part, num))) or seen[-1][2]
        )
        mean = loop.mean_reward(items, 2)
        assert [(p, k) for p, k, _ in seen] == [(2, n or 1), (1, n or 1)]
        got = [sum(c) % 11 for *_, s in seen for c in s.completion_ids]
        assert len(got) == want and len(set(got)) > 1 and mean == pytest.approx(sum(got) / want, abs=1e-6)


def test_num_generations_eval_bad_input_is_one_line_naming_the_key():
    with pytest.raises(
        ConfigError, match="^align.num_generations_eval must be an integer >= 1 \\(or null: 1\\), got 0$"
    ):
        build({**RAW, "stage": "grpo", "align": {"num_generations_eval": 0}})


# -- a bnpo run trained before d727363 (bnpo over the slice) --------------------------------------------------------


def _old_bnpo_run(tmp_path, **align):
    """A grpo run folder whose run.yaml is today's without align.steps_per_generation (as a deltatune before d727363
    wrote it), and today's recipe of the same run."""
    import yaml

    from deltatune.train.run import _recipe_dict

    keys = {"num_generations": 4, "loss_type": "bnpo", "mini_batch_size": 2, **align}
    recipe = _recipe_dict(build({**RAW, "stage": "grpo", "train": {"batch_size": 2}, "align": keys}))
    old = {**recipe, "align": {k: v for k, v in recipe["align"].items() if k != "steps_per_generation"}}
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    return str(run), recipe


def test_resume_of_a_bnpo_run_before_d727363_names_the_change(tmp_path):
    """A bnpo run with align.mini_batch_size below its slice trained before d727363 normalised over the slice; a
    --resume continued it silently under the per-chunk normalisation (0.142 off the straight run's weights). Its
    run.yaml lacks align.steps_per_generation (f39a879): the resume names the change in one line and needs
    --resume-changed."""
    from deltatune.train.run import _check_resume_recipe

    run, recipe = _old_bnpo_run(tmp_path)
    with pytest.raises(ConfigError) as err:
        _check_resume_recipe(run, recipe, False)
    message = str(err.value)
    assert "\n" not in message
    assert "align.steps_per_generation: None -> 1 (a bnpo run before d727363 normalised over the slice; " in message
    assert message.endswith("pass --resume-changed to continue with the new values")
    assert _check_resume_recipe(run, recipe, True) is True


@pytest.mark.parametrize("align", [{"loss_type": "grpo"}, {"loss_type": "dapo"}, {"mini_batch_size": 8}])
def test_resume_of_an_old_run_that_trains_alike_names_no_change(tmp_path, align):
    """Without bnpo, or with one chunk per slice (mini_batch_size 8 = 2 prompts x 4), the normalisation did not
    change: a run.yaml without align.steps_per_generation resumes as before; one with it likewise."""
    import yaml

    from deltatune.train.run import _check_resume_recipe

    run, recipe = _old_bnpo_run(tmp_path, **align)
    assert _check_resume_recipe(run, recipe, False) is False
    with open(f"{run}/run.yaml", "w") as fh:
        yaml.safe_dump(recipe, fh)
    assert _check_resume_recipe(run, recipe, False) is False


def test_eval_of_a_bnpo_run_before_d727363_builds_as_the_run(tmp_path):
    """``deltatune eval`` reads the run's recipe through runs.old_run_data: the old bnpo run's marked
    steps_per_generation (null) builds as 1, the recipe the run trained with (eval trains nothing: no change)."""
    from deltatune.train.run import _recipe_dict
    from deltatune.train.runs import old_run_data, read_recipe

    run, recipe = _old_bnpo_run(tmp_path)
    raw, note = old_run_data(read_recipe(run), run)
    assert raw["align"]["steps_per_generation"] is None and note == ""
    assert _recipe_dict(build(raw)) == recipe
