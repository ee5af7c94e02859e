"""The test matrix: model FAMILIES x METHODS (one row per method config), shared by test_matrix.py.

A new method is one new row in METHODS: how to build its config for a family (with and without an
adapter that changes the outputs from the start), whether it merges, whether it starts as the base, and
the trainable-parameter count it should give, worked out from the base model's module shapes alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tiny import FAMILIES, TEXT, VISION, default_task, tiny_model
from torch import nn

import deltatune as dt

sys.path.insert(
    0, os.path.join(os.path.dirname(__file__), "vision")
)  # tests/vision/tiny_vlm.py (as its tests import it)
from tiny_vlm import tiny_vlm, vlm_inputs  # noqa: E402

__all__ = ["FAMILIES", "METHODS", "TASKS", "TASK_TYPES", "VLM", "MethodRow", "task_type", "tiny_vlm", "vlm_inputs"]

VLM = ("llava", "blip-2")
"""Decoder-only vision-language families (tests/vision/tiny_vlm.py): their rows adapt the language tower, the
default of ``method.towers`` (configs go through ``deltatune.towers.restrict``, as the caption stage does)."""
WITH_VLM = (*FAMILIES, *VLM)
TASKS = {**{family: default_task(family) for family in FAMILIES}, **dict.fromkeys(VLM, "image_text")}
"""The task each family's tiny model is built for (tests/tiny.py): causal_lm, seq2seq, seq_cls, image_text."""
TASK_TYPES = {
    "causal_lm": "CAUSAL_LM",
    "seq2seq": "SEQ_2_SEQ_LM",
    "seq_cls": "SEQ_CLS",
    "token_cls": "TOKEN_CLS",
    "image_cls": None,
    "image_text": None,
}  # fmt: skip  (PEFT has no image task_type; the head goes into modules_to_save)

# PEFT's default LoRA targets per family (peft.utils.constants), written out here so that the expected
# counts do not come from deltatune's own table.
PEFT_LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "opt": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"], "t5": ["q", "v"], "bart": ["q_proj", "v_proj"],
    "vit": ["q_proj", "v_proj"],  # not in PEFT's table (its ViT guide's query/value: q_proj/v_proj in transformers 5)
}  # fmt: skip
# IA3 (targets, feed-forward targets) for the vision families PEFT's tables lack, written out the same way.
VISION_IA3 = {"vit": (["k_proj", "v_proj", "fc2"], ["fc2"])}

# Heads a classification task adds (trained in full as modules_to_save) and the module names that
# "all-linear" leaves alone (the output head, task heads, the pooler), as deltatune documents them.
CLS_HEADS = ("classifier", "score")
ALL_LINEAR_SKIP = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler", "embed_out", "output_layer")


def task_type(family: str) -> str:
    """The PEFT task_type of the family's default task (tests/tiny.py)."""
    return TASK_TYPES[TASKS[family]]


@dataclass(frozen=True)
class MethodRow:
    """One method config of the matrix.

    Attributes:
        id: the pytest id.
        config: ``config(family, changed)``: the method's config for a tiny ``family`` model. ``changed=False``
            is the default init; ``changed=True`` makes the adapter alter the outputs from the start (e.g.
            ``init_lora_weights=False``), so that equality checks can fail.
        mergeable: ``merge_adapter`` / ``merge_and_unload`` are supported.
        init_atol: at init (``changed=False``) the outputs equal the base's within this tolerance
            (0.0: exactly); None when the method does not start as the base.
        trainable: ``trainable(base, config, family)``: the expected number of trainable parameters, computed
            from the fresh base model's module shapes; None to skip the count check.
        families: the families the method runs on (None: all of FAMILIES; ``WITH_VLM`` adds the VLM families).
        in_place: the method trains base parameters in place (freeze, BitFit, full fine-tuning): nothing is added,
            so no config changes the outputs before training, and disabling or switching adapters cannot undo it.
        base: ``base(family)``: the base model the row adapts, when it is not the family's tiny model (QLoRA: a
            4-bit one).
        build: ``build(base, config, changed, seed)``: the adapted model, when it is not ``get_delta_model(base,
            config)`` (AdapterFusion: the bottleneck adapters it fuses come first).
        load: ``load(base, folder)``: the saved model loaded again, when it is not ``DeltaModel.from_pretrained``.
    """

    id: str
    config: Callable[[str, bool], dt.DeltaConfig]
    mergeable: bool = True
    init_atol: float | None = 0.0
    trainable: Callable[[nn.Module, dt.DeltaConfig, str], int] | None = None
    families: tuple[str, ...] | None = None
    in_place: bool = False
    base: Callable[[str], nn.Module] | None = None
    build: Callable[[nn.Module, dt.DeltaConfig, bool, int], dt.DeltaModel] | None = None
    load: Callable[[nn.Module, str], dt.DeltaModel] | None = None


# -- expected counts, from module shapes ---------------------------------------------------------------------
def _in_out(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a GPT-2 Conv1D (whose weight is stored (d_in, d_out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape
    return d_in, d_out


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _language(base: nn.Module, family: str) -> tuple[str, Callable[[str], bool]]:
    """The family whose PEFT targets apply and which module names count: a VLM's language model only."""
    if family in VLM:
        return base.config.get_text_config().model_type, lambda name: ".language_model." in f".{name}"
    return family, lambda name: True


def _lora_targets(base: nn.Module, config: dt.LoraConfig, family: str) -> list[nn.Module]:
    family, counts = _language(base, family)
    if config.target_modules == "all-linear":
        output = base.get_output_embeddings()
        return [
            m
            for n, m in base.named_modules()
            if _is_linear(m) and m is not output and not any(s in n.split(".") for s in ALL_LINEAR_SKIP)
        ]
    targets = config.target_modules or PEFT_LORA_TARGETS[family]
    return [m for n, m in base.named_modules() if counts(n) and any(n == t or n.endswith("." + t) for t in targets)]


def _head_params(base: nn.Module, config: dt.DeltaConfig) -> int:
    """Parameters of the task heads a SEQ_CLS / TOKEN_CLS adapter trains in full."""
    if config.task_type not in ("SEQ_CLS", "TOKEN_CLS"):
        return 0
    heads = [m for n, m in base.named_modules() if n.split(".")[-1] in CLS_HEADS]
    if config.task_type == "SEQ_CLS" and base.config.model_type == "deberta-v2":
        heads.append(base.pooler)  # DeBERTa's new ContextPooler trains with the classifier (targets.FAMILY_HEADS)
    return sum(p.numel() for m in heads for p in m.parameters())


def lora_trainable(base: nn.Module, config: dt.LoraConfig, family: str) -> int:
    """r * (d_in + d_out) per adapted layer, + d_out per layer for DoRA's magnitude and for a trained bias."""
    total = 0
    for m in _lora_targets(base, config, family):
        d_in, d_out = _in_out(m)
        total += config.r * (d_in + d_out)
        total += d_out if config.use_dora else 0
        total += m.bias.numel() if config.bias == "lora_only" and getattr(m, "bias", None) is not None else 0
    return total + _head_params(base, config)


def bottleneck_trainable(base: nn.Module, config: dt.BottleneckConfig, family: str) -> int:
    """2 d m + m + d per adapter (m = d // reduction_factor); Houlsby: 2 per block, Pfeiffer: 1, every stack (a VLM:
    its language model's)."""
    c = base.config.get_text_config()
    d, m = c.hidden_size, c.hidden_size // config.reduction_factor
    sites = (2 if config.config == "houlsby" else 1) * c.num_hidden_layers * (2 if c.is_encoder_decoder else 1)
    return sites * (2 * d * m + m + d) + _head_params(base, config)


def ia3_trainable(base: nn.Module, config: dt.IA3Config, family: str) -> int:
    """d_in per feed-forward target, d_out per other target; targets from PEFT's own tables."""
    from peft.utils import constants

    family, counts = _language(base, family)
    if family in VISION_IA3:
        targets, feedforward = VISION_IA3[family]
    else:
        targets = constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[family]
        feedforward = constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[family]
    total = 0
    for n, m in base.named_modules():
        if counts(n) and any(n == t or n.endswith("." + t) for t in targets):
            d_in, d_out = _in_out(m)
            total += d_in if any(n.endswith(f) for f in feedforward) else d_out
    return total + _head_params(base, config)


def _prompt_rows(config: dt.DeltaConfig) -> int:
    """Virtual-token rows: n, or 2n for SEQ_2_SEQ_LM (PEFT's two transformer submodules)."""
    return config.num_virtual_tokens * (2 if config.task_type == "SEQ_2_SEQ_LM" else 1)


def prompt_trainable(base: nn.Module, config: dt.DeltaConfig, family: str) -> int:
    """Prompt tuning: rows x hidden size."""
    d = base.get_input_embeddings().weight.shape[1]
    return _prompt_rows(config) * d + _head_params(base, config)


def ptuning_trainable(base: nn.Module, config: dt.DeltaConfig, family: str) -> int:
    """P-tuning (MLP): the rows x d table, then Linear d->h, Linear h->h, Linear h->d (with biases)."""
    d, h = base.get_input_embeddings().weight.shape[1], config.encoder_hidden_size
    mlp = (d * h + h) + (h * h + h) + (h * d + d)
    return _prompt_rows(config) * d + mlp + _head_params(base, config)


# -- the rows ---------------------------------------------------------------------------------------------------
def _lora(**fields) -> Callable[[str, bool], dt.DeltaConfig]:
    def make(family: str, changed: bool) -> dt.DeltaConfig:
        return dt.LoraConfig(r=4, lora_alpha=8, task_type=task_type(family), init_lora_weights=not changed, **fields)

    return make


def _bottleneck(**fields) -> Callable[[str, bool], dt.DeltaConfig]:
    def make(family: str, changed: bool) -> dt.DeltaConfig:
        return dt.BottleneckConfig(reduction_factor=4, task_type=task_type(family), init_weights=not changed, **fields)

    return make


def _tokens(cls: type, **fields) -> Callable[[str, bool], dt.DeltaConfig]:
    # Token methods change the outputs from the start (random virtual tokens): ``changed`` makes no difference.
    def make(family: str, changed: bool) -> dt.DeltaConfig:
        return cls(num_virtual_tokens=3, task_type=task_type(family), **fields)

    return make


def _vpt(deep: bool) -> Callable[[str, bool], dt.DeltaConfig]:
    # Random prompts change the outputs from the start: ``changed`` makes no difference.
    def make(family: str, changed: bool) -> dt.DeltaConfig:
        return dt.VisualPromptConfig(num_virtual_tokens=3, deep=deep)

    return make


def vpt_trainable(base: nn.Module, config: dt.DeltaConfig, family: str) -> int:
    """n x d prompts, once (shallow) or per block (deep)."""
    c = base.config
    return (c.num_hidden_layers if config.deep else 1) * config.num_virtual_tokens * c.hidden_size


def full_trainable(base: nn.Module, config: dt.DeltaConfig, family: str) -> int:
    """Every parameter of the base, each shared tensor once."""
    return sum(p.numel() for p in base.parameters())


def bitfit_trainable(base: nn.Module, config: dt.DeltaConfig, family: str) -> int:
    """Every bias term of the base (LayerNorm biases included)."""
    return sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias"))


def _in_place(cls: type, **fields) -> Callable[[str, bool], dt.DeltaConfig]:
    def make(family: str, changed: bool) -> dt.DeltaConfig:  # nothing added: ``changed`` cannot change the outputs
        return cls(**fields)

    return make


def _ia3(family: str, changed: bool) -> dt.DeltaConfig:
    return dt.IA3Config(task_type=task_type(family), init_ia3_weights=not changed)


# -- QLoRA: LoRA on the 4-bit NF4 base (layers whose in_features is a multiple of 64 quantise: hidden 64) ----------
QLORA_FAMILIES = ("llama", "gpt2")
_WIDE = {"llama": dict(hidden_size=64, intermediate_size=128), "gpt2": dict(n_embd=64)}


def _quantized_base(family: str) -> nn.Module:
    from deltatune.methods.quant import BACKENDS, _available

    model, summary = dt.quantize(
        tiny_model(family, **_WIDE[family]), backend=next(b for b in BACKENDS if _available(b))
    )
    assert summary.quantized, "the QLoRA rows' base must have 4-bit layers"
    return model


# -- AdapterFusion: a fusion over two bottleneck adapters (zero-init for changed=False, so it starts as the base) --
FUSED = ("a", "b")


def _fusion(family: str, changed: bool) -> dt.DeltaConfig:
    return dt.AdapterFusionConfig(adapter_names=list(FUSED), task_type=task_type(family), init_weights=not changed)


def _build_fusion(base: nn.Module, config: dt.DeltaConfig, changed: bool, seed: int) -> dt.DeltaModel:
    model = dt.DeltaModel(base)
    for i, name in enumerate(FUSED):
        torch.manual_seed(10 + i)  # the same fused adapters for every seed: the seed draws the fusion layers
        model.add_adapter(name, dt.BottleneckConfig(reduction_factor=4, init_weights=not changed))
    torch.manual_seed(seed)
    model.add_adapter("default", config)
    model.set_adapter("default")
    return model


def _load_fusion(base: nn.Module, folder: str) -> dt.DeltaModel:
    model = dt.DeltaModel(base)
    for name in FUSED:
        model.load_adapter(os.path.join(folder, name), name)
    model.load_adapter(folder, "default")
    model.set_adapter("default")
    return model


def fusion_trainable(base: nn.Module, config: dt.DeltaConfig, family: str) -> int:
    """3 d^2 + 2 d per fused sub-layer (W_q, W_k, W_v; b_q, b_k: W_v has no bias, as the adapters library's
    BertFusion) at the two Houlsby sites of every block."""
    c = base.config
    d = c.hidden_size
    sites = 2 * c.num_hidden_layers * (2 if c.is_encoder_decoder else 1)
    return sites * (3 * d * d + 2 * d) + _head_params(base, config)


# -- trainable tokens (peft's TRAINABLE_TOKENS): three ids the family's test inputs hold; changed: drawn from N(0, 1) --
def _trainable_tokens(family: str, changed: bool) -> dt.DeltaConfig:
    from tiny import tiny_inputs

    from deltatune.methods.trainable_tokens import TrainableTokensConfig

    ids = list(dict.fromkeys(tiny_inputs(family, TASKS[family])["input_ids"][0].tolist()))[:3]
    return TrainableTokensConfig(token_indices=ids, init_weights=not changed, task_type=task_type(family))


def trainable_tokens_trainable(base: nn.Module, config: dt.DeltaConfig, family: str) -> int:
    """k rows x the embedding width (a tied output embedding reads the same rows: nothing more)."""
    return len(config.token_indices) * base.get_input_embeddings().weight.shape[1] + _head_params(base, config)


METHODS: list[MethodRow] = [
    MethodRow("lora", _lora(), trainable=lora_trainable, families=WITH_VLM),
    MethodRow("lora-rslora", _lora(use_rslora=True), trainable=lora_trainable, families=WITH_VLM),
    MethodRow("lora-dora", _lora(use_dora=True), trainable=lora_trainable, families=WITH_VLM),
    MethodRow("lora-bias", _lora(bias="lora_only"), trainable=lora_trainable, families=WITH_VLM),
    MethodRow("lora-all-linear", _lora(target_modules="all-linear"), trainable=lora_trainable),
    MethodRow("lora-4bit", _lora(), trainable=lora_trainable, families=QLORA_FAMILIES, base=_quantized_base),
    # on a VLM: towers.restrict places the bottleneck adapters in the language tower (method.towers' default)
    MethodRow("bottleneck-houlsby", _bottleneck(), False, trainable=bottleneck_trainable, families=WITH_VLM),
    MethodRow(
        "bottleneck-pfeiffer", _bottleneck(config="pfeiffer"), False, trainable=bottleneck_trainable, families=WITH_VLM
    ),
    MethodRow("ia3", _ia3, trainable=ia3_trainable, families=WITH_VLM),
    MethodRow(
        "fusion",
        _fusion,
        mergeable=False,
        trainable=fusion_trainable,
        families=TEXT,
        build=_build_fusion,
        load=_load_fusion,
    ),
    MethodRow(
        "prompt_tuning",
        _tokens(dt.PromptTuningConfig),
        mergeable=False,
        init_atol=None,
        trainable=prompt_trainable,
        families=TEXT,
    ),
    MethodRow(
        "p_tuning",
        _tokens(dt.PTuningConfig, encoder_hidden_size=16),
        mergeable=False,
        init_atol=None,
        trainable=ptuning_trainable,
        families=TEXT,
    ),
    # deberta-v2's attention takes no key/value prefix (deltatune refuses it, naming the model type).
    MethodRow(
        "prefix_tuning",
        _tokens(dt.PrefixTuningConfig, encoder_hidden_size=16),
        mergeable=False,
        init_atol=None,
        families=tuple(f for f in TEXT if f != "deberta-v2"),
    ),
    MethodRow(
        "prefix_tuning-v2",  # P-tuning v2: prefix tuning without the MLP
        _tokens(dt.PrefixTuningConfig, prefix_projection=False),
        mergeable=False,
        init_atol=None,
        families=tuple(f for f in TEXT if f != "deberta-v2"),
    ),
    # in-place baselines; their counts come from the base's own parameters (freeze's block choice is not restated)
    MethodRow("freeze", _in_place(dt.FreezeConfig, freeze_trainable_layers=1), False, in_place=True),
    MethodRow(
        "bitfit",
        _in_place(dt.BitFitConfig),
        False,
        trainable=bitfit_trainable,
        in_place=True,
        families=tuple(f for f in FAMILIES if f not in ("llama", "mistral", "t5")),  # no bias terms at all
    ),
    MethodRow("full", _in_place(dt.FullConfig), False, trainable=full_trainable, in_place=True),
    MethodRow("trainable_tokens", _trainable_tokens, trainable=trainable_tokens_trainable, families=TEXT),
    # visual prompt tuning: prompt tokens after the class token of a ViT, at the input or before every block
    *(
        MethodRow(f"vpt-{kind}", _vpt(kind == "deep"), False, None, trainable=vpt_trainable, families=tuple(VISION))
        for kind in ("shallow", "deep")
    ),
]
"""Every method config the matrix checks."""
