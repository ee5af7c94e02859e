"""Freeze tuning, and what the in-place baselines share (BitFit in bitfit.py, full fine-tuning in full.py).

- Freeze tuning (as LLaMA-Factory's ``finetuning_type: freeze``): only the last n transformer blocks train
  (``freeze_trainable_layers = n > 0``) or the first |n| (n < 0), of each stack (``use_llama_pro``: n spread evenly,
  LLaMA Pro's expanded blocks), optionally only some modules
  inside them, and optionally some modules outside the blocks (``freeze_extra_modules``).
- BitFit (Ben Zaken, Ravfogel, Goldberg, 2022; arXiv:2106.10199): only the bias terms train, h = W x + b with
  b trained and W frozen.
- Full fine-tuning: every base parameter trains. A "method" only so that trainers, recipes and benchmarks treat
  every way of fine-tuning alike.

None of them injects a layer (``inject`` returns []); each config's ``trainable_base_parameters`` names the base
parameters that train, and DeltaModel saves them under PEFT-style keys (the keys files.py writes), so the
adapter file is a partial (or, for "full", complete) state dict of the base. The training happens in place:
``disable_adapter`` cannot undo it and the model computes with the trained weights whether the adapter is active
or not. Parameters of other methods' layers (LoRA matrices, modules_to_save copies) are never included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..config import ConfigError, DeltaConfig, check_regex
from ..layer import DeltaLayer, ModulesToSave
from ..targets import LAYER_PATTERNS

_BLOCK = re.compile(rf"(?:^|\.)(?:{'|'.join(LAYER_PATTERNS)})\.(\d+)\.")


def trainable(model: nn.Module, names: list[str], method: str) -> list[str]:
    """``names``; a ConfigError when one is a 4-bit or 8-bit layer's weight (QLoRA's base), which cannot train."""
    from .quant import is_quantized

    packed = {n + ".": m for n, m in model.named_modules() if n and is_quantized(m)}
    bad = [p for p in names if p.startswith(tuple(packed)) and not p.endswith("bias")] if packed else []
    if bad:
        layer = next(m for n, m in packed.items() if bad[0].startswith(n))
        kind = "an 8-bit" if "8bit" in type(layer).__name__ else "a 4-bit"
        raise ConfigError(
            f"{method}: {bad[0]!r} is {kind} weight, which cannot train (QLoRA trains an adapter beside it); "
            "train a full-precision base, or an adapter method such as LoRA"
        )
    return names


def base_parameter_names(model: nn.Module) -> list[str]:
    """Names of the model's own parameters: not those inside an injected layer, except through its ``base_layer``.

    A ModulesToSave's ``original_module`` is left out as well: the adapter's copy replaces it.
    """
    layers = [(n, m) for n, m in model.named_modules() if n and isinstance(m, DeltaLayer)]
    out = []
    for name, _ in model.named_parameters():
        inside = [(path, m) for path, m in layers if name.startswith(path + ".")]
        if any(isinstance(m, ModulesToSave) or not name.startswith(path + ".base_layer.") for path, m in inside):
            continue
        out.append(name)
    return out


def _block(name: str) -> tuple[str, int] | None:
    """(the block list's path, the block's index) of a parameter inside a numbered block, e.g. ("model.layers", 3)."""
    m = _BLOCK.search(name)
    return (name[: m.start(1) - 1], int(m.group(1))) if m else None


def _names(value: object) -> bool:
    """A non-empty list (or tuple, set) of non-empty strings."""
    return isinstance(value, (list, tuple, set)) and bool(value) and all(isinstance(v, str) and v for v in value)


@dataclass
class FreezeConfig(DeltaConfig):
    """Freeze tuning: train the last (or first) n transformer blocks in place, freeze the rest."""

    method = "freeze"
    peft_type = "FREEZE"
    no_targets = ("freeze tuning trains whole blocks, chosen by freeze_trainable_layers, freeze_trainable_modules "
                  "and freeze_extra_modules")  # fmt: skip

    freeze_trainable_layers: int = 2
    """n > 0: the last n blocks train; n < 0: the first |n| (more than a stack has: all of it, as LLaMA-Factory). A
    model with several stacks (an encoder and a decoder): the last (first) n of each; on a vision-language model the
    language tower's alone (its vision tower and projector, BLIP-2's Q-Former, stay frozen, as in LLaMA-Factory)."""
    freeze_trainable_modules: list[str] | str | None = None
    """Within those blocks, train only these modules: a list of names under the block (e.g. ["mlp", "self_attn"])
    or a regex searched in the parameter name. None or "all" (LLaMA-Factory's default): the whole block."""
    freeze_extra_modules: list[str] | None = None
    """Modules outside the blocks that train as well (LLaMA-Factory's): names such as "embed_tokens", "norm" or
    "lm_head", matched as a whole component of the parameter's path."""
    use_llama_pro: bool = False
    """LLaMA Pro (Wu et al., 2024; LLaMA-Factory's ``use_llama_pro``): the n trained blocks are spread evenly, the last
    of each 1/n of the stack (the blocks ``llamafactory-cli``'s expand_model added): blocks stride - 1, 2 stride - 1,
    ... with stride = depth / n; n must be positive and divide each stack's depth."""

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.freeze_trainable_layers
        if not isinstance(n, int) or isinstance(n, bool) or n == 0:
            raise ConfigError(f"freeze_trainable_layers must be a non-zero integer, got {n!r}")
        modules = self.freeze_trainable_modules
        if isinstance(modules, str) and re.fullmatch(r"[\w.]+(?:\s*,\s*[\w.]+)+", modules):
            modules = [m.strip() for m in modules.split(",")]  # LLaMA-Factory's "mlp,self_attn" (no name has a comma)
        if modules == "all" or (isinstance(modules, (list, tuple, set)) and "all" in modules):
            self.freeze_trainable_modules = None
        elif isinstance(modules, str):
            check_regex("freeze_trainable_modules", modules)
        elif modules is not None:
            if not _names(modules):
                raise ConfigError(f"freeze_trainable_modules must be None, a regex or a non-empty list of module "
                                  f"names, got {modules!r}")  # fmt: skip
            self.freeze_trainable_modules = sorted(modules) if isinstance(modules, set) else list(modules)
        if not isinstance(self.use_llama_pro, bool):
            raise ConfigError(f"use_llama_pro must be true or false, got {self.use_llama_pro!r}")
        if self.use_llama_pro and n < 0:
            raise ConfigError(f"use_llama_pro needs freeze_trainable_layers > 0 (the expanded blocks), got {n}")
        extra = self.freeze_extra_modules
        if isinstance(extra, str):
            self.freeze_extra_modules = [m.strip() for m in extra.split(",")]
        elif extra is not None:
            empty = isinstance(extra, (list, tuple, set)) and not extra  # [], (), set(): nothing extra, as None
            if not (_names(extra) or empty):
                raise ConfigError(f"freeze_extra_modules must be a list of module names, got {extra!r}")
            self.freeze_extra_modules = sorted(extra) if isinstance(extra, set) else list(extra)

    def for_loading(self) -> DeltaConfig:
        """A saved file's config: its freeze_extra_modules as it trained (a name holding the blocks, refused for a new
        adapter since session 53, loads as it trained: the modules outside the blocks under it)."""
        loading = self.replace()
        loading._loading = True  # type: ignore[attr-defined]
        return loading

    def _blocks(self, stack: str, size: int) -> range:
        """The indices of the blocks of ``stack`` (``size`` deep) that train, as LLaMA-Factory's trainable_layer_ids."""
        n = self.freeze_trainable_layers
        if self.use_llama_pro:
            if size % n:
                raise ConfigError(f"use_llama_pro: {stack} has {size} blocks, not a multiple of "
                                  f"freeze_trainable_layers={n}")  # fmt: skip
            return range(size // n - 1, size, size // n)
        return range(max(size - n, 0), size) if n > 0 else range(min(-n, size))  # (beyond the depth: all of it)

    def trainable_base_parameters(self, model: nn.Module, new: bool = False) -> list[str]:
        """The parameters of the chosen blocks (and modules), and of the extra modules; ``new`` (a new adapter, not
        a saved one): an extra module that holds the trained blocks refused.

        Raises:
            ConfigError: the model has no numbered blocks, or an entry of freeze_trainable_modules or
                freeze_extra_modules matches nothing (|freeze_trainable_layers| beyond a stack's depth: all of it).
        """
        names = base_parameter_names(model)
        blocks = {p: b for p in names if (b := _block(p)) is not None}
        depth: dict[str, int] = {}
        for stack, i in blocks.values():
            depth[stack] = max(depth.get(stack, 0), i + 1)
        depth = _language_stacks(model, depth)
        if not depth:
            raise ConfigError(
                f"freeze: found no numbered transformer blocks (a module list named one of {LAYER_PATTERNS})"
            )
        chosen = {(stack, i) for stack, size in depth.items() for i in self._blocks(stack, size)}
        picked = [p for p in names if blocks.get(p) in chosen]
        modules = self.freeze_trainable_modules
        if isinstance(modules, str):
            picked = [p for p in picked if re.search(modules, p)]
        elif modules is not None:
            under = {p: p[len("{}.{}.".format(*blocks[p])) :] for p in picked}  # the path below the block
            hits = {m: [p for p in picked if under[p].startswith(m + ".")] for m in modules}
            missing = [m for m, found in hits.items() if not found]
            if missing and len(missing) < len(modules):  # every entry missing: the error below lists examples
                children = sorted({u.split(".")[0] for u in under.values()})
                raise ConfigError(
                    f"freeze_trainable_modules: {missing[0]!r} is not a module of the chosen blocks; "
                    f"their modules: {', '.join(children)}"
                )
            picked = [p for p in picked if any(p in found for found in hits.values())]
        if not picked:
            stacks = sorted({f"{s}.{i}" for s, i in chosen})
            raise ConfigError(
                f"freeze_trainable_modules={modules!r} matches no parameter in blocks {stacks} (a list names modules "
                f"directly under a block, a regex string searches the whole name); e.g. {', '.join(p for p in names if blocks.get(p) in chosen)[:300]}"
            )
        outside = sorted({p.rsplit(".", 2)[-2] for p in names if p not in blocks and "." in p})
        holders = {part: stack for stack in depth for part in stack.split(".")}  # (the stacks whose blocks train)
        for extra in self.freeze_extra_modules or []:
            if new and extra in holders:  # ("model" trained embed_tokens and norm; LLaMA-Factory refuses it)
                raise ConfigError(f"freeze_extra_modules: {extra!r} holds the blocks ({holders[extra]}); name modules "
                                  f"outside them: {', '.join(outside)}")  # fmt: skip
            found = [p for p in names if p not in blocks and re.search(rf"(?:^|\.){re.escape(extra)}\.", p)]
            if not found:
                _refuse_tied(model, extra)
                raise ConfigError(
                    f"freeze_extra_modules: {extra!r} is not a module outside the blocks; "
                    f"those modules: {', '.join(outside)}"
                )
            picked += [p for p in found if p not in picked]
        return trainable(model, picked, "freeze")


def _language_stacks(model: nn.Module, depth: dict[str, int]) -> dict[str, int]:
    """The stacks of ``depth`` that train: on a vision-language model the language tower's alone (LLaMA-Factory counts
    the text config's layers and, for the VLMs it registers, freezes the vision tower and the projector by default:
    freeze_vision_tower, freeze_multi_modal_projector; BLIP-2's Q-Former is its projector); elsewhere every stack
    but one named for vision beside others (an encoder-decoder: both)."""
    parts = tower_parts(model)
    language = {s: d for s, d in depth.items() if parts and tower_part(parts, s) == "language"}
    if language:
        return language
    text = {s: d for s, d in depth.items() if not re.search(r"vision|visual", s)}
    return text if text and len(text) < len(depth) else depth


def tower_parts(model: nn.Module) -> dict[str, list[str]] | None:
    """A vision-language model's (one whose config has a text_config) towers, found by the sub-configs: "language"
    (the modules whose config is the text config, and the output embedding), "vision" (the vision config's); None for
    a model with one tower. What is in neither is the projector (LLaVA's multi_modal_projector, BLIP-2's Q-Former)."""
    config = getattr(model, "config", None)
    if getattr(config, "text_config", None) is None:
        return None
    parts: dict[str, list[str]] = {}
    for tower, key in (("language", "text_config"), ("vision", "vision_config")):
        sub = getattr(config, key, None)
        parts[tower] = [
            n for n, m in model.named_modules() if n and sub is not None and getattr(m, "config", None) is sub
        ]
    if not parts["language"] or not parts["vision"]:  # (no module holds the sub-config itself: towers unknown)
        return None
    head = getattr(model, "get_output_embeddings", lambda: None)()
    parts["language"] += [n for n, m in model.named_modules() if head is not None and m is head]
    return parts


def tower_part(parts: dict[str, list[str]], name: str) -> str:
    """The tower (of ``tower_parts``) the parameter or module ``name`` sits in: "language", "vision" or "projector"."""
    hit = (t for t, paths in parts.items() if any(name == p or name.startswith(p + ".") for p in paths))
    return next(hit, "projector")


def _refuse_tied(model: nn.Module, extra: str) -> None:
    """A ConfigError saying so when the module ``extra`` names holds only weights tied to another's (a tied lm_head:
    its weight is the input embedding's, which model.named_parameters lists under that name alone)."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(p), name)
        if owner != name and re.search(rf"(?:^|\.){re.escape(extra)}\.", name):
            raise ConfigError(
                f"freeze_extra_modules: {extra!r} holds {name}, which is tied to {owner} (the same tensor); name "
                f"{owner.rsplit('.', 2)[-2]!r} to train it"
            )


def inject(model: nn.Module, config: DeltaConfig, adapter_name: str) -> list[nn.Module]:
    """Inject nothing; check now that the config fits the model, so that a misfit fails before any change."""
    if isinstance(config, FreezeConfig):
        config.trainable_base_parameters(model, new=not getattr(config, "_loading", False))
    else:
        config.trainable_base_parameters(model)
    return []


CONFIG, INJECT = FreezeConfig, inject
