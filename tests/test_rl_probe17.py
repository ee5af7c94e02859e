"""PPO against TRL (probe 17): align.reward_model naming a transformers sequence-classification folder, as TRL's
PPOTrainer takes its reward_model (an AutoModelForSequenceClassification scoring the policy's token ids).

The reference is the .venv's TRL 1.16 ``trl.experimental.utils.get_reward``, which TRL's PPOTrainer scores each
left-padded prompt + postprocessed response with (the score at the last token before the response's first pad)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny import save_tiny, tokenizer, word_tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.train import build, train
from deltatune.train.config_align import AlignArgs, validate_align
from deltatune.train.ppo import PPOLoop, prepare_ppo, reward_function


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama policy base, a one-label classifier on it with a seeded score head (no deltatune run), the same as
    a two-label classifier, and the one-label one saved with another tokenizer."""
    tmp = tmp_path_factory.mktemp("rm17")
    base = save_tiny(tmp / "base", max_position_embeddings=128)
    out = {"base": base}
    for name, labels, tok in (("rm", 1, tokenizer()), ("rm2", 2, tokenizer()), ("rm_words", 1, word_tokenizer())):
        torch.manual_seed(3)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=labels)
        with torch.no_grad():
            model.score.weight.normal_(0, 1.0)
        model.save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
        out[name] = str(tmp / name)
    return out


def _policy(base):
    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), config).eval()


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["pad", "pad_is_eos"])
def test_a_transformers_reward_model_scores_the_rollout_as_trls_get_reward(folders, pad_is_eos):
    """align.reward_model naming a transformers sequence-classification folder was refused ('holds no run.yaml': only
    a deltatune reward run or module:function); TRL's PPOTrainer takes such a model. Each rollout's score now equals
    TRL's get_reward on the same left-padded prompts and responses (one response ends at its EOS, one has none, one
    is its EOS alone), with the pad a token of its own and with the pad the EOS (TRL then scores the token before the
    EOS)."""
    from trl.experimental.utils import get_reward

    tok = tokenizer()
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    eos, pad = tok.eos_token_id, tok.pad_token_id
    reward = reward_function(folders["rm"], "cpu")
    align = AlignArgs(max_new_tokens=5)
    validate_align(align, "ppo")
    loop = PPOLoop(_policy(folders["base"]), tok, reward, align)
    generated = torch.tensor([[2000, 2001, eos, 2003, 2004], [2010, 2011, 2012, 2013, 2014], [eos, 2020, 1, 1, 1]])
    loop.model.generate = lambda input_ids, attention_mask, generation_config: torch.cat([input_ids, generated], 1)
    r = loop.rollout([[101, 2100, 2101], [101, 2102], [101, 2103, 2104, 2105]])
    reference = AutoModelForSequenceClassification.from_pretrained(folders["rm"], num_labels=1).eval()
    with torch.no_grad():
        want = get_reward(reference, r.sequences, pad, r.prompt_length)[1]
    assert r.scores.tolist() == pytest.approx(want.tolist(), abs=1e-5)
    assert want.std() > 1e-3  # the guard: the rows score differently


def test_a_ppo_run_with_a_transformers_reward_model(folders, tmp_path):
    """Through the stage: the recipe's folder passes prepare_ppo's checks, the loop is given the reward model itself
    (scoring token ids, not the text wrapper), the run trains and its report names how it scored."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about the {w} cat"}) + "\n" for w in "abcd"))
    out = tmp_path / "run"
    metrics = train(build({
        "stage": "ppo", "model": {"name_or_path": folders["base"]}, "data": {"train": str(prompts), "max_length": 16},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "align": {"reward_model": folders["rm"], "max_new_tokens": 4}, "output": {"dir": str(out)},
        "train": {"max_steps": 1, "batch_size": 2, "report_to": ["none"]},
    }))  # fmt: skip
    assert metrics["train_steps"] == 1 and torch.isfinite(torch.tensor(metrics["reward_first"]))
    assert "a transformers sequence classifier scoring the policy's token ids" in (out / "report.md").read_text()


@pytest.mark.parametrize("which, words", [
    ("rm2", r"^align.reward_model: '.*rm2' is a classifier of 2 labels"),
    ("base", r"^align.reward_model: '.*base' is no sequence-classification model"),
    ("rm_words", r"^align.reward_model '.*rm_words': its tokenizer is not the policy's \(45 tokens, the policy's "),
])  # fmt: skip
def test_a_reward_model_folder_that_cannot_score_the_policy_is_one_line_before_any_model_loads(
    folders, tmp_path, which, words
):
    """A two-label classifier (TRL loads it with num_labels=1: transformers' size mismatch), a causal LM folder (a
    random score head, silently) and a classifier with another tokenizer (TRL feeds it the policy's ids: other
    tokens, or an index error) are each one ConfigError naming align.reward_model, from prepare_ppo, before any
    model loads; the folder is left as it was."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "tell me"}) + "\n")
    raw = {"stage": "ppo", "model": {"name_or_path": folders["base"]}, "data": {"train": str(prompts)},
           "train": {"batch_size": 1}, "align": {"reward_model": folders[which], "max_new_tokens": 4}}  # fmt: skip
    before = sorted(os.listdir(folders[which]))
    with pytest.raises(ConfigError, match=words) as info:
        prepare_ppo(build(raw), tokenizer())
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(folders[which])) == before


def test_a_ppo_resume_after_the_data_changed_is_refused_as_the_trainer_stages(folders, tmp_path):
    """A PPO checkpoint recorded nothing of the data (runfolder.facts_changes: 'none for a stage with its own loop'),
    so a resume after the prompts file changed went on silently with other prompts (or an IndexError on a data order
    pointing past a shorter file). It now records the run's facts as the Trainer's checkpoints do: a resume with the
    same data ends where the unbroken run did (equal metrics), one after the file changed is the Trainer stages'
    one-line refusal, and --resume-changed continues."""
    from deltatune.train.runfolder import FINISHED_FILE

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about the {w} cat"}) + "\n" for w in "abcd"))
    out = tmp_path / "run"
    raw = {
        "stage": "ppo", "model": {"name_or_path": folders["base"]}, "data": {"train": str(prompts), "max_length": 16},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "align": {"reward_model": folders["rm"], "max_new_tokens": 3}, "output": {"dir": str(out)},
        "train": {"max_steps": 2, "batch_size": 2, "save_steps": 1, "report_to": ["none"]},
    }  # fmt: skip
    unbroken = train(build(raw))
    assert (out / "checkpoint-1").is_dir()
    (out / FINISHED_FILE).unlink()  # as if the run had stopped after checkpoint-1 (the last step's checkpoint-2 gone)
    shutil.rmtree(out / "checkpoint-2")
    resumed = train(build(raw), resume=True)
    for key in ("train_loss", "reward_first", "reward_last", "kl_last"):
        assert resumed[key] == pytest.approx(unbroken[key], abs=1e-6), key
    (out / FINISHED_FILE).unlink()
    shutil.rmtree(out / "checkpoint-2")
    prompts.write_text(json.dumps({"prompt": "tell me about the e cat"}) + "\n")
    with pytest.raises(ConfigError, match=r"^--resume: since checkpoint-1 was written, the file of data.train "
                       "changed, so training would not continue as it went; pass --resume-changed"):  # fmt: skip
        train(build(raw), resume=True)
    assert not (out / FINISHED_FILE).exists()
    assert train(build(raw), resume=True, resume_changed=True)["train_steps"] == 2


def test_a_reward_tokenizer_that_only_adds_tokens_is_the_policys(folders, tmp_path):
    """A reward model whose tokenizer is the policy's plus an added token (a [PAD], as TRL's PPO examples add one)
    reads every policy id alike, so it is accepted (the check before refused any other vocabulary); one whose
    vocabulary swaps two of the policy's ids is refused naming the first token that moved."""
    from transformers import BertTokenizerFast

    from deltatune.train.scorers import check_token_reward

    tok = tokenizer()
    words = sorted(tok.get_vocab(), key=tok.get_vocab().get)
    words[0], words[1] = words[1], words[0]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    added = tokenizer()
    added.add_special_tokens({"additional_special_tokens": ["[NEWPAD]"]})
    for name, theirs in (("added", added), ("moved", BertTokenizerFast(str(tmp_path / "vocab.txt")))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(Path(folders["rm"], "config.json").read_text())
        theirs.save_pretrained(tmp_path / name)
    assert len(added) == len(tok) + 1
    check_token_reward(str(tmp_path / "added"), tok)
    with pytest.raises(ConfigError, match=r"^align.reward_model '.*moved': its tokenizer is not the policy's \("
                       r"\d+ tokens, the policy's \d+; the policy's token '\[PAD\]' is id 0, there 1\)"):  # fmt: skip
        check_token_reward(str(tmp_path / "moved"), tok)


def test_an_unfinished_reward_run_is_one_line_before_any_model_loads(folders, tmp_path):
    """A stage rm run folder that holds its run.yaml but no adapter yet (still training, or stopped before its end)
    passed prepare_ppo's check, and the run failed after the policy loaded with a FileNotFoundError ('no
    adapter_config.json at ...'); it is one ConfigError naming the folder, before any model loads."""
    import yaml

    run = tmp_path / "rm_run"
    run.mkdir()
    (run / "run.yaml").write_text(yaml.safe_dump({"stage": "rm", "model": {"name_or_path": folders["base"]}}))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "tell me"}) + "\n")
    raw = {"stage": "ppo", "model": {"name_or_path": folders["base"]}, "data": {"train": str(prompts)},
           "train": {"batch_size": 1}, "align": {"reward_model": str(run), "max_new_tokens": 4}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"^reward model '.*rm_run' holds no adapter yet \(no adapter_config.json\)"):
        prepare_ppo(build(raw), tokenizer())
    assert sorted(os.listdir(run)) == ["run.yaml"]


def test_an_encoder_reward_model_on_the_policys_tokenizer_is_one_line_before_any_model_loads(folders, tmp_path):
    """A one-label BertForSequenceClassification saved with the policy's own tokenizer passed check_token_reward (its
    tokenizer reads the policy's ids alike) and was refused only by TokenRewardModel, inside the loop, after the
    policy had loaded (an encoder has no ``score`` head: TRL's get_reward cannot score with it). prepare_ppo now
    refuses it, before any model loads, with the very line TokenRewardModel gives; the folder is left as it was."""
    from tiny import tiny_config
    from transformers import BertForSequenceClassification

    from deltatune.train.scorers import TokenRewardModel

    tok = tokenizer()
    config = tiny_config("bert", vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    config.num_labels = 1
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert_rm")
    tok.save_pretrained(tmp_path / "bert_rm")
    spec = str(tmp_path / "bert_rm")
    with pytest.raises(ConfigError) as loading:
        TokenRewardModel(spec)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "tell me"}) + "\n")
    raw = {"stage": "ppo", "model": {"name_or_path": folders["base"]}, "data": {"train": str(prompts)},
           "train": {"batch_size": 1}, "align": {"reward_model": spec, "max_new_tokens": 4}}  # fmt: skip
    before = sorted(os.listdir(spec))
    with pytest.raises(ConfigError, match=r"^align.reward_model '.*bert_rm': a BertForSequenceClassification has no "
                       "score head on a decoder backbone") as info:  # fmt: skip
        prepare_ppo(build(raw), tok)
    assert str(info.value) == str(loading.value) and "\n" not in str(info.value)
    assert sorted(os.listdir(spec)) == before


def _loop_recipe(stage, folders, tmp_path, name) -> dict:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about the {w} cat"}) + "\n" for w in "abcd"))
    (tmp_path / "rewards.py").write_text("def zero(completions, **kw):\n    return [0.0] * len(completions)\n")
    align = (
        {"reward_model": folders["rm"], "max_new_tokens": 3}
        if stage == "ppo"
        else {"num_generations": 2, "max_new_tokens": 3, "reward_funcs": [f"{tmp_path / 'rewards.py'}:zero"]}
    )
    return {"stage": stage, "model": {"name_or_path": folders["base"]}, "align": align,
            "data": {"train": str(prompts), "max_length": 16}, "output": {"dir": str(tmp_path / name)},
            "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
            "train": {"max_steps": 2, "batch_size": 2, "save_steps": 1, "report_to": ["none"]}}  # fmt: skip


def _counting(monkeypatch) -> list[dict]:
    """runfolder.run_facts (and run.py's name for it) wrapped: each call's result kept."""
    from deltatune.train import run, runfolder

    calls, real = [], runfolder.run_facts

    def counted(cfg):
        calls.append(real(cfg))
        return calls[-1]

    monkeypatch.setattr(runfolder, "run_facts", counted)
    monkeypatch.setattr(run, "run_facts", counted)
    return calls


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_the_loops_record_the_facts_run_py_hands_them(folders, tmp_path, monkeypatch, stage):
    """train_ppo and train_grpo hashed every data file again (runfolder.run_facts), after run.py had hashed them for
    the resume check and after the model loaded: twice the start-up hashing on a large prompt file, and the bytes
    as they were then. The stage's loop now records the facts run.py hands it (``prepared.run_facts``, as run.py
    hands the Trainer stages ``trainer.run_facts``) and reads none itself; a loop given none (a direct caller) reads
    them once, as before."""
    from deltatune.train.grpo import prepare_grpo
    from deltatune.train.trainer import SUMS

    calls = _counting(monkeypatch)
    tok = tokenizer()
    for name, handed in (("handed", {"world_size": 1, "data.train": "run.py's"}), ("none", None)):
        cfg = build(_loop_recipe(stage, folders, tmp_path, name))
        prepared = (prepare_ppo if stage == "ppo" else prepare_grpo)(cfg, tok)
        if handed is not None:
            prepared.run_facts = handed
        os.makedirs(cfg.output.dir)
        prepared.loop(_policy(folders["base"]), tok, cfg)
        recorded = json.loads((tmp_path / name / "checkpoint-1" / SUMS).read_text())["facts"]
        assert recorded == (handed if handed is not None else calls[-1])
        assert len(calls) == (0 if handed is not None else 1)


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_a_loop_run_hashes_its_data_once(folders, tmp_path, monkeypatch, stage):
    """Through run.py: one runfolder.run_facts per run (it was two: run.py's for the resume check, the loop's for
    its checkpoints), and the checkpoints record that one's result."""
    from deltatune.train.trainer import SUMS

    calls = _counting(monkeypatch)
    train(build(_loop_recipe(stage, folders, tmp_path, "run")))
    assert len(calls) == 1
    assert json.loads((tmp_path / "run" / "checkpoint-1" / SUMS).read_text())["facts"] == calls[0]
