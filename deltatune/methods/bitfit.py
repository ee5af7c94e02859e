"""BitFit (Ben Zaken, Ravfogel, Goldberg, 2022; arXiv:2106.10199): only the bias terms train.

h = W x + b with b trained in place and W frozen. Nothing is injected; the adapter file holds the trained biases
under PEFT-style keys. The in-place rules (``disable_adapter`` cannot undo it) are those of freeze.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import ConfigError, DeltaConfig
from .freeze import base_parameter_names, inject

NO_BIAS = "LLaMA, Mistral, Mixtral, Qwen3 (dense and MoE), Gemma 1-3, OLMo 1-2, Cohere, Granite, DeepSeek-V3 and T5"
"""Families with no bias term at all in transformers 5's defaults (their linear layers and RMSNorms carry none),
where BitFit has nothing to train. Qwen2 has only its q / k / v projections' biases, StableLM only its LayerNorms'."""


def _is_bias(attr: str) -> bool:
    # a position-bias table (T5-style relative_attention_bias, position_bias) is an embedding, not a bias term
    table = "position" in attr or "relative" in attr
    return attr == "bias" or attr in ("bias_k", "bias_v") or (attr.endswith("_bias") and not table)


@dataclass
class BitFitConfig(DeltaConfig):
    """BitFit: train every bias term of the base model in place, nothing else."""

    method = "bitfit"
    peft_type = "BITFIT"
    no_targets = "BitFit trains every bias term of the base"

    def trainable_base_parameters(self, model: nn.Module) -> list[str]:
        """Every base parameter that is a bias term: ``...bias``, and torch's ``nn.MultiheadAttention`` biases
        (``in_proj_bias``, ``bias_k``, ``bias_v``; SigLIP's pooling head has one) and other ``..._bias`` vectors (GPT-OSS's
        experts' ``gate_up_proj_bias``), not position-bias tables.

        Raises:
            ConfigError: the model has no bias terms (``NO_BIAS``'s families).
        """
        names = [n for n in base_parameter_names(model) if _is_bias(n.rsplit(".", 1)[-1])]
        if not names:
            raise ConfigError(
                f"bitfit: the model has no bias parameters to train ({type(model).__name__}; {NO_BIAS} have none: "
                "train it with an adapter method such as LoRA)"
            )
        return names


CONFIG, INJECT = BitFitConfig, inject
