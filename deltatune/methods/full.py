"""Full fine-tuning: every base parameter trains in place.

A "method" only so that trainers, recipes and benchmarks treat every way of fine-tuning alike; the adapter file
is the complete state dict of the base under PEFT-style keys. The in-place rules are those of freeze.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import DeltaConfig
from .freeze import base_parameter_names, inject, trainable


@dataclass
class FullConfig(DeltaConfig):
    """Full fine-tuning: every base parameter trains in place."""

    method = "full"
    peft_type = "FULL"
    no_targets = "full fine-tuning trains every base parameter"

    def trainable_base_parameters(self, model: nn.Module) -> list[str]:
        """Every base parameter."""
        return trainable(model, base_parameter_names(model), "full")


CONFIG, INJECT = FullConfig, inject
