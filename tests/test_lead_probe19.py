"""The lead's tests of session 54 for edits made outside a helper's files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_targets_probe19 import _moe, _names

import deltatune as dt


def test_an_ia3_file_saved_with_a_regex_reaching_fused_experts_loads_as_it_trained(tmp_path):
    """Every method's load reads a file's targets as loading (model.py wraps inject in targets.from_file), not LoRA's
    alone: an IA3 file whose regex also reaches Qwen3-MoE's fused experts (saved before 4d15b84, which adapted the
    rest) loads with the warning, to the logits it was saved with; a new IA3 adapter with that regex is refused."""
    base = _moe("qwen3_moe")
    regex = r".*\.(q_proj|down_proj)"
    config = dt.IA3Config(target_modules=["q_proj"], feedforward_modules=[], init_ia3_weights=False)
    saved = dt.get_delta_model(copy.deepcopy(base), config)
    saved.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": regex}))
    ids = torch.arange(8)[None]
    with torch.no_grad():
        want = saved.eval()(input_ids=ids).logits
    with pytest.warns(UserWarning, match=r"experts\.down_proj, .*loads without the"):
        loaded = dt.DeltaModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    assert _names(loaded) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=0, rtol=0)
    with pytest.raises(dt.ConfigError, match=r"experts\.down_proj, a 3-D parameter"):
        dt.get_delta_model(copy.deepcopy(base), dt.IA3Config(target_modules=regex, feedforward_modules=[]))
