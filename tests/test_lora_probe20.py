"""LoRA layers against peft 0.21.2 (session 55, probe 20).

1. peft's public ``layer.get_delta_weight(adapter)`` (the update a merge adds, in the base weight's layout) was missing
   on every deltatune LoRA layer (AttributeError; only deltatune's own ``delta_weight(name, merging=True)``). Now each
   layer kind has it, equal to peft's bit for bit and in the same dtype: Linear, GPT-2 Conv1D, Embedding,
   Conv1d / Conv2d (3x3 and 1x1) / Conv3d, MultiheadAttention; with DoRA; float32, bfloat16 and float16 bases.
"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model
from torch import nn

import deltatune as dt

peft = pytest.importorskip("peft")


class _Kinds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv1d(4, 6, 3), nn.Conv2d(4, 6, 3), nn.Conv3d(4, 6, 3)
        self.c2b, self.emb, self.lin = nn.Conv2d(4, 6, 1), nn.Embedding(20, 8), nn.Linear(8, 5)
        self.mha = nn.MultiheadAttention(8, 2)


def _pair(make, dtype, **kw):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(make().to(dtype), peft.LoraConfig(**kw), autocast_adapter_dtype=False)
    torch.manual_seed(0)
    ours = dt.get_delta_model(make().to(dtype), dt.LoraConfig(**kw))
    return theirs.base_model.model, ours.base_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dora", [False, True])
def test_get_delta_weight_on_every_layer_kind_is_peft_s(dtype, dora):
    names = ["c1", "c2", "c3", "c2b", "emb", "lin"] + ([] if dora else ["mha"])  # (peft: no DoRA on MHA)
    kw = dict(target_modules=names, r=4, lora_alpha=3, init_lora_weights=False, use_dora=dora)
    theirs, ours = _pair(_Kinds, dtype, **kw)
    for name in names:
        want = theirs.get_submodule(name).get_delta_weight("default")
        got = ours.get_submodule(name).get_delta_weight("default")
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_get_delta_weight_on_gpt2_conv1d_is_peft_s(dtype):
    kw = dict(target_modules=["c_attn", "c_fc", "wte"], r=4, lora_alpha=6, init_lora_weights=False, use_rslora=True)
    theirs, ours = _pair(lambda: tiny_model("gpt2"), dtype, **kw)
    for name in ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "transformer.wte"]:
        want = theirs.get_submodule(name).get_delta_weight("default")
        got = ours.get_submodule(name).get_delta_weight("default")
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert got.shape == ours.get_submodule(name).weight.shape  # (the base weight's layout)
