"""Freeze tuning, and what the in-place baselines share (BitFit in bitfit.py, full fine-tuning in full.py).

- Freeze tuning (as LLaMA-Factory's ``finetuning_type: freeze``): only the last n transformer blocks train
  (``freeze_trainable_layers = n > 0``) or the first |n| (n < 0), optionally only some modules inside them.
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
    """``names``; a ConfigError when one is a 4-bit layer's weight (QLoRA's base), which cannot train."""
    from .quant import is_quantized

    packed = tuple(n + "." for n, m in model.named_modules() if n and is_quantized(m))
    bad = [p for p in names if p.startswith(packed) and not p.endswith("bias")] if packed else []
    if bad:
        raise ConfigError(
            f"{method}: {bad[0]!r} is a 4-bit weight, which cannot train (QLoRA trains an adapter beside it); "
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


def _block_index(name: str) -> int | None:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


@dataclass
class FreezeConfig(DeltaConfig):
    """Freeze tuning: train the last (or first) n transformer blocks in place, freeze the rest."""

    method = "freeze"
    peft_type = "FREEZE"

    freeze_trainable_layers: int = 2
    """n > 0: the last n blocks train; n < 0: the first |n|. Encoder-decoder models: block i of each stack."""
    freeze_trainable_modules: list[str] | str | None = None
    """Within those blocks, train only these modules: a list of names under the block (e.g. ["mlp", "self_attn"])
    or a regex searched in the parameter name. None: the whole block."""

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.freeze_trainable_layers
        if not isinstance(n, int) or isinstance(n, bool) or n == 0:
            raise ConfigError(f"freeze_trainable_layers must be a non-zero integer, got {n!r}")
        if isinstance(self.freeze_trainable_modules, str):
            check_regex("freeze_trainable_modules", self.freeze_trainable_modules)
        elif self.freeze_trainable_modules is not None:
            self.freeze_trainable_modules = list(self.freeze_trainable_modules)
            if not self.freeze_trainable_modules:
                raise ConfigError("freeze_trainable_modules must be None, a regex or a non-empty list, got []")

    def trainable_base_parameters(self, model: nn.Module) -> list[str]:
        """The parameters of the chosen blocks (and modules).

        Raises:
            ConfigError: the model has no numbered blocks, |freeze_trainable_layers| exceeds their number, or
                freeze_trainable_modules matches nothing in the chosen blocks.
        """
        names = base_parameter_names(model)
        indices = {i for i in map(_block_index, names) if i is not None}
        if not indices:
            raise ConfigError(
                f"freeze: found no numbered transformer blocks (a module list named one of {LAYER_PATTERNS})"
            )
        n_layers = max(indices) + 1
        n = self.freeze_trainable_layers
        if abs(n) > n_layers:
            raise ConfigError(f"freeze_trainable_layers={n} but the model has only {n_layers} layers")
        chosen = set(range(n_layers - n, n_layers)) if n > 0 else set(range(-n))
        picked = [p for p in names if _block_index(p) in chosen]
        modules = self.freeze_trainable_modules
        if isinstance(modules, str):
            picked = [p for p in picked if re.search(modules, p)]
        elif modules is not None:
            picked = [
                p for p in picked if any(re.search(rf"\.{_block_index(p)}\.{re.escape(m)}\.", p) for m in modules)
            ]
        if not picked:
            raise ConfigError(
                f"freeze_trainable_modules={modules!r} matches no parameter in blocks {sorted(chosen)}; "
                f"e.g. {', '.join(n for n in names if _block_index(n) in chosen)[:300]}"
            )
        return trainable(model, picked, "freeze")


def inject(model: nn.Module, config: DeltaConfig, adapter_name: str) -> list[nn.Module]:
    """Inject nothing; check now that the config fits the model, so that a misfit fails before any change."""
    config.trainable_base_parameters(model)
    return []


CONFIG, INJECT = FreezeConfig, inject
