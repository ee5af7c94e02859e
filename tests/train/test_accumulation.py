"""Gradient accumulation is a way to fit a batch, not another loss: for every stage whose loss is a mean over the
whole batch, 2 micro-batches x 2 accumulated give the same logged losses and the same adapter as batches of 4.

Responses of very different lengths, so that a loss averaged over tokens per micro-batch (instead of over the whole
step's tokens) would show: ORPO's NLL term and the tag stage's loss did, before they took their divisor from the
step, and T5's own loss was taken once per micro-batch unscaled (twice the loss and gradient at 2 x 2). KTO is left
out: its reference point is, as in TRL, a statistic of each micro-batch."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from tiny import WORDS, save_tiny

from deltatune.train import build, train


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accumulation")
    rng = random.Random(0)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    lengths = [1, 9, 2, 12, 3, 7, 1, 10]  # chosen responses: short and long in every pair of micro-batches
    rows = {
        "pairs": [{"prompt": words(3), "chosen": words(n), "rejected": words(13 - n)} for n in lengths],
        "sft": [{"instruction": words(3), "output": words(n)} for n in lengths],
        "pt": [{"text": words(n + 2)} for n in lengths],
        "seq2seq": [{"source": words(3), "target": words(n)} for n in lengths],
        "tag": [{"tokens": words(n).split(), "ner_tags": [rng.choice(["O", "B-x", "I-x"]) for _ in range(n)]}
                for n in lengths],
    }  # fmt: skip
    quiet = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # both runs must compute alike
    out = {"llama": save_tiny(tmp / "llama", "llama", "causal_lm"),
           "t5": save_tiny(tmp / "t5", "t5", "seq2seq", dropout_rate=0.0),
           "bert": save_tiny(tmp / "bert", "bert", "token_cls", **quiet)}  # fmt: skip
    for name, data in rows.items():
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        out[name] = str(path)
    return out


# stage -> (data, model, LoRA targets)
DECODER = ["q_proj", "v_proj"]
STAGES = {"sft": ("sft", "llama", DECODER), "pt": ("pt", "llama", DECODER), "dpo": ("pairs", "llama", DECODER),
          "orpo": ("pairs", "llama", DECODER), "simpo": ("pairs", "llama", DECODER), "rm": ("pairs", "llama", DECODER),
          "seq2seq": ("seq2seq", "t5", ["q", "v"]), "tag": ("tag", "bert", ["query", "value"])}  # fmt: skip


def run(files, stage: str, out: str, batch_size: int, grad_accum: int) -> tuple[dict, list[tuple[float, float]]]:
    """The adapter after two steps, and each step's (loss, gradient norm) as logged (the sampler's order is the
    seed's, whatever the batch size, so both runs see the same rows at each step)."""
    data, model, targets = STAGES[stage]
    recipe = {
        "stage": stage,
        "model": {"name_or_path": files[model]},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": targets},
        "data": {"train": files[data], "max_length": 32},
        "train": {"batch_size": batch_size, "grad_accum": grad_accum, "max_steps": 2, "lr": 1e-2, "seed": 3,
                  "logging_steps": 1, "report_to": ["none"]},
        "output": {"dir": out},
    }  # fmt: skip
    return trained(recipe)


def trained(recipe: dict) -> tuple[dict, list[tuple[float, float]]]:
    """Train ``recipe``: its adapter, and each step's (loss, gradient norm) as logged."""
    train(build(recipe))
    out = recipe["output"]["dir"]
    with open(f"{out}/log_history.jsonl") as fh:
        steps = [(h["loss"], h["grad_norm"]) for h in map(json.loads, fh) if "loss" in h]
    return load_file(f"{out}/adapter_model.safetensors"), steps


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_accumulated_micro_batches_equal_one_batch(files, tmp_path, stage):
    big, big_steps = run(files, stage, str(tmp_path / "big"), 4, 1)
    acc, acc_steps = run(files, stage, str(tmp_path / "acc"), 2, 2)
    assert [x for step in acc_steps for x in step] == pytest.approx([x for step in big_steps for x in step], rel=1e-5)
    assert big.keys() == acc.keys()
    for k in big:  # fp32 sums in another order: a few ulps after two AdamW steps
        torch.testing.assert_close(acc[k], big[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert len(big_steps) == 2 and big_steps[0][0] != big_steps[1][0]  # the guard: it trained


@pytest.mark.parametrize("stage", ["sft", "seq2seq", "tag"])
def test_eval_loss_is_a_mean_over_every_label_token_whatever_the_eval_batch_size(files, tmp_path, capsys, stage):
    """The Trainer's eval loss is a mean over batches weighted by their rows: with rows of different lengths the
    eval loss (and perplexity) of one eval batch of 8 and of 8 batches of 1 differed (6.67 and 6.75 on SmolLM2)."""
    from deltatune.cli import main

    run(files, stage, str(tmp_path / "run"), 4, 1)
    losses = []
    for size in (1, 3, 8):
        args = ["eval", "--adapter", str(tmp_path / "run"), "--data", files[STAGES[stage][0]]]
        assert main([*args, f"train.eval_batch_size={size}"]) == 0
        losses.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_loss"])
    assert losses[0] == pytest.approx(losses[2], rel=1e-6) and losses[1] == pytest.approx(losses[2], rel=1e-6)


@pytest.mark.slow
def test_two_orpo_processes_equal_one(files, tmp_path):
    """2 CPU processes (gloo, DDP) of 4 rows against one of 8: the same adapter after two steps. ORPO's NLL divides
    by the chosen tokens of every process, and each process's share is taken twice over against DDP's averaging
    (the stages whose token count is the Trainer's rely on its DDP scaling)."""
    stage = "orpo"
    import os
    import subprocess
    import sys

    import yaml

    def recipe(out: str, batch_size: int) -> str:
        data, model, targets = STAGES[stage]
        path = tmp_path / f"{os.path.basename(out)}.yaml"
        path.write_text(yaml.safe_dump({
            "stage": stage, "model": {"name_or_path": files[model]},
            "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": targets},
            "data": {"train": files[data], "max_length": 32},
            "train": {"batch_size": batch_size, "max_steps": 2, "lr": 1e-2, "seed": 3, "report_to": ["none"]},
            "output": {"dir": out},
        }))  # fmt: skip
        return str(path)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    single = str(tmp_path / "single")
    done = subprocess.run([sys.executable, "-m", "deltatune.cli", "train", recipe(single, 8)], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    multi = str(tmp_path / "multi")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    # Process 1 writes its part of each checkpoint (its RNG state) late: the staging folder must wait for it. Moved
    # on by process 0 alone, it crashed process 1 now and then ("parent directory ... does not exist").
    late = tmp_path / "late_rank.py"
    late.write_text(
        "import sys, time\nfrom transformers import Trainer\nsave = Trainer._save_rng_state\n"
        "def late(self, output_dir):\n    if self.args.process_index == 1:\n        time.sleep(2)\n"
        "    return save(self, output_dir)\nTrainer._save_rng_state = late\n"
        "from deltatune.cli import main\nsys.exit(main())\n"
    )
    ran = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29535", str(late), "train",
                          recipe(multi, 4)], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert ran.returncode == 0, "\n".join(x for x in ran.stderr.splitlines() if "[rank0]" not in x)[-3000:]
    for step in (1, 2):  # each checkpoint whole: both processes' RNG states, for --resume
        assert {f"rng_state_{i}.pth" for i in (0, 1)} <= set(os.listdir(f"{multi}/checkpoint-{step}"))
    one, two = (load_file(f"{out}/adapter_model.safetensors") for out in (single, multi))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_eval_loss_per_token_also_for_a_batch_encoding_collator(files, tmp_path):
    """``deltatune.Trainer`` with a collator that returns a BatchEncoding (a Mapping, not a dict), as tokenizers'
    ``pad`` does: the eval loss is still the per-token mean, the same at eval batch sizes 1 and 8."""
    from transformers import AutoModelForCausalLM, BatchEncoding, TrainingArguments

    import deltatune as dt

    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(files["llama"]), dt.LoraConfig(r=2))
    rows = [[5 + i] * n for i, n in enumerate([2, 9, 3, 12, 4, 7, 2, 10])]  # rows of very different lengths

    def collate(batch):
        width = max(len(r) for r in batch)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in batch])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch])
        return BatchEncoding({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})

    losses = []
    for size in (1, 8):
        args = TrainingArguments(
            str(tmp_path / str(size)), per_device_eval_batch_size=size, report_to=[], use_cpu=True
        )
        trainer = dt.Trainer(model=model, args=args, eval_dataset=rows, data_collator=collate)
        losses.append(trainer.evaluate()["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


PYTHON_MODELS = {  # (family, task, config overrides, LoRA targets): heads whose own loss ignores the item count
    "seq_cls": ("bert", "seq_cls", {}, ["query", "value"]),
    "multi_label": ("bert", "seq_cls", {}, ["query", "value"]),  # BCE: not a cross-entropy, divided by the steps
    "token_cls": ("bert", "token_cls", {}, ["query", "value"]),
    "t5": ("t5", "seq2seq", {"dropout_rate": 0.0}, ["q", "v"]),
    "llama": ("llama", "causal_lm", {}, ["q_proj", "v_proj"]),  # takes the count: left to the Trainer
}


@pytest.mark.parametrize("case", list(PYTHON_MODELS))
def test_deltatune_trainer_accumulates_as_one_batch_from_python(tmp_path, case):
    """``deltatune.Trainer`` used directly, 2 micro-batches x 2 against batches of 4: the same logged loss, gradient
    norm and adapter. The transformers Trainer passes ``num_items_in_batch`` to any forward with ``**kwargs`` and
    then leaves the loss unscaled, so these heads (their loss a mean per micro-batch) trained twice the loss and
    gradient (transformers #47688; peft's model under the Trainer does too)."""
    from tiny import tiny_model
    from transformers import TrainingArguments

    import deltatune as dt

    family, task, overrides, targets = PYTHON_MODELS[case]
    if family == "bert":
        overrides = {**overrides, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, n in enumerate([2, 9, 3, 12, 4, 7, 2, 10]):  # rows of very different lengths
        ids = torch.randint(5, 100, (n,), generator=g).tolist()
        labels = {
            "seq_cls": i % 2,
            "multi_label": [i % 2, i // 2 % 2, 1.0],
            "token_cls": [j % 3 for j in range(n)],
        }.get(case, ids)
        rows.append({"input_ids": ids, "labels": ids[: max(1, n // 2)] if case == "t5" else labels})

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in batch])
        labels = [r["labels"] for r in batch]
        if isinstance(labels[0], list) and case != "multi_label":
            span = max(len(x) for x in labels)
            labels = [x + [-100] * (span - len(x)) for x in labels]
        return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor(labels)}

    results = []
    for size, accum in ((4, 1), (2, 2)):
        model = dt.get_delta_model(
            tiny_model(family, task, **overrides), dt.LoraConfig(r=2, target_modules=targets, init_lora_weights=False)
        )
        args = TrainingArguments(
            str(tmp_path / str(size)), per_device_train_batch_size=size, gradient_accumulation_steps=accum,
            max_steps=2, logging_steps=1, learning_rate=1e-2, seed=3, save_strategy="no", report_to=[], use_cpu=True,
            disable_tqdm=True,
        )  # fmt: skip
        trainer = dt.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        trainer.train()
        logged = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
        lora = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        results.append((logged, lora))
    (logged4, lora4), (logged22, lora22) = results
    assert len(logged4) == 2
    for (loss4, norm4), (loss22, norm22) in zip(logged4, logged22):
        assert loss22 == pytest.approx(loss4, rel=1e-5) and norm22 == pytest.approx(norm4, rel=1e-4)
    for name in lora4:
        torch.testing.assert_close(lora22[name], lora4[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_lm_losses_are_per_token_means_for_every_class_name(tmp_path, family):
    """The logged training loss and the eval loss are the model's own mean over its predicted tokens. The
    transformers Trainer counts a batch's items over ``labels[..., 1:]`` only where ``loss_type`` names the causal
    loss; GPT-2's classes have none (transformers falls back to it), so every row's first token was counted too:
    eval loss 4.07 against 4.87 on these rows, and the training loss divided alike."""
    from tiny import tiny_model
    from transformers import TrainingArguments

    import deltatune as dt

    quiet = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if family == "gpt2" else {}  # train = eval
    base = tiny_model(family, "causal_lm", **quiet)
    model = dt.get_delta_model(base, dt.LoraConfig(r=2, init_lora_weights=False))
    rows = [[(7 * j + i) % 90 + 5 for j in range(n)] for i, n in enumerate([2, 9, 3, 12, 4, 7, 2, 10])]

    def collate(batch):
        width = max(len(r) for r in batch)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in batch])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch])
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    with torch.no_grad():
        own = model(**collate(rows)).loss.item()  # the model's mean over all predicted tokens, no Trainer count
    args = TrainingArguments(
        str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=3, max_steps=1, learning_rate=0.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = dt.Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows, data_collator=collate)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(own, rel=1e-6)
    trainer.train()
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h] == [pytest.approx(own, rel=1e-5)]


def test_deltatune_trainer_trains_a_module_whose_forward_takes_no_kwargs(tmp_path):
    """A plain torch module under ``deltatune.Trainer``: the Trainer reads "accepts loss kwargs" off the base's
    forward, not DeltaModel's (which takes ``**kwargs`` whatever the base's does), so it does not pass the item
    count the base refused (a TypeError at the first step); 2 x 2 accumulated trains as batches of 4."""
    from transformers import TrainingArguments

    import deltatune as dt

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.proj, self.out = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)

        def forward(self, input_ids, labels=None):
            logits = self.out(torch.tanh(self.proj(self.emb(input_ids).mean(1))))
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    rows = [{"input_ids": [i % 50, (3 * i) % 50, 7], "labels": i % 3} for i in range(8)]

    def collate(batch):
        return {key: torch.tensor([r[key] for r in batch]) for key in ("input_ids", "labels")}

    logged = []
    for size, accum in ((4, 1), (2, 2)):
        model = dt.get_delta_model(Net(), dt.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
        args = TrainingArguments(
            str(tmp_path / str(size)), per_device_train_batch_size=size, gradient_accumulation_steps=accum,
            max_steps=2, logging_steps=1, learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
            disable_tqdm=True, remove_unused_columns=False,
        )  # fmt: skip
        trainer = dt.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        trainer.train()
        logged.append([(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h])
    assert len(logged[0]) == 2
    assert logged[1] == [(pytest.approx(a, rel=1e-5), pytest.approx(b, rel=1e-4)) for a, b in logged[0]]


def test_an_epochs_uneven_last_step_weighs_every_row_alike(tmp_path):
    """cls, 5 rows in micro-batches of 2, 2 and 1 accumulated against one batch of 5: the same loss, gradient norm
    and adapter. Dividing each micro-batch's mean by the steps weighed the last row twice (grad norm 0.264 against
    0.153); the loss is now the cross-entropy over the step's rows. A one-class file is refused in one line (one
    output would have made transformers' head a regression)."""
    from tiny import save_tiny

    from deltatune.data.load import DataError

    model = save_tiny(tmp_path / "bert", "bert", "seq_cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rows = [{"text": f"a {w} film number {i} " + "x " * (3 * i), "label": i % 2}
            for i, w in enumerate(["good", "bad", "fine", "awful", "great"])]  # fmt: skip
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(out: str, batch_size: int, grad_accum: int, train_file=data):
        recipe = {
            "stage": "cls", "model": {"name_or_path": model},
            "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
            "data": {"train": str(train_file), "max_length": 32},
            "train": {"batch_size": batch_size, "grad_accum": grad_accum, "epochs": 1, "lr": 1e-2, "seed": 3,
                      "logging_steps": 1, "report_to": ["none"]},
            "output": {"dir": out},
        }  # fmt: skip
        return trained(recipe)

    (one, logged1), (acc, logged3) = run(str(tmp_path / "one"), 6, 1), run(str(tmp_path / "acc"), 2, 3)
    assert len(logged1) == len(logged3) == 1
    assert logged3[0] == (pytest.approx(logged1[0][0], rel=1e-5), pytest.approx(logged1[0][1], rel=1e-4))
    for k in one:
        torch.testing.assert_close(acc[k], one[k], rtol=1e-4, atol=1e-6)

    single = tmp_path / "single.jsonl"
    single.write_text("".join(json.dumps({**r, "label": 0}) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"single.jsonl: only one class \('0'\) in column 'label'; .* at least two"):
        run(str(tmp_path / "refused"), 2, 1, single)
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("stage", ["seq2seq", "tag", "cls", "cls-t5", "cls-bart"])
def test_the_step_loss_is_the_models_own_loss(files, tmp_path, stage):
    """The first logged loss of a run that sees all 8 rows in one step (a learning rate too small to matter) is the
    model's own loss on the stage's batch of them: the step's token (or row) count changes how micro-batches add
    up, never what one batch's loss is (a loss scored against the wrong positions would agree with itself at 2 x 2
    and 4 and still fail here, as BLIP's did: tests/vision/test_blip_caption.py)."""
    from deltatune.train.models import load_tokenizer
    from deltatune.train.run import load_adapter_model
    from deltatune.train.table import prepare

    stage, _, family = stage.partition("-")  # T5's and BART's classifiers failed at step 1 (AttributeError)
    if stage == "cls":
        from tiny import save_tiny

        quiet = {"t5": {"dropout_rate": 0.0}, "bart": {"dropout": 0.0, "classifier_dropout": 0.0}}.get(
            family, {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        )
        files = {**files, "bert": save_tiny(tmp_path / "bert", family or "bert", "seq_cls", **quiet)}
        rows = [{"text": " ".join(["good", "bad", "film"][: 1 + i % 3]) + f" {i}", "label": i % 2} for i in range(8)]
        (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        files["cls"] = str(tmp_path / "cls.jsonl")
    data, model = {"seq2seq": ("seq2seq", "t5"), "tag": ("tag", "bert"), "cls": ("cls", "bert")}[stage]
    recipe = {
        "stage": stage, "model": {"name_or_path": files[model]},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8,
                   "target_modules": {"t5": ["q", "v"], "bart": ["q_proj", "v_proj"]}.get(family or model,
                                                                                         ["query", "value"])},
        "data": {"train": files[data], "max_length": 32},
        "train": {"batch_size": 8, "max_steps": 1, "lr": 1e-12, "seed": 3, "logging_steps": 1, "report_to": ["none"]},
        "output": {"dir": str(tmp_path / "run")},
    }  # fmt: skip
    train(build(recipe))
    with open(tmp_path / "run" / "log_history.jsonl") as fh:
        logged = [h["loss"] for h in map(json.loads, fh) if "loss" in h]
    cfg = build(recipe)
    prepared = prepare(cfg, load_tokenizer(files[model]))
    batch = prepared.collator(list(prepared.train))
    delta, _ = load_adapter_model(str(tmp_path / "run"))  # as trained: 1e-12 moved nothing
    with torch.no_grad():
        own = delta.eval()(**batch).loss.item()
    assert logged[0] == pytest.approx(own, rel=1e-5)


def test_the_item_count_question_waits_for_a_micro_batch_with_labels(tmp_path):
    """A first micro-batch without a labelled token tells nothing (a causal LM's loss over no token is 0 whatever
    the count): deltatune.Trainer asks again at the next, and decides there."""
    from tiny import tiny_model
    from transformers import TrainingArguments

    import deltatune as dt

    model = dt.get_delta_model(tiny_model("bert", "token_cls"), dt.LoraConfig(r=2, target_modules=["query"]))
    args = TrainingArguments(str(tmp_path), gradient_accumulation_steps=2, report_to=[], use_cpu=True)
    trainer = dt.Trainer(model=model, args=args)
    ids = torch.tensor([[5, 6, 7, 8]])
    trainer._check_item_count({"input_ids": ids, "labels": torch.full((1, 4), -100)}, torch.tensor(3))
    assert not trainer._item_count_checked and trainer.compute_loss_func is None
    trainer._check_item_count({"input_ids": ids, "labels": torch.tensor([[0, 1, 2, -100]])}, torch.tensor(3))
    assert trainer._item_count_checked and trainer.compute_loss_func is dt.loss.token_loss


DDP_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, TrainingArguments
import deltatune as dt

model_path, out, batch, accumulate = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
rows = [{"input_ids": [5 + i, 9, 12 + i % 3][: 1 + i % 3], "labels": i % 2} for i in range(8)]

def collate(batch):
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in batch])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([r["labels"] for r in batch])}

model = dt.get_delta_model(AutoModelForSequenceClassification.from_pretrained(model_path),
                           dt.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False))
args = TrainingArguments(out, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate, max_steps=2,
                         logging_steps=1, learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                         disable_tqdm=True, seed=3)
trainer = dt.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
trainer.train()
if trainer.is_world_process_zero():
    logged = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
    json.dump({"logged": logged, "token_loss": trainer.compute_loss_func is not None}, open(out + ".json", "w"))
if torch.distributed.is_initialized():  # (a rank exiting with the group alive aborted once: "terminate called")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_deltatune_trainer_under_two_processes_accumulates_as_one_batch(tmp_path):
    """deltatune.Trainer from Python on a classifier, 2 processes x 2 rows x 2 accumulated against one process with
    all 8 rows per step: the same logged losses and gradient norms (the item-count answer gathered from both
    processes; transformers' own path takes each micro-batch's mean unscaled there too)."""
    import os
    import subprocess
    import sys

    from tiny import save_tiny

    quiet = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = save_tiny(tmp_path / "bert", "bert", "seq_cls", **quiet)
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(script), model, str(tmp_path / "one"), "8", "1"],
                            capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    multi = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29536", str(script), model,
                            str(tmp_path / "two"), "2", "2"], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert multi.returncode == 0, "\n".join(x for x in multi.stderr.splitlines() if "[rank0]" not in x)[-3000:]
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert two["token_loss"] and len(one["logged"]) == 2
    assert two["logged"] == [[pytest.approx(a, rel=1e-5), pytest.approx(b, rel=1e-4)] for a, b in one["logged"]]


@pytest.mark.parametrize("stage", ["dpo", "orpo", "simpo", "rm"])
def test_an_epochs_uneven_last_step_weighs_every_pair_alike(files, tmp_path, stage):
    """5 preference pairs in micro-batches of 2, 2 and 1 accumulated against one batch of 5: the same loss, gradient
    norm and adapter. A mean per micro-batch, divided by the steps, weighed the last pair twice."""
    data, model, targets = STAGES[stage]

    def recipe(out: str, batch_size: int, grad_accum: int) -> dict:
        return {
            "stage": stage, "model": {"name_or_path": files[model]},
            "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": targets},
            "data": {"train": files[data], "max_length": 32, "limit": 5},
            "train": {"batch_size": batch_size, "grad_accum": grad_accum, "epochs": 1, "lr": 1e-2, "seed": 3,
                      "logging_steps": 1, "report_to": ["none"]},
            "output": {"dir": out},
        }  # fmt: skip

    (one, logged1), (acc, logged3) = (trained(recipe(str(tmp_path / name), b, g)) for name, b, g in
                                      (("one", 6, 1), ("acc", 2, 3)))  # fmt: skip
    assert len(logged1) == len(logged3) == 1
    assert logged3[0] == (pytest.approx(logged1[0][0], rel=1e-5), pytest.approx(logged1[0][1], rel=1e-4))
    for k in one:
        torch.testing.assert_close(acc[k], one[k], rtol=1e-4, atol=1e-5)  # Adam's step on a gradient near 0: noise


def test_tagging_data_of_one_tag_is_refused(files, tmp_path):
    """Every tag "O": a one-output token classifier whose loss is 0 from the first step, and a run that reported
    success (stage cls refuses one class likewise)."""
    from deltatune.data.load import DataError
    from deltatune.train.models import load_tokenizer
    from deltatune.train.table import prepare

    data = tmp_path / "o.jsonl"
    data.write_text(
        "".join(json.dumps({"tokens": ["a", "cat", str(i)], "ner_tags": ["O"] * 3}) + "\n" for i in range(4))
    )
    recipe = {"stage": "tag", "model": {"name_or_path": files["bert"]}, "method": {"name": "lora", "r": 2},
              "data": {"train": str(data)}, "output": {"dir": str(tmp_path / "run")}}  # fmt: skip
    with pytest.raises(DataError, match=r"^every tag in 'ner_tags' is 'O': one class, nothing to learn"):
        prepare(build(recipe), load_tokenizer(files["bert"]))


def test_an_sft_run_evaluated_on_start_reports_its_loss_before(files, tmp_path, capsys):
    """train.eval_on_start on sft or pt ran the step-0 evaluation, but metrics.json, the report and the printed
    change had no loss before (stages with a headline metric did): the quick start's own setting."""
    from deltatune.cli import main

    recipe = {"stage": "sft", "model": {"name_or_path": files["llama"]}, "method": {"name": "lora", "r": 2},
              "data": {"train": files["sft"], "eval": files["sft"], "max_length": 32},
              "train": {"batch_size": 4, "max_steps": 2, "lr": 0.05, "eval_on_start": True, "report_to": ["none"]},
              "output": {"dir": str(tmp_path / "run")}}  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    assert main(["train", str(path)]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    history = [json.loads(line) for line in (tmp_path / "run" / "log_history.jsonl").read_text().splitlines()]
    assert metrics["eval_loss_before"] == next(h["eval_loss"] for h in history if h.get("step") == 0)
    assert metrics["eval_loss_before"] != metrics["eval_loss"]
    assert f"eval_loss: {metrics['eval_loss_before']:.4f} before training -> " in capsys.readouterr().out
