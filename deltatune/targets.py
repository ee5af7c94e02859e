"""Which modules a method adapts: per-family defaults (data, not code) and name matching.

Names match as PEFT matches them, so a ``target_modules`` list that works in PEFT works here:
a list entry matches a module whose full name equals it or ends with ``"." + entry``; a string is
a regex that must match the full name; ``"all-linear"`` takes every linear layer but the output head.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from torch import nn

from .config import ConfigError
from .heads_rule import reaches, reaches_by_old_rule, saved_names
from .layer import DeltaLayer, ModulesToSave, set_submodule

_VISION = ("vit", "deit", "swin", "clip", "clip_vision_model", "siglip", "siglip_vision_model")
"""Vision encoders (ViT, DeiT, Swin, CLIP's and SigLIP's vision towers): q/k/v/o_proj attention, fc1/fc2 MLP."""

_DIFFUSERS = (
    "UNet2DConditionModel", "Transformer2DModel", "DiTTransformer2DModel", "PixArtTransformer2DModel",
    "SD3Transformer2DModel", "FluxTransformer2DModel",
)  # fmt: skip
"""diffusers denoisers (by class name): attention projections to_q, to_k, to_v, to_out.0 in every attention block
(self and cross), the targets of diffusers' own LoRA training scripts."""
_JOINT = ("SD3Transformer2DModel", "FluxTransformer2DModel")
"""Joint-attention transformers (MM-DiT): their attention blocks also project the text stream (add_q_proj,
add_k_proj, add_v_proj, to_add_out; absent in a last, context-pre-only block), and diffusers' SD3 and Flux LoRA
scripts adapt those too."""

TEXT_ENCODER_TARGETS: dict[str, list[str]] = {
    "clip_text_model": ["q_proj", "k_proj", "v_proj", "out_proj"],  # diffusers' LoRA scripts' text encoder targets
    **dict.fromkeys(("bert", "roberta", "xlm-roberta"), ["query", "key", "value", "attention.output.dense"]),
}
"""A t2i run's text-encoder LoRA (``model.train_text_encoder``): the encoder's attention projections, per model_type;
another family gets its LoRA default."""

# Default LoRA targets per transformers model_type (the attention query/value projections, as PEFT).
LORA_TARGETS: dict[str, list[str]] = {
    **{name: ["to_q", "to_k", "to_v", "to_out.0"] for name in _DIFFUSERS},
    **{
        name: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
        for name in _JOINT
    },
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "umt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "falcon": ["query_key_value"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "qwen2_moe": ["q_proj", "v_proj"],
    "qwen3_moe": ["q_proj", "v_proj"],
    "olmo": ["q_proj", "v_proj"],
    "olmo2": ["q_proj", "v_proj"],
    "starcoder2": ["q_proj", "v_proj"],
    # vision encoders, in transformers 5's names (ViT's query/value became q_proj/v_proj; PEFT's table has none)
    **dict.fromkeys(_VISION, ["q_proj", "v_proj"]),
}

# IA3 targets (keys, values and the feed-forward output) and which of them are feed-forward (PEFT's tables).
IA3_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj"],  # peft's w2 is in the fused experts (transformers 5): a 3-D parameter
    **dict.fromkeys(_VISION, ["k_proj", "v_proj", "fc2"]),
}
IA3_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "mixtral": [],
    **dict.fromkeys(_VISION, ["fc2"]),
}

# Heads that a task adds on top of the backbone; "all-linear" never adapts them.
HEADS_BY_TASK: dict[str, tuple[str, ...]] = {
    # pre_classifier: DistilBERT's (new, random), peft 0.22's name (peft < 0.22's plain suffix "classifier" reached it)
    "SEQ_CLS": ("classifier", "score", "pre_classifier", "classification_head"),  # the last: BART's, T5's (trained)
    "TOKEN_CLS": ("classifier", "score", "pre_classifier"),
    "QUESTION_ANS": ("qa_outputs",),
}
"""The new heads a task puts on a model (trained in full and saved with the adapter, as PEFT adds them to
modules_to_save); a model lacking one of them is no error."""

FAMILY_HEADS: dict[str, dict[str, tuple[str, ...]]] = {
    "SEQ_CLS": {
        **dict.fromkeys(("deberta", "deberta-v2"), ("pooler",)),  # ContextPooler: new, outside the encoder
        **dict.fromkeys(("xlm", "flaubert"), ("sequence_summary",)),
        "xlnet": ("sequence_summary", "logits_proj"),
    },
}
"""A family's own new modules beside ``HEADS_BY_TASK``'s, outside its base model (PEFT leaves them out: random at
every load of the base, so its adapter computes otherwise once reloaded); trained and saved as the heads are.
(ModernBERT's ``head`` before its classifiers is not one: its masked-LM checkpoints hold it.)"""

HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler.dense", "embed_out", "output_layer")

LAYER_PATTERNS = ("layers", "layer", "h", "blocks", "block")
"""Names of the ModuleList that holds the transformer blocks (methods/freeze.py)."""


def model_type(model: nn.Module) -> str | None:
    """The transformers ``model_type`` of a model, a diffusers model's class name (``UNet2DConditionModel``), or
    None for a plain nn.Module."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    return getattr(config, "model_type", None) or type(model).__name__  # a diffusers config has no model_type


def default_targets(model: nn.Module, table: dict[str, list[str]], method: str) -> list[str]:
    """The family default from ``table``; a clear error listing candidates when there is none."""
    mtype = model_type(model)
    if mtype in table:
        return list(table[mtype])
    raise ConfigError(
        f"{method}: no default target_modules for model type {mtype!r}; pass target_modules explicitly. "
        f"Candidate module names in this model: {', '.join(candidate_names(model))}"
    )


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def candidate_names(model: nn.Module, limit: int = 40) -> list[str]:
    """Distinct short names of the adaptable (linear, embedding, conv) modules, for error messages."""
    seen: list[str] = []
    # An adapted module counts under its own name, not as the base_layer / lora_A ... inside its DeltaLayer.
    inner = [n + "." for n, m in model.named_modules() if n and isinstance(m, DeltaLayer)]
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inner):
            continue
        while isinstance(module, DeltaLayer) and hasattr(module, "base_layer"):
            module = module.base_layer
        if name and (_is_linear(module) or isinstance(module, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d))):
            short = name.rsplit(".", 1)[-1]
            if short not in seen:
                seen.append(short)
    return seen[:limit]


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The block index of module ``name``, found as PEFT finds it: without a pattern the first numbered path segment
    after the first one (T5's "encoder.block.1.layer.0.SelfAttention.q" is in block 1); else the first pattern, in
    list order, followed by a number (patterns are regexes, as in PEFT)."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            try:
                found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            except (re.error, TypeError) as e:
                raise ConfigError(f"layers_pattern {pattern!r} is not a valid module-name pattern: {e}") from None
            if found:
                break
    return int(found.group("idx")) if found else None


def matches(
    name: str,
    targets: list[str] | str,
    layers_to_transform: list[int] | int | None = None,
    layers_pattern: list[str] | str | None = None,
) -> bool:
    """Whether the module ``name`` is a target (PEFT's matching rules: a list entry equal to the full name matches
    whatever ``layers_to_transform`` says, and an empty ``layers_to_transform`` keeps every block)."""
    if isinstance(targets, str):
        hit = re.fullmatch(targets, name) is not None
    elif name in targets:
        return True
    else:
        hit = any(name.endswith("." + t) for t in targets)
    if not hit or layers_to_transform is None or layers_to_transform == []:
        return hit
    wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    return _layer_index(name, layers_pattern) in wanted


def all_linear_names(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Every linear layer but the output head and the task heads (``target_modules="all-linear"``).

    Unlike PEFT, not the ``out_proj`` of an ``nn.MultiheadAttention`` (SigLIP's pooling head, torchvision's ViT):
    that module reads ``out_proj.weight`` itself, so an adapter there would change nothing until merged, and then
    change the output. Nor a router that is an ``nn.Linear`` returning a tuple (Phimoe's, Llama 4's: peft's fails)."""
    skip = set(HEAD_NAMES) | set(exclude)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    dead = {f"{n}.out_proj".lstrip(".") for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    inner = [n + "." for n, m in model.named_modules() if n and isinstance(m, DeltaLayer)]
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inner):
            continue
        while isinstance(module, DeltaLayer) and hasattr(module, "base_layer"):
            module = module.base_layer
        if not _is_linear(module) or module is output or name in dead or "Router" in type(module).__name__:
            continue
        if any(name == s or name.endswith("." + s) or f".{s}." in f".{name}." for s in skip):
            continue
        names.append(name)
    return names


def _all_linear(targets: Any) -> Any:
    """``"all-linear"`` in any case, as PEFT reads it ("ALL-LINEAR" too); other targets as they are."""
    return "all-linear" if isinstance(targets, str) and targets.lower() == "all-linear" else targets


_FROM_FILE: ContextVar[bool] = ContextVar("deltatune_targets_from_file", default=False)


@contextmanager
def from_file() -> Iterator[None]:
    """Adapters built inside take their weights from a file (a run's checkpoint resumed, its start for eval
    --compare): ``find_targets`` reads them as loading (see ``_refuse_experts``)."""
    token = _FROM_FILE.set(True)
    try:
        yield
    finally:
        _FROM_FILE.reset(token)


def find_targets(
    model: nn.Module,
    targets: list[str] | str,
    layers_to_transform: list[int] | int | None = None,
    layers_pattern: list[str] | str | None = None,
    method: str = "method",
    loading: bool = False,
    within: Callable[[str], bool] | None = None,
) -> list[str]:
    """Full names of the modules to adapt; ConfigError (listing real names) when nothing matches. ``loading``: the
    adapter's weights come from a file (a regex that also reaches fused experts then warns: see ``_refuse_experts``);
    ``within``: the names the caller keeps (towers), whose fused experts alone all-linear's warning names."""
    targets = _all_linear(targets)
    loading = loading or _FROM_FILE.get()
    if targets == "all-linear":
        found = [n for n in all_linear_names(model) if matches(n, ".*", layers_to_transform, layers_pattern)]
    else:
        found = [
            name
            for name, _ in model.named_modules()
            if name and matches(name, targets, layers_to_transform, layers_pattern)
        ]
    # Modules inside an injected layer (its base_layer, lora_A, ...) are never targets themselves: the
    # layer is. A second adapter on the same module goes into the existing layer.
    inner = [n + "." for n, m in model.named_modules() if n and isinstance(m, DeltaLayer)]
    found = [n for n in found if not any(n.startswith(prefix) for prefix in inner)]
    found = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
    _refuse_experts(model, targets, found, method, loading, within)
    if not found:
        raise ConfigError(
            f"{method}: target_modules={targets!r}"
            + (f" with layers_to_transform={layers_to_transform!r}" if layers_to_transform is not None else "")
            + (f" and layers_pattern={layers_pattern!r}" if layers_pattern and layers_to_transform is not None else "")
            + f" matches no module. Module names in this model: {', '.join(candidate_names(model))}"
            + (  # (Mixtral's w1 / w2 / w3 of transformers 4, which peft maps onto them: fused in transformers 5)
                f"; its mixture of experts' experts are fused 3-D parameters ({experts[0][0]}, ...), which deltatune"
                " cannot adapt"
                if (experts := fused_experts(model)) and _names_an_expert(targets, experts)
                else ""
            )
            + (
                f" (a string is a regex matched against the full module name, as in peft; for modules named"
                f" {targets!r} give a list: [{targets}])"
                if isinstance(targets, str) and targets in candidate_names(model)
                else ""
            )
            + (  # LLaMA-Factory's lora_target: all (["all"], ["ALL"] too)
                "; 'all-linear' takes every linear layer but the output head (LLaMA-Factory's lora_target: all)"
                if [str(t).lower() for t in ([targets] if isinstance(targets, str) else targets)] == ["all"]
                else ""
            )
        )
    return found


EXPERT_LEAVES = {"w1", "w2", "w3", "gate_up_proj", "down_proj", "up_proj", "gate_proj"}
"""The names of a mixture of experts' expert projections (transformers 4's Mixtral w1 / w2 / w3 among them)."""


def _names_an_expert(targets: list[str] | str, experts: list[tuple[str, nn.Module]]) -> bool:
    """Whether a target that matched nothing looks like an expert's: its last name an expert projection's, or under
    ``experts`` (a regex: one of the fused experts' full names), not a typo such as ``q_prj``."""
    named = [targets] if isinstance(targets, str) else list(targets)
    if isinstance(targets, str) and any(re.fullmatch(targets, n) for n, _ in experts):
        return True
    return any(t.rsplit(".", 1)[-1] in EXPERT_LEAVES or "experts" in t.split(".") for t in named if isinstance(t, str))


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(full name, module) of each 3-D parameter of a mixture of experts' fused experts (``...Experts`` modules)."""
    return [
        (f"{n}.{pn}" if n else pn, m)
        for n, m in model.named_modules()
        if "Expert" in type(m).__name__
        for pn, p in m.named_parameters(recurse=False)
        if p.dim() >= 3
    ]


def _refuse_experts(
    model: nn.Module,
    targets: list[str] | str,
    found: list[str],
    method: str,
    loading: bool = False,
    within: Callable[[str], bool] | None = None,
) -> None:
    """ConfigError when a named target reaches nothing but a mixture of experts' fused experts (transformers 5 keeps
    them as 3-D parameters, ``gate_up_proj`` / ``down_proj`` of a ``...Experts`` module), which deltatune cannot
    adapt: ``down_proj`` on Mixtral would adapt nothing of what it names, silently. A name that also reaches a
    linear layer (Qwen2-MoE's shared expert) adapts that, as peft does; "all-linear" adapts the linear layers and
    warns that the experts are left out (peft adapts them on the model types its v4-to-v5 conversion knows). A file
    whose targets reach other modules and the experts trained those others alone (a regex saved before 4d15b84; peft
    0.22's list on Mixtral / GPT-OSS, whose down_proj it leaves alone): loading it warns that the experts stay out."""
    experts = fused_experts(model)
    if not experts:
        return
    if targets == "all-linear":  # (peft adapts the routers' 2-D weights too, as target_parameters: named here)
        routers = [n for n, m in model.named_modules() if "Router" in type(m).__name__]
        if within is not None:  # (all-linear in some towers: the experts of the others are not asked for)
            experts, routers = [e for e in experts if within(e[0])], [n for n in routers if within(n)]
            if not experts:
                return
        linear = bool(routers) and _is_linear(model.get_submodule(routers[0]))  # Phimoe's, Llama 4's: a tuple out
        kind = "nn.Linear returning a tuple, no layer to wrap" if linear else "not linear layers"
        warnings.warn(
            f"{method}: target_modules='all-linear' leaves out {experts[0][0]} and the other fused experts "
            "(3-D parameters deltatune cannot adapt)"
            + (f" and the routers ({routers[0]}, ...: {kind})" if routers else "")
            + "; it adapts the linear layers",
            stacklevel=3,
        )
        return
    if isinstance(targets, str):  # (as a list's entries: an expert's name that reaches no linear layer is refused)
        leaves = {n.rsplit(".", 1)[-1] for n in found}
        hits = [(n, m) for n, m in experts if re.fullmatch(targets, n) and n.rsplit(".", 1)[-1] not in leaves]
    else:
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in found)]
        hits = [(n, m) for n, m in experts if any(n == t or n.endswith("." + t) for t in unmatched)]
    # A router (transformers 5's ...TopKRouter: a bare 2-D weight; peft 0.22 moves "gate" to target_parameters)
    routers = {n: m for n, m in model.named_modules() if "Router" in type(m).__name__ and n in found}
    if hits and loading and found:  # (a file holding the experts' tensors is refused as it is read: foreign keys)
        name, module = hits[0]
        warnings.warn(
            f"{method}: target_modules={targets!r} reaches {name}, a 3-D parameter of {type(module).__name__} (the "
            "fused experts), which deltatune cannot adapt: the adapter loads without the experts, as it was saved "
            "(a new adapter with these targets is refused)",
            stacklevel=4,
        )
    elif hits or (routers and method == "lora"):
        name, module = (hits or list(routers.items()))[0]
        rest = sorted({n.rsplit(".", 1)[-1] for n in found if n not in routers})
        kind = type(module).__name__
        what = f"a 3-D parameter of {kind} (the fused experts)" if hits else f"the router ({kind}: a bare 2-D weight)"
        why = "which deltatune cannot adapt (peft's target_parameters)"
        if not hits and _is_linear(module):  # Phimoe's, Llama 4's: peft 0.22 wraps them, its first forward fails
            what = f"the router ({kind}: an nn.Linear whose forward returns a tuple)"
            why = "which a LoRA layer cannot wrap (peft wraps it and fails at the first forward: a tuple has no dtype)"
        raise ConfigError(
            f"{method}: target_modules={targets!r} reaches {name}, {what}, {why}; "
            "name the other targets" + (f": {rest}" if rest else " (attention: q_proj, k_proj, v_proj, o_proj)")
        )


# Where bottleneck adapters go (Houlsby et al., 2019): the output projection of each block's attention ("attn") and
# of its feed-forward ("ffn") sub-layer, before the residual add and LayerNorm. Regexes matched against the full
# module name. Houlsby adapts both; Pfeiffer only "ffn". T5's and BART's decoder cross-attention is left alone.
_BERT_LIKE = {"attn": r".*\.layer\.\d+\.attention\.output\.dense", "ffn": r".*\.layer\.\d+\.output\.dense"}
_LLAMA_LIKE = {"attn": r".*\.layers\.\d+\.self_attn\.o_proj", "ffn": r".*\.layers\.\d+\.mlp\.down_proj"}
_BART_LIKE = {"attn": r".*\.layers\.\d+\.self_attn\.out_proj", "ffn": r".*\.layers\.\d+\.fc2"}
MOE_BOTTLENECK = {**_LLAMA_LIKE, "ffn": r".*\.layers\.\d+\.mlp"}
"""Mixtures of experts, and the layout tried for one not in the table: the feed-forward adapter wraps the whole MoE
block (routed experts fused as 3-D parameters, and any shared expert), whose output goes to the residual add; a
dense layer's MLP (Qwen MoE's mlp_only_layers, DeepSeek's first layers) is wrapped whole as well."""
BOTTLENECK_TARGETS: dict[str, dict[str, str]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "deberta-v2", "layoutlm"), _BERT_LIKE),
    **dict.fromkeys(
        ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "olmo", "olmo2", "stablelm"), _LLAMA_LIKE
    ),
    "starcoder2": {**_LLAMA_LIKE, "ffn": r".*\.layers\.\d+\.mlp\.c_proj"},
    **dict.fromkeys(("mixtral", "qwen2_moe", "qwen3_moe"), MOE_BOTTLENECK),
    **dict.fromkeys(("bart", "mbart", "opt"), _BART_LIKE),
    "gpt2": {"attn": r".*\.h\.\d+\.attn\.c_proj", "ffn": r".*\.h\.\d+\.mlp\.c_proj"},
    # ViT / DeiT (pre-LayerNorm): after the attention output and the MLP output, before each residual add
    **dict.fromkeys(
        ("vit", "deit"), {"attn": r".*\.layers\.\d+\.attention\.o_proj", "ffn": r".*\.layers\.\d+\.mlp\.fc2"}
    ),
    **dict.fromkeys(
        ("t5", "mt5", "umt5"),
        {
            "attn": r".*\.block\.\d+\.layer\.0\.SelfAttention\.o",
            "ffn": r".*\.block\.\d+\.layer\.\d+\.DenseReluDense\.wo",
        },
    ),
    "gpt_neox": {"attn": r".*\.layers\.\d+\.attention\.dense", "ffn": r".*\.layers\.\d+\.mlp\.dense_4h_to_h"},
    # parallel blocks (attention and MLP both read the block's input): after each output, before the sum
    "phi": {"attn": r".*\.layers\.\d+\.self_attn\.dense", "ffn": r".*\.layers\.\d+\.mlp\.fc2"},
    "gptj": {"attn": r".*\.h\.\d+\.attn\.out_proj", "ffn": r".*\.h\.\d+\.mlp\.fc_out"},
    "distilbert": {"attn": r".*\.layer\.\d+\.attention\.out_lin", "ffn": r".*\.layer\.\d+\.ffn\.lin2"},
    "modernbert": {"attn": r".*\.layers\.\d+\.attn\.Wo", "ffn": r".*\.layers\.\d+\.mlp\.Wo"},
    "bloom": {"attn": r".*\.h\.\d+\.self_attention\.dense", "ffn": r".*\.h\.\d+\.mlp\.dense_4h_to_h"},
}


def resolve_targets(model: nn.Module, config: Any, table: dict[str, list[str]], method: str) -> list[str]:
    """The full names of the modules ``config`` adapts: the one target policy of the layer methods.

    ``config.target_modules`` (None: the family default from ``table``), narrowed by the config's optional
    ``layers_to_transform`` / ``layers_pattern`` and ``exclude_modules``. The config then records what it adapts,
    as PEFT saves it: a family default as its list, "all-linear" as the resolved names (PEFT's "all-linear" also
    takes e.g. BERT's pooler), an explicit list or regex as given (a regex with ``layers_to_transform``, which PEFT
    refuses, as the resolved names).

    Raises:
        ConfigError: no default for the family, or nothing left to adapt (the message lists real module names).
    """
    targets = config.target_modules if config.target_modules is not None else default_targets(model, table, method)
    targets = _all_linear(targets)
    layers = getattr(config, "layers_to_transform", None)
    loading = getattr(config, "_stored", None) is not None  # (a config's for_loading: its weights from a file)
    names = find_targets(model, targets, layers, getattr(config, "layers_pattern", None), method, loading)
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, DeltaLayer))  # adapter internals
        if not any(matches(n, exclude) for n, _ in model.named_modules() if n and not n.startswith(inside)):  # peft's
            warnings.warn(f"{method}: exclude_modules={exclude!r} excludes no module of the model", stacklevel=3)
        names = [n for n in names if not matches(n, exclude)]
        if not names:
            raise ConfigError(
                f"{method}: exclude_modules={exclude!r} excludes every module that target_modules={targets!r} matches"
            )
    if saved := getattr(config, "modules_to_save", None):  # trained in full: never a target (peft's rule and refusal)
        names = [n for n in names if not any(re.match(rf"(^|.*\.){m}($|\..*)", n) for m in saved)]
        said = f"{method}: every module target_modules={targets!r} matches is in modules_to_save={saved!r}"
        if not names and not (loading or _FROM_FILE.get()):
            raise ConfigError(f"{said} (trained in full, as in peft): nothing is left to adapt")
        if not names:  # a file deltatune saved before 40e5442: its copies alone, as it trained (peft refuses it)
            warnings.warn(f"{said}: the file loads its full copies alone, as it trained (peft refuses such a file; "
                          "a new adapter with these targets is refused)", stacklevel=3)  # fmt: skip
    # A regex narrowed by layers_to_transform is saved as the names it adapts: peft refuses the pair in its config,
    # so the file would not load there
    resolved = targets == "all-linear" or (isinstance(targets, str) and layers not in (None, []))
    config.target_modules = names if resolved else targets
    return names


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """The value of the first pattern matching the end of module ``name``, else ``default`` (PEFT's rule for
    ``rank_pattern`` / ``alpha_pattern``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def add_modules_to_save(model: nn.Module, adapter_name: str, config: Any, heads: bool = True) -> None:
    """Wrap the modules ``config`` trains in full (its ``modules_to_save``, and with ``heads`` the heads its task type
    adds) in a ModulesToSave holding a copy for ``adapter_name``; the task's heads found are added to
    ``config.modules_to_save`` (an adapter loaded from a file trains and holds the ones its config names).

    Raises:
        ConfigError: a module the user named matches nothing.
    """
    wanted = list(config.modules_to_save or [])
    task = config.task_type or ""
    task_heads = HEADS_BY_TASK.get(task, ()) + FAMILY_HEADS.get(task, {}).get(model_type(model) or "", ())
    auto = [h for h in task_heads if h not in wanted] if heads else []
    plan: list[tuple[str, nn.Module]] = []
    inner = [n + "." for n, m in model.named_modules() if n and isinstance(m, DeltaLayer)]
    for target in wanted + auto:
        # peft 0.22's rule, the whole name or a dotted suffix ("norm" is model.norm, not every *_layernorm: peft <
        # 0.22's plain suffix); a file of the old rule gets its other copies as its tensors are read (heads_rule)
        outside = [(n, m) for n, m in model.named_modules() if not any(n.startswith(p) for p in inner)]
        hits = [(n, m) for n, m in outside if reaches(n, target)]
        # PEFT writes every head name of the task (["classifier", "score"]) into the saved config; the ones
        # this model lacks are not an error.
        if not hits and target in wanted and target not in task_heads:
            old = [n for n, _ in outside if reaches_by_old_rule(n, target)]
            if old and _FROM_FILE.get():  # a saved adapter of the old rule: its file says which it trained
                continue
            hint = f" (peft 0.22 matches whole names; peft < 0.22's plain suffix reached {old[0]!r})" if old else ""
            raise ConfigError(f"modules_to_save: {target!r} matches no module in the model{hint}")
        if hits and target in auto:
            config.modules_to_save = [*(config.modules_to_save or []), target]
        plan.extend(hits)
    plan = [(n, m) for n, m in plan if not any(n.startswith(o + ".") for o, _ in plan)]  # a copy holds its children
    if config.modules_to_save and not _FROM_FILE.get():  # (a file's names stay: they name what it trained)
        paths = [n for n, _ in model.named_modules() if n and not any(n.startswith(p) for p in inner)]
        config.modules_to_save = saved_names(config.modules_to_save, paths, [n for n, _ in plan])
    packed = [n for n, m in plan if any(type(sub).__name__ == "Linear4bit" for sub in m.modules())]  # ours, bnb's
    if packed:
        raise ConfigError(
            f"modules_to_save: {packed[0]!r} holds 4-bit layers, which cannot train in full (QLoRA trains an adapter "
            "beside them); keep it in full precision (quantize(skip_modules=[...])) or leave it out"
        )
    adapted = [(n, m) for n, m in plan if isinstance(m, DeltaLayer) and not isinstance(m, ModulesToSave)]
    if adapted:  # its copy would hold the other adapter's layer (whose tensors this adapter's file then lacks)
        name, layer = adapted[0]
        raise ConfigError(
            f"modules_to_save: {name!r} is adapted by {type(layer).__name__} (adapter "
            f"{', '.join(map(repr, layer.adapter_names))}), so it cannot also be trained in full"
        )
    for name, module in plan:
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            set_submodule(model, name, module)
        module.add(adapter_name)


def context_length(config) -> int | None:
    """The most positions the model can attend over, when its config says."""
    config = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
