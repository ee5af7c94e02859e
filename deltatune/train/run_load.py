"""A trained run loaded back: its base rebuilt as the run trained it, with the saved adapter, for ``generate``,
``chat``, ``merge`` and the reward scorers (a run folder, one of its checkpoint-N, or a plain peft adapter folder);
``merge`` folds it into its base, and ``merged_chat_template`` gives the merged tokenizer the run's built-in
``data.template`` as jinja (moved from info.py, the ``deltatune info`` tables, where it was written first).

``load_generator`` and ``load_captioner`` refuse, before any model loads, a run that does not generate what the
command asks; ``run_task`` and ``adapter_field`` read a folder without loading a model. ``_quantize`` (the recipe's
``model.quantization``) is shared with ``run.py``, which builds the base the same way when a run starts.
Split from run.py in session 46 to give it headroom; it imports nothing of run.py (run.py re-exports
``load_adapter_model`` and ``adapter_field`` for the modules that read them there).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

from ..config import ConfigError
from ..model import DeltaModel
from .checks import check_model_path
from .cls import set_problem_type
from .config import build
from .models import load_model, load_processor, reload_as_trained
from .runs import folder_with, prefix_space_trained, read_recipe, run_file, run_template
from .table import IMAGE_STAGES, TASK_OF_STAGE


def _quantize(model: torch.nn.Module, quantization: dict | None, *, trained: bool | str = False) -> torch.nn.Module:
    """The base quantised as the recipe's ``model.quantization`` says (QLoRA), or as it is. ``trained``: the base of
    a run that trained already (reloaded, resumed; its folder or a checkpoint of it, or True): one with no linear
    layer to quantise stays in full precision, as it trained before quantize refused such a model (5861694); a new
    run is refused. A trained run's skip_modules or _keep_in_fp32_modules entry naming a module (kept nothing before
    2026-12-07, keeps the layers in it since) gets a one-line note, unless its folder's marks (runfolder.MARKS) say
    it began under that rule."""
    if not quantization:
        return model
    from .. import quantize
    from ..methods._quant_skip import skip_changes
    from ..methods.quant_tools import NothingToQuantize
    from .runfolder import MARKS
    from .runs import run_folder

    folder = run_folder(trained) if isinstance(trained, str) and os.path.isdir(trained) else None
    try:  # (a mark unread: the note, as for a run from before)
        with open(os.path.join(folder, MARKS), encoding="utf-8") as fh:  # type: ignore[arg-type]
            ruled = json.load(fh).get("quant_skip_rule", 1) >= 2
    except (OSError, TypeError, ValueError, AttributeError):
        ruled = False
    for what, entry, n in skip_changes(model, quantization.get("skip_modules")) if trained and not ruled else []:
        print(f"deltatune: note: {what} {entry!r} names a module: since 2026-12-07 its {n} layers stay in full "
              "precision; this run, if trained before, may have trained them in 4 bits", file=sys.stderr)  # fmt: skip
    try:
        result = quantize(model, **quantization)
    except NothingToQuantize:
        if trained:
            return model
        raise
    return result[0] if isinstance(result, tuple) else result


MERGE_PROBE = ("The quick brown fox jumps over the lazy dog.", "Adapters are small; the base model is large.")
"""The text on which ``merge`` measures what merging a 4-bit model changed."""


def merge(delta: DeltaModel, tok) -> tuple[torch.nn.Module, Any]:
    """The adapter folded into its base: (plain model, None), or for a 4-bit base (QLoRA) the model dequantised
    and merged with the report of the error that made (``merge_quantized``: logits against the 4-bit adapter model
    on ``MERGE_PROBE``)."""
    from ..layer import NotMergeable
    from ..methods.quant import is_quantized

    try:
        if not any(is_quantized(m) for m in delta.modules()):
            return delta.merge_and_unload(), None
        from ..methods.quant_tools import merge_quantized

        enc, config = tok(list(MERGE_PROBE), return_tensors="pt", padding=True), delta.get_base_model().config
        probe = {k: enc[k].to(next(delta.parameters()).device) for k in ("input_ids", "attention_mask")}
        if getattr(config, "is_encoder_decoder", False):  # the decoder reads its start token
            probe["decoder_input_ids"] = torch.full_like(probe["input_ids"][:, :1], config.decoder_start_token_id or 0)
        return merge_quantized(delta, probe)
    except NotMergeable as exc:  # a token method or an adapter with modules of its own
        raise ConfigError(f"cannot merge: {exc.why}; use the adapter as it is (generate, serve)") from None


def load_adapter_model(adapter_dir: str, model: str | None = None, merged: bool = False,
                       trust_remote_code: bool = False, dtype: str | None = None):  # fmt: skip
    """Base model + the adapter saved in ``adapter_dir`` (a run folder or a plain adapter folder) and its tokenizer.
    The base: ``model``, else the run's recipe's, else the adapter config's; in ``dtype``, else the run's model.dtype
    (a plain folder: float32), its adapter as the run trained it (``reload_as_trained``); ``merged``: folded in.

    Remote model code runs only with ``trust_remote_code=True`` from the caller; a run folder's run.yaml saying
    ``trust_remote_code: true`` is ignored (a folder someone sends you must not run code)."""
    from ..registry import from_pretrained

    config = from_pretrained(adapter_dir)
    recipe_path = run_file(adapter_dir)
    labels, num_labels = None, None
    if recipe_path:
        cfg = build(read_recipe(adapter_dir), where=recipe_path)
        name, task, labels = model or cfg.model.name_or_path, TASK_OF_STAGE[cfg.stage], cfg.data.labels
        num_labels = cfg.model.num_labels
    else:
        name, task = model or config.base_model_name_or_path, config.task_type or "CAUSAL_LM"
    if not name:
        raise ConfigError(f"{adapter_dir!r} does not say which base model it was trained on; pass --model")
    try:
        check_model_path(name, "--model" if model else f"the base model of {adapter_dir!r}")
    except ConfigError as exc:
        if model or not str(exc).endswith(": no such folder"):  # (a file, or a hub id offline: not a moved base)
            raise
        # (a run folder copied to another machine, or its base moved: the recorded path is gone; --model overrides)
        raise ConfigError(f"{exc}; if the base moved, pass --model with where it is now") from None
    stage = cfg.stage if recipe_path else "sft"
    saved = "preprocessor_config.json" if stage in IMAGE_STAGES else "tokenizer_config.json"
    tok_dir = folder_with(adapter_dir, saved) if stage != "t2i" else None  # t2i: the base has the UNet's
    encoder = cfg.model.text_encoder if recipe_path else None
    revision, attn = recorded_load(cfg.model if recipe_path else config, model)
    tok = load_processor(tok_dir or name, stage, trust_remote_code, encoder, None if tok_dir else revision)
    if stage == "t2i":  # a run that trained its text encoder too (model.train_text_encoder) saved that LoRA beside
        tok.load_text_encoder_lora(adapter_dir)
        tok.use_run_scheduler(adapter_dir)  # the prediction_type it trained with (train.prediction_type)
    quantized = bool(recipe_path and cfg.model.quantization)  # rebuilt from the dtype it was quantised from
    base = load_model(
        name,
        task,
        dtype=dtype if dtype and not quantized else cfg.model.dtype if recipe_path else "float32",
        num_labels=len(labels) if labels else num_labels,  # the head as saved (older runs may record more)
        id2label=dict(enumerate(labels)) if labels else None,
        trust_remote_code=trust_remote_code,
        pad_token_id=getattr(tok, "pad_token_id", None),
        revision=revision,
        attn_implementation=attn,
    )
    if stage == "tag" and tok_dir is None and prefix_space_trained(adapter_dir):  # (a checkpoint of an unfinished
        from .tag import prefix_space  # run holds no tokenizer: the base's, read as the run read its words)

        prefix_space(tok, base.config)  # (in place: merge saves it so)
    if recipe_path:  # a QLoRA run's adapter on the 4-bit base it was trained on; cls's problem type
        base = set_problem_type(_quantize(base, cfg.model.quantization, trained=adapter_dir), cfg)
    delta = DeltaModel.from_pretrained(base, adapter_dir)
    reload_as_trained(delta, adapter_dir)
    return (merge(delta, tok)[0] if merged else delta), tok


def recorded_load(recorded: Any, model: str | None) -> tuple[str | None, str | None]:
    """(revision, attn_implementation) to load the base with: as the run trained it (its recipe's ``model``), or a
    plain adapter folder's ``revision`` (peft's AutoPeftModel loads base_model_revision = its config's revision); the
    revision only for the base recorded (``model`` None or that same name: another folder or hub id loads as it is),
    and none for a local folder (peft's revision there, which transformers ignores: the folder's files load)."""
    from . import embedded

    base = getattr(recorded, "name_or_path", None) or getattr(recorded, "base_model_name_or_path", None)
    revision = getattr(recorded, "revision", None) if model is None or model == base else None
    revision = None if base and os.path.isdir(embedded.resolve(base)) else revision
    return revision, getattr(recorded, "attn_implementation", None)


def run_task(adapter_dir: str) -> tuple[str | None, str | None]:
    """(task type, stage) of a run or adapter folder, read without loading any model."""
    if run_file(adapter_dir):
        stage = read_recipe(adapter_dir).get("stage")
        return TASK_OF_STAGE.get(stage), stage
    return adapter_field(adapter_dir, "task_type"), None


def adapter_field(adapter_dir: str, key: str) -> Any:
    """One field of a folder's adapter_config.json, None when it or the file is missing or unreadable (the loader
    names what is wrong)."""
    import json

    try:
        with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return None
    return config.get(key) if isinstance(config, dict) else None


def load_captioner(adapter_dir: str, model: str | None, trust_remote_code: bool, prompt: bool = False):
    """The adapted captioner and its processor for ``generate --image`` (a decoder-only model's with the run's
    ``data.template``); refuses, before loading, runs that are not stage caption and a ``prompt`` for an
    encoder-decoder captioner."""
    task, stage = run_task(adapter_dir)
    if task != "IMAGE_TO_TEXT":
        raise ConfigError(
            f"--image: {adapter_dir!r} is not an image captioner ({f'stage {stage}' if stage else task or 'unknown'}); "
            "--image needs a stage caption run. Drop --image and give --prompt"
        )
    recipe = read_recipe(adapter_dir) if run_file(adapter_dir) else {}
    if prompt:
        from .caption import model_kind
        from .models import resolve_path

        if model_kind(resolve_path(model or (recipe.get("model") or {}).get("name_or_path", ""))) != "decoder-only":
            raise ConfigError("--prompt: an encoder-decoder captioner reads no prompt; drop --prompt")
    delta, processor = load_adapter_model(adapter_dir, model, trust_remote_code=trust_remote_code)
    if hasattr(processor, "template"):
        processor.template = (recipe.get("data") or {}).get("template")
    return delta, processor


def load_generator(
    adapter_dir: str, model: str | None, merged: bool, trust_remote_code: bool, raw: bool, command: str
):
    """The adapted model and its tokenizer for ``generate``/``chat``; refuses runs that do not generate text and
    says once when a model without a chat template gets the prompt as raw text."""
    from .chat import GENERATIVE, has_template

    task, stage = run_task(adapter_dir)  # refused before any model is loaded
    if task == "IMAGE_TO_TEXT":
        raise ConfigError(
            f"{adapter_dir!r} is an image captioner (stage {stage}); give it an image: "
            f"'deltatune generate --adapter {adapter_dir} --image FILE'"
        )
    if task is not None and task not in GENERATIVE:
        kind = {"SEQ_CLS": "a sequence classifier", "TOKEN_CLS": "a token tagger",
                "IMAGE_CLS": "an image classifier"}.get(task, f"a {task} model")  # fmt: skip
        raise ConfigError(
            f"{adapter_dir!r} is {kind}{f' (stage {stage})' if stage else ''}, which does not generate text; "
            f"'deltatune {command}' needs a causal or seq2seq LM run. Use 'deltatune eval --adapter {adapter_dir} "
            "--data FILE' to score it"
        )
    delta, tok = load_adapter_model(adapter_dir, model, merged=merged, trust_remote_code=trust_remote_code)
    if not raw and not run_template(adapter_dir) and not has_template(tok):
        print(f"deltatune {command}: note: the tokenizer has no chat template (a base model?); prompts are sent as "
              "raw text", file=sys.stderr)  # fmt: skip
    return delta, tok


TEMPLATE_STAGES = ("sft", "rm", "dpo", "ppo", "grpo", "kto", "orpo", "simpo", "cpo")
"""The stages whose rows a built-in ``data.template`` renders (pt, cls, tag, seq2seq and the image stages read none)."""


def merged_chat_template(adapter: str, tok) -> str | None:
    """The jinja chat template ``merge`` saves with the run's tokenizer: the run's built-in ``data.template``
    (``chat_template_jinja``), as LLaMA-Factory's export writes its template's, opened by the special tokens the
    tokenizer put before each row it trained on (Llama's BOS, BERT's [CLS]: ``encode_chat`` tokenizes a built-in
    template's text with them), written so that the ids are the run's (``"<s> "`` for a Metaspace "first" tokenizer).
    None (the tokenizer's own kept): no built-in template, a stage that reads none, a processor (a vision-language
    run: no ``eos_token``), or leading tokens no text before the template gives (said on stderr)."""
    from ..data.preference import special_ends
    from ..data.templates import render

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
    from ..data.templates import TEMPLATES

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
