"""peft's add_weighted_adapter 'svd' on LoRA over torch's nn.Conv1d and nn.Conv3d (adapted since session 46), and
those convs named among a model's candidate targets. peft's svd path flattens Conv2d deltas only and fails inside
torch on the others; deltatune flattens any conv's kernel, so at full rank the combined adapter is the weighted sum
of its sources' updates (worked out from the sources themselves, not from a run)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.targets import candidate_names

CONVS = {1: nn.Conv1d, 3: nn.Conv3d}


class Net(nn.Module):
    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.conv = CONVS[dim](4, 6, kernel, padding=kernel // 2)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x).flatten(2).mean(-1))


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("dim", [1, 3])
def test_svd_combination_of_conv_adapters_is_their_weighted_sum_at_full_rank(dim, kernel):
    torch.manual_seed(0)
    model = dt.get_delta_model(Net(dim, kernel), dt.LoraConfig(target_modules=["conv"], r=2, init_lora_weights=False))
    model.add_adapter("b", dt.LoraConfig(target_modules=["conv"], r=2, lora_alpha=4, init_lora_weights=False))
    layer = model.get_base_model().conv
    want = 1.0 * layer.delta_weight("default") + 0.5 * layer.delta_weight("b")
    model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", combination_type="svd", svd_rank=4)
    got = layer.delta_weight("mix")
    assert got.shape == want.shape == layer.base_layer.weight.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    x = torch.randn(2, 4, *(5,) * dim)
    with torch.no_grad():
        model.set_adapter("mix")
        mixed = model(x)
        model.set_adapter(["default", "b"])  # both on at once; b's weight 0.5 enters by scaling b's B by a half
        layer.lora_B["b"].weight.mul_(0.5)
        torch.testing.assert_close(mixed, model(x), atol=1e-5, rtol=1e-4)


def test_conv1d_and_conv3d_are_named_among_the_candidate_targets():
    for dim in CONVS:
        assert candidate_names(Net(dim, 3)) == ["conv", "out"]
