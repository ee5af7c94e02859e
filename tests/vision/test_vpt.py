"""Visual prompt tuning against the paper's equations worked out by hand on a tiny ViT, and its refusals."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_inputs, tiny_model
from tolerances import ATOL

import deltatune as dt
from deltatune.config import ConfigError

ATOL32 = ATOL[torch.float32]


def _by_hand(base, prompts: torch.Tensor, pixel_values: torch.Tensor, deep: bool) -> torch.Tensor:
    """z0 = [cls ; P_0 ; E(patches) + pos]; deep: before block i >= 1 the prompt outputs are replaced by P_i;
    logits = classifier(LayerNorm(z_L)[:, 0])."""
    vit = base.vit
    emb = vit.embeddings(pixel_values)  # (batch, 1 + patches, d)
    b, n = emb.shape[0], prompts.shape[1]
    z = torch.cat([emb[:, :1], prompts[0].expand(b, -1, -1), emb[:, 1:]], dim=1)
    for i, block in enumerate(vit.layers):
        if deep and i > 0:
            z = torch.cat([z[:, :1], prompts[i].expand(b, -1, -1), z[:, 1 + n :]], dim=1)
        z = block(z)
    return base.classifier(vit.layernorm(z)[:, 0])


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_vpt_equals_the_equations(deep):
    inputs = tiny_inputs("vit")
    model = dt.get_delta_model(tiny_model("vit"), dt.VisualPromptConfig(num_virtual_tokens=3, deep=deep)).eval()
    prompts = model.base_model.visual_prompts.prompt_embeddings["default"]
    assert prompts.shape == (2 if deep else 1, 3, 32)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        expected = _by_hand(tiny_model("vit"), prompts, inputs["pixel_values"], deep)
        base = tiny_model("vit")(**inputs).logits
    torch.testing.assert_close(out.logits, expected, atol=ATOL32, rtol=0)
    assert (out.logits - base).abs().max() > ATOL32
    # per-token outputs keep the base model's shape: the prompt positions are dropped again
    assert all(h.shape == (2, 17, 32) for h in out.hidden_states)


def test_deep_prompts_differ_per_block():
    """Deep VPT with block 1's prompts zeroed differs from deep VPT as initialised: block 1 reads its own set."""
    inputs = tiny_inputs("vit")
    model = dt.get_delta_model(tiny_model("vit"), dt.VisualPromptConfig(num_virtual_tokens=2, deep=True)).eval()
    with torch.no_grad():
        before = model(**inputs).logits
        model.base_model.visual_prompts.prompt_embeddings["default"][1].zero_()
        after = model(**inputs).logits
    assert (after - before).abs().max() > ATOL32


def test_vpt_refusals():
    with pytest.raises(
        ConfigError, match=r"vpt: visual prompt tuning works on ViT-style models .* got model type 'bert'"
    ):
        dt.get_delta_model(tiny_model("bert"), dt.VisualPromptConfig())
    with pytest.raises(ConfigError, match="num_virtual_tokens must be an integer >= 1, got 0"):
        dt.VisualPromptConfig(num_virtual_tokens=0)
    with pytest.raises(
        ConfigError, match="^vpt: visual prompt tuning adds tokens and adapts no module; leave target_modules unset$"
    ):
        dt.VisualPromptConfig(target_modules=["q_proj"])
    model = dt.get_delta_model(tiny_model("vit"), dt.VisualPromptConfig(num_virtual_tokens=2))
    model.add_adapter("other", dt.VisualPromptConfig(num_virtual_tokens=2))
    model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="only one visual prompt adapter can be active at a time"):
        model(**tiny_inputs("vit"))


def test_deit_prompts_go_after_class_and_distillation_tokens():
    """DeiT has two leading tokens: z0 = [cls ; dist ; P_0 ; patches], and P_i replaces positions 2..2+n."""
    from transformers import DeiTConfig, DeiTForImageClassification

    config = DeiTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16, patch_size=4,
        encoder_stride=4, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    base = DeiTForImageClassification(config).eval()
    x = tiny_inputs("vit")["pixel_values"]
    model = dt.get_delta_model(base, dt.VisualPromptConfig(num_virtual_tokens=3, deep=True)).eval()
    prompts = model.base_model.visual_prompts.prompt_embeddings["default"]
    with torch.no_grad():
        out = model(pixel_values=x).logits
        with model.disable_adapter():
            deit = base.deit
            emb = deit.embeddings(x)
            z = torch.cat([emb[:, :2], prompts[0].expand(2, -1, -1), emb[:, 2:]], dim=1)
            for i, block in enumerate(deit.layers):
                if i > 0:
                    z = torch.cat([z[:, :2], prompts[i].expand(2, -1, -1), z[:, 5:]], dim=1)
                z = block(z)
            expected = base.classifier(deit.layernorm(z)[:, 0])
            assert (expected - base(pixel_values=x).logits).abs().max() > ATOL32
    torch.testing.assert_close(out, expected, atol=ATOL32, rtol=0)
