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


def test_a_resume_whose_recipe_now_names_a_regex_reaching_fused_experts_is_refused_as_a_new_run(tmp_path):
    """start_model reads a checkpoint's targets as a file's only where the recipe still names what it saved: a new
    run's checkpoint saved the list [q_proj]; resumed with --resume-changed and a regex that reaches Qwen3-MoE's fused
    experts, it is refused as a fresh run with that regex is (it warned that the file loads without the experts, as
    it was saved; review of 7f9f703)."""
    from test_targets_probe import _moe as moe
    from tiny import tokenizer

    from deltatune.train.config import build
    from deltatune.train.run import start_model

    tok = tokenizer()
    base = moe("qwen3_moe", pad_token_id=tok.pad_token_id)
    base.resize_token_embeddings(len(tok))
    base.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    saved = dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    saved.save_pretrained(tmp_path / "checkpoint-2")

    def recipe(targets):
        method = {"name": "lora", "r": 2, "target_modules": targets}
        model = {"name_or_path": str(tmp_path / "moe"), "dtype": "float32"}
        return build({"stage": "sft", "model": model, "method": method, "data": {"train": str(tmp_path / "r.jsonl")}})

    with pytest.raises(dt.ConfigError, match=r"experts\.down_proj, a 3-D parameter"):
        start_model(recipe(r".*\.(q_proj|down_proj)"), tok, None, str(tmp_path / "checkpoint-2"))
    delta, _ = start_model(recipe(["q_proj"]), tok, None, str(tmp_path / "checkpoint-2"))  # as saved: builds
    assert _names(delta) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
