"""4-bit NormalFloat (NF4) base weights for QLoRA (Dettmers, Pagnoni, Holtzman, Zettlemoyer, 2023; arXiv:2305.14314).

Each linear weight W (d_out x d_in) is cut into blocks of 64 consecutive values along a row. A block keeps its absmax
c and 64 4-bit indices q into the NF4 code book (16 quantiles of N(0, 1) scaled to [-1, 1], zero included):
W ~= c * NF4[q]. Double quantisation stores the constants c themselves in 8 bits, in blocks of 256 with one fp32
scale per block: 4 + 8/64 + 32/(64*256) = 4.127 bits, about 0.516 bytes per parameter (plus a few bytes per layer).

The 4-bit weights never train: an adapter on top (LoRA wraps ``Linear4bit`` as it wraps ``nn.Linear``) does. Forward
dequantises W to ``compute_dtype`` on the fly and drops it again; backward dequantises once more, so no full-precision
copy of W is kept. Merging dequantises W to ``compute_dtype``, adds the adapter's update and leaves a plain
``nn.Linear`` (``merge_quantized`` also reports the error that introduced, and can quantise the result again).

The kernels come from a library, chosen by ``backend``: torchao's ``NF4Tensor`` (CPU and CUDA, pure PyTorch) or
bitsandbytes' ``Params4bit`` (CUDA kernels; CPU kernels from 0.50). "auto" takes bitsandbytes when it is installed
and torchao otherwise: measured on CPU, docs/BENCHMARKS.md "QLoRA backend"; bitsandbytes is the reference QLoRA
implementation on CUDA. Models that transformers quantised with ``BitsAndBytesConfig(load_in_4bit=True)`` work too:
LoRA wraps their ``bnb.nn.Linear4bit`` layers directly, and ``merge_quantized`` dequantises them.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..layer import DeltaLayer, logical_numel, set_submodule
from ..targets import HEAD_NAMES, matches

BLOCK_SIZE = 64
"""Weights per absmax constant (the paper's block size)."""
SCALER_BLOCK_SIZE = 256
"""Absmax constants per 8-bit block in double quantisation (the paper's block size)."""
BACKENDS = ("torchao", "bitsandbytes")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_NF4_MODULES = ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor")
_INSTALL = {"torchao": "pip install 'deltatune[quant]' (torchao)", "bitsandbytes": "pip install bitsandbytes"}


class QuantizationError(ValueError):
    """The model cannot be quantised (or merged) as asked. The message says why; the model was not changed."""


# -- backends -------------------------------------------------------------------------------------------------
def _backend(name: str) -> Any:
    """The module that implements ``name``: torchao's nf4 tensor module, or bitsandbytes. ImportError if missing."""
    paths = _NF4_MODULES if name == "torchao" else ("bitsandbytes",)
    for path in paths:
        try:
            return importlib.import_module(path)
        except ImportError:
            continue
    raise ImportError(f"quantisation backend {name!r} is not installed: {_INSTALL[name]}")


def _available(name: str) -> bool:
    try:
        _backend(name)
    except ImportError:
        return False
    return True


def _bnb_runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    import bitsandbytes as bnb  # only called once bitsandbytes imported fine

    # CPU kernels: checked with 0.50 (tests/methods/test_quant.py); older releases are CUDA-only or experimental.
    version = tuple(int(p) for p in bnb.__version__.split(".")[:2] if p.isdigit())
    return device.type == "cpu" and version >= (0, 50)


def resolve_backend(backend: str, device: torch.device, double_quant: bool = True) -> str:
    """The backend ``quantize`` uses on ``device``: the named one; for "auto" bitsandbytes where it runs, else torchao.

    Raises:
        ImportError: the backend (for "auto": both) is not installed.
        ConfigError: the backend cannot do what is asked (torchao always double-quantises).
    """
    if backend == "auto":
        if _available("bitsandbytes") and _bnb_runs_on(device):
            return "bitsandbytes"
        if not double_quant:
            raise ConfigError(
                "double_quant=False needs backend 'bitsandbytes' (torchao always double-quantises), "
                f"which is not available on {device.type}: {_INSTALL['bitsandbytes']}"
            )
        if not _available("torchao"):
            raise ImportError(
                f"no quantisation backend is installed: {_INSTALL['torchao']}, or {_INSTALL['bitsandbytes']}"
            )
        return "torchao"
    _backend(backend)
    if backend == "torchao" and not double_quant:
        raise ConfigError(
            "double_quant=False is not available with backend 'torchao' (it always double-quantises); "
            "use backend='bitsandbytes'"
        )
    if backend == "bitsandbytes" and not _bnb_runs_on(device):
        raise ConfigError(f"backend 'bitsandbytes' does not run on {device.type} with this version; use 'torchao'")
    return backend


def _quantize_weight(weight: torch.Tensor, backend: str, double_quant: bool) -> torch.Tensor:
    """W (d_out, d_in) as NF4: torchao's NF4Tensor (shape d_out x d_in) or bitsandbytes' packed Params4bit."""
    w = weight.detach().to(torch.float32).contiguous()  # quantise from fp32 so the constants keep full precision
    if backend == "torchao":
        n_blocks = w.numel() // BLOCK_SIZE
        # torchao needs whole scaler blocks: a layer whose block count is not a multiple of 256 (small layers) uses
        # the largest block dividing it. Each scaler block adds one fp32 scale: 4 bytes, so 16 KB of weights share
        # it at 256, 4 KB at 64 (a 64x64 layer), and only an odd block count costs much (4 bytes per 64 weights).
        return _backend("torchao").to_nf4(w, BLOCK_SIZE, math.gcd(n_blocks, SCALER_BLOCK_SIZE))
    bnb = _backend("bitsandbytes")
    param = bnb.nn.Params4bit(
        w, requires_grad=False, blocksize=BLOCK_SIZE, compress_statistics=double_quant, quant_type="nf4"
    )
    return param.to(weight.device)  # Params4bit quantises when it is moved


def _dequantize_weight(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """The fp32 (or the quantised tensor's own dtype) d_out x d_in weight a 4-bit tensor stands for."""
    if backend == "torchao":
        return weight.get_original_weight()
    bnb = _backend("bitsandbytes")
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # bnb repacks CPU weights for inference; undo it to read them
        data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
        return bnb.functional.dequantize_4bit(data, state)
    return bnb.functional.dequantize_4bit(weight.data, state)


# -- the layer ----------------------------------------------------------------------------------------------
class Linear4bit(nn.Module):
    """A frozen linear layer with its weight in 4-bit NF4; computes in ``compute_dtype``, returns the input's dtype.

    It has ``in_features``, ``out_features``, ``weight`` and ``bias`` like ``nn.Linear``, so LoRA wraps it unchanged.
    ``dequantize()`` returns the plain layer it stands for (the protocol LoRA's merge uses).

    Args:
        weight: the quantised weight (an NF4Tensor or a bitsandbytes Params4bit), standing for d_out x d_in.
        bias: the bias (kept in full precision), or None.
        in_features: d_in.
        out_features: d_out.
        compute_dtype: the dtype the matrix product runs in.
        backend: "torchao" or "bitsandbytes", whichever made ``weight``.
        double_quant: whether the absmax constants are quantised too (recorded to quantise again alike).
        conv1d: the layer replaced a GPT-2 ``Conv1D`` (``merge_quantized`` puts one back).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: nn.Parameter | None,
        in_features: int,
        out_features: int,
        compute_dtype: torch.dtype,
        backend: str,
        double_quant: bool = True,
        conv1d: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.weight.requires_grad_(False)
        self.bias = bias
        self.compute_dtype = compute_dtype
        self.backend = backend
        self.double_quant = double_quant
        self.conv1d = conv1d

    @classmethod
    def from_linear(
        cls, module: nn.Module, compute_dtype: torch.dtype, backend: str, double_quant: bool = True
    ) -> Linear4bit:
        """Quantise an ``nn.Linear`` (or a GPT-2 ``Conv1D``, whose weight is stored d_in x d_out)."""
        conv1d = type(module).__name__ == "Conv1D"
        weight = module.weight.T if conv1d else module.weight
        d_out, d_in = weight.shape
        return cls(
            _quantize_weight(weight, backend, double_quant),
            module.bias,
            d_in,
            d_out,
            compute_dtype,
            backend,
            double_quant,
            conv1d,
        )

    @classmethod
    def from_bnb(cls, module: nn.Module) -> Linear4bit:
        """Adopt a ``bitsandbytes.nn.Linear4bit`` (e.g. made by transformers' BitsAndBytesConfig); no copy of W."""
        weight = module.weight
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            bnb = _backend("bitsandbytes")
            weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
        compute = module.compute_dtype or torch.float32
        return cls(
            weight,
            module.bias,
            module.in_features,
            module.out_features,
            compute,
            "bitsandbytes",
            bool(weight.quant_state.nested),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(self.compute_dtype)
        if self.backend == "torchao":
            # linear_nf4 saves the 4-bit weight for backward and dequantises it again there (no fp copy kept).
            out = _backend("torchao").linear_nf4(x, self.weight)
        else:
            out = _backend("bitsandbytes").matmul_4bit(x, self.weight, quant_state=self.weight.quant_state)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (d_out x d_in) in ``dtype`` (default: the compute dtype)."""
        return _dequantize_weight(self.weight, self.backend).to(dtype or self.compute_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """The plain ``nn.Linear`` this layer stands for, its weight in ``dtype`` (default: the compute dtype).

        Always an ``nn.Linear``, the layout LoRA sees, also for a layer made from a GPT-2 ``Conv1D``:
        ``merge_quantized`` turns those back into ``Conv1D`` at the end, so the merged model loads as the original.
        """
        weight = self.dequantized_weight(dtype)
        plain = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        plain.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias.detach().to(weight.dtype), requires_grad=self.bias.requires_grad)
        return plain

    def __deepcopy__(self, memo: dict) -> Linear4bit:
        # torchao's NF4Tensor copies itself by quantising its dequantised values again with the default block sizes,
        # which fails on small layers: copy the stored tensors instead.
        weight = self.weight
        if self.backend == "torchao":
            names, ctx = weight.__tensor_flatten__()
            inner = {n: getattr(weight, n).clone() for n in names}
            weight = type(weight).__tensor_unflatten__(inner, ctx, weight.shape, weight.stride())
        else:
            weight = copy.deepcopy(weight, memo)
        bias = copy.deepcopy(self.bias, memo)
        new = Linear4bit(weight, bias, self.in_features, self.out_features, self.compute_dtype, self.backend,
                         self.double_quant, self.conv1d)  # fmt: skip
        memo[id(self)] = new
        return new.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4, backend={self.backend}, compute_dtype={str(self.compute_dtype).removeprefix('torch.')}"
        )


def _as_conv1d(linear: nn.Linear) -> nn.Module:
    """transformers' GPT-2 ``Conv1D`` computing what ``linear`` computes (its weight stored d_in x d_out)."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(linear.out_features, linear.in_features).to(linear.weight.device, linear.weight.dtype)
    conv.weight = nn.Parameter(linear.weight.detach().T.contiguous(), requires_grad=False)
    if linear.bias is not None:
        conv.bias = linear.bias
    else:
        conv.bias = nn.Parameter(torch.zeros_like(linear.weight[:, 0]), requires_grad=False)
    return conv


def _is_bnb_4bit(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and type(module).__module__.startswith(
        "bitsandbytes"
    )


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a 4-bit layer (deltatune's ``Linear4bit`` or bitsandbytes')."""
    return isinstance(module, Linear4bit) or _is_bnb_4bit(module)


def _quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return ((n, m) for n, m in model.named_modules() if is_quantized(m))


# -- quantize -------------------------------------------------------------------------------------------------
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

    @property
    def bytes_per_param(self) -> float:
        """Bytes per parameter of the quantised weights (about 0.52; 4 for fp32, 2 for bf16)."""
        return self.quantized_bytes / max(self.quantized_params, 1)

    def __str__(self) -> str:
        lines = [
            f"quantised {len(self.quantized)} layers to NF4 ({self.backend}, compute "
            f"{str(self.compute_dtype).removeprefix('torch.')}): {self.quantized_params:,d} parameters in "
            f"{self.quantized_bytes:,d} bytes ({self.bytes_per_param:.3f} bytes/parameter)",
            f"model: {self.bytes_before:,d} -> {self.bytes_after:,d} bytes",
        ]
        lines += [f"kept in full precision: {name} ({why})" for name, why in self.kept.items()]
        return "\n".join(lines)


def _dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ConfigError(f"compute_dtype must be float32, bfloat16 or float16, got {value!r}")


def _check_args(bits: int, quant_type: str, double_quant: bool, backend: str) -> None:
    if bits != 4:
        raise ConfigError(f"bits must be 4 (NF4), got {bits!r}")
    if quant_type != "nf4":
        raise ConfigError(f"quant_type must be 'nf4', got {quant_type!r}")
    if not isinstance(double_quant, bool):
        raise ConfigError(f"double_quant must be true or false, got {double_quant!r}")
    if backend not in ("auto", *BACKENDS):
        raise ConfigError(f"backend must be 'auto', 'torchao' or 'bitsandbytes', got {backend!r}")


def _keep_reason(name: str, module: nn.Module, output: nn.Module | None, skip: list[str] | str | None) -> str | None:
    """Why the linear layer ``name`` stays in full precision, or None to quantise it."""
    if module is output:
        return "output head"
    if any(name == h or name.endswith("." + h) or f".{h}." in f".{name}." for h in HEAD_NAMES):
        return "task head"
    if skip and matches(name, skip):
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
    """Replace the model's linear layers by 4-bit NF4 ``Linear4bit`` layers, in place.

    The output head (``lm_head``), task heads (classifier, score, ...), embeddings and norms stay in full precision,
    as does a layer whose in_features is not a multiple of the block size 64 (the summary says which and why).
    The keyword arguments are the recipe's ``model.quantization`` keys: ``quantize(model, **recipe["quantization"])``.

    Args:
        model: a full-precision model (a transformers model or any nn.Module), before adapters are added.
        bits: 4 (the only width).
        quant_type: "nf4" (the only type).
        double_quant: also quantise the absmax constants to 8 bits (saves ~0.37 bits/parameter).
        compute_dtype: the dtype the layers compute in: float32, bfloat16 (or float16), as a dtype or its name.
        backend: "auto", "torchao" or "bitsandbytes" (see the module docstring for what "auto" picks).
        skip_modules: more layers to keep in full precision: names matched like ``target_modules``, or a regex.

    Returns:
        The same model object, and a ``QuantSummary``.

    Raises:
        ConfigError: a bad argument. QuantizationError: the model is already quantised or has adapters.
        ImportError: the backend is not installed. In every case the model is unchanged.
    """
    _check_args(bits, quant_type, double_quant, backend)
    dtype = _dtype(compute_dtype)
    if any(isinstance(m, DeltaLayer) for m in model.modules()) or hasattr(model, "peft_config"):
        raise QuantizationError("the model has adapters already; quantize the base model first, then add adapters")
    already = [n for n, _ in _quantized_layers(model)]
    if already:
        raise QuantizationError(
            f"the model is already quantised ({len(already)} 4-bit layers, e.g. {already[0]!r}); "
            "quantize a full-precision model"
        )
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [
        (n, m) for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
    ]
    kept = {n: why for n, m in linears if (why := _keep_reason(n, m, output, skip_modules))}
    todo = [(n, m) for n, m in linears if n not in kept]
    device = todo[0][1].weight.device if todo else torch.device("cpu")
    chosen = resolve_backend(backend, device, double_quant)
    before = memory_footprint(model).total_bytes
    # Quantise everything first and swap afterwards, so an error half-way leaves the model as it was.
    new = [(n, Linear4bit.from_linear(m, dtype, chosen, double_quant)) for n, m in todo]
    for name, layer in new:
        set_submodule(model, name, layer)
    footprint = memory_footprint(model)
    return model, QuantSummary(
        chosen,
        dtype,
        [n for n, _ in new],
        kept,
        before,
        footprint.total_bytes,
        footprint.quantized_params,
        footprint.quantized_bytes,
    )


# -- memory ---------------------------------------------------------------------------------------------------
@dataclass
class MemoryFootprint:
    """Memory a model's parameters and buffers hold, 4-bit weights at their packed size."""

    total_bytes: int
    """Every parameter and buffer (shared storage once), quantised weights with their constants and code books."""
    quantized_bytes: int
    """The part held by 4-bit weights."""
    quantized_params: int
    """The parameters those 4-bit weights stand for."""
    params: int
    """All parameters, 4-bit ones counted as the values they stand for (not the bytes that pack them)."""


def _storage(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``: a wrapper subclass's (NF4Tensor) inner tensors; Params4bit's constants too."""
    if hasattr(type(t), "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in _storage(getattr(t, n))]
    out = [t]
    state = getattr(t, "quant_state", None)
    while state is not None:  # bitsandbytes: absmax, code, offset, then the nested state of the absmax
        out += [x for x in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(x, torch.Tensor)]
        state = state.state2 if getattr(state, "nested", False) else None
    return out


def _is_4bit(t: torch.Tensor) -> bool:
    return getattr(t, "quant_state", None) is not None or type(t).__name__ == "NF4Tensor"


def memory_footprint(model: nn.Module) -> MemoryFootprint:
    """The bytes a model's parameters and buffers really hold (what ``deltatune info`` reports).

    A 4-bit weight counts its packed data, its (double-quantised) constants and its code book; storage shared by
    several tensors (tied embeddings, a code book cached by bitsandbytes) counts once.
    """
    seen: set[tuple[int, int]] = set()
    total = quantized = quantized_params = params = 0
    tensors = [(t, True) for t in model.parameters()] + [(b, False) for b in model.buffers()]
    counted: set[int] = set()
    for t, is_param in tensors:
        if id(t) in counted:
            continue
        counted.add(id(t))
        nbytes = 0
        for part in _storage(t):
            key = (part.untyped_storage().data_ptr(), part.storage_offset())
            if key in seen or part.device.type == "meta":
                continue
            seen.add(key)
            nbytes += part.numel() * part.element_size()
        total += nbytes
        if is_param:
            params += logical_numel(t)
        if _is_4bit(t):
            quantized += nbytes
            quantized_params += logical_numel(t)
    return MemoryFootprint(total, quantized, quantized_params, params)


# -- training ------------------------------------------------------------------------------------------------
def prepare_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None
) -> nn.Module:
    """Make a 4-bit model ready for adapter training (PEFT's ``prepare_model_for_kbit_training``).

    Freezes every parameter; casts the full-precision half-precision ones (norms, biases, embeddings, heads) to fp32
    for stable training, leaving the 4-bit weights as they are; with gradient checkpointing, turns it on
    (non-reentrant unless asked otherwise) and makes the input embeddings' output require grad, which checkpointed
    blocks need when everything before them is frozen.

    Args:
        model: the quantised base model, before adapters are added.
        use_gradient_checkpointing: turn on the model's gradient checkpointing.
        gradient_checkpointing_kwargs: passed to ``gradient_checkpointing_enable`` (e.g. ``{"use_reentrant": True}``).

    Returns:
        The same model.

    Raises:
        QuantizationError: the model has adapters already (freezing would freeze them too).
    """
    if any(isinstance(m, DeltaLayer) for m in model.modules()) or hasattr(model, "peft_config"):
        raise QuantizationError(
            "prepare_for_kbit_training freezes every parameter: call it on the base model, "
            "before adding adapters (as with PEFT)"
        )
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16) and not _is_4bit(p):
            p.data = p.data.to(torch.float32)
    if use_gradient_checkpointing:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


# -- merging --------------------------------------------------------------------------------------------------
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

    def __str__(self) -> str:
        what = "merged and re-quantised" if self.requantized else "merged into full precision"
        return (
            f"{what} ({str(self.dtype).removeprefix('torch.')}): logits differ from the adapter model's by "
            f"max {self.max_abs_diff:.3g}, mean {self.mean_abs_diff:.3g} on the probe batch"
        )


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def merge_quantized(
    model: nn.Module,
    probe_inputs: dict[str, torch.Tensor] | torch.Tensor,
    *,
    requantize: bool = False,
    dtype: torch.dtype | str | None = None,
    adapter_names: list[str] | None = None,
) -> tuple[nn.Module, MergeReport]:
    """Merge the adapters of a model with a 4-bit base and return a plain model plus the error the merge introduced.

    Each 4-bit layer is dequantised to ``dtype``; LoRA updates are added to the layers they adapt (LoRA's merge
    dequantises through ``Linear4bit.dequantize``); the result is a model with no deltatune module and no 4-bit layer.
    With ``requantize`` the merged layers are quantised again with their own settings (and layers without an update
    stay as they were), which is what PEFT's merge of a 4-bit model does.
    The report compares the logits of the adapter model and of the merged model on ``probe_inputs`` (eval mode).

    Args:
        model: a DeltaModel whose base was quantised with ``quantize`` or loaded in 4 bits by transformers.
        probe_inputs: a batch for the model (a dict of keyword arguments, or one tensor), a few sequences suffice.
        requantize: quantise the merged layers to 4 bits again.
        dtype: the dtype of the returned model's weights (default: the layers' compute dtype; the whole model is
            cast to it, so the activations entering a dequantised layer match it). Ignored with ``requantize``.
        adapter_names: the adapters to merge (default: the active ones).

    Returns:
        The merged model (the DeltaModel is empty afterwards, as after ``merge_and_unload``) and a ``MergeReport``.

    Raises:
        ImportError: the backend that made the 4-bit weights is not installed; the model is unchanged.
        QuantizationError: the model has no 4-bit layer.
    """
    if not hasattr(model, "merge_and_unload") or not hasattr(model, "peft_config"):
        raise TypeError(f"merge_quantized takes a DeltaModel (with adapters), got {type(model).__name__}")
    base = model.get_base_model()  # names below are relative to it, as in the model merge_and_unload returns
    layers = list(_quantized_layers(base))
    if not layers:
        raise QuantizationError("the model has no 4-bit layer; use model.merge_and_unload()")
    for backend in {getattr(m, "backend", "bitsandbytes") for _, m in layers}:
        _backend(backend)  # before anything changes
    first = next(m for _, m in layers)
    target = _dtype(dtype) if dtype is not None else first.compute_dtype or torch.float32
    was_training = model.training
    model.eval()
    reference = _logits(model, probe_inputs)
    # transformers' bnb layers learn to dequantise by becoming deltatune's Linear4bit (same storage, same output).
    for name, module in layers:
        if _is_bnb_4bit(module):
            set_submodule(base, name, Linear4bit.from_bnb(module))
    adapted = {n.removesuffix(".base_layer") for n, _ in _quantized_layers(base) if n.endswith(".base_layer")}
    settings = {n: (m.compute_dtype, m.backend, m.double_quant) for n, m in _quantized_layers(base)}
    conv1d = {n.removesuffix(".base_layer") for n, m in _quantized_layers(base) if m.conv1d}
    plain = model.merge_and_unload(adapter_names)
    # A model transformers loaded in 4 bits forgets that it was (transformers' own call for it): its layers are
    # deltatune's or plain now, and transformers would refuse to cast it.
    quantizer = getattr(plain, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(plain)
        plain.is_loaded_in_4bit = False
    if requantize:
        for name in adapted:
            compute, backend, double = settings[name + ".base_layer"]
            layer = Linear4bit.from_linear(plain.get_submodule(name), compute, backend, double)
            layer.conv1d = name in conv1d
            set_submodule(plain, name, layer)
        dequantized, quantized = [], [n for n, _ in _quantized_layers(plain)]
    else:
        dequantized = sorted({n.removesuffix(".base_layer") for n in settings})
        for name, module in list(_quantized_layers(plain)):
            set_submodule(plain, name, module.dequantize(target))
        for name in conv1d:
            set_submodule(plain, name, _as_conv1d(plain.get_submodule(name)))
        plain.to(target)
        quantized = []
    merged = _logits(plain, probe_inputs)
    plain.train(was_training)
    diff = (reference.float() - merged.float()).abs()
    return plain, MergeReport(diff.max().item(), diff.mean().item(), requantize, target, dequantized, quantized)


__all__ = [
    "BLOCK_SIZE",
    "Linear4bit",
    "MemoryFootprint",
    "MergeReport",
    "QuantSummary",
    "QuantizationError",
    "is_quantized",
    "memory_footprint",
    "merge_quantized",
    "prepare_for_kbit_training",
    "quantize",
    "resolve_backend",
]
