"""LoRA variants against peft 0.21.2 / 0.22.0 (session 58, probe 23).

1. DoRA on an ``nn.Embedding`` with ``max_norm``: the embedding lookup of lora_embedding_A renormalises A's rows in
   place (``F.embedding(..., max_norm)``, as peft's ``_embed``). peft's DoraEmbeddingLayer computes the weight norm
   ||W + s (A^T B^T)|| from A before that lookup; deltatune's LoraEmbedding._add computed it after, from the
   renormalised A, so the first training forward differed (0.35 in the output, 7.8 in A's gradient); now the DoRA
   scale is taken before the lookup.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt

peft = pytest.importorskip("peft")


class _Emb(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.m = nn.Embedding(20, 8, max_norm=1.0)


def test_dora_embedding_with_max_norm_is_peft_s():
    kw = dict(target_modules=["m"], r=4, lora_alpha=3, init_lora_weights=False, use_dora=True)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(_Emb(), peft.LoraConfig(**kw)).base_model.model.m
    torch.manual_seed(0)
    ours = dt.get_delta_model(_Emb(), dt.LoraConfig(**kw)).base_model.m
    x = torch.tensor([[1, 3, 5, 7, 9, 3], [2, 4, 6, 8, 19, 0]])
    want, got = theirs(x), ours(x)
    want.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for key in ("lora_embedding_A", "lora_embedding_B"):
        torch.testing.assert_close(
            getattr(ours, key)["default"].grad, getattr(theirs, key)["default"].grad, rtol=1e-5, atol=1e-5
        )
    # A's rows renormalised in place by the lookup, the same in both
    torch.testing.assert_close(ours.lora_embedding_A["default"], theirs.lora_embedding_A["default"], rtol=0, atol=0)
