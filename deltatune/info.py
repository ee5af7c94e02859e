"""``deltatune info``: what a model is, what each method would adapt in it, and what it would cost."""

from __future__ import annotations

import json
import os
import sys

import torch

from . import registry
from .config import ConfigError
from .model import get_delta_model
from .targets import IA3_TARGETS, LORA_TARGETS, model_type


def _build(name: str, task: str | None):
    from transformers import AutoConfig

    from .train.checks import check_model_path
    from .train.models import TASKS, auto_class, resolve_path

    if task is not None and task not in TASKS:
        raise ConfigError(f"--task {task!r}: one of {', '.join(TASKS)}")
    if not name.strip():  # (the hub client's "Repo id must use alphanumeric chars" for '')
        raise ConfigError(f"model {name!r} is empty: give a model folder, a hub id or 'minilm'")
    check_model_path(name, "model")
    folder = resolve_path(name)
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):  # a run or an adapter, not a model
        from .train.run import adapter_field

        base = adapter_field(folder, "base_model_name_or_path")
        raise ConfigError(
            f"{name!r} is an adapter folder (adapter_config.json); info describes a base model"
            + (f": its base is {base!r}" if base else "")
        )
    if os.path.isfile(os.path.join(folder, "run.yaml")) and not os.path.isfile(os.path.join(folder, "config.json")):
        # (a run with no adapter at its top yet: it read "the folder holds no config.json", as for a broken model)
        raise ConfigError(_run_folder(name, folder))
    if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "config.json")):
        pipeline = os.path.isfile(os.path.join(folder, "model_index.json"))  # a diffusers pipeline: its parts have one
        raise ConfigError(
            f"model {name!r}: the folder holds no config.json"
            + ("; it is a diffusers pipeline (model_index.json): name its denoiser's subfolder" if pipeline else "")
        )
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)  # (None: asks on stdin)
    except (OSError, ValueError) as exc:  # a folder without config.json, an unknown model_type
        raise ConfigError(f"model {name!r}: {str(exc).splitlines()[0]}") from None
    archs = " ".join(getattr(config, "architectures", None) or [])
    guess = (
        task
        or ("IMAGE_CLS" if "ImageClassification" in archs else None)
        or ("SEQ_2_SEQ_LM" if config.is_encoder_decoder else None)
        or ("CAUSAL_LM" if "CausalLM" in archs or "LMHead" in archs else "SEQ_CLS")
    )
    # A guess that does not build (a vision config read as a text classifier) falls through to the task that does.
    for candidate in [guess] if task else [guess, *(t for t in TASKS if t != guess)]:
        try:
            with torch.device("meta"):  # shapes only: no memory, no weights read
                return auto_class(candidate).from_config(config), candidate
        except ValueError:
            continue
    mtype = getattr(config, "model_type", "?")
    raise ConfigError(
        f"--task {task} does not fit model {name!r} (model_type {mtype})" if task
        else f"model {name!r}: no task's auto class builds model_type {mtype}"
    )  # fmt: skip


ADAPTER = "adapter_config.json"


def _run_folder(name: str, folder: str) -> str:
    """What a run folder with no adapter at its top is: one its checkpoints hold so far (the newest named), or none
    saved yet; and its base, read from its run.yaml (model.name_or_path), where it reads."""
    from .train.runs import read_recipe

    steps = [n.removeprefix("checkpoint-") for n in _listdir(folder) if n.startswith("checkpoint-")]
    saved = [
        int(s) for s in steps if s.isdecimal() and os.path.isfile(os.path.join(folder, f"checkpoint-{s}", ADAPTER))
    ]
    try:
        model = read_recipe(folder).get("model")
        base = model.get("name_or_path") if isinstance(model, dict) else None
    except ConfigError:  # (not YAML, not a mapping: the base unread, as before)
        base = None
    where = "no adapter saved in it yet"
    if saved:  # (the Trainer saves the adapter into each checkpoint-N; the run's top gets it when it ends)
        where = (
            f"its adapter in checkpoints alone so far (the newest: {os.path.join(name, f'checkpoint-{max(saved)}')!r})"
        )
    return f"{name!r} is a run folder (run.yaml) with {where}; info describes a base model: " + (
        f"its base is {base!r}" if isinstance(base, str) and base else "give the run's model.name_or_path"
    )


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def describe(name: str, task: str | None = None) -> str:
    """A text table: family, default targets, and trainable parameters of every registered method's defaults."""
    model, task = _build(name, task)
    mtype = model_type(model)
    total = sum(p.numel() for p in model.parameters())
    lines = [
        f"model: {name}",
        f"family (model_type): {mtype}    task: {task}",
        f"parameters: {total:,d} ({total * 4 / 2**20:,.1f} MiB in fp32, {total * 2 / 2**20:,.1f} MiB in bf16)",
        f"default LoRA targets: {', '.join(LORA_TARGETS.get(mtype, [])) or 'none (pass target_modules)'}",
        f"default IA3 targets: {', '.join(IA3_TARGETS.get(mtype, [])) or 'none (pass target_modules)'}",
        "% of total: of every parameter once the method is in, its own too (peft's print_trainable_parameters)",
        "",
        "| method (defaults) | trainable params | % of total |",
        "|---|---:|---:|",
    ]
    for method in registry.names():
        fresh, _ = _build(name, task)
        try:
            image = task in ("IMAGE_CLS", "IMAGE_TO_TEXT")  # PEFT has no image task type: runs record none
            delta = get_delta_model(fresh, registry.get(method).config_class(task_type=None if image else task))
            trainable, everything = delta.get_nb_trainable_parameters()  # (everything: the method's too, as peft's)
            lines.append(f"| {method} | {trainable:,d} | {100 * trainable / everything:.4f} |")
        except (ConfigError, TypeError, ValueError) as exc:
            why = str(exc).splitlines()[0].split("; ")[0]  # its first clause: a table cell, not the whole advice
            lines.append(f"| {method} | n/a: {why if len(why) <= 120 else why[:117] + '...'} | |")
    return "\n".join(lines)


TEMPLATE_STAGES = ("sft", "rm", "dpo", "ppo", "grpo", "kto", "orpo", "simpo", "cpo")
"""The stages whose rows a built-in ``data.template`` renders (pt, cls, tag, seq2seq and the image stages read none)."""


def merged_chat_template(adapter: str, tok) -> str | None:
    """The jinja chat template ``merge`` saves with the run's tokenizer: the run's built-in ``data.template``
    (``chat_template_jinja``), as LLaMA-Factory's export writes its template's, opened by the special tokens the
    tokenizer put before each row it trained on (Llama's BOS, BERT's [CLS]: ``encode_chat`` tokenizes a built-in
    template's text with them), written so that the ids are the run's (``"<s> "`` for a Metaspace "first" tokenizer).
    None (the tokenizer's own kept): no built-in template, a stage that reads none, a processor (a vision-language
    run: no ``eos_token``), or leading tokens no text before the template gives (said on stderr)."""
    from .data.preference import special_ends
    from .data.templates import render
    from .train.runs import read_recipe, run_template

    template = run_template(adapter)
    if template is None or not hasattr(tok, "eos_token"):
        return None
    if read_recipe(adapter).get("stage", "sft") not in TEMPLATE_STAGES:
        return None
    head, tail = special_ends(tok)  # (a closing one, BERT's [SEP], ends no prompt: no template can write it)
    bos = "".join(tok.convert_ids_to_tokens(head))
    # The text that opens the template: the one whose ids, with the sample's, are those the run trained on. A
    # Metaspace "first" tokenizer (Llama-2's and Mistral's in transformers 5, unless legacy) marks a word with its "▁"
    # only at offset 0: trained "<s>", "▁Below", where "<s>Below" reads "<s>", "B", "elow"; "<s> " opens its template,
    # "<s>" a legacy one's (which "<s> " gives "▁▁Below").
    samples = [render(m, tok, template, add_generation_prompt=m[-1]["role"] != "assistant")[0] for m in _PROBES]
    for text in dict.fromkeys((bos, bos + " ") if bos else ("",)):
        if all(tok(text + t, add_special_tokens=False)["input_ids"] == tok(t)["input_ids"][: -len(tail) or None]
               for t in samples):  # fmt: skip
            return chat_template_jinja(template, tok.eos_token, text)
    print(f"deltatune merge: no text before data.template={template}'s gives the ids the run trained with (this "
          f"tokenizer adds {bos!r}); the base tokenizer's chat template is kept", file=sys.stderr)  # fmt: skip
    return None


_PROBES = [
    [{"role": "user", "content": "Hi there, how are you?"}, {"role": "assistant", "content": "Fine, thanks."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
]
"""The conversations ``merged_chat_template`` tokenizes to find the text that opens the template."""


def chat_template_jinja(template: str, eos: str | None, bos: str = "") -> str | None:
    """The built-in ``data.template`` as a jinja chat template, rendering as ``data.templates.render`` does (each
    answer closed by ``eos``; the default system where the conversation has none), after ``bos`` (the tokenizer's
    leading special tokens, which ``apply_chat_template(tokenize=True)`` does not add); tool calls, ``tools``, roles
    other than system, user and assistant, and content that is no text raise, as ``render`` refuses them. None for
    ``raw`` (plain text, no chat format) and a name that is no built-in template."""
    from .data.templates import TEMPLATES

    t, eos = TEMPLATES.get(template), eos or ""
    if t is None:
        return None

    def lit(text: str) -> str:  # (jinja reads JSON's string escapes; ensure_ascii would split an emoji in two)
        return json.dumps(text, ensure_ascii=False)

    def around(pattern: str) -> tuple[str, str]:
        return tuple(lit(part) for part in pattern.split("{content}"))

    (s0, s1), (u0, u1), (a0, a1) = around(t.system), around(t.user), around(t.assistant)
    suffix = t.assistant.split("{content}")[1]
    a1 = lit(eos + (suffix[len(eos) :] if eos and suffix.startswith(eos) else suffix))
    default = lit(t.system.format(content=t.default_system) if t.default_system else "")
    tools = lit(f"data.template={template} has no tool support (tool calls need a chat template that renders them)")
    role = lit(f"data.template={template} renders system, user and assistant turns, not ")
    parts = lit(f"data.template={template} renders text, not a list of parts (a vision-language chat template's)")
    none = lit(f"data.template={template} renders text, not None")
    return (
        f"{{{{ {lit(bos)} }}}}"
        "{%- if not (messages and messages[0]['role'] == 'system' and messages[0]['content']) %}"
        f"{{{{ {default} }}}}{{%- endif %}}"
        "{%- for m in messages %}{%- if tools or m['role'] == 'tool' or m['tool_calls'] %}"
        f"{{{{ raise_exception({tools}) }}}}"
        "{%- elif m['role'] not in ('system', 'user', 'assistant') %}"
        f"{{{{ raise_exception({role} + m['role']) }}}}"
        f"{{%- elif m['content'] is none or m['content'] is undefined %}}{{{{ raise_exception({none}) }}}}"
        f"{{%- elif m['content'] is not string %}}{{{{ raise_exception({parts}) }}}}"
        "{%- elif m['role'] == 'assistant' %}"
        f"{{{{ {a0} + m['content'] + {a1} }}}}"
        f"{{%- elif m['role'] == 'user' %}}{{{{ {u0} + m['content'] + {u1} }}}}"
        f"{{%- elif m['content'] %}}{{{{ {s0} + m['content'] + {s1} }}}}"
        "{%- endif %}{%- endfor %}"
        f"{{%- if add_generation_prompt %}}{{{{ {lit(t.generation_prefix)} }}}}{{%- endif %}}"
    )
