"""Stage grpo against TRL 1.16's GRPOTrainer (probe 23): TRL's num_tokens (the run's prompt and completion tokens so
far, which the rewards' trainer_state carries too), kept across a resume."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from deltatune.train.config_align import AlignArgs, validate_align

G, T = 4, 4
PROMPTS = ["hi", "hello there my good friend"]  # (two groups whose prompts differ in length)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from tiny import save_tiny
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    base = save_tiny(tmp_path_factory.mktemp("tiny") / "llama")
    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), config).eval()


def _bodies(tok, shift: int) -> list[list[int]]:
    """Eight completions of 1 to 3 tokens and an EOS, the third truncated (4 tokens, no EOS)."""
    a_id, eos = tok.convert_tokens_to_ids("a"), tok.eos_token_id
    body = [[a_id + i] * (1 + (i + shift) % 3) + [eos] for i in range(8)]
    body[2] = [a_id + 7, a_id + 8, a_id + 9, a_id + 10]
    return body


def _samples(tok, body):
    from deltatune.train.grpo import PromptItem, Samples

    pad = tok.pad_token_id
    items = [PromptItem(tok(p)["input_ids"], p, {}, f"p.jsonl:{i + 1}") for i, p in enumerate(PROMPTS)]
    rows = [it for it in items for _ in range(G)]
    P = max(len(it.ids) for it in items)
    ids = torch.tensor([[pad] * (P - len(it.ids)) + it.ids for it in rows])
    pmask = torch.tensor([[0] * (P - len(it.ids)) + [1] * len(it.ids) for it in rows])
    completion = torch.tensor([c + [pad] * (T - len(c)) for c in body])
    cmask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in body])
    return items, Samples(torch.cat([ids, completion], 1), torch.cat([pmask, cmask], 1), cmask, P,
                          tok.batch_decode(completion, skip_special_tokens=True),
                          torch.tensor([tok.eos_token_id not in c for c in body]), rows, body)  # fmt: skip


def _trl_num_tokens(model, tmp_path, bodies) -> tuple[list[int], list[int]]:
    """TRL's num_tokens after each of two training generations of ``bodies``, and what its reward saw as
    trainer_state.num_input_tokens_seen."""
    import trl
    from datasets import Dataset
    from tiny import tokenizer

    import deltatune as dt

    tok, seen, bodies = tokenizer(), [], list(bodies)

    def rollout(prompts, trainer):
        body = bodies.pop(0)
        return {"prompt_ids": [tok(p)["input_ids"] for p in prompts], "completion_ids": body,
                "logprobs": [[0.0] * len(c) for c in body]}  # fmt: skip

    def reward(completions, trainer_state, **_):
        seen.append(trainer_state.num_input_tokens_seen)
        return [float(i % 3) for i in range(len(completions))]

    args = trl.GRPOConfig(str(tmp_path), per_device_train_batch_size=8, report_to=[], use_cpu=True, bf16=False,
                          num_generations=G, max_completion_length=T, beta=0.0)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = dt.trl_trainer(trl.GRPOTrainer)(
            model=model, args=args, train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS] * G),
            processing_class=tok, reward_funcs=reward, rollout_func=rollout,
        )  # fmt: skip
    model.train()  # (TRL counts the tokens of training generations only)
    logged = []
    with torch.no_grad():
        for _ in range(2):
            trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
            logged.append(trainer._metrics["train"]["num_tokens"][-1])
    model.eval()
    return logged, seen


def _loop(model, tok, bodies, monkeypatch, seen):
    from deltatune.train.grpo import GRPOLoop
    from deltatune.train.grpo_rewards import Reward

    def reward(completions, trainer_state, **_):
        seen.append(trainer_state.num_input_tokens_seen)
        return [float(i % 3) for i in range(len(completions))]

    align = AlignArgs(num_generations=G, max_new_tokens=T, beta=0.0)
    validate_align(align, "grpo")
    loop = GRPOLoop(model, tok, [Reward("r", reward)], align, lr=0.0)
    batches = [_samples(tok, b) for b in bodies]
    monkeypatch.setattr(loop, "sample", lambda items, num: batches[len(seen)][1])
    return loop, batches[0][0]


def test_num_tokens_is_trls_cumulative_count(policy, tmp_path, monkeypatch):
    """num_tokens is logged as TRL's: the run's prompt (each completion's, unpadded) and completion (through the EOS)
    tokens so far, counted before the rewards see trainer_state (the loop before logged no num_tokens, and its
    rewards saw num_input_tokens_seen 0). Two steps: 8 x 1 + 8 x 6 prompt tokens a step, completions 21 then 20."""
    from tiny import tokenizer

    tok = tokenizer()
    bodies = [_bodies(tok, 0), _bodies(tok, 1)]
    want, trl_seen = _trl_num_tokens(copy.deepcopy(policy), tmp_path, bodies)
    seen: list[int] = []
    loop, items = _loop(copy.deepcopy(policy), tok, bodies, monkeypatch, seen)
    got = [loop.step(items).get("num_tokens") for _ in range(2)]
    prompt_tokens = G * sum(len(tok(p)["input_ids"]) for p in PROMPTS)
    hand = [prompt_tokens + sum(map(len, bodies[0]))]
    hand.append(hand[0] + prompt_tokens + sum(map(len, bodies[1])))
    assert got == want == hand and seen == trl_seen == hand


def test_num_tokens_goes_on_after_a_resume(policy, tmp_path, monkeypatch):
    """A resumed run's num_tokens goes on from its checkpoint's last step (the run's count, as TRL's state keeps it);
    a checkpoint written before the count was logged gives none (unknown), not a count from 0."""
    from tiny import tokenizer

    from deltatune.train.grpo import _load_checkpoint, _save_checkpoint

    tok = tokenizer()
    bodies = [_bodies(tok, 0), _bodies(tok, 1)]
    seen: list[int] = []
    loop, items = _loop(copy.deepcopy(policy), tok, bodies, monkeypatch, seen)
    history = [{"step": 1, **loop.step(items)}]
    g = torch.Generator().manual_seed(0)
    _save_checkpoint(str(tmp_path), 1, loop, g, history, [], {}, None)
    again, _ = _loop(copy.deepcopy(policy), tok, bodies, monkeypatch, [])
    _load_checkpoint(str(tmp_path / "checkpoint-1"), again, g)
    assert again.state.num_input_tokens_seen == history[0]["num_tokens"] > 0
    history[0].pop("num_tokens")  # (a checkpoint of a run before the count)
    _save_checkpoint(str(tmp_path), 1, loop, g, history, [], {}, None)
    rewards_saw = [None]
    old, _ = _loop(copy.deepcopy(policy), tok, bodies, monkeypatch, rewards_saw)
    _load_checkpoint(str(tmp_path / "checkpoint-1"), old, g)
    # not logged, and the rewards' trainer_state holds an int (None before the review: a reward doing arithmetic
    # with it raised on the resumed run's first step), counting from 0 as TRL's state without the field
    assert "num_tokens" not in old.step(items) and rewards_saw[1] == old.state.num_input_tokens_seen > 0


def test_num_tokens_counts_the_prompts_of_samples_built_without_items():
    """The count is the samples' attention mask (each row's unpadded prompt and its completion through the EOS): a
    Samples built without its items (as tests and a custom sample build them) counts its prompts too (by the items,
    before, it counted 23 of the 63: the completions only)."""
    from types import SimpleNamespace

    from tiny import tokenizer

    from deltatune.train.grpo_stats import count_tokens

    tok = tokenizer()
    s = _samples(tok, _bodies(tok, 0))[1]
    want = G * sum(len(tok(p)["input_ids"]) for p in PROMPTS) + sum(map(len, _bodies(tok, 0)))
    s.items = []
    state = SimpleNamespace(num_input_tokens_seen=5)
    assert count_tokens(state, s) == {"num_tokens": 5 + want} and state.num_input_tokens_seen == 5 + want


# -- GRPO prompts rendered through a built-in template whose markers the tokenizer cannot write ------------------


def test_a_template_marker_the_tokenizer_reads_as_unk_is_refused_as_where_answers_train():
    """data.template=chatml with a word vocabulary: the prompts' <|im_start|>user and <|im_start|>assistant read as
    [UNK], and the policy would sample and train after them (the loop before encoded "w0" silently as [UNK] x 3, the
    word too); refused with the DataError a training row's rendering gives (templates._check_markers), naming
    data.template and the marker. alpaca's markers, also unwritable, are refused alike; plain's (words) are not."""
    from tiny import word_tokenizer

    from deltatune.data.load import DataError, Row
    from deltatune.data.templates import render
    from deltatune.train.grpo import encode_prompts

    tok, rows = word_tokenizer(), [Row({"prompt": "w0"}, "p.jsonl:1")]
    answer = [{"role": "user", "content": "w0"}, {"role": "assistant", "content": "w1"}]
    for template in ("chatml", "alpaca"):
        with pytest.raises(DataError) as trained:  # (where answers train: the reference message)
            render(answer, tok, template)
        with pytest.raises(DataError) as prompted:
            encode_prompts(rows, tok, "prompt", 64, "truncate", template)
        assert str(prompted.value) == str(trained.value) and f"data.template={template}: " in str(prompted.value)
    items, _ = encode_prompts(rows, tok, "prompt", 64, "truncate", "plain")
    assert tok.unk_token_id not in items[0].ids
    assert encode_prompts(rows, tok, "prompt", 64, "truncate")[0][0].ids == [tok.convert_tokens_to_ids("w0")]
