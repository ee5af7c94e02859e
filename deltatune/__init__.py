"""deltatune: parameter-efficient fine-tuning (delta tuning) of transformer models.

One API for every method: build a config, wrap a model, train, save in PEFT's format, merge.

    import deltatune as dt
    model = dt.get_delta_model(base, dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
"""

from .config import ConfigError, DeltaConfig
from .methods.lora import LoraConfig
from .model import AdapterLoadError, DeltaModel, get_delta_model

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "ConfigError",
    "DeltaConfig",
    "DeltaModel",
    "LoraConfig",
    "get_delta_model",
]
