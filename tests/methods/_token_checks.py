"""Checks shared by the token methods' tests (prompt tuning, P-tuning, prefix tuning / P-tuning v2).

Each test file builds its method's configs and calls these with (family, task) cases: forward shapes,
a training step, save/load, generation against a manual greedy loop, left-padded batches, beam search,
and logits and files against PEFT's implementation.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from tiny import VOCAB, tiny_inputs, tiny_model
from tolerances import ATOL

import deltatune as dt

ATOL32 = ATOL[torch.float32]
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS"}

# (family, task): three or more families per task, as each applies.
CASES = [
    ("llama", "causal_lm"), ("qwen2", "causal_lm"), ("gpt2", "causal_lm"),
    ("t5", "seq2seq"), ("bart", "seq2seq"),
    ("bert", "seq_cls"), ("roberta", "seq_cls"), ("llama", "seq_cls"), ("gpt2", "seq_cls"),
    ("bert", "token_cls"), ("roberta", "token_cls"), ("llama", "token_cls"), ("gpt2", "token_cls"),
]  # fmt: skip
GENERATIVE = [c for c in CASES if c[1] in ("causal_lm", "seq2seq")]
N = 3  # virtual tokens in these tests


def ids(cases: list[tuple[str, str]]) -> list[str]:
    return [f"{f}-{t}" for f, t in cases]


@functools.cache
def _base(family: str, task: str) -> torch.nn.Module:
    model = tiny_model(family, task)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as the manual loops do
        model.generation_config.pad_token_id = 0
    return model


def fresh(family: str, task: str) -> torch.nn.Module:
    return copy.deepcopy(_base(family, task))


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Make every trainable tensor random, so the adapter and the task head both matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def adapted(family: str, task: str, config: dt.DeltaConfig, seed: int = 0) -> dt.DeltaModel:
    torch.manual_seed(seed)
    model = dt.get_delta_model(fresh(family, task), config.replace(task_type=TASK_TYPES[task]))
    perturb(model, seed + 1)
    return model.eval()


def labels_for(task: str, inputs: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    batch, length = inputs["input_ids"].shape
    if task == "causal_lm":
        return inputs["input_ids"].clone()
    if task == "seq2seq":
        return torch.randint(3, VOCAB, (batch, 5), generator=g)
    if task == "seq_cls":
        return torch.randint(0, 3, (batch,), generator=g)
    return torch.randint(0, 3, (batch, length), generator=g)


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# -- checks ------------------------------------------------------------------------------------------------------------
def check_forward(family: str, task: str, config: dt.DeltaConfig) -> None:
    """Same output shape as the base (one row per real token), different values; disabled = base exactly."""
    inputs = tiny_inputs(family, task)
    model = adapted(family, task, config)
    base_out = logits(_base(family, task), inputs)
    out = logits(model, inputs)
    assert out.shape == base_out.shape
    assert not torch.allclose(out, base_out, atol=1e-3), "the adapter should change the outputs"
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), base_out, atol=0, rtol=0)
    if task == "token_cls":
        loss = model(**inputs, labels=labels_for(task, inputs)).loss
        assert torch.isfinite(loss)


def check_train_step(family: str, task: str, config: dt.DeltaConfig) -> None:
    """One SGD step changes the adapter (and the task head copy) and no base weight."""
    inputs = tiny_inputs(family, task)
    model = adapted(family, task, config)
    model.train()
    before = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    trainable = {n for n, p in model.base_model.named_parameters() if p.requires_grad}
    assert trainable and all("virtual_tokens." in n or "modules_to_save." in n for n in trainable), trainable
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(**inputs, labels=labels_for(task, inputs)).loss
    loss.backward()
    opt.step()
    after = dict(model.base_model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= trainable
    assert any("virtual_tokens." in n for n in changed), "the virtual tokens did not train"


def check_save_load(family: str, task: str, config: dt.DeltaConfig, tmp_path) -> None:
    """save_pretrained then from_pretrained on a fresh base gives the same outputs."""
    inputs = tiny_inputs(family, task)
    model = adapted(family, task, config)
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(fresh(family, task), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=ATOL32, rtol=0)


def _greedy_causal(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        nxt = logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


def _greedy_seq2seq(model, inputs: dict, steps: int) -> torch.Tensor:
    start = model.config.decoder_start_token_id
    dec = torch.full((inputs["input_ids"].shape[0], 1), start, dtype=torch.long)
    for _ in range(steps):
        nxt = logits(model, {**inputs, "decoder_input_ids": dec})[:, -1].argmax(-1)
        dec = torch.cat([dec, nxt[:, None]], dim=1)
    return dec


def check_generate(family: str, task: str, config: dt.DeltaConfig) -> None:
    """Greedy generate (with the KV cache) equals a manual greedy loop of full forwards; the adapter matters."""
    steps = 4
    inputs = tiny_inputs(family, task)
    inputs.pop("decoder_input_ids", None)
    model = adapted(family, task, config)
    kwargs = dict(max_new_tokens=steps, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
        with model.disable_adapter():
            base = model.generate(**inputs, **kwargs)
    if task == "causal_lm":
        manual = _greedy_causal(model, inputs["input_ids"], steps)
    else:
        manual = _greedy_seq2seq(model, inputs, steps)
    assert torch.equal(out.sequences, manual)
    assert not torch.allclose(out.scores[0], base.scores[0], atol=1e-3), "the adapter should change the scores"


def check_left_padding(family: str, task: str, config: dt.DeltaConfig) -> None:
    """A left-padded batch generates, row by row, what each row generates alone."""
    steps = 4
    g = torch.Generator().manual_seed(3)
    long, short = torch.randint(3, VOCAB, (7,), generator=g), torch.randint(3, VOCAB, (4,), generator=g)
    pad = torch.zeros(3, dtype=torch.long)
    batch = {
        "input_ids": torch.stack([long, torch.cat([pad, short])]),
        "attention_mask": torch.stack(
            [torch.ones(7, dtype=torch.long), torch.cat([pad, torch.ones(4, dtype=torch.long)])]
        ),
    }
    model = adapted(family, task, config)
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=steps, do_sample=False)
        rows = [model.generate(input_ids=x[None], attention_mask=torch.ones_like(x[None]), max_new_tokens=steps,
                               do_sample=False) for x in (long, short)]  # fmt: skip
    for i, row in enumerate(rows):
        assert torch.equal(together[i, -steps:], row[0, -steps:]), f"row {i} differs when batched with padding"


def check_beam_search(family: str, task: str, config: dt.DeltaConfig) -> None:
    inputs = tiny_inputs(family, task)
    inputs.pop("decoder_input_ids", None)
    model = adapted(family, task, config)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)
    assert out.shape[0] == inputs["input_ids"].shape[0]
    assert out.shape[1] == (inputs["input_ids"].shape[1] if task == "causal_lm" else 1) + 4


def _peft_cache_shim(peft_model) -> None:
    """Let peft 0.21 run its own prefix-tuning path for classification on transformers >= 5.24.

    peft's ``_prefix_tuning_forward`` for SEQ_CLS / TOKEN_CLS looks for ``past_key_values`` in the signature of the
    model's forward and refuses a model without it; transformers 5.24 renamed that argument ``cache`` (still
    taking the old name, deprecated). The shim gives the wrapped model a forward whose signature names
    ``past_key_values`` and passes it on as ``cache``, so the reference computed is peft's own, unchanged.
    """
    import inspect

    try:  # peft 0.22 passes the cache under transformers' current name itself: nothing to shim
        from peft.import_utils import get_transformers_cache_name
    except ImportError:
        get_transformers_cache_name = None
    if get_transformers_cache_name is not None and get_transformers_cache_name() == "cache":
        return

    def takes(module, name: str) -> bool:
        return name in inspect.signature(module.forward).parameters

    module = peft_model.base_model  # the model with its head; an encoder's head takes no cache: then its backbone
    if not takes(module, "cache") and getattr(peft_model, "transformer_backbone_name", None):
        module = module.get_submodule(peft_model.transformer_backbone_name)
    if takes(module, "past_key_values") or not takes(module, "cache"):
        return
    forward = module.forward

    def shim(*args, past_key_values=None, **kwargs):
        return forward(*args, cache=past_key_values, **kwargs)

    module.forward = shim


def _peft_logits(peft_model, inputs: dict, task: str) -> torch.Tensor:
    if task in ("seq_cls", "token_cls"):
        _peft_cache_shim(peft_model)
    out = logits(peft_model, inputs)
    ref_len = inputs["input_ids"].shape[1]
    if task in ("causal_lm", "token_cls") and out.shape[1] != ref_len:
        out = out[:, -ref_len:]  # PEFT keeps the virtual positions in per-token outputs; deltatune drops them
    return out


def check_peft_equivalence(family: str, task: str, config: dt.DeltaConfig, tmp_path) -> None:
    """Same weights, same logits as peft (1e-5), with adapter files moved both ways."""
    peft = pytest.importorskip("peft")
    inputs = tiny_inputs(family, task)
    # deltatune -> peft
    ours = adapted(family, task, config)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(fresh(family, task), tmp_path / "ours").eval()
    torch.testing.assert_close(_peft_logits(theirs, inputs, task), logits(ours, inputs), atol=ATOL32, rtol=0)
    if task == "causal_lm":  # the same loss: the first real token is predicted from the last virtual one
        labels = labels_for(task, inputs)
        with torch.no_grad():
            a, b = ours(**inputs, labels=labels).loss, theirs(**inputs, labels=labels).loss
        torch.testing.assert_close(a, b, atol=ATOL32, rtol=0)
    # peft -> deltatune
    peft_config = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    peft_config.inference_mode = False
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = peft.get_peft_model(fresh(family, task), peft_config)
    perturb(trained, seed=9)
    trained.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained.eval()
        expected = _peft_logits(trained, inputs, task)
    loaded = dt.DeltaModel.from_pretrained(fresh(family, task), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=ATOL32, rtol=0)
    assert not torch.allclose(expected, logits(_base(family, task), inputs), atol=1e-3)


def unchanged(model: torch.nn.Module, reference: torch.nn.Module, family: str, task: str) -> None:
    """The model holds no token layer and no hooks, and computes as ``reference``."""
    assert not hasattr(model, "virtual_tokens") or "virtual_tokens" not in model._modules
    assert not model._forward_pre_hooks and not model._forward_hooks
    inputs = tiny_inputs(family, task)
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), atol=0, rtol=0)
