"""The chunked label log-probs (DPO, KTO, ORPO, SimPO): equal to a whole log_softmax, values and gradients, in fp32
and bf16, across chunk borders; a hand-worked value; masked positions get nothing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deltatune import loss
from deltatune.train.logprobs import token_logprobs


def _whole(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain formula: one fp32 log_softmax over everything, then the label's entry."""
    labels = labels[:, 1:]
    mask = labels != -100
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask


def test_hand_worked_value():
    """Logits [0, ln 3] over two words: p = [1/4, 3/4]. Labels [., 1, 0]: log 3/4 then log 1/4."""
    row = torch.tensor([0.0, math.log(3.0)])
    logits = torch.stack([row, row, row]).unsqueeze(0)  # (1, 3, 2)
    out = token_logprobs(logits, torch.tensor([[-100, 1, 0]]))
    torch.testing.assert_close(out, torch.tensor([[math.log(0.75), math.log(0.25)]]), atol=1e-7, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 3 * 37])  # the default; 3 positions a chunk (rows cut across borders)
def test_equal_to_a_whole_log_softmax(monkeypatch, dtype, chunk):
    if chunk is not None:
        monkeypatch.setitem(loss._CHUNK_ELEMENTS, "cpu", chunk)
    torch.manual_seed(0)
    logits = (torch.randn(3, 8, 37) * 4).to(dtype)
    labels = torch.randint(0, 37, (3, 8))
    labels[0, :3] = -100  # a prompt
    labels[2, 6:] = -100  # padding
    weights = torch.randn(3, 7)  # an upstream gradient that differs per position

    mine = logits.clone().requires_grad_()
    out = token_logprobs(mine, labels)
    (out * weights).sum().backward()
    ref = logits.clone().requires_grad_()
    expected = _whole(ref, labels)
    (expected * weights).sum().backward()

    assert out.dtype == torch.float32 and out.shape == (3, 7)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert mine.grad.dtype == dtype
    atol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the gradient is rounded to the logits' dtype
    torch.testing.assert_close(mine.grad.float(), ref.grad.float(), atol=atol, rtol=0)
    assert (out[0, :2] == 0).all() and (out[2, 5:] == 0).all()
    assert (mine.grad[0, :2] == 0).all() and (mine.grad[2, 5:] == 0).all()  # masked positions get no gradient
    assert (mine.grad[:, -1] == 0).all()  # the last position predicts nothing


def test_without_grad_and_with_one_token():
    """The reference pass (no grad) gives the same values; a one-token sequence has nothing to score."""
    torch.manual_seed(1)
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        out = token_logprobs(logits, labels)
    torch.testing.assert_close(out, _whole(logits, labels), atol=1e-6, rtol=0)
    assert token_logprobs(logits[:, :1], labels[:, :1]).shape == (2, 0)


def test_the_backward_keeps_only_the_logits():
    """What the graph saves for the backward pass: the logits and the targets, no fp32 logits-sized copy (a whole
    log_softmax of bf16 logits would save an fp32 tensor twice their size)."""
    logits = torch.randn(2, 9, 50).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 50, (2, 9))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs(logits, labels)
    big = [t for t in saved if t.numel() >= logits[:, :-1].numel()]
    assert big and all(t.dtype == torch.bfloat16 and t.data_ptr() == logits.data_ptr() for t in big), [
        (t.dtype, tuple(t.shape)) for t in big
    ]
