"""Preference stages against TRL 1.16 where a probe found them apart: KTO paired its eval rows for the reference point
z0 within each eval batch, where TRL's KTOTrainer pairs them when it prepares the data, in blocks of the train batch
size (each row with the row before it in its block, the block's first with its last): at train batch 4 and eval
batch 2, eval_loss 0.499936 against TRL's 0.499647, and an eval batch of one was refused where TRL takes it."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import trl
from datasets import Dataset
from test_pref_probe6 import trained_looking
from tiny import save_tiny, tiny_config, word_tokenizer
from transformers import AutoModelForCausalLM, TrainingArguments

import deltatune as dt
from deltatune.train import build
from deltatune.train.config import AlignArgs
from deltatune.train.dpo import DPOTrainer
from deltatune.train.kto import KTOCollator, KTOTrainer
from deltatune.train.models import load_tokenizer
from deltatune.train.run import _training_args
from deltatune.train.table import prepare as _prepare

PAIRS = [("what is your name", "my name is delta", "i will not say"), ("hello there friend", "hi", "go away now"),
         ("how are you", "fine thanks", "no"), ("tell me", "a story", "nothing at all")]  # fmt: skip
CONVERSATIONAL = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                   "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


def prepared(base: str, tmp_path, stage: str, rows: list[dict], align: dict, train: dict):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build({"stage": stage, "model": {"name_or_path": base},
                 "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                 "data": {"train": str(path), "eval": str(path), "max_length": 64}, "align": align,
                 "train": {**train, "report_to": ["none"]}, "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    tok = load_tokenizer(cfg.model.name_or_path)
    return cfg, tok, _prepare(cfg, tok)


def ours_evaluated(cfg, prep, model, tmp_path) -> dict[str, float]:
    return prep.trainer_class(model=model, args=_training_args(cfg, prep, str(tmp_path / "run")),
                              train_dataset=prep.train, eval_dataset=prep.eval, data_collator=prep.collator,
                              compute_metrics=prep.compute_metrics).evaluate()  # fmt: skip


@pytest.mark.parametrize("train_batch, eval_batch", [(4, 2), (4, 1), (3, 2)])
def test_kto_eval_pairs_rows_in_blocks_of_the_train_batch_as_trl(base, tmp_path, train_batch, eval_batch):
    """8 eval rows (4 pairs unpaired); at train batch 3 the blocks are 3, 3, 2 rows, the eval batches 2 each."""
    cfg, tok, prep = prepared(base, tmp_path, "kto", CONVERSATIONAL, {"beta": 0.3},
                              {"batch_size": train_batch, "eval_batch_size": eval_batch})  # fmt: skip
    model = trained_looking(base)
    ours = ours_evaluated(cfg, prep, model, tmp_path)
    args = trl.KTOConfig(str(tmp_path / "trl"), per_device_train_batch_size=train_batch,
                         per_device_eval_batch_size=eval_batch, report_to=[], use_cpu=True, bf16=False, beta=0.3,
                         max_length=64)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dt.trl_trainer(trl.KTOTrainer)(model=model, ref_model=AutoModelForCausalLM.from_pretrained(base),
                                                args=args, train_dataset=Dataset.from_list(CONVERSATIONAL),
                                                eval_dataset=Dataset.from_list(CONVERSATIONAL),
                                                processing_class=tok).evaluate()  # fmt: skip
    assert theirs["eval_kl"] > 0.01  # the reference point takes part
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], abs=2e-6)


@pytest.fixture(scope="module")
def word_model(tmp_path_factory) -> str:
    """A tiny llama on the 45-word tokenizer (no chat template): its greedy answer to "w1 w2 w3" is "w18 w17 w24",
    so a chosen response of those words has top-1 tokens (TRL's mean_token_accuracy above 0)."""
    tok = word_tokenizer()
    config = tiny_config("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)  # fmt: skip
    path = tmp_path_factory.mktemp("words") / "m"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


WORD_PAIRS = [{"prompt": "w1 w2 w3", "chosen": " w18 w17 w24", "rejected": " w6"},
              {"prompt": "w7", "chosen": " w8 w9 w10", "rejected": " w11 w12"}]  # fmt: skip
WORD_ROWS = [{"prompt": "w1 w2 w3", "completion": " w18 w17 w24", "label": True},
             {"prompt": "w7", "completion": " w11 w12", "label": False},
             {"prompt": "w13 w14", "completion": " w15", "label": True}]  # fmt: skip


def trl_logged(cls, config, model, base, rows, tmp_path, **kwargs) -> tuple[dict, dict[str, float]]:
    """TRL's trainer's batch of all ``rows`` and what it logs for it in training (its loss backed up: the metrics
    are logged in the forward)."""
    args = config(str(tmp_path / "trl"), per_device_train_batch_size=len(rows), report_to=[], use_cpu=True,
                  bf16=False, beta=0.3, **kwargs)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = dt.trl_trainer(cls)(model=model, ref_model=AutoModelForCausalLM.from_pretrained(base), args=args,
                                      train_dataset=Dataset.from_list(rows), processing_class=word_tokenizer())  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()  # (the tiny llama and the LoRA have no dropout)
    with torch.no_grad():
        trainer.compute_loss(model, batch)
    return batch, {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}


def test_dpo_logs_trls_logits_entropy_and_token_accuracy(word_model, tmp_path):
    """TRL's DPOTrainer logs logits/chosen, logits/rejected (the mean logit over the vocabulary, over each side's
    response tokens), entropy (over both sides' tokens) and mean_token_accuracy (the chosen tokens that are the
    argmax); deltatune logged none of them."""
    model = trained_looking(word_model, std=0.05)
    batch, logged = trl_logged(trl.DPOTrainer, trl.DPOConfig, model, word_model, WORD_PAIRS, tmp_path)
    assert logged["mean_token_accuracy"] > 0.2 and len(logged) == 10
    labels = torch.where(batch["completion_mask"].bool(), batch["input_ids"], -100)
    ours = DPOTrainer(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True),
                      align=AlignArgs(beta=0.3))  # fmt: skip
    with torch.no_grad():
        ours.compute_loss(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                  "labels": labels})  # fmt: skip
    assert {k: ours._stats[k][0] for k in logged} == pytest.approx(logged, abs=2e-5)


def test_kto_logs_trls_logits_and_entropy(word_model, tmp_path):
    model = trained_looking(word_model, std=0.05)
    batch, logged = trl_logged(trl.KTOTrainer, trl.KTOConfig, model, word_model, WORD_ROWS, tmp_path)
    assert len(logged) == 9  # kl, entropy, and logits, logps, rewards of each side, rewards/margins
    rows = []
    for i, label in enumerate(batch["label"].tolist()):
        real = batch["attention_mask"][i].bool()
        ids, completion = batch["input_ids"][i][real].tolist(), batch["completion_mask"][i][real].tolist()
        n = completion.index(1)
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * n + ids[n:],
                     "n_prompt": n, "desirable": bool(label)})  # fmt: skip
    ours = KTOTrainer(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True),
                      align=AlignArgs(beta=0.3))  # fmt: skip
    with torch.no_grad():
        ours.compute_loss(model, KTOCollator(word_tokenizer().pad_token_id, 64)(rows))
    assert {k: ours._stats[k][0] for k in logged} == pytest.approx(logged, abs=2e-5)


def test_a_dpo_pairs_answers_start_where_trls_dpo_trainer_splits_the_pair():
    """TRL's DPOTrainer splits both sides at the shorter of their prompt lengths: where the chosen answer's first
    token takes the generation prompt's last space (' Hello' after 'Assistant: ') and the rejected's does not ('42'
    splits off ' '), the rejected answer starts at that ' ' too. deltatune's rejected side left it out (one token's
    log-prob short). ORPO's and SimPO's trainers split each side at its own prompt (unchanged)."""
    from transformers import AutoTokenizer
    from trl.data_utils import common_prefix_length

    from deltatune.config import ConfigError
    from deltatune.data.encode import encode_pair_samples
    from deltatune.data.sample import Sample
    from deltatune.data.templates import IGNORE_INDEX
    from deltatune.train.models import resolve_path

    try:
        tok = AutoTokenizer.from_pretrained(resolve_path("smollm2"))  # byte-level BPE: a word takes its space
    except ConfigError as exc:
        pytest.skip(str(exc))
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n{% else %}Assistant: "
                         "{{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}Assistant: {% endif %}")  # fmt: skip
    prompt = [{"role": "user", "content": "Hi"}]
    chosen, rejected = (
        [{"role": "assistant", "content": "Hello there."}],
        [{"role": "assistant", "content": "42 is it."}],
    )

    def ids(messages, **kw):
        return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

    p, pc, pr = ids(prompt, add_generation_prompt=True), ids(prompt + chosen), ids(prompt + rejected)
    n = min(common_prefix_length(p, pc), common_prefix_length(p, pr))
    s = Sample("p.jsonl:1", "preference", prompt, chosen=chosen, rejected=rejected)
    for shared, want in ((True, {"chosen": pc[n:], "rejected": pr[n:]}), (False, {"rejected": pr[len(p) :]})):
        (pair,) = encode_pair_samples([s], tok, None, 512, "truncate", True, shared).examples
        for side, completion in want.items():
            got = [t for t, lab in zip(pair[side]["input_ids"], pair[side]["labels"]) if lab != IGNORE_INDEX]
            assert got == completion, (shared, side)
    assert tok.decode(pr[n : n + 1]) == " "  # the case the test is about
