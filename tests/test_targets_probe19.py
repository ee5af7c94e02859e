"""method.towers against peft 0.21.2 and LLaMA-Factory: target_modules "all-linear" inside the named towers, and
layers_to_transform / layers_pattern on the modules the towers resolve."""

from __future__ import annotations

import copy
import os
import sys

import pytest
from torch import nn

import deltatune as dt
from deltatune import towers as T
from deltatune.layer import DeltaLayer, ModulesToSave

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vision"))
from tiny_vlm import tiny_vlm  # noqa: E402

peft = pytest.importorskip("peft")


def _peft_names(model: nn.Module, config) -> list[str]:
    """The modules peft adapts for ``config``, named as in the base model."""
    adapted = peft.get_peft_model(copy.deepcopy(model), config)
    return sorted(n.removeprefix("base_model.model.") for n, m in adapted.named_modules()
                  if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer))  # fmt: skip


def _ours(model: nn.Module, config) -> list[str]:
    adapted = dt.get_delta_model(copy.deepcopy(model), config)
    return sorted(n.removeprefix("base_model.") for n, m in adapted.named_modules()
                  if isinstance(m, DeltaLayer) and not isinstance(m, ModulesToSave))  # fmt: skip


@pytest.mark.parametrize(
    ("towers", "kept"),
    [
        (["language"], ("model.language_model.",)),
        (["language", "projector"], ("model.language_model.", "model.multi")),
    ],
)
def test_all_linear_in_towers_is_every_linear_layer_of_those_towers(towers, kept):
    """LLaMA-Factory's lora_target: all on a VLM takes every linear layer but lm_head outside its frozen vision tower
    and projector; deltatune refused target_modules: all-linear with method.towers (the default [language]) because
    all-linear also reaches the vision tower."""
    model = tiny_vlm("llava")
    theirs = [n for n in _peft_names(model, peft.LoraConfig(r=2, target_modules="all-linear")) if n.startswith(kept)]
    config = T.restrict(model, dt.LoraConfig(r=2, target_modules="ALL-LINEAR"), towers)
    assert sorted(config.target_modules) == theirs and len(theirs) == 14 + 2 * (len(towers) - 1)
    assert _ours(model, config) == theirs  # (lm_head, the output head, is left out as peft's all-linear leaves it)


def test_ia3_all_linear_in_the_language_tower_scales_its_families_feed_forward_layers():
    """IA3 all-linear on LLaMA in peft: feedforward_modules from its table (down_proj); inside LLaVA's language tower
    the same, as the tower's defaults already were."""
    model = tiny_vlm("llava")
    config = T.restrict(model, dt.IA3Config(target_modules="all-linear"), ["language"])
    assert config.feedforward_modules == [f"model.language_model.layers.{i}.mlp.down_proj" for i in range(2)]
    alone = peft.get_peft_model(copy.deepcopy(model.model.language_model), peft.IA3Config(target_modules="all-linear"))
    assert sorted(alone.peft_config["default"].feedforward_modules) == ["down_proj"]


@pytest.mark.parametrize(
    "kw",
    [
        dict(layers_to_transform=[0]),
        dict(layers_to_transform=1, layers_pattern="layers"),
        dict(target_modules="all-linear", layers_to_transform=[1]),
        dict(target_modules=r".*language_model.*\.(q|v)_proj", layers_to_transform=[0]),
    ],
)
def test_layers_to_transform_keeps_the_towers_named_blocks(kw):
    """layers_to_transform with towers was dropped: the towers' full module names match whatever it says, so LLaVA's
    language tower got LoRA in every block. peft, given the same leaves and layers, adapts the named blocks."""
    model = tiny_vlm("llava")
    ask = {**kw, "target_modules": ["q_proj", "v_proj"]}  # (LLaMA's defaults, the language tower's)
    if kw.get("target_modules") == "all-linear":  # (peft refuses layers_to_transform with a str: its names, listed)
        every = _peft_names(model, peft.LoraConfig(r=2, target_modules="all-linear"))
        ask["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n in every if "language_model" in n})
    theirs = [n for n in _peft_names(model, peft.LoraConfig(r=2, **ask)) if n.startswith("model.language_model.")]
    config = T.restrict(model, dt.LoraConfig(r=2, **kw), ["language"])
    assert sorted(config.target_modules) == theirs and _ours(model, config) == theirs
    layer = kw["layers_to_transform"]
    assert theirs and all(f".layers.{layer if isinstance(layer, int) else layer[0]}." in n for n in theirs)


def test_layers_to_transform_that_keeps_nothing_in_the_towers_is_one_line_naming_it():
    model = tiny_vlm("llava")
    with pytest.raises(dt.ConfigError, match=r"no module to adapt in these towers with layers_to_transform=\[7\]"):
        T.restrict(model, dt.LoraConfig(r=2, layers_to_transform=[7]), ["language"])


def _moe(kind: str) -> nn.Module:
    from test_targets_probe import _moe as moe

    return moe(kind, **({"shared_expert_intermediate_size": 24} if kind == "qwen2_moe" else {}))


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_a_regex_reaching_fused_experts_beside_other_modules_is_refused_as_a_list_is(kind):
    """target_modules=r".*\\.(q_proj|down_proj)" on Qwen3-MoE: peft adapts q_proj and the experts (its v4-to-v5
    conversion); deltatune adapted q_proj alone, silently (the list ["q_proj", "down_proj"] was refused). Now one
    line names the experts' parameter, and the model is left as it was."""
    import torch

    base = _moe(kind)
    before = {n: p.clone() for n, p in base.named_parameters()}
    if kind == "qwen3_moe":  # (peft's Mixtral table knows the experts as w1 / w2 / w3 only: there it drops them too)
        theirs = _peft_names(base, peft.LoraConfig(r=2, target_modules=r".*\.(q_proj|down_proj)"))
        assert "model.layers.0.mlp.experts" in theirs
    with pytest.raises(dt.ConfigError, match=r"reaches model\.layers\.0\.mlp\.experts\.down_proj, a 3-D parameter"):
        dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=r".*\.(q_proj|down_proj)"))
    assert [n for n, _ in base.named_parameters()] == list(before)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


def test_a_regex_reaching_a_shared_expert_beside_the_fused_experts_adapts_it_as_peft():
    """Qwen2-MoE's shared expert has a linear down_proj: the regex adapts it, as the list does and as peft does."""
    base = _moe("qwen2_moe")
    config = dict(r=2, target_modules=r".*\.(q_proj|down_proj)")
    theirs = _peft_names(base, peft.LoraConfig(**config))
    if tuple(int(v) for v in peft.__version__.split(".")[:2]) >= (0, 22):
        # peft 0.22 (#3945) adapts the routed experts' fused down_proj too (target_parameters), which deltatune cannot
        assert [n for n in theirs if n.endswith("mlp.experts")] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
        theirs = [n for n in theirs if not n.endswith("mlp.experts")]
    assert _ours(base, dt.LoraConfig(**config)) == theirs
    assert theirs == [f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.shared_expert.down_proj",
                                                                          "self_attn.q_proj")]  # fmt: skip


def test_mixtrals_transformers_4_expert_names_say_why_they_match_nothing():
    """["w1", "w3", "w2"] (Mixtral's experts in transformers 4): peft maps them onto the fused experts and adapts
    them; deltatune said only "matches no module", listing names without any expert. The line now says the experts
    are fused 3-D parameters it cannot adapt, naming one, and the model is left as it was."""
    base = _moe("mixtral")
    theirs = _peft_names(base, peft.LoraConfig(r=2, target_modules=["w1", "w3", "w2"]))
    assert "model.layers.0.mlp.experts" in theirs
    with pytest.raises(dt.ConfigError) as err:
        dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=["w1", "w3", "w2"]))
    assert str(err.value).startswith("lora: target_modules=['w1', 'w3', 'w2'] matches no module.")
    assert str(err.value).endswith(
        "; its mixture of experts' experts are fused 3-D parameters (model.layers.0.mlp.experts.gate_up_proj, ...), "
        "which deltatune cannot adapt"
    )
    assert not any(isinstance(m, DeltaLayer) for m in base.modules())


def test_a_towers_adapter_narrowed_by_layers_loads_in_peft_to_the_same_logits(tmp_path):
    """The saved adapter_config.json holds the resolved names and layers_to_transform: peft loads it (a full name
    matches whatever layers_to_transform says) to the same modules and logits."""
    import torch
    from tiny_vlm import vlm_inputs

    model = tiny_vlm("llava")
    config = T.restrict(model, dt.LoraConfig(r=2, init_lora_weights=False, target_modules="all-linear",
                                             layers_to_transform=[1]), ["language"])  # fmt: skip
    ours = dt.get_delta_model(model, config).eval()
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny_vlm("llava"), tmp_path / "adapter").eval()
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                     if isinstance(m, peft.tuners.lora.LoraLayer))  # fmt: skip
    assert adapted == sorted(config.target_modules) and len(adapted) == 7
    assert all(n.startswith("model.language_model.layers.1.") for n in adapted)
    inputs = vlm_inputs("llava")
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("targets", ["all", "ALL", ["all"], ["ALL"], ["All"]])
def test_llama_factorys_all_says_all_linear(targets):
    """LLaMA-Factory's lora_target: all is every linear layer but the head; as target_modules (peft: a regex matching
    nothing) the line now says all-linear is that, and nothing is adapted."""
    from tiny import tiny_model

    base = tiny_model("llama")
    with pytest.raises(ValueError, match="not found"):
        peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=targets))
    with pytest.raises(dt.ConfigError) as err:
        dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=targets))
    assert str(err.value).startswith(f"lora: target_modules={targets!r} matches no module.")
    assert str(err.value).endswith(
        "; 'all-linear' takes every linear layer but the output head (LLaMA-Factory's lora_target: all)"
    )
    assert not any(isinstance(m, DeltaLayer) for m in base.modules())


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_all_linear_on_a_mixture_of_experts_names_the_routers_it_leaves_out(kind):
    """peft's all-linear on Mixtral / Qwen3-MoE adapts the routers (``mlp.gate``, a TopKRouter holding a 2-D weight)
    beside the experts; deltatune's warning named the experts only, so the routers were left out without a word."""
    theirs = _peft_names(_moe(kind), peft.LoraConfig(r=2, target_modules="all-linear"))
    assert "model.layers.0.mlp.gate" in theirs
    with pytest.warns(UserWarning) as said:
        ours = _ours(_moe(kind), dt.LoraConfig(r=2, target_modules="all-linear"))
    assert "model.layers.0.mlp.gate" not in ours
    assert [str(w.message) for w in said if "leaves out" in str(w.message)] == [
        "lora: target_modules='all-linear' leaves out model.layers.0.mlp.experts.gate_up_proj and the other fused "
        "experts (3-D parameters deltatune cannot adapt) and the routers (model.layers.0.mlp.gate, ...: not linear "
        "layers); it adapts the linear layers"
    ]


def _names(model: nn.Module) -> list[str]:
    return sorted(n.removeprefix("base_model.") for n, m in model.named_modules()
                  if isinstance(m, DeltaLayer) and not isinstance(m, ModulesToSave))  # fmt: skip


def test_a_towers_run_begun_before_layers_to_transform_counted_resumes_and_compares_as_it_trained(
    tmp_path, monkeypatch
):
    """A run begun before 1bc40a6 with method.towers and layers_to_transform: [1] adapted both blocks of LLaVA's
    language tower (layers_to_transform was dropped) and its checkpoint holds them. --resume now builds block 1 only
    and refused the checkpoint ("does not belong to any module"); eval --compare started a different model. Both now
    build the adapter on the names the checkpoint's adapter_config.json saved. (The old layout made here: the same
    run with both blocks' full names, which layers_to_transform does not narrow, and the recipe then set back.)"""
    import json

    import numpy as np
    import torch
    import yaml
    from PIL import Image
    from safetensors.torch import load_file
    from tiny_vlm import save_vlm

    from deltatune.cli import main
    from deltatune.train import evaluation
    from deltatune.train import trainer as trainer_module

    save_vlm(tmp_path / "llava", "llava")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "text": f"a handwritten {i} thin strokes"}) + "\n")
    (tmp_path / "captions.jsonl").write_text("".join(rows))
    out = tmp_path / "run"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["train", os.path.join(root, "recipes", "llava-caption-lora.yaml"), f"model.name_or_path={tmp_path / 'llava'}",
            f"data.train={tmp_path / 'captions.jsonl'}", f"data.eval={tmp_path / 'captions.jsonl'}",
            f"output.dir={out}", "model.dtype=float32", "train.report_to=[none]", "train.batch_size=2",
            "train.logging_steps=1", "train.eval_steps=1000", "train.max_steps=4", "train.save_steps=2",
            "method.layers_to_transform=[1]"]  # fmt: skip
    both = [f"model.language_model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    step = trainer_module.DeltaTrainer.training_step

    def interrupted(self, *a, **k):
        if self.state.global_step >= 2:
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(trainer_module.DeltaTrainer, "training_step", interrupted)
    assert main([*args, f"method.target_modules=[{','.join(both)}]"]) != 0
    monkeypatch.undo()
    recipe = yaml.safe_load((out / "run.yaml").read_text())
    del recipe["method"]["target_modules"]  # the old run's recipe: the towers' defaults, layers_to_transform [1]
    (out / "run.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    saved = json.loads((out / "checkpoint-2" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == both and saved["layers_to_transform"] == [1]
    start = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert len(start) == 8  # (lora_A and lora_B of both blocks' q_proj and v_proj)

    assert main([*args, "--resume"]) == 0
    final = json.loads((out / "adapter_config.json").read_text())
    assert sorted(final["target_modules"]) == both
    trained = load_file(out / "adapter_model.safetensors")
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in trained if ".layers.0." in k and "lora_B" in k)

    started = []
    real = evaluation.start_model
    monkeypatch.setattr(evaluation, "start_model", lambda *a: started.append(_names(real(*a)[0])) or real(*a))
    assert main(["eval", "--adapter", str(out), "--compare"]) == 0
    assert started == [both]


def test_an_old_regex_towers_adapter_is_started_on_its_saved_names_not_a_changed_recipe(tmp_path):
    """A regex with towers and layers_to_transform: [1] resolves block 1 now; such a run begun before 1bc40a6 saved
    both blocks' names, and ``as_trained`` (start_model's, with the checkpoint) gives them back. Saved names that are
    not a superset (target_modules changed with --resume-changed), or no layers_to_transform, change nothing: the
    checkpoint's load then names what is missing, as for a run without towers (review of 7444aa8)."""
    import json

    model = tiny_vlm("llava")
    regex = r".*language_model.*\.(q|v)_proj"
    config = T.restrict(model, dt.LoraConfig(r=2, target_modules=regex, layers_to_transform=[1]), ["language"])
    old = T.restrict(model, dt.LoraConfig(r=2, target_modules=regex), ["language"])
    assert len(config.target_modules) == 2 and len(old.target_modules) == 4
    (tmp_path / "adapter_config.json").write_text(json.dumps({**old.to_dict(), "layers_to_transform": [1]}))
    kept = T.as_trained(config, T.saved_config(str(tmp_path)))
    assert kept.target_modules == old.target_modules and kept.layers_to_transform == [1]
    assert _names(dt.get_delta_model(copy.deepcopy(model), kept)) == sorted(old.target_modules)
    q_only = T.restrict(model, dt.LoraConfig(r=2, target_modules=r".*language_model.*\.q_proj"), ["language"])
    changed = {**q_only.to_dict(), "layers_to_transform": [1]}  # saved: q_proj of both blocks; asked now: q and v
    assert T.as_trained(config, changed) is config
    assert T.as_trained(old, old.to_dict() | {"target_modules": old.target_modules[:2]}) is old  # no layers kept
    assert T.saved_config(str(tmp_path / "nothing")) is None and T.as_trained(config, None) is config


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_an_adapter_saved_with_a_regex_reaching_fused_experts_still_loads_as_it_trained(tmp_path, method):
    """Before 4d15b84 r".*\\.(q_proj|down_proj)" on Qwen3-MoE adapted q_proj alone and saved the regex; loading such a
    file was refused since (ConfigError). It loads again, to the logits it was saved with, saying the experts stay
    out; a new adapter with that regex is still refused. (The old file: q_proj's adapter, its config's regex.) Every
    method's load reads a file's targets so (model.py wraps inject in targets.from_file), not LoRA's alone."""
    import json

    import torch

    base = _moe("qwen3_moe")
    regex = r".*\.(q_proj|down_proj)"
    make = {
        "lora": lambda targets: dt.LoraConfig(r=2, target_modules=targets, init_lora_weights=False),
        "ia3": lambda targets: dt.IA3Config(target_modules=targets, feedforward_modules=[], init_ia3_weights=False),
    }[method]
    saved = dt.get_delta_model(copy.deepcopy(base), make(["q_proj"]))
    saved.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": regex}))
    ids = torch.arange(8)[None]
    with torch.no_grad():
        want = saved.eval()(input_ids=ids).logits
    with pytest.warns(UserWarning, match=r"reaches model\.layers\.0\.mlp\.experts\.down_proj, .*loads without the"):
        loaded = dt.DeltaModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    assert _names(loaded) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=0, rtol=0)
    with pytest.raises(dt.ConfigError, match=r"reaches model\.layers\.0\.mlp\.experts\.down_proj, a 3-D parameter"):
        dt.get_delta_model(copy.deepcopy(base), make(regex))


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_a_typo_on_a_mixture_of_experts_is_not_said_to_be_the_fused_experts(kind):
    """["q_prj"] (a typo) on a MoE: peft says the target was not found; deltatune's line added that the experts are
    fused 3-D parameters, as if the typo named them. It now says so only for an expert's name (w2, up_proj, a name
    under experts), and the line still names the model's modules."""
    from tiny import tiny_model

    with pytest.raises(ValueError, match="not found"):
        peft.get_peft_model(_moe(kind), peft.LoraConfig(r=2, target_modules=["q_prj"]))
    for targets, expert in ((["q_prj"], False), (["w2"], True), (["up_proj"], True), (["mlp.experts.x"], True)):
        with pytest.raises(dt.ConfigError) as err:
            dt.get_delta_model(_moe(kind), dt.LoraConfig(r=2, target_modules=targets))
        said = str(err.value)
        assert said.startswith(f"lora: target_modules={targets!r} matches no module. Module names in this model:")
        assert ("experts are fused 3-D parameters" in said) is expert, (targets, said)
    with pytest.raises(dt.ConfigError) as err:  # (a dense model: never)
        dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["w2"]))
    assert "experts" not in str(err.value)


def _moe_vlm() -> nn.Module:
    """A tiny LLaVA whose language model is a Mixtral (fused experts, routers); the vision tower CLIP's."""
    import torch
    from tiny_vlm import _CLIP, _LLAMA
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MixtralConfig

    torch.manual_seed(0)
    text = MixtralConfig(**_LLAMA, vocab_size=128, num_local_experts=2, num_experts_per_tok=1)
    return LlavaForConditionalGeneration(
        LlavaConfig(vision_config=CLIPVisionConfig(**_CLIP), text_config=text, image_token_id=127)
    )


def test_all_linear_in_the_vision_tower_of_a_mixture_of_experts_vlm_warns_of_no_experts():
    """all-linear with towers=[vision] on a LLaVA with a Mixtral language model: the vision tower has no experts, yet
    the line said the language tower's fused experts and routers were left out. Now no such warning; [language]
    still names them. The modules adapted are peft's all-linear ones inside the towers either way."""
    import warnings

    model = _moe_vlm()
    every = _peft_names(model, peft.LoraConfig(r=2, target_modules="all-linear"))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        config = T.restrict(model, dt.LoraConfig(r=2, target_modules="all-linear"), ["vision"])
    assert [str(w.message) for w in said if "leaves out" in str(w.message)] == []
    assert sorted(config.target_modules) == [n for n in every if n.startswith("model.vision_tower.")]
    with pytest.warns(UserWarning) as said:
        config = T.restrict(model, dt.LoraConfig(r=2, target_modules="all-linear"), ["language"])
    assert [str(w.message) for w in said if "leaves out" in str(w.message)] == [
        "lora: target_modules='all-linear' leaves out model.language_model.layers.0.mlp.experts.gate_up_proj and the "
        "other fused experts (3-D parameters deltatune cannot adapt) and the routers "
        "(model.language_model.layers.0.mlp.gate, ...: not linear layers); it adapts the linear layers"
    ]
    theirs = [n for n in every if n.startswith("model.language_model.") and not n.endswith(("mlp.gate", "experts"))]
    assert sorted(config.target_modules) == theirs


def test_a_run_begun_with_a_regex_reaching_fused_experts_resumes_as_it_trained(tmp_path):
    """A run on Qwen3-MoE begun before 4d15b84 with target_modules r".*\\.(q_proj|down_proj)" trained q_proj alone;
    its resume (and eval --compare's start) built the adapter anew and was refused since. start_model with the
    checkpoint now builds it as it trained (q_proj, the checkpoint's tensors), saying the experts stay out; a new run
    is still refused."""
    import json

    from safetensors.torch import load_file
    from test_targets_probe import _moe as moe
    from tiny import tokenizer

    from deltatune.train.config import build
    from deltatune.train.run import start_model

    tok = tokenizer()
    base = moe("qwen3_moe", pad_token_id=tok.pad_token_id)
    base.resize_token_embeddings(len(tok))  # (on the tokenizer's vocabulary)
    base.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    regex = r".*\.(q_proj|down_proj)"
    old = dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=["q_proj"]))  # the checkpoint's adapter
    old.save_pretrained(tmp_path / "checkpoint-2")
    path = tmp_path / "checkpoint-2" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": regex}))  # as the run saved it
    cfg = build({"stage": "sft", "model": {"name_or_path": str(tmp_path / "moe"), "dtype": "float32"},
                 "method": {"name": "lora", "r": 2, "target_modules": regex},
                 "data": {"train": str(tmp_path / "rows.jsonl")}})  # fmt: skip
    with pytest.raises(dt.ConfigError, match=r"reaches model\.layers\.0\.mlp\.experts\.down_proj, a 3-D parameter"):
        start_model(cfg, tok)
    with pytest.warns(UserWarning, match=r"reaches model\.layers\.0\.mlp\.experts\.down_proj, .*loads without the"):
        delta, _ = start_model(cfg, tok, None, str(tmp_path / "checkpoint-2"))
    assert _names(delta) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    held = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    assert sorted({k.split(".lora_")[0].removeprefix("base_model.model.") for k in held}) == _names(delta)
