"""BitFit (Ben Zaken, Ravfogel, Goldberg, 2022; arXiv:2106.10199): only the bias terms train.

h = W x + b with b trained in place and W frozen. Nothing is injected; the adapter file holds the trained biases
under PEFT-style keys. The in-place rules (``disable_adapter`` cannot undo it) are those of freeze.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import ConfigError, DeltaConfig
from .freeze import base_parameter_names, inject


@dataclass
class BitFitConfig(DeltaConfig):
    """BitFit: train every bias term of the base model in place, nothing else."""

    method = "bitfit"
    peft_type = "BITFIT"

    def trainable_base_parameters(self, model: nn.Module) -> list[str]:
        """Every base parameter named ``...bias``.

        Raises:
            ConfigError: the model has no bias terms (e.g. LLaMA).
        """
        names = [n for n in base_parameter_names(model) if n.rsplit(".", 1)[-1] == "bias"]
        if not names:
            raise ConfigError("bitfit: the model has no bias parameters to train (e.g. LLaMA-style models)")
        return names


CONFIG, INJECT = BitFitConfig, inject
