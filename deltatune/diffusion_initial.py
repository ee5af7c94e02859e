"""A LoRA initialised from the base (PiSSA, OLoRA: methods/_lora_init) as a diffusers or kohya file: such a model's
base weights are the residual W - s B0 A0, and a LoRA file loads on the original base W. Given the adapter's
tensors from right after its init, the file holds peft's conversion (``save_pretrained(
path_initial_model_for_weight_conversion=...)``, deltatune's ``convert_to_plain_lora``): rank 2r, A' = [A; A0],
B' = [B, -B0], alpha doubled (times sqrt 2 with rsLoRA), so W + s' B' A' = W_res + s B A. LoftQ's base is the
quantised Q, which no LoRA on W equals: merged (``merge_and_unload``) and that base saved instead.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import torch

from .config import ConfigError
from .model import DeltaModel


def from_base(model: DeltaModel, name: str) -> bool:
    """Whether adapter ``name``'s init left its residual in the model's base weights (PiSSA, OLoRA, LoftQ)."""
    return any(name in getattr(m, "_from_base", ()) for m in model.get_base_model().modules())


def initial_tensors(model: DeltaModel, name: str = "default") -> dict[str, torch.Tensor] | None:
    """A copy of adapter ``name``'s LoRA tensors as they are now (right after its init: the ``initial`` that
    ``save_diffusers_lora`` / ``save_kohya_lora`` convert with), where its init is from the base and convertible
    (PiSSA, OLoRA); None otherwise (no residual; LoftQ)."""
    if name not in model.peft_config or not from_base(model, name):
        return None
    if model.peft_config[name].init_lora_weights == "loftq":
        return None
    state = model.adapter_state_dict(name)
    return {
        k: v.detach().to("cpu", copy=True)
        for k, v in state.items()
        if k.endswith((".lora_A.weight", ".lora_B.weight"))
    }


def check_base(model: DeltaModel, name: str, initial: Any, component: str) -> dict[str, torch.Tensor] | None:
    """The tensors of ``initial`` (a dict, or the folder saved right after the init) where adapter ``name`` of
    ``component`` (a file's prefix: ``unet``, ``text_encoder`` ...) was initialised from the base; None where it
    was not (``initial`` is not needed then).

    Raises:
        ConfigError: initialised from the base as a DoRA, or by LoftQ (no plain LoRA equals either), or without
            ``initial`` (a dict, or a folder holding adapter_model.safetensors or peft's adapter_model.bin).
    """
    if not from_base(model, name):
        return None
    init = model.peft_config[name].init_lora_weights
    where = f"the {component} model's adapter {name!r} was initialised from the base ({init})"
    if init == "loftq":
        raise ConfigError(
            f"{where}: its base is the quantised Q, which no LoRA file on the original base equals; merge it "
            "(merge_and_unload) and save that base instead"
        )
    if model.peft_config[name].use_dora:  # (before initial: none would make it one)
        raise ConfigError(f"the {component} model's adapter {name!r} is DoRA, whose update no plain LoRA equals")
    if initial is None:
        raise ConfigError(
            f"{where}: the model's base weights are its residual, and a LoRA file loads on the original base; give "
            "initial= (the adapter's tensors from right after its init, or the folder save_pretrained wrote then) "
            "to write peft's conversion, rank 2r"
        )
    from .methods._lora_init import read_initial  # (convert_to_plain_lora's reading)

    try:
        return dict(read_initial(initial if isinstance(initial, (str, os.PathLike)) else dict(initial)))
    except FileNotFoundError as exc:
        raise ConfigError(f"initial: {exc}") from None


def converted(modules: dict[str, dict[str, Any]], keys: dict[str, str], start: dict[str, torch.Tensor],
              rslora: bool, component: str) -> None:  # fmt: skip
    """``modules`` (diffusion._lora's) made peft's plain conversion in place: A' = [A; A0], B' = [B, -B0], r 2r,
    alpha x2 (x sqrt 2 with rsLoRA), the scale unchanged; built on the CPU (the file's device: no GPU memory added).
    ``keys``: each module path's adapter key stem.

    Raises:
        ConfigError: ``start`` lacks a module's tensor or holds one of another shape (another adapter's).
    """
    for path, m in modules.items():
        parts = []
        for leaf in ("A", "B"):
            key = f"{keys[path]}.lora_{leaf}.weight"
            if key not in start or start[key].shape != m[leaf].shape:
                got = "lacks" if key not in start else f"holds {tuple(start[key].shape)} for"
                raise ConfigError(
                    f"initial {got} {key} (the {component} model's is {tuple(m[leaf].shape)}): give the tensors this "
                    "adapter had right after its init"
                )
            parts.append(start[key].to("cpu", m[leaf].dtype))
        m["A"] = torch.cat([m["A"].cpu(), parts[0]], 0)
        m["B"] = torch.cat([m["B"].cpu(), -parts[1]], 1)
        m["r"], m["alpha"] = 2 * m["r"], m["alpha"] * (math.sqrt(2) if rslora else 2)


def run_note(method: Any) -> list[str]:
    """A t2i run's report note on its ``pytorch_lora_weights.safetensors`` where its LoRA is initialised from the
    base: PiSSA / OLoRA's file is peft's conversion; LoftQ (or a DoRA) writes none (printed too: merge instead)."""
    from .methods._lora_init import is_from_base

    init = getattr(method, "init_lora_weights", None)
    if getattr(method, "peft_type", None) != "LORA" or not is_from_base(init):
        return []
    if init == "loftq" or method.use_dora:
        why = "the base is the quantised Q" if init == "loftq" else "the adapter is a DoRA over the residual base"
        note = (f"method.init_lora_weights={init}: no pytorch_lora_weights.safetensors is written ({why}, which no "
                "LoRA file on the original base equals); merge the run (merge_and_unload) and save that base")  # fmt: skip
        print(f"deltatune: note: {note}", file=sys.stderr)
        return [note]
    if method.bias != "none" or method.modules_to_save:  # (no file: t2i._plain_lora, as for any LoRA run)
        return []
    alpha = "x sqrt 2 (rsLoRA)" if method.use_rslora else "x2"
    return [f"method.init_lora_weights={init}: pytorch_lora_weights.safetensors holds peft's conversion of the "
            f"adapter (rank 2r: A' = [A; A0], B' = [B, -B0], alpha {alpha}), which loads on the original base"]  # fmt: skip
