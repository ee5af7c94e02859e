"""The one place that knows the methods: a table of method names, each the module ``deltatune.methods.<name>``.

A method module ends with ``CONFIG, INJECT = LoraConfig, inject`` and imports no registry; the registry imports
it the first time the method is asked for. Lookups are dicts keyed by name, by ``peft_type`` (the key an
adapter_config.json carries) and by config class. Adding a method costs its file, one line in ``METHODS`` and
one row in the test matrix (tests/matrix.py).

The arrows: model -> registry -> methods -> config / layer / targets; nothing below points back here.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import ConfigError, read_config_file

if TYPE_CHECKING:
    import os

    from torch import nn

    from .config import DeltaConfig

InjectFn = Callable[["nn.Module", "DeltaConfig", str], list["nn.Module"]]

METHODS: dict[str, str] = {
    name: f"deltatune.methods.{name}"
    for name in (
        "lora",
        "ia3",
        "bottleneck",
        "fusion",
        "prompt_tuning",
        "p_tuning",
        "prefix_tuning",
        "freeze",
        "bitfit",
        "full",
        "vpt",
        "trainable_tokens",
    )
}
"""Method name (what a recipe writes: ``method: {name: lora}``) -> the module that implements it."""

HELPERS: list[str] = ["deltatune.methods._lora_combine"]
"""Modules beside the method modules that offer DeltaModel functions (their ``MODEL_FUNCTIONS``): LoRA's
``add_weighted_adapter``. Imported the first time such a function is asked for."""


@dataclass(frozen=True)
class Method:
    """A loaded method: its registry name, config class and inject function (the module's CONFIG, INJECT)."""

    name: str
    config_class: type[DeltaConfig]
    inject: InjectFn
    module: Any


_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_LOADED: dict[str, Method] = {}
_BY_PEFT_TYPE: dict[str, Method] = {}
_BY_CLASS: dict[type, Method] = {}


def register(name: str, module: str) -> None:
    """Add a method from outside the package: ``module`` (a dotted import path) ends with ``CONFIG, INJECT``.

    Raises:
        ValueError: the name is not lower-case snake case, or is taken.
    """
    if not _NAME.match(name):
        raise ValueError(f"method name must be lower-case snake case, got {name!r}")
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered (by {METHODS[name]})")
    METHODS[name] = module


def get(name: str) -> Method:
    """The method registered under ``name`` (e.g. "lora"), its module imported on first use.

    Raises:
        KeyError: no such method; the message lists the registered ones.
    """
    if name in _LOADED:
        return _LOADED[name]
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    module = importlib.import_module(METHODS[name])
    try:
        config_class, inject = module.CONFIG, module.INJECT
    except AttributeError:
        raise ImportError(f"{METHODS[name]} does not end with `CONFIG, INJECT = <config class>, inject`") from None
    if config_class.method != name:
        raise ImportError(f"{METHODS[name]}: {config_class.__name__}.method is {config_class.method!r}, not {name!r}")
    method = Method(name, config_class, inject, module)
    other = _BY_PEFT_TYPE.get(config_class.peft_type)
    if other is not None and other.name != name:
        raise ImportError(f"methods {other.name!r} and {name!r} both write peft_type {config_class.peft_type!r}")
    _LOADED[name] = _BY_PEFT_TYPE[config_class.peft_type] = _BY_CLASS[config_class] = method
    return method


def names() -> list[str]:
    """All registered method names, in table order."""
    return list(METHODS)


def get_by_peft_type(peft_type: str) -> Method:
    """The method whose config writes ``peft_type`` (e.g. "LORA")."""
    if peft_type not in _BY_PEFT_TYPE:
        _load_all()
    if peft_type not in _BY_PEFT_TYPE:
        raise KeyError(f"unknown peft_type {peft_type!r}; deltatune reads: {', '.join(sorted(_BY_PEFT_TYPE))}")
    return _BY_PEFT_TYPE[peft_type]


def method_of(config: DeltaConfig | type[DeltaConfig]) -> Method:
    """The method a config (or config class) belongs to.

    Raises:
        KeyError: its class is not the config class of a registered method.
    """
    cls = config if isinstance(config, type) else type(config)
    if cls not in _BY_CLASS and cls.method in METHODS:
        get(cls.method)
    if cls not in _BY_CLASS:
        raise KeyError(f"{cls.__name__} is not the config class of a registered method")
    return _BY_CLASS[cls]


def config_from_dict(data: dict[str, Any], source: str = "adapter config") -> DeltaConfig:
    """The registered method's config built from an adapter_config.json dict (chosen by its ``peft_type``).

    Raises:
        ConfigError: no ``peft_type``, an unknown one, or a field the method cannot honour.
    """
    if "peft_type" not in data:
        raise ConfigError(f"{source} has no 'peft_type' field")
    try:
        cls = get_by_peft_type(str(data["peft_type"])).config_class
    except KeyError as exc:
        raise ConfigError(f"{source}: {exc.args[0]}") from None
    return cls.from_dict(data, source=source)


def from_pretrained(path: str | os.PathLike[str]) -> DeltaConfig:
    """Read ``adapter_config.json`` from a folder (or the file itself) as its method's config."""
    file, data = read_config_file(path)
    return config_from_dict(data, source=file)


def model_function(attribute: str) -> Callable[..., Any] | None:
    """A function a method offers on DeltaModel (``MODEL_FUNCTIONS`` in its module or a ``HELPERS`` one, e.g.
    fusion's ``add_fusion``).

    DeltaModel calls it with itself first; None when no method offers ``attribute``.
    """
    modules = [method.module for method in _load_all()]
    for module in modules + [importlib.import_module(helper) for helper in HELPERS]:
        found = getattr(module, "MODEL_FUNCTIONS", {}).get(attribute)
        if found is not None:
            return found
    return None


def _load_all() -> list[Method]:
    return [get(name) for name in METHODS]


__all__ = [
    "HELPERS",
    "METHODS",
    "Method",
    "config_from_dict",
    "from_pretrained",
    "get",
    "get_by_peft_type",
    "method_of",
    "model_function",
    "names",
    "register",
]
