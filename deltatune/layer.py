"""What every injected module shares: per-adapter state keyed by name, activation, merge, save keys.

A method's layer subclasses ``DeltaLayer`` (one level, no deeper) and lists in ``adapter_attrs`` the
``nn.ModuleDict`` / ``nn.ParameterDict`` attributes that hold one entry per adapter name. With that,
``DeltaModel`` can switch, disable, delete, save and load any method's adapters without knowing
which method it is. Saved keys follow PEFT: the attribute path with the adapter name removed
(``lora_A.default.weight`` -> ``lora_A.weight``).

``ModulesToSave`` is the one layer that is not a method: it keeps a full trainable copy of a module
(a new classification head) per adapter, as PEFT's ModulesToSaveWrapper does, with the same keys.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class DeltaLayer(nn.Module):
    """Base of every module a method injects.

    Subclasses set ``adapter_attrs`` and implement ``forward`` (and ``merge``/``unmerge`` where the
    math allows). A layer that wraps a base module keeps it as ``self.base_layer``.
    """

    adapter_attrs: tuple[str, ...] = ()
    """Names of the ModuleDict / ParameterDict attributes holding one entry per adapter."""

    def __init__(self, base_layer: nn.Module | None = None) -> None:
        super().__init__()
        if base_layer is not None:
            self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # -- bookkeeping -------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds."""
        names: list[str] = []
        for attr in self.adapter_attrs:
            for key in getattr(self, attr):
                if key not in names:
                    names.append(key)
        return names

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def set_adapters(self, names: list[str]) -> None:
        """Make ``names`` (those of them this layer holds) the active adapters, in that order."""
        held = self.adapter_names
        self.active_adapters = [n for n in names if n in held]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """This adapter's parameters, keyed as PEFT saves them (relative to this layer)."""
        out: dict[str, nn.Parameter] = {}
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name not in container:
                continue
            entry = container[name]
            if isinstance(entry, nn.Parameter):
                out[attr] = entry
            else:
                for pname, p in entry.named_parameters():
                    out[f"{attr}.{pname}"] = p
        return out

    def export_state(self, name: str, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved for adapter ``name``, keyed as in adapter_model.safetensors.

        ``prefix`` is ``"base_model.model.<path of this layer>."``. A layer whose saved form differs from
        its parameters (a folded reparametrisation) overrides this and ``import_state``.
        """
        return {prefix + k: p for k, p in self.adapter_parameters(name).items()}

    def import_state(self, name: str, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors (keys as ``export_state`` gives them, shapes already checked) into the adapter."""
        with torch.no_grad():
            for k, p in self.adapter_parameters(name).items():
                p.copy_(tensors[prefix + k])

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter's entries (unmerging it first)."""
        if name in self.merged_adapters:
            self.unmerge(name)
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    # -- merging -----------------------------------------------------------------------------------
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights. Idempotent."""
        raise TypeError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge(self, name: str) -> None:
        """Undo ``merge(name)``, restoring the base weights. Idempotent."""
        raise TypeError(f"{type(self).__name__} cannot be merged into the base weights")

    def unwrap(self) -> nn.Module | None:
        """The plain module to leave in this layer's place once its adapters are merged (None: remove)."""
        return getattr(self, "base_layer", None)


class ModulesToSave(DeltaLayer):
    """A full trainable copy of ``original_module`` per adapter (PEFT's ModulesToSaveWrapper layout)."""

    adapter_attrs = ("modules_to_save",)

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()

    def add(self, name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        # PEFT saves the copy under the wrapped module's own name: "classifier.weight".
        return {k.removeprefix("modules_to_save."): v for k, v in super().adapter_parameters(name).items()}

    def _current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active_adapters:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        return self._current()(*args, **kwargs)

    def merge(self, name: str) -> None:  # nothing to fold: the copy replaces the original on unwrap
        pass

    def unmerge(self, name: str) -> None:
        pass

    def unwrap(self) -> nn.Module:
        return self._current()

    def __getattr__(self, name: str):
        # Code that reads attributes of the wrapped module (``model.score.weight``, ``out_features``) still works.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._current(), name)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the module at dotted path ``name`` under ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def logical_numel(t: torch.Tensor) -> int:
    """How many parameters ``t`` stands for. Packed low-bit storage says so itself: ``elements_per_item`` (values per
    stored element), or the logical shape in ``quant_state.shape`` (bitsandbytes' Params4bit: two 4-bit values a byte)."""
    per_item = getattr(t, "elements_per_item", None)
    if per_item is not None:
        return t.numel() * per_item
    shape = getattr(getattr(t, "quant_state", None), "shape", None)
    if shape is not None:
        n = 1
        for d in shape:
            n *= int(d)
        return n
    return t.numel()


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a plain or wrapped base module."""
    while isinstance(layer, DeltaLayer) and hasattr(layer, "base_layer"):
        layer = layer.base_layer
    return layer.weight
