"""peft 0.22's ``healthcheck`` / ``print_healthcheck`` over a DeltaModel: adapter states that are suspicious before
training (layers disabled or irregular, merged adapters, frozen active adapters, too few or too many trainable
parameters, a new task head not saved), summed up from ``status``'s layer and model status as peft sums up its own.

The report is peft's dict, key for key and finding for finding (tests/test_api_probe22.py compares them), except the
environment, which names deltatune's version (``deltatune_version``) where peft's names peft's.
Split from model.py in session 57 (model.py was at its 600-line limit).
"""

from __future__ import annotations

import platform
from collections import Counter
from typing import Any

import torch

from . import status
from .layer import ModulesToSave

PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT")
"""peft's methods with no tuner layer (its ``PeftModel`` holds no ``BaseTuner``): no layer status in the report."""

_HEAD_CLASS_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
_HEAD_NAMES = ("classifier", "score", "pre_classifier", "qa_outputs")
_CONFIG_FIELDS = ("task_type", "inference_mode", "target_modules", "target_parameters", "modules_to_save",
                  "layers_to_transform", "layers_pattern")  # fmt: skip


def _finding(code: str, severity: str, message: str) -> dict[str, str]:
    return {"code": code, "severity": severity, "message": message}


def _json(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        values = [_json(v) for v in value]
        return sorted(values) if isinstance(value, (set, frozenset)) else values
    return _json(value.value) if hasattr(value, "value") else str(value)


def _configurations(model: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for name, config in model.peft_config.items():
        fields = {}
        for field in _CONFIG_FIELDS:
            value = getattr(config, field, None)
            if field == "target_modules" and isinstance(value, (list, tuple)):
                value = set(value)  # peft's config holds a list of target_modules as a set
            if value is not None:
                fields[field] = _json(value)
        out[name] = fields
    return out


def _checkpointing(base: torch.nn.Module) -> bool:
    result = getattr(base, "is_activation_checkpointing", None)  # (transformers' newer name, then the older)
    return bool(getattr(base, "is_gradient_checkpointing", False) if result is None else result)


def _runtime(model: Any, skip: frozenset[int] = frozenset()) -> dict[str, Any]:
    """The base model's runtime facts; ``skip``: ids of parameters not counted (prompt learning's encoders, which
    peft keeps beside the base model and deltatune in a layer inside it)."""
    base = model.get_base_model()
    config = getattr(base, "config", None)
    dtypes: Counter = Counter()
    devices = set()
    for p in (p for p in base.parameters() if id(p) not in skip):
        dtypes[str(p.dtype).replace("torch.", "")] += p.numel()
        devices.add(p.device.type)
    device_map = getattr(base, "hf_device_map", None)
    return {
        "model_name_or_path": getattr(config, "_name_or_path", None),
        "model_type": getattr(config, "model_type", None),
        "revision": getattr(config, "_commit_hash", None),
        "training": model.training,
        "activation_checkpointing": _checkpointing(base),
        "parameter_dtypes": dict(sorted(dtypes.items())),
        "parameter_devices": sorted(devices),
        "hf_device_map_devices": None if device_map is None else sorted({str(d) for d in device_map.values()}),
        "quantization": {
            "is_loaded_in_4bit": bool(getattr(base, "is_loaded_in_4bit", False)),
            "is_loaded_in_8bit": bool(getattr(base, "is_loaded_in_8bit", False)),
            "method": _json(getattr(base, "quantization_method", None)),
        },
    }


def _parameter_findings(trainable: int, total: int, least: int, most_percent: float) -> tuple[float, list[dict]]:
    percent = 100 * trainable / total
    if trainable < least:
        return percent, [_finding("TOO_FEW_TRAINABLE_PARAMETERS", "error",
                                  f"The model should have at least {least} trainable parameter(s).")]  # fmt: skip
    if percent > most_percent:
        message = (f"{percent:.2f}% of model parameters are trainable; expected no more than {most_percent}% for "
                   "PEFT training.")  # fmt: skip
        return percent, [_finding("HIGH_TRAINABLE_PARAMETER_FRACTION", "warning", message)]
    return percent, []


def _environment() -> dict[str, Any]:
    import transformers

    from . import __version__

    try:
        import accelerate

        accelerate_version = accelerate.__version__
    except ImportError:
        accelerate_version = None
    return {"python_version": platform.python_version(), "platform": platform.platform(),
            "deltatune_version": __version__, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "accelerate_version": accelerate_version,
            "cuda_version": torch.version.cuda}  # fmt: skip


def _unsaved_heads(model: Any) -> list[str]:
    """A task head the base model's checkpoint did not hold (its class is not in ``config.architectures``), newly
    initialised, that no adapter trains in full (``modules_to_save``), so that a saved adapter would not hold it."""
    base = model.get_base_model()
    kind = type(base).__name__
    architectures = getattr(getattr(base, "config", None), "architectures", None)
    if not kind.endswith(_HEAD_CLASS_SUFFIXES) or not architectures or kind in architectures:
        return []
    return [n for n, child in base.named_children() if n in _HEAD_NAMES and not isinstance(child, ModulesToSave)]


def _no_layers(model: Any, least: int, most_percent: float) -> dict[str, Any]:
    """peft's report for prompt learning: counts and adapters, no layer status (so too for deltatune's in-place
    methods, which inject no layer)."""
    trainable, total = model.get_nb_trainable_parameters()
    percent, findings = _parameter_findings(trainable, total, least, most_percent)
    summary = {
        "model_id": getattr(getattr(model, "config", None), "name_or_path", "other"),
        "base_model_type": type(model.get_base_model()).__name__,
        "peft_types": {n: c.peft_type for n, c in model.peft_config.items()},
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": percent,
    }
    adapters = {"active_adapters": list(model.active_adapters), "available_adapters": sorted(model.peft_config)}
    encoders = frozenset(id(p) for _, layer in model._layers() if not hasattr(layer, "base_layer")
                         for p in layer.parameters())  # fmt: skip
    return _report(model, summary, adapters, findings, encoders)


def _report(model: Any, summary: dict, adapters: dict, findings: list[dict], skip=frozenset()) -> dict[str, Any]:
    return {
        "is_ready": not any(f["severity"] == "error" for f in findings),
        "environment": _environment(),
        "summary": summary,
        "adapter_configurations": _configurations(model),
        "model_runtime": _runtime(model, skip),
        "adapter_state": adapters,
        "findings": findings,
    }


def healthcheck(model: Any, min_trainable_params: int = 1, max_trainable_params_percent: float = 50) -> dict[str, Any]:
    """peft 0.22's ``PeftModel.healthcheck``: a JSON-serialisable dict of the model's adapter state and the findings
    that look wrong before training (an empty ``findings`` list promises nothing about the run). Fewer trainable
    parameters than ``min_trainable_params`` is an error; more than ``max_trainable_params_percent`` percent a warning."""
    for name, value in (("min_trainable_params", min_trainable_params),
                        ("max_trainable_params_percent", max_trainable_params_percent)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"healthcheck: {name} must be a number, got {value!r}")
    if not model.peft_config:
        raise ValueError("healthcheck: the model has no adapter")
    least, most = min_trainable_params, max_trainable_params_percent
    first = model.peft_config[model.active_adapters[0] if model.active_adapters else min(model.peft_config)]
    if str(first.peft_type) in PROMPT_TYPES or not model._layers():  # (in-place methods, e.g. BitFit: no layer either)
        return _no_layers(model, least, most)
    state, layers = status.model_status(model), status.layer_status(model)
    percent, findings = _parameter_findings(state.trainable_params, state.total_params, least, most)
    if state.enabled == "irregular":
        findings.append(
            _finding("IRREGULAR_ADAPTER_ENABLED_STATE", "error", "Adapter layers are not consistently enabled.")
        )
    elif not state.enabled:
        findings.append(_finding("ADAPTERS_DISABLED", "warning", "All adapter layers are disabled."))
    if state.active_adapters == "irregular":
        findings.append(
            _finding("IRREGULAR_ACTIVE_ADAPTERS", "error", "Active adapters differ across adapter layers.")
        )
    if state.merged_adapters == "irregular":
        findings.append(
            _finding("IRREGULAR_MERGED_ADAPTERS", "error", "Merged adapters differ across adapter layers.")
        )
    elif state.merged_adapters:
        merged = ", ".join(f"'{n}'" for n in state.merged_adapters)
        message = f"Adapter(s) {merged} is/are merged; unmerge them before training."
        findings.append(_finding("MERGED_ADAPTERS", "warning", message))
    if any(g == "irregular" for g in state.requires_grad.values()):
        message = "Adapter parameters do not consistently have requires_grad set across adapter layers."
        findings.append(_finding("IRREGULAR_REQUIRES_GRAD", "error", message))
    else:
        active = state.active_adapters if isinstance(state.active_adapters, list) else []
        if frozen := [n for n in active if state.requires_grad.get(n) is False]:
            message = f"Active adapter(s) {', '.join(frozen)} are not trainable."
            findings.append(_finding("ACTIVE_ADAPTERS_NOT_TRAINABLE", "warning", message))
    if heads := _unsaved_heads(model):
        names = ", ".join(f"'{n}'" for n in heads)
        message = (f"The task head {names} was newly initialized when the base model was loaded but is not in "
                   "`modules_to_save`, so it is not saved with the adapter. Loading the adapter later gives a "
                   "different random head. Set `task_type` in the PEFT config or add the head to `modules_to_save`.")  # fmt: skip
        findings.append(_finding("TASK_HEAD_NOT_SAVED", "warning", message))
    kinds = {a: dict(Counter(s.module_type for s in layers if a in s.available_adapters).most_common())
             for a in state.available_adapters}  # fmt: skip
    summary = {
        "model_id": getattr(getattr(model, "config", None), "name_or_path", "other"),
        "base_model_type": state.base_model_type,
        "adapter_model_type": state.adapter_model_type,
        "peft_types": state.peft_types,
        "trainable_params": state.trainable_params,
        "total_params": state.total_params,
        "trainable_percent": percent,
        "num_adapter_layers": state.num_adapter_layers,
        "adapter_layer_types": kinds,
    }
    fields = ("enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices",
              "quantization_backend")  # fmt: skip
    return _report(model, summary, {f: getattr(state, f) for f in fields}, findings)


def format_healthcheck(report: dict[str, Any], sep: str = ", ", indent: str = "  ") -> str:
    """peft's ``format_healthcheck``: the report as a few human-readable lines (deltatune's version in place of
    peft's)."""
    summary, state, env, runtime = (
        report["summary"],
        report["adapter_state"],
        report["environment"],
        report["model_runtime"],
    )
    active = state["active_adapters"]
    active = active if isinstance(active, str) else ", ".join(active) or "none"
    counts = [f"trainable: {summary['trainable_params']:,}", f"total: {summary['total_params']:,}",
              f"percent trainable: {summary['trainable_percent']:.4f}%"]  # fmt: skip
    if "num_adapter_layers" in summary:
        counts.append(f"adapter layers: {summary['num_adapter_layers']}")
    parts = [f"adapter is enabled: {state['enabled']}"] if "enabled" in state else []
    parts.append(f"active: {active}")
    if "merged_adapters" in state:
        merged = state["merged_adapters"]
        parts.append(f"merged: {merged if isinstance(merged, str) else ', '.join(merged) or 'none'}")
    else:
        parts.append(f"available: {', '.join(state['available_adapters']) or 'none'}")
    adapters = ", ".join(f"{n} ({t})" for n, t in summary["peft_types"].items())
    dtypes = ", ".join(f"{k}={v:,}" for k, v in runtime["parameter_dtypes"].items())
    lines = [
        "deltatune healthcheck",
        sep.join(
            (
                f"Model:\n{indent}ID: {summary['model_id']}",
                f"type: {summary['base_model_type']}",
                f"adapters: {adapters}",
            )
        ),  # fmt: skip
        sep.join(
            (
                f"Environment:\n{indent}deltatune: {env['deltatune_version']}",
                f"transformers: {env['transformers_version']}",
                f"torch: {env['torch_version']}",
                f"Python: {env['python_version']}",
            )
        ),  # fmt: skip
        sep.join(
            (
                f"Runtime:\n{indent}training: {runtime['training']}",
                f"devices: {', '.join(runtime['parameter_devices'])}",
                f"dtypes: {dtypes}",
                f"activation checkpointing: {runtime['activation_checkpointing']}",
            )
        ),  # fmt: skip
        f"Parameters:\n{indent}" + sep.join(counts),
        f"State:\n{indent}" + sep.join(parts),
    ]
    if "adapter_layer_types" in summary:
        lines.append("Layer types:")
        for name, kinds in summary["adapter_layer_types"].items():
            kinds_line = sep.join(f"{k}={v}" for k, v in kinds.items()) or "none (trained in place)"
            lines += [f"{indent}{name}:", f"{2 * indent}{kinds_line}"]
    if report["findings"]:
        lines.append("Findings:")
        lines += [f"{indent}{f['severity'].upper()}: {f['message']}" for f in report["findings"]]
    return "\n".join(lines)


def print_healthcheck(model: Any, sink: Any = print, min_trainable_params: int = 1,
                      max_trainable_params_percent: float = 50, **kwargs: Any) -> None:  # fmt: skip
    """peft 0.22's ``PeftModel.print_healthcheck``: ``sink`` (``print``, or e.g. ``logger.info``) gets
    ``format_healthcheck`` of the report; ``kwargs`` (``sep``, ``indent``) go to it."""
    report = healthcheck(model, min_trainable_params, max_trainable_params_percent)
    sink(format_healthcheck(report, **kwargs))
