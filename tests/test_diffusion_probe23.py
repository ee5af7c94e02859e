"""Probe 23 of the diffusion stage and its LoRA files: a LoRA file whose alpha is 0 or negative (kohya's .alpha, or
diffusers' metadata lora_alpha / alpha_pattern) is refused in one line naming the file and the module, the model
unchanged (LoraConfig's own check named neither: "alpha_pattern['down_blocks\\\\.0...'] must be in (0, inf)")."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from diffusion.test_lora_files import tiny_unet  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.config import ConfigError  # noqa: E402
from deltatune.diffusion import load_lora  # noqa: E402

KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{}"
PATH = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{}"


def _kohya(file, alphas: dict[str, float]) -> str:
    from safetensors.torch import save_file

    g, tensors = torch.Generator().manual_seed(0), {}
    for proj, alpha in alphas.items():
        key = KOHYA.format(proj)
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, 32, generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(32, 2, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(file))
    return str(file)


def _diffusers(file, meta: dict) -> str:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {f"unet.{PATH.format(p)}.lora_{x}.weight": torch.randn(*s, generator=g)
               for p in ("q", "k") for x, s in (("A", (2, 32)), ("B", (32, 2)))}  # fmt: skip
    save_file(tensors, str(file), {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in meta.items()})})
    return str(file)


@pytest.mark.parametrize(
    "make, module, value",
    [
        (lambda f: _kohya(f, {"q": 1.0, "k": 1.0, "v": 0.0}), "v", "0"),  # (an alpha_pattern entry)
        (lambda f: _kohya(f, {"q": -2.0}), "q", "-2"),  # (the config's lora_alpha)
        (lambda f: _diffusers(f, {"r": 2, "lora_alpha": 0}), "k", "0"),
        (lambda f: _diffusers(f, {"r": 2, "lora_alpha": 4, "alpha_pattern": {"attn1.to_q": -1}}), "q", "-1"),
    ],
)
def test_an_alpha_of_zero_or_below_is_refused_naming_the_file_and_module(tmp_path, make, module, value):
    file = make(tmp_path / "lora.safetensors")
    model = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, target_modules=["to_k"], init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as info:
        load_lora(model, file, "other", prefix="unet")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{file}: module {PATH.format(module)}'s alpha is {value} ("), (
        message
    )
    assert message.endswith("kohya's sd-scripts reads 0 as alpha = rank, diffusers and ComfyUI as no update: set the "
                            ".alpha you mean)"), message  # fmt: skip
    assert list(model.peft_config) == ["default"] and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_save_kohya_lora_of_sdxls_second_text_encoder_writes_lora_te2_keys_as_diffusers_loads_them(tmp_path):
    """kohya's SDXL files name the second text encoder's modules ``lora_te2_`` (what diffusers' kohya converter,
    A1111 and ComfyUI read, and ``load_lora(prefix="text_encoder_2")`` here); ``save_kohya_lora(prefix=
    "text_encoder_2")`` wrote ``lora_text_encoder_2_`` keys, which diffusers' ``load_lora_weights`` could not read
    and ``load_lora`` refused. The pooled embedding (the second encoder's) equals diffusers' after its load."""
    import copy

    from diffusion.test_sdxl_te2_10 import _outputs, tiny_sdxl
    from safetensors import safe_open

    from deltatune.diffusion import save_kohya_lora

    pipe = tiny_sdxl(tmp_path)
    torch.manual_seed(5)
    # (out_proj among them: diffusers tells its converted kohya text-encoder keys by a to_out_lora key, else refuses)
    config = dt.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "out_proj"], init_lora_weights=False)
    te2 = dt.get_delta_model(copy.deepcopy(pipe.text_encoder_2), config).eval()
    file = save_kohya_lora(te2, tmp_path / "te2.safetensors", prefix="text_encoder_2")
    with safe_open(file, "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(k.startswith("lora_te2_") for k in keys), keys[:3]

    theirs = copy.deepcopy(pipe)
    theirs.load_lora_weights(file)
    ours = copy.deepcopy(pipe)
    ours.text_encoder_2 = load_lora(ours.text_encoder_2, file, prefix="text_encoder_2").get_base_model()
    saved = copy.deepcopy(pipe)
    saved.text_encoder_2 = te2.get_base_model()
    base, want, got, trained = _outputs(pipe)[1], _outputs(theirs)[1], _outputs(ours)[1], _outputs(saved)[1]
    assert (want - base).abs().max() > 1e-2  # (diffusers loaded the second encoder's part)
    torch.testing.assert_close(want, trained, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, trained, atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_lora_initialised_from_the_base_is_not_written_as_a_file_for_the_original_base(tmp_path, init):
    """PiSSA and OLoRA leave the model's base weights as their residual W - s B0 A0; a diffusers or kohya file is
    loaded on the original base (diffusers' load_lora_weights, ``load_lora`` here), where the file's A, B drew
    0.29 (PiSSA) / 1.05 (OLoRA) off the model that wrote it. Without ``initial`` both writers refuse it in one line
    naming the model (unet) and adapter, nothing written; a plain LoRA's file loads back equal (the control)."""
    from diffusion.test_lora_files import out

    from deltatune.diffusion import save_diffusers_lora, save_kohya_lora

    model = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, init_lora_weights=init)).eval()
    for write, where in ((save_diffusers_lora, tmp_path / "d"), (save_kohya_lora, tmp_path / "k.safetensors")):
        with pytest.raises(ConfigError, match=rf"^the unet model's adapter 'default' was initialised from the base "
                           rf"\({init}\):.* give initial="):  # fmt: skip
            write(model, where)
        assert not where.exists()
    plain = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, init_lora_weights=False)).eval()
    back = load_lora(tiny_unet(), save_diffusers_lora(plain, tmp_path / "plain"))
    torch.testing.assert_close(out(back), out(plain), atol=1e-6, rtol=0)
    from deltatune.train import t2i

    assert t2i._plain_lora(plain) and not t2i._plain_lora(model)  # (a t2i run's save writes no file it would refuse)


def _trained(model) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("init, rslora", [("pissa", False), ("olora", True)])
def test_a_pissa_or_olora_lora_is_written_as_peft_converts_it_and_loads_on_the_original_base(tmp_path, init, rslora):
    """Given the adapter's tensors from right after its init (``initial``: a dict, or the folder saved then), the
    writers write peft's conversion (``save_pretrained(path_initial_model_for_weight_conversion=...)``: rank 2r,
    A' = [A; A0], B' = [B, -B0], alpha x2, x sqrt 2 with rsLoRA): the tensors equal peft's own conversion of the
    same adapter, diffusers' ``load_lora_adapter`` and ``load_lora`` (kohya's file too) give the trained model's
    outputs on the original base (within 2e-6; the adapter moved them by over 0.03)."""
    import peft
    from diffusion.test_lora_files import out
    from safetensors.torch import load_file

    from deltatune.diffusion import WEIGHT_NAME, save_diffusers_lora, save_kohya_lora
    from deltatune.diffusion_initial import initial_tensors
    from deltatune.train import t2i

    fields = dict(r=2, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=init, use_rslora=rslora)
    model = dt.get_delta_model(tiny_unet(), dt.LoraConfig(**fields)).eval()
    initial = initial_tensors(model)
    model.save_pretrained(tmp_path / "init")
    _trained(model)
    assert t2i._plain_lora(model, initial)  # (a t2i run writes it)
    ours = load_file(save_diffusers_lora(model, tmp_path / "d", initial=initial))
    again = load_file(save_diffusers_lora(model, tmp_path / "f", initial=tmp_path / "init"))
    assert ours.keys() == again.keys() and all(torch.equal(v, again[k]) for k, v in ours.items())
    theirs = peft.get_peft_model(tiny_unet(), peft.LoraConfig(**fields))  # (the same init: both are exact)
    theirs.save_pretrained(tmp_path / "peft-init")
    state = {k.replace(".lora_A.default", ".lora_A").replace(".lora_B.default", ".lora_B"): v
             for k, v in theirs.state_dict().items()}  # fmt: skip
    mine = model.adapter_state_dict("default")
    with torch.no_grad():
        for k in mine:
            state_key = next(s for s in state if s.endswith(k.removeprefix("base_model.model.")))
            torch.testing.assert_close(state[state_key], initial[k], atol=1e-6, rtol=0)  # (the same init)
            dict(theirs.named_parameters())[state_key.replace(".lora_A", ".lora_A.default").replace(
                ".lora_B", ".lora_B.default")].copy_(mine[k])  # fmt: skip
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft-init"))
    converted = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k.replace("base_model.model.", "unet.") for k in converted} == ours.keys()
    for k, v in converted.items():
        torch.testing.assert_close(ours[k.replace("base_model.model.", "unet.")], v, atol=1e-6, rtol=0)
    meta = json.loads(__import__("safetensors").safe_open(tmp_path / "d" / WEIGHT_NAME, "pt").metadata()[
        "lora_adapter_metadata"])  # fmt: skip
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (peft_config["r"], peft_config["lora_alpha"]) == (
        4, 4 * (2**0.5 if rslora else 2))  # fmt: skip
    trained, base = out(model), out(tiny_unet())
    assert (trained - base).abs().max() > 0.03
    loaded = tiny_unet()
    loaded.load_lora_adapter(str(tmp_path / "d"), prefix="unet", weight_name=WEIGHT_NAME)
    torch.testing.assert_close(out(loaded), trained, atol=2e-6, rtol=0)
    kohya = load_lora(tiny_unet(), save_kohya_lora(model, tmp_path / "k.safetensors", initial=initial))
    torch.testing.assert_close(out(kohya), trained, atol=2e-6, rtol=0)


def test_a_t2i_runs_save_writes_the_converted_file_of_a_pissa_denoiser(tmp_path):
    """A t2i run with method.init_lora_weights pissa trained to the end and wrote no
    pytorch_lora_weights.safetensors (80fc8fc); its processor's save now writes peft's conversion from the
    tensors kept when the trainer took the denoiser (before a --resume loads the checkpoint's), equal to the
    trained model on the original base; the report's note says so, and LoftQ's says to merge instead."""
    import types

    from diffusion.test_lora_files import out

    from deltatune.diffusion import WEIGHT_NAME
    from deltatune.diffusion_initial import initial_tensors, run_note
    from deltatune.train import t2i

    model = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, init_lora_weights="pissa")).eval()
    stub = types.SimpleNamespace(save_pretrained=lambda out: None, save_config=lambda out: None)
    processor = types.SimpleNamespace(tokenizer=stub, scheduler=stub, text_encoder_name="te", pipeline=False,
                                      text_encoder=None, folded=None, denoiser=model,
                                      denoiser_class="UNet2DConditionModel", initial=initial_tensors(model))  # fmt: skip
    _trained(model)
    t2i.T2IProcessor.save_pretrained(processor, str(tmp_path))
    back = load_lora(tiny_unet(), str(tmp_path / WEIGHT_NAME))
    torch.testing.assert_close(out(back), out(model), atol=2e-6, rtol=0)
    assert "peft's conversion" in run_note(dt.LoraConfig(init_lora_weights="olora"))[0]
    assert (
        "merge the run (merge_and_unload)"
        in run_note(dt.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4}))[0]
    )
    assert run_note(dt.LoraConfig()) == []


def test_loftq_is_refused_advising_a_merge_and_the_text_encoder_is_named(tmp_path):
    """LoftQ's refusal advised a conversion (save_pretrained(path_initial_model_for_weight_conversion=...)) that is
    itself refused for LoftQ; it says to merge (merge_and_unload) now. A text encoder's base-initialised LoRA passed
    as ``text_encoder=`` was refused as "adapter 'default'", not saying which model: it names the text_encoder."""
    import warnings

    from deltatune.diffusion import save_diffusers_lora, save_kohya_lora

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loftq = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, target_modules=["to_q"], init_lora_weights="loftq",
                                                               loftq_config={"loftq_bits": 4, "loftq_iter": 1}))  # fmt: skip
    for write, where in ((save_diffusers_lora, tmp_path / "d"), (save_kohya_lora, tmp_path / "k.safetensors")):
        with pytest.raises(ConfigError) as info:
            write(loftq, where, initial={})
        assert str(info.value).startswith("the unet model's adapter 'default' was initialised from the base (loftq)")
        assert "merge_and_unload" in str(info.value) and "path_initial" not in str(info.value)
        assert not where.exists()
    plain = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, init_lora_weights=False))
    other = dt.get_delta_model(tiny_unet(1), dt.LoraConfig(r=2, init_lora_weights="olora"))  # (a text encoder's)
    with pytest.raises(
        ConfigError, match=r"^the text_encoder model's adapter 'default' was initialised from the base"
    ):
        save_diffusers_lora(plain, tmp_path / "t", text_encoder=other)
    assert not (tmp_path / "t").exists()


def test_save_kohya_lora_of_sd3s_t5_writes_lora_te3_and_reads_the_old_lora_text_encoder_3_keys(tmp_path):
    """kohya's sd-scripts (lora_sd3.py, lora_flux.py: LORA_PREFIX_TEXT_ENCODER_T5 = "lora_te3") and ComfyUI name the
    T5 encoder's modules lora_te3_; save_kohya_lora(prefix="text_encoder_3") wrote lora_text_encoder_3_. A file of
    the old keys still loads with prefix="text_encoder_3", equal."""
    from diffusion.test_lora_files import out
    from safetensors.torch import load_file, save_file

    from deltatune.diffusion import save_kohya_lora

    model = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False))
    file = save_kohya_lora(model, tmp_path / "te3.safetensors", prefix="text_encoder_3")
    tensors = load_file(file)
    assert tensors and all(k.startswith("lora_te3_") for k in tensors), sorted(tensors)[:2]
    old = {k.replace("lora_te3_", "lora_text_encoder_3_", 1): v for k, v in tensors.items()}
    save_file(old, str(tmp_path / "old.safetensors"))
    for f in (file, tmp_path / "old.safetensors"):
        back = load_lora(tiny_unet(), str(f), prefix="text_encoder_3")
        torch.testing.assert_close(out(back), out(model.eval()), atol=1e-6, rtol=0)


def test_final_validation_copied_from_the_last_epochs_drawing_is_never_half_written(tmp_path, monkeypatch):
    """validation/final.png copied from the last epoch's drawing (same step, same weights) went straight to its name:
    a copy cut short (a full disk) left half a PNG there, where every drawing is written whole (t2i.save_png's
    atomic_write). Now the copy lands whole or not at all; the failure is the one line it was."""
    import shutil
    from types import SimpleNamespace

    from deltatune.train import t2i_validation

    folder = tmp_path / "validation"
    folder.mkdir()
    (folder / "epoch-1.png").write_bytes(b"\x89PNG" + bytes(range(200)))

    def cut_short(src, dst):
        with open(dst, "wb") as fh:
            fh.write(b"\x89PNG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", cut_short)
    v = t2i_validation.Validation({"prompt": "a", "count": 1, "every": 1, "seed": 0}, None, None)
    v.last = (3, str(folder / "epoch-1.png"))
    v.pending = (SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=3), None, False)
    v.final()
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-1.png"]  # (no final.png, no temporary file left)
    monkeypatch.undo()
    v.pending = (SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=3), None, False)
    v.final()
    assert (folder / "final.png").read_bytes() == (folder / "epoch-1.png").read_bytes()


def test_the_t2i_trainer_keeps_the_denoisers_initial_tensors_when_it_takes_the_model(tmp_path):
    """A t2i run converts a PiSSA / OLoRA LoRA with the tensors T2ITrainer keeps when it takes the denoiser (before a
    --resume loads the checkpoint's); nothing checked that it keeps them (the line gone: every test passed and an
    OLoRA run wrote no pytorch_lora_weights.safetensors). The trainer built as a run builds it, no step taken."""
    import types

    import transformers

    from deltatune.diffusion_initial import initial_tensors
    from deltatune.train import t2i

    model = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, target_modules=["to_q"], init_lora_weights="olora"))
    want = initial_tensors(model)
    processor = types.SimpleNamespace(text_encoder=None, trains_text_encoder=False, vae=None, denoiser=None,
                                      initial=None)  # fmt: skip
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    t2i.T2ITrainer(model=model, args=args, processor=processor)
    assert processor.denoiser is model and processor.initial is not None, processor.initial
    assert processor.initial.keys() == want.keys() and all(
        torch.equal(v, want[k]) for k, v in processor.initial.items()
    )
    _trained(model)
    assert t2i._plain_lora(model, processor.initial)  # (the save writes the converted file)
    assert not torch.equal(model.adapter_state_dict("default")[next(iter(want))], processor.initial[next(iter(want))])


def test_the_conversion_is_built_on_the_cpu_adding_no_gpu_memory():
    """converted() moved the start tensors to the adapter's device and built A' = [A; A0], B' = [B, -B0] there (the
    whole rank-2r LoRA again in GPU memory at a save); the file's tensors are the CPU's. Checked with fake CUDA
    tensors (torch's FakeTensorMode: no GPU needed): the result is on the CPU, its values peft's conversion's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from deltatune.diffusion_initial import converted

    start = {"k.lora_A.weight": torch.ones(2, 4), "k.lora_B.weight": torch.ones(3, 2)}
    with FakeTensorMode(allow_non_fake_inputs=True):
        modules = {"p": {"A": torch.zeros(2, 4, device="cuda"), "B": torch.zeros(3, 2, device="cuda"), "r": 2,
                         "alpha": 4.0}}  # fmt: skip
        converted(modules, {"p": "k"}, start, False, "unet")
        m = modules["p"]
        assert (m["A"].device.type, m["B"].device.type) == ("cpu", "cpu"), (m["A"].device, m["B"].device)
    assert (tuple(m["A"].shape), tuple(m["B"].shape), m["r"], m["alpha"]) == ((4, 4), (3, 4), 4, 8.0)
    real = {"p": {"A": torch.zeros(2, 4), "B": torch.zeros(3, 2), "r": 2, "alpha": 4.0}}
    converted(real, {"p": "k"}, start, True, "unet")
    assert torch.equal(real["p"]["A"], torch.cat([torch.zeros(2, 4), torch.ones(2, 4)]))
    assert torch.equal(real["p"]["B"], torch.cat([torch.zeros(3, 2), -torch.ones(3, 2)], 1))
    assert real["p"]["alpha"] == 4.0 * 2**0.5  # (rsLoRA: alpha / sqrt(2r) = 4 / sqrt(r) kept)


def test_the_run_note_says_rsloras_alpha_and_claims_no_file_a_run_does_not_write():
    """run_note said "alpha x2" where rsLoRA's conversion is alpha x sqrt 2 (peft's adapter_config.json: 4 -> 5.657,
    tested above), and claimed the file for a LoRA with biases or modules_to_save, for which t2i._plain_lora writes
    none (as for any LoRA run: no note)."""
    from deltatune.diffusion_initial import run_note
    from deltatune.train import t2i

    assert "alpha x2)" in run_note(dt.LoraConfig(init_lora_weights="pissa"))[0]
    assert "alpha x sqrt 2 (rsLoRA))" in run_note(dt.LoraConfig(init_lora_weights="pissa", use_rslora=True))[0]
    for extra in (dict(bias="all"), dict(bias="lora_only"), dict(modules_to_save=["conv_in"])):
        config = dt.LoraConfig(r=2, target_modules=["to_q"], init_lora_weights="olora", **extra)
        model = dt.get_delta_model(tiny_unet(), config)
        assert not t2i._plain_lora(model, {"any": torch.zeros(1)})  # (no file written)
        assert run_note(config) == [], extra


def test_a_dora_from_the_base_is_refused_as_a_dora_and_kohyas_refusal_names_the_model(tmp_path):
    """A DoRA initialised by PiSSA without initial= was told to "give initial=", and with it got the DoRA refusal:
    it is told it is a DoRA first. save_kohya_lora's DoRA refusal named no model ("adapter 'default' is DoRA") where
    its others name it (unet, text_encoder); nothing is written."""
    from deltatune.diffusion import save_diffusers_lora, save_kohya_lora
    from deltatune.diffusion_initial import initial_tensors

    dora = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, target_modules=["to_q"], init_lora_weights="pissa",
                                                         use_dora=True))  # fmt: skip
    for initial in (None, initial_tensors(dora)):
        with pytest.raises(ConfigError, match=r"^the unet model's adapter 'default' is DoRA, whose update no plain"):
            save_diffusers_lora(dora, tmp_path / "d", initial=initial)
        with pytest.raises(ConfigError, match=r"^the unet model's adapter 'default' is DoRA; kohya's files"):
            save_kohya_lora(dora, tmp_path / "k.safetensors", initial=initial)
    plain = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, target_modules=["to_q"], use_dora=True))
    with pytest.raises(ConfigError, match=r"^the text_encoder model's adapter 'default' is DoRA; kohya's files"):
        save_kohya_lora(plain, tmp_path / "t.safetensors", prefix="text_encoder")
    assert not any(tmp_path.iterdir())


def test_an_initial_folder_holding_adapter_model_bin_is_read_as_convert_to_plain_lora_reads_it(tmp_path):
    """peft saves with safe_serialization=False as adapter_model.bin; convert_to_plain_lora reads such a folder, the
    file writers refused it ("adapter_model.safetensors is not a file"). Now the file equals the one from the
    tensors themselves."""
    from safetensors.torch import load_file

    from deltatune.diffusion import save_diffusers_lora
    from deltatune.diffusion_initial import initial_tensors

    model = dt.get_delta_model(tiny_unet(), dt.LoraConfig(r=2, target_modules=["to_q"], init_lora_weights="olora"))
    initial = initial_tensors(model)
    (tmp_path / "init").mkdir()
    torch.save(initial, tmp_path / "init" / "adapter_model.bin")
    _trained(model)
    want = load_file(save_diffusers_lora(model, tmp_path / "a", initial=initial))
    got = load_file(save_diffusers_lora(model, tmp_path / "b", initial=tmp_path / "init"))
    assert got.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in got.items())
