"""Method registry: method name -> (config class, inject function). Nothing else lives here.

A method file ends with ``register("lora", LoraConfig, inject)``. The name is the lower-case key a
recipe writes (``method: {name: lora}``); the config class's ``peft_type`` is the key an
adapter_config.json carries.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from .config import DeltaConfig

InjectFn = Callable[["nn.Module", "DeltaConfig", str], list["nn.Module"]]


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type[DeltaConfig]
    inject: InjectFn


_METHODS: dict[str, Method] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register(name: str, config_class: type[DeltaConfig], inject: InjectFn) -> None:
    """Register a method under a lower-case ``name``.

    Raises:
        ValueError: the name is not lower-case snake case, or is taken.
    """
    if not _NAME.match(name):
        raise ValueError(f"method name must be lower-case snake case, got {name!r}")
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered")
    _METHODS[name] = Method(name, config_class, inject)


def get(name: str) -> Method:
    """The method registered under ``name`` (a registry name such as "lora").

    Raises:
        KeyError: no such method; the message lists the registered ones.
    """
    _load_builtin()
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def get_by_peft_type(peft_type: str) -> Method:
    """The method whose config writes ``peft_type`` (e.g. "LORA")."""
    _load_builtin()
    for method in _METHODS.values():
        if method.config_class.peft_type == peft_type:
            return method
    known = sorted(m.config_class.peft_type for m in _METHODS.values())
    raise KeyError(f"unknown peft_type {peft_type!r}; deltatune reads: {', '.join(known)}")


def name_of(config_class: type) -> str:
    """The registry name of a config class."""
    _load_builtin()
    for method in _METHODS.values():
        if method.config_class is config_class:
            return method.name
    raise KeyError(f"{config_class.__name__} is not registered")


def names() -> list[str]:
    """All registered method names."""
    _load_builtin()
    return sorted(_METHODS)


def _load_builtin() -> None:
    from . import methods  # noqa: F401  (importing the package registers the built-in methods)
