"""DeltaConfig: the fields every method shares, and the JSON round trip in PEFT's vocabulary.

A method's config is a dataclass that extends DeltaConfig with its own fields (``r``, ``lora_alpha``,
``num_virtual_tokens``, ...). ``to_dict`` writes the ``adapter_config.json`` that PEFT reads;
``DeltaConfig.from_dict`` reads one that PEFT (or deltatune) wrote and returns the registered
method's config class.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# PEFT writes many fields that only matter for features deltatune does not implement. When such a
# field holds its "off" value we can ignore it; any other value would change the adapter's meaning,
# so loading refuses it rather than silently computing something else.
_IGNORABLE_VALUES: tuple[Any, ...] = (None, False, {}, [], "", 0)
_IGNORABLE_KEYS = frozenset({"auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "revision"})


class ConfigError(ValueError):
    """A config field holds a value the method cannot use. The message names the field and the value."""


@dataclass
class DeltaConfig:
    """Fields every method shares. Subclasses set ``peft_type`` and add their own fields."""

    peft_type: ClassVar[str] = ""
    """The ``peft_type`` string written to adapter_config.json (PEFT's name where PEFT has the method)."""

    task_type: str | None = None
    """One of CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION, or None."""
    target_modules: list[str] | str | None = None
    """Module names to adapt: a list of name suffixes, a regex matched against the full name, or
    "all-linear". None uses the model family's defaults (deltatune.targets)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a new classification head)."""
    base_model_name_or_path: str | None = None
    """Where the base model came from; written for the record, not used to load."""
    inference_mode: bool = False
    """True when the adapter is loaded for inference only (its parameters are frozen)."""

    def __post_init__(self) -> None:
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)

    @property
    def method(self) -> str:
        """The registry name of this config's method."""
        from .registry import name_of

        return name_of(type(self))

    def to_dict(self) -> dict[str, Any]:
        """The config as adapter_config.json holds it (PEFT field names, plus ``peft_type``)."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, (set, tuple)) else value
        return out

    def replace(self, **changes: Any) -> DeltaConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @staticmethod
    def from_dict(data: dict[str, Any], source: str = "adapter config") -> DeltaConfig:
        """Build the registered method's config from an adapter_config.json dict.

        Args:
            data: the parsed JSON; must hold ``peft_type``.
            source: where it came from, for error messages.

        Raises:
            ConfigError: unknown ``peft_type``, or a field this method does not support set to a value
                that would change the adapter's meaning.
        """
        from .registry import get_by_peft_type

        if "peft_type" not in data:
            raise ConfigError(f"{source} has no 'peft_type' field")
        cls = get_by_peft_type(str(data["peft_type"])).config_class
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "peft_type":
                continue
            if key in known:
                kwargs[key] = value
            elif key not in _IGNORABLE_KEYS and not any(
                value == v and type(value) is type(v) for v in _IGNORABLE_VALUES
            ):
                raise ConfigError(
                    f"{source}: field {key!r} = {value!r} is not supported by deltatune's {cls.__name__}; "
                    "loading it would silently compute something else"
                )
        return cls(**kwargs)

    @staticmethod
    def from_pretrained(path: str | os.PathLike[str]) -> DeltaConfig:
        """Read ``adapter_config.json`` from a folder (or the file itself)."""
        path = os.fspath(path)
        file = path if path.endswith(".json") else os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path!r}")
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file} is not valid JSON (truncated?): {exc}") from None
        return DeltaConfig.from_dict(data, source=file)


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> None:
    """Raise ConfigError naming ``name`` when ``value`` lies outside [low, high) (bounds as flagged)."""
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    )
    if bad:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(
            f"{name} must be in {lo}{low if low is not None else '-inf'}, "
            f"{high if high is not None else 'inf'}{hi}, got {value!r}"
        )


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "ConfigError", "DeltaConfig", "check_range", "field"]
