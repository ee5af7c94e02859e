"""Which tower of a vision-language model an adapter goes into: ``method.towers`` made explicit.

A vision-language model has towers: the ``language`` model, the ``vision`` encoder and the ``projector`` between
them. Leaf names repeat across towers (LLaVA's CLIP vision tower and its LLaMA language model both have ``q_proj``
and ``v_proj``), so a plain ``target_modules: [q_proj, v_proj]`` silently puts half the adapters into the vision
tower. ``restrict`` resolves a config's targets to full module names inside the named towers only:

- no ``target_modules``: each named tower's default targets (the tower's own family defaults from ``targets.py``;
  every linear layer of the projector); IA3's feed-forward layers are its tower family's too (LLaMA's ``down_proj``,
  CLIP's ``fc2``); bottleneck adapters go after the attention / feed-forward output projections of the tower's blocks,
  found by the tower family's layout (``targets.BOTTLENECK_TARGETS``, else ``TOWER_BOTTLENECK``), and a tower with no
  such blocks (LLaVA's two-layer projector) is an error naming it;
- ``target_modules: all-linear``: every linear layer of the named towers but the output head (LLaMA-Factory's
  ``lora_target: all`` leaves its frozen vision tower and projector out so); IA3's feed-forward layers as above;
- ``layers_to_transform`` (and ``layers_pattern``) keep the named blocks of the towers, picked as peft picks them;
- a ``target_modules`` list or regex that also matches modules of a tower the user did not name is an error that
  lists those modules (never a silent half-and-half).

The result is a config whose ``target_modules`` is the list of full module names, which PEFT reads as it is. Which
module belongs to which tower is data (``TOWERS``), matched on the path components under the model.
"""

from __future__ import annotations

import re

from torch import nn

from .config import ConfigError, DeltaConfig
from .layer import DeltaLayer, ModulesToSave
from .targets import (
    BOTTLENECK_TARGETS,
    IA3_FEEDFORWARD,
    IA3_TARGETS,
    LORA_TARGETS,
    find_targets,
    matches,
    model_type,
)

TOWER_NAMES = ("language", "vision", "projector")

# model_type -> tower -> regex searched in the module path (components joined by ".").
TOWERS: dict[str, dict[str, str]] = {
    **dict.fromkeys(
        # (and the later LLaVA-style models, laid out as LLaVA: InternVL, LLaVA-NeXT-Video, Aya Vision 2, LFM2-VL, ...)
        (
            "llava",
            "llava_next",
            "llava_onevision",
            "vipllava",
            "mistral3",
            "aya_vision",
            "gemma3",
            "paligemma",
            "internvl",
            "llava_next_video",
            "cohere2_vision",
            "lfm2_vl",
            "got_ocr2",
            "fast_vlm",
            "perception_lm",
            "aria",
        ),
        {
            "vision": r"(^|\.)vision_tower(\.|$)",
            "projector": r"(^|\.)multi_modal_projector(\.|$)",
            "language": r"(^|\.)(language_model|lm_head)(\.|$)",
        },
    ),
    "blip-2": {
        "vision": r"(^|\.)vision_model(\.|$)",
        "projector": r"(^|\.)(qformer|language_projection|query_tokens)(\.|$)",
        "language": r"(^|\.)language_model(\.|$)",
    },
    "blip": {"vision": r"(^|\.)vision_model(\.|$)", "language": r"(^|\.)text_decoder(\.|$)"},
    "vision-encoder-decoder": {"vision": r"(^|\.)encoder(\.|$)", "language": r"(^|\.)decoder(\.|$)"},
    # SigLIP-style vision towers with q_proj / v_proj / fc1 / fc2 beside a LLaMA-style language model
    **dict.fromkeys(
        ("smolvlm", "idefics3", "idefics2"),
        {
            "vision": r"(^|\.)vision_model(\.|$)",
            "projector": r"(^|\.)connector(\.|$)",
            "language": r"(^|\.)(text_model|lm_head)(\.|$)",
        },
    ),
    # Llama 3.2 Vision: a tiled vision model whose features the language model reads by cross-attention layers;
    # Llama 4 (its vision adapter inside its vision model, as LLaMA-Factory's vision_model_keys hold it)
    **dict.fromkeys(
        ("mllama", "llama4"),
        {
            "vision": r"(^|\.)vision_model(\.|$)",
            "projector": r"(^|\.)multi_modal_projector(\.|$)",
            "language": r"(^|\.)(language_model|lm_head)(\.|$)",
        },
    ),
    # Qwen-VL (and GLM-4V): the merger (the projector) sits inside the vision tower, so it is matched first
    **dict.fromkeys(
        ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe"),
        {
            "projector": r"(^|\.)visual\.(merger|deepstack_merger_list)(\.|$)",
            "vision": r"(^|\.)visual(\.|$)",
            "language": r"(^|\.)(language_model|lm_head)(\.|$)",
        },
    ),
}

FAMILY_AS = {
    "blip_text_model": "bert",
    **dict.fromkeys(("smolvlm_vision", "idefics3_vision", "idefics2_vision"), "siglip_vision_model"),
    **dict.fromkeys(("qwen2_vl_text", "qwen2_5_vl_text"), "qwen2"),
    "qwen3_vl_text": "qwen3",
    "mllama_text_model": "llama",
    "llama4_text": "llama4",
    **dict.fromkeys(("cohere", "cohere2"), "llama"),
}
"""Tower families whose layers are named as another family's (BLIP's text decoder: BERT's, with cross-attention;
SmolVLM's and Idefics' vision towers: SigLIP's; Qwen-VL's language models: Qwen2's, Qwen3's; Llama 3.2 Vision's: LLaMA's,
its cross-attention layers' q_proj / v_proj among them; Llama 4's text model: Llama 4's; Aya Vision's Cohere: LLaMA's)"""

_CLIP_LIKE = {"attn": r".*\.layers\.\d+\.self_attn\.out_proj", "ffn": r".*\.layers\.\d+\.mlp\.fc2"}
_BLIP_VISION = {"attn": r".*\.layers\.\d+\.self_attn\.projection", "ffn": r".*\.layers\.\d+\.mlp\.fc2"}
TOWER_BOTTLENECK: dict[str, dict[str, str]] = {
    **dict.fromkeys(("clip_vision_model", "siglip_vision_model"), _CLIP_LIKE),
    **dict.fromkeys(("blip_vision_model", "blip_2_vision_model"), _BLIP_VISION),
    # the Q-Former: its queries' feed-forward output is output_query (cross-attention left alone, as everywhere)
    "blip_2_qformer": {
        "attn": r".*\.layer\.\d+\.attention\.output\.dense",
        "ffn": r".*\.layer\.\d+\.output_query\.dense",
    },
}
"""Bottleneck layouts (as ``targets.BOTTLENECK_TARGETS``: the attention and feed-forward output projections) of tower
families that no whole model of their own has: vision towers and BLIP-2's Q-Former."""

_DEFAULT_TABLES = {"lora": LORA_TARGETS, "ia3": IA3_TARGETS}
_RESOLVED = ("lora", "ia3", "bottleneck")  # the methods whose default targets a tower resolves


def tower_of(model: nn.Module, name: str) -> str | None:
    """The tower the module ``name`` sits in (None: outside every tower, or not a multi-tower model): the outermost
    match, so a BERT decoder's ``decoder.bert.encoder.layer.0`` is the language tower; ties go to the table's order
    (Qwen-VL's ``visual.merger`` is the projector)."""
    table = TOWERS.get(model_type(model) or "", {})
    hits = [(m.start(), i, tower) for i, (tower, rx) in enumerate(table.items()) if (m := re.search(rx, name))]
    return min(hits)[2] if hits else None


_SUB_CONFIGS = {"language": ("text_config", "decoder"), "vision": ("vision_config", "encoder"),
                "projector": ("qformer_config",)}  # fmt: skip


def _family(model: nn.Module, tower: str) -> str | None:
    """The model type of ``tower``'s sub-config (read as ``FAMILY_AS`` says); None where it has none."""
    config = model.config
    keys = _SUB_CONFIGS.get(tower, ())
    sub = next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), None)
    family = getattr(sub, "model_type", None)
    return FAMILY_AS.get(family, family)


def _bottleneck_sites(model: nn.Module, config: DeltaConfig, tower: str, names: list[str]) -> list[str]:
    """The sub-layers among ``tower``'s ``names`` a bottleneck adapter goes after: the tower family's layout, else the
    first known layout that finds every sub-layer ``config`` places adapters at (as methods/bottleneck.py does)."""
    family, known = _family(model, tower), {**BOTTLENECK_TARGETS, **TOWER_BOTTLENECK}
    for layout in [known[family]] if family in known else list(known.values()):
        found = [[n for n in names if re.fullmatch(layout[kind], n)] for kind in config.sublayers]
        if all(found):
            return [n for hits in found for n in hits]
    what = " and ".join({"attn": "attention", "ffn": "feed-forward"}[k] for k in config.sublayers)
    raise ConfigError(
        f"method.towers: the {tower} tower of model type {model_type(model)!r}{f' ({family})' if family else ''} has "
        f"no layers a bottleneck adapter ({config.config}) can wrap: no known layout finds {what} output projections "
        f"of blocks in it; leave the {tower} tower out of method.towers or set method.target_modules"
    )


def _defaults(model: nn.Module, config: DeltaConfig, tower: str) -> list[str]:
    """Full names of the default targets of ``config``'s method inside ``tower``."""
    names = [n for n, m in model.named_modules() if n and tower_of(model, n) == tower]
    if config.method == "bottleneck":
        return _bottleneck_sites(model, config, tower, names)
    if tower == "projector":
        return [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
    table = _DEFAULT_TABLES.get(config.method)
    family = _family(model, tower)
    if table is None or family not in table:
        raise ConfigError(
            f"method.towers: no default {config.method} targets for the {tower} tower ({family!r}); "
            "set method.target_modules"
        )
    leaves = table[family]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in leaves)]


def _feedforward(model: nn.Module, names: list[str]) -> list[str]:
    """The names among ``names`` that are IA3 feed-forward layers of their tower's family (scaled at the input)."""
    out = []
    for name in names:
        tower = tower_of(model, name)
        family = _family(model, tower) if tower else None
        if any(name.endswith("." + leaf) for leaf in IA3_FEEDFORWARD.get(family or "", [])):
            out.append(name)
    return out


def check_names(towers: object) -> None:
    """``method.towers`` as a recipe gives it (``RunConfig.method_config``, so with the recipe, before any data or
    model): unset, or a list of known tower names. (No finished run named an unknown tower: ``restrict`` refused it.)

    Raises:
        ConfigError: not a list of names; an unknown tower name.
    """
    if towers is not None and not (isinstance(towers, list) and all(isinstance(t, str) for t in towers)):
        raise ConfigError(f"method.towers must be a list of tower names (e.g. [language, vision]), got {towers!r}")
    bad = [t for t in towers or [] if t not in TOWER_NAMES]
    if bad:
        raise ConfigError(f"method.towers: unknown tower {bad[0]!r}; choose from {', '.join(TOWER_NAMES)}")


def check_new_run(method: dict) -> None:
    """A run starting (``checks.check_run``, before the data and the model): ``method.towers: []`` is refused. Not
    with the recipe: such a run.yaml, from before, adapted the language tower (the default) and still loads.

    Raises:
        ConfigError: ``method.towers`` is an empty list.
    """
    if method.get("towers") == []:
        raise ConfigError("method.towers is empty: name the towers to adapt (language, vision, projector), or leave "
                          "it unset for [language]")  # fmt: skip


def restrict(model: nn.Module, config: DeltaConfig, towers: list[str] | None = None) -> DeltaConfig:
    """``config`` with its targets resolved to full module names inside ``towers`` (default: ``["language"]``).

    A model without towers (``TOWERS`` has no entry for it) gets ``config`` back unchanged when ``towers`` is None.

    Raises:
        ConfigError: an unknown tower name; towers on a single-tower model; explicit targets reaching a tower not
            named (the modules listed); no default targets for a tower (bottleneck adapters: a tower without blocks
            they can wrap, the tower named). (Towers choose modules by name: they apply to the methods that adapt
            modules by ``target_modules``.) A recipe's ``method.towers`` is checked before any data or model:
            ``check_names`` (with the recipe) and ``check_new_run`` (as a run starts).
    """
    table = TOWERS.get(model_type(model) or "")
    if config.no_targets:  # (towers choose modules by name: such a method reads none; checks.check_run refuses them)
        return config
    if towers is None and (not table or (config.target_modules is None and config.method not in _RESOLVED)):
        return config  # nothing asked, and nothing to resolve (a single tower, or a method that picks no modules)
    # [] reads as the default, [language]: a run.yaml from before check_new_run trained so (its start, eval --compare)
    towers = list(dict.fromkeys(towers or ["language"]))  # a tower named twice: its modules once each
    bad = [t for t in towers if t not in TOWER_NAMES]
    if bad:
        raise ConfigError(f"method.towers: unknown tower {bad[0]!r}; choose from {', '.join(TOWER_NAMES)}")
    if not table:
        raise ConfigError(f"method.towers: model type {model_type(model)!r} has one tower; leave method.towers unset")
    missing = [t for t in towers if t not in table]
    if missing:
        raise ConfigError(f"method.towers: model type {model_type(model)!r} has no {missing[0]} tower")
    layers, pattern = getattr(config, "layers_to_transform", None), getattr(config, "layers_pattern", None)
    everything = isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear"
    if everything:  # the towers' linear layers (LLaMA-Factory's lora_target all: the frozen towers left out)
        within = lambda n: tower_of(model, n) in towers  # noqa: E731  (the towers' fused experts: warned)
        found = find_targets(model, "all-linear", layers, pattern, method=config.method, within=within)
        names = [n for n in found if tower_of(model, n) in towers]
    elif config.target_modules is None:  # the blocks layers_to_transform names, picked as peft picks them
        names = [n for t in towers for n in _defaults(model, config, t) if matches(n, ".*", layers, pattern)]
    else:  # (with layers_to_transform as peft reads it: a full module name matches whatever it says)
        names = find_targets(model, config.target_modules, layers, pattern, method=config.method)
        outside = [n for n in names if tower_of(model, n) not in towers]
        if outside:
            hit = sorted({tower_of(model, n) or "no tower" for n in outside})
            listed = ", ".join(outside[:12]) + (f", ... ({len(outside)} in all)" if len(outside) > 12 else "")
            raise ConfigError(
                f"method.target_modules={config.target_modules!r} reaches the {' and '.join(hit)} tower(s), which "
                f"method.towers={towers} does not name: {listed}. Add the tower to method.towers or narrow "
                "target_modules"
            )
    if not names:
        raise ConfigError(
            f"method.towers={towers}: no module to adapt in these towers"
            + (f" with layers_to_transform={layers!r}" if layers not in (None, []) else "")
        )
    if config.method == "ia3" and (config.target_modules is None or everything) and config.feedforward_modules is None:
        return config.replace(target_modules=names, feedforward_modules=_feedforward(model, names))
    return config.replace(target_modules=names)


def saved_config(folder: str) -> dict | None:
    """The adapter_config.json of a run's checkpoint (or run folder) as saved, or None where it has none."""
    import json
    import os

    path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    return saved if isinstance(saved, dict) else None


def as_trained(config: DeltaConfig, saved: dict | None) -> DeltaConfig:
    """``config`` (as ``restrict`` resolved it) with the full module names a run's ``saved`` adapter config holds,
    where only 1bc40a6 explains the difference: a run begun before towers kept layers_to_transform adapted every
    block of its towers, so its checkpoint holds a superset of what they resolve to now; it resumes (and
    ``eval --compare`` starts) as it trained. Any other difference (target_modules changed with --resume-changed) is
    left to the checkpoint's load, which names what is missing, as for a run without towers."""
    names, now = (saved or {}).get("target_modules"), config.target_modules
    if (
        getattr(config, "layers_to_transform", None) is None
        or not isinstance(names, list)
        or not isinstance(now, list)
    ):
        return config
    return config.replace(target_modules=names) if set(now) < set(names) else config


LATE = frozenset(
    {"internvl", "llava_next_video", "cohere2_vision", "lfm2_vl", "got_ocr2", "fast_vlm", "perception_lm", "aria",
     "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe", "llama4"}
)  # fmt: skip
"""Model types whose towers came in session 58: a run of one begun before adapted every tower as its recipe said."""


def resolve(model: nn.Module, asked: DeltaConfig, towers: list[str] | None, saved: dict | None) -> DeltaConfig:
    """``restrict``, then ``as_trained`` with a checkpoint's ``saved`` adapter config; a run of a ``LATE`` type begun
    before its towers (no method.towers, a checkpoint whose targets are not what the towers resolve to now, or that
    the towers now refuse: a target list reaching the vision tower) goes on as it trained, untowered (its resume
    failed on the checkpoint's vision-tower tensors, or was refused)."""
    late = saved is not None and towers is None and getattr(model.config, "model_type", None) in LATE
    try:
        config = restrict(model, asked, towers)
    except ConfigError:
        if late:
            return asked
        raise
    if late and config is not asked and _listed(saved.get("target_modules")) != _listed(config.target_modules):
        return asked
    return as_trained(config, saved) if saved and config is not asked else config


def _listed(names) -> list[str]:
    return sorted(map(str, names)) if isinstance(names, (list, tuple, set)) else [str(names)]


def counts(model: nn.Module) -> dict[str, int]:
    """Adapted layers per tower (modules_to_save copies not counted); ``other`` for layers outside every tower."""
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, DeltaLayer) and not isinstance(module, ModulesToSave):
            tower = tower_of(model, name) or "other"
            out[tower] = out.get(tower, 0) + 1
    return out


__all__ = [
    "as_trained",
    "LATE",
    "resolve",
    "saved_config",
    "FAMILY_AS",
    "TOWERS",
    "TOWER_BOTTLENECK",
    "TOWER_NAMES",
    "check_names",
    "check_new_run",
    "counts",
    "restrict",
    "tower_of",
]
