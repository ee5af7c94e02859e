"""deltatune: parameter-efficient fine-tuning (delta tuning) of transformer models.

One API for every method: build a config, wrap a model, train, save in PEFT's format, merge.

    import deltatune as dt
    model = dt.get_delta_model(base, dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

Names load on first use (PEP 562): ``deltatune --help`` does not import torch, and ``import deltatune`` imports
only what the names you read need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from ._quiet import quiet_optional_backends as _quiet_optional_backends  # noqa: E402  (logging only; no torch)

_quiet_optional_backends()

_EXPORTS: dict[str, tuple[str, str]] = {
    "AdapterFusionConfig": (".methods.fusion", "AdapterFusionConfig"),
    "AdapterLoadError": (".files", "AdapterLoadError"),
    "BitFitConfig": (".methods.bitfit", "BitFitConfig"),
    "BottleneckConfig": (".methods.bottleneck", "BottleneckConfig"),
    "ConfigError": (".config", "ConfigError"),
    "DeltaConfig": (".config", "DeltaConfig"),
    "DeltaModel": (".model", "DeltaModel"),
    "FreezeConfig": (".methods.freeze", "FreezeConfig"),
    "FullConfig": (".methods.full", "FullConfig"),
    "IA3Config": (".methods.ia3", "IA3Config"),
    "LoftQConfig": (".methods._loftq", "LoftQConfig"),
    "Linear4bit": (".methods.quant", "Linear4bit"),
    "LoraConfig": (".methods.lora", "LoraConfig"),
    "PTuningConfig": (".methods.p_tuning", "PTuningConfig"),
    "PrefixTuningConfig": (".methods.prefix_tuning", "PrefixTuningConfig"),
    "PromptEncoderConfig": (".methods.p_tuning", "PromptEncoderConfig"),
    "PromptTuningConfig": (".methods.prompt_tuning", "PromptTuningConfig"),
    "QuantizationError": (".methods.quant", "QuantizationError"),
    "Trainer": (".train.trainer", "DeltaTrainer"),
    "TrainableTokensConfig": (".methods.trainable_tokens", "TrainableTokensConfig"),
    "VisualPromptConfig": (".methods.vpt", "VisualPromptConfig"),
    "cast_mixed_precision_params": (".status", "cast_mixed_precision_params"),
    "combine_loras": (".diffusion", "combine_loras"),
    "fold_virtual_tokens": (".methods._tokens", "fold"),
    "get_delta_model": (".model", "get_delta_model"),
    "get_layer_status": (".adapter_io", "get_layer_status"),
    "get_model_status": (".adapter_io", "get_model_status"),
    "get_peft_model_state_dict": (".adapter_io", "get_peft_model_state_dict"),
    "inject_adapter_in_model": (".model", "inject_adapter_in_model"),
    "load_config": (".registry", "from_pretrained"),
    "load_lora": (".diffusion", "load_lora"),
    "load_peft_weights": (".adapter_io", "load_peft_weights"),
    "memory_footprint": (".methods.quant", "memory_footprint"),
    "merge_quantized": (".methods.quant_tools", "merge_quantized"),
    "prepare_for_kbit_training": (".methods.quant_tools", "prepare_for_kbit_training"),
    "prepare_model_for_kbit_training": (".methods.quant_tools", "prepare_for_kbit_training"),  # peft's name
    "quantize": (".methods.quant_tools", "quantize"),
    "replace_lora_weights_loftq": (".methods._loftq", "replace_lora_weights_loftq"),
    "rescale_adapter_scale": (".methods._lora_combine", "rescale_adapter_scale"),  # peft.helpers'
    "save_diffusers_lora": (".diffusion", "save_diffusers_lora"),
    "save_kohya_lora": (".diffusion", "save_kohya_lora"),
    "set_peft_model_state_dict": (".adapter_io", "set_peft_model_state_dict"),
    "trl_trainer": (".train.trainer", "trl_trainer"),
}

__all__ = [
    "AdapterFusionConfig",
    "AdapterLoadError",
    "BitFitConfig",
    "BottleneckConfig",
    "ConfigError",
    "DeltaConfig",
    "DeltaModel",
    "FreezeConfig",
    "FullConfig",
    "IA3Config",
    "Linear4bit",
    "LoftQConfig",
    "LoraConfig",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "QuantizationError",
    "TrainableTokensConfig",
    "Trainer",
    "VisualPromptConfig",
    "cast_mixed_precision_params",
    "combine_loras",
    "fold_virtual_tokens",
    "get_delta_model",
    "get_layer_status",
    "get_model_status",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_config",
    "load_lora",
    "load_peft_weights",
    "memory_footprint",
    "merge_quantized",
    "prepare_for_kbit_training",
    "prepare_model_for_kbit_training",
    "quantize",
    "replace_lora_weights_loftq",
    "rescale_adapter_scale",
    "save_diffusers_lora",
    "save_kohya_lora",
    "set_peft_model_state_dict",
    "trl_trainer",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deltatune' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from .adapter_io import (
        get_layer_status,
        get_model_status,
        get_peft_model_state_dict,
        load_peft_weights,
        set_peft_model_state_dict,
    )
    from .config import ConfigError, DeltaConfig
    from .diffusion import combine_loras, load_lora, save_diffusers_lora, save_kohya_lora
    from .files import AdapterLoadError
    from .methods._lora_combine import rescale_adapter_scale
    from .methods._tokens import fold as fold_virtual_tokens
    from .methods.bitfit import BitFitConfig
    from .methods.bottleneck import BottleneckConfig
    from .methods.freeze import FreezeConfig
    from .methods.full import FullConfig
    from .methods.fusion import AdapterFusionConfig
    from .methods.ia3 import IA3Config
    from .methods.lora import LoraConfig
    from .methods.p_tuning import PromptEncoderConfig, PTuningConfig
    from .methods.prefix_tuning import PrefixTuningConfig
    from .methods.prompt_tuning import PromptTuningConfig
    from .methods.quant import Linear4bit, QuantizationError, memory_footprint
    from .methods.quant_tools import merge_quantized, prepare_for_kbit_training, quantize
    from .methods.quant_tools import prepare_for_kbit_training as prepare_model_for_kbit_training
    from .methods.trainable_tokens import TrainableTokensConfig
    from .methods.vpt import VisualPromptConfig
    from .model import DeltaModel, get_delta_model, inject_adapter_in_model
    from .registry import from_pretrained as load_config
    from .status import cast_mixed_precision_params
    from .train.trainer import DeltaTrainer as Trainer
    from .train.trainer import trl_trainer
