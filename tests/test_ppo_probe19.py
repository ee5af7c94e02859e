"""PPO against TRL's PPOTrainer (probe 19): the log rows' episode and epoch, a resumed run's log rows, a refused
checkpoint load that changes nothing, and a prompt over the model's positions given to the loop itself.

The TRL reference is ``trl/experimental/ppo/ppo_trainer.py`` (huggingface/trl, commit 0062ee10a9bc; TRL 1.16 in the
.venv no longer ships it): each update it does ``self.state.episode += 1 * args.batch_size`` and logs
``metrics["episode"] = self.state.episode`` with ``self.state.epoch = self.state.episode / self.train_dataset_len``
(the Trainer's ``log`` adds ``epoch``). Its helpers are the copies in tests/test_ppo_probe11.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_ppo_probe11 import _fixed_rollout, _policy, _Tok
from tiny import save_tiny

from deltatune.config import ConfigError
from deltatune.train import build, train
from deltatune.train.config import AlignArgs
from deltatune.train.ppo import PPOLoop


def _zero(prompts, responses):
    return [0.0] * len(prompts)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("ppo19") / "base", max_position_embeddings=128)


def _rows(out) -> list[dict]:
    with open(os.path.join(out, "log_history.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _trl_episode_epoch(steps: int, batch_size: int, dataset_len: int) -> list[tuple[int, float]]:
    """TRL's state.episode and state.epoch as logged after each update (the lines of its train loop)."""
    episode, logged = 0, []
    for _update in range(1, steps + 1):
        episode += 1 * batch_size
        logged.append((episode, episode / dataset_len))
    return logged


def test_log_rows_carry_trls_episode_and_epoch_and_a_resume_continues_them(base, tmp_path):
    """Each step's log row holds TRL's ``episode`` (rollouts so far), ``epoch`` (episode / prompts) and ``eps``
    (rollouts a second): HEAD logged none. A run resumed from its last checkpoint writes the unbroken run's rows
    (every value but the times, wall_time and eps, to 1e-6): the resumed run's own log, the unbroken run's deleted
    first (a stopped run has none; kept, report.write would have left it for the test to read back)."""
    from deltatune.train.runfolder import FINISHED_FILE

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about the {w} cat"}) + "\n" for w in "abc"))
    (tmp_path / "rewards19.py").write_text(
        "def length(prompts, responses):\n    return [len(r) / 10 for r in responses]\n"
    )
    out = tmp_path / "run"
    raw = {
        "stage": "ppo", "model": {"name_or_path": base}, "data": {"train": str(prompts), "max_length": 16},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "align": {"reward_model": "rewards19:length", "max_new_tokens": 3, "ppo_epochs": 1},
        "output": {"dir": str(out)},
        "train": {"max_steps": 3, "batch_size": 2, "save_steps": 1, "report_to": ["none"], "lr": 1e-2},
    }  # fmt: skip
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        train(build(raw))
        unbroken = _rows(out)
        assert [(r["episode"], r["epoch"]) for r in unbroken] == _trl_episode_epoch(3, 2, 3)
        assert all(type(r["eps"]) is int and r["eps"] >= 0 for r in unbroken)  # (TRL's int(episode / seconds))
        (out / FINISHED_FILE).unlink()  # as if the run had stopped after checkpoint-2: a stopped PPO run has no
        (out / "log_history.jsonl").unlink()  # log_history.jsonl (report.write keeps one that exists)
        __import__("shutil").rmtree(out / "checkpoint-3")  # (the last step's)
        train(build(raw), resume=True)
    finally:
        sys.path.remove(str(tmp_path))
    resumed = _rows(out)
    assert len(resumed) == len(unbroken) == 3
    for a, b in zip(unbroken, resumed):
        assert a.keys() == b.keys()
        for key in a.keys() - {"wall_time", "eps"}:
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)


def test_a_refused_checkpoint_load_changes_nothing(tmp_path):
    """ppo_checkpoint.load refuses an optimizer.pt of another parameter grouping in one line; HEAD had already
    loaded the checkpoint's adapter and value head into the loop by then (the loop's weights changed by a refused
    call). Now the loop's adapter, value head, KL coefficient and random state are as before the call."""
    from deltatune.train import ppo_checkpoint

    align = AlignArgs(ppo_epochs=1, adaptive_kl=True, init_kl_coef=0.1)
    first = PPOLoop(_policy(), _Tok(), _zero, align, lr=1e-2, max_grad_norm=0.0)
    first.update(_fixed_rollout(first, eos_rows=True))
    ppo_checkpoint.save(str(tmp_path), 1, first, torch.Generator().manual_seed(3), [2, 0], [{"step": 1}], None)
    ckpt = tmp_path / "checkpoint-1"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    state["param_groups"] = state["param_groups"][:1]  # (one group: a deltatune that decayed every parameter)
    torch.save(state, ckpt / "optimizer.pt")

    second = PPOLoop(_policy(), _Tok(), _zero, AlignArgs(ppo_epochs=1, init_kl_coef=0.1), lr=1e-2)
    before = {k: v.clone() for k, v in second.model.state_dict().items()}
    head = {k: v.clone() for k, v in second.value_head.state_dict().items()}
    rng, g = torch.get_rng_state(), torch.Generator().manual_seed(5)
    with pytest.raises(ConfigError, match=r"optimizer.pt holds 1 parameter group\(s\), this run's AdamW 2") as info:
        ppo_checkpoint.load(str(ckpt), second, g)
    assert "\n" not in str(info.value)
    for k, v in second.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in second.value_head.state_dict().items():
        assert torch.equal(v, head[k]), k
    assert second.kl_ctl.value == 0.1 and second.steps_done == 0
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(
        g.get_state(), torch.Generator().manual_seed(5).get_state()
    )


def test_a_checkpoint_of_another_models_value_head_is_one_line_and_changes_nothing(tmp_path):
    """A value_head.safetensors of another hidden size (a checkpoint of another model): HEAD loaded the adapter, then
    raised torch's multi-line 'Error(s) in loading state_dict' from load_state_dict; now one line naming the file,
    with the loop as it was."""
    from safetensors.torch import save_file

    from deltatune.train import ppo_checkpoint

    first = PPOLoop(_policy(), _Tok(), _zero, AlignArgs(ppo_epochs=1), lr=1e-2, max_grad_norm=0.0)
    first.update(_fixed_rollout(first, eos_rows=True))
    ppo_checkpoint.save(str(tmp_path), 1, first, torch.Generator(), [], [], None)
    ckpt = tmp_path / "checkpoint-1"
    save_file({"weight": torch.ones(1, 16), "bias": torch.zeros(1)}, str(ckpt / "value_head.safetensors"))
    second = PPOLoop(_policy(), _Tok(), _zero, AlignArgs(ppo_epochs=1), lr=1e-2)
    before = {k: v.clone() for k, v in second.model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"value_head.safetensors holds .*16.*, this run's value head .*32") as info:
        ppo_checkpoint.load(str(ckpt), second, torch.Generator())
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in second.model.state_dict().items())


def _random_head(loop) -> dict[str, torch.Tensor]:
    """The same random value head for every loop (the value head starts at zero: all values 0); values about 1."""
    g = torch.Generator().manual_seed(19)
    return {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in loop.value_head.state_dict().items()}


@pytest.mark.parametrize("mini, grad_accum, rows", [(2, 2, 1), (2, 1, 2), (4, 1, 4)])
def test_the_rollouts_no_grad_forwards_run_in_the_updates_micro_batches(mini, grad_accum, rows):
    """TRL's rollout runs its no-grad forwards (policy, reference, value) over local_rollout_forward_batch_size rows
    at a time; HEAD ran them over the whole batch at once (the (B, L, vocab) float logits twice: the memory a
    batch's update splits into micro-batches). Each now runs over the update's micro-batch (align.mini_batch_size /
    train.grad_accum rows), with the log-probs, reference log-probs and values of the whole-batch forward (1e-6)."""
    from test_ppo_probe12 import _DecodingTok, _Fixed

    generated = torch.tensor([[5, 7, 9, 3, 0], [5, 6, 8, 8, 9], [7, 4, 3, 0, 0], [9, 4, 6, 4, 7]])
    prompts = [[5, 6], [8, 9, 10], [11], [12, 13]]
    got = {}
    for key, (m, ga) in (("whole", (4, 1)), ("parts", (mini, grad_accum))):
        align = AlignArgs(mini_batch_size=m, max_new_tokens=5, ppo_epochs=1)
        loop = PPOLoop(_policy(), _DecodingTok(), _zero, align, grad_accum=ga)
        loop.value_head.load_state_dict(_random_head(loop))  # (zero-initialised, every value would be 0 == 0)
        loop.model.generate = _Fixed(generated).generate
        sizes = []
        hook = loop.model.get_base_model().register_forward_pre_hook(
            lambda mod, args, kwargs, sizes=sizes: sizes.append(len(kwargs["input_ids"])), with_kwargs=True
        )
        r = loop.rollout(prompts)
        hook.remove()
        got[key] = (r, sizes)
    (whole, whole_sizes), (parts, sizes) = got["whole"], got["parts"]
    assert whole_sizes == [4, 4] and sizes == [rows] * (2 * 4 // rows)
    for name in ("logprobs", "ref_logprobs", "values", "response_mask", "sequences", "scores"):
        assert torch.allclose(getattr(parts, name), getattr(whole, name), atol=1e-6, rtol=0), name
    assert whole.values.abs().sum() > 0.1  # (values that say something)


def _stub_steps(monkeypatch) -> list[int]:
    """PPOLoop.step replaced by one that records its batch size and returns the keys train_ppo reads."""
    calls = []

    def step(self, batch):
        calls.append(len(batch))
        self.steps_done += 1
        return {"loss": 0.0, "reward": 0.0, "kl": 0.0}

    monkeypatch.setattr(PPOLoop, "step", step)
    return calls


def _epochs_cfg(tmp_path, epochs: float, batch_size: int):
    return build({
        "stage": "ppo", "model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"}, "output": {"dir": str(tmp_path)},
        "train": {"epochs": epochs, "batch_size": batch_size, "report_to": ["none"], "save_steps": 1,
                  "save_total_limit": None},
    })  # fmt: skip


def _trl_num_total_batches(epochs: float, dataset_len: int, batch_size: int) -> int:
    """TRL's PPOTrainer.__init__: total_episodes = num_train_epochs * train_dataset_len, num_total_batches =
    ceil(total_episodes / batch_size)."""
    import math

    total_episodes = int(epochs * dataset_len)
    return math.ceil(total_episodes / batch_size)


@pytest.mark.parametrize(
    "epochs, n, batch_size", [(3, 3, 2), (2, 10, 4), (1, 3, 2), (0.5, 10, 4), (4, 8, 4), (1.5, 3, 1), (0.7, 5, 2)]
)
def test_train_epochs_count_steps_as_trls_num_total_batches(monkeypatch, tmp_path, epochs, n, batch_size):
    """train.epochs E over N prompts in batches of B is TRL's ceil(int(E * N) / B) steps (the count only: TRL's
    repeat_generator drops a pass's last partial batch, deltatune's data order carries on into the next pass): HEAD
    took E * ceil(N / B), a pass per ceil(N / B) steps, so 3 epochs of 3 prompts in twos ran 6 steps (12 rollouts,
    4 passes) for TRL's 5 (10); then ceil(E * N / B), 5 steps for TRL's 4 at E=1.5, N=3, B=1 (int(4.5) = 4)."""
    from deltatune.train.ppo import train_ppo

    calls = _stub_steps(monkeypatch)
    cfg = _epochs_cfg(tmp_path, epochs, batch_size)
    prompts = [[5 + i, 6] for i in range(n)]
    metrics, history = train_ppo(_policy(), _Tok(), cfg, prompts, None, _zero, facts={})
    want = _trl_num_total_batches(epochs, n, batch_size)
    assert metrics["train_steps"] == len(calls) == len(history) == want
    assert calls == [batch_size] * want


def test_a_checkpoint_of_a_run_that_counted_epochs_per_pass_resumes_with_its_count(monkeypatch, tmp_path):
    """A checkpoint written before the count changed (no max_steps in its trainer_state.json) resumes with the
    count its run began with (E * ceil(N / B): 6 here), so it ends where it would have, and so does every later
    resume of that run (its later checkpoints record counted_per_pass); a new one records max_steps (5, TRL's) and
    resumes to it."""
    from deltatune.train import ppo_checkpoint
    from deltatune.train.ppo import train_ppo

    calls = _stub_steps(monkeypatch)
    cfg = _epochs_cfg(tmp_path, 3, 2)
    prompts = [[5 + i, 6] for i in range(3)]
    train_ppo(_policy(), _Tok(), cfg, prompts, None, _zero, facts={})
    ckpt = tmp_path / "checkpoint-2"
    state = json.loads((ckpt / ppo_checkpoint.STATE).read_text())
    assert state["max_steps"] == 5
    calls.clear()
    metrics, _ = train_ppo(_policy(), _Tok(), cfg, prompts, None, _zero, str(ckpt), facts={})
    assert (metrics["train_steps"], len(calls)) == (5, 3)
    del state["max_steps"]
    (ckpt / ppo_checkpoint.STATE).write_text(json.dumps(state))
    calls.clear()
    metrics, _ = train_ppo(_policy(), _Tok(), cfg, prompts, None, _zero, str(ckpt), facts={})
    assert (metrics["train_steps"], len(calls)) == (6, 4)
    # resumed once, the run wrote checkpoint-3..5 with max_steps: a second resume keeps the count (HEAD: TRL's 5,
    # one step, and a learning-rate schedule rebuilt for 5 steps)
    calls.clear()
    later = str(tmp_path / "checkpoint-4")
    metrics, history = train_ppo(_policy(), _Tok(), cfg, prompts, None, _zero, later, facts={})
    assert (metrics["train_steps"], len(calls), history[-1]["step"]) == (6, 2, 6)


def test_local_rollout_forward_batch_size_sets_the_rollouts_forward_rows():
    """TRL's local_rollout_forward_batch_size, where the align section has it (the key is proposed in config_align),
    sets the rows per no-grad forward of the rollout: 3 rows of 4 in mini-batches of 4 -> forwards of 3 and 1
    (policy, then reference, each), with the whole-batch log-probs and values (1e-6)."""
    from test_ppo_probe12 import _DecodingTok, _Fixed

    generated = torch.tensor([[5, 7, 9, 3, 0], [5, 6, 8, 8, 9], [7, 4, 3, 0, 0], [9, 4, 6, 4, 7]])
    got = {}
    for rows in (None, 3):
        align = AlignArgs(mini_batch_size=4, max_new_tokens=5, ppo_epochs=1)
        align.local_rollout_forward_batch_size = rows
        loop = PPOLoop(_policy(), _DecodingTok(), _zero, align)
        loop.value_head.load_state_dict(_random_head(loop))
        loop.model.generate = _Fixed(generated).generate
        sizes: list[int] = []
        hook = loop.model.get_base_model().register_forward_pre_hook(
            lambda mod, args, kwargs, sizes=sizes: sizes.append(len(kwargs["input_ids"])), with_kwargs=True
        )
        got[rows] = (loop.rollout([[5, 6], [8, 9, 10], [11], [12, 13]]), sizes)
        hook.remove()
    assert got[None][1] == [4, 4] and got[3][1] == [3, 3, 1, 1]
    for name in ("logprobs", "ref_logprobs", "values"):
        assert torch.allclose(getattr(got[3][0], name), getattr(got[None][0], name), atol=1e-6, rtol=0), name
    assert got[None][0].values.abs().sum() > 0.1


def test_a_prompt_over_the_models_positions_given_to_the_loop_is_one_line():
    """PPOLoop.rollout given a prompt that, with align.max_new_tokens, is over the model's positions (GPT-2's 64
    here): HEAD sampled into torch's 'IndexError: index out of range in self' from the position embedding (the
    stage's prepare_ppo refuses it before the model loads; the loop itself did not). Now one line naming the key,
    before any sampling."""
    from test_ppo_probe12 import _DecodingTok
    from tiny import tiny_model

    from deltatune import LoraConfig, get_delta_model

    base = tiny_model("gpt2", vocab_size=48, pad_token_id=0, eos_token_id=3)
    model = get_delta_model(base, LoraConfig(r=2, target_modules=["c_attn"]))
    loop = PPOLoop(model, _DecodingTok(), _zero, AlignArgs(max_new_tokens=4, mini_batch_size=2))
    context = base.config.n_positions
    rng = torch.get_rng_state()
    with pytest.raises(ConfigError, match=rf"^align.max_new_tokens=4 plus the longest prompt \({context - 3} tokens\) "
                       rf"is more than the model's context of {context}") as info:  # fmt: skip
        loop.rollout([[5] * (context - 3), [6] * 3])
    assert "\n" not in str(info.value) and torch.equal(torch.get_rng_state(), rng)
    assert loop.rollout([[5] * (context - 4), [6] * 3]).sequences.shape[1] <= context


def test_an_optimizer_of_other_group_sizes_is_refused_before_anything_is_loaded(tmp_path):
    """An optimizer.pt whose parameter groups hold other numbers of tensors (a checkpoint of another adapter):
    HEAD loaded the checkpoint's adapter and value head, then raised torch's ValueError ('loaded state dict
    contains a parameter group that doesn't match the size of optimizer's group'). Now one line, the loop as it
    was."""
    from deltatune.train import ppo_checkpoint

    first = PPOLoop(_policy(), _Tok(), _zero, AlignArgs(ppo_epochs=1), lr=1e-2, max_grad_norm=0.0)
    first.update(_fixed_rollout(first, eos_rows=True))
    ppo_checkpoint.save(str(tmp_path), 1, first, torch.Generator(), [], [], None)
    ckpt = tmp_path / "checkpoint-1"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    want = [len(group["params"]) for group in state["param_groups"]]
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]
    torch.save(state, ckpt / "optimizer.pt")
    second = PPOLoop(_policy(), _Tok(), _zero, AlignArgs(ppo_epochs=1), lr=1e-2)
    before = {k: v.clone() for k, v in second.model.state_dict().items()}
    head = {k: v.clone() for k, v in second.value_head.state_dict().items()}
    got = [want[0] - 1, *want[1:]]
    with pytest.raises(ConfigError, match=rf"optimizer.pt holds parameter groups of \[{', '.join(map(str, got))}\] "
                       rf"tensors, this run's AdamW \[{', '.join(map(str, want))}\]") as info:  # fmt: skip
        ppo_checkpoint.load(str(ckpt), second, torch.Generator())
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in second.model.state_dict().items())
    assert all(torch.equal(v, head[k]) for k, v in second.value_head.state_dict().items())


def test_the_loops_context_check_counts_a_token_adapters_virtual_tokens():
    """A prompt-tuning adapter's 8 virtual tokens take positions too (the stage's checks.check_rollout_context
    counts them): HEAD's loop check left them out, and a prompt plus new tokens equal to GPT-2's 64 positions sampled
    into torch's IndexError. Now one line naming them; 8 fewer prompt tokens sample."""
    from test_ppo_probe12 import _DecodingTok
    from tiny import tiny_model

    from deltatune import PromptTuningConfig, get_delta_model

    base = tiny_model("gpt2", vocab_size=48, pad_token_id=0, eos_token_id=3)
    model = get_delta_model(base, PromptTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM"))
    loop = PPOLoop(model, _DecodingTok(), _zero, AlignArgs(max_new_tokens=4, mini_batch_size=2))
    context = base.config.n_positions
    with pytest.raises(ConfigError, match=rf"^align.max_new_tokens=4 plus the longest prompt \({context - 4} tokens\) "
                       rf"and the adapter's 8 virtual tokens is more than the model's context") as info:  # fmt: skip
        loop.rollout([[5] * (context - 4), [6] * 3])
    assert "\n" not in str(info.value)
    loop.rollout([[5] * (context - 12), [6] * 3])


def test_episode_is_a_running_total_after_a_resume_with_another_batch_size(monkeypatch, tmp_path):
    """--resume-changed with another train.batch_size: TRL's episode adds each update's batch to the last
    (state.episode += batch_size); HEAD logged step * batch_size, as if the whole run had used the new size. Hand-
    worked: 2 steps of 2, then steps 3 and 4 of 3 rollouts: episodes 2, 4, 7, 10 (HEAD: 9, 12), epoch episode / 5."""
    from deltatune.train.ppo import train_ppo

    _stub_steps(monkeypatch)
    prompts = [[5 + i, 6] for i in range(5)]

    def cfg(batch_size):
        return build({
            "stage": "ppo", "model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"},
            "output": {"dir": str(tmp_path)},
            "train": {"max_steps": 4, "batch_size": batch_size, "report_to": ["none"], "save_steps": 1,
                      "save_total_limit": None},
        })  # fmt: skip

    train_ppo(_policy(), _Tok(), cfg(2), prompts, None, _zero, facts={})
    _, history = train_ppo(_policy(), _Tok(), cfg(3), prompts, None, _zero, str(tmp_path / "checkpoint-2"), facts={})
    assert [(r["step"], r["episode"], r["epoch"]) for r in history] == [
        (1, 2, 0.4), (2, 4, 0.8), (3, 7, 1.4), (4, 10, 2.0)
    ]  # fmt: skip


@pytest.mark.skipif(__import__("shutil").which("node") is None, reason="needs node")
def test_the_board_charts_none_of_ppos_counters():
    """episode and eps (TRL's rollouts so far and rollouts a second) are counters, as step, epoch and the runtimes
    the board's metricKeys leaves out: HEAD charted both beside the reward."""
    from test_board_probe11 import run_js

    rows = [{"step": 1, "loss": 0.5, "reward": 0.1, "kl": 0.0, "episode": 2, "epoch": 0.4, "eps": 7, "wall_time": 1.0}]
    assert run_js(f"metricKeys({json.dumps(rows)})") == ["kl", "loss", "reward"]
