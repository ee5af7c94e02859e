"""Which modules a ``modules_to_save`` name reaches: peft 0.22's rule for new adapters, the file's for saved ones.

peft before 0.22 matched a name as a plain suffix of the module's path ("norm" was also every ``*_layernorm``,
SEQ_CLS's "classifier" DistilBERT's ``pre_classifier``); peft 0.22 (``_is_valid_match``) takes the whole name or a
dotted suffix ("norm" is ``model.norm`` alone). A new adapter takes peft 0.22's rule (``targets.add_modules_to_save``).
A file written by the older rule (peft < 0.22, deltatune before this module) holds the copies of the modules the
plain suffix reached: ``extend_from_file`` wraps those the file holds before its tensors are read, so it loads and
resumes training as it was trained; a file of the new rule holds none of them and loads as peft 0.22 loads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .layer import DeltaLayer, ModulesToSave, set_submodule


def reaches(path: str, name: str) -> bool:
    """peft 0.22's rule: ``name`` is the module's whole path or a dotted suffix of it."""
    return path == name or path.endswith("." + name)


def reaches_by_old_rule(path: str, name: str) -> bool:
    """peft < 0.22's rule, a plain suffix, where it reaches more than the new one (``input_layernorm`` for "norm")."""
    return path.endswith(name) and not reaches(path, name)


def saved_names(names: list[str], paths: list[str], planned: list[str]) -> list[str]:
    """``names`` as a new adapter saves them: one that peft < 0.22's plain suffix reads wider than the modules it
    trains (of ``paths``, the model's) becomes those modules' paths ("norm" -> "model.norm"), so peft 0.21 and 0.22
    both load the file as it trained (0.21 looked for every *_layernorm's copy: a KeyError)."""
    out: list[str] = []
    for name in names:
        trained = [q for q in planned if reaches(q, name)]
        wider = any(reaches_by_old_rule(p, name) and not any(p == q or p.startswith(q + ".") for q in planned)
                    for p in paths)  # fmt: skip
        out.extend(n for n in (trained if wider and trained else [name]) if n not in out)
    return out


def extend_from_file(model: Any, adapter_name: str, tensors: dict[str, Any], prefix: str) -> list[str]:
    """Wrap for ``adapter_name`` the modules its ``modules_to_save`` reach by the old rule alone whose every parameter
    the file holds (``<prefix><path>.<parameter>``, as a copy is saved); returns their paths (``undo``'s)."""
    names = model.peft_config[adapter_name].modules_to_save or []
    base = model.base_model
    inner = tuple(n + "." for n, m in base.named_modules() if n and isinstance(m, DeltaLayer))
    found = []
    for path, module in base.named_modules():
        if not path or path.startswith(inner) or isinstance(module, DeltaLayer):
            continue
        if not any(reaches_by_old_rule(path, n) for n in names) or any(path.startswith(f + ".") for f in found):
            continue
        params = [p for p, _ in module.named_parameters()]
        if params and all(f"{prefix}{path}.{p}" in tensors for p in params):
            found.append(path)
    if not found:
        return []
    layers = [layer for _, layer in model._layers()]
    like = next((layer for layer in layers if adapter_name in layer.adapter_names), None)
    trains = like is not None and any(p.requires_grad for p in like.adapter_parameters(adapter_name).values())
    for path in found:
        layer = ModulesToSave(base.get_submodule(path))
        layer.add(adapter_name)
        layer.modules_to_save[adapter_name].requires_grad_(trains)
        layer.set_adapters(model.active_adapters)
        layer.disabled = bool(layers) and layers[0].disabled
        set_submodule(base, path, layer)
    return found


def undo(model: Any, paths: list[str]) -> None:
    """Put back the modules ``extend_from_file`` wrapped (a refused load changes nothing)."""
    for path in paths:
        set_submodule(model.base_model, path, model.base_model.get_submodule(path).original_module)


@contextmanager
def old_copies(model: Any, adapter_name: str, tensors: dict[str, Any], prefix: str) -> Iterator[None]:
    """``extend_from_file`` for the tensors read inside; the modules it wrapped are put back if reading fails."""
    paths = extend_from_file(model, adapter_name, tensors, prefix)
    try:
        yield
    except BaseException:
        undo(model, paths)
        raise
