"""GRPO and PPO faults found by probing: the checkpoint's generation_config leaked into the sampling; a reward-model
run scored GRPO's rendered chat prompt (templated twice); reward files that did not import as scripts do, or errors
that did not say where; PPO rewards of None / NaN; train_runtime_s of a resumed run."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import word_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from deltatune import LoraConfig, get_delta_model
from deltatune.config import ConfigError
from deltatune.data.load import Row
from deltatune.train.config import AlignArgs
from deltatune.train.grpo import GRPOLoop, PromptItem, Samples, encode_prompts
from deltatune.train.grpo_rewards import Reward, RewardError, check_rewards, score
from deltatune.train.ppo import PPOLoop, reward_values

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    config = AutoConfig.for_model(
        "llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, vocab_size=45, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rl") / "llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def policy(base_dir: str):
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    return get_delta_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


ITEMS = [PromptItem([2, 4 + i, 4 + (i * 7) % 40], f"prompt {i}", {}, f"p.jsonl:{i + 1}") for i in range(4)]


def zeros(prompts, completions, **kwargs):
    return [0.0] * len(completions)


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_sampling_ignores_the_checkpoints_generation_config(base_dir, stage):
    """transformers fills every setting the loop's GenerationConfig leaves unset from the checkpoint's
    generation_config (Qwen2.5-Instruct ships repetition_penalty 1.05): the samples came from another distribution
    than pi, the one the ratio and the KL are taken under. Here the checkpoint suppresses every word but 'yes' and
    forbids repeats: the samples must be those of a clean checkpoint, token for token."""
    model, tok = policy(base_dir), word_tokenizer()
    align = AlignArgs(num_generations=4, max_new_tokens=8, mini_batch_size=16)
    if stage == "grpo":
        loop = GRPOLoop(model, tok, [Reward("zeros", zeros)], align, lr=0.0)

        def draw():
            return loop.sample(ITEMS, 4).sequences
    else:
        loop = PPOLoop(model, tok, lambda p, r: [0.0] * len(p), align, lr=0.0)

        def draw():
            return loop.rollout([it.ids for it in ITEMS] * 4).sequences

    torch.manual_seed(3)
    clean = draw()
    assert (clean[:, 3:] < 44).any() and (clean[:, 3:] == clean[:, 3:].roll(1, 1)).any()  # the guard: 'w' words
    config = model.get_base_model().generation_config
    config.suppress_tokens, config.no_repeat_ngram_size, config.repetition_penalty = list(range(3, 44)), 1, 5.0
    torch.manual_seed(3)
    assert torch.equal(draw(), clean)
    assert model.get_base_model().generation_config.repetition_penalty == 5.0  # the checkpoint's own, put back


def test_a_reward_model_scores_grpo_prompts_as_written_as_in_ppo():
    """GRPO gave a reward-model run the policy's rendered input decoded ('<|im_start|> user ... assistant', or
    '### Instruction: ...'), which the scorer then wraps in the reward run's template again; PPO gives the row's own
    words. Now GRPO does too; a conversation of several messages still goes as the decoded input."""
    from tiny import tokenizer

    tok = tokenizer()
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus two"}]
    rows = [Row({"prompt": [{"role": "user", "content": "what is two plus two"}]}, "p.jsonl:1"),
            Row({"prompt": "what is two plus two"}, "p.jsonl:2"), Row({"prompt": chat}, "p.jsonl:3")]  # fmt: skip
    for template in (None, "alpaca"):
        items, _ = encode_prompts(rows, tok, "prompt", 64, "truncate", template)
        seen = []
        loop = GRPOLoop.__new__(GRPOLoop)
        loop.tokenizer, loop.rewards = (
            tok,
            [Reward("rm", lambda p, c, seen=seen: seen.extend(p) or [0.0] * len(p), model=True)],
        )
        loop.score(Samples(None, None, None, 0, ["four"] * 3, None, items))
        assert seen[:2] == ["what is two plus two"] * 2, template
        assert seen[2] == tok.decode(items[2].ids, skip_special_tokens=True)


# -- reward files --------------------------------------------------------------------------------------------


def _import(tmp_path, monkeypatch, files: dict[str, str], spec: str):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))  # the reward folder joins a copy
    return check_rewards(AlignArgs(reward_funcs=[spec]))[0]


def test_a_reward_file_imports_as_a_script_does(tmp_path, monkeypatch):
    """A file with ``from __future__ import annotations`` and a dataclass (as recipes/rewards/arithmetic.py starts)
    failed with "AttributeError: 'NoneType' object has no attribute '__dict__'" (the module was in no sys.modules),
    and one importing a module next to it with "No module named ...". Both import now, as `python file.py` runs."""
    head = "from __future__ import annotations\nfrom dataclasses import dataclass\n\n"
    reward = _import(tmp_path, monkeypatch, {
        "helpers_rl_probe.py": "def length(c):\n    return float(len(c))\n",
        "mine.py": head + "from helpers_rl_probe import length\n\n\n@dataclass\nclass Weight:\n    w: float = 2.0\n\n\n"
                   "def f(prompts, completions, **kw):\n    return [Weight().w * length(c) for c in completions]\n",
    }, "mine.py:f")  # fmt: skip
    assert score([reward], ["p"], ["p"], ["abc"], {}, ["d.jsonl:1"]).tolist() == [[6.0]]


@pytest.mark.parametrize(
    "text, message",
    [
        ("X = undefined_name\n", "could not be imported: NameError: name 'undefined_name' is not defined (bad.py:1)"),
        (
            "import math\n\ndef f(prompts, completions)\n",
            "could not be imported: SyntaxError: expected ':' (bad.py:3)",
        ),
        (
            "import no_such_module_rl\n",
            "could not be imported: ModuleNotFoundError: No module named 'no_such_module_rl' (bad.py:1)",
        ),
    ],
)
def test_a_reward_file_that_does_not_import_names_file_and_line(tmp_path, monkeypatch, text, message):
    with pytest.raises(ConfigError) as err:
        _import(tmp_path, monkeypatch, {"bad.py": text}, "bad.py:f")
    assert str(err.value) == f"align.reward_funcs entry 'bad.py:f' {message}"


def test_a_reward_that_raises_names_file_and_line(tmp_path, monkeypatch):
    """The reward's own line, not the library's frame below it (json's here)."""
    reward = _import(tmp_path, monkeypatch, {"rw.py": "import json\n\n\ndef f(prompts, completions, **kw):\n"
                                             "    return [json.loads(c) for c in completions]\n"}, "rw.py:f")  # fmt: skip
    with pytest.raises(RewardError) as err:
        score([reward], ["p", "q"], ["p", "q"], ["1", "x"], {}, ["d.jsonl:1", "d.jsonl:2"])
    assert str(err.value).startswith("reward f raised JSONDecodeError: Expecting value: line 1 column 1 (char 0) "
                                     "(row d.jsonl:2, completion 'x', at rw.py:5)")  # fmt: skip


# -- PPO rewards ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        (None, r"reward function returned None \(NoneType\) for the response '.*' to '.*', not a number"),
        (float("nan"), r"reward function returned nan for the response '.*' to '.*'; rewards must be finite numbers"),
        ("high", r"reward function returned 'high' \(str\) for the response"),
    ],
)
def test_a_ppo_reward_that_is_not_a_number_is_one_line(base_dir, value, message):
    """None and text were torch's "TypeError: must be real number, not NoneType" (a traceback through the CLI);
    NaN trained on and stopped later as a non-finite loss, blaming nothing. Now one line naming the reward."""
    loop = PPOLoop(policy(base_dir), word_tokenizer(), lambda p, r: [1.0] * (len(p) - 1) + [value], AlignArgs())
    with pytest.raises(RewardError, match=message):
        loop.rollout([it.ids for it in ITEMS])


def test_a_ppo_reward_of_0_d_tensors_or_numpy_scalars_is_read_as_numbers():
    """TRL's PPO examples return a list of 0-d tensors (or numpy floats); each is its number, as torch.as_tensor
    read them before rewards were checked one by one. A tensor of several values is still refused."""
    import numpy as np

    scores = reward_values([torch.tensor(0.5), np.float32(2), np.int64(3)], "f", 3, ["r0", "r1", "r2"])
    assert scores == [0.5, 2.0, 3.0] and all(type(v) is float for v in scores)
    with pytest.raises(RewardError, match="not a number"):
        reward_values([torch.tensor([0.5, 1.0]), 1.0], "f", 2, ["r0", "r1"])


# -- resume --------------------------------------------------------------------------------------------------


TINY = ["model.dtype=float32", "data.limit=8", "train.batch_size=2", "align.num_generations=2", "align.max_new_tokens=4",
        "align.mini_batch_size=4", "train.eval_on_start=false", "data.eval=null", "train.save_steps=2",
        "train.precision=fp32"]  # fmt: skip


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_a_resumed_runs_runtime_is_the_whole_runs(tmp_path, monkeypatch, capsys, stage):
    """As the Trainer stages report it (deltatune/train/trainer.py; the HF Trainer's own train_runtime covers the
    resumed part only): a checkpoint at step 2 whose saved time is made 1000 s; the run resumed from it to step 4
    reports 1000 s plus its own steps' time, not only the latter."""
    from tiny import save_tiny

    from deltatune.cli import main

    monkeypatch.chdir(ROOT)
    llama = save_tiny(tmp_path / "llama", "llama", "causal_lm")
    if stage == "grpo":
        argv = ["recipes/grpo-arithmetic.yaml", f"model.name_or_path={llama}", *TINY]
    else:
        (tmp_path / "rl_probe_reward.py").write_text("def length(prompts, responses):\n"
                                                     "    return [float(len(r)) for r in responses]\n")  # fmt: skip
        monkeypatch.syspath_prepend(str(tmp_path))
        rows = tmp_path / "prompts.jsonl"
        rows.write_text("".join(json.dumps({"prompt": f"hello {i}"}) + "\n" for i in range(8)))
        argv = ["recipes/ppo.yaml", f"model.name_or_path={llama}", f"data.train={rows}", "data.eval=null",
                "align.reward_model=rl_probe_reward:length", "model.dtype=float32", "train.batch_size=2",
                "align.max_new_tokens=4", "align.mini_batch_size=2", "align.ppo_epochs=1", "train.save_steps=2"]  # fmt: skip
    out = tmp_path / "run"
    assert main(["train", *argv, "train.max_steps=3", f"output.dir={out}"]) == 0  # (PPO saves no final checkpoint)
    state = out / "checkpoint-2" / ("grpo_state.pt" if stage == "grpo" else "trainer_state.json")
    if stage == "grpo":
        saved = torch.load(state, weights_only=True)
        assert 0 < saved["metrics"]["train_runtime_s"] < 1000
        saved["metrics"]["train_runtime_s"] = 1000.0
        torch.save(saved, state)
    else:
        saved = json.loads(state.read_text())
        assert 0 < saved["runtime_s"] < 1000
        saved["runtime_s"] = 1000.0
        state.write_text(json.dumps(saved))
    for name in out.iterdir():  # what a run killed after step 2 leaves
        if name.name not in ("run.yaml", "checkpoint-2"):
            shutil.rmtree(name) if name.is_dir() else name.unlink()
    capsys.readouterr()
    assert main(["train", *argv, "train.max_steps=4", f"output.dir={out}", "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 4 and 1000 < metrics["train_runtime_s"] < 1000 + 300


# -- GRPO's KL against TRL's default -------------------------------------------------------------------------


@pytest.mark.parametrize("on_policy", [False, True])
def test_the_bias_corrected_kl_equals_trls_default(tmp_path, on_policy):
    """TRL 1.16's GRPO multiplies each token's k3 KL by its ratio pi / pi_old (use_bias_correction_kl=True, its
    default). Off policy (num_iterations > 1: pi_old is the policy before this generation batch's updates) the loss
    differs from the paper's; on policy the value is the same but the gradient is not (the ratio is differentiable).
    grpo_loss(bias_correction_kl=True) gives TRL's loss and gradient in both cases."""
    import trl
    from datasets import Dataset
    from tiny import grpo_batch, save_tiny, tokenizer

    import deltatune as dt
    from deltatune.train.grpo import grpo_loss
    from deltatune.train.logprobs import token_logprobs

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "llama"))
    model = dt.get_delta_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():  # a policy away from the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    b, temperature = grpo_batch(model.config.vocab_size), 0.7
    g, n, p, t, prompts, completions, mask, advantages, labels, ids = (
        b[k] for k in ("g", "n", "p", "t", "prompts", "completions", "mask", "advantages", "labels", "ids"))  # fmt: skip

    def logps(adapter: bool = True) -> torch.Tensor:
        with contextlib.nullcontext() if adapter else model.disable_adapter():
            return token_logprobs(model(input_ids=ids).logits.float() / temperature, labels)[:, p - 1 :]

    with torch.no_grad():
        reference = logps(False)
        old = None if on_policy else logps() + 0.3 * torch.randn(n, t, generator=g)
    args = trl.GRPOConfig(str(tmp_path / "trl"), per_device_train_batch_size=n, report_to=[], use_cpu=True,
                          bf16=False, beta=0.5, epsilon=0.2, temperature=temperature, num_generations=n,
                          max_completion_length=t, loss_type="bnpo")  # fmt: skip
    assert args.use_bias_correction_kl  # TRL's default
    trainer = dt.trl_trainer(trl.GRPOTrainer)(
        model=model, args=args, train_dataset=Dataset.from_list([{"prompt": "hi"}] * n), processing_class=tokenizer(),
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
    )  # fmt: skip
    model.eval()
    inputs = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": completions,
              "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": reference}  # fmt: skip
    lora = [q for name, q in model.named_parameters() if "lora_" in name]
    expected = trainer._compute_loss(model, inputs)
    expected_grad = torch.autograd.grad(expected, lora)
    policy = logps()
    ours, _ = grpo_loss(policy, policy.detach() if old is None else old, advantages, mask, 0.2, 0.5, reference,
                        "token", bias_correction_kl=True)  # fmt: skip
    paper, _ = grpo_loss(policy, policy.detach() if old is None else old, advantages, mask, 0.2, 0.5, reference,
                         "token")  # fmt: skip
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)
    for a, b in zip(torch.autograd.grad(ours, lora, retain_graph=True), expected_grad):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if on_policy:  # the guard: the paper's term has TRL's value here, but another gradient
        assert paper.item() == pytest.approx(expected.item(), abs=1e-6)
        grads = torch.autograd.grad(paper, lora)
        assert any(not torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(grads, expected_grad))
    else:
        assert abs(paper.item() - expected.item()) > 1e-4


def test_a_ppo_reward_module_that_fails_to_import_is_one_line(tmp_path, monkeypatch):
    """Only ImportError and AttributeError were caught: a module whose import raised anything else (a NameError, a
    failing open) went through the CLI as a traceback."""
    from deltatune.train.ppo import reward_function

    (tmp_path / "rl_probe_broken.py").write_text("X = undefined_name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        reward_function("rl_probe_broken:score")
    assert str(err.value) == ("align.reward_model 'rl_probe_broken:score' could not be imported: NameError: name "
                              f"'undefined_name' is not defined ({tmp_path / 'rl_probe_broken.py'}:1)")  # fmt: skip


@pytest.mark.parametrize("on", [False, True])
def test_the_bias_corrected_kl_is_a_recipe_key_the_step_uses(base_dir, monkeypatch, on):
    """align.bias_correction_kl (default off, the paper's; TRL's default on) reaches the loss of every GRPO step."""
    from deltatune.train import grpo

    seen = []
    loss = grpo.grpo_loss
    monkeypatch.setattr(grpo, "grpo_loss", lambda *a, **k: seen.append(a[-1]) or loss(*a, **k))
    align = AlignArgs(num_generations=2, max_new_tokens=3, beta=0.1, bias_correction_kl=on)
    GRPOLoop(policy(base_dir), word_tokenizer(), [Reward("zeros", zeros)], align, lr=0.0).step(ITEMS[:2])
    assert seen and all(v is on for v in seen)
