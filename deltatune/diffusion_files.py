"""Reading LoRA files as diffusion users trade them (diffusers' layouts and kohya's) into a DeltaModel over a
diffusers denoiser or a text encoder; split from ``diffusion.py`` (session 47), which writes them, combines several
LoRAs and re-exports these names. The formats are described in ``diffusion.py``'s docstring.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn

from .config import ConfigError
from .files import KEY_PREFIX
from .model import DeltaModel

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""The file diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` looks for."""
KOHYA_PREFIX = {"unet": "lora_unet", "transformer": "lora_transformer", "text_encoder": "lora_te",
                "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}  # fmt: skip
"""The head of kohya's keys that ``save_kohya_lora`` writes for each component (SDXL's second encoder: lora_te2_;
SD3's T5: lora_te3_, as sd-scripts' lora_sd3.py and ComfyUI name it)."""
_KOHYA_HEADS = {**{k: (v,) for k, v in KOHYA_PREFIX.items()}, "text_encoder": ("lora_te", "lora_te1"),
                "text_encoder_3": ("lora_te3", "lora_text_encoder_3")}  # fmt: skip
"""The heads of kohya's keys that each component reads: SDXL's files name its text encoders lora_te1_, lora_te2_;
lora_text_encoder_3_ is what save_kohya_lora wrote before session 58 (read still)."""
_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")
"""The pipeline components whose keys a diffusers LoRA file may hold side by side."""
_DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora.down.weight": "A",
    ".lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A",  # diffusers' DreamBooth scripts' text-encoder layout
    ".lora_linear_layer.up.weight": "B",
    ".lora_magnitude_vector": "m",  # DoRA's magnitude (peft's layout, which diffusers' load_lora_adapter reads)
}
_TEXT_MODEL = "text_model"
"""The level transformers 4's CLIPTextModel had above ``encoder.`` (transformers 5's has none); files name it."""
_KOHYA_SUFFIXES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}
_OLD_LAYOUT = re.compile(r"(\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
"""diffusers' attention-processor layout (before 0.21; its converters read it still): ``<attention>.processor.to_q_lora
.down.weight`` for a UNet, ``<self_attn>.to_q_lora.down.weight`` for a CLIP text encoder."""
_NOT_LORA = re.compile(r"magnitude_vector|hada_|lokr_|lora_mid|\.diff(_b)?$|(_B|[._]up|layer\.up)\.bias$")
"""Keys of peft's DoRA outside a component, LyCORIS (LoHa, LoKr, Tucker's mid), full weight differences and LoRA biases (peft's
``lora_bias``, ``lora_B.bias``): no plain LoRA's."""
PEFT_DEFAULT_ALPHA = 8
"""peft's ``LoraConfig.lora_alpha`` default: the alpha diffusers loads for a file whose metadata names no lora_alpha."""
_CLIP_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _new_layout(key: str) -> str:
    """A key of the attention-processor layout in the ``lora.down`` / ``lora.up`` one (other keys as they are):
    ``to_out`` is the UNet's ``to_out.0``, and a text encoder's ``self_attn`` projections are its ``q_proj`` ..."""
    m = _OLD_LAYOUT.search(key)
    if m is None:
        return key
    stem, proj = key[: m.start()], m.group(2)
    module = _CLIP_NAMES[proj] if stem.endswith("self_attn") else proj + (".0" if proj == "to_out" else "")
    return f"{stem}.{module}.lora.{m.group(3)}.weight"


_SGM_BLOCK = re.compile(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)|middle_block_(\d+)_(.+)")
"""kohya's SDXL names: the blocks of Stability's generative-models (SGM) UNet, ``lora_unet_input_blocks_4_1_...``."""
_SGM_ALONE = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
              "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
              "label_emb_0_2": "add_embedding_linear_2"}  # fmt: skip
_SGM_RESNET = (("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"),
               ("skip_connection", "conv_shortcut"))  # fmt: skip


def _sgm_name(flat: str, base: nn.Module, key: str) -> str:
    """An SGM UNet module name (underscored, after ``lora_unet_``) as the diffusers UNet's, as diffusers'
    ``_maybe_map_sgm_blocks_to_diffusers`` and ``_convert_unet_lora_key`` map it: input block i is down block
    (i - 1) // (L + 1), layer (i - 1) % (L + 1), output block i up block i // (L + 1), layer i % (L + 1), with L the
    UNet's ``layers_per_block``; inner 0 / 1 / 2 are its resnets / attentions / up- or downsamplers; the middle
    block's 0, 1, 2 are resnets 0, attentions 0, resnets 1; a resnet's SGM layers get their diffusers names."""
    if flat in _SGM_ALONE:
        return _SGM_ALONE[flat]
    per_block = getattr(getattr(base, "config", None), "layers_per_block", None)
    if not isinstance(per_block, int):
        raise ConfigError(
            f"{key}: an SGM (SDXL) UNet key; this {type(base).__name__} has no single int layers_per_block "
            f"({per_block!r}) to map its block numbers by"
        )
    m, n = _SGM_BLOCK.match(flat), per_block + 1
    if m.group(1) is None:  # the middle block: resnet, attention, resnet
        i, rest = int(m.group(5)), m.group(6)
        name = {0: "mid_block_resnets_0", 1: "mid_block_attentions_0", 2: "mid_block_resnets_1"}.get(i)
        if name is None:
            raise ConfigError(f"{key}: SGM middle block {i} does not exist (0, 1, 2)")
    else:
        i, inner, rest = int(m.group(2)), int(m.group(3)), m.group(4)
        if inner > 2:
            raise ConfigError(f"{key}: SGM block {m.group(1)}_{i} has no inner layer {inner} (0, 1, 2)")
        if m.group(1) == "input_blocks":
            block, layer = (i - 1) // n, (i - 1) % n
            inner_name = (
                "downsamplers_0" if rest == "op" else f"{('resnets', 'attentions', 'upsamplers')[inner]}_{layer}"
            )
            name, rest = f"down_blocks_{block}_{inner_name}", "conv" if rest == "op" else rest
        else:
            block, layer = i // n, i % n
            name = f"up_blocks_{block}_{('resnets', 'attentions', 'upsamplers')[inner]}_{layer if inner < 2 else 0}"
    for sgm, diffusers in _SGM_RESNET:
        rest = diffusers if rest == sgm else rest
    return f"{name}_{rest}"


def read_lora_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a LoRA safetensors file, or of the one LoRA file in a folder
    (``pytorch_lora_weights.safetensors`` first). Safetensors only: a pickle can run code when loaded.

    Raises:
        ConfigError: nothing to read there, or several candidate files in the folder.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if WEIGHT_NAME in files:
            files = [WEIGHT_NAME]
        if len(files) != 1:
            found = ", ".join(files) or "none"
            raise ConfigError(f"{path}: expected one LoRA .safetensors file in the folder, found {found}")
        path = os.path.join(path, files[0])
    if not os.path.isfile(path):
        raise ConfigError(f"LoRA file {path!r} does not exist")
    try:
        with safe_open(path, "pt") as fh:
            names = fh.keys()  # (a safe_open handle is not iterable)
            return {k: fh.get_tensor(k) for k in names}, dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001  (a corrupt or foreign file: one line naming it)
        raise ConfigError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def _split(
    tensors: dict[str, torch.Tensor], prefix: str | None, base: nn.Module, source: str = "the file"
) -> tuple[dict[str, dict[str, Any]], list[str], str]:
    """{module path: {"A", "B", "alpha"?}} from diffusers or kohya keys, the keys that name no module of ``base``,
    and the format found ("kohya" or "diffusers"). Without a prefix, keys of two components that both fit ``base``
    (``text_encoder.`` and ``text_encoder_2.``) are refused: one would overwrite the other."""
    names = {n for n, _ in base.named_modules() if n}
    flat = _TEXT_MODEL not in names  # a file's text_model. level maps onto a model without it, as diffusers does

    def known(path: str) -> str | None:
        if flat and path.startswith(_TEXT_MODEL + ".") and path[len(_TEXT_MODEL) + 1 :] in names:
            return path[len(_TEXT_MODEL) + 1 :]
        return path if path in names else None

    modules: dict[str, dict[str, Any]] = {}
    unmatched: list[str] = []
    fits: dict[str, str] = {}  # without a prefix: each component whose keys fit, and its first key

    def fit(head: str, key: str) -> None:
        if fits.setdefault(head, key) and len(fits) > 1:
            raise ConfigError(
                f"{source}: keys of {' and '.join(map(repr, fits))} both fit this {type(base).__name__} "
                f"(such as {', '.join(fits.values())}); pass prefix= to pick the component"
            )

    kohya = any(k.endswith(tuple(_KOHYA_SUFFIXES)) and k.startswith("lora_") for k in tensors)
    if kohya:
        by_flat = {n.replace(".", "_"): n for n in names}
        if flat:  # lora_te_text_model_encoder_... (transformers 4's names)
            by_flat |= {f"{_TEXT_MODEL}_{k}": n for k, n in by_flat.items()}
        heads = _KOHYA_HEADS.get(prefix, (f"lora_{prefix}",)) if prefix else sum(_KOHYA_HEADS.values(), ())
        for key, value in tensors.items():
            suffix = next((s for s in _KOHYA_SUFFIXES if key.endswith(s)), None)
            stem = key[: -len(suffix)] if suffix else key
            head = next((h for h in heads if stem.startswith(h + "_")), None)
            if prefix and head is None and stem.startswith("lora_"):
                continue  # another component's (lora_te_ beside lora_unet_): the prefix picks one
            flat_name = stem[len(head) + 1 :] if head else ""
            if (
                head == "lora_unet"
                and flat_name not in by_flat
                and (_SGM_BLOCK.match(flat_name) or flat_name in _SGM_ALONE)
            ):
                flat_name = _sgm_name(flat_name, base, key)
            path = by_flat.get(flat_name) if head and suffix else None
            if path is None:
                unmatched.append(key)
                continue
            if prefix is None:
                fit(head, key)
            modules.setdefault(path, {})[_KOHYA_SUFFIXES[suffix]] = value
        return modules, unmatched, "kohya"
    for key, value in tensors.items():
        new = _new_layout(key)
        suffix = next((s for s in _DIFFUSERS_SUFFIXES if new.endswith(s)), None)
        stem = new[: -len(suffix)] if suffix else new
        if prefix is None and "." in stem and known(stem.split(".", 1)[1]):
            head, stem = stem.split(".", 1)  # "unet.down_blocks..." -> the path, whatever the component
            fit(head, key)
        elif prefix is not None and stem.startswith(prefix + "."):
            stem = stem[len(prefix) + 1 :]
        elif prefix is not None and stem.split(".", 1)[0] in _COMPONENTS:
            continue  # another component's (text_encoder. beside unet.): the prefix picks one
        path = known(stem) if suffix else None
        if path is None:
            unmatched.append(key)
            continue
        modules.setdefault(path, {})[_DIFFUSERS_SUFFIXES[suffix]] = value
    return modules, unmatched, "diffusers"


def load_lora(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    prefix: str | None = None,
    is_trainable: bool = False,
    *,
    hotswap: bool = False,
    _warn: bool = True,
) -> DeltaModel:
    """Load a diffusers- or kohya-format LoRA file (or folder) into ``model`` as ``adapter_name``.

    ``model`` is a DeltaModel or a plain denoiser / text encoder (wrapped then). ``prefix`` picks a component's
    keys (``unet``, ``transformer``, ``text_encoder``, SDXL's ``text_encoder_2``: kohya's ``lora_te1_`` and
    ``lora_te2_`` are these two); None takes the keys whose path fits the model. Ranks and alphas are read per module
    (kohya's ``.alpha``; diffusers' metadata, whose config without lora_alpha has peft's 8 as diffusers' ``LoraConfig(**metadata)``; else alpha = rank). Keys holding ``dora_scale`` (kohya's DoRA) are
    dropped with one warning naming them, and the rest loads as a plain LoRA, as diffusers' ``load_lora_weights``
    does (``_warn=False``: no warning, for a file whose other components warned already). ``hotswap``: replace the
    weights and scales of the LoRA ``adapter_name`` already there in place, as diffusers'
    ``load_lora_weights(..., hotswap=True)`` (peft's ``hotswap_adapter_from_state_dict``): a module the new file
    does not adapt gets zeros, a smaller rank is padded with zeros, a larger one replaces the tensors.

    Raises:
        ConfigError: the component's metadata use_rslora or use_dora not true, false, null, 0 or 1 (peft reads
            "false" as true), a module's alpha (kohya's .alpha, the metadata's) not a finite number > 0, a
            use_dora that the file's magnitudes (lora_magnitude_vector) contradict, the
            file holds keys that name no module of the model (the unmatched keys are listed: a LoRA for
            another architecture), keys of two components that both fit (without a prefix), a module without its A
            or B, or nothing at all; with ``hotswap``, no such adapter, or one that is merged, not a plain LoRA or
            does not adapt a module the file does; the model is unchanged.
    """
    from .methods.lora import LoraConfig

    tensors, metadata = read_lora_file(path)
    tensors = drop_dora_scale(tensors, path, _warn)
    delta = model if isinstance(model, DeltaModel) else DeltaModel(model)
    base = delta.get_base_model()
    modules, unmatched, kind = _split(tensors, prefix, base, os.fspath(path))
    other = [k for k in unmatched if _NOT_LORA.search(k)]
    if other:  # the module is there; the kind of update is not a LoRA's
        raise ConfigError(
            f"{path}: {len(other)} keys such as {other[0]} hold DoRA or LyCORIS (LoHa, LoKr, Tucker) parts, LoRA "
            "biases (lora_bias) or full weight differences; these files load plain LoRA (lora_down / lora_up, "
            "lora_A / lora_B weights) only"
        )
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f" (and {len(unmatched) - 5} more)" if len(unmatched) > 5 else "")
        raise ConfigError(
            f"{path}: {len(unmatched)} of {len(tensors)} keys name no module of this {type(base).__name__}: {shown}; "
            "a LoRA for another architecture or component?"
        )
    if not modules:
        other = f" for prefix {prefix!r} (its keys are another component's, such as {min(tensors)})"
        raise ConfigError(f"{path}: no LoRA tensors in the file" + (other if prefix and tensors else ""))
    dora = sorted(p for p, m in modules.items() if "m" in m)
    if dora and len(dora) != len(modules):
        plain = next(p for p in sorted(modules) if "m" not in modules[p])
        raise ConfigError(f"{path}: module {dora[0]} has a DoRA magnitude (lora_magnitude_vector) and {plain} none")
    incomplete = sorted(p for p, m in modules.items() if "A" not in m or "B" not in m)
    if incomplete:
        raise ConfigError(f"{path}: module {incomplete[0]} has no {'B' if 'A' in modules[incomplete[0]] else 'A'}")
    from .targets import pattern_value

    meta = {} if kind == "kohya" else _metadata(metadata, prefix, path)  # kohya files carry no config, only alphas
    if "use_dora" in meta and bool(meta["use_dora"]) != bool(dora):  # (diffusers: a DoRA from W's norms, or LoRA)
        held = f"DoRA magnitudes ({dora[0]}.lora_magnitude_vector)" if dora else "no lora_magnitude_vector keys"
        said = json.dumps(meta["use_dora"])
        raise ConfigError(f"{path}: its metadata's use_dora is {said}, and the file holds {held}")
    ranks = {p: m["A"].shape[0] for p, m in modules.items()}
    alphas, patterns = {}, meta.get("alpha_pattern") or {}
    # diffusers builds peft's LoraConfig(**metadata): a config without lora_alpha has peft's default, 8 (not the rank)
    default_alpha = meta.get("lora_alpha", PEFT_DEFAULT_ALPHA) if meta else None
    if not isinstance(patterns, dict):
        raise ConfigError(f"{path}: its metadata's alpha_pattern is a JSON {_json_kind(patterns)}, not an object")
    for p, m in modules.items():
        if kind == "kohya":  # kohya scales by alpha / r, as deltatune's lora_alpha does: the value carries over
            if "alpha" in m and m["alpha"].numel() != 1:
                raise ConfigError(f"{path}: module {p}'s .alpha holds {m['alpha'].numel()} numbers; an alpha is one")
            alphas[p] = float(m["alpha"]) if "alpha" in m else float(ranks[p])
        else:
            value = pattern_value(patterns, p, ranks[p] if default_alpha is None else default_alpha)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                where = "the metadata's lora_alpha or alpha_pattern"
                raise ConfigError(f"{path}: module {p}'s alpha is {value!r} ({where}); an alpha is a finite number")
            alphas[p] = float(value) if not isinstance(value, int) or abs(value) < 2**1023 else math.inf
    if bad := next((p for p in sorted(alphas) if not math.isfinite(alphas[p])), None):  # (the file, not the config)
        where = "its .alpha" if kind == "kohya" else "the metadata's lora_alpha or alpha_pattern"
        raise ConfigError(f"{path}: module {bad}'s alpha is {alphas[bad]} ({where}); an alpha is a finite number")
    if bad := next((p for p in sorted(alphas) if alphas[p] <= 0), None):  # (LoraConfig's check named neither)
        where = "its .alpha" if kind == "kohya" else "the metadata's lora_alpha or alpha_pattern"
        raise ConfigError(
            f"{path}: module {bad}'s alpha is {alphas[bad]:g} ({where}); these files load a LoRA with alpha > 0 "
            "(its update is scaled by alpha / r; kohya's sd-scripts reads 0 as alpha = rank, diffusers and ComfyUI "
            "as no update: set the .alpha you mean)"
        )
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(modules),
        use_rslora=bool(meta.get("use_rslora")),  # (null, 0, 1: as peft's ``if use_rslora``)
        use_dora=bool(dora),
        rank_pattern={re.escape(p): v for p, v in ranks.items() if v != r},
        alpha_pattern={re.escape(p): v for p, v in alphas.items() if v != alpha},
        inference_mode=not is_trainable,
    )
    state = {}
    for p, m in modules.items():
        state[f"{KEY_PREFIX}{p}.lora_A.weight"] = m["A"]
        state[f"{KEY_PREFIX}{p}.lora_B.weight"] = m["B"]
        if dora:
            state[f"{KEY_PREFIX}{p}.lora_magnitude_vector"] = m["m"]
    if hotswap:
        hotswap_lora(delta, adapter_name, config, modules, os.fspath(path))
        return delta
    delta.add_adapter(adapter_name, config, _tensors=state, _source=os.fspath(path))
    return delta


def drop_dora_scale(tensors: dict[str, torch.Tensor], path: Any, warn: bool = True) -> dict[str, torch.Tensor]:
    """``tensors`` without the keys holding ``dora_scale``, which diffusers' ``lora_state_dict`` filters out with a
    warning ("a DoRA checkpoint that is not compatible"): the LoRA loads without DoRA's magnitudes, as there."""
    dropped = sorted(k for k in tensors if "dora_scale" in k)
    if dropped and warn:
        shown = ", ".join(dropped[:3]) + (f" (and {len(dropped) - 3} more)" if len(dropped) > 3 else "")
        warnings.warn(
            f"{os.fspath(path)}: {len(dropped)} dora_scale keys dropped ({shown}): DoRA's magnitudes are not loaded, "
            "the file loads as a plain LoRA, as diffusers' load_lora_weights loads it",
            stacklevel=3,
        )
    return {k: v for k, v in tensors.items() if "dora_scale" not in k} if dropped else tensors


def _json_kind(value: Any) -> str:
    """JSON's name for a parsed value's type ("array", not Python's "list")."""
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _metadata(metadata: dict[str, str], prefix: str | None, path: Any = "the file") -> dict[str, Any]:
    """The LoRA config diffusers stored in the file's metadata for this component ({} when none).

    Raises:
        ConfigError: a ``lora_adapter_metadata`` that is not a JSON object (diffusers' ``json.loads`` fails on it;
            read as none, its alphas were lost and every update scaled by 1).
    """
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"{path}: its metadata's lora_adapter_metadata is not JSON ({e})") from None
    if meta is None:  # JSON null: none, as diffusers' _load_sft_state_dict_metadata reads it
        return {}
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: its metadata's lora_adapter_metadata is a JSON {_json_kind(meta)}, not an object")
    components = {k.split(".", 1)[0] for k in meta if "." in k}
    if not components:  # a model-level save (unet.save_lora_adapter(folder)): the bare peft config
        head = ""
    else:
        head = prefix or (components.pop() if len(components) == 1 else None)
        if head is None:
            return {}
        head += "."
        meta = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith(head)}
    for key in ("use_rslora", "use_dora"):  # only this component's: diffusers reads no other's
        # (peft takes "false" as true: the update would be scaled by alpha / sqrt(r); null, 0 and 1 it reads as meant)
        value = meta.get(key)
        if not (value is None or isinstance(value, bool) or (type(value) is int and value in (0, 1))):
            raise ConfigError(
                f"{path}: its metadata's {head}{key} is {value!r} (a JSON {_json_kind(value)}); it must be true, "
                "false, null, 0 or 1"
            )
    return meta


def hotswap_lora(delta: DeltaModel, name: str, config, modules: dict[str, dict[str, torch.Tensor]], path: str) -> None:
    """Swap adapter ``name``'s LoRA for ``modules`` (``{module path: {"A", "B"}}``) under ``config``, as peft: a module
    the new LoRA does not adapt gets zeros; a tensor of the same shape is copied in, a smaller one into the top-left
    corner of zeros, a larger one replaces the parameter's data. The adapter's stored config becomes ``config``'s,
    with each module's rank its tensors' and its alpha the one that gives the swapped-in scale at that rank.

    Raises:
        ConfigError: no adapter ``name``, one that is not a plain LoRA or is merged, or a module of the file that
            the adapter does not adapt (peft's "unexpected keys"), or a module whose tensors differ from the
            adapter's in more than the rank (a LoRA for another base model); nothing changed then.
    """
    from .methods.lora import LORA_LAYERS, LoraConfig
    from .targets import pattern_value

    old = delta.peft_config.get(name)
    if old is None:
        known = ", ".join(delta.peft_config) or "none"
        raise ConfigError(f"{path}: hotswap needs a loaded adapter {name!r} to swap (loaded: {known})")
    if not isinstance(old, LoraConfig) or old.use_dora or config.use_dora:
        raise ConfigError(f"{path}: hotswap swaps a plain LoRA for a plain LoRA; adapter {name!r} or the file is not")
    layers = {
        re.sub(r"(\.base_layer)+$", "", p): m  # (diffusion._module_path: as a file names the module)
        for p, m in delta.get_base_model().named_modules()
        if isinstance(m, LORA_LAYERS) and name in m.lora_A
    }
    if merged := sorted(p for p, m in layers.items() if name in m.merged_adapters):
        raise ConfigError(f"{path}: adapter {name!r} is merged into the weights ({merged[0]}); unmerge it first")
    if extra := sorted(set(modules) - set(layers)):
        raise ConfigError(
            f"{path}: hotswap cannot add modules: adapter {name!r} does not adapt {extra[0]}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for module in sorted(modules):  # only the rank may change: other dims are another base model's (or a bad file)
        a, b = layers[module].lora_A[name].weight, layers[module].lora_B[name].weight
        r = modules[module]["A"].shape[0]
        for key, old_t, want in (("A", a, (r, *a.shape[1:])), ("B", b, (b.shape[0], r, *b.shape[2:]))):
            if tuple(modules[module][key].shape) != want:
                raise ConfigError(
                    f"{path}: hotswap: {module}'s lora_{key} is {tuple(modules[module][key].shape)} in the file, where "
                    f"adapter {name!r} takes {tuple(want)} at rank {r} ({tuple(old_t.shape)} now); a LoRA for "
                    "another base model?"
                )
    with torch.no_grad():
        for module, layer in layers.items():
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            if module not in modules:  # (peft: the old LoRA's weights are set to 0)
                a.zero_()
                b.zero_()
                continue
            for old_t, new_t in ((a, modules[module]["A"]), (b, modules[module]["B"])):
                _swap_tensor(old_t, new_t.to(old_t.device, old_t.dtype))
            r = pattern_value(config.rank_pattern, module, config.r)
            alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
            layer.scaling[name] = alpha / (math.sqrt(r) if config.use_rslora else r)
    # The stored config follows the tensors as they now are (a padded rank is the tensor's, its alpha gives the
    # swapped-in scale), so a file saved after the swap loads with the same scales.
    ranks = {m: layer.lora_A[name].weight.shape[0] for m, layer in layers.items()}
    alphas = {
        m: layer.scaling[name] * (math.sqrt(ranks[m]) if config.use_rslora else ranks[m])
        for m, layer in layers.items()
    }
    for m, layer in layers.items():  # and so do the layers' own, which set_scale / unscale_layer start from
        layer.r[name], layer.lora_alpha[name], layer.use_rslora[name] = ranks[m], alphas[m], config.use_rslora
    r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    delta.peft_config[name] = dataclasses.replace(
        config,
        r=r,
        lora_alpha=alpha,
        target_modules=old.target_modules,
        inference_mode=old.inference_mode,
        rank_pattern={re.escape(m): v for m, v in ranks.items() if v != r},
        alpha_pattern={re.escape(m): v for m, v in alphas.items() if v != alpha},
    )


def _swap_tensor(old: torch.nn.Parameter, new: torch.Tensor) -> None:
    if old.shape == new.shape:
        old.copy_(new)
    elif all(o >= n for o, n in zip(old.shape, new.shape)):  # a smaller rank: zeros around it
        old.zero_()
        old[tuple(slice(0, n) for n in new.shape)].copy_(new)
    else:  # a larger rank: new storage
        old.data = new.clone()
