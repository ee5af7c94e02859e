"""deltatune: parameter-efficient fine-tuning (delta tuning) of transformer models.

One API for every method: build a config, wrap a model, train, save in PEFT's format, merge.

    import deltatune as dt
    model = dt.get_delta_model(base, dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
"""

from .config import ConfigError, DeltaConfig
from .methods._tokens import fold as fold_virtual_tokens
from .methods.adapter import BottleneckConfig
from .methods.freeze import BitFitConfig, FreezeConfig, FullConfig
from .methods.fusion import AdapterFusionConfig
from .methods.ia3 import IA3Config
from .methods.lora import LoraConfig
from .methods.prefix import PrefixTuningConfig
from .methods.prompt import PromptTuningConfig
from .methods.ptuning import PromptEncoderConfig, PTuningConfig
from .methods.quant import (
    Linear4bit,
    QuantizationError,
    memory_footprint,
    merge_quantized,
    prepare_for_kbit_training,
    quantize,
)
from .model import AdapterLoadError, DeltaModel, get_delta_model

__version__ = "0.1.0"

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
    "LoraConfig",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "QuantizationError",
    "fold_virtual_tokens",
    "get_delta_model",
    "memory_footprint",
    "merge_quantized",
    "prepare_for_kbit_training",
    "quantize",
]
