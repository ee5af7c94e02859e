"""A new adapter of another method beside a LoRA whose init (PiSSA / OLoRA) left its residual in the base weights:
refused, as LoRA's own check (``_lora_init.check_base_kept``) refuses a new LoRA there. Alone, the new adapter would
compute with W - B0 A0, not the base W (an (IA)^3 adapter at its init then starts away from the base model)."""

from __future__ import annotations

from torch import nn

from ..config import ConfigError


def refuse_beside_residual(model: nn.Module, method: str) -> None:
    """ConfigError where a module of ``model`` holds the residual a PiSSA / OLoRA init left, before anything changes."""
    from ..targets import _FROM_FILE

    if _FROM_FILE.get():  # (a file's weights: they trained beside that residual, and load as peft loads them)
        return
    for path, module in model.named_modules():
        held = getattr(module, "adapter_names", ())  # (a deleted one's residual stays, as LoRA's check reads it)
        if mutated := sorted(n for n in getattr(module, "_from_base", ()) if n in held):
            raise ConfigError(f"{method}: adapter {mutated[0]!r} was initialised from the base (PiSSA / OLoRA) and left "
                              f"{path} as its residual, which a new adapter would compute with (alone, it would not "
                              "start as the base model); convert it to a plain LoRA first (convert_to_plain_lora) and "
                              "load that on the original base")  # fmt: skip
