"""Faults left in the run folder, the resume, t2i bases, LoRA files and data rows: a save killed midway left its
``.saving-*`` folder in the run for good; a run resumed at its last step wrote the Trainer's token count into
metrics.json; a t2i base merged from a run on a merged base lost the first text-encoder LoRA; a LoRA wrapped by a
bottleneck adapter was written (and combined) under its ``.base_layer`` path; an assistant turn that only reasons
(Qwen3's ``reasoning_content`` with no answer) was refused as empty."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from reliability_helpers import ROWS, cli, one_error_line, snapshot, write_recipe
from tiny import save_tiny, tiny_inputs, tiny_model, tokenizer

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.data.formats import read_samples
from deltatune.data.load import DataError, Row
from deltatune.data.templates import encode_chat, render
from deltatune.files import save_folder_files

# -- 1. a save killed midway -------------------------------------------------------------------------------------


def _killed_save(folder: Path) -> None:
    """save_folder_files in a child process SIGKILLed while its save writes (a power cut, an OOM kill)."""

    def save(tmp: str) -> None:
        Path(tmp, "tokenizer.json").write_text("{half")
        os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()
    if pid == 0:  # the child: never returns
        save_folder_files(save, str(folder))
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL


def test_a_save_killed_midway_leaves_its_temporary_folder_only_until_the_next_save(tmp_path):
    """SIGKILL inside save_folder_files left ``.saving-*`` (a half-written tokenizer in it) in the run folder for good;
    the next save removes it, and keeps the one of a save still running (a live process's)."""
    run = tmp_path / "run"
    run.mkdir()
    _killed_save(run)
    left = [p.name for p in run.iterdir()]
    assert len(left) == 1 and left[0].startswith(".saving-"), left  # what a killed save leaves
    from deltatune.files import _host

    kept = [
        run / ".saving-x1y2z3",  # a name of the earlier form (no process in it): an older deltatune's save?
        run / f".saving-{os.getppid()}@{_host()}~abcd",  # a live process's save in progress
        run / f".saving-{left[0].split('@')[0].removeprefix('.saving-')}@elsewhere~abcd",  # another host's
    ]
    for folder in kept:  # (the killed save's pid is gone here; on a host sharing the disk it may be a live save)
        folder.mkdir()
    save_folder_files(lambda tmp: Path(tmp, "tokenizer.json").write_text("{}"), str(run))
    assert sorted(p.name for p in run.iterdir()) == sorted([*(k.name for k in kept), "tokenizer.json"])
    assert (run / "tokenizer.json").read_text() == "{}"


# -- 2. a run resumed at its last step ---------------------------------------------------------------------------


def test_a_run_resumed_at_its_last_step_writes_the_metrics_the_run_wrote(tmp_path):
    """Stopped after its last checkpoint and before metrics.json, the run resumed with no step to train and evaluated
    through trainer.evaluate(), whose dict the Trainer's log had given num_input_tokens_seen: it reached
    metrics.json ({"num_input_tokens_seen": 84, ...}), which the uninterrupted run never writes."""
    out, rows = tmp_path / "run", tmp_path / "rows.jsonl"
    model = save_tiny(tmp_path / "bert", "bert", "seq_cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", model, str(rows), str(out), max_steps=3, save_steps=3)
    data = yaml.safe_load(Path(recipe).read_text())
    data["data"]["eval"] = str(rows)
    Path(recipe).write_text(yaml.safe_dump(data))
    assert cli("train", recipe)[0] == 0
    whole = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").unlink()  # as if killed while writing its outputs
    code, _, err = cli("train", recipe, "--resume")
    assert code == 0, err
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed.keys() == whole.keys() and "num_input_tokens_seen" not in resumed
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-6)
    assert (resumed["train_steps"], resumed["train_loss"]) == (whole["train_steps"], whole["train_loss"])


@pytest.mark.parametrize(
    "text, said", [("- stage: cls\n", "holds a list, not a recipe (a YAML mapping)"), ("", "is empty")]
)
def test_a_resume_whose_run_yaml_was_edited_into_no_recipe_is_one_line(run_copy, text, said):
    """run.yaml edited into a YAML list was a TypeError traceback from the recipe comparison ("'list' object is not
    a mapping"); an empty one was called a change of every key the recipe has (some 90 of them, in one line)."""
    (Path(run_copy.dir) / "metrics.json").unlink()  # stopped before its outputs: a run to resume
    (Path(run_copy.dir) / "run.yaml").write_text(text, encoding="utf-8")
    before = snapshot(run_copy.dir)
    code, _, err = cli("train", run_copy.recipe, "--resume")
    line = one_error_line(err)
    assert code == 2 and line.endswith(
        f"--resume: the run's run.yaml {said}, so the recipe cannot be compared with it"
    )
    assert snapshot(run_copy.dir) == before


def test_a_resume_compares_the_file_of_a_data_row_range(tmp_path):
    """data.train: rows.jsonl[0:8] (a row range) was no file to hash, so a run whose rows were edited since its
    checkpoint resumed on other data in silence; the file the range reads is compared, as a plain path is."""
    import hashlib
    from types import SimpleNamespace

    from deltatune.train.runfolder import facts_changes, run_facts
    from deltatune.train.trainer import SUMS

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    cfg = SimpleNamespace(
        data=SimpleNamespace(train=f"{rows}[0:8]", eval=f"{rows}[-2:]"), model=SimpleNamespace(dtype="float32")
    )
    facts = run_facts(cfg)
    digest = hashlib.sha256(rows.read_bytes()).hexdigest()
    assert (facts["data.train"], facts["data.eval"]) == (digest, digest)
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / SUMS).write_text(json.dumps({"facts": facts}), encoding="utf-8")
    assert facts_changes(str(checkpoint), run_facts(cfg)) == []
    rows.write_text(rows.read_text(encoding="utf-8").replace('"label": 1', '"label": 0', 1), encoding="utf-8")
    changed = facts_changes(str(checkpoint), run_facts(cfg))
    assert changed == ["the file of data.train changed", "the file of data.eval changed"]


def test_a_resume_compares_the_files_of_a_data_folder(tmp_path):
    """data.train may name a folder of data files (LLaMA-Factory's file_name): only files were hashed, so a run whose
    folder gained, lost or changed a file since its checkpoint resumed on other data in silence."""
    from types import SimpleNamespace

    from deltatune.train.runfolder import facts_changes, run_facts
    from deltatune.train.trainer import SUMS

    folder = tmp_path / "rows"
    folder.mkdir()
    for i in range(2):
        (folder / f"part{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[i::2]), encoding="utf-8")
    cfg = SimpleNamespace(data=SimpleNamespace(train=str(folder), eval=None), model=SimpleNamespace(dtype="float32"))
    facts = run_facts(cfg)
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / SUMS).write_text(json.dumps({"facts": facts}), encoding="utf-8")
    assert facts_changes(str(checkpoint), run_facts(cfg)) == []
    (folder / "notes.md").write_text("not a data file", encoding="utf-8")  # not read, so no change
    assert facts_changes(str(checkpoint), run_facts(cfg)) == []
    (folder / "part1.jsonl").rename(folder / "part0b.jsonl")  # the same bytes in another row order
    assert facts_changes(str(checkpoint), run_facts(cfg)) == ["the file of data.train changed"]
    (folder / "part0b.jsonl").rename(folder / "part1.jsonl")
    (folder / "part2.jsonl").write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    assert facts_changes(str(checkpoint), run_facts(cfg)) == ["the file of data.train changed"]


# -- 3. a t2i base merged from a run on a merged base ------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A diffusers pipeline folder without a VAE: a 16x16 grayscale UNet, a DDPM scheduler, a tiny CLIP text encoder
    (tiny.save_text_to_image_pipeline, as tests/diffusion/test_t2i_text_encoder.py builds it)."""
    pytest.importorskip("diffusers")
    from tiny import save_text_to_image_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    save_text_to_image_pipeline(root)
    return root


def _merge(processor, pipeline: Path, out: Path, seed: int | None) -> None:
    """What ``deltatune merge`` writes for a t2i run: the denoiser, then the processor's files; ``seed``: the run
    trained its text encoder (a LoRA with random B drawn from it), None: it did not."""
    from diffusers import UNet2DConditionModel

    if seed is not None:
        processor.add_text_encoder_lora(dt.LoraConfig(r=4, lora_alpha=8))
        torch.manual_seed(seed)
        for name, p in processor.text_encoder.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
    UNet2DConditionModel.from_pretrained(pipeline / "unet").save_pretrained(out)
    processor.save_pretrained(str(out))


def test_a_t2i_base_merged_onto_a_merged_base_keeps_every_text_encoder_lora(pipeline, tmp_path):
    """M1 = pipeline + run 1's text encoder LoRA L1, M2 = M1 + run 2's L2: M2 encoded captions with the plain encoder
    plus L2 (L1, folded into M1's encoder, was nowhere in M2); a run on M1 that left its encoder alone merged into a
    base with the plain encoder. A run on M1 keeps reloading as it trained (L1 from the base, its own L2 once)."""
    from deltatune.train.t2i import T2IProcessor

    prompt = ["a handwritten digit seven"]
    m1, m2, m2_frozen, run2 = (tmp_path / n for n in ("m1", "m2", "m2_frozen", "run2"))
    _merge(T2IProcessor(str(pipeline)), pipeline, m1, seed=1)
    on_m1 = T2IProcessor(str(m1))
    plain = T2IProcessor(str(pipeline)).condition(prompt, 16)[0]["encoder_hidden_states"]
    with_l1 = on_m1.condition(prompt, 16)[0]["encoder_hidden_states"]
    assert (with_l1 - plain).abs().max() > 1e-3  # L1 matters
    _merge(T2IProcessor(str(m1)), pipeline, m2_frozen, seed=None)
    got = T2IProcessor(str(m2_frozen)).condition(prompt, 16)[0]["encoder_hidden_states"]
    torch.testing.assert_close(got, with_l1, atol=1e-5, rtol=0)
    _merge(on_m1, pipeline, m2, seed=2)
    with_both = on_m1.condition(prompt, 16)[0]["encoder_hidden_states"]  # what run 2 trained and drew with
    assert (with_both - with_l1).abs().max() > 1e-3  # L2 matters
    got = T2IProcessor(str(m2)).condition(prompt, 16)[0]["encoder_hidden_states"]
    torch.testing.assert_close(got, with_both, atol=1e-5, rtol=0)
    # run 2's own folder: reloaded on its base M1, L2 is applied once and L1 comes from the base alone
    on_m1.save_pretrained(str(run2))
    again = T2IProcessor(str(m1))
    assert again.load_text_encoder_lora(str(run2))
    torch.testing.assert_close(again.condition(prompt, 16)[0]["encoder_hidden_states"], with_both, atol=1e-5, rtol=0)


# -- 4. a LoRA a bottleneck adapter wrapped later ----------------------------------------------------------------


def test_a_lora_wrapped_by_a_bottleneck_adapter_writes_its_module_paths(tmp_path):
    """After a bottleneck adapter wrapped the LoRA's layer, save_kohya_lora and save_diffusers_lora wrote the LoRA
    under ``o_proj.base_layer`` (keys no diffusers model has); combine_loras failed with "target_modules=[...
    .base_layer] matches no module". The files are the ones written before the wrapping; combining says why not."""
    from safetensors.torch import load_file

    model = dt.get_delta_model(tiny_model("llama", "causal_lm"), dt.LoraConfig(r=2, lora_alpha=4,
                               target_modules=["o_proj"]), adapter_name="a")  # fmt: skip
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    model.add_adapter("b", dt.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    before = {f: tmp_path / "before" / f for f in ("k.safetensors", "pytorch_lora_weights.safetensors")}
    dt.save_kohya_lora(model, before["k.safetensors"], adapter_name="a")
    dt.save_diffusers_lora(model, tmp_path / "before", "a", "unet")
    model.add_adapter("ad", dt.BottleneckConfig(bottleneck_size=4, target_modules=["o_proj"]))
    assert "base_layer" in next(k for k in model.adapter_state_dict("a"))  # the LoRA now lies one level down
    dt.save_kohya_lora(model, tmp_path / "after" / "k.safetensors", adapter_name="a")
    dt.save_diffusers_lora(model, tmp_path / "after", "a", "unet")
    for f, path in before.items():
        want, got = load_file(path), load_file(tmp_path / "after" / f)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), f
    layers = dict(model.named_modules())
    with pytest.raises(ConfigError, match=r"^combine_loras: model.layers.0.self_attn.o_proj is wrapped by adapter "
                       r"'ad' \(BottleneckLayer\), so no LoRA can be added there"):  # fmt: skip
        dt.combine_loras(model, ["a", "b"], [1.0, 0.5], "ab")
    assert "ab" not in model.peft_config and dict(model.named_modules()).keys() == layers.keys()


def test_set_adapters_keeps_the_alpha_pattern_of_a_lora_a_bottleneck_wrapped():
    """set_adapters read the rank and alpha patterns at the layer's path, ``o_proj.base_layer`` once a bottleneck
    wrapped it, which no pattern matches: weight 1 turned alpha_pattern {o_proj: 8} (scale 4) into lora_alpha 4
    (scale 2), halving the LoRA's update in silence."""
    from deltatune.diffusion import set_adapters

    model = dt.get_delta_model(tiny_model("llama", "causal_lm"), dt.LoraConfig(r=2, lora_alpha=4,
                               target_modules=["o_proj"], alpha_pattern={"o_proj": 8}), adapter_name="a")  # fmt: skip
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    model.add_adapter("ad", dt.BottleneckConfig(bottleneck_size=4, target_modules=["o_proj"]))
    x = tiny_inputs("llama", "causal_lm")
    model.eval()
    with torch.no_grad():
        model.set_adapter("a")
        alone = model(**x).logits
        set_adapters(model, ["a"], [1.0])  # weight 1: the adapter as it is
        weighted = model(**x).logits
    layer = model.get_base_model().model.layers[0].self_attn.o_proj.base_layer
    assert layer.scaling["a"] == 8 / 2
    torch.testing.assert_close(weighted, alone, atol=0, rtol=0)


def test_combine_loras_on_a_model_with_a_bottleneck_elsewhere_is_the_weighted_sum():
    """A bottleneck on other modules changes nothing: the combined LoRA computes w_a delta_a + w_b delta_b."""
    from deltatune.diffusion import set_adapters

    model = dt.get_delta_model(tiny_model("llama", "causal_lm"), dt.LoraConfig(r=2, lora_alpha=4,
                               target_modules=["o_proj"]), adapter_name="a")  # fmt: skip
    model.add_adapter("b", dt.LoraConfig(r=3, lora_alpha=3, target_modules=["o_proj", "q_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    model.add_adapter("ad", dt.BottleneckConfig(bottleneck_size=4, target_modules=["down_proj"]))
    dt.combine_loras(model, ["a", "b"], [1.0, 0.5], "ab")
    x = tiny_inputs("llama", "causal_lm")
    model.eval()
    with torch.no_grad():
        model.set_adapter("ab")
        combined = model(**x).logits
        set_adapters(model, ["a", "b"], [1.0, 0.5])
        summed = model(**x).logits
    torch.testing.assert_close(combined, summed, atol=1e-5, rtol=0)


# -- 5. an assistant turn that only reasons ----------------------------------------------------------------------

U = {"role": "user", "content": "Hi"}


def _trl_template(name: str) -> str:
    trl = pytest.importorskip("trl")
    return (Path(trl.__file__).parent / "chat_templates" / name).read_text(encoding="utf-8")


def test_an_assistant_turn_with_only_a_reasoning_trace_trains_as_trl_marks_it():
    """{"reasoning_content": "...", "content": ""} (Qwen3 data that thinks and answers nothing) was refused as "the
    assistant turn is empty"; Qwen3's template renders the think block, and TRL's generation-tagged copy of it marks
    the same characters for training."""
    from transformers.utils.chat_template_utils import render_jinja_template

    msgs = [U, {"role": "assistant", "reasoning_content": "Just greet them.", "content": ""}]
    s = read_samples([Row({"messages": msgs}, "t.jsonl:1")], stage="sft")[0]
    assert s.messages == msgs
    tok = tokenizer()
    tok.chat_template = _trl_template("qwen3.jinja")
    text, spans = render(s.messages, tok, None)
    ref, marked = render_jinja_template(
        [msgs], chat_template=_trl_template("qwen3_training.jinja"), return_assistant_tokens_mask=True
    )
    assert text == ref[0] and [text[a:b] for a, b in spans] == [ref[0][a:b] for a, b in marked[0]]
    assert "Just greet them." in text[spans[0][0] :]
    ids, labels = encode_chat(s.messages, tok, None)
    assert any(x != -100 for x in labels)
    with pytest.raises(DataError, match=r"messages\[1\]\.reasoning_content: data.template=chatml does not render"):
        render(s.messages, tok, "chatml")  # a template that drops it is still refused


def test_an_earlier_turn_that_only_reasons_trains_what_the_conversation_renders_of_it():
    """Qwen3 leaves an earlier turn's think block out: the turn was refused ("renders this assistant turn unlike the
    same turn ending the conversation ... set data.template to a built-in template", which refuses the trace); it
    trains its end marker as the conversation renders it, as an earlier "Hello." turn trains "Hello.<|im_end|>\n"."""
    tok = tokenizer()
    tok.chat_template = _trl_template("qwen3.jinja")
    msgs = [U, {"role": "assistant", "reasoning_content": "Just greet them.", "content": ""},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Sure."}]  # fmt: skip
    text, spans = render(msgs, tok, None)
    assert "Just greet them." not in text
    assert [text[a:b] for a, b in spans] == ["<|im_end|>\n", "<think>\n\n</think>\n\nSure.<|im_end|>\n"]
    assert text[: spans[0][0]].endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("answer", ["Yes.", "think", "<"])
def test_an_earlier_answer_found_in_the_think_block_the_last_turn_opens_with_is_located(answer):
    """Qwen3 writes "<think>\\n\\n</think>\\n\\n" before the last turn only: an earlier answer "think" (or "<") was
    looked for at its first occurrence, inside that block, and the turn was refused as rendered past recognition."""
    tok = tokenizer()
    tok.chat_template = _trl_template("qwen3.jinja")
    msgs = [U, {"role": "assistant", "content": answer}, {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Sure."}]  # fmt: skip
    text, spans = render(msgs, tok, None)
    assert [text[a:b] for a, b in spans] == [f"{answer}<|im_end|>\n", "<think>\n\n</think>\n\nSure.<|im_end|>\n"]
    assert text[: spans[0][0]] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [U, {"role": "assistant", "content": " ", "reasoning_content": " "}]},
         r"t.jsonl:1: messages\[1\]\.content: the assistant turn is empty"),
        ({"messages": [U, {"role": "assistant", "content": "", "thinking": None}]},
         r"t.jsonl:1: messages\[1\]\.content: the assistant turn is empty"),
    ],
)  # fmt: skip
def test_an_assistant_turn_with_neither_answer_nor_reasoning_is_still_empty(row, message):
    with pytest.raises(DataError, match=rf"^{message}"):
        read_samples([Row(row, "t.jsonl:1")], stage="sft")


def test_preference_pairs_that_differ_in_their_reasoning_alone_are_a_pair():
    """A chosen answer that only reasons was refused as an empty column; two answers alike but reasoned otherwise
    were refused as identical."""
    row = {"prompt": [U], "chosen": [{"role": "assistant", "content": "", "reasoning_content": "Say hi."}],
           "rejected": [{"role": "assistant", "content": "Hello."}]}  # fmt: skip
    s = read_samples([Row(row, "t.jsonl:1")], stage="dpo")[0]
    assert s.chosen[0]["reasoning_content"] == "Say hi."
    row = {"prompt": [U], "chosen": [{"role": "assistant", "content": "Hi.", "reasoning_content": "Greet back."}],
           "rejected": [{"role": "assistant", "content": "Hi.", "reasoning_content": "Ignore it."}]}  # fmt: skip
    assert read_samples([Row(row, "t.jsonl:1")], stage="dpo")[0].rejected[0]["reasoning_content"] == "Ignore it."
    same = {"prompt": [U], "chosen": row["chosen"], "rejected": row["chosen"]}
    with pytest.raises(DataError, match="are identical"):
        read_samples([Row(same, "t.jsonl:1")], stage="dpo")


# -- a checkpoint folder named with a digit int() does not read --------------------------------------------------


def test_checkpoint_folders_named_with_superscript_digits_are_not_checkpoints(tmp_path):
    """``"²".isdigit()`` is True and ``int("²")`` a ValueError: --resume, a run's checkpoint folder and PPO/GRPO's
    rotation took ``checkpoint-²`` for a step (transformers' ``\\d+`` does not)."""
    from deltatune.train.ppo_checkpoint import rotate
    from deltatune.train.runfolder import resume_checkpoint
    from deltatune.train.runs import run_folder

    (tmp_path / "run.yaml").write_text("stage: sft\n")
    for name in ("checkpoint-²", "checkpoint-2", "checkpoint-4"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text("{}")
    assert resume_checkpoint(str(tmp_path))[0] == str(tmp_path / "checkpoint-4")
    assert run_folder(str(tmp_path / "checkpoint-²")) is None and run_folder(str(tmp_path / "checkpoint-4"))
    rotate(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-²", "run.yaml"]


def test_rotation_removes_a_checkpoint_named_with_leading_zeros(tmp_path):
    for name in ("checkpoint-007", "checkpoint-8"):
        (tmp_path / name).mkdir()
    from deltatune.train.ppo_checkpoint import rotate

    rotate(str(tmp_path), 1)
    assert os.listdir(tmp_path) == ["checkpoint-8"]


def test_a_saving_folder_named_with_a_superscript_pid_is_left_alone(tmp_path):
    from deltatune.files import SAVING, _host, remove_stale_saves

    (tmp_path / f"{SAVING}²@{_host()}~x").mkdir()  # "²".isdigit(), and int("²") a ValueError
    remove_stale_saves(str(tmp_path))
    assert os.listdir(tmp_path) == [f"{SAVING}²@{_host()}~x"]
