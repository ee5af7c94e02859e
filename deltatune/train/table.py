"""The stage table: every stage deltatune trains, one line each. Torch-free, so ``deltatune train --help`` and
recipe validation read it without importing a model library.

A stage is one file in train/ (``module``) with a ``prepare_<stage>(cfg, tokenizer) -> Prepared`` function: it
reads the recipe's data, and names its collator, metrics, trainer (or its own loop). ``task`` is the model head
the run loads (``models.auto_class``); ``images``: its inputs are images, so the model's image processor stands
where the tokenizer stands; ``loop``: it trains in a loop of its own (evaluating before and after, not every N
steps); ``reference``: it scores the policy against the base as its reference, the adapter switched off (so a
method that trains the base's own weights in place leaves it none: ``checks.check_reference``). Adding a stage is
its file plus one line here.
"""

from __future__ import annotations

from typing import NamedTuple


class Stage(NamedTuple):
    task: str
    module: str
    images: bool = False
    loop: bool = False  # its own training loop, not the HF Trainer's: it evaluates before and after only
    reference: bool = False  # the base, the adapter switched off, is its reference model


STAGES: dict[str, Stage] = {
    "pt": Stage("CAUSAL_LM", "pt"),
    "sft": Stage("CAUSAL_LM", "sft"),
    "cls": Stage("SEQ_CLS", "cls"),
    "tag": Stage("TOKEN_CLS", "tag"),
    "seq2seq": Stage("SEQ_2_SEQ_LM", "seq2seq"),
    "rm": Stage("SEQ_CLS", "reward"),
    "dpo": Stage("CAUSAL_LM", "dpo", reference=True),
    "ppo": Stage("CAUSAL_LM", "ppo", loop=True, reference=True),
    "grpo": Stage("CAUSAL_LM", "grpo", loop=True, reference=True),
    "kto": Stage("CAUSAL_LM", "kto", reference=True),
    "orpo": Stage("CAUSAL_LM", "orpo"),
    "simpo": Stage("CAUSAL_LM", "simpo"),
    "cpo": Stage("CAUSAL_LM", "cpo"),
    # Not PEFT task types: adapters record None; an image classifier's head trains via modules_to_save.
    "image_cls": Stage("IMAGE_CLS", "image_cls", images=True),
    "caption": Stage("IMAGE_TO_TEXT", "caption", images=True),
    "t2i": Stage("TEXT_TO_IMAGE", "t2i", images=True),  # a diffusers denoiser, not a transformers model
}

TASK_OF_STAGE: dict[str, str] = {name: s.task for name, s in STAGES.items()}
IMAGE_STAGES: tuple[str, ...] = tuple(name for name, s in STAGES.items() if s.images)


def prepare(cfg, tok):
    """The stage's ``prepare_<stage>(cfg, tok)``: its file imported on first use (stage files import the HF
    Trainer; this table imports none of them)."""
    import importlib

    stage = STAGES[cfg.stage]
    return getattr(importlib.import_module(f".{stage.module}", __package__), f"prepare_{cfg.stage}")(cfg, tok)
