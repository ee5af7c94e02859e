"""GRPO against TRL 1.16's GRPOTrainer, round 6b: after chat prompts reward functions get each completion as one
assistant message (``_generate_and_score_completions``), parsed by a tokenizer's response_template as TRL's
``parse_response``; AdamW spares biases and norm weights as the HF Trainer's create_optimizer; the context check counts
a token adapter's virtual tokens; a checkpoint of the one AdamW group before that is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from test_grpo import ROOT, base_dir, policy  # noqa: F401  (base_dir: the module's tiny policy fixture)
from tiny import save_tiny, word_tokenizer

from deltatune.config import ConfigError
from deltatune.train.config import AlignArgs
from deltatune.train.grpo import GRPOLoop, PromptItem, Samples
from deltatune.train.grpo_rewards import Reward

CHAT = [{"role": "user", "content": "w1 w2"}]


def test_after_chat_prompts_rewards_get_trls_assistant_messages(base_dir):  # noqa: F811
    """TRL's documented conversational reward reads ``completion[0]["content"]``: deltatune gave the text, so that
    reward raised TypeError (string indices) and stopped the run. Text prompts still give text."""
    tok, seen = word_tokenizer(), []

    def trl_format_reward(completions, completion_ids, **kwargs):  # as in TRL's docs, conversational format
        seen.append((completions, completion_ids))
        return [float("w1" in c[0]["content"]) for c in completions]

    loop = GRPOLoop(policy(base_dir), tok, [Reward("fmt", trl_format_reward)], AlignArgs(num_generations=3,
                    max_new_tokens=4), seed=0)  # fmt: skip
    loop.step([PromptItem([2, 5, 6], CHAT, {}, "p.jsonl:1"), PromptItem([2, 7], CHAT, {}, "p.jsonl:2")])
    completions, ids = seen[0]
    assert completions == [[{"role": "assistant", "content": tok.decode(i, skip_special_tokens=True)}] for i in ids]
    assert len(completions) == 6

    texts = []
    loop.rewards = [Reward("text", lambda prompts, completions, **kw: texts.append(completions) or [0.0] * 3)]
    loop.step([PromptItem([2, 5, 6], "w1 w2", {}, "p.jsonl:1")])
    assert len(texts[0]) == 3 and all(isinstance(c, str) for c in texts[0])


def test_the_arithmetic_rewards_read_text_and_assistant_messages():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("arithmetic", ROOT / "recipes" / "rewards" / "arithmetic.py")
    a = module_from_spec(spec)
    spec.loader.exec_module(a)
    texts = ["5 + 10 = 15\nAnswer: 15", "The answer is 15.", "none"]
    messages = [[{"role": "assistant", "content": t}] for t in texts]
    for completions in (texts, messages):
        assert a.exact_answer(None, completions, [15, 15, 15]) == [1.0, 1.0, 0.0]
        assert a.answer_format(None, completions) == [1.0, 0.25, 0.0]


def _template_tokenizer():
    """A word tokenizer whose response_template reads reasoning between ``think`` and ``done``, JSON tool calls
    between ``tool`` and ``end`` and the content up to [EOS], after the assistant header ``<a>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<a>", "think", "done", "tool", "end", '{"name":', '"f",', '"f"}', '"arguments":', "{}}", "hi", "there"]
    tk = Tokenizer(
        models.WordLevel({t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *words])}, "[UNK]")
    )
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                  eos_token="[EOS]")  # fmt: skip
    tok.response_template = {"defaults": {"role": "assistant"}, "start_anchor": "<a>", "fields": {
        "reasoning_content": {"open": "think", "close_pattern": r"done\s*", "content": "text"},
        "tool_calls": {"open": "tool", "close_pattern": r"end\s*", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"\[EOS\]\s*", "content": "text"}}}  # fmt: skip
    return tok


def test_a_response_template_parses_completions_as_trls_parse_response():
    """With a tokenizer that has a response_template, TRL gives ``parse_response(tokenizer, completion_ids,
    prefix=prompt_ids)``: reasoning and tool calls apart, a malformed call or a failed parse as the decoded text."""
    from trl.chat_template_utils import parse_response

    tok = _template_tokenizer()
    prompt = [2, 4]  # [BOS] <a>: the assistant header the chat template writes
    completions = ["think hi done there [EOS]", 'hi tool {"name": "f", "arguments": {}} end [EOS]',
                   'tool {"name": "f"} end [EOS]', 'tool "arguments": {}} end [EOS]', "hi there", "think hi"]  # fmt: skip
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in completions]
    seen = []
    loop = GRPOLoop.__new__(GRPOLoop)
    loop.tokenizer, loop.rewards = tok, [Reward("r", lambda completions, **kw: seen.extend(completions) or [0.0] * 6)]
    items = [PromptItem(prompt, CHAT, {}, f"p.jsonl:{i}") for i in range(6)]
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    loop.score(Samples(None, None, None, 2, texts, None, items, ids))
    want = [[parse_response(tok, i, prefix=prompt, tools=[])] for i in ids]
    assert seen == want
    assert want[0][0]["reasoning_content"] == "hi" and want[1][0]["tool_calls"][0]["function"]["name"] == "f"
    assert want[2][0]["tool_calls"][0]["function"]["arguments"] == {} and want[3][0]["content"] == texts[3]


def test_weight_decay_spares_biases_and_norm_weights_as_the_hf_trainer():
    """A bottleneck adapter with a layer norm: GRPO decayed its biases and norm weights (0.1 where TRL's, the HF
    Trainer's create_optimizer, has 0)."""
    import tempfile

    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    import deltatune as dt

    tok = word_tokenizer()
    config = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=48, vocab_size=len(tok), pad_token_id=0,
                                  bos_token_id=2, eos_token_id=3, max_position_embeddings=64)  # fmt: skip
    model = dt.get_delta_model(AutoModelForCausalLM.from_config(config),
                               dt.BottleneckConfig(target_modules=["mlp"], bottleneck_size=4, ln_after=True))  # fmt: skip
    ours = GRPOLoop(model, tok, [], AlignArgs(), weight_decay=0.1).optimizer
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, weight_decay=0.1, report_to=[], use_cpu=True)
        hf = Trainer(model=model, args=args).create_optimizer()

    def decay(opt):
        return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}

    assert decay(ours) == decay(hf)
    assert sorted(decay(ours).values()).count(0.0) == 8  # 2 layers x (2 biases, the norm's weight and bias)


def test_a_token_adapters_virtual_tokens_count_in_the_context_check(tmp_path, capsys):
    """GPT-2 with 48 positions, prompt tuning with 20 virtual tokens, prompts of at most 16 tokens and 28 new ones:
    16 + 28 = 44 passed the check, then sampling ran past position 48 (an error from the generation step, after the
    model loaded). Now refused before the model loads, naming the key and the virtual tokens, as PPO does."""
    from deltatune.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about the {w} cat"}) + "\n" for w in "abcd"))
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(json.dumps({
        "stage": "grpo", "model": {"name_or_path": save_tiny(tmp_path / "gpt2", "gpt2", "causal_lm", n_positions=48)},
        "method": {"name": "prompt_tuning", "num_virtual_tokens": 20},
        "data": {"train": str(prompts), "max_length": 16}, "train": {"max_steps": 1, "batch_size": 2},
        "align": {"reward_funcs": ["test_grpo:yes_fraction"], "max_new_tokens": 28, "num_generations": 2,
                  "mini_batch_size": 2},
        "output": {"dir": str(tmp_path / "run")},
    }))  # fmt: skip
    capsys.readouterr()  # (the tiny model's save)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "align.max_new_tokens=28" in err and "the adapter's 20 virtual tokens" in err and "context of 48" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_checkpoint_of_one_adamw_group_is_refused_in_one_line(base_dir, tmp_path):  # noqa: F811
    """A checkpoint written before c1a4e8e holds AdamW's state in one parameter group: --resume raised torch's
    ValueError from inside load_state_dict (a traceback). Now one line naming the checkpoint; today's resume."""
    from deltatune.train.grpo import _load_checkpoint, _save_checkpoint

    old, g = GRPOLoop(policy(base_dir), word_tokenizer(), [], AlignArgs()), torch.Generator()
    old.optimizer = torch.optim.AdamW([p for p in old.model.parameters() if p.requires_grad])  # as before c1a4e8e
    _save_checkpoint(str(tmp_path), 1, old, g, [], [], {}, 5)
    loop = GRPOLoop(policy(base_dir), word_tokenizer(), [], AlignArgs())
    with pytest.raises(
        ConfigError, match=r"^--resume: '.*checkpoint-1' was written by an older deltatune whose AdamW"
    ):
        _load_checkpoint(str(tmp_path / "checkpoint-1"), loop, g)
    _save_checkpoint(str(tmp_path), 2, loop, g, [{"step": 2}], [], {}, 5)
    assert _load_checkpoint(str(tmp_path / "checkpoint-2"), loop, g)[:2] == (2, [{"step": 2}])


def test_a_rows_completion_columns_are_left_out_of_the_reward_arguments_as_trl_does():
    """TRL passes every column but prompt, completion and completion_ids: a prompt-completion dataset's own
    ``completion`` reached a reward as a keyword (one without **kwargs raised), and could shadow TRL's ids."""
    from tiny import tokenizer

    from deltatune.data.load import Row
    from deltatune.train.grpo import encode_prompts

    row = Row({"prompt": "two plus two", "completion": "4", "completion_ids": [7], "answer": "4"}, "p.jsonl:1")
    items, _ = encode_prompts([row], tokenizer(), "prompt", 64, "truncate")
    assert items[0].columns == {"answer": "4"}


def test_async_rewards_run_on_one_event_loop_across_steps_and_inside_a_running_loop():
    """Each call ran asyncio.run, a new loop each step: a reward's semaphore (bound to the loop of its first use)
    failed at the second step, and a run started inside a running loop (a notebook) failed at the first."""
    import asyncio

    from deltatune.train.grpo_rewards import score

    limit = asyncio.Semaphore(1)

    async def judge(prompts, completions, **kwargs):
        async def one(c):
            async with limit:
                await asyncio.sleep(0)
                return float(len(c))

        return await asyncio.gather(*(one(c) for c in completions))

    rewards = [Reward("judge", judge)]
    for _ in range(2):
        assert score(rewards, ["p", "p"], ["p", "p"], ["ab", "abc"], {}, ["0", "1"]).flatten().tolist() == [2.0, 3.0]

    async def notebook():
        return score(rewards, ["p"], ["p"], ["ab"], {}, ["0"])

    assert asyncio.run(notebook()).flatten().tolist() == [2.0]
