"""BitFit (Ben Zaken, Ravfogel, Goldberg, 2022; arXiv:2106.10199): only the bias terms train.

h = W x + b with b trained in place and W frozen. Nothing is injected; the adapter file holds the trained biases
under PEFT-style keys. The in-place rules (``disable_adapter`` cannot undo it) are those of freeze.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import ConfigError, DeltaConfig
from .freeze import base_parameter_names, inject


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
            ConfigError: the model has no bias terms (e.g. LLaMA).
        """
        names = [n for n in base_parameter_names(model) if _is_bias(n.rsplit(".", 1)[-1])]
        if not names:
            raise ConfigError("bitfit: the model has no bias parameters to train (e.g. LLaMA-style models)")
        return names


CONFIG, INJECT = BitFitConfig, inject
