"""Probe 20 of the diffusion side against diffusers 0.42.1: a diffusers LoRA file's ``lora_adapter_metadata`` as
diffusers reads it (``LoraConfig(**metadata)``): a config naming r but no lora_alpha has peft's default alpha, 8,
and a use_rslora written as text ("false", which peft takes as true) is refused in one line, the model unchanged."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from deltatune.config import ConfigError  # noqa: E402
from tests.test_diffusion_probe16 import _unet  # noqa: E402

NAMES = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
         "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"]  # fmt: skip


def _file(path, meta: dict, rank: int = 4):
    """A diffusers-layout LoRA file on two of the tiny UNet's projections, ``meta`` as its lora_adapter_metadata."""
    from safetensors.torch import save_file

    modules, g, tensors = dict(_unet(3).named_modules()), torch.Generator().manual_seed(0), {}
    for n in NAMES:
        tensors[f"unet.{n}.lora_A.weight"] = torch.randn(rank, modules[n].in_features, generator=g)
        tensors[f"unet.{n}.lora_B.weight"] = torch.randn(modules[n].out_features, rank, generator=g)
    save_file(tensors, str(path), {"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, 16, 16, generator=g), torch.tensor([10]), torch.randn(1, 5, 32, generator=g)


def _diffusers_and_ours(path):
    """The file loaded by diffusers' load_lora_adapter (adapter "a") and by deltatune's load_lora, each into the same
    UNet, and their modules by name."""
    from deltatune.diffusion import load_lora

    ref = _unet(3)
    ref.load_lora_adapter(str(path), prefix="unet", adapter_name="a", use_safetensors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = load_lora(_unet(3), path, prefix="unet")
    return ref, mine, dict(ref.named_modules()), dict(mine.get_base_model().named_modules())


@pytest.mark.parametrize("meta", [{"unet.r": 4, "unet.target_modules": NAMES},
                                  {"unet.r": 4, "unet.target_modules": NAMES, "unet.alpha_pattern": {"to_k": 2}}])  # fmt: skip
def test_metadata_without_lora_alpha_has_peft_default_alpha_as_diffusers(tmp_path, meta):
    """diffusers' ``_create_lora_config`` passes the metadata to peft's LoraConfig, whose lora_alpha defaults to 8:
    scale 8 / 4 = 2 (to_k 2 / 4 by the pattern). deltatune took alpha = rank (scale 1): outputs 0.08 apart."""

    path = _file(tmp_path / "f.safetensors", meta)
    x, t, c = _inputs()
    ref, mine, refs, ours = _diffusers_and_ours(path)
    assert [refs[n].scaling["a"] for n in NAMES] == [ours[n].scaling["default"] for n in NAMES]
    with torch.no_grad():
        want, got = ref(x, t, c).sample, mine(x, t, encoder_hidden_states=c).sample
    assert (want - _unet(3)(x, t, c).sample).abs().max() > 1e-3  # (the LoRA counts)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("key, value", [("use_rslora", "false"), ("use_rslora", 2), ("use_dora", "no")])
def test_metadata_switch_as_text_is_refused_and_the_model_keeps_its_adapters(tmp_path, key, value):
    """peft takes ``use_rslora="false"`` as true (diffusers scales by alpha / sqrt(r): 2 here where the writer meant
    1); deltatune's ``bool("false")`` did the same silently. Now one line naming the file and the key, and the
    DeltaModel keeps its one adapter and its outputs."""
    from deltatune.diffusion import load_lora

    good = _file(tmp_path / "good.safetensors", {"unet.r": 4, "unet.lora_alpha": 4, "unet.target_modules": NAMES})
    bad = _file(tmp_path / "bad.safetensors", {"unet.r": 4, "unet.lora_alpha": 4, f"unet.{key}": value})
    x, t, c = _inputs()
    delta = load_lora(_unet(3), good, "a", prefix="unet")
    with torch.no_grad():
        before = delta(x, t, encoder_hidden_states=c).sample
    with pytest.raises(
        ConfigError,
        match=re.escape(f"{bad}: its metadata's unet.{key} is {value!r}")
        + r" \(a JSON \w+\); it must be true, false, null, 0 or 1$",
    ):
        load_lora(delta, bad, "b", prefix="unet")
    assert list(delta.peft_config) == ["a"]
    with torch.no_grad():
        torch.testing.assert_close(delta(x, t, encoder_hidden_states=c).sample, before, rtol=0, atol=0)


@pytest.mark.parametrize(
    "settings",
    [{}, {"use_ema_warmup": True}, {"use_ema_warmup": True, "ema_inv_gamma": 2.0, "ema_power": 0.75},
     {"ema_min_decay": 0.3, "ema_update_after_step": 3}, {"use_ema_warmup": True, "ema_min_decay": 0.2}],
)  # fmt: skip
def test_ema_warmup_settings_average_as_diffusers_ema_model(settings):
    """diffusers' EMAModel's use_ema_warmup / inv_gamma / power / min_decay / update_after_step (its
    ``train_unconditional.py``'s --ema_inv_gamma, --ema_power): the averaged weights after 12 steps of random
    updates, each step's decay as ``get_decay``'s. deltatune's EMA had only the decay (no warm-up keys)."""
    from types import SimpleNamespace

    from diffusers.training_utils import EMAModel

    from deltatune.train.t2i_ema import EMA, ema_options

    train = SimpleNamespace(use_ema=True, ema_decay=0.99, **settings)
    options = ema_options(train)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ref = EMAModel(
        model.parameters(), decay=0.99, use_ema_warmup=settings.get("use_ema_warmup", False),
        inv_gamma=settings.get("ema_inv_gamma", 1.0), power=settings.get("ema_power", 2 / 3),
        min_decay=settings.get("ema_min_decay", 0.0), update_after_step=settings.get("ema_update_after_step", 0),
    )  # fmt: skip
    ema = EMA(**options)
    ema.on_train_begin(None, None, None, model=model)
    decays = []
    for _ in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ref.step(model.parameters())
        ema.on_step_end(None, None, None, model=model)
        decays.append((ref.get_decay(ref.optimization_step), ema.current_decay()))
    assert [a for a, _ in decays] == [b for _, b in decays]
    assert len({a for a, _ in decays}) > 3  # (the decay moves)
    for (name, _), want in zip(model.named_parameters(), ref.shadow_params):
        torch.testing.assert_close(ema.shadow[name], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "settings, message",
    [({"use_ema_warmup": "false"}, "train.use_ema_warmup must be true or false, got 'false'"),
     ({"ema_power": 0}, "train.ema_power must be > 0, got 0"),
     ({"ema_inv_gamma": "1"}, "train.ema_inv_gamma must be a finite number, got '1'"),
     ({"ema_min_decay": 0.999}, "train.ema_min_decay must be in [0, train.ema_decay (0.99)], got 0.999"),
     ({"ema_update_after_step": 1.5}, "train.ema_update_after_step must be an int >= 0, got 1.5")],
)  # fmt: skip
def test_ema_warmup_settings_out_of_range_are_refused_in_one_line(settings, message):
    """EMAModel takes any of these and averages oddly (a min_decay above the decay wins over it; a text
    use_ema_warmup is true); each is refused naming its key."""
    from types import SimpleNamespace

    from deltatune.train.t2i_ema import ema_options

    with pytest.raises(ConfigError, match=re.escape(message)):
        ema_options(SimpleNamespace(use_ema=True, ema_decay=0.99, **settings))


def test_a_refused_pipeline_lora_leaves_the_runs_own_lora_as_it_was(tmp_path):
    """``generate --lora`` (``load_pipeline_loras``) with the run's own LoRA weighted 0.5 and a file whose text-encoder
    part is another architecture's: refused in one line naming the file, and the run's LoRA kept its scale (it was
    left at 0.5: outputs 0.05 off), its active adapters and its frozen parameters."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from deltatune.diffusion import load_lora, load_pipeline_loras

    good = _file(tmp_path / "good.safetensors", {"unet.r": 4, "unet.lora_alpha": 4, "unet.target_modules": NAMES})
    delta = load_lora(_unet(3), good, "default", prefix="unet")
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=100, bos_token_id=0, eos_token_id=2)  # fmt: skip
    text_encoder = CLIPTextModel(config).eval()
    bad = load_file(str(good))
    bad["text_encoder.encoder.layers.5.self_attn.q_proj.lora_A.weight"] = torch.randn(4, 32)
    bad["text_encoder.encoder.layers.5.self_attn.q_proj.lora_B.weight"] = torch.randn(32, 4)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    x, t, c = _inputs()
    grads = {n: p.requires_grad for n, p in delta.named_parameters()}
    with torch.no_grad():
        before = delta(x, t, encoder_hidden_states=c).sample
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'bad.safetensors'}: 2 of 6 keys name no module")):
        load_pipeline_loras(delta, text_encoder, "unet", [str(tmp_path / "bad.safetensors")], [0.7], weight=0.5)
    assert list(delta.peft_config) == ["default"] and delta.active_adapters == ["default"]
    assert {n: p.requires_grad for n, p in delta.named_parameters()} == grads
    with torch.no_grad():
        torch.testing.assert_close(delta(x, t, encoder_hidden_states=c).sample, before, rtol=0, atol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_metadata_use_dora_that_the_magnitudes_contradict_is_refused(tmp_path, dora):
    """diffusers builds ``LoraConfig(use_dora=...)`` from the metadata: ``true`` without magnitudes draws a DoRA
    whose magnitudes are the base weights' norms, ``false`` beside magnitudes a plain LoRA (the magnitudes dropped
    with a warning); deltatune followed the tensors either way. Now one line naming the file."""
    from safetensors.torch import load_file, save_file

    from deltatune.diffusion import load_lora

    path = _file(tmp_path / "f.safetensors", {"unet.r": 4, "unet.lora_alpha": 4, "unet.use_dora": not dora})
    if dora:
        tensors, modules = load_file(str(path)), dict(_unet(3).named_modules())
        tensors |= {f"unet.{n}.lora_magnitude_vector": torch.ones(modules[n].out_features) for n in NAMES}
        save_file(tensors, str(path), {"lora_adapter_metadata": json.dumps({"unet.use_dora": False})})
    held = f"DoRA magnitudes ({min(NAMES)}.lora_magnitude_vector)" if dora else "no lora_magnitude_vector keys"
    message = f"{path}: its metadata's use_dora is {str(not dora).lower()}, and the file holds {held}"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_lora(_unet(3), path, prefix="unet")


def test_a_prefix_the_file_has_no_keys_for_is_named_with_a_key_it_has(tmp_path):
    """``prefix="text_encoder"`` on a UNet-only file said "no LoRA tensors in the file", which the file has; now the
    prefix and one of its keys are named (the model unchanged)."""
    from deltatune.diffusion import load_lora

    path = _file(tmp_path / "f.safetensors", {"unet.r": 4, "unet.lora_alpha": 4})
    delta = load_lora(_unet(3), path, "a", prefix="unet")
    message = f"{path}: no LoRA tensors in the file for prefix 'text_encoder' (its keys are another component's, "
    with pytest.raises(ConfigError, match=re.escape(message + f"such as unet.{min(NAMES)}.lora_A.weight)")):
        load_lora(delta, path, "b", prefix="text_encoder")
    assert list(delta.peft_config) == ["a"]


def _clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=100, bos_token_id=0, eos_token_id=2)  # fmt: skip
    return CLIPTextModel(config).eval()


def _style(tmp_path, good):
    """A second diffusers-layout file on the same projections (other tensors, alpha 8)."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(5)
    tensors = {k: torch.randn(v.shape, generator=g) for k, v in load_file(str(good)).items()}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": NAMES})}
    save_file(tensors, str(tmp_path / "style.safetensors"), meta)
    return tmp_path / "style.safetensors"


def test_a_second_pipeline_lora_call_loads_beside_the_first_and_a_refused_one_keeps_it(tmp_path):
    """A second ``load_pipeline_loras`` was refused ("adapter name 'lora_0' ... taken already") and then deleted the
    first call's lora_0, leaving the run's own LoRA alone active: outputs 0.28 off. Now a file's adapter takes the
    first free ``lora_<k>``, so no clash (diffusers' ``get_adapter_name`` names ``default_<n>``): a second call
    loads beside the first (outputs as diffusers' set_adapters(["default", "lora_1"]) on the three adapters), and a
    refused call leaves the adapters, the active ones and the outputs as they were."""
    from safetensors.torch import load_file, save_file

    from deltatune.diffusion import load_lora, load_pipeline_loras

    good = _file(tmp_path / "good.safetensors", {"unet.r": 4, "unet.lora_alpha": 4, "unet.target_modules": NAMES})
    style = _style(tmp_path, good)
    bad = load_file(str(good))
    bad["text_encoder.encoder.layers.5.self_attn.q_proj.lora_A.weight"] = torch.randn(4, 32)
    bad["text_encoder.encoder.layers.5.self_attn.q_proj.lora_B.weight"] = torch.randn(32, 4)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    x, t, c = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delta, te = load_lora(_unet(3), good, "default", prefix="unet"), _clip()
        load_pipeline_loras(delta, te, "unet", [str(style)], [0.7], weight=0.5)
        state = (list(delta.peft_config), list(delta.active_adapters))
        with torch.no_grad():
            before = delta(x, t, encoder_hidden_states=c).sample
        with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'bad.safetensors'}: 2 of 6 keys name no")):
            load_pipeline_loras(delta, te, "unet", [str(tmp_path / "bad.safetensors")], [0.3], weight=0.5)
        assert state == (["default", "lora_0"], ["default", "lora_0"])
        assert (list(delta.peft_config), list(delta.active_adapters)) == state
        with torch.no_grad():
            torch.testing.assert_close(delta(x, t, encoder_hidden_states=c).sample, before, rtol=0, atol=0)
        load_pipeline_loras(delta, te, "unet", [str(good)], [0.3], weight=0.5)
        ref = _unet(3)
        for name, path in (("default", good), ("lora_0", style), ("lora_1", good)):
            ref.load_lora_adapter(str(path), prefix="unet", adapter_name=name, use_safetensors=True)
        ref.set_adapters(["default", "lora_1"], [0.5, 0.3])
    assert (list(delta.peft_config), list(delta.active_adapters)) == (["default", "lora_0", "lora_1"], ["default", "lora_1"])  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(delta(x, t, encoder_hidden_states=c).sample, ref(x, t, c).sample, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "extra",
    [{"unet.use_rslora": None}, {"unet.use_rslora": 0}, {"unet.use_rslora": 1}, {"unet.use_dora": None},
     {"unet.use_dora": 0}, {"text_encoder.use_rslora": "false"}],
)  # fmt: skip
def test_metadata_switches_peft_reads_as_meant_load_as_diffusers(tmp_path, extra):
    """peft's LoraConfig reads use_rslora / use_dora by truth (``if use_rslora``): null and 0 are false, 1 true, and
    diffusers loads a file's unet part without reading its text_encoder's keys. deltatune refused all of these
    ("must be true or false", null named "a JSON NoneType"); now they load, outputs as diffusers'."""
    from deltatune.diffusion_files import _json_kind

    path = _file(tmp_path / "f.safetensors", {"unet.r": 4, "unet.lora_alpha": 4, "unet.target_modules": NAMES} | extra)
    x, t, c = _inputs()
    ref, mine, refs, ours = _diffusers_and_ours(path)
    assert [refs[n].scaling["a"] for n in NAMES] == [ours[n].scaling["default"] for n in NAMES]
    assert refs[NAMES[0]].scaling["a"] == (2.0 if extra == {"unet.use_rslora": 1} else 1.0)
    with torch.no_grad():
        torch.testing.assert_close(mine(x, t, encoder_hidden_states=c).sample, ref(x, t, c).sample, rtol=0, atol=1e-6)
    assert _json_kind(None) == "null"


def test_ema_min_decay_waits_for_update_after_step_and_the_note_says_whose_weights():
    """EMAModel's decay is 0 (a copy of the weights) through step update_after_step + 1, ema_min_decay or not: the
    floor applies after that step, and the average starts from that step's weights, which the report's note now
    says ("from step 4's weights"; it said "from step 4", read as the first step averaged)."""
    from diffusers.training_utils import EMAModel

    from deltatune.train.t2i_ema import EMA, describe_ema, ema_options

    class Train:
        use_ema, ema_decay, ema_min_decay, ema_update_after_step = True, 0.9, 0.3, 3

    options = ema_options(Train())
    assert describe_ema(options) == (
        "weights averaged (EMA, decay up to 0.9, at least 0.3, from step 4's weights); the run saves the average"
    )
    ours, p = EMA(**options), torch.nn.Parameter(torch.zeros(3))
    ref = EMAModel([p], decay=0.9, min_decay=0.3, update_after_step=3)
    for k in range(1, 8):
        ours.step = k
        assert ours.current_decay() == ref.get_decay(k) == (0.0 if k <= 4 else max((k - 3) / (k + 6), 0.3))
        with torch.no_grad():
            p.fill_(float(k))
        ref.step([p])
        if k == 4:
            assert ref.shadow_params[0].tolist() == [4.0] * 3  # the average starts from step 4's weights


def _both(tmp_path, good):
    """``good``'s UNet part and a text_encoder part on the tiny CLIP's first layer's q_proj and k_proj."""
    from safetensors.torch import load_file, save_file

    g, tensors = torch.Generator().manual_seed(7), dict(load_file(str(good)))
    for k in ("q_proj", "k_proj"):
        tensors[f"text_encoder.encoder.layers.0.self_attn.{k}.lora_A.weight"] = torch.randn(4, 32, generator=g)
        tensors[f"text_encoder.encoder.layers.0.self_attn.{k}.lora_B.weight"] = torch.randn(32, 4, generator=g)
    meta = {"unet.r": 4, "unet.lora_alpha": 4, "unet.target_modules": NAMES, "text_encoder.r": 4,
            "text_encoder.lora_alpha": 4, "text_encoder.target_modules": ["q_proj", "k_proj"]}  # fmt: skip
    save_file(tensors, str(tmp_path / "both.safetensors"), {"lora_adapter_metadata": json.dumps(meta)})
    return tmp_path / "both.safetensors"


@pytest.mark.parametrize("own", [False, True])
def test_a_second_pipeline_lora_call_without_a_text_encoder_part_turns_the_first_ones_off_there(tmp_path, own):
    """Call 1 loads a file with UNet and text_encoder parts (lora_0 on both), call 2 a UNet-only file: the UNet's
    active adapters became default + lora_1, but the text encoder kept lora_0 active (half of call 1's LoRA drawn).
    diffusers' pipeline set_adapters(["default", "lora_1"]) sets every component: the text encoder has no lora_1, so
    it computes with the run's own LoRA alone (weighted), or as the base CLIP where it has none."""
    from deltatune.diffusion import load_lora, load_pipeline_loras, set_adapters

    good = _file(tmp_path / "good.safetensors", {"unet.r": 4, "unet.lora_alpha": 4, "unet.target_modules": NAMES})
    style, both = _style(tmp_path, good), _both(tmp_path, good)
    ids, clip = torch.tensor([[0, 5, 9, 2]]), _clip()  # (one CLIP's weights, copied: _clip() draws new ones)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delta = load_lora(_unet(3), good, "default", prefix="unet")
        te = load_lora(copy.deepcopy(clip), both, "default", "text_encoder") if own else copy.deepcopy(clip)
        te = load_pipeline_loras(delta, te, "unet", [str(both)], [0.7], weight=0.5)
        with torch.no_grad():
            first = te(ids).last_hidden_state
        te = load_pipeline_loras(delta, te, "unet", [str(style)], [0.4], weight=0.5)
        want = clip
        if own:
            want = load_lora(want, both, "default", "text_encoder")
            set_adapters(want, ["default"], [0.5])
    assert list(te.peft_config) == (["default", "lora_0"] if own else ["lora_0"])
    with torch.no_grad():
        got, want = te(ids).last_hidden_state, want(ids).last_hidden_state
    assert (first - want).abs().max() > 1e-3  # (call 1's lora_0 counts on the text encoder)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with warnings.catch_warnings():  # a third call with a text_encoder part: its LoRA acts there again
        warnings.simplefilter("ignore")
        te = load_pipeline_loras(delta, te, "unet", [str(both)], [0.7], weight=0.5)
    assert list(te.active_adapters) == (["default", "lora_2"] if own else ["lora_2"])
    with torch.no_grad():
        torch.testing.assert_close(te(ids).last_hidden_state, first, rtol=0, atol=1e-6)


def test_a_bad_unet_switch_in_a_file_with_only_text_encoder_keys_loads_its_text_encoder_part(tmp_path):
    """The reverse of the text_encoder.use_rslora case above: diffusers reads only the component it loads, so a file
    with text_encoder keys alone and a ``unet.use_rslora: "false"`` loads (prefix text_encoder), outputs as the same
    file without that key; the same key in a file with a unet part is refused naming it."""
    from safetensors.torch import load_file, save_file

    from deltatune.diffusion import load_lora, load_pipeline_loras

    good = _file(tmp_path / "good.safetensors", {"unet.r": 4, "unet.lora_alpha": 4, "unet.target_modules": NAMES})
    both = _both(tmp_path, good)
    meta = json.loads(safe_metadata(both)["lora_adapter_metadata"])
    te_only = {k: v for k, v in load_file(str(both)).items() if k.startswith("text_encoder.")}
    for name, m in (("plain", meta), ("bad", meta | {"unet.use_rslora": "false"})):
        save_file(te_only, str(tmp_path / f"{name}.safetensors"), {"lora_adapter_metadata": json.dumps(m)})
    ids, clip = torch.tensor([[0, 5, 9, 2]]), _clip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = load_lora(copy.deepcopy(clip), tmp_path / "plain.safetensors", "a", "text_encoder")
        got = load_lora(copy.deepcopy(clip), tmp_path / "bad.safetensors", "a", "text_encoder")
        delta = load_lora(_unet(3), good, "default", prefix="unet")
        te = load_pipeline_loras(delta, copy.deepcopy(clip), "unet", [str(tmp_path / "bad.safetensors")], [1.0])
    assert list(delta.peft_config) == ["default"] and list(te.peft_config) == ["lora_0"]
    with torch.no_grad():
        want = want(ids).last_hidden_state
        assert (want - clip(ids).last_hidden_state).abs().max() > 1e-3  # (the LoRA counts)
        torch.testing.assert_close(got(ids).last_hidden_state, want, rtol=0, atol=0)
        torch.testing.assert_close(te(ids).last_hidden_state, want, rtol=0, atol=1e-6)
    save_file(load_file(str(both)), str(tmp_path / "bad2.safetensors"),
              {"lora_adapter_metadata": json.dumps(meta | {"unet.use_rslora": "false"})})  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape("its metadata's unet.use_rslora is 'false'")):
        load_pipeline_loras(delta, copy.deepcopy(clip), "unet", [str(tmp_path / "bad2.safetensors")], [1.0])
    assert list(delta.peft_config) == ["default"]


def safe_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()
