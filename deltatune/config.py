"""DeltaConfig: the fields every method shares, and the JSON round trip in PEFT's vocabulary.

A method's config is a dataclass that extends DeltaConfig with its own fields (``r``, ``lora_alpha``,
``num_virtual_tokens``, ...) and fills in the hooks declared here (``method``, ``peft_type``,
``state_key_prefix``, ``trainable_base_parameters``). ``to_dict`` writes the ``adapter_config.json`` that PEFT
reads; ``from_dict`` reads one back into a given class. Which class a file belongs to is the registry's
business (``deltatune.registry.config_from_dict``): this module imports no method and no registry.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import nn

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# PEFT writes many fields that only matter for features deltatune does not implement. When such a
# field holds its "off" value we can ignore it; any other value would change the adapter's meaning,
# so loading refuses it rather than silently computing something else.
_IGNORABLE_VALUES: tuple[Any, ...] = (None, False, {}, [], "", 0)
_IGNORABLE_KEYS = frozenset(
    {"auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "runtime_config"}
)  # (peft drops runtime_config from a file: runtime only)
_NAME_FIELDS = ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern", "feedforward_modules")
"""Fields naming modules: a string (a regex or a name) or a list of names."""


class ConfigError(ValueError):
    """A config field holds a value the method cannot use. The message names the field and the value."""


@dataclass
class DeltaConfig:
    """Fields every method shares. Subclasses set ``peft_type`` and add their own fields."""

    method: ClassVar[str] = ""
    """The registry name of the method (``lora``, ``prompt_tuning``, ...): the name of its file in methods/ and
    the ``method.name`` a recipe writes. The registry checks that its table and the class agree."""
    peft_type: ClassVar[str] = ""
    """The ``peft_type`` string written to adapter_config.json (PEFT's name where PEFT has the method)."""
    state_key_prefix: ClassVar[str | None] = None
    """The prefix of this adapter's tensor keys in adapter_model.safetensors; None: PEFT's usual one
    (deltatune.files.KEY_PREFIX). PEFT's prompt-learning methods use a shorter one for their extra modules."""
    recipe_refusal: ClassVar[str | None] = None
    """Why a recipe cannot train this method (AdapterFusion's adapters come from a model); None: it can."""
    virtual_tokens_in: ClassVar[str] = "input"
    """Where a token method's ``num_virtual_tokens`` take positions: ``"input"`` (prompt tuning, P-tuning: before the
    encoder's input) or ``"cache"`` (prefix tuning: the attention cache, an encoder-decoder's decoder positions)."""
    no_targets: ClassVar[str | None] = None
    """Why the method reads no ``target_modules`` (BitFit's biases, prompt tuning's virtual tokens): a config that
    sets it is refused with this, and a saved file's value, never read, is dropped; None: the method reads it."""

    task_type: str | None = None
    """One of CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION, or None."""
    target_modules: list[str] | str | None = None
    """Module names to adapt: a list of name suffixes, a regex matched against the full name, or
    "all-linear". None uses the model family's defaults (deltatune.targets)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a new classification head)."""
    base_model_name_or_path: str | None = None
    """Where the base model came from; written for the record, not used to load."""
    revision: str | None = None
    """The base model's revision (peft's field: ``get_delta_model(revision=...)`` records it), for the record."""
    inference_mode: bool = False
    """True when the adapter is loaded for inference only (its parameters are frozen)."""

    def __post_init__(self) -> None:
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")
        for key in ("target_modules", *_NAME_FIELDS):  # a set or tuple of names reads as a list (sorted, a set)
            if isinstance(value := getattr(self, key, None), (set, tuple)):
                setattr(self, key, sorted(value) if isinstance(value, set) or key == "target_modules" else list(value))
        for key in ("target_modules", "exclude_modules"):  # a string is a regex (exclude_modules: the methods' own)
            if isinstance(getattr(self, key, None), str):
                check_regex(key, getattr(self, key))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        for key in _NAME_FIELDS:  # matched against module names later, where a number fails deep inside (a TypeError)
            value = getattr(self, key, None)
            if value is not None and not all(
                isinstance(v, str) for v in (value if isinstance(value, list) else [value])
            ):
                raise ConfigError(f"{key} must be a string or a list of strings (module names), got {value!r}")
        if self.no_targets and self.target_modules is not None:  # (a silently ignored selection: every module trained)
            raise ConfigError(f"{self.method}: {self.no_targets}; leave target_modules unset")

    def trainable_base_parameters(self, model: nn.Module) -> list[str]:
        """Names of base-model parameters this adapter trains in place and saves (BitFit's biases, LoRA's
        ``bias="all"``). The default, none: the adapter's own modules are all that train."""
        return []

    def uses(self) -> list[str]:
        """The other adapters this one computes with (a fusion's members): none may be deleted while it is there."""
        return []

    def for_loading(self) -> DeltaConfig:
        """The config to build the adapter with when its weights come from a file: the same by default; a method
        whose initialisation needs what the file makes needless (a tokenizer) leaves it out."""
        return self

    def as_resumed(self, saved: dict[str, Any]) -> DeltaConfig:
        """The config a run resumed from a checkpoint goes on with, ``saved`` being that checkpoint's
        adapter_config.json: the same by default; a method whose new adapters' defaults changed keeps an older run's
        (full's tower switches)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """The config as adapter_config.json holds it (PEFT field names, plus ``peft_type``)."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, (set, tuple)) else value
        return out

    def replace(self, **changes: Any) -> DeltaConfig:
        """A copy with some fields changed (validated again). The config's own warnings, said when it was made, are
        not said again (peft says them once per config made); those the changes bring are."""
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            copy = dataclasses.replace(self, **changes)
        if said and changes:
            with warnings.catch_warnings(record=True) as own:
                warnings.simplefilter("always")
                dataclasses.replace(self)
            known = {(w.category, str(w.message)) for w in own}
            said = [w for w in said if (w.category, str(w.message)) not in known]
        for w in said if changes else []:
            warnings.warn(w.message, stacklevel=2)
        return copy

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> DeltaConfig:
        """Build this config class from an adapter_config.json dict (``deltatune.registry.config_from_dict`` picks
        the class by ``peft_type``).

        Args:
            data: the parsed JSON; a ``peft_type`` in it must be this class's.
            source: where it came from, for error messages.

        Raises:
            ConfigError: another method's ``peft_type``, or a field this method does not support set to a value
                that would change the adapter's meaning.
        """
        if "peft_type" in data and str(data["peft_type"]) != cls.peft_type:
            raise ConfigError(f"{source}: peft_type is {data['peft_type']!r}, not {cls.__name__}'s {cls.peft_type!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "peft_type" or (key == "target_modules" and cls.no_targets):  # (the latter: never read)
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
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> DeltaConfig:
        """Read ``adapter_config.json`` from a folder (or the file itself) as this config class.

        On ``DeltaConfig`` itself, where the method is not known yet, use ``deltatune.load_config(path)`` (the
        registry picks the class by the file's ``peft_type``).
        """
        if not cls.peft_type:
            raise TypeError(
                "DeltaConfig.from_pretrained needs a method's config class (e.g. LoraConfig); "
                "deltatune.load_config(path) reads any adapter_config.json"
            )
        file, data = read_config_file(path)
        return cls.from_dict(data, source=file)


def named_adapters_hint(folder: str) -> str:
    """Where a folder with no adapter of its own keeps the named ones (peft saves any but "default" in a sub-folder
    of its name), as the end of a message; "" when none. The first 8 named, then how many more (a runs folder of
    130 was one line of 130 names)."""
    inside = sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, CONFIG_NAME))) if (
        os.path.isdir(folder)) else []  # fmt: skip
    more = f" and {len(inside) - 8} more" if len(inside) > 8 else ""
    return f"; its sub-folders hold adapters: {', '.join(inside[:8])}{more} (load one by name)" if inside else ""


def read_config_file(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """The path and parsed contents of ``adapter_config.json`` in a folder (or of the file itself)."""
    path = os.fspath(path)
    file = path if path.endswith(".json") else os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {CONFIG_NAME} at {path!r}{named_adapters_hint(path)}")
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file} is not valid JSON (truncated?): {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file} is not UTF-8 text (byte {exc.start}); an adapter config is JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} holds a JSON {type(data).__name__}, not an object")
    if data.get("layers_pattern") and data.get("layers_to_transform") is None:  # deltatune saved it before b2dcbc3
        import warnings  # (a config refuses it now, as peft's; alone it narrowed nothing, so the file reads as it ran)

        warnings.warn(f"{file}: layers_pattern={data['layers_pattern']!r} without layers_to_transform narrowed "
                      "nothing; read without it", stacklevel=2)  # fmt: skip
        data = {k: v for k, v in data.items() if k != "layers_pattern"}
    return file, data


def json_fields(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` (a config's ``to_dict``, e.g. peft's) as the adapter_config.json it saves reads back: paths as
    strings, sets as sorted lists; a value JSON cannot hold is refused in one line naming its field (ConfigError)."""

    def plain(value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        raise TypeError(f"a {type(value).__name__}")

    out = {}
    for key, value in data.items():
        try:
            out[key] = json.loads(json.dumps(value, default=plain))
        except (TypeError, ValueError) as exc:
            shown = repr(value).replace("\n", " ")
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise ConfigError(
                f"{source}: field {key!r} = {shown} cannot be written to {CONFIG_NAME} ({exc})"
            ) from None
    return out


def field_docs(cls: type) -> list[tuple[str, Any, str]]:
    """(field, default, doc) for every field of a config dataclass, the doc being the string written under the
    field in the source (an attribute docstring). Python drops those strings, so they are read back from the
    source with ``ast``: the one place they live, for ``deltatune train --help`` and the docs."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (frozen, interactive): no docs, fields still listed
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((f.name, None if default is dataclasses.MISSING else default, docs.get(f.name, "")))
    return rows


def check_positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is an integer >= 1 (None too when ``optional``).

    ``True`` is refused: Python counts it as the integer 1, a recipe that writes ``r: true`` means something else.
    """
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")


def check_regex(name: str, pattern: str) -> None:
    """Raise ConfigError naming ``name`` unless ``pattern`` is a valid regular expression (re.error otherwise came
    from deep inside the matching, after some modules were already wrapped)."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{name} is not a valid regex: {pattern!r} ({exc})") from None


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is a finite number in [low, high) (bounds as flagged).

    NaN compares false with every bound and would pass them all; infinity passes an open upper bound: both are
    refused, as are strings and booleans (which Python counts as numbers).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
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


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ConfigError",
    "DeltaConfig",
    "check_positive_int",
    "check_range",
    "check_regex",
    "field",
    "field_docs",
    "read_config_file",
]
