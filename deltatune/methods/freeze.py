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
adapter file is a partial state dict of the base (for "full": every parameter that trained, the whole base but on a
vision-language model, whose vision tower and projector stay frozen by default). The training happens in place:
``disable_adapter`` cannot undo it and the model computes with the trained weights whether the adapter is active
or not. Parameters of other methods' layers (LoRA matrices, modules_to_save copies) are never included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import ConfigError, DeltaConfig, check_regex
from ..layer import DeltaLayer, ModulesToSave
from ..targets import LAYER_PATTERNS

TOWER_SWITCHES = (("freeze_vision_tower", "vision"), ("freeze_multi_modal_projector", "projector"))
_INNER_PROJECTOR = re.compile(r"(^|\.)visual\.merger$")  # (Qwen-VL's: LLaMA-Factory's projector_keys; Qwen3-VL's
# deepstack_merger_list is among its vision_model_keys)
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
    language tower's (its vision tower's and projector's too where freeze_vision_tower, freeze_multi_modal_projector
    say so)."""
    freeze_trainable_modules: list[str] | str | None = None
    """Within those blocks, train only these modules: a list of names under the block (e.g. ["mlp", "self_attn"])
    or a regex searched in the parameter name. None or "all" (LLaMA-Factory's default): the whole block."""
    freeze_extra_modules: list[str] | None = None
    """Modules outside the blocks that train as well (LLaMA-Factory's): names such as "embed_tokens", "norm" or
    "lm_head", matched as a whole component of the parameter's path."""
    use_llama_pro: bool = False
    """LLaMA Pro (Wu et al., 2024; LLaMA-Factory's ``use_llama_pro``): the n trained blocks are spread evenly, the last
    of each 1/n of the stack (the blocks LLaMA-Factory's scripts/llama_pro.py, ``--num_expand n``, added): blocks
    stride - 1, 2 stride - 1, ... with stride = depth / n; n must be positive and divide each stack's depth."""
    freeze_vision_tower: bool | None = None
    """A vision-language model's (see ``tower_parts``) vision tower's blocks stay frozen: True, LLaMA-Factory's
    default (its get_forbidden_modules holds for freeze tuning too), which a new adapter (and None here) takes; False:
    they train as the language tower's. A file or run from before session 55's switches (None, saved or missing):
    the rule it trained with, every stack but one named for vision (BLIP-2's Q-Former block trained)."""
    freeze_multi_modal_projector: bool | None = None
    """The projector stays frozen: True (as the vision tower); False: the whole projector trains, as LLaMA-Factory's
    trainable_layers += projector_keys (LLaVA's multi_modal_projector, Qwen-VL's visual.merger, BLIP-2's Q-Former)."""
    freeze_language_model: bool = False
    """LLaMA-Factory's: the language tower stays frozen too (its forbidden language_model_keys): the vision tower's
    chosen blocks (freeze_vision_tower=False) and the projector (freeze_multi_modal_projector=False) train, and the
    freeze_extra_modules named outside the language tower (one in it refused for a new adapter: LLaMA-Factory's
    forbidden modules keep it frozen). A vision-language model's only."""

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
        for key, _ in TOWER_SWITCHES:
            if not isinstance(getattr(self, key), (bool, type(None))):  # (1 and 0 as well: == True, == False)
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if not isinstance(self.freeze_language_model, bool):
            raise ConfigError(f"freeze_language_model must be true or false, got {self.freeze_language_model!r}")
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

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> DeltaConfig:
        """A file's config; one saved before the tower switches loads with the rule it trained with (``as_resumed``)."""
        return _as_trained(super().from_dict(data, source), data)

    def replace(self, **changes: Any) -> DeltaConfig:
        """A copy (``DeltaConfig.replace``) that keeps a file's rule from before the tower switches."""
        copy = super().replace(**changes)
        if getattr(self, "_old_rule", False):
            copy._old_rule = True  # type: ignore[attr-defined]
        return copy

    def as_resumed(self, saved: dict[str, Any]) -> DeltaConfig:
        """A run resumed from a checkpoint of freeze goes on with the towers it trained: a switch the recipe leaves
        unset takes the checkpoint's; one saved before the switches (missing or null) trained by the old rule."""
        if saved.get("peft_type") != self.peft_type:
            return self
        return _as_trained(self.replace(), saved)

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
        frozen = self._frozen()
        depth = _language_stacks(model, depth, frozen)
        if self.freeze_language_model and not (frozen is not None and tower_parts(model)):
            raise ConfigError("freeze: freeze_language_model needs a vision-language model (a text_config, a "
                              f"vision_config and an output head); {type(model).__name__} is one tower")  # fmt: skip
        if not depth and not self.freeze_language_model:
            raise ConfigError(
                f"freeze: found no numbered transformer blocks (a module list named one of {LAYER_PATTERNS})"
            )
        chosen = {(stack, i) for stack, size in depth.items() for i in self._blocks(stack, size)}
        picked = [p for p in names if blocks.get(p) in chosen]
        modules = self.freeze_trainable_modules
        if isinstance(modules, str):
            picked = [p for p in picked if re.search(modules, p)]
        elif modules is not None:
            if not depth and new:  # (freeze_language_model, the other blocks frozen: none trains; a name is checked)
                below = {p[len("{}.{}.".format(*b)) :] for p, b in blocks.items()}
                if bad := [m for m in modules if not any(u.startswith(m + ".") for u in below)]:
                    raise ConfigError(f"freeze_trainable_modules: {bad[0]!r} is not a module of the model's blocks; "
                                      f"their modules: {', '.join(sorted({u.split('.')[0] for u in below}))}")  # fmt: skip
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
        if not picked and depth:
            stacks = sorted({f"{s}.{i}" for s, i in chosen})
            raise ConfigError(
                f"freeze_trainable_modules={modules!r} matches no parameter in blocks {stacks} (a list names modules "
                f"directly under a block, a regex string searches the whole name); e.g. {', '.join(p for p in names if blocks.get(p) in chosen)[:300]}"
            )
        outside = sorted({p.rsplit(".", 2)[-2] for p in names if p not in blocks and "." in p})
        holders = {part: stack for stack in depth for part in stack.split(".")}  # (the stacks whose blocks train)
        towers = (tower_parts(model) or {}) if self.freeze_language_model else {}  # (its language tower stays frozen)
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
            if new and towers and (held := [p for p in found if tower_part(towers, p) == "language"]):
                raise ConfigError(f"freeze_extra_modules: {extra!r} is in the language tower ({held[0]}), which "
                                  "freeze_language_model keeps frozen (LLaMA-Factory's forbidden modules win); set "
                                  "freeze_language_model false to train it, or name a module of the vision tower or "
                                  "the projector")  # fmt: skip
            picked += [p for p in found if p not in picked]
        parts = tower_parts(model) if frozen is not None and "projector" not in frozen else None
        if parts and not getattr(self, "_old_rule", False):  # (LLaMA-Factory: trainable_layers += projector_keys)
            picked += [p for p in names if p not in picked and tower_part(parts, p) == "projector"]
        if not picked:  # (freeze_language_model with the other towers frozen)
            raise ConfigError(
                "freeze: freeze_language_model, freeze_vision_tower and freeze_multi_modal_projector leave nothing to "
                "train; set one of the last two false, or name freeze_extra_modules outside the language tower"
            )
        return trainable(model, picked, "freeze")

    def _frozen(self) -> set[str] | None:
        """The towers whose blocks stay frozen (None: the rule before the switches, by the stacks' names)."""
        old = getattr(self, "_old_rule", False)
        if old and all(getattr(self, k) is None for k, _ in TOWER_SWITCHES) and not self.freeze_language_model:
            return None
        values = {tower: getattr(self, key) for key, tower in TOWER_SWITCHES}  # (None: True; the old rule's: trained)
        values["language"] = self.freeze_language_model
        return {t for t, v in values.items() if v or (v is None and not (old and t == "projector"))}


def _as_trained(config: FreezeConfig, saved: dict[str, Any]) -> FreezeConfig:
    """``config`` with the switches it leaves unset as the file (or checkpoint) ``saved`` trained them: its own where
    it holds them; a file from before them: one with use_llama_pro (session 55, before the switches) froze both, an
    older one the old rule (``_old_rule``; one switch set, by the caller or the file: the other unset, saved null, and
    taken as the old rule did, the vision tower's blocks frozen, the projector's blocks alone trained)."""
    unset = [k for k, _ in TOWER_SWITCHES if getattr(config, k) is None]
    held = {k: saved[k] for k in unset if isinstance(saved.get(k), bool)}
    config = config.replace(**held) if held else config
    unset = [k for k in unset if k not in held]
    if not unset:
        return config
    if "use_llama_pro" in saved and not any(k in saved for k, _ in TOWER_SWITCHES):
        return config.replace(**dict.fromkeys(unset, True))
    config._old_rule = True  # type: ignore[attr-defined]
    return config


def _language_stacks(model: nn.Module, depth: dict[str, int], frozen: set[str] | None = None) -> dict[str, int]:
    """The stacks of ``depth`` that train: on a vision-language model the language tower's, and those of the towers
    not in ``frozen`` (LLaMA-Factory counts the text config's layers and freezes the vision tower and the projector
    by default: freeze_vision_tower, freeze_multi_modal_projector; BLIP-2's Q-Former is its projector); elsewhere, and
    for ``frozen`` None (the rule before the switches), every stack but one named for vision beside others (an
    encoder-decoder: both)."""
    parts = tower_parts(model) if frozen is not None else None
    language = {s: d for s, d in depth.items() if parts and tower_part(parts, s) not in frozen}  # type: ignore[operator]
    if language or (parts and "language" in frozen):  # type: ignore[operator]  (freeze_language_model: maybe none)
        return language
    text = {s: d for s, d in depth.items() if not re.search(r"vision|visual", s)}
    return text if text and len(text) < len(depth) else depth


def tower_parts(model: nn.Module) -> dict[str, list[str]] | None:
    """A vision-language model's towers, found by the sub-configs: "projector" (Qwen-VL's visual.merger, inside the
    vision tower: LLaMA-Factory's projector_key), "language" (the modules whose config is the text config, and the
    output embedding), "vision" (the vision config's). What is in none is the projector too (LLaVA's
    multi_modal_projector, BLIP-2's Q-Former). A vision-language model: a text_config, a vision_config and an output
    head (an LM head); None for any other (a model with one tower; CLIP's and SigLIP's dual encoders, whose
    text_projection and logit_scale are no projector between towers; BLIP's captioner, whose class gives no output
    embeddings). A task head (``score``, ``classifier``: Gemma3ForSequenceClassification's) is an output head too."""
    config = getattr(model, "config", None)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None:  # (a VLM with a task head: Gemma3ForSequenceClassification's score, ModernVBert's classifier)
        head = next((m for a in ("score", "classifier") if isinstance(m := getattr(model, a, None), nn.Module)), None)
    if getattr(config, "text_config", None) is None or head is None:
        return None
    parts: dict[str, list[str]] = {}
    for tower, key in (("language", "text_config"), ("vision", "vision_config")):
        sub = getattr(config, key, None)
        parts[tower] = [
            n for n, m in model.named_modules() if n and sub is not None and getattr(m, "config", None) is sub
        ]
    if not parts["language"] or not parts["vision"]:  # (no module holds the sub-config itself: towers unknown)
        return None
    parts["language"] += [n for n, m in model.named_modules() if m is head]
    return {"projector": [n for n, _ in model.named_modules() if _INNER_PROJECTOR.search(n)], **parts}


def tower_part(parts: dict[str, list[str]], name: str) -> str:
    """The tower (of ``tower_parts``) the parameter or module ``name`` sits in: "language", "vision" or "projector"
    (the first of ``parts`` that holds it)."""
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
    """Inject nothing: a new adapter's unset tower switches become True (LLaMA-Factory's defaults; a resumed run's
    from before them keeps its rule); check now that the config fits the model, so that a misfit fails before any
    change."""
    if isinstance(config, FreezeConfig):
        if not getattr(config, "_loading", False) and not getattr(config, "_old_rule", False):
            for key, _ in TOWER_SWITCHES:
                if getattr(config, key) is None:
                    setattr(config, key, True)
        from ..targets import _FROM_FILE  # (a resumed run's checkpoint: built as it trained)

        config.trainable_base_parameters(model, new=not getattr(config, "_loading", False) and not _FROM_FILE.get())
    else:
        config.trainable_base_parameters(model)
    return []


CONFIG, INJECT = FreezeConfig, inject
