"""The real SmolLM2-135M-Instruct (embedded, `model.name_or_path: smollm2`): what holds on real weights.

Short inputs and a single optimiser step keep each test to seconds: adapters trained by deltatune load in peft with
the same logits and back; a LoRA adapter loads through transformers' own load_adapter and pipeline; merged exports
reload in plain transformers; packed batches give the unpacked loss; gradient checkpointing gives the same gradients;
deltatune.Trainer saves adapter-only checkpoints of this tied-embedding model and resumes; the plain Trainer is
refused with a hint. The cached copy is made once (tests/../deltatune/train/embedded.py) and reused.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import deltatune as dt
from deltatune.cli import main
from deltatune.train import chat, embedded
from deltatune.train.models import load_model, resolve_path

peft = pytest.importorskip("peft")

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Real weights through 30 layers: fp32 sums in another order differ by a few 1e-6 of logits that reach ~30.
ATOL_REAL = 5e-5


@pytest.fixture(scope="module")
def path() -> str:
    return resolve_path("smollm2")


@pytest.fixture(scope="module")
def tok(path):
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def _base(path):
    return load_model("smollm2", "CAUSAL_LM").eval()


@pytest.fixture
def base(_base):
    """A fresh copy of the real model for each use (wrapping injects into the model it is given)."""
    return lambda: copy.deepcopy(_base)


@pytest.fixture(scope="module")
def batch(tok):
    texts = ["The capital of France is Paris, and", "A short poem about the sea:"]
    enc = tok(texts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _step(model, batch, lr: float = 1e-2) -> None:
    """One AdamW step on the causal-LM loss: every trainable tensor moves (Adam's first step is ~lr * sign)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch).logits
    n = batch["input_ids"].shape[1]
    return out[:, -n:]  # peft keeps the virtual tokens' positions in a causal LM's logits; deltatune drops them


def test_embedded_model_is_the_real_instruct_model(base, tok):
    model = base()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the original
    assert model.config._name_or_path == HUB_ID
    ids = chat.prompt_ids(tok, "What is the capital of France?")
    assert "Paris" in chat.generate(model, tok, ids, max_new_tokens=12)


METHODS = {
    "lora": (dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "LoraConfig"),
    "dora": (dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True), "LoraConfig"),
    "ia3": (dt.IA3Config(), "IA3Config"),
    "prompt_tuning": (dt.PromptTuningConfig(num_virtual_tokens=4), "PromptTuningConfig"),
    "p_tuning": (dt.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=32), "PromptEncoderConfig"),
    "prefix_tuning": (dt.PrefixTuningConfig(num_virtual_tokens=4), "PrefixTuningConfig"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_trained_adapters_move_both_ways_with_peft(method, base, batch, tmp_path):
    config, _ = METHODS[method]
    config = config.replace(task_type="CAUSAL_LM")
    plain = _logits(base(), batch)
    # deltatune -> peft
    ours = dt.get_delta_model(base(), config)
    _step(ours, batch)
    expected = _logits(ours, batch)
    assert (expected - plain).abs().max() > 1e-2  # the adapter changes the output: the check below can fail
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs, batch), expected, atol=ATOL_REAL, rtol=0)
    # peft -> deltatune
    peft_config = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    peft_config.inference_mode = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = peft.get_peft_model(base(), peft_config)
        _step(trained, batch, lr=5e-3)
        expected = _logits(trained, batch)
    trained.save_pretrained(tmp_path / "peft")
    loaded = dt.DeltaModel.from_pretrained(base(), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=ATOL_REAL, rtol=0)
    assert (expected - plain).abs().max() > 1e-2


def _lora_adapter(base, batch, folder) -> dt.DeltaModel:
    model = dt.get_delta_model(base(), dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _step(model, batch)
    model.save_pretrained(folder)
    return model


def test_lora_loads_through_transformers_load_adapter_and_pipeline(base, tok, batch, tmp_path):
    from transformers import pipeline

    ours = _lora_adapter(base, batch, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    model = base()
    model.load_adapter(str(tmp_path))  # transformers' own PEFT integration
    torch.testing.assert_close(_logits(model, batch), _logits(ours, batch), atol=ATOL_REAL, rtol=0)
    prompt = "The capital of France is"
    ids = tok(prompt)["input_ids"]
    expected = chat.generate(ours, tok, ids, max_new_tokens=8)
    generated = pipeline("text-generation", model=model, tokenizer=tok)(
        prompt, max_new_tokens=8, do_sample=False, return_full_text=False
    )[0]["generated_text"]
    assert generated.strip() == expected


def test_merged_export_reloads_in_plain_transformers(base, batch, tmp_path):
    ours = _lora_adapter(base, batch, tmp_path / "adapter")
    expected = _logits(ours, batch)
    merged = ours.merge_and_unload()
    merged_logits = _logits(merged, batch)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(_logits(reloaded, batch), merged_logits)  # the export is exactly the merged model
    # W + BA rounds differently from x W + (x A) B; over 210 merged layers the logits (|.| up to ~30) move by ~1e-4.
    torch.testing.assert_close(merged_logits, expected, atol=5e-4, rtol=0)
    assert (merged_logits - _logits(base(), batch)).abs().max() > 1e-2


def test_packed_batch_gives_the_unpacked_loss(base, tok):
    """Two SFT examples: one padded batch with an attention mask, each alone with none, and both packed into one
    row (restarting position ids, no mask) give the same mean loss over the same answer tokens."""
    from deltatune.data.tasks import Collator, pack

    model = dt.get_delta_model(base(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    examples = []
    for q, a in [("Who are you?", "I am a helpful assistant."), ("Name a colour.", "Blue, like the sky above.")]:
        prompt = chat.prompt_ids(tok, q)
        answer = tok(a + "<|im_end|>")["input_ids"]
        examples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    collate = Collator(tok.pad_token_id)

    def loss(batch):
        with torch.no_grad():
            out = model(**batch, use_cache=False)  # as in training: a KV cache turns packed-sequence masks off
        logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")

    padded = collate([{**ex, "attention_mask": [1] * len(ex["input_ids"])} for ex in examples])
    alone = sum(loss(collate([ex])) for ex in examples)
    packed_batch = collate(pack(examples, 512))
    assert "attention_mask" not in packed_batch and packed_batch["input_ids"].shape[0] == 1
    n = sum(sum(t != -100 for t in ex["labels"][1:]) for ex in examples)
    torch.testing.assert_close(loss(padded) / n, alone / n, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss(packed_batch) / n, alone / n, atol=1e-5, rtol=0)
    # The check can fail: the same packed row with a full attention mask lets the second example see the first.
    leaky = {**packed_batch, "attention_mask": torch.ones_like(packed_batch["input_ids"])}
    assert (loss(leaky) - alone).abs() / n > 1e-3


def test_packing_check_passes_on_smollm2_and_refuses_what_leaks(base):
    """`data.packing` first probes that packed examples stay apart. On SmolLM2's real logits (up to ~30) the
    probe's rounding is ~1e-3; an absolute 1e-4 bound refused packing on the very model it is for. It still
    refuses what leaks: a KV cache (transformers then drops the packed-sequence masks), a token method's virtual
    tokens (prompt kind: seen by the first example of a pack only; prefix kind: in a cache)."""
    from deltatune.config import ConfigError
    from deltatune.train.run import _check_packing

    def model(config, **base_config):
        m = base()
        m.config.update({"use_cache": False, **base_config})  # as train.run sets it
        return dt.get_delta_model(m, config)

    lora = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    _check_packing(model(lora))
    with pytest.raises(ConfigError, match=r"^data.packing: model type 'llama' does not keep packed examples apart"):
        _check_packing(model(lora, use_cache=True))
    for config in (dt.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
                   dt.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"^data.packing: method {config.method} does not keep packed"):
            _check_packing(model(config))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gradient_checkpointing_gives_the_same_gradients(base, batch, dora):
    """Also for DoRA, whose own backward recomputes its update inside the checkpoint's recomputation."""

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        config = dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, use_dora=dora)
        model = dt.get_delta_model(base(), config)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 30 * 7 * (3 if dora else 2)
    for name, g in plain.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_token_method_generation_matches_a_greedy_loop(base, tok, batch):
    """generate() with virtual tokens (prompt tuning) equals argmax decoding with a full forward per step."""
    model = dt.get_delta_model(base(), dt.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    _step(model, batch)
    ids = torch.tensor([chat.prompt_ids(tok, "Who are you?")])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        loop = ids
        for _ in range(6):
            nxt = model(input_ids=loop).logits[:, -1].argmax(-1, keepdim=True)
            loop = torch.cat([loop, nxt], dim=1)
    assert torch.equal(out, loop)


def _dataset(tok, n: int = 8):
    from datasets import Dataset

    rows = []
    for i in range(n):
        enc = tok(f"Sample number {i}: the quick brown fox jumps.", padding="max_length", max_length=16)
        rows.append({**enc, "labels": enc["input_ids"], "text": "not a model input"})
    return Dataset.from_list(rows)


def _args(out, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-3, report_to=[], save_strategy="steps",
        save_steps=1, logging_steps=1, use_cpu=True, seed=3, data_seed=3, **kw,
    )  # fmt: skip


def test_deltatune_trainer_checkpoints_the_adapter_of_a_tied_model_and_resumes(base, tok, tmp_path):
    data = _dataset(tok)

    def run(out, steps, resume=None):
        model = dt.get_delta_model(base(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        trainer = dt.Trainer(model=model, args=_args(out, max_steps=steps), train_dataset=data, eval_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    full, trainer = run(tmp_path / "a", 2)
    ckpt = tmp_path / "a" / "checkpoint-1"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    assert not any(f.startswith("model") for f in os.listdir(ckpt))  # the adapter only, not the whole model
    assert "eval_loss" in trainer.evaluate()  # the label names come from the base model
    resumed, _ = run(tmp_path / "b", 2, resume=str(ckpt))  # resumes from the first run's step-1 checkpoint
    for (name, a), b in zip(full.adapter_state_dict().items(), resumed.adapter_state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)


def test_plain_trainer_is_refused_with_a_hint(base, tok, tmp_path):
    from transformers import Trainer

    model = dt.get_delta_model(base(), dt.LoraConfig(r=4, target_modules=["q_proj"]))
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=1, remove_unused_columns=False),
                      train_dataset=_dataset(tok, 4).remove_columns("text"))  # fmt: skip
    with pytest.raises(TypeError, match=r"use deltatune\.Trainer"):
        trainer.train()


def test_generate_answers_through_the_chat_template(base, batch, tmp_path, capsys):
    """The issue's first symptom: raw text made the model answer with <|im_end|> at once, printing nothing."""
    dt.get_delta_model(base(), dt.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    args = ["generate", "--adapter", str(tmp_path), "--prompt", "What is the capital of France?"]
    assert main([*args, "--max-new-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out
    assert main([*args, "--max-new-tokens", "12", "--compare"]) == 0
    out = capsys.readouterr().out
    assert out.count("Paris") == 2 and "base" in out and "adapter" in out  # B = 0: both answers are the base's


def test_hub_ids_resolve_to_the_embedded_copies(path):
    assert embedded.hub_id("smollm2") == HUB_ID and resolve_path(HUB_ID) == path
    assert embedded.hub_id("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_path("sentence-transformers/all-MiniLM-L6-v2") == resolve_path("minilm")
    assert embedded.hub_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
