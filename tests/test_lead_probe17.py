"""The lead's part of session 52's probes (probe 17): the edits the agents reported for files outside their own,
each with a test shown failing on the file before it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_trainer_probe11 import files, recipe  # noqa: F401
from tiny import tiny_inputs, tiny_model

import deltatune as dt


def test_lora_trainable_token_indices_take_numpy_ids_as_peft(tmp_path):
    """peft's LoraConfig takes numpy integer token ids (np.where over a vocabulary); deltatune refused them. They are
    stored as ints, so the saved config is peft's JSON and peft loads the file to the same logits."""
    peft = pytest.importorskip("peft")
    ids = {"embed_tokens": [np.int64(1), np.int32(4)]}
    config = dt.LoraConfig(target_modules=["q_proj"], trainable_token_indices=ids)
    assert config.trainable_token_indices == {"embed_tokens": [1, 4]}
    assert all(type(i) is int for i in config.trainable_token_indices["embed_tokens"])
    ours = dt.get_delta_model(tiny_model("llama"), config)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "trainable_tokens_delta" in name or "lora_B" in name:
                p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape))
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"] == {
        "embed_tokens": [1, 4]
    }
    inputs = tiny_inputs("llama")
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(**inputs).logits, theirs(**inputs).logits, atol=1e-6, rtol=0)
    with pytest.raises(dt.ConfigError):
        dt.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[True])  # a bool is no id


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ({"scheduler": "cosine_with_min_lr", "lr": 2e-4, "lr_scheduler_kwargs": {"min_lr": 1e-3}}, "climb above"),
        ({"optim": "schedule_free_adamw"}, "train.optim"),
    ],
)
def test_a_floor_above_the_peak_or_a_missing_optimizer_package_is_refused_where_a_run_starts(
    files,  # noqa: F811
    tmp_path,
    monkeypatch,
    keys,
    says,
):
    """check_schedule_floor and check_optim_package run in checks.check_run: one line before the model loads and
    before any folder is made (they were defined, not called: the Trainer's schedule climbed to 5x the peak, the
    optimizer's ImportError came after the model loaded); build() still reads such a recipe (a finished run's)."""
    import importlib.util

    import deltatune.train.run as run
    from deltatune.config import ConfigError
    from deltatune.train import build, train

    if "optim" in keys and importlib.util.find_spec("schedulefree") is not None:
        pytest.skip("schedulefree is installed here")

    def loaded(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(run, "start_model", loaded)
    cfg = build(recipe(files, tmp_path / "out", **keys))
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert says in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_board_port_0_is_refused_in_one_line_not_served_at_a_port_the_board_does_not_name(
    tmp_path, capsys, monkeypatch
):
    """uvicorn took a free port for --port 0 and never named it; the board said it was on http://127.0.0.1:0/."""
    import deltatune.board
    from deltatune.cli import main

    monkeypatch.setattr(deltatune.board, "board", lambda *a, **k: None)  # (not served, whatever the check says)
    assert main(["board", "--runs", str(tmp_path), "--port", "0"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0 and "--port 0" in err and "--port 7860" in err and "127.0.0.1:0" not in captured.out


def test_a_grpo_resume_after_the_data_changed_is_refused_and_resume_changed_takes_fewer_prompts(tmp_path):
    """GRPO checkpoints recorded nothing of the data, so a resume after the prompts file changed went on silently
    with other prompts, or stopped with an IndexError on a data order pointing past a shorter file. They record the
    run's facts now (as the Trainer's and PPO's): the Trainer stages' one-line refusal, and --resume-changed onto
    fewer prompts finishes (the pass's order keeps only the prompts there are)."""
    from tiny import save_tiny

    from deltatune.config import ConfigError
    from deltatune.train import build, train
    from deltatune.train.runfolder import FINISHED_FILE

    (tmp_path / "rewards.py").write_text(
        "def length(completions, **kw):\n    return [float(len(c)) for c in completions]\n"
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1}"}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    raw = {
        "stage": "grpo", "model": {"name_or_path": save_tiny(tmp_path / "llama", "llama", "causal_lm")},
        "data": {"train": str(prompts), "max_length": 16}, "method": {"name": "lora", "r": 4},
        "align": {"reward_funcs": [f"{tmp_path / 'rewards.py'}:length"], "num_generations": 2, "max_new_tokens": 3},
        "train": {"max_steps": 1, "batch_size": 2, "save_steps": 1, "report_to": ["none"]},
        "output": {"dir": str(out)},
    }  # fmt: skip
    train(build(raw))
    assert json.loads((out / "checkpoint-1" / "deltatune_sums.json").read_text())["facts"]
    (out / FINISHED_FILE).unlink()  # as if the run had stopped after checkpoint-1
    prompts.write_text("".join(json.dumps({"prompt": f"v{i}"}) + "\n" for i in range(2)))
    raw["train"]["max_steps"] = 2
    with pytest.raises(
        ConfigError, match=r"^--resume: since checkpoint-1 was written, the file of data.train changed"
    ):
        train(build(raw), resume=True)
    assert not (out / FINISHED_FILE).exists()
    assert train(build(raw), resume=True, resume_changed=True)["train_steps"] == 2


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("bitfit", "lora_all"),
        ("lora_all", "bitfit"),
        ("bitfit", "bitfit"),
    ],
)
def test_an_adapter_training_base_parameters_another_trains_is_refused_and_changes_nothing(first, second):
    """BitFit trains the base biases in place, as LoRA's bias='all' does: one set, so a second adapter training them
    overwrote the first's (its logits 0.5 off what it computed alone). peft's rule counts LoRA's bias only; the
    overlap of trained base parameters is refused, the model left as it was; LoRA bias='all' beside bias='none' and
    beside another method's adapter is taken, as peft takes it."""
    configs = {
        "bitfit": lambda: dt.BitFitConfig(),
        "lora_all": lambda: dt.LoraConfig(target_modules=["q_proj"], bias="all"),
    }
    model = dt.get_delta_model(tiny_model("opt"), configs[first](), adapter_name="x")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.linspace(-0.5, 0.5, p.numel()).reshape(p.shape))
    inputs = tiny_inputs("opt")
    with torch.no_grad():
        want = model(**inputs).logits
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = [n for n, _ in model.named_modules()]
    with pytest.raises(
        ValueError, match=r"^adapter 'y' \(.*\) trains base parameters that adapter 'x'|only 1 adapter"
    ):
        model.add_adapter("y", configs[second]())
    assert list(model.peft_config) == ["x"] and model.active_adapters == ["x"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert [n for n, _ in model.named_modules()] == modules
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, want)
    model.add_adapter("z", dt.LoraConfig(target_modules=["v_proj"]))  # no base parameter trained: taken


def test_a_warmup_stable_decay_floor_above_the_peak_is_refused_without_warm_up():
    """warmup_stable_decay's min_lr_ratio 2 with 50 stable steps: the throwaway 10-step schedule never reached the
    decay, so a run without warm-up passed and ended at 2x train.lr (the Trainer's rate after 100 steps: 4e-4)."""
    from transformers import get_scheduler

    from deltatune.config import ConfigError
    from deltatune.train import build
    from deltatune.train.config_train import check_schedule_floor

    kwargs = {"num_stable_steps": 50, "num_decay_steps": 50, "min_lr_ratio": 2.0}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    schedule = get_scheduler("warmup_stable_decay", optimizer, 0, 100, scheduler_specific_kwargs=kwargs)
    for _ in range(100):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-4)  # the Trainer's schedule ends at 2x the peak
    cfg = build({"train": {"scheduler": "warmup_stable_decay", "lr": 2e-4, "lr_scheduler_kwargs": kwargs}})
    with pytest.raises(ConfigError, match=r"climb above train.lr \(0.0002\) to 0.0004"):
        check_schedule_floor(cfg)
    check_schedule_floor(build({"train": {"scheduler": "warmup_stable_decay", "lr": 2e-4,
                                          "lr_scheduler_kwargs": {**kwargs, "min_lr_ratio": 0.1}}}))  # fmt: skip
    for name, kw in [("cosine", {"num_cycles": 0.5}), ("cosine_with_restarts", {"num_cycles": 2}),
                     ("polynomial", {"lr_end": 1e-7, "power": 2.0}), ("inverse_sqrt", {"timescale": 5}),
                     ("cosine_with_min_lr", {"min_lr": 1e-5})]:  # fmt: skip
        check_schedule_floor(build({"train": {"scheduler": name, "lr": 2e-4, "lr_scheduler_kwargs": kw}}))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_residual_init_refused_beside_an_adapter_training_the_base_leaves_the_base_as_it_was(init):
    """A LoRA with bias='all' and a PiSSA / OLoRA init beside a BitFit adapter: the overlap is found after the init
    wrote its residuals into the base, so the refusal left q_proj's weights changed (logits 0.0015 off); the base
    tensors are put back."""
    model = dt.get_delta_model(tiny_model("opt"), dt.BitFitConfig(), adapter_name="x")
    inputs = tiny_inputs("opt")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        want = model(**inputs).logits
    with pytest.raises(ValueError, match=r"^adapter 'y' \(lora\) trains base parameters that adapter 'x'"):
        model.add_adapter("y", dt.LoraConfig(target_modules=["q_proj"], bias="all", init_lora_weights=init, r=2))
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, want)


def test_a_same_base_reward_run_training_the_base_in_place_gets_a_model_of_its_own(tmp_path):
    """A reward run on the policy's base was loaded into the policy as a second adapter (one copy of the base); one
    whose adapter trains base parameters in place (BitFit's biases) overwrote the policy's own base and the KL
    reference's, silently (or, beside a BitFit policy, a bare ValueError mid-setup): it is a RewardScorer now, while
    a plain LoRA reward run still shares the base."""
    from tiny import save_tiny
    from transformers import AutoModelForCausalLM

    from deltatune.train import build, train
    from deltatune.train.ppo import reward_function
    from deltatune.train.scorers import AdapterReward, RewardScorer

    base = save_tiny(tmp_path / "opt", "opt", "causal_lm")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"w{i}", "chosen": "yes", "rejected": f"w{i} no"}) + "\n"
                             for i in range(4)))  # fmt: skip
    methods = {"bitfit": {"name": "bitfit"}, "lora": {"name": "lora", "r": 2, "target_modules": ["q_proj"]}}
    for name, method in methods.items():
        train(build({"stage": "rm", "model": {"name_or_path": base}, "method": method,
                     "data": {"train": str(pairs), "max_length": 16}, "output": {"dir": str(tmp_path / name)},
                     "train": {"max_steps": 1, "batch_size": 4, "report_to": ["none"]}}))  # fmt: skip
    policy = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), dt.LoraConfig(target_modules=["v_proj"]))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = policy(input_ids=ids).logits
        with policy.disable_adapter():
            reference = policy(input_ids=ids).logits
    from deltatune.train.models import load_tokenizer

    tok = load_tokenizer(base)
    scorer = reward_function(str(tmp_path / "bitfit"), "cpu", policy, base, tok)
    assert isinstance(scorer, RewardScorer) and list(policy.peft_config) == ["default"]
    with torch.no_grad():
        assert torch.equal(policy(input_ids=ids).logits, before)
        with policy.disable_adapter():
            assert torch.equal(policy(input_ids=ids).logits, reference)
    assert isinstance(reward_function(str(tmp_path / "lora"), "cpu", policy, base, tok), AdapterReward)


def test_metrics_json_takes_numpy_and_tensor_values_as_the_log_does(tmp_path):
    """A metric that is a numpy float32 or a 0-d tensor (a user's compute_metrics, a reward function's mean) made
    json.dumps raise at the very end, after report.md: no metrics.json, so a trained run read as unfinished. The log
    history already wrote such values as floats; metrics.json does too."""
    from deltatune.train import report

    metrics = {"eval_f1": np.float32(0.5), "eval_loss": torch.tensor(0.25), "train_steps": np.int64(3)}
    recipe = {"stage": "sft", "method": {"name": "lora"}, "model": {"name_or_path": "m"}}
    report.write(str(tmp_path), recipe, metrics, [{"step": 1, "loss": np.float32(1.5)}], [], None)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"eval_f1": 0.5, "eval_loss": 0.25, "train_steps": 3}


@pytest.mark.parametrize("pid", [0, -1, True])
def test_the_board_reads_a_lock_naming_no_process_as_no_lock(tmp_path, pid):
    """os.kill(0, 0) signals the process group and os.kill(True, 0) init: a lock naming pid 0, -1 or true read as a
    live run, so the board showed a dead run as running for ever."""
    import socket

    from deltatune.board import runs

    (tmp_path / "run").mkdir()
    (tmp_path / ".run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    assert runs._lock_alive(str(tmp_path / "run")) is None
