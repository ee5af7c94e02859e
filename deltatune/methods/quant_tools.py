"""QLoRA's model-level tools over the 4-bit format of quant.py: ``quantize`` a model's linear layers to NF4,
``prepare_for_kbit_training`` (PEFT's preparation), and ``merge_quantized`` (fold an adapter into a 4-bit base,
reporting the error merging introduced). The math of the format is in quant.py's docstring."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ConfigError
from ..layer import DeltaLayer, DequantizedLinear, enable_checkpointing, set_submodule
from ..targets import HEAD_NAMES
from . import quant
from ._quant_merge import MergeReport, _logits, dora_dtypes, reference_logits, requantized
from ._quant_skip import check_skip, kept_fp32, skipped
from ._quant_steps import stepwise
from .quant import (
    _DTYPES,
    BACKENDS,
    BLOCK_SIZE,
    Linear4bit,
    QuantizationError,
    _available,
    _backend,
    _is_4bit,
    _is_4bit_layer,
    _is_bnb_4bit,
    _quantized_layers,
    is_quantized,
    memory_footprint,
    resolve_backend,
)


# -- quantize -------------------------------------------------------------------------------------------------
class NothingToQuantize(QuantizationError):
    """``quantize`` found no linear layer to quantise (none, or every one kept in full precision)."""


@dataclass
class QuantSummary:
    """What ``quantize`` did: the layers now in 4 bits, those kept in full precision and why, bytes before/after."""

    backend: str
    compute_dtype: torch.dtype
    quantized: list[str] = field(default_factory=list)
    """Names of the layers now in 4 bits."""
    kept: dict[str, str] = field(default_factory=dict)
    """Linear layers left in full precision: name -> reason."""
    bytes_before: int = 0
    """Memory held by the model's parameters and buffers before (see ``memory_footprint``)."""
    bytes_after: int = 0
    """The same after quantising."""
    quantized_params: int = 0
    """Parameters in the quantised layers' weights."""
    quantized_bytes: int = 0
    """Bytes those weights hold now, code book and constants included."""
    quant_type: str = "nf4"
    """The 4-bit type: "nf4", or "fp4" (bitsandbytes)."""

    @property
    def bytes_per_param(self) -> float:
        """Bytes per parameter of the quantised weights (about 0.52; 4 for fp32, 2 for bf16)."""
        return self.quantized_bytes / max(self.quantized_params, 1)

    def __str__(self) -> str:
        return "\n".join([f"quantised {len(self.quantized)} layers to {self.quant_type.upper()} ({self.backend}, compute "
                          f"{str(self.compute_dtype).removeprefix('torch.')}): {self.quantized_params:,d} parameters in "
                          f"{self.quantized_bytes:,d} bytes ({self.bytes_per_param:.3f} bytes/parameter)",
                          f"model: {self.bytes_before:,d} -> {self.bytes_after:,d} bytes",
                          *(f"kept in full precision: {name} ({why})" for name, why in self.kept.items())])  # fmt: skip


def _dtype(value: torch.dtype | str, key: str = "compute_dtype") -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ConfigError(f"{key} must be float32, bfloat16 or float16, got {value!r}")


def _check_args(bits: int, quant_type: str, double_quant: bool, backend: str) -> None:
    for bad, what in ((bits != 4, f"bits must be 4 (NF4), got {bits!r}"),
                      (quant_type not in ("nf4", "fp4"),
                       f"quant_type must be 'nf4' or 'fp4' (fp4: backend bitsandbytes), got {quant_type!r}"),
                      (not isinstance(double_quant, bool), f"double_quant must be true or false, got {double_quant!r}"),
                      (backend not in ("auto", *BACKENDS),
                       f"backend must be 'auto', 'torchao' or 'bitsandbytes', got {backend!r}")):  # fmt: skip
        if bad:
            raise ConfigError(what)


_SEQ2SEQ_HEADS = ("classification_head",)
"""BART's and T5's sequence-classification head (dense + out_proj), kept as every task head is."""


def _keep_reason(
    name: str, module: nn.Module, output: nn.Module | None, skip: list[str] | str | None, fp32: tuple, why: dict
) -> str | None:
    """Why the linear layer ``name`` stays in full precision (``why``: reasons found for the whole model), or None."""
    if module is output:
        return "output head"
    if name in why:
        return why[name]
    if any(name == h or name.endswith("." + h) or f".{h}." in f".{name}." for h in (*HEAD_NAMES, *_SEQ2SEQ_HEADS)):
        return "task head"
    if kept_fp32(name, *fp32):  # T5's FFN casts its activations to wo.weight.dtype, which 4-bit storage makes uint8
        return "the model's _keep_in_fp32_modules(_strict) (its code may compute the layer in fp32)"
    if skipped(name, skip):  # the layer or a module above it (transformers skips what a named module holds)
        return "skip_modules"
    d_in = module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.in_features
    if d_in % BLOCK_SIZE:
        return f"in_features={d_in} is not a multiple of the block size {BLOCK_SIZE}"
    return None


def quantize(
    model: nn.Module,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | str = torch.float32,
    backend: str = "auto",
    skip_modules: list[str] | str | None = None,
) -> tuple[nn.Module, QuantSummary]:
    """Replace the model's linear layers by 4-bit NF4 (or FP4) ``Linear4bit`` layers, in place.

    The output head (``lm_head``), task heads (classifier, score, ...), embeddings and norms stay in full precision,
    as do the model's ``_keep_in_fp32_modules`` (T5's ``wo``, as transformers' 4-bit loading does), a layer whose
    weight is tied to another module's, ``nn.MultiheadAttention``'s ``out_proj`` and a layer whose in_features is
    not a multiple of the block size 64 (the summary says which and why).
    The keyword arguments are the recipe's ``model.quantization`` keys: ``quantize(model, **recipe["quantization"])``.

    Args:
        model: a full-precision model (a transformers model or any nn.Module), before adapters are added.
        bits: 4 (the only width).
        quant_type: "nf4", or "fp4" (transformers' ``bnb_4bit_quant_type`` default; backend bitsandbytes only).
        double_quant: also quantise the absmax constants to 8 bits (saves ~0.37 bits/parameter).
        compute_dtype: the dtype the layers compute in: float32, bfloat16 (or float16), as a dtype or its name.
        backend: "auto", "torchao" or "bitsandbytes" (see the module docstring for what "auto" picks).
        skip_modules: more layers to keep in full precision: names, each a '.'-suffix of a layer or of a module
            above it (``mlp``, ``model.layers.0``), or a regex from the name's start to a '.' (as transformers).

    Returns:
        The same model object, and a ``QuantSummary``.

    Raises:
        ConfigError: a bad argument. QuantizationError: the model is already quantised or has adapters, has no
            linear layer to quantise (none, or every one kept), or a layer to quantise has a nan or inf weight.
        ImportError: the backend is not installed. In every case the model is unchanged.
    """
    _check_args(bits, quant_type, double_quant, backend)
    check_skip(skip_modules)
    dtype = _dtype(compute_dtype)
    if any(isinstance(m, DeltaLayer) for m in model.modules()) or hasattr(model, "peft_config"):
        raise QuantizationError("the model has adapters already; quantize the base model first, then add adapters")
    already = [n for n, _ in _quantized_layers(model)]
    if already:
        raise QuantizationError(
            f"the model is already quantised ({len(already)} 4-bit layers, e.g. {already[0]!r}); "
            "quantize a full-precision model"
        )
    weights = ((n, getattr(m, "weight", None)) for n, m in model.named_modules())
    eight = [n for n, w in weights if isinstance(w, torch.Tensor) and not w.is_floating_point()]
    if eight:  # transformers' 8-bit layers (bitsandbytes' Linear8bitLt is an nn.Linear holding int8 weights)
        raise QuantizationError(
            f"the model holds integer weights already ({len(eight)} layers, e.g. {eight[0]!r}: an 8-bit model); "
            "quantize a full-precision model"
        )
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [
        (n, m) for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
    ]
    fp32 = (list(getattr(model, "_keep_in_fp32_modules", None) or ()),
            list(getattr(model, "_keep_in_fp32_modules_strict", None) or ()))  # fmt: skip
    owners: dict[int, list[str]] = {}  # a weight shared with another module stays (transformers keeps tied ones)
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    tied = {n: [o for o in owners[id(m.weight)] if o != f"{n}.weight"] for n, m in linears}
    known = {n: f"weight tied to {o[0]}" for n, o in tied.items() if o}
    for n, m in model.named_modules():  # its forward is never called: a 4-bit weight there crashed the model
        if isinstance(m, nn.MultiheadAttention):
            known[f"{n}.out_proj".lstrip(".")] = "nn.MultiheadAttention reads out_proj.weight itself"
    kept = {n: why for n, m in linears if (why := _keep_reason(n, m, output, skip_modules, fp32, known))}
    todo = [(n, m) for n, m in linears if n not in kept]
    if not todo:  # a QLoRA recipe would train in full precision, saving nothing, and say so nowhere
        first = next(iter(kept.items()), None)
        why = f"{len(kept)} kept in full precision, e.g. {first[0]!r} ({first[1]})" if first else "none at all"
        raise NothingToQuantize(f"quantize: {type(model).__name__} has no linear layer to quantise ({why}); "
                                "leave quantization out to train it in full precision")  # fmt: skip
    bad = [n for n, m in todo if not torch.isfinite(m.weight).all()]
    if bad:  # one nan or inf would make the whole layer nan: its block constants are quantised together
        raise QuantizationError(
            f"layer {bad[0]!r} has nan or inf weights ({len(bad)} such layers); 4 bits cannot hold them: "
            "fix the checkpoint (an fp16 overflow?) or keep the layer in skip_modules"
        )
    device = todo[0][1].weight.device if todo else torch.device("cpu")
    chosen = resolve_backend(backend, device, double_quant)
    if quant_type == "fp4" and chosen != "bitsandbytes":  # torchao has NF4 only
        bnb = "not installed" if not _available("bitsandbytes") else f"not available on {device.type}"
        got = f"backend 'auto' resolved to 'torchao' (bitsandbytes is {bnb})" if backend == "auto" else "got 'torchao'"
        raise ConfigError(f"quant_type 'fp4' needs backend 'bitsandbytes' (torchao has NF4 only); {got}")
    before = memory_footprint(model).total_bytes
    # Quantise everything first and swap afterwards, so an error half-way leaves the model as it was.
    new = [(n, Linear4bit.from_linear(m, dtype, chosen, double_quant, quant_type)) for n, m in todo]
    for name, layer in new:
        set_submodule(model, name, layer)
    footprint = memory_footprint(model)
    after = (footprint.total_bytes, footprint.quantized_params, footprint.quantized_bytes)
    return model, QuantSummary(chosen, dtype, [n for n, _ in new], kept, before, *after, quant_type=quant_type)


# -- training ------------------------------------------------------------------------------------------------
_CHECKPOINTING = ("activation_checkpointing_enable", "gradient_checkpointing_enable", "enable_gradient_checkpointing")
"""transformers' (newer, older) and diffusers' switches for checkpointing (``layer.enable_checkpointing``)."""


def prepare_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None
) -> nn.Module:
    """Make a quantised model ready for adapter training (PEFT's ``prepare_model_for_kbit_training``, step for step).

    Freezes every parameter and casts the half-precision ones (not 4-bit weights) to fp32, except on a GPTQ / AQLM /
    EETQ / HQQ / torchao model, as peft; only a quantised model (deltatune's or bitsandbytes' layers, peft's flags) gets
    gradient checkpointing (non-reentrant unless asked) and input embeddings whose output requires grad, as peft.

    Args:
        model: the base model, before adapters are added.
        use_gradient_checkpointing: turn on the model's gradient checkpointing (a quantised model only).
        gradient_checkpointing_kwargs: passed to the checkpointing (e.g. ``{"use_reentrant": True}``).

    Returns:
        The same model.

    Raises:
        QuantizationError: the model has adapters already (freezing would freeze them too), or is a diffusers
            denoiser (its ``enable_gradient_checkpointing``) asked for ``use_reentrant=True``; nothing changed.
    """
    if any(isinstance(m, DeltaLayer) for m in model.modules()) or hasattr(model, "peft_config"):
        raise QuantizationError("prepare_for_kbit_training freezes every parameter: call it on the base model, "
                                "before adding adapters (as with PEFT)")  # fmt: skip
    method = "hqq" if getattr(model, "hqq_quantized", False) else getattr(model, "quantization_method", None)
    own_format = method in ("gptq", "aqlm", "eetq", "hqq", "torchao")  # peft casts nothing on these
    kbit = own_format or getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    checkpointing = use_gradient_checkpointing and (kbit or any(is_quantized(m) for m in model.modules()))
    reentrant = (gradient_checkpointing_kwargs or {}).get("use_reentrant")
    if checkpointing and reentrant and hasattr(model, "enable_gradient_checkpointing"):  # diffusers': before freezing
        raise QuantizationError(f"prepare_for_kbit_training: {type(model).__name__} (diffusers) checkpoints "
                                "non-reentrant only: leave out use_reentrant=True")  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16) and not _is_4bit(p) and not own_format:
            p.data = p.data.to(torch.float32)
    if checkpointing:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        if any(hasattr(model, f) for f in _CHECKPOINTING):
            enable_checkpointing(model, kwargs)
    return model


# -- merging --------------------------------------------------------------------------------------------------
def merge_quantized(
    model: nn.Module,
    probe_inputs: dict[str, torch.Tensor] | torch.Tensor,
    *,
    requantize: bool = False,
    dtype: torch.dtype | str | None = None,
    adapter_names: list[str] | None = None,
    safe_merge: bool = False,
) -> tuple[nn.Module, MergeReport]:
    """Merge the adapters of a model with a 4-bit base and return a plain model plus the error the merge introduced.

    Each 4-bit layer is dequantised to ``dtype``; LoRA updates are added to the layers they adapt (LoRA's merge
    dequantises through ``Linear4bit.dequantize``); the result is a model with no deltatune module and no 4-bit layer.
    With ``requantize`` the merged layers are quantised again with their own settings (and layers without an update
    stay as they were), which is what PEFT's merge of a 4-bit model does. bitsandbytes' 8-bit layers merge as PEFT's
    (W = int8 x row scale / 127 in fp32, plus s B A; with ``requantize`` an 8-bit layer again, the same bytes).
    The report compares the logits of the adapter model and of the merged model on ``probe_inputs`` (eval mode).

    Args:
        model: a DeltaModel whose base was quantised with ``quantize`` or loaded in 4 bits by transformers.
        probe_inputs: a batch for the model (a dict of keyword arguments, or one tensor), a few sequences suffice.
        requantize: quantise the merged layers to 4 bits again.
        dtype: the dtype of the returned model's weights (default: the layers' compute dtype; the whole model is
            cast to it, so the activations entering a dequantised layer match it). Ignored with ``requantize``.
        adapter_names: the adapters to merge (default: the active ones).
        safe_merge: PEFT's ``merge_and_unload(safe_merge=True)``: refuse (ValueError, PEFT's words) when a merged
            weight would not be finite; every layer is checked before any is merged.

    Returns:
        The merged model (the DeltaModel is empty afterwards, as after ``merge_and_unload``) and a ``MergeReport``.

    Raises:
        ImportError: the backend that made the 4-bit weights is not installed; the model is unchanged.
        ValueError: with ``safe_merge``, a merged weight not finite (PEFT's words); the model is unchanged.
        QuantizationError: the model has no 4-bit or 8-bit layer, or its forward fails on ``probe_inputs`` (one line
            with the model's error); the model is unchanged (training mode and active adapters too).
    """
    if not hasattr(model, "merge_and_unload") or not hasattr(model, "peft_config"):
        raise TypeError(f"merge_quantized takes a DeltaModel (with adapters), got {type(model).__name__}")
    base = model.get_base_model()  # names below are relative to it, as in the model merge_and_unload returns
    layers = list(_quantized_layers(base))
    eight = [(n, m) for n, m in base.named_modules() if is_quantized(m) and not _is_4bit_layer(m)]  # Linear8bitLt
    if not layers and not eight:
        raise QuantizationError("the model has no 4-bit or 8-bit layer; use model.merge_and_unload()")
    for backend in {getattr(m, "backend", "bitsandbytes") for _, m in layers + eight}:
        _backend(backend)  # before anything changes
    first = layers[0][1].compute_dtype if layers else getattr(base, "dtype", None)  # an 8-bit model: its own dtype
    target = _dtype(dtype, "merge_quantized: dtype") if dtype is not None else first or torch.float32
    was_training = model.training
    # bitsandbytes repacks a layer on its first eval forward on a CPU with AVX512-BF16 (its scales rounded to bf16
    # for good) and computes it in bf16 whatever the compute dtype: the reference is the layers as they merge.
    reference = reference_logits(model, probe_inputs, adapter_names, [m for _, m in layers])
    # transformers' bnb layers learn to dequantise by becoming deltatune's Linear4bit (same storage, same output).
    bnb4 = [(n, m) for n, m in layers if _is_bnb_4bit(m)]  # put back as they were if the merge refuses, with the
    packed = {n: (m.weight.data, copy.deepcopy(m.weight.quant_state)) for n, m in bnb4  # CPU-packed bytes that
              if getattr(m.weight.quant_state, "packing_format_for_cpu", False)}  # from_bnb unpacks  # fmt: skip
    for name, module in bnb4:
        set_submodule(base, name, Linear4bit.from_bnb(module))
    # 8-bit layers merge as peft's: W = int8 x row scale / 127 in fp32, W + s B A quantised again (with requantize)
    for name, layer in (plain8 := {n: _dequantize_8bit(m) for n, m in eight}).items():
        set_submodule(base, name, layer)
    four = list(_quantized_layers(base))
    # 4-bit layers merge_adapter() dequantised for good (quant.Linear4bit.dequantize): requantised with the rest
    held = [(n, m) for n, m in base.named_modules() if n.endswith(".base_layer") and hasattr(m, "quant_settings")]
    adapted = {n.removesuffix(".base_layer") for n, _ in four + held if n.endswith(".base_layer")}
    settings = {n: (m.compute_dtype, m.backend, m.double_quant, m.quant_type, m.quant_storage) for n, m in four}
    settings |= {n: m.quant_settings for n, m in held}
    conv1d = {
        n.removesuffix(".base_layer")
        for n, m in four + held
        if getattr(m, "conv1d", type(m) is quant._DequantizedConv1D)
    }
    dora = dora_dtypes(base, four, adapter_names or list(model.active_adapters)) if requantize else {}
    try:  # with requantize, merged in fp32 and quantised after each adapter, as peft's (_quant_steps.py)
        steps8 = {n: (plain8[n], m.weight.has_fp16_weights) for n, m in eight} if requantize else {}
        with stepwise(dict(four) if requantize else {}, settings, steps8):
            plain = model.merge_and_unload(adapter_names, dequantize=False, safe_merge=safe_merge)
    except Exception:  # refused before any weight was written (safe_merge, a method that cannot merge): undo the swaps
        for name, module in bnb4 + eight:
            set_submodule(base, name, module)
            if name in packed:  # (unpacking requantises the double-quantised constants: not undone by packing again)
                module.weight.data, module.weight.quant_state = packed[name]
        model.train(was_training)
        raise
    # A model transformers loaded quantised forgets that it was (else transformers would refuse to cast its plain
    # layers); requantised, it keeps its config, so it saves and loads again in 4 or 8 bits as peft's merge.
    quantizer = getattr(plain, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config") and not requantize:
        quantizer.remove_quantization_config(plain)
        plain.is_loaded_in_4bit = False
    if requantize:  # the layers a merge dequantised; those of adapters left unmerged are still the 4-bit originals
        done = [n for n in sorted(adapted) if not isinstance(plain.get_submodule(n), Linear4bit)]
        for name, layer in requantized(plain, done, settings, conv1d, dora):  # all quantised before any is swapped in
            set_submodule(plain, name, layer)
        int8, back = (
            _backend("bitsandbytes").nn.Int8Params,
            {n.removesuffix(".base_layer"): old for n, old in eight},  # (a merge replaces the layer)
        )
        for name, m in [(n, m) for n, m in plain.named_modules() if n in back]:  # unchanged: the original back
            if not torch.equal(m.weight, _dequantize_8bit(old := back[name]).weight):  # peft's Int8Params(W + s B A)
                w, fp16 = m.weight.data.cpu(), old.weight.has_fp16_weights
                old.weight = int8(w, requires_grad=False, has_fp16_weights=fp16).to(old.weight.device)
                old.state.reset_grads()
            set_submodule(plain, name, old)
        dequantized, quantized = [], [n for n, _ in _quantized_layers(plain)]
    else:  # 4-bit layers, and those a merge dequantised (DequantizedLinear), become plain layers in ``target``
        dequantized = sorted({n.removesuffix(".base_layer") for n in [*settings, *plain8]})
        for name, module in [(n, m) for n, m in plain.named_modules() if callable(getattr(m, "unpack", None))]:
            set_submodule(plain, name, module.unpack(target))
        kept = {
            (m, n): b for m in plain.modules() for n, b in m._buffers.items() if n in m._non_persistent_buffers_set
        }
        plain.to(target)  # the weights; non-persistent buffers (rotary inv_freq) keep their dtype, as on a reload
        for (m, n), b in kept.items():
            m._buffers[n] = b
        quantized = []
    merged = _logits(plain, probe_inputs)
    plain.train(was_training)
    diff = (reference.float() - merged.float()).abs()
    return plain, MergeReport(diff.max().item(), diff.mean().item(), requantize, target, dequantized, quantized)


def _dequantize_8bit(module: nn.Module) -> DequantizedLinear:
    weight, scb = module.weight, module.state.SCB if module.state.SCB is not None else module.weight.SCB
    w = _backend("bitsandbytes").functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device))
    plain = DequantizedLinear(module.in_features, module.out_features, bias=False, device="meta")
    plain.weight, plain.bias = nn.Parameter(w, requires_grad=False), module.bias
    return plain


__all__ = ["MergeReport", "NothingToQuantize", "QuantSummary", "merge_quantized", "prepare_for_kbit_training",
           "quantize"]  # fmt: skip
