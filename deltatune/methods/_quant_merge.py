"""merge_quantized's probe (quant_tools.py): the report of the error a merge introduced, and the adapter model's
logits it is measured against, taken so that a probe batch the model refuses leaves the model as it was; and the DoRA
layers a requantised merge rounds as peft's (``dora_dtypes``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .quant import QuantizationError


@dataclass
class MergeReport:
    """The error a merge introduced: the adapter model's logits against the merged model's, on a probe batch."""

    max_abs_diff: float
    """max |logits(adapter model) - logits(merged model)|."""
    mean_abs_diff: float
    """mean |logits(adapter model) - logits(merged model)|."""
    requantized: bool
    """Whether the merged layers were quantised to 4 bits again (the main source of error when they were)."""
    dtype: torch.dtype
    """The dtype the 4-bit layers were dequantised to."""
    dequantized: list[str] = field(default_factory=list)
    """4-bit layers now in full precision."""
    quantized: list[str] = field(default_factory=list)
    """Layers in 4 bits in the returned model (with requantize)."""

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values (dtype as its name, the layer lists as counts)."""
        return {"max_abs_diff": self.max_abs_diff, "mean_abs_diff": self.mean_abs_diff, "requantized": self.requantized,
                "dtype": str(self.dtype).removeprefix("torch."), "dequantized_layers": len(self.dequantized),
                "quantized_layers": len(self.quantized)}  # fmt: skip

    def __str__(self) -> str:
        what = "merged and re-quantised" if self.requantized else "merged into full precision"
        return (
            f"{what} ({str(self.dtype).removeprefix('torch.')}): logits differ from the adapter model's by "
            f"max {self.max_abs_diff:.3g}, mean {self.mean_abs_diff:.3g} on the probe batch"
        )


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def _as_before(model: nn.Module) -> Iterator[None]:
    """On an error inside, the model's training mode and active adapters put back (a refused merge changes nothing)."""
    training, active = model.training, list(model.active_adapters)
    try:
        yield
    except BaseException:
        model.train(training)
        model.set_adapter(active)
        raise


def reference_logits(
    model: nn.Module, probe_inputs: Any, adapter_names: list[str] | None, layers: list[nn.Module]
) -> torch.Tensor:
    """The adapter model's logits on ``probe_inputs`` in eval mode with ``adapter_names`` (default: the active ones)
    active, the active adapters put back afterwards; the model is left in eval mode, as the merge needs it.

    ``layers``: bitsandbytes 4-bit layers, whose repacking on a CPU with AVX512-BF16 is held off for this forward
    (the reference is the layers as they merge: see merge_quantized).

    Raises:
        QuantizationError: the forward failed on ``probe_inputs`` (one line with the model's error); the model is as
            it was (training mode, active adapters).
        ValueError: an unknown adapter name; the model is as it was.
    """
    if not isinstance(probe_inputs, (dict, torch.Tensor)):
        raise QuantizationError(f"merge_quantized: probe_inputs must be a dict of model inputs (a tokenizer's "
                                f"output) or a tensor of input ids, got {type(probe_inputs).__name__}; nothing merged")  # fmt: skip
    with _as_before(model):
        active = list(model.active_adapters)
        model.eval()
        if adapter_names:  # the reference is the model with the adapters that merge, not the active ones
            model.set_adapter(adapter_names)
        repacking = [m for m in layers if getattr(m, "support_avx512bf16_for_cpu", False)]
        for m in repacking:
            m.support_avx512bf16_for_cpu = False
        try:
            reference = _logits(model, probe_inputs)
        except torch.OutOfMemoryError:  # not the batch's fault: as torch raised it (the model put back first)
            raise
        except Exception as exc:
            why = (str(exc).strip().splitlines() or [""])[0]
            raise QuantizationError(f"merge_quantized: the model's forward failed on probe_inputs ({type(exc).__name__}"
                                    f": {why}); pass a batch the model takes, e.g. tokenizer(texts, "
                                    "return_tensors='pt'); nothing merged") from None  # fmt: skip
        finally:
            for m in repacking:
                m.support_avx512bf16_for_cpu = True
        if adapter_names:
            model.set_adapter(active)
    return reference


def dora_dtypes(base: nn.Module, four: list[tuple[str, nn.Module]], adapters: list[str]) -> dict[str, torch.dtype]:
    """The adapted 4-bit layers (``four``: name -> the base layer of a LoRA layer, or any 4-bit layer) into which a
    DoRA adapter of ``adapters`` merges, with the dtype their 4-bit weight dequantises to: peft's DoRA merge returns
    m (W + s B A) / norm in that dtype (bitsandbytes' quant_state.dtype: bf16 for a model transformers loaded in bf16)
    and quantises that; its LoRA merge quantises the fp32 sum. A requantised merge rounds those layers alike."""
    out = {}
    for name, layer in four:
        lora = base.get_submodule(name.removesuffix(".base_layer")) if name.endswith(".base_layer") else None
        if any(a in getattr(lora, "lora_magnitude_vector", {}) for a in adapters):
            out[name.removesuffix(".base_layer")] = getattr(layer.weight, "quant_state", layer.weight).dtype
    return out


def requantized(plain: nn.Module, done: list[str], settings: dict, conv1d: set[str], dora: dict[str, torch.dtype]):
    """The merged layers ``done`` of ``plain`` quantised again as they were (``settings``: name -> ``from_linear``'s
    arguments); a DoRA layer (``dora``: name -> W's dtype) as peft's: W' rounded to W's dtype and quantised, its
    bitsandbytes ``quant_state.dtype`` that dtype (peft quantises W' in it, so it dequantises to it), not float32."""
    from .quant import Linear4bit

    for n in (n for n in done if n in dora):
        w = plain.get_submodule(n).weight
        w.data = w.data.to(dora[n]).to(w.dtype)
    new = [(n, Linear4bit.from_linear(plain.get_submodule(n), *settings[n + ".base_layer"])) for n in done]
    for name, layer in new:
        layer.conv1d = name in conv1d
        if name in dora and layer.backend == "bitsandbytes":
            layer.weight.quant_state.dtype = dora[name]
    return new
