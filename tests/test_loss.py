"""deltatune.loss: the fused causal-LM cross-entropy equals transformers' loss and gradient, and DeltaModel uses it
only where transformers' default causal-LM loss would run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import VOCAB, tiny_inputs, tiny_model
from tolerances import ATOL
from transformers.loss.loss_utils import ForCausalLMLoss

import deltatune as dt
from deltatune import loss as fused


def _loss_and_grad(fn, logits: torch.Tensor, labels: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.detach().clone().requires_grad_()
    value = fn(leaf, labels, VOCAB, **kwargs)
    value.backward()
    return value.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 37])
def test_equals_transformers_loss_and_gradient(dtype, num_items, monkeypatch):
    monkeypatch.setitem(fused._CHUNK_ELEMENTS, "cpu", 5 * VOCAB)  # several chunks, the last one partial
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 11, VOCAB, generator=g) * 3).to(dtype)
    labels = torch.randint(0, VOCAB, (3, 11), generator=g)
    labels[0, :4] = -100  # prompt positions
    labels[2, -2:] = -100  # padding
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    want, want_grad = _loss_and_grad(ForCausalLMLoss, logits, labels, **kwargs)
    got, got_grad = _loss_and_grad(fused.causal_lm_loss, logits, labels, **kwargs)
    assert got.dtype == want.dtype == torch.float32
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got, want, atol=ATOL[torch.float32], rtol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, atol=ATOL[dtype], rtol=0)
    assert got_grad[0, :3].abs().sum() == 0  # positions whose next label is ignored get no gradient


def test_backward_scales_by_the_outer_gradient_and_does_not_touch_the_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, VOCAB, generator=g, requires_grad=True)
    before = logits.detach().clone()
    labels = torch.randint(0, VOCAB, (2, 6), generator=g)
    (fused.causal_lm_loss(logits, labels, VOCAB) * 2.5).backward()
    ours = logits.grad.clone()
    logits.grad = None
    (ForCausalLMLoss(logits, labels, VOCAB) * 2.5).backward()
    torch.testing.assert_close(ours, logits.grad, atol=ATOL[torch.float32], rtol=0)
    assert torch.equal(logits.detach(), before)


def test_shift_labels_and_no_grad():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, VOCAB, generator=g)
    shift = torch.randint(0, VOCAB, (2, 5), generator=g)
    got = fused.causal_lm_loss(logits, None, VOCAB, shift_labels=shift)
    want = F.cross_entropy(logits.reshape(-1, VOCAB), shift.reshape(-1))
    torch.testing.assert_close(got, want, atol=ATOL[torch.float32], rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_delta_model_installs_it_on_causal_lms_and_removes_it_on_unload(family):
    base = tiny_model(family, "causal_lm")
    inputs = tiny_inputs(family, "causal_lm")
    inputs["labels"] = inputs["input_ids"]
    with torch.no_grad():
        want = base(**inputs).loss
    config = dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = dt.get_delta_model(base, config, fused_loss=True)
    assert base.loss_function is fused.causal_lm_loss
    model.train()
    out = model(**inputs)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    plain = model.unload()
    assert plain is base and "_loss_function" not in vars(base)
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(**inputs).loss, want, atol=ATOL[torch.float32], rtol=0)


def test_delta_model_training_matches_transformers_loss():
    inputs = tiny_inputs("llama", "causal_lm")
    inputs["labels"] = inputs["input_ids"].clone()
    inputs["labels"][:, :2] = -100
    grads = []
    for fused_loss in (True, False):
        model = dt.get_delta_model(
            tiny_model("llama", "causal_lm"),
            dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            fused_loss=fused_loss,
        )
        assert ("_loss_function" in vars(model.base_model)) == fused_loss
        model(**inputs).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=ATOL[torch.float32], rtol=1e-5)


@pytest.mark.parametrize("family, task", [("bert", "seq_cls"), ("t5", "seq2seq"), ("llama", "seq_cls")])
def test_other_tasks_keep_their_loss(family, task):
    base = tiny_model(family, task)
    dt.get_delta_model(base, dt.LoraConfig(r=4, target_modules="all-linear"), fused_loss=True)
    assert "_loss_function" not in vars(base)


def test_the_library_leaves_the_loss_alone_by_default():
    base = tiny_model("llama", "causal_lm")
    dt.get_delta_model(base, dt.LoraConfig(r=4, target_modules=["q_proj"]))
    dt.DeltaModel(tiny_model("llama", "causal_lm"))
    assert "_loss_function" not in vars(base)


def test_a_loss_the_user_set_is_kept():
    base = tiny_model("llama", "causal_lm")

    def mine(logits, labels, vocab_size, **kwargs):
        return logits.sum() * 0

    base.loss_function = mine
    dt.get_delta_model(base, dt.LoraConfig(r=4, target_modules=["q_proj"]), fused_loss=True)
    assert base.loss_function is mine
