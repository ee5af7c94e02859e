"""PPO: GAE, the clipped losses and the KL controller by hand; learning a programmatic reward with a bounded KL;
the reference really is the base with the adapter off; one copy of the base weights; a reward model with another
tokenizer scores re-tokenised text; the recipe through the CLI; a generation longer than the context is refused."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import save_tiny, word_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from deltatune import LoraConfig, get_delta_model
from deltatune.cli import main
from deltatune.config import ConfigError
from deltatune.data.tasks import Collator
from deltatune.train import build, train
from deltatune.train.config import AlignArgs
from deltatune.train.ppo import KLController, PPOLoop, gae, policy_loss, reward_function, value_loss
from deltatune.train.scorers import RewardScorer

ONES = torch.ones(1, 3)


def test_gae_by_hand():
    """rewards [0, 0, 1], values [0.5, 0.5, 0.5], gamma 1, lambda 0.5 (V after the last token is 0):

        t = 2: delta = 1 + 0 - 0.5 = 0.5;      A2 = 0.5
        t = 1: delta = 0 + 0.5 - 0.5 = 0;      A1 = 0 + 0.5 * 0.5 = 0.25
        t = 0: delta = 0 + 0.5 - 0.5 = 0;      A0 = 0 + 0.5 * 0.25 = 0.125
    returns = A + V = [0.625, 0.75, 1.0].

    With the last token masked (the response ended at t = 1; its reward and value must not leak in):
    rewards [0, 1, 7], values [0.5, 0.5, 9], mask [1, 1, 0]:
        t = 1: delta = 1 + 0 - 0.5 = 0.5;      A1 = 0.5
        t = 0: delta = 0 + 0.5 - 0.5 = 0;      A0 = 0.5 * 0.5 = 0.25
    returns = [0.75, 1.0, 0].
    """
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]), ONES, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.125, 0.25, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[0.625, 0.75, 1.0]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = gae(torch.tensor([[0.0, 1.0, 7.0]]), torch.tensor([[0.5, 0.5, 9.0]]), mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.25, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.75, 1.0, 0.0]]))


def test_clipped_policy_loss_by_hand():
    """ratios [0.5, 1.0, 1.5], advantages [1, -1, 1], eps 0.2; per token max(-A r, -A clip(r, 0.8, 1.2)):

        t0: -0.5 vs -0.8 -> -0.5  (unclipped is larger: a ratio below 1 - eps with A > 0 is not clipped)
        t1:  1.0 vs  1.0 ->  1.0
        t2: -1.5 vs -1.2 -> -1.2  (clipped)
    loss = (-0.5 + 1.0 - 1.2) / 3 = -0.233333; clip fraction 1/3.
    """
    logp = torch.log(torch.tensor([[0.5, 1.0, 1.5]]))
    loss, clipfrac = policy_loss(logp, torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 1.0]]), ONES, 0.2)
    torch.testing.assert_close(loss, torch.tensor(-0.7 / 3))
    torch.testing.assert_close(clipfrac, torch.tensor(1 / 3))


def test_clipped_value_loss_by_hand():
    """values [0.1, 0.5, -0.5], old values 0, returns [0, 1, 1], clip 0.2 (clipped values [0.1, 0.2, -0.2]):

        t0: (0.1 - 0)^2 = 0.01    vs (0.1 - 0)^2 = 0.01  -> 0.01
        t1: (0.5 - 1)^2 = 0.25    vs (0.2 - 1)^2 = 0.64  -> 0.64
        t2: (-0.5 - 1)^2 = 2.25   vs (-0.2 - 1)^2 = 1.44 -> 2.25
    loss = 0.5 * (0.01 + 0.64 + 2.25) / 3 = 0.5 * 0.966667 = 0.483333.
    """
    loss = value_loss(torch.tensor([[0.1, 0.5, -0.5]]), torch.zeros(1, 3), torch.tensor([[0.0, 1.0, 1.0]]), ONES, 0.2)
    torch.testing.assert_close(loss, torch.tensor(2.9 / 6))


def test_kl_controller_by_hand():
    """target 6, horizon 100, 10 rollouts: KL 9 -> error clip(9/6 - 1, +-0.2) = 0.2 -> coef 0.1 * (1 + 0.02) = 0.102;
    KL 5.4 -> error -0.1 -> 0.102 * (1 - 0.01) = 0.10098. A fixed controller never moves."""
    ctl = KLController(0.1, adaptive=True, target=6.0, horizon=100)
    ctl.update(9.0, 10)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(5.4, 10)
    assert ctl.value == pytest.approx(0.10098)
    fixed = KLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny llama over the word tokenizer, saved, so a fresh copy can be loaded for comparison."""
    tok = word_tokenizer()
    config = AutoConfig.for_model(
        "llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, vocab_size=len(tok), pad_token_id=0, bos_token_id=2, eos_token_id=3,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ppo") / "llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def policy(base_dir: str):
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    return get_delta_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))


def yes_fraction(prompts, responses):
    """The programmatic reward: the fraction of the response's words that are 'yes'."""
    return [sum(w == "yes" for w in r.split()) / max(len(r.split()), 1) for r in responses]


PROMPTS = [[4 + i, 4 + (i * 7) % 40, 4 + (i * 3) % 40] for i in range(40)]


@pytest.mark.slow
def test_reward_rises_with_bounded_kl(base_dir):
    """The untrained policy says 'yes' about once in 45 words; 40 PPO steps of 32 rollouts make it a habit."""
    align = AlignArgs(max_new_tokens=8, ppo_epochs=4, mini_batch_size=8, init_kl_coef=0.05)
    # (lr 2e-2 sat on an edge: advantages 0.2% larger, TRL's unbiased whitening, took the policy to one answer, KL 30)
    loop = PPOLoop(policy(base_dir), word_tokenizer(), yes_fraction, align, lr=1e-2, seed=0)
    g = torch.Generator().manual_seed(0)
    history = [loop.step([PROMPTS[i] for i in torch.randperm(40, generator=g)[:32].tolist()]) for _ in range(40)]
    first = history[0]["reward"]  # sampled before any update
    last = sum(h["reward"] for h in history[-10:]) / 10
    assert first < 0.1 and last > 0.3, (first, last, [round(h["reward"], 2) for h in history])
    # The KL estimate per rollout stays far below its bound for 8 tokens of a 45-word vocabulary (8 ln 45 = 30).
    assert max(abs(h["kl"]) for h in history) < 15, str([round(h["kl"], 1) for h in history])
    for key in ("policy_loss", "value_loss", "clipfrac", "entropy", "response_length", "kl_coef"):
        assert all(torch.isfinite(torch.tensor(h[key])) for h in history)


def _logprobs_of(model, r) -> torch.Tensor:
    """Response-token log-probs by a plain forward of ``model``, as in PPOLoop (temperature 1)."""
    P = r.prompt_length
    position_ids = (r.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=r.sequences, attention_mask=r.attention_mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits[:, P - 1 : -1].float(), -1)
    return logp.gather(-1, r.sequences[:, P:].unsqueeze(-1)).squeeze(-1) * r.response_mask


def test_reference_is_the_base_with_the_adapter_off(base_dir):
    loop = PPOLoop(policy(base_dir), word_tokenizer(), yes_fraction, AlignArgs(max_new_tokens=6), lr=3e-2, seed=0)
    for _ in range(2):  # move the adapter away from the identity
        loop.step(PROMPTS[:8])
    r = loop.rollout(PROMPTS[8:12])
    fresh = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    torch.testing.assert_close(r.ref_logprobs, _logprobs_of(fresh, r), atol=1e-5, rtol=0)
    # The guard: the policy itself (adapter on) gives other numbers, so the equality above can fail.
    assert (r.logprobs - r.ref_logprobs).abs().max() > 1e-3
    torch.testing.assert_close(r.logprobs, _logprobs_of(loop.model, r), atol=1e-5, rtol=0)


def test_one_copy_of_the_base_weights(base_dir):
    """Policy, reference and value head share one base: every tensor the loop holds, counted once by storage, adds up
    to the base plus the adapter plus the value head, not to two bases."""
    loop = PPOLoop(policy(base_dir), word_tokenizer(), yes_fraction, AlignArgs(), seed=0)
    base_numel = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base_dir).parameters())
    held: dict[int, int] = {}
    for module in [v for v in vars(loop).values() if isinstance(v, torch.nn.Module)]:
        for p in module.parameters():
            held[p.untyped_storage().data_ptr()] = p.numel()
    extra = sum(p.numel() for p in loop.model.parameters() if p.requires_grad) + 33  # adapter + Linear(32, 1)
    assert sum(held.values()) == base_numel + extra
    assert extra < 0.5 * base_numel


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    """A reward run on a tiny BERT with the MiniLM WordPiece tokenizer (not the policy's word tokenizer)."""
    tmp = tmp_path_factory.mktemp("rm")
    bert = save_tiny(tmp / "bert", "bert", "seq_cls")
    rows = [{"prompt": f"w{i} w{i + 1}", "chosen": "yes yes", "rejected": f"w{i} w3"} for i in range(8)]
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp / "rm")
    train(build({
        "stage": "rm", "model": {"name_or_path": bert},
        "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
        "data": {"train": str(data), "max_length": 32},
        "train": {"max_steps": 1, "batch_size": 4, "report_to": ["none"]}, "output": {"dir": out},
    }))  # fmt: skip
    return out


def test_reward_model_with_another_tokenizer_scores_retokenised_text(base_dir, rm_run):
    """The policy's ids are decoded to text and re-tokenised by the reward model's own tokenizer."""
    scorer = RewardScorer(rm_run)
    seen = []

    def recording(prompts, responses):
        seen.append((list(prompts), list(responses)))
        return scorer(prompts, responses)

    tok = word_tokenizer()
    loop = PPOLoop(policy(base_dir), tok, recording, AlignArgs(max_new_tokens=6), seed=0)
    r = loop.rollout(PROMPTS[:4])
    prompts, responses = seen[0]
    assert prompts == [tok.decode(p) for p in PROMPTS[:4]] and all(isinstance(x, str) for x in responses)
    # The same scores by hand: the reward model's tokenizer on the (prompt, response) text pair.
    rm_tok = scorer.tokenizer
    batch = Collator(rm_tok.pad_token_id)([{k: list(v) for k, v in rm_tok(p, s).items()} for p, s in zip(*seen[0])])
    with torch.no_grad():
        expected = scorer.model(**batch).logits.squeeze(-1)
    torch.testing.assert_close(r.scores, expected, atol=1e-5, rtol=0)
    assert rm_tok("w7 yes")["input_ids"] != tok("w7 yes")["input_ids"]  # the tokenizers really differ


def test_reward_model_setting_errors(tmp_path):
    with pytest.raises(ConfigError, match="align.reward_model is not set"):
        reward_function(None)
    with pytest.raises(ConfigError, match="neither a folder nor"):
        reward_function(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="could not be imported"):
        reward_function("no_such_module_xyz:score")
    (tmp_path / "run.yaml").write_text("stage: sft\n")
    with pytest.raises(ConfigError, match="not a reward model"):
        reward_function(str(tmp_path))


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppo_cli")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about the {w} cat"}) + "\n" for w in "abcdef"))
    return {
        "llama": save_tiny(tmp / "llama", "llama", "causal_lm", max_position_embeddings=48),
        "prompts": str(prompts),
    }


def test_recipe_two_steps_through_cli(cli_files, rm_run, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "recipes/ppo.yaml", f"model.name_or_path={cli_files['llama']}",
                 f"data.train={cli_files['prompts']}", f"data.eval={cli_files['prompts']}", "data.max_length=16",
                 f"align.reward_model={rm_run}", "align.max_new_tokens=4", "align.mini_batch_size=2",
                 "train.max_steps=2", "train.batch_size=2", f"output.dir={out}"])  # fmt: skip
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["train_steps"] == 2 and {"reward_first", "reward_last", "kl_last", "eval_reward"} <= metrics.keys()
    for name in ("adapter_model.safetensors", "value_head.safetensors", "report.md", "run.yaml", "metrics.json"):
        assert (out / name).is_file(), name


def test_generation_longer_than_the_context_is_refused(cli_files, rm_run, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "recipes/ppo.yaml", f"model.name_or_path={cli_files['llama']}",
                 f"data.train={cli_files['prompts']}", "data.max_length=16", f"align.reward_model={rm_run}",
                 "align.max_new_tokens=64", f"output.dir={out}"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "align.max_new_tokens=64" in err and "context of 48" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def same_base_rm(cli_files, tmp_path_factory):
    """A reward run on the policy's own base (the tiny causal llama, given a new scalar head)."""
    tmp = tmp_path_factory.mktemp("rm_llama")
    rows = [{"prompt": f"tell me {w}", "chosen": "a kind answer", "rejected": f"{w} no"} for w in "abcdefgh"]
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp / "rm")
    train(build({
        "stage": "rm", "model": {"name_or_path": cli_files["llama"]},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data), "max_length": 32},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 5e-2, "report_to": ["none"]}, "output": {"dir": out},
    }))  # fmt: skip
    return out


def test_reward_adapter_on_the_policy_base_scores_as_the_separate_model(cli_files, same_base_rm):
    from deltatune.train.models import load_tokenizer
    from deltatune.train.scorers import AdapterReward

    tok = load_tokenizer(cli_files["llama"])
    model = get_delta_model(
        AutoModelForCausalLM.from_pretrained(cli_files["llama"]),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    shared = AdapterReward(model, same_base_rm, tok)
    prompts, responses = ["tell me a", "tell me b", "what now"], ["a kind answer", "b no", "nothing at all here"]
    expected = RewardScorer(same_base_rm)(prompts, responses)
    torch.testing.assert_close(shared(prompts, responses), expected, atol=1e-5, rtol=0)
    assert expected.std() > 0  # the guard: different texts, different scores
    # Scoring switched adapters and switched back: the policy computes and trains as before.
    assert model.active_adapters == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".reward." in n)
    # One copy of the base: the policy's tensors are the base and two adapters, plus the head (1 x 32, no bias on
    # a llama classifier).
    base_numel = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(cli_files["llama"]).parameters())
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    storages = {p.untyped_storage().data_ptr(): p.numel() for p in [*model.parameters(), *shared.head.parameters()]}
    assert sum(storages.values()) == base_numel + adapters + 32


def test_recipe_with_the_reward_adapter_on_the_same_base(cli_files, same_base_rm, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "recipes/ppo.yaml", f"model.name_or_path={cli_files['llama']}",
                 f"data.train={cli_files['prompts']}", "data.max_length=16", f"align.reward_model={same_base_rm}",
                 "align.max_new_tokens=4", "align.mini_batch_size=2", "train.max_steps=2", "train.batch_size=2",
                 f"output.dir={out}"])  # fmt: skip
    assert code == 0
    assert "a second adapter on the policy's base" in (out / "report.md").read_text()
    assert not (out / "reward").exists()  # only the policy adapter is saved
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_the_recipes_weight_decay_and_schedule_are_used(cli_files, rm_run, tmp_path, monkeypatch):
    """PPO's AdamW took torch's default weight decay (0.01) and kept a constant rate whatever train.scheduler and
    the warmup said; now the recipe's, stepped once per PPO step as TRL steps it."""
    made = []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: made.append(k) or adamw(*a, **k))
    out = tmp_path / "run"
    assert main(["train", "recipes/ppo.yaml", f"model.name_or_path={cli_files['llama']}",
                 f"data.train={cli_files['prompts']}", "data.eval=null", "data.max_length=16",
                 f"align.reward_model={rm_run}", "align.max_new_tokens=4", "align.mini_batch_size=2",
                 "train.max_steps=3", "train.batch_size=2", "train.lr=0.01", "train.scheduler=linear",
                 "train.warmup_steps=2", "train.weight_decay=0.0", "train.eval_on_start=false",
                 f"output.dir={out}"]) == 0  # fmt: skip
    assert made and made[0]["weight_decay"] == 0.0
    logged = [
        json.loads(line)["lr"] for line in (out / "log_history.jsonl").read_text().splitlines() if '"lr"' in line
    ]
    assert logged == pytest.approx([0.0, 0.005, 0.01])


def test_whiten_uses_the_unbiased_variance_as_trl_s_masked_whiten():
    """TRL's PPO (``masked_whiten``, ``masked_var(unbiased=True)``) scales advantages by the Bessel-corrected std:
    with 8 response tokens the biased one made them sqrt(8/7), 7%, larger."""
    from deltatune.train.ppo import whiten

    x = torch.tensor([[0.5, -1.0, 2.0, 3.0], [1.5, 0.0, 9.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    kept = x[mask.bool()]
    want = (kept - kept.mean()) / kept.std(unbiased=True)
    got = whiten(x, mask)
    torch.testing.assert_close(got[mask.bool()], want, rtol=1e-6, atol=1e-6)
    assert (got[~mask.bool()] == 0).all()
