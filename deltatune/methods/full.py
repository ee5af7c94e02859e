"""Full fine-tuning: every base parameter trains in place (a vision-language model's vision tower and projector
stay frozen by default, as LLaMA-Factory's ``finetuning_type: full`` for the VLMs it registers).

A "method" only so that trainers, recipes and benchmarks treat every way of fine-tuning alike; the adapter file
is the state dict of what trained under PEFT-style keys (the complete base outside a vision-language model). The
in-place rules are those of freeze.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import ConfigError, DeltaConfig
from .freeze import TOWER_SWITCHES, base_parameter_names, tower_part, tower_parts, trainable

_FROZEN_TOWERS = TOWER_SWITCHES  # (the same switches as freeze's)


@dataclass
class FullConfig(DeltaConfig):
    """Full fine-tuning: every base parameter trains in place."""

    method = "full"
    peft_type = "FULL"
    no_targets = "full fine-tuning trains every base parameter"

    freeze_vision_tower: bool | None = None
    """A vision-language model's (freeze.tower_parts: a text_config, a vision_config and an LM head or a task head,
    Gemma3ForSequenceClassification's score) vision tower stays frozen: True, LLaMA-Factory's default, which a new
    adapter takes for None; False trains it too. None in a file saved before session 55: every parameter trained
    then, and so it loads."""
    freeze_multi_modal_projector: bool | None = None
    """The same for the projector between the towers (LLaVA's multi_modal_projector, BLIP-2's Q-Former)."""
    freeze_language_model: bool = False
    """LLaMA-Factory's: the language tower (its embeddings, blocks and LM head) stays frozen as well; with
    freeze_multi_modal_projector=False the projector alone trains (a vision-language alignment stage). A
    vision-language model's only (a text model's would train nothing)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, _ in _FROZEN_TOWERS:
            if not isinstance(getattr(self, key), (bool, type(None))):  # (1 and 0 as well: == True, == False)
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if not isinstance(self.freeze_language_model, bool):
            raise ConfigError(f"freeze_language_model must be true or false, got {self.freeze_language_model!r}")

    def for_loading(self) -> DeltaConfig:
        """A saved file's config: a field it lacks (None, saved before session 55) stays None: every parameter."""
        loading = self.replace()
        loading._loading = True  # type: ignore[attr-defined]
        return loading

    def as_resumed(self, saved: dict) -> DeltaConfig:
        """A run begun before session 55 (its checkpoint's file without the switches, or with them null: such a file
        loaded and saved again) goes on training every tower, as it began; a later run's file holds the switches it
        took. A checkpoint of another method: this config as it is (the adapter is new)."""
        if saved.get("peft_type") != self.peft_type:
            return self
        unset = [k for k, _ in _FROZEN_TOWERS if getattr(self, k) is None]
        return self.replace(**{k: saved.get(k) is True for k in unset}) if unset else self

    def trainable_base_parameters(self, model: nn.Module) -> list[str]:
        """Every base parameter but those of the towers that stay frozen (see the fields).

        Raises:
            ConfigError: freeze_language_model on a model without towers, or every tower frozen.
        """
        names = base_parameter_names(model)
        frozen = {tower for key, tower in _FROZEN_TOWERS if getattr(self, key)}
        frozen |= {"language"} if self.freeze_language_model else set()
        parts = tower_parts(model) if frozen else None
        if self.freeze_language_model and not parts:
            raise ConfigError("full: freeze_language_model needs a vision-language model (a text_config, a "
                              f"vision_config and an output head); {type(model).__name__} is one tower")  # fmt: skip
        if parts:
            names = [n for n in names if tower_part(parts, n) not in frozen]
        if not names:
            raise ConfigError("full: freeze_language_model, freeze_vision_tower and freeze_multi_modal_projector "
                              "leave nothing to train; set one of the last two false")  # fmt: skip
        return trainable(model, names, "full")


def inject(model: nn.Module, config: FullConfig, adapter_name: str) -> list[nn.Module]:
    """Inject nothing: a new adapter's unset freeze_* fields become True (LLaMA-Factory's defaults), and the config
    is checked against the model now, so that a misfit fails before any change."""
    if not getattr(config, "_loading", False):
        for key, _ in _FROZEN_TOWERS:
            if getattr(config, key) is None:
                setattr(config, key, True)
    config.trainable_base_parameters(model)
    return []


CONFIG, INJECT = FullConfig, inject
