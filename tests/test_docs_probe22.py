"""The docs tell the truth (probe 22): what README.md and docs/*.md name exists in the code with that spelling, their
links resolve, their tables list what the code has, and their Python examples run as written on tiny models.

docs/BENCHMARKS.md's measured figures are not checked here; its links are."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROSE = [p for p in DOCS if p.name != "BENCHMARKS.md"]


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _no_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', '-1', '-2' for repeats."""
    out, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*$", _no_code(_text(path)), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _blocks(path: Path, lang: str) -> list[tuple[int, str]]:
    """(first line, body) of each fenced block of ``lang`` in ``path``."""
    text = _text(path)
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in re.finditer(rf"```{lang}\n(.*?)```", text, re.S)]


def _block_with(name: str, needle: str) -> str:
    return next(body for _, body in _blocks(ROOT / name, "python") if needle in body)


def test_every_relative_link_and_anchor_resolves():
    bad = []
    for doc in DOCS:
        for link in re.findall(r"\]\(([^)\s]+)\)", _no_code(_text(doc))):
            if link.startswith(("http:", "https:", "mailto:")):
                continue
            path, _, anchor = link.partition("#")
            target = (doc.parent / path) if path else doc
            if not target.exists():
                bad.append(f"{doc.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                bad.append(f"{doc.name}: {link} (no such heading)")
    assert not bad, bad


def test_every_repository_path_the_docs_name_exists():
    """tests/..., deltatune/..., benchmarks/..., recipes/... as written (globs and the made-up method aside)."""
    bad = []
    for doc in PROSE:
        for path in set(re.findall(r"\b((?:tests|deltatune|benchmarks|recipes)/[\w/.*{},-]*\w)", _text(doc))):
            if path.startswith("deltatune/methods/scaletune") or path == "deltatune/PEFT":  # (prose: "deltatune/PEFT")
                continue
            if not re.search(r"[*{]", path) and not (ROOT / path).exists():  # (a glob: recipes/data/arithmetic-*)
                bad.append(f"{doc.name}: {path}")
    assert not bad, bad


def _recipe_keys() -> dict[str, set[str]]:
    from deltatune import registry
    from deltatune.train.config import field_help

    keys = {section: {k for k, _, _ in rows} for section, rows in field_help().items()}
    keys["method"] = {"name", "towers"}  # (towers: read by the recipe's method section, deltatune.towers)
    for name in registry.METHODS:
        keys["method"] |= {f.name for f in dataclasses.fields(registry.get(name).config_class)}
    return keys


REFUSED_ON_PURPOSE = {"train.learning_rate"}  # training.md: a TrainingArguments name, refused naming train.lr
NOT_RECIPE_KEYS = {"data.inspect", "train.models", "model.py", "train.jsonl", "train.csv", "output.dense", "model.norm",
                   "model.active_adapters", "model.generate", "model.language_model", "model.load_adapter",
                   "model.loss_function"}  # fmt: skip
"""Written so in the docs but modules, files and model attributes, not recipe keys."""


def test_every_recipe_key_the_docs_name_exists():
    keys = _recipe_keys()
    bad = []
    for doc in PROSE:
        text = _text(doc)
        for m in re.finditer(r"`(model|data|train|align|output|method)\.([a-z_0-9]+)(?=[`:= \[])", text):
            section, key = m.groups()
            if key not in keys[section] and f"{section}.{key}" not in REFUSED_ON_PURPOSE | NOT_RECIPE_KEYS:
                bad.append(f"{doc.name}:{text.count(chr(10), 0, m.start()) + 1}: {section}.{key}")
    assert not bad, bad


def test_every_cli_flag_the_docs_give_a_deltatune_command_exists():
    import argparse

    from deltatune.cli_parser import _parser

    commands: dict[str, set[str]] = {}
    for action in _parser(["train"])._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands[name] = {o for a in sub._actions for o in a.option_strings}
                for inner in (a for a in sub._actions if isinstance(a, argparse._SubParsersAction)):
                    for name2, sub2 in inner.choices.items():
                        commands[f"{name} {name2}"] = {o for a in sub2._actions for o in a.option_strings}
    bad, seen = [], 0
    for doc in PROSE:
        for line in _text(doc).splitlines():
            for m in re.finditer(
                r"deltatune (data inspect|train|eval|generate|chat|merge|info|serve|board)\b([^`|]*)", line
            ):
                seen += 1
                for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2)):
                    if flag not in commands[m.group(1)]:
                        bad.append(f"{doc.name}: deltatune {m.group(1)} {flag}")
    assert seen > 20 and not bad, bad


def test_every_module_under_deltatune_is_in_architecture_md():
    from deltatune.registry import METHODS

    text = _text(ROOT / "docs/architecture.md")
    missing = []
    for path in sorted((ROOT / "deltatune").rglob("*.py")):
        rel = path.relative_to(ROOT / "deltatune")
        if rel.name == "__init__.py":
            named = f"{rel.parent.as_posix()}/" in text or f"`{rel.parent.as_posix()}`" in text
        elif rel.parts[0] == "methods" and rel.stem in METHODS:
            named = f"`{rel.stem}`" in text  # the one vocabulary: registry name = file name in methods/
        else:
            top = f"`{rel.stem}`" in text if len(rel.parts) == 1 else False  # a unit of the arrows' table
            named = top or rel.name in text or f"{rel.parent.as_posix()}/{rel.name[:5]}*.py" in text
        if not named:
            missing.append(rel.as_posix())
    assert not missing, missing


def test_training_md_recipe_table_lists_every_recipe():
    text = _text(ROOT / "docs/training.md")
    table = text[text.index("| recipe | stage |") : text.index("\n\n", text.index("| recipe | stage |"))]
    named = set(re.findall(r"`([\w-]+\.yaml)`", table))
    for pattern in re.findall(r"`([\w-]+)-\{([\w,]+)\}\.yaml`", table):
        named |= {f"{pattern[0]}-{v}.yaml" for v in pattern[1].split(",")}
    assert sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")) == sorted(named)


def test_training_md_stage_comment_and_output_samples_name_the_code_stages():
    from deltatune.train.config_read import READ_BY
    from deltatune.train.table import STAGES

    text = _text(ROOT / "docs/training.md")
    comment = re.search(r"^stage: cls +# (.*)$", text, flags=re.M).group(1)
    assert comment.split(" | ") == list(STAGES)
    samples = re.search(r"`output\.samples: N` \(([^;]*);", text).group(1)
    assert samples.split(", ") == next(s for s, keys in READ_BY if "output.samples" in keys.split()).split()


def test_data_formats_table_names_every_stage_that_reads_a_format():
    from deltatune.data.formats import FORMATS, STAGE_FORMATS

    text = _text(ROOT / "docs/data-formats.md")
    rows = dict(re.findall(r"^\| (\w+) \| ([^|]*) \| `data\.format", text, flags=re.M))
    assert set(rows) == set(FORMATS)
    for fmt, cell in rows.items():
        readers = {stage for stage, formats in STAGE_FORMATS.items() if fmt in formats}
        assert readers <= set(re.findall(r"\w+", cell)), (fmt, readers - set(re.findall(r"\w+", cell)))


def test_data_formats_examples_are_detected_as_the_format_they_show(tmp_path):
    """Each JSON example row of data-formats.md is read as the format its paragraph names."""
    from deltatune.data.formats import detect
    from deltatune.data.load import Row

    expected = ["alpaca", "sharegpt", "messages", "prompt_completion", "preference", "alpaca_preference",
                "preference_implicit", "sharegpt_preference", "unpaired", "messages"]  # fmt: skip
    blocks = _blocks(ROOT / "docs/data-formats.md", "json")
    assert len(blocks) == len(expected)
    for (line, body), fmt in zip(blocks, expected):
        for row in body.strip().splitlines():
            assert detect(Row(json.loads(row), f"data-formats.md:{line}")) == fmt, (line, row)


def test_every_python_example_parses():
    """A fragment may leave parts out (`...`), but as Python: `... train ...` was a SyntaxError in qlora.md."""
    bad = []
    for doc in PROSE:
        for line, body in _blocks(doc, "python"):
            try:
                ast.parse(textwrap.dedent(body))
            except SyntaxError as exc:
                bad.append(f"{doc.name}:{line + (exc.lineno or 0)}: {exc.msg}")
    assert not bad, bad


def _run(name: str, needle: str, **namespace) -> dict:
    exec(compile(_block_with(name, needle), name, "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


def _tiny(family: str = "llama"):
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_model

    return tiny_model(family)


def test_lora_and_token_method_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lora = _run("docs/lora.md", "runs/my-lora", base=_tiny())
    assert (tmp_path / "runs/my-lora/adapter_model.safetensors").is_file()
    assert not any(type(m).__module__.startswith("deltatune") for m in lora["plain"].modules())
    tokens = _run("docs/methods-token.md", "PromptTuningConfig(", base=_tiny())
    assert tokens["model"].peft_config["default"].task_type == "TOKEN_CLS"


def _tiny_folder(tmp_path) -> str:
    """A tiny llama whose linear layers quantise (in_features a multiple of the 64-wide block)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import save_tiny

    return save_tiny(tmp_path / "base", hidden_size=64, intermediate_size=128)


def test_qlora_examples_run(tmp_path, monkeypatch):
    """qlora.md's Use block (its `... train ...` placeholder a comment) and its LoftQ block, whose second way
    quantised the base the first way had already adapted (QuantizationError: the model has adapters already)."""
    pytest.importorskip("bitsandbytes")
    import transformers

    monkeypatch.chdir(tmp_path)
    folder = _tiny_folder(tmp_path)
    batch = {"input_ids": torch.randint(0, 100, (2, 8))}
    use = _run(
        "docs/qlora.md",
        "dt.merge_quantized(",
        AutoModelForCausalLM=transformers.AutoModelForCausalLM,
        path=folder,
        batch=batch,
    )
    assert (tmp_path / "out/adapter/adapter_model.safetensors").is_file() and use["report"] is not None
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    import deltatune as dt

    loftq = _run("docs/qlora.md", "dt.replace_lora_weights_loftq(", dt=dt, base=base, model_path=folder,
                 AutoModelForCausalLM=transformers.AutoModelForCausalLM)  # fmt: skip
    model = loftq["model"]  # the second way's: LoftQ's B A on the 4-bit base, not LoRA's zero B
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())


def test_adding_a_method_example_registers_and_trains(tmp_path, monkeypatch):
    """adding-a-method.md's ScaleTune file, as written, behind registry.register: starts as the base, merges."""
    import deltatune.methods  # noqa: F401
    from deltatune import registry

    module = types.ModuleType("deltatune.methods.scaletune")
    module.__package__ = "deltatune.methods"
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(
        compile(_block_with("docs/adding-a-method.md", "class ScaleTuneConfig"), "adding-a-method.md", "exec"),
        module.__dict__,
    )  # noqa: S102
    registry.register("scaletune", module.__name__)
    try:
        import deltatune as dt

        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import output_of, tiny_inputs

        base, inputs = _tiny(), tiny_inputs("llama")
        before = output_of(base, inputs)
        model = dt.get_delta_model(base, module.ScaleTuneConfig(task_type="CAUSAL_LM"))
        assert torch.equal(output_of(model, inputs), before)
        changed = dt.get_delta_model(_tiny(), module.ScaleTuneConfig(task_type="CAUSAL_LM", init_zero=False))
        out = output_of(changed, inputs)
        changed.merge_adapter()
        torch.testing.assert_close(output_of(changed, inputs), out, rtol=0, atol=1e-5)
        changed.save_pretrained(str(tmp_path / "st"))
        assert json.loads((tmp_path / "st/adapter_config.json").read_text())["peft_type"] == "SCALETUNE"
    finally:
        registry.METHODS.pop("scaletune", None)
        method = registry._LOADED.pop("scaletune", None)
        registry._BY_PEFT_TYPE.pop("SCALETUNE", None)
        if method is not None:
            registry._BY_CLASS.pop(method.config_class, None)


def test_diffusion_sd3_example_writes_a_t2i_folder(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/digits").mkdir(parents=True)
    _run("docs/diffusion.md", "SD3Transformer2DModel(")
    assert json.loads((tmp_path / "data/digits/sd3-init/t2i.json").read_text()) == {"text_encoder": "minilm"}


def test_training_md_trainer_and_trl_example_runs(tmp_path, monkeypatch):
    """training.md's dt.Trainer / dt.trl_trainer block, one step each. Its SFTConfig("out") was refused on a machine
    without a GPU (TRL's default bf16=True: transformers' "Your setup doesn't support bf16/gpu")."""
    pytest.importorskip("trl")
    import datasets
    import transformers

    import deltatune as dt

    monkeypatch.chdir(tmp_path)
    base = transformers.AutoModelForCausalLM.from_pretrained(_tiny_folder(tmp_path))
    delta_model = dt.get_delta_model(base, dt.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    ids = torch.randint(5, 100, (2, 6)).tolist()
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    source = _block_with("docs/training.md", "dt.trl_trainer(SFTTrainer)").replace(
        "max_steps=100", "max_steps=1, report_to=[]"
    )
    source = source.replace('SFTConfig("out", ', 'SFTConfig("out", max_steps=1, report_to=[], ')
    namespace = {"dt": dt, "delta_model": delta_model, "TrainingArguments": transformers.TrainingArguments,
                 "ds": datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}),
                 "chat_rows": datasets.Dataset.from_list([{"messages": chat}] * 2)}  # fmt: skip
    exec(compile(source, "training.md:239", "exec"), namespace)  # noqa: S102 - our own docs
    assert (tmp_path / "out/checkpoint-1/adapter_model.safetensors").is_file()
    assert namespace["trainer"].state.global_step == 1


def test_serve_md_routes_are_the_apps_routes():
    """serve.md's route table names every route serve/app.py answers (the board's own /api routes aside), and no
    other."""
    source = _text(ROOT / "deltatune/serve/app.py")
    app = {f"{verb.upper()} {path}" for verb, path in re.findall(r'@app\.(get|post|delete)\("([^"]+)"', source)}
    documented = set(re.findall(r"`((?:GET|POST|DELETE) /[^` ]+)", _text(ROOT / "docs/serve.md")))
    assert documented == {r for r in app if not r.startswith(("GET /api", "GET /static")) and r != "GET /"}


def test_every_python_file_architecture_md_names_exists():
    """A file named in architecture.md (`_folding.py`, `train/ppo_math.py`, ...) is one of the repository's."""
    names = {p.name for d in ("deltatune", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")}
    named = set(re.findall(r"([\w]+\.py)\b", _text(ROOT / "docs/architecture.md")))
    assert named - names <= {"make_*.py"}, named - names


def test_data_inspect_of_a_file_of_bad_pairs_only_is_one_line(tmp_path):
    """data-formats.md's "chosen == rejected" row, the file's only row, under `deltatune data inspect --stage dpo`:
    an IndexError (samples[0] of no sample) instead of one line naming the file and its bad rows."""
    from deltatune.data.formats import DataError
    from deltatune.data.inspect import inspect

    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl: every row is a bad pair .*train\.jsonl:1$"):
        inspect(str(path), None, "dpo", 512, None, None)


def test_readme_links_every_page_of_docs():
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", _text(ROOT / "README.md")))
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")}
