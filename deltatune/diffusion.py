"""LoRA files as diffusion users trade them, both ways: diffusers' format and kohya's, for a DeltaModel over a
diffusers denoiser (``UNet2DConditionModel``, a DiT-style transformer) or a text encoder; and several LoRAs
combined into one with weights.

**diffusers** (what ``pipe.load_lora_weights(folder)`` and ``unet.load_lora_adapter(folder, prefix="unet")`` read):
one ``pytorch_lora_weights.safetensors`` with keys ``<prefix>.<module path>.lora_A.weight`` / ``.lora_B.weight``
(prefix ``unet``, ``transformer`` or ``text_encoder``) and the LoRA config in the file's metadata
``lora_adapter_metadata`` as ``{"<prefix>.r": ..., "<prefix>.lora_alpha": ..., ...}``. Read too: what a model's
own ``unet.save_lora_adapter(folder)`` writes (keys without the prefix, the bare peft config as metadata), and the
older keys ``<path>.lora.down.weight`` / ``.lora.up.weight`` and ``<path>.lora_linear_layer.down.weight`` / ``.up``
(what diffusers' training scripts still write), and diffusers' attention-processor layout from before 0.21
(``<attention>.processor.to_q_lora.down.weight``). Without metadata a module's alpha is its rank (scale 1), as
diffusers assumes; metadata naming no lora_alpha gives peft's default, 8, as diffusers' ``LoraConfig(**metadata)``.
A text encoder's keys naming transformers 4's ``text_model.`` level (``text_model_`` in kohya's) load onto a model
without that level (transformers 5's CLIPTextModel), as diffusers strips it.

**kohya** (sd-scripts, ai-toolkit; read by A1111 and ComfyUI): keys ``lora_unet_<module path, dots as
underscores>.lora_down.weight`` (A), ``.lora_up.weight`` (B) and ``.alpha`` (a scalar per module: the update is
scaled by alpha / r); ``lora_te_`` for the text encoder (a CLIP one's written with transformers 4's ``text_model_``
names, which kohya's tools match). Paths are found by matching the underscored name against the model's own module
names, so no table per architecture is needed.

A file whose keys name a module the model lacks is refused with the list of those keys, never loaded as a silent
no-op (diffusers logs and goes on); the model is unchanged then.

**Several LoRAs at once** (diffusers' ``set_adapters(names, weights)``): ``set_adapters`` makes several LoRAs active
with weights, output = base + sum_i w_i * delta_i (each layer's scale alpha / r multiplied by w_i, as peft does);
``load_loras`` loads several files or runs onto one denoiser and activates them so; ``combine_loras`` folds the same
weighted sum into one adapter.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Any

import torch
from torch import nn

from .config import ConfigError
from .diffusion_files import _TEXT_MODEL
from .diffusion_files import KOHYA_PREFIX as KOHYA_PREFIX
from .diffusion_files import WEIGHT_NAME as WEIGHT_NAME
from .diffusion_files import load_lora as load_lora
from .diffusion_files import read_lora_file as read_lora_file
from .diffusion_initial import check_base, converted, from_base
from .files import KEY_PREFIX, atomic_write
from .layer import quiet_deletes
from .model import DeltaModel


# -- writing ----------------------------------------------------------------------------------------------------
def _plain_lora(model: DeltaModel, name: str, dora: bool = False, component: str = "") -> Any:
    """The config of adapter ``name``, checked to be a plain LoRA (no other method; no DoRA unless ``dora``); the
    refusals name the model where a file of ``component`` is written."""
    model._check_names([name])
    config = model.peft_config[name]
    where = f"the {component} model's adapter {name!r}" if component else f"adapter {name!r}"
    if config.peft_type != "LORA":
        raise ConfigError(f"{where} is {config.peft_type}, not LoRA: these files hold LoRA adapters only")
    if config.use_dora and not dora:
        raise ConfigError(f"{where} is DoRA; kohya's files and this call take plain LoRA updates only")
    return config


def _module_path(path: str) -> str:
    """A LoRA layer's path as its module's: without the ``.base_layer`` of another adapter's layer that wrapped it
    later (a bottleneck's), which no file and no rank or alpha pattern names."""
    return re.sub(r"(\.base_layer)+$", "", path)


def _lora(
    model: DeltaModel, adapter_name: str | None, dora: bool = False, initial: Any = None, component: str = ""
) -> tuple[str, Any, dict[str, dict[str, Any]]]:
    """(name, config, {module path: {"A", "B", "r", "alpha", "scale"}, and DoRA's magnitude "m" with ``dora``}) of
    a LoRA adapter of ``model``; one initialised from the base (PiSSA, OLoRA) converted with ``initial`` as peft's
    path_initial_model_for_weight_conversion (``diffusion_initial``), so it loads on the original base, where a file
    of ``component`` is written (no check without one: combine_loras' adapters stay on this model's base)."""
    from .targets import pattern_value

    name = adapter_name or model.active_adapter
    config = _plain_lora(model, name, dora, component)
    start = check_base(model, name, initial, component) if component else None  # (None: the original base)
    tensors = model.adapter_state_dict(name)
    modules: dict[str, dict[str, Any]] = {}
    keys: dict[str, str] = {}
    for key, value in tensors.items():
        stem, _, leaf = key.rpartition(".lora_")
        path = _module_path(stem.removeprefix(KEY_PREFIX))
        if leaf not in ("A.weight", "B.weight", *(("magnitude_vector",) if config.use_dora else ())):
            raise ConfigError(f"adapter {name!r} holds {key!r}, which these LoRA files have no place for")
        modules.setdefault(path, {})[leaf[0]] = value.detach()  # A, B, m(agnitude)
        keys[path] = stem
    for path, m in modules.items():
        r = m["A"].shape[0]
        alpha = float(pattern_value(config.alpha_pattern, path, config.lora_alpha))
        m.update(r=r, alpha=alpha, scale=alpha / (math.sqrt(r) if config.use_rslora else r))
    if start is not None:
        converted(modules, keys, start, config.use_rslora, component)
    return name, config, modules


def _diffusers_part(
    model: DeltaModel, adapter_name: str | None, prefix: str, initial: Any = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One component's tensors (``<prefix>.<path>.lora_A.weight`` ...) and metadata (``<prefix>.r`` ...)."""
    _, config, modules = _lora(model, adapter_name, True, initial, prefix)
    tensors = {}
    for path, m in modules.items():
        tensors[f"{prefix}.{path}.lora_A.weight"] = m["A"].cpu().contiguous()
        tensors[f"{prefix}.{path}.lora_B.weight"] = m["B"].cpu().contiguous()
        if "m" in m:  # DoRA's magnitude, in peft's layout (diffusers' load_lora_adapter reads it)
            tensors[f"{prefix}.{path}.lora_magnitude_vector"] = m["m"].cpu().contiguous()
    ranks = Counter(m["r"] for m in modules.values())
    alphas = Counter(m["alpha"] for m in modules.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    meta = {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "use_rslora": config.use_rslora,
        **({"use_dora": True} if config.use_dora else {}),
        "rank_pattern": {re.escape(p): m["r"] for p, m in modules.items() if m["r"] != r},
        "alpha_pattern": {re.escape(p): m["alpha"] for p, m in modules.items() if m["alpha"] != alpha},
    }
    return tensors, {f"{prefix}.{k}": v for k, v in meta.items()}


def save_diffusers_lora(
    model: DeltaModel,
    folder: str | os.PathLike[str],
    adapter_name: str | None = None,
    prefix: str = "unet",
    text_encoder: DeltaModel | None = None,
    initial: dict[str, torch.Tensor] | str | os.PathLike[str] | None = None,
) -> str:
    """Write a LoRA adapter of ``model`` (a DeltaModel over a diffusers denoiser or text encoder) in diffusers'
    format: ``folder/pytorch_lora_weights.safetensors``, keys ``<prefix>.<path>.lora_A.weight``, the config in the
    metadata. ``pipe.load_lora_weights(folder)`` / ``unet.load_lora_adapter(folder, prefix=prefix)`` load it with
    the same outputs. ``text_encoder``: a DeltaModel over the pipeline's text encoder whose active LoRA goes into
    the same file under ``text_encoder.`` keys, as diffusers' training scripts write it. A DoRA's magnitudes go in
    as ``<prefix>.<path>.lora_magnitude_vector`` (peft's layout, which diffusers loads as a DoRA). ``initial``: for
    an adapter of ``model`` initialised from the base (PiSSA, OLoRA; its base weights are the residual), its tensors
    from right after its init (``diffusion_initial.initial_tensors``) or the folder ``save_pretrained`` wrote then:
    the file holds peft's conversion (rank 2r, alpha x2), which loads on the original base. Returns the path.

    Raises:
        ConfigError: an adapter is not a LoRA (another method), or, naming the model (``prefix`` or
            ``text_encoder``), was initialised from the base without ``initial`` (the text encoder's: convert it
            first), with LoftQ (merge it instead) or as a DoRA; ``initial`` lacks a module's tensor.
    """
    from safetensors.torch import save_file

    tensors, meta = _diffusers_part(model, adapter_name, prefix, initial)
    if text_encoder is not None:
        if from_base(text_encoder, name := text_encoder.active_adapter):  # (initial= is the model's)
            raise ConfigError(
                f"the text_encoder model's adapter {name!r} was initialised from the base "
                f"({text_encoder.peft_config[name].init_lora_weights}): write it on its own (save_diffusers_lora("
                "text_encoder, folder, prefix='text_encoder', initial=...)), or convert it first"
            )
        more, more_meta = _diffusers_part(text_encoder, None, "text_encoder")
        tensors.update(more)
        meta.update(more_meta)
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(meta)}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, WEIGHT_NAME)
    atomic_write(path, lambda f: save_file(tensors, f, metadata))
    return path


def save_kohya_lora(
    model: DeltaModel,
    file: str | os.PathLike[str],
    adapter_name: str | None = None,
    prefix: str = "unet",
    initial: dict[str, torch.Tensor] | str | os.PathLike[str] | None = None,
) -> str:
    """Write a LoRA adapter of ``model`` as one kohya-format safetensors file (``lora_unet_...`` keys and a
    per-module ``.alpha``; rsLoRA's scale is kept exact through alpha; ``prefix`` ``text_encoder``: ``lora_te_``,
    SDXL's ``text_encoder_2``: ``lora_te2_``, SD3's ``text_encoder_3``: ``lora_te3_``, as kohya names them).
    ``initial``: as ``save_diffusers_lora``'s (PiSSA, OLoRA written as peft's plain conversion). Returns the path.

    Raises:
        ConfigError: naming the model (``prefix``), the adapter is not a plain LoRA (DoRA, another method), or was
            initialised from the base without ``initial``, or with LoftQ (merge it instead); ``initial`` lacks a
            module's tensor.
    """
    from safetensors.torch import save_file

    _, _, modules = _lora(model, adapter_name, initial=initial, component=prefix)
    head = KOHYA_PREFIX.get(prefix, f"lora_{prefix}")
    base = model.get_base_model()
    if type(base).__name__.startswith("CLIPText") and not hasattr(base, _TEXT_MODEL):
        head += f"_{_TEXT_MODEL}"  # kohya's names are transformers 4's (lora_te_text_model_encoder_...), which A1111
        # and ComfyUI match; transformers 5's CLIPTextModel has no text_model level, and its names match nothing there
    tensors = {}
    for path, m in modules.items():
        key = f"{head}_{path.replace('.', '_')}"
        tensors[f"{key}.lora_down.weight"] = m["A"].cpu().contiguous()
        tensors[f"{key}.lora_up.weight"] = m["B"].cpu().contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(m["scale"] * m["r"], dtype=torch.float32)  # kohya: alpha / r
    file = os.fspath(file)
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    atomic_write(file, lambda f: save_file(tensors, f, {"format": "pt"}))
    return file


# -- combining --------------------------------------------------------------------------------------------------
def _weights(what: str, names: list[str], weights: Any) -> list[float]:
    """One finite number per adapter (ConfigError naming ``what`` otherwise: a nan weight made every output nan)."""
    weights = list(weights)
    if len(weights) != len(names) or not names:
        raise ConfigError(f"{what}: {len(names)} adapters and {len(weights)} weights; give one weight each")
    for name, w in zip(names, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"{what}: the weight of {name!r} must be a finite number, got {w!r}")
    return [float(w) for w in weights]


def combine_loras(model: DeltaModel, adapters: list[str], weights: list[float], new_name: str) -> None:
    """Add ``new_name``, a LoRA whose update is exactly sum_i w_i * (update of adapter i) at every module any of
    them adapts: the ranks are concatenated (A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...], scale 1),
    as PEFT's ``add_weighted_adapter(..., combination_type="cat")``. Merge it to fold several LoRAs into the
    weights at once; the combined adapter saves and loads as any LoRA.

    Raises:
        ConfigError: a length mismatch, an adapter that is not a plain LoRA, or an existing ``new_name``.
    """
    from .layer import DeltaLayer
    from .methods.lora import LORA_LAYERS, LoraConfig

    adapters = model._check_names(adapters)  # one name as a string is a list of one
    weights = _weights("combine_loras", adapters, weights)
    if new_name in model.peft_config:
        raise ConfigError(f"combine_loras: an adapter named {new_name!r} exists already")
    parts = [_lora(model, name)[2] for name in adapters]
    paths = sorted(set().union(*parts))
    for path in paths:  # a LoRA layer that another method's layer wrapped later takes no new LoRA
        outer = model.get_base_model().get_submodule(path)
        if isinstance(outer, DeltaLayer) and not isinstance(outer, LORA_LAYERS):
            raise ConfigError(
                f"combine_loras: {path} is wrapped by adapter {', '.join(map(repr, outer.adapter_names))} "
                f"({type(outer).__name__}), so no LoRA can be added there; combine the LoRAs before adding it"
            )
    state, ranks = {}, {}
    for path in paths:
        blocks = [(m[path], w) for m, w in zip(parts, weights) if path in m]
        state[f"{KEY_PREFIX}{path}.lora_A.weight"] = torch.cat([m["A"] for m, _ in blocks])
        state[f"{KEY_PREFIX}{path}.lora_B.weight"] = torch.cat([m["B"] * (w * m["scale"]) for m, w in blocks], 1)
        ranks[path] = sum(m["r"] for m, _ in blocks)
    r = Counter(ranks.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=paths,
        rank_pattern={re.escape(p): v for p, v in ranks.items() if v != r},
        alpha_pattern={re.escape(p): float(v) for p, v in ranks.items() if v != r},  # alpha = rank: scale 1
        inference_mode=True,
    )
    model.add_adapter(new_name, config, _tensors=state, _source=f"combine_loras({', '.join(adapters)})")


# -- several at once --------------------------------------------------------------------------------------------
def set_adapters(
    model: DeltaModel,
    adapter_names: str | list[str],
    weights: float | dict[str, Any] | list[float | dict[str, Any]] | None = None,
) -> None:
    """Make several LoRAs active at once with weights, as diffusers' ``set_adapters(names, weights)``: the output is
    base + sum_i w_i * delta_i (adapter i's scale alpha / r at every layer multiplied by w_i, as peft does it).
    ``weights`` None gives each adapter 1 (the plain sum), one number gives it to all. An adapter's weight on a UNet
    may be per block as diffusers takes it: ``{"down": 0.5, "mid": 1, "up": {"block_0": [1, 0.5, 0]}}`` (one weight
    per transformer of a block with attentions, 1 where not given; ``_block_weights``). A weight stays with its
    adapter until set again; it changes no saved file, and ``combine_loras`` reads the unweighted updates.

    Raises:
        ConfigError: a weight count that does not match, an adapter that is not a LoRA (DoRA is one), or one merged into
            the weights (unmerge first: a merged update cannot be re-weighted in place).
        ValueError: an unknown adapter name.
    """
    from .methods.lora import LORA_LAYERS
    from .targets import pattern_value

    names = model._check_names(adapter_names)
    if weights is None or isinstance(weights, (int, float, dict)):
        weights = [1.0 if weights is None else weights] * len(names)
    weights = [1.0 if w is None else w for w in weights]  # diffusers' None: 1
    blocks = {  # (zip: a count that does not match is _weights' one line below, not an IndexError)
        i: _block_weights(model.get_base_model(), w, name)
        for i, (name, w) in enumerate(zip(names, weights))
        if isinstance(w, dict)
    }
    weights = _weights("set_adapters", names, [1.0 if isinstance(w, dict) else w for w in weights])
    weights = [blocks.get(i, w) for i, w in enumerate(weights)]
    configs = {name: _plain_lora(model, name, dora=True) for name in names}
    layers = [(p, m) for p, m in model.get_base_model().named_modules() if isinstance(m, LORA_LAYERS)]
    merged = sorted({n for _, m in layers for n in m.merged_adapters} & set(names))
    if merged:
        raise ConfigError(f"set_adapters: {', '.join(merged)} is merged into the weights; unmerge_adapter() first")
    for path, layer in ((_module_path(p), m) for p, m in layers):
        for name, weight in zip(names, weights):
            if name in layer.scaling:  # the scale inject gave this layer, times the weight
                c = configs[name]
                r = pattern_value(c.rank_pattern, path, c.r)
                alpha = pattern_value(c.alpha_pattern, path, c.lora_alpha)
                w = _module_weight(weight, path)
                layer.scaling[name] = float(w) * alpha / (math.sqrt(r) if c.use_rslora else r)
    model.set_adapter(names)


def fuse_lora(
    model: DeltaModel, lora_scale: float = 1.0, adapter_names: list[str] | None = None, safe_fusing: bool = False
) -> None:
    """diffusers' ``fuse_lora(lora_scale, safe_fusing, adapter_names)``: the active LoRAs' scales (their
    ``set_adapters`` weights included) times ``lora_scale`` at every layer, as peft's ``scale_layer``, then the
    active (or named) LoRAs merged into the weights. ``model.unmerge_adapter()`` is diffusers' ``unfuse_lora``; as
    there, the scale stays multiplied until ``set_adapters`` sets it again.

    Raises:
        ConfigError: a ``lora_scale`` that is not a finite number, or a named adapter that is not a LoRA (DoRA is);
            nothing changed then. What ``merge_adapter`` raises (the scales are restored then).
    """
    from .methods.lora import LORA_LAYERS

    scale = _weights("fuse_lora", ["lora_scale"], [lora_scale])[0]
    names = model._check_names(model.active_adapters if adapter_names is None else adapter_names)
    for name in names:
        _plain_lora(model, name, dora=True)
    layers = [m for _, m in model.get_base_model().named_modules() if isinstance(m, LORA_LAYERS)]
    before = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for name in model.active_adapters:
            if name in layer.scaling:
                layer.scaling[name] *= scale
    try:
        model.merge_adapter(names, safe_merge=safe_fusing)
    except BaseException:
        for layer, scaling in zip(layers, before):
            layer.scaling.update(scaling)
        raise


def _block_weights(unet: nn.Module, given: dict[str, Any], name: str) -> dict[str, float]:
    """diffusers' per-block weights of a UNet (``{"down": 0.5, "mid": 1, "up": {"block_0": [1, 0.5, 0]}}``, its
    ``_maybe_expand_lora_scales``) as ``{"down_blocks.1.attentions.0": 0.5, ...}``: one weight per transformer of each
    block with attentions (``layers_per_block`` down, one more up), 1 where not given. A block with no attentions,
    or a key other than down / mid / up, is refused (diffusers ignores the first silently)."""
    what = f"set_adapters: the weights of {name!r}"
    per = getattr(getattr(unet, "config", None), "layers_per_block", None)
    if not hasattr(unet, "down_blocks") or not isinstance(per, int):
        raise ConfigError(f"{what} are per block (down / mid / up); this {type(unet).__name__} takes one number")
    unknown = sorted(set(given) - {"down", "mid", "up"})
    if unknown:
        raise ConfigError(f"{what} name {unknown[0]!r}; a UNet's blocks are down, mid and up")
    mid = given.get("mid", 1.0)
    mid = mid[0] if isinstance(mid, list) and len(mid) == 1 else mid
    out = {"mid_block.attentions.0": mid}
    for side, blocks, n in (("down", unet.down_blocks, per), ("up", unet.up_blocks, per + 1)):
        ids = [f"block_{i}" for i, b in enumerate(blocks) if hasattr(b, "attentions")]
        side_weights = given.get(side, 1.0)
        side_weights = side_weights if isinstance(side_weights, dict) else dict.fromkeys(ids, side_weights)
        extra = sorted(set(side_weights) - set(ids))
        if extra:
            raise ConfigError(f"{what}: {side}.{extra[0]} is no {side} block with attentions here ({', '.join(ids)})")
        for block in ids:
            w = side_weights.get(block, 1.0)
            w = w * n if isinstance(w, list) and len(w) == 1 else w if isinstance(w, list) else [w] * n
            if len(w) != n:
                raise ConfigError(f"{what}: {side}.{block} takes {n} weights (one per transformer), got {len(w)}")
            out |= {f"{side}_blocks.{block[6:]}.attentions.{j}": v for j, v in enumerate(w)}
    _weights(what, list(out), list(out.values()))
    return out


def _module_weight(weight: float | dict[str, float], path: str) -> float:
    """An adapter's weight at module ``path``, as diffusers' ``set_weights_and_activate_adapters`` picks it from
    expanded block weights: the first block that names it, else its block's attention of the same index, else 1
    (diffusers fails on a module outside the blocks, such as conv_in)."""
    if not isinstance(weight, dict):
        return weight
    found = next((w for block, w in weight.items() if block in path), None)
    if found is not None:
        return found
    parts = path.split(".")
    return weight.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0) if len(parts) > 3 else 1.0


def load_loras(
    model: nn.Module,
    paths: list[str | os.PathLike[str]],
    weights: list[float] | None = None,
    names: list[str] | None = None,
    prefix: str | None = None,
) -> DeltaModel:
    """Load several LoRAs onto one denoiser and make them active together, weighted (``set_adapters``). Each path is
    a deltatune or PEFT adapter folder (``adapter_config.json``: a t2i run) or a diffusers or kohya LoRA file or
    folder (``load_lora``, with ``prefix``). Names default to ``lora_0``, ``lora_1``, ... On an error the model
    keeps none of them.

    Raises:
        ConfigError: a count that does not match, a name given twice or taken, or what ``load_lora`` and
            ``set_adapters`` refuse.
    """
    delta = model if isinstance(model, DeltaModel) else DeltaModel(model)
    names = list(names) if names is not None else [f"lora_{i}" for i in range(len(paths))]
    if len(names) != len(paths) or (weights is not None and len(weights) != len(paths)) or not paths:
        raise ConfigError(f"load_loras: give one name and one weight per path ({len(paths)} paths)")
    taken = sorted({n for n in names if names.count(n) > 1 or n in delta.peft_config})
    if taken:
        raise ConfigError(f"load_loras: adapter name {taken[0]!r} is given twice or taken already")
    loaded: list[str] = []
    try:
        for name, path in zip(names, paths):
            if os.path.isfile(os.path.join(path, "adapter_config.json")):
                delta.load_adapter(path, name)
            else:
                load_lora(delta, path, name, prefix)
            loaded.append(name)
        set_adapters(delta, names, weights)
    except BaseException:
        with quiet_deletes():  # a rollback: peft's "was active which is now deleted" warning would only confuse
            for name in loaded:
                delta.delete_adapter(name)
        raise
    return delta


def load_pipeline_loras(
    model: DeltaModel,
    text_encoder: nn.Module,
    prefix: str,
    paths: list[str],
    weights: list[float],
    weight: float = 1.0,
    text_encoder_2: nn.Module | None = None,
) -> Any:
    """``generate --lora``: LoRAs loaded beside a run's own (``default``) as diffusers' ``load_lora_weights`` loads
    them into a pipeline: a file's denoiser keys (``prefix``: ``unet`` or ``transformer``) onto ``model``, its text
    encoder keys (kohya's ``lora_te_`` / ``lora_te1_``, diffusers' ``text_encoder.``) onto ``text_encoder`` and SDXL's
    second encoder's (``lora_te2_``, ``text_encoder_2.``) onto ``text_encoder_2``; every LoRA active at once, weighted
    as ``set_adapters`` (``weight`` for the run's own) on each. Returns the text encoder (a DeltaModel when it holds a
    LoRA), or both encoders when ``text_encoder_2`` is given. The files' adapters are named ``lora_<k>``, the first
    free ``k``, so no clash (diffusers' ``get_adapter_name`` names ``default_<n>``): a second call's LoRAs load beside
    the first's, and the active ones are the run's own and this call's on every model, as a pipeline's
    ``set_adapters`` names them (an encoder this call has no part for: the run's own alone, or none, the base
    encoder). On an error no model keeps any of this call's, and each keeps its adapters, the active ones, their
    scales and which of them train.

    Raises:
        ConfigError: a file with a second text encoder's part and no ``text_encoder_2`` (diffusers' one-encoder
            pipelines drop that part: the LoRA would draw otherwise than it trained), or what ``load_loras``,
            ``load_lora`` and ``set_adapters`` refuse.
    """
    parts = [_parts(p) for p in paths]
    for path, found in zip(paths, parts):
        if "text_encoder_2" in found and text_encoder_2 is None:
            raise ConfigError(
                f"--lora {path}: the file holds keys of text_encoder_2 (kohya's lora_te2_), an SDXL LoRA's second text "
                "encoder; this pipeline has no second text encoder, and without that part the LoRA draws otherwise"
            )
    encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    deltas = [d for d in (model, *encoders.values()) if isinstance(d, DeltaModel)]
    taken = {n for d in deltas for n in d.peft_config}  # an earlier call's lora_0 stays: the next free lora_<k>
    names = [n for n in (f"lora_{k}" for k in range(len(paths) + len(taken))) if n not in taken][: len(paths)]
    on_denoiser = [i for i, found in enumerate(parts) if "denoiser" in found or not found & set(encoders)]
    warned = set(on_denoiser)  # a file's dropped dora_scale keys are named once, by its first part loaded
    before = _snapshot([model, *encoders.values()])  # (set_adapters re-weighs the run's own LoRA on each)
    try:
        for i in on_denoiser:  # a file with text-encoder keys names its denoiser's part by prefix
            load_loras(model, [paths[i]], [weights[i]], [names[i]], prefix if parts[i] != {"denoiser"} else None)
        set_adapters(
            model, ["default", *(names[i] for i in on_denoiser)], [weight, *(weights[i] for i in on_denoiser)]
        )
        for part in encoders:
            on = [i for i, found in enumerate(parts) if part in found]
            for i in on:
                encoders[part] = load_lora(encoders[part], paths[i], names[i], part, _warn=i not in warned)
                warned.add(i)
            delta = encoders[part]
            if not isinstance(delta, DeltaModel):
                continue
            own = ["default"] if "default" in delta.peft_config else []
            if on and not own and all(layer.disabled for _, layer in delta._layers()):
                delta.enable_adapter_layers()  # (an earlier call's off: no LoRA of it was active)
            # one this call has no part for keeps only the run's own LoRA active, weighted (diffusers' set_adapters
            # sets every component), or computes as the base encoder where it has none (an earlier call's are off)
            if on or (own and delta.peft_config["default"].peft_type == "LORA"):
                set_adapters(delta, own + [names[i] for i in on], [weight] * len(own) + [weights[i] for i in on])
            elif own:
                delta.set_adapter(own)
            else:
                delta.disable_adapter_layers()
    except BaseException:
        for name in names:  # only the names this call added
            for delta in (model, *encoders.values()):
                if isinstance(delta, DeltaModel) and name in delta.peft_config:
                    with quiet_deletes():  # (a rollback: no "was active which is now deleted" warning)
                        delta.delete_adapter(name)
        _restore(before)
        raise
    return (
        encoders["text_encoder"] if text_encoder_2 is None else (encoders["text_encoder"], encoders["text_encoder_2"])
    )


def _snapshot(models: list[Any]) -> list[tuple[DeltaModel, list[str], list[tuple[Any, dict]], dict[str, bool], bool]]:
    """What a refused ``load_pipeline_loras`` puts back on each DeltaModel of ``models``: its active adapters, each
    LoRA layer's scales (``set_adapters`` multiplied the run's own by its weight) and which parameters train
    (deleting an active adapter makes the remaining ones trainable, as peft)."""
    from .methods.lora import LORA_LAYERS

    out = []
    for delta in models:
        if isinstance(delta, DeltaModel):
            layers = [m for _, m in delta.get_base_model().named_modules() if isinstance(m, LORA_LAYERS)]
            grads = {n: p.requires_grad for n, p in delta.named_parameters()}
            off = bool(layers) and all(layer.disabled for _, layer in delta._layers())
            out.append((delta, list(delta.active_adapters), [(m, dict(m.scaling)) for m in layers], grads, off))
    return out


def _restore(snapshot: list[tuple[DeltaModel, list[str], list[tuple[Any, dict]], dict[str, bool], bool]]) -> None:
    for delta, active, layers, grads, off in snapshot:
        if active and all(n in delta.peft_config for n in active):
            delta.set_adapter(active)
        if off != (bool(layers) and all(layer.disabled for _, layer in delta._layers())):
            delta.disable_adapter_layers() if off else delta.enable_adapter_layers()
        for layer, scaling in layers:
            layer.scaling.update({k: v for k, v in scaling.items() if k in layer.scaling})
        for n, p in delta.named_parameters():
            if n in grads:
                p.requires_grad_(grads[n])


def _parts(path: str) -> set[str]:
    """The components a LoRA file holds keys for: ``text_encoder``, ``text_encoder_2``, ``denoiser`` (any other key;
    a deltatune/PEFT adapter folder is the denoiser's)."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return {"denoiser"}
    heads = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "text_encoder.": "text_encoder"}
    heads |= {"lora_te2_": "text_encoder_2", "text_encoder_2.": "text_encoder_2"}
    return {next((part for h, part in heads.items() if k.startswith(h)), "denoiser") for k in read_lora_file(path)[0]}
