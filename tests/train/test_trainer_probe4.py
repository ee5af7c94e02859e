"""Probe 4 of the training loop and its metrics: numbers checked against a plain no-grad pass and the reference
libraries (seqeval)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

DDP_EVAL = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from tiny import tiny_model
from transformers import TrainingArguments
import deltatune as dt

def collate(batch):
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in batch])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
    labels = [r["labels"] for r in batch]
    if isinstance(labels[0], list):
        labels = [x + [-100] * (width - len(x)) for x in labels]
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels)}

results = []
for family, task, nrows, size in (("llama", "causal_lm", 8, 2), ("llama", "causal_lm", 5, 1),
                                  ("llama", "causal_lm", 7, 4), ("bert", "seq_cls", 5, 2)):
    torch.manual_seed(0)
    model = dt.get_delta_model(tiny_model(family, task), dt.LoraConfig(r=2, target_modules=["query", "q_proj"],
                                                                        init_lora_weights=False))
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, n in enumerate([2, 12, 3, 9, 4, 7, 2, 10][:nrows]):  # rows of very different lengths
        ids = torch.randint(5, 100, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids if task == "causal_lm" else i % 2})
    args = TrainingArguments(sys.argv[1], per_device_eval_batch_size=size, report_to=[], use_cpu=True,
                             disable_tqdm=True)
    got = dt.Trainer(model=model, args=args, eval_dataset=rows, data_collator=collate).evaluate()["eval_loss"]
    model.eval()
    total = count = 0.0
    with torch.no_grad():  # the plain pass: each row alone, its loss weighted by its scored tokens (or 1 row)
        for r in rows:
            b = collate([r])
            k = int((b["labels"][:, 1:] != -100).sum()) if task == "causal_lm" else 1
            total += model(**b).loss.item() * k
            count += k
    results.append([got, total / count])
if torch.distributed.get_rank() == 0:
    json.dump(results, open(sys.argv[1] + ".json", "w"))
"""


@pytest.mark.slow
def test_a_two_process_eval_loss_equals_a_plain_pass_over_the_rows(tmp_path):
    """2 processes (gloo): the eval loss is the plain no-grad per-token mean over the eval rows (per-row for a
    classifier). Each process's loss was divided by the token count gathered from both and multiplied by 2 (4.909
    against 4.880 with 4 rows each), and the rows accelerate repeats to fill the last batch were counted again (5
    rows in batches of 1: 7.34 against 4.90)."""
    script = tmp_path / "ev.py"
    script.write_text(DDP_EVAL)
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = str(tmp_path / "out")
    ran = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29537", str(script), out, tests],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    with open(out + ".json") as fh:
        results = json.load(fh)
    assert len(results) == 4
    for got, plain in results:
        assert got == pytest.approx(plain, rel=1e-5)


def test_iobes_and_iob1_entities_are_scored_as_seqeval_scores_them():
    """IOBES tags (set through data.labels): S- is an entity of one token, E- ends one. The scorer read only B- and
    I-, so a sentence of S-LOC entities all found scored F1 0.0 (seqeval: 1.0), and B-PER E-PER found whole scored
    0.5 (seqeval: 1.0: one entity of two tokens). Hand-worked first, then random tags against seqeval."""
    import random
    import warnings

    from seqeval.metrics import f1_score, precision_score, recall_score

    from deltatune.train.metrics import entities, entity_prf

    assert entities(["S-LOC", "O", "B-PER", "I-PER", "E-PER", "S-PER"]) == {
        ("LOC", 0, 1),
        ("PER", 2, 5),
        ("PER", 5, 6),
    }
    assert entities(["B-PER", "E-PER", "E-PER", "I-LOC"]) == {("PER", 0, 2), ("PER", 2, 3), ("LOC", 3, 4)}
    true = [["S-LOC", "O", "S-LOC"], ["B-PER", "E-PER", "O"]]
    assert entity_prf(true, true) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    pred = [["S-LOC", "O", "O"], ["B-PER", "I-PER", "E-PER"]]  # LOC 0-1 found; PER 0-3 is not PER 0-2
    assert entity_prf(pred, true) == pytest.approx({"precision": 1 / 2, "recall": 1 / 3, "f1": 0.4})

    rng = random.Random(4)
    tags = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC", "I-creative-work"]
    warnings.simplefilter("ignore")  # seqeval's note on IOB1/IOBES mixed tags
    for _ in range(400):
        true = [[rng.choice(tags) for _ in range(rng.randint(1, 7))] for _ in range(rng.randint(1, 3))]
        pred = [[rng.choice(tags) for _ in t] for t in true]
        expected = [f(true, pred, zero_division=0) for f in (precision_score, recall_score, f1_score)]
        got = entity_prf(pred, true)
        assert [got["precision"], got["recall"], got["f1"]] == pytest.approx(expected, abs=1e-12), (pred, true)


def test_a_tag_run_on_iobes_data_trains_and_scores_its_entities(tmp_path):
    """IOBES tags without data.labels: the label set read from the data held only B- and I- per type, so the first
    E- or S- tag was refused ("tag 'S-LOC' is not in the label set"). Now every tag seen is a class, and the run
    reports the entity F1 of its predictions as seqeval scores them."""
    import numpy as np
    from seqeval.metrics import f1_score
    from tiny import save_tiny
    from transformers import EvalPrediction

    from deltatune.train import build
    from deltatune.train.models import load_processor
    from deltatune.train.tag import prepare_tag

    model = save_tiny(tmp_path / "bert", "bert", "token_cls")
    rows = [{"tokens": ["in", "paris", "with", "ann", "lee"], "ner_tags": ["O", "S-LOC", "O", "B-PER", "E-PER"]},
            {"tokens": ["rome", "is", "old"], "ner_tags": ["S-LOC", "O", "O"]}]  # fmt: skip
    data = tmp_path / "iobes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"stage": "tag", "model": {"name_or_path": model}, "method": {"name": "lora", "r": 2},
              "data": {"train": str(data), "eval": str(data), "max_length": 16}, "output": {"dir": str(tmp_path / "o")}}  # fmt: skip
    cfg = build(recipe)
    prepared = prepare_tag(cfg, load_processor(model, "tag"))
    names = prepared.labels
    assert names == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER", "E-PER", "S-LOC"]
    # Both LOCs found, and "ann" alone as the PER: 2 of 3 entities right, 2 of 3 predicted: F1 2/3
    labels = np.array([ex["labels"] + [-100] * (16 - len(ex["labels"])) for ex in prepared.eval])
    guess = [["O", "S-LOC", "O", "B-PER", "O"], ["S-LOC", "O", "O"]]
    logits = np.zeros((*labels.shape, len(names)), dtype=np.float32)
    for row, tags in enumerate(guess):
        cols = [j for j, x in enumerate(labels[row]) if x != -100]
        for j, tag in zip(cols, tags):
            logits[row, j, names.index(tag)] = 1.0
    got = prepared.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    true = [r["ner_tags"] for r in rows]
    assert got["f1"] == pytest.approx(f1_score(true, guess)) and got["f1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "lora"])
def test_a_causal_lm_under_virtual_tokens_trains_and_evaluates_on_its_own_per_token_loss(tmp_path, method):
    """Prompt and P-tuning put their virtual tokens before the row, so the model's loss also scores the row's first
    label (the last virtual token predicts it). The Trainer counts the items over ``labels[..., 1:]``: rows of 6
    labels (pre-training text, every token labelled) had their loss summed over 6 and divided by 5, training and
    eval alike (eval loss 5.91 against the model's own 4.92). Both are now the model's own per-token mean."""
    import torch
    from tiny import tiny_model
    from transformers import TrainingArguments

    import deltatune as dt

    configs = {
        "prompt_tuning": dt.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "p_tuning": dt.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=8, task_type="CAUSAL_LM"),
        "lora": dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
    }
    model = dt.get_delta_model(tiny_model("llama", "causal_lm"), configs[method])
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(5, 100, (6,), generator=g).tolist()), "labels": ids} for _ in range(4)]

    def collate(batch):
        ids = torch.tensor([r["input_ids"] for r in batch])
        return {"input_ids": ids, "labels": ids.clone()}

    model.eval()
    with torch.no_grad():
        plain = model(**collate(rows)).loss.item()  # the model's own mean over its 4 x 6 targets
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                             per_device_eval_batch_size=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = dt.Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows, data_collator=collate)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(plain, rel=1e-5)
    trainer.train()  # one step over all 4 rows: its logged loss is the loss before the update
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h] == [pytest.approx(plain, rel=1e-5)]


def test_a_nan_gradient_of_a_finite_loss_stops_before_the_update(tmp_path):
    """A finite loss whose gradient is NaN (here sqrt's at 0, times 0): the guard read only the loss, so the step's
    update made every trained weight NaN and the run went on (a checkpoint written then kept them); it stops now
    before that update, naming the gradient norm, and the weights are as they were."""
    import torch
    from transformers import TrainingArguments

    import deltatune as dt
    from deltatune.train.trainer import NonFiniteLossError

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.proj, self.out = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)

        def forward(self, input_ids, labels=None):
            hidden = self.proj(self.emb(input_ids).mean(1))
            logits = self.out(torch.tanh(hidden))
            loss = torch.nn.functional.cross_entropy(logits, labels) + torch.sqrt(hidden * 0).sum()  # + 0, NaN grad
            return {"loss": loss, "logits": logits}

    rows = [{"input_ids": [i % 50, (3 * i) % 50, 7], "labels": i % 3} for i in range(8)]

    def collate(batch):
        return {key: torch.tensor([r[key] for r in batch]) for key in ("input_ids", "labels")}

    model = dt.get_delta_model(Net(), dt.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = dt.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    with pytest.raises(NonFiniteLossError, match=r"the gradient norm became nan at step 1; training stopped before"):
        trainer.train()
    for name, value in model.named_parameters():
        if value.requires_grad:
            assert torch.equal(value, before[name]), name


def test_a_reward_adapter_scores_where_the_reward_model_scores_when_the_pad_ends_the_turn(tmp_path):
    """A tokenizer whose pad token is the end-of-turn token that closes the rendered pair (Llama 3's: pad = eos =
    <|eot_id|>): the reward classifier scores the last token that is not the pad, as it trained; ``AdapterReward``
    scored the attention mask's last token, the end-of-turn itself (0.054, -0.004, -0.204 against the reward model's
    1.307, -1.382, -0.430), so PPO and GRPO on a same-base reward adapter optimised other rewards."""
    import torch
    from tiny import save_tiny, tokenizer
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.train import build, train
    from deltatune.train.models import load_tokenizer
    from deltatune.train.scorers import AdapterReward, RewardScorer

    path = save_tiny(tmp_path / "llama", "llama", "causal_lm")
    tok = tokenizer()
    tok.pad_token = tok.sep_token  # every turn ends with [SEP], the pad
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}[SEP]{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tok.save_pretrained(path)
    rows = [{"prompt": f"tell me {w}", "chosen": "a kind answer", "rejected": f"{w} no"} for w in "abcdefgh"]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "rm")
    train(build({"stage": "rm", "model": {"name_or_path": path},
                 "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                 "data": {"train": str(data), "max_length": 32},
                 "train": {"max_steps": 2, "batch_size": 4, "lr": 5e-2, "report_to": ["none"]},
                 "output": {"dir": out}}))  # fmt: skip
    policy = dt.get_delta_model(
        AutoModelForCausalLM.from_pretrained(path),
        dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    shared = AdapterReward(policy, out, load_tokenizer(path))
    prompts, responses = ["tell me a", "tell me b", "what now"], ["a kind answer", "b no", "nothing at all here"]
    expected = RewardScorer(out)(prompts, responses)
    assert expected.std() > 0.1  # the guard: the texts score apart
    torch.testing.assert_close(shared(prompts, responses), expected, atol=1e-5, rtol=0)
