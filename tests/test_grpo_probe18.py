"""Stage grpo (probe 18): prompts with media the text-only rollouts would ignore (an images column, TRL's image
content parts, LLaMA-Factory's <image> / <video> / <audio> markers) refused in one line naming the row, as the other
text stages refuse them (``sample.refuse_multimodal``); the same prompts as plain text still encode as before."""

from __future__ import annotations

import pytest

from deltatune.data.load import DataError, Row


@pytest.fixture(scope="module")
def tok():
    from tiny import tokenizer

    return tokenizer()


USER_IMAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]


@pytest.mark.parametrize(
    "data, what",
    [
        ({"prompt": "<image>What is this?", "images": ["a.png"]}, "column 'images'"),
        ({"prompt": "What is this?", "image": "a.png"}, "column 'image'"),
        ({"prompt": "<image>What is this?"}, "the <image> marker in column 'prompt'"),
        ({"prompt": "<audio>What is said?"}, "the <audio> marker in column 'prompt'"),
        ({"prompt": [{"role": "user", "content": "<video> what"}]}, "the <video> marker in column 'prompt'"),
        ({"prompt": USER_IMAGE}, "a content part of type 'image' in column 'prompt'"),
    ],
)
def test_a_multimodal_prompt_is_refused_naming_the_row(tok, data, what):
    from deltatune.train.grpo import encode_prompts

    rows = [Row({"prompt": "fine"}, "t.jsonl:1"), Row(data, "t.jsonl:2")]
    with pytest.raises(DataError) as e:
        encode_prompts(rows, tok, "prompt", 64, "truncate")
    assert str(e.value).startswith(f"t.jsonl:2: a multimodal prompt ({what}); stage grpo")
    assert "\n" not in str(e.value)


def test_text_prompts_and_an_assistant_prefill_mentioning_audio_still_encode(tok):
    from deltatune.data.preference import bos_prefix
    from deltatune.train.grpo import encode_prompts

    chat = [{"role": "user", "content": "Name the tag."}, {"role": "assistant", "content": "It is <audio>"}]
    rows = [Row({"prompt": "What is 2 + 2?", "answer": "4"}, "t.jsonl:1"), Row({"prompt": chat}, "t.jsonl:2")]
    items, cut = encode_prompts(rows, tok, "prompt", 64, "truncate")
    assert cut == 0 and items[0].columns == {"answer": "4"}
    assert items[0].ids == bos_prefix(tok) + tok("What is 2 + 2?", add_special_tokens=False)["input_ids"]
    text = tok.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert items[1].ids == tok(text, add_special_tokens=False)["input_ids"]


# -- TRL's clip_ratio/low_min and clip_ratio/high_max ------------------------------------------------------------------

from test_grpo_probe15 import _ours, _trl_run, policy  # noqa: E402, F401  (policy: the fixture)


def _trl_clip_extremes(monkeypatch) -> list[list[float]]:
    """The clip_ratio/low_min and high_max TRL's GRPOTrainer logs at each of its updates, as they are logged."""
    import trl.trainer.grpo_trainer as gt

    seen, real = [], gt.GRPOTrainer._compute_loss

    def compute_loss(self, model, inputs):
        loss = real(self, model, inputs)
        seen.append([self._metrics["train"][k][-1] for k in ("clip_ratio/low_min", "clip_ratio/high_max")])
        return loss

    monkeypatch.setattr(gt.GRPOTrainer, "_compute_loss", compute_loss)
    return seen


@pytest.mark.parametrize("S, mu, loss_type, keys", [(2, 2, "grpo", {}), (1, 3, "dapo", {"epsilon_high": 0.1})])
def test_clip_ratio_low_min_and_high_max_are_trls(policy, tmp_path, monkeypatch, S, mu, loss_type, keys):  # noqa: F811
    """S x mu updates on one generation batch of 8 fixed completions (the later ones clip): the step logs TRL's
    clip_ratio/low_min and clip_ratio/high_max, the mean of the values TRL's GRPOTrainer logs at each of its updates
    (each the least low-clipped / most high-clipped completion's share of its tokens)."""
    import copy

    seen = _trl_clip_extremes(monkeypatch)
    model, _ = policy
    ours_keys = {"cliprange_high": keys["epsilon_high"]} if keys else {}
    _trl_run(copy.deepcopy(model), tmp_path, monkeypatch, S, mu, loss_type, keys)
    stats, *_ = _ours(copy.deepcopy(model), S, mu, loss_type, ours_keys, monkeypatch)
    assert len(seen) == S * mu
    want = [sum(v) / len(v) for v in zip(*seen)]
    assert want[1] > 0  # (some completion was clipped high)
    assert [stats["clip_ratio/low_min"], stats["clip_ratio/high_max"]] == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("seed", [2])  # (seeds 0, 1, 3: in-order chunks happen to give TRL's values)
def test_clip_extremes_at_s1_are_over_trls_shuffled_micro_batches(policy, tmp_path, monkeypatch, seed):  # noqa: F811
    """steps_per_generation 1, align.mini_batch_size 4 of 8 completions (TRL's gradient_accumulation_steps 2), grpo:
    the loop trains in order (the same weights as TRL's shuffled micro-batches; nothing drawn from torch's RNG) but
    takes clip_ratio/low_min and high_max over micro-batches shuffled as TRL's (torch.randperm from a generator of
    its own, here seeded as TRL's shuffle is). They were taken over the in-order chunks (one prompt's group each):
    high_max 0.389 where TRL's is 0.222; the RNG after the step is as before (test_grpo_probe15's in-order test)."""
    import copy

    import test_grpo_probe15 as p15
    import torch

    from deltatune.train import grpo_loss

    monkeypatch.setattr(p15, "SHUFFLE_SEED", seed)
    monkeypatch.setattr(grpo_loss, "micro_seed", lambda *_: seed)  # (TRL's draw, after torch.manual_seed(seed))
    seen = _trl_clip_extremes(monkeypatch)
    _trl_run(copy.deepcopy(policy[0]), tmp_path, monkeypatch, 1, 3, "grpo", {}, ga=2)
    stats, *_ = _ours(copy.deepcopy(policy[0]), 1, 3, "grpo", {}, monkeypatch, mini_batch_size=4)
    after = torch.random.get_rng_state()
    torch.manual_seed(seed)
    assert torch.equal(after, torch.random.get_rng_state())  # (nothing drawn after the rollouts)
    want = [sum(v) / len(v) for v in zip(*seen)]
    assert [stats["clip_ratio/low_min"], stats["clip_ratio/high_max"]] == pytest.approx(want, abs=1e-6)


def test_clip_extremes_by_hand_with_a_masked_completion_and_under_gspo():
    """Each completion's clipped share of its tokens, a completion with no tokens left out (TRL's nanmin / nanmax of
    masked_seq_mean), by hand; under GSPO each completion's one ratio. Read as the loop takes them: grpo_loss's rows
    gathered by MicroMeans, the three completions one micro-batch."""
    import torch

    from deltatune.train.grpo_loss import grpo_loss
    from deltatune.train.grpo_stats import MicroMeans

    def extremes(st, mask):
        means, rows = MicroMeans(3), torch.arange(3)
        means.gather(rows, st, torch.zeros(mask.shape), mask)
        means.take(rows, [slice(0, 3)])
        return means.values["clipped_low_min"] + means.values["clipped_high_max"]

    old = torch.zeros(3, 4)
    logp = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    _, st = grpo_loss(logp, old, torch.tensor([1.0, 1.0, -1.0]), mask)
    assert extremes(st, mask) == [0.0, 0.5]  # (1 of 2; 2 of 4; row 3 out)
    _, st = grpo_loss(logp, old, torch.tensor([-1.0, 1.0, -1.0]), mask, importance_sampling_level="sequence")
    # sequence log-ratios 0.25, 0.25, 0 (no tokens): ratio e^0.25 = 1.28 > 1.2 clips row 2 high; none clips low
    assert extremes(st, mask) == [0.0, 1.0]
    # every completion with a token has A < 0 and some ratio e^-1 = 0.37 < 0.8: low-clipped shares 1 of 4, 2 of 3
    logp = torch.tensor([[-1.0, 0.0, 0.0, 0.0], [-1.0, -1.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])
    _, st = grpo_loss(logp, old, torch.tensor([-1.0, -0.5, -1.0]), mask)
    assert extremes(st, mask) == [0.25, 0.0]


def _all_truncated_first_slice(tok):
    """The eight completions of test_grpo_probe15, the four of its first shuffled slice truncated (4 tokens, no EOS):
    under mask_truncated_completions that slice's micro-batch has no token (its clip extremes NaN)."""
    import test_grpo_probe15 as p15
    import torch

    torch.manual_seed(p15.SHUFFLE_SEED)
    perm = torch.randperm(8).tolist()
    a_id, eos = tok.convert_tokens_to_ids("a"), tok.eos_token_id
    body = [[a_id + i] * (1 + i % 3) + [eos] for i in range(8)]
    for i in perm[:4]:
        body[i] = [a_id + i, a_id + 8, a_id + 9, a_id + 10]
    return body


def test_clip_extremes_of_a_micro_batch_without_tokens_are_left_out_as_trls_log(policy, tmp_path, monkeypatch):  # noqa: F811
    """TRL's GRPOTrainer.log averages a metric's values with the NaNs left out (None where none is left): a
    micro-batch whose completions were all truncated and masked gives NaN clip_ratio/low_min and high_max. The step
    logged NaN (the NaN kept in its mean); now TRL's number, and None where every micro-batch is NaN."""
    import copy
    import math

    import test_grpo_probe15 as p15

    monkeypatch.setattr(p15, "_completions", _all_truncated_first_slice)
    seen = _trl_clip_extremes(monkeypatch)
    keys = {"mask_truncated_completions": True}
    _trl_run(copy.deepcopy(policy[0]), tmp_path, monkeypatch, 2, 3, "grpo", keys)
    stats, *_ = _ours(copy.deepcopy(policy[0]), 2, 3, "grpo", keys, monkeypatch)
    assert len(seen) == 6 and sum(math.isnan(v) for v, _ in seen) == 3  # (the first slice's three updates)
    want = [sum(x for x in col if x == x) / 3 for col in zip(*seen)]  # (TRL's log: the three numbers' mean)
    assert [stats["clip_ratio/low_min"], stats["clip_ratio/high_max"]] == pytest.approx(want, abs=1e-6)
    from deltatune.train.grpo_loss import trl_log_mean

    nan = float("nan")
    assert trl_log_mean([nan, 0.25, nan, 0.5]) == 0.375 and trl_log_mean([nan, nan]) is None  # (TRL's None)


# -- a column named prompts or completions; a reward function that cannot take TRL's call ------------------------------


def _prepare(
    tmp_path,
    base: str,
    second: str,
    reward: str = "def zero(completions, **kw):\n    return [0.0]",
    evals: str | None = None,
):
    from tiny import tokenizer

    from deltatune.train.config import build
    from deltatune.train.grpo import prepare_grpo

    (tmp_path / "p.jsonl").write_text('{"prompt": "hello there", "answer": "a"}\n' + second + "\n")
    (tmp_path / "rewards.py").write_text(reward + "\n")
    name = reward.split("(")[0].removeprefix("def ")
    align = {"num_generations": 2, "max_new_tokens": 3, "reward_funcs": [f"{tmp_path / 'rewards.py'}:{name}"]}
    data = {"train": str(tmp_path / "p.jsonl")}
    if evals is not None:
        (tmp_path / "e.jsonl").write_text(evals + "\n")
        data["eval"] = str(tmp_path / "e.jsonl")
    cfg = build({"stage": "grpo", "model": {"name_or_path": base}, "method": {"name": "lora"}, "align": align,
                 "data": data, "output": {"dir": str(tmp_path / "run")}, "train": {"batch_size": 2}})  # fmt: skip
    return prepare_grpo(cfg, tokenizer())


@pytest.mark.parametrize("column", ["completions", "prompts"])
def test_a_column_named_like_a_reward_argument_is_one_line_before_the_model_loads(policy, tmp_path, column):  # noqa: F811
    """TRL's GRPOTrainer passes the rows' other columns to each reward function by name beside prompts= and
    completions=: a column of either name makes the first step's call fail (after the model loaded and sampled).
    Refused when the recipe is prepared, naming the row and the column; other columns prepare as before."""
    from deltatune.train.grpo_rewards import Reward, RewardError, score

    def zero(completions, **kw):
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=f"reward zero raised .*'{column}'"):  # (at step 1, blaming the reward)
        score([Reward("zero", zero)], ["p"], ["p"], ["c"], {column: ["x"]}, ["p.jsonl:2"])
    assert _prepare(tmp_path, policy[1], '{"prompt": "hi", "answer": "b"}').loop is not None
    with pytest.raises(DataError) as e:
        _prepare(tmp_path, policy[1], f'{{"prompt": "hi", "{column}": "b"}}')
    assert str(e.value).startswith(f"{tmp_path / 'p.jsonl'}:2: column {column!r} reaches the reward functions")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "reward, words",
    [
        ("def f(completions, solution, **kw):\n    return [0.0]", "missing a required argument: 'solution'"),
        ("def f(prompts, completions, answer):\n    return [0.0]", "got an unexpected keyword argument"),
    ],
)
def test_a_reward_that_cannot_take_trls_call_is_one_line_at_prepare(policy, tmp_path, reward, words):  # noqa: F811
    """A reward function requiring a column no row has, or taking no **kwargs (TRL's GRPOTrainer passes
    completion_ids, trainer_state, log_metric, log_extra and every column), failed at the first step's call after
    the model loaded and sampled ("reward f raised TypeError ... (row p.jsonl:1)"): now one ConfigError naming the
    entry when the recipe is prepared; one that takes the columns it needs and **kwargs prepares."""
    from deltatune.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _prepare(tmp_path, policy[1], '{"prompt": "hi", "answer": "b"}', reward)
    assert "align.reward_funcs entry" in str(e.value) and words in str(e.value) and "\n" not in str(e.value)
    assert "['answer']" in str(e.value)  # (the rows' columns, named)
    ok = "def f(completions, answer, trainer_state, **kw):\n    return [0.0]"
    assert _prepare(tmp_path, policy[1], '{"prompt": "hi", "answer": "b"}', ok).loop is not None
    with pytest.raises(ConfigError, match="missing a required argument: 'answer'"):  # (the eval's call: its columns)
        _prepare(tmp_path, policy[1], '{"prompt": "hi", "answer": "b"}', ok, evals='{"prompt": "yo"}')


def test_a_column_some_rows_lack_reaches_the_rewards_as_none_in_every_row(policy, tmp_path):  # noqa: F811
    """TRL reads the rows with datasets, which gives every row each column of its file (None where the row lacks
    it): a reward requiring ``answer`` gets answer=[None, ...] for a batch of rows without one. It passed the
    prepare check (row 1 has it) and then failed at the step whose batch lacked it ("reward f raised TypeError");
    now the rows get the same columns as TRL's, compared with datasets' own rows."""
    import types

    import datasets

    from deltatune.train.grpo import GRPOLoop, Samples
    from deltatune.train.grpo_rewards import Reward

    prepared = _prepare(tmp_path, policy[1], '{"prompt": "hi"}', "def f(completions, answer, **kw):\n    return [0.0]")
    want = datasets.load_dataset("json", data_files=str(tmp_path / "p.jsonl"), split="train")
    got = []

    def f(completions, answer, **kw):
        got.append(answer)
        return [0.0] * len(completions)

    loop = types.SimpleNamespace(rewards=[Reward("f", f)], tokenizer=None)
    for batch in ([prepared.train[1]] * 2, prepared.train):
        s = Samples(None, None, None, 0, ["c"] * len(batch), None, batch, [[1]] * len(batch))
        GRPOLoop.score(loop, s)
    assert got == [[want[1]["answer"]] * 2, [r["answer"] for r in want]] == [[None, None], ["a", None]]


def test_a_reward_wrapped_by_functools_wraps_is_bound_as_trl_calls_it():
    """TRL calls the wrapper a functools.wraps decorator returns; inspect.signature followed ``__wrapped__`` to the
    inner function and refused a wrapper that takes the call (the inner one requires a ``target`` it is given)."""
    import functools
    import types

    from deltatune.train.grpo_rewards import Reward, check_columns, score

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(completions, **kw):
            return fn(completions, target=kw["answer"], **kw)

        return wrapper

    @deco
    def f(completions, target, **kw):
        return [float(c == t) for c, t in zip(completions, target)]

    items = [types.SimpleNamespace(columns={"answer": "4"}, source="p.jsonl:1")]
    check_columns([Reward("f", f)], ["r.py:f"], items)  # (it raised ConfigError: missing 'target')
    assert score([Reward("f", f)], ["p"], ["p"], ["4"], {"answer": ["4"]}, ["p.jsonl:1"]).tolist() == [[1.0]]
    assert f(prompts=["p"], completions=["4"], completion_ids=[[1]], answer=["4"], trainer_state=None,
             log_metric=None, log_extra=None) == [1.0]  # (TRL's call)  # fmt: skip


def test_a_reward_the_eval_rows_cannot_take_names_the_split_and_its_file(policy, tmp_path):  # noqa: F811
    """A reward that takes the train rows' call but not the eval rows' (a column only the train rows have) is refused
    naming data.eval and its file, the train split's naming data.train and its file."""
    from deltatune.config import ConfigError

    ok = "def f(completions, answer, **kw):\n    return [0.0]"
    with pytest.raises(ConfigError) as e:
        _prepare(tmp_path, policy[1], '{"prompt": "hi", "answer": "b"}', ok, evals='{"prompt": "yo"}')
    assert f"the rows of data.eval ({tmp_path / 'e.jsonl'})" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        _prepare(tmp_path, policy[1], '{"prompt": "hi"}', "def f(completions, solution, **kw):\n    return [0.0]")
    assert f"the rows of data.train ({tmp_path / 'p.jsonl'})" in str(e.value)


def test_singular_video_and_audio_columns_reach_the_rewards_as_trl_passes_them(tok):
    """TRL reads only image / images as media and passes every other column to the rewards; the other text stages
    refuse images / videos / audios (``formats_messages._media``, ``sample.refuse_multimodal``), not video / audio:
    a row's ``video`` or ``audio`` column (a file name a reward checks) is a column, as there."""
    import contextlib

    from deltatune.train.grpo import encode_prompts

    rows = [Row({"prompt": "Describe it.", "video": "clip.mp4", "audio": "a.wav"}, "t.jsonl:1")]
    from deltatune.data.formats import read_samples
    from deltatune.data.sample import refuse_multimodal

    items, _ = encode_prompts(rows, tok, "prompt", 64, "truncate")
    assert items[0].columns == {"video": "clip.mp4", "audio": "a.wav"}
    for extra, refused in (({"video": "v.mp4", "audio": "a.wav"}, False), ({"videos": ["v.mp4"]}, True),
                           ({"audios": ["a.wav"]}, True)):  # fmt: skip
        row = Row({"prompt": "Describe it.", "completion": "ok", **extra}, "t.jsonl:1")
        with pytest.raises(DataError) if refused else contextlib.nullcontext():  # (stage sft's refusal)
            refuse_multimodal(read_samples([row], stage="sft"), "sft")
        with pytest.raises(DataError) if refused else contextlib.nullcontext():  # (grpo's: the same rows)
            encode_prompts([row], tok, "prompt", 64, "truncate")


def test_the_clip_extremes_permutation_is_another_each_step_without_touching_torchs_rng():
    """At steps_per_generation 1 the permutation came from a fork of torch's CPU RNG, which nothing moves on a GPU
    (rollouts sample with the CUDA generator): the same grouping every step of a run. Now a generator of its own,
    seeded by the run's seed and the step: another each step, the same again for the same step (a resumed run),
    torch's RNG untouched."""
    import torch

    from deltatune.train.grpo_loss import micro_seed, trl_micro_order

    parts = torch.arange(8).view(1, -1)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    orders = [trl_micro_order(parts, False, micro_seed(3, step)).tolist() for step in range(4)]
    assert torch.equal(state, torch.random.get_rng_state())
    assert len({str(o) for o in orders}) == 4 and sorted(orders[0][0]) == list(range(8))
    assert trl_micro_order(parts, False, micro_seed(3, 2)).tolist() == orders[2]
    assert trl_micro_order(parts, True, micro_seed(3, 2)) is parts
